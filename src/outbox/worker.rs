//! Delivery workers: one dispatcher per target takes due deliveries (those this process
//! committed from memory, the rest from the store: see [`super::lane`]) and attempts up to
//! `concurrency` of them at once. An attempt's outcome is recorded durably before its slot
//! is given back, so after a crash at most `concurrency` deliveries per target can be sent
//! again.
//!
//! 2xx delivers; 5xx, 408, 429, timeouts and connection errors retry after an exponential
//! backoff with jitter (at most `retry_max_ms`, but never sooner than `Retry-After` asks); any other
//! status is final and makes a dead letter, as do `max_attempts` and `max_age_s`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use rand::RngExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::lane::Lane;
use super::now_ms;
use super::store::{Delivery, DeliveryId, Settle, Store};
use crate::config::Target;
use crate::error::ForwardError;
use crate::forward::{Answer, Forwarder};
use crate::telemetry::limit;

/// How often an idle dispatcher looks at the store anyway: deliveries replayed by the `outbox`
/// command from another process show up within this.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// After a store read fails, wait this long before the next.
const READ_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// After recording an attempt fails, wait this long before trying again, doubling up to
/// `SETTLE_RETRY_MAX`.
const SETTLE_RETRY_FIRST: Duration = Duration::from_millis(100);
const SETTLE_RETRY_MAX: Duration = Duration::from_secs(5);

/// What an attempt's result means for the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Worth another attempt, no sooner than `after` if the target said so.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// The target refused it for good.
    Permanent(String),
}

/// Sorts an attempt's result: 2xx delivered; 5xx, 408, 429 and no answer retry; the rest is
/// final.
pub fn classify(result: &Result<Answer, ForwardError>) -> Verdict {
    match result {
        Ok(answer) if answer.status.is_success() => Verdict::Delivered,
        Ok(answer)
            if answer.status.is_server_error()
                || answer.status == StatusCode::REQUEST_TIMEOUT
                || answer.status == StatusCode::TOO_MANY_REQUESTS =>
        {
            Verdict::Retry {
                error: format!("HTTP {}", answer.status.as_u16()),
                after: answer.retry_after,
            }
        }
        Ok(answer) => Verdict::Permanent(format!("HTTP {} (not retried)", answer.status.as_u16())),
        Err(e) => Verdict::Retry {
            error: e.to_string(),
            after: None,
        },
    }
}

/// The delay before retry number `attempt` (1 for the first retry): drawn between half and all
/// of `retry_initial * 2^(attempt-1)` capped at `retry_max`, and at least `retry_after` (the
/// target's `Retry-After`, honoured even beyond `retry_max`; `max_age` still applies).
/// `jitter` is in `0.0..1.0`.
pub fn retry_delay(
    target: &Target,
    attempt: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let doublings = attempt.saturating_sub(1).min(32);
    let exponential = target
        .retry_initial
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(target.retry_max);
    let jittered = exponential / 2 + exponential.div_f64(2.0).mul_f64(jitter.clamp(0.0, 1.0));
    jittered.max(retry_after.unwrap_or_default())
}

/// What to record after attempt number `attempt` of a delivery enqueued at `enqueued_ms`.
pub fn decide(
    target: &Target,
    enqueued_ms: u64,
    attempt: u32,
    verdict: Verdict,
    now_ms: u64,
) -> Settle {
    match verdict {
        Verdict::Delivered => Settle::Delivered,
        Verdict::Permanent(error) => Settle::Dead {
            attempts: attempt,
            error,
        },
        Verdict::Retry { error, after } => {
            if attempt >= target.max_attempts {
                return Settle::Dead {
                    attempts: attempt,
                    error: format!("{error} (max_attempts {} reached)", target.max_attempts),
                };
            }
            let delay = retry_delay(target, attempt, after, rand::rng().random::<f64>());
            // Saturating: a Retry-After of years lands past max_age, never wraps to "soon".
            let at_ms = now_ms.saturating_add(millis(delay));
            let deadline = enqueued_ms.saturating_add(millis(target.max_age));
            if at_ms > deadline {
                return Settle::Dead {
                    attempts: attempt,
                    error: format!(
                        "{error} (max_age_s {} reached before the next attempt)",
                        target.max_age.as_secs()
                    ),
                };
            }
            Settle::Retry {
                attempts: attempt,
                at_ms,
                error,
            }
        }
    }
}

/// A duration in whole milliseconds, `u64::MAX` past it.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// One target's dispatcher and what its attempts share.
pub struct TargetWorker {
    target: Arc<Target>,
    store: Arc<dyn Store>,
    forwarder: Forwarder,
    /// Shared by every worker this target has had: the deliveries in flight, the wake-up and
    /// the deliveries handed over in memory.
    lane: Arc<Lane>,
}

impl TargetWorker {
    pub fn new(
        target: Arc<Target>,
        store: Arc<dyn Store>,
        forwarder: Forwarder,
        lane: Arc<Lane>,
    ) -> Self {
        Self {
            target,
            store,
            forwarder,
            lane,
        }
    }

    /// Takes due deliveries and attempts them until `stop`; attempts are spawned on `attempts`.
    /// Deliveries committed by this process come from memory; the store is read when it may
    /// hold due ones memory does not (see [`Lane`]), and at least every [`IDLE_POLL`] when idle.
    pub async fn run(self: Arc<Self>, stop: CancellationToken, attempts: TaskTracker) {
        let slots = Arc::new(Semaphore::new(self.target.concurrency));
        let name = self.target.name.as_str();
        loop {
            // A free slot first, so that what is taken is attempted at once.
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let want = 1 + slots.available_permits();
            let now = now_ms();
            let mut due = Vec::new();
            // The store first when it holds due deliveries memory does not (retries, an
            // overflow): oldest due first, so that a steady stream in memory cannot starve them.
            if self.lane.store_due_at(now) {
                match self.store.due(name, now, want, self.lane.in_flight()).await {
                    Ok(read) => {
                        if read.len() < want {
                            let next = self.store.next_due(name, now).await.ok().flatten();
                            self.lane.store_read(next);
                        }
                        due = self.lane.not_in_memory(read);
                    }
                    Err(e) => {
                        warn!(target = %name, error = %e, "cannot read due deliveries");
                        drop(first);
                        tokio::select! {
                            () = tokio::time::sleep(READ_ERROR_PAUSE) => continue,
                            () = stop.cancelled() => break,
                        }
                    }
                }
            }
            due.extend(self.lane.take_fresh(want.saturating_sub(due.len())));
            if due.is_empty() {
                drop(first);
                let next = self.lane.next_store_due();
                let wait = Duration::from_millis(next.saturating_sub(now_ms())).min(IDLE_POLL);
                tokio::select! {
                    () = self.lane.wake.notified() => {}
                    () = tokio::time::sleep(wait) => self.lane.poll_store(),
                    () = stop.cancelled() => break,
                }
                continue;
            }
            if stop.is_cancelled() {
                break;
            }
            let mut slot = Some(first);
            for delivery in due {
                let Some(permit) = slot
                    .take()
                    .or_else(|| Arc::clone(&slots).try_acquire_owned().ok())
                else {
                    // Not taken now: what was handed over in memory is read from the store.
                    self.lane.poll_store();
                    break;
                };
                if !self.lane.take(delivery.id) {
                    slot = Some(permit);
                    continue;
                }
                let worker = Arc::clone(&self);
                attempts.spawn(async move {
                    worker.attempt(delivery).await;
                    drop(permit);
                });
            }
        }
    }

    /// One attempt, recorded before it returns.
    async fn attempt(&self, delivery: Delivery) {
        let mut cut = Cut {
            delivery: &delivery,
            finished: false,
        };
        self.attempt_uncut(&delivery).await;
        cut.finished = true;
    }

    async fn attempt_uncut(&self, delivery: &Delivery) {
        let target = &self.target;
        let max_age_ms = millis(target.max_age);
        let started = Instant::now();
        let attempt = delivery.attempts.saturating_add(1);
        let settle = match &delivery.push {
            Err(why) => Settle::Dead {
                attempts: delivery.attempts,
                error: why.clone(),
            },
            Ok(_) if now_ms().saturating_sub(delivery.enqueued_ms) > max_age_ms => Settle::Dead {
                attempts: delivery.attempts,
                error: format!(
                    "max_age_s {} passed before it could be delivered",
                    target.max_age.as_secs()
                ),
            },
            Ok(push) => {
                let sent = Instant::now();
                let result = self.forwarder.forward(target, push, attempt).await;
                crate::metrics::forward(&target.name, &result, sent.elapsed());
                decide(
                    target,
                    delivery.enqueued_ms,
                    attempt,
                    classify(&result),
                    now_ms(),
                )
            }
        };
        log_settle(delivery, attempt, &settle, started);
        // Until the outcome is recorded the delivery keeps its slot and is not taken again: a
        // target that took it must not get it again because the store was briefly unwritable.
        let mut pause = SETTLE_RETRY_FIRST;
        while let Err(e) = self
            .store
            .settle(delivery.id, settle.clone(), now_ms())
            .await
        {
            error!(target = %target.name, id = delivery.id, error = %e,
                retry_in_ms = pause.as_millis() as u64,
                "cannot record the attempt; trying again (the delivery is held until then)");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(SETTLE_RETRY_MAX);
        }
        if let Settle::Retry { at_ms, .. } = &settle {
            self.lane.retry_at(*at_ms);
        }
        self.lane.release(delivery.id);
        self.lane.wake.notify_one();
    }
}

/// An attempt under way. Dropped unfinished (cut at the end of the shutdown grace), it says so
/// with the target, the delivery and the event id: the delivery is still pending.
struct Cut<'a> {
    delivery: &'a Delivery,
    finished: bool,
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let d = self.delivery;
            warn!(target = %d.target, id = d.id,
                event_id = %d.push.as_ref().map_or("-", |p| p.event_id.as_str()),
                "delivery cut at shutdown: still pending, sent again on the next start");
        }
    }
}

fn log_settle(delivery: &Delivery, attempt: u32, settle: &Settle, started: Instant) {
    let event_id = delivery
        .push
        .as_ref()
        .map_or("-", |push| push.event_id.as_str());
    let ms = started.elapsed().as_millis() as u64;
    let (target, id) = (delivery.target.as_str(), delivery.id);
    match settle {
        Settle::Delivered if attempt == 1 => {
            debug!(target = %target, id, event_id = %event_id, attempt, ms, "delivered")
        }
        Settle::Delivered => {
            info!(target = %target, id, event_id = %event_id, attempt, ms, "delivered after retries")
        }
        // Failures are rate limited per target: a target that is down during a flood fails
        // every attempt.
        Settle::Retry { .. } if !limit::DELIVERY_FAILURES.admit(target) => {}
        Settle::Retry { at_ms, error, .. } => {
            warn!(target = %target, id, event_id = %event_id, attempt, ms, error = %error,
                retry_in_ms = at_ms.saturating_sub(now_ms()), "delivery failed; will retry")
        }
        Settle::Dead { attempts, error } => log_dead_letter(target, id, event_id, *attempts, error),
    }
}

/// The line every dead letter gets, however it died: here (`max_attempts`, `max_age_s`, a
/// final status, a push that cannot be read back) or at the push's commit (the reply
/// target's attempt during the push ended it). Rate limited per target, like failures.
pub fn log_dead_letter(target: &str, id: DeliveryId, event_id: &str, attempts: u32, error: &str) {
    crate::metrics::dead_letter(target);
    if limit::DEAD_LETTERS.admit(target) {
        error!(target = %target, id, event_id = %event_id, attempts, error = %error,
            "delivery failed for good: dead letter (see `wechat-relay outbox list --dead`)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(initial_ms: u64, max_ms: u64, max_attempts: u32, max_age_s: u64) -> Target {
        Target {
            name: "t".into(),
            url: "http://127.0.0.1:1/".parse().expect("uri"),
            format: crate::config::ForwardFormat::Raw,
            timeout: Duration::from_secs(1),
            secret: None,
            concurrency: 1,
            retry_initial: Duration::from_millis(initial_ms),
            retry_max: Duration::from_millis(max_ms),
            max_attempts,
            max_age: Duration::from_secs(max_age_s),
        }
    }

    fn answer(status: u16, retry_after: Option<u64>) -> Result<Answer, ForwardError> {
        Ok(Answer {
            status: StatusCode::from_u16(status).expect("status"),
            content_type: None,
            body: bytes::Bytes::new(),
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    #[test]
    fn statuses_sort_into_delivered_retry_and_final() {
        assert_eq!(classify(&answer(200, None)), Verdict::Delivered);
        assert_eq!(classify(&answer(204, None)), Verdict::Delivered);
        for status in [500, 502, 503, 408, 429] {
            assert!(
                matches!(classify(&answer(status, None)), Verdict::Retry { .. }),
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 410, 301] {
            assert!(
                matches!(classify(&answer(status, None)), Verdict::Permanent(_)),
                "{status}"
            );
        }
        assert!(matches!(
            classify(&Err(ForwardError::Timeout)),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            classify(&Err(ForwardError::Transport("refused".into()))),
            Verdict::Retry { .. }
        ));
        assert_eq!(
            classify(&answer(503, Some(7))),
            Verdict::Retry {
                error: "HTTP 503".into(),
                after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let t = target(1000, 10_000, 20, 86_400);
        let ms = |attempt, jitter| retry_delay(&t, attempt, None, jitter).as_millis();
        assert_eq!((ms(1, 0.0), ms(1, 1.0)), (500, 1000));
        assert_eq!((ms(2, 0.0), ms(2, 1.0)), (1000, 2000));
        assert_eq!((ms(3, 0.0), ms(3, 1.0)), (2000, 4000));
        assert_eq!((ms(10, 0.0), ms(10, 1.0)), (5000, 10_000));
        assert_eq!(ms(u32::MAX, 1.0), 10_000);
        // Retry-After is honoured, beyond retry_max too.
        let after = |secs| retry_delay(&t, 1, Some(Duration::from_secs(secs)), 0.0).as_millis();
        assert_eq!(after(3), 3000);
        assert_eq!(after(60), 60_000);
    }

    #[test]
    fn a_retry_after_past_max_age_makes_a_dead_letter_now() {
        let t = target(1000, 1000, 20, 60);
        // 18446744073709552 s is more milliseconds than a u64 holds: it must not wrap around
        // to a retry 0.39 s later.
        for secs in [61, 18_446_744_073_709_552, u64::MAX] {
            let verdict = Verdict::Retry {
                error: "HTTP 503".into(),
                after: Some(Duration::from_secs(secs)),
            };
            match decide(&t, 1_000, 1, verdict, 2_000) {
                Settle::Dead { error, .. } => assert!(error.contains("max_age_s 60"), "{error}"),
                other => panic!("Retry-After {secs}: expected dead, got {other:?}"),
            }
        }
    }

    #[test]
    fn attempts_and_age_end_in_dead_letters() {
        let t = target(1000, 1000, 3, 60);
        let retry = || Verdict::Retry {
            error: "HTTP 503".into(),
            after: None,
        };
        assert!(matches!(
            decide(&t, 0, 1, retry(), 0),
            Settle::Retry { attempts: 1, .. }
        ));
        assert!(matches!(
            decide(&t, 0, 2, retry(), 0),
            Settle::Retry { attempts: 2, .. }
        ));
        match decide(&t, 0, 3, retry(), 0) {
            Settle::Dead { attempts, error } => {
                assert_eq!(attempts, 3);
                assert!(error.contains("max_attempts 3"), "{error}");
            }
            other => panic!("expected dead, got {other:?}"),
        }
        // The next attempt would fall after max_age: dead now.
        match decide(&t, 0, 1, retry(), 59_900) {
            Settle::Dead { error, .. } => assert!(error.contains("max_age_s 60"), "{error}"),
            other => panic!("expected dead, got {other:?}"),
        }
        assert!(matches!(
            decide(&t, 0, 1, Verdict::Permanent("HTTP 404".into()), 0),
            Settle::Dead { attempts: 1, .. }
        ));
        assert_eq!(decide(&t, 0, 1, Verdict::Delivered, 0), Settle::Delivered);
    }
}
