//! `[store]`, and its dedupe window against the server's replay window.

use std::time::Duration;

use super::Checker;
use crate::config::raw::RawStore;
use crate::config::{Database, Server, Store};

/// PROTOCOL.md §6: keep dedupe keys for at least 60 s (WeChat retries for about 15 s).
const MIN_DEDUPE_TTL_S: u64 = 60;
/// A week: the store holds a key (and its answer) per push for this long.
const MAX_DEDUPE_TTL_S: u64 = 7 * 86_400;
/// The store's budget: at least 1 MiB.
const MIN_STORE_BYTES: u64 = 1 << 20;
/// A delivery or a push a relay took is its own for 1 s to 10 min before another may take it.
const MIN_LEASE_MS: u64 = 1_000;
const MAX_LEASE_MS: u64 = 600_000;
/// Dead letters are kept 1 s to a year (0, "for ever", is refused: the store is bounded).
const MAX_DEAD_LETTER_RETENTION_S: u64 = 365 * 86_400;

impl Checker<'_> {
    /// A push replayed inside `timestamp_skew_s` must still find its dedupe record: past
    /// `dedupe_ttl_s` it would be forwarded again.
    pub(super) fn replay_window(&mut self, server: &Server, store: &Store) {
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

    /// `[store]`: the window, the folder, the budget (by backend when not given), retention.
    pub(super) fn store(&mut self, raw: RawStore) -> Option<Store> {
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
        if raw.path.is_some() && raw.url.is_some() {
            self.problem(
                "store",
                "give path (SQLite, one relay) or url (PostgreSQL, shared by several), not both",
            );
        }
        self.range("store.lease_ms", raw.lease_ms, MIN_LEASE_MS, MAX_LEASE_MS);
        let database = match &raw.url {
            Some(url) => self.database(url, raw.password_file.clone(), raw.ca_file.as_deref()),
            None => {
                for (key, given) in [
                    ("password_file", raw.password_file.is_some()),
                    ("ca_file", raw.ca_file.is_some()),
                ] {
                    if given {
                        self.problem(
                            format!("store.{key}"),
                            "is for [store] url (PostgreSQL), which is not given",
                        );
                    }
                }
                None
            }
        };
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
            database,
            lease: Duration::from_millis(raw.lease_ms),
            dedupe_ttl: Duration::from_secs(raw.dedupe_ttl_s),
            max_bytes,
            dead_letter_retention: Duration::from_secs(raw.dead_letter_retention_s),
        })
    }

    /// `[store] url` (a URL or libpq's `key=value` form) with the password of
    /// `password_file`, which the URL must then not also hold.
    fn database(
        &mut self,
        url: &str,
        password_file: Option<std::path::PathBuf>,
        ca_file: Option<&std::path::Path>,
    ) -> Option<Database> {
        let mut config = match url.parse::<tokio_postgres::Config>() {
            Ok(config) => config,
            Err(e) => {
                // The parser names the option it could not read, never a value.
                self.problem(
                    "store.url",
                    format!(
                        "must be a PostgreSQL URL (postgres://user@host:port/db, or postgres:///db?host=/run/postgresql for the socket): {e}"
                    ),
                );
                return None;
            }
        };
        let shown = shown(&config);
        if config.get_hosts().is_empty() {
            self.problem(
                "store.url",
                "names no host: postgres://user@host:port/db, or host=/run/postgresql for the socket",
            );
        }
        if config.get_user().is_none() {
            self.problem("store.url", "names no user: postgres://user@host:port/db");
        }
        if config.get_dbname().is_none() {
            self.problem(
                "store.url",
                "names no database: postgres://user@host:port/db",
            );
        }
        let in_url = config.get_password().is_some();
        match self.secret("store", "password", None, password_file) {
            Ok(Some(_)) if in_url => {
                self.problem(
                    "store.password_file",
                    "the url holds a password too: give it in one place (password_file)",
                );
            }
            Ok(Some(password)) => {
                config.password(password.as_bytes());
            }
            Ok(None) if in_url => self.warn(
                "store.url",
                "holds the database password: keep it in password_file (or a systemd credential) instead",
            ),
            Ok(None) | Err(_) => {}
        }
        let roots = match ca_file.map(|file| crate::tls::load_roots(&self.base.join(file))) {
            None => None,
            Some(Ok(roots)) => Some(roots),
            Some(Err(why)) => {
                self.problem("store.ca_file", why);
                None
            }
        };
        Some(Database {
            config,
            shown,
            roots,
        })
    }
}

/// What a database config names, without its password: `postgres://user@host:port/db`.
pub(in crate::config) fn shown(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            };
            // One port for every host, or one each.
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or("-"),
        hosts.join(","),
        config.get_dbname().unwrap_or("-")
    )
}
