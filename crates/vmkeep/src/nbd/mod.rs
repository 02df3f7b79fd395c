//! vmkeep's own NBD implementation: a client that reads disks from QEMU, libvirt and
//! nbdkit exports (structured replies, block status, several requests in flight, several
//! connections), and a read-only server that exports archived generations.

pub mod client;
pub mod proto;
pub mod server;
pub mod uri;
