//! The `wechat-relay outbox` commands, on the store the config names. They open the store as a
//! tool (it must exist; the server may be running: SQLite serialises the writes) and print
//! one line per item, `key=value`, for operators and for grep. A list with nothing in it says
//! so on stderr, so that a pipe reads nothing.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use super::now_ms;
use super::sqlite::Role;
use super::store::{DeliveryInfo, Filter, Selection, StoreError};
use crate::cli::OutboxCommand;
use crate::config::Config;

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
}

/// Runs `command` and returns what to print.
pub async fn run(config: &Config, command: &OutboxCommand) -> Result<Printed, CommandError> {
    if config.store.path.is_none() {
        return Err(StoreError::Open(
            "the config has no [store] path: deliveries are in the running relay's memory only"
                .into(),
        )
        .into());
    }
    let store = super::open_store(config, Role::Tool)?;
    let mut printed = Printed::default();
    let out = &mut printed.out;
    let now = now_ms();
    match command {
        OutboxCommand::Stats => {
            let stats = store.stats().await?;
            let mut names: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
            for t in &stats.targets {
                if !names.contains(&t.target.as_str()) {
                    names.push(&t.target);
                }
            }
            for name in names {
                let t = stats.targets.iter().find(|t| t.target == name);
                let configured = config.targets.iter().any(|c| c.name == name);
                let _ = writeln!(
                    out,
                    "target={name} pending={} dead={} oldest_pending_age={}{}",
                    t.map_or(0, |t| t.pending),
                    t.map_or(0, |t| t.dead),
                    t.and_then(|t| t.oldest_pending_ms)
                        .map_or("-".to_owned(), |at| age(now, at)),
                    if configured { "" } else { " (not configured)" }
                );
            }
            let _ = writeln!(out, "dedupe_keys={}", stats.dedupe_keys);
        }
        OutboxCommand::List { dead, target } => {
            let filter = Filter {
                dead: *dead,
                target: target.clone(),
            };
            let deliveries = store.list(filter).await?;
            for delivery in &deliveries {
                let _ = writeln!(out, "{}", line(delivery, *dead, now));
            }
            if deliveries.is_empty() {
                let what = if *dead {
                    "no dead letters"
                } else {
                    "no pending deliveries"
                };
                printed.note = Some(match target {
                    Some(target) => format!("{what} for target {target}"),
                    None => what.to_owned(),
                });
            }
        }
        OutboxCommand::Replay { id, dead, target } => {
            let selection = match id {
                Some(id) => Selection::Id(*id),
                None if *dead => Selection::Dead {
                    target: target.clone(),
                },
                None => return Err(CommandError::Usage("give a delivery id or --dead".into())),
            };
            let count = store.replay(selection, now).await?;
            if let (0, Some(id)) = (count, id) {
                return Err(CommandError::NotFound(format!("no delivery with id {id}")));
            }
            let _ = writeln!(
                out,
                "replayed={count} (due now; a running relay picks them up within a second)"
            );
        }
        OutboxCommand::Purge {
            dead: _,
            older_than,
            target,
        } => {
            let before = older_than.map(|age| now.saturating_sub(millis(age)));
            let count = store.purge_dead(before, target.clone()).await?;
            let _ = writeln!(out, "purged={count}");
        }
    }
    Ok(printed)
}

/// `id=7 target=crm account=main type=event event=SCAN route=qr-login event_id=...
/// attempts=3 age=2m5s enqueued=... next=... error="..."` (`died=` for a dead letter).
fn line(d: &DeliveryInfo, dead: bool, now: u64) -> String {
    format!(
        "id={} target={} account={} type={} event={} route={} event_id={} attempts={} age={} \
         enqueued={} {}={} error={:?}",
        d.id,
        d.target,
        d.account,
        shown(d.msg_type.as_deref()),
        shown(d.event.as_deref()),
        shown(d.route.as_deref()),
        d.event_id,
        d.attempts,
        age(now, d.enqueued_ms),
        time(d.enqueued_ms),
        if dead { "died" } else { "next" },
        time(d.at_ms),
        d.last_error.as_deref().unwrap_or("-"),
    )
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

/// How long ago `at_ms` was, in whole seconds, as one word: `2m5s`, `1day3h`.
fn age(now_ms: u64, at_ms: u64) -> String {
    let secs = Duration::from_secs(now_ms.saturating_sub(at_ms) / 1000);
    humantime::format_duration(secs)
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
    fn ages_are_one_word_and_never_negative() {
        assert_eq!(age(125_900, 0), "2m5s");
        assert_eq!(age(0, 5_000), "0s");
        assert_eq!(age(97_200_000, 0), "1day3h");
    }

    #[test]
    fn message_values_are_shown_as_one_printable_word() {
        assert_eq!(shown(None), "-");
        assert_eq!(shown(Some("")), "-");
        assert_eq!(shown(Some("SCAN")), "SCAN");
        assert_eq!(shown(Some("a b\n")), "a?b?");
    }
}
