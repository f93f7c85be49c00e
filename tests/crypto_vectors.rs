//! Every vector in tests/vectors (copied from the shared vectors: Tencent's samples, the docs'
//! walkthrough and wechatpy-made pushes), positive and negative, against the protocol code.

mod common;

use base64::Engine;
use serde_json::Value;
use wechat_relay::wechat::crypto::{AesKey, CryptoError, decrypt, encrypt, seal_reply};
use wechat_relay::wechat::message::Envelope;
use wechat_relay::wechat::signature::{sign, verify_msg_signature, verify_signature};

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("vector field {key}"))
}

fn key(v: &Value) -> AesKey {
    AesKey::from_encoding_aes_key(s(v, "encoding_aes_key")).expect("vector key decodes")
}

fn random16(v: &Value, field: &str) -> [u8; 16] {
    s(v, field).as_bytes().try_into().expect("16 ASCII bytes")
}

fn query_param<'a>(query: &'a str, name: &str) -> &'a str {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("query has {name}"))
}

#[test]
fn official_python_sample_compat_push() {
    let file = common::vectors("official_vectors.json");
    let v = &file["vectors"][0];
    assert_eq!(s(v, "id"), "O1_official_python_sample_compat_mode_push");
    let envelope = Envelope::parse(s(v, "post_body").as_bytes()).expect("body parses");
    let encrypt_text = envelope.encrypt().expect("Encrypt");
    assert_eq!(encrypt_text, s(v, "encrypt"));
    assert!(verify_msg_signature(
        s(v, "token"),
        s(v, "timestamp"),
        s(v, "nonce"),
        encrypt_text,
        s(v, "msg_signature")
    ));
    assert!(verify_signature(
        s(v, "token"),
        s(v, "timestamp"),
        s(v, "nonce"),
        s(v, "signature_derived")
    ));
    let xml = decrypt(&key(v), s(v, "appid"), encrypt_text).expect("decrypts");
    assert_eq!(xml, s(v, "decrypted_xml").as_bytes());
    // The sample key's canonical re-encoding is the same key.
    let canonical = AesKey::from_encoding_aes_key(
        s(v, "canonical_reencoding_of_aes_key").trim_end_matches('='),
    )
    .expect("canonical key");
    assert_eq!(canonical, key(v));
}

#[test]
fn official_java_samples_encrypt_to_the_published_ciphertext() {
    let file = common::vectors("official_vectors.json");
    for v in &file["vectors"].as_array().expect("list")[1..=2] {
        let id = s(v, "id");
        let plaintext = s(v, "plaintext");
        let made = encrypt(
            &key(v),
            s(v, "appid"),
            plaintext.as_bytes(),
            &random16(v, "random16"),
        );
        assert_eq!(made, s(v, "encrypt"), "{id}");
        let opened = decrypt(&key(v), s(v, "appid"), s(v, "encrypt")).expect(id);
        assert_eq!(opened, plaintext.as_bytes(), "{id}");
        assert_eq!(
            sign(&[
                s(v, "token"),
                s(v, "timestamp"),
                s(v, "nonce"),
                s(v, "encrypt")
            ]),
            s(v, "msg_signature_derived"),
            "{id}"
        );
    }
}

#[test]
fn official_docs_walkthrough_aaaaa() {
    let file = common::vectors("official_vectors.json");
    let v = &file["vectors"][3];
    let token = s(v, "token");
    // GET URL check.
    let get = s(&v["get_verify"], "query");
    assert!(verify_signature(
        token,
        query_param(get, "timestamp"),
        query_param(get, "nonce"),
        query_param(get, "signature")
    ));
    assert_eq!(
        query_param(get, "echostr"),
        s(&v["get_verify"], "expected_body")
    );
    // Plain POST signature.
    let plain = s(&v["plain_post"], "query");
    assert!(verify_signature(
        token,
        query_param(plain, "timestamp"),
        query_param(plain, "nonce"),
        query_param(plain, "signature")
    ));
    // Safe POST: pad 19 proves the 32-byte block.
    let safe = &v["safe_post"];
    assert!(verify_signature(
        token,
        s(safe, "timestamp"),
        s(safe, "nonce"),
        s(safe, "signature")
    ));
    assert!(verify_msg_signature(
        token,
        s(safe, "timestamp"),
        s(safe, "nonce"),
        s(safe, "encrypt"),
        s(safe, "msg_signature")
    ));
    let opened = decrypt(&key(v), s(v, "appid"), s(safe, "encrypt")).expect("safe_post decrypts");
    assert_eq!(opened, s(safe, "decrypted").as_bytes());
    // Reply: pad 1, with the docs' random prefix, and its MsgSignature.
    let reply = &v["reply"];
    let random: [u8; 16] = s(reply, "random16").as_bytes().try_into().expect("16");
    let made = encrypt(
        &key(v),
        s(v, "appid"),
        s(reply, "plaintext").as_bytes(),
        &random,
    );
    assert_eq!(made, s(reply, "encrypt"));
    assert_eq!(
        sign(&[token, s(reply, "timestamp"), s(reply, "nonce"), &made]),
        s(reply, "msg_signature")
    );
}

#[test]
fn wechatpy_signature_fixture() {
    let file = common::vectors("official_vectors.json");
    let v = &file["vectors"][4];
    let (token, ts, nonce) = (s(v, "token"), s(v, "timestamp"), s(v, "nonce"));
    assert!(verify_signature(token, ts, nonce, s(v, "signature_ok")));
    assert!(!verify_signature(token, ts, nonce, s(v, "signature_bad")));
}

#[test]
fn generated_url_check() {
    let file = common::vectors("generated_vectors.json");
    let v = &file["url_verification"];
    assert!(verify_signature(
        s(v, "token"),
        s(v, "timestamp"),
        s(v, "nonce"),
        s(v, "signature")
    ));
}

#[test]
fn generated_pushes_every_padding_edge() {
    let file = common::vectors("generated_vectors.json");
    let pushes = file["pushes"].as_array().expect("pushes");
    assert_eq!(pushes.len(), 8);
    for v in pushes {
        let name = s(v, "name");
        let k = key(v);
        assert_eq!(hex::encode(k.as_bytes()), s(v, "aes_key_hex"), "{name}");
        let query = s(v, "query_string");
        assert!(
            verify_signature(
                s(v, "token"),
                s(v, "timestamp"),
                s(v, "nonce"),
                s(v, "signature")
            ),
            "{name}"
        );
        assert_eq!(
            query_param(query, "msg_signature"),
            s(v, "msg_signature"),
            "{name}"
        );
        let envelope = Envelope::parse(s(v, "post_body_safe_mode").as_bytes()).expect(name);
        let encrypt_text = envelope.encrypt().expect(name);
        assert!(
            verify_msg_signature(
                s(v, "token"),
                s(v, "timestamp"),
                s(v, "nonce"),
                encrypt_text,
                s(v, "msg_signature")
            ),
            "{name}"
        );
        let xml =
            decrypt(&k, s(v, "appid"), encrypt_text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(xml, s(v, "plaintext_xml").as_bytes(), "{name}");
        assert_eq!(
            xml.len() as u64,
            v["msg_len"].as_u64().expect("msg_len"),
            "{name}"
        );
        // Our encryption with the same random prefix gives wechatpy's ciphertext.
        let made = encrypt(&k, s(v, "appid"), &xml, &random16(v, "random16"));
        assert_eq!(made, s(v, "encrypt"), "{name}");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s(v, "encrypt"))
            .expect("b64");
        assert_eq!(
            raw.len() as u64,
            v["decrypted_buffer_len"].as_u64().expect("len"),
            "{name}"
        );
    }
}

#[test]
fn generated_compat_body_decrypts_to_the_encrypted_copy() {
    let file = common::vectors("generated_vectors.json");
    let v = &file["compat_mode"];
    let common = &file["meta"]["common"];
    let envelope = Envelope::parse(s(v, "post_body_compat_mode").as_bytes()).expect("parses");
    let encrypt_text = envelope.encrypt().expect("Encrypt");
    assert!(verify_msg_signature(
        s(common, "token"),
        s(v, "timestamp"),
        s(v, "nonce"),
        encrypt_text,
        s(v, "msg_signature")
    ));
    let xml = decrypt(&key(common), s(common, "appid"), encrypt_text).expect("decrypts");
    let text = file["pushes"]
        .as_array()
        .expect("pushes")
        .iter()
        .find(|p| p["name"] == "text")
        .expect("text vector");
    assert_eq!(xml, s(text, "plaintext_xml").as_bytes());
}

#[test]
fn generated_encrypted_reply_byte_for_byte() {
    let file = common::vectors("generated_vectors.json");
    let v = &file["reply"];
    let body = seal_reply(
        &key(v),
        s(v, "appid"),
        s(v, "token"),
        s(v, "reply_plaintext_xml").as_bytes(),
        s(v, "timestamp"),
        s(v, "nonce"),
        &random16(v, "random16"),
    );
    assert_eq!(body, s(v, "response_body"));
}

#[test]
fn negative_vectors_are_all_refused() {
    let file = common::vectors("negative_vectors.json");
    let negatives = file["negative"].as_array().expect("negative");
    assert_eq!(negatives.len(), 10);
    for v in negatives {
        let name = s(v, "name");
        let (token, ts, nonce) = (s(v, "token"), s(v, "timestamp"), s(v, "nonce"));
        assert!(
            verify_signature(token, ts, nonce, s(v, "signature")),
            "{name}: signature is valid"
        );
        let envelope = Envelope::parse(s(v, "post_body").as_bytes()).expect(name);
        let Some(encrypt_text) = envelope.encrypt() else {
            // A plaintext body with encrypt_type=aes: nothing to verify or open.
            assert_eq!(name, "downgrade_plaintext_body");
            continue;
        };
        let signed = verify_msg_signature(token, ts, nonce, encrypt_text, s(v, "msg_signature"));
        let opened = decrypt(&key(v), s(v, "appid"), encrypt_text);
        let expected_refusal: Option<CryptoError> = match name {
            "bad_msg_signature" | "truncated_base64_orig_sig" => {
                assert!(!signed, "{name}: msg_signature must fail");
                continue;
            }
            "wrong_appid" => Some(CryptoError::AppId),
            "corrupted_padding_zero" | "corrupted_padding_33" | "corrupted_padding_filler" => {
                Some(CryptoError::Padding)
            }
            "truncated_base64_4chars" => Some(CryptoError::BlockLength(381)),
            "truncated_base64_1char" => Some(CryptoError::Base64),
            "stale_timestamp_replay" => {
                // Crypto-valid: only the timestamp window refuses it (tests/bad_input.rs).
                assert!(signed && opened.is_ok(), "{name}");
                continue;
            }
            other => panic!("unknown negative vector {other}"),
        };
        assert!(
            signed,
            "{name}: msg_signature is valid, the ciphertext is what is wrong"
        );
        assert_eq!(opened.err(), expected_refusal, "{name}");
    }
}

#[test]
fn edge_vectors_are_accepted() {
    let file = common::vectors("negative_vectors.json");
    let base = &file["base_vector"];
    let text = common::vectors("generated_vectors.json")["pushes"]
        .as_array()
        .expect("pushes")
        .iter()
        .find(|p| p["name"] == *base)
        .expect("base vector")
        .clone();
    for v in file["edge_should_accept_or_policy"]
        .as_array()
        .expect("edges")
    {
        let name = s(v, "name");
        let envelope =
            Envelope::parse(s(v, "post_body").as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let encrypt_text = envelope.encrypt().expect(name);
        assert!(
            verify_msg_signature(
                s(&text, "token"),
                s(v, "timestamp"),
                s(v, "nonce"),
                encrypt_text,
                s(v, "msg_signature")
            ),
            "{name}"
        );
        let xml = decrypt(&key(&text), s(&text, "appid"), encrypt_text).expect(name);
        assert_eq!(xml, s(&text, "plaintext_xml").as_bytes(), "{name}");
    }
}
