//! The accept loop, reload and graceful shutdown.
//!
//! Each request is handled by the [`Relay`] current when it arrives; a reload swaps in a new
//! one atomically, so requests in flight finish on the config they started with. Shutdown:
//! stop accepting, let requests in flight be answered and committed within the grace, stop
//! the delivery workers (what is pending stays in the store), return.
//!
//! HTTP/1.1 only (over TLS with `[server.tls]`): WeChat and the proxies in front of the relay
//! speak it, and hyper-util's auto-detecting builder waits for a client's first bytes without a
//! timeout. A peer outside `[server] allow_ips` is closed at accept. At most `max_connections`
//! are open, and at the limit a newcomer gets the slot of the connection idle longest
//! ([`connections`]); every connection has `HEADER_READ_TIMEOUT` for its first request's
//! headers (TLS handshake included), `keepalive_timeout_ms` between requests, and a write that
//! makes no progress for `WRITE_STALL_TIMEOUT` closes it. Running out of file descriptors
//! closes the idlest connection instead of stalling the accept loop ([`descriptors`]).

pub mod connections;
pub mod descriptors;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::forward::Forwarder;
use crate::metrics;
use crate::outbox::Outbox;
use crate::relay::Relay;
use crate::stack;
use crate::tls::CertResolver;

use connections::{Closed, ConnectionSet, Limits};

/// How long a new connection may take to send its first request's headers (TLS handshake
/// included).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client may make no progress: a client that stops reading (a zero TCP
/// window) would otherwise hold its connection, and a `max_connections` slot, for ever.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A server ready to run, and the handle that reloads it.
pub struct Server {
    handle: Handle,
    /// `max_connections`, or fewer when the file descriptors do not allow as many.
    max_connections: usize,
}

/// What a reload needs: the current relay, the outbox, the HTTP client and the certificate.
#[derive(Clone)]
pub struct Handle {
    /// The relay for new requests; swapped by a reload.
    current: Arc<ArcSwap<Relay>>,
    outbox: Arc<Outbox>,
    forwarder: Forwarder,
    /// Pushes being handled, across every config: drained at shutdown.
    pushes: TaskTracker,
    certificate: Option<Arc<CertResolver>>,
}

impl Server {
    /// `outbox` was opened (and its pending deliveries picked up) before the bind; the relay
    /// sends through `forwarder`, the pool the outbox's workers were given.
    pub fn new(config: Config, outbox: Outbox, forwarder: Forwarder) -> Server {
        let outbox = Arc::new(outbox);
        let pushes = TaskTracker::new();
        let certificate = config
            .server
            .tls
            .as_ref()
            .map(|tls| Arc::new(CertResolver::new(Arc::clone(&tls.certified))));
        let max_connections = config.server.max_connections;
        let relay = Relay::new(
            config,
            Arc::clone(&outbox),
            forwarder.clone(),
            pushes.clone(),
        );
        Server {
            max_connections,
            handle: Handle {
                current: Arc::new(ArcSwap::from_pointee(relay)),
                outbox,
                forwarder,
                pushes,
                certificate,
            },
        }
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves at most `max` connections at once (fewer than `max_connections`: what the file
    /// descriptors allow).
    pub fn limit_connections(&mut self, max: usize) {
        self.max_connections = self.max_connections.min(max.max(1));
    }

    /// Serves on an already-bound `listener` until `shutdown` completes, then drains.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let handle = self.handle;
        let acceptor = match &handle.certificate {
            Some(resolver) => match crate::tls::acceptor(Arc::clone(resolver)) {
                Ok(acceptor) => Some(acceptor),
                Err(e) => {
                    warn!(error = %e, "cannot set up TLS");
                    return;
                }
            },
            None => None,
        };
        let connections = ConnectionSet::new("wechat", self.max_connections);
        // The header and keep-alive timers are the connection set's (hyper's own would restart
        // its header timer after each answer, whatever keepalive_timeout_ms says).
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(None);
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        let pause = accept_failed(&e, &connections);
                        tokio::select! {
                            () = tokio::time::sleep(pause) => continue,
                            () = &mut shutdown => break,
                        }
                    }
                },
                () = &mut shutdown => break,
            };
            let relay = handle.current.load();
            let server = &relay.config().server;
            if !admitted_at_accept(server, peer) {
                metrics::connection_refused("allow_ips");
                continue;
            }
            let limits = connection_limits(server);
            drop(relay);
            // At the limit: the idlest connection makes room (waits only while all are busy).
            let admitted = tokio::select! {
                admitted = connections.admit(limits) => match admitted {
                    Some(admitted) => admitted,
                    None => break,
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(stack::build(
                Arc::clone(&handle.current),
                peer,
                admitted.connection(),
            ));
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(WRITE_STALL_TIMEOUT));
            let stream = Box::pin(stream);
            let (builder, watcher, acceptor) =
                (builder.clone(), graceful.watcher(), acceptor.clone());
            tokio::spawn(async move {
                let Some(acceptor) = acceptor else {
                    let serving = serve_connection(&builder, watcher, stream, service, peer);
                    admitted.run(serving).await;
                    return;
                };
                // The handshake counts against the first request's header time.
                match admitted.run(acceptor.accept(stream)).await {
                    Some(Ok(tls)) => {
                        let serving = serve_connection(&builder, watcher, tls, service, peer);
                        admitted.run(serving).await;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    }
                    None => tracing::debug!(peer = %peer, "TLS handshake cut"),
                }
            });
        }
        drop(listener);
        // Connections between requests (or that never sent one) go now; requests in flight
        // are drained.
        connections.close_all_idle();
        let grace = handle.current.load().config().server.shutdown_grace;
        info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: no new connections; draining"
        );
        let started = Instant::now();
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("requests still in flight at the end of the grace period were cut");
        }
        handle.pushes.close();
        let left = grace.saturating_sub(started.elapsed());
        if tokio::time::timeout(left, handle.pushes.wait())
            .await
            .is_err()
        {
            warn!("pushes still being handled at the end of the grace period were cut");
        }
        if !handle
            .outbox
            .shutdown(grace.saturating_sub(started.elapsed()))
            .await
        {
            warn!(
                "deliveries in flight at the end of the grace period were cut: they stay pending and are sent again on the next start"
            );
        }
        info!("stopped");
    }
}

impl Handle {
    /// The relay serving new requests now.
    pub fn relay(&self) -> Arc<Relay> {
        self.current.load_full()
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Applies a new, valid config: a new relay for new requests, the outbox's workers
    /// matched to its targets, the new certificate for new connections. A change that only a
    /// restart can apply is refused, and nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), Vec<String>> {
        let running = self.current.load_full();
        let needs_restart = restart_only_changes(running.config(), &config);
        if !needs_restart.is_empty() {
            return Err(needs_restart);
        }
        if let (Some(resolver), Some(tls)) = (&self.certificate, &config.server.tls) {
            resolver.set(Arc::clone(&tls.certified));
        }
        self.outbox.reconfigure(&config);
        let relay = Arc::new(Relay::new(
            config,
            Arc::clone(&self.outbox),
            self.forwarder.clone(),
            self.pushes.clone(),
        ));
        self.current.store(Arc::clone(&relay));
        // A target removed (or renamed) leaves its pending deliveries in the store: say so.
        let outbox = Arc::clone(&self.outbox);
        tokio::spawn(async move {
            if let Err(e) = outbox.report_leftovers(relay.config()).await {
                warn!(error = %e, "cannot read the outbox after the reload");
            }
        });
        Ok(())
    }
}

/// The keys read once at start (the listener, the store, the admin listener, the log format,
/// TLS on or off), each with what it was and what the file now says.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    let mut compare = |key: &str, was: String, now: String| {
        if was != now {
            changes.push(format!(
                "{key} changed ({was} -> {now}): restart to apply it"
            ));
        }
    };
    compare(
        "server.listen",
        running.server.listen.to_string(),
        new.server.listen.to_string(),
    );
    compare(
        "server.max_connections",
        running.server.max_connections.to_string(),
        new.server.max_connections.to_string(),
    );
    let tls = |c: &Config| if c.server.tls.is_some() { "on" } else { "off" }.to_owned();
    compare("server.tls", tls(running), tls(new));
    let store = |c: &Config| match (&c.store.path, &c.store.database) {
        (Some(path), _) => path.display().to_string(),
        (None, Some(database)) => database.shown.clone(),
        (None, None) => "memory".to_owned(),
    };
    compare("store.path", store(running), store(new));
    // The same database with another password (never shown).
    let password_changed =
        running.store.database != new.store.database && store(running) == store(new);
    let password = if password_changed {
        "a new one"
    } else {
        "the old password"
    };
    compare(
        "store.password_file",
        "the old password".into(),
        password.into(),
    );
    compare(
        "store.lease_ms",
        running.store.lease.as_millis().to_string(),
        new.store.lease.as_millis().to_string(),
    );
    let admin = |c: &Config| {
        c.admin
            .as_ref()
            .map_or("off".to_owned(), |a| a.listen.to_string())
    };
    compare("admin.listen", admin(running), admin(new));
    compare(
        "log.format",
        format!("{:?}", running.log.format).to_lowercase(),
        format!("{:?}", new.log.format).to_lowercase(),
    );
    changes
}

/// Whether a connection from `peer` is served at all: everyone without `allow_ips`; else an
/// allowed peer, or a trusted proxy (whose clients are checked per request).
fn admitted_at_accept(server: &config::Server, peer: SocketAddr) -> bool {
    let ip = peer.ip();
    server.allow_ips.is_empty()
        || crate::peer::contains(&server.allow_ips, ip)
        || crate::peer::contains(&server.trusted_proxies, ip)
}

pub fn connection_limits(server: &config::Server) -> Limits {
    Limits {
        header_timeout: HEADER_READ_TIMEOUT,
        keepalive_timeout: server.keepalive_timeout,
        max_requests: server.max_requests_per_connection,
        max_age: server.max_connection_age,
    }
}

/// After a failed accept: out of file descriptors, close the idlest connection and try again
/// at once; other errors (a connection reset before it was accepted) back off a little.
pub fn accept_failed(error: &std::io::Error, connections: &ConnectionSet) -> Duration {
    if descriptors::is_exhaustion(error) {
        if connections.close_idlest(Closed::OutOfDescriptors) {
            return Duration::from_millis(1);
        }
        if crate::telemetry::limit::CONNECTION_PRESSURE.admit("out_of_descriptors") {
            warn!(error = %error, open = connections.len(),
                "out of file descriptors and no idle connection to close");
        }
        return Duration::from_millis(50);
    }
    tracing::debug!(error = %error, "accept failed");
    Duration::from_millis(10)
}

/// Serves one connection (plain or TLS) until it ends or the graceful shutdown closes it.
async fn serve_connection<I>(
    builder: &http1::Builder,
    watcher: Watcher,
    io: I,
    service: TowerToHyperService<stack::RelayService>,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = watcher.watch(builder.serve_connection(TokioIo::new(io), service));
    // A client that goes away mid-request is routine, not an error.
    if let Err(e) = connection.await {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}

/// Serves `config` on `listener` until `shutdown` (what tests and the benchmark call).
pub async fn run(
    config: Config,
    outbox: Outbox,
    forwarder: Forwarder,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    Server::new(config, outbox, forwarder)
        .run(listener, shutdown)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn out_of_descriptors_closes_the_idlest_connection_and_retries_at_once() {
        let limits = Limits {
            header_timeout: HEADER_READ_TIMEOUT,
            keepalive_timeout: Duration::from_secs(15),
            max_requests: 10,
            max_age: Duration::from_secs(60),
        };
        let connections = ConnectionSet::new("test", 4);
        let idle = connections.admit(limits).await.expect("slot");
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(
            accept_failed(&emfile, &connections),
            Duration::from_millis(1)
        );
        // Told to close: its task ends at once.
        assert!(idle.run(std::future::pending::<()>()).await.is_none());
        drop(idle);
        // Nothing left to close: back off instead of spinning.
        assert_eq!(
            accept_failed(&emfile, &connections),
            Duration::from_millis(50)
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert_eq!(
            accept_failed(&reset, &connections),
            Duration::from_millis(10)
        );
    }
}
