//! `wechat-relay simulate`: what WeChat's debugging tool does, from the command line. One
//! signed push (encrypted in safe and compatible mode) or one URL check for an account, built
//! the way WeChat builds it ([`crate::wechat::sender`]), sent to the running relay, and its
//! answer read the way WeChat reads it (PROTOCOL.md §2, §3 and §5).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Uri};
use http_body_util::Full;
use rand::RngExt;

use crate::cli::SimulateArgs;
use crate::config::{Account, Config, Mode};
use crate::error::ForwardError;
use crate::forward::{Answer, Forwarder, unix_now};
use crate::wechat::crypto::{CryptoError, random_nonce, random_prefix};
use crate::wechat::message::Fields;
use crate::wechat::sender::{Outgoing, PushContent, ReplyError, Sender, Stamp, message_fields};

/// WeChat gives up on an answer after 5 s (PROTOCOL.md §5); so does `simulate`.
const WECHAT_DEADLINE: Duration = Duration::from_secs(5);

/// Why `simulate` got no answer to report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimulateError {
    #[error("no [[account]] named {name:?} in the config (it has: {known})")]
    UnknownAccount { name: String, known: String },
    #[error("account path {0:?} does not make a URL with server.listen: give --url")]
    NoUrl(String),
    #[error(
        "the relay serves HTTPS ([server.tls]): give --url https://<the certificate's name><path> (the certificate is checked against the public roots)"
    )]
    HttpsNeedsUrl,
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("no answer from {0} within 5 s (WeChat gives up after 5 s)")]
    Timeout(String),
}

impl SimulateError {
    /// A mistake on the command line (exit 2), not a relay that failed (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            SimulateError::UnknownAccount { .. }
                | SimulateError::NoUrl(_)
                | SimulateError::HttpsNeedsUrl
        )
    }
}

/// What happened, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// For stdout: the request, the HTTP status, the reply.
    pub output: String,
    /// Why the relay's answer is not what WeChat expects, in one line for stderr; `None` when
    /// it is.
    pub failure: Option<String>,
}

/// Sends the push or URL check `args` describes to the relay and reports its answer.
pub async fn run(config: &Config, args: &SimulateArgs) -> Result<Report, SimulateError> {
    let account = account(config, args.account.as_deref())?;
    let url = match &args.url {
        Some(url) => url.clone(),
        None if config.server.tls.is_some() => return Err(SimulateError::HttpsNeedsUrl),
        None => default_url(config.server.listen, &account.path)?,
    };
    let sender = Sender {
        token: account.token.clone(),
        app_id: account.app_id.clone(),
        key: account.keys.first().cloned(),
    };
    if args.verify_url {
        verify_url(&sender, &account.name, &url).await
    } else {
        push(&sender, account, args, &url).await
    }
}

/// The account named `name`, or the first.
fn account<'c>(config: &'c Config, name: Option<&str>) -> Result<&'c Account, SimulateError> {
    let found = match name {
        Some(name) => config.accounts.iter().find(|a| a.name == name),
        None => config.accounts.first(),
    };
    found.ok_or_else(|| SimulateError::UnknownAccount {
        name: name.unwrap_or_default().to_owned(),
        known: config
            .accounts
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// `http://<listen><path>`, with the loopback address for an unspecified one (0.0.0.0, [::]).
fn default_url(listen: SocketAddr, path: &str) -> Result<Uri, SimulateError> {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, listen.port());
    format!("http://{addr}{path}")
        .parse()
        .map_err(|_| SimulateError::NoUrl(path.to_owned()))
}

/// The GET URL check: the relay must answer 200 with `echostr`, byte for byte.
async fn verify_url(sender: &Sender, account: &str, url: &Uri) -> Result<Report, SimulateError> {
    let echostr = rand::rng().random::<u64>().to_string();
    let query = sender.url_check(&unix_now().to_string(), &random_nonce(), &echostr);
    let mut output = format!("GET {url} (account {account}: URL check)\n");
    let answer = send(Method::GET, url, &query, Bytes::new()).await?;
    let _ = writeln!(output, "HTTP {}", answer.status);
    let failure = if !answer.status.is_success() {
        let _ = writeln!(output, "answer: {}", one_line(&answer.body));
        Some(format!(
            "URL check failed: the relay answered {}",
            answer.status
        ))
    } else if answer.body == echostr.as_bytes() {
        output.push_str("echo matched: the relay passes WeChat's URL check\n");
        None
    } else {
        let _ = writeln!(
            output,
            "echo did not match: sent echostr {echostr}, got {:?}",
            one_line(&answer.body)
        );
        Some("URL check failed: the answer is not the echostr sent".into())
    };
    Ok(Report { output, failure })
}

/// A push as WeChat would send it to this account, and the reply read as WeChat reads it.
async fn push(
    sender: &Sender,
    account: &Account,
    args: &SimulateArgs,
    url: &Uri,
) -> Result<Report, SimulateError> {
    let create_time = unix_now();
    let (timestamp, nonce) = (create_time.to_string(), random_nonce());
    let stamp = Stamp {
        timestamp: &timestamp,
        nonce: &nonce,
        openid: &args.from,
    };
    let msg_id = rand::rng().random_range(10_000_000_000_000_000u64..100_000_000_000_000_000);
    let generated_ticket = random_ticket();
    let (content, summary) = content(args, msg_id, &generated_ticket);
    let fields = message_fields(&args.to, &args.from, create_time, &content);
    let xml = format!("<xml>{fields}</xml>");
    // WeChat encrypts every push in safe and compatible mode; compatible ones carry the
    // plaintext fields too. (Safe and compatible accounts always have a key.)
    let encrypted = match account.mode {
        Mode::Safe => sender.encrypted(&xml, &args.to, None, &stamp, &random_prefix()),
        Mode::Compatible => {
            sender.encrypted(&xml, &args.to, Some(&fields), &stamp, &random_prefix())
        }
        Mode::Plaintext => None,
    };
    let sealed = encrypted.is_some();
    let Outgoing { query, body } = encrypted.unwrap_or_else(|| sender.plaintext(&xml, &stamp));
    let mut output = format!(
        "POST {url} (account {}, {} mode: {})\npush: {summary}, from {}, to {}\n",
        account.name,
        account.mode.as_str(),
        if sealed { "encrypted" } else { "plaintext" },
        args.from,
        args.to,
    );
    let body = Bytes::from(body);
    let answer = send(Method::POST, url, &query, body.clone()).await?;
    let _ = writeln!(output, "HTTP {}", answer.status);
    let failure = if answer.status.is_success() {
        read_reply(sender, account.mode, sealed, &answer.body, &mut output)
    } else {
        let _ = writeln!(output, "answer: {}", one_line(&answer.body));
        Some(format!("the relay answered {}", answer.status))
    };
    let retried = resend(args.repeat, url, &query, &body, &answer, &mut output).await?;
    Ok(Report {
        output,
        failure: failure.or(retried),
    })
}

/// WeChat's retries of a push it got no answer to in time: the same request again (the same
/// MsgId, CreateTime, nonce and signature), `times` times. Each must get the first answer's
/// bytes, from the relay's dedupe record (PROTOCOL.md §6: it dedupes on the message, so a
/// retry with a new nonce and signature would get them too), not a second handling.
async fn resend(
    times: u32,
    url: &Uri,
    query: &str,
    body: &Bytes,
    first: &Answer,
    output: &mut String,
) -> Result<Option<String>, SimulateError> {
    let mut failure = None;
    for retry in 1..=times {
        let answer = send(Method::POST, url, query, body.clone()).await?;
        let same = answer.status == first.status
            && answer.content_type == first.content_type
            && answer.body == first.body;
        if same {
            let _ = writeln!(
                output,
                "retry {retry} of {times}: HTTP {}, the same bytes as the first answer (the relay's cached answer)",
                answer.status
            );
        } else {
            let _ = writeln!(
                output,
                "retry {retry} of {times}: HTTP {}, NOT the first answer: {}",
                answer.status,
                one_line(&answer.body)
            );
            failure.get_or_insert_with(|| {
                format!("retry {retry} got another answer than the first push: WeChat's retries must get the cached answer")
            });
        }
    }
    Ok(failure)
}

/// What the command line asks to push, and how to describe it.
fn content<'a>(
    args: &'a SimulateArgs,
    msg_id: u64,
    generated_ticket: &'a str,
) -> (PushContent<'a>, String) {
    if let Some(event) = args.event.as_deref() {
        let event_key = args.event_key.as_deref();
        // A QR code with parameters: WeChat sends its Ticket with the scene.
        let qr_code = matches!(event, "subscribe" | "SCAN") && event_key.is_some();
        let ticket = match args.ticket.as_deref() {
            Some(ticket) => Some(ticket),
            None if qr_code => Some(generated_ticket),
            None => None,
        };
        let mut summary = format!("event {event}");
        if let Some(key) = event_key {
            let _ = write!(summary, ", EventKey {key}");
        }
        if let Some(ticket) = ticket {
            let random = if args.ticket.is_none() {
                " (random)"
            } else {
                ""
            };
            let _ = write!(summary, ", Ticket {ticket}{random}");
        }
        let content = PushContent::Event {
            event,
            event_key,
            ticket,
        };
        (content, summary)
    } else {
        let text = args.text.as_deref().unwrap_or_default();
        let content = PushContent::Text {
            content: text,
            msg_id,
        };
        (content, format!("text {text:?}, MsgId {msg_id}"))
    }
}

/// A fresh ticket, marked as simulated (an identity provider matches none of its sessions).
fn random_ticket() -> String {
    format!("simulate_{}", hex::encode(random_prefix()))
}

/// Describes a 2xx answer's body into `output`; the failure if WeChat would not take it.
fn read_reply(
    sender: &Sender,
    mode: Mode,
    sealed: bool,
    body: &[u8],
    output: &mut String,
) -> Option<String> {
    if body.is_empty() {
        output.push_str("reply: (empty: acknowledged, no reply)\n");
        return None;
    }
    if body == b"success" {
        output.push_str("reply: success\n");
        return None;
    }
    let Ok(fields) = Fields::parse(body) else {
        let _ = writeln!(output, "reply (not XML): {}", one_line(body));
        return Some(
            "the reply is not XML: WeChat would tell the user the account cannot serve".into(),
        );
    };
    if fields.get("Encrypt").is_none() {
        let _ = writeln!(
            output,
            "reply (plaintext):\n{}",
            String::from_utf8_lossy(body)
        );
        if sealed && mode == Mode::Safe {
            return Some("the reply to an encrypted push in safe mode is not encrypted".into());
        }
        return None;
    }
    match sender.open_reply(body) {
        Ok(xml) => {
            let _ = writeln!(
                output,
                "reply (encrypted, MsgSignature verified, decrypted):\n{}",
                String::from_utf8_lossy(&xml)
            );
            None
        }
        Err(ReplyError::Signature) => {
            output.push_str(
                "reply (encrypted): MsgSignature does NOT verify with the account's token\n",
            );
            Some("the reply's MsgSignature does not verify: WeChat would refuse it".into())
        }
        Err(e) => {
            let why = cannot_open(&e);
            let _ = writeln!(output, "reply (encrypted): cannot open it: {why}");
            Some(format!("the reply cannot be opened: {why}"))
        }
    }
}

/// Why a reply whose `MsgSignature` verified cannot be opened. The token matched, so a
/// ciphertext that decrypts to garbage (bad padding, a length out of bounds) was sealed with
/// another EncodingAESKey than this relay.toml's: the crypto error alone would not say so.
fn cannot_open(error: &ReplyError) -> String {
    match error {
        ReplyError::Crypto(e @ (CryptoError::Padding | CryptoError::MessageLength)) => format!(
            "it does not decrypt with this account's EncodingAESKey: the key that sealed it (the \
             relay's, or a raw reply target's) does not match the one in this relay.toml ({e})"
        ),
        e => e.to_string(),
    }
}

/// Sends one request the way WeChat does and waits for the answer up to WeChat's deadline.
async fn send(
    method: Method,
    url: &Uri,
    query: &str,
    body: Bytes,
) -> Result<Answer, SimulateError> {
    let unreachable = |reason: String| SimulateError::Unreachable {
        url: url.to_string(),
        reason,
    };
    let uri = crate::forward::with_query(url, query).map_err(|e| unreachable(e.to_string()))?;
    let mut request = Request::builder().method(method.clone()).uri(uri);
    if method == Method::POST {
        request = request.header(CONTENT_TYPE, "text/xml");
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(WECHAT_DEADLINE, Forwarder::new().send(request)).await {
        Err(_) | Ok(Err(ForwardError::Timeout)) => Err(SimulateError::Timeout(url.to_string())),
        Ok(Err(e)) => Err(unreachable(e.to_string().replace('\n', " "))),
        Ok(Ok(answer)) => Ok(answer),
    }
}

/// An answer body for one line of output (the relay's refusals are one-line reasons).
fn one_line(body: &[u8]) -> String {
    String::from_utf8_lossy(body).trim().replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_url_uses_loopback_for_an_unspecified_listen_address() {
        let url = |listen: &str| {
            default_url(listen.parse().expect("addr"), "/wechat")
                .expect("url")
                .to_string()
        };
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080/wechat");
        assert_eq!(url("[::]:80"), "http://[::1]:80/wechat");
        assert_eq!(url("10.0.0.5:9000"), "http://10.0.0.5:9000/wechat");
    }

    #[test]
    fn random_tickets_differ() {
        let (a, b) = (random_ticket(), random_ticket());
        assert_ne!(a, b);
        assert!(a.starts_with("simulate_") && a.len() == "simulate_".len() + 32);
    }
}
