//! The PostgreSQL store (`[store] url`) on a real PostgreSQL server (tests/common/postgres.rs):
//! `check` and `serve` set up and read the schema, two relays share dedupe and the outbox, a
//! relay refuses a newer schema, an unreachable database and a wrong password, and the
//! `outbox` commands read the shared store. The tests that stop, freeze or restart the server take a cluster of
//! their own (`Postgres::start_own`); the others run on the server of
//! `WECHAT_RELAY_TEST_POSTGRES` when it is set.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::{
    Binary, FakeTarget, PushBuilder, account_section, assert_success, cli, post, target_section,
    text_xml,
};
use wechat_relay::wechat::sender::{PushContent, message_xml};

/// A relay config on database `db` of `pg`: a plaintext account, target `t` (the reply
/// target of the catch-all) at `target`, leases of `lease_ms`.
fn write_config(dir: &Path, pg: &Postgres, db: &str, target: &str, lease_ms: u64) -> PathBuf {
    write_config_with(dir, pg, db, target, lease_ms, "reply = \"t\"")
}

/// [`write_config`] with `reply` as the route's answer (`reply_text = "ok"`: `t` is only
/// queued), an admin listener, and `t` taking 5 s per attempt at most.
fn write_config_with(
    dir: &Path,
    pg: &Postgres,
    db: &str,
    target: &str,
    lease_ms: u64,
    reply: &str,
) -> PathBuf {
    let password = pg.password_file(dir);
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [store]\nurl = \"{}\"\npassword_file = \"{}\"\nlease_ms = {lease_ms}\n",
        pg.url(db),
        password.display()
    );
    toml.push_str(&account_section("main", "/wechat", "plaintext"));
    toml.push_str(&target_section(
        "t",
        target,
        "raw",
        "retry_initial_ms = 100\ntimeout_ms = 5000\n",
    ));
    toml.push_str(&format!("[[route]]\nto = [\"t\"]\n{reply}\n"));
    let path = dir.join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    path
}

/// Two relays on database `db` of `pg`, each with a config of its own from `config` (given
/// its folder), and those folders.
struct Pair {
    a: Binary,
    b: Binary,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn two_relays(config: impl Fn(&Path) -> PathBuf) -> Pair {
    let dirs = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    Pair {
        a: Binary::start(&config(dirs.0.path())),
        b: Binary::start(&config(dirs.1.path())),
        _dirs: dirs,
    }
}

/// Sends the push (`query`, `body`) to `relay` in a task of its own.
fn send_in_background(
    relay: &Binary,
    query: &str,
    body: &str,
) -> tokio::task::JoinHandle<common::Answer> {
    let (url, body) = (relay.url(&format!("/wechat?{query}")), body.to_owned());
    tokio::spawn(async move { post(&url, body).await })
}

/// The number `n` of a push whose text is `"{tag} {n};"`, from what a target received.
fn numbered(received: &common::Received, tag: &str) -> Option<u64> {
    let body = String::from_utf8_lossy(&received.body);
    let rest = body.split(&format!("{tag} ")).nth(1)?;
    rest.split(';').next()?.parse().ok()
}

fn check(config: &Path) -> (Option<i32>, String, String) {
    cli(&["check", "--config", &config.to_string_lossy()])
}

#[test]
fn check_reads_the_schema_version_serve_sets_it_up_once_and_a_wrong_password_is_refused() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &pg, "relay", "http://127.0.0.1:9/t", 30_000);

    let (code, out, err) = check(&config);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains(&format!("store: {} (PostgreSQL", pg.shown("relay"))),
        "{out}"
    );
    assert!(
        out.contains("database: empty: a relay sets up the schema at its first start"),
        "{out}"
    );
    // check changed nothing.
    assert_eq!(
        pg.psql(
            "relay",
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'wechat_relay%'"
        ),
        "0"
    );
    // No secret in what check prints.
    assert!(!out.contains(pg.password()) && !err.contains(pg.password()));

    // Two relays starting together: the advisory lock lets one set it up; both serve.
    let mut first = Binary::start(&config);
    let mut second = Binary::start(&config);
    assert_eq!(
        pg.psql("relay", "SELECT version FROM wechat_relay_schema"),
        "1"
    );
    let (code, out, _) = check(&config);
    assert_eq!(code, Some(0));
    assert!(out.contains("database: schema version 1"), "{out}");
    first.terminate();
    second.terminate();

    // The database lets the relay in only with the password of its password_file: another
    // one there is refused, and neither password is shown.
    let wrong = "not-the-password-4711";
    std::fs::write(dir.path().join("db.password"), format!("{wrong}\n")).expect("write");
    let (code, out, err) = check(&config);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("password authentication failed"), "{err}");
    for secret in [wrong, pg.password()] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{out}\n{err}"
        );
    }
}

#[test]
fn a_schema_newer_than_the_relay_is_refused_and_so_is_an_unreachable_database() {
    let Some(pg) = Postgres::start_own() else {
        return;
    };
    pg.create_db("relay");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &pg, "relay", "http://127.0.0.1:9/t", 30_000);
    pg.psql(
        "relay",
        "CREATE TABLE wechat_relay_schema (version integer NOT NULL); \
         INSERT INTO wechat_relay_schema VALUES (99)",
    );
    let (code, err) = serve_until_exit(&config);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("version 99, newer than this relay's 1"),
        "a line naming both versions: {err}"
    );
    let (code, out, err) = check(&config);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("database: schema version 99"), "{out}");

    // Nothing listens any more (the server and its socket are gone): a clear error, exit 1,
    // within 10 s.
    drop(pg);
    let started = Instant::now();
    let (code, err) = serve_until_exit(&config);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("cannot reach the database") || err.contains("database:"),
        "{err}"
    );
    assert!(!err.contains(common::postgres::PASSWORD), "{err}");
}

/// Runs `serve` until it exits (it must, within 20 s): its exit code and stderr.
fn serve_until_exit(config: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wechat-relay"))
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove(common::postgres::SERVER_VARIABLE)
        .output()
        .expect("run serve");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_lands_on_the_other_relay_gets_the_same_answer_and_is_not_forwarded_again() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let mut target = FakeTarget::start().await;
    let url = target.url("/t");
    let Pair { a, b, _dirs } = two_relays(|dir| write_config(dir, &pg, "relay", &url, 30_000));

    let (query, body) = PushBuilder::new(text_xml("hello", 42)).plaintext();
    let first = post(&a.url(&format!("/wechat?{query}")), body.clone()).await;
    assert_success(&first);
    let asked = target.next().await;
    assert!(String::from_utf8_lossy(&asked.body).contains("hello"));

    // WeChat's retry, byte for byte, reaches the other relay.
    let retry = post(&b.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body, "the same bytes");
    target.expect_none(Duration::from_millis(1500)).await;
    assert_eq!(
        pg.psql("relay", "SELECT count(*) FROM wechat_relay_dedupe"),
        "1"
    );
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_left_by_a_relay_that_died_is_taken_by_the_other_when_its_lease_runs_out() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    // The target hangs: the reply attempt is cut at the deadline, and relay A dies holding
    // the delivery (its lease, from the commit or from its worker's attempt).
    let mut target = FakeTarget::with(common::Behaviour {
        delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let url = target.url("/t");
    let dir_a = tempfile::tempdir().expect("tempdir");
    // The reply cut at 2.5 s: the commit then has 2.3 s of WeChat's 4.8 on a loaded machine.
    let config_a = write_config(dir_a.path(), &pg, "relay", &url, 2_000);
    let toml = std::fs::read_to_string(&config_a).expect("read");
    let toml = toml.replacen("[server]\n", "[server]\nreply_deadline_ms = 2500\n", 1);
    std::fs::write(&config_a, toml).expect("write");
    let mut a = Binary::start(&config_a);
    let (query, body) = PushBuilder::new(text_xml("left behind", 7)).plaintext();
    let answer = post(&a.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let _ = target.next().await;
    a.kill();
    assert_eq!(
        pg.psql(
            "relay",
            "SELECT count(*) FROM wechat_relay_deliveries WHERE NOT dead"
        ),
        "1"
    );

    // Relay B takes it once A's lease runs out (2 s), and the target now takes it.
    target.set(common::Behaviour::default());
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = Binary::start(&write_config(dir_b.path(), &pg, "relay", &url, 2_000));
    let started = Instant::now();
    let delivered = tokio::time::timeout(Duration::from_secs(10), target.next())
        .await
        .expect("delivered by the other relay");
    assert!(String::from_utf8_lossy(&delivered.body).contains("left behind"));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while pg.psql("relay", "SELECT count(*) FROM wechat_relay_deliveries") != "0" {
        assert!(Instant::now() < deadline, "the delivery is settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = common::get(&format!("http://{}/metrics", b.admin_addr())).await;
    let takeovers = common::metric(
        &metrics.text(),
        "wechat_relay_store_lease_takeovers_total",
        &[],
    );
    assert!(
        takeovers.is_some_and(|n| n >= 1.0),
        "takeovers {takeovers:?}: {}",
        metrics.text()
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_commands_read_and_change_the_shared_store() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let target = FakeTarget::with(common::Behaviour {
        status: http::StatusCode::BAD_REQUEST,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &pg, "relay", &target.url("/t"), 30_000);
    let relay = Binary::start(&config);
    // A 4xx from the reply target: a dead letter on arrival.
    let (query, body) = PushBuilder::new(text_xml("dead on arrival", 9)).plaintext();
    let _ = post(&relay.url(&format!("/wechat?{query}")), body).await;
    let config = config.to_string_lossy().into_owned();
    let (code, out, err) = cli(&["outbox", "stats", "--config", &config]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("target=t pending=0 dead=1"), "{out}");
    let (code, out, err) = cli(&["outbox", "list", "--dead", "--json", "--config", &config]);
    assert_eq!(code, Some(0), "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    let dead = &listed["deliveries"][0];
    assert_eq!(dead["target"], "t", "{out}");
    assert_eq!(dead["msg_type"], "text", "{out}");
    let (code, out, err) = cli(&["outbox", "purge", "--dead", "--config", &config]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged=1"), "{out}");
    assert_eq!(
        pg.psql("relay", "SELECT count(*) FROM wechat_relay_deliveries"),
        "0"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_relay_keeps_its_delivery_past_the_lease_and_the_other_does_not_send_it_too() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    // An attempt that lasts 2.25 leases of 2 s (renewed every 667 ms, slack for a loaded
    // machine); relay B polls the store every second meanwhile.
    let mut target = FakeTarget::with(common::Behaviour {
        delay: Duration::from_millis(4500),
        ..Default::default()
    })
    .await;
    let url = target.url("/t");
    let Pair { a, b, _dirs } =
        two_relays(|dir| write_config_with(dir, &pg, "relay", &url, 2_000, "reply_text = \"ok\""));
    let (query, body) = PushBuilder::new(text_xml("held", 11)).plaintext();
    let answer = post(&a.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let first = target.next().await;
    assert!(String::from_utf8_lossy(&first.body).contains("held"));
    // A renews its lease while it attempts: B never takes the delivery.
    target.expect_none(Duration::from_millis(5500)).await;
    assert_eq!(
        pg.psql("relay", "SELECT count(*) FROM wechat_relay_deliveries"),
        "0"
    );
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_lost_while_serving_gets_503s_then_the_relay_serves_again_without_a_restart() {
    let Some(mut pg) = Postgres::start_own() else {
        return;
    };
    pg.create_db("relay");
    let mut target = FakeTarget::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = target.url("/t");
    let config = write_config_with(
        dir.path(),
        &pg,
        "relay",
        &url,
        30_000,
        "reply_text = \"ok\"",
    );
    let relay = Binary::start(&config);
    let admin = relay.admin_addr();
    let ready = format!("http://{admin}/readyz");
    let push = |n: u64| PushBuilder::new(text_xml(&format!("push {n}"), n)).plaintext();

    let (query, body) = push(1);
    let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let _ = target.next().await;
    assert_eq!(common::get(&ready).await.status, 200);

    // The database goes away: 503 (WeChat retries) within WeChat's 5 s, and not ready.
    pg.kill();
    let (query, body) = push(2);
    let started = Instant::now();
    let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_ne!(common::get(&ready).await.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // While it is away, pushes fail at once rather than each trying to connect: connections
    // are tried with a backoff (100 ms doubling to 2 s), however fast the pushes come.
    let storm = Instant::now();
    let mut refused = 0u64;
    while storm.elapsed() < Duration::from_secs(3) {
        let (query, body) = push(100 + refused);
        let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
        assert_eq!(answer.status, 503, "{}", answer.text());
        refused += 1;
    }
    let metrics = common::get(&format!("http://{admin}/metrics")).await;
    let tried = common::metric(
        &metrics.text(),
        "wechat_relay_store_connect_failures_total",
        &[],
    )
    .unwrap_or(0.0);
    assert!(refused >= 50, "only {refused} pushes in 3 s");
    assert!(
        (1.0..=15.0).contains(&tried),
        "{tried} connections tried for {refused} pushes"
    );

    // It comes back: the relay serves again within 10 s, with no restart.
    pg.run();
    let back = Instant::now();
    let (query, body) = push(3);
    loop {
        let answer = post(&relay.url(&format!("/wechat?{query}")), body.clone()).await;
        if answer.status == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "not serving again: {}",
            answer.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let delivered = tokio::time::timeout(Duration::from_secs(10), target.next())
        .await
        .expect("the push after the outage is delivered");
    assert!(
        String::from_utf8_lossy(&delivered.body).contains("push 3"),
        "{}",
        String::from_utf8_lossy(&delivered.body)
    );
    assert_eq!(common::get(&ready).await.status, 200);
    let metrics = common::get(&format!("http://{admin}/metrics")).await;
    let errors = common::metric(&metrics.text(), "wechat_relay_store_errors_total", &[]);
    assert!(errors.is_some_and(|n| n >= 1.0), "{}", metrics.text());
    let commits = common::metric(
        &metrics.text(),
        "wechat_relay_store_commit_seconds_count",
        &[],
    );
    assert!(commits.is_some_and(|n| n >= 2.0), "{}", metrics.text());
    // Push 1 was delivered, push 2 never acknowledged (nor recorded), push 3 recorded.
    assert_eq!(
        pg.psql("relay", "SELECT count(*) FROM wechat_relay_dedupe"),
        "2"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_hangs_mid_push_gets_a_503_before_wechat_stops_waiting() {
    let Some(pg) = Postgres::start_own() else {
        return;
    };
    pg.create_db("relay");
    // The reply target answers after 4 s; the database hangs meanwhile, before the commit.
    let mut target = FakeTarget::with(common::Behaviour {
        delay: Duration::from_millis(4000),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &pg, "relay", &target.url("/t"), 30_000);
    let relay = Binary::start(&config);
    let (query, body) = PushBuilder::new(text_xml("stalled", 5)).plaintext();
    let url = relay.url(&format!("/wechat?{query}"));
    let started = Instant::now();
    let answer = tokio::spawn(async move { post(&url, body).await });
    let _ = target.next().await;
    pg.pause();
    let answer = answer.await.expect("the push");
    let elapsed = started.elapsed();
    pg.resume();
    assert_eq!(answer.status, 503, "{}", answer.text());
    // The relay answers 4.8 s after the push came; waiting for the database's 3 s bound
    // after the reply's 4 s instead would answer after 7 s. The slack is for a loaded CI.
    assert!(
        elapsed < Duration::from_secs(6),
        "answered after {elapsed:?}"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_the_other_relay_while_the_first_asks_the_reply_target_waits_for_its_answer() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    // The reply target takes 2 s; WeChat's retry reaches relay B meanwhile.
    let mut target = FakeTarget::with(common::Behaviour {
        delay: Duration::from_millis(2000),
        ..Default::default()
    })
    .await;
    let url = target.url("/t");
    let Pair { a, b, _dirs } = two_relays(|dir| write_config(dir, &pg, "relay", &url, 30_000));
    let (query, body) = PushBuilder::new(text_xml("in flight", 13)).plaintext();
    let first = send_in_background(&a, &query, &body);
    let _ = target.next().await;
    let retry = post(&b.url(&format!("/wechat?{query}")), body).await;
    let first = first.await.expect("the first push");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(retry.status, first.status, "{}", retry.text());
    assert_eq!(retry.body, first.body, "the first one's answer");
    // The reply target was asked once.
    target.expect_none(Duration::from_millis(1500)).await;
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_takes_over_a_push_whose_relay_died_once_its_claim_runs_out() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let mut target = FakeTarget::with(common::Behaviour {
        delay: Duration::from_secs(10),
        ..Default::default()
    })
    .await;
    let url = target.url("/t");
    let Pair { mut a, b, _dirs } = two_relays(|dir| write_config(dir, &pg, "relay", &url, 30_000));
    let (query, body) = PushBuilder::new(text_xml("orphaned", 17)).plaintext();
    let first = send_in_background(&a, &query, &body);
    let _ = target.next().await;
    let claimed = Instant::now();
    // Relay A dies while its reply target is asked; WeChat never hears from it.
    a.kill();
    // Its connection is cut: the task's request fails (a panic in that task, ignored here).
    let _ = first.await;
    target.set(common::Behaviour::default());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The retry on B waits for A's claim (5 s) to run out, then asks the reply target itself.
    let retry = post(&b.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    // Sent 1.5 s in, answered once the claim (taken just before the reply target was
    // asked) ran out.
    assert!(
        claimed.elapsed() >= Duration::from_secs(4),
        "{:?}",
        claimed.elapsed()
    );
    let asked = target.next().await;
    assert!(String::from_utf8_lossy(&asked.body).contains("orphaned"));
    drop(b);
}

#[test]
fn tls_to_the_database_is_verified_against_ca_file() {
    let Some(mut pg) = Postgres::start_own() else {
        return;
    };
    pg.create_db("relay");
    let ca = pg.enable_tls();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &pg, "relay", "http://127.0.0.1:9/t", 30_000);
    let text = std::fs::read_to_string(&config).expect("read");
    // TLS needs TCP: the server's 127.0.0.1 port instead of its socket.
    let required = text.replace(
        &pg.url("relay"),
        &format!("{}?sslmode=require", pg.tcp_url("relay")),
    );
    assert_ne!(required, text);
    // The server's certificate is not from the Web PKI: refused without ca_file.
    std::fs::write(&config, &required).expect("write");
    let (code, out, err) = check(&config);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains("certificate") || err.contains("tls") || err.contains("TLS"),
        "{err}"
    );
    // With it, verified and connected.
    let trusted = required.replace(
        "[store]\n",
        &format!("[store]\nca_file = \"{}\"\n", ca.display()),
    );
    std::fs::write(&config, trusted).expect("write");
    let (code, out, err) = check(&config);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("database: empty"), "{out}");
    // The server saw TLS: its connection statistics say so for our own session.
    let mut relay = Binary::start(&config);
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) > 0 FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
             WHERE s.ssl AND a.application_name = 'wechat-relay'"
        ),
        "t"
    );
    relay.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_a_relay_acknowledged_before_kill_9_is_delivered_by_the_other() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let mut target = FakeTarget::start().await;
    // The target is down until A dies (so that A dies with its pushes pending), then flaps:
    // 503 and 200 in turn every 300 ms.
    let flapping = target.behaviour();
    flapping.lock().expect("lock").status = http::StatusCode::SERVICE_UNAVAILABLE;
    let a_died = Arc::new(tokio::sync::Notify::new());
    let flapper = tokio::spawn({
        let a_died = Arc::clone(&a_died);
        async move {
            a_died.notified().await;
            for i in 0u32.. {
                let status = if i % 2 == 0 {
                    http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    http::StatusCode::OK
                };
                flapping.lock().expect("lock").status = status;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let url = target.url("/t");
    let Pair { mut a, b, _dirs } = two_relays(|dir| {
        let path = write_config_with(dir, &pg, "relay", &url, 2_000, "reply_text = \"ok\"");
        let toml = std::fs::read_to_string(&path).expect("read");
        let toml = toml.replace(
            "timeout_ms = 5000\n",
            "timeout_ms = 5000\nconcurrency = 2\nretry_max_ms = 500\n",
        );
        std::fs::write(&path, toml).expect("write");
        path
    });
    // Pushes alternate between A and B; A is killed halfway, the rest go to B.
    let mut acknowledged = std::collections::BTreeSet::new();
    for n in 0..40u64 {
        if n == 20 {
            a.kill();
            a_died.notify_one();
        }
        let relay = if n % 2 == 0 && n < 20 { &a } else { &b };
        let (query, body) =
            PushBuilder::new(text_xml(&format!("stream {n};"), 1000 + n)).plaintext();
        let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
        if answer.status == 200 {
            acknowledged.insert(n);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(
        acknowledged.len(),
        40,
        "every push sent to a live relay is acknowledged"
    );
    // Every acknowledged push reaches the target (answered 200), A's after its leases ran out.
    let mut delivered: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while acknowledged.iter().any(|n| !delivered.contains_key(n)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let received = tokio::time::timeout(left, target.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "not delivered: {:?}",
                    acknowledged
                        .iter()
                        .filter(|n| !delivered.contains_key(n))
                        .collect::<Vec<_>>()
                )
            });
        if received.answered != http::StatusCode::OK {
            continue;
        }
        let n = numbered(&received, "stream").expect("a pushed number");
        *delivered.entry(n).or_default() += 1;
    }
    flapper.abort();
    // Repeats (a delivery in flight on A when it died) stay within the concurrency.
    for (n, times) in &delivered {
        assert!(*times <= 1 + 2, "push {n} delivered {times} times");
    }
    // (A released most of its deliveries as it retried them; one it held when it died is
    // taken over once its lease runs out, as the test above shows.)
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stopped_and_started_under_load_loses_no_acknowledged_push() {
    let Some(mut pg) = Postgres::start_own() else {
        return;
    };
    pg.create_db("relay");
    let mut target = FakeTarget::start().await;
    let url = target.url("/t");
    let Pair { a, b, _dirs } =
        two_relays(|dir| write_config_with(dir, &pg, "relay", &url, 30_000, "reply_text = \"ok\""));
    let mut acknowledged = std::collections::BTreeSet::new();
    let mut refused = 0;
    // Pushes go on after the database is back until 10 in a row are acknowledged (the relays
    // connect again with a backoff of at most 2 s), within 10 s of its return.
    let mut back = None;
    let mut n = 0u64;
    loop {
        match n {
            20 => pg.kill(),
            40 => {
                pg.run();
                back = Some(Instant::now());
            }
            _ => {}
        }
        if n >= 50 && (n - 10..n).all(|m| acknowledged.contains(&m)) {
            break;
        }
        if let Some(back) = back {
            assert!(
                back.elapsed() < Duration::from_secs(10),
                "not serving again: {acknowledged:?}"
            );
        }
        let relay = if n.is_multiple_of(2) { &a } else { &b };
        let (query, body) = PushBuilder::new(text_xml(&format!("load {n};"), 2000 + n)).plaintext();
        let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
        match answer.status.as_u16() {
            200 => {
                acknowledged.insert(n);
            }
            503 => refused += 1,
            other => panic!("push {n}: {other} {}", answer.text()),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Away: 503s (WeChat retries them); before: acknowledged.
    assert!(refused >= 20, "{refused} refused");
    assert!(
        (0..20).all(|n| acknowledged.contains(&n)),
        "{acknowledged:?}"
    );
    let mut delivered = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !acknowledged.is_subset(&delivered) {
        assert!(
            Instant::now() < deadline,
            "not delivered: {:?}",
            acknowledged.difference(&delivered).collect::<Vec<_>>()
        );
        let received = target.next().await;
        if let Some(n) = numbered(&received, "load") {
            delivered.insert(n);
        }
    }
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_share_transactions_and_each_delivery_reaches_its_target_once() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let mut first = FakeTarget::start().await;
    let mut second = FakeTarget::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config_with(
        dir.path(),
        &pg,
        "relay",
        &first.url("/t"),
        30_000,
        "reply_text = \"ok\"",
    );
    // A second target on the route: two deliveries per push, in one statement per batch.
    let toml = std::fs::read_to_string(&config).expect("read");
    let toml = toml.replace("to = [\"t\"]", "to = [\"t\", \"u\"]")
        + &target_section("u", &second.url("/u"), "raw", "");
    std::fs::write(&config, toml).expect("write");
    let relay = Binary::start(&config);
    let sends: Vec<_> = (0..64u64)
        .map(|n| {
            let (query, body) =
                PushBuilder::new(text_xml(&format!("batch {n};"), 3000 + n)).plaintext();
            send_in_background(&relay, &query, &body)
        })
        .collect();
    for send in sends {
        let answer = send.await.expect("a push");
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    for target in [&mut first, &mut second] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let received = target.next().await;
            let n = numbered(&received, "batch").expect("a pushed number");
            assert!(seen.insert(n), "push {n} delivered twice");
        }
        target.expect_none(Duration::from_millis(500)).await;
    }
    assert_eq!(
        pg.psql("relay", "SELECT count(*) FROM wechat_relay_deliveries"),
        "0"
    );
    let metrics = common::get(&format!("http://{}/metrics", relay.admin_addr())).await;
    let batches = common::metric(&metrics.text(), "wechat_relay_store_batch_size_count", &[]);
    assert!(
        batches.is_some_and(|n| n < 64.0),
        "64 commits in fewer transactions: {batches:?}"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_on_the_other_relay_each_get_their_own_push_s_answer() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let mut target = FakeTarget::start().await;
    let url = target.url("/t");
    let Pair { a, b, _dirs } = two_relays(|dir| write_config(dir, &pg, "relay", &url, 30_000));
    // Claims made together share a statement: each push must get its own claim and record.
    let pushes: Vec<(String, String)> = (0..32u64)
        .map(|n| PushBuilder::new(text_xml(&format!("claim {n};"), 5000 + n)).plaintext())
        .collect();
    let send_all = |relay: &Binary| {
        pushes
            .iter()
            .map(|(query, body)| send_in_background(relay, query, body))
            .collect::<Vec<_>>()
    };
    let mut firsts = Vec::new();
    for send in send_all(&a) {
        let answer = send.await.expect("a push");
        assert_eq!(answer.status, 200, "{}", answer.text());
        firsts.push(answer);
    }
    let mut asked = std::collections::BTreeSet::new();
    for _ in 0..32 {
        let n = numbered(&target.next().await, "claim").expect("a pushed number");
        assert!(asked.insert(n), "push {n} asked twice");
    }
    // WeChat's retries, all at once, on the other relay: the recorded answers, no new ask.
    for (send, first) in send_all(&b).into_iter().zip(&firsts) {
        let retry = send.await.expect("a retry");
        assert_eq!(retry.status, first.status, "{}", retry.text());
        assert_eq!(retry.body, first.body, "the first relay's answer");
    }
    target.expect_none(Duration::from_millis(1000)).await;
    assert_eq!(
        pg.psql("relay", "SELECT count(*) FROM wechat_relay_dedupe"),
        "32"
    );
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_wakes_every_relay_s_worker_and_is_delivered_once() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let mut target = FakeTarget::with(common::Behaviour {
        status: http::StatusCode::BAD_REQUEST,
        ..Default::default()
    })
    .await;
    let url = target.url("/t");
    let Pair { a, b, _dirs } = two_relays(|dir| write_config(dir, &pg, "relay", &url, 30_000));
    // A 4xx from the reply target: a dead letter on arrival.
    let (query, body) = PushBuilder::new(text_xml("replayed", 21)).plaintext();
    let _ = post(&a.url(&format!("/wechat?{query}")), body).await;
    let _ = target.next().await;
    target.set(common::Behaviour::default());
    // The replay, from any host with the config: NOTIFY at its commit wakes both relays'
    // workers, rather than their next look at the store.
    let config = _dirs.1.path().join("relay.toml");
    let (code, out, err) = cli(&[
        "outbox",
        "replay",
        "--dead",
        "--config",
        &config.to_string_lossy(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed=1"), "{out}");
    let delivered = target.next().await;
    assert!(String::from_utf8_lossy(&delivered.body).contains("replayed"));
    target.expect_none(Duration::from_millis(1500)).await;
    for relay in [&a, &b] {
        let metrics = common::get(&format!("http://{}/metrics", relay.admin_addr())).await;
        let heard = common::metric(&metrics.text(), "wechat_relay_store_wakeups_total", &[]);
        assert!(heard.is_some_and(|n| n >= 1.0), "{}", metrics.text());
    }
    assert_eq!(
        pg.psql("relay", "SELECT count(*) FROM wechat_relay_deliveries"),
        "0"
    );
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_fails_before_its_commit_gives_up_its_claim_to_the_other_relay() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let mut target = FakeTarget::with(common::Behaviour {
        status: http::StatusCode::SERVICE_UNAVAILABLE,
        ..Default::default()
    })
    .await;
    let url = target.url("/t");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = Binary::start(&write_config(dir_b.path(), &pg, "relay", &url, 30_000));
    // Dead letters past relay A's budget of 1 MiB (not past B's): A refuses a push that
    // needs a delivery, after it has claimed it and asked the reply target.
    pg.psql(
        "relay",
        "INSERT INTO wechat_relay_deliveries (target, account, event_id, query, body, \
         forwarded_for, received_ms, enqueued_ms, attempts, at_ms, route, dead) \
         SELECT 't', 'main', 'old' || g, '', convert_to((SELECT string_agg(md5(random()::text \
         || g || i), '') FROM generate_series(1, 64) i), 'UTF8'), '-', 0, 0, 1, 0, 'r', true \
         FROM generate_series(1, 2000) g",
    );
    let dir_a = tempfile::tempdir().expect("tempdir");
    let config_a = write_config(dir_a.path(), &pg, "relay", &url, 30_000);
    let toml = std::fs::read_to_string(&config_a).expect("read");
    let toml = toml.replacen("[store]\n", "[store]\nmax_bytes = 1048576\n", 1);
    std::fs::write(&config_a, toml).expect("write");
    let a = Binary::start(&config_a);

    let (query, body) = PushBuilder::new(text_xml("refused", 31)).plaintext();
    let first = post(&a.url(&format!("/wechat?{query}")), body.clone()).await;
    assert_eq!(first.status, 503, "{}", first.text());
    let _ = target.next().await;
    // WeChat's retry reaches relay B: handled at once, not after A's claim runs out (5 s,
    // longer than a retry waits for another relay's answer: it would get 503 again).
    target.set(common::Behaviour::default());
    let retry = post(&b.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    let asked = target.next().await;
    assert!(String::from_utf8_lossy(&asked.body).contains("refused"));
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_message_under_a_recorded_event_id_on_the_other_relay_is_a_push_of_its_own() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_db("relay");
    let mut target = FakeTarget::start().await;
    let url = target.url("/t");
    let Pair { a, b, _dirs } = two_relays(|dir| write_config(dir, &pg, "relay", &url, 30_000));
    // Both messages with one MsgId and CreateTime: the same event id.
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let text = |content: &str| {
        let content = PushContent::Text {
            content,
            msg_id: 77,
        };
        PushBuilder::new(message_xml(common::GH, common::OPENID, at, &content)).plaintext()
    };
    let (query, body) = text("the first message");
    let first = post(&a.url(&format!("/wechat?{query}")), body.clone()).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let _ = target.next().await;

    // The same MsgId with another message, on relay B: a collision, not WeChat's retry. It is
    // forwarded and committed under an id of its own, never answered with A's bytes.
    let (other_query, other_body) = text("a second message");
    let other = post(&b.url(&format!("/wechat?{other_query}")), other_body).await;
    assert_eq!(other.status, 200, "{}", other.text());
    let asked = target.next().await;
    assert!(
        String::from_utf8_lossy(&asked.body).contains("a second message"),
        "{}",
        String::from_utf8_lossy(&asked.body)
    );
    assert_eq!(
        pg.psql(
            "relay",
            "SELECT count(*) FROM wechat_relay_dedupe WHERE event_id LIKE '%~%'"
        ),
        "1",
        "the second under an id of its own: {}",
        pg.psql(
            "relay",
            "SELECT string_agg(event_id, ' ') FROM wechat_relay_dedupe"
        )
    );
    // WeChat's retry of the first, on B too: the first one's answer, not asked again.
    let retry = post(&b.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(retry.body, first.body, "the first one's answer");
    target.expect_none(Duration::from_millis(1000)).await;
    drop((a, b));
}
