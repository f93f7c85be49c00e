//! The store when relay.toml has no `[store]`: the same deliveries, retries, dead letters and
//! dedupe, kept in memory. Nothing survives a restart; the relay says so when it starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::store::{
    BoxFuture, Budget, CachedAnswer, Commit, Committed, Delivery, DeliveryId, DeliveryInfo, Digest,
    Filter, RecentId, Recorded, Selection, Settle, Stats, Store, StoreError, StoreResult,
    StoredDelivery, TargetStats,
};
use crate::push::Push;
use crate::wechat::message::Message;

/// What an entry costs beside the bytes of its parts: the push's fixed fields and small
/// allocations, the maps' and the index's nodes. Estimated from the process's resident memory
/// under a flood of pushes for a target that is down (about 3.5 KiB a push in all).
const ENTRY_OVERHEAD: u64 = 1024;
/// The same for a dedupe record.
const RECORD_OVERHEAD: u64 = 256;

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// [`State::used`], readable without the lock.
    used: AtomicU64,
}

#[derive(Default)]
struct State {
    next_id: DeliveryId,
    pending: BTreeMap<DeliveryId, Entry>,
    /// The pending deliveries by target and due time: what `due` and `next_due` read.
    due: BTreeSet<(String, u64, DeliveryId)>,
    dead: BTreeMap<DeliveryId, Entry>,
    /// The pending deliveries by target and enqueue time: the oldest of each for `stats`.
    enqueued: BTreeSet<(String, u64, DeliveryId)>,
    /// Pending and dead per target, counted as entries come and go: what `stats` reads.
    tallies: BTreeMap<String, (u64, u64)>,
    dedupe: HashMap<String, Record>,
    /// The dedupe records by commit time: what eviction, expiry and `recent` read.
    committed: BTreeSet<(u64, String)>,
    /// The bytes of every entry and record held, counted as each is added and removed.
    used: u64,
}

struct Record {
    committed_ms: u64,
    answer: CachedAnswer,
    digest: Digest,
    bytes: u64,
}

#[derive(Clone)]
struct Entry {
    target: String,
    push: Arc<Push>,
    /// The route that took the push.
    route: Arc<str>,
    attempts: u32,
    enqueued_ms: u64,
    at_ms: u64,
    last_error: Option<String>,
    /// What this entry counts for in [`State::used`].
    bytes: u64,
}

impl Entry {
    fn info(&self, id: DeliveryId) -> DeliveryInfo {
        DeliveryInfo {
            id,
            target: self.target.clone(),
            account: self.push.account.clone(),
            event_id: self.push.event_id.clone(),
            msg_type: self.push.message.msg_type().map(str::to_owned),
            event: self.push.message.event().map(str::to_owned),
            route: Some(self.route.to_string()),
            attempts: self.attempts,
            last_error: self.last_error.clone(),
            enqueued_ms: self.enqueued_ms,
            at_ms: self.at_ms,
        }
    }

    fn revive(&mut self, now_ms: u64) {
        self.attempts = 0;
        self.enqueued_ms = now_ms;
        self.at_ms = now_ms;
        self.last_error = None;
    }

    fn due_key(&self, id: DeliveryId) -> (String, u64, DeliveryId) {
        (self.target.clone(), self.at_ms, id)
    }
}

/// `push` with its body and `Content-Type` in allocations of their own: read from a
/// connection they are slices of its read buffer (kilobytes), which they would otherwise keep
/// alive for as long as the delivery waits, far past what [`entry_bytes`] counts.
fn compact(push: &Push) -> Arc<Push> {
    let body = Bytes::copy_from_slice(&push.body);
    let content_type = push
        .content_type
        .as_ref()
        .and_then(|v| http::HeaderValue::from_bytes(v.as_bytes()).ok());
    let message = if push.encrypted() {
        push.message.clone()
    } else {
        // A plaintext push's message is its body.
        Message::from_parts(body.clone(), push.message.fields().clone())
    };
    Arc::new(Push {
        body,
        content_type,
        message,
        ..push.clone()
    })
}

/// The bytes a delivery of `push` to `target` holds: the push as received and as read, its
/// parsed fields (about the size of the message again), the rest of its fields (the route's
/// name is shared by the push's deliveries, and counted in [`ENTRY_OVERHEAD`]).
fn entry_bytes(push: &Push, target: &str) -> u64 {
    let variable = push.body.len()
        + 2 * push.message.xml().len()
        + push.query.len()
        + push.forwarded_for.len()
        + push.account.len()
        + push.event_id.len()
        + push.content_type.as_ref().map_or(0, |v| v.len())
        + target.len();
    ENTRY_OVERHEAD.saturating_add(variable as u64)
}

/// The bytes a dedupe record holds: its event id twice (its key, and in the index by commit
/// time), the answer, the digest.
fn record_bytes(event_id: &str, answer: &CachedAnswer) -> u64 {
    let variable = 2 * event_id.len() + answer.body.len() + answer.content_type.len() + 32;
    RECORD_OVERHEAD.saturating_add(variable as u64)
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> StoreResult<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| StoreError::Io("the in-memory store is poisoned".into()))
    }

    /// Runs `change` on the state and publishes what it then holds.
    fn change<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut State) -> T,
    ) -> BoxFuture<'static, StoreResult<T>> {
        let result = self.state().map(|mut state| {
            let result = change(&mut state);
            self.used.store(state.used, Ordering::Relaxed);
            result
        });
        Self::now(result)
    }

    fn now<T: Send + 'static>(result: StoreResult<T>) -> BoxFuture<'static, StoreResult<T>> {
        Box::pin(std::future::ready(result))
    }
}

impl State {
    /// Counts one more (`up`) or one fewer pending or dead delivery to `target`; a target
    /// with neither leaves the tallies.
    fn tally(&mut self, target: &str, dead: bool, up: bool) {
        let counts = self.tallies.entry(target.to_owned()).or_default();
        let count = if dead { &mut counts.1 } else { &mut counts.0 };
        *count = if up {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
        if *counts == (0, 0) {
            self.tallies.remove(target);
        }
    }

    fn add_pending(&mut self, id: DeliveryId, entry: Entry) {
        self.due.insert(entry.due_key(id));
        self.enqueued
            .insert((entry.target.clone(), entry.enqueued_ms, id));
        self.tally(&entry.target, false, true);
        self.used = self.used.saturating_add(entry.bytes);
        self.pending.insert(id, entry);
    }

    fn remove_pending(&mut self, id: DeliveryId) -> Option<Entry> {
        let entry = self.pending.remove(&id)?;
        self.due.remove(&entry.due_key(id));
        self.enqueued
            .remove(&(entry.target.clone(), entry.enqueued_ms, id));
        self.tally(&entry.target, false, false);
        self.used = self.used.saturating_sub(entry.bytes);
        Some(entry)
    }

    fn remove_dead(&mut self, id: DeliveryId) -> Option<Entry> {
        let entry = self.dead.remove(&id)?;
        self.tally(&entry.target, true, false);
        self.used = self.used.saturating_sub(entry.bytes);
        Some(entry)
    }

    fn bury(&mut self, id: DeliveryId, now_ms: u64) {
        if let Some(mut entry) = self.remove_pending(id) {
            entry.at_ms = now_ms;
            self.tally(&entry.target, true, true);
            self.used = self.used.saturating_add(entry.bytes);
            self.dead.insert(id, entry);
        }
    }

    /// When the oldest pending delivery to `target` was enqueued, from the index.
    /// The ids of the selected deliveries (an id given is taken as it is).
    fn selected(&self, selection: &Selection) -> Vec<DeliveryId> {
        let of = |table: &BTreeMap<DeliveryId, Entry>, target: &Option<String>| {
            table
                .iter()
                .filter(|(_, e)| target.as_ref().is_none_or(|t| *t == e.target))
                .map(|(id, _)| *id)
                .collect()
        };
        match selection {
            Selection::Id(id) => vec![*id],
            Selection::Pending { target } => of(&self.pending, target),
            Selection::Dead { target } => of(&self.dead, target),
        }
    }

    fn oldest_pending(&self, target: &str) -> Option<u64> {
        let from = (target.to_owned(), 0, DeliveryId::MIN);
        self.enqueued
            .range(from..)
            .next()
            .filter(|(t, _, _)| t == target)
            .map(|(_, at, _)| *at)
    }

    fn recorded(&self, event_id: &str, since_ms: u64) -> Option<Recorded> {
        self.dedupe
            .get(event_id)
            .filter(|r| r.committed_ms >= since_ms)
            .map(|r| Recorded {
                answer: r.answer.clone(),
                digest: Some(r.digest),
            })
    }

    fn remove_record(&mut self, event_id: &str) {
        if let Some(record) = self.dedupe.remove(event_id) {
            self.committed
                .remove(&(record.committed_ms, event_id.to_owned()));
            self.used = self.used.saturating_sub(record.bytes);
        }
    }

    fn add_record(&mut self, event_id: &str, record: Record) {
        self.used = self.used.saturating_add(record.bytes);
        self.committed
            .insert((record.committed_ms, event_id.to_owned()));
        self.dedupe.insert(event_id.to_owned(), record);
    }

    /// The event id of the oldest dedupe record committed before `before_ms`, from the index.
    fn oldest_record(&self, before_ms: u64) -> Option<String> {
        self.committed
            .first()
            .filter(|(at, _)| *at < before_ms)
            .map(|(_, event_id)| event_id.clone())
    }

    /// Evicts the oldest dedupe records that `budget` lets go until `bytes` more fit within
    /// it, or none of those is left; returns how many.
    fn make_room(&mut self, bytes: u64, budget: Budget) -> u64 {
        let mut evicted = 0;
        while self.used.saturating_add(bytes) > budget.max_bytes {
            let Some(event_id) = self.oldest_record(budget.evict_before_ms) else {
                break;
            };
            self.remove_record(&event_id);
            evicted += 1;
        }
        evicted
    }

    /// Up to `limit` due deliveries to `target`, oldest due first, from the index: only the
    /// due ones are read, and `skip` (at most a target's concurrency) is stepped over.
    fn due(&self, target: &str, now_ms: u64, limit: usize, skip: &[DeliveryId]) -> Vec<Delivery> {
        let from = (target.to_owned(), 0, DeliveryId::MIN);
        let to = (target.to_owned(), now_ms, DeliveryId::MAX);
        self.due
            .range(from..=to)
            .filter(|(_, _, id)| !skip.contains(id))
            .filter_map(|(_, _, id)| self.pending.get(id).map(|e| (*id, e)))
            .take(limit)
            .map(|(id, e)| Delivery {
                id,
                target: e.target.clone(),
                push: Ok(Arc::clone(&e.push)),
                attempts: e.attempts,
                enqueued_ms: e.enqueued_ms,
            })
            .collect()
    }

    /// When the first delivery to `target` due after `now_ms` is.
    fn next_due(&self, target: &str, now_ms: u64) -> Option<u64> {
        let from = (target.to_owned(), now_ms.saturating_add(1), DeliveryId::MIN);
        self.due
            .range(from..)
            .next()
            .filter(|(t, _, _)| t == target)
            .map(|(_, at, _)| *at)
    }
}

impl Store for MemoryStore {
    fn commit(&self, commit: Commit) -> BoxFuture<'_, StoreResult<Committed>> {
        self.change(|state| {
            let event_id = &commit.push.event_id;
            if let Some(recorded) = state.recorded(event_id, commit.dedupe_since_ms) {
                return recorded.meet(&commit.digest);
            }
            // An expired record of the same id is replaced.
            state.remove_record(event_id);
            let push = if commit.deliveries.is_empty() {
                Arc::clone(&commit.push)
            } else {
                compact(&commit.push)
            };
            let bytes = record_bytes(event_id, &commit.answer);
            let entries = commit
                .deliveries
                .iter()
                .map(|d| entry_bytes(&push, &d.target))
                .fold(0, u64::saturating_add);
            let evicted = state.make_room(bytes.saturating_add(entries), commit.budget);
            super::store::evicted(evicted, commit.now_ms);
            state.add_record(
                event_id,
                Record {
                    committed_ms: commit.now_ms,
                    answer: commit.answer.clone(),
                    digest: commit.digest,
                    bytes,
                },
            );
            let route: Arc<str> = commit.route.into();
            let mut ids = Vec::with_capacity(commit.deliveries.len());
            for delivery in commit.deliveries {
                state.next_id += 1;
                let id = state.next_id;
                ids.push(id);
                let entry = Entry {
                    bytes: entry_bytes(&push, &delivery.target),
                    target: delivery.target,
                    push: Arc::clone(&push),
                    route: Arc::clone(&route),
                    attempts: delivery.attempts,
                    enqueued_ms: commit.now_ms,
                    at_ms: delivery.at_ms,
                    last_error: delivery.last_error,
                };
                state.add_pending(id, entry);
                if delivery.dead {
                    state.bury(id, commit.now_ms);
                }
            }
            Committed::New(ids)
        })
    }

    fn answer(
        &self,
        event_id: &str,
        since_ms: u64,
    ) -> BoxFuture<'_, StoreResult<Option<Recorded>>> {
        Self::now(self.state().map(|state| state.recorded(event_id, since_ms)))
    }

    fn recent(&self, since_ms: u64) -> BoxFuture<'_, StoreResult<Vec<RecentId>>> {
        Self::now(self.state().map(|state| {
            state
                .committed
                .range((since_ms, String::new())..)
                .filter_map(|(at, event_id)| {
                    state.dedupe.get(event_id).map(|r| RecentId {
                        event_id: event_id.clone(),
                        digest: Some(r.digest),
                        committed_ms: *at,
                    })
                })
                .collect()
        }))
    }

    fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn probe(&self) -> BoxFuture<'_, StoreResult<()>> {
        // The lock is usable and memory can be had for one more entry.
        Self::now(self.state().and_then(|_| {
            let mut room: Vec<u8> = Vec::new();
            room.try_reserve_exact(16 << 10)
                .map_err(|e| StoreError::Io(format!("cannot allocate: {e}")))
        }))
    }

    fn due(
        &self,
        target: &str,
        now_ms: u64,
        limit: usize,
        skip: Vec<DeliveryId>,
    ) -> BoxFuture<'_, StoreResult<Vec<Delivery>>> {
        Self::now(
            self.state()
                .map(|state| state.due(target, now_ms, limit, &skip)),
        )
    }

    fn next_due(&self, target: &str, now_ms: u64) -> BoxFuture<'_, StoreResult<Option<u64>>> {
        Self::now(self.state().map(|state| state.next_due(target, now_ms)))
    }

    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
        now_ms: u64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        self.change(move |state| match settle {
            Settle::Delivered => {
                state.remove_pending(id);
            }
            Settle::Retry {
                attempts,
                at_ms,
                error,
            } => {
                if let Some(mut entry) = state.remove_pending(id) {
                    entry.attempts = attempts;
                    entry.at_ms = at_ms;
                    entry.last_error = Some(error);
                    state.add_pending(id, entry);
                }
            }
            Settle::Dead { attempts, error } => {
                if let Some(entry) = state.pending.get_mut(&id) {
                    entry.attempts = attempts;
                    entry.last_error = Some(error);
                }
                state.bury(id, now_ms);
            }
        })
    }

    fn expire_dedupe(&self, before_ms: u64) -> BoxFuture<'_, StoreResult<u64>> {
        self.change(|state| {
            let mut expired = 0;
            while let Some(event_id) = state.oldest_record(before_ms) {
                state.remove_record(&event_id);
                expired += 1;
            }
            expired
        })
    }

    fn stats(&self) -> BoxFuture<'_, StoreResult<Stats>> {
        // From the tallies and the index: as cheap with a backlog as without.
        Self::now(self.state().map(|state| {
            Stats {
                targets: state
                    .tallies
                    .iter()
                    .map(|(target, (pending, dead))| TargetStats {
                        target: target.clone(),
                        pending: *pending,
                        dead: *dead,
                        oldest_pending_ms: state.oldest_pending(target),
                    })
                    .collect(),
                dedupe_keys: state.dedupe.len() as u64,
            }
        }))
    }

    fn list(&self, filter: Filter) -> BoxFuture<'_, StoreResult<Vec<DeliveryInfo>>> {
        Self::now(self.state().map(|state| {
            let table = if filter.dead {
                &state.dead
            } else {
                &state.pending
            };
            table
                .iter()
                .filter(|(_, e)| filter.target.as_ref().is_none_or(|t| *t == e.target))
                .map(|(id, e)| e.info(*id))
                .collect()
        }))
    }

    fn get(&self, id: DeliveryId) -> BoxFuture<'_, StoreResult<Option<StoredDelivery>>> {
        Self::now(self.state().map(|state| {
            let (entry, dead) = match state.pending.get(&id) {
                Some(entry) => (entry, false),
                None => (state.dead.get(&id)?, true),
            };
            Some(StoredDelivery {
                info: entry.info(id),
                dead,
                push: Ok(Arc::clone(&entry.push)),
            })
        }))
    }

    fn replay(&self, selection: Selection, now_ms: u64) -> BoxFuture<'_, StoreResult<u64>> {
        self.change(move |state| {
            let ids = state.selected(&selection);
            let mut count = 0;
            for id in ids {
                let entry = match state.remove_dead(id) {
                    Some(entry) => Some(entry),
                    None => state.remove_pending(id),
                };
                if let Some(mut entry) = entry {
                    entry.revive(now_ms);
                    state.add_pending(id, entry);
                    count += 1;
                }
            }
            count
        })
    }

    fn discard(&self, selection: Selection) -> BoxFuture<'_, StoreResult<u64>> {
        self.change(move |state| {
            let ids = match selection {
                Selection::Dead { .. } => Vec::new(),
                pending => state.selected(&pending),
            };
            ids.into_iter()
                .filter(|id| state.remove_pending(*id).is_some())
                .count() as u64
        })
    }

    fn purge_dead(
        &self,
        before_ms: Option<u64>,
        target: Option<String>,
    ) -> BoxFuture<'_, StoreResult<u64>> {
        self.change(move |state| {
            let purged: Vec<DeliveryId> = state
                .dead
                .iter()
                .filter(|(_, e)| {
                    before_ms.is_none_or(|b| e.at_ms < b)
                        && target.as_ref().is_none_or(|t| *t == e.target)
                })
                .map(|(id, _)| *id)
                .collect();
            for id in &purged {
                state.remove_dead(*id);
            }
            purged.len() as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::outbox::store::NewDelivery;

    fn push(msg_id: u32) -> Arc<Push> {
        let xml = format!("<xml><FromUserName>o</FromUserName><MsgId>{msg_id}</MsgId></xml>");
        Arc::new(Push {
            account: "main".into(),
            event_id: format!("e{msg_id}"),
            query: String::new(),
            body: Bytes::from(xml.clone()),
            content_type: None,
            forwarded_for: "127.0.0.1".into(),
            message: Message::parse(Bytes::from(xml)).expect("xml"),
            key_index: None,
            received_at: SystemTime::now(),
        })
    }

    /// Commits push `msg_id` with one delivery per `(target, at_ms)`.
    async fn commit(store: &MemoryStore, msg_id: u32, deliveries: &[(&str, u64)]) {
        commit_at(store, msg_id, deliveries, 1, Budget::UNLIMITED).await;
    }

    /// [`commit`] at `now_ms`, within `budget`.
    async fn commit_at(
        store: &MemoryStore,
        msg_id: u32,
        deliveries: &[(&str, u64)],
        now_ms: u64,
        budget: Budget,
    ) {
        let push = push(msg_id);
        let committed = store
            .commit(Commit {
                digest: Digest::of(push.message.xml()),
                push,
                route: "r".into(),
                answer: CachedAnswer {
                    status: 200,
                    content_type: "text/plain".into(),
                    body: Bytes::from_static(b"success"),
                },
                deliveries: deliveries
                    .iter()
                    .map(|(target, at_ms)| NewDelivery {
                        target: (*target).into(),
                        attempts: 0,
                        last_error: None,
                        at_ms: *at_ms,
                        dead: false,
                    })
                    .collect(),
                now_ms,
                dedupe_since_ms: 0,
                budget,
            })
            .await;
        assert!(matches!(committed, Ok(Committed::New(_))));
    }

    async fn due_ids(store: &MemoryStore, target: &str, now: u64, skip: Vec<i64>) -> Vec<i64> {
        let due = store.due(target, now, 10, skip).await.expect("due");
        due.iter().map(|d| d.id).collect()
    }

    #[tokio::test]
    async fn a_target_s_pending_deliveries_are_replayed_or_discarded_and_dead_letters_kept() {
        let store = MemoryStore::new();
        // Ids 1..=4: a at 30, b at 30, a at 40, then 4 (to b) dies.
        commit(&store, 1, &[("a", 30), ("b", 30)]).await;
        commit(&store, 2, &[("a", 40), ("b", 40)]).await;
        let dead = Settle::Dead {
            attempts: 1,
            error: "HTTP 404".into(),
        };
        store.settle(4, dead, 50).await.expect("settle");
        let a = || Some("a".to_owned());
        assert_eq!(
            store.replay(Selection::Pending { target: a() }, 5).await,
            Ok(2)
        );
        assert_eq!(due_ids(&store, "a", 5, vec![]).await, [1, 3]);
        assert_eq!(due_ids(&store, "b", 5, vec![]).await, Vec::<i64>::new());
        let shown = store.get(4).await.expect("get").expect("dead letter 4");
        assert!(shown.dead && shown.info.target == "b" && shown.info.route.is_some());
        assert!(store.get(9).await.expect("get").is_none());
        // Dead letters are not discarded, by id or by selection.
        assert_eq!(store.discard(Selection::Id(4)).await, Ok(0));
        assert_eq!(store.discard(Selection::Dead { target: None }).await, Ok(0));
        assert_eq!(
            store.discard(Selection::Pending { target: a() }).await,
            Ok(2)
        );
        assert_eq!(store.discard(Selection::Id(2)).await, Ok(1));
        let stats = store.stats().await.expect("stats");
        let pending: u64 = stats.targets.iter().map(|t| t.pending).sum();
        let dead: u64 = stats.targets.iter().map(|t| t.dead).sum();
        assert_eq!((pending, dead), (0, 1));
    }

    #[tokio::test]
    async fn due_deliveries_come_oldest_due_first_per_target_without_the_skipped() {
        let store = MemoryStore::new();
        // Ids 1..=5: a at 30, b at 10, a at 10, a at 20, a at 90.
        commit(&store, 1, &[("a", 30), ("b", 10)]).await;
        commit(&store, 2, &[("a", 10)]).await;
        commit(&store, 3, &[("a", 20), ("a", 90)]).await;
        assert_eq!(due_ids(&store, "a", 50, vec![]).await, [3, 4, 1]);
        assert_eq!(due_ids(&store, "a", 50, vec![4]).await, [3, 1]);
        assert_eq!(due_ids(&store, "b", 50, vec![]).await, [2]);
        assert_eq!(due_ids(&store, "a", 5, vec![]).await, Vec::<i64>::new());
        let limited = store.due("a", 50, 2, vec![]).await.expect("due");
        assert_eq!(limited.len(), 2);
        assert_eq!(store.next_due("a", 50).await, Ok(Some(90)));
        assert_eq!(store.next_due("a", 90).await, Ok(None));
        assert_eq!(store.next_due("b", 0).await, Ok(Some(10)));

        // A retry moves a delivery in the index; delivered and dead ones leave it.
        let retry = Settle::Retry {
            attempts: 1,
            at_ms: 95,
            error: "HTTP 503".into(),
        };
        store.settle(3, retry, 50).await.expect("settle");
        store
            .settle(4, Settle::Delivered, 50)
            .await
            .expect("settle");
        let dead = Settle::Dead {
            attempts: 1,
            error: "HTTP 404".into(),
        };
        store.settle(1, dead, 50).await.expect("settle");
        assert_eq!(due_ids(&store, "a", 100, vec![]).await, [5, 3]);
        // Replayed: due now again.
        assert_eq!(store.replay(Selection::Id(1), 60).await, Ok(1));
        assert_eq!(due_ids(&store, "a", 100, vec![]).await, [1, 5, 3]);
    }

    #[tokio::test]
    async fn a_pending_push_does_not_keep_the_connection_buffer_it_was_read_from() {
        let store = MemoryStore::new();
        // A body and a Content-Type as hyper hands them over: slices of one large buffer.
        let buffer = Bytes::from(vec![b' '; 16 << 10]);
        let original = push(1);
        let mut read = (*original).clone();
        read.body = buffer.slice(0..original.body.len());
        read.content_type = http::HeaderValue::from_maybe_shared(buffer.slice(0..10)).ok();
        let read = Arc::new(read);
        store
            .commit(Commit {
                digest: Digest::of(read.message.xml()),
                push: Arc::clone(&read),
                route: "r".into(),
                answer: CachedAnswer {
                    status: 200,
                    content_type: "text/plain".into(),
                    body: Bytes::from_static(b"success"),
                },
                deliveries: vec![NewDelivery {
                    target: "a".into(),
                    attempts: 0,
                    last_error: None,
                    at_ms: 0,
                    dead: false,
                }],
                now_ms: 1,
                dedupe_since_ms: 0,
                budget: Budget::UNLIMITED,
            })
            .await
            .expect("commit");
        let due = store.due("a", 1, 1, vec![]).await.expect("due");
        let Ok(kept) = &due[0].push else {
            panic!("a push")
        };
        assert_eq!(kept.body, read.body);
        let inside = |p: *const u8| buffer.as_ptr_range().contains(&p);
        assert!(!inside(kept.body.as_ptr()), "the body is its own");
        let content_type = kept.content_type.as_ref().expect("content type");
        assert!(!inside(content_type.as_bytes().as_ptr()), "so is the type");
    }

    #[tokio::test]
    async fn used_bytes_grow_with_each_entry_and_shrink_as_they_go() {
        let store = MemoryStore::new();
        assert_eq!(store.used_bytes(), 0);
        commit(&store, 1, &[("a", 0), ("b", 0)]).await;
        let one = store.used_bytes();
        assert!(one > 2 * ENTRY_OVERHEAD, "{one}");
        commit(&store, 2, &[("a", 0)]).await;
        assert!(store.used_bytes() > one);
        for id in 1..=3 {
            store
                .settle(id, Settle::Delivered, 5)
                .await
                .expect("settle");
        }
        assert_eq!(store.expire_dedupe(u64::MAX).await, Ok(2));
        assert_eq!(store.used_bytes(), 0);
    }

    #[tokio::test]
    async fn recent_lists_the_window_s_records_with_their_digests() {
        let store = MemoryStore::new();
        let mut expected = Vec::new();
        for (msg_id, at) in [(1, 100), (2, 300), (3, 200)] {
            let push = push(msg_id);
            let digest = Digest::of(push.message.xml());
            expected.push(RecentId {
                event_id: push.event_id.clone(),
                digest: Some(digest),
                committed_ms: at,
            });
            let committed = store
                .commit(Commit {
                    digest,
                    push,
                    route: "r".into(),
                    answer: CachedAnswer {
                        status: 200,
                        content_type: "text/plain".into(),
                        body: Bytes::from_static(b"success"),
                    },
                    deliveries: vec![],
                    now_ms: at,
                    dedupe_since_ms: 0,
                    budget: Budget::UNLIMITED,
                })
                .await;
            assert!(matches!(committed, Ok(Committed::New(_))));
        }
        let recent = store.recent(200).await.expect("recent");
        assert_eq!(recent, [expected[2].clone(), expected[1].clone()]);
        assert_eq!(store.recent(301).await, Ok(vec![]));
    }

    /// Commits push `msg_id` (0 to 9: records of one size) at `now_ms` with no delivery,
    /// within `budget`.
    async fn record(store: &MemoryStore, msg_id: u32, now_ms: u64, budget: Budget) {
        commit_at(store, msg_id, &[], now_ms, budget).await;
    }

    /// The commit times of the records held, oldest first, and whether the index and
    /// `used` agree with them.
    fn record_times(store: &MemoryStore) -> Vec<u64> {
        let state = store.state().expect("state");
        let mut times: Vec<u64> = state.dedupe.values().map(|r| r.committed_ms).collect();
        times.sort_unstable();
        let indexed: Vec<u64> = state.committed.iter().map(|(at, _)| *at).collect();
        assert_eq!(indexed, times, "the index holds every record");
        let held = state.dedupe.values().map(|r| r.bytes);
        let held = held
            .chain(state.pending.values().map(|e| e.bytes))
            .sum::<u64>();
        assert_eq!(state.used, held, "used counts what is held");
        times
    }

    #[tokio::test]
    async fn past_the_budget_the_oldest_evictable_records_go_and_deliveries_stay() {
        let store = MemoryStore::new();
        commit(&store, 9, &[("a", 0)]).await;
        for (msg_id, at) in [(1, 50), (2, 10), (3, 40), (4, 20), (5, 30)] {
            record(&store, msg_id, at, Budget::UNLIMITED).await;
        }
        assert_eq!(record_times(&store), [1, 10, 20, 30, 40, 50]);
        let held = store.used_bytes();
        let success = CachedAnswer {
            status: 200,
            content_type: "text/plain".into(),
            body: Bytes::from_static(b"success"),
        };
        let one = record_bytes("e0", &success);
        let budget = |max_bytes, evict_before_ms| Budget {
            max_bytes,
            evict_before_ms,
        };
        // Room for one more: nothing goes.
        record(&store, 6, 100, budget(held + one, 100)).await;
        assert_eq!(record_times(&store), [1, 10, 20, 30, 40, 50, 100]);
        // Full: the oldest record goes for the next.
        record(&store, 7, 100, budget(held + one, 15)).await;
        assert_eq!(record_times(&store), [10, 20, 30, 40, 50, 100, 100]);
        // Three should go, one may (committed before 15): it goes and the record is written.
        record(&store, 8, 100, budget(held - one, 15)).await;
        assert_eq!(record_times(&store), [20, 30, 40, 50, 100, 100, 100]);
        // Oldest first, until it fits.
        record(&store, 0, 100, budget(held - one, 45)).await;
        assert_eq!(record_times(&store), [50, 100, 100, 100, 100]);
        assert_eq!(store.used_bytes(), held - one);
        assert_eq!(
            due_ids(&store, "a", 0, vec![]).await,
            [1],
            "the delivery stays"
        );
    }

    /// `stats` counted over every entry, as before the tallies.
    fn counted(store: &MemoryStore) -> Stats {
        let state = store.state().expect("state");
        let mut targets: BTreeMap<String, TargetStats> = BTreeMap::new();
        for entry in state.pending.values() {
            let stats = targets.entry(entry.target.clone()).or_default();
            stats.pending += 1;
            let oldest = stats.oldest_pending_ms.get_or_insert(entry.enqueued_ms);
            *oldest = (*oldest).min(entry.enqueued_ms);
        }
        for entry in state.dead.values() {
            targets.entry(entry.target.clone()).or_default().dead += 1;
        }
        Stats {
            targets: targets
                .into_iter()
                .map(|(target, stats)| TargetStats { target, ..stats })
                .collect(),
            dedupe_keys: state.dedupe.len() as u64,
        }
    }

    #[tokio::test]
    async fn stats_from_the_tallies_match_the_entries_through_every_kind_of_write() {
        let store = MemoryStore::new();
        commit(&store, 1, &[("a", 30), ("b", 10)]).await;
        commit(&store, 2, &[("a", 10)]).await;
        commit(&store, 3, &[("a", 20), ("c", 90)]).await;
        let check = |stats: StoreResult<Stats>| assert_eq!(stats, Ok(counted(&store)));
        check(store.stats().await);
        let dead = || Settle::Dead {
            attempts: 1,
            error: "HTTP 404".into(),
        };
        store.settle(1, dead(), 5).await.expect("settle");
        store.settle(2, dead(), 5).await.expect("settle");
        store.settle(3, Settle::Delivered, 5).await.expect("settle");
        let retry = Settle::Retry {
            attempts: 1,
            at_ms: 40,
            error: "HTTP 503".into(),
        };
        store.settle(4, retry, 5).await.expect("settle");
        check(store.stats().await);
        assert_eq!(store.replay(Selection::Id(1), 7).await, Ok(1));
        check(store.stats().await);
        assert_eq!(store.purge_dead(None, None).await, Ok(1));
        let stats = store.stats().await;
        check(stats.clone());
        let names: Vec<String> = stats
            .expect("stats")
            .targets
            .into_iter()
            .map(|t| t.target)
            .collect();
        assert_eq!(names, ["a", "c"], "b has nothing left");
    }
}
