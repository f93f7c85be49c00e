//! The `wechat-relay outbox` commands, on the store the config names. They open the store as a
//! tool (it must exist; the server may be running: SQLite serialises the writes) and print
//! one line per item, `key=value`, for operators and for grep.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use super::now_ms;
use super::sqlite::Role;
use super::store::{DeliveryInfo, Filter, Selection, StoreError};
use crate::cli::OutboxCommand;
use crate::config::Config;

/// Runs `command` and returns what to print.
pub async fn run(config: &Config, command: &OutboxCommand) -> Result<String, StoreError> {
    if config.store.path.is_none() {
        return Err(StoreError::Open(
            "the config has no [store] path: deliveries are in the running relay's memory only"
                .into(),
        ));
    }
    let store = super::open_store(config, Role::Tool)?;
    let mut out = String::new();
    match command {
        OutboxCommand::Stats => {
            let stats = store.stats().await?;
            let now = now_ms();
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
                        .map_or("-".to_owned(), |at| {
                            humantime::format_duration(Duration::from_secs(
                                now.saturating_sub(at) / 1000,
                            ))
                            .to_string()
                        }),
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
            for delivery in store.list(filter).await? {
                let _ = writeln!(out, "{}", line(&delivery, *dead));
            }
        }
        OutboxCommand::Replay { id, dead, target } => {
            let selection = match id {
                Some(id) => Selection::Id(*id),
                None if *dead => Selection::Dead {
                    target: target.clone(),
                },
                None => return Err(StoreError::Io("give a delivery id or --dead".into())),
            };
            let count = store.replay(selection, now_ms()).await?;
            if let (0, Some(id)) = (count, id) {
                return Err(StoreError::Io(format!("no delivery with id {id}")));
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
            let before = older_than.map(|age| now_ms().saturating_sub(age.as_millis() as u64));
            let count = store.purge_dead(before, target.clone()).await?;
            let _ = writeln!(out, "purged={count}");
        }
    }
    Ok(out)
}

/// `id=7 target=crm account=main event_id=... attempts=3 enqueued=... next=... error="..."`
fn line(d: &DeliveryInfo, dead: bool) -> String {
    let time = |ms: u64| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    };
    format!(
        "id={} target={} account={} event_id={} attempts={} enqueued={} {}={} error={:?}",
        d.id,
        d.target,
        d.account,
        d.event_id,
        d.attempts,
        time(d.enqueued_ms),
        if dead { "died" } else { "next" },
        time(d.at_ms),
        d.last_error.as_deref().unwrap_or("-"),
    )
}
