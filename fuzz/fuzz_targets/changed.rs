#![no_main]
//! cargo fuzz target `changed`: see `vmkeep_fuzz::changed`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkeep_fuzz::changed(data));
