//! Why a request was refused or a forward failed, and the one place that maps them to HTTP:
//! a refusal's 4xx, the store's 503 (WeChat retries) and a bug's 500.

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::outbox::store::{CachedAnswer, StoreError};
use crate::wechat::crypto::CryptoError;
use crate::wechat::message::XmlError;

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// A request the relay refuses: nothing is forwarded, and the log says why in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the client's address is not in server.allow_ips")]
    NotAllowed,
    #[error("no account is configured at this path")]
    UnknownPath,
    #[error("method not allowed: WeChat sends GET (URL check) and POST (pushes)")]
    MethodNotAllowed,
    #[error("query parameter {0} is missing")]
    MissingParam(&'static str),
    #[error("query parameter {0} is missing: the request is not signed")]
    Unsigned(&'static str),
    #[error("signature does not match the token (-40001)")]
    BadSignature,
    #[error("msg_signature does not match the token and Encrypt (-40001)")]
    BadMsgSignature,
    #[error("timestamp is not a number")]
    BadTimestamp,
    #[error("timestamp is {0} s from now, beyond timestamp_skew_s")]
    StaleTimestamp(u64),
    #[error("body is larger than max_body_bytes")]
    TooLarge,
    #[error("body could not be read: {0}")]
    BodyRead(String),
    #[error("{0}")]
    Xml(#[from] XmlError),
    #[error("encrypt_type=aes but the body has no Encrypt element")]
    MissingEncrypt,
    #[error("unencrypted push to an account in safe or compatible mode (downgrade)")]
    Downgrade,
    #[error("encrypted push to an account without encoding_aes_key")]
    NoKey,
    #[error("{0}")]
    Crypto(#[from] CryptoError),
}

/// Every name [`Rejection::reason`] gives: the metrics count each from 0.
pub const REJECTION_REASONS: [&str; 18] = [
    "allow_ips",
    "unknown_path",
    "method",
    "missing_param",
    "signature",
    "timestamp",
    "stale",
    "too_large",
    "body",
    "doctype",
    "entity",
    "processing_instruction",
    "invalid_char",
    "xml",
    "downgrade",
    "no_key",
    "app_id",
    "decrypt",
];

impl Rejection {
    /// The HTTP status WeChat (or whoever sent it) gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::UnknownPath => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::NotAllowed
            | Rejection::Unsigned(_)
            | Rejection::BadSignature
            | Rejection::BadMsgSignature
            | Rejection::StaleTimestamp(_)
            | Rejection::Downgrade => StatusCode::FORBIDDEN,
            Rejection::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::MissingParam(_)
            | Rejection::BadTimestamp
            | Rejection::BodyRead(_)
            | Rejection::Xml(_)
            | Rejection::MissingEncrypt
            | Rejection::NoKey
            | Rejection::Crypto(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// A short, stable name for logs and metrics: one of [`REJECTION_REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NotAllowed => "allow_ips",
            Rejection::UnknownPath => "unknown_path",
            Rejection::MethodNotAllowed => "method",
            Rejection::MissingParam(_) => "missing_param",
            Rejection::Unsigned(_) | Rejection::BadSignature | Rejection::BadMsgSignature => {
                "signature"
            }
            Rejection::BadTimestamp => "timestamp",
            Rejection::StaleTimestamp(_) => "stale",
            Rejection::TooLarge => "too_large",
            Rejection::BodyRead(_) => "body",
            Rejection::Xml(XmlError::Doctype) => "doctype",
            Rejection::Xml(XmlError::Entity) => "entity",
            Rejection::Xml(XmlError::ProcessingInstruction) => "processing_instruction",
            Rejection::Xml(XmlError::InvalidChar(_)) => "invalid_char",
            Rejection::Xml(_) | Rejection::MissingEncrypt => "xml",
            Rejection::Downgrade => "downgrade",
            Rejection::NoKey => "no_key",
            Rejection::Crypto(CryptoError::AppId) => "app_id",
            Rejection::Crypto(_) => "decrypt",
        }
    }
}

impl Rejection {
    /// The refusal's answer: its status and its reason in one line (`Allow` for a method
    /// WeChat does not use).
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut response = plain(self.status(), Bytes::from(format!("{self}\n")));
        if *self == Rejection::MethodNotAllowed {
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, POST"));
        }
        response
    }
}

impl From<StoreError> for CachedAnswer {
    /// The answer when the store fails: 503, so WeChat tries again. The reason goes to the
    /// log, not to the client (it names paths).
    fn from(_: StoreError) -> Self {
        CachedAnswer {
            status: StatusCode::SERVICE_UNAVAILABLE.as_u16(),
            content_type: "text/plain; charset=utf-8".into(),
            body: Bytes::from_static(b"store unavailable: the push was not accepted\n"),
        }
    }
}

/// A bug's answer (a handler that panicked): 500, without the panic's payload (it could hold
/// message content).
pub fn internal_error() -> Response<Full<Bytes>> {
    plain(
        StatusCode::INTERNAL_SERVER_ERROR,
        Bytes::from_static(b"internal error\n"),
    )
}

/// A one-line text answer with `status` (refusals, 500, the admin listener's answers).
pub fn plain(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_input_refusals_have_reasons_of_their_own() {
        for (error, reason) in [
            (XmlError::Doctype, "doctype"),
            (XmlError::Entity, "entity"),
            (XmlError::ProcessingInstruction, "processing_instruction"),
            (XmlError::InvalidChar(0), "invalid_char"),
            (XmlError::NoRoot, "xml"),
        ] {
            let rejection = Rejection::Xml(error);
            assert_eq!(
                (rejection.status(), rejection.reason()),
                (StatusCode::BAD_REQUEST, reason)
            );
        }
    }
}

/// Why a forward got no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("timed out")]
    Timeout,
    /// The reply target's synchronous attempt, cut at WeChat's reply deadline (its delivery is
    /// then retried by the outbox).
    #[error("no answer within the reply deadline")]
    Deadline,
    #[error("{0}")]
    Transport(String),
    #[error("answer body larger than {0} bytes")]
    AnswerTooLarge(usize),
}

impl ForwardError {
    /// What cut an attempt that got no answer in time, for the log's `cut` field: `timeout`
    /// (the target's `timeout_ms`), `deadline` (the reply deadline), nothing (not cut).
    pub fn cut(&self) -> Option<&'static str> {
        match self {
            ForwardError::Timeout => Some("timeout"),
            ForwardError::Deadline => Some("deadline"),
            ForwardError::Transport(_) | ForwardError::AnswerTooLarge(_) => None,
        }
    }
}
