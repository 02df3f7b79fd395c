//! One writer per VM: an `flock` on `REPO/VM/lock`.
//!
//! The lock file holds the holder's pid and command so that a second writer can say who
//! is busy with the VM. The kernel drops the lock when the holder dies, however it dies,
//! so there is never a stale lock to clean up.
//!
//! The lock file is opened relative to the opened VM folder (`openat`), and neither the
//! folder nor the file may be a symbolic link (`O_NOFOLLOW`): a planted `lock -> /etc/passwd`
//! is refused, never truncated.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fd::AsFd;
use rustix::fs::{fstat, openat, FileType, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use crate::archive::names;
use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// Which `flock` to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Many holders at once (a pin).
    Shared,
    /// One holder (the VM lock; a stale pin's remover).
    Exclusive,
}

/// Whether [`flock`] waits for a lock held by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until the lock is free (an interrupted wait is resumed).
    Block,
    /// Fail at once: [`flock`] returns `Ok(false)`.
    NoWait,
}

/// Take an `flock` of `kind` on the open file `fd` (at `path`, for errors): `Ok(true)` when
/// taken, `Ok(false)` when someone else holds it and `wait` is [`Wait::NoWait`]. The
/// kernel drops the lock when the last descriptor of the open file is closed, however the
/// holder dies. The one lock primitive of the archive: the VM lock and pins use it.
pub fn flock(fd: impl AsFd, kind: LockKind, wait: Wait, path: &Path) -> Result<bool> {
    let op = match (kind, wait) {
        (LockKind::Shared, Wait::Block) => FlockOperation::LockShared,
        (LockKind::Shared, Wait::NoWait) => FlockOperation::NonBlockingLockShared,
        (LockKind::Exclusive, Wait::Block) => FlockOperation::LockExclusive,
        (LockKind::Exclusive, Wait::NoWait) => FlockOperation::NonBlockingLockExclusive,
    };
    loop {
        match rustix::fs::flock(&fd, op) {
            Ok(()) => return Ok(true),
            Err(Errno::WOULDBLOCK) if wait == Wait::NoWait => return Ok(false),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(Error::io(path, e.into())),
        }
    }
}

/// A held VM lock; dropping it releases the lock.
#[derive(Debug)]
pub struct VmLock {
    file: File,
    path: PathBuf,
}

impl VmLock {
    /// Take the lock of the VM whose folder is `dir`, or fail at once naming the holder.
    pub fn acquire(dir: &Path, vm: &str, what: &str) -> Result<VmLock> {
        let dir_fd = fsutil::open_dir_nofollow(dir)?;
        let path = names::lock_path(dir);
        let fd = openat(
            &dir_fd,
            names::LOCK,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::from_raw_mode(fsutil::FILE_MODE),
        )
        .map_err(|e| match e {
            Errno::LOOP => fsutil::symlink_refused(&path),
            e => Error::io(&path, e.into()),
        })?;
        let st = fstat(&fd).map_err(|e| Error::io(&path, e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Error::corrupt(&path, "is not a regular file (refused)"));
        }
        if st.st_nlink > 1 {
            return Err(Error::corrupt(
                &path,
                format!(
                    "has {} hard links; vmkeep never writes in place into a file that has another name (refused)",
                    st.st_nlink
                ),
            ));
        }
        if !flock(&fd, LockKind::Exclusive, Wait::NoWait, &path)? {
            // The holder line is short; a lock file grown by anything else is not
            // read whole.
            let mut holder = String::new();
            let _ = File::from(fd).take(256).read_to_string(&mut holder);
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
        let mut file = File::from(fd);
        file.set_len(0).at(&path)?;
        file.rewind().at(&path)?;
        // The holder line only informs a second writer; the flock is the lock. A full
        // disk must not keep recovery (which frees space) from taking the lock.
        if let Err(e) = write!(file, "pid {} ({what})", std::process::id()) {
            tracing::debug!("{}: holder line not written: {e}", path.display());
        }
        Ok(VmLock { file, path })
    }

    /// The lock file, `REPO/VM/lock`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        // The holder line is cleared so that nobody reads a dead pid from it.
        let _ = self.file.set_len(0);
        unlock(&self.file);
    }
}

/// Release a flock now. Closing the descriptor is not enough: a child that any thread
/// of this process is spawning holds a copy of every descriptor until it runs its
/// program (close-on-exec closes them only then), and with it the lock.
pub fn unlock(fd: impl AsFd) {
    let _ = rustix::fs::flock(&fd, FlockOperation::Unlock);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_lock_released_while_a_thread_spawns_children_is_taken_again() {
        // A child spawned by any thread holds a copy of every descriptor until it runs
        // its program (close-on-exec closes them only then), and with it the flock: a
        // run that takes the lock the moment another released it must not fail.
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let spawner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = std::process::Command::new("true").status();
                }
            })
        };
        let mut busy = 0;
        for _ in 0..400 {
            match VmLock::acquire(dir.path(), "vm", "test") {
                Ok(lock) => drop(lock),
                Err(Error::Busy { .. }) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        spawner.join().unwrap();
        assert_eq!(busy, 0, "the lock was busy {busy} times with no holder");
    }
}
