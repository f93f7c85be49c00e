//! The event ids committed within the dedupe window, in memory: a route with a reply target
//! asks the store whether a push is a retry only when its id may be there.
//!
//! Bloom filters (the `bloomfilter` crate) in time buckets: no id committed within the window
//! is ever missed, and the memory is fixed whatever the rate. Past the rate the buckets are
//! sized for, more ids look as if they may be there and are looked up in the store, which
//! answers the same as before: slower, never wrong. Each bucket covers a quarter of the window
//! and the newest [`BUCKETS`] are asked, so an id is remembered for at least the window.
//!
//! Only this process's commits (and, at start, the store's window) are known here: a store
//! shared by several relays must look every id up.

use std::collections::VecDeque;
use std::sync::Mutex;

use bloomfilter::Bloom;

/// Four quarters of the window, and the one filling now.
const BUCKETS: usize = 5;
/// The ids one bucket holds at [`FALSE_POSITIVES`]: a quarter of a five-minute window at
/// about 1,700 pushes a second (about 155 KiB each).
const IDS_PER_BUCKET: usize = 131_072;
const FALSE_POSITIVES: f64 = 0.01;

pub struct RecentIds {
    buckets: Mutex<Buckets>,
}

struct Buckets {
    /// Oldest first; the last one is filling.
    filters: VecDeque<Bloom<str>>,
    /// When the filling one started.
    since_ms: u64,
}

impl RecentIds {
    /// Empty, as of `now_ms`; `None` if the filters cannot be made (the relay then looks up
    /// every id).
    pub fn new(now_ms: u64) -> Option<RecentIds> {
        let mut filters = VecDeque::with_capacity(BUCKETS);
        for _ in 0..BUCKETS {
            filters.push_back(Bloom::new_for_fp_rate(IDS_PER_BUCKET, FALSE_POSITIVES).ok()?);
        }
        Some(RecentIds {
            buckets: Mutex::new(Buckets {
                filters,
                since_ms: now_ms,
            }),
        })
    }

    /// `event_id` was committed at `now_ms`; `window_ms` is the dedupe window.
    pub fn insert(&self, event_id: &str, now_ms: u64, window_ms: u64) {
        if let Ok(mut buckets) = self.buckets.lock() {
            buckets.rotate(now_ms, window_ms);
            if let Some(filling) = buckets.filters.back_mut() {
                filling.set(event_id);
            }
        }
    }

    /// Whether `event_id` may have been committed within the window (false: it surely was not,
    /// by this process or before it started).
    pub fn may_hold(&self, event_id: &str, now_ms: u64, window_ms: u64) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        buckets.rotate(now_ms, window_ms);
        buckets.filters.iter().any(|f| f.check(event_id))
    }
}

impl Buckets {
    /// Starts a new bucket every quarter window, forgetting the oldest.
    fn rotate(&mut self, now_ms: u64, window_ms: u64) {
        let quarter = (window_ms / 4).max(1);
        let mut turns = 0;
        while now_ms.saturating_sub(self.since_ms) >= quarter && turns < BUCKETS {
            if let Some(mut oldest) = self.filters.pop_front() {
                oldest.clear();
                self.filters.push_back(oldest);
            }
            self.since_ms = self.since_ms.saturating_add(quarter);
            turns += 1;
        }
        if turns == BUCKETS {
            // Idle for a whole window or more: all were cleared.
            self.since_ms = now_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 300_000;

    #[test]
    fn an_id_is_remembered_for_the_whole_window_then_forgotten() {
        let recent = RecentIds::new(0).expect("filters");
        assert!(!recent.may_hold("e1", 0, WINDOW));
        recent.insert("e1", 1_000, WINDOW);
        for at in [1_000, WINDOW / 2, WINDOW, WINDOW + 1_000] {
            assert!(recent.may_hold("e1", at, WINDOW), "at {at} ms");
        }
        // Five quarters on, its bucket was the oldest and is cleared.
        assert!(!recent.may_hold("e1", 2 * WINDOW, WINDOW));
    }

    #[test]
    fn ids_never_committed_are_mostly_not_held_even_past_the_sized_rate() {
        let recent = RecentIds::new(0).expect("filters");
        for n in 0..IDS_PER_BUCKET {
            recent.insert(&format!("main:{n}"), 10, WINDOW);
        }
        for n in (0..IDS_PER_BUCKET).step_by(97) {
            assert!(recent.may_hold(&format!("main:{n}"), 20, WINDOW));
        }
        let false_positives = (0..10_000)
            .filter(|n| recent.may_hold(&format!("other:{n}"), 20, WINDOW))
            .count();
        assert!(false_positives < 500, "{false_positives} of 10,000");
    }
}
