//! What each fuzz target does with one input, written once: the `cargo fuzz` targets in
//! `fuzz_targets/` call these functions, and `tests/fuzz_regressions.rs` (which includes this
//! file) replays the kept corpus and every crash input through them on stable.
//!
//! Each function takes any bytes, must never panic on them, and checks what must hold of
//! whatever the library accepts. The account is the one of the generated test vectors
//! (tests/vectors/generated_vectors.json), so the vectors seed every corpus.

use std::path::Path;

use aes::Aes256;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeEncrypt, KeyIvInit};
use wechat_relay::config::Config;
use wechat_relay::wechat::crypto::{self, AesKey};
use wechat_relay::wechat::message::{Envelope, Fields, Message};
use wechat_relay::wechat::signature::{verify_msg_signature, verify_signature};

/// The vectors' account.
pub const TOKEN: &str = "relayToken2024";
pub const ENCODING_AES_KEY: &str = "RelayVectorsEncodingAESKey0123456789abcdefZ";
pub const APP_ID: &str = "wxa1b2c3d4e5f60789";

/// WeChat's padding block (PROTOCOL.md §4).
const PAD_BLOCK: usize = 32;

fn key() -> AesKey {
    AesKey::from_encoding_aes_key(ENCODING_AES_KEY).expect("the vectors' EncodingAESKey")
}

/// The fuzz targets, by their name in `fuzz/Cargo.toml` and `fuzz/corpus/`, with the function
/// that runs one input. `config` needs a folder to write relay.toml in.
pub const TARGETS: [&str; 4] = ["envelope", "decrypt", "message", "config"];

/// Runs one input through the target called `name` (one of [`TARGETS`]); `dir` is the folder
/// the config target writes its relay.toml in.
pub fn run(name: &str, dir: &Path, data: &[u8]) {
    match name {
        "envelope" => envelope(data),
        "decrypt" => decrypt(data),
        "message" => message(data),
        "config" => config(dir, data),
        other => panic!("no fuzz target called {other}"),
    }
}

/// (a) The outer POST body, as the relay parses it before anything is verified.
pub fn envelope(data: &[u8]) {
    let envelope = match Envelope::parse(data) {
        Ok(envelope) => envelope,
        Err(e) => {
            assert_eq!(Fields::parse(data).err(), Some(e), "refused alike");
            return;
        }
    };
    if let Some(encrypt) = envelope.encrypt() {
        // What is hashed for msg_signature has no whitespace around it.
        assert_eq!(encrypt, encrypt.trim_ascii());
    }
    // The one-pass envelope reads what the tree reads, under the same rules.
    let fields = Fields::parse(data).expect("a body the envelope accepts is a document");
    assert_eq!(
        envelope.encrypt(),
        fields.get("Encrypt").map(str::trim_ascii)
    );
    assert_eq!(envelope.is_wechat_xml(), fields.root() == "xml");
    fields_hold_together(&fields);
}

/// (c) A decrypted message, as the relay parses it for routing and dedupe.
pub fn message(data: &[u8]) {
    let Ok(message) = Message::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    // Forwarded byte for byte.
    assert_eq!(&message.xml()[..], data);
    fields_hold_together(message.fields());
    let _ = (
        message.msg_type(),
        message.event(),
        message.event_key(),
        message.ticket(),
        message.content(),
        message.msg_id(),
        message.is_event(),
    );
    let event_id = message.dedupe_key().event_id("fuzz");
    assert_eq!(event_id.len(), 32);
}

/// Every top-level element is in the JSON that `json` targets get, and every text field reads.
fn fields_hold_together(fields: &Fields) {
    let json = fields.to_json();
    let object = json.as_object().expect("the fields become a JSON object");
    for (name, _) in fields.iter() {
        assert!(
            object.contains_key(name),
            "{name:?} is missing from the JSON"
        );
        let _ = fields.get(name);
    }
    let _ = fields.root();
}

/// (b) Signature, decryption, padding, length field and app id. The first byte picks how the
/// rest is read:
///
/// - even: `query` `\n` `Encrypt`, as an encrypted push brings them: `msg_signature` (and
///   `signature`) are checked with the account's token, then `Encrypt` is decrypted whether
///   or not they matched, since the fuzzer cannot forge a SHA-1;
/// - odd: a plaintext, encrypted here with AES-256-CBC and no padding of its own, so that the
///   fuzzer chooses the random prefix, the length field, the message, the app id and the padding
///   that `decrypt` checks.
pub fn decrypt(data: &[u8]) {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    if shape % 2 == 0 {
        signed_push(rest);
    } else {
        chosen_plaintext(rest);
    }
}

fn signed_push(data: &[u8]) {
    let (query, encrypt) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let encrypt = String::from_utf8_lossy(encrypt);
    // The first of a repeated name counts, as in the relay.
    let param = |name: &str| {
        form_urlencoded::parse(query)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let (timestamp, nonce) = (param("timestamp"), param("nonce"));
    if let (Some(timestamp), Some(nonce)) = (&timestamp, &nonce) {
        if let Some(signature) = param("signature") {
            verify_signature(TOKEN, timestamp, nonce, &signature);
        }
        let signed = param("msg_signature").is_some_and(|msg_signature| {
            verify_msg_signature(TOKEN, timestamp, nonce, &encrypt, &msg_signature)
        });
        if signed {
            // What the relay does next: decrypt and parse the message.
            if let Some(xml) = open(&encrypt) {
                message(&xml);
            }
            return;
        }
    }
    open(&encrypt);
}

/// Decrypts `encrypt` with the account's key and app id; what opens must seal back to a
/// ciphertext that opens to the same message.
fn open(encrypt: &str) -> Option<Vec<u8>> {
    let key = key();
    let message = crypto::decrypt(&key, APP_ID, encrypt).ok()?;
    let again = crypto::encrypt(&key, APP_ID, &message, &[0; 16]);
    assert_eq!(crypto::decrypt(&key, APP_ID, &again).as_ref(), Ok(&message));
    Some(message)
}

fn chosen_plaintext(data: &[u8]) {
    let key = key();
    let mut plain = data.to_vec();
    // A whole number of blocks; the zeros make a padding that must be refused.
    plain.resize(plain.len().div_ceil(PAD_BLOCK).max(1) * PAD_BLOCK, 0);
    let mut buf = plain.clone();
    let bytes = key.as_bytes();
    let cipher = cbc::Encryptor::<Aes256>::new_from_slices(bytes, &bytes[..16])
        .expect("a 32-byte key and a 16-byte IV")
        .encrypt_padded::<NoPadding>(&mut buf, plain.len())
        .expect("a whole number of blocks");
    let encrypt = STANDARD.encode(cipher);
    let Ok(message) = crypto::decrypt(&key, APP_ID, &encrypt) else {
        return;
    };
    // Accepted only if it is exactly what the sender's side makes of that message, with the
    // same random prefix: random(16) || len || message || app id || padding.
    let random: [u8; 16] = plain[..16].try_into().expect("16 bytes of a whole block");
    assert_eq!(
        crypto::encrypt(&key, APP_ID, &message, &random),
        encrypt,
        "decrypt accepted a plaintext the sender would not have made"
    );
    // The relay parses whatever opened.
    self::message(&message);
}

/// (d) relay.toml, as `check` and `serve` load it (no environment): written to `dir`, loaded,
/// and its summary printed.
pub fn config(dir: &Path, data: &[u8]) {
    let path = dir.join("relay.toml");
    write_private(&path, data);
    match Config::load_with_env(&path, &[]) {
        Ok(config) => {
            let summary = config.to_string();
            assert!(!summary.is_empty());
        }
        // Every refusal says what is wrong.
        Err(e) => assert!(!e.0.is_empty() && e.0.iter().all(|line| !line.is_empty())),
    }
}

/// Writes relay.toml readable by its owner only, like a real one.
fn write_private(path: &Path, data: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create the temporary relay.toml");
    file.write_all(data)
        .expect("write the temporary relay.toml");
}
