//! One dead-letter line (issue #11): however a delivery dies, during the push (the reply
//! target's attempt answered with a final status) or in a worker, the log gets the same
//! `delivery failed for good: dead letter` line with the same fields.

mod common;

use common::*;
use http::StatusCode;

/// `key=value` pairs of a text log line (values without spaces), by key.
fn fields(line: &str) -> Vec<(&str, &str)> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    fields(line)
        .into_iter()
        .find_map(|(k, v)| (k == key).then_some(v))
        .unwrap_or_else(|| panic!("{key}= in {line}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_target_answering_400_makes_a_dead_letter_with_the_worker_s_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = FakeTarget::with(Behaviour {
        status: StatusCode::BAD_REQUEST,
        ..Behaviour::default()
    })
    .await;
    let mut toml = server_section(2000, 300);
    toml.push_str(&format!(
        "[store]\npath = \"{}\"\n",
        dir.path().join("data").display()
    ));
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section("identity", &target.url("/"), "raw", ""));
    // QR logins ask the target for the reply during the push; texts go through a worker.
    toml.push_str(
        "[[route]]\nname = \"qr-login\"\nmsg_type = [\"event\"]\nto = [\"identity\"]\n\
         reply = \"identity\"\n\n[[route]]\nname = \"catch-all\"\nto = [\"identity\"]\n",
    );
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, toml).expect("write config");
    let relay = Binary::start(&config);

    let (query, body) = PushBuilder::new(event_xml("SCAN", "42", Some("ticket"))).safe();
    let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 200, "WeChat is answered: {}", answer.text());
    let asked = target.next().await;
    let during_push = relay.wait_for("delivery failed for good: dead letter");
    assert!(during_push.contains("ERROR"), "{during_push}");
    assert_eq!(
        Some(value(&during_push, "event_id")),
        asked.header("x-wechat-relay-event-id"),
        "{during_push}"
    );
    assert_eq!(value(&during_push, "target"), "identity", "{during_push}");
    assert_eq!(value(&during_push, "attempts"), "1", "{during_push}");
    assert!(
        during_push.contains("error=HTTP 400 (not retried)"),
        "{during_push}"
    );
    // The id is the dead letter's, as `outbox list --dead` shows it.
    let (code, dead, stderr) = cli(&[
        "outbox",
        "list",
        "--dead",
        "--config",
        &config.to_string_lossy(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        dead.starts_with(&format!(
            "id={} target=identity ",
            value(&during_push, "id")
        )),
        "{dead} / {during_push}"
    );

    // The same line, with the same fields, from a worker's attempt.
    let (query, body) = PushBuilder::new(text_xml("to a worker", 1)).safe();
    assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
    target.next().await;
    let in_worker = relay.wait_for("delivery failed for good: dead letter");
    let keys = |line: &str| {
        fields(line)
            .into_iter()
            .map(|(k, _)| k.to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(&during_push),
        keys(&in_worker),
        "{during_push} / {in_worker}"
    );
    assert_ne!(value(&during_push, "id"), value(&in_worker, "id"));
}
