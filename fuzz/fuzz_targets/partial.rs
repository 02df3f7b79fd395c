#![no_main]
//! cargo fuzz target `partial`: see `vmkeep_fuzz::partial`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkeep_fuzz::partial(data));
