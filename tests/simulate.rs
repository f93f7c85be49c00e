//! `wechat-relay simulate`, the real binary, against a relay started by the test: pushes and
//! URL checks round-trip in plaintext and safe mode, and failures exit 1 with one line.

mod common;

use common::*;
use wechat_relay::wechat::crypto::AesKey;
use wechat_relay::wechat::message::Fields;

const DEFAULT_OPENID: &str = "o_simulate_0000000000000000";

/// A relay with one account at `/wechat` in `mode`, everything routed to `target` as `plain`,
/// and `route_extra` in the route (`reply_text = "..."`, say).
async fn relay(mode: &str, target: &FakeTarget, route_extra: &str) -> TestRelay {
    TestRelay::start(&config(mode, "127.0.0.1:0", target, route_extra)).await
}

fn config(mode: &str, listen: &str, target: &FakeTarget, route_extra: &str) -> String {
    format!(
        "{}{}{}[[route]]\nto = [\"t\"]\n{route_extra}\n",
        server_section(3000, 300).replace("127.0.0.1:0", listen),
        account_section("main", "/wechat", mode),
        target_section("t", &target.url("/hook"), "plain", ""),
    )
}

/// `wechat-relay simulate --config <relay's config> <args>`, off the runtime that serves the
/// in-process relay: exit code, stdout, stderr.
async fn simulate(config: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all: Vec<String> = vec!["simulate".into(), "--config".into()];
    all.push(config.to_string_lossy().into_owned());
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        cli(&args)
    })
    .await
    .expect("simulate ran")
}

/// [`simulate`], asserting exit 0: stdout.
async fn simulate_ok(config: &std::path::Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = simulate(config, args).await;
    assert_eq!(
        code,
        Some(0),
        "{args:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    stdout
}

/// `toml` as relay.toml in a fresh folder (gone when the `TempDir` is dropped).
fn config_file(toml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("write config");
    (dir, path)
}

/// A copy of the relay's config with another token: an operator's stale relay.toml.
fn with_wrong_token(relay: &TestRelay) -> (tempfile::TempDir, std::path::PathBuf) {
    let toml = std::fs::read_to_string(&relay.config).expect("config");
    config_file(&toml.replace(TOKEN, "wrongToken2024"))
}

/// The push a `plain` target received, as fields.
fn fields(received: &Received) -> Fields {
    Fields::parse(&received.body).expect("the target gets message XML")
}

/// A port nobody listens on (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn text_round_trip(mode: &str, sealed: bool) {
    let mut target = FakeTarget::start().await;
    let relay = relay(mode, &target, "reply_text = \"Welcome aboard\"").await;
    let url = relay.url("/wechat");
    let (code, stdout, stderr) = simulate(&relay.config, &["--text", "hello", "--url", &url]).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains(&format!("POST {url} (account main, {mode} mode")));
    assert!(stdout.contains("HTTP 200 OK"), "{stdout}");
    // The reply is shown opened: its text, never the Encrypt blob.
    assert!(
        stdout.contains("<Content><![CDATA[Welcome aboard]]></Content>"),
        "{stdout}"
    );
    assert!(!stdout.contains("<Encrypt>"), "{stdout}");
    assert_eq!(
        stdout.contains("MsgSignature verified, decrypted"),
        sealed,
        "{stdout}"
    );
    // Neither the token nor the key is printed.
    assert!(!stdout.contains(TOKEN) && !stdout.contains(KEY) && !stderr.contains(TOKEN));

    let got = fields(&target.next().await);
    assert_eq!(got.get("MsgType"), Some("text"));
    assert_eq!(got.get("Content"), Some("hello"));
    assert_eq!(got.get("FromUserName"), Some(DEFAULT_OPENID));
    assert_eq!(got.get("ToUserName"), Some("gh_simulate"));
    assert!(got.get("MsgId").is_some_and(|id| id.parse::<u64>().is_ok()));
    relay.stop().await;
}

#[tokio::test]
async fn text_round_trips_in_plaintext_mode() {
    text_round_trip("plaintext", false).await;
}

#[tokio::test]
async fn text_round_trips_in_safe_mode_with_the_reply_decrypted() {
    text_round_trip("safe", true).await;
}

/// `simulate <event args> --url <relay>` against a relay routing everything to a `plain`
/// target with no reply: stdout and the message the target received.
async fn push_event(mode: &str, args: &[&str]) -> (String, Fields) {
    let mut target = FakeTarget::start().await;
    let relay = relay(mode, &target, "").await;
    let url = relay.url("/wechat");
    let mut args = args.to_vec();
    args.extend(["--url", &url]);
    let stdout = simulate_ok(&relay.config, &args).await;
    assert!(stdout.contains("HTTP 200 OK"), "{stdout}");
    assert!(stdout.contains("reply: success"), "{stdout}");
    let got = fields(&target.next().await);
    relay.stop().await;
    (stdout, got)
}

async fn qr_subscribe_reaches_the_target(mode: &str) {
    let qr_subscribe = ["--event", "subscribe", "--event-key", "qrscene_42"];
    let (stdout, got) = push_event(mode, &qr_subscribe).await;
    assert!(
        stdout.contains("(random)"),
        "a generated ticket says so: {stdout}"
    );
    assert_eq!(
        got.get("Encrypt"),
        None,
        "the plain target gets the message decrypted"
    );
    assert_eq!(got.get("MsgType"), Some("event"));
    assert_eq!(got.get("Event"), Some("subscribe"));
    assert_eq!(got.get("EventKey"), Some("qrscene_42"));
    let ticket = got.get("Ticket").expect("a Ticket");
    assert!(!ticket.is_empty());
    assert!(stdout.contains(&format!("Ticket {ticket}")), "{stdout}");
}

#[tokio::test]
async fn qr_subscribe_reaches_a_plain_target_decrypted_in_safe_mode() {
    qr_subscribe_reaches_the_target("safe").await;
}

#[tokio::test]
async fn qr_subscribe_reaches_a_plain_target_in_plaintext_mode() {
    qr_subscribe_reaches_the_target("plaintext").await;
}

#[tokio::test]
async fn given_ticket_from_and_to_are_sent_as_given() {
    let scan = [
        "--account",
        "main",
        "--event",
        "SCAN",
        "--event-key",
        "42",
        "--ticket",
        "gQH47jo",
        "--from",
        OPENID,
        "--to",
        GH,
    ];
    let (stdout, got) = push_event("safe", &scan).await;
    assert!(!stdout.contains("(random)"), "{stdout}");
    assert_eq!(got.get("Event"), Some("SCAN"));
    assert_eq!(got.get("EventKey"), Some("42"));
    assert_eq!(got.get("Ticket"), Some("gQH47jo"));
    assert_eq!(got.get("FromUserName"), Some(OPENID));
    assert_eq!(got.get("ToUserName"), Some(GH));
    // A plain follow carries no Ticket.
    let (_, got) = push_event("safe", &["--event", "subscribe"]).await;
    assert_eq!((got.get("EventKey"), got.get("Ticket")), (None, None));
}

#[tokio::test]
async fn verify_url_passes_and_fails_with_a_wrong_token() {
    let target = FakeTarget::start().await;
    for mode in ["plaintext", "safe"] {
        let relay = relay(mode, &target, "").await;
        let url = relay.url("/wechat");
        let stdout = simulate_ok(&relay.config, &["--verify-url", "--url", &url]).await;
        assert!(stdout.contains(&format!("GET {url}")), "{stdout}");
        assert!(stdout.contains("echo matched"), "{stdout}");

        let (_dir, wrong) = with_wrong_token(&relay);
        let (code, stdout, stderr) = simulate(&wrong, &["--verify-url", "--url", &url]).await;
        assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
        assert!(stdout.contains("HTTP 403 Forbidden"), "{stdout}");
        assert!(!stdout.contains("echo matched"), "{stdout}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("URL check failed"), "{stderr}");
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_push_signed_with_a_wrong_token_exits_1() {
    let target = FakeTarget::start().await;
    let relay = relay("safe", &target, "").await;
    let (_dir, wrong) = with_wrong_token(&relay);
    let url = relay.url("/wechat");
    let (code, stdout, stderr) = simulate(&wrong, &["--text", "hi", "--url", &url]).await;
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("HTTP 403 Forbidden"), "{stdout}");
    assert!(
        stdout.contains("answer: signature does not match"),
        "{stdout}"
    );
    assert!(
        stderr.contains("the relay answered 403 Forbidden"),
        "{stderr}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_default_url_comes_from_listen_and_the_account_path() {
    let mut target = FakeTarget::start().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (_dir, path) = config_file(&config(
        "safe",
        &listen,
        &target,
        "reply_text = \"from the binary\"",
    ));
    let _binary = Binary::start(&path);

    let stdout = simulate_ok(&path, &["--text", "hello"]).await;
    assert!(
        stdout.contains(&format!("POST http://{listen}/wechat ")),
        "{stdout}"
    );
    assert!(stdout.contains("from the binary"), "{stdout}");
    assert_eq!(fields(&target.next().await).get("Content"), Some("hello"));

    let stdout = simulate_ok(&path, &["--verify-url"]).await;
    assert!(stdout.contains("echo matched"), "{stdout}");
}

#[tokio::test]
async fn a_relay_that_is_not_running_exits_1_with_one_line() {
    let target = FakeTarget::start().await;
    let port = free_port();
    let (_dir, path) = config_file(&config("safe", &format!("127.0.0.1:{port}"), &target, ""));
    for args in [&["--text", "hello"][..], &["--verify-url"][..]] {
        let (code, stdout, stderr) = simulate(&path, args).await;
        assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("cannot reach http://127.0.0.1:{port}/wechat"))
                && stderr.contains("refused"),
            "{stderr}"
        );
    }
}

/// A server that answers every request with a reply sealed with `key` and `token`.
async fn answering_sealed(key: &AesKey, token: &str) -> FakeTarget {
    let reply = wechat_relay::wechat::crypto::seal_reply(
        key,
        APP_ID,
        token,
        b"<xml><Content>x</Content></xml>",
        "1",
        "2",
        &[0; 16],
    );
    FakeTarget::with(Behaviour {
        body: reply.into(),
        content_type: "text/xml",
        ..Behaviour::default()
    })
    .await
}

#[tokio::test]
async fn a_sealed_reply_whose_msg_signature_does_not_verify_is_reported() {
    // A stand-in for a relay that seals its reply with another token.
    let fake = answering_sealed(&sender().key.expect("key"), "anotherToken").await;
    let target = FakeTarget::start().await;
    let (_dir, path) = config_file(&config("safe", "127.0.0.1:0", &target, ""));
    let (code, stdout, stderr) =
        simulate(&path, &["--text", "hi", "--url", &fake.url("/wechat")]).await;
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("HTTP 200 OK"), "{stdout}");
    assert!(stdout.contains("MsgSignature does NOT verify"), "{stdout}");
    assert!(stderr.contains("does not verify"), "{stderr}");
}

#[test]
fn a_bad_command_line_or_account_exits_2() {
    let (_dir, path) = config_file(&format!(
        "{}{}[[route]]\nto = [\"t\"]\n",
        account_section("main", "/wechat", "safe"),
        target_section("t", "http://127.0.0.1:9/", "plain", "")
    ));
    let config = path.to_string_lossy().into_owned();
    let unknown_account = [
        "simulate",
        "--config",
        &config,
        "--text",
        "a",
        "--account",
        "other",
    ];
    for args in [
        &["simulate", "--config", &config][..],
        &[
            "simulate", "--config", &config, "--text", "a", "--event", "CLICK",
        ],
        &[
            "simulate", "--config", &config, "--text", "a", "--url", "ftp://h/",
        ],
        &[
            "simulate", "--config", &config, "--text", "a", "--from", "o 1",
        ],
        &[
            "simulate",
            "--config",
            "/nonexistent/relay.toml",
            "--text",
            "a",
        ],
        &unknown_account,
    ] {
        let (code, _, stderr) = cli(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
    }
    let (_, _, stderr) = cli(&unknown_account);
    assert!(
        stderr.contains("no [[account]] named \"other\" in the config (it has: main)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn repeat_resends_the_same_push_and_gets_the_cached_answer() {
    // reply_text in safe mode: every sealing has a fresh nonce, so only the cached answer is
    // the same bytes again.
    let mut target = FakeTarget::start().await;
    let relay = relay("safe", &target, "reply_text = \"Welcome aboard\"").await;
    let url = relay.url("/wechat");
    let stdout = simulate_ok(
        &relay.config,
        &["--text", "hello", "--url", &url, "--repeat", "2"],
    )
    .await;
    assert!(
        stdout.contains("<Content><![CDATA[Welcome aboard]]></Content>"),
        "{stdout}"
    );
    for retry in ["retry 1 of 2", "retry 2 of 2"] {
        assert!(
            stdout.contains(&format!(
                "{retry}: HTTP 200 OK, the same bytes as the first answer (the relay's cached answer)"
            )),
            "{stdout}"
        );
    }
    // The same push each time (the same MsgId and CreateTime): the target gets it once.
    target.next().await;
    target
        .expect_none(std::time::Duration::from_millis(500))
        .await;
    relay.stop().await;
}

#[tokio::test]
async fn repeat_reports_a_retry_that_gets_another_answer() {
    // A stand-in for a relay that handles every retry afresh: its second answer differs.
    let mut fake = FakeTarget::with(Behaviour {
        // Holds the first answer until the next behaviour is set.
        delay: std::time::Duration::from_millis(300),
        ..Behaviour::default()
    })
    .await;
    let url = fake.url("/wechat");
    let behaviour = fake.behaviour();
    let changed = tokio::spawn(async move {
        fake.next().await;
        *behaviour.lock().expect("lock") = Behaviour {
            body: bytes::Bytes::from_static(b""),
            ..Behaviour::default()
        };
        fake
    });
    let target = FakeTarget::start().await;
    let (_dir, path) = config_file(&config("safe", "127.0.0.1:0", &target, ""));
    let (code, stdout, stderr) =
        simulate(&path, &["--text", "hi", "--url", &url, "--repeat", "1"]).await;
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("reply: success"), "{stdout}");
    assert!(
        stdout.contains("retry 1 of 1: HTTP 200 OK, NOT the first answer"),
        "{stdout}"
    );
    assert!(
        stderr.contains("retry 1 got another answer than the first push"),
        "{stderr}"
    );
    changed.await.expect("the stand-in");
}

#[tokio::test]
async fn a_reply_sealed_with_another_key_says_the_encoding_aes_key_does_not_match() {
    // A raw reply target (an identity provider) with the right token and another key.
    let other =
        AesKey::from_encoding_aes_key("AnotherEncodingAESKey0123456789abcdefghijkl").expect("key");
    let provider = answering_sealed(&other, TOKEN).await;
    let toml = format!(
        "{}{}{}[[route]]\nto = [\"idp\"]\nreply = \"idp\"\n",
        server_section(3000, 300),
        account_section("main", "/wechat", "safe"),
        target_section("idp", &provider.url("/events"), "raw", ""),
    );
    let relay = TestRelay::start(&toml).await;
    let (code, stdout, stderr) = simulate(
        &relay.config,
        &["--text", "hi", "--url", &relay.url("/wechat")],
    )
    .await;
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    for output in [&stdout, &stderr] {
        assert!(
            output.contains(
                "it does not decrypt with this account's EncodingAESKey: the key that sealed it \
                 (the relay's, or a raw reply target's) does not match the one in this relay.toml"
            ),
            "{output}"
        );
    }
    relay.stop().await;
}
