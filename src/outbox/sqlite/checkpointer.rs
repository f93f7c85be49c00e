//! WAL checkpoints off the commit path. The writer's connection never checkpoints
//! (`wal_autocheckpoint = 0`; its WAL hook only reports how many frames the WAL holds after
//! each commit); this thread, on a connection of its own, folds the WAL back into the database:
//!
//! - a `PASSIVE` checkpoint once [`WalLimits::soft_frames`] (SQLite's own autocheckpoint
//!   threshold) were added to the WAL since the last one, or every [`WalLimits::every`] when
//!   anything was committed: it
//!   copies what no reader still needs without taking any lock the writer waits on;
//! - past [`WalLimits::hard_frames`] passive checkpoints have not caught up (a writer that never
//!   pauses leaves no moment to restart the WAL from its start, a long read pins old frames).
//!   The WAL is restarted: first a `PASSIVE` checkpoint copies what it can while the writer
//!   goes on, then the writer holds its next transaction (up to [`HARD_WAIT`]) while a
//!   `RESTART` checkpoint copies the few frames written meanwhile and waits for the readers,
//!   so that the next commit writes the WAL from its start. That hold is the WAL's bound, and
//!   it lasts about one fsync: the bulk of the copy ran before it. The WAL file keeps its size
//!   (the writer's `journal_size_limit` is the bound), so a restart does not free and grow it
//!   again: truncating a 64 MiB WAL took 32 ms on the benchmark's disk, the writer waiting.
//!
//! It stops with the writer, which then runs a last `TRUNCATE` checkpoint of its own.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// The longest the writer waits for the checkpointer past the hard bound before it goes on
/// anyway (the checkpoint cannot run: a reader holds the WAL); the warning says so.
pub(super) const HARD_WAIT: Duration = Duration::from_secs(5);

/// When to checkpoint, in WAL frames (a page and a 24-byte header each).
#[derive(Debug, Clone, Copy)]
pub(super) struct WalLimits {
    pub every: Duration,
    pub soft_frames: u64,
    pub hard_frames: u64,
}

impl Default for WalLimits {
    /// SQLite's autocheckpoint threshold (1,000 frames: about 4 MiB of 4 KiB pages), checked
    /// every second; the WAL bounded at 16 times that (about 64 MiB).
    fn default() -> Self {
        WalLimits {
            every: Duration::from_secs(1),
            soft_frames: 1000,
            hard_frames: 16_000,
        }
    }
}

/// What the writer and the checkpointer share.
pub(super) struct Wal {
    limits: WalLimits,
    state: Mutex<WalState>,
    changed: Condvar,
}

#[derive(Default)]
struct WalState {
    /// Frames in the WAL after the last commit (0 once truncated).
    frames: u64,
    /// Commits seen, so that a checkpoint runs only when something is new.
    commits: u64,
    stop: bool,
    /// The checkpointer restarts the WAL: the writer holds its next transaction.
    hold: bool,
    /// The writer is waiting for the restart.
    waiting: bool,
    /// The writer is in a transaction.
    writing: bool,
    passive: u64,
    restarted: u64,
}

impl Wal {
    pub(super) fn new(limits: WalLimits) -> Arc<Wal> {
        Arc::new(Wal {
            limits,
            state: Mutex::default(),
            changed: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, WalState> {
        // Poisoned only by a panic while holding it; the counts are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From the writer's WAL hook: the WAL holds `frames` after a commit.
    pub(super) fn committed(&self, frames: u64) {
        let mut state = self.state();
        state.frames = frames;
        state.commits = state.commits.wrapping_add(1);
        // The checkpointer decides whether it is time; a commit under the threshold is not.
        if frames >= self.limits.soft_frames {
            self.changed.notify_all();
        }
    }

    /// Before a transaction: while the checkpointer restarts the WAL, waits (up to
    /// [`HARD_WAIT`]) for it to finish. [`Wal::end_write`] after the transaction.
    pub(super) fn begin_write(&self) {
        let mut state = self.state();
        if !state.hold || state.stop {
            state.writing = true;
            return;
        }
        state.waiting = true;
        let (mut state, waited) = self
            .changed
            .wait_timeout_while(state, HARD_WAIT, |s| s.hold && !s.stop)
            .unwrap_or_else(|e| e.into_inner());
        state.waiting = false;
        state.writing = true;
        if waited.timed_out() {
            tracing::warn!(
                frames = state.frames,
                hard_frames = self.limits.hard_frames,
                "the store's WAL is past its bound and cannot be checkpointed (a long read holds it?): writing on"
            );
        }
    }

    /// Frames in the WAL after the last commit, and whether the writer waits for it to be
    /// emptied.
    #[cfg(test)]
    pub(super) fn frames(&self) -> (u64, bool) {
        let state = self.state();
        (state.frames, state.waiting)
    }

    /// Whether the checkpointer holds the writer's next transaction (it restarts the WAL).
    #[cfg(test)]
    pub(super) fn holds(&self) -> bool {
        self.state().hold
    }

    /// Checkpoints run so far: `(passive, restart)`.
    #[cfg(test)]
    pub(super) fn checkpoints(&self) -> (u64, u64) {
        let state = self.state();
        (state.passive, state.restarted)
    }
}

/// The checkpointer thread; dropping it ends it.
pub(super) struct Checkpointer {
    wal: Arc<Wal>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn start(conn: Connection, wal: Arc<Wal>) -> std::io::Result<Checkpointer> {
        let shared = Arc::clone(&wal);
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || run(&conn, &shared))?;
        Ok(Checkpointer {
            wal,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    /// Stops the thread and waits for it (a checkpoint it is running finishes).
    fn drop(&mut self) {
        self.wal.state().stop = true;
        self.wal.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, wal: &Wal) {
    let limits = wal.limits;
    let mut seen = 0;
    // The WAL's frames at the last checkpoint: it wakes this thread again only once as many
    // again are written (a WAL that is not restarted stays past the threshold).
    let mut at_frames = 0;
    let mut last = Instant::now();
    loop {
        let state = wal.state();
        let due = last + limits.every;
        let wait = due.saturating_duration_since(Instant::now());
        let (state, _) = wal
            .changed
            .wait_timeout_while(state, wait, |s| {
                let new = if s.frames < at_frames {
                    s.frames
                } else {
                    s.frames - at_frames
                };
                let grown = s.frames >= limits.hard_frames
                    || (new >= limits.soft_frames && s.commits != seen);
                !(s.stop || grown)
            })
            .unwrap_or_else(|e| e.into_inner());
        if state.stop {
            return;
        }
        let (frames, commits) = (state.frames, state.commits);
        drop(state);
        if commits == seen && frames < limits.hard_frames {
            // Nothing new since the last checkpoint.
            last = Instant::now();
            continue;
        }
        let restart = frames >= limits.hard_frames;
        let result = checkpoint(conn, "PASSIVE");
        record(wal, "PASSIVE", &result);
        if restart {
            wal.set_hold(true);
            let result = checkpoint(conn, "RESTART");
            record(wal, "RESTART", &result);
            wal.set_hold(false);
        }
        (seen, last, at_frames) = (commits, Instant::now(), if restart { 0 } else { frames });
    }
}

impl Wal {
    /// After the transaction [`Wal::begin_write`] began.
    pub(super) fn end_write(&self) {
        self.state().writing = false;
        self.changed.notify_all();
    }

    /// Holds the writer's next transaction and waits (up to [`HARD_WAIT`]) for the one it is
    /// in, so that the `RESTART` checkpoint finds the WAL's write lock free; or lets it go.
    fn set_hold(&self, hold: bool) {
        let mut state = self.state();
        state.hold = hold;
        self.changed.notify_all();
        if hold {
            let _ = self
                .changed
                .wait_timeout_while(state, HARD_WAIT, |s| s.writing && !s.stop);
        }
    }
}

/// Counts a checkpoint that finished (a `RESTART` that did also means the next commit writes
/// the WAL from its start), warns of one that did not.
fn record(wal: &Wal, mode: &'static str, result: &rusqlite::Result<(i64, i64, i64)>) {
    let mut state = wal.state();
    match result {
        Ok((0, _, _)) if mode == "RESTART" => {
            state.restarted = state.restarted.saturating_add(1);
            state.frames = 0;
        }
        Ok(_) if mode == "PASSIVE" => state.passive = state.passive.saturating_add(1),
        Ok((_, log, done)) => {
            tracing::warn!(
                mode,
                log,
                done,
                "the store's WAL checkpoint could not finish"
            )
        }
        Err(e) => {
            tracing::warn!(mode, error = %super::describe(e), "cannot checkpoint the store's WAL")
        }
    }
    drop(state);
    crate::metrics::store_checkpoint(mode);
}

/// `PRAGMA wal_checkpoint(mode)`: whether it was kept from finishing, the WAL's frames, those
/// copied into the database.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
    })
}
