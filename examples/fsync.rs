//! The disk's fsync latency, for `bench/load.sh`: in `--dir` (the store's folder), writes 4 KiB
//! and calls `sync_data` `--count` times (default 1,000), the way a commit of the store ends,
//! and prints `fsync_p50_us=N fsync_p99_us=N`.
//!
//!     fsync --dir DIR [--count 1000]

use std::io::Write;
use std::time::{Duration, Instant};

fn main() -> std::io::Result<()> {
    let (mut dir, mut count) = (String::from("."), 1_000usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--dir", Some(value)) => dir = value,
            ("--count", Some(value)) => {
                count = value.parse().map_err(std::io::Error::other)?;
            }
            _ => {
                eprintln!("usage: fsync --dir DIR [--count N]");
                std::process::exit(2)
            }
        }
    }
    let path = std::path::Path::new(&dir).join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut took: Vec<Duration> = Vec::with_capacity(count);
    for _ in 0..count {
        file.write_all(&block)?;
        let started = Instant::now();
        file.sync_data()?;
        took.push(started.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    took.sort();
    let at = |p: usize| {
        let index = (took.len().saturating_sub(1)).saturating_mul(p) / 100;
        took.get(index).map_or(0, |d| d.as_micros())
    };
    println!("fsync_p50_us={} fsync_p99_us={}", at(50), at(99));
    Ok(())
}
