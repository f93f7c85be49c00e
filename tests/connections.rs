//! A slot for WeChat, always: the real binary at `max_connections` under pingers and silent
//! sockets (plain and TLS), refused requests and idle keep-alive connections closed, the
//! allow-list and trusted proxies, the admin listener's cap, and the file descriptor limit.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// relay.toml in `dir`: plaintext, everything to the raw target `target`, `server_keys` added to
/// `[server]` and `extra` sections after it.
fn write_config(dir: &Path, server_keys: &str, extra: &str, target: &FakeTarget) -> PathBuf {
    let mut toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_ms = 1000\n{server_keys}\n{extra}\n"
    );
    toml.push_str(&account_section("main", "/wechat", "plaintext"));
    toml.push_str(&target_section("t", &target.url("/t"), "raw", ""));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    let path = dir.join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    path
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A TCP connection to `addr`, with a TLS handshake when `root` is given.
async fn open(addr: &str, root: Option<&[u8]>) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr).await?;
    match root {
        None => Ok(Box::new(tcp)),
        Some(root) => handshake(tcp, root).await,
    }
}

/// Sends `request` and reads until the connection ends or `wait` passes; returns what came.
async fn exchange(io: &mut Box<dyn Io>, request: &str, wait: Duration) -> String {
    if io.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends `request` and reads one whole answer (headers and `content-length` bytes), waiting up
/// to 5 s for it.
async fn ask(io: &mut Box<dyn Io>, request: &str) -> String {
    io.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(str::to_owned)
            })
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        body.len() >= length
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !complete(&got) {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether the relay closed `io` within `wait` (a read returns end of file or an error).
async fn closed_within(io: &mut Box<dyn Io>, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A signed URL check: answered 200, its keep-alive connection stays open.
fn url_check_request() -> String {
    let query = plain_query(&now(), "7");
    format!("GET /wechat?{query}&echostr=hi HTTP/1.1\r\nhost: relay\r\n\r\n")
}

/// An attacker's keep-alive connection: `request` every 200 ms (a refused `GET /x`, or a URL
/// check with a signature it captured), reconnecting whenever the relay closes it, until
/// aborted.
fn pinger(addr: String, root: Option<Vec<u8>>, request: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok(mut io) = open(&addr, root.as_deref()).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            loop {
                if io.write_all(request.as_bytes()).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 1024];
                match tokio::time::timeout(Duration::from_millis(200), io.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    })
}

/// `max_connections = 64`, 64 pingers (half refused and reconnecting, half idle between
/// signed URL checks), then 64 silent connections: a genuine push is still answered within 1 s.
async fn a_genuine_push_gets_a_slot(tls: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = tls.then(|| self_signed(dir.path()));
    let mut target = FakeTarget::start().await;
    let tls_section = if tls {
        "[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n"
    } else {
        ""
    };
    let path = write_config(dir.path(), "max_connections = 64", tls_section, &target);
    let relay = Binary::start(&path);
    let addr = relay.url("").trim_start_matches("http://").to_owned();
    let pingers: Vec<_> = (0..64)
        .map(|i| {
            let request = if i % 2 == 0 {
                "GET /x HTTP/1.1\r\nhost: relay\r\n\r\n".to_owned()
            } else {
                url_check_request()
            };
            pinger(addr.clone(), root.clone(), request)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(TcpStream::connect(&addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (query, body) = PushBuilder::new(text_xml("let me in", 1)).plaintext();
    let url = relay.url(&format!("/wechat?{query}"));
    let answer = if let Some(root) = &root {
        let url = url.replace("http://", "https://");
        tokio::time::timeout(Duration::from_secs(1), post_https(&url, body, root))
            .await
            .expect("answered within 1 s")
            .expect("https")
    } else {
        tokio::time::timeout(Duration::from_secs(1), post(&url, body))
            .await
            .expect("answered within 1 s")
    };
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(String::from_utf8_lossy(&target.next().await.body).contains("let me in"));
    for pinger in pingers {
        pinger.abort();
    }
    drop(silent);
}

#[tokio::test]
async fn a_genuine_push_gets_a_slot_past_pingers_and_silent_connections() {
    a_genuine_push_gets_a_slot(false).await;
}

#[tokio::test]
async fn a_genuine_push_gets_a_slot_past_pingers_and_silent_connections_over_tls() {
    a_genuine_push_gets_a_slot(true).await;
}

#[tokio::test]
async fn a_refused_request_closes_its_connection_and_an_accepted_one_keeps_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = FakeTarget::start().await;
    let relay = Binary::start(&write_config(dir.path(), "", "", &target));
    let addr = relay.url("").trim_start_matches("http://").to_owned();

    let mut io = open(&addr, None).await.expect("connect");
    let answer = exchange(
        &mut io,
        "GET /x HTTP/1.1\r\nhost: relay\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // exchange() read until the relay closed it, well before its 5 s.
    assert!(closed_within(&mut io, Duration::from_millis(100)).await);

    // A URL check with a good signature keeps its connection for the next request.
    let mut io = open(&addr, None).await.expect("connect");
    io.write_all(url_check_request().as_bytes())
        .await
        .expect("write");
    assert!(!closed_within(&mut io, Duration::from_millis(500)).await);
}

#[tokio::test]
async fn keep_alive_connections_end_at_the_idle_timeout_and_after_their_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = FakeTarget::start().await;
    let relay = Binary::start(&write_config(
        dir.path(),
        "keepalive_timeout_ms = 300\nmax_requests_per_connection = 2",
        "",
        &target,
    ));
    let addr = relay.url("").trim_start_matches("http://").to_owned();
    // Idle after its answer: closed at about 300 ms.
    let mut io = open(&addr, None).await.expect("connect");
    let first = ask(&mut io, &url_check_request()).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        !first.to_ascii_lowercase().contains("connection: close"),
        "{first}"
    );
    assert!(
        closed_within(&mut io, Duration::from_secs(2)).await,
        "idle timeout"
    );

    // The second request is the last: its answer says so and the connection ends.
    let mut io = open(&addr, None).await.expect("connect");
    ask(&mut io, &url_check_request()).await;
    let second = ask(&mut io, &url_check_request()).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );
    assert!(closed_within(&mut io, Duration::from_millis(100)).await);
}

#[tokio::test]
async fn outsiders_are_closed_at_accept_and_forwarded_for_counts_only_from_a_trusted_proxy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = FakeTarget::start().await;
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";

    // 127.0.0.1 is not allowed; what it claims in X-Forwarded-For is not believed.
    let relay = Binary::start(&write_config(
        dir.path(),
        "allow_ips = [\"203.0.113.0/24\", \"2001:db8::/32\"]",
        admin,
        &target,
    ));
    let admin_at = relay.admin_addr();
    let addr = relay.url("").trim_start_matches("http://").to_owned();
    let (query, body) = PushBuilder::new(text_xml("from outside", 1)).plaintext();
    let push = format!(
        "POST /wechat?{query} HTTP/1.1\r\nhost: relay\r\nx-forwarded-for: 203.0.113.9\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut io = open(&addr, None).await.expect("connect");
    let answer = exchange(&mut io, &push, Duration::from_secs(2)).await;
    assert_eq!(answer, "", "closed before any HTTP");
    target.expect_none(Duration::from_millis(200)).await;
    let metrics = get(&format!("http://{admin_at}/metrics")).await.text();
    assert_eq!(
        metric(
            &metrics,
            "wechat_relay_connections_refused_total",
            &[("reason", "allow_ips")]
        ),
        Some(1.0),
        "{metrics}"
    );
    drop(relay);

    // Behind a trusted proxy (127.0.0.1) the allow-list applies to the client it names.
    let relay = Binary::start(&write_config(
        dir.path(),
        "allow_ips = [\"203.0.113.0/24\"]\ntrusted_proxies = [\"127.0.0.1\"]",
        "",
        &target,
    ));
    let send_as = |client: Option<&str>| {
        let (query, body) = PushBuilder::new(text_xml("via the proxy", 2)).plaintext();
        let url = relay.url(&format!("/wechat?{query}"));
        let headers: Vec<(&str, String)> = client
            .map(|c| vec![("x-forwarded-for", c.to_owned())])
            .unwrap_or_default();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            send("POST", &url, &headers, body).await
        }
    };
    let refused = send_as(Some("198.51.100.1")).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(refused.text().contains("allow_ips"), "{}", refused.text());
    // The proxy itself is not an allowed client.
    assert_eq!(send_as(None).await.status, 403);
    // A forged entry to the left of the one the proxy added does not help.
    assert_eq!(send_as(Some("203.0.113.9, 198.51.100.1")).await.status, 403);
    target.expect_none(Duration::from_millis(200)).await;
    let allowed = send_as(Some("198.51.100.1, 203.0.113.9")).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    let got = target.next().await;
    assert_eq!(
        got.header("x-forwarded-for"),
        Some("198.51.100.1, 203.0.113.9, 127.0.0.1")
    );
}

#[tokio::test]
async fn admin_connections_past_their_cap_do_not_stop_pushes() {
    // 256 descriptors: without the admin cap, 300 held admin connections would leave none for
    // the WeChat listener.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = FakeTarget::start().await;
    let path = write_config(
        dir.path(),
        "",
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &target,
    );
    let relay = Binary::start_under_ulimit(&path, "-n 256");
    let admin_at = relay.admin_addr();
    let mut held = Vec::new();
    for _ in 0..300 {
        let Ok(mut io) = open(&admin_at, None).await else {
            continue;
        };
        let _ = io
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n")
            .await;
        held.push(io);
    }
    for i in 0..5 {
        let (query, body) = PushBuilder::new(text_xml(&format!("push {i}"), i)).plaintext();
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            post(&relay.url(&format!("/wechat?{query}")), body),
        )
        .await
        .expect("answered in time");
        assert_eq!(answer.status, 200);
        target.next().await;
    }
    // The newest admin client is served too (the idlest made room for it).
    let health = tokio::time::timeout(
        Duration::from_secs(2),
        get(&format!("http://{admin_at}/healthz")),
    )
    .await
    .expect("admin answers");
    assert_eq!(health.status, 200);
    drop(held);
}

/// The soft and hard "Max open files" of a process, from /proc.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

#[tokio::test]
async fn a_low_soft_descriptor_limit_is_raised_and_a_low_hard_one_lowers_max_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = FakeTarget::start().await;
    let path = write_config(dir.path(), "", "", &target);

    // Soft 200 under a higher hard limit: raised to the hard limit.
    let relay = Binary::start_under_ulimit(&path, "-Sn 200");
    let (soft, hard) = open_files_limits(relay.pid());
    assert_eq!(soft, hard, "soft limit raised to the hard one");
    assert_ne!(soft, "200");
    drop(relay);

    // Hard 200: max_connections = 1024 cannot fit; one warn line with the numbers.
    let mut relay = Binary::start_under_ulimit(&path, "-n 200");
    let (_, lines) = relay.terminate();
    let warning = lines
        .iter()
        .find(|l| l.contains("server.max_connections: 1024 needs about"))
        .unwrap_or_else(|| panic!("warning in {lines:?}"));
    assert!(warning.contains("the limit is 200"), "{warning}");
    assert!(warning.contains("WARN"), "{warning}");

    // check says the same, with the shell's limits.
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 200 && exec \"$0\" --config \"$1\" check")
        .arg(env!("CARGO_BIN_EXE_wechat-relay"))
        .arg(&path)
        .output()
        .expect("check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: server.max_connections: 1024 needs about"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_tls_handshake_counts_against_the_first_requests_header_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = self_signed(dir.path());
    let target = FakeTarget::start().await;
    let path = write_config(
        dir.path(),
        "",
        "[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
        &target,
    );
    let relay = Binary::start(&path);
    let addr = relay.url("").trim_start_matches("http://").to_owned();
    // Connect, wait 6 s, then shake hands and send nothing: the 10 s header time started at the
    // accept, so the connection ends about 4 s after the handshake (not 10 s after it).
    let accepted = tokio::time::Instant::now();
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut tls = handshake(tcp, &root).await.expect("handshake in time");
    assert!(
        closed_within(&mut tls, Duration::from_millis(5500)).await,
        "still open {:?} after the accept",
        accepted.elapsed()
    );
}

/// A TLS handshake on `tcp`, trusting `root`.
async fn handshake(tcp: TcpStream, root: &[u8]) -> std::io::Result<Box<dyn Io>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(root.to_vec()))
        .map_err(std::io::Error::other)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name =
        rustls_pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    Ok(Box::new(tls))
}

#[tokio::test]
async fn bodies_trickled_under_a_captured_signature_do_not_hold_the_slots() {
    // A captured query signs any body for timestamp_skew_s: 8 connections trickle one byte of
    // their bodies every 200 ms, holding all 8 slots for up to the reply deadline each.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = FakeTarget::start().await;
    let relay = Binary::start(&write_config(
        dir.path(),
        "max_connections = 8\nreply_deadline_ms = 4500",
        "",
        &target,
    ));
    let addr = relay.url("").trim_start_matches("http://").to_owned();
    let (captured, _) = PushBuilder::new(text_xml("captured", 1)).plaintext();
    let mut tricklers = Vec::new();
    for _ in 0..8 {
        let (addr, captured) = (addr.clone(), captured.clone());
        tricklers.push(tokio::spawn(async move {
            let Ok(mut io) = open(&addr, None).await else {
                return;
            };
            let head = format!(
                "POST /wechat?{captured} HTTP/1.1\r\nhost: relay\r\ncontent-length: 1000\r\n\r\n"
            );
            if io.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for _ in 0..1000 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if io.write_all(b" ").await.is_err() {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (query, body) = PushBuilder::new(text_xml("genuine", 2)).plaintext();
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        post(&relay.url(&format!("/wechat?{query}")), body),
    )
    .await
    .expect("answered within 1 s");
    assert_eq!(answer.status, 200);
    assert!(String::from_utf8_lossy(&target.next().await.body).contains("genuine"));
    for trickler in tricklers {
        trickler.abort();
    }
}
