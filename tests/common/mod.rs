//! Shared test kit: the relay on 127.0.0.1:0, fake targets on :0 that record what they get,
//! a small HTTP client, and signed / encrypted push builders.
#![allow(dead_code)]

pub mod postgres;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use wechat_relay::config::Config;
use wechat_relay::wechat::crypto::AesKey;
use wechat_relay::wechat::sender::{Outgoing, PushContent, Sender, Stamp, message_xml};

pub const TOKEN: &str = "relayToken2024";
pub const KEY: &str = "RelayVectorsEncodingAESKey0123456789abcdefZ";
pub const APP_ID: &str = "wxa1b2c3d4e5f60789";
pub const GH: &str = "gh_0123456789ab";
pub const OPENID: &str = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o";

// ---- the relay -----------------------------------------------------------------------------

pub struct TestRelay {
    pub addr: SocketAddr,
    /// The relay.toml it was started on (for `outbox` commands).
    pub config: std::path::PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestRelay {
    /// Writes `toml` to a temporary relay.toml, loads it like `serve` does and starts the server
    /// on 127.0.0.1:0.
    pub async fn start(toml: &str) -> TestRelay {
        Self::start_with(toml, None).await
    }

    /// [`TestRelay::start`] on a given store instead of the one the config names.
    pub async fn start_with(
        toml: &str,
        store: Option<Arc<dyn wechat_relay::outbox::store::Store>>,
    ) -> TestRelay {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, toml).expect("write config");
        let config = Config::load_with_env(&path, &[]).expect("valid test config");
        let forwarder = wechat_relay::forward::Forwarder::new();
        let outbox = match store {
            Some(store) => {
                wechat_relay::outbox::Outbox::with_store(&config, store, forwarder.clone())
            }
            None => wechat_relay::outbox::Outbox::start(&config, forwarder.clone())
                .await
                .expect("store opens"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(wechat_relay::server::run(
            config,
            outbox,
            forwarder,
            listener,
            async {
                let _ = rx.await;
            },
        ));
        TestRelay {
            addr,
            config: path,
            shutdown: Some(tx),
            done: Some(done),
            _dir: dir,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// Stops accepting, drains, and waits for the server to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(20), done)
                .await
                .expect("server stops in time")
                .expect("server task");
        }
    }
}

/// `[server]` for tests: a short deadline, timestamp check as given.
pub fn server_section(reply_deadline_ms: u64, timestamp_skew_s: u64) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nreply_deadline_ms = {reply_deadline_ms}\n\
         timestamp_skew_s = {timestamp_skew_s}\nshutdown_grace_ms = 2000\n"
    )
}

/// An `[[account]]` with the test token, key and app id.
pub fn account_section(name: &str, path: &str, mode: &str) -> String {
    let key = if mode == "plaintext" {
        String::new()
    } else {
        format!("encoding_aes_key = \"{KEY}\"\n")
    };
    format!(
        "[[account]]\nname = \"{name}\"\npath = \"{path}\"\napp_id = \"{APP_ID}\"\n\
         token = \"{TOKEN}\"\n{key}mode = \"{mode}\"\n"
    )
}

pub fn target_section(name: &str, url: &str, format: &str, extra: &str) -> String {
    format!("[[target]]\nname = \"{name}\"\nurl = \"{url}\"\nformat = \"{format}\"\n{extra}\n")
}

// ---- the binary -----------------------------------------------------------------------

/// The lines a child writes to `stream`, read on a thread of their own as they come.
pub fn lines_of(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
}

pub struct Binary {
    child: Child,
    addr: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    /// Starts `wechat-relay serve` on `config` and waits for its "listening" line.
    pub fn start(config: &std::path::Path) -> Binary {
        Self::start_with_env(config, &[])
    }

    /// [`Binary::start`] with more environment variables (`RUST_LOG` is `info` unless given).
    pub fn start_with_env(config: &std::path::Path, env: &[(&str, &str)]) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wechat-relay"));
        command.args(["serve", "--config"]).arg(config);
        Self::spawn(command, env)
    }

    /// [`Binary::start`] from a shell that first runs `ulimit {limit}` (`-n 256`, `-Sn 200`).
    pub fn start_under_ulimit(config: &std::path::Path, limit: &str) -> Binary {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "ulimit {limit} && exec \"$0\" serve --config \"$1\""
            ))
            .arg(env!("CARGO_BIN_EXE_wechat-relay"))
            .arg(config);
        Self::spawn(command, &[])
    }

    /// Runs `command` (that execs `wechat-relay serve`) and waits for its "listening" line.
    fn spawn(mut command: Command, env: &[(&str, &str)]) -> Binary {
        command
            .env("RUST_LOG", "info")
            .env_remove("WECHAT_RELAY_CONFIG")
            // The kit's, not a config override (the relay reads every WECHAT_RELAY_* as one).
            .env_remove(postgres::SERVER_VARIABLE)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wechat-relay");
        let lines = lines_of(child.stderr.take().expect("stderr"));
        let mut binary = Binary {
            child,
            addr: String::new(),
            lines,
        };
        let line = binary.wait_for("wechat-relay listening");
        // `listen=127.0.0.1:1234` in text, `"listen":"127.0.0.1:1234"` in JSON.
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .map(str::to_owned)
            .or_else(|| {
                let rest = line.split("\"listen\":\"").nth(1)?;
                rest.split('"').next().map(str::to_owned)
            })
            .expect("listen in the startup line");
        binary.addr = addr;
        binary
    }

    pub fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits for a line containing each of `needles`, in any order; returns them in the
    /// order of `needles`.
    pub fn wait_for_all(&self, needles: &[&str]) -> Vec<String> {
        let mut found: Vec<Option<String>> = vec![None; needles.len()];
        while found.iter().any(Option::is_none) {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no log lines containing all of {needles:?}"));
            for (needle, slot) in needles.iter().zip(found.iter_mut()) {
                if slot.is_none() && line.contains(needle) {
                    *slot = Some(line.clone());
                }
            }
        }
        found.into_iter().flatten().collect()
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// SIGTERM, then the exit status and every remaining log line.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = self.child.wait().expect("wait");
        let rest = self.lines.try_iter().collect();
        (exit, rest)
    }
}

impl Binary {
    /// Sends a signal (`HUP`, `TERM`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines that arrived so far and were not read yet.
    pub fn drain_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    /// Waits for the process to exit (after a signal sent with [`Binary::signal`]).
    pub fn wait_exit(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let exit = self.child.wait().expect("wait");
        (exit, self.lines.try_iter().collect())
    }

    /// SIGKILL: no shutdown, no flush; what the store holds is what a crash leaves.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }
}

impl Binary {
    /// The admin listener's address, from its "admin listening" line.
    pub fn admin_addr(&self) -> String {
        let line = self.wait_for("admin listening");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .expect("admin=")
            .to_owned()
    }
}

/// The value of the sample of `name` whose labels include all of `labels`, in Prometheus text.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

impl Drop for Binary {
    /// A failed assertion must not leave the relay running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `wechat-relay <args>` (an `outbox` command, say): exit code, stdout, stderr.
pub fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_wechat-relay"))
        .args(args)
        .env_remove("WECHAT_RELAY_CONFIG")
        .env_remove(postgres::SERVER_VARIABLE)
        .output()
        .expect("run wechat-relay");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

// ---- fake targets --------------------------------------------------------------------------

/// What a fake target received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The status the target answered it with.
    pub answered: StatusCode,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How a fake target answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub status: StatusCode,
    pub body: Bytes,
    pub content_type: &'static str,
    pub delay: Duration,
    /// A `Retry-After` header to send.
    pub retry_after: Option<&'static str>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            status: StatusCode::OK,
            body: Bytes::from_static(b"success"),
            content_type: "text/plain",
            delay: Duration::ZERO,
            retry_after: None,
        }
    }
}

pub struct FakeTarget {
    pub addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    received: mpsc::UnboundedReceiver<Received>,
    /// Requests being answered now, and the most at once so far.
    load: Arc<Mutex<(usize, usize)>>,
}

impl FakeTarget {
    pub async fn start() -> FakeTarget {
        Self::with(Behaviour::default()).await
    }

    pub async fn with(behaviour: Behaviour) -> FakeTarget {
        Self::on("127.0.0.1:0".parse().expect("addr"), behaviour).await
    }

    /// A target on a given address (one that was down until now).
    pub async fn on(addr: SocketAddr, behaviour: Behaviour) -> FakeTarget {
        let listener = TcpListener::bind(addr).await.expect("bind target");
        let addr = listener.local_addr().expect("addr");
        let load = Arc::new(Mutex::new((0usize, 0usize)));
        let counted = Arc::clone(&load);
        let behaviour = Arc::new(Mutex::new(behaviour));
        let (tx, received) = mpsc::unbounded_channel();
        let shared = Arc::clone(&behaviour);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                let shared = Arc::clone(&shared);
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        let shared = Arc::clone(&shared);
                        let counted = Arc::clone(&counted);
                        async move {
                            {
                                let mut load = counted.lock().expect("lock");
                                load.0 += 1;
                                load.1 = load.1.max(load.0);
                            }
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let behaviour = shared.lock().expect("lock").clone();
                            let _ = tx.send(Received {
                                path: parts.uri.path().to_owned(),
                                query: parts.uri.query().map(str::to_owned),
                                headers: parts.headers,
                                body,
                                answered: behaviour.status,
                            });
                            tokio::time::sleep(behaviour.delay).await;
                            let mut response = Response::new(Full::new(behaviour.body));
                            *response.status_mut() = behaviour.status;
                            response.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static(behaviour.content_type),
                            );
                            if let Some(after) = behaviour.retry_after {
                                response.headers_mut().insert(
                                    http::header::RETRY_AFTER,
                                    http::HeaderValue::from_static(after),
                                );
                            }
                            counted.lock().expect("lock").0 -= 1;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeTarget {
            addr,
            behaviour,
            received,
            load,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The most requests this target was answering at once.
    pub fn peak_load(&self) -> usize {
        self.load.lock().expect("lock").1
    }

    /// Changes how it answers from another task (a target that flaps).
    pub fn behaviour(&self) -> Arc<Mutex<Behaviour>> {
        Arc::clone(&self.behaviour)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("lock") = behaviour;
    }

    /// The next request this target receives, within 5 s.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(5), self.received.recv())
            .await
            .expect("the target receives a request within 5 s")
            .expect("target channel open")
    }

    /// Asserts that nothing more arrives within `wait`.
    pub async fn expect_none(&mut self, wait: Duration) {
        if let Ok(Some(got)) = tokio::time::timeout(wait, self.received.recv()).await {
            panic!("unexpected forward: {} {:?}", got.path, got.query);
        }
    }
}

// ---- a client ------------------------------------------------------------------------------

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// WeChat's "acknowledged, no reply": 200 with `success`.
pub fn assert_success(answer: &Answer) {
    assert_eq!(
        (answer.status.as_u16(), answer.text().as_str()),
        (200, "success")
    );
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body.into())).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(30), client().request(request))
        .await
        .expect("the relay answers within 30 s")
        .expect("response");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

pub async fn post(url: &str, body: impl Into<Bytes>) -> Answer {
    send("POST", url, &[("content-type", "text/xml")], body).await
}

pub async fn get(url: &str) -> Answer {
    send("GET", url, &[], Bytes::new()).await
}

// ---- pushes --------------------------------------------------------------------------------

pub fn now() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string()
}

/// The test account as WeChat knows it.
pub fn sender() -> Sender {
    Sender {
        token: TOKEN.into(),
        app_id: APP_ID.into(),
        key: Some(AesKey::from_encoding_aes_key(KEY).expect("key")),
    }
}

/// A plaintext-mode query for `timestamp` and `nonce`.
pub fn plain_query(timestamp: &str, nonce: &str) -> String {
    sender().plain_query(&Stamp {
        timestamp,
        nonce,
        openid: OPENID,
    })
}

/// A push as WeChat sends it: `(query, body)`.
pub struct PushBuilder {
    pub timestamp: String,
    pub nonce: String,
    pub xml: String,
}

impl PushBuilder {
    pub fn new(xml: impl Into<String>) -> Self {
        Self {
            timestamp: now(),
            nonce: "1234567890".into(),
            xml: xml.into(),
        }
    }

    fn stamp(&self) -> Stamp<'_> {
        Stamp {
            timestamp: &self.timestamp,
            nonce: &self.nonce,
            openid: OPENID,
        }
    }

    fn pair(outgoing: Outgoing) -> (String, String) {
        (outgoing.query, outgoing.body)
    }

    pub fn plaintext(&self) -> (String, String) {
        Self::pair(sender().plaintext(&self.xml, &self.stamp()))
    }

    pub fn encrypted_query(&self, encrypt: &str) -> String {
        sender().encrypted_query(encrypt, &self.stamp())
    }

    /// Safe mode: only ToUserName and Encrypt.
    pub fn safe(&self) -> (String, String) {
        Self::pair(
            sender()
                .encrypted(&self.xml, GH, None, &self.stamp(), &[9; 16])
                .expect("key"),
        )
    }

    /// Compatible mode: `plaintext_fields` (the unencrypted copy, which may lie) and Encrypt.
    pub fn compatible(&self, plaintext_fields: &str) -> (String, String) {
        Self::pair(
            sender()
                .encrypted(
                    &self.xml,
                    GH,
                    Some(plaintext_fields),
                    &self.stamp(),
                    &[9; 16],
                )
                .expect("key"),
        )
    }
}

fn create_time() -> u64 {
    now().parse().expect("a number")
}

pub fn text_xml(content: &str, msg_id: u64) -> String {
    message_xml(
        GH,
        OPENID,
        create_time(),
        &PushContent::Text { content, msg_id },
    )
}

pub fn event_xml(event: &str, event_key: &str, ticket: Option<&str>) -> String {
    message_xml(
        GH,
        OPENID,
        create_time(),
        &PushContent::Event {
            event,
            event_key: Some(event_key),
            ticket,
        },
    )
}

/// Opens an encrypted reply from the relay: checks its MsgSignature and returns the message.
pub fn open_reply(body: &str) -> String {
    let xml = sender().open_reply(body.as_bytes()).expect("reply opens");
    String::from_utf8(xml).expect("utf8")
}

/// The vector files copied from the shared folder.
pub fn vectors(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("vector file")).expect("json")
}

// ---- TLS ----------------------------------------------------------------------------------

/// A self-signed certificate for 127.0.0.1, written to `dir/cert.pem` with its key in
/// `dir/key.pem`; returns the certificate's DER (what a client trusts).
pub fn self_signed(dir: &std::path::Path) -> Vec<u8> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).expect("key");
    certified.cert.der().to_vec()
}

/// POSTs over HTTPS, trusting only `root`.
pub async fn post_https(url: &str, body: String, root: &[u8]) -> Result<Answer, String> {
    use http_body_util::{BodyExt, Full};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(root.to_vec()))
        .expect("root");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let request = http::Request::post(url)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.map_err(|e| e.to_string())?.to_bytes(),
    })
}
