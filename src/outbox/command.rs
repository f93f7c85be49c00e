//! The `wechat-relay outbox` commands, on the store the config names. They open the store as a
//! tool (it must exist; the server may be running: SQLite serialises the writes) and print
//! one line per item, `key=value`, for operators and for grep. A list with nothing in it says
//! so on stderr, so that a pipe reads nothing.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use http::header::AUTHORIZATION;
use serde::Serialize;

use super::now_ms;
use super::sqlite::Role;
use super::store::{DeliveryInfo, Filter, Selection, StoreError, StoredDelivery};
use crate::cli::OutboxCommand;
use crate::config::Config;
use crate::forward::{Forwarder, unix_now};

/// Signed at send time, with the target's secret: `show` prints this instead.
const SIGNATURE_HEADER: &str = "webhook-signature";

/// What a command prints: `out` on stdout, `note` (if any) on stderr.
#[derive(Debug, Default)]
pub struct Printed {
    pub out: String,
    pub note: Option<String>,
}

/// Why a command did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Nothing matched (an unknown id).
    #[error("{0}")]
    NotFound(String),
    /// The command line asks for something the command will not do as given.
    #[error("{0}")]
    Usage(String),
    /// What was read could not be printed.
    #[error("{0}")]
    Output(String),
}

/// Runs `command` and returns what to print.
pub async fn run(config: &Config, command: &OutboxCommand) -> Result<Printed, CommandError> {
    if !config.store.durable() {
        return Err(StoreError::Open(
            "the config has no [store] path or url: deliveries are in the running relay's memory only"
                .into(),
        )
        .into());
    }
    let store = super::open_store(config, Role::Tool).await?;
    let mut printed = Printed::default();
    let out = &mut printed.out;
    let now = now_ms();
    match command {
        OutboxCommand::Stats { json } => {
            let stats = store.stats().await?;
            let mut names: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
            for t in &stats.targets {
                if !names.contains(&t.target.as_str()) {
                    names.push(&t.target);
                }
            }
            let targets: Vec<TargetRow> = names
                .into_iter()
                .map(|name| {
                    let t = stats.targets.iter().find(|t| t.target == name);
                    TargetRow {
                        target: name.to_owned(),
                        configured: config.targets.iter().any(|c| c.name == name),
                        pending: t.map_or(0, |t| t.pending),
                        dead: t.map_or(0, |t| t.dead),
                        oldest_pending_age_s: t
                            .and_then(|t| t.oldest_pending_age(now))
                            .map(|age| age.as_secs()),
                    }
                })
                .collect();
            let document = StatsDocument {
                targets,
                dedupe_keys: stats.dedupe_keys,
            };
            if *json {
                write_json(out, &document)?;
            } else {
                document.write(out);
            }
        }
        OutboxCommand::List { dead, target, json } => {
            let filter = Filter {
                dead: *dead,
                target: target.clone(),
            };
            let deliveries: Vec<Listed> = store
                .list(filter)
                .await?
                .iter()
                .map(|d| Listed::new(d, *dead, now))
                .collect();
            if *json {
                let document = ListDocument {
                    state: if *dead { "dead" } else { "pending" },
                    target: target.clone(),
                    deliveries,
                };
                write_json(out, &document)?;
            } else if deliveries.is_empty() {
                let what = if *dead {
                    "no dead letters"
                } else {
                    "no pending deliveries"
                };
                printed.note = Some(match target {
                    Some(target) => format!("{what} for target {target}"),
                    None => what.to_owned(),
                });
            } else {
                for delivery in &deliveries {
                    let _ = writeln!(out, "{}", delivery.line());
                }
            }
        }
        OutboxCommand::Show { id, content, json } => {
            let Some(stored) = store.get(*id).await? else {
                return Err(CommandError::NotFound(format!("no delivery with id {id}")));
            };
            let shown = Shown::new(config, &stored, *content, now);
            if *json {
                write_json(out, &shown)?;
            } else {
                shown.write(out);
            }
        }
        OutboxCommand::Replay {
            id,
            dead,
            target,
            json,
        } => {
            let selection = match (id, dead) {
                (Some(id), _) => Selection::Id(*id),
                (None, true) => Selection::Dead {
                    target: target.clone(),
                },
                (None, false) => Selection::Pending {
                    target: target.clone(),
                },
            };
            let count = store.replay(selection, now).await?;
            if let (0, Some(id)) = (count, id) {
                return Err(CommandError::NotFound(format!("no delivery with id {id}")));
            }
            if *json {
                write_json(out, &serde_json::json!({ "replayed": count }))?;
            } else {
                let _ = writeln!(
                    out,
                    "replayed={count} (due now; a running relay picks them up within a second)"
                );
            }
        }
        OutboxCommand::Drop {
            id,
            target,
            yes,
            json,
        } => {
            let (selection, what) = match (id, target) {
                (Some(id), _) => match store.get(*id).await? {
                    Some(stored) if !stored.dead => {
                        (Selection::Id(*id), format!("pending delivery {id}"))
                    }
                    Some(_) => {
                        return Err(CommandError::NotFound(format!(
                            "{id} is a dead letter, not a pending delivery: `outbox purge --dead` deletes dead letters"
                        )));
                    }
                    None => {
                        return Err(CommandError::NotFound(format!(
                            "no pending delivery with id {id}"
                        )));
                    }
                },
                (None, target) => {
                    let stats = store.stats().await?;
                    let pending: u64 = stats
                        .targets
                        .iter()
                        .filter(|t| target.as_ref().is_none_or(|name| *name == t.target))
                        .map(|t| t.pending)
                        .sum();
                    let of = target.as_deref().unwrap_or("every target");
                    (
                        Selection::Pending {
                            target: target.clone(),
                        },
                        format!("{pending} pending deliveries of {of}"),
                    )
                }
            };
            if !*yes {
                return Err(CommandError::Usage(format!(
                    "not dropped: this deletes the {what} for good; run it again with --yes"
                )));
            }
            let count = store.discard(selection).await?;
            if *json {
                write_json(out, &serde_json::json!({ "dropped": count }))?;
            } else {
                let _ = writeln!(out, "dropped={count}");
            }
        }
        OutboxCommand::Purge {
            dead: _,
            older_than,
            target,
            json,
        } => {
            let before = older_than.map(|age| now.saturating_sub(millis(age)));
            let count = store.purge_dead(before, target.clone()).await?;
            if *json {
                write_json(out, &serde_json::json!({ "purged": count }))?;
            } else {
                let _ = writeln!(out, "purged={count}");
            }
        }
    }
    Ok(printed)
}

/// A delivery as `list` and `show` give it: the same fields in text and JSON.
#[derive(Debug, Serialize)]
struct Listed {
    id: i64,
    /// `pending` or `dead`.
    state: &'static str,
    target: String,
    account: String,
    event_id: String,
    msg_type: Option<String>,
    event: Option<String>,
    route: Option<String>,
    attempts: u32,
    /// Seconds since it was committed (or replayed).
    age_s: u64,
    enqueued_at: String,
    /// Pending: when the next attempt is due.
    next_attempt_at: Option<String>,
    /// Dead: when it died.
    died_at: Option<String>,
    last_error: Option<String>,
}

impl Listed {
    fn new(d: &DeliveryInfo, dead: bool, now: u64) -> Listed {
        Listed {
            id: d.id,
            state: if dead { "dead" } else { "pending" },
            target: d.target.clone(),
            account: d.account.clone(),
            event_id: d.event_id.clone(),
            msg_type: d.msg_type.clone(),
            event: d.event.clone(),
            route: d.route.clone(),
            attempts: d.attempts,
            age_s: now.saturating_sub(d.enqueued_ms) / 1000,
            enqueued_at: time(d.enqueued_ms),
            next_attempt_at: (!dead).then(|| time(d.at_ms)),
            died_at: dead.then(|| time(d.at_ms)),
            last_error: d.last_error.clone(),
        }
    }
}

/// One header of the request `show` prints.
#[derive(Debug, Serialize)]
struct Header {
    name: String,
    value: String,
}

/// The request a delivery's next attempt sends, as `show` prints it.
#[derive(Debug, Serialize)]
struct Request {
    method: String,
    /// The target's URL (its user info and own query redacted) with the query the relay adds.
    url: String,
    headers: Vec<Header>,
}

/// What `show` prints about a delivery.
#[derive(Debug, Serialize)]
struct Shown {
    #[serde(flatten)]
    listed: Listed,
    received_at: Option<String>,
    /// The target's format and URL as configured (redacted); `None` when no target of that
    /// name is configured.
    format: Option<String>,
    /// The next attempt's request: `None` with `request_error` saying why.
    request: Option<Request>,
    request_error: Option<String>,
    /// The decrypted message's size, and the message itself with `--content`.
    message_bytes: Option<usize>,
    content: Option<String>,
}

impl Shown {
    fn new(config: &Config, stored: &StoredDelivery, with_content: bool, now: u64) -> Shown {
        let listed = Listed::new(&stored.info, stored.dead, now);
        let target = config.targets.iter().find(|t| t.name == stored.info.target);
        let push = stored.push.as_ref();
        let request = match (target, push) {
            (None, _) => Err("the target is not configured".to_owned()),
            (_, Err(why)) => Err(why.clone()),
            (Some(target), Ok(push)) => {
                let attempt = stored.info.attempts.saturating_add(1);
                Forwarder::new()
                    .request(target, push, unix_now(), attempt)
                    .map(|request| shown_request(target, &request))
                    .map_err(|e| e.to_string())
            }
        };
        let (request, request_error) = match request {
            Ok(request) => (Some(request), None),
            Err(why) => (None, Some(why)),
        };
        let message = push.ok().map(|p| p.message.xml());
        Shown {
            listed,
            received_at: push
                .ok()
                .map(|p| time(super::sqlite::unix_ms(p.received_at))),
            format: target.map(|t| format!("{:?}", t.format).to_lowercase()),
            request,
            request_error,
            message_bytes: message.map(|m| m.len()),
            content: message
                .filter(|_| with_content)
                .map(|m| String::from_utf8_lossy(m).into_owned()),
        }
    }

    /// `key: value` lines, then the request and the message.
    fn write(&self, out: &mut String) {
        let l = &self.listed;
        let optional = |v: &Option<String>| shown(v.as_deref());
        let mut fields = vec![
            ("id", l.id.to_string()),
            ("state", l.state.to_owned()),
            ("target", l.target.clone()),
            ("format", optional(&self.format)),
            ("account", l.account.clone()),
            ("event_id", l.event_id.clone()),
            ("type", optional(&l.msg_type)),
            ("event", optional(&l.event)),
            ("route", optional(&l.route)),
            ("attempts", l.attempts.to_string()),
            ("received", optional(&self.received_at)),
            (
                "enqueued",
                format!("{} (age {})", l.enqueued_at, age_of(l.age_s)),
            ),
        ];
        fields.push(match (&l.next_attempt_at, &l.died_at) {
            (_, Some(died)) => ("died", died.clone()),
            (next, None) => ("next attempt", optional(next)),
        });
        fields.push((
            "last error",
            l.last_error
                .as_deref()
                .map_or("-".to_owned(), |e| format!("{e:?}")),
        ));
        for (key, value) in fields {
            let _ = writeln!(out, "{key}: {value}");
        }
        match (&self.request, &self.request_error) {
            (Some(request), _) => {
                let _ = writeln!(out, "request (the next attempt, as it would be sent now):");
                let _ = writeln!(out, "  {} {}", request.method, request.url);
                for header in &request.headers {
                    let _ = writeln!(out, "  {}: {}", header.name, header.value);
                }
            }
            (None, why) => {
                let why = why.as_deref().unwrap_or("-");
                let _ = writeln!(out, "request: cannot be shown: {why}");
            }
        }
        match (&self.content, self.message_bytes) {
            (Some(content), _) => {
                let _ = writeln!(out, "message (decrypted):\n{content}");
            }
            (None, Some(bytes)) => {
                let _ = writeln!(
                    out,
                    "message: {bytes} bytes (decrypted); `--content` shows it"
                );
            }
            (None, None) => {}
        }
    }
}

/// The request as `show` prints it: the URL without the target's credentials or own query,
/// no `Authorization` (nor any other sensitive value), the signature not computed.
fn shown_request(target: &crate::config::Target, request: &http::Request<impl Sized>) -> Request {
    let own = target.url.uri().query();
    let added = request.uri().query().map(|full| match own {
        Some(own) => full
            .strip_prefix(own)
            .map_or(full, |rest| rest.trim_start_matches('&')),
        None => full,
    });
    let base = target.url.to_string();
    let url = match added.filter(|q| !q.is_empty()) {
        Some(query) if base.contains('?') => format!("{base}&{query}"),
        Some(query) => format!("{base}?{query}"),
        None => base,
    };
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: if value.is_sensitive() || *name == AUTHORIZATION {
                "<redacted>".to_owned()
            } else if name.as_str() == SIGNATURE_HEADER {
                "<computed when sent>".to_owned()
            } else {
                value
                    .to_str()
                    .map_or("<not text>".to_owned(), |v| v.to_owned())
            },
        })
        .collect();
    Request {
        method: request.method().to_string(),
        url,
        headers,
    }
}

impl Listed {
    /// `id=7 target=crm account=main type=event event=SCAN route=qr-login event_id=...
    /// attempts=3 age=2m5s enqueued=... next=... error="..."` (`died=` for a dead letter).
    fn line(&self) -> String {
        let (at_key, at) = match (&self.next_attempt_at, &self.died_at) {
            (_, Some(died)) => ("died", died.as_str()),
            (next, None) => ("next", next.as_deref().unwrap_or("-")),
        };
        format!(
            "id={} target={} account={} type={} event={} route={} event_id={} attempts={} \
             age={} enqueued={} {at_key}={at} error={:?}",
            self.id,
            self.target,
            self.account,
            shown(self.msg_type.as_deref()),
            shown(self.event.as_deref()),
            shown(self.route.as_deref()),
            self.event_id,
            self.attempts,
            age_of(self.age_s),
            self.enqueued_at,
            self.last_error.as_deref().unwrap_or("-"),
        )
    }
}

/// `outbox list --json`.
#[derive(Debug, Serialize)]
struct ListDocument {
    /// `pending` or `dead`: which were listed.
    state: &'static str,
    /// The `--target` given, if any.
    target: Option<String>,
    deliveries: Vec<Listed>,
}

/// `outbox stats --json`, and the lines of `outbox stats`.
#[derive(Debug, Serialize)]
struct StatsDocument {
    targets: Vec<TargetRow>,
    dedupe_keys: u64,
}

/// One target in `outbox stats`: every configured one, and any other the store holds
/// deliveries for.
#[derive(Debug, Serialize)]
struct TargetRow {
    target: String,
    configured: bool,
    pending: u64,
    dead: u64,
    /// Seconds since the oldest pending delivery was committed (or replayed).
    oldest_pending_age_s: Option<u64>,
}

impl StatsDocument {
    /// `target=crm pending=0 dead=412 oldest_pending_age=-` per target, then `dedupe_keys=`.
    fn write(&self, out: &mut String) {
        for t in &self.targets {
            let _ = writeln!(
                out,
                "target={} pending={} dead={} oldest_pending_age={}{}",
                t.target,
                t.pending,
                t.dead,
                t.oldest_pending_age_s.map_or("-".to_owned(), age_of),
                if t.configured {
                    ""
                } else {
                    " (not configured)"
                }
            );
        }
        let _ = writeln!(out, "dedupe_keys={}", self.dedupe_keys);
    }
}

/// `document` as pretty JSON, with a newline.
fn write_json(out: &mut String, document: &impl Serialize) -> Result<(), CommandError> {
    let text = serde_json::to_string_pretty(document)
        .map_err(|e| CommandError::Output(format!("cannot write JSON: {e}")))?;
    out.push_str(&text);
    out.push('\n');
    Ok(())
}

/// A value from the message, as one word: `-` when there is none, `?` for each character
/// that is not a printable ASCII one (it came from WeChat's XML).
fn shown(value: Option<&str>) -> String {
    match value {
        None | Some("") => "-".to_owned(),
        Some(v) => v
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect(),
    }
}

/// Unix milliseconds in RFC 3339, to the second.
fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `secs` as one word: `2m5s`, `1day3h`.
fn age_of(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs))
        .to_string()
        .replace(' ', "")
}

/// A duration in whole milliseconds, `u64::MAX` past it.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_one_word() {
        assert_eq!(age_of(125), "2m5s");
        assert_eq!(age_of(0), "0s");
        assert_eq!(age_of(97_200), "1day3h");
    }

    #[test]
    fn message_values_are_shown_as_one_printable_word() {
        assert_eq!(shown(None), "-");
        assert_eq!(shown(Some("")), "-");
        assert_eq!(shown(Some("SCAN")), "SCAN");
        assert_eq!(shown(Some("a b\n")), "a?b?");
    }
}
