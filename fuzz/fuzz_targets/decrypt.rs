#![no_main]
//! `cargo fuzz run decrypt`: see `wechat_relay_fuzz::decrypt`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wechat_relay_fuzz::decrypt(data));
