//! `wechat-relay check` (and `serve`) against the shipped relay.toml and broken copies of it:
//! the real binary, run as an operator runs it, with its exit code, stdout and stderr.
//!
//! Broken configs are made by editing the text of the shipped file, so that these tests follow
//! it when it changes; each edit asserts that the text it replaces is there exactly once.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_wechat-relay");
/// Exit code of an invalid config (src/main.rs).
const INVALID: i32 = 2;
/// How long a run that should end at once may take before the test calls it hung.
const PATIENCE: Duration = Duration::from_secs(20);

// ---- kit ---------------------------------------------------------------------------------

fn shipped_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.toml")
}

fn shipped() -> String {
    std::fs::read_to_string(shipped_path()).expect("read the shipped relay.toml")
}

/// `text` with `from` (which must occur exactly once) replaced by `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "the shipped relay.toml should contain {from:?} exactly once"
    );
    text.replacen(from, to, 1)
}

/// The quoted value of the first line `key = "value"` (the shipped secrets, read from the file
/// so that the test follows it).
fn value_of(text: &str, key: &str) -> String {
    let prefix = format!("{key} = \"");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("relay.toml has a line {key} = \"...\""))
        .to_owned()
}

/// The binary with no inherited `WECHAT_RELAY_*` variable and no config file in its folder.
fn relay() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("WECHAT_RELAY_") {
            command.env_remove(name);
        }
    }
    command
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null());
    command
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn both(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

fn run(command: &mut Command) -> Run {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wechat-relay");
    finish(child)
}

/// Waits for `child` to exit (killing it and failing after [`PATIENCE`]).
fn finish(mut child: Child) -> Run {
    let started = Instant::now();
    loop {
        if child.try_wait().expect("poll wechat-relay").is_some() {
            break;
        }
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("wechat-relay still running after {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child
        .wait_with_output()
        .expect("collect wechat-relay output");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `wechat-relay --config <path> check`.
fn check(path: &Path) -> Run {
    run(relay().arg("--config").arg(path).arg("check"))
}

/// Writes `text` as `relay.toml` in a fresh folder.
fn write_config(text: &str) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).expect("write relay.toml");
    (dir, path)
}

/// Checks `text` as a config file and returns the run.
fn check_text(text: &str) -> (PathBuf, Run) {
    let (dir, path) = write_config(text);
    let run = check(&path);
    drop(dir);
    (path, run)
}

/// The run refused the config at `path`: exit 2, nothing on stdout, the header line, and each
/// of `expected` as (part of) a problem line on stderr.
fn assert_invalid(run: &Run, path: &Path, expected: &[&str]) {
    assert_eq!(
        run.code,
        Some(INVALID),
        "exit code; stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        !run.stdout.contains("OK"),
        "an invalid config must not be reported OK:\n{}",
        run.stdout
    );
    let header = format!("{}: invalid config:", path.display());
    assert_eq!(
        run.stderr.lines().next(),
        Some(header.as_str()),
        "first stderr line:\n{}",
        run.stderr
    );
    let problems: Vec<&str> = run.stderr.lines().skip(1).map(str::trim).collect();
    for want in expected {
        assert!(
            problems.iter().any(|line| line.starts_with(want)),
            "expected a problem line starting with {want:?}; stderr:\n{}",
            run.stderr
        );
    }
}

/// The shipped file with one edit is refused with `expected`.
fn assert_edit_refused(from: &str, to: &str, expected: &[&str]) {
    let (path, run) = check_text(&edit(&shipped(), from, to));
    assert_invalid(&run, &path, expected);
}

fn assert_ok(run: &Run, path: &Path) {
    assert_eq!(
        run.code,
        Some(0),
        "exit code; stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    let header = format!("{}: OK", path.display());
    assert_eq!(
        run.stdout.lines().next(),
        Some(header.as_str()),
        "first stdout line:\n{}",
        run.stdout
    );
}

fn line_starting<'a>(output: &'a str, prefix: &str) -> &'a str {
    output
        .lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{output}"))
}

// ---- the shipped file --------------------------------------------------------------------

#[test]
fn shipped_config_is_ok_and_prints_accounts_targets_and_routes() {
    let path = shipped_path();
    let run = check(&path);
    assert_ok(&run, &path);

    let server = line_starting(&run.stdout, "server:");
    assert!(server.contains("listen 127.0.0.1:8080"), "{server}");
    assert!(server.contains("reply deadline 4500 ms"), "{server}");

    let account = line_starting(&run.stdout, "account main:");
    for part in ["/wechat", "wx1234567890abcdef", "mode safe"] {
        assert!(account.contains(part), "{part:?} in {account:?}");
    }

    let identity = line_starting(&run.stdout, "target identity:");
    assert!(
        identity.contains("raw http://127.0.0.1:9001/events"),
        "{identity}"
    );
    let shop = line_starting(&run.stdout, "target shop:");
    assert!(
        shop.contains("plain http://127.0.0.1:9000/wechat"),
        "{shop}"
    );
    let crm = line_starting(&run.stdout, "target crm:");
    assert!(
        crm.contains("json http://127.0.0.1:9002/hooks/wechat"),
        "{crm}"
    );

    let qr = line_starting(&run.stdout, "route qr-login:");
    for part in [
        "event=subscribe|SCAN",
        "ticket=true",
        "identity, shop",
        "reply from identity",
    ] {
        assert!(qr.contains(part), "{part:?} in {qr:?}");
    }
    let rest = line_starting(&run.stdout, "route everything-else:");
    for part in ["anything", "shop, crm", "reply from shop"] {
        assert!(rest.contains(part), "{part:?} in {rest:?}");
    }
}

#[test]
fn shipped_config_check_prints_no_secret() {
    let text = shipped();
    let token = value_of(&text, "token");
    let key = value_of(&text, "encoding_aes_key");
    let secret = value_of(&text, "secret");
    let secret_b64 = secret.strip_prefix("whsec_").expect("a whsec_ secret");
    let run = check(&shipped_path());
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let all = run.both();
    for (what, value) in [
        ("token", token.as_str()),
        ("encoding_aes_key", key.as_str()),
        ("secret", secret.as_str()),
        ("secret's key", secret_b64),
    ] {
        assert!(!all.contains(value), "the {what} is printed:\n{all}");
    }
    // The secrets are there, redacted: the summary says so rather than dropping them.
    assert!(line_starting(&run.stdout, "account main:").contains("<redacted>"));
    assert!(line_starting(&run.stdout, "target crm:").contains("secret <redacted>"));
}

// ---- broken copies, one problem each -----------------------------------------------------

#[test]
fn a_42_character_encoding_aes_key_is_refused() {
    let text = shipped();
    let key = value_of(&text, "encoding_aes_key");
    assert_edit_refused(
        &format!("encoding_aes_key = \"{key}\""),
        &format!("encoding_aes_key = \"{}\"", &key[..42]),
        &["account \"main\".encoding_aes_key: must be 43 characters of A-Z a-z 0-9, got 42"],
    );
}

#[test]
fn an_encoding_aes_key_with_another_character_is_refused() {
    let text = shipped();
    let key = value_of(&text, "encoding_aes_key");
    assert_edit_refused(
        &format!("encoding_aes_key = \"{key}\""),
        &format!("encoding_aes_key = \"{}+\"", &key[..42]),
        &["account \"main\".encoding_aes_key: must be 43 characters of A-Z a-z 0-9, found another"],
    );
}

#[test]
fn an_unknown_key_in_an_account_is_refused() {
    let text = shipped();
    let token = value_of(&text, "token");
    let line = format!("token = \"{token}\"\n");
    assert_edit_refused(
        &line,
        &format!("{line}tokn = \"x\"\n"),
        &["account \"main\".tokn: unknown key \"tokn\" (did you mean \"token\"?)"],
    );
}

/// The account is only misspelt, not missing: route \"qr-login\" (`account = "main"`) must not be told
/// that there is no account "main".
#[test]
fn an_unknown_key_in_an_account_does_not_make_routes_lose_the_account() {
    let text = shipped();
    let token = value_of(&text, "token");
    let line = format!("token = \"{token}\"\n");
    let (path, run) = check_text(&edit(&text, &line, &format!("{line}tokn = \"x\"\n")));
    assert_invalid(&run, &path, &["account \"main\".tokn"]);
    assert!(
        !run.stderr.contains("is not an [[account]] name"),
        "a misspelt key in account \"main\" must not be reported as a missing account:\n{}",
        run.stderr
    );
}

#[test]
fn an_unknown_section_is_refused() {
    assert_edit_refused(
        "[server]\n",
        "[sever]\nlisten = \"127.0.0.1:8080\"\n\n[server]\n",
        &["sever: unknown section"],
    );
}

#[test]
fn a_reply_not_in_to_is_refused() {
    assert_edit_refused(
        "to = [\"shop\", \"crm\"]\nreply = \"shop\"",
        "to = [\"shop\"]\nreply = \"crm\"",
        &[
            "route \"everything-else\".reply: \"crm\" is a target, but not in this route's to: add it there",
        ],
    );
}

#[test]
fn a_route_naming_a_missing_target_is_refused() {
    assert_edit_refused(
        "to = [\"identity\", \"shop\"]",
        "to = [\"identity\", \"shopp\"]",
        &["route \"qr-login\".to: \"shopp\" is not a [[target]] name (did you mean \"shop\"?)"],
    );
}

#[test]
fn a_route_naming_a_missing_account_is_refused() {
    assert_edit_refused(
        "account = \"main\"",
        "account = \"mian\"",
        &["route \"qr-login\".account: \"mian\" is not an [[account]] name"],
    );
}

#[test]
fn a_duplicate_target_name_is_refused() {
    assert_edit_refused(
        "name = \"crm\"",
        "name = \"shop\"",
        &["target: name \"shop\" is used twice"],
    );
}

#[test]
fn a_target_url_that_is_not_http_is_refused() {
    assert_edit_refused(
        "url = \"http://127.0.0.1:9002/hooks/wechat\"",
        "url = \"ftp://127.0.0.1:9002/hooks/wechat\"",
        &["target \"crm\".url: must be an http:// or https:// URL with a host"],
    );
}

#[test]
fn a_bad_app_id_is_refused() {
    assert_edit_refused(
        "app_id = \"wx1234567890abcdef\"",
        "app_id = \"wx1234567890abcdeg\"",
        &["account \"main\".app_id: \"wx1234567890abcdeg\" must be wx followed by 16 hex digits"],
    );
}

#[test]
fn a_too_short_token_is_refused() {
    let token = value_of(&shipped(), "token");
    assert_edit_refused(
        &format!("token = \"{token}\""),
        "token = \"ab\"",
        &["account \"main\".token: must be 3-32 letters or digits, got 2 characters"],
    );
}

/// WeChat tokens are often all digits; written unquoted, the value must still not be echoed.
#[test]
fn a_token_of_the_wrong_type_is_refused_without_echoing_it() {
    let token = value_of(&shipped(), "token");
    let (path, run) = check_text(&edit(
        &shipped(),
        &format!("token = \"{token}\""),
        "token = 20240101123",
    ));
    assert_invalid(&run, &path, &["account \"main\".token:"]);
    assert!(
        !run.both().contains("20240101123"),
        "the token is printed in the error:\n{}",
        run.stderr
    );
}

#[test]
fn a_reply_deadline_of_5000_ms_is_refused() {
    assert_edit_refused(
        "reply_deadline_ms = 4500",
        "reply_deadline_ms = 5000",
        &[
            "server.reply_deadline_ms: must be between 1 and 4999 (WeChat gives up after 5 s), got 5000",
        ],
    );
}

#[test]
fn a_timestamp_skew_of_0_is_accepted_with_a_warning() {
    let (path, run) = check_text(&edit(
        &shipped(),
        "timestamp_skew_s = 300",
        "timestamp_skew_s = 0",
    ));
    assert_ok(&run, &path);
    assert!(
        run.stderr.lines().any(|line| line
            .starts_with("warning: server.timestamp_skew_s: 0 turns the freshness check off")),
        "stderr:\n{}",
        run.stderr
    );
    // The shipped value is not warned about.
    let run = check(&shipped_path());
    assert!(
        !run.stderr.contains("timestamp_skew_s"),
        "stderr:\n{}",
        run.stderr
    );
}

#[test]
fn a_dedupe_ttl_shorter_than_the_timestamp_skew_is_refused_by_check_and_serve() {
    // A push captured and replayed 67 s later is inside a 300 s window but past a 60 s dedupe
    // record: it would be forwarded again.
    let expected = "store.dedupe_ttl_s: 60 is shorter than server.timestamp_skew_s = 300";
    let short = edit(&shipped(), "dedupe_ttl_s = 300", "dedupe_ttl_s = 60");
    let (path, checked) = check_text(&short);
    assert_invalid(&checked, &path, &[expected]);
    let (_dir, path) = write_config(&short);
    let served = run_serve(&path);
    assert_invalid(&served, &path, &[expected]);
    // The same through the environment, which overrides the file.
    let overridden = run(relay()
        .env("WECHAT_RELAY_SERVER__TIMESTAMP_SKEW_S", "301")
        .arg("--config")
        .arg(shipped_path())
        .arg("check"));
    assert_invalid(
        &overridden,
        &shipped_path(),
        &["store.dedupe_ttl_s: 300 is shorter than server.timestamp_skew_s = 301"],
    );
    // Equal is enough, and so is a window that is off (warned about, not refused).
    for (from, to) in [
        ("timestamp_skew_s = 300", "timestamp_skew_s = 60"),
        ("timestamp_skew_s = 300", "timestamp_skew_s = 0"),
    ] {
        let (path, run) = check_text(&edit(&short, from, to));
        assert_ok(&run, &path);
    }
}

/// `wechat-relay serve --config <path>` on 127.0.0.1:0 (for a config it should refuse).
fn run_serve(path: &Path) -> Run {
    run(relay()
        .env("RUST_LOG", "info")
        .env("WECHAT_RELAY_SERVER__LISTEN", "127.0.0.1:0")
        .arg("serve")
        .arg("--config")
        .arg(path))
}

#[test]
fn a_json_target_without_secret_is_refused() {
    let secret = value_of(&shipped(), "secret");
    assert_edit_refused(
        &format!("secret = \"{secret}\""),
        "",
        &["target \"crm\".secret: required for format = \"json\""],
    );
}

#[test]
fn a_listen_that_is_not_an_address_is_refused() {
    assert_edit_refused(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"nope\"",
        &["server.listen: \"nope\" is not an address like 127.0.0.1:8080"],
    );
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let text = shipped();
    let key = value_of(&text, "encoding_aes_key");
    let secret = value_of(&text, "secret");
    let mut broken = text.clone();
    for (from, to) in [
        (
            "listen = \"127.0.0.1:8080\"",
            "listen = \"nope\"".to_owned(),
        ),
        (
            "reply_deadline_ms = 4500",
            "reply_deadline_ms = 5000".to_owned(),
        ),
        (
            "app_id = \"wx1234567890abcdef\"",
            "app_id = \"wx1234567890abcdeg\"".to_owned(),
        ),
        (
            &format!("encoding_aes_key = \"{key}\""),
            format!("encoding_aes_key = \"{}\"", &key[..42]),
        ),
        (
            "url = \"http://127.0.0.1:9002/hooks/wechat\"",
            "url = \"ftp://127.0.0.1:9002/hooks/wechat\"".to_owned(),
        ),
        (&format!("secret = \"{secret}\""), String::new()),
        (
            "to = [\"identity\", \"shop\"]",
            "to = [\"identity\", \"shopp\"]".to_owned(),
        ),
        (
            "to = [\"shop\", \"crm\"]\nreply = \"shop\"",
            "to = [\"shop\"]\nreply = \"crm\"".to_owned(),
        ),
    ] {
        broken = edit(&broken, from, &to);
    }
    let (path, run) = check_text(&broken);
    let expected = [
        "server.listen: \"nope\"",
        "server.reply_deadline_ms: must be between 1 and 4999",
        "account \"main\".app_id: \"wx1234567890abcdeg\"",
        "account \"main\".encoding_aes_key: must be 43 characters of A-Z a-z 0-9, got 42",
        "target \"crm\".url: must be an http",
        "target \"crm\".secret: required for format = \"json\"",
        "route \"qr-login\".to: \"shopp\" is not a [[target]] name (did you mean \"shop\"?)",
        "route \"everything-else\".reply: \"crm\" is a target, but not in this route's to: add it there",
    ];
    assert_invalid(&run, &path, &expected);
    assert!(
        run.stderr.lines().count() > expected.len(),
        "one line per problem after the header:\n{}",
        run.stderr
    );
}

// ---- serve -------------------------------------------------------------------------------

/// A port this test holds: a relay that binds before validating fails with "cannot listen"
/// (exit 1), not with the config's problems (exit 2).
#[test]
fn serve_refuses_an_invalid_config_with_the_same_messages_before_binding() {
    let held = TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let addr = held.local_addr().expect("held address");
    let text = shipped();
    let key = value_of(&text, "encoding_aes_key");
    let broken = edit(
        &edit(
            &edit(
                &text,
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"{addr}\""),
            ),
            &format!("encoding_aes_key = \"{key}\""),
            &format!("encoding_aes_key = \"{}\"", &key[..42]),
        ),
        "to = [\"shop\", \"crm\"]\nreply = \"shop\"",
        "to = [\"shop\"]\nreply = \"crm\"",
    );
    let (_dir, path) = write_config(&broken);

    let checked = check(&path);
    let served = run(relay()
        .env("RUST_LOG", "info")
        .arg("serve")
        .arg("--config")
        .arg(&path));
    assert_invalid(
        &served,
        &path,
        &[
            "account \"main\".encoding_aes_key: must be 43 characters of A-Z a-z 0-9, got 42",
            "route \"everything-else\".reply: \"crm\" is a target, but not in this route's to: add it there",
        ],
    );
    assert_eq!(
        served.stderr, checked.stderr,
        "serve and check report alike"
    );
    assert!(
        !served.stderr.contains("listening") && !served.stderr.contains("cannot listen"),
        "serve touched the network:\n{}",
        served.stderr
    );
    drop(held);
}

/// The counterpart of the test above: on a valid config, `serve` does start and accept.
#[test]
fn serve_starts_on_the_shipped_config() {
    let mut child = relay()
        .env("WECHAT_RELAY_SERVER__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .arg("serve")
        .arg("--config")
        .arg(shipped_path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wechat-relay serve");
    let stderr = child.stderr.take().expect("stderr");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + PATIENCE;
    let mut seen = String::new();
    let bound = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains("listening")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|field| field.strip_prefix("listen="))
                {
                    break Some(addr.to_owned());
                }
            }
            Err(_) => break None,
        }
    };
    let connected = bound
        .as_deref()
        .map(|addr| TcpStream::connect(addr).is_ok());
    let _ = child.kill();
    let _ = child.wait();
    let bound = bound.unwrap_or_else(|| panic!("serve did not say where it listens:\n{seen}"));
    assert_eq!(connected, Some(true), "cannot connect to {bound}");
}

// ---- the file itself ---------------------------------------------------------------------

#[test]
fn a_missing_config_file_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nowhere.toml");
    let run = check(&path);
    assert_invalid(&run, &path, &[&path.display().to_string()]);
    assert!(
        run.stderr.contains("No such file or directory"),
        "say why:\n{}",
        run.stderr
    );
}

#[test]
fn the_default_config_is_relay_toml_in_the_current_folder() {
    let empty = tempfile::tempdir().expect("tempdir");
    let run = run(relay().current_dir(empty.path()).arg("check"));
    // The file that was looked for, by its absolute path.
    let looked_for = format!("{}:", empty.path().join("relay.toml").display());
    assert_invalid(&run, Path::new("relay.toml"), &[looked_for.as_str()]);

    let (dir, _path) = write_config(&shipped());
    let run = self::run(relay().current_dir(dir.path()).arg("check"));
    assert_ok(&run, Path::new("relay.toml"));
}

#[test]
fn config_option_works_after_the_subcommand() {
    let empty = tempfile::tempdir().expect("tempdir");
    let path = shipped_path();
    let run = run(relay()
        .current_dir(empty.path())
        .arg("check")
        .arg("--config")
        .arg(&path));
    assert_ok(&run, &path);
}

#[test]
fn wechat_relay_config_selects_the_file_when_config_is_absent() {
    // The current folder has a relay.toml listening on 8080; the variable names another.
    let (cwd, default_path) = write_config(&shipped());
    let (_other_dir, other) = write_config(&edit(
        &shipped(),
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8181\"",
    ));

    let run = self::run(
        relay()
            .current_dir(cwd.path())
            .env("WECHAT_RELAY_CONFIG", &other)
            .arg("check"),
    );
    assert_ok(&run, &other);
    assert!(
        line_starting(&run.stdout, "server:").contains("listen 127.0.0.1:8181"),
        "{}",
        run.stdout
    );

    // --config wins over the variable.
    let run = self::run(
        relay()
            .current_dir(cwd.path())
            .env("WECHAT_RELAY_CONFIG", &other)
            .arg("check")
            .arg("--config")
            .arg(&default_path),
    );
    assert_ok(&run, &default_path);
    assert!(
        line_starting(&run.stdout, "server:").contains("listen 127.0.0.1:8080"),
        "{}",
        run.stdout
    );
}

// ---- environment overrides ---------------------------------------------------------------

#[test]
fn env_overrides_the_listen_address() {
    let run = run(relay()
        .env("WECHAT_RELAY_SERVER__LISTEN", "0.0.0.0:9191")
        .arg("check")
        .arg("--config")
        .arg(shipped_path()));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let server = line_starting(&run.stdout, "server:");
    assert!(server.contains("listen 0.0.0.0:9191"), "{server}");
    assert!(!server.contains("8080"), "{server}");
}

#[test]
fn env_listen_override_is_validated() {
    let run = run(relay()
        .env("WECHAT_RELAY_SERVER__LISTEN", "nope")
        .arg("check")
        .arg("--config")
        .arg(shipped_path()));
    assert_invalid(
        &run,
        &shipped_path(),
        &["server.listen: \"nope\" is not an address"],
    );
}

/// A bad token from the variable breaks the shipped file; a good one mends a broken file.
fn assert_env_overrides_token(variable: &str) {
    let shipped_path = shipped_path();
    let run = run(relay()
        .env(variable, "ab")
        .arg("check")
        .arg("--config")
        .arg(&shipped_path));
    assert_invalid(
        &run,
        &shipped_path,
        &["account \"main\".token: must be 3-32 letters or digits, got 2 characters"],
    );

    let token = value_of(&shipped(), "token");
    let (_dir, broken) = write_config(&edit(
        &shipped(),
        &format!("token = \"{token}\""),
        "token = \"a\"",
    ));
    assert_invalid(&check(&broken), &broken, &["account \"main\".token:"]);
    let run = self::run(
        relay()
            .env(variable, "GoodToken2025")
            .arg("check")
            .arg("--config")
            .arg(&broken),
    );
    assert_ok(&run, &broken);
    assert!(
        !run.both().contains("GoodToken2025"),
        "the token from the environment is printed:\n{}",
        run.both()
    );
}

#[test]
fn env_overrides_the_token_of_an_account_named_by_name() {
    assert_env_overrides_token("WECHAT_RELAY_ACCOUNT__MAIN__TOKEN");
}

#[test]
fn env_overrides_the_token_of_an_account_named_by_index() {
    assert_env_overrides_token("WECHAT_RELAY_ACCOUNT__0__TOKEN");
}

#[test]
fn env_naming_a_missing_account_is_an_error() {
    let path = shipped_path();
    for variable in [
        "WECHAT_RELAY_ACCOUNT__NOPE__TOKEN",
        "WECHAT_RELAY_ACCOUNT__1__TOKEN",
    ] {
        let run = run(relay()
            .env(variable, "EnvSecretToken77")
            .arg("check")
            .arg("--config")
            .arg(&path));
        assert_invalid(&run, &path, &[&format!("{variable}: there is no account")]);
        assert!(
            !run.both().contains("EnvSecretToken77"),
            "the value is printed:\n{}",
            run.both()
        );
    }
}

#[test]
fn env_overrides_a_target_by_name_and_a_route_by_its_dashed_name() {
    let run = run(relay()
        .env(
            "WECHAT_RELAY_TARGET__SHOP__URL",
            "http://127.0.0.1:9100/hook",
        )
        .env("WECHAT_RELAY_ROUTE__QR_LOGIN__REPLY", "shop")
        .arg("check")
        .arg("--config")
        .arg(shipped_path()));
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let shop = line_starting(&run.stdout, "target shop:");
    assert!(shop.contains("http://127.0.0.1:9100/hook"), "{shop}");
    let qr = line_starting(&run.stdout, "route qr-login:");
    assert!(qr.contains("reply from shop"), "{qr}");
}

// ---- secrets from files ------------------------------------------------------------------

/// The shipped file with token, encoding_aes_key and secret moved to `secrets/` files (each
/// ending in a newline) next to it. Returns the folder, the config path and the three values.
fn config_with_secret_files(
    token: &str,
    key: &str,
    secret: &str,
) -> (TempDir, PathBuf, [String; 3]) {
    let text = shipped();
    let shipped_token = value_of(&text, "token");
    let shipped_key = value_of(&text, "encoding_aes_key");
    let shipped_secret = value_of(&text, "secret");
    let text = edit(
        &text,
        &format!("token = \"{shipped_token}\""),
        "token_file = \"secrets/token\"",
    );
    let text = edit(
        &text,
        &format!("encoding_aes_key = \"{shipped_key}\""),
        "encoding_aes_key_file = \"secrets/aes_key\"",
    );
    let text = edit(
        &text,
        &format!("secret = \"{shipped_secret}\""),
        "secret_file = \"secrets/crm\"",
    );
    let (dir, path) = write_config(&text);
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).expect("secrets folder");
    std::fs::write(secrets.join("token"), format!("{token}\n")).expect("token file");
    std::fs::write(secrets.join("aes_key"), format!("{key}\n")).expect("key file");
    std::fs::write(secrets.join("crm"), format!("{secret}\n")).expect("secret file");
    (dir, path, [shipped_token, shipped_key, shipped_secret])
}

#[test]
fn secrets_are_read_from_files_relative_to_the_config_folder() {
    let text = shipped();
    let (dir, path, [token, key, secret]) = config_with_secret_files(
        &value_of(&text, "token"),
        &value_of(&text, "encoding_aes_key"),
        &value_of(&text, "secret"),
    );
    // Run from another folder: the relative paths resolve from the config's folder.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    assert_ne!(elsewhere.path(), dir.path());
    let run = run(relay()
        .current_dir(elsewhere.path())
        .arg("check")
        .arg("--config")
        .arg(&path));
    assert_ok(&run, &path);
    let account = line_starting(&run.stdout, "account main:");
    assert!(account.contains("mode safe"), "{account}");
    assert!(
        account.contains("current <redacted>"),
        "the key is loaded: {account}"
    );
    let crm = line_starting(&run.stdout, "target crm:");
    assert!(
        crm.contains("secret <redacted>"),
        "the secret is loaded: {crm}"
    );
    let all = run.both();
    for value in [&token, &key, &secret] {
        assert!(!all.contains(value.as_str()), "a secret is printed:\n{all}");
    }
}

#[test]
fn secret_file_contents_are_validated_like_inline_values() {
    let text = shipped();
    let key = value_of(&text, "encoding_aes_key");
    let (_dir, path, _) = config_with_secret_files("ab", &key[..42], "whsec_c2hvcnQ=");
    let run = check(&path);
    assert_invalid(
        &run,
        &path,
        &[
            "account \"main\".token: must be 3-32 letters or digits, got 2 characters",
            "account \"main\".encoding_aes_key: must be 43 characters of A-Z a-z 0-9, got 42",
            "target \"crm\".secret: must be \"whsec_\" followed by the base64",
        ],
    );
}

#[test]
fn a_missing_secret_file_is_an_error_naming_the_key() {
    let text = shipped();
    let (dir, path, _) = config_with_secret_files(
        &value_of(&text, "token"),
        &value_of(&text, "encoding_aes_key"),
        &value_of(&text, "secret"),
    );
    std::fs::remove_file(dir.path().join("secrets").join("token")).expect("remove token file");
    let run = check(&path);
    assert_invalid(&run, &path, &["account \"main\".token_file: cannot read"]);
    assert!(
        run.stderr
            .contains(&format!("secrets{}token", std::path::MAIN_SEPARATOR)),
        "name the file:\n{}",
        run.stderr
    );
}

#[test]
fn token_and_token_file_together_are_an_error() {
    let text = shipped();
    let token = value_of(&text, "token");
    let (dir, path) = write_config(&edit(
        &text,
        &format!("token = \"{token}\""),
        &format!("token = \"{token}\"\ntoken_file = \"token\""),
    ));
    std::fs::write(dir.path().join("token"), format!("{token}\n")).expect("token file");
    let run = check(&path);
    assert_invalid(
        &run,
        &path,
        &["account \"main\": give token or token_file, not both"],
    );
}

#[test]
fn a_toml_syntax_error_does_not_quote_the_secret_on_its_line() {
    let text = shipped();
    let token = value_of(&text, "token");
    // The quotes forgotten: a TOML syntax error on the token's own line.
    let broken = edit(
        &text,
        &format!("token = \"{token}\""),
        &format!("token = {token}"),
    );
    let (path, run) = check_text(&broken);
    assert_invalid(&run, &path, &[&path.display().to_string()]);
    let line = broken
        .lines()
        .position(|l| l.starts_with("token = "))
        .expect("token line")
        + 1;
    assert!(
        run.stderr
            .contains(&format!("{}: line {line}, column ", path.display())),
        "say where:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("(the line: token = …)") && !run.stderr.contains("TOML file"),
        "the line's key, the file named once:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains(&token),
        "the token leaked:\n{}",
        run.stderr
    );
}

#[test]
fn limits_have_upper_bounds() {
    assert_edit_refused(
        "max_body_bytes = 65536",
        "max_body_bytes = 104857600",
        &["server.max_body_bytes: must be 512 to 1048576, got 104857600"],
    );
    assert_edit_refused(
        "max_connections = 1024",
        "max_connections = 0",
        &["server.max_connections: must be 1 to"],
    );
}

#[test]
fn outbox_keys_are_checked() {
    assert_edit_refused(
        "dedupe_ttl_s = 300",
        "dedupe_ttl_s = 10",
        &["store.dedupe_ttl_s: must be 60 to 604800, got 10"],
    );
    assert_edit_refused(
        "# max_bytes = 1073741824",
        "max_bytes = 1048575",
        &["store.max_bytes: must be at least 1048576 (1 MiB), got 1048575"],
    );
    assert_edit_refused(
        "dead_letter_retention_s = 604800",
        "dead_letter_retention_s = 0",
        &["store.dead_letter_retention_s: 0 would keep dead letters for ever"],
    );
    assert_edit_refused(
        "dead_letter_retention_s = 604800",
        "dead_letter_retention_s = 31536001",
        &["store.dead_letter_retention_s: must be 1 to 31536000, got 31536001"],
    );
    assert_edit_refused(
        "concurrency = 16",
        "concurrency = 0",
        &["target \"identity\".concurrency: must be 1 to 1024, got 0"],
    );
    assert_edit_refused(
        "retry_max_ms = 300000",
        "retry_max_ms = 10",
        &["target \"identity\".retry_max_ms: must be 1000 to"],
    );
    assert_edit_refused(
        "max_attempts = 20",
        "max_attempts = 0",
        &["target \"identity\".max_attempts: must be 1 to"],
    );
    assert_edit_refused(
        "max_age_s = 300",
        "max_age_s = 0",
        &["target \"identity\".max_age_s: must be 1 to"],
    );
    assert_edit_refused(
        "[store]\n",
        "[store]\nsize = 1\n",
        &["store.size: unknown key \"size\" (the keys here: \"path\""],
    );
}

#[test]
fn the_store_path_is_relative_to_the_config_folder_and_shown() {
    let (dir, path) = write_config(&shipped());
    let durable = run(relay().arg("check").arg("--config").arg(&path));
    assert_ok(&durable, &path);
    let expected = dir.path().join("./data");
    assert!(
        durable
            .stdout
            .contains(&format!("store: {} (SQLite", expected.display())),
        "{}",
        durable.stdout
    );
    assert!(
        durable.stdout.contains("dedupe window 300 s"),
        "{}",
        durable.stdout
    );
    assert!(
        durable
            .stdout
            .contains("store budget: 1073741824 bytes, dead letters kept 604800 s"),
        "{}",
        durable.stdout
    );
    // Without [store]: in memory, and check says so.
    let start = shipped().find("\n[store]\n").expect("[store]");
    let end = shipped().find("\n[[account]]\n").expect("[[account]]");
    let mut text = shipped();
    text.replace_range(start..end, "");
    let (_dir, path) = write_config(&text);
    let memory = run(relay().arg("check").arg("--config").arg(&path));
    assert_ok(&memory, &path);
    assert!(
        memory.stdout.contains("store: none, in memory"),
        "{}",
        memory.stdout
    );
    assert!(
        memory.stdout.contains("store budget: 67108864 bytes"),
        "{}",
        memory.stdout
    );
}

#[test]
fn route_names_are_checked_and_unique() {
    assert_edit_refused(
        "name = \"everything-else\"",
        "name = \"qr-login\"",
        &["route: name \"qr-login\" is used twice"],
    );
    assert_edit_refused(
        "name = \"everything-else\"",
        "name = \"everything else\"",
        &["route[1].name: \"everything else\" must be 1-64 of A-Z a-z 0-9 - _"],
    );
}

#[test]
fn env_sets_a_numeric_key_the_file_leaves_out() {
    // The shipped file sets max_connections; a minimal file may not. The variable's value is
    // then read as the number the key takes.
    let text = edit(&shipped(), "max_connections = 1024\n", "");
    let (dir, path) = write_config(&text);
    let run = run(relay()
        .env("WECHAT_RELAY_SERVER__MAX_CONNECTIONS", "2048")
        .arg("check")
        .arg("--config")
        .arg(&path));
    drop(dir);
    assert_ok(&run, &path);
    assert!(run.stdout.contains("2048 connections"), "{}", run.stdout);
}

#[test]
fn a_target_timeout_has_an_upper_bound() {
    assert_edit_refused(
        "timeout_ms = 3000",
        "timeout_ms = 3600000",
        &["target \"identity\".timeout_ms: must be 1 to 300000, got 3600000"],
    );
}

#[test]
fn secret_files_can_be_systemd_credentials() {
    let token = value_of(&shipped(), "token");
    let text = edit(
        &shipped(),
        &format!("token = \"{token}\""),
        "token_file = \"${CREDENTIALS_DIRECTORY}/wechat-token\"",
    );
    let (dir, path) = write_config(&text);
    let credentials = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        credentials.path().join("wechat-token"),
        format!("{token}\n"),
    )
    .expect("token");
    let ok = run(relay()
        .env("CREDENTIALS_DIRECTORY", credentials.path())
        .arg("check")
        .arg("--config")
        .arg(&path));
    assert_ok(&ok, &path);
    // Outside systemd the variable is not set: a clear error, not a file named "${...}".
    let missing = run(relay()
        .env_remove("CREDENTIALS_DIRECTORY")
        .arg("check")
        .arg("--config")
        .arg(&path));
    drop(dir);
    assert_eq!(missing.code, Some(2), "{}", missing.stderr);
    assert!(
        missing.stderr.contains(
            "account \"main\".token_file: ${CREDENTIALS_DIRECTORY} is not set (systemd sets it for a unit with LoadCredential=)"
        ),
        "{}",
        missing.stderr
    );
}

#[test]
fn the_placeholders_example_hosts_and_plain_http_elsewhere_are_warned_about() {
    // The shipped file: its placeholder token and key, nothing about its 127.0.0.1 targets.
    let run = check(&shipped_path());
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: ") && !l.contains("is mode 0"))
        .collect();
    assert_eq!(warnings.len(), 2, "stderr:\n{}", run.stderr);
    assert!(
        warnings[0].starts_with("warning: account \"main\".token: the placeholder"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with("warning: account \"main\".encoding_aes_key: the placeholder"),
        "{warnings:?}"
    );
    // A documentation host, and plain HTTP to another machine.
    let text = edit(
        &edit(
            &shipped(),
            "url = \"http://127.0.0.1:9002/hooks/wechat\"",
            "url = \"https://crm.example.com/hooks/wechat\"",
        ),
        "url = \"http://127.0.0.1:9000/wechat\"",
        "url = \"http://10.0.0.7:9000/wechat\"",
    );
    let (path, run) = check_text(&text);
    assert_ok(&run, &path);
    for expected in [
        "warning: target \"crm\".url: crm.example.com is an example host",
        "warning: target \"shop\".url: plain HTTP to 10.0.0.7",
    ] {
        assert!(
            run.stderr.lines().any(|l| l.starts_with(expected)),
            "{expected:?} in stderr:\n{}",
            run.stderr
        );
    }
    // A real token is not warned about.
    let (_, run) = check_text(&edit(
        &shipped(),
        "token = \"ReplaceWithYourToken2024\"",
        "token = \"Tok3nFromMpAdmin\"",
    ));
    assert!(
        !run.stderr.contains("token: the placeholder"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_misspelt_name_gets_a_suggestion_and_a_bad_token_character_is_named() {
    // The example of issue 11: a typo in to, and reply naming the right target.
    assert_edit_refused(
        "to = [\"shop\", \"crm\"]\nreply = \"shop\"",
        "to = [\"sohp\", \"crm\"]\nreply = \"shop\"",
        &[
            "route \"everything-else\".to: \"sohp\" is not a [[target]] name (did you mean \"shop\"?)",
            "route \"everything-else\".reply: \"shop\" is a target, but not in this route's to: add it there",
        ],
    );
    // Nothing close: the names there are.
    assert_edit_refused(
        "to = [\"shop\", \"crm\"]\nreply = \"shop\"",
        "to = [\"shop\", \"warehouse\"]\nreply = \"shop\"",
        &[
            "route \"everything-else\".to: \"warehouse\" is not a [[target]] name (the targets: \"identity\", \"shop\", \"crm\")",
        ],
    );
    // A token of the right length with a dash: the character, not the length.
    assert_edit_refused(
        "token = \"ReplaceWithYourToken2024\"",
        "token = \"Replace-Token24\"",
        &["account \"main\".token: must be 3-32 letters or digits: character 8 is '-'"],
    );
}

#[test]
fn a_missing_file_is_named_by_its_absolute_path_with_a_hint() {
    // relay() runs in the temporary folder: a relative path is read from there.
    let run = run(relay().args(["--config", "no-such-relay.toml", "check"]));
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    let full = std::env::temp_dir().join("no-such-relay.toml");
    assert!(
        run.stderr
            .contains(&format!("{}: cannot read:", full.display())),
        "the absolute path in: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("--config PATH"),
        "a hint in: {}",
        run.stderr
    );
}

#[test]
fn a_bad_override_names_its_variable_and_a_misspelt_key_or_value_its_nearest() {
    let path = shipped_path();
    let run = run(relay()
        .env("WECHAT_RELAY_SERVER__LISTN", "0.0.0.0:9191")
        .env("WECHAT_RELAY_TARGET__SHOP__URL", "ftp://127.0.0.1/")
        .arg("check")
        .arg("--config")
        .arg(&path));
    assert_invalid(
        &run,
        &path,
        &[
            "server.listn: unknown key \"listn\" (did you mean \"listen\"?) (set by WECHAT_RELAY_SERVER__LISTN)",
            "target \"shop\".url: must be an http:// or https:// URL with a host",
        ],
    );
    assert!(
        run.stderr
            .contains("(set by WECHAT_RELAY_TARGET__SHOP__URL)"),
        "{}",
        run.stderr
    );
    // The examples: a key run together, a mode in capitals (backticks no more).
    assert_edit_refused(
        "mode = \"safe\"",
        "mode = \"Safe\"",
        &[
            "account \"main\".mode: \"Safe\" is not one of \"safe\", \"compatible\", \"plaintext\" (did you mean \"safe\"?)",
        ],
    );
    let key = "encoding_aes_key = \"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG\"";
    assert_edit_refused(
        key,
        &key.replace("encoding_aes_key", "encodingaeskey"),
        &[
            "account \"main\".encodingaeskey: unknown key \"encodingaeskey\" (did you mean \"encoding_aes_key\"?)",
        ],
    );
}

#[test]
fn every_problem_says_the_line_of_its_key() {
    let text = edit(
        &edit(&shipped(), "mode = \"safe\"", "mode = \"Safe\""),
        "to = [\"shop\", \"crm\"]",
        "to = [\"sohp\", \"crm\"]",
    );
    let line_of = |start: &str| {
        text.lines()
            .position(|l| l.starts_with(start))
            .expect("the line")
            + 1
    };
    let (path, run) = check_text(&text);
    assert_invalid(
        &run,
        &path,
        &[
            &format!(
                "account \"main\".mode: \"Safe\" is not one of \"safe\", \"compatible\", \"plaintext\" (did you mean \"safe\"?) (line {})",
                line_of("mode = \"Safe\"")
            ),
            &format!(
                "route \"everything-else\".to: \"sohp\" is not a [[target]] name (did you mean \"shop\"?) (line {})",
                line_of("to = [\"sohp\"")
            ),
        ],
    );
    // A warning too.
    let run = check(&shipped_path());
    let token_line = shipped()
        .lines()
        .position(|l| l.starts_with("token = "))
        .expect("token line")
        + 1;
    assert!(
        run.stderr.contains(&format!("(line {token_line})")),
        "{}",
        run.stderr
    );
}

#[test]
fn a_misspelt_mode_does_not_hide_the_key_problem_beside_it() {
    let key = "encoding_aes_key = \"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG\"";
    let text = edit(
        &edit(&shipped(), "mode = \"safe\"", "mode = \"Safe\""),
        key,
        &key.replace("EFG\"", "EF\""),
    );
    let (path, run) = check_text(&text);
    assert_invalid(
        &run,
        &path,
        &[
            "account \"main\".encoding_aes_key: must be 43 characters of A-Z a-z 0-9, got 42",
            "account \"main\".mode: \"Safe\" is not one of",
        ],
    );
}

#[test]
fn warnings_and_problems_are_coloured_only_for_a_terminal() {
    let path = shipped_path();
    let forced = run(relay()
        .env("CLICOLOR_FORCE", "1")
        .arg("check")
        .arg("--config")
        .arg(&path));
    assert!(
        forced.stderr.contains("\x1b[33mwarning:\x1b[0m "),
        "{:?}",
        forced.stderr
    );
    let broken = edit(&shipped(), "mode = \"safe\"", "mode = \"Safe\"");
    let (dir, broken) = write_config(&broken);
    let forced = run(relay()
        .env("CLICOLOR_FORCE", "1")
        .arg("check")
        .arg("--config")
        .arg(&broken));
    assert!(
        forced.stderr.contains("  \x1b[31maccount \"main\".mode"),
        "{:?}",
        forced.stderr
    );
    drop(dir);
    // Piped (as here) or with NO_COLOR: none.
    let piped = check(&path);
    assert!(!piped.stderr.contains('\x1b'), "{:?}", piped.stderr);
    let no_color = run(relay()
        .env("CLICOLOR_FORCE", "1")
        .env("NO_COLOR", "1")
        .arg("check")
        .arg("--config")
        .arg(&path));
    assert!(!no_color.stderr.contains('\x1b'), "{:?}", no_color.stderr);
}

#[test]
fn every_wrong_key_of_one_element_is_reported_not_only_the_first() {
    // serde stops at an element's first error; check goes on to the element's other keys.
    let mut text = shipped();
    for (from, to) in [
        ("app_id = \"wx1234567890abcdef\"", "app_id = 5"),
        ("token = \"", "tokn = \""),
        ("timeout_ms = 3000", "timeout_ms = \"3s\""),
        (
            "url = \"http://127.0.0.1:9001/events\"\n",
            "url = \"http://127.0.0.1:9001/events\"\nmax_atempts = 20\n",
        ),
    ] {
        text = edit(&text, from, to);
    }
    let (path, run) = check_text(&text);
    assert_invalid(
        &run,
        &path,
        &[
            "account \"main\".app_id: expected a string, found an integer",
            "account \"main\".tokn: unknown key \"tokn\" (did you mean \"token\"?)",
            "target \"identity\".timeout_ms: expected a number (0 or more, no quotes), found a string",
            "target \"identity\".max_atempts: unknown key \"max_atempts\" (did you mean \"max_attempts\"?)",
        ],
    );
    // A required key that is wrong is not also said to be missing.
    assert!(!run.stderr.contains("is required"), "{}", run.stderr);
}
