//! Requests to targets: one pooled HTTP/1.1 + HTTP/2 client (https through rustls with the
//! webpki roots), and the three request shapes, `raw`, `plain` and `json`, each signed the
//! Standard Webhooks way when its target has a secret (`json` always, the others with
//! `sign = true`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use crate::config::{ForwardFormat, Target};
use crate::error::ForwardError;
use crate::push::Push;

/// Stable for a push across WeChat's retries, so a target can dedupe.
pub const EVENT_ID_HEADER: HeaderName = HeaderName::from_static("x-wechat-relay-event-id");
/// 1 for the first attempt to deliver a push to a target, 2 for the first retry, and so on.
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-wechat-relay-attempt");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
const XML: HeaderValue = HeaderValue::from_static("text/xml; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
/// The most of a target's answer the relay reads: a WeChat reply is a few KiB at most.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// A target's HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    /// `Retry-After`, in seconds or as a date.
    pub retry_after: Option<Duration>,
}

/// The pooled client every forward goes through.
#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    user_agent: HeaderValue,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    pub fn new() -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Self {
            client,
            user_agent: HeaderValue::from_static(concat!(
                "wechat-relay/",
                env!("CARGO_PKG_VERSION")
            )),
        }
    }

    /// Sends `push` to `target` in the target's format and reads its answer, all within the
    /// target's `timeout_ms`. `attempt` counts from 1.
    pub async fn forward(
        &self,
        target: &Target,
        push: &Push,
        attempt: u32,
    ) -> Result<Answer, ForwardError> {
        self.forward_within(target, push, attempt, target.timeout, ForwardError::Timeout)
            .await
    }

    /// [`Forwarder::forward`] within `limit` instead of the target's `timeout_ms`, failing
    /// with `cut` past it: the reply target's attempt during a push lasts until the reply
    /// deadline ([`ForwardError::Deadline`]).
    pub async fn forward_within(
        &self,
        target: &Target,
        push: &Push,
        attempt: u32,
        limit: Duration,
        cut: ForwardError,
    ) -> Result<Answer, ForwardError> {
        let request = self.request(target, push, unix_now(), attempt)?;
        tokio::time::timeout(limit, self.send(request))
            .await
            .map_err(|_| cut)?
    }

    /// Sends any request through the pool and reads the answer (at most [`MAX_ANSWER_BYTES`]),
    /// without a timeout of its own: `simulate` posts to a relay with it.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, ForwardError> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| ForwardError::Transport(error_chain(&e)))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ForwardError::AnswerTooLarge(MAX_ANSWER_BYTES)
                } else {
                    ForwardError::Transport(e.to_string())
                }
            })?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            content_type: parts.headers.get(CONTENT_TYPE).cloned(),
            body,
            retry_after: parts
                .headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, SystemTime::now())),
        })
    }

    /// Builds attempt number `attempt` of the request for `target`.
    pub fn request(
        &self,
        target: &Target,
        push: &Push,
        now: u64,
        attempt: u32,
    ) -> Result<Request<Full<Bytes>>, ForwardError> {
        let (query, content_type, body) = match target.format {
            ForwardFormat::Raw => (
                push.query.clone(),
                push.content_type.clone().unwrap_or(XML),
                push.body.clone(),
            ),
            ForwardFormat::Plain => (push.plain_query(), XML, push.message.xml().clone()),
            ForwardFormat::Json => (String::new(), JSON, json_body(push)),
        };
        let uri = with_query(target.url.uri(), &query)?;
        let mut builder = Request::post(uri)
            .header(CONTENT_TYPE, content_type)
            .header(USER_AGENT, self.user_agent.clone())
            .header(EVENT_ID_HEADER, push.event_id.as_str())
            .header(ATTEMPT_HEADER, attempt)
            .header(X_FORWARDED_FOR, push.forwarded_for.as_str());
        // The URL's user info, as the sensitive header built at load (a clone shares its
        // zeroed buffer); the URI above never carries it.
        if let Some(authorization) = target.url.authorization() {
            builder = builder.header(AUTHORIZATION, authorization.clone());
        }
        // Every format signs the body it sends the same way: `json` always, `raw` and `plain`
        // with `sign = true` (the config holds a secret only for a target that signs).
        if let Some(secret) = &target.secret {
            let id = push.event_id.as_str();
            let timestamp = now.to_string();
            builder = builder
                .header(WEBHOOK_ID, id)
                .header(WEBHOOK_TIMESTAMP, timestamp.as_str())
                .header(
                    WEBHOOK_SIGNATURE,
                    sign_webhook(secret.expose(), id, &timestamp, &body),
                );
        }
        builder
            .body(Full::new(body))
            .map_err(|e| ForwardError::Transport(format!("cannot build the request: {e}")))
    }
}

/// `Retry-After` as a delay from `now`: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
/// Delay-seconds past what a `u64` holds saturate (a target asking for "never" gets
/// `u64::MAX` seconds, which makes the delivery a dead letter), never wrap or fall back to
/// retrying soon.
fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`: the Standard Webhooks signature.
pub fn sign_webhook(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: new_from_slice cannot fail for it. Its key blocks are
    // zeroed on drop (the `zeroize` feature of hmac and sha2).
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `json` body: a Standard Webhooks payload (`type`, `timestamp`, `data`).
fn json_body(push: &Push) -> Bytes {
    let message = &push.message;
    let kind = match message.event() {
        Some(event) if message.is_event() => format!("wechat.event.{event}"),
        _ => format!("wechat.message.{}", message.msg_type().unwrap_or("unknown")),
    };
    let payload = serde_json::json!({
        "type": kind,
        "timestamp": humantime::format_rfc3339_seconds(push.received_at).to_string(),
        "data": {
            "event_id": push.event_id,
            "account": push.account,
            "encrypted": push.encrypted(),
            "message": message.fields().to_json(),
            "xml": String::from_utf8_lossy(message.xml()),
        },
    });
    Bytes::from(payload.to_string())
}

/// `url` with `query` appended (after the URL's own query, if it has one).
pub fn with_query(url: &Uri, query: &str) -> Result<Uri, ForwardError> {
    if query.is_empty() {
        return Ok(url.clone());
    }
    let path = url.path();
    let path_and_query = match url.query() {
        Some(own) => format!("{path}?{own}&{query}"),
        None => format!("{path}?{query}"),
    };
    let mut parts = url.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| ForwardError::Transport("query is not valid in a URL".into()))?,
    );
    Uri::from_parts(parts).map_err(|e| ForwardError::Transport(e.to_string()))
}

/// An error with its sources, so "client error (Connect)" says what failed to connect.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_signature() {
        // The example from the Standard Webhooks specification's reference libraries.
        let key = STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("base64");
        let sig = sign_webhook(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(1_445_412_600 - 1_445_412_480))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        // Past u64: saturated, not refused (which would retry at the usual backoff).
        for huge in ["18446744073709551616", "99999999999999999999999999"] {
            assert_eq!(retry_after(huge, now), Some(Duration::from_secs(u64::MAX)));
        }
    }

    #[test]
    fn url_credentials_go_in_a_sensitive_header_not_the_uri() {
        let target = Target {
            name: "t".into(),
            url: "http://user:pw@127.0.0.1:9/h?k=v".parse().expect("url"),
            format: ForwardFormat::Raw,
            timeout: Duration::from_secs(1),
            secret: None,
            concurrency: 1,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
            max_attempts: 1,
            max_age: Duration::from_secs(1),
        };
        let push = Push {
            account: "main".into(),
            event_id: "0".repeat(32),
            query: "signature=x".into(),
            body: Bytes::from_static(b"<xml></xml>"),
            content_type: None,
            forwarded_for: "127.0.0.1".into(),
            message: crate::wechat::message::Message::parse(Bytes::from_static(
                b"<xml><MsgType>text</MsgType></xml>",
            ))
            .expect("xml"),
            key_index: None,
            received_at: UNIX_EPOCH,
        };
        for attempt in [1, 2] {
            let request = Forwarder::new()
                .request(&target, &push, 0, attempt)
                .expect("request");
            assert_eq!(
                request.uri().to_string(),
                "http://127.0.0.1:9/h?k=v&signature=x"
            );
            let auth = request.headers().get(AUTHORIZATION).expect("authorization");
            // base64("user:pw")
            assert_eq!(auth.as_bytes(), b"Basic dXNlcjpwdw==");
            assert!(auth.is_sensitive());
        }
    }

    #[test]
    fn query_is_appended() {
        let url: Uri = "http://h:1/a/b".parse().expect("uri");
        assert_eq!(
            with_query(&url, "x=1&y=2").expect("uri").to_string(),
            "http://h:1/a/b?x=1&y=2"
        );
        let url: Uri = "https://h/a?k=v".parse().expect("uri");
        assert_eq!(
            with_query(&url, "x=1").expect("uri").to_string(),
            "https://h/a?k=v&x=1"
        );
        assert_eq!(
            with_query(&url, "").expect("uri").to_string(),
            "https://h/a?k=v"
        );
    }
}
