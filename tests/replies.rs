//! The reply rules: what WeChat gets back for each answer of the reply target, and that a slow
//! target never holds WeChat past the deadline.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::StatusCode;

const DEADLINE_MS: u64 = 800;

/// One account in `mode`, a `reply` target in `format` and a second target, both in the route.
async fn relay_with_reply(
    mode: &str,
    format: &str,
    reply: Behaviour,
) -> (TestRelay, FakeTarget, FakeTarget) {
    let replier = FakeTarget::with(reply).await;
    let other = FakeTarget::start().await;
    let mut toml = server_section(DEADLINE_MS, 300);
    toml.push_str(&account_section("main", "/wechat", mode));
    let extra = if format == "json" {
        "secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\""
    } else {
        ""
    };
    toml.push_str(&target_section(
        "replier",
        &replier.url("/r"),
        format,
        extra,
    ));
    toml.push_str(&target_section("other", &other.url("/o"), "plain", ""));
    toml.push_str("[[route]]\nto = [\"replier\", \"other\"]\nreply = \"replier\"\n");
    (TestRelay::start(&toml).await, replier, other)
}

fn answering(status: u16, body: &'static str) -> Behaviour {
    Behaviour {
        status: StatusCode::from_u16(status).expect("status"),
        body: Bytes::from_static(body.as_bytes()),
        content_type: "text/xml",
        ..Behaviour::default()
    }
}

const REPLY_XML: &str = "<xml><ToUserName><![CDATA[oUpF8uMuAJO_M2pxb1Q9zNjWeS6o]]></ToUserName>\
    <FromUserName><![CDATA[gh_0123456789ab]]></FromUserName><CreateTime>1718000201</CreateTime>\
    <MsgType><![CDATA[text]]></MsgType><Content><![CDATA[收到]]></Content></xml>";

/// A text push; the encrypted and the plaintext one are different messages (the same message
/// twice would be a WeChat retry, answered from the dedupe record).
async fn push_text(relay: &TestRelay, encrypted: bool) -> Answer {
    let push = PushBuilder::new(text_xml("hello", if encrypted { 77 } else { 78 }));
    let (query, body) = if encrypted {
        push.safe()
    } else {
        push.plaintext()
    };
    post(&relay.url(&format!("/wechat?{query}")), body).await
}

#[tokio::test]
async fn plain_target_reply_is_sealed_for_an_encrypted_push() {
    let (relay, mut replier, mut other) =
        relay_with_reply("safe", "plain", answering(200, REPLY_XML)).await;
    let answer = push_text(&relay, true).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.headers.get("content-type").map(|v| v.to_str().ok()),
        Some(Some("text/xml; charset=utf-8"))
    );
    let text = answer.text();
    assert!(
        text.contains("<Encrypt>") && !text.contains("收到"),
        "{text}"
    );
    assert_eq!(open_reply(&text), REPLY_XML);
    replier.next().await;
    other.next().await;
    relay.stop().await;
}

#[tokio::test]
async fn json_target_reply_is_sealed_too() {
    let (relay, _replier, _other) =
        relay_with_reply("safe", "json", answering(200, REPLY_XML)).await;
    let answer = push_text(&relay, true).await;
    assert_eq!(open_reply(&answer.text()), REPLY_XML);
    relay.stop().await;
}

#[tokio::test]
async fn plain_target_reply_to_a_plaintext_push_stays_plaintext() {
    let (relay, _replier, _other) =
        relay_with_reply("plaintext", "plain", answering(200, REPLY_XML)).await;
    let answer = push_text(&relay, false).await;
    assert_eq!(answer.text(), REPLY_XML);
    relay.stop().await;
}

#[tokio::test]
async fn raw_target_reply_goes_back_verbatim() {
    // An identity provider answers as WeChat expects; whatever it says goes back untouched.
    let sealed_by_provider =
        "<xml><Encrypt><![CDATA[provider-made]]></Encrypt><MsgSignature>x</MsgSignature></xml>";
    let (relay, _replier, _other) =
        relay_with_reply("safe", "raw", answering(200, sealed_by_provider)).await;
    let answer = push_text(&relay, true).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), sealed_by_provider);
    assert_eq!(
        answer.headers.get("content-type").map(|v| v.to_str().ok()),
        Some(Some("text/xml"))
    );
    relay.stop().await;
}

#[tokio::test]
async fn junk_from_a_raw_target_is_not_passed_to_wechat() {
    let (relay, _replier, _other) =
        relay_with_reply("safe", "raw", answering(200, "<html>502 Bad Gateway")).await;
    let answer = push_text(&relay, true).await;
    assert_success(&answer);
    relay.stop().await;
}

#[tokio::test]
async fn an_already_sealed_reply_from_a_plain_target_is_not_sealed_twice() {
    let sealed =
        "<xml><Encrypt><![CDATA[abc]]></Encrypt><MsgSignature><![CDATA[def]]></MsgSignature></xml>";
    let (relay, _replier, _other) = relay_with_reply("safe", "plain", answering(200, sealed)).await;
    assert_eq!(push_text(&relay, true).await.text(), sealed);
    relay.stop().await;
}

#[tokio::test]
async fn success_empty_junk_and_errors_become_success() {
    for (behaviour, why) in [
        (answering(200, "success"), "success"),
        (answering(200, ""), "empty"),
        (answering(200, "  \n"), "blank"),
        (answering(200, "{\"json\": \"is not a reply\"}"), "not XML"),
        (answering(500, REPLY_XML), "non-2xx"),
        (answering(404, REPLY_XML), "4xx"),
    ] {
        let (relay, _replier, _other) = relay_with_reply("safe", "plain", behaviour).await;
        let answer = push_text(&relay, true).await;
        assert_eq!(
            (answer.status.as_u16(), answer.text().as_str()),
            (200, "success"),
            "{why}"
        );
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_reply_target_that_is_down_gives_success() {
    // Bind and drop a listener: its port refuses connections.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut toml = server_section(DEADLINE_MS, 300);
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section(
        "down",
        &format!("http://127.0.0.1:{port}/"),
        "plain",
        "",
    ));
    toml.push_str("[[route]]\nto = [\"down\"]\nreply = \"down\"\n");
    let relay = TestRelay::start(&toml).await;
    let answer = push_text(&relay, true).await;
    assert_success(&answer);
    relay.stop().await;
}

#[tokio::test]
async fn a_slow_reply_target_is_cut_at_the_deadline_and_still_gets_the_push() {
    let slow = Behaviour {
        delay: Duration::from_millis(DEADLINE_MS + 1500),
        ..answering(200, REPLY_XML)
    };
    let (relay, mut replier, mut other) = relay_with_reply("safe", "plain", slow).await;
    let started = Instant::now();
    let answer = push_text(&relay, true).await;
    let took = started.elapsed();
    assert_success(&answer);
    // Answered at the deadline, not when the target finally answered.
    assert!(
        took < Duration::from_millis(DEADLINE_MS + 1000),
        "answered after {took:?}"
    );
    replier.next().await;
    other.next().await;
    relay.stop().await;
}

#[tokio::test]
async fn a_slow_other_target_does_not_delay_the_answer() {
    let replier = FakeTarget::with(answering(200, REPLY_XML)).await;
    let mut slow = FakeTarget::with(Behaviour {
        delay: Duration::from_secs(3),
        ..Behaviour::default()
    })
    .await;
    let mut toml = server_section(4000, 300);
    toml.push_str(&account_section("main", "/wechat", "plaintext"));
    toml.push_str(&target_section("replier", &replier.url("/"), "plain", ""));
    toml.push_str(&target_section(
        "slow",
        &slow.url("/"),
        "plain",
        "timeout_ms = 5000",
    ));
    toml.push_str("[[route]]\nto = [\"slow\", \"replier\"]\nreply = \"replier\"\n");
    let relay = TestRelay::start(&toml).await;
    let started = Instant::now();
    let answer = push_text(&relay, false).await;
    assert_eq!(answer.text(), REPLY_XML);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited for the slow target"
    );
    // The slow target's forward goes on after the answer.
    slow.next().await;
    relay.stop().await;
}

#[tokio::test]
async fn reply_text_answers_at_once_sealed_when_the_push_was() {
    let mut slow = FakeTarget::with(Behaviour {
        delay: Duration::from_secs(2),
        ..Behaviour::default()
    })
    .await;
    let mut toml = server_section(4000, 300);
    // Plaintext mode with a key: takes encrypted and unencrypted pushes alike.
    toml.push_str(
        &account_section("main", "/wechat", "safe")
            .replace("mode = \"safe\"", "mode = \"plaintext\""),
    );
    toml.push_str(&target_section("t", &slow.url("/"), "plain", ""));
    toml.push_str("[[route]]\nto = [\"t\"]\nreply_text = \"Welcome ]]> aboard\"\n");
    let relay = TestRelay::start(&toml).await;

    let started = Instant::now();
    let encrypted = push_text(&relay, true).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "reply_text waits for nobody"
    );
    let reply = open_reply(&encrypted.text());
    let fields = wechat_relay::wechat::message::Fields::parse(reply.as_bytes()).expect("reply xml");
    assert_eq!(fields.get("ToUserName"), Some(OPENID));
    assert_eq!(fields.get("FromUserName"), Some(GH));
    assert_eq!(fields.get("MsgType"), Some("text"));
    assert_eq!(fields.get("Content"), Some("Welcome ]]> aboard"));

    let plain = push_text(&relay, false).await;
    let fields =
        wechat_relay::wechat::message::Fields::parse(&plain.body).expect("plaintext reply");
    assert_eq!(fields.get("Content"), Some("Welcome ]]> aboard"));
    assert_eq!(fields.get("Encrypt"), None);
    slow.next().await;
    slow.next().await;
    relay.stop().await;
}

#[tokio::test]
async fn no_reply_key_answers_success_without_waiting() {
    let mut slow = FakeTarget::with(Behaviour {
        delay: Duration::from_secs(2),
        ..answering(200, REPLY_XML)
    })
    .await;
    let mut toml = server_section(4000, 300);
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section("t", &slow.url("/"), "plain", ""));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    let relay = TestRelay::start(&toml).await;
    let started = Instant::now();
    let answer = push_text(&relay, true).await;
    assert_eq!(answer.text(), "success");
    assert!(started.elapsed() < Duration::from_millis(1500));
    slow.next().await;
    relay.stop().await;
}

/// The real binary on one plaintext account whose route's reply target is `replier` (a
/// `plain` target with `extra` settings), under a reply deadline of `deadline_ms`.
fn binary_with_reply(
    dir: &std::path::Path,
    deadline_ms: u64,
    replier: &str,
    extra: &str,
) -> Binary {
    let mut toml = server_section(deadline_ms, 300);
    toml.push_str(&account_section("main", "/wechat", "plaintext"));
    toml.push_str(&target_section("replier", replier, "plain", extra));
    toml.push_str("[[route]]\nname = \"ask\"\nto = [\"replier\"]\nreply = \"replier\"\n");
    let path = dir.join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    Binary::start(&path)
}

/// A plaintext text push to `relay`: WeChat's answer and the push's log line.
async fn push_to_binary(relay: &Binary, msg_id: u64) -> (Answer, String) {
    let push = PushBuilder::new(text_xml("hello", msg_id));
    let (query, body) = push.plaintext();
    let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
    (answer, relay.wait_for("route=ask"))
}

/// The `key=value` fields of a text log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

#[tokio::test]
async fn a_reply_target_slower_than_its_timeout_but_inside_the_deadline_gets_its_reply_to_wechat() {
    // 3.5 s: past the target's timeout_ms (3000, its default), inside the 4.5 s deadline.
    let mut replier = FakeTarget::with(Behaviour {
        delay: Duration::from_millis(3500),
        ..answering(200, REPLY_XML)
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = binary_with_reply(
        dir.path(),
        4500,
        &replier.url("/r"),
        "retry_initial_ms = 100",
    );
    let (answer, line) = push_to_binary(&relay, 79).await;
    assert_eq!(answer.text(), REPLY_XML, "the user gets the target's reply");
    assert_eq!(field(&line, "reply"), Some("from_target"), "{line}");
    assert_eq!(field(&line, "cut"), Some("-"), "{line}");
    assert_eq!(
        replier.next().await.header("x-wechat-relay-attempt"),
        Some("1")
    );
    // It answered: nothing is queued, the handler does not get the push again.
    replier.expect_none(Duration::from_millis(1500)).await;
}

// Two threads: the fake target answers while the test waits for the binary's log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_target_slower_than_the_deadline_is_cut_there_and_gets_the_push_again() {
    // Its timeout_ms is longer than the deadline: the deadline cuts the attempt.
    let mut replier = FakeTarget::with(Behaviour {
        delay: Duration::from_millis(2000),
        ..answering(200, REPLY_XML)
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = binary_with_reply(
        dir.path(),
        1000,
        &replier.url("/r"),
        "timeout_ms = 5000\nretry_initial_ms = 100",
    );
    let (answer, line) = push_to_binary(&relay, 80).await;
    assert_success(&answer);
    assert_eq!(field(&line, "reply"), Some("deadline"), "{line}");
    assert_eq!(field(&line, "cut"), Some("deadline"), "{line}");
    // Queued: the outbox's next attempt, which its timeout_ms lets finish.
    assert_eq!(
        replier.next().await.header("x-wechat-relay-attempt"),
        Some("1")
    );
    assert_eq!(
        replier.next().await.header("x-wechat-relay-attempt"),
        Some("2")
    );
    relay.wait_for("delivered after retries");
}
