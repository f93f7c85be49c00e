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

/// `/metrics` of a relay with one account and one target, just started, before any push.
async fn first_scrape() -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = FakeTarget::start().await;
    let path = write_config(dir.path(), &["main"], &[("a", a.url("/a"), "")], &["a"]);
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    get(&format!("http://{admin}/metrics")).await.text()
}

#[tokio::test]
async fn the_build_and_the_process_are_described() {
    let text = first_scrape().await;

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

/// A file of this repository.
fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The metric names an expression uses: `wechat_relay_*` and `process_*` words.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("wechat_relay_") || word.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool() {
    let rules = repo_file("contrib/prometheus/alerts.yml");
    let output = match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            let why = format!("promtool does not run ({e}; Debian: apt-get install prometheus)");
            // In CI (`CI` set, as .ci/run is run) every check runs: .ci/run installs promtool.
            if std::env::var_os("CI").is_some_and(|ci| !ci.is_empty()) {
                panic!("{why}: in CI (CI is set) this check must run; see .ci/run");
            }
            eprintln!("skipped: {why}");
            return;
        }
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool check rules: {said}");
    assert!(said.contains("SUCCESS: 6 rules found"), "{said}");
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_in_metrics_from_the_start() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("contrib/grafana/wechat-relay.json"))
            .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect();
    let panels = dashboard["panels"].as_array().map_or(0, Vec::len);
    assert!(exprs.len() >= panels, "every panel has a query");
    let mut names: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    // What the dashboard must show, by its metric.
    for shown in [
        "wechat_relay_pushes_total",
        "wechat_relay_reply_seconds_bucket",
        "wechat_relay_forwards_total",
        "wechat_relay_outbox_pending",
        "wechat_relay_outbox_oldest_pending_seconds",
        "wechat_relay_dead_letters_total",
        "wechat_relay_store_used_bytes",
        "wechat_relay_connections_open",
    ] {
        assert!(
            names.iter().any(|n| n == shown),
            "the dashboard shows {shown}"
        );
    }
    let rules = std::fs::read_to_string(repo_file("contrib/prometheus/alerts.yml")).expect("rules");
    let in_rules: Vec<String> = rules
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(metric_names)
        .collect();
    assert!(in_rules.len() >= 5, "{in_rules:?}");
    names.extend(in_rules);
    names.sort();
    names.dedup();

    let text = first_scrape().await;
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| metric(&text, name, &[]).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "not in /metrics at start: {missing:?}\n{text}"
    );
}
