//! Criterion micro-benchmarks of the steps of one push, each on the library's own functions:
//!
//! - `signature`: `verify_signature` (every request) and `verify_msg_signature` (every
//!   encrypted push, over its `Encrypt` text too);
//! - `open`: what the relay does to open an encrypted push of about 1 KB: parse the envelope,
//!   check `msg_signature`, `crypto::decrypt`, `Message::parse` (issue 9's target: under 5 µs),
//!   and each of those steps alone;
//! - `seal_reply`: a reply target's answer sealed for WeChat (`crypto::seal_reply`);
//! - `route`: `RouteTable::route` over ten routes of a realistic relay.toml, for a push the
//!   first route takes and for one only the catch-all at the end takes.
//!
//! Run them with:
//!
//! ```sh
//! cargo bench --bench pieces                 # all of them
//! cargo bench --bench pieces -- open         # those whose name has `open`
//! ```
//!
//! `cargo test --all-targets` runs each once, as a test.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wechat_relay::config::Config;
use wechat_relay::route::RouteTable;
use wechat_relay::wechat::crypto::{self, AesKey};
use wechat_relay::wechat::message::{Envelope, Message};
use wechat_relay::wechat::sender::{PushContent, Sender, Stamp, message_xml};
use wechat_relay::wechat::signature::{verify_msg_signature, verify_signature};

const TOKEN: &str = "benchToken2024";
const APP_ID: &str = "wx0123456789abcdef";
const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const TIMESTAMP: &str = "1764547200";
const NONCE: &str = "1408236751";
const OPENID: &str = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o";

fn key() -> AesKey {
    AesKey::from_encoding_aes_key(KEY).expect("a 43-character EncodingAESKey")
}

/// A safe-mode text push whose body is about 1 KB: its query and body, as WeChat sends them.
fn push_of_1kb() -> (String, String) {
    let sender = Sender {
        token: TOKEN.into(),
        app_id: APP_ID.into(),
        key: Some(key()),
    };
    let content = "Hello, I ordered a blue jacket last Tuesday (order 20261124-0042) and would \
                   like to know when it ships and whether I can still change the size to L. ";
    let xml = message_xml(
        "gh_0123456789ab",
        OPENID,
        1_764_547_200,
        &PushContent::Text {
            content: &format!(
                "{}Thank you very much for your help, and have a nice day! Best regards, Li Wei.",
                content.repeat(2)
            ),
            msg_id: 24_613_581_927_463_129,
        },
    );
    let stamp = Stamp {
        timestamp: TIMESTAMP,
        nonce: NONCE,
        openid: OPENID,
    };
    let push = sender
        .encrypted(&xml, "gh_0123456789ab", None, &stamp, &[7; 16])
        .expect("the sender has a key");
    (push.query, push.body)
}

/// A query parameter of `query` (the signatures are hex, so never percent-encoded).
fn param<'a>(query: &'a str, name: &str) -> &'a str {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .expect("the parameter is in the query")
}

fn signature(c: &mut Criterion) {
    let (query, body) = push_of_1kb();
    let envelope = Envelope::parse(body.as_bytes()).expect("the envelope parses");
    let encrypt = envelope.encrypt().expect("an Encrypt");
    let (signature, msg_signature) = (param(&query, "signature"), param(&query, "msg_signature"));
    assert!(verify_signature(TOKEN, TIMESTAMP, NONCE, signature));
    assert!(verify_msg_signature(
        TOKEN,
        TIMESTAMP,
        NONCE,
        encrypt,
        msg_signature
    ));
    let mut group = c.benchmark_group("signature");
    group.bench_function("verify_signature", |b| {
        b.iter(|| {
            verify_signature(
                black_box(TOKEN),
                black_box(TIMESTAMP),
                black_box(NONCE),
                black_box(signature),
            )
        })
    });
    group.bench_function("verify_msg_signature", |b| {
        b.iter(|| {
            verify_msg_signature(
                black_box(TOKEN),
                black_box(TIMESTAMP),
                black_box(NONCE),
                black_box(encrypt),
                black_box(msg_signature),
            )
        })
    });
    group.finish();
}

/// The relay's open step: envelope, `msg_signature`, decrypt, message.
fn open_push(key: &AesKey, query: &str, body: &[u8]) -> Message {
    let envelope = Envelope::parse(body).expect("the envelope parses");
    let encrypt = envelope.encrypt().expect("an Encrypt");
    assert!(verify_msg_signature(
        TOKEN,
        param(query, "timestamp"),
        param(query, "nonce"),
        encrypt,
        param(query, "msg_signature"),
    ));
    let xml = crypto::decrypt(key, APP_ID, encrypt).expect("it decrypts");
    Message::parse(Bytes::from(xml)).expect("the message parses")
}

fn open(c: &mut Criterion) {
    let key = key();
    let (query, body) = push_of_1kb();
    let message = open_push(&key, &query, body.as_bytes());
    assert_eq!(message.msg_id(), Some("24613581927463129"));
    let encrypt = Envelope::parse(body.as_bytes())
        .expect("the envelope parses")
        .encrypt()
        .expect("an Encrypt")
        .to_owned();
    let xml = message.xml().clone();
    let mut group = c.benchmark_group("open");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("push_1kb", |b| {
        b.iter(|| open_push(&key, black_box(&query), black_box(body.as_bytes())))
    });
    group.bench_function("envelope_parse", |b| {
        b.iter(|| Envelope::parse(black_box(body.as_bytes())))
    });
    group.bench_function("decrypt", |b| {
        b.iter(|| crypto::decrypt(&key, APP_ID, black_box(&encrypt)))
    });
    group.bench_function("message_parse", |b| {
        b.iter(|| Message::parse(black_box(xml.clone())))
    });
    group.finish();
}

fn seal_reply(c: &mut Criterion) {
    let key = key();
    let reply = b"<xml><ToUserName><![CDATA[oUpF8uMuAJO_M2pxb1Q9zNjWeS6o]]></ToUserName>\
        <FromUserName><![CDATA[gh_0123456789ab]]></FromUserName><CreateTime>1764547200</CreateTime>\
        <MsgType><![CDATA[text]]></MsgType><Content><![CDATA[Your order ships tomorrow.]]></Content></xml>";
    let sender = Sender {
        token: TOKEN.into(),
        app_id: APP_ID.into(),
        key: Some(key.clone()),
    };
    let sealed = crypto::seal_reply(&key, APP_ID, TOKEN, reply, TIMESTAMP, NONCE, &[9; 16]);
    assert_eq!(
        sender.open_reply(sealed.as_bytes()).as_deref(),
        Ok(&reply[..])
    );
    c.bench_function("seal_reply", |b| {
        b.iter(|| {
            crypto::seal_reply(
                &key,
                APP_ID,
                TOKEN,
                black_box(reply),
                TIMESTAMP,
                NONCE,
                &[9; 16],
            )
        })
    });
}

/// Ten routes as an account with QR logins, menus and keyword routing would have them.
const ROUTES: &str = r#"
[[account]]
name = "main"
path = "/wechat"
app_id = "wx0123456789abcdef"
token = "benchToken2024"
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
[[target]]
name = "identity"
url = "http://127.0.0.1:9/events"
[[target]]
name = "shop"
url = "http://127.0.0.1:9/wechat"
format = "plain"
[[target]]
name = "crm"
url = "http://127.0.0.1:9/hooks"
format = "plain"
[[route]]
name = "qr-login"
msg_type = ["event"]
event = ["subscribe", "SCAN"]
ticket = true
to = ["identity", "shop"]
reply = "identity"
[[route]]
name = "welcome"
event = ["subscribe"]
ticket = false
to = ["shop"]
reply_text = "Welcome!"
[[route]]
name = "unsubscribe"
event = ["unsubscribe"]
to = ["crm"]
[[route]]
name = "menu-orders"
event = ["CLICK"]
event_key = ["orders_*", "order"]
to = ["shop"]
reply = "shop"
[[route]]
name = "menu-support"
event = ["CLICK", "VIEW"]
event_key = ["support_*", "*help*"]
to = ["crm"]
reply = "crm"
[[route]]
name = "location"
event = ["LOCATION"]
to = ["crm"]
[[route]]
name = "refunds"
msg_type = ["text"]
content = ["refund*", "*Refund*", "*退款*"]
to = ["crm"]
[[route]]
name = "orders"
msg_type = ["text"]
content = ["order *", "*tracking*"]
to = ["shop"]
reply = "shop"
[[route]]
name = "media"
msg_type = ["image", "voice", "video", "shortvideo"]
to = ["crm"]
[[route]]
name = "everything-else"
to = ["shop", "crm"]
reply = "shop"
"#;

fn route(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, ROUTES).expect("relay.toml written");
    let config = Config::load_with_env(&path, &[]).expect("the routes load");
    let table = RouteTable::new(&config.routes);
    let message = |content: &PushContent<'_>| {
        Message::parse(Bytes::from(message_xml(
            "gh_0123456789ab",
            OPENID,
            1_764_547_200,
            content,
        )))
        .expect("the message parses")
    };
    let scan = message(&PushContent::Event {
        event: "SCAN",
        event_key: Some("123123"),
        ticket: Some(
            "gQH47joAAAAAAAAAASxodHRwOi8vd2VpeGluLnFxLmNvbS9xL2taZ2Z3TVRtNzJXV1Brb3ZhYmJJAAIEZ23sUwMEmm3sUw==",
        ),
    });
    let hello = message(&PushContent::Text {
        content: "hello, is anyone there?",
        msg_id: 1,
    });
    let name = |m: &Message| table.route("main", m).map(|r| r.name.clone());
    assert_eq!(name(&scan).as_deref(), Some("qr-login"));
    assert_eq!(name(&hello).as_deref(), Some("everything-else"));
    let mut group = c.benchmark_group("route");
    group.bench_function("first_of_10", |b| {
        b.iter(|| table.route(black_box("main"), black_box(&scan)).is_some())
    });
    group.bench_function("last_of_10", |b| {
        b.iter(|| table.route(black_box("main"), black_box(&hello)).is_some())
    });
    group.finish();
}

criterion_group!(pieces, signature, open, seal_reply, route);
criterion_main!(pieces);
