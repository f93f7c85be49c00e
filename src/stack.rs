//! The one function that builds the tower stack around the relay handler, outermost first.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, service_fn};
use tower_http::catch_panic::CatchPanicLayer;

use crate::server::Current;
use crate::server::connections::Connection;

pub type Body = hyper::body::Incoming;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = tower_http::body::UnsyncBoxBody<Bytes, BoxError>;
pub type RelayService = BoxCloneService<Request<Body>, Response<ResponseBody>, Infallible>;

/// The service for one connection from `peer`. Each request is handled by the relay current
/// when it arrives (a reload between two requests of a keep-alive connection applies).
pub fn build(current: Arc<Current>, peer: SocketAddr, connection: Arc<Connection>) -> RelayService {
    let finished = Arc::clone(&connection);
    let service = ServiceBuilder::new()
        // The connection's state for its slot and timers: reading a request from here, handling
        // it once the body is in, idle after the answer; a refused request, or the connection's last, answers
        // `Connection: close`.
        .map_response(move |mut response: Response<ResponseBody>| {
            finished.finish(&mut response);
            response
        })
        .map_request(move |mut request: Request<Body>| {
            connection.begin();
            // The handler says when the body is in (`Connection::body_read`).
            request.extensions_mut().insert(Arc::clone(&connection));
            request
        })
        // A bug must answer 500, not drop the connection (WeChat would retry the same push into
        // the same bug) nor take other connections down. The payload is not logged: it could
        // hold message content.
        .layer(CatchPanicLayer::custom(
            |_payload: Box<dyn std::any::Any + Send>| {
                tracing::error!("handler panicked; answered 500");
                let mut response =
                    Response::new(Full::new(Bytes::from_static(b"internal error\n")));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                response
            },
        ))
        // The handler answers every request itself: body limits, deadlines and refusals are
        // its own so that each one gets its log line.
        .service(service_fn(move |request: Request<Body>| {
            let relay = current.get();
            async move { Ok::<_, Infallible>(relay.handle(request, peer).await) }
        }));
    BoxCloneService::new(service)
}
