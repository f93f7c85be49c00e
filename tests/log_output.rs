//! The log's output, through the real binary: a line is out while the relay runs (not held
//! until a buffer fills), the last lines before an exit are all there (SIGTERM, and the error
//! path of `serve`), in both formats; and a stderr nobody reads makes the relay drop and count
//! lines, not stop answering, with one line saying how many once stderr moves again.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// A plaintext account routing everything to `target_url`, logging in `format` (with
/// `extra` in `[log]`), and `more` appended.
fn config(
    dir: &tempfile::TempDir,
    target_url: &str,
    format: &str,
    extra: &str,
    more: &str,
) -> std::path::PathBuf {
    let mut toml = server_section(2000, 300);
    toml.push_str(&format!("[log]\nformat = \"{format}\"\n{extra}\n"));
    toml.push_str(more);
    toml.push_str(&account_section("main", "/wechat", "plaintext"));
    toml.push_str(&target_section("t", target_url, "plain", ""));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("write relay.toml");
    path
}

/// The `event_id` a push line carries, in text (`event_id=...`) or JSON (`"event_id":"..."`).
fn event_id(line: &str) -> Option<&str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("event_id="))
        .or_else(|| line.split("\"event_id\":\"").nth(1)?.split('"').next())
}

async fn lines_out_while_running_and_at_exit(format: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = FakeTarget::start().await;
    let mut relay = Binary::start(&config(&dir, &target.url("/"), format, "", ""));
    for i in 0..5u64 {
        let (query, body) = PushBuilder::new(text_xml("hello", 1000 + i)).plaintext();
        assert_success(&post(&relay.url(&format!("/wechat?{query}")), body).await);
        // The relay is idle after each push: its line must come out without more lines
        // behind it and without an exit.
        let line = relay.wait_for("push");
        assert!(event_id(&line).is_some(), "a push line: {line}");
    }
    relay.signal("TERM");
    // The last line of a shutdown, written while the process exits.
    let last = relay.wait_for("stopped");
    let (status, _) = relay.wait_exit();
    assert!(status.success(), "{status:?}");
    if format == "json" {
        assert!(last.starts_with('{') && last.ends_with('}'), "{last}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_are_out_while_running_and_at_exit() {
    lines_out_while_running_and_at_exit("text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_are_out_while_running_and_at_exit() {
    lines_out_while_running_and_at_exit("json").await;
}

#[test]
fn the_error_line_of_a_failed_start_is_written_before_the_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The port is taken: `serve` opens the store, fails to bind, logs and exits 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    for format in ["text", "json"] {
        let path = config(&dir, "http://127.0.0.1:9/", format, "", "");
        let toml = std::fs::read_to_string(&path)
            .expect("read")
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
        std::fs::write(&path, toml).expect("write");
        let (code, _, stderr) = cli(&["serve", "--config", path.to_str().expect("utf-8")]);
        assert_eq!(code, Some(1), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.contains("cannot start") && last.contains("cannot listen on"),
            "{format}: the last line is the error: {stderr}"
        );
    }
}

/// The relay process, killed when the test ends (also when it fails).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `[log] content = true` with a long text: each push line is about 8 KiB, so a few hundred
/// fill stderr's pipe and the relay's buffer.
const CONTENT: usize = 8 * 1024;
const PUSHES: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_drops_and_counts_lines_and_the_relay_keeps_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = FakeTarget::start().await;
    let path = config(
        &dir,
        &target.url("/"),
        "text",
        "content = true",
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let child = Command::new(env!("CARGO_BIN_EXE_wechat-relay"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env_remove("WECHAT_RELAY_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wechat-relay");
    let mut child = KillOnDrop(child);
    let stderr = child.0.stderr.take().expect("stderr");
    // Reads the startup lines, then reads nothing until `resume` says so: the pipe fills.
    let (lines_tx, lines) = mpsc::channel::<String>();
    let (resume, resumed) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut started = 0;
        let mut line = String::new();
        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            if line.contains("listening") {
                started += 1;
            }
            let _ = lines_tx.send(std::mem::take(&mut line));
            if started == 2 {
                started += 1;
                let _ = resumed.recv();
            }
        }
    });
    let mut startup = Vec::new();
    while startup
        .iter()
        .filter(|l: &&String| l.contains("listening"))
        .count()
        < 2
    {
        startup.push(
            lines
                .recv_timeout(Duration::from_secs(10))
                .expect("the startup lines"),
        );
    }
    let find = |prefix: &str| {
        startup
            .iter()
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(prefix).map(str::to_owned))
            })
            .expect("an address in the startup lines")
    };
    let (listen, admin) = (find("listen="), find("admin="));

    let content = "x".repeat(CONTENT);
    for i in 0..PUSHES {
        let (query, body) = PushBuilder::new(text_xml(&content, i as u64)).plaintext();
        // `post` fails the test if the relay does not answer within 30 s.
        assert_success(&post(&format!("http://{listen}/wechat?{query}"), body).await);
    }
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    let dropped = metric(&metrics, "wechat_relay_log_lines_dropped_total", &[])
        .expect("the dropped-lines counter");
    assert!(dropped > 0.0, "lines were dropped: {dropped}");

    // stderr moves again: what was buffered comes out, then the count of what was not.
    let _ = resume.send(());
    let mut pushes = 0;
    let report = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a line saying how many were dropped");
        if line.contains(" push ") {
            pushes += 1;
        }
        if line.contains("log lines dropped") {
            break line;
        }
    };
    let reported: f64 = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dropped="))
        .and_then(|n| n.parse().ok())
        .expect("dropped=N");
    assert_eq!(reported, dropped, "the line and the metric agree: {report}");
    assert_eq!(
        pushes as f64 + dropped,
        PUSHES as f64,
        "every push line is written or counted"
    );
}
