//! Secrets (issue 8), always the real binary: `check` warns about relay.toml, secret files and
//! the TLS key when others can read them or anyone but the owner can write them; a target URL's
//! `user:password@` is sent as `Authorization: Basic` on every attempt and appears in no line
//! the relay writes, even at trace level.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;

const PASSWORD: &str = "s3cretPassw0rd";
const USER: &str = "relay";

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `wechat-relay --config <path> check`: exit code, stdout, the `warning: ` lines of stderr.
fn check(path: &Path) -> (Option<i32>, String, Vec<String>) {
    let config = path.to_str().expect("a UTF-8 path");
    let (code, stdout, stderr) = cli(&["--config", config, "check"]);
    let warnings = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("warning: "))
        .map(str::to_owned)
        .collect();
    (code, stdout, warnings)
}

/// A config in `dir` whose token, key and json secret are `_file`s under `secrets/`, served
/// over TLS with `cert.pem` and `key.pem`. Every file starts `0600`.
fn config_with_files(dir: &Path) -> PathBuf {
    let secrets = dir.join("secrets");
    std::fs::create_dir(&secrets).expect("secrets folder");
    std::fs::write(secrets.join("token"), format!("{TOKEN}\n")).expect("token");
    std::fs::write(secrets.join("aes_key"), format!("{KEY}\n")).expect("key");
    std::fs::write(
        secrets.join("crm"),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
    )
    .expect("secret");
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("certificate");
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).expect("cert");
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).expect("key");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
         [[account]]\nname = \"main\"\npath = \"/wechat\"\napp_id = \"{APP_ID}\"\n\
         token_file = \"secrets/token\"\nencoding_aes_key_file = \"secrets/aes_key\"\n\
         [[target]]\nname = \"crm\"\nurl = \"http://127.0.0.1:9/h\"\nformat = \"json\"\n\
         secret_file = \"secrets/crm\"\n[[route]]\nto = [\"crm\"]\n"
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    for file in [
        path.clone(),
        secrets.join("token"),
        secrets.join("aes_key"),
        secrets.join("crm"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    ] {
        chmod(&file, 0o600);
    }
    path
}

#[test]
fn check_warns_about_files_others_can_read_or_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_with_files(dir.path());
    let secrets = dir.path().join("secrets");

    // Owner-only and group-readable files: no warning at all.
    chmod(&path, 0o640);
    chmod(&secrets.join("crm"), 0o640);
    chmod(&dir.path().join("cert.pem"), 0o644);
    let (code, stdout, warnings) = check(&path);
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(warnings, Vec::<String>::new());

    // World-readable relay.toml, world-readable token, group-writable key, world-readable TLS
    // key: one line each, naming the file, its mode and the fix. The 0640 secret stays quiet.
    chmod(&path, 0o644);
    chmod(&secrets.join("token"), 0o644);
    chmod(&secrets.join("aes_key"), 0o660);
    chmod(&dir.path().join("key.pem"), 0o604);
    let (code, stdout, warnings) = check(&path);
    assert_eq!(code, Some(0), "warnings do not refuse the config: {stdout}");
    let expected = [
        format!(
            "{} is mode 0644: readable by every user; chmod 0640",
            path.display()
        ),
        format!(
            "server.tls.key: {} is mode 0604: readable by every user; chmod 0600",
            dir.path().join("key.pem").display()
        ),
        format!(
            "account \"main\".token_file: {} is mode 0644: readable by every user; chmod 0640",
            secrets.join("token").display()
        ),
        format!(
            "account \"main\".encoding_aes_key_file: {} is mode 0660: writable by its group; chmod 0640",
            secrets.join("aes_key").display()
        ),
    ];
    for line in &expected {
        // Followed by the key's line in the file, where it has one.
        assert!(
            warnings.iter().any(|w| w.starts_with(line.as_str())),
            "no {line:?} in {warnings:#?}"
        );
    }
    assert_eq!(warnings.len(), expected.len(), "{warnings:#?}");

    // World-writable is named too.
    chmod(&secrets.join("crm"), 0o602);
    let (_, _, warnings) = check(&path);
    let crm = format!(
        "target \"crm\".secret_file: {} is mode 0602: writable by every user; chmod 0600",
        secrets.join("crm").display()
    );
    assert!(
        warnings.iter().any(|w| w.starts_with(crm.as_str())),
        "no {crm:?} in {warnings:#?}"
    );
}

/// `serve` with stdout and stderr written to files in `dir`, and the address it listens on.
fn serve_to_files(config: &Path, dir: &Path, env: &[(&str, &str)]) -> (Child, String) {
    let stdout = std::fs::File::create(dir.join("stdout")).expect("stdout file");
    let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_wechat-relay"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("WECHAT_RELAY_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("spawn wechat-relay");
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
        let addr = text
            .lines()
            .filter(|line| line.contains("wechat-relay listening"))
            .find_map(|line| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix("listen="))
            });
        if let Some(addr) = addr {
            return (child, addr.to_owned());
        }
        if started.elapsed() > Duration::from_secs(10) || child.try_wait().ok().flatten().is_some()
        {
            let _ = child.kill();
            panic!("no listening line:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn url_credentials_are_sent_as_basic_auth_and_never_logged_at_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The first attempt fails, so the credential must go with the retry too.
    let mut target = FakeTarget::with(Behaviour {
        status: http::StatusCode::SERVICE_UNAVAILABLE,
        ..Behaviour::default()
    })
    .await;
    let url = format!("http://{USER}:{PASSWORD}@{}/hook", target.addr);
    let mut toml = format!(
        "{}[log]\nlevel = \"trace\"\n[store]\npath = \"data\"\n",
        server_section(4000, 300)
    );
    toml.push_str(&account_section("main", "/wechat", "safe"));
    toml.push_str(&target_section("t", &url, "raw", "retry_initial_ms = 50"));
    toml.push_str("[[route]]\nto = [\"t\"]\n");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).expect("config");
    chmod(&path, 0o600);

    let (code, check_out, check_warnings) = check(&path);
    assert_eq!(code, Some(0), "{check_out}");
    let line = check_out
        .lines()
        .find(|line| line.starts_with("target t:"))
        .expect("a target line");
    assert!(line.contains("http://<redacted>@127.0.0.1:"), "{line}");

    let (mut child, addr) = serve_to_files(&path, dir.path(), &[("RUST_LOG", "trace")]);
    let pushes = 2;
    for i in 0..pushes {
        let push = PushBuilder::new(text_xml("hello", 7_000 + i));
        let (query, body) = push.safe();
        assert_success(&post(&format!("http://{addr}/wechat?{query}"), body).await);
    }
    let basic = format!("Basic {}", STANDARD.encode(format!("{USER}:{PASSWORD}")));
    let mut attempts = Vec::new();
    for _ in 0..pushes {
        let first = target.next().await;
        assert_eq!(first.path, "/hook");
        attempts.push(first);
    }
    target.set(Behaviour::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    while attempts.iter().filter(|r| r.answered.is_success()).count() < pushes as usize {
        assert!(Instant::now() < deadline, "the retries arrive");
        attempts.push(target.next().await);
    }
    for received in &attempts {
        assert_eq!(
            received.header("authorization"),
            Some(basic.as_str()),
            "attempt {:?}",
            received.header("x-wechat-relay-attempt")
        );
    }
    assert!(
        attempts
            .iter()
            .any(|r| r.header("x-wechat-relay-attempt") == Some("2")),
        "a retry was made"
    );

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let logged = format!(
        "{}\n{}",
        std::fs::read_to_string(dir.path().join("stdout")).expect("stdout"),
        std::fs::read_to_string(dir.path().join("stderr")).expect("stderr")
    );
    assert!(
        logged.lines().any(|line| line.contains("TRACE")),
        "the relay logged at trace level"
    );
    let everything = format!("{logged}\n{check_out}\n{}", check_warnings.join("\n"));
    let encoded = STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for secret in [PASSWORD, encoded.as_str()] {
        let found: Vec<&str> = everything
            .lines()
            .filter(|line| line.contains(secret))
            .collect();
        assert!(found.is_empty(), "{secret:?} logged:\n{}", found.join("\n"));
    }
}
