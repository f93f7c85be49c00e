//! What `wechat-relay check` prints: the effective configuration, one line per section,
//! account, target and route, secrets redacted.

use std::fmt;

use ipnet::IpNet;

use super::{Config, LogFormat, Reply};

impl fmt::Display for Config {
    /// The effective configuration, secrets redacted (what `wechat-relay check` prints).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.server;
        writeln!(
            f,
            "server: listen {}, reply deadline {} ms, max body {} bytes, timestamp skew {}, {} connections",
            s.listen,
            s.reply_deadline.as_millis(),
            s.max_body_bytes,
            s.timestamp_skew
                .map_or("off".to_owned(), |d| format!("{} s", d.as_secs())),
            s.max_connections
        )?;
        let networks = |list: &[IpNet], empty: &str| {
            if list.is_empty() {
                empty.to_owned()
            } else {
                list.iter()
                    .map(IpNet::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        writeln!(
            f,
            "connections: allow {}, trusted proxies {}, keep-alive {} ms, {} requests and {} s each",
            networks(&s.allow_ips, "everyone"),
            networks(&s.trusted_proxies, "none"),
            s.keepalive_timeout.as_millis(),
            s.max_requests_per_connection,
            s.max_connection_age.as_secs()
        )?;
        if let Some(tls) = &s.tls {
            writeln!(
                f,
                "tls: certificate {}, key {} <redacted>",
                tls.cert.display(),
                tls.key.display()
            )?;
        }
        writeln!(
            f,
            "log: {} at {}{}",
            match self.log.format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            },
            self.log.level,
            if self.log.content {
                ", message content included"
            } else {
                ""
            }
        )?;
        match &self.admin {
            Some(admin) => writeln!(f, "admin: {} (/healthz, /readyz, /metrics)", admin.listen)?,
            None => writeln!(f, "admin: off")?,
        }
        match (&self.store.path, &self.store.database) {
            (Some(path), _) => writeln!(
                f,
                "store: {} (SQLite, fsync on commit), dedupe window {} s",
                path.display(),
                self.store.dedupe_ttl.as_secs()
            )?,
            (None, Some(database)) => writeln!(
                f,
                "store: {} (PostgreSQL, shared; synchronous commit), dedupe window {} s, leases {} ms",
                database.shown,
                self.store.dedupe_ttl.as_secs(),
                self.store.lease.as_millis()
            )?,
            (None, None) => writeln!(
                f,
                "store: none, in memory: pending deliveries are lost on restart (set [store] path), dedupe window {} s",
                self.store.dedupe_ttl.as_secs()
            )?,
        }
        writeln!(
            f,
            "store budget: {} bytes, dead letters kept {} s",
            self.store.max_bytes,
            self.store.dead_letter_retention.as_secs()
        )?;
        for a in &self.accounts {
            writeln!(
                f,
                "account {}: POST/GET {} app_id {} mode {} token <redacted> keys {}",
                a.name,
                a.path,
                a.app_id,
                a.mode.as_str(),
                match a.keys.len() {
                    0 => "none",
                    1 => "current <redacted>",
                    _ => "current + previous <redacted>",
                }
            )?;
        }
        for t in &self.targets {
            writeln!(
                f,
                "target {}: {} {} timeout {} ms, {} at once, retry {}-{} ms, {} attempts, {} s max age{}",
                t.name,
                t.format.as_str(),
                t.url,
                t.timeout.as_millis(),
                t.concurrency,
                t.retry_initial.as_millis(),
                t.retry_max.as_millis(),
                t.max_attempts,
                t.max_age.as_secs(),
                if t.secret.is_some() {
                    ", signed with secret <redacted>"
                } else {
                    ""
                }
            )?;
        }
        for r in &self.routes {
            let list = |l: &Option<Vec<String>>| l.as_ref().map(|v| v.join("|"));
            let mut when = Vec::new();
            if let Some(a) = &r.account {
                when.push(format!("account={a}"));
            }
            if let Some(v) = list(&r.msg_type) {
                when.push(format!("msg_type={v}"));
            }
            if let Some(v) = list(&r.event) {
                when.push(format!("event={v}"));
            }
            if let Some(v) = r.ticket {
                when.push(format!("ticket={v}"));
            }
            if let Some(v) = list(&r.event_key) {
                when.push(format!("event_key={v}"));
            }
            if let Some(v) = list(&r.content) {
                when.push(format!("content={v}"));
            }
            let when = if when.is_empty() {
                "anything".to_owned()
            } else {
                when.join(" ")
            };
            let reply = match &r.reply {
                Reply::None => "success".to_owned(),
                Reply::Target(t) => format!("from {t}"),
                Reply::Text(_) => "fixed text".to_owned(),
            };
            writeln!(
                f,
                "route {}: when {when} -> {} (reply {reply})",
                r.name,
                r.to.join(", ")
            )?;
        }
        Ok(())
    }
}
