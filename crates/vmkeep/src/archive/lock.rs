//! One writer per VM: an `flock` on `REPO/VM/lock`.
//!
//! The lock file holds the holder's pid and command so that a second writer can say who
//! is busy with the VM. The kernel drops the lock when the holder dies, however it dies,
//! so there is never a stale lock to clean up.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// A held VM lock; dropping it releases the lock.
#[derive(Debug)]
pub struct VmLock {
    file: File,
    path: PathBuf,
}

impl VmLock {
    /// Take the lock of the VM whose folder is `dir`, or fail at once naming the holder.
    pub fn acquire(dir: &Path, vm: &str, what: &str) -> Result<VmLock> {
        // The VM folder itself must not be a symbolic link (whatever is done under it would
        // land elsewhere), nor the lock file (it is truncated below).
        fsutil::refuse_symlink(dir)?;
        let path = dir.join("lock");
        let mut file = fsutil::open_lock_file(&path)?;
        // SAFETY: flock on a descriptor we own; no pointers.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                // The holder line is short; a lock file grown by anything else is not
                // read whole.
                let mut holder = String::new();
                let _ = (&mut file).take(256).read_to_string(&mut holder);
                let holder = holder.trim_matches(|c: char| c.is_whitespace() || c == '\0');
                let holder = if holder.is_empty() {
                    "locked by another process".to_string()
                } else {
                    format!("locked by {holder}")
                };
                return Err(Error::Busy {
                    vm: vm.to_string(),
                    holder,
                });
            }
            return Err(Error::io(&path, err));
        }
        file.set_len(0).at(&path)?;
        file.rewind().at(&path)?;
        // The holder line only informs a second writer; the flock is the lock. A full
        // disk must not keep recovery (which frees space) from taking the lock.
        if let Err(e) = write!(file, "pid {} ({what})", std::process::id()) {
            tracing::debug!("{}: holder line not written: {e}", path.display());
        }
        Ok(VmLock { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        // The holder line is cleared so that nobody reads a dead pid from it.
        let _ = self.file.set_len(0);
    }
}
