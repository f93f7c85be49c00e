//! The Prometheus metrics: their names (dashboards and docs/operations.md rely on them), what each
//! label may hold, and the recorder the admin listener renders.
//!
//! No label carries a secret, an openid or message content: `msg_type` and `event` are
//! WeChat's names from a fixed list (anything else is `other`, so a forged push cannot grow the
//! label set), accounts and targets are names from relay.toml.

mod process;

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::Config;
use crate::error::{ForwardError, REJECTION_REASONS};
use crate::forward::Answer;
use crate::outbox::store::TargetStats;

pub const PUSHES: &str = "wechat_relay_pushes_total";
pub const REJECTED: &str = "wechat_relay_rejected_total";
pub const FORWARDS: &str = "wechat_relay_forwards_total";
pub const FORWARD_SECONDS: &str = "wechat_relay_forward_seconds";
pub const REPLY_SECONDS: &str = "wechat_relay_reply_seconds";
pub const OUTBOX_PENDING: &str = "wechat_relay_outbox_pending";
pub const DEAD_LETTERS: &str = "wechat_relay_dead_letters";
pub const DEAD_LETTERS_TOTAL: &str = "wechat_relay_dead_letters_total";
pub const OUTBOX_OLDEST_PENDING: &str = "wechat_relay_outbox_oldest_pending_seconds";
pub const DEDUPE_HITS: &str = "wechat_relay_dedupe_hits_total";
pub const DEDUPE_COLLISIONS: &str = "wechat_relay_dedupe_collisions_total";
pub const STORE_FULL: &str = "wechat_relay_store_full_total";
pub const DEDUPE_EVICTED: &str = "wechat_relay_dedupe_evicted_total";
pub const DEDUPE_RECORDS: &str = "wechat_relay_dedupe_records";
pub const STORE_USED_BYTES: &str = "wechat_relay_store_used_bytes";
pub const STORE_BATCH_SIZE: &str = "wechat_relay_store_batch_size";
pub const STORE_CHECKPOINTS: &str = "wechat_relay_store_checkpoints_total";
pub const STORE_COMMIT_SECONDS: &str = "wechat_relay_store_commit_seconds";
pub const STORE_ERRORS: &str = "wechat_relay_store_errors_total";
pub const STORE_LEASE_TAKEOVERS: &str = "wechat_relay_store_lease_takeovers_total";
pub const STORE_CONNECT_FAILURES: &str = "wechat_relay_store_connect_failures_total";
pub const STORE_WAKEUPS: &str = "wechat_relay_store_wakeups_total";
pub const CONFIG_RELOADS: &str = "wechat_relay_config_reloads_total";
pub const CONNECTIONS_OPEN: &str = "wechat_relay_connections_open";
pub const CONNECTIONS_CLOSED: &str = "wechat_relay_connections_closed_total";
pub const CONNECTIONS_REFUSED: &str = "wechat_relay_connections_refused_total";
pub const LOG_LINES_DROPPED: &str = "wechat_relay_log_lines_dropped_total";
pub const BUILD_INFO: &str = "wechat_relay_build_info";

/// Seconds: from a millisecond to past WeChat's 5 s and a slow target's timeout.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 4.5, 10.0, 30.0,
];

const MSG_TYPES: [&str; 10] = [
    "text",
    "image",
    "voice",
    "video",
    "shortvideo",
    "location",
    "link",
    "event",
    "file",
    "miniprogrampage",
];

const EVENTS: [&str; 17] = [
    "subscribe",
    "unsubscribe",
    "SCAN",
    "LOCATION",
    "CLICK",
    "VIEW",
    "scancode_push",
    "scancode_waitmsg",
    "pic_sysphoto",
    "pic_photo_or_album",
    "pic_weixin",
    "location_select",
    "view_miniprogram",
    "TEMPLATESENDJOBFINISH",
    "MASSSENDJOBFINISH",
    "kf_create_session",
    "kf_close_session",
];

/// Writes per store transaction: one alone up to the writer's largest batch.
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once) and returns the handle that renders it. Until it is
/// installed, recording costs nothing.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(STORE_BATCH_SIZE.into()), &BATCH_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            started();
            Some(handle)
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        PUSHES,
        "Pushes answered, by account, type, event and outcome"
    );
    metrics::describe_counter!(REJECTED, "Requests refused, by account and reason");
    metrics::describe_counter!(FORWARDS, "Attempts to deliver to a target, by HTTP status");
    metrics::describe_histogram!(FORWARD_SECONDS, "Duration of one attempt to a target");
    metrics::describe_histogram!(REPLY_SECONDS, "From a push's arrival to WeChat's answer");
    metrics::describe_gauge!(OUTBOX_PENDING, "Deliveries waiting in the outbox");
    metrics::describe_gauge!(DEAD_LETTERS, "Dead letters in the outbox");
    metrics::describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Deliveries that failed for good and became dead letters"
    );
    metrics::describe_gauge!(
        OUTBOX_OLDEST_PENDING,
        "Seconds the oldest pending delivery has waited (0: none pending)"
    );
    metrics::describe_counter!(DEDUPE_HITS, "WeChat retries answered from the first push");
    metrics::describe_counter!(
        DEDUPE_COLLISIONS,
        "Pushes with the dedupe key of an earlier one but another message, routed as new"
    );
    metrics::describe_counter!(
        STORE_FULL,
        "Pushes answered 503 because the store was over max_bytes"
    );
    metrics::describe_counter!(
        DEDUPE_EVICTED,
        "Dedupe records evicted, oldest first, to keep the store within max_bytes"
    );
    metrics::describe_gauge!(DEDUPE_RECORDS, "Dedupe records in the store");
    metrics::describe_gauge!(
        STORE_USED_BYTES,
        "Bytes the store's data occupies, against max_bytes"
    );
    metrics::describe_histogram!(
        STORE_COMMIT_SECONDS,
        "One transaction of the store's writer, from its first write to its commit (PostgreSQL: the round trips to the database)"
    );
    metrics::describe_counter!(
        STORE_ERRORS,
        "Calls to the store that failed (PostgreSQL: the database could not be reached or refused)"
    );
    metrics::describe_counter!(
        STORE_CONNECT_FAILURES,
        "Connections to the database that could not be made (PostgreSQL; retried with a backoff of 100 ms doubling to 2 s)"
    );
    metrics::describe_counter!(
        STORE_WAKEUPS,
        "Wake-ups heard from other processes (PostgreSQL LISTEN/NOTIFY: an outbox replay made deliveries due now)"
    );
    metrics::describe_counter!(
        STORE_LEASE_TAKEOVERS,
        "Deliveries taken over from another relay whose lease ran out (PostgreSQL)"
    );
    metrics::describe_histogram!(
        STORE_BATCH_SIZE,
        "Writes applied in one transaction of the durable store (group commit)"
    );
    metrics::describe_counter!(
        STORE_CHECKPOINTS,
        "WAL checkpoints of the durable store, by mode (passive; restart past the WAL's bound)"
    );
    metrics::describe_counter!(CONFIG_RELOADS, "Config reloads, by result");
    metrics::describe_gauge!(CONNECTIONS_OPEN, "Client connections open, by listener");
    metrics::describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections the relay closed to keep slots free, by listener and reason"
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at accept, before any HTTP, by reason"
    );
    metrics::describe_counter!(
        LOG_LINES_DROPPED,
        "Log lines dropped because the log output could not keep up"
    );
    metrics::describe_gauge!(BUILD_INFO, "Always 1: the version of the running binary");
}

/// The push outcomes [`push`] counts.
const PUSH_OUTCOMES: [&str; 5] = ["forwarded", "unrouted", "duplicate", "rejected", "failed"];

/// The series that do not depend on the config, present from the start so that a query's
/// `increase(...) > 0` sees the first event (a series born at 1 shows no increase).
fn started() {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for name in [LOG_LINES_DROPPED, STORE_FULL, DEDUPE_EVICTED] {
        counter!(name).increment(0);
    }
    for result in ["success", "failure"] {
        counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
    for mode in ["passive", "restart"] {
        counter!(STORE_CHECKPOINTS, "mode" => mode).increment(0);
    }
    counter!(CONNECTIONS_REFUSED, "reason" => "allow_ips").increment(0);
    for listener in ["wechat", "admin"] {
        gauge!(CONNECTIONS_OPEN, "listener" => listener).increment(0.0);
        for reason in [
            "evicted",
            "out_of_descriptors",
            "header_timeout",
            "keepalive_timeout",
            "max_age",
        ] {
            counter!(CONNECTIONS_CLOSED, "listener" => listener, "reason" => reason).increment(0);
        }
    }
    // Registered, they render with count 0.
    let _ = histogram!(REPLY_SECONDS);
    let _ = histogram!(STORE_BATCH_SIZE);
    let _ = histogram!(STORE_COMMIT_SECONDS);
    counter!(STORE_ERRORS).increment(0);
    counter!(STORE_LEASE_TAKEOVERS).increment(0);
    counter!(STORE_CONNECT_FAILURES).increment(0);
    counter!(STORE_WAKEUPS).increment(0);
    gauge!(STORE_USED_BYTES).increment(0.0);
    gauge!(DEDUPE_RECORDS).increment(0.0);
}

/// The series of every account and target in `config`, at 0 until their first event: at
/// start and after each reload (adding 0 leaves a series that counted already as it was).
/// Pushes start under `msg_type` and `event` `-`, forwards under the statuses the relay
/// itself gives (`timeout`, `error`); other label values appear with their first event.
pub fn configured(config: &Config) {
    for account in &config.accounts {
        let name = &account.name;
        for outcome in PUSH_OUTCOMES {
            counter!(PUSHES, "account" => name.clone(), "msg_type" => "-", "event" => "-",
                "outcome" => outcome)
            .increment(0);
        }
        for reason in REJECTION_REASONS {
            counter!(REJECTED, "account" => name.clone(), "reason" => reason).increment(0);
        }
        counter!(DEDUPE_HITS, "account" => name.clone()).increment(0);
        counter!(DEDUPE_COLLISIONS, "account" => name.clone()).increment(0);
    }
    for target in &config.targets {
        let name = &target.name;
        for status in ["timeout", "error"] {
            counter!(FORWARDS, "target" => name.clone(), "status" => status).increment(0);
        }
        let _ = histogram!(FORWARD_SECONDS, "target" => name.clone());
        gauge!(OUTBOX_PENDING, "target" => name.clone()).increment(0.0);
        gauge!(DEAD_LETTERS, "target" => name.clone()).increment(0.0);
        gauge!(OUTBOX_OLDEST_PENDING, "target" => name.clone()).increment(0.0);
        counter!(DEAD_LETTERS_TOTAL, "target" => name.clone()).increment(0);
    }
}

/// Everything recorded, then the process's CPU, memory, descriptors and start time read now:
/// the body of `/metrics`.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    text.push_str(&process::render());
    text
}

/// A known name as WeChat spells it, or `other`.
fn known(value: Option<&str>, names: &[&'static str]) -> &'static str {
    match value {
        None => "-",
        Some(v) => names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(v))
            .copied()
            .unwrap_or("other"),
    }
}

/// One push, when it is answered. `outcome`: `forwarded`, `unrouted`, `duplicate`, `rejected`
/// or `failed` (not stored: 503).
pub fn push(
    account: &str,
    msg_type: Option<&str>,
    event: Option<&str>,
    outcome: &'static str,
    elapsed: Duration,
) {
    counter!(PUSHES,
        "account" => account.to_owned(),
        "msg_type" => known(msg_type, &MSG_TYPES),
        "event" => known(event, &EVENTS),
        "outcome" => outcome)
    .increment(1);
    if outcome != "rejected" {
        histogram!(REPLY_SECONDS).record(elapsed.as_secs_f64());
    }
}

pub fn rejected(account: &str, reason: &'static str) {
    counter!(REJECTED, "account" => account.to_owned(), "reason" => reason).increment(1);
}

/// One attempt to a target: `status` is the HTTP status, or `timeout` / `error`.
pub fn forward(target: &str, result: &Result<Answer, ForwardError>, elapsed: Duration) {
    let status = match result {
        Ok(answer) => answer.status.as_str().to_owned(),
        Err(ForwardError::Timeout | ForwardError::Deadline) => "timeout".to_owned(),
        Err(_) => "error".to_owned(),
    };
    counter!(FORWARDS, "target" => target.to_owned(), "status" => status).increment(1);
    histogram!(FORWARD_SECONDS, "target" => target.to_owned()).record(elapsed.as_secs_f64());
}

pub fn dedupe_hit(account: &str) {
    counter!(DEDUPE_HITS, "account" => account.to_owned()).increment(1);
}

pub fn dedupe_collision(account: &str) {
    counter!(DEDUPE_COLLISIONS, "account" => account.to_owned()).increment(1);
}

pub fn store_full() {
    counter!(STORE_FULL).increment(1);
}

/// `count` dedupe records evicted to keep the store within `max_bytes`.
pub fn dedupe_evicted(count: u64) {
    counter!(DEDUPE_EVICTED).increment(count);
}

/// What the store holds, read at each scrape.
pub fn store(used_bytes: u64, dedupe_records: u64) {
    gauge!(STORE_USED_BYTES).set(used_bytes as f64);
    gauge!(DEDUPE_RECORDS).set(dedupe_records as f64);
}

/// One transaction of the durable store's writer, holding `writes` writes.
pub fn store_batch(writes: usize) {
    histogram!(STORE_BATCH_SIZE).record(writes as f64);
}

/// One transaction of the store's writer took `elapsed`.
pub fn store_commit(elapsed: std::time::Duration) {
    histogram!(STORE_COMMIT_SECONDS).record(elapsed.as_secs_f64());
}

/// A call to the store failed.
pub fn store_error() {
    counter!(STORE_ERRORS).increment(1);
}

/// A connection to the database could not be made.
pub fn store_connect_failure() {
    counter!(STORE_CONNECT_FAILURES).increment(1);
}

/// Another process's wake-up was heard.
pub fn store_wakeup() {
    counter!(STORE_WAKEUPS).increment(1);
}

/// `count` deliveries taken over from a relay whose lease ran out.
pub fn lease_takeovers(count: u64) {
    counter!(STORE_LEASE_TAKEOVERS).increment(count);
}

/// A WAL checkpoint run off the commit path: `PASSIVE` or `RESTART`.
pub fn store_checkpoint(mode: &'static str) {
    let mode = if mode == "RESTART" {
        "restart"
    } else {
        "passive"
    };
    counter!(STORE_CHECKPOINTS, "mode" => mode).increment(1);
}

pub fn reload(success: bool) {
    let result = if success { "success" } else { "failure" };
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

/// The outbox gauges of `target`, from the store's counts at `now_ms` (the oldest pending
/// age is 0 when nothing is pending).
pub fn outbox(target: &str, stats: &TargetStats, now_ms: u64) {
    gauge!(OUTBOX_PENDING, "target" => target.to_owned()).set(stats.pending as f64);
    gauge!(DEAD_LETTERS, "target" => target.to_owned()).set(stats.dead as f64);
    let age = stats.oldest_pending_age(now_ms).unwrap_or_default();
    gauge!(OUTBOX_OLDEST_PENDING, "target" => target.to_owned()).set(age.as_secs_f64());
}

/// A delivery to `target` became a dead letter.
pub fn dead_letter(target: &str) {
    counter!(DEAD_LETTERS_TOTAL, "target" => target.to_owned()).increment(1);
}

/// Connections open on `listener` (`wechat` or `admin`).
pub fn connections_open(listener: &'static str, open: usize) {
    gauge!(CONNECTIONS_OPEN, "listener" => listener).set(open as f64);
}

/// A connection the relay closed: `evicted`, `out_of_descriptors`, `header_timeout`,
/// `keepalive_timeout`, `max_age`.
pub fn connection_closed(listener: &'static str, reason: &'static str) {
    counter!(CONNECTIONS_CLOSED, "listener" => listener, "reason" => reason).increment(1);
}

/// A connection closed at accept: `allow_ips` (its address is not allowed).
pub fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// Log lines the output could not take (its buffer was full, or a write failed).
pub fn log_lines_dropped(lines: u64) {
    counter!(LOG_LINES_DROPPED).increment(lines);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_a_fixed_list() {
        assert_eq!(known(Some("scan"), &EVENTS), "SCAN");
        assert_eq!(known(Some("subscribe"), &EVENTS), "subscribe");
        assert_eq!(
            known(Some("o6_bmjrPTlm6_2sgVt7hMZOPfL2M"), &EVENTS),
            "other"
        );
        assert_eq!(known(Some("TEXT"), &MSG_TYPES), "text");
        assert_eq!(known(None, &MSG_TYPES), "-");
    }
}
