//! `[store]`, and its dedupe window against the server's replay window.

use std::time::Duration;

use super::Checker;
use crate::config::raw::RawStore;
use crate::config::{Server, Store};

/// PROTOCOL.md §6: keep dedupe keys for at least 60 s (WeChat retries for about 15 s).
const MIN_DEDUPE_TTL_S: u64 = 60;
/// A week: the store holds a key (and its answer) per push for this long.
const MAX_DEDUPE_TTL_S: u64 = 7 * 86_400;
/// The store's budget: at least 1 MiB.
const MIN_STORE_BYTES: u64 = 1 << 20;
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
            dedupe_ttl: Duration::from_secs(raw.dedupe_ttl_s),
            max_bytes,
            dead_letter_retention: Duration::from_secs(raw.dead_letter_retention_s),
        })
    }
}
