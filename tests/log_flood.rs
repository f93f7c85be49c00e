//! A flood cannot flood the journal: refusals are logged at most a few lines a second per
//! reason, and the failures of a target that is down at most a few a second per target, each
//! with a summary line of how many were left out, while the metrics count every one. The real
//! binary, its stderr and its admin listener.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use wechat_relay::telemetry::limit::{BURST, PER_SECOND};

const REFUSED: usize = 10_000;
const SUMMARY: &str = "similar refusals suppressed";
/// Requests in flight at once.
const CLIENTS: usize = 32;

/// A plaintext account routing everything to target `t` at `target_url` (with `route_extra`
/// in the route), with the admin listener on: the relay, with its startup lines read, and the
/// admin address.
fn start(
    dir: &tempfile::TempDir,
    target_url: &str,
    target_extra: &str,
    route_extra: &str,
) -> (Binary, String) {
    let mut toml = server_section(2000, 300);
    toml.push_str("[admin]\nlisten = \"127.0.0.1:0\"\n");
    toml.push_str(&account_section("main", "/wechat", "plaintext"));
    toml.push_str(&target_section("t", target_url, "plain", target_extra));
    toml.push_str(&format!("[[route]]\nto = [\"t\"]\n{route_extra}"));
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("write relay.toml");
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    let _ = relay.drain_lines();
    (relay, admin)
}

/// `count` distinct genuine pushes, each answered `success`.
async fn push_many(relay: &Binary, count: usize) {
    for i in 0..count {
        let (query, body) = PushBuilder::new(text_xml("push", i as u64)).plaintext();
        assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
    }
}

/// The summary lines among `lines` that contain `needle`, and what they sum up.
fn summaries<'a>(lines: &'a [String], needle: &str) -> (Vec<&'a String>, usize) {
    let found: Vec<&String> = lines.iter().filter(|l| l.contains(needle)).collect();
    let summed = found.iter().map(|l| suppressed(l)).sum();
    (found, summed)
}

/// The most lines a limited key may write in `elapsed`: its burst, its rate, and one summary
/// a second (the limiter's thread), with a second of slack at each end.
fn allowed_lines(elapsed: Duration) -> usize {
    let seconds = elapsed.as_secs() as usize + 2;
    BURST as usize + seconds * (PER_SECOND as usize + 1)
}

/// The `suppressed=N` of a summary line.
fn suppressed(line: &str) -> usize {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("suppressed="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no suppressed= in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_bad_signatures_write_a_few_dozen_lines_and_are_all_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = FakeTarget::start().await;
    let (relay, admin) = start(&dir, &target.url("/"), "", "");

    let (query, body) = PushBuilder::new(text_xml("forged", 1)).plaintext();
    let url = Arc::new(relay.url(&format!(
        "/wechat?{}",
        query.replacen("signature=", "signature=0", 1)
    )));
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (url, body) = (Arc::clone(&url), bytes::Bytes::from(body.clone()));
        clients.push(tokio::spawn(async move {
            // One keep-alive connection per client.
            let client = client();
            let mut statuses = Vec::new();
            for _ in (c..REFUSED).step_by(CLIENTS) {
                let request = http::Request::post(url.as_str())
                    .body(http_body_util::Full::new(body.clone()))
                    .expect("request");
                let response = client.request(request).await.expect("an answer");
                statuses.push(response.status().as_u16());
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
            }
            statuses
        }));
    }
    for client in clients {
        let statuses = client.await.expect("client");
        assert!(statuses.iter().all(|s| *s == 403), "{statuses:?}");
    }
    let flood = started.elapsed();

    // Every refusal is either a line or in a summary; the limiter's thread sums up the rest
    // within a second or so of the flood's end.
    let logged = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("request refused"))
            .count()
    };
    let mut lines = Vec::new();
    let patience = Instant::now() + Duration::from_secs(10);
    while logged(&lines) + summaries(&lines, SUMMARY).1 < REFUSED && Instant::now() < patience {
        std::thread::sleep(Duration::from_millis(200));
        lines.extend(relay.drain_lines());
    }
    let (summaries, summed) = summaries(&lines, SUMMARY);
    let logged = logged(&lines);
    assert!(
        summaries.iter().all(|l| l.contains("reason=signature")),
        "{summaries:#?}"
    );
    let summaries = summaries.len();
    println!(
        "{REFUSED} refusals in {} ms: {} log lines ({logged} refusals, {summaries} summaries of {summed})",
        flood.as_millis(),
        lines.len()
    );
    assert_eq!(logged + summed, REFUSED, "{lines:#?}");
    assert!(summaries >= 1, "a summary line: {lines:#?}");
    assert!(
        lines.len() <= allowed_lines(started.elapsed()),
        "{} lines in {:?}: {lines:#?}",
        lines.len(),
        started.elapsed()
    );

    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    let labels = [("account", "main"), ("reason", "signature")];
    assert_eq!(
        metric(&metrics, "wechat_relay_rejected_total", &labels),
        Some(REFUSED as f64),
        "{metrics}"
    );
    target.expect_none(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_does_not_flood_the_log_with_its_failures() {
    const PUSHES: usize = 200;
    // An address nothing listens on: every attempt is refused at once.
    let down = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/", down.local_addr().expect("addr"));
    drop(down);
    let dir = tempfile::tempdir().expect("tempdir");
    // Retries come fast (10 ms, doubling to 1 s) so that there are many failures. The target
    // is also the reply target: each push's synchronous attempt fails too (`forward failed`).
    let (relay, admin) = start(
        &dir,
        &url,
        "retry_initial_ms = 10\nretry_max_ms = 1000\nmax_attempts = 1000\n",
        "reply = \"t\"\n",
    );

    let started = Instant::now();
    push_many(&relay, PUSHES).await;
    // Let the retries run for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    let attempts = metric(
        &metrics,
        "wechat_relay_forwards_total",
        &[("target", "t"), ("status", "error")],
    )
    .unwrap_or(0.0) as usize;
    std::thread::sleep(Duration::from_millis(1500));
    let lines = relay.drain_lines();
    let elapsed = started.elapsed();

    let failures: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("delivery failed; will retry") || l.contains("forward failed"))
        .collect();
    assert!(
        failures.iter().any(|l| l.contains("forward failed")),
        "the reply target's attempts are logged (and limited) too: {failures:#?}"
    );
    let (summaries, summed) = summaries(&lines, "similar delivery failures suppressed");
    println!(
        "{attempts} failed attempts in {} ms: {} failure lines, {} summaries of {summed}",
        elapsed.as_millis(),
        failures.len(),
        summaries.len()
    );
    assert!(
        attempts >= 2 * PUSHES,
        "every push failed, most more than once: {attempts}"
    );
    assert!(
        failures.len() + summaries.len() <= allowed_lines(elapsed),
        "{} failure lines in {elapsed:?}",
        failures.len()
    );
    assert!(
        summaries.iter().all(|l| l.contains("target=t")),
        "{summaries:#?}"
    );
    // What was scraped was logged or summed up by the time of the last summary.
    assert!(
        failures.len() + summed >= attempts,
        "{} lines + {summed} suppressed < {attempts} attempts",
        failures.len()
    );
    assert!(
        lines.iter().all(|l| !l.contains("dead letter")),
        "no dead letter yet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_limited_per_target_and_all_kept() {
    const PUSHES: usize = 100;
    // A 400 is final: every push becomes a dead letter at its first attempt.
    let target = FakeTarget::with(Behaviour {
        status: http::StatusCode::BAD_REQUEST,
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (relay, admin) = start(&dir, &target.url("/"), "", "");

    let started = Instant::now();
    push_many(&relay, PUSHES).await;
    let labels = [("target", "t")];
    let patience = Instant::now() + Duration::from_secs(10);
    let mut dead = 0.0;
    while dead < PUSHES as f64 && Instant::now() < patience {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let metrics = get(&format!("http://{admin}/metrics")).await.text();
        dead = metric(&metrics, "wechat_relay_dead_letters", &labels).unwrap_or(0.0);
    }
    assert_eq!(dead, PUSHES as f64, "every push is a dead letter");
    std::thread::sleep(Duration::from_millis(1500));
    let lines = relay.drain_lines();
    let logged = lines
        .iter()
        .filter(|l| l.contains("dead letter (see"))
        .count();
    let (summaries, summed) = summaries(&lines, "similar dead letters suppressed");
    println!(
        "{PUSHES} dead letters in {} ms: {logged} lines, {} summaries of {summed}",
        started.elapsed().as_millis(),
        summaries.len()
    );
    assert_eq!(logged + summed, PUSHES, "{lines:#?}");
    assert!(
        logged + summaries.len() <= allowed_lines(started.elapsed()),
        "{lines:#?}"
    );
    assert!(
        summaries
            .iter()
            .all(|l| l.contains("target=t") && l.contains("ERROR")),
        "{summaries:#?}"
    );
}
