//! The accept loop, reload and graceful shutdown.
//!
//! Each request is handled by the [`Relay`] current when it arrives; a reload swaps in a new
//! one atomically, so requests in flight finish on the config they started with. Shutdown:
//! stop accepting, let requests in flight be answered and committed within the grace, stop
//! the delivery workers (what is pending stays in the store), return.
//!
//! HTTP/1.1 only (over TLS with `[server.tls]`): WeChat and the proxies in front of the relay
//! speak it, and hyper-util's auto-detecting builder waits for a client's first bytes without a
//! timeout. Every connection has `HEADER_READ_TIMEOUT` to send its headers (and to finish the
//! TLS handshake), a write that makes no progress for `WRITE_STALL_TIMEOUT` closes it, and at
//! most `max_connections` are open. Per-client limits belong in the proxy in front.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::outbox::Outbox;
use crate::relay::Relay;
use crate::stack;
use crate::tls::CertResolver;

/// How long a client may take to send its request headers (and to finish a TLS handshake).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client may make no progress: a client that stops reading (a zero TCP
/// window) would otherwise hold its connection, and a `max_connections` slot, for ever.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The relay for new requests; swapped by a reload.
pub struct Current(RwLock<Arc<Relay>>);

impl Current {
    pub fn get(&self) -> Arc<Relay> {
        match self.0.read() {
            Ok(relay) => Arc::clone(&relay),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn set(&self, relay: Arc<Relay>) {
        match self.0.write() {
            Ok(mut current) => *current = relay,
            Err(poisoned) => *poisoned.into_inner() = relay,
        }
    }
}

/// A server ready to run, and the handle that reloads it.
pub struct Server {
    handle: Handle,
}

/// What a reload needs: the current relay, the outbox and the certificate.
#[derive(Clone)]
pub struct Handle {
    current: Arc<Current>,
    outbox: Arc<Outbox>,
    /// Pushes being handled, across every config: drained at shutdown.
    pushes: TaskTracker,
    certificate: Option<Arc<CertResolver>>,
}

impl Server {
    /// `outbox` was opened (and its pending deliveries picked up) before the bind.
    pub fn new(config: Config, outbox: Outbox) -> Server {
        let outbox = Arc::new(outbox);
        let pushes = TaskTracker::new();
        let certificate = config
            .server
            .tls
            .as_ref()
            .map(|tls| Arc::new(CertResolver::new(Arc::clone(&tls.certified))));
        let relay = Relay::new(config, Arc::clone(&outbox), pushes.clone());
        Server {
            handle: Handle {
                current: Arc::new(Current(RwLock::new(Arc::new(relay)))),
                outbox,
                pushes,
                certificate,
            },
        }
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Serves on an already-bound `listener` until `shutdown` completes, then drains.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let handle = self.handle;
        let first = handle.current.get();
        let max_connections = first.config().server.max_connections;
        drop(first);
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
        let connections = Arc::new(Semaphore::new(max_connections));
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            // At the connection limit, stop accepting until one closes.
            let connection_slot = tokio::select! {
                slot = Arc::clone(&connections).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
                () = &mut shutdown => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                            () = &mut shutdown => break,
                        }
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let service = TowerToHyperService::new(stack::build(Arc::clone(&handle.current), peer));
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(WRITE_STALL_TIMEOUT));
            let stream = Box::pin(stream);
            let (builder, watcher, acceptor) =
                (builder.clone(), graceful.watcher(), acceptor.clone());
            tokio::spawn(async move {
                let _slot = connection_slot;
                let Some(acceptor) = acceptor else {
                    return serve_connection(&builder, watcher, stream, service, peer).await;
                };
                match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(&builder, watcher, tls, service, peer).await,
                    Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                }
            });
        }
        drop(listener);
        let grace = handle.current.get().config().server.shutdown_grace;
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
        self.current.get()
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Applies a new, valid config: a new relay for new requests, the outbox's workers
    /// matched to its targets, the new certificate for new connections. A change that only a
    /// restart can apply is refused, and nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), Vec<String>> {
        let running = self.current.get();
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
            self.pushes.clone(),
        ));
        self.current.set(Arc::clone(&relay));
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
    let store = |c: &Config| {
        c.store
            .path
            .as_ref()
            .map_or("memory".to_owned(), |p| p.display().to_string())
    };
    compare("store.path", store(running), store(new));
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
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    Server::new(config, outbox).run(listener, shutdown).await;
}
