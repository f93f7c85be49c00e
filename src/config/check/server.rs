//! `[server]` (with `[server.tls]`), `[log]` and `[admin]`: the listeners and the process.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::{Checker, MAX_AGE_S, MAX_TIMEOUT_MS};
use crate::config::raw::{RawAdmin, RawLog, RawServer};
use crate::config::{Admin, Log, Server, Tls};

/// WeChat cuts the connection after 5 s.
const WECHAT_DEADLINE_MS: u64 = 5000;
/// WeChat's pushes are a few KiB; a larger limit only helps a flood.
const MAX_BODY_LIMIT: u64 = 1 << 20;
/// The most of any count limit: far above need, and within what a semaphore holds.
const MAX_PERMITS: u64 = 1 << 20;

impl Checker<'_> {
    /// `[server]` and its `[server.tls]` (the certificate and key loaded now).
    pub(super) fn server(&mut self, raw: RawServer) -> Option<Server> {
        let listen = self.listen("server.listen", &raw.listen, "127.0.0.1:8080");
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
    pub(super) fn networks(&mut self, at: &str, raw: &[String]) -> Vec<IpNet> {
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

    /// `[log]`: the level must be a filter `EnvFilter` takes.
    pub(super) fn log(&mut self, raw: RawLog) -> Option<Log> {
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

    /// `[admin]`, when the section is there.
    pub(super) fn admin(&mut self, raw: RawAdmin) -> Option<Admin> {
        let listen = self.listen("admin.listen", &raw.listen, "127.0.0.1:9090")?;
        Some(Admin { listen })
    }

    /// A `listen` address; `example` is the one the problem shows.
    fn listen(&mut self, at: &str, text: &str, example: &str) -> Option<SocketAddr> {
        let addr = text.parse::<SocketAddr>();
        if addr.is_err() {
            self.problem(at, format!("{text:?} is not an address like {example}"));
        }
        addr.ok()
    }
}
