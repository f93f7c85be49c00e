//! The one function that builds the tower stack around the relay handler, outermost first.
//!
//! The stack knows the connection it serves only through [`ConnectionState`] (the server's
//! connection set implements it), and the relay only through the cell a reload swaps.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::CONNECTION;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, service_fn};
use tower_http::catch_panic::CatchPanicLayer;

use crate::relay::Relay;

pub type Body = hyper::body::Incoming;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = tower_http::body::UnsyncBoxBody<Bytes, BoxError>;
pub type RelayService = BoxCloneService<Request<Body>, Response<ResponseBody>, Infallible>;

/// What a connection's slot and timers need to know of its requests.
pub trait ConnectionState: Send + Sync + 'static {
    /// A request's headers are in; its body may still be arriving.
    fn request_started(&self);
    /// The request's body is complete: it is being handled.
    fn body_complete(&self);
    /// The answer to a request with `status` is ready; true when it must close the
    /// connection.
    fn answered(&self, status: StatusCode) -> bool;
}

/// The service for one connection from `peer`. Each request is handled by the relay current
/// when it arrives (a reload between two requests of a keep-alive connection applies).
pub fn build<C: ConnectionState>(
    current: Arc<ArcSwap<Relay>>,
    peer: SocketAddr,
    connection: Arc<C>,
) -> RelayService {
    let finished = Arc::clone(&connection);
    let service = ServiceBuilder::new()
        // The connection's state for its slot and timers: reading a request from here, handling
        // it once its body is in, idle after the answer; a refused request, or the connection's
        // last, answers `Connection: close`.
        .map_response(move |mut response: Response<ResponseBody>| {
            if finished.answered(response.status()) {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        })
        .map_request(move |request: Request<Body>| {
            connection.request_started();
            request.map(|body| Watched {
                body,
                connection: Some(Arc::clone(&connection)),
            })
        })
        // A bug must answer 500, not drop the connection (WeChat would retry the same push into
        // the same bug) nor take other connections down. The payload is not logged: it could
        // hold message content.
        .layer(CatchPanicLayer::custom(
            |_payload: Box<dyn std::any::Any + Send>| {
                tracing::error!("handler panicked; answered 500");
                crate::error::internal_error()
            },
        ))
        // The handler answers every request itself: body limits, deadlines and refusals are
        // its own so that each one gets its log line.
        .service(service_fn(move |request: Request<Watched<C>>| {
            let relay = current.load_full();
            async move { Ok::<_, Infallible>(relay.handle(request, peer).await) }
        }));
    BoxCloneService::new(service)
}

/// A request body that tells its connection when it has been read to the end.
pub struct Watched<C: ConnectionState> {
    body: Body,
    /// Until the end is seen.
    connection: Option<Arc<C>>,
}

impl<C: ConnectionState> HttpBody for Watched<C> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            _ => false,
        };
        if ended && let Some(connection) = self.connection.take() {
            connection.body_complete();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
