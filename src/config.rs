//! relay.toml, loaded and checked into a [`Config`]: the file, then the `WECHAT_RELAY_*`
//! environment overrides, then secrets from files, then validation.
//!
//! Validation collects every problem with its key path (`route "qr-login".to: "shpo" is not
//! a [[target]] name (did you mean "shop"?) (line 12)`) so that an operator fixes the file in
//! one pass; nothing is bound before it passes.
//!
//! This file holds the checked types and the entry points ([`Config::load`]); the steps are:
//! - `raw`: the serde shape of each section, strict (`deny_unknown_fields`), every default
//!   beside its field;
//! - `env`: the environment overrides, applied to the parsed file;
//! - `check`: raw into checked, every problem with where it comes from (a file per section);
//! - `locate` and `names`: the line of each problem's key, and the element's name in its path;
//! - `summary`: the `Display` that `wechat-relay check` prints, secrets redacted;
//! - `file_mode`: the warning for a secret file others can read; [`TargetUrl`]: a target's
//!   URL with its credential taken out.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::Dict;
use ipnet::IpNet;
use serde::Deserialize;

pub use crate::secret::Secret;
use crate::wechat::crypto::AesKey;

mod check;
mod env;
mod file_mode;
mod locate;
mod names;
mod raw;
mod summary;
mod target_url;

pub use env::ENV_PREFIX;
pub use target_url::{TargetUrl, UrlError};

/// Set by systemd to the folder of the unit's `LoadCredential=` files.
const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// Every problem found in a config, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

/// A checked configuration: every name resolves, every secret is loaded and well-formed.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub store: Store,
    pub log: Log,
    /// The admin listener (health, readiness, metrics); off when `None`.
    pub admin: Option<Admin>,
    pub accounts: Vec<Account>,
    pub targets: Vec<Target>,
    pub routes: Vec<Route>,
    /// What is allowed but probably wrong (a file others can read, a replay window left
    /// open): `check` prints each line, `serve` logs it as a warning.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    /// Answer WeChat by this long after a push arrived, whatever the reply target does.
    pub reply_deadline: Duration,
    pub max_body_bytes: usize,
    /// `None` turns the freshness check off.
    pub timestamp_skew: Option<Duration>,
    /// Client connections open at once. At the limit a new connection still gets in: the one
    /// idle longest (or that has not sent its first request) is closed for it.
    pub max_connections: usize,
    /// Who may connect (by the client's address: the peer, or behind a trusted proxy the
    /// client `X-Forwarded-For` names); empty: everyone.
    pub allow_ips: Vec<IpNet>,
    /// Peers whose `X-Forwarded-For` is believed (the proxies in front of the relay).
    pub trusted_proxies: Vec<IpNet>,
    /// How long a keep-alive connection may sit idle between two requests.
    pub keepalive_timeout: Duration,
    /// Requests served on one connection before it is closed (after the answer).
    pub max_requests_per_connection: u64,
    /// How long one connection may stay open; closed after the answer in progress.
    pub max_connection_age: Duration,
    /// On SIGTERM, how long requests and forwards in flight may take to finish.
    pub shutdown_grace: Duration,
    /// HTTPS on `listen` instead of HTTP.
    pub tls: Option<Tls>,
}

/// `[server.tls]`: the certificate chain and key, loaded and checked.
#[derive(Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    /// An `EnvFilter` directive (`info`, `warn,wechat_relay=debug`); `RUST_LOG` wins when set.
    pub level: String,
    /// Log message content (the text of text messages) in the push line.
    pub content: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, colours on a terminal.
    Text,
    /// One JSON object per line (journald, ELK).
    Json,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
}

/// `[store]`: where deliveries, dead letters and dedupe keys live.
#[derive(Debug, Clone)]
pub struct Store {
    /// The store's folder (relative paths are resolved against the config file's folder).
    /// `None` (no `[store]` section): kept in memory, lost on restart.
    pub path: Option<PathBuf>,
    /// `[store] url`: PostgreSQL, shared by every relay that names it (exclusive with `path`).
    pub database: Option<Database>,
    /// How long a delivery taken by a relay is its own before another may take it
    /// (PostgreSQL: the relay that took it may have died).
    pub lease: Duration,
    /// How long a push's dedupe key (and the answer WeChat got) is kept.
    pub dedupe_ttl: Duration,
    /// Past this many bytes a push that needs a delivery is answered 503.
    pub max_bytes: u64,
    /// Dead letters older than this are purged in the background.
    pub dead_letter_retention: Duration,
}

/// A PostgreSQL database as `[store] url` and `password_file` give it.
#[derive(Clone)]
pub struct Database {
    /// Parsed from the URL, with the password of `password_file` set.
    pub config: tokio_postgres::Config,
    /// What the URL names, without its password: user, hosts and ports, database.
    pub shown: String,
    /// `ca_file`: the roots the database's certificate must chain to (the Web PKI's when
    /// `None`).
    pub roots: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
}

impl PartialEq for Database {
    /// The same database, reached the same way (a reload compares what it would change).
    fn eq(&self, other: &Self) -> bool {
        self.shown == other.shown
            && self.config.get_password() == other.config.get_password()
            && self.roots == other.roots
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Database").field(&self.shown).finish()
    }
}

impl Store {
    /// Whether pushes and deliveries outlive the process (SQLite or PostgreSQL).
    pub fn durable(&self) -> bool {
        self.path.is_some() || self.database.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only encrypted pushes are accepted.
    Safe,
    /// Encrypted pushes carry plaintext copies too; the relay uses the decrypted message.
    Compatible,
    Plaintext,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Safe => "safe",
            Mode::Compatible => "compatible",
            Mode::Plaintext => "plaintext",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub name: String,
    pub path: String,
    pub app_id: String,
    pub token: Secret,
    /// The current key first, then the previous one (tried when the current one fails).
    pub keys: Vec<AesKey>,
    pub mode: Mode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardFormat {
    /// The original query and body, byte for byte (the default).
    #[default]
    Raw,
    /// The decrypted message XML, with the query of a plaintext push.
    Plain,
    /// A JSON object of the message, signed the Standard Webhooks way.
    Json,
}

impl ForwardFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardFormat::Raw => "raw",
            ForwardFormat::Plain => "plain",
            ForwardFormat::Json => "json",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    /// Without user info: a `user:password@` is sent as `Authorization: Basic`.
    pub url: TargetUrl,
    pub format: ForwardFormat,
    pub timeout: Duration,
    /// The HMAC key decoded from `whsec_...`: set when the target's requests are signed
    /// (Standard Webhooks), always for `json`, with `sign = true` for `raw` and `plain`.
    pub secret: Option<Secret>,
    /// Deliveries in flight at once to this target.
    pub concurrency: usize,
    /// The first retry's delay; each later one doubles it, up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Attempts before a delivery becomes a dead letter.
    pub max_attempts: u32,
    /// Age (from the push's arrival, or from its replay) past which a delivery is dead.
    pub max_age: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Answer `success` as soon as the push is accepted.
    None,
    /// Wait (up to the deadline) for this target's answer and pass it on.
    Target(String),
    /// Answer this text as a WeChat text reply.
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `name` from the file, or `route[i]`: used in logs.
    pub name: String,
    pub account: Option<String>,
    pub msg_type: Option<Vec<String>>,
    pub event: Option<Vec<String>>,
    pub ticket: Option<bool>,
    pub event_key: Option<Vec<String>>,
    pub content: Option<Vec<String>>,
    pub to: Vec<String>,
    pub reply: Reply,
}

// ---- loading -----------------------------------------------------------------------------

impl Config {
    /// Loads `path`, applies the `WECHAT_RELAY_*` variables of this process, reads secret files
    /// and validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, &env::of_process())
    }

    /// [`Config::load`] with the environment given as `(NAME, value)` pairs.
    pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        if let Err(e) = std::fs::metadata(path) {
            // The absolute path: a relative one is read from the folder the command runs in.
            let full = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                " (give the file with --config PATH, or run from its folder; \
                 `wechat-relay init` writes one)"
            } else {
                ""
            };
            return Err(ConfigError(vec![format!(
                "{}: cannot read: {e}{hint}",
                full.display()
            )]));
        }
        let mut root = Figment::from(Toml::file_exact(path))
            .extract::<Dict>()
            .map_err(|e| ConfigError(vec![toml_error(path, &e)]))?;
        let mut problems = Vec::new();
        let from_env = env::apply_env(&mut root, env, &mut problems);
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let credentials = env
            .iter()
            .find(|(name, _)| name == CREDENTIALS_DIRECTORY)
            .map(|(_, value)| PathBuf::from(value));
        let mut checker = check::Checker::new(base, problems, credentials);
        checker.from_env = from_env;
        checker.warn_config_mode(path);
        let source = std::fs::read_to_string(path)
            .ok()
            .and_then(locate::Source::parse);
        let names = names::Names::of(&root);
        let with_line = |problem: String| {
            let problem = match &source {
                Some(source) => with_line(source, problem),
                None => problem,
            };
            names.put(problem)
        };
        match checker.check(root) {
            Ok(mut config) => {
                config.warnings = config.warnings.into_iter().map(with_line).collect();
                Ok(config)
            }
            Err(ConfigError(problems)) => {
                Err(ConfigError(problems.into_iter().map(with_line).collect()))
            }
        }
    }
}

/// `at: why` with ` (line N)` of the key `at` names, when it is in the file (not set by the
/// environment).
fn with_line(source: &locate::Source, problem: String) -> String {
    let line = problem
        .split_once(": ")
        .filter(|_| !problem.contains("(set by WECHAT_RELAY_"))
        .and_then(|(at, _)| source.line_of(at));
    match line {
        Some(line) => format!("{problem} (line {line})"),
        None => problem,
    }
}

/// A TOML syntax error as `PATH: line L, column C: reason (the line: key = …)`: the line's key
/// or table header, never its value (that may be a secret).
fn toml_error(path: &Path, error: &figment::Error) -> String {
    let text = error.to_string();
    let mut position = None;
    let mut reasons = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(at) = line.strip_prefix("TOML parse error at ") {
            position = Some(at.to_owned());
        } else {
            // The quoted source (`|` lines) and figment's "in PATH TOML file" are left out.
            let source = line.contains('|');
            let file = line.starts_with("in ") && line.ends_with("TOML file");
            if !(line.is_empty() || source || file) {
                reasons.push(line);
            }
        }
    }
    let reason = if reasons.is_empty() {
        "not valid TOML".to_owned()
    } else {
        reasons.join(": ")
    };
    let Some(position) = position else {
        return format!("{}: {reason}", path.display());
    };
    let shown = position
        .strip_prefix("line ")
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse::<usize>().ok())
        .and_then(|n| {
            std::fs::read_to_string(path)
                .ok()?
                .lines()
                .nth(n.checked_sub(1)?)
                .map(key_of)
        })
        .map(|line| format!(" (the line: {line})"))
        .unwrap_or_default();
    format!("{}: {position}: {reason}{shown}", path.display())
}

/// A TOML line without its value: `key = …`, a table header as it is.
fn key_of(line: &str) -> String {
    let line = line.trim();
    if line.starts_with('[') && !line.contains('=') {
        return line.to_owned();
    }
    match line.split_once('=') {
        Some((key, _)) => format!("{} = …", key.trim()),
        None => "…".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    #[test]
    fn debug_of_a_loaded_config_shows_no_secret() {
        const TOKEN: &str = "debugToken2024";
        const KEY: &str = "DebugEncodingAESKey0123456789abcdefghijklmn";
        const PREVIOUS: &str = "PreviousEncodingAESKey0123456789abcdefghijk";
        const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        const PASSWORD: &str = "s3cretPassw0rd";
        let dir = tempfile::tempdir().expect("tempdir");
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
        let key_pem = certified.signing_key.serialize_pem();
        std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).expect("cert");
        std::fs::write(dir.path().join("key.pem"), &key_pem).expect("key");
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "[server.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
                 [[account]]\nname = \"main\"\npath = \"/wechat\"\napp_id = \"wx0123456789abcdef\"\n\
                 token = \"{TOKEN}\"\nencoding_aes_key = \"{KEY}\"\n\
                 previous_encoding_aes_key = \"{PREVIOUS}\"\n\
                 [[target]]\nname = \"crm\"\nurl = \"https://relay:{PASSWORD}@crm.example.com/h\"\n\
                 format = \"json\"\nsecret = \"{WHSEC}\"\n\
                 [[route]]\nto = [\"crm\"]\n"
            ),
        )
        .expect("write");
        let config = Config::load_with_env(&path, &[]).expect("valid");
        let account = &config.accounts[0];
        let target = &config.targets[0];
        let mut secrets: Vec<String> = [TOKEN, KEY, PREVIOUS, WHSEC, PASSWORD]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        for key in &account.keys {
            secrets.push(format!("{:?}", key.as_bytes()));
            secrets.push(hex::encode(key.as_bytes()));
        }
        let hmac_key = target.secret.as_ref().expect("a json secret").expose();
        secrets.push(format!("{hmac_key:?}"));
        secrets.push(hex::encode(hmac_key));
        let basic = target.url.authorization().expect("a credential");
        secrets.push(String::from_utf8_lossy(basic.as_bytes()).into_owned());
        secrets.push(base64::engine::general_purpose::STANDARD.encode(format!("relay:{PASSWORD}")));
        // Every line of the TLS key's PEM body.
        secrets.extend(
            key_pem
                .lines()
                .filter(|line| !line.starts_with("-----"))
                .map(str::to_owned),
        );
        let shown = [
            format!("{config:?}"),
            format!("{config}"),
            format!("{account:?}"),
            format!("{target:?}"),
            format!("{:?}", account.token),
            format!("{:?}", account.keys),
            format!("{:?}", target.secret),
            format!("{:?}", target.url),
            format!("{}", target.url),
            format!("{:?}", config.server.tls),
        ];
        for text in &shown {
            for secret in &secrets {
                assert!(!text.contains(secret.as_str()), "{secret:?} in {text}");
            }
        }
        assert!(shown[0].contains("<redacted>"), "{}", shown[0]);
    }
}
