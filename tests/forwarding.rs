//! Modes and formats end to end through the real server: what each kind of target receives.

mod common;

use std::time::Duration;

use common::*;
use wechat_relay::wechat::signature::verify_signature;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// A secret no target has.
const OTHER_WHSEC: &str = "whsec_cGxhaW4tdGFyZ2V0LXNpZ25pbmcta2V5Mg==";

fn config(mode: &str, targets: &[(&str, &FakeTarget, &str)], routes: &str) -> String {
    let targets: Vec<_> = targets
        .iter()
        .map(|&(name, target, format)| {
            let extra = if format == "json" {
                format!("secret = \"{WHSEC}\"")
            } else {
                String::new()
            };
            (name, target, format, extra)
        })
        .collect();
    config_with(mode, &targets, routes)
}

/// [`config`] with each target's own extra settings.
fn config_with(mode: &str, targets: &[(&str, &FakeTarget, &str, String)], routes: &str) -> String {
    let mut toml = server_section(4000, 300);
    toml.push_str(&account_section("main", "/wechat", mode));
    for (name, target, format, extra) in targets {
        toml.push_str(&target_section(name, &target.url("/hook"), format, extra));
    }
    toml.push_str(routes);
    toml
}

/// An account in `mode` routing everything to a raw, a plain and a json target.
async fn all_formats(mode: &str) -> (TestRelay, FakeTarget, FakeTarget, FakeTarget) {
    let raw = FakeTarget::start().await;
    let plain = FakeTarget::start().await;
    let json = FakeTarget::start().await;
    let relay = TestRelay::start(&config(
        mode,
        &[
            ("raw", &raw, "raw"),
            ("plain", &plain, "plain"),
            ("json", &json, "json"),
        ],
        "[[route]]\nto = [\"raw\", \"plain\", \"json\"]\n",
    ))
    .await;
    (relay, raw, plain, json)
}

#[tokio::test]
async fn safe_push_reaches_raw_plain_and_json_targets() {
    let (relay, mut raw, mut plain, mut json) = all_formats("safe").await;
    let xml = event_xml(
        "subscribe",
        "qrscene_42",
        Some("gQH47joAAAAAAAAAASxodHRwOi8v"),
    );
    let push = PushBuilder::new(&xml);
    let (query, body) = push.safe();
    let answer = post(&relay.url(&format!("/wechat?{query}")), body.clone()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "success");

    // raw: the original query and body, byte for byte, with the original Content-Type.
    let got = raw.next().await;
    assert_eq!(got.path, "/hook");
    assert_eq!(got.query.as_deref(), Some(query.as_str()));
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(got.header("content-type"), Some("text/xml"));
    let event_id = got
        .header("x-wechat-relay-event-id")
        .expect("event id")
        .to_owned();
    assert_eq!(event_id.len(), 32);
    assert_eq!(got.header("x-forwarded-for"), Some("127.0.0.1"));

    // plain: the decrypted XML, the query without encrypt_type and msg_signature; its
    // signature still verifies with the token, as a plaintext-mode handler checks it.
    let got = plain.next().await;
    assert_eq!(got.body, xml.as_bytes());
    let plain_query = got.query.clone().expect("query");
    assert!(!plain_query.contains("encrypt_type") && !plain_query.contains("msg_signature"));
    assert_eq!(plain_query, plain_query_of(&push));
    let param = |name: &str| {
        plain_query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .expect("param")
            .to_owned()
    };
    assert!(verify_signature(
        TOKEN,
        &param("timestamp"),
        &param("nonce"),
        &param("signature")
    ));
    assert_eq!(
        got.header("x-wechat-relay-event-id"),
        Some(event_id.as_str())
    );

    // json: Standard Webhooks headers and a signature any verifier accepts.
    let got = json.next().await;
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_signed(&got, WHSEC);
    assert_eq!(got.header("webhook-id"), Some(event_id.as_str()));
    let payload: serde_json::Value = serde_json::from_slice(&got.body).expect("json body");
    assert_eq!(payload["type"], "wechat.event.subscribe");
    assert_eq!(payload["data"]["account"], "main");
    assert_eq!(payload["data"]["event_id"], event_id);
    assert_eq!(payload["data"]["encrypted"], true);
    assert_eq!(payload["data"]["message"]["EventKey"], "qrscene_42");
    assert_eq!(payload["data"]["message"]["FromUserName"], OPENID);
    assert_eq!(payload["data"]["xml"], xml);
    relay.stop().await;
}

/// Asserts that `got` carries the Standard Webhooks headers and that the reference library
/// verifies them over its body with `secret` (and refuses them with another secret).
fn assert_signed(got: &Received, secret: &str) {
    for header in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        assert!(
            got.header(header).is_some(),
            "{header} in {:?}",
            got.headers
        );
    }
    let verifier = standardwebhooks::Webhook::new(secret).expect("a whsec_ secret");
    if let Err(e) = verifier.verify(&got.body, &got.headers) {
        panic!("the signature does not verify: {e}");
    }
    let other = standardwebhooks::Webhook::new(OTHER_WHSEC).expect("a whsec_ secret");
    assert!(
        other.verify(&got.body, &got.headers).is_err(),
        "verified with a secret the target does not have"
    );
}

fn plain_query_of(push: &PushBuilder) -> String {
    plain_query(&push.timestamp, &push.nonce)
}

#[tokio::test]
async fn compatible_mode_routes_and_forwards_the_decrypted_message_only() {
    let mut refunds = FakeTarget::start().await;
    let mut rest = FakeTarget::start().await;
    let relay = TestRelay::start(&config(
        "compatible",
        &[("refunds", &refunds, "plain"), ("rest", &rest, "plain")],
        "[[route]]\ncontent = [\"refund*\"]\nto = [\"refunds\"]\n[[route]]\nto = [\"rest\"]\n",
    ))
    .await;
    // The encrypted message says "hello"; the unauthenticated plaintext copy beside it lies.
    let real = text_xml("hello", 1001);
    let push = PushBuilder::new(&real);
    let forged = format!(
        "<ToUserName>{GH}</ToUserName><FromUserName>attacker</FromUserName><CreateTime>1</CreateTime>\
         <MsgType>text</MsgType><Content>refund everything</Content><MsgId>1</MsgId>"
    );
    let (query, body) = push.compatible(&forged);
    let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 200);
    let got = rest.next().await;
    assert_eq!(got.body, real.as_bytes());
    refunds.expect_none(Duration::from_millis(300)).await;

    // Dropping encrypt_type and msg_signature from the query to make the relay read the
    // plaintext copy is a downgrade: refused, nothing forwarded.
    let (query, body) = push.compatible(&forged);
    let stripped = query.split("&encrypt_type").next().expect("query");
    let answer = post(&relay.url(&format!("/wechat?{stripped}")), body).await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    // So is a plain body without Encrypt.
    let (query, body) = PushBuilder::new(text_xml("refund please", 1002)).plaintext();
    assert_eq!(
        post(&relay.url(&format!("/wechat?{query}")), body)
            .await
            .status,
        403
    );
    refunds.expect_none(Duration::from_millis(300)).await;
    rest.expect_none(Duration::from_millis(100)).await;
    relay.stop().await;
}

#[tokio::test]
async fn plaintext_mode_forwards_the_body_as_is() {
    let (relay, mut raw, mut plain, mut json) = all_formats("plaintext").await;
    let (query, body) = PushBuilder::new(text_xml("你好 <b>&amp;", 7)).plaintext();
    let answer = post(&relay.url(&format!("/wechat?{query}")), body.clone()).await;
    assert_eq!(answer.status, 200);
    for target in [&mut raw, &mut plain] {
        let got = target.next().await;
        assert_eq!(got.body, body.as_bytes());
        assert_eq!(got.query.as_deref(), Some(query.as_str()));
    }
    let payload: serde_json::Value = serde_json::from_slice(&json.next().await.body).expect("json");
    assert_eq!(payload["type"], "wechat.message.text");
    assert_eq!(payload["data"]["encrypted"], false);
    assert_eq!(payload["data"]["message"]["Content"], "你好 <b>&amp;");
    relay.stop().await;
}

#[tokio::test]
async fn login_events_go_to_the_identity_provider_and_the_rest_elsewhere() {
    let mut identity = FakeTarget::start().await;
    let mut shop = FakeTarget::start().await;
    let routes = "[[route]]\nname = \"login\"\nmsg_type = [\"event\"]\nevent = [\"subscribe\", \"SCAN\"]\nticket = true\n\
                  to = [\"identity\", \"shop\"]\n\
                  [[route]]\nevent = [\"unsubscribe\"]\nto = [\"shop\"]\n";
    let relay = TestRelay::start(&config(
        "safe",
        &[("identity", &identity, "raw"), ("shop", &shop, "plain")],
        routes,
    ))
    .await;
    let send_xml = |xml: String| {
        let url = relay.url("");
        async move {
            let (query, body) = PushBuilder::new(xml).safe();
            post(&format!("{url}/wechat?{query}"), body).await
        }
    };
    // New follower from a QR code, and a follower scanning one: both logins.
    for xml in [
        event_xml("subscribe", "qrscene_1", Some("ticket1")),
        event_xml("SCAN", "1", Some("ticket2")),
    ] {
        assert_eq!(send_xml(xml.clone()).await.status, 200);
        assert_eq!(
            identity.next().await.header("content-type"),
            Some("text/xml")
        );
        assert_eq!(shop.next().await.body, xml.as_bytes());
    }
    // A plain follow (no Ticket) is not a login, and matches no other route: success, nothing sent.
    assert_success(&send_xml(event_xml("subscribe", "", None)).await);
    // Unsubscribe goes to the shop only.
    let xml = event_xml("unsubscribe", "", None);
    assert_eq!(send_xml(xml.clone()).await.status, 200);
    assert_eq!(shop.next().await.body, xml.as_bytes());
    identity.expect_none(Duration::from_millis(300)).await;
    shop.expect_none(Duration::from_millis(100)).await;
    relay.stop().await;
}

/// A safe-mode account routing everything to one raw target.
async fn one_raw_target() -> (TestRelay, FakeTarget) {
    let target = FakeTarget::start().await;
    let relay = TestRelay::start(&config(
        "safe",
        &[("t", &target, "raw")],
        "[[route]]\nto = [\"t\"]\n",
    ))
    .await;
    (relay, target)
}

#[tokio::test]
async fn a_wechat_retry_with_a_new_nonce_is_not_forwarded_again() {
    // WeChat's retry carries a new nonce and signatures: it is the same push by its decrypted
    // message (PROTOCOL.md §6), answered the same and not forwarded again.
    let (relay, mut target) = one_raw_target().await;
    let xml = text_xml("same message", 4242);
    let mut first = PushBuilder::new(&xml);
    first.nonce = "111".into();
    let mut retry = PushBuilder::new(&xml);
    retry.nonce = "222".into();
    let mut other = PushBuilder::new(text_xml("same message", 4243));
    other.nonce = "333".into();
    let mut answers = Vec::new();
    for push in [&first, &retry, &other] {
        let (query, body) = push.safe();
        let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
        assert_eq!(answer.status, 200);
        answers.push(answer.body);
    }
    assert_eq!(answers[0], answers[1], "the retry gets the first answer");
    let ids: Vec<String> = [target.next().await, target.next().await]
        .iter()
        .map(|r| r.header("x-wechat-relay-event-id").expect("id").to_owned())
        .collect();
    assert_ne!(ids[0], ids[1], "another message has another id");
    target.expect_none(Duration::from_millis(300)).await;
    relay.stop().await;
}

/// What a target gets as `X-Forwarded-For` when the peer sent `203.0.113.9`, with
/// `server_keys` added to `[server]`.
async fn forwarded_for_with(server_keys: &str) -> Option<String> {
    let mut target = FakeTarget::start().await;
    let toml = config(
        "safe",
        &[("t", &target, "raw")],
        "[[route]]\nto = [\"t\"]\n",
    )
    .replacen("[server]\n", &format!("[server]\n{server_keys}"), 1);
    let relay = TestRelay::start(&toml).await;
    let (query, body) = PushBuilder::new(text_xml("x", 1)).safe();
    let answer = send(
        "POST",
        &relay.url(&format!("/wechat?{query}")),
        &[
            ("content-type", "text/xml"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
        body,
    )
    .await;
    assert_eq!(answer.status, 200);
    let got = target
        .next()
        .await
        .header("x-forwarded-for")
        .map(str::to_owned);
    relay.stop().await;
    got
}

#[tokio::test]
async fn forwarded_for_appends_the_peer_only_behind_a_trusted_proxy() {
    // An untrusted peer's X-Forwarded-For is not passed on as truth.
    assert_eq!(forwarded_for_with("").await.as_deref(), Some("127.0.0.1"));
    assert_eq!(
        forwarded_for_with("trusted_proxies = [\"127.0.0.1\"]\n")
            .await
            .as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
}

#[tokio::test]
async fn previous_key_opens_pushes_and_seals_their_replies() {
    let target = FakeTarget::start().await;
    // The account's current key is new; WeChat still encrypts with the one in the tests' kit.
    let new_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    let toml = format!(
        "{}[[account]]\nname = \"main\"\npath = \"/wechat\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\n\
         encoding_aes_key = \"{new_key}\"\nprevious_encoding_aes_key = \"{KEY}\"\n{}\
         [[route]]\nto = [\"t\"]\nreply_text = \"rotated\"\n",
        server_section(4000, 300),
        target_section("t", &target.url("/"), "raw", ""),
    );
    let relay = TestRelay::start(&toml).await;
    let (query, body) = PushBuilder::new(text_xml("hi", 5)).safe();
    let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 200);
    // open_reply decrypts with the kit's (previous) key: the reply was sealed with it.
    let reply = open_reply(&answer.text());
    assert!(
        reply.contains("<Content><![CDATA[rotated]]></Content>"),
        "{reply}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn sign_true_on_raw_and_plain_targets_adds_standard_webhooks_headers() {
    let mut raw = FakeTarget::start().await;
    let mut plain = FakeTarget::start().await;
    let mut unsigned = FakeTarget::start().await;
    // The raw target's secret from a file, the plain one's inline.
    let secrets = tempfile::tempdir().expect("tempdir");
    let raw_secret = "whsec_cmF3LXRhcmdldC1zaWduaW5nLWtleS0wMQ==";
    let file = secrets.path().join("raw.whsec");
    std::fs::write(&file, format!("{raw_secret}\n")).expect("secret file");
    let toml = config_with(
        "safe",
        &[
            (
                "raw",
                &raw,
                "raw",
                format!("sign = true\nsecret_file = \"{}\"", file.display()),
            ),
            (
                "plain",
                &plain,
                "plain",
                format!("sign = true\nsecret = \"{WHSEC}\""),
            ),
            ("unsigned", &unsigned, "plain", String::new()),
        ],
        "[[route]]\nto = [\"raw\", \"plain\", \"unsigned\"]\n",
    );
    let relay = TestRelay::start(&toml).await;
    let xml = text_xml("signed", 5151);
    let (query, body) = PushBuilder::new(&xml).safe();
    assert_success(&post(&relay.url(&format!("/wechat?{query}")), body.clone()).await);

    // Each signs the body it sends, with its own secret, under the push's event id.
    let got = raw.next().await;
    assert_eq!(got.body, body.as_bytes());
    assert_signed(&got, raw_secret);
    let event_id = got.header("x-wechat-relay-event-id").expect("event id");
    assert_eq!(got.header("webhook-id"), Some(event_id));
    let got = plain.next().await;
    assert_eq!(got.body, xml.as_bytes());
    assert_signed(&got, WHSEC);
    // Without sign: no Standard Webhooks headers at all.
    let got = unsigned.next().await;
    assert_eq!(got.body, xml.as_bytes());
    assert_eq!(got.header("webhook-signature"), None);
    assert_eq!(got.header("webhook-id"), None);
    relay.stop().await;
}

/// `wechat-relay check` on one safe account, one target of `format` with `extra` and a
/// route to it: exit code, stdout and stderr.
fn check_target(format: &str, extra: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    let mut toml = account_section("main", "/wechat", "safe");
    toml.push_str(&target_section("t", "http://127.0.0.1:9/", format, extra));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    std::fs::write(&path, toml).expect("config");
    cli(&["check", "--config", &path.to_string_lossy()])
}

#[test]
fn check_refuses_signing_without_a_secret_and_a_secret_that_signs_nothing() {
    let secret = format!("secret = \"{WHSEC}\"");
    for (format, extra, why) in [
        (
            "raw",
            "sign = true".to_owned(),
            "secret: required with sign = true",
        ),
        (
            "plain",
            "sign = true".to_owned(),
            "secret: required with sign = true",
        ),
        (
            "plain",
            secret.clone(),
            "secret: signs nothing without sign = true on a format = \"plain\" target",
        ),
        (
            "raw",
            format!("{secret}\nsign = false"),
            "secret: signs nothing without sign = true on a format = \"raw\" target",
        ),
        (
            "json",
            format!("{secret}\nsign = false"),
            "sign: a format = \"json\" target always signs its requests",
        ),
    ] {
        let (code, _, stderr) = check_target(format, &extra);
        assert_eq!(code, Some(2), "{format} with {extra:?}: {stderr}");
        assert!(stderr.contains(why), "{format} with {extra:?}: {stderr}");
    }
    // Accepted; the summary says which target signs, never with what.
    for (format, extra, summary) in [
        (
            "raw",
            format!("sign = true\n{secret}"),
            ", signed with secret <redacted>\n",
        ),
        ("plain", String::new(), " max age\n"),
    ] {
        let (code, stdout, stderr) = check_target(format, &extra);
        assert_eq!(code, Some(0), "{format} with {extra:?}: {stderr}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with("target t:"))
            .unwrap_or_else(|| panic!("a target line in {stdout}"));
        assert!(
            format!("{line}\n").ends_with(summary),
            "{format} with {extra:?}: {line}"
        );
        assert!(
            !stdout.contains(WHSEC.trim_start_matches("whsec_")),
            "{stdout}"
        );
    }
}
