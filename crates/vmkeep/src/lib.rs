//! vmkeep: block-level backups of VM disks.
//!
//! The newest generation of every disk is a plain sparse raw image; each older generation
//! is a compressed reverse diff against the next newer one; every block has a BLAKE3
//! digest. This crate holds the archive format ([`archive`]), the pipelines that back up,
//! restore, check and prune ([`engine`]), the disk sources ([`source`]) and restore
//! targets ([`target`]). The `vmkeep` binary is a thin command-line layer over it.

pub mod archive;
pub mod bufpool;
pub mod engine;
pub mod error;
pub mod fault;
pub mod fsutil;
pub mod hooks;
pub mod interrupt;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod nbd;
pub mod offsite;
pub mod progress;
pub mod source;
pub mod target;
pub mod tls;
pub mod tuning;

pub use error::{Error, ErrorKind, Result};
