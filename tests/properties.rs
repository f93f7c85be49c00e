//! Properties of the protocol code over generated inputs (proptest): what the sender's side
//! seals opens to the same bytes; a single flipped bit anywhere WeChat signs makes the real
//! relay refuse the push and forward nothing; no proper prefix of a valid body parses.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use wechat_relay::wechat::crypto::{self, AesKey, CryptoError};
use wechat_relay::wechat::message::{Envelope, Message};
use wechat_relay::wechat::sender::{Outgoing, Sender, Stamp};

/// An EncodingAESKey: 43 letters and digits.
fn encoding_aes_key() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{43}"
}

/// Text that XML 1.0 can carry (no control characters, no non-characters).
fn xml_text() -> impl Strategy<Value = String> {
    "\\PC{0,80}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// PROTOCOL.md §4: any message bytes, any app id, any key and random prefix.
    #[test]
    fn encrypt_then_decrypt_round_trips(
        encoding_aes_key in encoding_aes_key(),
        app_id in any::<String>(),
        message in proptest::collection::vec(any::<u8>(), 0..1024),
        random in any::<[u8; 16]>(),
    ) {
        let key = AesKey::from_encoding_aes_key(&encoding_aes_key).expect("43 letters and digits");
        let encrypt = crypto::encrypt(&key, &app_id, &message, &random);
        prop_assert_eq!(crypto::decrypt(&key, &app_id, &encrypt), Ok(message));
        let other = format!("{app_id}x");
        prop_assert_eq!(crypto::decrypt(&key, &other, &encrypt), Err(CryptoError::AppId));
    }

    /// An encrypted passive reply (PROTOCOL.md §5) opens, signature checked, to its message.
    #[test]
    fn sealed_replies_open(
        encoding_aes_key in encoding_aes_key(),
        app_id in any::<String>(),
        token in "[A-Za-z0-9]{3,32}",
        message in proptest::collection::vec(any::<u8>(), 0..1024),
        timestamp in "[0-9]{1,10}",
        nonce in "[0-9]{1,10}",
        random in any::<[u8; 16]>(),
    ) {
        let key = AesKey::from_encoding_aes_key(&encoding_aes_key).expect("43 letters and digits");
        let reply = crypto::seal_reply(&key, &app_id, &token, &message, &timestamp, &nonce, &random);
        let sender = Sender {
            token: token.into(),
            app_id,
            key: Some(key),
        };
        prop_assert_eq!(sender.open_reply(reply.as_bytes()), Ok(message));
    }
}

proptest! {
    // Each case parses every prefix of two documents: a few hundred parses.
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every proper prefix of a valid outer body, and of the message inside it, is an error.
    #[test]
    fn no_proper_prefix_of_a_valid_body_parses(content in xml_text(), compatible in any::<bool>()) {
        let push = genuine(&content, 1);
        let plaintext_fields = compatible.then(|| inner_fields(&push.xml));
        let outgoing = push.outgoing(plaintext_fields.as_deref());
        let body = outgoing.body.as_bytes();
        prop_assert!(Envelope::parse(body).is_ok());
        prop_assert!(Message::parse(Bytes::copy_from_slice(push.xml.as_bytes())).is_ok());
        for cut in 0..body.len() {
            prop_assert!(Envelope::parse(&body[..cut]).is_err(), "outer prefix of {} bytes", cut);
        }
        let xml = push.xml.as_bytes();
        for cut in 0..xml.len() {
            let prefix = Bytes::copy_from_slice(&xml[..cut]);
            prop_assert!(Message::parse(prefix).is_err(), "inner prefix of {} bytes", cut);
        }
    }
}

/// The fields of `<xml>...</xml>` without the root (a compatible-mode body's plaintext copy).
fn inner_fields(xml: &str) -> String {
    xml.trim_start_matches("<xml>")
        .trim_end_matches("</xml>")
        .to_owned()
}

/// A genuine text push from the test account, with a fresh timestamp.
struct Genuine {
    xml: String,
    timestamp: String,
    nonce: String,
}

/// Each genuine push gets its own MsgId, so that none is a retry of another (a shrinking run
/// sends the same content again).
static MSG_ID: AtomicU64 = AtomicU64::new(1);

fn genuine(content: &str, nonce: u64) -> Genuine {
    Genuine {
        xml: text_xml(content, MSG_ID.fetch_add(1, Ordering::Relaxed)),
        timestamp: now(),
        nonce: nonce.to_string(),
    }
}

impl Genuine {
    fn outgoing(&self, plaintext_fields: Option<&str>) -> Outgoing {
        let stamp = Stamp {
            timestamp: &self.timestamp,
            nonce: &self.nonce,
            openid: OPENID,
        };
        sender()
            .encrypted(&self.xml, GH, plaintext_fields, &stamp, &[9; 16])
            .expect("the test sender has a key")
    }
}

/// Where a bit is flipped: each is covered by `signature` or `msg_signature`.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// The `Encrypt` text in the body.
    EncryptText,
    /// A bit of the ciphertext itself, base64-encoded again.
    CipherBytes,
    MsgSignature,
    Timestamp,
    Nonce,
}

fn part() -> impl Strategy<Value = Part> {
    prop_oneof![
        Just(Part::EncryptText),
        Just(Part::CipherBytes),
        Just(Part::MsgSignature),
        Just(Part::Timestamp),
        Just(Part::Nonce),
    ]
}

/// `bytes` with bit `bit` (modulo its length) flipped.
fn flip(bytes: &[u8], bit: usize) -> Vec<u8> {
    let mut flipped = bytes.to_vec();
    let at = bit % (bytes.len() * 8);
    flipped[at / 8] ^= 1 << (at % 8);
    flipped
}

/// The query with the value of `name` replaced by `value`, percent-encoded.
fn with_param(query: &str, name: &str, value: &[u8]) -> String {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| {
            let v = if k == name {
                form_urlencoded::byte_serialize(value).collect::<String>()
            } else {
                form_urlencoded::byte_serialize(v.as_bytes()).collect()
            };
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn param(query: &str, name: &str) -> String {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("the query has {name}"))
}

/// The genuine push with one bit flipped in `part`, or `None` when the flip only changes the
/// case of a hex letter of `msg_signature`, which the relay accepts by design (a proxy may
/// upper-case it; PROTOCOL.md §3).
fn tampered(outgoing: &Outgoing, part: Part, bit: usize) -> Option<(String, Vec<u8>)> {
    const OPEN: &str = "<Encrypt><![CDATA[";
    let start = outgoing.body.find(OPEN).expect("an encrypted push") + OPEN.len();
    let end = start
        + outgoing.body[start..]
            .find("]]>")
            .expect("the end of the CDATA");
    let body = outgoing.body.as_bytes();
    let with_encrypt = |text: &[u8]| [&body[..start], text, &body[end..]].concat();
    let with_flipped = |name: &str| {
        let value = param(&outgoing.query, name);
        let query = with_param(&outgoing.query, name, &flip(value.as_bytes(), bit));
        (query, body.to_vec())
    };
    match part {
        Part::EncryptText => Some((
            outgoing.query.clone(),
            with_encrypt(&flip(&body[start..end], bit)),
        )),
        Part::CipherBytes => {
            let cipher = STANDARD.decode(&body[start..end]).expect("base64");
            let text = STANDARD.encode(flip(&cipher, bit));
            Some((outgoing.query.clone(), with_encrypt(text.as_bytes())))
        }
        Part::MsgSignature => {
            let tampered = with_flipped("msg_signature");
            let flipped = param(&tampered.0, "msg_signature");
            (!flipped.eq_ignore_ascii_case(&param(&outgoing.query, "msg_signature")))
                .then_some(tampered)
        }
        Part::Timestamp => Some(with_flipped("timestamp")),
        Part::Nonce => Some(with_flipped("nonce")),
    }
}

/// Against the real relay: a push with any single bit flipped in its ciphertext, its
/// `msg_signature`, its timestamp or its nonce is refused with a 4xx and not forwarded; so is
/// a proper prefix of its body, and a signed push of a proper prefix of its message (400). The
/// genuine push after them is forwarded, and is the first thing the target gets.
#[test]
fn a_single_flipped_bit_is_refused_by_the_relay() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (relay, target) = runtime.block_on(async {
        let target = FakeTarget::start().await;
        let mut toml = server_section(2000, 300);
        toml.push_str(&account_section("main", "/wechat", "safe"));
        toml.push_str(&target_section("t", &target.url("/"), "plain", ""));
        toml.push_str("[[route]]\nto = [\"t\"]\n");
        (TestRelay::start(&toml).await, target)
    });
    let target = tokio::sync::Mutex::new(target);
    let url = |query: &str| relay.url(&format!("/wechat?{query}"));
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 96,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let strategy = (
        xml_text(),
        part(),
        any::<usize>(),
        1_000_000_000u64..10_000_000_000,
        any::<usize>(),
    );
    let result = runner.run(&strategy, |(content, part, bit, nonce, cut)| {
        let push = genuine(&content, nonce);
        let outgoing = push.outgoing(None);
        let Some((query, body)) = tampered(&outgoing, part, bit) else {
            return Err(TestCaseError::reject("only the case of a hex letter"));
        };
        // A proper prefix of the body, and a genuinely signed push of a proper prefix of the
        // message.
        let prefix = outgoing.body[..cut % outgoing.body.len()].to_owned();
        let mut end = cut % push.xml.len();
        while !push.xml.is_char_boundary(end) {
            end -= 1;
        }
        let inner = Genuine {
            xml: push.xml[..end].to_owned(),
            ..genuine(&content, nonce)
        }
        .outgoing(None);
        runtime.block_on(async {
            let refused = post(&url(&query), body).await;
            prop_assert!(
                refused.status.is_client_error(),
                "{:?} flipped: {} {}",
                part,
                refused.status,
                refused.text()
            );
            for (what, query, body) in [
                ("body", &outgoing.query, prefix),
                ("message", &inner.query, inner.body),
            ] {
                let refused = post(&url(query), body).await;
                prop_assert_eq!(refused.status, 400, "a prefix of the {}", what);
            }
            let answer = post(&url(&outgoing.query), outgoing.body.clone()).await;
            assert_success(&answer);
            let forwarded = target.lock().await.next().await;
            prop_assert_eq!(forwarded.body, Bytes::from(push.xml.clone()));
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    runtime.block_on(async {
        target
            .into_inner()
            .expect_none(std::time::Duration::from_millis(200))
            .await;
        relay.stop().await;
    });
}
