//! The store behind the outbox, as a small trait: the server and the `outbox` commands use only
//! this, so that a networked backend can be added beside [`super::sqlite`] and
//! [`super::memory`] without touching either.
//!
//! Three things are kept: pending deliveries (one per push and target), dead letters (the
//! deliveries given up on), and recent push ids with the answer WeChat got (dedupe). Times are
//! Unix milliseconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::push::Push;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type StoreResult<T> = Result<T, StoreError>;

/// A delivery's id: unique across pending deliveries and dead letters, never reused.
pub type DeliveryId = i64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be opened: missing, corrupt, locked, unwritable.
    #[error("{0}")]
    Open(String),
    /// A read or a write failed (a full disk, an I/O error).
    #[error("{0}")]
    Io(String),
    /// The store holds `[store] max_bytes` or more: a push that needs a delivery is refused
    /// (503, WeChat retries) until deliveries drain or dead letters are purged.
    #[error("the store is over its budget ({used} of max_bytes {max})")]
    Full { used: u64, max: u64 },
    #[error("the store has shut down")]
    Closed,
}

/// What WeChat was answered for a push: given again, byte for byte, to its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

/// SHA-256 of a push's message as the relay read it (decrypted, for an encrypted push): a
/// WeChat retry carries the same message; a different message under the same dedupe key is a
/// collision, not a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(message: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(message).into())
    }

    /// A digest as a durable store keeps it: one of another length cannot come from this
    /// relay, so it is taken for none (as before digests were kept).
    pub fn from_stored(stored: Option<Vec<u8>>) -> Option<Digest> {
        stored
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .map(Digest)
    }

    /// The first 8 bytes in hex: what tells a colliding push's event id apart.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

/// A push's dedupe record: the answer WeChat got, and the digest of its message (`None` for
/// a record written before digests were kept: taken for the same message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub answer: CachedAnswer,
    pub digest: Option<Digest>,
}

impl Recorded {
    /// What a commit of a push with `digest` meets in this record.
    pub fn meet(self, digest: &Digest) -> Committed {
        if self.digest.is_none_or(|d| d == *digest) {
            Committed::Duplicate(self.answer)
        } else {
            Committed::Collision
        }
    }
}

/// A dedupe record as [`Store::recent`] lists it: enough to tell whether a push may be a retry
/// without reading the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentId {
    pub event_id: String,
    /// `None` for a record written before digests were kept (see [`Recorded::digest`]).
    pub digest: Option<Digest>,
    pub committed_ms: u64,
}

/// The times of a [`Store::claim`]: now, until when the claim holds, and the dedupe window's
/// start.
#[derive(Debug, Clone, Copy)]
pub struct ClaimTimes {
    pub now_ms: u64,
    pub until_ms: u64,
    pub since_ms: u64,
}

/// What a [`Store::claim`] found: whether this process holds the claim now, and the push's
/// dedupe record if it was committed (by any process).
#[derive(Debug, Clone)]
pub struct ClaimOutcome {
    pub held: bool,
    pub recorded: Option<Recorded>,
}

/// One target's delivery of a push, as the push is committed.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub target: String,
    /// Attempts already made (the reply target's synchronous one), and how the last one failed.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When to attempt it.
    pub at_ms: u64,
    /// Dead on arrival: the synchronous attempt failed for good (a 4xx).
    pub dead: bool,
}

/// Everything written for one push, in one transaction: its dedupe record with the answer,
/// and a delivery for each target that still needs it.
#[derive(Debug, Clone)]
pub struct Commit {
    pub push: Arc<Push>,
    /// The name of the route that took the push, kept with its deliveries (`outbox list`).
    pub route: String,
    /// Of the push's message, kept in its dedupe record.
    pub digest: Digest,
    pub answer: CachedAnswer,
    pub deliveries: Vec<NewDelivery>,
    pub now_ms: u64,
    /// A dedupe record of the push committed at or after this makes the commit a duplicate:
    /// nothing is written and the recorded answer is returned.
    pub dedupe_since_ms: u64,
    /// What the commit may evict to stay within `[store] max_bytes`.
    pub budget: Budget,
}

/// A dedupe record is kept at least this long, even past the budget: WeChat waits 5 s for an
/// answer before it sends a push again (PROTOCOL.md §6), so the retries that do come find the
/// records of the last seconds. An older record that is evicted costs only that a retry of its
/// push asks the reply target again (it has the event id to dedupe); refusing new pushes
/// instead would lose logins.
pub const MIN_RECORD_AGE_MS: u64 = 5_000;

/// The budget a commit is written within: when its writes would put the store over
/// `max_bytes`, the oldest dedupe records committed before `evict_before_ms` are evicted
/// first (pending deliveries and dead letters never are), until the writes fit or none of
/// those is left. Past that the commit is still written: the store then passes its budget by
/// at most the records of the last [`MIN_RECORD_AGE_MS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_bytes: u64,
    pub evict_before_ms: u64,
}

impl Budget {
    /// Nothing is evicted.
    pub const UNLIMITED: Budget = Budget {
        max_bytes: u64::MAX,
        evict_before_ms: 0,
    };

    /// `max_bytes` for a commit at `now_ms`: records older than [`MIN_RECORD_AGE_MS`] may go.
    pub fn at(max_bytes: u64, now_ms: u64) -> Budget {
        Budget {
            max_bytes,
            evict_before_ms: now_ms.saturating_sub(MIN_RECORD_AGE_MS),
        }
    }
}

/// When the last "dedupe records evicted" line was written, and what was evicted since.
static EVICTIONS_LOGGED_MS: AtomicU64 = AtomicU64::new(0);
static EVICTIONS_UNLOGGED: AtomicU64 = AtomicU64::new(0);
/// At most one "dedupe records evicted" line per this.
const EVICTIONS_LOG_EVERY_MS: u64 = 1000;

/// Counts `count` dedupe records a backend evicted to stay within the budget, and says so in
/// the log at most once a second, with every record evicted since the last line.
pub fn evicted(count: u64, now_ms: u64) {
    if count == 0 {
        return;
    }
    crate::metrics::dedupe_evicted(count);
    EVICTIONS_UNLOGGED.fetch_add(count, Ordering::Relaxed);
    let last = EVICTIONS_LOGGED_MS.load(Ordering::Relaxed);
    let due = now_ms.saturating_sub(last) >= EVICTIONS_LOG_EVERY_MS
        && EVICTIONS_LOGGED_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
    if due {
        let evicted = EVICTIONS_UNLOGGED.swap(0, Ordering::Relaxed);
        tracing::warn!(
            evicted,
            "store at max_bytes: the oldest dedupe records evicted (a WeChat retry of their pushes asks the reply target again)"
        );
    }
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// Written: the ids of its deliveries, in the order of [`Commit::deliveries`].
    New(Vec<DeliveryId>),
    /// The push was committed before (within the dedupe window): this answer was given then.
    Duplicate(CachedAnswer),
    /// Another message was committed under the push's event id: nothing is written.
    Collision,
}

/// A pending delivery, ready to attempt.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    pub target: String,
    /// The push to send, or why it cannot be read back (the delivery is then dead).
    pub push: Result<Arc<Push>, String>,
    pub attempts: u32,
    /// When it was committed, or replayed: `max_age_s` counts from here.
    pub enqueued_ms: u64,
}

/// How an attempt ended, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Delivered: the delivery is gone.
    Delivered,
    /// Try again at `at_ms`.
    Retry {
        attempts: u32,
        at_ms: u64,
        error: String,
    },
    /// Given up on: it becomes a dead letter.
    Dead { attempts: u32, error: String },
}

/// A delivery as the `outbox list` command shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    pub id: DeliveryId,
    pub target: String,
    pub account: String,
    pub event_id: String,
    /// The message's `MsgType` and `Event`, and the route that took it: `None` when the
    /// message has none, and for a delivery stored before they were kept.
    pub msg_type: Option<String>,
    pub event: Option<String>,
    pub route: Option<String>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub enqueued_ms: u64,
    /// Pending: the next attempt; dead: when it died.
    pub at_ms: u64,
}

/// One delivery, pending or dead, as `outbox show` shows it: what `list` says, and the push
/// to send (or why it cannot be read back).
#[derive(Debug, Clone)]
pub struct StoredDelivery {
    pub info: DeliveryInfo,
    pub dead: bool,
    pub push: Result<Arc<Push>, String>,
}

/// Per target counts for `outbox stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetStats {
    pub target: String,
    pub pending: u64,
    pub dead: u64,
    /// When the oldest pending delivery was enqueued.
    pub oldest_pending_ms: Option<u64>,
}

impl TargetStats {
    /// How long the oldest pending delivery has waited at `now_ms` (none pending: `None`), as
    /// `outbox stats` and `/metrics` show it.
    pub fn oldest_pending_age(&self, now_ms: u64) -> Option<std::time::Duration> {
        self.oldest_pending_ms
            .map(|at| std::time::Duration::from_millis(now_ms.saturating_sub(at)))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub targets: Vec<TargetStats>,
    pub dedupe_keys: u64,
}

/// Which deliveries `list` shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub dead: bool,
    pub target: Option<String>,
}

/// Which deliveries `replay` puts back in line, or `discard` deletes.
#[derive(Debug, Clone)]
pub enum Selection {
    /// One delivery, dead or pending.
    Id(DeliveryId),
    /// Every pending delivery, or those of one target.
    Pending { target: Option<String> },
    /// Every dead letter, or those of one target.
    Dead { target: Option<String> },
}

/// The store. Every method is one transaction; a write has reached the disk when its future
/// resolves `Ok` (for a durable backend), but for a commit that leaves nothing pending.
pub trait Store: Send + Sync {
    /// Writes a push's dedupe record and deliveries, atomically, unless its event id is
    /// already recorded (checked in the same transaction; see [`Recorded::meet`]). A commit
    /// with a pending delivery (one not `dead`) is on disk when it resolves; one without may
    /// resolve before (its record may then be lost in a crash: a retry is handled afresh).
    fn commit(&self, commit: Commit) -> BoxFuture<'_, StoreResult<Committed>>;

    /// Whether other processes write the store too (PostgreSQL, shared by several relays):
    /// then a retry check always reads the store, for an id this process never saw may be
    /// recorded.
    fn shared(&self) -> bool {
        false
    }

    /// Wake-ups from other processes: the name of a target whose deliveries another process
    /// made due now (an `outbox replay`), or `None` for every target (the wake-ups were
    /// interrupted, and some may be lost). Only a shared store has them.
    fn wakeups(&self) -> Option<tokio::sync::broadcast::Receiver<Option<Arc<str>>>> {
        None
    }

    /// Claims `event_id` for this process until `until_ms`, unless another process holds a
    /// live claim on it, and reads its dedupe record committed at or after `since_ms`, in one
    /// call. Only a shared store has claims of other processes: the others say held (this
    /// process's own claims are in memory). A claim runs out, unless [`Store::release`]d.
    fn claim(&self, event_id: &str, times: ClaimTimes) -> BoxFuture<'_, StoreResult<ClaimOutcome>> {
        let _ = (event_id, times);
        Box::pin(async {
            Ok(ClaimOutcome {
                held: true,
                recorded: None,
            })
        })
    }

    /// Gives up this process's claim on `event_id`: its push failed before it was committed,
    /// and a WeChat retry that reaches another process is then handled there at once instead
    /// of waiting for the claim to run out.
    fn release(&self, event_id: &str) -> BoxFuture<'_, StoreResult<()>> {
        let _ = event_id;
        Box::pin(async { Ok(()) })
    }

    /// The dedupe record of `event_id`, if it was committed at or after `since_ms`.
    fn answer(&self, event_id: &str, since_ms: u64)
    -> BoxFuture<'_, StoreResult<Option<Recorded>>>;

    /// The dedupe records committed at or after `since_ms` (the dedupe window), oldest first:
    /// their event ids and digests, for an in-memory set of the ids that may be recorded
    /// (loaded at start).
    fn recent(&self, since_ms: u64) -> BoxFuture<'_, StoreResult<Vec<RecentId>>>;

    /// The bytes the store's data occupies now (pending deliveries, dead letters, dedupe
    /// records), as kept up to date by its writes: cheap, no I/O.
    fn used_bytes(&self) -> u64;

    /// A write that allocates and is undone (durably, for a durable backend): fails when the
    /// store cannot take one now (a full disk, an I/O error).
    fn probe(&self) -> BoxFuture<'_, StoreResult<()>>;

    /// Up to `limit` deliveries to `target` due at `now_ms`, oldest due first, leaving out
    /// `skip` (those in flight).
    fn due(
        &self,
        target: &str,
        now_ms: u64,
        limit: usize,
        skip: Vec<DeliveryId>,
    ) -> BoxFuture<'_, StoreResult<Vec<Delivery>>>;

    /// When the next delivery to `target` due after `now_ms` is.
    fn next_due(&self, target: &str, now_ms: u64) -> BoxFuture<'_, StoreResult<Option<u64>>>;

    /// Records how an attempt ended.
    fn settle(&self, id: DeliveryId, settle: Settle, now_ms: u64)
    -> BoxFuture<'_, StoreResult<()>>;

    /// Forgets dedupe records committed before `before_ms`; returns how many.
    fn expire_dedupe(&self, before_ms: u64) -> BoxFuture<'_, StoreResult<u64>>;

    fn stats(&self) -> BoxFuture<'_, StoreResult<Stats>>;

    fn list(&self, filter: Filter) -> BoxFuture<'_, StoreResult<Vec<DeliveryInfo>>>;

    /// The delivery or dead letter with this id, if there is one.
    fn get(&self, id: DeliveryId) -> BoxFuture<'_, StoreResult<Option<StoredDelivery>>>;

    /// Puts the selected deliveries (pending or dead) back in line, due now, with a fresh
    /// attempt count and age. Returns how many.
    fn replay(&self, selection: Selection, now_ms: u64) -> BoxFuture<'_, StoreResult<u64>>;

    /// Deletes the selected pending deliveries for good (never a dead letter: those go with
    /// [`Store::purge_dead`]). Returns how many.
    fn discard(&self, selection: Selection) -> BoxFuture<'_, StoreResult<u64>>;

    /// Deletes dead letters that died before `before_ms` (all of them when `None`), of one
    /// target or all. Returns how many.
    fn purge_dead(
        &self,
        before_ms: Option<u64>,
        target: Option<String>,
    ) -> BoxFuture<'_, StoreResult<u64>>;
}

/// A stored delivery's push, from the columns both durable backends keep: the message is
/// parsed again from the decrypted XML kept for an encrypted push, or from the body.
#[allow(clippy::too_many_arguments)]
pub fn stored_push(
    account: String,
    event_id: String,
    query: String,
    body: Bytes,
    content_type: Option<&[u8]>,
    forwarded_for: String,
    xml: Option<Bytes>,
    key_index: Option<usize>,
    received_at: std::time::SystemTime,
) -> Result<Arc<Push>, String> {
    let content_type = content_type.and_then(|v| http::HeaderValue::from_bytes(v).ok());
    crate::wechat::message::Message::parse(xml.unwrap_or_else(|| body.clone()))
        .map(|message| {
            Arc::new(Push {
                account,
                event_id,
                query,
                body,
                content_type,
                forwarded_for,
                message,
                key_index,
                received_at,
            })
        })
        .map_err(|e| format!("the stored message no longer parses: {e}"))
}

/// Milliseconds (or any count) as a database's signed 64-bit integer: saturating.
pub(super) fn ms(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A database's signed integer read back as a count: a negative one is 0.
pub(super) fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}
