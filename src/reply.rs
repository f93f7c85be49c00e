//! What WeChat is answered for a push: `success`, a fixed text, or the reply target's answer,
//! asked within what is left of the reply deadline and sealed with the key that opened the
//! push (PROTOCOL.md §7). The reply target's attempt is handed to the outbox as attempt 1 of
//! its delivery; the outbox decides what it leaves pending.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tracing::{debug, warn};

use crate::config::{Account, ForwardFormat, Reply, Target};
use crate::error::ForwardError;
use crate::forward::{Answer, Forwarder, unix_now};
use crate::metrics;
use crate::outbox::ReplyAttempt;
use crate::outbox::store::CachedAnswer;
use crate::push::Push;
use crate::telemetry::{self, limit};
use crate::wechat::crypto;
use crate::wechat::message::{Envelope, text_reply};

const SUCCESS: &str = "success";
pub const TEXT_XML: &str = "text/xml; charset=utf-8";
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// How a push was answered, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome {
    Success,
    Text,
    FromTarget,
    TargetEmpty,
    TargetStatus,
    TargetFailed,
    TargetNotXml,
    Deadline,
    /// A WeChat retry: the answer the first one got.
    Cached,
}

impl ReplyOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyOutcome::Success => "success",
            ReplyOutcome::Text => "text",
            ReplyOutcome::FromTarget => "from_target",
            ReplyOutcome::TargetEmpty => "target_empty",
            ReplyOutcome::TargetStatus => "target_status",
            ReplyOutcome::TargetFailed => "target_failed",
            ReplyOutcome::TargetNotXml => "target_not_xml",
            ReplyOutcome::Deadline => "deadline",
            ReplyOutcome::Cached => "cached",
        }
    }

    /// What cut the reply target's attempt, for the push line's `cut` field: `deadline` (the
    /// reply deadline; during a push nothing else cuts it) or nothing.
    pub fn cut(self) -> Option<&'static str> {
        match self {
            ReplyOutcome::Deadline => ForwardError::Deadline.cut(),
            _ => None,
        }
    }
}

/// A push's answer, and the reply target's attempt if one was made.
pub struct Replied {
    pub answer: CachedAnswer,
    pub outcome: ReplyOutcome,
    pub attempt: Option<ReplyAttempt>,
}

/// What replying needs from the relay's config.
pub struct Replier<'a> {
    pub forwarder: &'a Forwarder,
    pub targets: &'a HashMap<String, Arc<Target>>,
    /// `reply_deadline_ms`, counted from `started`.
    pub deadline: Duration,
    pub started: Instant,
}

impl Replier<'_> {
    /// The answer `reply` (the route's reply rule) gives `push`.
    pub async fn reply(&self, account: &Account, push: &Push, reply: &Reply) -> Replied {
        let (answer, outcome, attempt) = match reply {
            Reply::None => (success(), ReplyOutcome::Success, None),
            Reply::Text(text) => {
                let xml = text_reply(&push.message, unix_now(), text);
                let answer = seal(account, push, xml.into_bytes());
                (answer, ReplyOutcome::Text, None)
            }
            Reply::Target(name) => match self.targets.get(name) {
                None => (success(), ReplyOutcome::TargetFailed, None),
                Some(target) => {
                    let (answer, outcome, result) = self.ask(account, push, target).await;
                    let attempt = ReplyAttempt {
                        target: Arc::clone(target),
                        result,
                    };
                    (answer, outcome, Some(attempt))
                }
            },
        };
        Replied {
            answer,
            outcome,
            attempt,
        }
    }

    /// Attempt 1 to the reply target, for all that is left of the reply deadline whatever
    /// the target's `timeout_ms` (which governs the outbox's later attempts): WeChat waits
    /// that long anyway, and an attempt cut sooner would leave the user without a reply and
    /// the target with the push again. Cut at the deadline, its delivery is retried by the
    /// outbox.
    async fn ask(
        &self,
        account: &Account,
        push: &Push,
        target: &Target,
    ) -> (CachedAnswer, ReplyOutcome, Result<Answer, ForwardError>) {
        let left = self.deadline.saturating_sub(self.started.elapsed());
        let attempt_started = Instant::now();
        let result = self
            .forwarder
            .forward_within(target, push, 1, left, ForwardError::Deadline)
            .await;
        metrics::forward(&target.name, &result, attempt_started.elapsed());
        if matches!(result, Err(ForwardError::Deadline)) {
            if limit::DELIVERY_FAILURES.admit(&target.name) {
                warn!(account = %account.name, target = %target.name, event_id = %push.event_id,
                    deadline_ms = self.deadline.as_millis() as u64,
                    "reply target missed the deadline; answered success, delivery queued");
            }
            return (success(), ReplyOutcome::Deadline, result);
        }
        log_forward(target, push, &result, attempt_started);
        let (answer, outcome) = match &result {
            Err(_) => (success(), ReplyOutcome::TargetFailed),
            Ok(answer) => answer_reply(account, push, target, answer),
        };
        (answer, outcome, result)
    }
}

/// Turns the reply target's answer into WeChat's response.
fn answer_reply(
    account: &Account,
    push: &Push,
    target: &Target,
    answer: &Answer,
) -> (CachedAnswer, ReplyOutcome) {
    if !answer.status.is_success() {
        return (success(), ReplyOutcome::TargetStatus);
    }
    let trimmed = answer.body.trim_ascii();
    if trimmed.is_empty() || trimmed == SUCCESS.as_bytes() {
        return (success(), ReplyOutcome::TargetEmpty);
    }
    // Junk would make WeChat show the user an error: only an <xml> document goes back.
    // Read like a push's envelope: every XML rule, the root's name and `Encrypt`, no tree.
    let envelope = match Envelope::parse(&answer.body) {
        Ok(envelope) if envelope.is_wechat_xml() => envelope,
        Ok(_) => {
            warn!(account = %account.name, target = %target.name, event_id = %push.event_id,
                "reply is not a WeChat <xml> message; answered success");
            return (success(), ReplyOutcome::TargetNotXml);
        }
        Err(e) => {
            warn!(account = %account.name, target = %target.name, event_id = %push.event_id,
                error = %e, "reply is not XML; answered success (WeChat would show the user an error)");
            return (success(), ReplyOutcome::TargetNotXml);
        }
    };
    if target.format == ForwardFormat::Raw {
        // The target saw the push as WeChat sent it and answers as WeChat expects.
        let content_type = answer
            .content_type
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or(TEXT_XML);
        let body = own(&answer.body);
        return (
            respond(StatusCode::OK, content_type, body),
            ReplyOutcome::FromTarget,
        );
    }
    if envelope.encrypt().is_some() {
        // Already sealed by the target: pass it on as it is.
        let body = own(&answer.body);
        return (
            respond(StatusCode::OK, TEXT_XML, body),
            ReplyOutcome::FromTarget,
        );
    }
    (
        seal(account, push, answer.body.to_vec()),
        ReplyOutcome::FromTarget,
    )
}

/// The target's answer body in a buffer of its own: the answer is kept for WeChat's retries
/// (the dedupe record), and the body as read may be a slice of the connection's whole read
/// buffer, which it would keep alive (measured: about 4 KiB a push held beyond the store's
/// budget with a `raw` reply target).
fn own(body: &Bytes) -> Bytes {
    Bytes::copy_from_slice(body)
}

/// A reply message, sealed with the key that opened the push when the push was encrypted.
fn seal(account: &Account, push: &Push, xml: Vec<u8>) -> CachedAnswer {
    let body = match push.key_index {
        None => Bytes::from(xml),
        // An encrypted push must never get a plaintext reply.
        Some(index) => {
            let Some(key) = account.keys.get(index) else {
                return success();
            };
            Bytes::from(crypto::seal_reply(
                key,
                &account.app_id,
                account.token.expose_str(),
                &xml,
                &unix_now().to_string(),
                &crypto::random_nonce(),
                &crypto::random_prefix(),
            ))
        }
    };
    respond(StatusCode::OK, TEXT_XML, body)
}

pub fn respond(status: StatusCode, content_type: &str, body: Bytes) -> CachedAnswer {
    CachedAnswer {
        status: status.as_u16(),
        content_type: content_type.to_owned(),
        body,
    }
}

/// `success`: acknowledged, no reply, no retry. Never encrypted.
pub fn success() -> CachedAnswer {
    respond(
        StatusCode::OK,
        TEXT_PLAIN,
        Bytes::from_static(SUCCESS.as_bytes()),
    )
}

fn log_forward(
    target: &Target,
    push: &Push,
    result: &Result<Answer, ForwardError>,
    started: Instant,
) {
    let ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(answer) if answer.status.is_success() => {
            debug!(target = %target.name, status = answer.status.as_u16(), ms, event_id = %push.event_id, "forwarded")
        }
        // Rate limited per target, like the outbox's retries.
        _ if !limit::DELIVERY_FAILURES.admit(&target.name) => {}
        Ok(answer) => {
            warn!(target = %target.name, status = answer.status.as_u16(), ms, event_id = %push.event_id, "forward failed")
        }
        Err(e) => {
            warn!(target = %target.name, status = telemetry::or_dash(None), ms, event_id = %push.event_id, error = %e, "forward failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_passed_on_answer_does_not_keep_the_buffer_it_was_read_into() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "[[account]]\nname = \"main\"\npath = \"/wechat\"\napp_id = \"wx0123456789abcdef\"\ntoken = \"t0kenT0ken\"\n\
             mode = \"plaintext\"\n[[target]]\nname = \"idp\"\nurl = \"http://127.0.0.1:9/\"\n\
             format = \"raw\"\n[[route]]\nto = [\"idp\"]\nreply = \"idp\"\n",
        )
        .expect("config");
        let config = Config::load_with_env(&path, &[]).expect("valid config");
        let xml = b"<xml><ToUserName>a</ToUserName><MsgType>text</MsgType></xml>";
        // The answer's body as hyper may hand it over: a slice of a much larger read buffer.
        let mut buffer = vec![b' '; 64 << 10];
        buffer[..xml.len()].copy_from_slice(xml);
        let buffer = Bytes::from(buffer);
        let answer = Answer {
            status: StatusCode::OK,
            content_type: None,
            body: buffer.slice(..xml.len()),
            retry_after: None,
        };
        let push = Push::for_test("e");
        let (cached, outcome) =
            answer_reply(&config.accounts[0], &push, &config.targets[0], &answer);
        assert_eq!(outcome, ReplyOutcome::FromTarget);
        assert_eq!(cached.body, &xml[..]);
        let inside = buffer.as_ptr_range();
        assert!(
            !inside.contains(&cached.body.as_ptr()),
            "the cached answer points into the read buffer (kept alive with it)"
        );
    }
}
