//! The `outbox` commands on a running relay (the real binary, `serve` and the commands in
//! processes of their own), issue #11: what `list` and `show` say about each delivery, `replay`
//! and `drop` of pending ones, `--json`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The business target's credentials: in its URL's user info and its own query.
const PASSWORD: &str = "hunter2secret";
const URL_KEY: &str = "s3cretApiKey";
const TICKET: &str = "gQH47joAAAAAAAAAASxodHRwOi8vd2VpeGluLnFxLmNvbS9xL2tIVXJ";

/// A Mode 2 relay: QR logins (`qr-login`) to `identity` (json, signed), everything else
/// (`catch-all`) to `business` at `business` (a port nobody listens on, until a test starts
/// a target there), which retries only after a minute.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    identity: FakeTarget,
    business: std::net::SocketAddr,
}

async fn setup(identity: Behaviour) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = FakeTarget::with(identity).await;
    let business = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut toml = server_section(2000, 300);
    toml.push_str(&format!(
        "[store]\npath = \"{}\"\n",
        dir.path().join("data").display()
    ));
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section(
        "identity",
        &identity.url("/login"),
        "json",
        &format!("secret = \"{WHSEC}\""),
    ));
    toml.push_str(&target_section(
        "business",
        &format!("http://ops:{PASSWORD}@{business}/hook?key={URL_KEY}"),
        "raw",
        "retry_initial_ms = 60000\nretry_max_ms = 60000\n",
    ));
    toml.push_str(
        "[[route]]\nname = \"qr-login\"\nmsg_type = [\"event\"]\nevent = [\"subscribe\", \"SCAN\"]\n\
         ticket = true\nto = [\"identity\"]\n\n[[route]]\nname = \"catch-all\"\nto = [\"business\"]\n",
    );
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, toml).expect("write config");
    Setup {
        _dir: dir,
        config,
        identity,
        business,
    }
}

/// `wechat-relay outbox <args> --config <relay.toml>`: exit code, stdout, stderr.
fn outbox(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let config = config.to_string_lossy().into_owned();
    let mut all = vec!["outbox"];
    all.extend_from_slice(args);
    all.extend(["--config", config.as_str()]);
    cli(&all)
}

/// The same, asserting exit 0; stdout.
fn ok(config: &Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = outbox(config, args);
    assert_eq!(code, Some(0), "outbox {args:?}: {stderr}");
    stdout
}

/// Polls `outbox <args>` until its stdout has `lines` lines (within 10 s).
fn until_lines(config: &Path, args: &[&str], lines: usize) -> String {
    let started = Instant::now();
    loop {
        let out = ok(config, args);
        if out.lines().count() == lines {
            return out;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "outbox {args:?}: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A QR login (subscribe with a ticket) and a text, each pushed to the relay and answered.
async fn push_login_and_text(relay: &Binary) {
    for xml in [
        event_xml("subscribe", "qrscene_42", Some(TICKET)),
        text_xml("hello business", 1),
    ] {
        let (query, body) = PushBuilder::new(xml).safe();
        assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
    }
}

fn status(code: u16) -> Behaviour {
    Behaviour {
        status: StatusCode::from_u16(code).expect("status"),
        ..Behaviour::default()
    }
}

/// The value of `key=` in a `key=value` line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_tells_a_qr_login_from_a_text_and_says_when_there_is_nothing() {
    let mut setup = setup(status(404)).await;
    let relay = Binary::start(&setup.config);
    for (args, none) in [
        (&["list"][..], "no pending deliveries"),
        (&["list", "--dead"][..], "no dead letters"),
        (
            &["list", "--target", "business"][..],
            "no pending deliveries for target business",
        ),
    ] {
        let (code, stdout, stderr) = outbox(&setup.config, args);
        assert_eq!((code, stdout.as_str()), (Some(0), ""), "{args:?}");
        assert_eq!(stderr.trim(), none, "{args:?}");
    }

    push_login_and_text(&relay).await;
    setup.identity.next().await;
    let dead = until_lines(&setup.config, &["list", "--dead"], 1);
    for (key, value) in [
        ("target", "identity"),
        ("account", "main"),
        ("type", "event"),
        ("event", "subscribe"),
        ("route", "qr-login"),
        ("attempts", "1"),
    ] {
        assert_eq!(field(&dead, key), value, "{dead}");
    }
    assert!(dead.contains("error=\"HTTP 404 (not retried)\""), "{dead}");
    let pending = until_lines(&setup.config, &["list"], 1);
    for (key, value) in [
        ("target", "business"),
        ("type", "text"),
        ("event", "-"),
        ("route", "catch-all"),
        ("attempts", "1"),
    ] {
        assert_eq!(field(&pending, key), value, "{pending}");
    }
    assert!(field(&pending, "age").ends_with('s'), "{pending}");
    assert!(
        pending.contains("error=\"client error (Connect)"),
        "{pending}"
    );
    assert_ne!(field(&dead, "id"), field(&pending, "id"));
    let _ = setup.business;
}

/// Every secret the config holds, and the ways one could be printed.
fn assert_no_secret(text: &str) {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("ops:{PASSWORD}"));
    for secret in [
        TOKEN,
        KEY,
        WHSEC,
        WHSEC.trim_start_matches("whsec_"),
        PASSWORD,
        URL_KEY,
        basic.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret} printed in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_gives_a_delivery_s_metadata_and_request_and_its_message_only_with_content() {
    let mut setup = setup(status(404)).await;
    let relay = Binary::start(&setup.config);
    push_login_and_text(&relay).await;
    let login = setup.identity.next().await;
    let event_id = login.header("x-wechat-relay-event-id").expect("event id");
    let dead = until_lines(&setup.config, &["list", "--dead"], 1);
    let pending = until_lines(&setup.config, &["list"], 1);

    let shown = ok(&setup.config, &["show", field(&dead, "id")]);
    for line in [
        "state: dead".to_owned(),
        "target: identity".to_owned(),
        "format: json".to_owned(),
        "account: main".to_owned(),
        format!("event_id: {event_id}"),
        "type: event".to_owned(),
        "event: subscribe".to_owned(),
        "route: qr-login".to_owned(),
        "attempts: 1".to_owned(),
        "last error: \"HTTP 404 (not retried)\"".to_owned(),
        format!("  POST {}", setup.identity.url("/login")),
        "  content-type: application/json".to_owned(),
        format!("  x-wechat-relay-event-id: {event_id}"),
        "  x-wechat-relay-attempt: 2".to_owned(),
        format!("  webhook-id: {event_id}"),
        "  webhook-signature: <computed when sent>".to_owned(),
    ] {
        assert!(shown.lines().any(|l| l == line), "{line:?} in\n{shown}");
    }
    assert!(shown.lines().any(|l| l.starts_with("died: ")), "{shown}");
    assert!(shown.contains("`--content` shows it"), "{shown}");
    assert!(
        !shown.contains(TICKET),
        "the message only with --content: {shown}"
    );
    assert_no_secret(&shown);
    let content = ok(&setup.config, &["show", field(&dead, "id"), "--content"]);
    assert!(
        content.contains(&format!("<Ticket><![CDATA[{TICKET}]]></Ticket>")),
        "{content}"
    );
    assert!(content.contains("message (decrypted):"), "{content}");
    assert_no_secret(&content);

    // A raw delivery: WeChat's query after the target's own (redacted), no credentials.
    let shown = ok(&setup.config, &["show", field(&pending, "id"), "--content"]);
    assert!(shown.contains("state: pending"), "{shown}");
    assert!(shown.contains("format: raw"), "{shown}");
    assert!(
        shown.lines().any(|l| l.starts_with("next attempt: ")),
        "{shown}"
    );
    let url = format!(
        "  POST http://<redacted>@{}/hook?<redacted>&signature=",
        setup.business
    );
    assert!(
        shown.lines().any(|l| l.starts_with(&url)),
        "{url} in\n{shown}"
    );
    assert!(shown.contains("  authorization: <redacted>"), "{shown}");
    assert!(shown.contains("hello business"), "{shown}");
    assert_no_secret(&shown);

    let (code, _, stderr) = outbox(&setup.config, &["show", "999999"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no delivery with id 999999"), "{stderr}");
}

/// `n` texts to the business target (down: each stays pending, retried in a minute).
async fn push_texts(relay: &Binary, n: u64) {
    for msg_id in 1..=n {
        let (query, body) = PushBuilder::new(text_xml("to business", msg_id)).safe();
        assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_target_makes_its_pending_deliveries_due_now_beside_the_running_relay() {
    let setup = setup(Behaviour::default()).await;
    let relay = Binary::start(&setup.config);
    push_texts(&relay, 2).await;
    // Both failed their first attempt (nobody listens); the next is a minute away.
    let pending = until_lines(&setup.config, &["list", "--target", "business"], 2);
    assert!(
        pending.lines().all(|l| field(l, "attempts") == "1"),
        "{pending}"
    );
    let mut business = FakeTarget::on(setup.business, Behaviour::default()).await;
    let replayed = ok(&setup.config, &["replay", "--target", "business"]);
    assert!(replayed.starts_with("replayed=2 "), "{replayed}");
    for _ in 0..2 {
        let got = business.next().await;
        assert_eq!(
            got.header("x-wechat-relay-attempt"),
            Some("1"),
            "a fresh count"
        );
    }
    until_lines(&setup.config, &["list"], 0);
    // Nothing pending for the identity target: nothing replayed.
    assert!(ok(&setup.config, &["replay", "--target", "identity"]).starts_with("replayed=0 "));

    // The usage line names every way to choose.
    let (code, _, stderr) = outbox(&setup.config, &["replay"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("<ID|--dead|--target <NAME>>"), "{stderr}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_deletes_pending_deliveries_only_with_yes_and_says_how_many() {
    let mut setup = setup(status(404)).await;
    let relay = Binary::start(&setup.config);
    push_texts(&relay, 3).await;
    push_login_and_text(&relay).await;
    setup.identity.next().await;
    let dead = until_lines(&setup.config, &["list", "--dead"], 1);
    let pending = until_lines(&setup.config, &["list"], 4);

    let (code, stdout, stderr) = outbox(&setup.config, &["drop", "--target", "business"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""));
    assert!(
        stderr.contains("this deletes the 4 pending deliveries of business for good")
            && stderr.contains("--yes"),
        "{stderr}"
    );
    until_lines(&setup.config, &["list"], 4);

    let first = field(pending.lines().next().expect("a line"), "id");
    assert_eq!(ok(&setup.config, &["drop", first, "--yes"]), "dropped=1\n");
    let (code, _, stderr) = outbox(&setup.config, &["drop", first, "--yes"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!("no pending delivery with id {first}")),
        "{stderr}"
    );
    // A dead letter is not dropped: purge deletes those.
    let (code, _, stderr) = outbox(&setup.config, &["drop", field(&dead, "id"), "--yes"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("is a dead letter"), "{stderr}");
    until_lines(&setup.config, &["list", "--dead"], 1);

    let dropped = ok(&setup.config, &["drop", "--target", "business", "--yes"]);
    assert_eq!(dropped, "dropped=3\n");
    let (_, stdout, stderr) = outbox(&setup.config, &["list"]);
    assert_eq!(
        (stdout.as_str(), stderr.trim()),
        ("", "no pending deliveries")
    );
    // Gone, not waiting: a replay finds nothing, and the running relay sends nothing.
    let mut business = FakeTarget::on(setup.business, Behaviour::default()).await;
    let replayed = ok(&setup.config, &["replay", "--target", "business"]);
    assert!(replayed.starts_with("replayed=0 "), "{replayed}");
    business.expect_none(Duration::from_millis(1500)).await;
    drop(relay);
}

/// `outbox <args> --json`, parsed (exit 0, nothing on stderr).
fn json(config: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, stdout, stderr) = outbox(config, &all);
    assert_eq!((code, stderr.as_str()), (Some(0), ""), "outbox {all:?}");
    assert_no_secret(&stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Asserts that the object `value` has each of `fields`.
fn assert_has<const N: usize>(value: &serde_json::Value, fields: [(&str, serde_json::Value); N]) {
    for (key, expected) in fields {
        assert_eq!(value[key], expected, "{key} in {value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_stats_show_replay_and_drop_speak_json() {
    use serde_json::{Value, json as doc};
    let mut setup = setup(status(404)).await;
    let relay = Binary::start(&setup.config);
    push_login_and_text(&relay).await;
    setup.identity.next().await;
    until_lines(&setup.config, &["list", "--dead"], 1);
    until_lines(&setup.config, &["list"], 1);

    let pending = json(&setup.config, &["list"]);
    assert_eq!(
        (&pending["state"], &pending["target"]),
        (&doc!("pending"), &Value::Null)
    );
    let [p] = pending["deliveries"]
        .as_array()
        .expect("deliveries")
        .as_slice()
    else {
        panic!("one pending delivery: {pending}");
    };
    assert_has(
        p,
        [
            ("state", doc!("pending")),
            ("target", doc!("business")),
            ("account", doc!("main")),
            ("msg_type", doc!("text")),
            ("event", Value::Null),
            ("route", doc!("catch-all")),
            ("attempts", doc!(1)),
            ("died_at", Value::Null),
        ],
    );
    assert!(p["id"].is_i64() && p["age_s"].is_u64(), "{p}");
    assert!(
        p["enqueued_at"].is_string() && p["next_attempt_at"].is_string(),
        "{p}"
    );
    assert!(
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Connect")),
        "{p}"
    );

    let dead = json(&setup.config, &["list", "--dead"]);
    let [d] = dead["deliveries"]
        .as_array()
        .expect("deliveries")
        .as_slice()
    else {
        panic!("one dead letter: {dead}");
    };
    assert_has(
        d,
        [
            ("state", doc!("dead")),
            ("target", doc!("identity")),
            ("msg_type", doc!("event")),
            ("event", doc!("subscribe")),
            ("route", doc!("qr-login")),
            ("next_attempt_at", Value::Null),
            ("last_error", doc!("HTTP 404 (not retried)")),
        ],
    );
    assert!(d["died_at"].is_string(), "{d}");
    // Nothing to list: an empty list, and no note.
    let none = json(&setup.config, &["list", "--target", "identity"]);
    assert_eq!(none["deliveries"], doc!([]), "{none}");
    assert_eq!(none["target"], doc!("identity"), "{none}");

    let stats = json(&setup.config, &["stats"]);
    assert_eq!(stats["dedupe_keys"], doc!(2), "{stats}");
    let targets = stats["targets"].as_array().expect("targets");
    let of = |name: &str| {
        targets
            .iter()
            .find(|t| t["target"] == name)
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };
    let identity = of("identity");
    assert_eq!(
        (
            &identity["configured"],
            &identity["pending"],
            &identity["dead"]
        ),
        (&doc!(true), &doc!(0), &doc!(1))
    );
    assert_eq!(identity["oldest_pending_age_s"], Value::Null);
    let business = of("business");
    assert_eq!(
        (&business["pending"], &business["dead"]),
        (&doc!(1), &doc!(0))
    );
    assert!(business["oldest_pending_age_s"].is_u64(), "{stats}");

    let id = d["id"].to_string();
    let shown = json(&setup.config, &["show", &id]);
    assert_eq!((&shown["id"], &shown["state"]), (&d["id"], &doc!("dead")));
    assert_eq!(
        (&shown["route"], &shown["format"]),
        (&doc!("qr-login"), &doc!("json"))
    );
    assert_eq!(shown["content"], Value::Null, "only with --content");
    assert!(shown["message_bytes"].is_u64(), "{shown}");
    let request = &shown["request"];
    assert_eq!(request["method"], "POST");
    assert_eq!(request["url"], doc!(setup.identity.url("/login")));
    let headers = request["headers"].as_array().expect("headers");
    assert!(
        headers.contains(&doc!({"name": "webhook-signature", "value": "<computed when sent>"})),
        "{shown}"
    );
    let content = json(&setup.config, &["show", &id, "--content"]);
    assert!(
        content["content"]
            .as_str()
            .is_some_and(|c| c.contains(TICKET)),
        "{content}"
    );

    assert_eq!(json(&setup.config, &["replay", &id]), doc!({"replayed": 1}));
    let pending_id = p["id"].to_string();
    assert_eq!(
        json(&setup.config, &["drop", &pending_id, "--yes"]),
        doc!({"dropped": 1})
    );
    drop(relay);
}
