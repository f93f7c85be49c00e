//! A verified push: what the relay accepted, decrypted and identified, as every later step
//! (routing, forwarding, replying) reads it.

use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderValue;

use crate::wechat::message::Message;

/// Query parameters that only make sense with the encrypted body: a `plain` forward drops them.
const ENCRYPTION_PARAMS: [&str; 2] = ["encrypt_type", "msg_signature"];

#[derive(Debug, Clone)]
pub struct Push {
    /// The `[[account]]` name.
    pub account: String,
    /// Stable across WeChat's retries of this push.
    pub event_id: String,
    /// The request's query string, exactly as received.
    pub query: String,
    /// The request's body, exactly as received.
    pub body: Bytes,
    pub content_type: Option<HeaderValue>,
    /// The `X-Forwarded-For` value to send on: the incoming one plus the peer's address.
    pub forwarded_for: String,
    /// The message: decrypted when the push was encrypted.
    pub message: Message,
    /// Which of the account's keys opened it, if it was encrypted (replies use the same key).
    pub key_index: Option<usize>,
    pub received_at: SystemTime,
}

impl Push {
    /// A plaintext push of `<xml/>` under `event_id`, for unit tests.
    #[cfg(test)]
    pub fn for_test(event_id: &str) -> Push {
        Push {
            account: "main".into(),
            event_id: event_id.into(),
            query: String::new(),
            body: Bytes::new(),
            content_type: None,
            forwarded_for: String::new(),
            message: Message::parse(Bytes::from_static(b"<xml/>")).expect("xml"),
            key_index: None,
            received_at: SystemTime::now(),
        }
    }

    pub fn encrypted(&self) -> bool {
        self.key_index.is_some()
    }

    /// The query a plaintext-mode push would have had: the original minus `encrypt_type` and
    /// `msg_signature`, every other pair byte for byte (`signature` stays valid: it never
    /// covered the body).
    pub fn plain_query(&self) -> String {
        let kept = self.query.split('&').filter(|pair| {
            // Decode the key as the handler read it: `encrypt%5Ftype` is `encrypt_type`
            // (borrowed unless it has a `%` or a `+` to decode).
            let key = form_urlencoded::parse(pair.as_bytes())
                .next()
                .map(|(key, _)| key)
                .unwrap_or_default();
            !pair.is_empty() && !ENCRYPTION_PARAMS.contains(&key.as_ref())
        });
        let mut query = String::with_capacity(self.query.len());
        for pair in kept {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str(pair);
        }
        query
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_query_drops_only_encryption_params() {
        let push = Push {
            account: "main".into(),
            event_id: "e".into(),
            query:
                "signature=abc&timestamp=1&nonce=2&openid=o-x_y&encrypt_type=aes&msg_signature=def"
                    .into(),
            body: Bytes::new(),
            content_type: None,
            forwarded_for: String::new(),
            message: Message::parse(Bytes::from_static(b"<xml/>")).expect("xml"),
            key_index: Some(0),
            received_at: SystemTime::now(),
        };
        assert_eq!(
            push.plain_query(),
            "signature=abc&timestamp=1&nonce=2&openid=o-x_y"
        );
    }
}
