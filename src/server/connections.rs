//! The open client connections of one listener, and the rules that keep a slot free for WeChat.
//!
//! At most `max` connections are open. At the limit a newcomer is still accepted: the open
//! connection that has been idle longest (a keep-alive connection between two requests, or one
//! that has not sent its first request yet) is closed for it; when none is left, one whose
//! request body is still arriving. Only a request being handled (its body in) is never closed
//! that way; when every connection has one, the newcomer waits for one to go idle. Each connection also has its own timers: the first request's headers (TLS handshake
//! included) within `header_timeout` of the accept, each later request within
//! `keepalive_timeout` of the last answer, and at most `max_requests` requests and `max_age`
//! in all (then `Connection: close` on the answer). A refused request's answer also closes its
//! connection, so a client that only probes holds no slot.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::CONNECTION;
use http::{HeaderValue, Response, StatusCode};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics;
use crate::telemetry::limit::CONNECTION_PRESSURE;
use tracing::warn;

/// The limits every connection of a listener has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From the accept to the end of the first request's headers (TLS handshake included).
    pub header_timeout: Duration,
    /// From an answer to the end of the next request's headers.
    pub keepalive_timeout: Duration,
    pub max_requests: u64,
    pub max_age: Duration,
}

/// Why a connection was closed by the relay rather than by its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Made room for a new connection at the limit.
    Evicted,
    /// Made room because the process ran out of file descriptors.
    OutOfDescriptors,
    /// No complete first request within the header timeout.
    HeaderTimeout,
    /// Idle past the keep-alive timeout.
    KeepaliveTimeout,
    /// Idle past its maximum age.
    MaxAge,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Evicted => "evicted",
            Closed::OutOfDescriptors => "out_of_descriptors",
            Closed::HeaderTimeout => "header_timeout",
            Closed::KeepaliveTimeout => "keepalive_timeout",
            Closed::MaxAge => "max_age",
        }
    }
}

/// At the limit with every connection in a request, how often to look for one gone idle.
const BUSY_RECHECK: Duration = Duration::from_millis(50);

/// An answer produced this recently may still be on its way out: its connection is closed for
/// a newcomer only when no other is left.
const JUST_ANSWERED: Duration = Duration::from_millis(100);

/// Accepted, no request yet (or in the TLS handshake).
const FRESH: u8 = 0;
/// A request whose body is complete is being handled: never closed for a newcomer.
const BUSY: u8 = 1;
/// Between two requests.
const IDLE: u8 = 2;
/// Told to close (evicted): never chosen again.
const CLOSING: u8 = 3;
/// A request's headers are in, its body is still arriving: closed for a newcomer when no
/// fresh or idle connection is left (a client that trickles a body, even with a captured
/// signature, cannot hold a slot against WeChat).
const READING: u8 = 4;

/// The connections of one listener.
pub struct ConnectionSet {
    listener: &'static str,
    slots: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    epoch: Instant,
}

/// One open connection, as the set and its request handler see it.
pub struct Connection {
    id: u64,
    accepted: Instant,
    epoch: Instant,
    state: AtomicU8,
    /// Milliseconds from `epoch` to the last change of `state`.
    since_ms: AtomicU64,
    requests: AtomicU64,
    limits: Limits,
    /// Rung when the set wants it closed.
    close: Notify,
}

/// Holds a connection's place in the set (and its slot) for as long as it is open.
pub struct Admitted {
    set: Arc<ConnectionSet>,
    connection: Arc<Connection>,
    _slot: OwnedSemaphorePermit,
}

impl ConnectionSet {
    /// A set of at most `max` connections, named `listener` in metrics (`wechat`, `admin`).
    pub fn new(listener: &'static str, max: usize) -> Arc<ConnectionSet> {
        Arc::new(ConnectionSet {
            listener,
            slots: Arc::new(Semaphore::new(max.max(1))),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// A slot for a connection just accepted: a free one, or at the limit the one the idlest
    /// connection leaves (it is told to close). Waits only while every connection is in the
    /// middle of a request.
    pub async fn admit(self: &Arc<Self>, limits: Limits) -> Option<Admitted> {
        let accepted = Instant::now();
        let slot = loop {
            if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
                break slot;
            }
            // The victim frees its slot as soon as its task sees the word. When every
            // connection is in a request, look again shortly: one that goes idle can go.
            let wait = if self.close_idlest(Closed::Evicted) {
                Duration::from_secs(1)
            } else {
                BUSY_RECHECK
            };
            if let Ok(slot) =
                tokio::time::timeout(wait, Arc::clone(&self.slots).acquire_owned()).await
            {
                break slot.ok()?;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            id,
            accepted,
            epoch: self.epoch,
            state: AtomicU8::new(FRESH),
            since_ms: AtomicU64::new(ms_between(self.epoch, accepted)),
            requests: AtomicU64::new(0),
            limits,
            close: Notify::new(),
        });
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, Arc::clone(&connection));
            metrics::connections_open(self.listener, open.len());
        }
        Some(Admitted {
            set: Arc::clone(self),
            connection,
            _slot: slot,
        })
    }

    /// Tells the connection idle longest (fresh or between requests) to close; false when
    /// every open connection is in the middle of a request.
    pub fn close_idlest(&self, reason: Closed) -> bool {
        let Ok(open) = self.open.lock() else {
            return false;
        };
        // The idlest first; an answer just produced and bodies still arriving last.
        let recent =
            ms_between(self.epoch, Instant::now()).saturating_sub(JUST_ANSWERED.as_millis() as u64);
        let victim = open
            .values()
            .filter_map(|c| {
                let since = c.since_ms.load(Ordering::Acquire);
                let tier = match c.state.load(Ordering::Acquire) {
                    FRESH => 0,
                    IDLE if since <= recent => 0,
                    IDLE => 1,
                    READING => 2,
                    _ => return None,
                };
                Some((tier, since, c))
            })
            .min_by_key(|(tier, since, _)| (*tier, *since))
            .map(|(_, _, c)| c);
        let Some(victim) = victim else {
            return false;
        };
        // Lost a race with its own request going on: it is busy now; try again next time.
        if !victim.tell_to_close() {
            return false;
        }
        metrics::connection_closed(self.listener, reason.as_str());
        if CONNECTION_PRESSURE.admit(self.listener) {
            warn!(
                listener = self.listener,
                reason = reason.as_str(),
                open = open.len(),
                "connection limit reached: closed the connection idle longest to make room"
            );
        }
        true
    }

    /// At shutdown: tells every connection that is not handling a request to close now (a
    /// client that sent one byte, or is in its TLS handshake, must not hold the drain for the
    /// whole grace). Requests being handled finish.
    pub fn close_all_idle(&self) {
        let Ok(open) = self.open.lock() else {
            return;
        };
        for connection in open.values() {
            connection.tell_to_close();
        }
    }

    pub fn len(&self) -> usize {
        self.open.lock().map_or(0, |open| open.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Admitted {
    pub fn connection(&self) -> Arc<Connection> {
        Arc::clone(&self.connection)
    }

    /// Runs `work` (the TLS handshake, then serving the connection) until it ends, or until the
    /// connection is to be closed: told so by the set, or past its header or keep-alive
    /// timeout. `None` then: `work` is dropped, which closes the socket.
    pub async fn run<F: Future>(&self, work: F) -> Option<F::Output> {
        let connection = &self.connection;
        tokio::pin!(work);
        loop {
            let check_at = connection.next_check();
            tokio::select! {
                output = &mut work => return Some(output),
                () = connection.close.notified() => return None,
                () = tokio::time::sleep_until(check_at) => {
                    if let Some(reason) = connection.expired(Instant::now()) {
                        metrics::connection_closed(self.set.listener, reason.as_str());
                        return None;
                    }
                }
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut open) = self.set.open.lock() {
            open.remove(&self.connection.id);
            metrics::connections_open(self.set.listener, open.len());
        }
    }
}

impl Connection {
    /// Marks a request as started (its headers are in, its body may still be arriving);
    /// call [`Connection::body_read`] once the body is, and [`Connection::finish`] with the
    /// answer.
    pub fn begin(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.since_ms
            .store(ms_between(self.epoch, Instant::now()), Ordering::Release);
        self.set_state(READING);
    }

    /// The request's body is complete: the request is handled from here on and its
    /// connection is no longer closed for a newcomer.
    pub fn body_read(&self) {
        self.set_state(BUSY);
    }

    /// Tells the connection to close, unless it is handling a request (or already closing);
    /// whether it was told.
    fn tell_to_close(&self) -> bool {
        let told = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                matches!(s, FRESH | IDLE | READING).then_some(CLOSING)
            })
            .is_ok();
        if told {
            self.close.notify_one();
        }
        told
    }

    /// Moves to `state`, unless the connection was told to close (it stays closing).
    fn set_state(&self, state: u8) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != CLOSING).then_some(state)
            });
    }

    /// The request's answer is ready: the connection is idle from now, and the answer says
    /// `Connection: close` when the request was refused or the connection has served its
    /// number of requests or its time.
    pub fn finish<B>(&self, response: &mut Response<B>) {
        if self.answered(response.status()) {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }

    /// [`Connection::finish`] without the response: whether the answer closes the connection.
    fn answered(&self, status: StatusCode) -> bool {
        let now = Instant::now();
        let close = closes_connection(status)
            || self.requests.load(Ordering::Acquire) >= self.limits.max_requests
            || now.saturating_duration_since(self.accepted) >= self.limits.max_age;
        self.since_ms
            .store(ms_between(self.epoch, now), Ordering::Release);
        self.set_state(IDLE);
        close
    }

    /// When to look at this connection's timers next. Checking early is harmless; checking
    /// late is not, so a state that can end sooner than its own deadline (a fresh connection
    /// that gets its request answered and goes idle) is looked at again within the keep-alive
    /// timeout.
    fn next_check(&self) -> Instant {
        let since = self.epoch + Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        let soon = Instant::now() + self.limits.keepalive_timeout;
        match self.state.load(Ordering::Acquire) {
            FRESH => (self.accepted + self.limits.header_timeout).min(soon),
            IDLE => {
                (since + self.limits.keepalive_timeout).min(self.accepted + self.limits.max_age)
            }
            // In a request: the request has deadlines of its own; look again later.
            _ => soon,
        }
    }

    /// Whether a timer has run out at `now`, and which.
    fn expired(&self, now: Instant) -> Option<Closed> {
        let since = self.epoch + Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        match self.state.load(Ordering::Acquire) {
            FRESH if now >= self.accepted + self.limits.header_timeout => {
                Some(Closed::HeaderTimeout)
            }
            IDLE if now >= since + self.limits.keepalive_timeout => Some(Closed::KeepaliveTimeout),
            IDLE if now.saturating_duration_since(self.accepted) >= self.limits.max_age => {
                Some(Closed::MaxAge)
            }
            _ => None,
        }
    }
}

/// A refused request (400, 403, 404, 405, 413, 431, ...) closes its connection: a client that
/// sends junk does not keep a slot for its next try.
impl crate::stack::ConnectionState for Connection {
    fn request_started(&self) {
        self.begin();
    }

    fn body_complete(&self) {
        self.body_read();
    }

    fn answered(&self, status: StatusCode) -> bool {
        Connection::answered(self, status)
    }
}

fn closes_connection(status: StatusCode) -> bool {
    status.is_client_error()
}

fn ms_between(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(15),
            max_requests: 3,
            max_age: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn at_the_limit_the_idlest_connection_is_closed_for_a_newcomer() {
        let set = ConnectionSet::new("test", 2);
        let first = set.admit(limits()).await.expect("slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = set.admit(limits()).await.expect("slot");
        // The first is in a request: the second (fresh) is the one to go.
        first.connection.begin();
        let third = {
            let set = Arc::clone(&set);
            tokio::spawn(async move { set.admit(limits()).await })
        };
        assert!(second.run(std::future::pending::<()>()).await.is_none());
        drop(second);
        let third = third.await.expect("task");
        assert!(third.is_some(), "the newcomer got the freed slot");
        assert_eq!(set.len(), 2);
        drop(first);
    }

    #[tokio::test]
    async fn busy_connections_are_never_closed_for_a_newcomer() {
        let set = ConnectionSet::new("test", 1);
        let only = set.admit(limits()).await.expect("slot");
        only.connection.begin();
        only.connection.body_read();
        assert!(!set.close_idlest(Closed::Evicted));
        let mut response = Response::new(());
        only.connection.finish(&mut response);
        assert!(response.headers().get(CONNECTION).is_none());
        assert!(set.close_idlest(Closed::Evicted), "idle now");
    }

    #[tokio::test]
    async fn a_body_still_arriving_goes_after_fresh_and_idle_connections() {
        let set = ConnectionSet::new("test", 3);
        let reading = set.admit(limits()).await.expect("slot");
        reading.connection.begin();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let answered = set.admit(limits()).await.expect("slot");
        answered.connection.begin();
        answered.connection.finish(&mut Response::new(()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let fresh = set.admit(limits()).await.expect("slot");
        // The fresh one goes first although it is the newest; then the one answered a moment
        // ago (its answer may still be on its way); the body still arriving last.
        assert!(set.close_idlest(Closed::Evicted));
        assert!(fresh.run(std::future::pending::<()>()).await.is_none());
        assert!(set.close_idlest(Closed::Evicted));
        assert!(answered.run(std::future::pending::<()>()).await.is_none());
        assert!(set.close_idlest(Closed::Evicted));
        assert!(reading.run(std::future::pending::<()>()).await.is_none());
        assert!(
            !set.close_idlest(Closed::Evicted),
            "all told to close already"
        );
    }

    #[tokio::test]
    async fn shutdown_closes_every_connection_not_handling_a_request() {
        let set = ConnectionSet::new("test", 3);
        let fresh = set.admit(limits()).await.expect("slot");
        let busy = set.admit(limits()).await.expect("slot");
        busy.connection.begin();
        busy.connection.body_read();
        set.close_all_idle();
        assert!(fresh.run(std::future::pending::<()>()).await.is_none());
        let finished = busy.run(async { "answered" }).await;
        assert_eq!(finished, Some("answered"), "the busy one is left to finish");
    }

    #[test]
    fn refused_requests_and_the_last_allowed_request_close_the_connection() {
        let set = ConnectionSet::new("test", 1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let admitted = runtime.block_on(set.admit(limits())).expect("slot");
        let connection = admitted.connection();
        let answer = |status: StatusCode| {
            connection.begin();
            let mut response = Response::new(());
            *response.status_mut() = status;
            connection.finish(&mut response);
            response.headers().get(CONNECTION).cloned()
        };
        assert_eq!(
            answer(StatusCode::FORBIDDEN),
            Some(HeaderValue::from_static("close"))
        );
        assert_eq!(answer(StatusCode::OK), None);
        // The third request is the last one allowed.
        assert_eq!(
            answer(StatusCode::OK),
            Some(HeaderValue::from_static("close"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_connection_is_closed_at_the_header_timeout_and_an_idle_one_at_keepalive() {
        let set = ConnectionSet::new("test", 4);
        let fresh = set.admit(limits()).await.expect("slot");
        let started = Instant::now();
        assert!(fresh.run(std::future::pending::<()>()).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(10));

        let idle = set.admit(limits()).await.expect("slot");
        idle.connection.begin();
        let mut response = Response::new(());
        idle.connection.finish(&mut response);
        let started = Instant::now();
        assert!(idle.run(std::future::pending::<()>()).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(15));
    }
}
