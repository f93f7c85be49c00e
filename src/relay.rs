//! The handler: verify -> decrypt -> route -> dedupe -> reply -> commit, one function per step.
//!
//! A [`Relay`] is one immutable snapshot of the config with the state that goes with it (the
//! route table, the HTTP client, the outbox). It answers every request with a response, never
//! an error: a dropped connection makes WeChat retry.
//!
//! A routed push is answered only once it is committed to the outbox (its dedupe record, its
//! answer and a delivery per target that still needs one); the outbox's workers deliver it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Account, Config, ForwardFormat, Mode, Reply, Target};
use crate::error::{ForwardError, Rejection};
use crate::forward::{Answer, Forwarder, unix_now};
use crate::metrics;
use crate::outbox::store::{
    CachedAnswer, Commit, Committed, Digest, NewDelivery, Settle, StoreError,
};
use crate::outbox::worker::{Verdict, classify, decide};
use crate::outbox::{Claim, ClaimGuard, Outbox, now_ms};
use crate::peer;
use crate::push::Push;
use crate::route::{CompiledRoute, RouteTable};
use crate::server::connections::Connection;
use crate::telemetry::limit;
use crate::wechat::crypto::{self, CryptoError};
use crate::wechat::message::{Envelope, Fields, Message, text_reply};
use crate::wechat::signature::{verify_msg_signature, verify_signature};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ForwardResult = Result<Answer, ForwardError>;

const SUCCESS: &str = "success";
const TEXT_XML: &str = "text/xml; charset=utf-8";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
/// How many times a push may meet another message under its event id (once is the rule: its
/// own id holds its digest).
const MAX_REKEYS: u32 = 2;

/// The relay for one config.
pub struct Relay {
    config: Config,
    routes: RouteTable,
    targets: HashMap<String, Arc<Target>>,
    forwarder: Forwarder,
    outbox: Arc<Outbox>,
    /// Pushes being handled: each runs in a task of its own so that WeChat cutting the
    /// connection never cuts a commit. Drained at shutdown.
    pushes: TaskTracker,
}

/// The query parameters, percent-decoded; the first of a repeated name counts.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Self(
            form_urlencoded::parse(raw.as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, name: &'static str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn require(&self, name: &'static str) -> Result<&str, Rejection> {
        self.get(name).ok_or(Rejection::MissingParam(name))
    }
}

/// How a push was answered, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyOutcome {
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
    fn as_str(self) -> &'static str {
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
}

impl Relay {
    /// A relay for `config`. `pushes` tracks the pushes being handled (shared across reloads,
    /// drained at shutdown).
    pub fn new(config: Config, outbox: Arc<Outbox>, pushes: TaskTracker) -> Self {
        let routes = RouteTable::new(&config.routes);
        let targets = config
            .targets
            .iter()
            .map(|t| (t.name.clone(), Arc::new(t.clone())))
            .collect();
        Self {
            config,
            routes,
            targets,
            forwarder: outbox.forwarder().clone(),
            outbox,
            pushes,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Answers one request from WeChat (or anyone else).
    pub async fn handle<B>(
        self: &Arc<Self>,
        request: Request<B>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        // Behind a trusted proxy the allow-list applies to the client it names (a peer that is
        // not allowed and not a trusted proxy was closed at accept).
        let server = &self.config.server;
        if !server.allow_ips.is_empty() {
            let client = peer::client(request.headers(), peer.ip(), &server.trusted_proxies);
            if !client.is_some_and(|ip| peer::contains(&server.allow_ips, ip)) {
                return reject(None, peer, Rejection::NotAllowed);
            }
        }
        let Some(index) = self
            .config
            .accounts
            .iter()
            .position(|a| a.path == request.uri().path())
        else {
            if request.method() == Method::POST {
                metrics::push("-", None, None, "rejected", started.elapsed());
            }
            return reject(None, peer, Rejection::UnknownPath);
        };
        let account = &self.config.accounts[index];
        let is_push = request.method() == Method::POST;
        let result = match *request.method() {
            Method::GET => self.url_check(account, &request),
            Method::POST => self.push(index, request, peer, started).await,
            _ => Err(Rejection::MethodNotAllowed),
        };
        result.unwrap_or_else(|rejection| {
            if is_push {
                metrics::push(&account.name, None, None, "rejected", started.elapsed());
            }
            reject(Some(account), peer, rejection)
        })
    }

    /// `GET`: WeChat's URL check. The echostr goes back byte for byte, in every mode.
    fn url_check<B>(
        &self,
        account: &Account,
        request: &Request<B>,
    ) -> Result<Response<Full<Bytes>>, Rejection> {
        let query = Query::parse(request.uri().query().unwrap_or_default());
        self.check_signature(account, &query)?;
        let echostr = query.require("echostr")?;
        info!(account = %account.name, "URL check answered");
        Ok(response(&respond(
            StatusCode::OK,
            TEXT_PLAIN,
            Bytes::copy_from_slice(echostr.as_bytes()),
        )))
    }

    /// `POST`: a push. Verified and opened here; the rest runs in a task of its own.
    async fn push<B>(
        self: &Arc<Self>,
        account_index: usize,
        request: Request<B>,
        peer: SocketAddr,
        started: Instant,
    ) -> Result<Response<Full<Bytes>>, Rejection>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let account = &self.config.accounts[account_index];
        let raw_query = request.uri().query().unwrap_or_default().to_owned();
        let query = Query::parse(&raw_query);
        self.check_signature(account, &query)?;
        self.check_timestamp(&query)?;
        let (parts, body) = request.into_parts();
        let body = self.read_body(&parts.headers, body).await?;
        // From here the push is handled: its connection keeps its slot.
        if let Some(connection) = parts.extensions.get::<Arc<Connection>>() {
            connection.body_read();
        }
        let (message, key_index) = self.open(account, &query, &body)?;
        let push = Arc::new(Push {
            account: account.name.clone(),
            event_id: message.dedupe_key().event_id(&account.name),
            query: raw_query,
            body,
            content_type: parts.headers.get(CONTENT_TYPE).cloned(),
            forwarded_for: peer::forwarded_for(
                &parts.headers,
                peer.ip(),
                &self.config.server.trusted_proxies,
            ),
            message,
            key_index,
            received_at: SystemTime::now(),
        });
        let relay = Arc::clone(self);
        let handled = self
            .pushes
            .spawn(async move { relay.handle_push(account_index, push, started).await });
        Ok(match handled.await {
            Ok(answer) => response(&answer),
            Err(e) => {
                error!(error = %e, "push handler failed; answered 500");
                let mut failed = Response::new(Full::new(Bytes::from_static(b"internal error\n")));
                *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                failed
            }
        })
    }

    /// Route -> dedupe -> reply -> commit, for a verified push.
    ///
    /// Dedupe compares the message too: a push whose event id is claimed or recorded for
    /// another message is not a retry. It is given an event id of its own
    /// ([`Relay::collided`]) and handled as a new push under it, and logged and counted as a
    /// collision once committed.
    async fn handle_push(
        &self,
        account_index: usize,
        push: Arc<Push>,
        started: Instant,
    ) -> Arc<CachedAnswer> {
        let account = &self.config.accounts[account_index];
        let Some(route) = self.routes.route(&account.name, &push.message) else {
            self.log_push(&push, None, "unrouted", ReplyOutcome::Success, started);
            return Arc::new(success());
        };
        let digest = Digest::of(push.message.xml());
        let mut push = push;
        // The claims on the ids tried: the first and, after a collision, the push's own.
        let mut guards: Vec<ClaimGuard> = Vec::new();
        let mut collisions = 0;
        loop {
            if collisions > MAX_REKEYS {
                let e = StoreError::Io("event id collisions without end".into());
                return self.store_failed(&push, guards, e);
            }
            match self.outbox.claim(&push.event_id, &digest) {
                Claim::First(guard) => guards.push(guard),
                Claim::Wait(waiter) => {
                    // A WeChat retry while the first is handled: the first one's answer.
                    let answer = waiter
                        .answer()
                        .await
                        .unwrap_or_else(|| Arc::new(CachedAnswer::from(StoreError::Closed)));
                    finish(guards, &answer);
                    return self.duplicate(&push, route, answer, started);
                }
                Claim::Collision => {
                    push = self.collided(push, &digest, &mut collisions);
                    continue;
                }
            }
            // A route with a reply target would ask it again for a retry: look the push up
            // first. Otherwise the commit itself finds a retry, in the same transaction.
            if matches!(route.reply, Reply::Target(_)) {
                match self.outbox.answer(&push.event_id).await {
                    Ok(None) => {}
                    Ok(Some(recorded)) => match recorded.meet(&digest) {
                        Committed::Duplicate(answer) => {
                            // A retry of a push committed before: the answer it got then.
                            let answer = Arc::new(answer);
                            finish(guards, &answer);
                            return self.duplicate(&push, route, answer, started);
                        }
                        _ => {
                            push = self.collided(push, &digest, &mut collisions);
                            continue;
                        }
                    },
                    Err(e) => return self.store_failed(&push, guards, e),
                }
            }
            let (answer, outcome, deliveries) = self.reply(account, &push, route, started).await;
            let answer = Arc::new(answer);
            let commit = Commit {
                push: Arc::clone(&push),
                digest,
                answer: (*answer).clone(),
                deliveries,
                now_ms: now_ms(),
                dedupe_since_ms: self.outbox.dedupe_since_ms(),
            };
            match self.outbox.commit(commit).await {
                Ok(Committed::New) => {}
                Ok(Committed::Duplicate(earlier)) => {
                    let earlier = Arc::new(earlier);
                    finish(guards, &earlier);
                    return self.duplicate(&push, route, earlier, started);
                }
                Ok(Committed::Collision) => {
                    push = self.collided(push, &digest, &mut collisions);
                    continue;
                }
                Err(e) => return self.store_failed(&push, guards, e),
            }
            if collisions > 0 {
                // Logged and counted once, when committed: its retries are duplicates.
                metrics::dedupe_collision(&push.account);
                warn!(account = %push.account, event_id = %push.event_id,
                    "dedupe collision: another message had this push's dedupe key; routed as a new push under this event id");
            }
            self.log_push(&push, Some(route), "forwarded", outcome, started);
            finish(guards, &answer);
            return answer;
        }
    }

    /// A push whose event id belongs to another message gets its own: the first one plus `~`
    /// and 16 hex digits of its message's digest (the same for WeChat's retries of it).
    fn collided(&self, push: Arc<Push>, digest: &Digest, collisions: &mut u32) -> Arc<Push> {
        *collisions += 1;
        let mut own = (*push).clone();
        own.event_id = format!("{}~{}", push.event_id, digest.short());
        Arc::new(own)
    }

    /// A WeChat retry, answered as the first push was, and logged as a duplicate.
    fn duplicate(
        &self,
        push: &Push,
        route: &CompiledRoute,
        answer: Arc<CachedAnswer>,
        started: Instant,
    ) -> Arc<CachedAnswer> {
        metrics::dedupe_hit(&push.account);
        self.log_push(
            push,
            Some(route),
            "duplicate",
            ReplyOutcome::Cached,
            started,
        );
        answer
    }

    /// The one info line per push, and its count. The text of a text message only with
    /// `[log] content = true`.
    fn log_push(
        &self,
        push: &Push,
        route: Option<&CompiledRoute>,
        outcome: &'static str,
        reply: ReplyOutcome,
        started: Instant,
    ) {
        let message = &push.message;
        metrics::push(
            &push.account,
            message.msg_type(),
            message.event(),
            outcome,
            started.elapsed(),
        );
        let content = if self.config.log.content {
            message.content()
        } else {
            None
        };
        info!(
            account = %push.account,
            msg_type = %loggable(message.msg_type()),
            event = %loggable(message.event()),
            route = %route.map_or("-", |r| r.name.as_str()),
            targets = %route.map_or(String::from("-"), |r| r.to.join(",")),
            outcome = %outcome,
            reply = %reply.as_str(),
            ms = started.elapsed().as_millis() as u64,
            event_id = %push.event_id,
            content = content,
            "push"
        );
    }

    /// The store could not take the push: 503, so that WeChat tries again; the keys are
    /// released. Over the store's budget the outbox has logged it (at most once a second).
    fn store_failed(
        &self,
        push: &Push,
        guards: Vec<ClaimGuard>,
        e: StoreError,
    ) -> Arc<CachedAnswer> {
        if !matches!(e, StoreError::Full { .. }) {
            error!(account = %push.account, event_id = %push.event_id, error = %e,
                "cannot commit the push: answered 503 (WeChat will retry)");
        }
        metrics::push(
            &push.account,
            push.message.msg_type(),
            push.message.event(),
            "failed",
            push.received_at.elapsed().unwrap_or_default(),
        );
        let answer = Arc::new(CachedAnswer::from(e));
        finish(guards, &answer);
        answer
    }

    /// `signature` over token, timestamp and nonce: present on every request, in every mode.
    /// A request without them is unsigned: 403, like a wrong signature.
    fn check_signature(&self, account: &Account, query: &Query) -> Result<(), Rejection> {
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

    /// Nothing in the protocol expires: refuse pushes further than `timestamp_skew_s` from now.
    fn check_timestamp(&self, query: &Query) -> Result<(), Rejection> {
        let Some(skew) = self.config.server.timestamp_skew else {
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

    /// Reads the body up to `max_body_bytes`, within the reply deadline.
    async fn read_body<B>(&self, headers: &HeaderMap, body: B) -> Result<Bytes, Rejection>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let limit = self.config.server.max_body_bytes;
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(Rejection::TooLarge);
        }
        let collect = Limited::new(body, limit).collect();
        match tokio::time::timeout(self.config.server.reply_deadline, collect).await {
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
    fn open(
        &self,
        account: &Account,
        query: &Query,
        body: &Bytes,
    ) -> Result<(Message, Option<usize>), Rejection> {
        let envelope = Envelope::parse(body)?;
        let encrypted = query
            .get("encrypt_type")
            .is_some_and(|t| t.eq_ignore_ascii_case("aes"));
        if !encrypted {
            // WeChat encrypts every push in safe and compatible mode; an unencrypted one is a
            // downgrade (`signature` does not cover the body, so anyone holding one captured
            // query could post any XML with it).
            if account.mode != Mode::Plaintext {
                return Err(Rejection::Downgrade);
            }
            return Ok((
                Message::from_parts(body.clone(), envelope.into_fields()),
                None,
            ));
        }
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

    /// What WeChat gets (a fixed text, the reply target's answer, or `success`), and the
    /// deliveries to commit: one per target of the route, in route order, except the reply
    /// target when its synchronous attempt was delivered.
    async fn reply(
        &self,
        account: &Account,
        push: &Arc<Push>,
        route: &CompiledRoute,
        started: Instant,
    ) -> (CachedAnswer, ReplyOutcome, Vec<NewDelivery>) {
        let now = now_ms();
        let mut deliveries: Vec<NewDelivery> = route
            .to
            .iter()
            .map(|target| NewDelivery {
                target: target.clone(),
                attempts: 0,
                last_error: None,
                at_ms: now,
                dead: false,
            })
            .collect();
        let (answer, outcome) = match &route.reply {
            Reply::None => (success(), ReplyOutcome::Success),
            Reply::Text(text) => {
                let xml = text_reply(&push.message, unix_now(), text);
                (
                    self.xml_reply(account, push, xml.into_bytes()),
                    ReplyOutcome::Text,
                )
            }
            Reply::Target(name) => match self.targets.get(name) {
                None => (success(), ReplyOutcome::TargetFailed),
                Some(target) => {
                    let (answer, outcome, verdict) =
                        self.ask_reply_target(account, push, target, started).await;
                    // The synchronous attempt was attempt 1 of the reply target's delivery.
                    if let Some(at) = deliveries.iter().position(|d| d.target == *name) {
                        let enqueued = deliveries[at].at_ms;
                        match decide(target, enqueued, 1, verdict, now_ms()) {
                            Settle::Delivered => {
                                deliveries.remove(at);
                            }
                            Settle::Retry {
                                attempts,
                                at_ms,
                                error,
                            } => {
                                let d = &mut deliveries[at];
                                (d.attempts, d.at_ms, d.last_error) =
                                    (attempts, at_ms, Some(error));
                            }
                            Settle::Dead { attempts, error } => {
                                let d = &mut deliveries[at];
                                (d.attempts, d.last_error, d.dead) = (attempts, Some(error), true);
                            }
                        }
                    }
                    (answer, outcome)
                }
            },
        };
        (answer, outcome, deliveries)
    }

    /// Attempt 1 to the reply target, within what is left of the reply deadline (cut at the
    /// deadline: its delivery is then retried by the outbox).
    async fn ask_reply_target(
        &self,
        account: &Account,
        push: &Push,
        target: &Target,
        started: Instant,
    ) -> (CachedAnswer, ReplyOutcome, Verdict) {
        let left = self
            .config
            .server
            .reply_deadline
            .saturating_sub(started.elapsed());
        let attempt_started = Instant::now();
        let result = tokio::time::timeout(left, self.forwarder.forward(target, push, 1)).await;
        let Ok(result) = result else {
            metrics::forward(
                &target.name,
                &Err(ForwardError::Timeout),
                attempt_started.elapsed(),
            );
            if limit::DELIVERY_FAILURES.admit(&target.name) {
                warn!(account = %account.name, target = %target.name, event_id = %push.event_id,
                    deadline_ms = self.config.server.reply_deadline.as_millis() as u64,
                    "reply target missed the deadline; answered success, delivery queued");
            }
            let verdict = Verdict::Retry {
                error: "no answer within the reply deadline".into(),
                after: None,
            };
            return (success(), ReplyOutcome::Deadline, verdict);
        };
        log_forward(target, push, &result, attempt_started);
        metrics::forward(&target.name, &result, attempt_started.elapsed());
        let verdict = classify(&result);
        let (answer, outcome) = match result {
            Err(_) => (success(), ReplyOutcome::TargetFailed),
            Ok(answer) => self.answer_reply(account, push, target, answer),
        };
        (answer, outcome, verdict)
    }

    /// Turns the reply target's answer into WeChat's response.
    fn answer_reply(
        &self,
        account: &Account,
        push: &Push,
        target: &Target,
        answer: Answer,
    ) -> (CachedAnswer, ReplyOutcome) {
        if !answer.status.is_success() {
            return (success(), ReplyOutcome::TargetStatus);
        }
        let trimmed = answer.body.trim_ascii();
        if trimmed.is_empty() || trimmed == SUCCESS.as_bytes() {
            return (success(), ReplyOutcome::TargetEmpty);
        }
        // Junk would make WeChat show the user an error: only an <xml> document goes back.
        let fields = match Fields::parse(&answer.body) {
            Ok(fields) if fields.root() == "xml" => fields,
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
            return (
                respond(StatusCode::OK, content_type, answer.body),
                ReplyOutcome::FromTarget,
            );
        }
        if fields.get("Encrypt").is_some() {
            // Already sealed by the target: pass it on as it is.
            return (
                respond(StatusCode::OK, TEXT_XML, answer.body),
                ReplyOutcome::FromTarget,
            );
        }
        (
            self.xml_reply(account, push, answer.body.to_vec()),
            ReplyOutcome::FromTarget,
        )
    }

    /// A reply message, sealed with the key that opened the push when the push was encrypted.
    fn xml_reply(&self, account: &Account, push: &Push, xml: Vec<u8>) -> CachedAnswer {
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
}

/// Gives `answer` to whoever waits on the claims, and releases them.
fn finish(guards: Vec<ClaimGuard>, answer: &Arc<CachedAnswer>) {
    for guard in guards {
        guard.finish(Arc::clone(answer));
    }
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

fn respond(status: StatusCode, content_type: &str, body: Bytes) -> CachedAnswer {
    CachedAnswer {
        status: status.as_u16(),
        content_type: content_type.to_owned(),
        body,
    }
}

/// The HTTP response for an answer (the same bytes for a push and its retries).
fn response(answer: &CachedAnswer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(answer.body.clone()));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type =
        HeaderValue::from_str(&answer.content_type).unwrap_or(HeaderValue::from_static(TEXT_PLAIN));
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    response
}

/// `success`: acknowledged, no reply, no retry. Never encrypted.
fn success() -> CachedAnswer {
    respond(
        StatusCode::OK,
        TEXT_PLAIN,
        Bytes::from_static(SUCCESS.as_bytes()),
    )
}

/// The 4xx for a refused request, with its one log line.
fn reject(
    account: Option<&Account>,
    peer: SocketAddr,
    rejection: Rejection,
) -> Response<Full<Bytes>> {
    let status = rejection.status();
    let name = account.map_or("-", |a| a.name.as_str());
    metrics::rejected(name, rejection.reason());
    // Counted every time; logged at most a few times a second per reason (a flood of forged
    // requests must not flood the journal).
    if limit::REFUSALS.admit(rejection.reason()) {
        warn!(account = %name, peer = %peer.ip(),
            status = status.as_u16(), reason = %rejection.reason(), "request refused: {rejection}");
    }
    let mut response = response(&respond(
        status,
        TEXT_PLAIN,
        Bytes::from(format!("{rejection}\n")),
    ));
    if rejection == Rejection::MethodNotAllowed {
        response
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, POST"));
    }
    response
}

/// A protocol value from the push as it goes into a log line: WeChat's types and events are
/// short ASCII names; anything else (a forged plaintext push) is not printed.
fn loggable(value: Option<&str>) -> &str {
    match value {
        None => "-",
        Some(v) if v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()) => v,
        Some(_) => "<unprintable>",
    }
}

fn log_forward(target: &Target, push: &Push, result: &ForwardResult, started: Instant) {
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
            warn!(target = %target.name, status = %"-", ms, event_id = %push.event_id, error = %e, "forward failed")
        }
    }
}
