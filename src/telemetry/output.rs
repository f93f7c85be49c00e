//! The log's output: lines are copied into one bounded buffer and a writer thread writes them
//! to stderr in batches, so a push's log line costs its caller a short mutex and a copy, never
//! a system call.
//!
//! - **Batches.** The writer thread sleeps while the buffer is empty. The first line into an
//!   empty buffer wakes it; it then waits [`LINGER`] for more (or until [`HIGH_WATER`] bytes are
//!   waiting) and writes all of them with one `write`. Under load that is about one system
//!   call per [`LINGER`] or per [`HIGH_WATER`] bytes; when idle a line is out within [`LINGER`].
//! - **Bounded, never silent.** At most [`CAPACITY`] bytes wait. When the output cannot keep
//!   up (journald stalled, a pipe nobody reads) a line that does not fit is dropped, not
//!   waited for: the caller is a runtime worker answering WeChat, and a worker blocked on
//!   stderr stops every push it would serve, while the metrics still count each push. Every
//!   dropped line counts in `wechat_relay_log_lines_dropped_total`, and once a batch is
//!   written again one line says how many were dropped (`log lines dropped`). Lines lost to a
//!   failed write are counted the same way.
//! - **Flushed at exit.** Dropping the [`Flush`] guard (at the end of `main`, also on its error
//!   paths and when it unwinds) writes what is waiting and stops the thread, waiting at most
//!   [`EXIT_WAIT`] for an output that does not move. A line logged after that is written
//!   directly.
//!
//! A line is whole in the output: the fmt layer hands over each formatted event (its newline
//! included) in one `write`, which is appended in one piece or dropped in one piece.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// The most bytes waiting for the output (about 5,000 push lines).
pub const CAPACITY: usize = 1 << 20;
/// Waiting bytes that are written without lingering further.
pub const HIGH_WATER: usize = 64 << 10;
/// How long the writer thread lets lines gather after the first one arrives.
pub const LINGER: Duration = Duration::from_millis(10);
/// How long the exit waits for an output that does not take its last lines.
pub const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Hands out [`LogWriter`]s to the fmt layer; cheap to clone.
#[derive(Clone)]
pub struct LogOutput {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, once every waiting line is written.
#[must_use = "dropping it flushes the log and stops its writer thread"]
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// One event's writer (the fmt layer makes one per line).
pub struct LogWriter<'a> {
    shared: &'a Shared,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits on it for lines (or for more lines).
    wake: Condvar,
    /// [`Flush`] waits on it for the writer thread's last batch.
    finished: Condvar,
    sink: Mutex<Box<dyn Write + Send>>,
    capacity: usize,
    /// Says how many lines were dropped, once a batch was written after them.
    report: Box<dyn Fn(u64) + Send + Sync>,
}

struct State {
    lines: Vec<u8>,
    /// Lines dropped since the last report.
    dropped: u64,
    waiting: Waiting,
    /// [`Flush`] was dropped: the thread writes what is left and ends; later lines go direct.
    closed: bool,
    /// The thread wrote its last batch.
    finished: bool,
}

/// What the writer thread waits for, so that a caller wakes it only when it must.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Busy (or already woken): nobody needs a wake-up.
    Nothing,
    /// Idle with an empty buffer: the first line wakes it.
    FirstLine,
    /// Lingering: the line that crosses [`HIGH_WATER`] wakes it.
    HighWater,
}

impl LogOutput {
    /// Lines for stderr; the report is a `warn` line through the logger itself.
    pub fn stderr() -> (LogOutput, Flush) {
        Self::start(Box::new(io::stderr()), CAPACITY, |dropped| {
            tracing::warn!(dropped, "log lines dropped: the output could not keep up");
        })
    }

    /// Lines for `sink`, at most `capacity` bytes waiting; `report` is called with the number
    /// of lines dropped once the output takes a batch again.
    pub fn start(
        sink: Box<dyn Write + Send>,
        capacity: usize,
        report: impl Fn(u64) + Send + Sync + 'static,
    ) -> (LogOutput, Flush) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lines: Vec::new(),
                dropped: 0,
                waiting: Waiting::Nothing,
                closed: false,
                finished: false,
            }),
            wake: Condvar::new(),
            finished: Condvar::new(),
            sink: Mutex::new(sink),
            capacity,
            report: Box::new(report),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || shared.run())
        };
        let thread = match thread {
            Ok(thread) => Some(thread),
            Err(e) => {
                // No thread: every line is written directly, as after the exit's flush.
                let _ = writeln!(io::stderr(), "cannot start the log writer thread: {e}");
                lock(&shared.state).closed = true;
                None
            }
        };
        let flush = Flush {
            shared: Arc::clone(&shared),
            thread,
        };
        (LogOutput { shared }, flush)
    }
}

impl<'a> MakeWriter<'a> for LogOutput {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter {
            shared: &self.shared,
        }
    }
}

impl Write for LogWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.shared.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let shared = &self.shared;
        let mut state = lock(&shared.state);
        state.closed = true;
        state.waiting = Waiting::Nothing;
        shared.wake.notify_one();
        let deadline = Instant::now().checked_add(EXIT_WAIT);
        while !state.finished {
            let left = deadline.map_or(EXIT_WAIT, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                // The output does not move: exit without the thread rather than hang.
                return;
            }
            state = shared
                .finished
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(state);
        let _ = thread.join();
    }
}

impl Shared {
    /// A caller's line: into the buffer, dropped (and counted) if it does not fit, or written
    /// directly once the writer thread has stopped.
    fn append(&self, line: &[u8]) {
        let mut state = lock(&self.state);
        if state.closed {
            drop(state);
            let mut sink = lock(&self.sink);
            let _ = sink.write_all(line).and_then(|()| sink.flush());
            return;
        }
        let before = state.lines.len();
        let after = before.saturating_add(line.len());
        if after > self.capacity {
            state.dropped = state.dropped.saturating_add(1);
            drop(state);
            crate::metrics::log_lines_dropped(1);
            return;
        }
        state.lines.extend_from_slice(line);
        let wake = match state.waiting {
            Waiting::Nothing => false,
            Waiting::FirstLine => true,
            Waiting::HighWater => before < HIGH_WATER && after >= HIGH_WATER,
        };
        if wake {
            state.waiting = Waiting::Nothing;
            drop(state);
            self.wake.notify_one();
        }
    }

    /// The writer thread: waits for a first line, lingers for more, writes them in one go.
    fn run(&self) {
        let mut batch = Vec::new();
        loop {
            let mut state = lock(&self.state);
            while state.lines.is_empty() && !state.closed {
                state.waiting = Waiting::FirstLine;
                state = self
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let until = Instant::now().checked_add(LINGER);
            while !state.closed && state.lines.len() < HIGH_WATER {
                let left = until.map_or(Duration::ZERO, |u| {
                    u.saturating_duration_since(Instant::now())
                });
                if left.is_zero() {
                    break;
                }
                state.waiting = Waiting::HighWater;
                state = self
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            state.waiting = Waiting::Nothing;
            let closing = state.closed;
            drop(state);
            self.write_batch(&mut batch);
            if closing {
                // Lines appended after `closed` went directly to the sink.
                let mut state = lock(&self.state);
                state.finished = true;
                self.finished.notify_all();
                return;
            }
        }
    }

    /// Writes every waiting line with one `write_all`; `batch` is the spare buffer swapped in.
    fn write_batch(&self, batch: &mut Vec<u8>) {
        // The sink first, then the buffer: batches leave in the order their lines arrived.
        let mut sink = lock(&self.sink);
        let dropped = {
            let mut state = lock(&self.state);
            std::mem::swap(&mut state.lines, batch);
            std::mem::take(&mut state.dropped)
        };
        if batch.is_empty() && dropped == 0 {
            return;
        }
        let written = sink.write_all(batch).and_then(|()| sink.flush());
        drop(sink);
        let lost = match written {
            Ok(()) => 0,
            Err(_) => batch.iter().filter(|&&b| b == b'\n').count() as u64,
        };
        batch.clear();
        if lost > 0 {
            crate::metrics::log_lines_dropped(lost);
        }
        if written.is_ok() {
            if dropped > 0 {
                (self.report)(dropped);
            }
        } else {
            // Counted again with the lines lost now; reported once a write succeeds.
            let mut state = lock(&self.state);
            state.dropped = state.dropped.saturating_add(dropped).saturating_add(lost);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;

    /// A sink that counts its `write` calls and keeps what it was given; `gate`, when set, is
    /// waited on before each write (a stalled output).
    #[derive(Clone, Default)]
    struct Counting {
        writes: Arc<AtomicU64>,
        bytes: Arc<Mutex<Vec<u8>>>,
        gate: Option<Arc<Mutex<mpsc::Receiver<()>>>>,
    }

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(gate) = &self.gate {
                let _ = lock(gate).recv();
            }
            self.writes.fetch_add(1, Ordering::SeqCst);
            lock(&self.bytes).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn line(thread: usize, n: usize) -> String {
        format!("thread={thread} n={n} {}\n", "x".repeat(80))
    }

    #[test]
    fn a_burst_comes_out_whole_in_order_in_few_writes() {
        const THREADS: usize = 4;
        const LINES: usize = 5_000;
        let sink = Counting::default();
        let reports = Arc::new(AtomicU64::new(0));
        // Room for the whole burst: however the threads are scheduled, nothing is dropped.
        let capacity = 4 * THREADS * LINES * line(0, 0).len();
        let (output, flush) = LogOutput::start(Box::new(sink.clone()), capacity, {
            let reports = Arc::clone(&reports);
            move |n| {
                reports.fetch_add(n, Ordering::SeqCst);
            }
        });
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let output = output.clone();
                scope.spawn(move || {
                    for n in 0..LINES {
                        // As the fmt layer does: one write_all per line.
                        output
                            .make_writer()
                            .write_all(line(t, n).as_bytes())
                            .expect("never fails");
                    }
                });
            }
        });
        drop(flush);
        let text = String::from_utf8(lock(&sink.bytes).clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), THREADS * LINES, "every line is there");
        let mut next = [0usize; THREADS];
        for l in &lines {
            let (t, n) = l
                .strip_prefix("thread=")
                .and_then(|rest| rest.split_once(" n="))
                .expect("a whole line");
            let t: usize = t.parse().expect("thread");
            let n: usize = n
                .split_once(' ')
                .and_then(|(n, _)| n.parse().ok())
                .expect("n");
            assert_eq!(format!("{l}\n"), line(t, n), "the line is whole");
            assert_eq!(next[t], n, "thread {t}'s lines in order");
            next[t] = n + 1;
        }
        let writes = sink.writes.load(Ordering::SeqCst);
        assert!(
            writes * 20 <= (THREADS * LINES) as u64,
            "{writes} writes for {} lines",
            THREADS * LINES
        );
        assert_eq!(reports.load(Ordering::SeqCst), 0, "nothing dropped");
    }

    #[test]
    fn a_stalled_output_drops_and_counts_instead_of_blocking() {
        let (open, gate) = mpsc::channel();
        let sink = Counting {
            gate: Some(Arc::new(Mutex::new(gate))),
            ..Counting::default()
        };
        let reports = Arc::new(Mutex::new(Vec::new()));
        let capacity = 16 * 1024;
        let (output, flush) = LogOutput::start(Box::new(sink.clone()), capacity, {
            let reports = Arc::clone(&reports);
            move |n| lock(&reports).push(n)
        });
        // Far more than the capacity, while the sink takes nothing: the caller must come back.
        let lines = 4 * capacity / line(0, 0).len();
        let (done, finished) = mpsc::channel();
        let writer = output.clone();
        std::thread::spawn(move || {
            for n in 0..lines {
                let _ = writer.make_writer().write_all(line(0, n).as_bytes());
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the caller is not blocked by a stalled output");
        // The output moves again: the waiting lines go out, then the report.
        drop(open);
        let start = Instant::now();
        while lock(&reports).is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the drops are reported once the output moves"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        output
            .make_writer()
            .write_all(b"after the stall\n")
            .expect("never fails");
        drop(flush);
        let text = String::from_utf8(lock(&sink.bytes).clone()).expect("utf-8");
        let written = text.lines().filter(|l| l.starts_with("thread=")).count();
        let dropped: u64 = lock(&reports).iter().sum();
        assert!(dropped > 0, "lines past the capacity are dropped");
        assert_eq!(
            written as u64 + dropped,
            lines as u64,
            "every line is written or counted"
        );
        assert!(text.ends_with("after the stall\n"));
    }

    #[test]
    fn an_idle_line_is_written_without_waiting_for_more() {
        let sink = Counting::default();
        let (output, _flush) = LogOutput::start(Box::new(sink.clone()), CAPACITY, |_| {});
        output
            .make_writer()
            .write_all(b"alone\n")
            .expect("never fails");
        let start = Instant::now();
        while lock(&sink.bytes).is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "a lone line is written while the writer runs"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(&*lock(&sink.bytes), b"alone\n");
    }

    #[test]
    fn after_the_flush_lines_go_directly() {
        let sink = Counting::default();
        let (output, flush) = LogOutput::start(Box::new(sink.clone()), CAPACITY, |_| {});
        output.make_writer().write_all(b"one\n").expect("write");
        drop(flush);
        assert_eq!(&*lock(&sink.bytes), b"one\n", "flushed at drop");
        output.make_writer().write_all(b"two\n").expect("write");
        assert_eq!(&*lock(&sink.bytes), b"one\ntwo\n", "written directly");
    }
}
