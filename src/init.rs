//! `wechat-relay init`: writes a Mode 2 relay.toml for one account (an identity-provider target
//! for QR logins, a business target for everything else), with a generated signing secret in
//! a file of its own beside it. It never overwrites a file, and it checks what it wrote with
//! the same rules as `check` (removing both files when they fail).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::RngExt;

use crate::cli::{InitArgs, InitMode};
use crate::config::Config;

/// Why `init` wrote nothing: the message, and whether it is the command line's fault (exit 2)
/// or the machine's (exit 1).
#[derive(Debug)]
pub struct InitError {
    pub message: String,
    pub usage: bool,
}

impl InitError {
    fn usage(message: impl Into<String>) -> Self {
        InitError {
            message: message.into(),
            usage: true,
        }
    }

    fn io(message: impl Into<String>) -> Self {
        InitError {
            message: message.into(),
            usage: false,
        }
    }
}

/// Writes the config at `path` and the secret beside it; returns what to print.
pub fn run(path: &Path, args: &InitArgs) -> Result<String, InitError> {
    let secret_path = secret_path(path);
    for existing in [path, secret_path.as_path()] {
        if existing.exists() {
            return Err(InitError::usage(format!(
                "{} exists: init never overwrites a file (move it away, or give --config another path)",
                existing.display()
            )));
        }
    }
    let secret_name = secret_path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = render(args, &secret_name)?;
    write_new(&secret_path, &format!("{}\n", secret()))?;
    if let Err(e) = write_new(path, &text) {
        let _ = std::fs::remove_file(&secret_path);
        return Err(e);
    }
    if let Err(errors) = Config::load(path) {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(&secret_path);
        let mut message =
            String::from("the values given do not make a valid config (nothing written):");
        for problem in &errors.0 {
            let _ = write!(message, "\n  {problem}");
        }
        return Err(InitError::usage(message));
    }
    let shown = path.display();
    Ok(format!(
        "wrote {shown} and {} (both mode 0600: they hold the account's token and key, and the \
         business target's signing secret)\n\
         next:\n  \
         wechat-relay check --config {shown}\n  \
         wechat-relay serve --config {shown}\n  \
         wechat-relay simulate --config {shown} --text hello   # in another terminal\n",
        secret_path.display()
    ))
}

/// The secret's file: `business.secret` beside the config.
fn secret_path(config: &Path) -> PathBuf {
    config
        .parent()
        .unwrap_or_else(|| Path::new(""))
        .join("business.secret")
}

/// A Standard Webhooks secret: `whsec_` and 32 random bytes in base64.
fn secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Creates `path` (it must not exist) with mode 0600 and writes `text`.
fn write_new(path: &Path, text: &str) -> Result<(), InitError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| InitError::io(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| InitError::io(format!("cannot write {}: {e}", path.display())))
}

/// A TOML basic string: the value quoted, `"` and `\` escaped; control characters refused.
fn quoted(key: &str, value: &str) -> Result<String, InitError> {
    if value.chars().any(char::is_control) {
        return Err(InitError::usage(format!(
            "--{key}: control characters are not allowed"
        )));
    }
    Ok(format!(
        "\"{}\"",
        value.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

fn render(args: &InitArgs, secret_file: &str) -> Result<String, InitError> {
    let mode = match args.mode {
        InitMode::Safe => "safe",
        InitMode::Compatible => "compatible",
        InitMode::Plaintext => "plaintext",
    };
    let app_id = quoted("app-id", &args.app_id)?;
    let token = quoted("token", &args.token)?;
    let key = match &args.encoding_aes_key {
        Some(key) => format!("encoding_aes_key = {}\n", quoted("encoding-aes-key", key)?),
        None if args.mode == InitMode::Plaintext => String::new(),
        None => {
            return Err(InitError::usage(format!(
                "--encoding-aes-key is required in {mode} mode (only plaintext mode has none)"
            )));
        }
    };
    let identity = quoted("identity-url", &args.identity_url)?;
    let business = quoted("business-url", &args.business_url)?;
    let secret_file = quoted("config", secret_file)?;
    Ok(format!(
        "# Written by `wechat-relay init`: Mode 2 for one official account. QR-code logins
# (subscribe with a scene, SCAN) go to the identity provider, which logs the user in and
# answers WeChat; everything else goes to the business servers, which answer messages.
# Every key and its default: docs/configuration.md. Check it with `wechat-relay check`.

[server]
# The relay speaks plain HTTP here; for an https:// server URL put TLS in front, or see
# [server.tls] in docs/configuration.md.
listen = \"127.0.0.1:8080\"

[store]
# The durable outbox and the dedupe records (a folder, relative to this file).
path = \"./data\"

[[account]]
name = \"main\"
path = \"/wechat\"
app_id = {app_id}
token = {token}
{key}mode = \"{mode}\"

[[target]]
# The identity provider's event URL for this account (Authing, for one).
name = \"identity\"
url = {identity}
format = \"raw\"

[[target]]
# Your servers: the decrypted message as WeChat would post it in plaintext mode, with the
# Standard Webhooks headers (webhook-id, webhook-timestamp, webhook-signature) signed with the
# secret in {secret_file}.
name = \"business\"
url = {business}
format = \"plain\"
sign = true
secret_file = {secret_file}

[[route]]
name = \"qr-login\"
msg_type = [\"event\"]
event = [\"subscribe\", \"SCAN\"]
ticket = true
to = [\"identity\"]
reply = \"identity\"

[[route]]
name = \"everything-else\"
to = [\"business\"]
reply = \"business\"
"
    ))
}
