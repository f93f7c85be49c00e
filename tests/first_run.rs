//! The first run, with nothing but the binary: `init` writes a Mode 2 config that `check`
//! accepts, `serve` runs it, `simulate` sends a push that arrives at `sink` (a local target),
//! and the sink's reply comes back sealed through the relay.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::{Binary, cli};

const APP_ID: &str = "wx0123456789abcdef";
const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

/// `wechat-relay sink` on a free port: the child, its address, its stdout lines.
struct Sink {
    child: Child,
    addr: String,
    lines: Receiver<String>,
}

impl Sink {
    fn start(args: &[&str]) -> Sink {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wechat-relay"))
            .args(["sink", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the sink");
        let lines = common::lines_of(child.stdout.take().expect("stdout"));
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the sink's first line");
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("the address in the sink's first line")
            .to_owned();
        Sink { child, addr, lines }
    }

    /// The lines of the next request it printed, up to its "--- answered" line.
    fn next_request(&self) -> Vec<String> {
        let mut request = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("a request at the sink");
            let done = line.starts_with("--- answered");
            request.push(line);
            if done {
                return request;
            }
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn init(config: &std::path::Path, token: &str, business: &str) -> (Option<i32>, String, String) {
    let config = config.to_str().expect("utf-8 path");
    cli(&[
        "init",
        "--config",
        config,
        "--app-id",
        APP_ID,
        "--token",
        token,
        "--encoding-aes-key",
        KEY,
        "--identity-url",
        "http://127.0.0.1:9/events",
        "--business-url",
        business,
    ])
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn init_writes_a_mode_2_config_that_serves_a_push_to_the_sink_and_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::start(&["--reply", "hello from the sink"]);
    let config = dir.path().join("relay.toml");
    let (code, out, err) = init(
        &config,
        "Tok3nFromMpAdmin",
        &format!("http://{}/wechat", sink.addr),
    );
    assert_eq!(code, Some(0), "{err}");
    for next in ["check --config", "serve --config", "simulate --config"] {
        assert!(out.contains(next), "the next commands: {out}");
    }
    let secret = dir.path().join("business.secret");
    #[cfg(unix)]
    {
        assert_eq!(mode(&config), 0o600);
        assert_eq!(mode(&secret), 0o600);
    }
    let secret_text = std::fs::read_to_string(&secret).expect("secret");
    assert!(
        secret_text.trim().starts_with("whsec_"),
        "a Standard Webhooks secret"
    );
    let (code, out, err) = cli(&["check", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("route qr-login: when msg_type=event event=subscribe|SCAN ticket=true -> identity (reply from identity)"), "{out}");
    assert!(
        out.contains("route everything-else: when anything -> business (reply from business)"),
        "{out}"
    );
    assert!(!out.contains(secret_text.trim()) && !err.contains(secret_text.trim()));

    let relay = Binary::start_with_env(&config, &[("WECHAT_RELAY_SERVER__LISTEN", "127.0.0.1:0")]);
    let (code, out, err) = cli(&[
        "simulate",
        "--config",
        config.to_str().expect("utf-8"),
        "--text",
        "hello relay",
        "--url",
        &relay.url("/wechat"),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("hello from the sink"),
        "the sink's reply, opened: {out}"
    );
    let request = sink.next_request().join("\n");
    assert!(request.starts_with("--- POST /wechat?"), "{request}");
    assert!(
        request.contains("webhook-signature: v1,"),
        "signed: {request}"
    );
    assert!(
        request.contains("<![CDATA[hello relay]]>"),
        "the message: {request}"
    );
    assert!(request.contains("--- answered the text reply"), "{request}");
}

#[test]
fn init_never_overwrites_and_bad_values_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("relay.toml");
    let (code, _, err) = init(&config, "x-y", "http://127.0.0.1:9/");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("account \"main\".token"), "{err}");
    assert!(!config.exists() && !dir.path().join("business.secret").exists());

    std::fs::write(&config, "# mine\n").expect("write");
    let (code, _, err) = init(&config, "Tok3nFromMpAdmin", "http://127.0.0.1:9/");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("never overwrites"), "{err}");
    assert_eq!(std::fs::read_to_string(&config).expect("read"), "# mine\n");
    assert!(!dir.path().join("business.secret").exists());
}
