#![no_main]
//! `cargo fuzz run message`: see `wechat_relay_fuzz::message`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| wechat_relay_fuzz::message(data));
