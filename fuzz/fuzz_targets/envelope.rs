#![no_main]
//! `cargo fuzz run envelope`: see `wechat_relay_fuzz::envelope`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wechat_relay_fuzz::envelope(data));
