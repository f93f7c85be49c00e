//! The store is bounded (issue #8): past `[store] max_bytes` a push that needs a delivery is
//! answered 503 and `/readyz` says not ready, until deliveries drain; dead letters older than
//! `dead_letter_retention_s` are purged in the background; a `Retry-After` too large for any
//! clock makes a dead letter, not a fast retry. On both backends.

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
    let lines = relay
        .drain_lines()
        .into_iter()
        .filter(|l| l.contains("store over budget"))
        .count() as u64;
    assert!(
        (1..=flood.as_secs() + 2).contains(&lines),
        "{lines} lines in {flood:?}"
    );

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
