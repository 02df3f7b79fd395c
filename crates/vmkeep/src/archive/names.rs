//! The names of vmkeep's files and folders in a repository, in one place, and the
//! validation of the names that become file names.
//!
//! Every path of a repository file is built here (the constants and the `*_file` and
//! `*_dir` functions below); `docs/FORMAT.md` describes the same names.
//!
//! VM and disk names come from the command line, the config file and domain XML; each one
//! becomes a folder or file name, so anything that could leave the repository or collide
//! with vmkeep's own files is refused up front.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The repository's identity, at the top of a repository (`REPO/repo.toml`).
pub const REPO_PROFILE: &str = "repo.toml";
/// The hypervisor inventory `update` writes (`REPO/allvm.toml`).
pub const INVENTORY: &str = "allvm.toml";
/// A VM's profile, in its folder (`REPO/VM/vm.toml`).
pub const VM_PROFILE: &str = "vm.toml";
/// A VM's writer lock file (`REPO/VM/lock`).
pub const LOCK: &str = "lock";
/// The record of a change in flight (`REPO/VM/txn.toml`).
pub const TXN_FILE: &str = "txn.toml";
/// Folder of the pins, inside the VM folder (`REPO/VM/pins`).
pub const PINS: &str = "pins";
/// Name of the link to the newest generation (`REPO/VM/latest`).
pub const LATEST: &str = "latest";
/// Suffix of a generation folder that is being made.
pub const PARTIAL: &str = ".partial";
/// Suffix of a generation folder that is being deleted.
pub const DELETING: &str = ".deleting";
/// What a generation made (`REPO/VM/GEN/generation.toml`).
pub const GENERATION_PROFILE: &str = "generation.toml";
/// The libvirt domain XML a generation saved (`REPO/VM/GEN/domain.xml`).
pub const DOMAIN_XML: &str = "domain.xml";
/// The libvirt checkpoint XML a generation saved, to redefine the checkpoint should
/// libvirt lose it (`REPO/VM/GEN/checkpoint.xml`).
pub const CHECKPOINT_XML: &str = "checkpoint.xml";
/// Suffix of a disk image of the newest generation (`DISK.raw`).
pub const IMAGE_SUFFIX: &str = ".raw";
/// Suffix of a digest file of the newest generation (`DISK.digest`).
pub const DIGEST_SUFFIX: &str = ".digest";
/// Suffix of a reverse diff of an older generation (`DISK.rdiff`).
pub const RDIFF_SUFFIX: &str = ".rdiff";
/// Suffix of a reverse diff being written, the undo journal of a running backup
/// (`DISK.rdiff.partial`).
pub const JOURNAL_SUFFIX: &str = ".rdiff.partial";
/// Suffix of the merged reverse diff a prune writes before it drops a generation
/// (`DISK.rdiff.merge`).
pub const MERGE_SUFFIX: &str = ".rdiff.merge";

fn disk_file(dir: &Path, disk: &str, suffix: &str) -> PathBuf {
    dir.join(format!("{disk}{suffix}"))
}

/// `VM/vm.toml` of the VM folder `vm_dir`.
pub fn vm_profile(vm_dir: &Path) -> PathBuf {
    vm_dir.join(VM_PROFILE)
}

/// `VM/lock` of the VM folder `vm_dir`.
pub fn lock_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(LOCK)
}

/// `VM/txn.toml` of the VM folder `vm_dir`.
pub fn txn_file(vm_dir: &Path) -> PathBuf {
    vm_dir.join(TXN_FILE)
}

/// `VM/GEN.partial`: generation `id` while it is being made.
pub fn partial_dir(vm_dir: &Path, id: &str) -> PathBuf {
    vm_dir.join(format!("{id}{PARTIAL}"))
}

/// `VM/GEN.deleting`: generation `id` while it is being deleted.
pub fn deleting_dir(vm_dir: &Path, id: &str) -> PathBuf {
    vm_dir.join(format!("{id}{DELETING}"))
}

/// `GEN/generation.toml` of the generation folder `dir`.
pub fn generation_profile(dir: &Path) -> PathBuf {
    dir.join(GENERATION_PROFILE)
}

/// `GEN/DISK.raw` of the generation folder `dir`.
pub fn image_file(dir: &Path, disk: &str) -> PathBuf {
    disk_file(dir, disk, IMAGE_SUFFIX)
}

/// `GEN/DISK.digest` of the generation folder `dir`.
pub fn digest_file(dir: &Path, disk: &str) -> PathBuf {
    disk_file(dir, disk, DIGEST_SUFFIX)
}

/// `GEN/DISK.rdiff` of the generation folder `dir`.
pub fn rdiff_file(dir: &Path, disk: &str) -> PathBuf {
    disk_file(dir, disk, RDIFF_SUFFIX)
}

/// `GEN/DISK.rdiff.partial` (the undo journal) of the generation folder `dir`.
pub fn journal_file(dir: &Path, disk: &str) -> PathBuf {
    disk_file(dir, disk, JOURNAL_SUFFIX)
}

/// `GEN/DISK.rdiff.merge` of the generation folder `dir`.
pub fn merge_file(dir: &Path, disk: &str) -> PathBuf {
    disk_file(dir, disk, MERGE_SUFFIX)
}

/// Longest name accepted, in bytes (file names may be 255 bytes; suffixes need room).
pub const MAX_NAME: usize = 200;

/// Names vmkeep uses for its own files at the top of a repository.
const RESERVED: &[&str] = &[REPO_PROFILE, INVENTORY, LOCK, "lost+found"];

fn check(kind: &str, name: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::usage(format!("invalid {kind} name {name:?}: {why}")));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME {
        return bad(&format!("it is longer than {MAX_NAME} bytes"));
    }
    if name.starts_with('.') {
        return bad("it starts with '.'");
    }
    if name.contains('/') {
        return bad("it contains '/'");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("it contains control characters");
    }
    if RESERVED.contains(&name) || name.ends_with(".tmp") || name.ends_with(".partial") {
        return bad("it is reserved for vmkeep's own files");
    }
    Ok(())
}

/// Check a VM name.
pub fn check_vm(name: &str) -> Result<()> {
    check("VM", name)
}

/// Check a disk name.
pub fn check_disk(name: &str) -> Result<()> {
    check("disk", name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escapes_and_oddities() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "/etc",
            "a\0b",
            "x\ny",
            "repo.toml",
            "x.tmp",
            &"v".repeat(201),
        ] {
            assert!(check_vm(bad).is_err(), "{bad:?} accepted");
            assert!(check_disk(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "web1",
            "db-01.example.com",
            "vda",
            "scsi0-0-0-0",
            "Ünïcode vm",
        ] {
            check_vm(good).unwrap();
        }
    }
}
