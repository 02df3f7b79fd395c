//! Pins: a reader that needs a generation for a long time (`serve`) keeps `prune` from
//! dropping it.
//!
//! A pin is the file `REPO/VM/pins/<pid>-<generation>` on which its holder keeps a shared
//! `flock` for as long as it reads. The kernel drops the lock when the holder dies,
//! however it dies, so a pin whose lock can be taken exclusively is stale and is removed
//! by whoever notices. Readers take no VM lock (a backup may run while a generation is
//! served), so pins are advisory between readers and `prune` only; `prune` checks them
//! under its VM lock just before it drops each generation.
//!
//! Taking a pin is the classic lock-file dance: create, lock, then make sure the path
//! still names the locked file (a pruner may have removed it as stale in between), else
//! start over. Removing a stale pin happens under an exclusive lock and after the same
//! check, so a live pin is never removed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::GenerationId;
use crate::archive::lock::{flock, LockKind, Wait};
use crate::archive::names::PINS;
use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// A held pin; dropping it releases the lock and removes the file.
#[derive(Debug)]
pub struct Pin {
    file: File,
    path: PathBuf,
    /// The generation the pin holds: prune does not drop it while the pin lives.
    pub generation: GenerationId,
}

/// Distinguishes several pins of one generation in one process.
static SEQ: AtomicU64 = AtomicU64::new(0);

impl Pin {
    /// Pin generation `generation` of the VM whose folder is `vm_dir`.
    pub fn acquire(vm_dir: &Path, generation: &GenerationId, holder: &str) -> Result<Pin> {
        let dir = vm_dir.join(PINS);
        // Pin files are created, truncated and removed in this folder: it must be the VM
        // folder's own, not a symbolic link to somewhere else.
        fsutil::refuse_symlink(vm_dir)?;
        fsutil::refuse_symlink(&dir)?;
        fsutil::create_dir(&dir)?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut name = format!("{}-{generation}", std::process::id());
        if seq > 0 {
            name.push_str(&format!(".{seq}"));
        }
        let path = dir.join(name);
        loop {
            let mut file = fsutil::open_lock_file(&path)?;
            flock(&file, LockKind::Shared, Wait::Block, &path)?;
            if same_file(&file, &path) {
                file.set_len(0).at(&path)?;
                write!(file, "pid {} ({holder})", std::process::id()).at(&path)?;
                return Ok(Pin {
                    file,
                    path,
                    generation: generation.clone(),
                });
            }
        }
    }

    /// The pin file, `REPO/VM/pins/<pid>-<generation>[.<n>]`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        super::lock::unlock(&self.file);
    }
}

/// Generations pinned by live holders, sorted and without repeats. Stale pins (their
/// holder died) are removed on the way.
pub fn pinned_generations(vm_dir: &Path) -> Result<Vec<GenerationId>> {
    let dir = vm_dir.join(PINS);
    // Stale pins are removed from this folder: never through a symbolic link.
    fsutil::refuse_symlink(vm_dir)?;
    fsutil::refuse_symlink(&dir)?;
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.at(&dir)?;
        let Some(generation) = entry.file_name().to_str().and_then(generation_of) else {
            continue;
        };
        if is_live(&entry.path())? {
            out.push(generation);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The generation a pin file name names: `<pid>-<generation>[.<n>]`.
fn generation_of(name: &str) -> Option<GenerationId> {
    let (pid, rest) = name.split_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.split('.').next()?.parse().ok()
}

/// Is the pin at `path` held? A stale one is removed.
fn is_live(path: &Path) -> Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        // A symbolic link is no pin anybody holds: the link itself is removed, its target
        // is never opened.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            let _ = std::fs::remove_file(path);
            return Ok(false);
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    if !flock(&file, LockKind::Exclusive, Wait::NoWait, path)? {
        return Ok(true);
    }
    if same_file(&file, path) {
        let _ = std::fs::remove_file(path);
    }
    Ok(false)
}

/// Does `path` still name the open `file`?
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G1: &str = "0193a000-0000-7000-8000-000000000001";
    const G2: &str = "0193a000-0000-7000-8000-000000000002";

    fn id(s: &str) -> GenerationId {
        s.parse().unwrap()
    }

    #[test]
    fn held_pins_are_listed_and_released_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        assert!(pinned_generations(dir.path()).unwrap().is_empty());
        let a = Pin::acquire(dir.path(), &id(G1), "test").unwrap();
        let b = Pin::acquire(dir.path(), &id(G1), "test").unwrap();
        let c = Pin::acquire(dir.path(), &id(G2), "test").unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(pinned_generations(dir.path()).unwrap(), vec![G1, G2]);
        drop(a);
        assert_eq!(pinned_generations(dir.path()).unwrap(), vec![G1, G2]);
        drop(b);
        drop(c);
        assert!(pinned_generations(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn stale_pins_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let pins = dir.path().join(PINS);
        std::fs::create_dir_all(&pins).unwrap();
        // What a holder killed with SIGKILL leaves: the file, no lock.
        let stale = pins.join(format!("999999-{G1}"));
        std::fs::write(&stale, b"pid 999999").unwrap();
        std::fs::write(pins.join("unrelated"), b"").unwrap();
        assert!(pinned_generations(dir.path()).unwrap().is_empty());
        assert!(!stale.exists());
        assert!(pins.join("unrelated").exists());
    }

    #[test]
    fn pin_names_parse() {
        assert_eq!(generation_of(&format!("12-{G1}")).as_deref(), Some(G1));
        assert_eq!(generation_of(&format!("12-{G1}.3")).as_deref(), Some(G1));
        assert_eq!(generation_of(&format!("x-{G1}")), None);
        assert_eq!(generation_of("12-latest"), None);
    }
}
