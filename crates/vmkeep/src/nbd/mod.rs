//! vmkeep's own NBD implementation: a client that reads disks from QEMU, libvirt and
//! nbdkit exports (structured replies, block status, several requests in flight, several
//! connections), and a read-only server that exports archived generations.
//!
//! It depends on the rest of the crate only through [`crate::error`], [`crate::fsutil`]
//! (`is_zero`, `parent`, `remove_file`), [`crate::bufpool`] and [`crate::tls`]; nothing
//! here knows archives, engines or sources. Keep it so: it is meant to be able to become
//! a crate of its own.

pub mod client;
pub mod proto;
pub mod server;
pub mod uri;
