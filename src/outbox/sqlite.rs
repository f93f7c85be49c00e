//! The durable store: SQLite (bundled) in WAL mode, in `<store.path>/relay.db`.
//!
//! Every write goes through one writer thread that owns the write connection and applies what
//! is waiting in one transaction (group commit): concurrent pushes share one fsync. Each write
//! runs in a savepoint of its own, so one failing write does not fail the others; a failed
//! commit fails them all. Reads use a small pool of read connections on tokio's blocking
//! threads; WAL lets them run beside the writer.
//!
//! What is on disk when a write is answered:
//! - a commit with a pending delivery (a [`super::store::NewDelivery`] not `dead`), and every
//!   settle, replay, purge and probe: its transaction is committed with `synchronous = FULL`,
//!   so the WAL holding it (and everything written before it) has been fsynced;
//! - a commit that leaves nothing pending (the reply target took the push; every delivery is
//!   dead on arrival; no target at all) is answered as soon as its savepoint is released,
//!   before the transaction commits: nothing of it need be on disk yet. A transaction holding
//!   only such writes (and dedupe expiry) commits with `synchronous = NORMAL`: no fsync of
//!   its own, the next FULL commit's fsync (or a checkpoint) takes it to disk; a process
//!   crash loses nothing of it (it is in the OS's cache), a power loss may lose it. Its
//!   answer protects nothing an fsync would: WeChat has its answer and does not retry, and if
//!   the record is lost (or the COMMIT fails after the answer), a WeChat retry of that push
//!   finds no record and asks the reply target again (it has the event id to dedupe).
//!
//! The writer also keeps [`Store::used_bytes`] up to date: in each transaction, just before
//! its COMMIT (or after a probe or a failed transaction), it reads
//! `(page_count - freelist_count) * page_size`, the bytes the data occupies (pages freed by
//! deliveries and purges are reused before the file grows). Each transaction's size (writes)
//! goes to `wechat_relay_store_batch_size`. The writer never checkpoints the WAL: the
//! [`checkpointer`] does, on a thread and a connection of its own.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::oneshot;

use checkpointer::{Checkpointer, Wal, WalLimits};

use super::store::{
    BoxFuture, CachedAnswer, Commit, Committed, Delivery, DeliveryId, DeliveryInfo, Digest, Filter,
    RecentId, Recorded, Selection, Settle, Stats, Store, StoreError, StoreResult, StoredDelivery,
    TargetStats, ms, unsigned,
};

mod checkpointer;

/// The database file in the store's folder.
pub const DB_FILE: &str = "relay.db";
/// Held by the running server so that two relays never deliver from one store.
const LOCK_FILE: &str = "relay.lock";
/// 1: the first schema; 2: `dedupe.digest` and the `probe` table; 3: the `tallies` and the
/// indexes that keep `stats` and the upkeep off full scans; 4: a delivery's message type,
/// event and route.
const SCHEMA_VERSION: i64 = 4;
/// The row `/readyz` writes and deletes: a few pages, so that a full disk fails it.
const PROBE_BYTES: i64 = 16 << 10;
/// The most writes one transaction takes.
const MAX_BATCH: usize = 1024;
/// Read connections kept open.
const MAX_READERS: usize = 4;
/// How long a connection waits for another process's lock (an `outbox` command) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns of a delivery, pending or dead: a dead letter is the same row moved over.
/// `at_ms` is the next attempt for a pending one and the time of death for a dead one.
const DELIVERY_TABLE: &str = "
    target TEXT NOT NULL,
    account TEXT NOT NULL,
    event_id TEXT NOT NULL,
    query TEXT NOT NULL,
    body BLOB NOT NULL,
    content_type BLOB,
    forwarded_for TEXT NOT NULL,
    xml BLOB,
    key_index INTEGER,
    received_ms INTEGER NOT NULL,
    enqueued_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    last_error TEXT";

fn schema() -> String {
    format!(
        "CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT, {DELIVERY_TABLE});
         CREATE INDEX deliveries_due ON deliveries (target, at_ms);
         CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, {DELIVERY_TABLE});
         CREATE INDEX dead_letters_target ON dead_letters (target, at_ms);
         CREATE TABLE dedupe (
             event_id TEXT PRIMARY KEY,
             committed_ms INTEGER NOT NULL,
             status INTEGER NOT NULL,
             content_type TEXT NOT NULL,
             body BLOB NOT NULL
         ) WITHOUT ROWID;
         CREATE INDEX dedupe_committed ON dedupe (committed_ms);
         {SCHEMA_2}{}{SCHEMA_4}",
        schema_3()
    )
}

/// From version 1 to 2: the digest of the message beside each dedupe record (NULL for the
/// records written before: taken for the same message), and the readiness probe's table.
const SCHEMA_2: &str = "
    ALTER TABLE dedupe ADD COLUMN digest BLOB;
    CREATE TABLE probe (id INTEGER PRIMARY KEY, data BLOB NOT NULL);";

/// From version 2 to 3: the rows of each table counted as they come and go (what `stats`, and
/// so every metrics scrape, reads instead of counting them), filled from what is there; the
/// oldest pending delivery of a target and the dead letters past their retention found
/// through an index.
fn schema_3() -> String {
    let counted = [
        ("deliveries", PENDING, "NEW.target", "OLD.target"),
        ("dead_letters", DEAD, "NEW.target", "OLD.target"),
        ("dedupe", RECORDS, "''", "''"),
    ];
    let mut sql = String::from(
        "CREATE TABLE tallies (
            target TEXT NOT NULL,
            kind INTEGER NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (target, kind)
        ) WITHOUT ROWID;",
    );
    for (table, kind, new, old) in counted {
        let key = if table == "dedupe" { "''" } else { "target" };
        sql.push_str(&format!(
            "CREATE TRIGGER {table}_added AFTER INSERT ON {table} BEGIN
                 INSERT INTO tallies (target, kind, n) VALUES ({new}, {kind}, 1)
                 ON CONFLICT (target, kind) DO UPDATE SET n = n + 1;
             END;
             CREATE TRIGGER {table}_removed AFTER DELETE ON {table} BEGIN
                 UPDATE tallies SET n = n - 1 WHERE kind = {kind} AND target = {old};
             END;
             INSERT INTO tallies (target, kind, n)
                 SELECT {key}, {kind}, COUNT(*) FROM {table} GROUP BY {key} HAVING COUNT(*) > 0;"
        ));
    }
    sql.push_str(
        "CREATE INDEX deliveries_enqueued ON deliveries (target, enqueued_ms);
         CREATE INDEX dead_letters_died ON dead_letters (at_ms);",
    );
    sql
}

/// From version 3 to 4: the message's `MsgType` and `Event` and the route's name beside each
/// delivery and dead letter, for `outbox list` (NULL for the rows written before, shown `-`).
/// Adding a column rewrites no row.
const SCHEMA_4: &str = "
    ALTER TABLE deliveries ADD COLUMN msg_type TEXT;
    ALTER TABLE deliveries ADD COLUMN event TEXT;
    ALTER TABLE deliveries ADD COLUMN route TEXT;
    ALTER TABLE dead_letters ADD COLUMN msg_type TEXT;
    ALTER TABLE dead_letters ADD COLUMN event TEXT;
    ALTER TABLE dead_letters ADD COLUMN route TEXT;";

/// Up to `?3` deliveries to `?1` due at `?2`, oldest due first, but the ids in the JSON
/// array `?4`: a range of `deliveries_due`, in its order.
fn due_query() -> String {
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries \
         WHERE target = ?1 AND at_ms <= ?2 \
         AND id NOT IN (SELECT value FROM json_each(?4)) \
         ORDER BY at_ms, id LIMIT ?3"
    )
}

/// When the next delivery to `?1` after `?2` is due: the first entry of a range of
/// `deliveries_due`.
const NEXT_DUE: &str =
    "SELECT at_ms FROM deliveries WHERE target = ?1 AND at_ms > ?2 ORDER BY at_ms LIMIT 1";
/// The counts `stats` gives, by target: the one table read whole, a few rows per target.
const TALLIES: &str = "SELECT kind, target, n FROM tallies ORDER BY target, kind";
/// When the oldest pending delivery to `?1` was enqueued: the first of `deliveries_enqueued`.
const OLDEST: &str = "SELECT enqueued_ms FROM deliveries WHERE target = ?1 \
    ORDER BY enqueued_ms LIMIT 1";
/// The dedupe record of `?1` committed at or after `?2`: by its key.
const RECORDED: &str = "SELECT status, content_type, body, digest FROM dedupe \
    WHERE event_id = ?1 AND committed_ms >= ?2";
/// A push's dedupe record; an expired one of the same id is replaced (an upsert, so that
/// the tallies' triggers see one insert, or none).
const RECORD: &str = "INSERT INTO dedupe (event_id, committed_ms, status, content_type, body, \
    digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (event_id) DO UPDATE SET \
    committed_ms = excluded.committed_ms, status = excluded.status, \
    content_type = excluded.content_type, body = excluded.body, digest = excluded.digest";
const EXPIRE: &str = "DELETE FROM dedupe WHERE committed_ms < ?1";
/// Eviction past the budget: the `?2` oldest dedupe records committed before `?1`, through
/// `dedupe_committed`.
const EVICT: &str = "DELETE FROM dedupe WHERE event_id IN (SELECT event_id FROM dedupe \
    WHERE committed_ms < ?1 ORDER BY committed_ms LIMIT ?2)";
/// Dedupe records evicted for each one written while the store is at its budget: more than
/// one, so that what the records occupy shrinks back under it (the pages they free are reused
/// by the next writes before the file grows).
const EVICT_PER_RECORD: i64 = 2;
/// What a row costs beside the bytes of its values (its key in the index, the cell's header),
/// for the estimate of a commit's size.
const ROW_OVERHEAD: usize = 64;
/// The upkeep's purge: dead letters that died before `?1`, through `dead_letters_died`.
const PURGE_BEFORE: &str = "DELETE FROM dead_letters WHERE at_ms < ?1";

/// What the tallies count.
const PENDING: i64 = 0;
const DEAD: i64 = 1;
const RECORDS: i64 = 2;

/// Every column of both delivery tables, in order: what moves a row from one to the other.
const ALL_COLUMNS: &str = "id, target, account, event_id, query, body, content_type, \
    forwarded_for, xml, key_index, received_ms, enqueued_ms, attempts, at_ms, last_error, \
    msg_type, event, route";

/// The columns a delivery is read back from, in [`delivery_from_row`]'s order.
const DELIVERY_COLUMNS: &str = "id, target, account, event_id, query, body, content_type, \
    forwarded_for, xml, key_index, received_ms, enqueued_ms, attempts";
/// The columns a [`DeliveryInfo`] is read from, in [`info_from_row`]'s order.
const INFO_COLUMNS: &str = "id, target, account, event_id, attempts, last_error, enqueued_ms, at_ms, msg_type, event, \
    route";

/// Who opens the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`: creates the folder and database if missing, and locks the store.
    Server,
    /// `outbox` commands: the store must exist; the server may be running.
    Tool,
}

enum Op {
    Commit(Commit),
    /// Applied in transactions of its own: see [`probe`].
    Probe,
    Settle(DeliveryId, Settle, u64),
    ExpireDedupe(u64),
    Replay(Selection, u64),
    Discard(Selection),
    PurgeDead(Option<u64>, Option<String>),
}

/// What a write returns: a count, or the answer a duplicate commit found.
#[derive(Clone)]
enum Done {
    Count(u64),
    /// A push committed: the ids of its deliveries, in order.
    New(Vec<DeliveryId>),
    Duplicate(CachedAnswer),
    /// Another message is recorded under the push's event id.
    Collision,
}

type Job = (Op, oneshot::Sender<StoreResult<Done>>);

pub struct SqliteStore {
    writer: Mutex<Option<std_mpsc::Sender<Job>>>,
    /// The bytes the data occupies, as the writer last measured it.
    used: Arc<AtomicU64>,
    /// Records answered early whose transaction is not committed yet: what `answer` and
    /// `recent` see before the readers can.
    early: Arc<Early>,
    readers: Arc<Readers>,
    /// Held open for the server's lifetime: the lock goes with it.
    _lock: Option<File>,
    #[cfg(test)]
    wal: Arc<Wal>,
}

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// At most this many reads at once, so at most this many read connections.
    slots: tokio::sync::Semaphore,
}

impl SqliteStore {
    /// Opens (or, for the server, creates) the store in `dir`, checks it and starts the writer.
    pub fn open(dir: &Path, role: Role) -> StoreResult<SqliteStore> {
        Self::open_with(
            dir,
            role,
            WalLimits::default(),
            #[cfg(test)]
            Arc::default(),
        )
    }

    fn open_with(
        dir: &Path,
        role: Role,
        limits: WalLimits,
        #[cfg(test)] gate: Arc<tests::Gate>,
    ) -> StoreResult<SqliteStore> {
        let shown = dir.display();
        match role {
            Role::Server => create_private_dir(dir)
                .map_err(|e| StoreError::Open(format!("cannot create {shown}: {e}")))?,
            Role::Tool if !dir.join(DB_FILE).exists() => {
                return Err(StoreError::Open(format!(
                    "no store at {shown} (the relay creates it when it first starts)"
                )));
            }
            Role::Tool => {}
        }
        let lock = match role {
            Role::Server => Some(lock_store(dir)?),
            Role::Tool => None,
        };
        let path = dir.join(DB_FILE);
        let open_error =
            |e: rusqlite::Error| StoreError::Open(format!("{}: {}", path.display(), describe(&e)));
        if role == Role::Server {
            create_private_file(&path);
        }
        let mut conn = open_connection(&path, role == Role::Server).map_err(open_error)?;
        if role == Role::Server {
            restrict_permissions(dir, &path);
        }
        migrate(&mut conn).map_err(|e| match e {
            Migration::Sql(e) => open_error(e),
            Migration::Newer(v) => StoreError::Open(format!(
                "{}: schema version {v} is newer than this relay understands ({SCHEMA_VERSION})",
                path.display()
            )),
        })?;
        // Prove it is writable now rather than at the first push.
        conn.execute_batch("BEGIN IMMEDIATE; COMMIT;")
            .map_err(open_error)?;
        let used = Arc::new(AtomicU64::new(used_bytes(&conn).map_err(open_error)?));
        let wal = Wal::new(limits);
        checkpoint_elsewhere(&mut conn, &wal, limits).map_err(open_error)?;
        let checkpointer = open_connection(&path, false)
            .map_err(open_error)
            .and_then(|conn| {
                Checkpointer::start(conn, Arc::clone(&wal)).map_err(|e| {
                    StoreError::Open(format!("cannot start the store checkpointer: {e}"))
                })
            })?;
        let (sender, receiver) = std_mpsc::channel::<Job>();
        let early = Arc::new(Early::default());
        let writer = Writer {
            conn,
            synchronous: Sync::Full,
            used: Arc::clone(&used),
            early: Arc::clone(&early),
            wal: Arc::clone(&wal),
            checkpointer: Some(checkpointer),
            #[cfg(test)]
            gate,
        };
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| StoreError::Open(format!("cannot start the store writer: {e}")))?;
        Ok(SqliteStore {
            writer: Mutex::new(Some(sender)),
            used,
            early,
            readers: Arc::new(Readers {
                path,
                idle: Mutex::new(Vec::new()),
                slots: tokio::sync::Semaphore::new(MAX_READERS),
            }),
            _lock: lock,
            #[cfg(test)]
            wal,
        })
    }

    fn write(&self, op: Op) -> BoxFuture<'_, StoreResult<Done>> {
        let (done, result) = oneshot::channel();
        let sent = self
            .writer
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(|w| w.send((op, done)).is_ok()))
            .unwrap_or(false);
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            result.await.unwrap_or(Err(StoreError::Closed))
        })
    }

    fn count(&self, op: Op) -> BoxFuture<'_, StoreResult<u64>> {
        let write = self.write(op);
        Box::pin(async move {
            match write.await? {
                Done::Count(n) => Ok(n),
                Done::New(ids) => Ok(ids.len() as u64),
                Done::Duplicate(_) | Done::Collision => Ok(0),
            }
        })
    }

    fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> BoxFuture<'_, StoreResult<T>> {
        let readers = Arc::clone(&self.readers);
        Box::pin(async move {
            let _slot = readers
                .slots
                .acquire()
                .await
                .map_err(|_| StoreError::Closed)?;
            let reader = Arc::clone(&readers);
            tokio::task::spawn_blocking(move || reader.with(read))
                .await
                .map_err(|e| StoreError::Io(format!("store reader: {e}")))?
        })
    }
}

impl Drop for SqliteStore {
    /// Closing the channel ends the writer once it has applied what it holds.
    fn drop(&mut self) {
        if let Ok(mut writer) = self.writer.lock() {
            writer.take();
        }
    }
}

/// The records of commits answered before their transaction committed, by event id, until it
/// has (or has failed): at most one transaction's.
#[derive(Default)]
struct Early(Mutex<std::collections::HashMap<String, (u64, Recorded)>>);

impl Early {
    fn insert(&self, commit: &Commit) {
        let recorded = Recorded {
            answer: commit.answer.clone(),
            digest: Some(commit.digest),
        };
        if let Ok(mut early) = self.0.lock() {
            early.insert(commit.push.event_id.clone(), (commit.now_ms, recorded));
        }
    }

    fn clear(&self) {
        if let Ok(mut early) = self.0.lock() {
            early.clear();
        }
    }

    fn recorded(&self, event_id: &str, since_ms: u64) -> Option<Recorded> {
        let early = self.0.lock().ok()?;
        early
            .get(event_id)
            .filter(|(at, _)| *at >= since_ms)
            .map(|(_, recorded)| recorded.clone())
    }

    /// Those committed at or after `since_ms`. Taken before the database is read: one that
    /// is committed (and so cleared from here) while it is read is in one or the other.
    fn since(&self, since_ms: u64) -> Vec<RecentId> {
        let Ok(early) = self.0.lock() else {
            return Vec::new();
        };
        early
            .iter()
            .filter(|(_, (at, _))| *at >= since_ms)
            .map(|(event_id, (at, recorded))| RecentId {
                event_id: event_id.clone(),
                digest: recorded.digest,
                committed_ms: *at,
            })
            .collect()
    }
}

/// Adds the early answered commits `early` that `recent` (read from the database) does not
/// hold, keeping it oldest first.
fn add_early(recent: &mut Vec<RecentId>, early: Vec<RecentId>) {
    if early.is_empty() {
        return;
    }
    let read: std::collections::HashSet<String> =
        recent.iter().map(|r| r.event_id.clone()).collect();
    recent.extend(early.into_iter().filter(|r| !read.contains(&r.event_id)));
    recent.sort_by_key(|r| r.committed_ms);
}

impl Readers {
    fn with<T>(&self, read: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> StoreResult<T> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => open_connection(&self.path, false).map_err(io_error)?,
        };
        let result = read(&conn).map_err(io_error);
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
        result
    }
}

impl Store for SqliteStore {
    fn commit(&self, commit: Commit) -> BoxFuture<'_, StoreResult<Committed>> {
        let write = self.write(Op::Commit(commit));
        Box::pin(async move {
            Ok(match write.await? {
                Done::Duplicate(answer) => Committed::Duplicate(answer),
                Done::Collision => Committed::Collision,
                Done::New(ids) => Committed::New(ids),
                Done::Count(_) => Committed::New(Vec::new()),
            })
        })
    }

    fn answer(
        &self,
        event_id: &str,
        since_ms: u64,
    ) -> BoxFuture<'_, StoreResult<Option<Recorded>>> {
        if let Some(recorded) = self.early.recorded(event_id, since_ms) {
            return Box::pin(std::future::ready(Ok(Some(recorded))));
        }
        let event_id = event_id.to_owned();
        self.read(move |conn| recorded(conn, &event_id, since_ms))
    }

    fn recent(&self, since_ms: u64) -> BoxFuture<'_, StoreResult<Vec<RecentId>>> {
        let early = Arc::clone(&self.early);
        self.read(move |conn| {
            let early = early.since(since_ms);
            let mut statement = conn.prepare_cached(RECENT)?;
            let rows = statement.query_map(params![ms(since_ms)], |row| {
                Ok(RecentId {
                    event_id: row.get(0)?,
                    digest: Digest::from_stored(row.get(1)?),
                    committed_ms: unsigned(row.get(2)?),
                })
            })?;
            let mut recent: Vec<RecentId> = rows.collect::<rusqlite::Result<_>>()?;
            add_early(&mut recent, early);
            Ok(recent)
        })
    }

    fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn probe(&self) -> BoxFuture<'_, StoreResult<()>> {
        let write = self.count(Op::Probe);
        Box::pin(async move { write.await.map(|_| ()) })
    }

    fn due(
        &self,
        target: &str,
        now_ms: u64,
        limit: usize,
        skip: Vec<DeliveryId>,
    ) -> BoxFuture<'_, StoreResult<Vec<Delivery>>> {
        let target = target.to_owned();
        // The ids in flight, as a JSON array for json_each.
        let skip = format!(
            "[{}]",
            skip.iter()
                .map(DeliveryId::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&due_query())?;
            let rows = statement.query_map(
                params![target, ms(now_ms), limit as i64, skip],
                delivery_from_row,
            )?;
            rows.collect()
        })
    }

    fn next_due(&self, target: &str, now_ms: u64) -> BoxFuture<'_, StoreResult<Option<u64>>> {
        let target = target.to_owned();
        self.read(move |conn| {
            let next: Option<i64> = conn
                .prepare_cached(NEXT_DUE)?
                .query_row(params![target, ms(now_ms)], |row| row.get(0))
                .optional()?;
            Ok(next.map(unsigned))
        })
    }

    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
        now_ms: u64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        let write = self.count(Op::Settle(id, settle, now_ms));
        Box::pin(async move { write.await.map(|_| ()) })
    }

    fn expire_dedupe(&self, before_ms: u64) -> BoxFuture<'_, StoreResult<u64>> {
        self.count(Op::ExpireDedupe(before_ms))
    }

    fn stats(&self) -> BoxFuture<'_, StoreResult<Stats>> {
        self.read(|conn| {
            let mut stats = Stats::default();
            let mut tallies = conn.prepare_cached(TALLIES)?;
            for row in tallies.query_map([], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get(2)?))
            })? {
                let (kind, target, n) = row?;
                let n = unsigned(n);
                if kind == RECORDS {
                    stats.dedupe_keys = n;
                    continue;
                }
                let at = match stats.targets.last() {
                    Some(last) if last.target == target => stats.targets.len() - 1,
                    _ => {
                        stats.targets.push(TargetStats {
                            target,
                            ..TargetStats::default()
                        });
                        stats.targets.len() - 1
                    }
                };
                match kind {
                    PENDING => stats.targets[at].pending = n,
                    DEAD => stats.targets[at].dead = n,
                    _ => {}
                }
            }
            stats.targets.retain(|t| t.pending > 0 || t.dead > 0);
            let mut oldest = conn.prepare_cached(OLDEST)?;
            for t in stats.targets.iter_mut().filter(|t| t.pending > 0) {
                t.oldest_pending_ms = oldest
                    .query_row(params![t.target], |row| row.get::<_, i64>(0))
                    .optional()?
                    .map(unsigned);
            }
            Ok(stats)
        })
    }

    fn list(&self, filter: Filter) -> BoxFuture<'_, StoreResult<Vec<DeliveryInfo>>> {
        self.read(move |conn| {
            let table = if filter.dead {
                "dead_letters"
            } else {
                "deliveries"
            };
            let mut statement = conn.prepare(&format!(
                "SELECT {INFO_COLUMNS} FROM {table} WHERE ?1 IS NULL OR target = ?1 ORDER BY id"
            ))?;
            let rows = statement.query_map(params![filter.target], info_from_row)?;
            rows.collect()
        })
    }

    fn get(&self, id: DeliveryId) -> BoxFuture<'_, StoreResult<Option<StoredDelivery>>> {
        self.read(move |conn| {
            for (table, dead) in [("deliveries", false), ("dead_letters", true)] {
                let by_id = |columns: &str| format!("SELECT {columns} FROM {table} WHERE id = ?1");
                let Some(info) = conn
                    .prepare_cached(&by_id(INFO_COLUMNS))?
                    .query_row(params![id], info_from_row)
                    .optional()?
                else {
                    continue;
                };
                let delivery = conn
                    .prepare_cached(&by_id(DELIVERY_COLUMNS))?
                    .query_row(params![id], delivery_from_row)?;
                return Ok(Some(StoredDelivery {
                    info,
                    dead,
                    push: delivery.push,
                }));
            }
            Ok(None)
        })
    }

    fn replay(&self, selection: Selection, now_ms: u64) -> BoxFuture<'_, StoreResult<u64>> {
        self.count(Op::Replay(selection, now_ms))
    }

    fn discard(&self, selection: Selection) -> BoxFuture<'_, StoreResult<u64>> {
        self.count(Op::Discard(selection))
    }

    fn purge_dead(
        &self,
        before_ms: Option<u64>,
        target: Option<String>,
    ) -> BoxFuture<'_, StoreResult<u64>> {
        self.count(Op::PurgeDead(before_ms, target))
    }
}

// ---- the writer ----------------------------------------------------------------------------

/// `PRAGMA synchronous` levels the writer switches between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// WAL: a commit is not fsynced; the next FULL commit's fsync of the WAL takes it along.
    Normal,
    /// Every commit is fsynced before it returns.
    Full,
}

impl Sync {
    fn pragma(self) -> &'static str {
        match self {
            Sync::Normal => "PRAGMA synchronous = NORMAL;",
            Sync::Full => "PRAGMA synchronous = FULL;",
        }
    }
}

impl Op {
    /// A commit that leaves no delivery pending (each of its deliveries, if any, is dead on
    /// arrival): its answer protects nothing an fsync would, so it is given as soon as the
    /// commit's savepoint is released, before the transaction's COMMIT.
    fn answered_early(&self) -> bool {
        matches!(self, Op::Commit(commit) if commit.deliveries.iter().all(|d| d.dead))
    }

    /// Whether the transaction holding this write must be fsynced: everything but the early
    /// answered commits and the expiry of dedupe records (which the next upkeep redoes).
    fn needs_fsync(&self) -> bool {
        !(self.answered_early() || matches!(self, Op::ExpireDedupe(_)))
    }
}

/// The writer thread's state: its connection, the level it runs at, what it publishes.
struct Writer {
    conn: Connection,
    synchronous: Sync,
    /// The bytes the data occupies, measured after each transaction.
    used: Arc<AtomicU64>,
    early: Arc<Early>,
    wal: Arc<Wal>,
    checkpointer: Option<Checkpointer>,
    #[cfg(test)]
    gate: Arc<tests::Gate>,
}

impl Writer {
    /// Takes what is waiting (up to [`MAX_BATCH`]), applies it in one transaction, answers each
    /// (an early answered commit as soon as its savepoint is released, the rest once the
    /// transaction is committed); probes run after it, each on its own. Then measures what the
    /// data occupies into `used`.
    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let (probes, batch): (Vec<Job>, Vec<Job>) = batch
                .into_iter()
                .partition(|(op, _)| matches!(op, Op::Probe));
            self.wal.begin_write();
            if !batch.is_empty() {
                self.apply(batch);
            }
            if !probes.is_empty() {
                for (_, done) in probes {
                    let probed = self.at(Sync::Full).and_then(|()| probe(&mut self.conn));
                    let _ = done.send(probed.map(|()| Done::Count(0)).map_err(io_error));
                }
                self.measure();
            }
            self.wal.end_write();
        }
        // Every handle is gone: the checkpointer stops, and the WAL is folded back into the
        // database before closing.
        drop(self.checkpointer.take());
        let _ = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    }

    /// One transaction: fsynced only when one of its writes needs it.
    fn apply(&mut self, batch: Vec<Job>) {
        let (ops, senders): (Vec<Op>, Vec<_>) = batch.into_iter().unzip();
        let mut senders: Vec<Option<_>> = senders.into_iter().map(Some).collect();
        let level = if ops.iter().any(Op::needs_fsync) {
            Sync::Full
        } else {
            Sync::Normal
        };
        if let Err(e) = self.at(level) {
            for done in senders.into_iter().flatten() {
                let _ = done.send(Err(io_error_ref(&e)));
            }
            return;
        }
        crate::metrics::store_batch(ops.len());
        #[cfg(test)]
        let gate = Arc::clone(&self.gate);
        let early = Arc::clone(&self.early);
        let mut measured = None;
        let started = Instant::now();
        let results = apply_batch(
            &mut self.conn,
            Room::after(self.used.load(Ordering::Relaxed)),
            ops.iter(),
            |i, result| {
                if let Some(Op::Commit(commit)) = ops.get(i) {
                    early.insert(commit);
                }
                if let Some(done) = senders.get_mut(i).and_then(Option::take) {
                    let _ = done.send(result.clone());
                }
            },
            |conn| {
                #[cfg(test)]
                gate.hold(conn);
                // Inside the transaction: what the data occupies once it is committed,
                // without a read transaction of its own.
                measured = used_bytes(conn).ok();
            },
        );
        crate::metrics::store_commit(started.elapsed());
        if results.iter().any(Result::is_ok)
            && let Some(bytes) = measured
        {
            self.used.store(bytes, Ordering::Relaxed);
        } else {
            self.measure();
        }
        // Committed (or failed): the readers see what is written.
        self.early.clear();
        for (done, result) in senders.into_iter().zip(results) {
            if let Some(done) = done {
                let _ = done.send(result);
            }
        }
    }

    /// Measures what the data occupies into `used`.
    fn measure(&self) {
        match used_bytes(&self.conn) {
            Ok(bytes) => self.used.store(bytes, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %describe(&e), "cannot measure the store"),
        }
    }

    /// Switches the connection to `level` if it is not there.
    fn at(&mut self, level: Sync) -> rusqlite::Result<()> {
        if self.synchronous != level {
            self.conn.execute_batch(level.pragma())?;
            self.synchronous = level;
        }
        Ok(())
    }
}

/// Applies `ops` in one transaction, a savepoint each. `released` is called with the result of
/// each early answered commit that was written ([`Op::answered_early`]) as soon as its
/// savepoint is released; `before_commit` just before the COMMIT. Returns every result.
fn apply_batch<'a>(
    conn: &mut Connection,
    mut room: Room,
    ops: impl ExactSizeIterator<Item = &'a Op>,
    mut released: impl FnMut(usize, &StoreResult<Done>),
    before_commit: impl FnOnce(&Connection),
) -> Vec<StoreResult<Done>> {
    let count = ops.len();
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return vec![Err(io_error(e)); count],
    };
    let mut results = Vec::with_capacity(count);
    for (i, op) in ops.enumerate() {
        // A savepoint per write: a failing one is rolled back alone...
        let result = in_savepoint(&tx, &mut room, op);
        if let Err(e) = &result
            && tx.is_autocommit()
        {
            // ...unless SQLite rolled the whole transaction back (a full disk, an I/O error):
            // then nothing of the batch is written, and every write is told why.
            return vec![Err(io_error_ref(e)); count];
        }
        let result = result.map_err(io_error);
        // Only a written one: a duplicate's record may be an earlier write of this batch.
        if op.answered_early() && matches!(result, Ok(Done::New(_))) {
            released(i, &result);
        }
        results.push(result);
    }
    before_commit(&tx);
    match tx.commit() {
        Ok(()) => results,
        Err(e) => vec![Err(io_error(e)); count],
    }
}

/// Leaves the checkpoints to the [`checkpointer`]: the writer's connection does not run them
/// (its WAL hook reports the WAL's frames instead), and keeps the WAL file at up to the
/// hard bound's size when it restarts it (truncating it costs the writer more than reusing
/// it).
fn checkpoint_elsewhere(
    conn: &mut Connection,
    wal: &Arc<Wal>,
    limits: WalLimits,
) -> rusqlite::Result<()> {
    let page: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    let frame = unsigned(page).saturating_add(24);
    let limit = ms(limits.hard_frames.saturating_mul(frame));
    // The pragma installs SQLite's own WAL hook: set it first, then replace the hook.
    conn.execute_batch(&format!(
        "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {limit};"
    ))?;
    let wal = Arc::clone(wal);
    conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames| {
        wal.committed(u64::try_from(frames).unwrap_or_default());
        Ok(())
    }))
}

/// The bytes the data occupies: the pages in use (not on the free list) times their size.
fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    #[cfg(test)]
    tests::MEASURES.with(|n| n.set(n.get() + 1));
    // Cached: a commit near the budget measures it too.
    let pragma = |sql: &str| -> rusqlite::Result<u64> {
        conn.prepare_cached(sql)?
            .query_row([], |row| row.get::<_, i64>(0))
            .map(unsigned)
    };
    let pages = pragma("PRAGMA page_count")?.saturating_sub(pragma("PRAGMA freelist_count")?);
    Ok(pages.saturating_mul(pragma("PRAGMA page_size")?))
}

/// Writes a row of [`PROBE_BYTES`] and deletes it again, each in a transaction of its own
/// (fsynced): the row takes pages as a push would, from the free list first, then by growing
/// the file, so it fails when the disk has no room for them.
fn probe(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO probe (data) VALUES (randomblob(?1))",
        params![PROBE_BYTES],
    )?;
    tx.commit()?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("DELETE FROM probe", [])?;
    tx.commit()
}

/// [`apply`] in a savepoint, released when it is written, rolled back when it fails. The
/// statements are prepared once (rusqlite's `Savepoint` parses them for every write).
fn in_savepoint(tx: &Connection, room: &mut Room, op: &Op) -> rusqlite::Result<Done> {
    tx.prepare_cached("SAVEPOINT write")?.execute([])?;
    match apply(tx, room, op) {
        Ok(done) => {
            tx.prepare_cached("RELEASE write")?.execute([])?;
            Ok(done)
        }
        Err(e) => {
            // Fails only when SQLite already rolled the whole transaction back.
            let _ = tx.execute_batch("ROLLBACK TO write; RELEASE write;");
            Err(e)
        }
    }
}

fn apply(tx: &Connection, room: &mut Room, op: &Op) -> rusqlite::Result<Done> {
    match op {
        Op::Commit(commit) => commit_push(tx, room, commit),
        other => apply_count(tx, other).map(Done::Count),
    }
}

/// A push's dedupe record and deliveries, unless the push is recorded already.
fn commit_push(tx: &Connection, room: &mut Room, commit: &Commit) -> rusqlite::Result<Done> {
    let push = &commit.push;
    if let Some(recorded) = recorded(tx, &push.event_id, commit.dedupe_since_ms)? {
        return Ok(match recorded.meet(&commit.digest) {
            Committed::Duplicate(answer) => Done::Duplicate(answer),
            _ => Done::Collision,
        });
    }
    make_room(tx, room, commit)?;
    {
        tx.prepare_cached(RECORD)?.execute(params![
            push.event_id,
            ms(commit.now_ms),
            commit.answer.status,
            commit.answer.content_type,
            commit.answer.body.as_ref(),
            commit.digest.0.as_slice(),
        ])?;
        let mut ids = Vec::with_capacity(commit.deliveries.len());
        for delivery in &commit.deliveries {
            let xml = push.encrypted().then(|| push.message.xml().as_ref());
            tx.prepare_cached(
                    "INSERT INTO deliveries (target, account, event_id, query, body, content_type, \
                     forwarded_for, xml, key_index, received_ms, enqueued_ms, attempts, at_ms, \
                     last_error, msg_type, event, route) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
                )?
                .execute(params![
                    delivery.target,
                    push.account,
                    push.event_id,
                    push.query,
                    push.body.as_ref(),
                    push.content_type.as_ref().map(HeaderValue::as_bytes),
                    push.forwarded_for,
                    xml,
                    push.key_index.map(|i| i as i64),
                    ms(unix_ms(push.received_at)),
                    ms(commit.now_ms),
                    delivery.attempts,
                    ms(delivery.at_ms),
                    delivery.last_error,
                    push.message.msg_type(),
                    push.message.event(),
                    commit.route,
                ])?;
            let id = tx.last_insert_rowid();
            ids.push(id);
            if delivery.dead {
                bury(tx, id, commit.now_ms)?;
            }
        }
        Ok(Done::New(ids))
    }
}

/// What a transaction knows of the store's size: what it measured (or what the last
/// transaction left) and an upper bound of what its commits added since, so that a commit
/// far under its budget does not measure the store again (a pair of PRAGMAs, which SQLite
/// prepares anew each time: a tenth of the writer's time when every commit measured).
#[derive(Debug, Clone, Copy, Default)]
struct Room {
    measured: Option<u64>,
    added: u64,
}

/// What a commit can grow the store by beyond its rows' bytes: a page split in each of the
/// trees it inserts into (the dedupe record, its index, a delivery and its indexes).
const SPLIT_SLACK: u64 = 4 * 4096;

impl Room {
    /// Room as of the last transaction's measure.
    fn after(used: u64) -> Room {
        Room {
            measured: Some(used),
            added: 0,
        }
    }
}

/// Evicts the oldest dedupe records the commit's budget lets go when its writes would put
/// the store over it: [`EVICT_PER_RECORD`] of them, in the writer's transaction.
fn make_room(tx: &Connection, room: &mut Room, commit: &Commit) -> rusqlite::Result<()> {
    let budget = commit.budget;
    if budget.max_bytes == u64::MAX {
        return Ok(());
    }
    let push = &commit.push;
    let record = push.event_id.len() + commit.answer.body.len() + commit.answer.content_type.len();
    let delivery = push.body.len() + push.query.len() + push.message.xml().len();
    let bytes = commit
        .deliveries
        .len()
        .saturating_mul(delivery.saturating_add(ROW_OVERHEAD))
        .saturating_add(record.saturating_add(ROW_OVERHEAD));
    let bound = u64::try_from(bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(SPLIT_SLACK);
    if let Some(used) = room.measured
        && used.saturating_add(room.added).saturating_add(bound) <= budget.max_bytes
    {
        room.added = room.added.saturating_add(bound);
        return Ok(());
    }
    let used = used_bytes(tx)?;
    *room = Room::after(used);
    if used.saturating_add(bytes as u64) <= budget.max_bytes {
        room.added = bound;
        return Ok(());
    }
    // Measured again by the next commit: eviction frees pages.
    room.measured = None;
    let evicted = tx
        .prepare_cached(EVICT)?
        .execute(params![ms(budget.evict_before_ms), EVICT_PER_RECORD])?;
    super::store::evicted(evicted as u64, commit.now_ms);
    Ok(())
}

fn apply_count(tx: &Connection, op: &Op) -> rusqlite::Result<u64> {
    match op {
        Op::Commit(_) | Op::Probe => Ok(0),
        Op::Settle(id, settle, now_ms) => match settle {
            Settle::Delivered => tx
                .prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                .execute(params![id])
                .map(|n| n as u64),
            Settle::Retry {
                attempts,
                at_ms,
                error,
            } => tx
                .prepare_cached(
                    "UPDATE deliveries SET attempts = ?2, at_ms = ?3, last_error = ?4 WHERE id = ?1",
                )?
                .execute(params![id, attempts, ms(*at_ms), error])
                .map(|n| n as u64),
            Settle::Dead { attempts, error } => {
                tx.prepare_cached(
                    "UPDATE deliveries SET attempts = ?2, last_error = ?3 WHERE id = ?1",
                )?
                .execute(params![id, attempts, error])?;
                bury(tx, *id, *now_ms)
            }
        },
        Op::ExpireDedupe(before_ms) => tx
            .prepare_cached(EXPIRE)?
            .execute(params![ms(*before_ms)])
            .map(|n| n as u64),
        Op::Replay(selection, now_ms) => {
            let (id, target, of_pending, of_dead) = selected(selection);
            // Back in line, due now, with a fresh attempt count and age.
            let fresh = format!(
                "SET attempts = 0, enqueued_ms = ?3, at_ms = ?3, last_error = NULL WHERE {SELECTED}"
            );
            let args = params![id, target, ms(*now_ms)];
            let pending = match of_pending {
                true => tx.execute(&format!("UPDATE deliveries {fresh}"), args)?,
                false => 0,
            };
            if !of_dead {
                return Ok(pending as u64);
            }
            tx.execute(&format!("UPDATE dead_letters {fresh}"), args)?;
            let revived = tx.execute(
                &format!(
                    "INSERT INTO deliveries ({ALL_COLUMNS}) \
                     SELECT {ALL_COLUMNS} FROM dead_letters WHERE {SELECTED}"
                ),
                params![id, target],
            )?;
            tx.execute(
                &format!("DELETE FROM dead_letters WHERE {SELECTED}"),
                params![id, target],
            )?;
            Ok((pending + revived) as u64)
        }
        Op::Discard(selection) => match selected(selection) {
            (id, target, true, _) => tx
                .execute(
                    &format!("DELETE FROM deliveries WHERE {SELECTED}"),
                    params![id, target],
                )
                .map(|n| n as u64),
            _ => Ok(0),
        },
        Op::PurgeDead(Some(before_ms), None) => tx
            .prepare_cached(PURGE_BEFORE)?
            .execute(params![ms(*before_ms)])
            .map(|n| n as u64),
        Op::PurgeDead(before_ms, target) => tx
            .execute(
                "DELETE FROM dead_letters WHERE (?1 IS NULL OR at_ms < ?1) \
                 AND (?2 IS NULL OR target = ?2)",
                params![before_ms.map(ms), target],
            )
            .map(|n| n as u64),
    }
}

/// The rows a [`Selection`] names, given `?1` (an id) and `?2` (a target) from [`selected`].
const SELECTED: &str = "(?1 IS NULL OR id = ?1) AND (?2 IS NULL OR target = ?2)";

/// A selection as the id and target of [`SELECTED`], and whether it names pending
/// deliveries, dead letters, or both (an id).
fn selected(selection: &Selection) -> (Option<DeliveryId>, Option<String>, bool, bool) {
    match selection {
        Selection::Id(id) => (Some(*id), None, true, true),
        Selection::Pending { target } => (None, target.clone(), true, false),
        Selection::Dead { target } => (None, target.clone(), false, true),
    }
}

/// The dedupe record of `event_id` committed at or after `since_ms`.
fn recorded(
    conn: &Connection,
    event_id: &str,
    since_ms: u64,
) -> rusqlite::Result<Option<Recorded>> {
    conn.prepare_cached(RECORDED)?
        .query_row(params![event_id, ms(since_ms)], |row| {
            Ok(Recorded {
                answer: CachedAnswer {
                    status: row.get(0)?,
                    content_type: row.get(1)?,
                    body: Bytes::from(row.get::<_, Vec<u8>>(2)?),
                },
                digest: Digest::from_stored(row.get(3)?),
            })
        })
        .optional()
}

/// The dedupe records of the window, through `dedupe_committed`.
const RECENT: &str = "SELECT event_id, digest, committed_ms FROM dedupe \
    WHERE committed_ms >= ?1 ORDER BY committed_ms";

/// Moves a delivery to the dead letters, stamped with when it died.
fn bury(tx: &Connection, id: DeliveryId, now_ms: u64) -> rusqlite::Result<u64> {
    tx.prepare_cached(&format!(
        "INSERT INTO dead_letters ({ALL_COLUMNS}) SELECT {ALL_COLUMNS} FROM deliveries WHERE id = ?1"
    ))?
        .execute(params![id])?;
    tx.prepare_cached("UPDATE dead_letters SET at_ms = ?2 WHERE id = ?1")?
        .execute(params![id, ms(now_ms)])?;
    tx.prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
        .execute(params![id])
        .map(|n| n as u64)
}

// ---- opening ---------------------------------------------------------------------------

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// A new database file, created empty (an empty file is an empty database) with mode `0600`,
/// which SQLite then gives its `-wal` and `-shm` files.
fn create_private_file(db: &Path) {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    // Already there (the usual case) or not creatable: opening it says what is wrong.
    let _ = options.open(db);
}

/// The store holds decrypted messages: the database is the service's alone (`0600`; SQLite
/// gives its `-wal` and `-shm` files the same mode). A folder others can read is reported.
fn restrict_permissions(dir: &Path, db: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for suffix in ["", "-wal", "-shm"] {
            let mut file = db.as_os_str().to_owned();
            file.push(suffix);
            let file = Path::new(&file);
            if file.exists()
                && let Err(e) =
                    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
            {
                tracing::warn!(path = %file.display(), error = %e, "cannot make the store private (0600)");
            }
        }
        if let Ok(meta) = std::fs::metadata(dir)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %dir.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the store folder is open to other users; it holds the messages: chmod 700 it");
        }
    }
    #[cfg(not(unix))]
    let _ = (dir, db);
}

fn lock_store(dir: &Path) -> StoreResult<File> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Open(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Open(format!(
            "{} is in use by another wechat-relay: two relays must not deliver from one store",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Open(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

fn open_connection(path: &Path, create: bool) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers beside the writer; FULL: every commit is fsynced before it returns (the
    // writer lowers it to NORMAL for a transaction nobody waits on: see the module doc).
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!("cannot use WAL journal mode (got {mode})")),
        ));
    }
    conn.execute_batch("PRAGMA synchronous = FULL;")?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

enum Migration {
    Sql(rusqlite::Error),
    Newer(i64),
}

fn migrate(conn: &mut Connection) -> Result<(), Migration> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(Migration::Sql)?;
    let upgrade = match version {
        0 => schema(),
        1 => format!("{SCHEMA_2}{}{SCHEMA_4}", schema_3()),
        2 => format!("{}{SCHEMA_4}", schema_3()),
        3 => SCHEMA_4.to_owned(),
        SCHEMA_VERSION => return Ok(()),
        newer => return Err(Migration::Newer(newer)),
    };
    let tx = conn.transaction().map_err(Migration::Sql)?;
    tx.execute_batch(&upgrade).map_err(Migration::Sql)?;
    tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))
        .map_err(Migration::Sql)?;
    tx.commit().map_err(Migration::Sql)
}

// ---- rows --------------------------------------------------------------------------------

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<Delivery> {
    let received_at = UNIX_EPOCH + Duration::from_millis(unsigned(row.get(10)?));
    let push = super::store::stored_push(
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        Bytes::from(row.get::<_, Vec<u8>>(5)?),
        row.get::<_, Option<Vec<u8>>>(6)?.as_deref(),
        row.get(7)?,
        row.get::<_, Option<Vec<u8>>>(8)?.map(Bytes::from),
        row.get::<_, Option<i64>>(9)?
            .and_then(|i| usize::try_from(i).ok()),
        received_at,
    );
    Ok(Delivery {
        id: row.get(0)?,
        target: row.get(1)?,
        push,
        attempts: row.get(12)?,
        enqueued_ms: unsigned(row.get(11)?),
    })
}

/// A delivery as `outbox list` shows it, from the [`INFO_COLUMNS`].
fn info_from_row(row: &Row<'_>) -> rusqlite::Result<DeliveryInfo> {
    Ok(DeliveryInfo {
        id: row.get(0)?,
        target: row.get(1)?,
        account: row.get(2)?,
        event_id: row.get(3)?,
        attempts: row.get(4)?,
        last_error: row.get(5)?,
        enqueued_ms: unsigned(row.get(6)?),
        at_ms: unsigned(row.get(7)?),
        msg_type: row.get(8)?,
        event: row.get(9)?,
        route: row.get(10)?,
    })
}

/// Milliseconds since the Unix epoch of `at` (0 before it).
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn io_error(e: rusqlite::Error) -> StoreError {
    io_error_ref(&e)
}

fn io_error_ref(e: &rusqlite::Error) -> StoreError {
    StoreError::Io(describe(e))
}

/// SQLite's message, with the usual causes named.
fn describe(e: &rusqlite::Error) -> String {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => format!("the disk is full ({e})"),
        Some(ErrorCode::ReadOnly) => format!("the store is read-only ({e})"),
        Some(ErrorCode::NotADatabase) => format!("not a wechat-relay store, or corrupt ({e})"),
        Some(ErrorCode::DatabaseCorrupt) => format!("the store is corrupt ({e})"),
        Some(ErrorCode::CannotOpen) => format!("cannot open the database file ({e})"),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Condvar;
    use std::task::{Context, Waker};

    use super::*;
    use crate::outbox::store::{Budget, NewDelivery};
    use crate::push::Push;
    use crate::wechat::message::Message;

    /// Holds the writer just before each COMMIT while closed, and records the
    /// `synchronous` level of every transaction that reached it.
    #[derive(Default)]
    pub(super) struct Gate {
        state: Mutex<GateState>,
        changed: Condvar,
    }

    #[derive(Default)]
    struct GateState {
        closed: bool,
        /// Transactions let through while closed.
        permits: usize,
        /// `PRAGMA synchronous` of each transaction that reached the gate (1 NORMAL, 2 FULL).
        levels: Vec<i64>,
    }

    const WAIT: Duration = Duration::from_secs(10);

    impl Gate {
        fn closed() -> Arc<Gate> {
            let gate = Gate::default();
            gate.state.lock().expect("gate").closed = true;
            Arc::new(gate)
        }

        pub(super) fn hold(&self, conn: &Connection) {
            let level = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap_or(-1);
            let mut state = self.state.lock().expect("gate");
            state.levels.push(level);
            self.changed.notify_all();
            while state.closed && state.permits == 0 {
                state = self.changed.wait(state).expect("gate");
            }
            if state.closed {
                state.permits -= 1;
            }
        }

        /// Waits until `n` transactions have reached the gate; returns their levels.
        fn reached(&self, n: usize) -> Vec<i64> {
            let state = self.state.lock().expect("gate");
            let (state, _) = self
                .changed
                .wait_timeout_while(state, WAIT, |s| s.levels.len() < n)
                .expect("gate");
            assert!(state.levels.len() >= n, "the writer reached the gate");
            state.levels.clone()
        }

        fn release(&self, transactions: usize) {
            self.state.lock().expect("gate").permits += transactions;
            self.changed.notify_all();
        }

        fn open(&self) {
            self.state.lock().expect("gate").closed = false;
            self.changed.notify_all();
        }
    }

    /// Every op of `ops` in one transaction, answered at the end.
    fn apply_all<'a>(
        conn: &mut Connection,
        ops: impl ExactSizeIterator<Item = &'a Op>,
    ) -> Vec<StoreResult<Done>> {
        apply_batch(conn, Room::default(), ops, |_, _| {}, |_| {})
    }

    fn pending<T>(future: &mut BoxFuture<'_, T>) -> bool {
        future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    }

    /// Push `msg_id` committed with one delivery, pending or dead on arrival.
    fn push_commit(msg_id: u32, pending: bool) -> Commit {
        let Op::Commit(mut commit) = commit(msg_id, 10) else {
            unreachable!("commit() makes a commit")
        };
        commit.deliveries[0].dead = !pending;
        commit
    }

    /// A store whose writer is held before each COMMIT until the gate lets it through.
    fn gated(dir: &Path) -> (SqliteStore, Arc<Gate>) {
        let gate = Gate::closed();
        let limits = WalLimits::default();
        let store = SqliteStore::open_with(dir, Role::Server, limits, Arc::clone(&gate));
        (store.expect("open"), gate)
    }

    #[tokio::test]
    async fn a_commit_leaving_nothing_pending_is_answered_before_its_commit_and_not_fsynced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, gate) = gated(dir.path());

        // Alone in its transaction, held before COMMIT: answered all the same, and the
        // transaction runs without an fsync.
        let commit = push_commit(1, false);
        let event_id = commit.push.event_id.clone();
        let first = store.commit(commit);
        assert_eq!(gate.reached(1), [1], "NORMAL");
        let answered = tokio::time::timeout(WAIT, first).await.expect("answered");
        assert!(matches!(answered, Ok(Committed::New(_))));
        // A retry after the answer finds the record, though the readers cannot see it yet.
        let recorded = store.answer(&event_id, 0).await.expect("read");
        assert_eq!(recorded.map(|r| r.answer.status), Some(200));
        let recent = store.recent(0).await.expect("recent");
        assert_eq!(
            recent.iter().map(|r| &r.event_id).collect::<Vec<_>>(),
            [&event_id]
        );

        // Beside a commit with a pending delivery: answered while the transaction (FULL) is
        // held; the pending one is not.
        let mut with_delivery = store.commit(push_commit(2, true));
        let without = store.commit(push_commit(3, false));
        gate.release(1);
        assert_eq!(gate.reached(2), [1, 2], "the second one FULL");
        let answered = tokio::time::timeout(WAIT, without).await.expect("answered");
        assert!(matches!(answered, Ok(Committed::New(_))));
        assert!(pending(&mut with_delivery), "not before its COMMIT");

        // Settles, replays and purges wait for their COMMIT too.
        let mut settle = store.settle(2, Settle::Delivered, 5);
        let mut replay = store.replay(Selection::Id(1), 5);
        let mut purge = store.purge_dead(None, None);
        gate.release(1);
        let with_delivery = tokio::time::timeout(WAIT, with_delivery).await;
        assert!(matches!(
            with_delivery.expect("answered"),
            Ok(Committed::New(_))
        ));
        assert_eq!(gate.reached(3), [1, 2, 2]);
        assert!(pending(&mut settle) && pending(&mut replay) && pending(&mut purge));
        gate.open();
        assert_eq!(settle.await, Ok(()));
        assert_eq!(replay.await, Ok(1));
        assert_eq!(purge.await, Ok(1), "the dead letter of push 3");
    }

    #[tokio::test]
    async fn concurrent_commits_share_one_transaction_and_the_batch_size_is_measured() {
        let metrics = crate::metrics::install().expect("recorder");
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, gate) = gated(dir.path());
        // The writer held in a transaction of one while 64 commits arrive.
        let first = store.commit(push_commit(1, true));
        gate.reached(1);
        let waiting: Vec<_> = (2..66)
            .map(|i| store.commit(push_commit(i, true)))
            .collect();
        gate.open();
        assert!(matches!(first.await, Ok(Committed::New(_))));
        for commit in waiting {
            assert!(matches!(commit.await, Ok(Committed::New(_))));
        }
        assert_eq!(gate.reached(2).len(), 2, "64 commits, one transaction");
        // In /metrics: a transaction of more than 32 writes.
        let text = metrics.render();
        let value = |line: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(line))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{line} in {text}"))
        };
        let total = value("wechat_relay_store_batch_size_count");
        let small = value("wechat_relay_store_batch_size_bucket{le=\"32\"}");
        assert!(total - small >= 1.0, "{text}");
    }

    fn commit(msg_id: u32, answer_bytes: usize) -> Op {
        let xml = format!(
            "<xml><ToUserName>gh</ToUserName><FromUserName>o</FromUserName><CreateTime>1</CreateTime>\
             <MsgType>text</MsgType><Content>x</Content><MsgId>{msg_id}</MsgId></xml>"
        );
        let message = Message::parse(Bytes::from(xml.clone())).expect("xml");
        let push = Push {
            account: "main".into(),
            event_id: message.dedupe_key().event_id("main"),
            query: String::new(),
            body: Bytes::from(xml),
            content_type: None,
            forwarded_for: "127.0.0.1".into(),
            message,
            key_index: None,
            received_at: SystemTime::now(),
        };
        Op::Commit(Commit {
            digest: Digest::of(push.message.xml()),
            push: Arc::new(push),
            route: "r".into(),
            answer: CachedAnswer {
                status: 200,
                content_type: "text/plain".into(),
                body: Bytes::from(vec![b'x'; answer_bytes]),
            },
            deliveries: vec![NewDelivery {
                target: "t".into(),
                attempts: 0,
                last_error: None,
                at_ms: 0,
                dead: false,
            }],
            now_ms: 1,
            dedupe_since_ms: 0,
            budget: Budget::UNLIMITED,
        })
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    }

    #[test]
    fn a_full_disk_fails_the_write_that_does_not_fit_and_only_that_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        assert!(migrate(&mut conn).is_ok());
        let first = apply_all(&mut conn, [commit(1, 10)].iter());
        assert!(matches!(&first[..], [Ok(Done::New(ids))] if ids.len() == 1));
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("pages");
        conn.execute_batch(&format!("PRAGMA max_page_count = {pages}"))
            .expect("cap");

        // A small commit, one too large for the disk, and the settle of delivery 1. The
        // tallies' triggers give each write a statement journal, so SQLite rolls back the
        // failing statement, not the transaction (were it the transaction, every write is
        // told: see apply_batch).
        let batch = [
            commit(2, 10),
            commit(3, 1 << 20),
            Op::Settle(1, Settle::Delivered, 2),
        ];
        let results = apply_all(&mut conn, batch.iter());
        assert!(matches!(&results[0], Ok(Done::New(ids)) if ids.len() == 1));
        match &results[1] {
            Err(StoreError::Io(why)) => assert!(why.contains("disk is full"), "{why}"),
            other => panic!("the large write fails: {other:?}", other = other.is_ok()),
        }
        assert!(matches!(results[2], Ok(Done::Count(1))));
        // Push 3 left nothing behind; the rest is written.
        assert_eq!(count(&conn, "deliveries"), 1);
        assert_eq!(count(&conn, "dedupe"), 2);
    }

    #[test]
    fn the_probe_fails_on_a_full_disk_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        assert!(migrate(&mut conn).is_ok());
        // What a full disk looks like to SQLite: no page may be added (and none is free).
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("pages");
        conn.execute_batch(&format!("PRAGMA max_page_count = {pages}"))
            .expect("cap");
        let full = probe(&mut conn).expect_err("a full disk fails the probe");
        assert!(describe(&full).contains("disk is full"), "{full}");
        assert_eq!(count(&conn, "probe"), 0);
        conn.execute_batch("PRAGMA max_page_count = 1073741823")
            .expect("uncap");
        probe(&mut conn).expect("a probe on a disk with room");
        assert_eq!(count(&conn, "probe"), 0);
    }

    #[test]
    fn used_bytes_follow_the_data_not_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        assert!(migrate(&mut conn).is_ok());
        let empty = used_bytes(&conn).expect("measure");
        let batch: Vec<Op> = (0..50).map(|i| commit(i, 4096)).collect();
        apply_all(&mut conn, batch.iter());
        let full = used_bytes(&conn).expect("measure");
        assert!(full > empty + 50 * 4096, "{empty} -> {full}");
        // Delivered and expired: the pages go to the free list and no longer count.
        let done: Vec<Op> = (1..=50)
            .map(|id| Op::Settle(id, Settle::Delivered, 2))
            .chain([Op::ExpireDedupe(u64::MAX)])
            .collect();
        apply_all(&mut conn, done.iter());
        let drained = used_bytes(&conn).expect("measure");
        assert!(drained < empty + 4 * 4096, "{empty} -> {full} -> {drained}");
    }

    #[test]
    fn another_message_under_a_recorded_event_id_is_a_collision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        assert!(migrate(&mut conn).is_ok());
        let Op::Commit(first) = commit(1, 10) else {
            unreachable!("commit() makes a commit")
        };
        let mut other = first.clone();
        other.digest = Digest([7; 32]);
        let batch = [
            Op::Commit(first.clone()),
            Op::Commit(other),
            Op::Commit(first),
        ];
        let results = apply_all(&mut conn, batch.iter());
        assert!(matches!(&results[0], Ok(Done::New(ids)) if ids.len() == 1));
        assert!(matches!(results[1], Ok(Done::Collision)));
        assert!(matches!(results[2], Ok(Done::Duplicate(_))));
        assert_eq!(count(&conn, "deliveries"), 1);
    }

    #[test]
    fn a_version_1_store_is_migrated_and_its_records_still_answer_retries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        // The schema as version 1 created it, with one dedupe record.
        let v1 = schema()
            .replace(SCHEMA_2, "")
            .replace(&schema_3(), "")
            .replace(SCHEMA_4, "");
        conn.execute_batch(&format!("{v1} PRAGMA user_version = 1;"))
            .expect("v1");
        let Op::Commit(c) = commit(1, 10) else {
            unreachable!("commit() makes a commit")
        };
        conn.execute(
            "INSERT INTO dedupe (event_id, committed_ms, status, content_type, body) \
             VALUES (?1, 1, 200, 'text/plain', ?2)",
            params![c.push.event_id, b"success".as_slice()],
        )
        .expect("v1 record");
        assert!(migrate(&mut conn).is_ok());
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        // A record without a digest is taken for the same message: a retry, as before.
        let results = apply_all(&mut conn, [Op::Commit(c)].iter());
        assert!(matches!(results[0], Ok(Done::Duplicate(_))));
        probe(&mut conn).expect("the probe table exists");
    }

    #[test]
    fn a_failing_write_alone_is_rolled_back_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        assert!(migrate(&mut conn).is_ok());
        // The same push twice in one batch: the second is a duplicate, not an error; a replay
        // of an id that does not exist changes nothing; the rest is written.
        let batch = [
            commit(1, 10),
            commit(1, 10),
            Op::Replay(Selection::Id(99), 5),
            commit(2, 10),
        ];
        let results = apply_all(&mut conn, batch.iter());
        assert!(matches!(&results[0], Ok(Done::New(ids)) if ids.len() == 1));
        assert!(matches!(results[1], Ok(Done::Duplicate(_))));
        assert!(matches!(results[2], Ok(Done::Count(0))));
        assert!(matches!(&results[3], Ok(Done::New(ids)) if ids.len() == 1));
        assert_eq!(count(&conn, "deliveries"), 2);
    }

    /// The commit times of the dedupe records, oldest first.
    fn record_times(conn: &Connection) -> Vec<i64> {
        let mut statement = conn
            .prepare("SELECT committed_ms FROM dedupe ORDER BY committed_ms")
            .expect("prepare");
        let rows = statement.query_map([], |r| r.get(0)).expect("query");
        rows.map(|r| r.expect("row")).collect()
    }

    thread_local! {
        /// Times this thread measured a store's size.
        pub(super) static MEASURES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn commits_far_under_their_budget_do_not_measure_the_store_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        assert!(migrate(&mut conn).is_ok());
        let ops: Vec<Op> = (0..50)
            .map(|i| {
                let mut commit = push_commit(i, true);
                commit.budget = Budget {
                    max_bytes: 1 << 30,
                    evict_before_ms: 0,
                };
                Op::Commit(commit)
            })
            .collect();
        let before = MEASURES.with(std::cell::Cell::get);
        let results = apply_all(&mut conn, ops.iter());
        assert!(results.iter().all(|r| matches!(r, Ok(Done::New(_)))));
        let measured = MEASURES.with(std::cell::Cell::get) - before;
        assert_eq!(
            measured, 1,
            "one measure for the transaction, not one a commit"
        );
        // Near the budget each commit measures again (and evicts what it may).
        let near = used_bytes(&conn).expect("measure") + SPLIT_SLACK;
        let ops: Vec<Op> = (50..60)
            .map(|i| {
                let mut commit = push_commit(i, true);
                commit.budget = Budget {
                    max_bytes: near,
                    evict_before_ms: 0,
                };
                Op::Commit(commit)
            })
            .collect();
        let before = MEASURES.with(std::cell::Cell::get);
        apply_all(&mut conn, ops.iter());
        assert_eq!(MEASURES.with(std::cell::Cell::get) - before, 10);
    }

    #[test]
    fn past_the_budget_the_oldest_evictable_records_go_and_deliveries_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        assert!(migrate(&mut conn).is_ok());
        // Records committed out of order; one push with a pending delivery among them.
        let ops: Vec<Op> = [50, 10, 40, 20, 30]
            .into_iter()
            .enumerate()
            .map(|(i, at)| {
                let mut commit = push_commit(i as u32, false);
                commit.deliveries.clear();
                commit.now_ms = at;
                Op::Commit(commit)
            })
            .chain([Op::Commit(push_commit(9, true))])
            .collect();
        apply_all(&mut conn, ops.iter());
        assert_eq!(record_times(&conn), [1, 10, 20, 30, 40, 50]);
        // Within the budget: nothing goes.
        let next = |msg_id: u32, max_bytes: u64, evict_before_ms: u64| {
            let mut commit = push_commit(msg_id, false);
            commit.deliveries.clear();
            commit.now_ms = 100;
            commit.budget = Budget {
                max_bytes,
                evict_before_ms,
            };
            Op::Commit(commit)
        };
        apply_all(&mut conn, [next(10, u64::MAX - 1, 100)].iter());
        assert_eq!(record_times(&conn), [1, 10, 20, 30, 40, 50, 100]);
        // Over it: the two oldest records committed before 15 (of 1 and 10) go...
        apply_all(&mut conn, [next(11, 0, 15)].iter());
        assert_eq!(record_times(&conn), [20, 30, 40, 50, 100, 100]);
        // ...none left before 15: nothing goes, the record is still written...
        apply_all(&mut conn, [next(12, 0, 15)].iter());
        assert_eq!(record_times(&conn), [20, 30, 40, 50, 100, 100, 100]);
        // ...and oldest first again when more may go.
        apply_all(&mut conn, [next(13, 0, 45)].iter());
        assert_eq!(record_times(&conn), [40, 50, 100, 100, 100, 100]);
        assert_eq!(count(&conn, "deliveries"), 1, "the pending delivery stays");
        let plan = plan(&conn, EVICT, params![45, 2]);
        assert!(
            plan.contains("INDEX dedupe_committed (committed_ms<?)"),
            "{plan}"
        );
    }

    /// How SQLite runs `sql` with `args`: the plan's details, one per line.
    fn plan(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> String {
        let mut statement = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("explain");
        let rows = statement
            .query_map(args, |row| row.get::<_, String>(3))
            .expect("plan");
        rows.map(|r| r.expect("row")).collect::<Vec<_>>().join("\n")
    }

    #[tokio::test]
    async fn recent_lists_the_window_s_records_with_their_digests_through_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path(), Role::Server).expect("open");
        let mut digests = Vec::new();
        for (msg_id, at) in [(1, 100), (2, 300), (3, 200)] {
            let mut commit = push_commit(msg_id, false);
            commit.now_ms = at;
            digests.push((commit.push.event_id.clone(), commit.digest, at));
            assert!(matches!(store.commit(commit).await, Ok(Committed::New(_))));
        }
        // Those commits are answered before their COMMIT (nothing pending): the probe, a write
        // after them, returns once they are committed and a reader sees them.
        assert_eq!(store.probe().await, Ok(()));
        let recent = store.recent(200).await.expect("recent");
        let expected: Vec<RecentId> = [&digests[2], &digests[1]]
            .into_iter()
            .map(|(event_id, digest, at)| RecentId {
                event_id: event_id.clone(),
                digest: Some(*digest),
                committed_ms: *at,
            })
            .collect();
        assert_eq!(recent, expected);
        assert_eq!(store.recent(301).await, Ok(vec![]));
        let conn = open_connection(&dir.path().join(DB_FILE), false).expect("open");
        let plan = plan(&conn, RECENT, params![200]);
        assert!(plan.contains("USING INDEX dedupe_committed"), "{plan}");
    }

    /// Commits 40 rounds of 32 concurrent pushes with 4 KiB answers under `limits`; returns
    /// the largest the WAL file was after a round, and the checkpoints run.
    async fn wal_under_load(limits: WalLimits) -> (u64, (u64, u64)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            SqliteStore::open_with(dir.path(), Role::Server, limits, Arc::default()).expect("open");
        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        let mut largest = 0;
        for round in 0..40 {
            let commits: Vec<_> = (0..32)
                .map(|i| {
                    let Op::Commit(commit) = commit(round * 32 + i, 4096) else {
                        unreachable!("commit() makes a commit")
                    };
                    store.commit(commit)
                })
                .collect();
            for commit in commits {
                assert!(matches!(commit.await, Ok(Committed::New(_))));
            }
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        }
        (largest, store.wal.checkpoints())
    }

    #[tokio::test]
    async fn the_wal_is_checkpointed_off_the_writer_and_stays_within_its_bound() {
        let limits = WalLimits {
            every: Duration::from_millis(20),
            soft_frames: 64,
            hard_frames: 512,
        };
        // A frame is a 4 KiB page and its header; a round writes well under 400.
        let bound = (limits.hard_frames + 400) * (4096 + 24);
        let (largest, (passive, truncated)) = wal_under_load(limits).await;
        assert!(largest <= bound, "{largest} > {bound}");
        assert!(passive + truncated > 0, "checkpointed by the checkpointer");
        // Without the checkpointer the writer does not checkpoint: the WAL grows past it.
        let never = WalLimits {
            every: Duration::from_secs(3600),
            soft_frames: u64::MAX,
            hard_frames: u64::MAX,
        };
        let (largest, checkpoints) = wal_under_load(never).await;
        assert!(largest > bound, "{largest} <= {bound}");
        assert_eq!(checkpoints, (0, 0));
    }

    #[tokio::test]
    async fn past_its_bound_the_writer_waits_for_the_checkpointer_to_restart_the_wal() {
        let limits = WalLimits {
            every: Duration::from_millis(20),
            soft_frames: 64,
            hard_frames: 256,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            SqliteStore::open_with(dir.path(), Role::Server, limits, Arc::default()).expect("open");
        let db = dir.path().join(DB_FILE);
        // A read transaction pins the WAL: checkpoints cannot copy past it nor empty it.
        let reader = open_connection(&db, false).expect("reader");
        reader.execute_batch("BEGIN").expect("begin");
        let _: i64 = reader
            .query_row("SELECT COUNT(*) FROM dedupe", [], |r| r.get(0))
            .expect("read");
        let mut msg_id = 0;
        while store.wal.frames().0 < limits.hard_frames {
            msg_id += 1;
            let Op::Commit(commit) = commit(msg_id, 4096) else {
                unreachable!("commit() makes a commit")
            };
            assert!(matches!(store.commit(commit).await, Ok(Committed::New(_))));
        }
        // A commit sent while the checkpointer's PASSIVE runs is written (that is the
        // bound's slack); the one sent once it holds the writer for the restart waits.
        for _ in 0..1000 {
            if store.wal.holds() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(store.wal.holds(), "the checkpointer restarts the WAL");
        let Op::Commit(next) = commit(msg_id + 1, 10) else {
            unreachable!("commit() makes a commit")
        };
        let mut next = store.commit(next);
        for _ in 0..1000 {
            if store.wal.frames().1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(store.wal.frames().1, "the writer waits");
        assert!(pending(&mut next), "no write past the bound");
        // The read ends: the checkpointer restarts the WAL and the writer goes on.
        reader.execute_batch("COMMIT").expect("end the read");
        let next = tokio::time::timeout(WAIT, next).await.expect("written");
        assert!(matches!(next, Ok(Committed::New(_))));
        assert!(store.wal.checkpoints().1 >= 1, "restarted");
        // The commit after the restart wrote the WAL from its start, in a file kept at about
        // the bound's size (not truncated, not grown past it).
        assert!(store.wal.frames().0 < 64, "{:?}", store.wal.frames());
        let wal = std::fs::metadata(dir.path().join(format!("{DB_FILE}-wal"))).expect("wal");
        assert!(
            wal.len() <= (limits.hard_frames + 64) * 4120,
            "{}",
            wal.len()
        );
        assert!(
            wal.len() >= limits.soft_frames * 4120,
            "truncated: {}",
            wal.len()
        );
    }

    /// A store whose deliveries table holds `backlog` deliveries for `down` (retried with
    /// backoff, due over the next hours) beside a few for `up`, some dead letters and dedupe
    /// records, written as the writer would.
    async fn backlogged(backlog: u32) -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path(), Role::Server).expect("open");
        let commits: Vec<_> = (0..backlog)
            .map(|i| {
                let mut commit = push_commit(i, true);
                commit.deliveries[0].target = "down".into();
                commit.deliveries[0].at_ms = 1_000 + u64::from(i % 3600) * 1000;
                commit.now_ms = 1 + u64::from(i);
                store.commit(commit)
            })
            .collect();
        for commit in commits {
            assert!(matches!(commit.await, Ok(Committed::New(_))));
        }
        // The last one pending: answered once its transaction (and every one before) is.
        for i in 0..4 {
            let mut commit = push_commit(backlog + i, i % 2 == 1);
            commit.deliveries[0].target = "up".into();
            assert!(matches!(store.commit(commit).await, Ok(Committed::New(_))));
        }
        (dir, store)
    }

    #[tokio::test]
    async fn the_front_door_s_queries_are_index_lookups_beside_a_backlog() {
        let (dir, _store) = backlogged(100).await;
        let conn = open_connection(&dir.path().join(DB_FILE), false).expect("open");
        // 100,000 more for `down`, copied from the first (the triggers count them).
        conn.execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
             INSERT INTO deliveries ({columns}) SELECT {columns} FROM deliveries, n \
             WHERE deliveries.id = 1;",
            columns = ALL_COLUMNS.trim_start_matches("id, ")
        ))
        .expect("backlog");
        let queries: [(&str, String, &[&dyn rusqlite::ToSql]); 10] = [
            ("due", due_query(), params!["up", 5, 10, "[1,2]"]),
            ("next_due", NEXT_DUE.into(), params!["up", 5]),
            ("oldest", OLDEST.into(), params!["up"]),
            ("answer", RECORDED.into(), params!["e", 5]),
            ("recent", RECENT.into(), params![5]),
            ("expire", EXPIRE.into(), params![5]),
            ("purge", PURGE_BEFORE.into(), params![5]),
            (
                "settle",
                "DELETE FROM deliveries WHERE id = ?1".into(),
                params![5],
            ),
            (
                "retry",
                "UPDATE deliveries SET attempts = 1, at_ms = 2 WHERE id = ?1".into(),
                params![5],
            ),
            (
                "tally",
                "UPDATE tallies SET n = n - 1 WHERE kind = 0 AND target = ?1".into(),
                params!["up"],
            ),
        ];
        for (name, sql, args) in queries {
            let plan = plan(&conn, &sql, args);
            assert!(plan.starts_with("SEARCH"), "{name}: {plan}");
            // The one scan allowed: of the ids in flight handed to `due`.
            let mut scans = plan.lines().filter(|l| l.starts_with("SCAN"));
            assert!(
                scans.all(|l| l.starts_with("SCAN json_each")),
                "{name}: {plan}"
            );
            assert!(!plan.contains("TEMP B-TREE"), "{name}: {plan}");
        }
        // The tallies are read whole: a few rows per target, in their key's order.
        let plan = plan(&conn, TALLIES, []);
        assert_eq!(plan, "SCAN tallies");
    }

    /// `stats` counted the way it was before the tallies: every row, grouped.
    fn counted(conn: &Connection) -> Stats {
        let mut stats = Stats::default();
        let mut pending = conn
            .prepare("SELECT target, COUNT(*), MIN(enqueued_ms) FROM deliveries GROUP BY target")
            .expect("count");
        for row in pending
            .query_map([], |row| {
                Ok(TargetStats {
                    target: row.get(0)?,
                    pending: unsigned(row.get(1)?),
                    dead: 0,
                    oldest_pending_ms: row.get::<_, Option<i64>>(2)?.map(unsigned),
                })
            })
            .expect("rows")
        {
            stats.targets.push(row.expect("row"));
        }
        let mut dead = conn
            .prepare("SELECT target, COUNT(*) FROM dead_letters GROUP BY target")
            .expect("count");
        for row in dead
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))
            .expect("rows")
        {
            let (target, n) = row.expect("row");
            match stats.targets.iter_mut().find(|t| t.target == target) {
                Some(t) => t.dead = unsigned(n),
                None => stats.targets.push(TargetStats {
                    target,
                    dead: unsigned(n),
                    ..TargetStats::default()
                }),
            }
        }
        stats.targets.sort_by(|a, b| a.target.cmp(&b.target));
        stats.dedupe_keys = unsigned(
            conn.query_row("SELECT COUNT(*) FROM dedupe", [], |r| r.get(0))
                .expect("count"),
        );
        stats
    }

    #[tokio::test]
    async fn stats_from_the_tallies_match_the_rows_through_every_kind_of_write() {
        let (dir, store) = backlogged(200).await;
        let conn = open_connection(&dir.path().join(DB_FILE), false).expect("open");
        let check = |stats: StoreResult<Stats>| assert_eq!(stats, Ok(counted(&conn)));
        check(store.stats().await);
        // Delivered, retried, dead; replayed; purged; expired; an expired record replaced.
        store.settle(1, Settle::Delivered, 5).await.expect("settle");
        let retry = Settle::Retry {
            attempts: 1,
            at_ms: 9,
            error: "HTTP 503".into(),
        };
        store.settle(2, retry, 5).await.expect("settle");
        for id in 3..10 {
            let dead = Settle::Dead {
                attempts: 1,
                error: "HTTP 404".into(),
            };
            store.settle(id, dead, 5).await.expect("settle");
        }
        check(store.stats().await);
        assert_eq!(store.replay(Selection::Id(3), 6).await, Ok(1));
        let down = Some("down".to_owned());
        assert_eq!(store.purge_dead(Some(6), down).await, Ok(6));
        // Records at 1..=49 from the backlog and the four at 1.
        assert_eq!(store.expire_dedupe(50).await, Ok(53));
        let mut again = push_commit(7, true);
        again.now_ms = 60;
        again.dedupe_since_ms = 55;
        assert!(matches!(store.commit(again).await, Ok(Committed::New(_))));
        let stats = store.stats().await;
        check(stats.clone());
        let stats = stats.expect("stats");
        assert_eq!(stats.dedupe_keys, 204 - 53 + 1);
        assert_eq!(stats.targets.len(), 3, "down, up and t: {stats:?}");
        assert!(stats.targets.iter().all(|t| t.oldest_pending_ms.is_some()));
        // Every delivery and dead letter gone: the target leaves the stats.
        assert_eq!(store.purge_dead(None, None).await.map(|n| n > 0), Ok(true));
        for id in 1..=205 {
            store
                .settle(id, Settle::Delivered, 70)
                .await
                .expect("settle");
        }
        let stats = store.stats().await;
        check(stats.clone());
        assert!(stats.expect("stats").targets.is_empty());
    }

    #[test]
    fn a_version_2_store_gets_its_tallies_from_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        // Written by this relay, then made version 2: without the tallies and the columns of 4.
        conn.execute_batch(&schema().replace(&schema_3(), ""))
            .expect("v2 and 4");
        let ops: Vec<Op> = (0..20)
            .map(|i| Op::Commit(push_commit(i, i % 4 != 0)))
            .collect();
        apply_all(&mut conn, ops.iter());
        conn.execute_batch(&format!("{UNDO_4} PRAGMA user_version = 2;"))
            .expect("v2");
        let before = counted(&conn);
        assert!(migrate(&mut conn).is_ok());
        let store_dir = dir.path().to_owned();
        drop(conn);
        let store = SqliteStore::open(&store_dir, Role::Tool).expect("open");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(runtime.block_on(store.stats()), Ok(before));
    }

    /// Takes a store back from version 4 to 3: the columns [`SCHEMA_4`] added, dropped.
    const UNDO_4: &str = "
        ALTER TABLE deliveries DROP COLUMN msg_type;
        ALTER TABLE deliveries DROP COLUMN event;
        ALTER TABLE deliveries DROP COLUMN route;
        ALTER TABLE dead_letters DROP COLUMN msg_type;
        ALTER TABLE dead_letters DROP COLUMN event;
        ALTER TABLE dead_letters DROP COLUMN route;";

    #[tokio::test]
    async fn a_version_3_store_lists_its_old_rows_without_type_event_and_route() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = open_connection(&dir.path().join(DB_FILE), true).expect("open");
        conn.execute_batch(&schema()).expect("schema");
        let ops: Vec<Op> = (0..4)
            .map(|i| Op::Commit(push_commit(i, i % 2 == 0)))
            .collect();
        apply_all(&mut conn, ops.iter());
        conn.execute_batch(&format!("{UNDO_4} PRAGMA user_version = 3;"))
            .expect("v3");
        drop(conn);
        let store = SqliteStore::open(dir.path(), Role::Server).expect("migrated");
        let mut new = push_commit(9, true);
        new.route = "catch-all".into();
        assert!(matches!(store.commit(new).await, Ok(Committed::New(_))));
        let pending = store.list(Filter::default()).await.expect("list");
        let dead = store
            .list(Filter {
                dead: true,
                target: None,
            })
            .await
            .expect("list");
        let shown = |d: &DeliveryInfo| (d.msg_type.clone(), d.event.clone(), d.route.clone());
        assert_eq!(
            pending.iter().map(shown).collect::<Vec<_>>(),
            [
                (None, None, None),
                (None, None, None),
                (Some("text".into()), None, Some("catch-all".into()))
            ]
        );
        assert_eq!(
            dead.iter().map(shown).collect::<Vec<_>>(),
            [(None, None, None), (None, None, None)]
        );
    }
}
