//! Dedupe compares the message (issue #8): a push with the dedupe key of an earlier one but
//! another message is not a retry. In plaintext mode anyone holding one signed query can post
//! such a push; it must not make the genuine one a "duplicate" that is never forwarded. A real
//! retry (the same message) is still answered from the first and not forwarded again, both
//! while the first is being handled and after it was committed.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use http::StatusCode;
use wechat_relay::wechat::sender::{PushContent, message_xml};

/// A SCAN event as WeChat would send it; the dedupe key of an event is its ToUserName,
/// FromUserName, CreateTime, Event and EventKey, so `ticket` changes the message only.
fn scan(create_time: u64, ticket: &str) -> String {
    message_xml(
        GH,
        OPENID,
        create_time,
        &PushContent::Event {
            event: "SCAN",
            event_key: Some("login-42"),
            ticket: Some(ticket),
        },
    )
}

fn config(url: &str, route_keys: &str, extra: &str) -> String {
    let mut toml = server_section(3000, 300);
    toml.push_str(extra);
    toml.push_str(&account_section("main", "/wechat", "plaintext"));
    toml.push_str(&target_section("t", url, "raw", ""));
    toml.push_str(&format!("[[route]]\nto = [\"t\"]\n{route_keys}\n"));
    toml
}

fn create_time() -> u64 {
    now().parse().expect("a number")
}

fn event_id(received: &Received) -> String {
    received
        .header("x-wechat-relay-event-id")
        .expect("event id header")
        .to_owned()
}

#[tokio::test]
async fn a_forged_push_with_a_committed_pushs_key_is_forwarded_and_counted_and_retries_still_dedupe()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = FakeTarget::start().await;
    let store = dir.path().join("store");
    let toml = config(
        &target.url("/t"),
        "",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"{}\"\n",
            store.display()
        ),
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    let relay = Binary::start(&path);
    let admin = relay.admin_addr();
    let url = |query: &str| relay.url(&format!("/wechat?{query}"));

    // The forger copies FromUserName and CreateTime (and so the dedupe key) of the genuine
    // push and gets there first.
    let at = create_time();
    let forged = PushBuilder::new(scan(at, "forged-ticket")).plaintext();
    let genuine = PushBuilder::new(scan(at, "genuine-ticket")).plaintext();
    assert_success(&post(&url(&forged.0), forged.1.clone()).await);
    let first = target.next().await;
    assert_eq!(first.body, forged.1.as_bytes());
    assert_success(&post(&url(&genuine.0), genuine.1.clone()).await);
    let second = target.next().await;
    assert_eq!(
        second.body,
        genuine.1.as_bytes(),
        "the genuine push is forwarded"
    );
    let ids: HashSet<String> = [event_id(&first), event_id(&second)].into();
    assert_eq!(ids.len(), 2, "each has an event id of its own: {ids:?}");
    assert!(event_id(&second).starts_with(&event_id(&first)));

    // WeChat's retries of either: answered as the first time, and not forwarded again.
    let retried = post(&url(&genuine.0), genuine.1.clone()).await;
    assert_success(&retried);
    assert_success(&post(&url(&forged.0), forged.1.clone()).await);
    target.expect_none(Duration::from_millis(500)).await;

    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    let count = |name| metric(&metrics, name, &[("account", "main")]);
    assert_eq!(count("wechat_relay_dedupe_collisions_total"), Some(1.0));
    assert_eq!(count("wechat_relay_dedupe_hits_total"), Some(2.0));
    // One warn line for the collision, with neither ticket in it.
    let lines = relay.drain_lines();
    let collisions: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("dedupe collision"))
        .collect();
    assert_eq!(collisions.len(), 1, "{collisions:?}");
    assert!(
        lines.iter().all(|l| !l.contains("-ticket")),
        "no message content in the log"
    );
}

#[tokio::test]
async fn a_forged_push_while_the_genuine_one_is_handled_is_forwarded_and_a_retry_waits() {
    // The route's reply target takes its time: the genuine push holds its claim meanwhile.
    let mut target = FakeTarget::with(Behaviour {
        body: bytes::Bytes::from_static(b"<xml><MsgType>text</MsgType></xml>"),
        content_type: "text/xml",
        delay: Duration::from_millis(600),
        ..Behaviour::default()
    })
    .await;
    let relay = TestRelay::start(&config(&target.url("/t"), "reply = \"t\"", "")).await;
    let at = create_time();
    let genuine = PushBuilder::new(scan(at, "genuine-ticket")).plaintext();
    let forged = PushBuilder::new(scan(at, "forged-ticket")).plaintext();
    let send = |(query, body): &(String, String)| {
        let url = relay.url(&format!("/wechat?{query}"));
        let body = body.clone();
        tokio::spawn(async move { post(&url, body).await })
    };

    let first = send(&genuine);
    let asked = target.next().await;
    assert_eq!(asked.body, genuine.1.as_bytes());
    // While it is handled: WeChat's retry of it, and the forged push.
    let retry = send(&genuine);
    let forged_answer = send(&forged);
    let other = target.next().await;
    assert_eq!(
        other.body,
        forged.1.as_bytes(),
        "the forged push is a new push"
    );
    assert_ne!(event_id(&asked), event_id(&other));

    let first = first.await.expect("first");
    let retry = retry.await.expect("retry");
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        (retry.status, &retry.body),
        (first.status, &first.body),
        "the retry gets the first one's answer, byte for byte"
    );
    assert_eq!(forged_answer.await.expect("forged").status, StatusCode::OK);
    target.expect_none(Duration::from_millis(800)).await;
    relay.stop().await;
}
