//! The admin listener (`[admin] listen`, off when absent), for the operator's monitoring and
//! never exposed to WeChat: `/healthz` (the process answers), `/readyz` (a config is loaded,
//! the store takes a write that allocates and is under its budget, the listener is bound) and
//! `/metrics` (Prometheus text format).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tracing::debug;

use crate::outbox::store::TargetStats;
use crate::server::connections::ConnectionSet;
use crate::server::descriptors::ADMIN_MAX_CONNECTIONS;
use crate::server::{self, Handle};

/// How long `/readyz` waits for the store's answer.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the admin endpoints read.
pub struct Admin {
    server: Handle,
    metrics: Option<PrometheusHandle>,
    /// Set once the WeChat listener is bound.
    listening: AtomicBool,
    /// Set on SIGTERM: not ready any more.
    draining: AtomicBool,
}

impl Admin {
    pub fn new(server: Handle, metrics: Option<PrometheusHandle>) -> Arc<Admin> {
        Arc::new(Admin {
            server,
            metrics,
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        })
    }

    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    async fn answer(&self, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => self.ready().await,
            "/metrics" => self.metrics().await,
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: /healthz, /readyz, /metrics\n".into(),
            ),
        }
    }

    /// Ready when the listener is bound, the store takes a write that allocates now, and it is
    /// under its budget.
    async fn ready(&self) -> Response<Full<Bytes>> {
        let mut problems = Vec::new();
        if !self.listening.load(Ordering::SeqCst) {
            problems.push("the listener is not bound yet".to_owned());
        }
        if self.draining.load(Ordering::SeqCst) {
            problems.push("shutting down".to_owned());
        }
        problems.extend(self.server.outbox().unready(STORE_PROBE_TIMEOUT).await);
        if problems.is_empty() {
            text(StatusCode::OK, "ready\n".into())
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", problems.join("; ")),
            )
        }
    }

    /// The metrics, with the outbox gauges read from the store now.
    async fn metrics(&self) -> Response<Full<Bytes>> {
        let Some(handle) = &self.metrics else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "metrics are not recorded\n".into(),
            );
        };
        let store = self.server.outbox().store();
        if let Ok(stats) = store.stats().await {
            crate::metrics::store(store.used_bytes(), stats.dedupe_keys);
            let relay = self.server.relay();
            let now = crate::outbox::now_ms();
            let none = TargetStats::default();
            for target in &relay.config().targets {
                let t = stats.targets.iter().find(|t| t.target == target.name);
                crate::metrics::outbox(&target.name, t.unwrap_or(&none), now);
            }
            for t in &stats.targets {
                if !relay.config().targets.iter().any(|c| c.name == t.target) {
                    crate::metrics::outbox(&t.target, t, now);
                }
            }
        }
        let mut response = Response::new(Full::new(Bytes::from(crate::metrics::render(handle))));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    crate::error::plain(status, Bytes::from(body))
}

/// Serves the admin endpoints on `listener` until `shutdown`: at most
/// [`ADMIN_MAX_CONNECTIONS`] at once (the idlest makes room for a newcomer), with the WeChat
/// listener's header, keep-alive and write-stall timers.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let connections = ConnectionSet::new("admin", ADMIN_MAX_CONNECTIONS);
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    let pause = server::accept_failed(&e, &connections);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = &mut shutdown => return,
                    }
                }
            },
            () = &mut shutdown => return,
        };
        let limits = server::connection_limits(&admin.server.relay().config().server);
        let admitted = tokio::select! {
            admitted = connections.admit(limits) => match admitted {
                Some(admitted) => admitted,
                None => return,
            },
            () = &mut shutdown => return,
        };
        let (admin, connection) = (Arc::clone(&admin), admitted.connection());
        let service = hyper::service::service_fn(move |request| {
            let (admin, connection) = (Arc::clone(&admin), Arc::clone(&connection));
            async move {
                connection.begin();
                let mut response = admin.answer(&request).await;
                connection.finish(&mut response);
                Ok::<_, Infallible>(response)
            }
        });
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(server::WRITE_STALL_TIMEOUT));
        let connection = builder.serve_connection(TokioIo::new(Box::pin(stream)), service);
        tokio::spawn(async move {
            if let Some(Err(e)) = admitted.run(connection).await {
                debug!(peer = %peer, error = %e, "admin connection ended with an error");
            }
        });
    }
}
