//! What every worker a target name has had shares, for as long as the process lives: the
//! deliveries in flight, the wake-up, and the deliveries this process committed, handed over in
//! memory so that the worker reads the store back only for what memory does not hold (retries,
//! the deliveries of an earlier run, an overflow, a replay by the `outbox` command).
//!
//! A delivery is handed over only once its commit is durable. While a push is being committed
//! its event id is marked, and a store read meanwhile leaves that push's rows out: they come
//! through memory, so a delivery is never attempted once from the store and again from memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use super::store::{Delivery, DeliveryId};

/// The most deliveries held in memory per target; past it they wait in the store, which the
/// worker then reads.
pub const MAX_FRESH: usize = 1024;

#[derive(Default)]
pub struct Lane {
    /// The deliveries being attempted (a reload replaces the worker while the old one's
    /// attempts may still run: the new one never takes these).
    in_flight: Mutex<HashSet<DeliveryId>>,
    /// Rung when deliveries were handed over or an attempt ended.
    pub wake: Notify,
    fresh: Mutex<Fresh>,
}

/// What the worker takes from memory, and what it must read from the store.
#[derive(Default)]
struct Fresh {
    queue: VecDeque<Delivery>,
    /// Event ids of pushes being committed now, with how many commits of each.
    committing: HashMap<String, u32>,
    /// When the store may next hold a due delivery that memory does not (`0`, as at start
    /// when it holds what the last run left: now; `u64::MAX`: nothing known).
    store_due_ms: u64,
    /// Set by what makes the store hold more (a retry, an overflow) while the worker reads it.
    changed: bool,
}

impl Lane {
    pub fn in_flight(&self) -> Vec<DeliveryId> {
        self.in_flight
            .lock()
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Takes `id` for an attempt; false if another worker of this target has it.
    pub fn take(&self, id: DeliveryId) -> bool {
        self.in_flight.lock().is_ok_and(|mut set| set.insert(id))
    }

    pub fn release(&self, id: DeliveryId) {
        if let Ok(mut set) = self.in_flight.lock() {
            set.remove(&id);
        }
    }

    /// A push with a delivery for this target is about to be committed.
    pub fn committing(&self, event_id: &str) {
        if let Ok(mut fresh) = self.fresh.lock() {
            *fresh.committing.entry(event_id.to_owned()).or_default() += 1;
        }
    }

    /// The commit of `event_id` ended: `delivery` is its delivery, due now, to hand over, or
    /// `due_ms` when it waits in the store until then (the reply target's attempt failed).
    /// Neither when nothing was committed.
    pub fn committed(&self, event_id: &str, delivery: Option<Delivery>, due_ms: Option<u64>) {
        let Ok(mut fresh) = self.fresh.lock() else {
            return;
        };
        if let Some(n) = fresh.committing.get_mut(event_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                fresh.committing.remove(event_id);
            }
        }
        if let Some(delivery) = delivery {
            if fresh.queue.len() < MAX_FRESH {
                fresh.queue.push_back(delivery);
            } else {
                // It waits in the store: read it from there.
                fresh.store_due(0);
            }
        }
        if let Some(at) = due_ms {
            fresh.store_due(at);
        }
        drop(fresh);
        self.wake.notify_one();
    }

    /// An attempt left its delivery in the store, due at `at_ms`.
    pub fn retry_at(&self, at_ms: u64) {
        if let Ok(mut fresh) = self.fresh.lock() {
            fresh.store_due(at_ms);
        }
    }

    /// Up to `limit` deliveries handed over in memory, oldest first.
    pub fn take_fresh(&self, limit: usize) -> Vec<Delivery> {
        let Ok(mut fresh) = self.fresh.lock() else {
            return Vec::new();
        };
        let n = limit.min(fresh.queue.len());
        fresh.queue.drain(..n).collect()
    }

    /// Whether the store may hold a due delivery that memory does not, at `now_ms`. If so the
    /// worker reads it and then says what it found with [`Lane::store_read`].
    pub fn store_due_at(&self, now_ms: u64) -> bool {
        let Ok(mut fresh) = self.fresh.lock() else {
            return true;
        };
        if fresh.store_due_ms > now_ms {
            return false;
        }
        fresh.changed = false;
        true
    }

    /// When the store may next hold a due delivery memory does not (for the worker's sleep).
    pub fn next_store_due(&self) -> u64 {
        self.fresh.lock().map_or(0, |fresh| fresh.store_due_ms)
    }

    /// Makes the next look at the store happen now (the idle poll: replays by the `outbox`
    /// command show up through it).
    pub fn poll_store(&self) {
        if let Ok(mut fresh) = self.fresh.lock() {
            fresh.store_due(0);
        }
    }

    /// The worker's store read found every due delivery (fewer than it asked for); `next_ms`
    /// is when the next one is due. Unless something was added meanwhile, the store is not read
    /// again before then.
    pub fn store_read(&self, next_ms: Option<u64>) {
        if let Ok(mut fresh) = self.fresh.lock()
            && !fresh.changed
        {
            fresh.store_due_ms = next_ms.unwrap_or(u64::MAX);
        }
    }

    /// Leaves out of a store read what comes through memory: the deliveries waiting here, and
    /// those of pushes being committed now.
    pub fn not_in_memory(&self, due: Vec<Delivery>) -> Vec<Delivery> {
        let Ok(fresh) = self.fresh.lock() else {
            return due;
        };
        if fresh.committing.is_empty() && fresh.queue.is_empty() {
            return due;
        }
        due.into_iter()
            .filter(|d| !fresh.queue.iter().any(|q| q.id == d.id))
            .filter(|d| match &d.push {
                Ok(push) => !fresh.committing.contains_key(&push.event_id),
                Err(_) => true,
            })
            .collect()
    }
}

impl Fresh {
    fn store_due(&mut self, at_ms: u64) {
        self.store_due_ms = self.store_due_ms.min(at_ms);
        self.changed = true;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::push::Push;

    fn delivery(id: DeliveryId, event_id: &str) -> Delivery {
        let push = Push::for_test(event_id);
        Delivery {
            id,
            target: "t".into(),
            push: Ok(Arc::new(push)),
            attempts: 0,
            enqueued_ms: 0,
        }
    }

    fn ids(deliveries: &[Delivery]) -> Vec<DeliveryId> {
        deliveries.iter().map(|d| d.id).collect()
    }

    #[test]
    fn a_store_read_leaves_out_what_is_being_committed_or_waits_in_memory() {
        let lane = Lane::default();
        lane.committing("e1");
        let read = lane.not_in_memory(vec![delivery(1, "e1"), delivery(2, "e2")]);
        assert_eq!(ids(&read), [2]);
        lane.committed("e1", Some(delivery(1, "e1")), None);
        let read = lane.not_in_memory(vec![delivery(1, "e1"), delivery(2, "e2")]);
        assert_eq!(ids(&read), [2], "waiting in memory");
        assert_eq!(ids(&lane.take_fresh(8)), [1]);
        let read = lane.not_in_memory(vec![delivery(1, "e1")]);
        assert_eq!(ids(&read), [1], "no longer in memory");
    }

    #[test]
    fn the_store_is_read_at_start_then_only_when_it_holds_more_than_memory() {
        let lane = Lane::default();
        assert!(lane.store_due_at(10), "what the last run left");
        lane.store_read(None);
        assert!(!lane.store_due_at(10));
        lane.retry_at(50);
        assert!(!lane.store_due_at(49));
        assert!(lane.store_due_at(50));
        // A retry recorded while the worker reads the store is not forgotten by the read.
        lane.retry_at(60);
        lane.store_read(None);
        assert!(lane.store_due_at(60));
        lane.store_read(None);
        for n in 0..MAX_FRESH {
            lane.committed("e", Some(delivery(n as DeliveryId, "e")), None);
        }
        assert!(!lane.store_due_at(100));
        lane.committed("e", Some(delivery(-1, "e")), None);
        assert!(
            lane.store_due_at(100),
            "past MAX_FRESH it waits in the store"
        );
        assert_eq!(lane.take_fresh(usize::MAX).len(), MAX_FRESH);
    }
}
