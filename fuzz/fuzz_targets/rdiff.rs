#![no_main]
//! cargo fuzz target `rdiff`: see `vmkeep_fuzz::rdiff`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkeep_fuzz::rdiff(data));
