//! The outbox: what makes `success` a promise. A routed push is committed (its dedupe record,
//! the answer WeChat gets, and a delivery per target that still needs it) before WeChat is
//! answered; delivery workers then send each delivery until its target takes it, retrying with
//! backoff, and make a dead letter of what cannot be delivered.
//!
//! - [`store`]: the trait every backend implements, and its types;
//! - [`sqlite`]: the durable backend (`[store] path`); [`memory`]: the one without `[store]`;
//! - [`worker`]: per-target dispatchers, attempts, backoff; [`lane`]: what a target's workers
//!   share, with the deliveries committed by this process handed over in memory;
//! - [`command`]: the `wechat-relay outbox` commands.
//!
//! Dedupe: a push's key ([`crate::push::Push::event_id`], PROTOCOL.md §6) is claimed in memory
//! while the push is handled, so a WeChat retry arriving meanwhile waits for the first and gets
//! its answer; once committed, the store answers retries for `dedupe_ttl_s`, across restarts.
//! Both compare the [`Digest`] of the message: another message under the same key is not a
//! retry but a collision, and the relay gives it an event id of its own.
//!
//! Bounds: past `[store] max_bytes` a push that needs a delivery is refused (503, WeChat
//! retries) until deliveries drain or dead letters are purged, and the oldest dedupe records
//! make room for new ones ([`store::Budget`]); dead letters older than
//! `dead_letter_retention_s` are purged in the background.

pub mod command;
pub mod lane;
pub mod memory;
pub mod postgres;
pub mod recent;
pub mod sqlite;
pub mod store;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, Target};
use crate::error::ForwardError;
use crate::forward::{Answer, Forwarder};
use crate::push::Push;
use lane::Lane;
use recent::RecentIds;
use store::{
    Budget, CachedAnswer, ClaimTimes, Commit, Committed, Delivery, DeliveryId, Digest, NewDelivery,
    Recorded, Settle, Store, StoreError, StoreResult,
};
use worker::{TargetWorker, classify, decide};

/// How often expired dedupe records and old dead letters are deleted (more often when the
/// retention is short: half of it, down to [`UPKEEP_MIN`]).
const UPKEEP_EVERY: Duration = Duration::from_secs(60);
const UPKEEP_MIN: Duration = Duration::from_secs(1);
/// At most one "store over budget" line per this.
const FULL_LOG_EVERY_MS: u64 = 1000;
/// How long a relay's claim on a push it handles lasts in a shared store: past the 4.8 s in
/// which it answers (`relay::COMMIT_BY`), so a claim that runs out is one whose relay died.
const CLAIM_MS: u64 = 5_000;
/// How long a retry waits for another relay's answer, and how often it looks.
const CLAIM_WAIT: Duration = Duration::from_millis(4_000);
const CLAIM_POLL: Duration = Duration::from_millis(50);
/// How many times a push may meet another message under its event id (once is the rule: its
/// own id holds its digest).
const MAX_REKEYS: u32 = 2;

pub fn now_ms() -> u64 {
    sqlite::unix_ms(SystemTime::now())
}

/// Opens the store `config` names: SQLite in `[store] path`, PostgreSQL at `[store] url`, or
/// memory without either.
pub async fn open_store(config: &Config, role: sqlite::Role) -> StoreResult<Arc<dyn Store>> {
    let store = &config.store;
    match (&store.path, &store.database) {
        (Some(path), _) => Ok(Arc::new(sqlite::SqliteStore::open(path, role)?)),
        (None, Some(database)) => Ok(Arc::new(
            postgres::PgStore::open(database, store.lease, role).await?,
        )),
        (None, None) => Ok(Arc::new(memory::MemoryStore::new())),
    }
}

/// The store with its workers and the in-memory claims. It lives as long as the process:
/// a reload reconfigures its workers, the store and the claims stay.
pub struct Outbox {
    store: Arc<dyn Store>,
    /// What a reload may change.
    limits: Arc<Limits>,
    /// When the last "over budget" line was written, and how many were left out since.
    full_logged_ms: AtomicU64,
    full_suppressed: AtomicU64,
    claims: Claims,
    /// The event ids committed within the dedupe window, loaded from the store on first use
    /// (at start); `None` when they could not be: every id is then looked up.
    recent: tokio::sync::OnceCell<Option<RecentIds>>,
    workers: Mutex<HashMap<String, WorkerSlot>>,
    /// Per target name, for as long as the process lives: what its workers share.
    lanes: Arc<Mutex<HashMap<String, Arc<Lane>>>>,
    /// Attempt trackers of every worker generation, for shutdown.
    generations: Mutex<Vec<TaskTracker>>,
    forwarder: Forwarder,
    stop: CancellationToken,
    /// Dispatchers and the expiry task.
    tasks: TaskTracker,
}

/// The `[store]` settings the outbox applies, in milliseconds and bytes.
#[derive(Default)]
struct Limits {
    dedupe_ttl_ms: AtomicU64,
    retention_ms: AtomicU64,
    max_bytes: AtomicU64,
}

impl Limits {
    fn set(&self, config: &Config) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let store = &config.store;
        self.dedupe_ttl_ms
            .store(ms(store.dedupe_ttl), Ordering::Relaxed);
        self.retention_ms
            .store(ms(store.dead_letter_retention), Ordering::Relaxed);
        self.max_bytes.store(store.max_bytes, Ordering::Relaxed);
    }

    /// How often the upkeep runs: every minute, or every half retention when that is shorter.
    fn upkeep_every(&self) -> Duration {
        let half = Duration::from_millis(self.retention_ms.load(Ordering::Relaxed) / 2);
        half.clamp(UPKEEP_MIN, UPKEEP_EVERY)
    }
}

/// A target's running worker.
struct WorkerSlot {
    target: Target,
    stop: CancellationToken,
    attempts: TaskTracker,
}

impl Outbox {
    /// Opens the store and starts a worker per target: deliveries left pending by the last run
    /// are picked up at once. Call inside the runtime, before binding the listener.
    pub async fn start(config: &Config, forwarder: Forwarder) -> StoreResult<Outbox> {
        let store = open_store(config, sqlite::Role::Server).await?;
        let outbox = Outbox::with_store(config, store, forwarder);
        outbox.report_leftovers(config).await?;
        outbox.recent().await;
        Ok(outbox)
    }

    /// [`Outbox::start`] on a store already open.
    pub fn with_store(config: &Config, store: Arc<dyn Store>, forwarder: Forwarder) -> Outbox {
        let outbox = Outbox {
            store,
            limits: Arc::default(),
            full_logged_ms: AtomicU64::new(0),
            full_suppressed: AtomicU64::new(0),
            claims: Claims::default(),
            recent: tokio::sync::OnceCell::new(),
            workers: Mutex::new(HashMap::new()),
            lanes: Arc::default(),
            generations: Mutex::new(Vec::new()),
            forwarder,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        outbox.reconfigure(config);
        outbox.tasks.spawn(upkeep(
            Arc::clone(&outbox.store),
            Arc::clone(&outbox.limits),
            outbox.stop.clone(),
        ));
        if let Some(wakeups) = outbox.store.wakeups() {
            outbox.tasks.spawn(wake_lanes(
                wakeups,
                Arc::clone(&outbox.lanes),
                outbox.stop.clone(),
            ));
        }
        outbox
    }

    /// Makes the workers match `config`'s targets: a new target gets a worker, a removed one
    /// loses it (its deliveries wait in the store), a changed one gets a new worker at once.
    /// The old worker's attempts in flight finish and are recorded; the new worker skips the
    /// deliveries they hold, so no delivery is attempted twice at once (for a moment both
    /// workers' attempts count, up to twice `concurrency`).
    pub fn reconfigure(&self, config: &Config) {
        self.limits.set(config);
        let (Ok(mut workers), Ok(mut lanes)) = (self.workers.lock(), self.lanes.lock()) else {
            return;
        };
        workers.retain(|name, slot| {
            let kept = config.targets.iter().any(|t| t.name == *name);
            if !kept {
                slot.retire();
            }
            kept
        });
        for target in &config.targets {
            match workers.get(&target.name) {
                Some(slot) if slot.target == *target => continue,
                Some(slot) => slot.retire(),
                None => {}
            }
            let lane = Arc::clone(lanes.entry(target.name.clone()).or_default());
            let slot = WorkerSlot {
                target: target.clone(),
                stop: self.stop.child_token(),
                attempts: TaskTracker::new(),
            };
            let worker = Arc::new(TargetWorker::new(
                Arc::new(target.clone()),
                Arc::clone(&self.store),
                self.forwarder.clone(),
                lane,
            ));
            self.tasks
                .spawn(worker.run(slot.stop.clone(), slot.attempts.clone()));
            if let Ok(mut generations) = self.generations.lock() {
                generations.retain(|g| !(g.is_closed() && g.is_empty()));
                generations.push(slot.attempts.clone());
            }
            workers.insert(target.name.clone(), slot);
        }
    }

    /// Says what the store holds (at startup, and after a reload), and names pending
    /// deliveries whose target is not configured (they wait there until it is again).
    pub async fn report_leftovers(&self, config: &Config) -> StoreResult<()> {
        let stats = self.store.stats().await?;
        for t in &stats.targets {
            let known = config.targets.iter().any(|c| c.name == t.target);
            if !known && t.pending > 0 {
                warn!(target = %t.target, pending = t.pending,
                    "pending deliveries for a target that is not configured: they wait until it is");
            } else if t.pending > 0 || t.dead > 0 {
                info!(target = %t.target, pending = t.pending, dead = t.dead, "outbox");
            }
        }
        Ok(())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Takes a verified push for handling: claims its event id, so that a WeChat retry
    /// arriving meanwhile waits for this one's answer. With `look_up` (a route whose reply
    /// target would be asked again) the store is asked first whether it was committed before.
    /// A retry comes back with the answer the first one got; another message under the same
    /// event id is a collision and the push gets an id of its own ([`Ticket::rekey`]).
    pub async fn admit(&self, push: Arc<Push>, look_up: bool) -> StoreResult<Admitted> {
        let digest = Digest::of(push.message.xml());
        let mut ticket = Ticket {
            push,
            digest,
            guards: Vec::new(),
            collisions: 0,
            shared_claims: Vec::new(),
            store: Arc::clone(&self.store),
        };
        match self.claim(&mut ticket, look_up).await {
            Ok(None) => Ok(Admitted::New(ticket)),
            Ok(Some(answer)) => Ok(Admitted::Retry {
                push: Arc::clone(&ticket.push),
                answer,
            }),
            Err(e) => Err(ticket.fail(e)),
        }
    }

    /// Claims the ticket's event id, re-keying it on a collision; `Some` with the first
    /// one's answer when the push is a retry.
    async fn claim(
        &self,
        ticket: &mut Ticket,
        look_up: bool,
    ) -> StoreResult<Option<Arc<CachedAnswer>>> {
        loop {
            if ticket.collisions > MAX_REKEYS {
                return Err(StoreError::Io("event id collisions without end".into()));
            }
            match self.claims.claim(&ticket.push.event_id, &ticket.digest) {
                Claim::First(guard) => ticket.guards.push(guard),
                Claim::Wait(waiter) => {
                    // A WeChat retry while the first is handled: the first one's answer.
                    let answer = waiter
                        .answer()
                        .await
                        .unwrap_or_else(|| Arc::new(CachedAnswer::from(StoreError::Closed)));
                    ticket.finish(&answer);
                    return Ok(Some(answer));
                }
                Claim::Collision => {
                    ticket.rekey();
                    continue;
                }
            }
            if !look_up {
                return Ok(None);
            }
            // A shared store's claim reads the record too.
            let recorded = if self.store.shared() {
                let recorded = self.claim_shared(ticket).await?;
                if recorded.is_none() {
                    ticket.shared_claims.push(ticket.push.event_id.clone());
                }
                recorded
            } else {
                self.answer(&ticket.push.event_id).await?
            };
            let Some(recorded) = recorded else {
                return Ok(None);
            };
            match recorded.meet(&ticket.digest) {
                Committed::Duplicate(answer) => {
                    // A retry of a push committed before: the answer it got then.
                    let answer = Arc::new(answer);
                    ticket.finish(&answer);
                    return Ok(Some(answer));
                }
                _ => ticket.rekey(),
            }
        }
    }

    /// On a shared store, claims the ticket's event id there too, so that a WeChat retry that
    /// reaches another relay while this one asks the reply target waits for this one's answer
    /// instead of asking again. While another relay holds a live claim, waits for its answer
    /// (`Some`), or takes the push over once that claim runs out (its relay died); past
    /// [`CLAIM_WAIT`] the push is refused (503, WeChat retries).
    async fn claim_shared(&self, ticket: &Ticket) -> StoreResult<Option<Recorded>> {
        let event_id = &ticket.push.event_id;
        let wait = async {
            loop {
                let now = now_ms();
                let times = ClaimTimes {
                    now_ms: now,
                    until_ms: now.saturating_add(CLAIM_MS),
                    since_ms: self.dedupe_since_ms(),
                };
                let found = self.store.claim(event_id, times).await?;
                if found.recorded.is_some() || found.held {
                    return Ok(found.recorded);
                }
                tokio::time::sleep(CLAIM_POLL).await;
            }
        };
        // The whole wait, the store's calls included, is bounded.
        tokio::time::timeout(CLAIM_WAIT, wait)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Io(
                    "another relay is handling this push and has not answered it yet".into(),
                ))
            })
    }

    /// The dedupe record committed for `event_id` within the dedupe window, if any: looked up
    /// in the store only when the recent ids say it may be there.
    async fn answer(&self, event_id: &str) -> StoreResult<Option<Recorded>> {
        if let Some(recent) = self.recent().await
            && !recent.may_hold(event_id, now_ms(), self.window_ms())
        {
            return Ok(None);
        }
        self.store.answer(event_id, self.dedupe_since_ms()).await
    }

    /// The recent ids, with the store's dedupe window loaded the first time.
    async fn recent(&self) -> Option<&RecentIds> {
        let loaded = self.recent.get_or_init(|| async {
            // Other relays commit to a shared store: an id this one never saw may be there.
            if self.store.shared() {
                return None;
            }
            let now = now_ms();
            let recent = RecentIds::new(now)?;
            match self.store.recent(self.dedupe_since_ms()).await {
                Ok(ids) => {
                    for id in &ids {
                        recent.insert(&id.event_id, now, self.window_ms());
                    }
                    Some(recent)
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the recent event ids: every retry check reads the store");
                    None
                }
            }
        });
        loaded.await.as_ref()
    }

    /// The oldest commit time that still counts for dedupe.
    fn dedupe_since_ms(&self) -> u64 {
        now_ms().saturating_sub(self.window_ms())
    }

    /// The dedupe window (`dedupe_ttl_s`), in milliseconds.
    fn window_ms(&self) -> u64 {
        self.limits.dedupe_ttl_ms.load(Ordering::Relaxed)
    }

    /// `Some` while the store holds `max_bytes` or more.
    fn over_budget(&self) -> Option<StoreError> {
        let used = self.store.used_bytes();
        let max = self.limits.max_bytes.load(Ordering::Relaxed);
        (used >= max).then_some(StoreError::Full { used, max })
    }

    /// What keeps the store from taking pushes now: a write that allocates fails, or it is
    /// over its budget. Empty when it takes them.
    pub async fn unready(&self, within: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        match tokio::time::timeout(within, self.store.probe()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("the store does not take writes: {e}")),
            Err(_) => problems.push(format!(
                "the store did not answer within {} ms",
                within.as_millis()
            )),
        }
        if let Some(full) = self.over_budget() {
            problems.push(format!(
                "{full}: pushes that need a delivery are answered 503"
            ));
        }
        problems
    }

    /// Counts a push refused for the budget; logs it at most once a second, with how many
    /// were not logged since.
    fn refused_for_budget(&self, full: &StoreError) {
        crate::metrics::store_full();
        let now = now_ms();
        let last = self.full_logged_ms.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= FULL_LOG_EVERY_MS
            && self
                .full_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if due {
            let suppressed = self.full_suppressed.swap(0, Ordering::Relaxed);
            warn!(error = %full, suppressed,
                "store over budget: pushes that need a delivery are answered 503 (WeChat retries) until deliveries drain or dead letters are purged");
        } else {
            self.full_suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Commits an admitted push, taken by the route named `route`, with the answer WeChat
    /// gets: its dedupe record and a delivery for each target in `to` that still needs one (the reply target's `attempt` counts as
    /// attempt 1 of its delivery: delivered, retried later, or dead, with the same
    /// dead-letter line as the workers write). Then wakes the workers of its targets and
    /// gives the answer to the retries waiting on it.
    ///
    /// A push committed before within the dedupe window comes back as a retry; another
    /// message committed under its event id makes it commit under an id of its own. A push
    /// with deliveries is refused while the store is over its budget.
    pub async fn commit(
        &self,
        mut ticket: Ticket,
        answer: CachedAnswer,
        route: &str,
        to: &[String],
        attempt: Option<ReplyAttempt>,
    ) -> StoreResult<Accepted> {
        let deliveries = deliveries(to, attempt.as_ref(), now_ms());
        if !deliveries.is_empty()
            && let Some(full) = self.over_budget()
        {
            self.refused_for_budget(&full);
            return Err(ticket.fail(full));
        }
        let answer = Arc::new(answer);
        loop {
            let now = now_ms();
            let handover = self.handover(&ticket.push.event_id, &deliveries);
            let commit = Commit {
                push: Arc::clone(&ticket.push),
                route: route.to_owned(),
                digest: ticket.digest,
                answer: (*answer).clone(),
                deliveries: deliveries.clone(),
                now_ms: now,
                dedupe_since_ms: self.dedupe_since_ms(),
                budget: Budget::at(self.limits.max_bytes.load(Ordering::Relaxed), now),
            };
            match self.store.commit(commit).await {
                Ok(Committed::New(ids)) => {
                    if let Some(recent) = self.recent().await {
                        recent.insert(&ticket.push.event_id, now, self.window_ms());
                    }
                    handover.committed(&ticket.push, &deliveries, &ids, now);
                    for (delivery, id) in deliveries.iter().zip(&ids).filter(|(d, _)| d.dead) {
                        let error = delivery.last_error.as_deref().unwrap_or("-");
                        worker::log_dead_letter(
                            &delivery.target,
                            *id,
                            &ticket.push.event_id,
                            delivery.attempts,
                            error,
                        );
                    }
                    ticket.finish(&answer);
                    ticket.shared_claims.clear();
                    return Ok(Accepted::New {
                        collided: ticket.collisions > 0,
                        push: Arc::clone(&ticket.push),
                        answer,
                    });
                }
                Ok(Committed::Duplicate(earlier)) => {
                    let earlier = Arc::new(earlier);
                    ticket.finish(&earlier);
                    ticket.shared_claims.clear();
                    return Ok(Accepted::Retry {
                        push: Arc::clone(&ticket.push),
                        answer: earlier,
                    });
                }
                Ok(Committed::Collision) => {
                    ticket.rekey();
                    match self.claim(&mut ticket, false).await {
                        Ok(None) => continue,
                        Ok(Some(first)) => {
                            return Ok(Accepted::Retry {
                                push: Arc::clone(&ticket.push),
                                answer: first,
                            });
                        }
                        Err(e) => return Err(ticket.fail(e)),
                    }
                }
                Err(e) => return Err(ticket.fail(e)),
            }
        }
    }

    /// Marks a push's pending deliveries as being committed, in their targets' lanes.
    fn handover(&self, event_id: &str, deliveries: &[NewDelivery]) -> Handover {
        let mut lanes = Vec::new();
        if let Ok(all) = self.lanes.lock() {
            for (at, delivery) in deliveries.iter().enumerate().filter(|(_, d)| !d.dead) {
                if let Some(lane) = all.get(&delivery.target) {
                    lane.committing(event_id);
                    lanes.push((at, Arc::clone(lane)));
                }
            }
        }
        Handover {
            event_id: event_id.to_owned(),
            lanes,
        }
    }

    /// Stops taking deliveries, lets attempts in flight finish within `grace`, and returns
    /// whether they did. Whatever is not delivered stays in the store for the next start.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let generations = self
            .generations
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default();
        let all = async {
            for attempts in generations {
                attempts.close();
                attempts.wait().await;
            }
        };
        tokio::time::timeout(grace, all).await.is_ok()
    }
}

/// Makes the workers that another process's wake-up names look at the store now, rather than
/// at their next idle poll.
async fn wake_lanes(
    mut wakeups: tokio::sync::broadcast::Receiver<Option<Arc<str>>>,
    lanes: Arc<Mutex<HashMap<String, Arc<Lane>>>>,
    stop: CancellationToken,
) {
    loop {
        let target = tokio::select! {
            () = stop.cancelled() => return,
            wakeup = wakeups.recv() => match wakeup {
                Ok(target) => target,
                // Some were missed: every worker looks.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        };
        let Ok(lanes) = lanes.lock() else { return };
        for (name, lane) in lanes.iter() {
            if target.as_deref().is_none_or(|t| t == name) {
                lane.poll_store();
                lane.wake.notify_one();
            }
        }
    }
}

/// At start and then every [`Limits::upkeep_every`]: deletes expired dedupe records and the
/// dead letters older than the retention.
async fn upkeep(store: Arc<dyn Store>, limits: Arc<Limits>, stop: CancellationToken) {
    loop {
        let now = now_ms();
        let before = now.saturating_sub(limits.dedupe_ttl_ms.load(Ordering::Relaxed));
        if let Err(e) = store.expire_dedupe(before).await {
            warn!(error = %e, "cannot expire dedupe records");
        }
        let died_before = now.saturating_sub(limits.retention_ms.load(Ordering::Relaxed));
        match store.purge_dead(Some(died_before), None).await {
            Ok(0) => {}
            Ok(purged) => info!(purged, "dead letters past dead_letter_retention_s purged"),
            Err(e) => warn!(error = %e, "cannot purge old dead letters"),
        }
        tokio::select! {
            () = tokio::time::sleep(limits.upkeep_every()) => {}
            () = stop.cancelled() => return,
        }
    }
}

impl WorkerSlot {
    /// Stops the worker from taking deliveries; its attempts in flight finish.
    fn retire(&self) {
        self.stop.cancel();
        self.attempts.close();
    }
}

/// One delivery per target of the route, in route order, except the reply target when its
/// synchronous attempt delivered the push (a failed one is recorded as attempt 1).
fn deliveries(to: &[String], attempt: Option<&ReplyAttempt>, now: u64) -> Vec<NewDelivery> {
    let mut deliveries: Vec<NewDelivery> = to
        .iter()
        .map(|target| NewDelivery {
            target: target.clone(),
            attempts: 0,
            last_error: None,
            at_ms: now,
            dead: false,
        })
        .collect();
    let Some(attempt) = attempt else {
        return deliveries;
    };
    let Some(at) = deliveries
        .iter()
        .position(|d| d.target == attempt.target.name)
    else {
        return deliveries;
    };
    match decide(&attempt.target, now, 1, classify(&attempt.result), now) {
        Settle::Delivered => {
            deliveries.remove(at);
        }
        Settle::Retry {
            attempts,
            at_ms,
            error,
        } => {
            let d = &mut deliveries[at];
            (d.attempts, d.at_ms, d.last_error) = (attempts, at_ms, Some(error));
        }
        Settle::Dead { attempts, error } => {
            let d = &mut deliveries[at];
            (d.attempts, d.last_error, d.dead) = (attempts, Some(error), true);
        }
    }
    deliveries
}

/// A commit's pending deliveries, marked in their targets' lanes until it ends. Dropped without
/// [`Handover::committed`], nothing was committed.
struct Handover {
    event_id: String,
    /// Each lane with the index of its delivery in the commit.
    lanes: Vec<(usize, Arc<Lane>)>,
}

impl Handover {
    /// The commit is durable with `ids` (in the order of `deliveries`): each delivery due now
    /// goes to its worker in memory; one due later (the reply target's attempt failed) waits
    /// in the store, and its worker is told when.
    fn committed(
        mut self,
        push: &Arc<Push>,
        deliveries: &[NewDelivery],
        ids: &[DeliveryId],
        now_ms: u64,
    ) {
        for (at, lane) in std::mem::take(&mut self.lanes) {
            let (Some(delivery), Some(id)) = (deliveries.get(at), ids.get(at)) else {
                lane.committed(&self.event_id, None, Some(0));
                continue;
            };
            if delivery.attempts == 0 && delivery.at_ms <= now_ms {
                let fresh = Delivery {
                    id: *id,
                    target: delivery.target.clone(),
                    push: Ok(Arc::clone(push)),
                    attempts: 0,
                    enqueued_ms: now_ms,
                };
                lane.committed(&self.event_id, Some(fresh), None);
            } else {
                lane.committed(&self.event_id, None, Some(delivery.at_ms));
            }
        }
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        for (_, lane) in self.lanes.drain(..) {
            lane.committed(&self.event_id, None, None);
        }
    }
}

// ---- admission ---------------------------------------------------------------------------

/// The reply target's synchronous attempt at a push: attempt 1 of its delivery.
pub struct ReplyAttempt {
    pub target: Arc<Target>,
    pub result: Result<Answer, ForwardError>,
}

/// What [`Outbox::admit`] found.
pub enum Admitted {
    /// A push to handle: reply, then [`Outbox::commit`].
    New(Ticket),
    /// A WeChat retry (of `push`, re-keyed if it collided): the answer the first one got.
    Retry {
        push: Arc<Push>,
        answer: Arc<CachedAnswer>,
    },
}

/// What [`Outbox::commit`] did.
pub enum Accepted {
    /// Committed, under the event id of `push` (its own when `collided`).
    New {
        push: Arc<Push>,
        answer: Arc<CachedAnswer>,
        collided: bool,
    },
    /// A WeChat retry after all (of `push`): the answer the first one got.
    Retry {
        push: Arc<Push>,
        answer: Arc<CachedAnswer>,
    },
}

/// An admitted push: its event id is claimed until it is committed or dropped (a retry
/// meanwhile waits for its answer).
pub struct Ticket {
    push: Arc<Push>,
    digest: Digest,
    /// The claims on the ids tried: the first and, after a collision, the push's own.
    guards: Vec<ClaimGuard>,
    collisions: u32,
    /// The ids claimed in a shared store ([`Outbox::claim_shared`]), until the push is
    /// committed: a ticket dropped before that releases them.
    shared_claims: Vec<String>,
    store: Arc<dyn Store>,
}

impl Drop for Ticket {
    /// A push that failed (or was dropped) before its commit gives up its shared claims, so
    /// that WeChat's retry on another relay is handled there at once.
    fn drop(&mut self) {
        if self.shared_claims.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, claims) = (
            Arc::clone(&self.store),
            std::mem::take(&mut self.shared_claims),
        );
        runtime.spawn(async move {
            for event_id in claims {
                if let Err(e) = store.release(&event_id).await {
                    tracing::debug!(event_id = %event_id, error = %e,
                        "cannot release the claim; it runs out");
                }
            }
        });
    }
}

impl Ticket {
    pub fn push(&self) -> &Arc<Push> {
        &self.push
    }

    /// A push whose event id belongs to another message gets its own: the first one plus
    /// `~` and 16 hex digits of its message's digest (the same for WeChat's retries of it).
    fn rekey(&mut self) {
        self.collisions += 1;
        let mut own = (*self.push).clone();
        own.event_id = format!("{}~{}", self.push.event_id, self.digest.short());
        self.push = Arc::new(own);
    }

    /// Gives `answer` to whoever waits on the claims, and releases them.
    fn finish(&mut self, answer: &Arc<CachedAnswer>) {
        for guard in self.guards.drain(..) {
            guard.finish(Arc::clone(answer));
        }
    }

    /// The store could not take the push: those waiting get the 503 too.
    fn fail(mut self, error: StoreError) -> StoreError {
        self.finish(&Arc::new(CachedAnswer::from(error.clone())));
        error
    }
}

// ---- claims ------------------------------------------------------------------------------

type AnswerSlot = watch::Receiver<Option<Arc<CachedAnswer>>>;

/// Keys of the pushes being handled now, with the digest of each one's message.
#[derive(Default, Clone)]
struct Claims(Arc<Mutex<HashMap<String, (Digest, AnswerSlot)>>>);

enum Claim {
    /// This request handles the push; the guard gives its answer to those who wait.
    First(ClaimGuard),
    /// The same push is being handled: wait for its answer.
    Wait(Waiter),
    /// Another message with this key is being handled: not a retry.
    Collision,
}

impl Claims {
    fn claim(&self, event_id: &str, digest: &Digest) -> Claim {
        let Ok(mut claims) = self.0.lock() else {
            // Poisoned only by a panic while holding it: handle the push unclaimed.
            let (sender, _) = watch::channel(None);
            return Claim::First(ClaimGuard {
                claims: self.clone(),
                event_id: event_id.to_owned(),
                sender,
            });
        };
        if let Some((claimed, slot)) = claims.get(event_id) {
            if claimed != digest {
                return Claim::Collision;
            }
            return Claim::Wait(Waiter(slot.clone()));
        }
        let (sender, slot) = watch::channel(None);
        claims.insert(event_id.to_owned(), (*digest, slot));
        Claim::First(ClaimGuard {
            claims: self.clone(),
            event_id: event_id.to_owned(),
            sender,
        })
    }
}

/// Held while a push is handled. Dropping it releases the key: a retry after that is handled
/// afresh (or answered from the store, if the push was committed).
struct ClaimGuard {
    claims: Claims,
    event_id: String,
    sender: watch::Sender<Option<Arc<CachedAnswer>>>,
}

impl ClaimGuard {
    /// Gives `answer` to every request waiting on this push, and releases the key.
    fn finish(self, answer: Arc<CachedAnswer>) {
        self.sender.send_replace(Some(answer));
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Ok(mut claims) = self.claims.0.lock() {
            claims.remove(&self.event_id);
        }
    }
}

/// A request waiting for the answer to the same push.
struct Waiter(AnswerSlot);

impl Waiter {
    /// The first request's answer; `None` if it ended without one.
    async fn answer(mut self) -> Option<Arc<CachedAnswer>> {
        match self.0.wait_for(Option::is_some).await {
            Ok(answer) => answer.clone(),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Digest = Digest([1; 32]);
    const B: Digest = Digest([2; 32]);

    #[tokio::test]
    async fn a_second_claim_waits_for_the_first_answer() {
        let claims = Claims::default();
        let Claim::First(guard) = claims.claim("e1", &A) else {
            panic!("first claim");
        };
        let Claim::Wait(waiter) = claims.claim("e1", &A) else {
            panic!("second claim waits");
        };
        assert!(matches!(claims.claim("e2", &A), Claim::First(_)));
        let answer = Arc::new(CachedAnswer::from(StoreError::Closed));
        guard.finish(Arc::clone(&answer));
        assert_eq!(waiter.answer().await, Some(answer));
        // Released: the next claim is a first one again.
        assert!(matches!(claims.claim("e1", &A), Claim::First(_)));
    }

    #[test]
    fn another_message_under_a_claimed_key_is_a_collision() {
        let claims = Claims::default();
        let _guard = claims.claim("e1", &A);
        assert!(matches!(claims.claim("e1", &B), Claim::Collision));
        assert!(matches!(claims.claim("e1", &A), Claim::Wait(_)));
    }

    #[tokio::test]
    async fn a_dropped_claim_releases_its_waiters() {
        let claims = Claims::default();
        let guard = claims.claim("e1", &A);
        let Claim::Wait(waiter) = claims.claim("e1", &A) else {
            panic!("second claim waits");
        };
        drop(guard);
        assert_eq!(waiter.answer().await, None);
    }
}
