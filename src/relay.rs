//! The handler, as phases over one push: request checks ([`crate::request`]) -> route ->
//! admit (dedupe) -> reply ([`crate::reply`]) -> commit (the outbox) -> answer, ending in one
//! [`Outcome`] from which the log line and the metrics are written once.
//!
//! A [`Relay`] is one immutable snapshot of the config with the state that goes with it (the
//! accounts, the route table, the targets). It answers every request with a response, never
//! an error: a dropped connection makes WeChat retry.
//!
//! A routed push is answered only once the outbox has committed it; the outbox decides which
//! deliveries that leaves pending, and its workers deliver them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Account, Config, Reply, Target};
use crate::error::{self, Rejection};
use crate::forward::Forwarder;
use crate::metrics;
use crate::outbox::store::{CachedAnswer, StoreError};
use crate::outbox::{Accepted, Admitted, Outbox, ReplyAttempt, Ticket};
use crate::peer;
use crate::push::Push;
use crate::reply::{self, Replier, ReplyOutcome};
use crate::request::{self, Query};
use crate::route::{CompiledRoute, RouteTable};
use crate::telemetry::{self, limit};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The relay for one config.
pub struct Relay {
    config: Config,
    accounts: Vec<Arc<Account>>,
    routes: RouteTable,
    targets: HashMap<String, Arc<Target>>,
    forwarder: Forwarder,
    outbox: Arc<Outbox>,
    /// Pushes being handled: each runs in a task of its own so that WeChat cutting the
    /// connection never cuts a commit. Drained at shutdown.
    pushes: TaskTracker,
}

/// How long after a push arrived the relay waits for the store to commit it: WeChat stops
/// waiting at 5 s (PROTOCOL.md §6), and a 503 it still hears makes it retry (200 ms are left
/// for the answer to reach it).
const COMMIT_BY: std::time::Duration = std::time::Duration::from_millis(4_800);

/// How a request ended: what its log line and its metrics say, written once by
/// [`Relay::record`].
enum Outcome<'a> {
    /// Refused before anything was forwarded (a 4xx).
    Refused {
        account: Option<&'a Account>,
        rejection: Rejection,
        push: bool,
    },
    /// WeChat's URL check, answered with its echostr.
    UrlCheck { account: &'a Account },
    /// A push no route takes: `success`, nothing forwarded.
    Unrouted { push: &'a Push },
    /// Committed: its targets get it.
    Forwarded {
        push: &'a Push,
        route: &'a CompiledRoute,
        reply: ReplyOutcome,
        /// Under an event id of its own: another message had its dedupe key.
        collided: bool,
    },
    /// A WeChat retry, answered as the first one was.
    Duplicate {
        push: &'a Push,
        route: &'a CompiledRoute,
    },
    /// The store did not take it: 503, WeChat retries.
    Failed { push: &'a Push, error: StoreError },
}

impl Outcome<'_> {
    /// The `outcome` of the log line and of `wechat_relay_pushes_total`.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Refused { .. } => "rejected",
            Outcome::UrlCheck { .. } => "url_check",
            Outcome::Unrouted { .. } => "unrouted",
            Outcome::Forwarded { .. } => "forwarded",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::Failed { .. } => "failed",
        }
    }
}

impl Relay {
    /// A relay for `config`, sending through `forwarder` (the pool the outbox's workers use
    /// too). `pushes` tracks the pushes being handled (shared across reloads, drained at
    /// shutdown).
    pub fn new(
        config: Config,
        outbox: Arc<Outbox>,
        forwarder: Forwarder,
        pushes: TaskTracker,
    ) -> Self {
        let routes = RouteTable::new(&config.routes);
        let accounts = config.accounts.iter().cloned().map(Arc::new).collect();
        let targets = config
            .targets
            .iter()
            .map(|t| (t.name.clone(), Arc::new(t.clone())))
            .collect();
        Self {
            config,
            accounts,
            routes,
            targets,
            forwarder,
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
        let push = request.method() == Method::POST;
        let refused = |account: Option<&Account>, rejection: Rejection| {
            let response = rejection.response();
            let outcome = Outcome::Refused {
                account,
                rejection,
                push,
            };
            self.record(&outcome, peer, started);
            response
        };
        // Behind a trusted proxy the allow-list applies to the client it names (a peer that is
        // not allowed and not a trusted proxy was closed at accept).
        let server = &self.config.server;
        if !server.allow_ips.is_empty() {
            let client = peer::client(request.headers(), peer.ip(), &server.trusted_proxies);
            if !client.is_some_and(|ip| peer::contains(&server.allow_ips, ip)) {
                return refused(None, Rejection::NotAllowed);
            }
        }
        let Some(account) = self
            .accounts
            .iter()
            .find(|a| a.path == request.uri().path())
        else {
            return refused(None, Rejection::UnknownPath);
        };
        let checked = match *request.method() {
            Method::GET => self.url_check(account, &request),
            Method::POST => match self.receive(account, request, peer).await {
                // The rest runs in a task of its own: WeChat cutting the connection must not
                // cut a commit.
                Ok(push) => {
                    let (relay, account) = (Arc::clone(self), Arc::clone(account));
                    let handled = self.pushes.spawn(async move {
                        relay.handle_push(account, push, peer, started).await
                    });
                    return match handled.await {
                        Ok(answer) => response(&answer),
                        Err(e) => {
                            error!(error = %e, "push handler failed; answered 500");
                            error::internal_error()
                        }
                    };
                }
                Err(rejection) => Err(rejection),
            },
            _ => Err(Rejection::MethodNotAllowed),
        };
        match checked {
            Ok(answer) => {
                self.record(&Outcome::UrlCheck { account }, peer, started);
                answer
            }
            Err(rejection) => refused(Some(account), rejection),
        }
    }

    /// `GET`: WeChat's URL check. The echostr goes back byte for byte, in every mode.
    fn url_check<B>(
        &self,
        account: &Account,
        request: &Request<B>,
    ) -> Result<Response<Full<Bytes>>, Rejection> {
        let query = Query::parse(request.uri().query().unwrap_or_default());
        request::check_signature(account, &query)?;
        let echostr = query.require("echostr")?;
        Ok(response(&reply::respond(
            StatusCode::OK,
            reply::TEXT_PLAIN,
            Bytes::copy_from_slice(echostr.as_bytes()),
        )))
    }

    /// `POST`: the request checks, the body, the push opened.
    async fn receive<B>(
        &self,
        account: &Arc<Account>,
        request: Request<B>,
        peer: SocketAddr,
    ) -> Result<Arc<Push>, Rejection>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let server = &self.config.server;
        let raw_query = request.uri().query().unwrap_or_default().to_owned();
        let query = Query::parse(&raw_query);
        request::check_signature(account, &query)?;
        request::check_timestamp(server.timestamp_skew, &query)?;
        let (parts, body) = request.into_parts();
        let body = request::read_body(
            &parts.headers,
            body,
            server.max_body_bytes,
            server.reply_deadline,
        )
        .await?;
        let (message, key_index) = request::open(account, &query, &body)?;
        Ok(Arc::new(Push {
            account: account.name.clone(),
            event_id: message.dedupe_key().event_id(&account.name),
            query: raw_query,
            body,
            content_type: parts.headers.get(CONTENT_TYPE).cloned(),
            forwarded_for: peer::forwarded_for(&parts.headers, peer.ip(), &server.trusted_proxies),
            message,
            key_index,
            received_at: SystemTime::now(),
        }))
    }

    /// Route -> admit -> reply -> commit, for a verified push; its outcome recorded.
    async fn handle_push(
        &self,
        account: Arc<Account>,
        push: Arc<Push>,
        peer: SocketAddr,
        started: Instant,
    ) -> Arc<CachedAnswer> {
        let Some(route) = self.routes.route(&push.account, &push.message) else {
            self.record(&Outcome::Unrouted { push: &push }, peer, started);
            return Arc::new(reply::success());
        };
        // A route with a reply target would ask it again for a retry: the outbox looks the
        // push up first. Otherwise the commit itself finds a retry, in the same transaction.
        let look_up = matches!(route.reply, Reply::Target(_));
        let ticket = match self.outbox.admit(Arc::clone(&push), look_up).await {
            Ok(Admitted::New(ticket)) => ticket,
            Ok(Admitted::Retry { push, answer }) => {
                self.record(&Outcome::Duplicate { push: &push, route }, peer, started);
                return answer;
            }
            Err(error) => return self.failed(&push, error, peer, started),
        };
        let replier = Replier {
            forwarder: &self.forwarder,
            targets: &self.targets,
            deadline: self.config.server.reply_deadline,
            started,
        };
        let replied = replier.reply(&account, ticket.push(), &route.reply).await;
        let accepted = self
            .commit_in_time(
                ticket,
                replied.answer,
                replied.attempt,
                (&route.name, &route.to),
                started,
            )
            .await;
        match accepted {
            Ok(Accepted::New {
                push,
                answer,
                collided,
            }) => {
                let outcome = Outcome::Forwarded {
                    push: &push,
                    route,
                    reply: replied.outcome,
                    collided,
                };
                self.record(&outcome, peer, started);
                answer
            }
            Ok(Accepted::Retry { push, answer }) => {
                self.record(&Outcome::Duplicate { push: &push, route }, peer, started);
                answer
            }
            Err(error) => self.failed(&push, error, peer, started),
        }
    }

    /// Commits the push, or answers 503 (WeChat retries) when the store has not committed it
    /// by the time WeChat stops waiting ([`COMMIT_BY`] after the request came): a store that
    /// stalls (a database that stopped answering) never holds the answer past it. A commit
    /// still under way then goes on in a task of its own, and its retry finds it.
    async fn commit_in_time(
        &self,
        ticket: Ticket,
        answer: CachedAnswer,
        attempt: Option<ReplyAttempt>,
        (route, to): (&str, &[String]),
        started: Instant,
    ) -> Result<Accepted, StoreError> {
        let outbox = Arc::clone(&self.outbox);
        let (route, to) = (route.to_owned(), to.to_vec());
        let mut commit =
            Box::pin(async move { outbox.commit(ticket, answer, &route, &to, attempt).await });
        let by = tokio::time::Instant::from_std(started) + COMMIT_BY;
        tokio::select! {
            accepted = &mut commit => accepted,
            () = tokio::time::sleep_until(by) => {
                self.pushes.spawn(commit);
                Err(StoreError::Io(format!(
                    "the store did not commit the push within {} ms of its arrival",
                    COMMIT_BY.as_millis()
                )))
            }
        }
    }

    /// The store did not take the push: 503, so that WeChat tries again.
    fn failed(
        &self,
        push: &Push,
        error: StoreError,
        peer: SocketAddr,
        started: Instant,
    ) -> Arc<CachedAnswer> {
        let answer = Arc::new(CachedAnswer::from(error.clone()));
        self.record(&Outcome::Failed { push, error }, peer, started);
        answer
    }

    /// The one log line and the metrics of a request. A push's line is at info (its text only
    /// with `[log] content = true`); a refusal is counted every time and logged at most a few
    /// times a second per reason (a flood of forged requests must not flood the journal).
    fn record(&self, outcome: &Outcome<'_>, peer: SocketAddr, started: Instant) {
        let label = outcome.label();
        let elapsed = started.elapsed();
        // The push's line: its route and reply (`None` for a push that gets no info line).
        let (push, line) = match outcome {
            Outcome::Refused {
                account,
                rejection,
                push,
            } => {
                let name = account.map_or("-", |a| a.name.as_str());
                metrics::rejected(name, rejection.reason());
                if *push {
                    metrics::push(name, None, None, label, elapsed);
                }
                if limit::REFUSALS.admit(rejection.reason()) {
                    warn!(account = telemetry::or_dash(account.map(|a| a.name.as_str())), peer = %peer.ip(), status = rejection.status().as_u16(),
                        reason = %rejection.reason(), "request refused: {rejection}");
                }
                return;
            }
            Outcome::UrlCheck { account } => {
                info!(account = %account.name, "URL check answered");
                return;
            }
            Outcome::Failed { push, error } => {
                // Over the store's budget the outbox has logged it (at most once a second).
                if !matches!(error, StoreError::Full { .. }) {
                    error!(account = %push.account, event_id = %push.event_id, error = %error,
                        "cannot commit the push: answered 503 (WeChat will retry)");
                }
                (*push, None)
            }
            Outcome::Unrouted { push } => (*push, Some((None, ReplyOutcome::Success))),
            Outcome::Duplicate { push, route } => {
                metrics::dedupe_hit(&push.account);
                (*push, Some((Some(*route), ReplyOutcome::Cached)))
            }
            Outcome::Forwarded {
                push,
                route,
                reply,
                collided,
            } => {
                if *collided {
                    // Logged and counted once, when committed: its retries are duplicates.
                    metrics::dedupe_collision(&push.account);
                    warn!(account = %push.account, event_id = %push.event_id,
                        "dedupe collision: another message had this push's dedupe key; routed as a new push under this event id");
                }
                (*push, Some((Some(*route), *reply)))
            }
        };
        let message = &push.message;
        metrics::push(
            &push.account,
            message.msg_type(),
            message.event(),
            label,
            elapsed,
        );
        let Some((route, reply)) = line else {
            return;
        };
        let content = if self.config.log.content {
            message.content()
        } else {
            None
        };
        let targets = route.map(|r| r.to.join(","));
        info!(
            account = %push.account,
            msg_type = telemetry::or_dash(message.msg_type().map(loggable)),
            event = telemetry::or_dash(message.event().map(loggable)),
            route = telemetry::or_dash(route.map(|r| r.name.as_str())),
            targets = telemetry::or_dash(targets.as_deref()),
            outcome = %label,
            reply = %reply.as_str(),
            cut = telemetry::or_dash(reply.cut()),
            ms = elapsed.as_millis() as u64,
            event_id = %push.event_id,
            content = content,
            "push"
        );
    }
}

/// The HTTP response for an answer (the same bytes for a push and its retries).
fn response(answer: &CachedAnswer) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(answer.body.clone()));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = HeaderValue::from_str(&answer.content_type)
        .unwrap_or(HeaderValue::from_static(reply::TEXT_PLAIN));
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    response
}

/// A protocol value from the push as it goes into a log line: WeChat's types and events are
/// short ASCII names; anything else (a forged plaintext push) is not printed.
fn loggable(value: &str) -> &str {
    if value.len() <= 64 && value.bytes().all(|b| b.is_ascii_graphic()) {
        value
    } else {
        "<unprintable>"
    }
}
