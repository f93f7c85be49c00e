//! The load benchmark: pushes per second the relay acknowledges, and their latency.
//!
//! Starts a fake target and the relay (the library's server, as `serve` runs it) on 127.0.0.1,
//! then sends `--pushes` distinct pushes from `--concurrency` keep-alive connections, each built
//! as WeChat builds it (signed, and encrypted in safe mode). Every push is routed to the target
//! and must arrive there.
//!
//!     cargo run --release --example load -- --pushes 20000 --concurrency 64 --mode safe
//!
//! Options: `--mode safe|plaintext`, `--reply` (the route waits for the target's reply, which
//! the relay seals for WeChat), `--format raw|plain|json`, `--store sqlite|memory` (sqlite,
//! the default, is the durable path: every acknowledged push was fsynced first; memory is the
//! same path with the store off), `--target-down` (the target's port refuses connections:
//! every push stays pending, which measures the outbox with a growing backlog), `--max-bytes N`
//! (`[store] max_bytes`, for a backlog larger than the default budget), `--binary PATH` (run
//! the relay as its own process, `PATH serve`, with the binary's runtime and allocator, its
//! stderr read by a thread; prints the process's peak RSS).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use wechat_relay::config::Config;
use wechat_relay::wechat::crypto::AesKey;
use wechat_relay::wechat::sender::{Sender, Stamp};

const TOKEN: &str = "loadToken2024";
/// Pushes per line of the running rate.
const CHUNK: usize = 10_000;
const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const APP_ID: &str = "wx0123456789abcdef";
const REPLY: &str = "<xml><ToUserName><![CDATA[o]]></ToUserName><FromUserName><![CDATA[gh]]></FromUserName>\
    <CreateTime>1</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[ok]]></Content></xml>";

struct Options {
    pushes: usize,
    concurrency: usize,
    mode: String,
    format: String,
    reply: bool,
    store: String,
    target_down: bool,
    max_bytes: Option<u64>,
    binary: Option<String>,
}

fn options() -> Options {
    let mut options = Options {
        pushes: 20_000,
        concurrency: 64,
        mode: "safe".into(),
        format: "plain".into(),
        reply: false,
        store: "sqlite".into(),
        target_down: false,
        max_bytes: None,
        binary: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--pushes" => options.pushes = value().parse().expect("--pushes N"),
            "--concurrency" => options.concurrency = value().parse().expect("--concurrency N"),
            "--mode" => options.mode = value(),
            "--format" => options.format = value(),
            "--reply" => options.reply = true,
            "--store" => options.store = value(),
            "--target-down" => options.target_down = true,
            "--max-bytes" => options.max_bytes = Some(value().parse().expect("--max-bytes N")),
            "--binary" => options.binary = Some(value()),
            // `cargo bench` passes --bench; anything else is a mistake.
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    options
}

/// A target that counts what it gets and answers a text reply.
async fn start_target(received: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let received = Arc::clone(&received);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let received = Arc::clone(&received);
                        async move {
                            let _ = req.into_body().collect().await;
                            received.fetch_add(1, Ordering::Relaxed);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                REPLY.as_bytes(),
                            ))))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Stops the relay; what a relay process used.
type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Used>>>>;

/// A relay process's peak RSS (KiB) and the CPU time (user + system) it spent from listening
/// to the end of the load.
struct Used {
    peak_kib: u64,
    cpu: Duration,
}

/// The CPU time (user + system) process `pid` has used, from /proc.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    Some(Duration::from_secs_f64(
        ticks as f64 / per_second.max(1) as f64,
    ))
}

/// The library's server in this process, as `serve` runs it.
async fn start_in_process(path: &std::path::Path) -> (std::net::SocketAddr, Stop) {
    let config = Config::load_with_env(path, &[]).expect("config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let relay = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let forwarder = wechat_relay::forward::Forwarder::new();
    let outbox = wechat_relay::outbox::Outbox::start(&config, forwarder.clone())
        .await
        .expect("store");
    let server = tokio::spawn(wechat_relay::server::run(
        config,
        outbox,
        forwarder,
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let stop = Box::pin(async move {
        let _ = stop.send(());
        let _ = server.await;
        None
    });
    (relay, stop)
}

/// `binary serve --config path` as its own process: its address from the listening line, its
/// stderr read (and dropped) by a thread, as journald would take it.
fn start_binary(binary: &str, path: &std::path::Path) -> (std::net::SocketAddr, Stop) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(binary)
        .args(["serve", "--config"])
        .arg(path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the relay binary");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    let relay = loop {
        line.clear();
        let n = stderr.read_line(&mut line).expect("the relay's stderr");
        assert!(n > 0, "the relay exited before listening");
        if let Some(addr) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
        {
            break addr.parse().expect("listen=ADDR");
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let cpu_at_start = cpu_time(child.id()).unwrap_or_default();
    let stop = Box::pin(async move {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
        let peak_kib = status.ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        });
        let cpu = cpu_time(child.id()).map(|t| t.saturating_sub(cpu_at_start));
        let used = peak_kib
            .zip(cpu)
            .map(|(peak_kib, cpu)| Used { peak_kib, cpu });
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        used
    });
    (relay, stop)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() {
    // Log as `serve` does (one info line per push), so the figures include that cost.
    let _flush = wechat_relay::telemetry::init();
    let options = options();
    let received = Arc::new(AtomicUsize::new(0));
    let target = if options.target_down {
        // Bound and dropped: nobody listens there now.
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
    } else {
        start_target(Arc::clone(&received)).await
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let key_line = if options.mode == "plaintext" {
        String::new()
    } else {
        format!("encoding_aes_key = \"{KEY}\"\n")
    };
    let reply = if options.reply { "reply = \"t\"\n" } else { "" };
    let secret = if options.format == "json" {
        "secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
    } else {
        ""
    };
    let budget = options
        .max_bytes
        .map_or(String::new(), |n| format!("max_bytes = {n}\n"));
    let store = match options.store.as_str() {
        "sqlite" => format!("[store]\npath = \"data\"\n{budget}"),
        "memory" => format!("[store]\n{budget}"),
        other => panic!("--store sqlite|memory, not {other}"),
    };
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{store}\
         [[account]]\nname = \"main\"\npath = \"/wechat\"\napp_id = \"{APP_ID}\"\ntoken = \"{TOKEN}\"\n{key_line}mode = \"{}\"\n\
         [[target]]\nname = \"t\"\nurl = \"http://{target}/hook\"\nformat = \"{}\"\nconcurrency = 64\n{secret}\
         [[route]]\nto = [\"t\"]\n{reply}",
        options.mode, options.format
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("write config");
    let (relay, stop) = match &options.binary {
        Some(binary) => start_binary(binary, &path),
        None => start_in_process(&path).await,
    };

    // Build every push before the clock starts.
    let sender = Sender {
        token: TOKEN.into(),
        app_id: APP_ID.into(),
        key: AesKey::from_encoding_aes_key(KEY).ok(),
    };
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string();
    let pushes: Vec<(String, Bytes)> = (0..options.pushes)
        .map(|i| {
            let xml = format!(
                "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName><FromUserName><![CDATA[oLoad{i}]]></FromUserName>\
                 <CreateTime>{timestamp}</CreateTime><MsgType><![CDATA[text]]></MsgType>\
                 <Content><![CDATA[load test message number {i}]]></Content><MsgId>{i}</MsgId></xml>"
            );
            let nonce = i.to_string();
            let stamp = Stamp { timestamp: &timestamp, nonce: &nonce, openid: "oLoad" };
            let push = if options.mode == "plaintext" {
                sender.plaintext(&xml, &stamp)
            } else {
                sender.encrypted(&xml, "gh_0123456789ab", None, &stamp, &[7; 16]).expect("key")
            };
            (format!("http://{relay}/wechat?{}", push.query), Bytes::from(push.body))
        })
        .collect();
    let pushes = Arc::new(pushes);
    let next = Arc::new(AtomicUsize::new(0));

    let started = Instant::now();
    // Every 10,000 acknowledged pushes: how fast those were taken (a rate that falls as the
    // backlog grows is a scan somewhere).
    let acked = Arc::new(AtomicUsize::new(0));
    let chunks = {
        let acked = Arc::clone(&acked);
        let total = options.pushes;
        tokio::spawn(async move {
            let (mut mark, mut at) = (0usize, Instant::now());
            while mark + CHUNK <= total {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if acked.load(Ordering::Relaxed) >= mark + CHUNK {
                    let rate = CHUNK as f64 / at.elapsed().as_secs_f64();
                    println!("pushes {}..{}: {rate:.0} pushes/s", mark, mark + CHUNK);
                    (mark, at) = (mark + CHUNK, Instant::now());
                }
            }
        })
    };
    let mut workers = Vec::new();
    for _ in 0..options.concurrency {
        let pushes = Arc::clone(&pushes);
        let next = Arc::clone(&next);
        let acked = Arc::clone(&acked);
        workers.push(tokio::spawn(async move {
            let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build(HttpConnector::new());
            let mut latencies = Vec::new();
            let mut failed = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((url, body)) = pushes.get(i) else {
                    break;
                };
                let request = Request::post(url.as_str())
                    .header("content-type", "text/xml")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let sent = Instant::now();
                match client.request(request).await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.into_body().collect().await;
                        latencies.push(sent.elapsed());
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => failed += 1,
                }
            }
            (latencies, failed)
        }));
    }
    let mut latencies = Vec::with_capacity(options.pushes);
    let mut failed = 0;
    for worker in workers {
        let (l, f) = worker.await.expect("worker");
        latencies.extend(l);
        failed += f;
    }
    let acknowledged_in = started.elapsed();
    chunks.abort();
    let deadline = Instant::now() + Duration::from_secs(if options.target_down { 0 } else { 30 });
    while received.load(Ordering::Relaxed) < latencies.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivered_in = started.elapsed();
    let used = stop.await;

    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "mode={} format={} reply={} store={} target_down={} pushes={} concurrency={}",
        options.mode,
        options.format,
        options.reply,
        options.store,
        options.target_down,
        options.pushes,
        options.concurrency
    );
    println!(
        "acknowledged {} (failed {failed}) in {:.2} s: {:.0} pushes/s",
        latencies.len(),
        acknowledged_in.as_secs_f64(),
        latencies.len() as f64 / acknowledged_in.as_secs_f64()
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.90)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied().unwrap_or_default())
    );
    println!(
        "delivered to the target: {} in {:.2} s",
        received.load(Ordering::Relaxed),
        delivered_in.as_secs_f64()
    );
    if let Some(used) = used {
        println!(
            "relay process: peak RSS {:.1} MiB, CPU {:.2} s ({:.1} us a push)",
            used.peak_kib as f64 / 1024.0,
            used.cpu.as_secs_f64(),
            used.cpu.as_secs_f64() * 1e6 / latencies.len().max(1) as f64
        );
    }
    let undelivered = !options.target_down && received.load(Ordering::Relaxed) < latencies.len();
    if failed > 0 || undelivered {
        std::process::exit(1);
    }
}
