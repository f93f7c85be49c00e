//! The standard process metrics of Prometheus's client libraries (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_start_time_seconds`), read
//! from `/proc` at each scrape and written in the text format beside the recorder's (its
//! counters hold whole numbers; CPU seconds need the fraction). Where `/proc` cannot be read
//! (not Linux) they are left out.

use std::fmt::Write;

/// What `/proc/self/stat` says, in its units (clock ticks, pages).
#[derive(Debug, PartialEq)]
struct Stat {
    cpu_ticks: u64,
    start_ticks: u64,
    rss_pages: u64,
}

/// The fields of `/proc/self/stat` (proc(5)) after the command name, which is in parentheses
/// and may hold spaces and parentheses itself: utime (14), stime (15), starttime (22), rss (24).
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field n of the line is fields[n - 3]: the pid and the name come before.
    let field = |n: usize| fields.get(n.checked_sub(3)?)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        start_ticks: field(22)?,
        rss_pages: field(24)?,
    })
}

/// The `btime` line of `/proc/stat`: boot time, in seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// sysconf(3), when it answers.
fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf reads a constant of the system; it has no preconditions.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|v| *v > 0)
}

/// One metric in the text format: its help, its type and its one sample.
fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// The process metrics that can be read now, in the Prometheus text format.
pub(super) fn render() -> String {
    let mut out = String::new();
    let ticks = sysconf(libc::_SC_CLK_TCK);
    let stat = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|text| parse_stat(&text));
    if let (Some(stat), Some(ticks)) = (&stat, ticks) {
        let cpu = stat.cpu_ticks as f64 / ticks as f64;
        sample(
            &mut out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            cpu,
        );
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_boot_time(&text));
        if let Some(boot) = boot {
            let start = boot as f64 + stat.start_ticks as f64 / ticks as f64;
            sample(
                &mut out,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                start,
            );
        }
    }
    if let (Some(stat), Some(page)) = (&stat, sysconf(libc::_SC_PAGESIZE)) {
        let rss = stat.rss_pages.saturating_mul(page) as f64;
        sample(
            &mut out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss,
        );
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        sample(
            &mut out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            entries.count() as f64,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_after_a_name_with_spaces_and_parentheses() {
        let line = "4242 (we (chat) relay) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    150 25 0 0 20 0 9 0 86000 123456789 3000 18446744073709551615 1 1 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                cpu_ticks: 175,
                start_ticks: 86000,
                rss_pages: 3000
            })
        );
        assert_eq!(parse_stat("4242 (cut short) S 1 2"), None);
    }

    #[test]
    fn reads_the_boot_time() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1764576000\nprocesses 42\n";
        assert_eq!(parse_boot_time(text), Some(1_764_576_000));
        assert_eq!(parse_boot_time("cpu 1\n"), None);
    }
}
