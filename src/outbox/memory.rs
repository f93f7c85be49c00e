//! The store when relay.toml has no `[store]`: the same deliveries, retries, dead letters and
//! dedupe, kept in memory. Nothing survives a restart; the relay says so when it starts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use super::store::{
    BoxFuture, CachedAnswer, Commit, Committed, Delivery, DeliveryId, DeliveryInfo, Filter,
    Selection, Settle, Stats, Store, StoreError, StoreResult, TargetStats,
};
use crate::push::Push;

/// The most pending deliveries kept: past it a push is answered with an error (WeChat retries)
/// rather than growing without bound.
pub const MAX_PENDING: usize = 100_000;

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: DeliveryId,
    pending: BTreeMap<DeliveryId, Entry>,
    dead: BTreeMap<DeliveryId, Entry>,
    dedupe: HashMap<String, (u64, CachedAnswer)>,
}

#[derive(Clone)]
struct Entry {
    target: String,
    push: Arc<Push>,
    attempts: u32,
    enqueued_ms: u64,
    at_ms: u64,
    last_error: Option<String>,
}

impl Entry {
    fn info(&self, id: DeliveryId) -> DeliveryInfo {
        DeliveryInfo {
            id,
            target: self.target.clone(),
            account: self.push.account.clone(),
            event_id: self.push.event_id.clone(),
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

    fn now<T: Send + 'static>(result: StoreResult<T>) -> BoxFuture<'static, StoreResult<T>> {
        Box::pin(std::future::ready(result))
    }
}

impl State {
    fn bury(&mut self, id: DeliveryId, now_ms: u64) {
        if let Some(mut entry) = self.pending.remove(&id) {
            entry.at_ms = now_ms;
            self.dead.insert(id, entry);
        }
    }
}

impl Store for MemoryStore {
    fn commit(&self, commit: Commit) -> BoxFuture<'_, StoreResult<Committed>> {
        Self::now(self.state().and_then(|mut state| {
            if let Some((_, answer)) = state
                .dedupe
                .get(&commit.push.event_id)
                .filter(|(at, _)| *at >= commit.dedupe_since_ms)
            {
                return Ok(Committed::Duplicate(answer.clone()));
            }
            if state.pending.len() + commit.deliveries.len() > MAX_PENDING {
                return Err(StoreError::Full(MAX_PENDING));
            }
            state.dedupe.insert(
                commit.push.event_id.clone(),
                (commit.now_ms, commit.answer.clone()),
            );
            for delivery in commit.deliveries {
                state.next_id += 1;
                let id = state.next_id;
                state.pending.insert(
                    id,
                    Entry {
                        target: delivery.target,
                        push: Arc::clone(&commit.push),
                        attempts: delivery.attempts,
                        enqueued_ms: commit.now_ms,
                        at_ms: delivery.at_ms,
                        last_error: delivery.last_error,
                    },
                );
                if delivery.dead {
                    state.bury(id, commit.now_ms);
                }
            }
            Ok(Committed::New)
        }))
    }

    fn answer(
        &self,
        event_id: &str,
        since_ms: u64,
    ) -> BoxFuture<'_, StoreResult<Option<CachedAnswer>>> {
        Self::now(self.state().map(|state| {
            state
                .dedupe
                .get(event_id)
                .filter(|(at, _)| *at >= since_ms)
                .map(|(_, answer)| answer.clone())
        }))
    }

    fn due(
        &self,
        target: &str,
        now_ms: u64,
        limit: usize,
        skip: Vec<DeliveryId>,
    ) -> BoxFuture<'_, StoreResult<Vec<Delivery>>> {
        Self::now(self.state().map(|state| {
            let mut due: Vec<(&DeliveryId, &Entry)> = state
                .pending
                .iter()
                .filter(|(id, e)| e.target == target && e.at_ms <= now_ms && !skip.contains(id))
                .collect();
            due.sort_by_key(|(id, e)| (e.at_ms, **id));
            due.into_iter()
                .take(limit)
                .map(|(id, e)| Delivery {
                    id: *id,
                    target: e.target.clone(),
                    push: Ok(Arc::clone(&e.push)),
                    attempts: e.attempts,
                    enqueued_ms: e.enqueued_ms,
                })
                .collect()
        }))
    }

    fn next_due(&self, target: &str, now_ms: u64) -> BoxFuture<'_, StoreResult<Option<u64>>> {
        Self::now(self.state().map(|state| {
            state
                .pending
                .values()
                .filter(|e| e.target == target && e.at_ms > now_ms)
                .map(|e| e.at_ms)
                .min()
        }))
    }

    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
        now_ms: u64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        Self::now(self.state().map(|mut state| match settle {
            Settle::Delivered => {
                state.pending.remove(&id);
            }
            Settle::Retry {
                attempts,
                at_ms,
                error,
            } => {
                if let Some(entry) = state.pending.get_mut(&id) {
                    entry.attempts = attempts;
                    entry.at_ms = at_ms;
                    entry.last_error = Some(error);
                }
            }
            Settle::Dead { attempts, error } => {
                if let Some(entry) = state.pending.get_mut(&id) {
                    entry.attempts = attempts;
                    entry.last_error = Some(error);
                }
                state.bury(id, now_ms);
            }
        }))
    }

    fn expire_dedupe(&self, before_ms: u64) -> BoxFuture<'_, StoreResult<u64>> {
        Self::now(self.state().map(|mut state| {
            let before = state.dedupe.len();
            state.dedupe.retain(|_, (at, _)| *at >= before_ms);
            (before - state.dedupe.len()) as u64
        }))
    }

    fn stats(&self) -> BoxFuture<'_, StoreResult<Stats>> {
        Self::now(self.state().map(|state| {
            let mut targets: BTreeMap<String, TargetStats> = BTreeMap::new();
            for entry in state.pending.values() {
                let stats = targets.entry(entry.target.clone()).or_default();
                stats.pending += 1;
                stats.oldest_pending_ms = Some(
                    stats
                        .oldest_pending_ms
                        .map_or(entry.enqueued_ms, |m| m.min(entry.enqueued_ms)),
                );
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

    fn replay(&self, selection: Selection, now_ms: u64) -> BoxFuture<'_, StoreResult<u64>> {
        Self::now(self.state().map(|mut state| {
            let ids: Vec<DeliveryId> = match &selection {
                Selection::Id(id) => vec![*id],
                Selection::Dead { target } => state
                    .dead
                    .iter()
                    .filter(|(_, e)| target.as_ref().is_none_or(|t| *t == e.target))
                    .map(|(id, _)| *id)
                    .collect(),
            };
            let mut count = 0;
            for id in ids {
                let entry = match state.dead.remove(&id) {
                    Some(entry) => Some(entry),
                    None => state.pending.remove(&id),
                };
                if let Some(mut entry) = entry {
                    entry.revive(now_ms);
                    state.pending.insert(id, entry);
                    count += 1;
                }
            }
            count
        }))
    }

    fn purge_dead(
        &self,
        before_ms: Option<u64>,
        target: Option<String>,
    ) -> BoxFuture<'_, StoreResult<u64>> {
        Self::now(self.state().map(|mut state| {
            let before = state.dead.len();
            state.dead.retain(|_, e| {
                let old = before_ms.is_none_or(|b| e.at_ms < b);
                let of_target = target.as_ref().is_none_or(|t| *t == e.target);
                !(old && of_target)
            });
            (before - state.dead.len()) as u64
        }))
    }
}
