//! What `/metrics` shows, with the real binary: every series of the configured accounts and
//! targets at 0 before their first event (and after a reload adds one), the build's version,
//! the standard process metrics.

mod common;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;

/// A config with `accounts` (each on `/<name>`), raw `targets` (name, URL, more keys) and one
/// route of text to the `to` targets, with the admin listener.
fn write_config(
    dir: &Path,
    accounts: &[&str],
    targets: &[(&str, String, &str)],
    to: &[&str],
) -> PathBuf {
    let mut toml = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n[store]\npath = \"data\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    for name in accounts {
        toml.push_str(&account_section(name, &format!("/{name}"), "safe"));
    }
    for (name, url, extra) in targets {
        toml.push_str(&target_section(name, url, "raw", extra));
    }
    let to: Vec<String> = to.iter().map(|t| format!("\"{t}\"")).collect();
    toml.push_str(&format!(
        "[[route]]\nmsg_type = [\"text\"]\nto = [{}]\n",
        to.join(", ")
    ));
    let path = dir.join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    path
}

/// The series a dashboard reads for `accounts` and `targets`, each with the value it must have.
fn assert_at_zero(text: &str, accounts: &[&str], targets: &[&str]) {
    for account in accounts {
        for outcome in ["forwarded", "unrouted", "duplicate", "rejected", "failed"] {
            let labels = [("account", *account), ("outcome", outcome)];
            assert_eq!(
                metric(text, "wechat_relay_pushes_total", &labels),
                Some(0.0),
                "{labels:?} in {text}"
            );
        }
        for (name, extra) in [
            ("wechat_relay_rejected_total", Some(("reason", "signature"))),
            ("wechat_relay_rejected_total", Some(("reason", "decrypt"))),
            ("wechat_relay_dedupe_hits_total", None),
            ("wechat_relay_dedupe_collisions_total", None),
        ] {
            let mut labels = vec![("account", *account)];
            labels.extend(extra);
            assert_eq!(metric(text, name, &labels), Some(0.0), "{name} {labels:?}");
        }
    }
    for target in targets {
        for (name, extra) in [
            ("wechat_relay_forwards_total", Some(("status", "timeout"))),
            ("wechat_relay_forwards_total", Some(("status", "error"))),
            ("wechat_relay_forward_seconds_count", None),
            ("wechat_relay_outbox_pending", None),
            ("wechat_relay_dead_letters", None),
        ] {
            let mut labels = vec![("target", *target)];
            labels.extend(extra);
            assert_eq!(metric(text, name, &labels), Some(0.0), "{name} {labels:?}");
        }
    }
}

#[tokio::test]
async fn every_series_of_the_config_is_there_at_zero_from_the_start_and_after_a_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = FakeTarget::start().await;
    let b = FakeTarget::start().await;
    let path = write_config(
        dir.path(),
        &["main", "shop"],
        &[("a", a.url("/a"), ""), ("b", b.url("/b"), "")],
        &["a"],
    );
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    let scrape = || async { get(&format!("http://{admin}/metrics")).await.text() };

    let text = scrape().await;
    assert_at_zero(&text, &["main", "shop"], &["a", "b"]);
    for (name, labels) in [
        (
            "wechat_relay_config_reloads_total",
            &[("result", "failure")][..],
        ),
        ("wechat_relay_store_full_total", &[]),
        ("wechat_relay_log_lines_dropped_total", &[]),
        ("wechat_relay_reply_seconds_count", &[]),
    ] {
        assert_eq!(metric(&text, name, labels), Some(0.0), "{name} in {text}");
    }

    // A push counted before the reload stays counted after it.
    let (query, body) = PushBuilder::new(text_xml("before the reload", 1)).safe();
    assert_success(&post(&relay.url(&format!("/main?{query}")), body).await);
    a.next().await;

    let c = FakeTarget::start().await;
    write_config(
        dir.path(),
        &["main", "shop", "blog"],
        &[
            ("a", a.url("/a"), ""),
            ("b", b.url("/b"), ""),
            ("c", c.url("/c"), ""),
        ],
        &["a"],
    );
    relay.signal("HUP");
    relay.wait_for("config reloaded");
    let text = scrape().await;
    assert_at_zero(&text, &["blog"], &["c"]);
    let forwarded = [
        ("account", "main"),
        ("msg_type", "text"),
        ("outcome", "forwarded"),
    ];
    assert_eq!(
        metric(&text, "wechat_relay_pushes_total", &forwarded),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "wechat_relay_forwards_total",
            &[("target", "a"), ("status", "200")]
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn the_build_and_the_process_are_described() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = FakeTarget::start().await;
    let path = write_config(dir.path(), &["main"], &[("a", a.url("/a"), "")], &["a"]);
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    let text = get(&format!("http://{admin}/metrics")).await.text();

    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        metric(&text, "wechat_relay_build_info", &[("version", version)]),
        Some(1.0),
        "{text}"
    );
    for (name, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind} in {text}"
        );
    }
    let value = |name| metric(&text, name, &[]).unwrap_or_else(|| panic!("{name} in {text}"));
    assert!(value("process_cpu_seconds_total") >= 0.0);
    // The relay holds its listeners, its store and the log pipe: more than stdin/out/err.
    assert!(value("process_open_fds") > 3.0, "{text}");
    // Some MiB: a relay of a few pages would mean the pages were not multiplied.
    assert!(
        value("process_resident_memory_bytes") > 1_000_000.0,
        "{text}"
    );
    // It started before this scrape, and not long before.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "{started} vs {now}"
    );
}

// Threads of its own: the fake target answers while the test waits for a log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_age_is_what_outbox_stats_says_and_dead_letters_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    // `bad` answers 400: its delivery dies at once. `down` refuses connections: it stays pending.
    let bad = FakeTarget::with(Behaviour {
        status: http::StatusCode::BAD_REQUEST,
        ..Behaviour::default()
    })
    .await;
    let path = write_config(
        dir.path(),
        &["main"],
        &[
            ("bad", bad.url("/bad"), ""),
            (
                "down",
                "http://127.0.0.1:1/down".into(),
                "retry_initial_ms = 60000",
            ),
        ],
        &["bad", "down"],
    );
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    let scrape = || async { get(&format!("http://{admin}/metrics")).await.text() };
    let oldest = |text: &str, target| {
        metric(
            text,
            "wechat_relay_outbox_oldest_pending_seconds",
            &[("target", target)],
        )
    };
    let text = scrape().await;
    assert_eq!(oldest(&text, "down"), Some(0.0), "{text}");
    for target in ["bad", "down"] {
        assert_eq!(
            metric(
                &text,
                "wechat_relay_dead_letters_total",
                &[("target", target)]
            ),
            Some(0.0),
            "{text}"
        );
    }

    let (query, body) = PushBuilder::new(text_xml("one", 1)).safe();
    assert_success(&post(&relay.url(&format!("/main?{query}")), body).await);
    relay.wait_for("delivery failed for good");
    // Past a second, so that `outbox stats` (whole seconds) shows an age of its own.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let before = oldest(&scrape().await, "down").expect("oldest pending age");
    let config = path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = cli(&["outbox", "stats", "--json", "--config", &config]);
    assert_eq!(code, Some(0), "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).expect("stats json");
    let of_down = stats["targets"]
        .as_array()
        .and_then(|targets| targets.iter().find(|t| t["target"] == "down"))
        .and_then(|t| t["oldest_pending_age_s"].as_u64())
        .unwrap_or_else(|| panic!("down's age in {stdout}"));
    let text = scrape().await;
    let after = oldest(&text, "down").expect("oldest pending age");
    assert!(
        before >= 1.0 && before.floor() <= of_down as f64 && of_down as f64 <= after.floor(),
        "metric {before} then {after}, outbox stats {of_down}"
    );
    assert_eq!(oldest(&text, "bad"), Some(0.0), "{text}");
    assert_eq!(
        metric(
            &text,
            "wechat_relay_dead_letters_total",
            &[("target", "bad")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "wechat_relay_dead_letters_total",
            &[("target", "down")]
        ),
        Some(0.0),
        "{text}"
    );
}
