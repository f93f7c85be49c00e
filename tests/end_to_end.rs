//! The real binary, end to end, with pushes encrypted by an independent implementation
//! (wechatpy, in tests/vectors): a subscribe-with-scene event reaches a raw target byte for
//! byte and its reply comes back verbatim; a text message reaches a plain target decrypted and
//! its reply comes back encrypted. Then SIGTERM, and the log is checked for secrets.

mod common;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use serde_json::Value;

fn push_vector(name: &str) -> Value {
    vectors("generated_vectors.json")["pushes"]
        .as_array()
        .expect("pushes")
        .iter()
        .find(|p| p["name"] == name)
        .expect("vector")
        .clone()
}

fn s(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("field {key}"))
        .to_owned()
}

const PROVIDER_REPLY: &str = "<xml><Encrypt><![CDATA[sealed-by-the-provider]]></Encrypt></xml>";
const SHOP_REPLY: &str = "<xml><ToUserName><![CDATA[oUpF8uMuAJO_M2pxb1Q9zNjWeS6o]]></ToUserName>\
    <FromUserName><![CDATA[gh_0123456789ab]]></FromUserName><CreateTime>1718000201</CreateTime>\
    <MsgType><![CDATA[text]]></MsgType><Content><![CDATA[收到: relay ok]]></Content></xml>";

#[tokio::test]
async fn independent_pushes_through_the_binary() {
    let mut identity = FakeTarget::with(Behaviour {
        body: Bytes::from_static(PROVIDER_REPLY.as_bytes()),
        content_type: "text/xml",
        ..Behaviour::default()
    })
    .await;
    let mut shop = FakeTarget::with(Behaviour {
        status: StatusCode::OK,
        body: Bytes::from_static(SHOP_REPLY.as_bytes()),
        content_type: "application/xml",
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The token lives in a file, as an operator would keep it.
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).expect("token file");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nreply_deadline_ms = 3000\n\
         # the vectors were made in 2024\ntimestamp_skew_s = 0\n\
         [[account]]\nname = \"main\"\npath = \"/wechat\"\napp_id = \"{APP_ID}\"\ntoken_file = \"token\"\n\
         encoding_aes_key = \"{KEY}\"\n\
         [[target]]\nname = \"identity\"\nurl = \"{}\"\nformat = \"raw\"\n\
         [[target]]\nname = \"shop\"\nurl = \"{}\"\nformat = \"plain\"\n\
         [[route]]\nname = \"login\"\nevent = [\"subscribe\", \"SCAN\"]\nticket = true\nto = [\"identity\"]\nreply = \"identity\"\n\
         [[route]]\nto = [\"shop\"]\nreply = \"shop\"\n",
        identity.url("/connections/social/mp/5f1234/events"),
        shop.url("/wechat"),
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).expect("config");
    let mut relay = Binary::start(&path);

    // subscribe with a scene: to the identity provider, byte for byte; its reply verbatim.
    let v = push_vector("subscribe_qrscene");
    let answer = post(
        &relay.url(&format!("/wechat?{}", s(&v, "query_string"))),
        s(&v, "post_body_safe_mode"),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), PROVIDER_REPLY);
    let got = identity.next().await;
    assert_eq!(got.path, "/connections/social/mp/5f1234/events");
    assert_eq!(got.query.as_deref(), Some(s(&v, "query_string").as_str()));
    assert_eq!(got.body, s(&v, "post_body_safe_mode").as_bytes());
    relay.wait_for("route=login");

    // A text message: to the shop, decrypted; its reply sealed for WeChat.
    let v = push_vector("text");
    let answer = post(
        &relay.url(&format!("/wechat?{}", s(&v, "query_string"))),
        s(&v, "post_body_safe_mode"),
    )
    .await;
    assert_eq!(answer.status, 200);
    let got = shop.next().await;
    assert_eq!(got.body, s(&v, "plaintext_xml").as_bytes());
    assert_eq!(open_reply(&answer.text()), SHOP_REPLY);
    let push_line = relay.wait_for("msg_type=text");
    for field in [
        "account=main",
        "event=-",
        "route=route[1]",
        "targets=shop",
        "outcome=forwarded",
        "reply=from_target",
        "ms=",
    ] {
        assert!(push_line.contains(field), "{field} in {push_line}");
    }

    // A refused push: one warning line with the reason.
    let answer = post(
        &relay.url("/wechat?signature=0&timestamp=1&nonce=2"),
        "<xml/>",
    )
    .await;
    assert_eq!(answer.status, 403);
    let refused = relay.wait_for("request refused");
    assert!(
        refused.contains("reason=signature") && refused.contains("status=403"),
        "{refused}"
    );
    identity.expect_none(Duration::from_millis(200)).await;
    shop.expect_none(Duration::from_millis(100)).await;

    let (exit, rest) = relay.terminate();
    assert!(exit.success(), "exit 0 after SIGTERM: {exit:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    // Nothing secret or private in the log: not the token, the key, Encrypt, or the content.
    let all: Vec<String> = [push_line, refused].into_iter().chain(rest).collect();
    for line in &all {
        for secret in [TOKEN, KEY, "XQ1uVuIVycLr33T35Z", "relay!", "你好", OPENID] {
            assert!(!line.contains(secret), "{secret:?} leaked into {line}");
        }
    }
}

#[test]
fn serve_exits_1_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/relay.toml"))
        .expect("shipped");
    let config = shipped.replace(
        "listen = \"127.0.0.1:8080\"",
        &format!("listen = \"{}\"", taken.local_addr().expect("addr")),
    );
    std::fs::write(&path, config).expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_wechat-relay"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot listen"));
}

#[tokio::test]
async fn sigterm_names_every_delivery_it_had_to_cut_and_the_next_start_sends_it() {
    // A target slower than the shutdown grace: its delivery is cut, the log says which, and it
    // stays in the store for the next start.
    let mut stuck = FakeTarget::with(Behaviour {
        delay: Duration::from_secs(30),
        ..Behaviour::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 500\n[store]\npath = \"data\"\n\
         [[account]]\nname = \"main\"\npath = \"/wechat\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\nmode = \"plaintext\"\n\
         [[target]]\nname = \"stuck\"\nurl = \"{}\"\nformat = \"plain\"\ntimeout_ms = 60000\n\
         [[route]]\nto = [\"stuck\"]\n",
        stuck.url("/"),
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).expect("config");
    let mut relay = Binary::start(&path);
    let (query, body) = PushBuilder::new(text_xml("cut", 1)).plaintext();
    assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
    let first = stuck.next().await;
    let push_line = relay.wait_for("outcome=forwarded");
    let event_id = push_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("event_id="))
        .expect("event_id")
        .to_owned();
    let (exit, rest) = relay.terminate();
    assert!(exit.success(), "{exit:?}");
    let cut = rest
        .iter()
        .find(|l| l.contains("delivery cut at shutdown"))
        .unwrap_or_else(|| panic!("no line for the cut delivery: {rest:?}"));
    assert!(
        cut.contains("target=stuck") && cut.contains(&event_id),
        "{cut}"
    );

    // The target is fast now: the next start delivers the cut push, once.
    stuck.set(Behaviour::default());
    let mut relay = Binary::start(&path);
    let again = stuck.next().await;
    assert_eq!(again.body, first.body);
    assert_eq!(
        again.header("x-wechat-relay-event-id"),
        Some(event_id.as_str())
    );
    stuck.expect_none(Duration::from_millis(1500)).await;
    let (exit, _) = relay.terminate();
    assert!(exit.success(), "{exit:?}");
}
