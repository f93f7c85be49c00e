//! What arrives, checked: the query, `signature`, the timestamp, the body within its limits,
//! and the push opened (`msg_signature` checked and decrypted, PROTOCOL.md §3-§5). Nothing here
//! knows routes or targets; every check ends in a [`Rejection`] or in what the next step reads.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body_util::{BodyExt, Limited};

use crate::config::{Account, Mode};
use crate::error::Rejection;
use crate::forward::unix_now;
use crate::wechat::crypto::{self, CryptoError};
use crate::wechat::message::{Envelope, Fields, Message};
use crate::wechat::signature::{verify_msg_signature, verify_signature};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The query parameters, percent-decoded; the first of a repeated name counts. Borrowed from
/// the query string unless a pair needs decoding.
pub struct Query<'q>(Vec<(Cow<'q, str>, Cow<'q, str>)>);

impl<'q> Query<'q> {
    pub fn parse(raw: &'q str) -> Self {
        Self(form_urlencoded::parse(raw.as_bytes()).collect())
    }

    pub fn get(&self, name: &'static str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    pub fn require(&self, name: &'static str) -> Result<&str, Rejection> {
        self.get(name).ok_or(Rejection::MissingParam(name))
    }
}

/// `signature` over token, timestamp and nonce: present on every request, in every mode.
/// A request without them is unsigned: 403, like a wrong signature.
pub fn check_signature(account: &Account, query: &Query) -> Result<(), Rejection> {
    let signed = |name| query.get(name).ok_or(Rejection::Unsigned(name));
    let signature = signed("signature")?;
    let timestamp = signed("timestamp")?;
    let nonce = signed("nonce")?;
    if verify_signature(account.token.expose_str(), timestamp, nonce, signature) {
        Ok(())
    } else {
        Err(Rejection::BadSignature)
    }
}

/// Nothing in the protocol expires: refuse pushes further than `skew` (`timestamp_skew_s`)
/// from now. `None` checks nothing.
pub fn check_timestamp(skew: Option<Duration>, query: &Query) -> Result<(), Rejection> {
    let Some(skew) = skew else {
        return Ok(());
    };
    let timestamp: u64 = query
        .require("timestamp")?
        .parse()
        .map_err(|_| Rejection::BadTimestamp)?;
    let off = unix_now().abs_diff(timestamp);
    if off > skew.as_secs() {
        return Err(Rejection::StaleTimestamp(off));
    }
    Ok(())
}

/// Reads the body up to `limit` bytes (`max_body_bytes`), within `deadline` (the reply
/// deadline).
pub async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, Rejection>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Rejection::TooLarge);
    }
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(deadline, collect).await {
        Err(_) => Err(Rejection::BodyRead(
            "not received within the reply deadline".into(),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Rejection::TooLarge),
        Ok(Err(e)) => Err(Rejection::BodyRead(e.to_string())),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Parses the body and, for an encrypted push, checks `msg_signature` and decrypts it.
/// Returns the message and the index of the key that opened it.
pub fn open(
    account: &Account,
    query: &Query,
    body: &Bytes,
) -> Result<(Message, Option<usize>), Rejection> {
    let encrypted = query
        .get("encrypt_type")
        .is_some_and(|t| t.eq_ignore_ascii_case("aes"));
    if !encrypted {
        // The body is the message; it is refused as XML before the mode is looked at.
        let fields = Fields::parse(body)?;
        // WeChat encrypts every push in safe and compatible mode; an unencrypted one is a
        // downgrade (`signature` does not cover the body, so anyone holding one captured
        // query could post any XML with it).
        if account.mode != Mode::Plaintext {
            return Err(Rejection::Downgrade);
        }
        return Ok((Message::from_parts(body.clone(), fields), None));
    }
    let envelope = Envelope::parse(body)?;
    let encrypt = envelope.encrypt().ok_or(Rejection::MissingEncrypt)?;
    let msg_signature = query.require("msg_signature")?;
    let timestamp = query.require("timestamp")?;
    let nonce = query.require("nonce")?;
    if !verify_msg_signature(
        account.token.expose_str(),
        timestamp,
        nonce,
        encrypt,
        msg_signature,
    ) {
        return Err(Rejection::BadMsgSignature);
    }
    let (xml, key_index) = decrypt_with_any(account, encrypt)?;
    // In compatible mode the plaintext fields beside <Encrypt> are unauthenticated: only
    // the decrypted message is used from here on.
    Ok((Message::parse(Bytes::from(xml))?, Some(key_index)))
}

/// Tries the current key, then the previous one (key rotation, PROTOCOL.md §4). The error of
/// the current key is the one reported.
fn decrypt_with_any(account: &Account, encrypt: &str) -> Result<(Vec<u8>, usize), Rejection> {
    let mut first_error: Option<CryptoError> = None;
    for (index, key) in account.keys.iter().enumerate() {
        match crypto::decrypt(key, &account.app_id, encrypt) {
            Ok(xml) => return Ok((xml, index)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.map_or(Rejection::NoKey, Rejection::Crypto))
}
