//! libvirt: the VM inventory, pull-mode backups with checkpoints, and defining a restored
//! copy of a VM.
//!
//! [`Hypervisor`] is a connection (`qemu:///system` by default), [`Domain`] one VM. A
//! backup of a running VM is a libvirt *pull-mode* backup ([`Domain::begin_backup`]):
//! QEMU freezes a point-in-time view of the chosen disks (copy-before-write into a qcow2
//! scratch file per disk) and serves each one over NBD on a unix socket; vmkeep's NBD
//! client reads them and [`PullBackup::end`] stops the job. The `virt` crate supplies the
//! connection and domain calls; the backup and checkpoint calls exist only as raw C
//! functions in `virt::sys` and are wrapped once, in `ffi.rs`, the only `unsafe` of this
//! module. The XML in and out is handled by pure functions in [`xml`].
//!
//! # Names on the NBD socket (libvirt 9.0, QEMU 7.2)
//! Each disk is exported under its target name (`vda`). An incremental backup also
//! exports a dirty bitmap named `backup-<target>`, read through the NBD metadata context
//! `qemu:dirty-bitmap:backup-vda`; a full backup offers only `base:allocation`. vmkeep
//! takes the names from the running job's XML and falls back to
//! [`xml::default_export_names`]; [`xml::dirty_bitmap_context`] builds the context name.
//!
//! # Detecting a failed backup
//! A pull-mode job never completes on its own: it runs until someone aborts it, QEMU stops,
//! or copy-before-write fails (scratch space exhausted). The NBD client cannot tell all of
//! these from a good read (the export may just vanish), and libvirt reports an abort from
//! outside (`virsh domjobabort`) exactly like vmkeep's own normal end: a *completed*
//! backup job with the message "Operation canceled"; a destroyed VM leaves a *cancelled*
//! job. So a [`PullBackup`] is trusted only while [`PullBackup::state`] says
//! [`BackupJobState::Running`] (an active backup job serving *our* socket), and
//! [`PullBackup::end`] succeeds only when it was still running when vmkeep ended it and
//! did not end as failed. Callers check the state after reading the last block and
//! before committing a generation.
//!
//! # Permissions
//! QEMU runs as `libvirt-qemu` (Debian; uid and gid come from the running VM's DAC label).
//! It creates the NBD socket and writes the scratch files, so their folders must be
//! writable by it; whoever can connect to the socket can read the VM's disks, so nobody
//! else may enter the socket folder. vmkeep creates missing folders with
//! [`crate::fsutil::new_private_dir`]: owner root (vmkeep itself), group QEMU's gid, mode
//! 0770 ([`crate::fsutil::Share::qemu`]). Root
//! ownership rather than `libvirt-qemu:… 0700` keeps a compromised QEMU from loosening the
//! folder's mode (only the owner may chmod), while still letting it create and remove its
//! socket. QEMU creates the socket itself `rwxrwxr-x` (no write for others, so they could
//! not connect even with a looser folder). Folders the caller passes in are used as they
//! are (`engine::live` makes them fresh with [`crate::fsutil::private_dir`]); a missing
//! one is made fresh, in a parent checked by [`crate::fsutil::safe_base`]. libvirt
//! removes the scratch files when the job ends; when QEMU dies the socket file stays
//! behind, and [`PullBackup::end`] (or dropping the handle) removes it.
//!
//! # AppArmor (Debian, Ubuntu)
//! With AppArmor enabled, libvirt's per-VM profile admits the scratch files (libvirt
//! labels them when the job starts), but not a socket in an arbitrary folder. Allow the
//! socket folder once, in `/etc/apparmor.d/local/abstractions/libvirt-qemu`:
//! `/run/vmkeep/** rwk,` (or wherever the sockets live), then reload the profiles. The
//! test machine had AppArmor disabled, so this is from the profiles' text, not a test.
//!
//! # Checkpoints
//! A checkpoint is libvirt metadata plus a persistent dirty bitmap of the same name in
//! each tracked qcow2 image (raw disks cannot be tracked; they are always read in full).
//! All bitmaps stay active: checkpoint `c1` records every write since `c1`, whatever was
//! created after it, so deleting any checkpoint leaves the others valid. libvirt 9.0
//! refuses to delete a checkpoint of a shut-off VM; [`Domain::delete_checkpoint`] then
//! deletes the metadata and removes the bitmaps with `qemu-img bitmap --remove`.
//! libvirt 9.0 cannot choose the bitmap granularity; QEMU uses the qcow2 cluster size
//! (64 KiB by default).

mod backup;
mod checkpoint;
mod domain;
mod ffi;
mod volume;
pub mod xml;

use std::fmt;

use crate::error::Error;
pub(crate) use backup::port_taken;
pub use backup::{
    describe as describe_job, AroundBegin, BackupDisk, BackupJobState, BackupPlan, BackupStart,
    PullBackup,
};
pub use checkpoint::CheckpointDelete;
pub use domain::uri_host;
pub use domain::{DiskInfo, Domain, DomainInfo, DomainState, Hypervisor, Started};
pub use volume::Volume;
pub use xml::{dirty_bitmap_context, CheckpointInfo, CopySpec, DiskDevice, DiskSource, NewDisk};

/// This host's name (`uname -n`): what a remote hypervisor reaches it by unless told
/// otherwise, and what vmkeep's live marks name as their host.
pub fn this_host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// The connection used when none is given.
pub const DEFAULT_URI: &str = "qemu:///system";

/// A libvirt failure as a source error naming the VM (`vm` empty: the connection).
fn lv_error(vm: &str, detail: impl fmt::Display) -> Error {
    if vm.is_empty() {
        Error::source("libvirt", detail)
    } else {
        Error::source(format!("libvirt {vm}"), detail)
    }
}
