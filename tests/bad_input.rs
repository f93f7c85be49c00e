//! Bad input gets a clear 4xx and forwards nothing, and the server keeps serving. Every
//! negative vector goes through the real server here; every edge vector is accepted.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// A relay whose one account uses the vectors' token, key and app id, with `skew_s`, and one
/// raw target that records anything forwarded.
async fn relay(mode: &str, skew_s: u64) -> (TestRelay, FakeTarget) {
    let target = FakeTarget::start().await;
    let mut toml = server_section(2000, skew_s);
    toml.push_str(&account_section("main", "/wechat", mode));
    toml.push_str(&target_section("t", &target.url("/"), "plain", ""));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    (TestRelay::start(&toml).await, target)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("field {key}"))
}

/// The query WeChat would send with this vector's fields.
fn vector_query(v: &Value) -> String {
    format!(
        "signature={}&timestamp={}&nonce={}&openid={OPENID}&encrypt_type=aes&msg_signature={}",
        s(v, "signature"),
        s(v, "timestamp"),
        s(v, "nonce"),
        s(v, "msg_signature")
    )
}

/// Proves the server still serves after the bad requests: a valid push gets through.
async fn still_serving(relay: &TestRelay, target: &mut FakeTarget, encrypted: bool) {
    let push = PushBuilder::new(text_xml("still here", 9));
    let (query, body) = if encrypted {
        push.safe()
    } else {
        push.plaintext()
    };
    let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 200);
    assert!(target.next().await.body.starts_with(b"<xml>"));
}

#[tokio::test]
async fn every_negative_vector_is_refused_and_nothing_is_forwarded() {
    let (relay, mut target) = relay("safe", 300).await;
    let file = vectors("negative_vectors.json");
    for v in file["negative"].as_array().expect("negative") {
        let name = s(v, "name");
        let answer = post(
            &relay.url(&format!("/wechat?{}", vector_query(v))),
            s(v, "post_body").to_owned(),
        )
        .await;
        // 2024 timestamps are far outside a 300 s window: refused before the body is read.
        assert_eq!(answer.status.as_u16(), 403, "{name}: {}", answer.text());
    }
    target.expect_none(Duration::from_millis(300)).await;

    // With the window off, the vectors' own faults are what refuses them.
    let (relay, mut target) = self::relay("safe", 0).await;
    for v in file["negative"].as_array().expect("negative") {
        let name = s(v, "name");
        let answer = post(
            &relay.url(&format!("/wechat?{}", vector_query(v))),
            s(v, "post_body").to_owned(),
        )
        .await;
        let expected: u16 = match name {
            "bad_msg_signature" | "truncated_base64_orig_sig" => 403,
            "wrong_appid"
            | "corrupted_padding_zero"
            | "corrupted_padding_33"
            | "corrupted_padding_filler"
            | "truncated_base64_4chars"
            | "truncated_base64_1char"
            | "downgrade_plaintext_body" => 400,
            // Crypto-valid: with no window only a dedupe store (a later release) could refuse it.
            "stale_timestamp_replay" => 200,
            other => panic!("unknown vector {other}"),
        };
        assert_eq!(
            answer.status.as_u16(),
            expected,
            "{name}: {}",
            answer.text()
        );
        if expected != 200 {
            assert!(!answer.text().is_empty(), "{name}: a reason comes back");
        }
    }
    // Only the crypto-valid replay got through.
    let got = target.next().await;
    assert!(got.body.starts_with(b"<xml>"));
    target.expect_none(Duration::from_millis(300)).await;
    still_serving(&relay, &mut target, true).await;
    relay.stop().await;
}

#[tokio::test]
async fn every_edge_vector_is_accepted() {
    let (relay, mut target) = relay("safe", 0).await;
    let file = vectors("negative_vectors.json");
    let generated = vectors("generated_vectors.json");
    let text = generated["pushes"]
        .as_array()
        .expect("pushes")
        .iter()
        .find(|p| p["name"] == file["base_vector"])
        .expect("base vector");
    // Every edge vector carries the same message: the first is forwarded, the others are its
    // WeChat retries (same dedupe key) and get its answer. A 200 comes only after the push was
    // verified and decrypted.
    for (i, v) in file["edge_should_accept_or_policy"]
        .as_array()
        .expect("edges")
        .iter()
        .enumerate()
    {
        let name = s(v, "name");
        let query = format!(
            "signature={}&timestamp={}&nonce={}&openid={OPENID}&encrypt_type=aes&msg_signature={}",
            s(text, "signature"),
            s(v, "timestamp"),
            s(v, "nonce"),
            s(v, "msg_signature")
        );
        let answer = post(
            &relay.url(&format!("/wechat?{query}")),
            s(v, "post_body").to_owned(),
        )
        .await;
        assert_eq!(answer.status.as_u16(), 200, "{name}: {}", answer.text());
        if i == 0 {
            assert_eq!(
                target.next().await.body,
                s(text, "plaintext_xml").as_bytes(),
                "{name}"
            );
        }
    }
    target.expect_none(Duration::from_millis(300)).await;
    relay.stop().await;
}

#[tokio::test]
async fn refusals_and_their_statuses() {
    let (relay, mut target) = relay("safe", 300).await;
    let xml = text_xml("hi", 1);
    let push = PushBuilder::new(&xml);
    let (good_query, good_body) = push.safe();
    let cases: Vec<(&str, String, String, String, u16)> = vec![
        (
            "unknown path",
            "POST".into(),
            format!("/other?{good_query}"),
            good_body.clone(),
            404,
        ),
        (
            "wrong method",
            "PUT".into(),
            format!("/wechat?{good_query}"),
            good_body.clone(),
            405,
        ),
        (
            "no query: unsigned",
            "POST".into(),
            "/wechat".into(),
            good_body.clone(),
            403,
        ),
        (
            "bad signature",
            "POST".into(),
            format!(
                "/wechat?{}",
                good_query.replacen("signature=", "signature=0", 1)
            ),
            good_body.clone(),
            403,
        ),
        (
            "bad msg_signature",
            "POST".into(),
            format!(
                "/wechat?{}",
                good_query.replace("msg_signature=", "msg_signature=0")
            ),
            good_body.clone(),
            403,
        ),
        (
            "missing msg_signature",
            "POST".into(),
            format!(
                "/wechat?{}",
                good_query.split("&msg_signature").next().expect("query")
            ),
            good_body.clone(),
            400,
        ),
        (
            "bad XML",
            "POST".into(),
            format!("/wechat?{good_query}"),
            "<xml><Encrypt>".into(),
            400,
        ),
        (
            "not XML at all",
            "POST".into(),
            format!("/wechat?{good_query}"),
            "hello".into(),
            400,
        ),
        (
            "encrypt_type=aes without Encrypt",
            "POST".into(),
            format!("/wechat?{good_query}"),
            xml.clone(),
            400,
        ),
        (
            "bad base64",
            "POST".into(),
            {
                let mut p = PushBuilder::new(&xml);
                p.timestamp = push.timestamp.clone();
                format!("/wechat?{}", p.encrypted_query("!!!not-base64!!!"))
            },
            "<xml><Encrypt>!!!not-base64!!!</Encrypt></xml>".into(),
            400,
        ),
        (
            "downgrade: plaintext push to a safe account",
            "POST".into(),
            format!("/wechat?{}", push.plaintext().0),
            xml.clone(),
            403,
        ),
        (
            "nested deeper than any WeChat message",
            "POST".into(),
            format!("/wechat?{good_query}"),
            format!("<xml>{}{}</xml>", "<a>".repeat(5000), "</a>".repeat(5000)),
            400,
        ),
        (
            "a repeated Encrypt",
            "POST".into(),
            format!("/wechat?{good_query}"),
            good_body.replace("</xml>", "<Encrypt>x</Encrypt></xml>"),
            400,
        ),
        (
            "too large",
            "POST".into(),
            format!("/wechat?{good_query}"),
            format!("<xml><Encrypt>{}</Encrypt></xml>", "A".repeat(70_000)),
            413,
        ),
    ];
    for (why, method, path, body, status) in cases {
        let answer = send(
            &method,
            &relay.url(&path),
            &[("content-type", "text/xml")],
            body,
        )
        .await;
        assert_eq!(answer.status.as_u16(), status, "{why}: {}", answer.text());
    }
    target.expect_none(Duration::from_millis(300)).await;
    still_serving(&relay, &mut target, true).await;
    relay.stop().await;
}

#[tokio::test]
async fn stale_and_future_timestamps_are_refused() {
    let (relay, mut target) = relay("plaintext", 300).await;
    let now: u64 = now().parse().expect("now");
    for (ts, status) in [(now - 301, 403), (now + 301, 403), (now - 200, 200)] {
        let mut push = PushBuilder::new(text_xml("t", ts));
        push.timestamp = ts.to_string();
        let (query, body) = push.plaintext();
        let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
        assert_eq!(answer.status.as_u16(), status, "timestamp {ts}");
    }
    target.next().await;
    target.expect_none(Duration::from_millis(200)).await;
    // A signed but non-numeric timestamp.
    let mut push = PushBuilder::new(text_xml("t", 1));
    push.timestamp = "soon".into();
    let (query, body) = push.plaintext();
    assert_eq!(
        post(&relay.url(&format!("/wechat?{query}")), body)
            .await
            .status
            .as_u16(),
        400
    );
    relay.stop().await;
}

#[tokio::test]
async fn oversized_chunked_body_is_refused() {
    // No Content-Length: the limit applies while reading.
    let (relay, mut target) = relay("plaintext", 300).await;
    let (query, _) = PushBuilder::new(text_xml("x", 1)).plaintext();
    let big = format!("<xml><Content>{}</Content></xml>", "x".repeat(100_000));
    let request = http::Request::post(relay.url(&format!("/wechat?{query}")))
        .body(Chunks::new(big.into_bytes()))
        .expect("request");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let response = client.request(request).await.expect("response");
    assert_eq!(response.status().as_u16(), 413);
    target.expect_none(Duration::from_millis(200)).await;
    still_serving(&relay, &mut target, false).await;
    relay.stop().await;
}

/// A body sent in 8 KiB chunks with no Content-Length (so hyper sends it chunked).
struct Chunks(Vec<bytes::Bytes>);

impl Chunks {
    fn new(bytes: Vec<u8>) -> Self {
        let mut chunks: Vec<bytes::Bytes> = bytes
            .chunks(8192)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        chunks.reverse();
        Self(chunks)
    }
}

impl http_body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.0
                .pop()
                .map(|chunk| Ok(hyper::body::Frame::data(chunk))),
        )
    }
}

#[tokio::test]
async fn a_repeated_routing_field_in_a_plaintext_push_is_refused() {
    // The relay would route on one MsgType and a target might read the other.
    let (relay, mut target) = relay("plaintext", 300).await;
    let xml = text_xml("x", 1).replace("</xml>", "<MsgType>event</MsgType></xml>");
    let (query, body) = PushBuilder::new(xml).plaintext();
    assert_eq!(
        post(&relay.url(&format!("/wechat?{query}")), body)
            .await
            .status,
        400
    );
    target.expect_none(Duration::from_millis(200)).await;
    relay.stop().await;
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let (relay, _target) = relay("plaintext", 300).await;
    let answer = send("DELETE", &relay.url("/wechat"), &[], "").await;
    assert_eq!(answer.status, 405);
    assert_eq!(
        answer.headers.get("allow").map(|v| v.to_str().ok()),
        Some(Some("GET, POST"))
    );
    relay.stop().await;
}

/// What a target's XML parser might act on: a DTD (with an external entity), a processing
/// instruction, and characters XML 1.0 does not allow, raw or as character references. Each
/// comes as the whole body of a plaintext push (the outer document) and as the decrypted
/// message of a safe-mode push (the inner one); each is refused 400 with its reason, counted
/// under that reason, and nothing is forwarded.
#[tokio::test]
async fn dtds_processing_instructions_and_forbidden_characters_are_refused() {
    let metrics = wechat_relay::metrics::install().expect("metrics recorder");
    let xml = text_xml("hello", 1);
    let with_content = |content: &str| xml.replace("hello", content);
    let prolog = |prolog: &str| format!("{prolog}{xml}");
    // A reference is one outside CDATA (Content is CDATA, where `&#0;` is four characters).
    let with_field = |text: &str| xml.replace("</xml>", &format!("<Note>{text}</Note></xml>"));
    // (shape, document, the reason's text in the answer, its metrics label)
    let shapes: Vec<(&str, String, &str, &str)> = vec![
        (
            "DOCTYPE with an external DTD",
            prolog("<!DOCTYPE xml SYSTEM \"http://127.0.0.1:9/x.dtd\">"),
            "body has a <!DOCTYPE>",
            "doctype",
        ),
        (
            "ENTITY: an external parameter entity",
            prolog("<!DOCTYPE xml [<!ENTITY % ext SYSTEM \"http://127.0.0.1:9/x.dtd\"> %ext;]>"),
            "body declares an entity",
            "entity",
        ),
        (
            "a processing instruction",
            prolog("<?xml version=\"1.0\"?><?xml-stylesheet href=\"http://127.0.0.1:9/x.xsl\"?>"),
            "processing instruction other than the XML declaration",
            "processing_instruction",
        ),
        ("a NUL", with_content("nul\0here"), "U+0000", "invalid_char"),
        (
            "an escape character",
            with_content("esc\u{1b}"),
            "U+001B",
            "invalid_char",
        ),
        ("&#0;", with_field("nul&#0;ref"), "U+0000", "invalid_char"),
        ("&#x1;", with_field("ref&#x1;"), "U+0001", "invalid_char"),
    ];
    let before = |reason: &str| rejected(&metrics.render(), reason);
    let counts_before: Vec<u64> = shapes.iter().map(|s| before(s.3)).collect();
    for mode in ["plaintext", "safe"] {
        let (relay, mut target) = relay(mode, 300).await;
        for (shape, document, why, _) in &shapes {
            let push = PushBuilder::new(document.as_str());
            let (query, body) = if mode == "plaintext" {
                push.plaintext()
            } else {
                push.safe()
            };
            let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
            assert_eq!(answer.status, 400, "{mode}, {shape}: {}", answer.text());
            assert!(
                answer.text().contains(why) && answer.text().lines().count() == 1,
                "{mode}, {shape}: {:?}",
                answer.text()
            );
        }
        target.expect_none(Duration::from_millis(300)).await;
        still_serving(&relay, &mut target, mode == "safe").await;
        relay.stop().await;
    }
    // Each shape was refused twice (outer and inner), under its own reason.
    let rendered = metrics.render();
    for (i, (shape, _, _, reason)) in shapes.iter().enumerate() {
        let same_reason = shapes.iter().filter(|s| s.3 == *reason).count() as u64;
        let first_of_reason = shapes.iter().position(|s| s.3 == *reason) == Some(i);
        if first_of_reason {
            assert_eq!(
                rejected(&rendered, reason) - counts_before[i],
                2 * same_reason,
                "{shape}: wechat_relay_rejected_total{{reason=\"{reason}\"}}"
            );
        }
    }
}

/// The envelope of a safe-mode push is checked the same way: a DOCTYPE in front of a genuine
/// `<Encrypt>` is refused before anything is decrypted.
#[tokio::test]
async fn a_doctype_around_a_genuine_encrypted_push_is_refused() {
    let (relay, mut target) = relay("safe", 300).await;
    let (query, body) = PushBuilder::new(text_xml("hi", 1)).safe();
    let body = format!("<!DOCTYPE xml [<!ENTITY e SYSTEM \"file:///etc/passwd\">]>{body}");
    let answer = post(&relay.url(&format!("/wechat?{query}")), body).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(
        answer.text().contains("body declares an entity"),
        "{}",
        answer.text()
    );
    target.expect_none(Duration::from_millis(300)).await;
    still_serving(&relay, &mut target, true).await;
    relay.stop().await;
}

/// `wechat_relay_rejected_total` for account `main` and `reason`, from a rendered scrape.
fn rejected(rendered: &str, reason: &str) -> u64 {
    let labels = [("account", "main"), ("reason", reason)];
    metric(rendered, "wechat_relay_rejected_total", &labels).unwrap_or(0.0) as u64
}
