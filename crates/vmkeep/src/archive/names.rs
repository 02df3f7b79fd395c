//! Validation of the names that become file names in the repository.
//!
//! VM and disk names come from the command line, the config file and domain XML; each one
//! becomes a folder or file name, so anything that could leave the repository or collide
//! with vmkeep's own files is refused up front.

use crate::error::{Error, Result};

/// Longest name accepted, in bytes (file names may be 255 bytes; suffixes need room).
pub const MAX_NAME: usize = 200;

/// Names vmkeep uses for its own files at the top of a repository.
const RESERVED: &[&str] = &["repo.toml", "allvm.toml", "lock", "lost+found"];

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
