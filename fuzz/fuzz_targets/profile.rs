#![no_main]
//! cargo fuzz target `profile`: see `vmkeep_fuzz::profile`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkeep_fuzz::profile(data));
