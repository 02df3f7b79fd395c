#![no_main]
//! cargo fuzz target `digest`: see `vmkeep_fuzz::digest`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkeep_fuzz::digest(data));
