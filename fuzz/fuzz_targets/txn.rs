#![no_main]
//! cargo fuzz target `txn`: see `vmkeep_fuzz::txn`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkeep_fuzz::txn(data));
