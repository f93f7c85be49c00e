//! Rate limits for the log lines a flood could repeat without end: refusals (per reason) and
//! delivery failures and dead letters (per target). Each key gets a token bucket of
//! [`BURST`] lines, refilled at [`PER_SECOND`] a second; a line over the limit is not written
//! but counted, and a background thread reports the count once a second in one summary line
//! per key (so a key writes at most `PER_SECOND + 1` lines a second after its burst, and a
//! flood that stops is still summed up). The metrics still count every event: only the log
//! lines are limited.
//!
//! The hot path takes one short mutex and looks the key up; it allocates only the first time a
//! key is seen. Keys are the reasons of [`crate::error::Rejection`] and the targets' names, so
//! the table stays small.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, Once};
use std::time::{Duration, Instant};

use tracing::{error, warn};

/// Lines a key may write at once.
pub const BURST: u32 = 5;
/// Lines a key may write a second, after its burst.
pub const PER_SECOND: u32 = 5;
/// One line's worth of tokens comes back this often.
const REFILL: Duration = Duration::from_millis(1000 / PER_SECOND as u64);
/// How often the background thread reports what was suppressed.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Refused requests, by reason (`request refused`).
pub static REFUSALS: LazyLock<LogLimit> = LazyLock::new(|| {
    LogLimit::new(|reason, suppressed| {
        warn!(reason = %reason, suppressed, "similar refusals suppressed");
    })
});

/// Failed attempts to a target, by target (`forward failed`, `delivery failed; will retry`).
pub static DELIVERY_FAILURES: LazyLock<LogLimit> = LazyLock::new(|| {
    LogLimit::new(|target, suppressed| {
        warn!(target = %target, suppressed, "similar delivery failures suppressed");
    })
});

/// Dead letters, by target (`delivery failed for good: dead letter`).
pub static DEAD_LETTERS: LazyLock<LogLimit> = LazyLock::new(|| {
    LogLimit::new(|target, suppressed| {
        error!(target = %target, suppressed,
            "similar dead letters suppressed (see `wechat-relay outbox list --dead`)");
    })
});

/// Connections closed to make room, by listener and reason (`connection closed to make
/// room`, `out of file descriptors`).
pub static CONNECTION_PRESSURE: LazyLock<LogLimit> = LazyLock::new(|| {
    LogLimit::new(|key, suppressed| {
        warn!(key = %key, suppressed, "similar connection-pressure lines suppressed");
    })
});

/// Writes the summary line for `key`: `suppressed` lines were left out.
pub type Summary = fn(key: &str, suppressed: u64);

/// Token buckets for one kind of log line, by key.
pub struct LogLimit {
    buckets: Mutex<HashMap<String, Bucket>>,
    summary: Summary,
    flusher: Once,
    /// The background thread runs. Without it (it could not be started, or in unit tests) the
    /// summary comes before the key's next line that is written.
    flushing: AtomicBool,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When `tokens` was last brought up to date.
    refilled: Instant,
    /// Lines left out since the last summary.
    suppressed: u64,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Self {
            tokens: BURST,
            refilled: now,
            suppressed: 0,
        }
    }

    /// Takes a token if there is one, after adding those earned since the last refill.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = elapsed.as_nanos() / REFILL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            // Full: the time left over is not saved up. Otherwise the part of a token earned
            // so far is kept.
            self.refilled = if self.tokens == BURST {
                now
            } else {
                REFILL
                    .checked_mul(earned)
                    .and_then(|spent| self.refilled.checked_add(spent))
                    .unwrap_or(now)
            };
        }
        match self.tokens.checked_sub(1) {
            Some(left) => {
                self.tokens = left;
                true
            }
            None => {
                self.suppressed = self.suppressed.saturating_add(1);
                false
            }
        }
    }
}

impl LogLimit {
    pub fn new(summary: Summary) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            summary,
            flusher: Once::new(),
            flushing: AtomicBool::new(false),
        }
    }

    /// Whether a line for `key` may be written now.
    pub fn admit(&'static self, key: &str) -> bool {
        let admitted = self.admit_at(key, Instant::now());
        if !admitted {
            self.flusher.call_once(|| self.start_flusher());
        }
        admitted
    }

    fn admit_at(&self, key: &str, now: Instant) -> bool {
        let (admitted, suppressed) = {
            // A poisoned table (a panic while it was held) limits nothing.
            let Ok(mut buckets) = self.buckets.lock() else {
                return true;
            };
            if !buckets.contains_key(key) {
                buckets.insert(key.to_owned(), Bucket::full(now));
            }
            let Some(bucket) = buckets.get_mut(key) else {
                return true;
            };
            let admitted = bucket.take(now);
            let suppressed = if admitted && !self.flushing.load(Ordering::Relaxed) {
                std::mem::take(&mut bucket.suppressed)
            } else {
                0
            };
            (admitted, suppressed)
        };
        if suppressed > 0 {
            (self.summary)(key, suppressed);
        }
        admitted
    }

    /// Writes the summary of every key with suppressed lines.
    fn flush(&self) {
        let pending: Vec<(String, u64)> = match self.buckets.lock() {
            Ok(mut buckets) => buckets
                .iter_mut()
                .filter(|(_, bucket)| bucket.suppressed > 0)
                .map(|(key, bucket)| (key.clone(), std::mem::take(&mut bucket.suppressed)))
                .collect(),
            Err(_) => return,
        };
        for (key, suppressed) in pending {
            (self.summary)(&key, suppressed);
        }
    }

    /// A thread (not a task: it must outlive any one runtime) that reports suppressed lines
    /// once a second, so that a flood that stops is still summed up.
    fn start_flusher(&'static self) {
        let spawned = std::thread::Builder::new()
            .name("log-limit".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    self.flush();
                }
            });
        match spawned {
            Ok(_) => self.flushing.store(true, Ordering::Relaxed),
            Err(e) => {
                warn!(error = %e, "cannot start the log limiter's thread: suppressed lines are summed up when their kind logs again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static REPORTED: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

    fn record(key: &str, suppressed: u64) {
        REPORTED
            .lock()
            .expect("lock")
            .push((key.to_owned(), suppressed));
    }

    fn reported(key: &str) -> Vec<u64> {
        REPORTED
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, n)| *n)
            .collect()
    }

    fn admitted(limit: &LogLimit, key: &str, calls: usize, now: Instant) -> usize {
        (0..calls).filter(|_| limit.admit_at(key, now)).count()
    }

    #[test]
    fn a_burst_then_the_rate_per_key() {
        let limit = LogLimit::new(record);
        let start = Instant::now();
        assert_eq!(admitted(&limit, "burst-a", 1000, start), BURST as usize);
        // Another key has a bucket of its own.
        assert_eq!(admitted(&limit, "burst-b", 10, start), BURST as usize);
        // One token every REFILL, kept across calls that come between.
        let later = start + REFILL / 2;
        assert_eq!(admitted(&limit, "burst-a", 10, later), 0);
        assert_eq!(admitted(&limit, "burst-a", 10, start + REFILL), 1);
        assert_eq!(admitted(&limit, "burst-a", 10, start + REFILL * 3), 2);
        // A second of quiet refills the burst, no more.
        let rested = start + Duration::from_secs(60);
        assert_eq!(admitted(&limit, "burst-a", 1000, rested), BURST as usize);
    }

    #[test]
    fn what_is_suppressed_is_summed_up_on_flush_or_without_a_flusher_when_lines_resume() {
        let limit = LogLimit::new(record);
        let start = Instant::now();
        assert_eq!(admitted(&limit, "sum-a", 105, start), BURST as usize);
        assert!(reported("sum-a").is_empty());
        // Without the flusher thread, the next admitted line reports the 100 before it.
        assert!(limit.admit_at("sum-a", start + REFILL));
        assert_eq!(reported("sum-a"), [100]);
        // Suppressed again, then summed up by a flush; nothing twice.
        assert_eq!(admitted(&limit, "sum-a", 7, start + REFILL), 0);
        limit.flush();
        limit.flush();
        assert_eq!(reported("sum-a"), [100, 7]);
        assert!(limit.admit_at("sum-a", start + Duration::from_secs(5)));
        assert_eq!(reported("sum-a"), [100, 7]);
        // With it, only the flush reports: one summary a second at most.
        limit.flushing.store(true, Ordering::Relaxed);
        let rested = start + Duration::from_secs(10);
        assert_eq!(admitted(&limit, "sum-a", 8, rested), BURST as usize);
        assert!(limit.admit_at("sum-a", rested + REFILL));
        assert_eq!(reported("sum-a"), [100, 7]);
        limit.flush();
        assert_eq!(reported("sum-a"), [100, 7, 3]);
    }

    #[test]
    fn a_clock_that_goes_back_or_far_forward_does_not_panic() {
        let limit = LogLimit::new(record);
        let start = Instant::now();
        assert_eq!(admitted(&limit, "clock", 10, start), BURST as usize);
        let earlier = start.checked_sub(Duration::from_secs(1)).unwrap_or(start);
        assert_eq!(admitted(&limit, "clock", 10, earlier), 0);
        let far = start + Duration::from_secs(10 * 365 * 86_400);
        assert_eq!(admitted(&limit, "clock", 10, far), BURST as usize);
    }
}
