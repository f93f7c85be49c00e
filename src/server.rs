//! The accept loop and graceful shutdown: stop accepting, let requests in flight finish and
//! commit within the grace, stop the delivery workers (what is pending stays in the store),
//! return.
//!
//! HTTP/1.1 only: WeChat and the proxies in front of the relay speak it, and hyper-util's
//! auto-detecting builder waits for a client's first bytes without a timeout. Every connection
//! has `header_read_timeout` to send its headers, a write that makes no progress for
//! `WRITE_STALL_TIMEOUT` closes it, and at most `max_connections` are open. Per-client limits
//! belong in the proxy in front.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::Config;
use crate::outbox::Outbox;
use crate::relay::{Relay, drain_pushes};
use crate::stack;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a client may make no progress: a client that stops reading (a zero TCP
/// window) would otherwise hold its connection, and a `max_connections` slot, for ever.
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `config` on an already-bound `listener`, with the `outbox` opened (and its pending
/// deliveries picked up) before the bind, until `shutdown` completes; then drains. Tests and
/// `main` start the relay the same way.
pub async fn run(
    config: Config,
    outbox: Outbox,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let grace = config.server.shutdown_grace;
    let connections = Arc::new(Semaphore::new(config.server.max_connections));
    let relay = Arc::new(Relay::new(config, Arc::new(outbox)));
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
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                            () = &mut shutdown => break,
                        }
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(stack::build(Arc::clone(&relay), peer));
                let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
                stream.set_write_timeout(Some(WRITE_STALL_TIMEOUT));
                let io = TokioIo::new(Box::pin(stream));
                let connection = graceful.watch(builder.serve_connection(io, service));
                tokio::spawn(async move {
                    let _slot = connection_slot;
                    // A client that goes away mid-request is routine, not an error.
                    if let Err(e) = connection.await {
                        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
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
    if !drain_pushes(&relay, grace.saturating_sub(started.elapsed())).await {
        warn!("pushes still being handled at the end of the grace period were cut");
    }
    if !relay
        .outbox()
        .shutdown(grace.saturating_sub(started.elapsed()))
        .await
    {
        warn!(
            "deliveries in flight at the end of the grace period were cut: they stay pending and are sent again on the next start"
        );
    }
    info!("stopped");
}
