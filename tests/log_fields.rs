//! JSON log lines keep one type per field: a field without a value is left out, never `"-"`
//! beside a number or a name in another line (text lines keep `-`). The real binary.

mod common;

use std::collections::BTreeMap;

use common::*;

/// The JSON type of a value, by name.
fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

// Threads of its own: the fake target answers while the test waits for log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_fields_keep_one_type_and_absent_values_are_left_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let failing = FakeTarget::with(Behaviour {
        status: http::StatusCode::INTERNAL_SERVER_ERROR,
        ..Behaviour::default()
    })
    .await;
    let mut toml = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n[store]\npath = \"data\"\n\
         [log]\nformat = \"json\"\n",
    );
    toml.push_str(&account_section("main", "/wechat", "safe"));
    // The reply targets: `down` gives no answer (no status), `failing` answers 500.
    toml.push_str(&target_section(
        "down",
        "http://127.0.0.1:1/down",
        "raw",
        "retry_initial_ms = 60000",
    ));
    toml.push_str(&target_section(
        "failing",
        &failing.url("/f"),
        "raw",
        "retry_initial_ms = 60000",
    ));
    toml.push_str(
        "[[route]]\nname = \"texts\"\nmsg_type = [\"text\"]\nto = [\"down\"]\nreply = \"down\"\n\
         [[route]]\nname = \"follows\"\nevent = [\"subscribe\"]\nto = [\"failing\"]\nreply = \"failing\"\n",
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    let relay = Binary::start(&path);

    let url = |query: &str| relay.url(&format!("/wechat?{query}"));
    for xml in [
        text_xml("to a target that is down", 1),
        event_xml("subscribe", "", None),
        // No route: no route and no targets in its line.
        event_xml("unsubscribe", "", None),
    ] {
        let (query, body) = PushBuilder::new(xml).safe();
        assert_eq!(post(&url(&query), body).await.status, 200);
    }
    // A request to no account: its refusal line has no account.
    assert_eq!(post(&relay.url("/nowhere"), "x").await.status, 404);
    // Every line until each of these has come (wait_for would skip the others).
    let needles = [
        "\"msg_type\":\"text\"",
        "unsubscribe",
        "\"status\":500",
        "Connection refused",
        "request refused",
    ];
    let mut lines = Vec::new();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !needles
        .iter()
        .all(|n| lines.iter().any(|l: &String| l.contains(n)))
    {
        assert!(
            std::time::Instant::now() < until,
            "{needles:?} in {lines:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        lines.extend(relay.drain_lines());
    }

    let mut types: BTreeMap<String, BTreeMap<&'static str, String>> = BTreeMap::new();
    for line in &lines {
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for (field, value) in &object {
            assert_ne!(value, "-", "{field} is \"-\" in {line}");
            types
                .entry(field.clone())
                .or_default()
                .insert(kind(value), line.clone());
        }
    }
    for (field, kinds) in &types {
        assert_eq!(kinds.len(), 1, "{field} has more than one type: {kinds:#?}");
    }
    // The lines that had "-" before: each is there, without the field.
    let line_of = |needle: &str| {
        lines
            .iter()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("{needle} in {lines:#?}"))
    };
    let unrouted = line_of("\"event\":\"unsubscribe\"");
    assert!(!unrouted.contains("\"route\""), "{unrouted}");
    let no_answer = line_of("Connection refused");
    assert!(
        no_answer.contains("forward failed") && !no_answer.contains("\"status\""),
        "{no_answer}"
    );
    let text_push = line_of("\"msg_type\":\"text\"");
    assert!(!text_push.contains("\"event\""), "{text_push}");
    let refused = line_of("request refused");
    assert!(!refused.contains("\"account\""), "{refused}");
    assert_eq!(types["status"].keys().collect::<Vec<_>>(), [&"number"]);
}
