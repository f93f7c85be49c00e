//! relay.toml: the raw serde shape, loading (the file, then `WECHAT_RELAY_*` environment
//! overrides, then secrets from files), and validation into a checked [`Config`].
//!
//! Validation collects every problem with its key path (`route[2].reply: "shop" is not in to`)
//! so that an operator fixes the file in one pass; nothing is bound before it passes.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use ipnet::IpNet;
use serde::Deserialize;

use zeroize::Zeroizing;

pub use crate::secret::Secret;
use crate::wechat::crypto::AesKey;

mod env;
mod file_mode;
mod raw;
mod summary;
mod target_url;

pub use env::ENV_PREFIX;

use raw::{RawAccount, RawAdmin, RawLog, RawRoute, RawServer, RawStore, RawTarget};

pub use target_url::{TargetUrl, UrlError};

/// Set by systemd to the folder of the unit's `LoadCredential=` files.
const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
const SECTIONS: [&str; 7] = [
    "server", "store", "log", "admin", "account", "target", "route",
];
/// WeChat cuts the connection after 5 s.
const WECHAT_DEADLINE_MS: u64 = 5000;
/// WeChat's pushes are a few KiB; a larger limit only helps a flood.
const MAX_BODY_LIMIT: u64 = 1 << 20;
/// A forward that takes longer than this is not coming back.
const MAX_TIMEOUT_MS: u64 = 300_000;
/// The most of any count limit: far above need, and within what a semaphore holds.
const MAX_PERMITS: u64 = 1 << 20;
/// PROTOCOL.md §6: keep dedupe keys for at least 60 s (WeChat retries for about 15 s).
const MIN_DEDUPE_TTL_S: u64 = 60;
/// A week: the store holds a key (and its answer) per push for this long.
const MAX_DEDUPE_TTL_S: u64 = 7 * 86_400;
/// The store's budget: at least 1 MiB.
const MIN_STORE_BYTES: u64 = 1 << 20;
/// Dead letters are kept 1 s to a year (0, "for ever", is refused: the store is bounded).
const MAX_DEAD_LETTER_RETENTION_S: u64 = 365 * 86_400;
/// Deliveries at once to one target.
const MAX_CONCURRENCY: u64 = 1024;
/// A year: the most a delivery may be retried for.
const MAX_AGE_S: u64 = 365 * 86_400;

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
    /// How long a push's dedupe key (and the answer WeChat got) is kept.
    pub dedupe_ttl: Duration,
    /// Past this many bytes a push that needs a delivery is answered 503.
    pub max_bytes: u64,
    /// Dead letters older than this are purged in the background.
    pub dead_letter_retention: Duration,
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

#[derive(Debug, Clone)]
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
    /// The HMAC key decoded from `whsec_...` (json targets only).
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

#[derive(Debug, Clone)]
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
            return Err(ConfigError(vec![format!(
                "{}: cannot read: {e}",
                path.display()
            )]));
        }
        let mut root = Figment::from(Toml::file_exact(path))
            .extract::<Dict>()
            .map_err(|e| ConfigError(vec![format!("{}: {}", path.display(), toml_error(&e))]))?;
        let mut problems = Vec::new();
        env::apply_env(&mut root, env, &mut problems);
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let credentials = env
            .iter()
            .find(|(name, _)| name == CREDENTIALS_DIRECTORY)
            .map(|(_, value)| PathBuf::from(value));
        let mut checker = Checker::new(base, problems, credentials);
        checker.warn_loose_mode("relay.toml", path);
        checker.check(root)
    }
}

/// A TOML error without the source line it quotes (that line may be a secret): the position
/// and the reason.
fn toml_error(error: &figment::Error) -> String {
    let reason = error
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.contains('|'))
        .collect::<Vec<_>>()
        .join(": ");
    if reason.is_empty() {
        "not valid TOML".to_owned()
    } else {
        reason
    }
}

// ---- validation --------------------------------------------------------------------------

/// A serde error without the value that caused it: the value may be a token or a key.
fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::InvalidType(actual, expected) => {
            let found = match actual {
                figment::error::Actual::Bool(_) => "a boolean",
                figment::error::Actual::Signed(_) | figment::error::Actual::Unsigned(_) => {
                    "an integer"
                }
                figment::error::Actual::Float(_) => "a number",
                figment::error::Actual::Str(_) | figment::error::Actual::Char(_) => "a string",
                figment::error::Actual::Seq => "a list",
                figment::error::Actual::Map => "a table",
                _ => "another type",
            };
            format!("expected {expected}, found {found}")
        }
        Kind::InvalidValue(_, expected) => format!("invalid value, expected {expected}"),
        other => other.to_string(),
    }
}

/// The `name` (or another string key) of every table in an array, parsed or not.
fn strings_in(root: &Dict, section: &str, key: &str) -> Vec<String> {
    match root.get(section) {
        Some(Value::Array(_, items)) => items
            .iter()
            .filter_map(|item| item.as_dict()?.get(key)?.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// A problem has been recorded already; nothing more to say about this value.
struct Reported;

struct Checker<'a> {
    base: &'a Path,
    problems: Vec<String>,
    warnings: Vec<String>,
    /// `$CREDENTIALS_DIRECTORY`, set by systemd for `LoadCredential=`.
    credentials: Option<PathBuf>,
}

impl<'a> Checker<'a> {
    fn new(base: &'a Path, problems: Vec<String>, credentials: Option<PathBuf>) -> Self {
        Self {
            base,
            problems,
            warnings: Vec::new(),
            credentials,
        }
    }

    /// A `_file` path: `${CREDENTIALS_DIRECTORY}/name` is systemd's credential `name`; a
    /// relative path is relative to the config file's folder.
    fn secret_path(&self, file: &Path) -> Result<PathBuf, String> {
        let placeholder = format!("${{{CREDENTIALS_DIRECTORY}}}");
        let Ok(rest) = file.strip_prefix(&placeholder) else {
            return Ok(self.base.join(file));
        };
        match &self.credentials {
            Some(dir) => Ok(dir.join(rest)),
            None => Err(format!(
                "{placeholder} is not set (systemd sets it for a unit with LoadCredential=)"
            )),
        }
    }

    fn problem(&mut self, at: impl fmt::Display, why: impl fmt::Display) {
        self.problems.push(format!("{at}: {why}"));
    }

    /// Something allowed that is probably a mistake: said by `check` and at start.
    fn warn(&mut self, at: impl fmt::Display, why: impl fmt::Display) {
        self.warnings.push(format!("{at}: {why}"));
    }

    /// Warns when others can read `path`, or anyone but its owner can write it.
    fn warn_loose_mode(&mut self, at: impl fmt::Display, path: &Path) {
        if let Some(why) = file_mode::loose_mode(path) {
            self.warn(at, why);
        }
    }

    fn check(mut self, mut root: Dict) -> Result<Config, ConfigError> {
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                self.problems.push(format!(
                    "{key}: unknown section (expected one of {})",
                    SECTIONS.join(", ")
                ));
            }
        }
        let server = self.section::<RawServer>(&mut root, "server");
        let log = self.section::<RawLog>(&mut root, "log");
        let admin = root
            .remove("admin")
            .map(|value| self.raw::<RawAdmin>("admin", &value));
        let store = self.section::<RawStore>(&mut root, "store");
        // Names and paths come from every entry as written, parsed or not, so that one broken
        // target does not also show up as "not a [[target]] name" in each route that names it.
        let account_names = strings_in(&root, "account", "name");
        let account_paths = strings_in(&root, "account", "path");
        let target_names = strings_in(&root, "target", "name");
        let route_names = strings_in(&root, "route", "name");
        let raw_accounts: Vec<Option<RawAccount>> = self.list(&mut root, "account");
        let raw_targets: Vec<Option<RawTarget>> = self.list(&mut root, "target");
        let raw_routes: Vec<Option<RawRoute>> = self.list(&mut root, "route");
        if raw_accounts.is_empty() {
            self.problem("account", "at least one [[account]] is required");
        }
        self.unique("account", "name", &account_names);
        self.unique("account", "path", &account_paths);
        self.unique("target", "name", &target_names);
        self.unique("route", "name", &route_names);

        let server = server.and_then(|s| self.server(s));
        let store = store.and_then(|s| self.store(s));
        if let (Some(server), Some(store)) = (&server, &store) {
            self.replay_window(server, store);
        }
        let log = log.and_then(|l| self.log(l));
        let admin = match admin {
            None => Some(None),
            Some(raw) => raw.and_then(|a| self.admin(a)).map(Some),
        };
        let accounts: Vec<Option<Account>> = raw_accounts
            .into_iter()
            .enumerate()
            .map(|(i, a)| a.and_then(|a| self.account(i, a)))
            .collect();
        let targets: Vec<Option<Target>> = raw_targets
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.and_then(|t| self.target(i, t)))
            .collect();
        let routes: Vec<Option<Route>> = raw_routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.and_then(|r| self.route(i, r, &account_names, &target_names)))
            .collect();

        if !self.problems.is_empty() {
            return Err(ConfigError(self.problems));
        }
        match (server, store, log, admin) {
            (Some(server), Some(store), Some(log), Some(admin)) => Ok(Config {
                server,
                store,
                log,
                admin,
                accounts: accounts.into_iter().flatten().collect(),
                targets: targets.into_iter().flatten().collect(),
                routes: routes.into_iter().flatten().collect(),
                warnings: self.warnings,
            }),
            _ => Err(ConfigError(vec!["invalid config".into()])),
        }
    }

    fn raw<T: for<'de> Deserialize<'de>>(&mut self, at: &str, value: &Value) -> Option<T> {
        match value.deserialize::<T>() {
            Ok(raw) => Some(raw),
            Err(e) => {
                for error in e {
                    let mut at = at.to_owned();
                    for key in &error.path {
                        at.push('.');
                        at.push_str(key);
                    }
                    self.problem(at, describe(&error.kind));
                }
                None
            }
        }
    }

    /// A section whose keys all have defaults: left out, it is all defaults.
    fn section<T: for<'de> Deserialize<'de> + Default>(
        &mut self,
        root: &mut Dict,
        section: &str,
    ) -> Option<T> {
        match root.remove(section) {
            Some(value) => self.raw::<T>(section, &value),
            None => Some(T::default()),
        }
    }

    /// Deserializes each element of an array of tables on its own, so that one bad element
    /// does not hide the problems of the next.
    fn list<T: for<'de> Deserialize<'de>>(
        &mut self,
        root: &mut Dict,
        section: &str,
    ) -> Vec<Option<T>> {
        match root.remove(section) {
            None => Vec::new(),
            Some(Value::Array(_, items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.raw::<T>(&format!("{section}[{i}]"), item))
                .collect(),
            Some(_) => {
                self.problem(
                    section,
                    format!("must be an array of tables: write [[{section}]]"),
                );
                Vec::new()
            }
        }
    }

    fn unique(&mut self, section: &str, key: &str, values: &[String]) {
        let mut seen: Vec<&String> = Vec::new();
        for value in values {
            if seen.contains(&value) {
                self.problem(section, format!("{key} {value:?} is used twice"));
            } else {
                seen.push(value);
            }
        }
    }

    fn server(&mut self, raw: RawServer) -> Option<Server> {
        let listen = match raw.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    "server.listen",
                    format!("{:?} is not an address like 127.0.0.1:8080", raw.listen),
                );
                None
            }
        };
        if raw.reply_deadline_ms == 0 || raw.reply_deadline_ms >= WECHAT_DEADLINE_MS {
            self.problem(
                "server.reply_deadline_ms",
                format!(
                    "must be between 1 and {} (WeChat gives up after 5 s), got {}",
                    WECHAT_DEADLINE_MS - 1,
                    raw.reply_deadline_ms
                ),
            );
        }
        self.range(
            "server.max_body_bytes",
            raw.max_body_bytes,
            512,
            MAX_BODY_LIMIT,
        );
        // tokio's semaphores hold at most usize::MAX >> 3 permits.
        self.range(
            "server.max_connections",
            raw.max_connections,
            1,
            MAX_PERMITS,
        );
        self.range(
            "server.keepalive_timeout_ms",
            raw.keepalive_timeout_ms,
            100,
            MAX_TIMEOUT_MS,
        );
        self.range(
            "server.max_requests_per_connection",
            raw.max_requests_per_connection,
            1,
            MAX_PERMITS,
        );
        self.range(
            "server.max_connection_age_s",
            raw.max_connection_age_s,
            1,
            MAX_AGE_S,
        );
        let allow_ips = self.networks("server.allow_ips", &raw.allow_ips);
        let trusted_proxies = self.networks("server.trusted_proxies", &raw.trusted_proxies);
        if raw.timestamp_skew_s == 0 {
            self.warn(
                "server.timestamp_skew_s",
                "0 turns the freshness check off: a captured push can be replayed at any time once its dedupe record has expired",
            );
        }
        let tls = raw.tls.and_then(|tls| {
            let paths = self
                .secret_path(&tls.cert)
                .and_then(|cert| Ok((cert, self.secret_path(&tls.key)?)));
            let (cert, key) = match paths {
                Ok(paths) => paths,
                Err(why) => {
                    self.problem("server.tls", why);
                    return None;
                }
            };
            match crate::tls::load_certified_key(&cert, &key) {
                Ok(certified) => {
                    self.warn_loose_mode("server.tls.key", &key);
                    Some(Tls {
                        cert,
                        key,
                        certified: Arc::new(certified),
                    })
                }
                Err(why) => {
                    self.problem("server.tls", why);
                    None
                }
            }
        });
        Some(Server {
            tls,
            listen: listen?,
            reply_deadline: Duration::from_millis(raw.reply_deadline_ms),
            max_body_bytes: usize::try_from(raw.max_body_bytes).unwrap_or(usize::MAX),
            timestamp_skew: (raw.timestamp_skew_s > 0)
                .then(|| Duration::from_secs(raw.timestamp_skew_s)),
            max_connections: usize::try_from(raw.max_connections).unwrap_or(1),
            allow_ips,
            trusted_proxies,
            keepalive_timeout: Duration::from_millis(raw.keepalive_timeout_ms),
            max_requests_per_connection: raw.max_requests_per_connection,
            max_connection_age: Duration::from_secs(raw.max_connection_age_s),
            shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
        })
    }

    /// A list of networks (`203.0.113.0/24`, `2001:db8::/32`) or single addresses.
    fn networks(&mut self, at: &str, raw: &[String]) -> Vec<IpNet> {
        let mut networks = Vec::with_capacity(raw.len());
        for (i, text) in raw.iter().enumerate() {
            let text = text.trim();
            match text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            {
                Ok(net) => networks.push(net.trunc()),
                Err(_) => self.problem(
                    format!("{at}[{i}]"),
                    format!("{text:?} is not an address or a network like 203.0.113.0/24"),
                ),
            }
        }
        networks
    }

    /// A push replayed inside `timestamp_skew_s` must still find its dedupe record: past
    /// `dedupe_ttl_s` it would be forwarded again.
    fn replay_window(&mut self, server: &Server, store: &Store) {
        let Some(skew) = server.timestamp_skew else {
            return;
        };
        if store.dedupe_ttl < skew {
            self.problem(
                "store.dedupe_ttl_s",
                format!(
                    "{} is shorter than server.timestamp_skew_s = {}: a push replayed after its dedupe record expired but inside the timestamp window would be forwarded again (make dedupe_ttl_s at least {})",
                    store.dedupe_ttl.as_secs(),
                    skew.as_secs(),
                    skew.as_secs()
                ),
            );
        }
    }

    /// Reports `value` outside `min..=max`.
    fn range(&mut self, at: &str, value: u64, min: u64, max: u64) {
        if !(min..=max).contains(&value) {
            self.problem(at, format!("must be {min} to {max}, got {value}"));
        }
    }

    fn log(&mut self, raw: RawLog) -> Option<Log> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.level) {
            self.problem(
                "log.level",
                format!(
                    "{:?} is not a level or filter (info, warn, wechat_relay=debug): {e}",
                    raw.level
                ),
            );
            return None;
        }
        Some(Log {
            format: raw.format,
            level: raw.level,
            content: raw.content,
        })
    }

    fn admin(&mut self, raw: RawAdmin) -> Option<Admin> {
        match raw.listen.parse::<SocketAddr>() {
            Ok(listen) => Some(Admin { listen }),
            Err(_) => {
                self.problem(
                    "admin.listen",
                    format!("{:?} is not an address like 127.0.0.1:9090", raw.listen),
                );
                None
            }
        }
    }

    fn store(&mut self, raw: RawStore) -> Option<Store> {
        let before = self.problems.len();
        self.range(
            "store.dedupe_ttl_s",
            raw.dedupe_ttl_s,
            MIN_DEDUPE_TTL_S,
            MAX_DEDUPE_TTL_S,
        );
        if raw.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            self.problem(
                "store.path",
                "must name a folder (leave it out to keep deliveries in memory)",
            );
        }
        let max_bytes = raw.budget();
        if max_bytes < MIN_STORE_BYTES {
            self.problem(
                "store.max_bytes",
                format!("must be at least {MIN_STORE_BYTES} (1 MiB), got {max_bytes}"),
            );
        }
        if raw.dead_letter_retention_s == 0 {
            self.problem(
                "store.dead_letter_retention_s",
                format!(
                    "0 would keep dead letters for ever: give 1 to {MAX_DEAD_LETTER_RETENTION_S} \
                     (a year), and purge by hand with `wechat-relay outbox purge` sooner"
                ),
            );
        } else {
            self.range(
                "store.dead_letter_retention_s",
                raw.dead_letter_retention_s,
                1,
                MAX_DEAD_LETTER_RETENTION_S,
            );
        }
        if self.problems.len() > before {
            return None;
        }
        Some(Store {
            path: raw.path.map(|p| self.base.join(p)),
            dedupe_ttl: Duration::from_secs(raw.dedupe_ttl_s),
            max_bytes,
            dead_letter_retention: Duration::from_secs(raw.dead_letter_retention_s),
        })
    }

    /// A secret given inline or as `<key>_file` (relative to the config's folder), not both,
    /// in memory that is zeroed on drop; a file that others can read is warned about.
    /// `Err` means a problem was already reported for it.
    fn secret(
        &mut self,
        at: &str,
        key: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
    ) -> Result<Option<Zeroizing<String>>, Reported> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.problem(at, format!("give {key} or {key}_file, not both"));
                Err(Reported)
            }
            (Some(value), None) => Ok(Some(Zeroizing::new(value))),
            (None, Some(file)) => {
                let path = match self.secret_path(&file) {
                    Ok(path) => path,
                    Err(why) => {
                        self.problem(format!("{at}.{key}_file"), why);
                        return Err(Reported);
                    }
                };
                match std::fs::read_to_string(&path).map(Zeroizing::new) {
                    Ok(text) => {
                        self.warn_loose_mode(format!("{at}.{key}_file"), &path);
                        Ok(Some(Zeroizing::new(text.trim().to_owned())))
                    }
                    Err(e) => {
                        self.problem(
                            format!("{at}.{key}_file"),
                            format!("cannot read {}: {e}", path.display()),
                        );
                        Err(Reported)
                    }
                }
            }
            (None, None) => Ok(None),
        }
    }

    fn name(&mut self, at: &str, name: &str) {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            self.problem(
                format!("{at}.name"),
                format!("{name:?} must be 1-64 of A-Z a-z 0-9 - _"),
            );
        }
    }

    fn account(&mut self, i: usize, raw: RawAccount) -> Option<Account> {
        let at = format!("account[{i}]");
        let before = self.problems.len();
        self.name(&at, &raw.name);
        if !raw.path.starts_with('/') || raw.path.contains(['?', '#', ' ']) {
            self.problem(
                format!("{at}.path"),
                format!(
                    "{:?} must be a URL path starting with / (no query)",
                    raw.path
                ),
            );
        }
        let app_id_ok = raw.app_id.len() == 18
            && raw.app_id.starts_with("wx")
            && raw.app_id[2..].bytes().all(|b| b.is_ascii_hexdigit());
        if !app_id_ok {
            self.problem(
                format!("{at}.app_id"),
                format!("{:?} must be wx followed by 16 hex digits", raw.app_id),
            );
        }
        let token = self.secret(&at, "token", raw.token, raw.token_file);
        match &token {
            Err(Reported) => {}
            Ok(None) => self.problem(format!("{at}.token"), "required (or token_file)"),
            Ok(Some(token)) => {
                let ok = (3..=32).contains(&token.len())
                    && token.bytes().all(|b| b.is_ascii_alphanumeric());
                if !ok {
                    let n = token.chars().count();
                    self.problem(
                        format!("{at}.token"),
                        format!(
                            "must be 3-32 letters or digits, got {n} character{}",
                            if n == 1 { "" } else { "s" }
                        ),
                    );
                }
            }
        }
        let key = self.secret(
            &at,
            "encoding_aes_key",
            raw.encoding_aes_key,
            raw.encoding_aes_key_file,
        );
        let previous = self.secret(
            &at,
            "previous_encoding_aes_key",
            raw.previous_encoding_aes_key,
            raw.previous_encoding_aes_key_file,
        );
        // A key that was given but could not be read counts as given: its problem is reported.
        let key_given = !matches!(key, Ok(None));
        let previous_given = !matches!(previous, Ok(None));
        let mut keys = Vec::new();
        for (key_name, value) in [
            ("encoding_aes_key", &key),
            ("previous_encoding_aes_key", &previous),
        ] {
            if let Ok(Some(value)) = value {
                match AesKey::from_encoding_aes_key(value) {
                    Ok(k) => keys.push(k),
                    Err(e) => self.problem(format!("{at}.{key_name}"), e),
                }
            }
        }
        if !key_given && previous_given {
            self.problem(
                format!("{at}.previous_encoding_aes_key"),
                "needs encoding_aes_key too",
            );
        }
        let mode = raw.mode.unwrap_or(if key_given {
            Mode::Safe
        } else {
            Mode::Plaintext
        });
        if mode != Mode::Plaintext && !key_given {
            self.problem(
                format!("{at}.encoding_aes_key"),
                format!("required in {} mode", mode.as_str()),
            );
        }
        if self.problems.len() > before {
            return None;
        }
        Some(Account {
            name: raw.name,
            path: raw.path,
            app_id: raw.app_id,
            token: Secret::from(token.ok()??),
            keys,
            mode,
        })
    }

    fn target(&mut self, i: usize, raw: RawTarget) -> Option<Target> {
        let at = format!("target[{i}]");
        let before = self.problems.len();
        self.name(&at, &raw.name);
        // The text may hold a password: zeroed once parsed.
        let url = match Zeroizing::new(raw.url).parse::<TargetUrl>() {
            Ok(url) => Some(url),
            Err(why) => {
                self.problem(format!("{at}.url"), why);
                None
            }
        };
        self.range(
            &format!("{at}.timeout_ms"),
            raw.timeout_ms,
            1,
            MAX_TIMEOUT_MS,
        );
        self.range(
            &format!("{at}.concurrency"),
            raw.concurrency,
            1,
            MAX_CONCURRENCY,
        );
        self.range(
            &format!("{at}.retry_initial_ms"),
            raw.retry_initial_ms,
            1,
            MAX_AGE_S * 1000,
        );
        self.range(
            &format!("{at}.retry_max_ms"),
            raw.retry_max_ms,
            raw.retry_initial_ms,
            MAX_AGE_S * 1000,
        );
        self.range(
            &format!("{at}.max_attempts"),
            raw.max_attempts,
            1,
            u64::from(u32::MAX),
        );
        self.range(&format!("{at}.max_age_s"), raw.max_age_s, 1, MAX_AGE_S);
        let Ok(secret) = self.secret(&at, "secret", raw.secret, raw.secret_file) else {
            return None;
        };
        let secret = match (raw.format, secret) {
            (ForwardFormat::Json, None) => {
                self.problem(
                    format!("{at}.secret"),
                    "required for format = \"json\" (a Standard Webhooks secret, whsec_...)",
                );
                None
            }
            (ForwardFormat::Json, Some(secret)) => {
                let decoded = secret
                    .strip_prefix("whsec_")
                    .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
                    .map(Secret::new)
                    .filter(|key| key.expose().len() >= 16);
                if decoded.is_none() {
                    self.problem(
                        format!("{at}.secret"),
                        "must be \"whsec_\" followed by the base64 of a key of at least 16 bytes",
                    );
                }
                decoded
            }
            (format, Some(_)) => {
                self.problem(
                    format!("{at}.secret"),
                    format!(
                        "only format = \"json\" signs its requests, this target is {:?}",
                        format.as_str()
                    ),
                );
                None
            }
            (_, None) => None,
        };
        if self.problems.len() > before {
            return None;
        }
        Some(Target {
            name: raw.name,
            url: url?,
            format: raw.format,
            timeout: Duration::from_millis(raw.timeout_ms),
            secret,
            concurrency: usize::try_from(raw.concurrency).unwrap_or(1),
            retry_initial: Duration::from_millis(raw.retry_initial_ms),
            retry_max: Duration::from_millis(raw.retry_max_ms),
            max_attempts: u32::try_from(raw.max_attempts).unwrap_or(u32::MAX),
            max_age: Duration::from_secs(raw.max_age_s),
        })
    }

    fn route(
        &mut self,
        i: usize,
        raw: RawRoute,
        accounts: &[String],
        targets: &[String],
    ) -> Option<Route> {
        let at = format!("route[{i}]");
        let before = self.problems.len();
        if let Some(name) = &raw.name {
            self.name(&at, name);
        }
        if let Some(account) = &raw.account
            && !accounts.contains(account)
        {
            self.problem(
                format!("{at}.account"),
                format!("{account:?} is not an [[account]] name"),
            );
        }
        for (key, list) in [
            ("msg_type", &raw.msg_type),
            ("event", &raw.event),
            ("event_key", &raw.event_key),
            ("content", &raw.content),
        ] {
            if list.as_ref().is_some_and(Vec::is_empty) {
                self.problem(
                    format!("{at}.{key}"),
                    "an empty list matches nothing: leave the key out to match anything",
                );
            }
        }
        if raw.to.is_empty() {
            self.problem(format!("{at}.to"), "must name at least one target");
        }
        let mut seen = Vec::new();
        for name in &raw.to {
            if !targets.contains(name) {
                self.problem(
                    format!("{at}.to"),
                    format!("{name:?} is not a [[target]] name"),
                );
            }
            if seen.contains(&name) {
                self.problem(format!("{at}.to"), format!("{name:?} is listed twice"));
            }
            seen.push(name);
        }
        let reply = match (raw.reply, raw.reply_text) {
            (Some(_), Some(_)) => {
                self.problem(&at, "give reply or reply_text, not both");
                Reply::None
            }
            (Some(target), None) => {
                if !raw.to.contains(&target) {
                    self.problem(format!("{at}.reply"), format!("{target:?} is not in to"));
                }
                Reply::Target(target)
            }
            (None, Some(text)) => {
                if text.is_empty() {
                    self.problem(format!("{at}.reply_text"), "must not be empty");
                }
                Reply::Text(text)
            }
            (None, None) => Reply::None,
        };
        if self.problems.len() > before {
            return None;
        }
        Some(Route {
            name: raw.name.unwrap_or(at),
            account: raw.account,
            msg_type: raw.msg_type,
            event: raw.event,
            ticket: raw.ticket,
            event_key: raw.event_key,
            content: raw.content,
            to: raw.to,
            reply,
        })
    }
}

#[cfg(test)]
mod tests {
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
