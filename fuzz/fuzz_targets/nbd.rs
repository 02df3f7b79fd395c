#![no_main]
//! cargo fuzz target `nbd`: see `vmkeep_fuzz::nbd`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkeep_fuzz::nbd(data));
