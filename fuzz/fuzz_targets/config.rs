#![no_main]
//! `cargo fuzz run config`: see `wechat_relay_fuzz::config`.

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

/// The folder each input is written to as relay.toml (one per fuzzing process).
static DIR: LazyLock<tempfile::TempDir> =
    LazyLock::new(|| tempfile::tempdir().expect("a temporary folder"));

fuzz_target!(|data: &[u8]| wechat_relay_fuzz::config(DIR.path(), data));
