//! The shared store: PostgreSQL (`[store] url`), for several relays behind one load balancer.
//! Every relay that names the database sees the same dedupe records and the same outbox:
//!
//! - a commit is one `INSERT ... ON CONFLICT` of the push's dedupe record, which another
//!   relay's commit of the same event id waits on (the row lock) and then finds, so a WeChat
//!   retry that lands on the other relay gets the same answer and is not forwarded again;
//!   its deliveries go in the same statement. Concurrent commits share a transaction
//!   (group commit: one task, on a connection of its own, writes what is waiting while the
//!   last batch is in flight; BEGIN, the statement and COMMIT in one round trip), and a batch
//!   that leaves nothing pending does not wait for the WAL flush (`synchronous_commit = off`;
//!   it is visible to every relay all the same);
//! - claims, and deliveries delivered, are written the same way in batches ([`Queue`]), each
//!   on a connection of its own; claims do not wait for the WAL flush: one lost with the
//!   database server costs a reply target asked once more, never a push;
//! - a pending delivery carries a lease (`lease_owner`, `lease_until_ms`): the relay that
//!   committed it holds it, a worker that takes it due renews it, and `FOR UPDATE SKIP LOCKED`
//!   keeps two relays from taking the same one. A relay that died leaves leases that run out
//!   after `[store] lease_ms`, and another relay's worker then takes the delivery;
//! - the schema is versioned in `wechat_relay_schema` and migrated at start under an
//!   advisory lock, so that relays starting together do not race; a relay refuses a schema
//!   newer than it knows.
//!
//! Every call is bounded ([`OP_TIMEOUT`]): a database that does not answer fails the push
//! with 503 (WeChat retries), never holds it past its deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use http::HeaderValue;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use super::sqlite::Role;
use super::store::{
    BoxFuture, CachedAnswer, ClaimOutcome, ClaimTimes, Commit, Committed, Delivery, DeliveryId,
    DeliveryInfo, Digest, Filter, NewDelivery, RecentId, Recorded, Selection, Settle, Stats, Store,
    StoreError, StoreResult, StoredDelivery, TargetStats, ms, stored_push, unsigned,
};
use crate::config::Database;
use crate::push::Push;

/// The schema this relay writes; the one row of `wechat_relay_schema`.
pub const SCHEMA_VERSION: i32 = 1;
/// The advisory lock under which the schema is set up or migrated ("wechatrl").
const MIGRATION_LOCK: i64 = 0x7765_6368_6174_726c;
/// The longest any call to the database may take before the push or attempt fails.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest a connection may take to open (the relay refuses to start past it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pool's connections to the database (the workers', the retries' reads, the `outbox`
/// commands'); the writer and each [`Queue`] have one more each.
const POOL_SIZE: usize = 8;
/// Commits waiting for the writer; past it a push is refused (503, WeChat retries).
const MAX_WAITING: usize = 4096;
/// The channel of `NOTIFY` wake-ups: its payload is a target's name, or `*` for every target.
const WAKE_CHANNEL: &str = "wechat_relay_due";
/// Wake-ups held for the workers; past it the oldest are dropped and every worker looks.
const WAKEUPS_HELD: usize = 64;
/// How long the listener waits before connecting again after its connection failed.
const LISTEN_AGAIN: Duration = Duration::from_secs(1);
/// The most commits one transaction takes.
const MAX_BATCH: usize = 256;
/// How often the size of the store's tables is measured (`used_bytes`).
const MEASURE_EVERY: Duration = Duration::from_secs(5);
/// Dedupe records evicted for each one written while the store is at its budget.
const EVICT_PER_RECORD: i64 = 2;

const SCHEMA_1: &str = "
    CREATE TABLE wechat_relay_dedupe (
        event_id text PRIMARY KEY,
        committed_ms bigint NOT NULL,
        status integer NOT NULL,
        content_type text NOT NULL,
        body bytea NOT NULL,
        digest bytea
    );
    CREATE INDEX wechat_relay_dedupe_committed ON wechat_relay_dedupe (committed_ms);
    CREATE TABLE wechat_relay_deliveries (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        target text NOT NULL,
        account text NOT NULL,
        event_id text NOT NULL,
        query text NOT NULL,
        body bytea NOT NULL,
        content_type bytea,
        forwarded_for text NOT NULL,
        xml bytea,
        key_index integer,
        received_ms bigint NOT NULL,
        enqueued_ms bigint NOT NULL,
        attempts integer NOT NULL,
        at_ms bigint NOT NULL,
        last_error text,
        msg_type text,
        event text,
        route text,
        dead boolean NOT NULL DEFAULT false,
        lease_owner text,
        lease_until_ms bigint
    );
    CREATE INDEX wechat_relay_deliveries_due ON wechat_relay_deliveries (target, at_ms)
        WHERE NOT dead;
    CREATE INDEX wechat_relay_deliveries_dead ON wechat_relay_deliveries (target, at_ms)
        WHERE dead;
    CREATE INDEX wechat_relay_deliveries_leased ON wechat_relay_deliveries (lease_owner)
        WHERE lease_owner IS NOT NULL;
    CREATE TABLE wechat_relay_probe (id integer PRIMARY KEY, data bytea NOT NULL);
    CREATE TABLE wechat_relay_claims (
        event_id text PRIMARY KEY,
        owner text NOT NULL,
        until_ms bigint NOT NULL
    );";

/// The columns a delivery is read back from, in [`delivery_from_row`]'s order.
const DELIVERY_COLUMNS: &str = "id, target, account, event_id, query, body, content_type, \
    forwarded_for, xml, key_index, received_ms, enqueued_ms, attempts";
/// The columns a [`DeliveryInfo`] is read from, in [`info_from_row`]'s order.
const INFO_COLUMNS: &str = "id, target, account, event_id, attempts, last_error, enqueued_ms, \
    at_ms, msg_type, event, route, dead";

/// The rows a [`Selection`] names, given `$1` (an id or NULL), `$2` (a target or NULL) and
/// `$3` (pending, dead, or both when NULL).
const SELECTED: &str = "($1::bigint IS NULL OR id = $1) AND ($2::text IS NULL OR target = $2) \
    AND ($3::boolean IS NULL OR dead = $3)";

pub struct PgStore {
    pool: Conns,
    writer: mpsc::Sender<Job>,
    /// Claims, and the deliveries delivered, each written in batches on a connection of its
    /// own (see [`Batch`]): claims without waiting for the WAL flush, the others flushed.
    claims: Queue<Claims>,
    delivered: Queue<Delivered>,
    /// The bytes of the store's tables, as last measured.
    used: Arc<AtomicU64>,
    /// Who holds a lease this relay takes: `host:pid:random`.
    owner: Arc<str>,
    lease_ms: u64,
    /// What [`listen_loop`] hears: targets another process made due now.
    wakeups: tokio::sync::broadcast::Sender<Option<Arc<str>>>,
    stop: CancellationToken,
}

struct Job {
    commit: Commit,
    done: oneshot::Sender<StoreResult<Committed>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What `check` says of a database: its schema version, or that it is empty.
pub async fn schema_version(database: &Database) -> StoreResult<Option<i32>> {
    let pool = pool(database, 1, &Arc::default())?;
    let client = pool.get().await?;
    bounded(read_version(&client)).await
}

impl PgStore {
    /// Connects, then sets up or migrates the schema (`serve`), or checks that it is the one
    /// this relay knows (`outbox` commands: they change nothing else).
    pub async fn open(database: &Database, lease: Duration, role: Role) -> StoreResult<PgStore> {
        let reconnect = Arc::default();
        let writer_pool = pool(database, 1, &reconnect)?;
        let claims_pool = unflushed_pool(database, &reconnect)?;
        let delivered_pool = pool(database, 1, &reconnect)?;
        let pool = pool(database, POOL_SIZE, &reconnect)?;
        let mut client = pool.get().await?;
        match role {
            Role::Server => migrate(&mut client).await?,
            Role::Tool => match bounded(read_version(&client)).await? {
                Some(SCHEMA_VERSION) => {}
                None => {
                    return Err(StoreError::Open(format!(
                        "{}: no relay store here yet (a relay sets it up at its first start)",
                        database.shown
                    )));
                }
                Some(other) => return Err(StoreError::Open(version_mismatch(other))),
            },
        }
        drop(client);
        let (writer, jobs) = mpsc::channel(MAX_WAITING);
        let owner: Arc<str> = format!(
            "{}:{}:{:08x}",
            hostname(),
            std::process::id(),
            rand::random::<u32>()
        )
        .into();
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let store = PgStore {
            pool: pool.clone(),
            writer,
            claims: Queue::spawn(
                claims_pool,
                Claims {
                    owner: Arc::clone(&owner),
                },
            ),
            delivered: Queue::spawn(delivered_pool, Delivered),
            used: Arc::default(),
            owner: Arc::clone(&owner),
            lease_ms,
            wakeups: tokio::sync::broadcast::channel(WAKEUPS_HELD).0,
            stop: CancellationToken::new(),
        };
        if role == Role::Server {
            tokio::spawn(listen_loop(
                database.clone(),
                store.wakeups.clone(),
                store.stop.clone(),
            ));
        }
        let used = Arc::clone(&store.used);
        store.measure_now().await;
        tokio::spawn(write_loop(
            writer_pool,
            jobs,
            Arc::clone(&owner),
            lease_ms,
            Arc::clone(&used),
        ));
        tokio::spawn(measure_loop(pool.clone(), used, store.stop.clone()));
        tokio::spawn(renew_loop(pool, owner, lease_ms, store.stop.clone()));
        Ok(store)
    }

    async fn measure_now(&self) {
        if let Ok(bytes) = measure(&self.pool).await {
            self.used.store(bytes, Ordering::Relaxed);
        }
    }

    /// Runs `read` on a pooled connection, bounded by [`OP_TIMEOUT`].
    fn with<'a, T: Send + 'a>(
        &'a self,
        read: impl for<'c> FnOnce(Cached<'c>) -> BoxFuture<'c, Result<T, tokio_postgres::Error>>
        + Send
        + 'a,
    ) -> BoxFuture<'a, StoreResult<T>> {
        Box::pin(async move {
            bounded(async {
                let client = self.pool.get().await?;
                read(Cached(&client)).await.map_err(io_error)
            })
            .await
        })
    }
}

/// A pooled connection whose statements are prepared once per connection and kept: a call is
/// one round trip, not a prepare and then an execute.
#[derive(Clone, Copy)]
struct Cached<'c>(&'c deadpool_postgres::Client);

type Params<'p> = &'p [&'p (dyn tokio_postgres::types::ToSql + Sync)];

impl Cached<'_> {
    async fn execute(self, sql: &str, params: Params<'_>) -> Result<u64, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.execute(&statement, params).await
    }

    async fn query(self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query(&statement, params).await
    }

    async fn query_one(self, sql: &str, params: Params<'_>) -> Result<Row, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query_one(&statement, params).await
    }

    async fn query_opt(
        self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let statement = self.0.prepare_cached(sql).await?;
        self.0.query_opt(&statement, params).await
    }
}

/// The settings of every connection the relay makes to the database.
fn client_config(database: &Database) -> tokio_postgres::Config {
    let mut config = database.config.clone();
    config.connect_timeout(CONNECT_TIMEOUT);
    config.application_name("wechat-relay");
    // Every statement the relay prepares finds its rows by an index. A connection plans a
    // statement once and keeps the plan; planned while the tables are small (a fresh
    // database), it would scan them whole for as long as they grow, until autovacuum next
    // analyzes them. Without sequential scans the plan is the index's from the start; the
    // few statements that read a whole table (stats, list) still may.
    with_options(&mut config, "-c enable_seqscan=off");
    config
}

fn pool(database: &Database, size: usize, reconnect: &Arc<Reconnect>) -> StoreResult<Conns> {
    let manager = Manager::from_config(
        client_config(database),
        tls(database)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(OP_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(OP_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Open(format!("cannot set up the database pool: {e}")))?;
    Ok(Conns {
        pool,
        reconnect: Arc::clone(reconnect),
    })
}

/// The claims' connection ([`Claims`]): its transactions commit without waiting for the WAL
/// flush (`synchronous_commit = off`), visible to every relay at once all the same.
fn unflushed_pool(database: &Database, reconnect: &Arc<Reconnect>) -> StoreResult<Conns> {
    let mut database = database.clone();
    with_options(&mut database.config, "-c synchronous_commit=off");
    pool(&database, 1, reconnect)
}

/// Adds server options to those the URL gave, if any.
fn with_options(config: &mut tokio_postgres::Config, options: &str) {
    let options = match config.get_options() {
        Some(given) => format!("{given} {options}"),
        None => options.to_owned(),
    };
    config.options(&options);
}

/// TLS to the database when its URL asks for it (`sslmode=require`), verified against the
/// Web PKI roots or `[store] ca_file`; `sslmode=prefer` (libpq's default) uses it when the
/// server offers it.
fn tls(database: &Database) -> StoreResult<tokio_postgres_rustls::MakeRustlsConnect> {
    let roots = match &database.roots {
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
        Some(certificates) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates {
                roots.add(certificate.clone()).map_err(|e| {
                    StoreError::Open(format!("[store] ca_file: an unusable certificate: {e}"))
                })?;
            }
            roots
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Open(format!("cannot set up TLS to the database: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A pool of connections to the database whose connecting goes through the store's one
/// [`Reconnect`].
#[derive(Clone)]
struct Conns {
    pool: Pool,
    reconnect: Arc<Reconnect>,
}

impl Conns {
    /// A connection: an idle one of the pool, or a new one unless the last could not be
    /// made and its backoff has not passed (then the call fails at once).
    async fn get(&self) -> StoreResult<deadpool_postgres::Object> {
        let idle = self.pool.status().available > 0;
        if let Some(wait) = self.reconnect.waiting().filter(|_| !idle) {
            crate::metrics::store_error();
            return Err(StoreError::Io(format!(
                "cannot reach the database (connecting again in {} ms)",
                wait.as_millis()
            )));
        }
        match self.pool.get().await {
            Ok(client) => {
                self.reconnect.connected();
                Ok(client)
            }
            // The server's own words when it refused (a wrong password, no such database).
            Err(deadpool_postgres::PoolError::Backend(e)) => {
                let error = io_error(e);
                self.reconnect.failed(&error.to_string());
                Err(error)
            }
            Err(e) => {
                crate::metrics::store_error();
                Err(match e {
                    deadpool_postgres::PoolError::Timeout(
                        deadpool_postgres::TimeoutType::Create,
                    ) => {
                        self.reconnect.failed("timed out");
                        StoreError::Io("cannot reach the database: timed out".into())
                    }
                    deadpool_postgres::PoolError::Timeout(_) => {
                        StoreError::Io("cannot reach the database: timed out".into())
                    }
                    other => StoreError::Io(format!("cannot reach the database: {other}")),
                })
            }
        }
    }
}

/// The backoff after connections that could not be made: none is tried again for 100 ms,
/// doubling with each failure to 2 s (with a quarter of jitter), so that while the database
/// is away a push fails at once (503, WeChat retries) rather than each trying to connect,
/// and relays do not all connect at the moment it is back. The first connection made ends it.
#[derive(Default)]
struct Reconnect {
    /// Set while connections fail: the lock is taken only then.
    down: std::sync::atomic::AtomicBool,
    outage: std::sync::Mutex<Outage>,
}

#[derive(Default)]
struct Outage {
    failures: u32,
    since: Option<std::time::Instant>,
    next: Option<std::time::Instant>,
}

const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

impl Reconnect {
    /// How long until a connection may be tried again, if it may not now.
    fn waiting(&self) -> Option<Duration> {
        if !self.down.load(Ordering::Relaxed) {
            return None;
        }
        let outage = self.outage.lock().ok()?;
        let next = outage.next?;
        next.checked_duration_since(std::time::Instant::now())
            .filter(|wait| !wait.is_zero())
    }

    fn failed(&self, why: &str) {
        let Ok(mut outage) = self.outage.lock() else {
            return;
        };
        crate::metrics::store_connect_failure();
        let now = std::time::Instant::now();
        outage.failures = outage.failures.saturating_add(1);
        let doubled = RECONNECT_FIRST
            .saturating_mul(1u32 << outage.failures.saturating_sub(1).min(5))
            .min(RECONNECT_MAX);
        // Up to a quarter less, so that relays that failed together spread out.
        let jitter = doubled.mul_f64(rand::random::<f64>() * 0.25);
        let wait = doubled.saturating_sub(jitter);
        outage.next = now.checked_add(wait);
        if outage.since.is_none() {
            outage.since = Some(now);
            tracing::warn!(error = %why, retry_in_ms = wait.as_millis() as u64,
                "cannot connect to the database; pushes that need it are answered 503 until it is back");
        }
        self.down.store(true, Ordering::Relaxed);
    }

    fn connected(&self) {
        if !self.down.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Ok(mut outage) = self.outage.lock()
            && let Some(since) = outage.since.take()
        {
            tracing::info!(
                down_ms = since.elapsed().as_millis() as u64,
                failures = outage.failures,
                "connected to the database again"
            );
            *outage = Outage::default();
        }
    }
}

/// `work` within [`OP_TIMEOUT`].
async fn bounded<T>(work: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
    match tokio::time::timeout(OP_TIMEOUT, work).await {
        Ok(result) => result,
        Err(_) => {
            crate::metrics::store_error();
            Err(StoreError::Io(format!(
                "the database did not answer within {} ms",
                OP_TIMEOUT.as_millis()
            )))
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "relay".into())
}

// ---- schema ------------------------------------------------------------------------------

async fn read_version(client: &impl GenericClient) -> StoreResult<Option<i32>> {
    let exists = client
        .query_one("SELECT to_regclass('wechat_relay_schema') IS NOT NULL", &[])
        .await
        .map_err(io_error)?;
    if !exists.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_opt("SELECT version FROM wechat_relay_schema", &[])
        .await
        .map_err(io_error)?;
    Ok(row.map(|r| r.get(0)))
}

fn version_mismatch(found: i32) -> String {
    if found > SCHEMA_VERSION {
        format!(
            "the database's relay schema is version {found}, newer than this relay's {SCHEMA_VERSION}: run the newer relay, or restore the database"
        )
    } else {
        format!(
            "the database's relay schema is version {found}; this relay writes {SCHEMA_VERSION}: start a relay (serve) to migrate it"
        )
    }
}

/// Sets the schema up, or migrates it, in one transaction under [`MIGRATION_LOCK`]: a second
/// relay starting at the same time waits, then finds it done.
async fn migrate(client: &mut deadpool_postgres::Object) -> StoreResult<()> {
    let tx = client.transaction().await.map_err(io_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(io_error)?;
    match read_version(&tx).await? {
        Some(SCHEMA_VERSION) => return Ok(()),
        Some(newer) if newer > SCHEMA_VERSION => {
            return Err(StoreError::Open(version_mismatch(newer)));
        }
        Some(older) => {
            return Err(StoreError::Open(format!(
                "the database's relay schema is version {older}, which this relay cannot migrate"
            )));
        }
        None => {}
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS wechat_relay_schema (version integer NOT NULL);
         {SCHEMA_1}
         INSERT INTO wechat_relay_schema (version) VALUES ({SCHEMA_VERSION});"
    ))
    .await
    .map_err(io_error)?;
    tx.commit().await.map_err(io_error)
}

// ---- writes ------------------------------------------------------------------------------

/// The writer: takes what is waiting (up to [`MAX_BATCH`]) and commits it in one transaction,
/// then answers each. A batch that fails is tried again commit by commit, so that one bad
/// commit fails only itself.
async fn write_loop(
    pool: Conns,
    mut jobs: mpsc::Receiver<Job>,
    owner: Arc<str>,
    lease_ms: u64,
    used: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let commits: Vec<&Commit> = batch.iter().map(|job| &job.commit).collect();
        let started = std::time::Instant::now();
        let written = bounded(write_batch(&pool, &commits, &owner, lease_ms, &used)).await;
        crate::metrics::store_commit(started.elapsed());
        crate::metrics::store_batch(commits.len());
        let results = match written {
            Ok(results) => results.into_iter().map(Ok).collect(),
            Err(_) if commits.len() > 1 => {
                let mut results = Vec::with_capacity(commits.len());
                for commit in &commits {
                    let one = bounded(write_batch(&pool, &[commit], &owner, lease_ms, &used)).await;
                    results.push(one.map(|mut r| r.remove(0)));
                }
                results
            }
            Err(e) => vec![Err(e)],
        };
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.done.send(result);
        }
    }
}

async fn write_batch(
    pool: &Conns,
    commits: &[&Commit],
    owner: &str,
    lease_ms: u64,
    used: &AtomicU64,
) -> StoreResult<Vec<Committed>> {
    // In event id order: two relays' batches that share ids lock them in the same order, so
    // they wait for each other rather than deadlock.
    let mut commits = commits.to_vec();
    commits.sort_unstable_by(|a, b| a.push.event_id.cmp(&b.push.event_id));
    let client = pool.get().await?;
    let statement = client.prepare_cached(WRITE).await.map_err(io_error)?;
    let nothing_pending = commits.iter().all(|c| c.deliveries.iter().all(|d| d.dead));
    // A batch that leaves nothing pending is visible to every relay at COMMIT all the same; a
    // crash of the database may lose it, and a retry is then handled afresh.
    let begin = if nothing_pending {
        "BEGIN; SET LOCAL synchronous_commit = off"
    } else {
        "BEGIN"
    };
    let written = Written::new(&commits, owner, lease_ms);
    let params = written.params();
    // One round trip: the four are sent back to back (tokio-postgres pipelines requests polled
    // together, in the order they are first polled), and the server runs them in that order.
    // A failed statement aborts the transaction, and its COMMIT then rolls it back.
    let (begun, evicted, rows, committed) = tokio::join!(
        client.batch_execute(begin),
        make_room(&client, &commits, used),
        client.query(&statement, &params),
        client.batch_execute("COMMIT"),
    );
    begun.map_err(io_error)?;
    evicted?;
    let rows = rows.map_err(io_error)?;
    committed.map_err(io_error)?;
    let mut recorded = std::collections::HashSet::new();
    let mut ids = std::collections::HashMap::new();
    for row in &rows {
        let event_id: String = row.get(0);
        match row.get::<_, Option<i64>>(1) {
            None => {
                recorded.insert(event_id);
            }
            Some(id) => {
                ids.insert((event_id, row.get::<_, String>(2)), id);
            }
        }
    }
    let met = records_met(&client, &commits, &recorded).await?;
    commits
        .iter()
        .map(|commit| {
            let event_id = &commit.push.event_id;
            if recorded.contains(event_id) {
                let ids = commit
                    .deliveries
                    .iter()
                    .map(|d| ids.remove(&(event_id.clone(), d.target.clone())))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| StoreError::Io("a delivery's id did not come back".into()))?;
                return Ok(Committed::New(ids));
            }
            match met.get(event_id) {
                Some(recorded) => Ok(recorded.clone().meet(&commit.digest)),
                None => Err(StoreError::Io(
                    "the push's dedupe record went away while it was committed".into(),
                )),
            }
        })
        .collect()
}

/// A batch in one statement: the dedupe record of every commit, unless its event id is
/// recorded within the window (by any relay: the insert waits for another transaction's record
/// of the same id, then finds it), and the deliveries of the commits recorded. It returns a row
/// per event id recorded (`id` NULL) and one per delivery written. Two commits of one event id
/// in a batch make it fail, and the batch is then written commit by commit.
const WRITE: &str = "WITH recorded AS ( \
      INSERT INTO wechat_relay_dedupe (event_id, committed_ms, status, content_type, body, digest) \
      SELECT * FROM unnest($1::text[], $2::bigint[], $3::integer[], $4::text[], $5::bytea[], $6::bytea[]) \
      ON CONFLICT (event_id) DO UPDATE SET \
      committed_ms = EXCLUDED.committed_ms, status = EXCLUDED.status, \
      content_type = EXCLUDED.content_type, body = EXCLUDED.body, digest = EXCLUDED.digest \
      WHERE wechat_relay_dedupe.committed_ms < $7 RETURNING event_id), \
    delivered AS ( \
      INSERT INTO wechat_relay_deliveries (target, account, event_id, query, body, \
      content_type, forwarded_for, xml, key_index, received_ms, enqueued_ms, attempts, \
      at_ms, last_error, msg_type, event, route, dead, lease_owner, lease_until_ms) \
      SELECT * FROM unnest($8::text[], $9::text[], $10::text[], $11::text[], $12::bytea[], \
      $13::bytea[], $14::text[], $15::bytea[], $16::integer[], $17::bigint[], $18::bigint[], \
      $19::integer[], $20::bigint[], $21::text[], $22::text[], $23::text[], $24::text[], \
      $25::boolean[], $26::text[], $27::bigint[]) AS d(target, account, event_id) \
      WHERE d.event_id IN (SELECT event_id FROM recorded) \
      RETURNING id, event_id, target) \
    SELECT event_id, NULL::bigint, NULL::text FROM recorded \
    UNION ALL SELECT event_id, id, target FROM delivered";

/// The records that the commits not recorded met, by event id (after the batch's COMMIT:
/// another relay's record, committed before it).
async fn records_met(
    client: &deadpool_postgres::Client,
    commits: &[&Commit],
    recorded: &std::collections::HashSet<String>,
) -> StoreResult<std::collections::HashMap<String, Recorded>> {
    let met: Vec<&str> = commits
        .iter()
        .map(|c| c.push.event_id.as_str())
        .filter(|id| !recorded.contains(*id))
        .collect();
    if met.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let rows = Cached(client)
        .query(
            "SELECT event_id, status, content_type, body, digest FROM wechat_relay_dedupe \
             WHERE event_id = ANY($1)",
            &[&met],
        )
        .await
        .map_err(io_error)?;
    Ok(rows
        .iter()
        .map(|row| {
            let recorded = record_from(row.get(1), row.get(2), row.get(3), row.get(4));
            (row.get(0), recorded)
        })
        .collect())
}

/// The parameters of [`WRITE`]: the records' columns, then the deliveries', one array each.
struct Written<'a> {
    event_id: Vec<&'a str>,
    committed: Vec<i64>,
    status: Vec<i32>,
    content_type: Vec<&'a str>,
    body: Vec<&'a [u8]>,
    digest: Vec<&'a [u8]>,
    /// The window's start of the batch's first commit: the commits of a batch are
    /// milliseconds apart, and the earliest start takes the most records for retries.
    since: i64,
    rows: Rows<'a>,
}

impl<'a> Written<'a> {
    fn new(commits: &[&'a Commit], owner: &'a str, lease_ms: u64) -> Self {
        let mut rows = Rows::default();
        for commit in commits {
            for delivery in &commit.deliveries {
                rows.add(commit, delivery, owner, lease_ms);
            }
        }
        Written {
            event_id: commits.iter().map(|c| c.push.event_id.as_str()).collect(),
            committed: commits.iter().map(|c| ms(c.now_ms)).collect(),
            status: commits.iter().map(|c| i32::from(c.answer.status)).collect(),
            content_type: commits
                .iter()
                .map(|c| c.answer.content_type.as_str())
                .collect(),
            body: commits.iter().map(|c| c.answer.body.as_ref()).collect(),
            digest: commits.iter().map(|c| c.digest.0.as_slice()).collect(),
            since: commits
                .iter()
                .map(|c| c.dedupe_since_ms)
                .min()
                .map_or(0, ms),
            rows,
        }
    }

    fn params(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        let rows = &self.rows;
        vec![
            &self.event_id,
            &self.committed,
            &self.status,
            &self.content_type,
            &self.body,
            &self.digest,
            &self.since,
            &rows.target,
            &rows.account,
            &rows.event_id,
            &rows.query,
            &rows.body,
            &rows.content_type,
            &rows.forwarded_for,
            &rows.xml,
            &rows.key_index,
            &rows.received_ms,
            &rows.enqueued_ms,
            &rows.attempts,
            &rows.at_ms,
            &rows.last_error,
            &rows.msg_type,
            &rows.event,
            &rows.route,
            &rows.dead,
            &rows.lease_owner,
            &rows.lease_until,
        ]
    }
}

/// The columns of the deliveries a batch writes, one array each.
#[derive(Default)]
struct Rows<'a> {
    target: Vec<&'a str>,
    account: Vec<&'a str>,
    event_id: Vec<&'a str>,
    query: Vec<&'a str>,
    body: Vec<&'a [u8]>,
    content_type: Vec<Option<&'a [u8]>>,
    forwarded_for: Vec<&'a str>,
    xml: Vec<Option<&'a [u8]>>,
    key_index: Vec<Option<i32>>,
    received_ms: Vec<i64>,
    enqueued_ms: Vec<i64>,
    attempts: Vec<i32>,
    at_ms: Vec<i64>,
    last_error: Vec<Option<&'a str>>,
    msg_type: Vec<Option<&'a str>>,
    event: Vec<Option<&'a str>>,
    route: Vec<&'a str>,
    dead: Vec<bool>,
    lease_owner: Vec<Option<&'a str>>,
    lease_until: Vec<Option<i64>>,
}

impl<'a> Rows<'a> {
    /// A pending delivery is this relay's (its worker has it in memory) until its lease runs
    /// out; a dead one is stamped with when it died.
    fn add(
        &mut self,
        commit: &'a Commit,
        delivery: &'a NewDelivery,
        owner: &'a str,
        lease_ms: u64,
    ) {
        let push = &commit.push;
        let (at_ms, lease_owner, lease_until) = if delivery.dead {
            (commit.now_ms, None, None)
        } else {
            (
                delivery.at_ms,
                Some(owner),
                Some(ms(commit.now_ms.saturating_add(lease_ms))),
            )
        };
        self.target.push(&delivery.target);
        self.account.push(&push.account);
        self.event_id.push(&push.event_id);
        self.query.push(&push.query);
        self.body.push(push.body.as_ref());
        self.content_type
            .push(push.content_type.as_ref().map(HeaderValue::as_bytes));
        self.forwarded_for.push(&push.forwarded_for);
        self.xml
            .push(push.encrypted().then(|| push.message.xml().as_ref()));
        self.key_index
            .push(push.key_index.and_then(|i| i32::try_from(i).ok()));
        self.received_ms
            .push(ms(super::sqlite::unix_ms(push.received_at)));
        self.enqueued_ms.push(ms(commit.now_ms));
        self.attempts.push(count(delivery.attempts));
        self.at_ms.push(ms(at_ms));
        self.last_error.push(delivery.last_error.as_deref());
        self.msg_type.push(push.message.msg_type());
        self.event.push(push.message.event());
        self.route.push(&commit.route);
        self.dead.push(delivery.dead);
        self.lease_owner.push(lease_owner);
        self.lease_until.push(lease_until);
    }
}

/// Evicts the oldest dedupe records the batch's budget lets go when the store (as last
/// measured) is at it: [`EVICT_PER_RECORD`] for each commit at its budget.
async fn make_room(
    client: &deadpool_postgres::Client,
    commits: &[&Commit],
    used: &AtomicU64,
) -> StoreResult<()> {
    let used = used.load(Ordering::Relaxed);
    let at_budget: Vec<&&Commit> = commits
        .iter()
        .filter(|c| c.budget.max_bytes != u64::MAX && used >= c.budget.max_bytes)
        .collect();
    let Some(before) = at_budget.iter().map(|c| c.budget.evict_before_ms).min() else {
        return Ok(());
    };
    let count = i64::try_from(at_budget.len())
        .unwrap_or(i64::MAX)
        .saturating_mul(EVICT_PER_RECORD);
    let evicted = client
        .execute(
            "DELETE FROM wechat_relay_dedupe WHERE event_id IN (SELECT event_id FROM \
             wechat_relay_dedupe WHERE committed_ms < $1 ORDER BY committed_ms LIMIT $2 \
             FOR UPDATE SKIP LOCKED)",
            &[&ms(before), &count],
        )
        .await
        .map_err(io_error)?;
    let now_ms = at_budget.iter().map(|c| c.now_ms).max().unwrap_or(0);
    super::store::evicted(evicted, now_ms);
    Ok(())
}

/// A dedupe record from its columns.
fn record_from(
    status: i32,
    content_type: String,
    body: Vec<u8>,
    digest: Option<Vec<u8>>,
) -> Recorded {
    Recorded {
        answer: CachedAnswer {
            status: u16::try_from(status).unwrap_or(500),
            content_type,
            body: Bytes::from(body),
        },
        digest: Digest::from_stored(digest),
    }
}

/// The size of the store's tables and their indexes.
async fn measure(pool: &Conns) -> StoreResult<u64> {
    bounded(async {
        let client = pool.get().await?;
        let row = client
            .query_one(
                // The relay's tables as the connection's search_path finds them (another
                // schema's tables of the same name are not counted).
                "SELECT (COALESCE(pg_total_relation_size(to_regclass('wechat_relay_dedupe')), 0) \
                 + COALESCE(pg_total_relation_size(to_regclass('wechat_relay_deliveries')), 0))::bigint",
                &[],
            )
            .await
            .map_err(io_error)?;
        Ok(unsigned(row.get(0)))
    })
    .await
}

async fn measure_loop(pool: Conns, used: Arc<AtomicU64>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(MEASURE_EVERY) => {}
        }
        if let Ok(bytes) = measure(&pool).await {
            used.store(bytes, Ordering::Relaxed);
        }
    }
}

/// Renews the leases this relay holds (the deliveries it committed or took, until it settles
/// them) three times per lease, so that another relay takes none while this one lives.
async fn renew_loop(pool: Conns, owner: Arc<str>, lease_ms: u64, stop: CancellationToken) {
    let every = Duration::from_millis((lease_ms / 3).max(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let until = ms(super::now_ms().saturating_add(lease_ms));
        let renewed = bounded(async {
            let client = pool.get().await?;
            client
                .execute(
                    "UPDATE wechat_relay_deliveries SET lease_until_ms = $2 \
                     WHERE lease_owner = $1 AND NOT dead",
                    &[&&*owner, &until],
                )
                .await
                .map_err(io_error)
        })
        .await;
        if let Err(e) = renewed {
            tracing::warn!(error = %e, "cannot renew the leases of this relay's deliveries");
        }
    }
}

// ---- wake-ups -----------------------------------------------------------------------------

/// Listens on [`WAKE_CHANNEL`] on a connection of its own (the pool's connections drop what
/// the server sends unasked) and passes each wake-up on, until `stop`. Lost, the connection is
/// made again after [`LISTEN_AGAIN`], and every worker then looks at the store once, for what
/// was sent meanwhile; until then the workers' idle poll (every second) finds it.
async fn listen_loop(
    database: Database,
    wakeups: tokio::sync::broadcast::Sender<Option<Arc<str>>>,
    stop: CancellationToken,
) {
    loop {
        let listened = tokio::select! {
            () = stop.cancelled() => return,
            listened = listen(&database, &wakeups) => listened,
        };
        if let Err(e) = listened {
            tracing::debug!(error = %e, "not listening for wake-ups; connecting again");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LISTEN_AGAIN) => {}
        }
    }
}

async fn listen(
    database: &Database,
    wakeups: &tokio::sync::broadcast::Sender<Option<Arc<str>>>,
) -> Result<(), String> {
    let tls = tls(database).map_err(|e| e.to_string())?;
    let (client, mut connection) = client_config(database)
        .connect(tls)
        .await
        .map_err(|e| e.to_string())?;
    let listen = format!("LISTEN {WAKE_CHANNEL}");
    let mut asked = std::pin::pin!(client.batch_execute(&listen));
    let mut listening = false;
    loop {
        tokio::select! {
            listened = &mut asked, if !listening => {
                listened.map_err(|e| e.to_string())?;
                listening = true;
                // What was sent while this relay was not listening.
                let _ = wakeups.send(None);
            }
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(wakeup))) => {
                    crate::metrics::store_wakeup();
                    let target = wakeup.payload();
                    let _ = wakeups.send((target != "*").then(|| target.into()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the database closed the connection".into()),
            },
        }
    }
}

// ---- batches of small writes ------------------------------------------------------------

/// A write that many pushes or attempts make at once, done for all that are waiting in one
/// statement on a connection of its own, one batch at a time (what waits meanwhile makes the
/// next batch): one round trip, and one WAL flush, for the batch.
trait Batch: Send + Sync + 'static {
    type Item: Send + Sync + 'static;
    type Out: Send + 'static;
    /// One result per item, in order.
    fn write<'a>(
        &'a self,
        client: Cached<'a>,
        items: &'a [Self::Item],
    ) -> BoxFuture<'a, Result<Vec<Self::Out>, tokio_postgres::Error>>;
}

type Waiting<B> = (
    <B as Batch>::Item,
    oneshot::Sender<StoreResult<<B as Batch>::Out>>,
);

struct Queue<B: Batch> {
    jobs: mpsc::Sender<Waiting<B>>,
}

impl<B: Batch> Queue<B> {
    fn spawn(pool: Conns, batch: B) -> Self {
        let (jobs, waiting) = mpsc::channel(MAX_WAITING);
        tokio::spawn(Self::run(pool, batch, waiting));
        Queue { jobs }
    }

    async fn run(pool: Conns, batch: B, mut waiting: mpsc::Receiver<Waiting<B>>) {
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        while waiting.recv_many(&mut jobs, MAX_BATCH).await > 0 {
            let (items, answers): (Vec<_>, Vec<_>) = jobs.drain(..).unzip();
            let written = bounded(async {
                let client = pool.get().await?;
                let out = batch
                    .write(Cached(&client), &items)
                    .await
                    .map_err(io_error)?;
                if out.len() == items.len() {
                    Ok(out)
                } else {
                    Err(StoreError::Io(format!(
                        "the database answered {} of a batch of {}",
                        out.len(),
                        items.len()
                    )))
                }
            })
            .await;
            match written {
                Ok(out) => {
                    for (answer, out) in answers.into_iter().zip(out) {
                        let _ = answer.send(Ok(out));
                    }
                }
                Err(e) => {
                    for answer in answers {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    async fn call(&self, item: B::Item) -> StoreResult<B::Out> {
        let (done, answer) = oneshot::channel();
        self.jobs.try_send((item, done)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                StoreError::Io(format!("{MAX_WAITING} writes are waiting for the database"))
            }
            mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
        })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Claims of pushes about to ask their reply target, with each push's dedupe record. Their
/// connection commits without waiting for the WAL flush ([`unflushed_pool`]): a claim is
/// visible to every relay at COMMIT, and one lost with the database server's last fraction of
/// a second (a crash of the server, not of a relay) lets a WeChat retry on another relay ask
/// the reply target once more, as a relay that died would. Nothing acknowledged rests on it.
struct Claims {
    owner: Arc<str>,
}

impl Batch for Claims {
    type Item = (String, ClaimTimes);
    type Out = ClaimOutcome;

    fn write<'a>(
        &'a self,
        client: Cached<'a>,
        items: &'a [Self::Item],
    ) -> BoxFuture<'a, Result<Vec<ClaimOutcome>, tokio_postgres::Error>> {
        Box::pin(async move {
            // Each event id once, in order: two relays' batches that share ids lock them in
            // the same order, so they wait for each other rather than deadlock.
            let mut asked: Vec<(&str, &ClaimTimes)> = items
                .iter()
                .map(|(id, times)| (id.as_str(), times))
                .collect();
            asked.sort_unstable_by(|a, b| a.0.cmp(b.0));
            asked.dedup_by(|a, b| a.0 == b.0);
            let event_ids: Vec<&str> = asked.iter().map(|(id, _)| *id).collect();
            let until: Vec<i64> = asked.iter().map(|(_, t)| ms(t.until_ms)).collect();
            let since: Vec<i64> = asked.iter().map(|(_, t)| ms(t.since_ms)).collect();
            // The batch's earliest now: a claim that runs out within it waits for the next.
            let now = asked.iter().map(|(_, t)| t.now_ms).min().map_or(0, ms);
            // Taken when free, run out, or this relay's own already; and the record, in the
            // same statement (LATERAL: a lookup by key per claim, never a scan of the table,
            // which a join with unnest's unknown row count can plan).
            let rows = client
                .query(
                    "WITH claimed AS (INSERT INTO wechat_relay_claims (event_id, owner, until_ms) \
                     SELECT a.event_id, $3, a.until_ms FROM unnest($1::text[], $2::bigint[]) \
                     AS a(event_id, until_ms) \
                     ON CONFLICT (event_id) DO UPDATE SET \
                     owner = EXCLUDED.owner, until_ms = EXCLUDED.until_ms \
                     WHERE wechat_relay_claims.until_ms <= $4 \
                     OR wechat_relay_claims.owner = EXCLUDED.owner RETURNING event_id) \
                     SELECT a.event_id, a.event_id IN (SELECT event_id FROM claimed), \
                     d.status, d.content_type, d.body, d.digest \
                     FROM unnest($1::text[], $5::bigint[]) AS a(event_id, since_ms) \
                     LEFT JOIN LATERAL (SELECT * FROM wechat_relay_dedupe r \
                       WHERE r.event_id = a.event_id AND r.committed_ms >= a.since_ms) d ON true",
                    &[&event_ids, &until, &&*self.owner, &now, &since],
                )
                .await?;
            let mut found = std::collections::HashMap::with_capacity(rows.len());
            for row in &rows {
                let recorded = row
                    .get::<_, Option<i32>>(2)
                    .map(|status| record_from(status, row.get(3), row.get(4), row.get(5)));
                let outcome = ClaimOutcome {
                    held: row.get(1),
                    recorded,
                };
                found.insert(row.get::<_, String>(0), outcome);
            }
            // An item the answer lacks makes the batch's length wrong, which fails it.
            Ok(items
                .iter()
                .filter_map(|(id, _)| found.get(id).cloned())
                .collect())
        })
    }
}

/// Deliveries delivered, deleted, and flushed before the worker frees the attempt's slot (its
/// outcome is recorded): a crash of the database server after it does not send it again.
struct Delivered;

impl Batch for Delivered {
    type Item = DeliveryId;
    type Out = ();

    fn write<'a>(
        &'a self,
        client: Cached<'a>,
        items: &'a [DeliveryId],
    ) -> BoxFuture<'a, Result<Vec<()>, tokio_postgres::Error>> {
        Box::pin(async move {
            client
                .execute(
                    "DELETE FROM wechat_relay_deliveries WHERE id = ANY($1)",
                    &[&items],
                )
                .await?;
            Ok(vec![(); items.len()])
        })
    }
}

// ---- the trait ---------------------------------------------------------------------------

impl Store for PgStore {
    fn commit(&self, commit: Commit) -> BoxFuture<'_, StoreResult<Committed>> {
        Box::pin(async move {
            let (done, answer) = oneshot::channel();
            self.writer
                .try_send(Job { commit, done })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => StoreError::Io(format!(
                        "{MAX_WAITING} commits are waiting for the database"
                    )),
                    mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
                })?;
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn wakeups(&self) -> Option<tokio::sync::broadcast::Receiver<Option<Arc<str>>>> {
        Some(self.wakeups.subscribe())
    }

    fn claim(&self, event_id: &str, times: ClaimTimes) -> BoxFuture<'_, StoreResult<ClaimOutcome>> {
        let event_id = event_id.to_owned();
        Box::pin(self.claims.call((event_id, times)))
    }

    fn release(&self, event_id: &str) -> BoxFuture<'_, StoreResult<()>> {
        let event_id = event_id.to_owned();
        let owner = Arc::clone(&self.owner);
        self.with(move |client| {
            Box::pin(async move {
                client
                    .execute(
                        "DELETE FROM wechat_relay_claims WHERE event_id = $1 AND owner = $2",
                        &[&event_id, &&*owner],
                    )
                    .await?;
                Ok(())
            })
        })
    }

    fn answer(
        &self,
        event_id: &str,
        since_ms: u64,
    ) -> BoxFuture<'_, StoreResult<Option<Recorded>>> {
        let event_id = event_id.to_owned();
        self.with(move |client| {
            Box::pin(async move {
                let row = client
                    .query_opt(
                        "SELECT status, content_type, body, digest FROM wechat_relay_dedupe \
                         WHERE event_id = $1 AND committed_ms >= $2",
                        &[&event_id, &ms(since_ms)],
                    )
                    .await?;
                Ok(row.map(|row| record_from(row.get(0), row.get(1), row.get(2), row.get(3))))
            })
        })
    }

    fn recent(&self, since_ms: u64) -> BoxFuture<'_, StoreResult<Vec<RecentId>>> {
        self.with(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT event_id, digest, committed_ms FROM wechat_relay_dedupe \
                         WHERE committed_ms >= $1 ORDER BY committed_ms",
                        &[&ms(since_ms)],
                    )
                    .await?;
                Ok(rows
                    .iter()
                    .map(|row| RecentId {
                        event_id: row.get(0),
                        digest: Digest::from_stored(row.get(1)),
                        committed_ms: unsigned(row.get(2)),
                    })
                    .collect())
            })
        })
    }

    fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn probe(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            bounded(async {
                let mut client = self.pool.get().await?;
                // A write that is undone: fails when the database takes none (read-only, full).
                let tx = client.transaction().await.map_err(io_error)?;
                tx.execute(
                    "INSERT INTO wechat_relay_probe (id, data) VALUES (1, $1) \
                     ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data",
                    &[&vec![0u8; 1024]],
                )
                .await
                .map_err(io_error)?;
                tx.rollback().await.map_err(io_error)
            })
            .await
        })
    }

    fn due(
        &self,
        target: &str,
        now_ms: u64,
        limit: usize,
        skip: Vec<DeliveryId>,
    ) -> BoxFuture<'_, StoreResult<Vec<Delivery>>> {
        let target = target.to_owned();
        let owner = Arc::clone(&self.owner);
        let until = ms(now_ms.saturating_add(self.lease_ms));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |client| {
            Box::pin(async move {
                // Due, and not leased by a live relay: a lease of this relay's own (one it
                // committed) is its to take; another's counts until it runs out.
                // The lease each had, to count those taken over from another relay.
                let rows = client
                    .query(
                        &format!(
                            "WITH taken AS (SELECT id, lease_owner AS was FROM wechat_relay_deliveries \
                               WHERE target = $1 AND NOT dead AND at_ms <= $2 \
                               AND (lease_until_ms IS NULL OR lease_until_ms <= $2 OR lease_owner = $5) \
                               AND NOT (id = ANY($4)) \
                               ORDER BY at_ms, id LIMIT $3 FOR UPDATE SKIP LOCKED) \
                             UPDATE wechat_relay_deliveries d SET lease_owner = $5, lease_until_ms = $6 \
                             FROM taken WHERE d.id = taken.id \
                             RETURNING {}, d.at_ms, taken.was",
                            qualified(DELIVERY_COLUMNS, "d")
                        ),
                        &[&target, &ms(now_ms), &limit, &skip, &&*owner, &until],
                    )
                    .await?;
                let taken_over = rows
                    .iter()
                    .filter(|row| {
                        row.get::<_, Option<String>>(14)
                            .is_some_and(|was| was != *owner)
                    })
                    .count();
                if taken_over > 0 {
                    crate::metrics::lease_takeovers(taken_over as u64);
                    tracing::info!(target = %target, deliveries = taken_over,
                        "took over deliveries whose relay's lease ran out");
                }
                let mut due: Vec<(i64, Delivery)> = rows
                    .iter()
                    .map(|row| (row.get::<_, i64>(13), delivery_from_row(row)))
                    .collect();
                due.sort_by_key(|(at, d)| (*at, d.id));
                Ok(due.into_iter().map(|(_, d)| d).collect())
            })
        })
    }

    fn next_due(&self, target: &str, now_ms: u64) -> BoxFuture<'_, StoreResult<Option<u64>>> {
        let target = target.to_owned();
        let owner = Arc::clone(&self.owner);
        self.with(move |client| {
            Box::pin(async move {
                // The next due, or the next lease of another relay to run out on one due.
                let row = client
                    .query_one(
                        "SELECT LEAST( \
                           (SELECT min(at_ms) FROM wechat_relay_deliveries \
                             WHERE target = $1 AND NOT dead AND at_ms > $2), \
                           (SELECT min(lease_until_ms) FROM wechat_relay_deliveries \
                             WHERE target = $1 AND NOT dead AND at_ms <= $2 \
                             AND lease_until_ms > $2 AND lease_owner <> $3))",
                        &[&target, &ms(now_ms), &&*owner],
                    )
                    .await?;
                Ok(row.get::<_, Option<i64>>(0).map(unsigned))
            })
        })
    }

    fn settle(
        &self,
        id: DeliveryId,
        settle: Settle,
        now_ms: u64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        // Released when not delivered: due again at `at_ms` (or dead), for whichever relay
        // takes it then.
        let (attempts, at_ms, dead, error) = match settle {
            Settle::Delivered => return Box::pin(self.delivered.call(id)),
            Settle::Retry {
                attempts,
                at_ms,
                error,
            } => (attempts, at_ms, false, error),
            Settle::Dead { attempts, error } => (attempts, now_ms, true, error),
        };
        self.with(move |client| {
            Box::pin(async move {
                client
                    .execute(
                        "UPDATE wechat_relay_deliveries SET attempts = $2, at_ms = $3, \
                         last_error = $4, dead = $5, lease_owner = NULL, lease_until_ms = NULL \
                         WHERE id = $1",
                        &[&id, &count(attempts), &ms(at_ms), &error, &dead],
                    )
                    .await?;
                Ok(())
            })
        })
    }

    fn expire_dedupe(&self, before_ms: u64) -> BoxFuture<'_, StoreResult<u64>> {
        self.with(move |client| {
            Box::pin(async move {
                // Claims run out within seconds: those past are gone with the expired records.
                client
                    .execute(
                        "DELETE FROM wechat_relay_claims WHERE until_ms < $1",
                        &[&ms(super::now_ms())],
                    )
                    .await?;
                client
                    .execute(
                        "DELETE FROM wechat_relay_dedupe WHERE committed_ms < $1",
                        &[&ms(before_ms)],
                    )
                    .await
            })
        })
    }

    fn stats(&self) -> BoxFuture<'_, StoreResult<Stats>> {
        self.with(|client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT target, count(*) FILTER (WHERE NOT dead), \
                         count(*) FILTER (WHERE dead), min(enqueued_ms) FILTER (WHERE NOT dead) \
                         FROM wechat_relay_deliveries GROUP BY target ORDER BY target",
                        &[],
                    )
                    .await?;
                let targets = rows
                    .iter()
                    .map(|row| TargetStats {
                        target: row.get(0),
                        pending: unsigned(row.get(1)),
                        dead: unsigned(row.get(2)),
                        oldest_pending_ms: row.get::<_, Option<i64>>(3).map(unsigned),
                    })
                    .collect();
                let keys = client
                    .query_one("SELECT count(*) FROM wechat_relay_dedupe", &[])
                    .await?;
                Ok(Stats {
                    targets,
                    dedupe_keys: unsigned(keys.get(0)),
                })
            })
        })
    }

    fn list(&self, filter: Filter) -> BoxFuture<'_, StoreResult<Vec<DeliveryInfo>>> {
        self.with(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {INFO_COLUMNS} FROM wechat_relay_deliveries \
                             WHERE dead = $1 AND ($2::text IS NULL OR target = $2) ORDER BY id"
                        ),
                        &[&filter.dead, &filter.target],
                    )
                    .await?;
                Ok(rows.iter().map(info_from_row).collect())
            })
        })
    }

    fn get(&self, id: DeliveryId) -> BoxFuture<'_, StoreResult<Option<StoredDelivery>>> {
        self.with(move |client| {
            Box::pin(async move {
                let row = client
                    .query_opt(
                        &format!(
                            "SELECT {INFO_COLUMNS}, {DELIVERY_COLUMNS} FROM wechat_relay_deliveries \
                             WHERE id = $1"
                        ),
                        &[&id],
                    )
                    .await?;
                Ok(row.map(|row| {
                    let info = info_from_row(&row);
                    let dead = row.get::<_, bool>(11);
                    let push = push_from_row(&row, 12);
                    StoredDelivery { info, dead, push }
                }))
            })
        })
    }

    fn replay(&self, selection: Selection, now_ms: u64) -> BoxFuture<'_, StoreResult<u64>> {
        self.with(move |client| {
            Box::pin(async move {
                let (id, target, dead) = selected(&selection);
                // Back in line, due now, with a fresh attempt count and age, leased by nobody;
                // and every relay's worker of each target replayed wakes at the COMMIT.
                let row = client
                    .query_one(
                        &format!(
                            "WITH replayed AS (UPDATE wechat_relay_deliveries SET attempts = 0, \
                             enqueued_ms = $4, at_ms = $4, last_error = NULL, dead = false, \
                             lease_owner = NULL, lease_until_ms = NULL WHERE {SELECTED} \
                             RETURNING target), \
                             woken AS (SELECT pg_notify('{WAKE_CHANNEL}', target) \
                             FROM (SELECT DISTINCT target FROM replayed) t) \
                             SELECT (SELECT count(*) FROM replayed), (SELECT count(*) FROM woken)"
                        ),
                        &[&id, &target, &dead, &ms(now_ms)],
                    )
                    .await?;
                Ok(unsigned(row.get(0)))
            })
        })
    }

    fn discard(&self, selection: Selection) -> BoxFuture<'_, StoreResult<u64>> {
        self.with(move |client| {
            Box::pin(async move {
                let (id, target, _) = selected(&selection);
                if matches!(selection, Selection::Dead { .. }) {
                    return Ok(0);
                }
                // Pending ones only: dead letters go with purge.
                client
                    .execute(
                        &format!("DELETE FROM wechat_relay_deliveries WHERE {SELECTED}"),
                        &[&id, &target, &Some(false)],
                    )
                    .await
            })
        })
    }

    fn purge_dead(
        &self,
        before_ms: Option<u64>,
        target: Option<String>,
    ) -> BoxFuture<'_, StoreResult<u64>> {
        self.with(move |client| {
            Box::pin(async move {
                client
                    .execute(
                        "DELETE FROM wechat_relay_deliveries WHERE dead \
                         AND ($1::bigint IS NULL OR at_ms < $1) AND ($2::text IS NULL OR target = $2)",
                        &[&before_ms.map(ms), &target],
                    )
                    .await
            })
        })
    }
}

/// A selection as the id, target and dead-or-pending of [`SELECTED`].
fn selected(selection: &Selection) -> (Option<DeliveryId>, Option<String>, Option<bool>) {
    match selection {
        Selection::Id(id) => (Some(*id), None, None),
        Selection::Pending { target } => (None, target.clone(), Some(false)),
        Selection::Dead { target } => (None, target.clone(), Some(true)),
    }
}

// ---- rows --------------------------------------------------------------------------------

/// A delivery from the [`DELIVERY_COLUMNS`] at the start of `row`.
fn delivery_from_row(row: &Row) -> Delivery {
    Delivery {
        id: row.get(0),
        target: row.get(1),
        push: push_from_row(row, 0),
        attempts: u32::try_from(row.get::<_, i32>(12)).unwrap_or(0),
        enqueued_ms: unsigned(row.get(11)),
    }
}

/// The push of the [`DELIVERY_COLUMNS`] starting at column `at`.
fn push_from_row(row: &Row, at: usize) -> Result<Arc<Push>, String> {
    let received_ms = unsigned(row.get(at + 10));
    stored_push(
        row.get(at + 2),
        row.get(at + 3),
        row.get(at + 4),
        Bytes::from(row.get::<_, Vec<u8>>(at + 5)),
        row.get::<_, Option<Vec<u8>>>(at + 6).as_deref(),
        row.get(at + 7),
        row.get::<_, Option<Vec<u8>>>(at + 8).map(Bytes::from),
        row.get::<_, Option<i32>>(at + 9)
            .and_then(|i| usize::try_from(i).ok()),
        UNIX_EPOCH + Duration::from_millis(received_ms),
    )
}

/// A delivery as `outbox list` shows it, from the [`INFO_COLUMNS`].
fn info_from_row(row: &Row) -> DeliveryInfo {
    DeliveryInfo {
        id: row.get(0),
        target: row.get(1),
        account: row.get(2),
        event_id: row.get(3),
        attempts: u32::try_from(row.get::<_, i32>(4)).unwrap_or(0),
        last_error: row.get(5),
        enqueued_ms: unsigned(row.get(6)),
        at_ms: unsigned(row.get(7)),
        msg_type: row.get(8),
        event: row.get(9),
        route: row.get(10),
    }
}

/// `columns` (`a, b`) as columns of table `alias` (`d.a, d.b`).
fn qualified(columns: &str, alias: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn count(attempts: u32) -> i32 {
    i32::try_from(attempts).unwrap_or(i32::MAX)
}

/// A database error as one line: its SQLSTATE and message when the server sent one, never the
/// statement's parameters.
fn io_error(e: tokio_postgres::Error) -> StoreError {
    crate::metrics::store_error();
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::DISK_FULL => {
            StoreError::Io(format!("the database is out of disk: {}", db.message()))
        }
        Some(db) => StoreError::Io(format!(
            "database error {}: {}",
            db.code().code(),
            db.message()
        )),
        None => StoreError::Io(format!("database: {e}")),
    }
}
