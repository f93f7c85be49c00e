//! `wechat-relay sink`: a small HTTP target for trying the relay out on one machine. It prints
//! every request it receives (method, path and query, the headers a handler reads, the body)
//! and answers `success`, or with `--reply TEXT` a passive text reply to the message's sender,
//! as a business server answering a `plain` forward would.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::wechat::message::{Fields, cdata};

/// The largest body the sink reads.
const MAX_BODY: usize = 1 << 20;

/// The headers printed beside the body (the rest are the HTTP client's).
const SHOWN: [&str; 6] = [
    "content-type",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "authorization",
];

/// Listens on `listen` until Ctrl-C. `reply`: the text of the passive reply, if any.
pub async fn run(listen: SocketAddr, reply: Option<String>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!(
        "sink: listening on http://{}/ ({}); Ctrl-C stops it",
        listener.local_addr()?,
        match &reply {
            Some(text) => format!("answering a text reply {text:?}"),
            None => "answering success".to_owned(),
        }
    );
    let reply: Option<std::sync::Arc<str>> = reply.map(Into::into);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let reply = reply.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, reply.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    reply: Option<std::sync::Arc<str>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            println!("sink: cannot read a request's body: {e}");
            return Ok(plain(StatusCode::BAD_REQUEST, "cannot read the body"));
        }
    };
    let mut shown = format!(
        "--- {} {}\n",
        parts.method,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    for name in SHOWN {
        for value in parts.headers.get_all(name) {
            let value = if name == "authorization" {
                "<redacted>"
            } else {
                value.to_str().unwrap_or("<not text>")
            };
            shown.push_str(&format!("{name}: {value}\n"));
        }
    }
    shown.push('\n');
    shown.push_str(&String::from_utf8_lossy(&body));
    shown.push('\n');
    let answer = match reply.as_deref().and_then(|text| text_reply(&body, text)) {
        Some(xml) => {
            shown.push_str("--- answered the text reply\n");
            let mut response = plain(StatusCode::OK, xml);
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/xml; charset=utf-8"),
            );
            response
        }
        None => {
            shown.push_str("--- answered success\n");
            plain(StatusCode::OK, "success")
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(shown.as_bytes()).and_then(|()| out.flush());
    Ok(answer)
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// A passive text reply to the message in `body`: to its sender, from the account. `None`
/// when the body is not a message with both user names (a JSON forward, an event the sink
/// does not answer).
fn text_reply(body: &[u8], text: &str) -> Option<String> {
    let fields = Fields::parse(body).ok()?;
    let to = fields.get("FromUserName")?;
    let from = fields.get("ToUserName")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Some(format!(
        "<xml><ToUserName>{}</ToUserName><FromUserName>{}</FromUserName><CreateTime>{now}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content>{}</Content></xml>",
        cdata(to),
        cdata(from),
        cdata(text)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_reply_goes_back_to_the_sender_from_the_account() {
        let body = b"<xml><ToUserName><![CDATA[gh_account]]></ToUserName><FromUserName><![CDATA[o_user]]></FromUserName><CreateTime>1</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hi]]></Content><MsgId>1</MsgId></xml>";
        let reply = text_reply(body, "hello <back>").expect("a reply");
        let fields = Fields::parse(reply.as_bytes()).expect("XML");
        assert_eq!(fields.get("ToUserName"), Some("o_user"));
        assert_eq!(fields.get("FromUserName"), Some("gh_account"));
        assert_eq!(fields.get("Content"), Some("hello <back>"));
        assert_eq!(fields.get("MsgType"), Some("text"));
        assert_eq!(text_reply(b"{\"not\": \"xml\"}", "x"), None);
    }
}
