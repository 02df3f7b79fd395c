//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod archive;
pub mod garage;
pub mod libvirt;
