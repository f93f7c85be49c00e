//! The real binary and its store: a SIGKILL in the middle of a stream of pushes loses no push
//! that was answered `success`, and repeats only deliveries that were in flight; a store that
//! cannot be used stops the start with a clear error.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use wechat_relay::wechat::message::Message;

const PUSHES: usize = 300;
const CONCURRENCY: usize = 4;

/// Safe mode, the store in `dir/data`, every push to both targets.
fn write_config(dir: &Path, steady: &FakeTarget, flappy: &FakeTarget) -> PathBuf {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n\
         [store]\npath = \"data\"\n{}\
         [[target]]\nname = \"steady\"\nurl = \"{}\"\nformat = \"raw\"\nconcurrency = {CONCURRENCY}\n\
         [[target]]\nname = \"flappy\"\nurl = \"{}\"\nformat = \"plain\"\nconcurrency = {CONCURRENCY}\n\
         retry_initial_ms = 20\nretry_max_ms = 200\nmax_attempts = 10000\n\
         [[route]]\nto = [\"steady\", \"flappy\"]\n",
        account_section("main", "/wechat", "safe"),
        steady.url("/steady"),
        flappy.url("/flappy"),
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    path
}

/// Sends `pushes[i]` for every `i` in `which` from 8 connections; returns the indexes answered
/// `success`. `answered` counts them as they come.
async fn send_all(
    relay_url: String,
    pushes: Arc<Vec<(String, String)>>,
    which: Vec<usize>,
    answered: Arc<AtomicUsize>,
) -> HashSet<usize> {
    let which = Arc::new(which);
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..8 {
        let (url, pushes, which) = (relay_url.clone(), Arc::clone(&pushes), Arc::clone(&which));
        let (next, answered) = (Arc::clone(&next), Arc::clone(&answered));
        senders.push(tokio::spawn(async move {
            let client = client();
            let mut ok = Vec::new();
            while let Some(&i) = which.get(next.fetch_add(1, Ordering::SeqCst)) {
                let (query, body) = &pushes[i];
                let request = http::Request::post(format!("{url}/wechat?{query}"))
                    .header("content-type", "text/xml")
                    .body(http_body_util::Full::new(Bytes::from(body.clone())))
                    .expect("request");
                let Ok(Ok(response)) =
                    tokio::time::timeout(Duration::from_secs(10), client.request(request)).await
                else {
                    continue;
                };
                let status = response.status();
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if status == StatusCode::OK && body == "success" {
                    ok.push(i);
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            }
            ok
        }));
    }
    let mut ok = HashSet::new();
    for sender in senders {
        ok.extend(sender.await.expect("sender"));
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_push_and_repeats_only_what_was_in_flight() {
    let mut steady = FakeTarget::start().await;
    let mut flappy = FakeTarget::start().await;
    // The flappy target answers 503 and 200 in turns of 30 ms.
    let flapping = flappy.behaviour();
    let flapper = tokio::spawn(async move {
        let mut up = false;
        loop {
            tokio::time::sleep(Duration::from_millis(30)).await;
            up = !up;
            let status = if up { 200 } else { 503 };
            flapping.lock().expect("lock").status = StatusCode::from_u16(status).expect("status");
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &steady, &flappy);

    // Distinct pushes, each with the event id the relay will give it.
    let mut pushes = Vec::new();
    let mut event_ids = Vec::new();
    for i in 0..PUSHES {
        let xml = text_xml(&format!("crash {i}"), 10_000 + i as u64);
        let message = Message::parse(Bytes::from(xml.clone())).expect("xml");
        event_ids.push(message.dedupe_key().event_id("main"));
        let mut builder = PushBuilder::new(xml);
        builder.nonce = format!("n{i}");
        pushes.push(builder.safe());
    }
    let pushes = Arc::new(pushes);

    // Send them all; SIGKILL the relay once about half are acknowledged.
    let mut relay = Binary::start(&config);
    let answered = Arc::new(AtomicUsize::new(0));
    let sending = tokio::spawn(send_all(
        relay.url(""),
        Arc::clone(&pushes),
        (0..PUSHES).collect(),
        Arc::clone(&answered),
    ));
    let started = Instant::now();
    while answered.load(Ordering::SeqCst) < PUSHES / 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "pushes are answered"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    relay.kill();
    let acknowledged = sending.await.expect("senders");
    assert!(
        acknowledged.len() >= PUSHES / 2 && acknowledged.len() < PUSHES,
        "the kill came mid-stream: {} acknowledged",
        acknowledged.len()
    );

    // Restart on the same store; WeChat retries what got no `success`.
    let relay = Binary::start(&config);
    let unanswered: Vec<usize> = (0..PUSHES).filter(|i| !acknowledged.contains(i)).collect();
    let retried = send_all(
        relay.url(""),
        Arc::clone(&pushes),
        unanswered.clone(),
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    assert_eq!(retried.len(), unanswered.len(), "every retry is answered");

    // Every push reaches both targets; count what each target took (answered 2xx).
    for (name, target) in [("steady", &mut steady), ("flappy", &mut flappy)] {
        let mut taken: HashMap<String, usize> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while taken.len() < PUSHES {
            assert!(
                Instant::now() < deadline,
                "{name}: {} of {PUSHES} pushes arrived",
                taken.len()
            );
            let got = target.next().await;
            if got.answered == StatusCode::OK {
                let id = got.header("x-wechat-relay-event-id").expect("event id");
                *taken.entry(id.to_owned()).or_default() += 1;
            }
        }
        // Let stragglers (repeats) arrive.
        let quiet = Instant::now() + Duration::from_secs(1);
        while let Ok(got) = tokio::time::timeout(
            quiet.saturating_duration_since(Instant::now()),
            target.next(),
        )
        .await
        {
            if got.answered == StatusCode::OK {
                let id = got.header("x-wechat-relay-event-id").expect("event id");
                *taken.entry(id.to_owned()).or_default() += 1;
            }
        }
        for id in &event_ids {
            assert!(taken.contains_key(id), "{name}: push {id} never arrived");
        }
        let repeats: usize = taken.values().map(|n| n - 1).sum();
        eprintln!(
            "{name}: {} acknowledged before the kill, {} retried after, {repeats} repeated",
            acknowledged.len(),
            unanswered.len()
        );
        assert!(
            repeats <= CONCURRENCY,
            "{name}: {repeats} repeated deliveries, more than the {CONCURRENCY} that can be in flight"
        );
    }
    flapper.abort();
    drop(relay);
}

#[test]
fn a_store_that_cannot_be_used_stops_the_start_with_a_clear_error() {
    let steady_url = "http://127.0.0.1:9/";
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |store: &str| {
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"{store}\"\n{}\
                 [[target]]\nname = \"t\"\nurl = \"{steady_url}\"\n[[route]]\nto = [\"t\"]\n",
                account_section("main", "/wechat", "safe")
            ),
        )
        .expect("config");
        path.to_string_lossy().into_owned()
    };

    // Not a database.
    std::fs::create_dir(dir.path().join("corrupt")).expect("mkdir");
    std::fs::write(
        dir.path().join("corrupt/relay.db"),
        "this is not SQLite ".repeat(400),
    )
    .expect("garbage");
    let (code, _, stderr) = cli(&["serve", "--config", &config("corrupt")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot open the store") && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A file where the folder should be.
    std::fs::write(dir.path().join("a-file"), "x").expect("file");
    let (code, _, stderr) = cli(&["serve", "--config", &config("a-file")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot create"), "{stderr}");

    // The outbox commands need a store that exists: they never create one.
    let (code, _, stderr) = cli(&["outbox", "stats", "--config", &config("missing")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no store at"), "{stderr}");
    assert!(!dir.path().join("missing").exists());
}

#[test]
fn two_relays_never_deliver_from_one_store_and_the_store_is_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"data\"\n{}\
             [[target]]\nname = \"t\"\nurl = \"http://127.0.0.1:9/\"\n[[route]]\nto = [\"t\"]\n",
            account_section("main", "/wechat", "safe")
        ),
    )
    .expect("config");
    let mut first = Binary::start(&path);
    // The store holds messages: private to the service.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(dir.path().join("data")), 0o700);
    assert_eq!(mode(dir.path().join("data/relay.db")), 0o600);
    assert_eq!(mode(dir.path().join("data/relay.db-wal")), 0o600);
    let (code, _, stderr) = cli(&["serve", "--config", &path.to_string_lossy()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by another wechat-relay"),
        "{stderr}"
    );
    // While it runs, the outbox commands work, with --config before or after the subcommand.
    let config = path.to_string_lossy().into_owned();
    for args in [
        vec!["--config", config.as_str(), "outbox", "stats"],
        vec!["outbox", "stats", "--config", config.as_str()],
        vec!["outbox", "list", "--dead", "--config", config.as_str()],
    ] {
        let (code, stdout, stderr) = cli(&args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        if args.contains(&"stats") {
            assert!(stdout.contains("target=t pending=0 dead=0"), "{stdout}");
        }
    }
    let (exit, _) = first.terminate();
    assert!(exit.success());
}
