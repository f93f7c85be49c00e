//! The connection-slot benchmark: an attacker holds every connection slot of a running relay,
//! and a genuine push still has to get through. `bench/hold.sh` starts the release binary and
//! runs this against it.
//!
//!     hold --config relay.toml --url http://127.0.0.1:18480/wechat \
//!          [--pingers 1024] [--silent 1024] [--pushes 20]
//!
//! First `--pingers` keep-alive connections that each send `GET /x` every 8 s (reconnecting
//! when the relay closes them), then `--silent` TCP connections that send nothing; then
//! `--pushes` genuine pushes, one at a time, each on a new connection, signed (and encrypted
//! for a safe or compatible account) with the first account of `--config`. Prints each push's
//! latency (connect to answer) and the p50 and max.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wechat_relay::config::{Config, Mode};
use wechat_relay::wechat::sender::{PushContent, Sender, Stamp, message_xml};

struct Options {
    config: String,
    url: String,
    pingers: usize,
    silent: usize,
    pushes: usize,
}

fn options() -> Options {
    let mut options = Options {
        config: "relay.toml".into(),
        url: "http://127.0.0.1:8080/wechat".into(),
        pingers: 1024,
        silent: 1024,
        pushes: 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--config" => options.config = value(),
            "--url" => options.url = value(),
            "--pingers" => options.pingers = value().parse().expect("--pingers N"),
            "--silent" => options.silent = value().parse().expect("--silent N"),
            "--pushes" => options.pushes = value().parse().expect("--pushes N"),
            other => panic!("unknown option {other}"),
        }
    }
    options
}

/// An attacker's keep-alive connection: `GET /x` every 8 s, for ever.
async fn pinger(addr: String) {
    loop {
        let Ok(mut stream) = TcpStream::connect(&addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            if stream
                .write_all(b"GET /x HTTP/1.1\r\nhost: relay\r\n\r\n")
                .await
                .is_err()
            {
                break;
            }
            let mut buf = [0u8; 1024];
            match tokio::time::timeout(Duration::from_secs(8), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => tokio::time::sleep(Duration::from_secs(8)).await,
            }
        }
    }
}

/// One genuine push on a new connection: the time from connect to the end of the answer's
/// headers, and the status line.
async fn push(addr: &str, path: &str, query: &str, body: &str) -> (Duration, String) {
    let started = Instant::now();
    let request = format!(
        "POST {path}?{query} HTTP/1.1\r\nhost: relay\r\ncontent-type: text/xml\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        Some(text.lines().next().unwrap_or_default().to_owned())
    };
    let status = tokio::time::timeout(Duration::from_secs(15), answer)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "no answer within 15 s".to_owned());
    (started.elapsed(), status)
}

#[tokio::main]
async fn main() {
    let options = options();
    // Two sockets per pinger at worst, one per silent connection.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let config = Config::load(std::path::Path::new(&options.config)).unwrap_or_else(|e| {
        panic!("{}: {e}", options.config);
    });
    let account = config.accounts.first().expect("an [[account]]");
    let sender = Sender {
        token: account.token.clone(),
        app_id: account.app_id.clone(),
        key: account.keys.first().cloned(),
    };
    let rest = options
        .url
        .strip_prefix("http://")
        .expect("--url http://host:port/path");
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (addr, path) = (addr.to_owned(), if path.is_empty() { "/" } else { path });

    let pingers: Vec<_> = (0..options.pingers)
        .map(|_| tokio::spawn(pinger(addr.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut silent = Vec::with_capacity(options.silent);
    for _ in 0..options.silent {
        match TcpStream::connect(&addr).await {
            Ok(stream) => silent.push(stream),
            Err(e) => {
                eprintln!("silent connection {}: {e}", silent.len());
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "holding: {} pingers (GET /x every 8 s), {} silent connections",
        options.pingers,
        silent.len()
    );

    let mut latencies = Vec::with_capacity(options.pushes);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for i in 0..options.pushes {
        let xml = message_xml(
            "gh_0123456789ab",
            "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
            now,
            &PushContent::Text {
                content: "genuine",
                msg_id: 7_000_000 + i as u64,
            },
        );
        let (timestamp, nonce) = (now.to_string(), format!("{i}"));
        let stamp = Stamp {
            timestamp: &timestamp,
            nonce: &nonce,
            openid: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
        };
        let outgoing = if account.mode == Mode::Plaintext {
            sender.plaintext(&xml, &stamp)
        } else {
            let random: [u8; 16] = std::array::from_fn(|b| (i + b) as u8);
            sender
                .encrypted(&xml, "gh_0123456789ab", None, &stamp, &random)
                .expect("the account has a key")
        };
        let (took, status) = push(&addr, path, &outgoing.query, &outgoing.body).await;
        println!(
            "push {i}: {status} in {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
        latencies.push(took);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if let (Some(p50), Some(max)) = (latencies.get(latencies.len() / 2), latencies.last()) {
        println!(
            "genuine push latency with every slot held: p50 {:.1} ms, max {:.1} ms ({} pushes)",
            ms(*p50),
            ms(*max),
            latencies.len()
        );
    }
    for pinger in pingers {
        pinger.abort();
    }
}
