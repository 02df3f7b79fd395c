//! The fuzz targets' harness: the same file the proptest harness of `cargo test` uses.

#[path = "../../crates/vmkeep/tests/support/fuzz.rs"]
mod harness;

pub use harness::*;
