//! relay.toml as written: the serde shape of each section, with every default beside its
//! field. Nothing here is checked; [`super::check`] turns these into the checked types.
//!
//! A section whose keys all have defaults (`[server]`, `[log]`, `[store]`) is
//! `#[serde(default)]` with a `Default` impl, which is also what a missing section is. A
//! `[[target]]` has keys that must be given (`name`, `url`), so its defaults stand on each
//! field as [`number`].

use std::path::PathBuf;

use serde::Deserialize;

use super::{ForwardFormat, LogFormat};

/// The default of a numeric key: `#[serde(default = "number::<3000>")]`.
const fn number<const N: u64>() -> u64 {
    N
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawServer {
    pub listen: String,
    pub reply_deadline_ms: u64,
    pub max_body_bytes: u64,
    pub timestamp_skew_s: u64,
    pub max_connections: u64,
    pub allow_ips: Vec<String>,
    pub trusted_proxies: Vec<String>,
    pub keepalive_timeout_ms: u64,
    pub max_requests_per_connection: u64,
    pub max_connection_age_s: u64,
    pub shutdown_grace_ms: u64,
    pub tls: Option<RawTls>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            reply_deadline_ms: 4500,
            max_body_bytes: 65536,
            timestamp_skew_s: 300,
            max_connections: 1024,
            allow_ips: Vec::new(),
            trusted_proxies: Vec::new(),
            keepalive_timeout_ms: 15_000,
            max_requests_per_connection: 1000,
            max_connection_age_s: 3600,
            shutdown_grace_ms: 10_000,
            tls: None,
        }
    }
}

/// `[server.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawLog {
    pub format: LogFormat,
    pub level: String,
    pub content: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            content: false,
        }
    }
}

/// `[admin]`: no defaults, the section itself turns the listener on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub listen: String,
}

/// `[store]`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawStore {
    pub path: Option<PathBuf>,
    /// PostgreSQL: `postgres://user@host:port/db` (or libpq's key=value and socket forms).
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    /// PEM: the CA the database's certificate must chain to, instead of the Web PKI roots.
    pub ca_file: Option<PathBuf>,
    pub lease_ms: u64,
    pub dedupe_ttl_s: u64,
    /// By backend when not given: see [`RawStore::budget`].
    pub max_bytes: Option<u64>,
    pub dead_letter_retention_s: u64,
}

/// The store's budget when `max_bytes` is not given: 1 GiB on disk (SQLite or PostgreSQL),
/// 64 MiB in memory.
const DEFAULT_SQLITE_BYTES: u64 = 1 << 30;
const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;

impl Default for RawStore {
    fn default() -> Self {
        Self {
            path: None,
            url: None,
            password_file: None,
            ca_file: None,
            lease_ms: 30_000,
            dedupe_ttl_s: 300,
            max_bytes: None,
            dead_letter_retention_s: 7 * 86_400,
        }
    }
}

impl RawStore {
    /// `max_bytes`, or the default of the backend `path` selects.
    pub fn budget(&self) -> u64 {
        self.max_bytes.unwrap_or(match (&self.path, &self.url) {
            (None, None) => DEFAULT_MEMORY_BYTES,
            _ => DEFAULT_SQLITE_BYTES,
        })
    }
}

/// `[[account]]`: every secret inline or as `<key>_file`; the mode by default follows the key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    pub name: String,
    pub path: String,
    pub app_id: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub encoding_aes_key: Option<String>,
    pub encoding_aes_key_file: Option<PathBuf>,
    pub previous_encoding_aes_key: Option<String>,
    pub previous_encoding_aes_key_file: Option<PathBuf>,
    /// Text, checked beside the other keys: a misspelt mode must not hide their problems.
    pub mode: Option<String>,
}

/// `[[target]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub name: String,
    pub url: String,
    /// `raw`, [`ForwardFormat`]'s default.
    #[serde(default)]
    pub format: ForwardFormat,
    #[serde(default = "number::<3000>")]
    pub timeout_ms: u64,
    /// Standard Webhooks headers on a `raw` or `plain` target's requests (a `json` target's
    /// always have them).
    pub sign: Option<bool>,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    #[serde(default = "number::<16>")]
    pub concurrency: u64,
    #[serde(default = "number::<1000>")]
    pub retry_initial_ms: u64,
    #[serde(default = "number::<300_000>")]
    pub retry_max_ms: u64,
    #[serde(default = "number::<20>")]
    pub max_attempts: u64,
    #[serde(default = "number::<86_400>")]
    pub max_age_s: u64,
}

/// `[[route]]`: a matcher left out matches anything.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub name: Option<String>,
    pub account: Option<String>,
    pub msg_type: Option<Vec<String>>,
    pub event: Option<Vec<String>>,
    pub ticket: Option<bool>,
    pub event_key: Option<Vec<String>>,
    pub content: Option<Vec<String>>,
    pub to: Vec<String>,
    pub reply: Option<String>,
    pub reply_text: Option<String>,
}

#[cfg(test)]
mod tests {
    use figment::value::{Dict, Value};

    use super::*;

    fn table(keys: &[(&str, &str)]) -> Value {
        let mut table = Dict::new();
        for (key, value) in keys {
            table.insert((*key).to_owned(), Value::from(*value));
        }
        Value::from(table)
    }

    fn from_table<T: for<'de> Deserialize<'de>>(keys: &[(&str, &str)]) -> T {
        table(keys).deserialize::<T>().expect("deserializes")
    }

    /// The defaults relay.toml and docs/configuration.md document, for a section given with no keys.
    #[test]
    fn keys_left_out_take_the_documented_defaults() {
        let server: RawServer = from_table(&[]);
        assert_eq!(server.listen, "127.0.0.1:8080");
        assert_eq!(
            [
                server.reply_deadline_ms,
                server.max_body_bytes,
                server.timestamp_skew_s,
                server.max_connections,
                server.keepalive_timeout_ms,
                server.max_requests_per_connection,
                server.max_connection_age_s,
                server.shutdown_grace_ms,
            ],
            [4500, 65536, 300, 1024, 15_000, 1000, 3600, 10_000]
        );
        assert!(server.allow_ips.is_empty() && server.trusted_proxies.is_empty());
        assert!(server.tls.is_none());

        let log: RawLog = from_table(&[]);
        assert_eq!(
            (log.format, log.level.as_str(), log.content),
            (LogFormat::Text, "info", false)
        );

        let store: RawStore = from_table(&[]);
        assert_eq!(store.path, None);
        assert_eq!(
            [
                store.dedupe_ttl_s,
                store.dead_letter_retention_s,
                store.budget()
            ],
            [300, 604_800, 64 << 20]
        );
        let on_disk: RawStore = from_table(&[("path", "data")]);
        assert_eq!(on_disk.budget(), 1 << 30);

        let target: RawTarget = from_table(&[("name", "t"), ("url", "http://127.0.0.1/")]);
        assert_eq!(target.format, ForwardFormat::Raw);
        assert_eq!(
            [
                target.timeout_ms,
                target.concurrency,
                target.retry_initial_ms,
                target.retry_max_ms,
                target.max_attempts,
                target.max_age_s,
            ],
            [3000, 16, 1000, 300_000, 20, 86_400]
        );
    }

    /// Defaults do not make a required key optional.
    #[test]
    fn a_target_without_name_or_url_is_refused() {
        for keys in [[("name", "t")], [("url", "http://127.0.0.1/")]] {
            assert!(table(&keys).deserialize::<RawTarget>().is_err());
        }
    }
}
