//! The relay as ops run it (issue #4), always the real binary: SIGHUP reload under a stream of
//! pushes, a refused reload, systemd notifications and watchdog, the admin endpoints and their
//! metrics, JSON logs, and HTTPS with a certificate swapped on reload.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use wechat_relay::wechat::message::Message;

/// relay.toml in `dir`: safe mode, the store in `dir/data`, `targets` as raw targets, one
/// route to `to`, and `extra` sections.
fn write_config(dir: &Path, targets: &[(&str, String)], to: &[&str], extra: &str) -> PathBuf {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n[store]\npath = \"data\"\n{extra}\n"
    );
    toml.push_str(&account_section("main", "/wechat", "safe"));
    for (name, url) in targets {
        toml.push_str(&target_section(name, url, "raw", "retry_initial_ms = 50"));
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

/// The binary on a config in `dir` with one raw target `t` (a fake target, also returned),
/// `extra` sections and `env`. `dir` may already hold files the config names.
async fn one_target(
    dir: &tempfile::TempDir,
    extra: &str,
    env: &[(&str, &str)],
) -> (FakeTarget, Binary) {
    let t = FakeTarget::start().await;
    let path = write_config(dir.path(), &[("t", t.url("/t"))], &["t"], extra);
    (t, Binary::start_with_env(&path, env))
}

fn event_id(xml: &str) -> String {
    Message::parse(Bytes::from(xml.to_owned()))
        .expect("xml")
        .dedupe_key()
        .event_id("main")
}

/// Drains `target` for `wait` and counts what it got by event id.
async fn taken(target: &mut FakeTarget, wait: Duration) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let until = Instant::now() + wait;
    while let Ok(got) = tokio::time::timeout(
        until.saturating_duration_since(Instant::now()),
        target.next(),
    )
    .await
    {
        let id = got.header("x-wechat-relay-event-id").expect("event id");
        *counts.entry(id.to_owned()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_a_target_under_a_stream_loses_and_repeats_no_push() {
    let mut a = FakeTarget::start().await;
    let mut b = FakeTarget::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), &[("a", a.url("/a"))], &["a"], "");
    let relay = Binary::start(&path);

    // A steady stream: one push every 10 ms.
    const PUSHES: usize = 150;
    let xmls: Vec<String> = (0..PUSHES)
        .map(|i| text_xml(&format!("stream {i}"), 5000 + i as u64))
        .collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let stream = tokio::spawn({
        let (url, xmls, sent) = (relay.url("/wechat"), xmls.clone(), Arc::clone(&sent));
        async move {
            let mut failed = Vec::new();
            for (i, xml) in xmls.iter().enumerate() {
                let mut builder = PushBuilder::new(xml.as_str());
                builder.nonce = format!("s{i}");
                let (query, body) = builder.safe();
                let answer = post(&format!("{url}?{query}"), body).await;
                if (answer.status.as_u16(), answer.text().as_str()) != (200, "success") {
                    failed.push(i);
                }
                sent.store(i + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failed
        }
    });
    while sent.load(Ordering::SeqCst) < PUSHES / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    write_config(
        dir.path(),
        &[("a", a.url("/a")), ("b", b.url("/b"))],
        &["a", "b"],
        "",
    );
    relay.signal("HUP");
    relay.wait_for("config reloaded");
    let after_reload = sent.load(Ordering::SeqCst) + 1;
    let failed = stream.await.expect("stream");
    assert!(failed.is_empty(), "pushes not answered success: {failed:?}");
    assert!(after_reload < PUSHES, "the reload came mid-stream");

    let at_a = taken(&mut a, Duration::from_secs(2)).await;
    let at_b = taken(&mut b, Duration::from_millis(500)).await;
    let ids: Vec<String> = xmls.iter().map(|x| event_id(x)).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(at_a.get(id), Some(&1), "push {i} reached a once");
        if i >= after_reload {
            assert_eq!(
                at_b.get(id),
                Some(&1),
                "push {i}, after the reload, reached b once"
            );
        }
    }
    assert!(at_b.values().all(|n| *n == 1), "nothing twice at b");
    assert!(at_b.keys().all(|id| ids.contains(id)));
}

#[tokio::test]
async fn a_broken_or_restart_only_reload_changes_nothing_and_says_why() {
    let mut a = FakeTarget::start().await;
    let b = FakeTarget::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        &[("a", a.url("/a"))],
        &["a"],
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    let good = std::fs::read_to_string(&path).expect("read");

    // Invalid: a target with a bad URL, a route naming a target that does not exist.
    let broken = write_config(
        dir.path(),
        &[("a", a.url("/a")), ("b", "not a url".into())],
        &["a", "b", "c"],
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    relay.signal("HUP");
    let url_problem = relay.wait_for("invalid config");
    assert!(url_problem.contains("target \"b\".url"), "{url_problem}");
    let route_problem = relay.wait_for("invalid config");
    assert!(
        route_problem.contains("\"c\" is not a [[target]] name"),
        "{route_problem}"
    );
    relay.wait_for("reload refused: the running config is unchanged");
    drop(broken);

    // A restart-only change: the listen address.
    std::fs::write(
        &path,
        good.replace(
            "listen = \"127.0.0.1:0\"\nshutdown",
            "listen = \"127.0.0.1:1\"\nshutdown",
        ),
    )
    .expect("write");
    relay.signal("HUP");
    let line = relay.wait_for("change needs a restart");
    assert!(line.contains("server.listen changed"), "{line}");
    relay.wait_for("reload refused");

    // Still serving the first config: a reaches, b (only in the broken file) does not.
    let (query, body) = PushBuilder::new(text_xml("still", 1)).safe();
    assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
    a.next().await;
    drop(b);
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    assert_eq!(
        metric(
            &metrics,
            "wechat_relay_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_admin_endpoints_answer_and_the_metrics_count_what_was_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut t, relay) = one_target(&dir, "[admin]\nlisten = \"127.0.0.1:0\"\n", &[]).await;
    let admin = relay.admin_addr();
    let health = get(&format!("http://{admin}/healthz")).await;
    assert_eq!(
        (health.status.as_u16(), health.text().as_str()),
        (200, "ok\n")
    );
    let ready = get(&format!("http://{admin}/readyz")).await;
    assert_eq!(
        (ready.status.as_u16(), ready.text().as_str()),
        (200, "ready\n")
    );

    // Three text messages, a WeChat retry of the first, a bad signature, an unrouted event.
    let url = |query: &str| relay.url(&format!("/wechat?{query}"));
    let first = PushBuilder::new(text_xml("private-one", 1)).safe();
    assert_success(&post(&url(&first.0), first.1.clone()).await);
    for i in 2..=3 {
        let (query, body) = PushBuilder::new(text_xml("private-more", i)).safe();
        assert_success(&post(&url(&query), body).await);
    }
    assert_success(&post(&url(&first.0), first.1.clone()).await);
    let forged = first.0.replace("signature=", "signature=0");
    assert_eq!(post(&url(&forged), first.1).await.status, 403);
    let (query, body) = PushBuilder::new(event_xml("subscribe", "", None)).safe();
    assert_success(&post(&url(&query), body).await);
    for _ in 0..3 {
        t.next().await;
    }
    // The deliveries are recorded just after the target answered: wait until the gauge says so.
    let scrape = || async { get(&format!("http://{admin}/metrics")).await.text() };
    let mut text = scrape().await;
    let until = Instant::now() + Duration::from_secs(10);
    while metric(&text, "wechat_relay_outbox_pending", &[("target", "t")]) != Some(0.0)
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape().await;
    }
    let pushes = |labels: &[(&str, &str)]| metric(&text, "wechat_relay_pushes_total", labels);
    assert_eq!(
        pushes(&[
            ("account", "main"),
            ("msg_type", "text"),
            ("outcome", "forwarded")
        ]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        pushes(&[("msg_type", "text"), ("outcome", "duplicate")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(pushes(&[("outcome", "rejected")]), Some(1.0), "{text}");
    assert_eq!(
        pushes(&[
            ("msg_type", "event"),
            ("event", "subscribe"),
            ("outcome", "unrouted")
        ]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "wechat_relay_rejected_total",
            &[("account", "main"), ("reason", "signature")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "wechat_relay_forwards_total",
            &[("target", "t"), ("status", "200")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            "wechat_relay_forward_seconds_count",
            &[("target", "t")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "wechat_relay_reply_seconds_count", &[]),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &text,
            "wechat_relay_dedupe_hits_total",
            &[("account", "main")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "wechat_relay_outbox_pending", &[("target", "t")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "wechat_relay_dead_letters", &[("target", "t")]),
        Some(0.0)
    );
    for private in [OPENID, TOKEN, KEY, "private-"] {
        assert!(!text.contains(private), "{private:?} in the metrics");
    }

    relay.signal("HUP");
    relay.wait_for("config reloaded");
    let text = get(&format!("http://{admin}/metrics")).await.text();
    assert_eq!(
        metric(
            &text,
            "wechat_relay_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn systemd_hears_ready_reloading_stopping_and_the_watchdog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let notify = socket_path.to_string_lossy().into_owned();
    let (_t, mut relay) = one_target(
        &dir,
        "",
        &[
            ("NOTIFY_SOCKET", notify.as_str()),
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .await;
    let mut buffer = [0u8; 512];
    let mut next = || {
        let n = socket.recv(&mut buffer).expect("a notification");
        String::from_utf8_lossy(&buffer[..n]).trim_end().to_owned()
    };
    // READY first (sent after the listener is bound), then watchdog pings every 100 ms.
    let mut seen = vec![next()];
    assert_eq!(seen[0], "READY=1");
    let started = Instant::now();
    while seen.iter().filter(|m| *m == "WATCHDOG=1").count() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "watchdog pings: {seen:?}"
        );
        seen.push(next());
    }
    relay.signal("HUP");
    let mut reloading = next();
    while reloading == "WATCHDOG=1" {
        reloading = next();
    }
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    let mut ready = next();
    while ready == "WATCHDOG=1" {
        ready = next();
    }
    assert_eq!(ready, "READY=1");
    relay.signal("TERM");
    let mut stopping = next();
    while stopping == "WATCHDOG=1" {
        stopping = next();
    }
    assert_eq!(stopping, "STOPPING=1");
    let (exit, _) = relay.wait_exit();
    assert!(exit.success());
}

#[tokio::test]
async fn reloads_that_replace_a_busy_target_never_attempt_one_delivery_twice_at_once() {
    // The target holds each request 2 s, then answers 503: the first attempt is in flight
    // while the target is changed twice, removed and added back.
    let mut slow = FakeTarget::with(Behaviour {
        delay: Duration::from_secs(2),
        ..Behaviour {
            status: http::StatusCode::SERVICE_UNAVAILABLE,
            ..Behaviour::default()
        }
    })
    .await;
    let other = FakeTarget::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (slow_url, other_url) = (slow.url("/a"), other.url("/b"));
    let variant = |timeout: u64, with_a: bool| {
        let mut toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n[store]\npath = \"data\"\n{}",
            account_section("main", "/wechat", "safe")
        );
        if with_a {
            toml.push_str(&target_section(
                "a",
                &slow_url,
                "raw",
                &format!("timeout_ms = {timeout}\nretry_initial_ms = 50"),
            ));
        }
        toml.push_str(&target_section("b", &other_url, "raw", ""));
        toml.push_str(if with_a {
            "[[route]]\nto = [\"a\"]\n"
        } else {
            "[[route]]\nto = [\"b\"]\n"
        });
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, toml).expect("config");
        path
    };
    let path = variant(5000, true);
    let relay = Binary::start(&path);
    let (query, body) = PushBuilder::new(text_xml("busy", 1)).safe();
    assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
    let first = slow.next().await;
    let started = Instant::now();
    for (timeout, with_a) in [(5001, true), (5002, true), (5002, false), (5003, true)] {
        variant(timeout, with_a);
        relay.signal("HUP");
        if with_a {
            relay.wait_for("config reloaded");
        } else {
            // The two lines come from two tasks, in either order.
            let lines = relay.wait_for_all(&[
                "config reloaded",
                "pending deliveries for a target that is not configured",
            ]);
            assert!(
                lines[1].contains("target=a") && lines[1].contains("pending=1"),
                "{lines:?}"
            );
        }
    }
    // Until the first attempt ends, no worker, old or new, sends the delivery again.
    let open = Duration::from_millis(1800).saturating_sub(started.elapsed());
    assert!(
        !open.is_zero(),
        "the reloads took too long to prove anything"
    );
    slow.expect_none(open).await;
    // Then it is retried, by the current worker, as attempt 2.
    slow.set(Behaviour::default());
    let again = slow.next().await;
    assert_eq!(
        again.header("x-wechat-relay-event-id"),
        first.header("x-wechat-relay-event-id")
    );
    assert_eq!(again.header("x-wechat-relay-attempt"), Some("2"));
}

#[tokio::test]
async fn json_logs_carry_the_push_line_and_content_only_when_asked() {
    for content in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        // The level comes from [log], not RUST_LOG.
        let (mut t, relay) = one_target(
            &dir,
            &format!("[log]\nformat = \"json\"\nlevel = \"info\"\ncontent = {content}\n"),
            &[("RUST_LOG", "")],
        )
        .await;
        let (query, body) = PushBuilder::new(text_xml("a private hello", 1)).safe();
        assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
        t.next().await;
        let line = relay.wait_for("\"message\":\"push\"");
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(json["level"], "INFO");
        assert_eq!(json["account"], "main");
        assert_eq!(json["outcome"], "forwarded");
        assert_eq!(json["msg_type"], "text");
        assert_eq!(json["event_id"].as_str().map(str::len), Some(32));
        if content {
            assert_eq!(json["content"], "a private hello");
        } else {
            assert!(json.get("content").is_none(), "{line}");
            assert!(!line.contains("private"), "{line}");
        }
    }

    // [log] level = "warn" (for the handler): no info line per push, the refusal's warning still.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut t, mut relay) = one_target(
        &dir,
        // The startup line (service) stays visible so the test can find the port.
        "[log]\nformat = \"json\"\nlevel = \"warn,wechat_relay::service=info\"\n",
        &[("RUST_LOG", "")],
    )
    .await;
    let (query, body) = PushBuilder::new(text_xml("quiet", 1)).safe();
    let url = relay.url(&format!("/wechat?{query}"));
    assert_success(&post(&url, body.clone()).await);
    t.next().await;
    let forged = url.replace("signature=", "signature=0");
    assert_eq!(post(&forged, body).await.status, 403);
    let refused = relay.wait_for("request refused");
    assert!(refused.contains("\"level\":\"WARN\""), "{refused}");
    relay.signal("TERM");
    let (_, rest) = relay.wait_exit();
    assert!(
        !rest.iter().any(|l| l.contains("\"message\":\"push\"")),
        "{rest:?}"
    );
}

#[tokio::test]
async fn https_with_a_self_signed_certificate_swapped_on_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = self_signed(dir.path());
    let (mut t, relay) = one_target(
        &dir,
        "[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
        &[],
    )
    .await;
    let https = relay.url("/wechat").replace("http://", "https://");
    let (query, body) = PushBuilder::new(text_xml("over tls", 1)).safe();
    let answer = post_https(&format!("{https}?{query}"), body, &first)
        .await
        .expect("an HTTPS answer");
    assert_success(&answer);
    t.next().await;
    // Plain HTTP to the TLS port gets no answer.
    let (query, body) = PushBuilder::new(text_xml("plain", 2)).safe();
    assert!(
        tokio::time::timeout(
            Duration::from_secs(3),
            client().request(
                http::Request::post(relay.url(&format!("/wechat?{query}")))
                    .body(http_body_util::Full::new(Bytes::from(body)))
                    .expect("request")
            )
        )
        .await
        .map_or(true, |r| r.is_err()),
        "plain HTTP is not served on a TLS listener"
    );

    // A new certificate in the same files, then SIGHUP: new connections get it.
    let second = self_signed(dir.path());
    relay.signal("HUP");
    relay.wait_for("config reloaded");
    let (query, body) = PushBuilder::new(text_xml("new cert", 3)).safe();
    assert_success(
        &post_https(&format!("{https}?{query}"), body.clone(), &second)
            .await
            .expect("the new certificate is served"),
    );
    assert!(
        post_https(&format!("{https}?{query}"), body, &first)
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
}
