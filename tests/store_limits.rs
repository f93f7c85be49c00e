//! The store is bounded (issue #8): past `[store] max_bytes` a push that needs a delivery is
//! answered 503 and `/readyz` says not ready, until deliveries drain; dead letters older than
//! `dead_letter_retention_s` are purged in the background; a `Retry-After` too large for any
//! clock makes a dead letter, not a fast retry; dedupe records past the budget are evicted,
//! oldest first (issue #9). On both backends.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use wechat_relay::outbox::memory::MemoryStore;
use wechat_relay::outbox::sqlite::{Role, SqliteStore};
use wechat_relay::outbox::store::{DeliveryInfo, Filter, Store};

/// Fast retries, so that a target that comes back is drained within a second or two; and
/// enough attempts that its deliveries stay pending meanwhile.
const FAST_RETRY: &str = "retry_initial_ms = 50\nretry_max_ms = 100\nmax_attempts = 1000\n";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Memory,
}

/// A safe-mode account routing everything to target `t` at `url`; `[store]` with `store_keys`,
/// and `path` for SQLite.
fn config(backend: Backend, dir: &Path, url: &str, store_keys: &str, extra: &str) -> String {
    let mut toml = server_section(2000, 300);
    toml.push_str(extra);
    toml.push_str("[store]\n");
    if let Backend::Sqlite = backend {
        toml.push_str(&format!("path = \"{}\"\n", dir.join("store").display()));
    }
    toml.push_str(store_keys);
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section("t", url, "raw", FAST_RETRY));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    toml
}

async fn push(url: &str, msg_id: u64) -> Answer {
    let (query, body) =
        PushBuilder::new(text_xml("a push for a target that is down", msg_id)).safe();
    post(&format!("{url}/wechat?{query}"), body).await
}

/// A port nobody listens on (connection refused) for a target that is down, until the test
/// starts it there. Below the ephemeral range, so that no other test's listener is given it
/// meanwhile (a freed ephemeral port can be, and then the "down" target answers), and one per
/// backend, since both tests run at once: 9 (discard) and 13 (daytime), unused here.
fn down_addr(backend: Backend) -> std::net::SocketAddr {
    let port = match backend {
        Backend::Sqlite => 9,
        Backend::Memory => 13,
    };
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// Asserts that `relay` logged lines containing `text`, at most one a second over `during`.
fn logged_once_a_second(relay: &Binary, text: &str, during: Duration) {
    let lines = relay
        .drain_lines()
        .into_iter()
        .filter(|l| l.contains(text))
        .count() as u64;
    assert!(
        (1..=during.as_secs() + 2).contains(&lines),
        "{lines} lines of {text:?} in {during:?}"
    );
}

/// The pending deliveries of target `t`, as `/metrics` reads them from the store.
async fn pending(admin: &str) -> f64 {
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    metric(&metrics, "wechat_relay_outbox_pending", &[("target", "t")]).expect("pending gauge")
}

async fn over_budget(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = down_addr(backend);
    let toml = config(
        backend,
        dir.path(),
        &format!("http://{addr}/t"),
        "max_bytes = 1048576\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    let base = relay.url("");
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status, 200);

    // A flood of valid pushes for a target that is down: taken until the budget is reached.
    let flood = Instant::now();
    let mut taken = 0u64;
    let mut msg_id = 0;
    loop {
        msg_id += 1;
        let answer = push(&base, msg_id).await;
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert_success(&answer);
        taken += 1;
        assert!(taken < 5000, "1 MiB holds far fewer than 5000 pushes");
    }
    assert!(
        taken > 100,
        "{backend:?}: only {taken} pushes before the budget"
    );
    // Past it the store stops growing: every push needing a delivery is refused.
    assert_eq!(pending(&admin).await, taken as f64);
    for _ in 0..100 {
        msg_id += 1;
        assert_eq!(push(&base, msg_id).await.status, 503, "{backend:?}");
    }
    assert_eq!(
        pending(&admin).await,
        taken as f64,
        "nothing more was written"
    );
    let flood = flood.elapsed();
    let ready = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("over its budget"), "{}", ready.text());
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    assert_eq!(
        metric(&metrics, "wechat_relay_store_full_total", &[]),
        Some(101.0),
        "{backend:?}: every refusal is counted"
    );
    // ...but logged at most once a second.
    logged_once_a_second(&relay, "store over budget", flood);

    // The target comes back: deliveries drain, and the relay is ready and takes pushes again.
    let _target = FakeTarget::on(addr, Behaviour::default()).await;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = get(&format!("http://{admin}/readyz")).await;
        if ready.status == 200 {
            break;
        }
        assert!(Instant::now() < until, "still not ready: {}", ready.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_success(&push(&base, msg_id + 1).await);
}

#[tokio::test]
async fn a_sqlite_store_over_its_budget_refuses_pushes_and_is_not_ready_until_it_drains() {
    over_budget(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_memory_store_over_its_budget_refuses_pushes_and_is_not_ready_until_it_drains() {
    over_budget(Backend::Memory).await;
}

/// The store `backend` on `dir`, opened as the server opens it.
fn open(backend: Backend, dir: &Path) -> Arc<dyn Store> {
    match backend {
        Backend::Sqlite => {
            Arc::new(SqliteStore::open(&dir.join("store"), Role::Server).expect("open"))
        }
        Backend::Memory => Arc::new(MemoryStore::new()),
    }
}

async fn dead_letters(store: &Arc<dyn Store>) -> Vec<DeliveryInfo> {
    let dead = Filter {
        dead: true,
        target: None,
    };
    store.list(dead).await.expect("list")
}

async fn purged_after_retention(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = FakeTarget::with(Behaviour {
        status: StatusCode::NOT_FOUND,
        ..Behaviour::default()
    })
    .await;
    let toml = config(
        backend,
        dir.path(),
        &target.url("/t"),
        "dead_letter_retention_s = 1\n",
        "",
    );
    let store = open(backend, dir.path());
    let relay = TestRelay::start_with(&toml, Some(Arc::clone(&store))).await;
    assert_success(&push(&relay.url(""), 1).await);
    assert_eq!(target.next().await.answered, 404);
    // A 404 is final: a dead letter at once.
    let until = Instant::now() + Duration::from_secs(5);
    while dead_letters(&store).await.is_empty() {
        assert!(Instant::now() < until, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Older than the retention (1 s) at the next upkeep (every second with it): gone.
    let until = Instant::now() + Duration::from_secs(5);
    while !dead_letters(&store).await.is_empty() {
        assert!(
            Instant::now() < until,
            "{backend:?}: the dead letter is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn sqlite_dead_letters_older_than_the_retention_are_purged() {
    purged_after_retention(Backend::Sqlite).await;
}

#[tokio::test]
async fn memory_dead_letters_older_than_the_retention_are_purged() {
    purged_after_retention(Backend::Memory).await;
}

#[tokio::test]
async fn a_retry_after_beyond_any_clock_makes_a_dead_letter_not_a_fast_retry() {
    // 2^64 seconds, and a number of seconds whose milliseconds wrap a u64 around to 0.39 s.
    for after in ["18446744073709551616", "18446744073709552"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut target = FakeTarget::with(Behaviour {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: Some(after),
            ..Behaviour::default()
        })
        .await;
        let toml = config(Backend::Sqlite, dir.path(), &target.url("/t"), "", "");
        let store = open(Backend::Sqlite, dir.path());
        let relay = TestRelay::start_with(&toml, Some(Arc::clone(&store))).await;
        assert_success(&push(&relay.url(""), 1).await);
        assert_eq!(target.next().await.answered, 503);
        // With FAST_RETRY a delivery that is retried is attempted again within 100 ms.
        target.expect_none(Duration::from_millis(1500)).await;
        let dead = dead_letters(&store).await;
        assert_eq!(dead.len(), 1, "Retry-After {after}: a dead letter");
        let error = dead[0].last_error.clone().unwrap_or_default();
        assert!(error.contains("max_age_s"), "Retry-After {after}: {error}");
        relay.stop().await;
    }
}

/// Sends pushes `from..to`, 32 at a time, each answered `success`; returns the last one's
/// query and body (to send again as a WeChat retry).
async fn flood(base: &str, from: u64, to: u64) -> (String, String) {
    let mut last = (String::new(), String::new());
    let mut msg_id = from;
    while msg_id < to {
        let mut sends = tokio::task::JoinSet::new();
        for id in msg_id..to.min(msg_id + 32) {
            let (query, body) =
                PushBuilder::new(text_xml("a scan on a campaign QR code", id)).safe();
            last = (query.clone(), body.clone());
            let url = format!("{base}/wechat?{query}");
            sends.spawn(async move { post(&url, body).await });
        }
        msg_id = to.min(msg_id + 32);
        while let Some(answer) = sends.join_next().await {
            assert_success(&answer.expect("push task"));
        }
    }
    last
}

/// What `/metrics` says of `name` (0 when it is not there yet).
async fn gauge(admin: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    metric(&metrics, name, labels).unwrap_or(0.0)
}

const MAX_BYTES: f64 = 1_048_576.0;

/// Pushes that leave nothing pending (the route's only target is its reply target, which
/// takes each) write only dedupe records: past `max_bytes` the oldest of them are evicted,
/// so the store stays near its budget, the evictions are counted and logged at most once a
/// second, and a retry of a recent push is still answered from its record.
async fn dedupe_records_are_bounded(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = FakeTarget::start().await;
    let mut toml = config(
        backend,
        dir.path(),
        &target.url("/t"),
        "max_bytes = 1048576\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    toml.push_str("reply = \"t\"\n");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    let base = relay.url("");
    let used = || gauge(&admin, "wechat_relay_store_used_bytes", &[]);

    // Up to the budget (a store at it holds a little less: what the next record needs is
    // made room for).
    let mut filled = 1;
    while used().await < 0.9 * MAX_BYTES {
        flood(&base, filled, filled + 256).await;
        filled += 256;
        assert!(
            filled < 100_000,
            "{backend:?}: 1 MiB holds far fewer records"
        );
    }
    let evicted = || gauge(&admin, "wechat_relay_dedupe_evicted_total", &[]);
    // Past the minimum age the records may go: as many pushes again, and the store stays
    // near its budget, the oldest records making room.
    let age = Duration::from_millis(wechat_relay::outbox::store::MIN_RECORD_AGE_MS);
    tokio::time::sleep(age + Duration::from_millis(500)).await;
    let flooded = Instant::now();
    let (query, body) = flood(&base, filled, 2 * filled).await;
    let flooded = flooded.elapsed();
    let held = used().await;
    assert!(
        held <= 1.1 * MAX_BYTES,
        "{backend:?}: {held} bytes after twice the pushes that fill 1 MiB"
    );
    let evicted = evicted().await;
    let records = gauge(&admin, "wechat_relay_dedupe_records", &[]).await;
    assert!(
        evicted >= filled as f64 / 2.0,
        "{backend:?}: {evicted} of {filled} evicted"
    );
    assert_eq!(
        records + evicted,
        (2 * filled - 1) as f64,
        "{backend:?}: every record counted"
    );
    // ...said in the log at most once a second.
    logged_once_a_second(&relay, "dedupe records evicted", flooded);

    // A WeChat retry of the last push: answered from its record.
    let hits = || {
        gauge(
            &admin,
            "wechat_relay_dedupe_hits_total",
            &[("account", "main")],
        )
    };
    assert_eq!(hits().await, 0.0);
    assert_success(&post(&format!("{base}/wechat?{query}"), body).await);
    assert_eq!(
        hits().await,
        1.0,
        "{backend:?}: the retry is answered from its record"
    );
}

#[tokio::test]
async fn sqlite_dedupe_records_past_the_budget_are_evicted_oldest_first() {
    dedupe_records_are_bounded(Backend::Sqlite).await;
}

#[tokio::test]
async fn memory_dedupe_records_past_the_budget_are_evicted_oldest_first() {
    dedupe_records_are_bounded(Backend::Memory).await;
}
