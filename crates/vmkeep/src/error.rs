//! Typed errors of the library.
//!
//! Callers (the CLI, monitoring wrappers, tests) must be able to tell a damaged archive from
//! a failing source or a mistyped argument without parsing messages, so every failure is
//! one variant of [`Error`] and [`Error::kind`] sorts them into the classes that map onto
//! exit codes.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The class of a failure; the CLI maps it onto its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller asked for something that is not there or not allowed (exit 2).
    Usage,
    /// The archive holds bytes that fail their checks (exit 1; `check` exits 3).
    Corrupt,
    /// A file of the archive is not what the generation it is read for recorded (a
    /// digest root or a header's generation id does not match): exit 3, as `check`.
    Damage,
    /// An I/O failure in the repository or on a restore target (exit 1).
    Io,
    /// The backup source (file, NBD server, hypervisor) failed (exit 1).
    Source,
    /// Another process holds the VM (exit 1).
    Busy,
    /// A file is in a format or version this build does not read (exit 1).
    Format,
    /// SIGINT or SIGTERM stopped the command (exit 1).
    Interrupted,
}

/// Every error the library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller asked for something that is not there or not allowed (a bad argument, an
    /// unknown VM or generation); the message is the whole explanation.
    #[error("{0}")]
    Usage(String),
    /// Part of the archive fails its checks: bytes that do not decode or verify, or a file
    /// a generation must have that is missing.
    #[error("{path}: corrupt: {detail}")]
    Corrupt {
        /// The archive file or folder that failed its checks.
        path: PathBuf,
        /// What was wrong, for the message.
        detail: String,
    },
    /// An I/O call failed on a repository or target path (anything but a full disk).
    #[error("{context}: {source}")]
    Io {
        /// The path, or a short description, the failing call worked on.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A write found the device full: ENOSPC (and, through [`Error::io`], EDQUOT). The
    /// message tells the user that the archive is unchanged.
    #[error("{path}: no space left on device (the archive is unchanged)")]
    NoSpace {
        /// The file or context whose write found the device full.
        path: PathBuf,
    },
    /// The backup source (an image file, an NBD server, the hypervisor) failed.
    #[error("source {source_name}: {detail}")]
    Source {
        /// The source as the user named it (a path, an NBD URI, a VM and disk).
        source_name: String,
        /// What failed, for the message.
        detail: String,
    },
    /// An offsite target's server (an S3 endpoint) failed or refused a request; its
    /// kind is [`ErrorKind::Source`] (the other end, not this archive).
    #[error("offsite target {target_name}: {detail}")]
    Target {
        /// The target as the user named it, with the server it was reached at.
        target_name: String,
        /// What failed, for the message.
        detail: String,
    },
    /// Another process holds the VM's lock in the repository.
    #[error("VM {vm} is busy: {holder}")]
    Busy {
        /// The VM whose lock is taken.
        vm: String,
        /// Who holds the lock (as the lock file describes it), for the message.
        holder: String,
    },
    /// A file of a generation is not the one that generation recorded (a digest root or a
    /// header's generation id does not match).
    #[error("damage: VM {vm}, generation {generation}, disk {disk}: {}: {detail}", path.display())]
    Damage {
        /// The VM the damaged generation belongs to.
        vm: String,
        /// The id of the generation being read.
        generation: String,
        /// The disk of that generation.
        disk: String,
        /// The file that does not match.
        path: PathBuf,
        /// What does not match, for the message.
        detail: String,
    },
    /// A file is in a format or version this build does not read.
    #[error("{path}: {detail}")]
    Format {
        /// The file that cannot be read.
        path: PathBuf,
        /// Which format or version was found, for the message.
        detail: String,
    },
    /// SIGINT or SIGTERM stopped the command after it undid what it had started; the
    /// string names the signal.
    #[error("interrupted by {0}; what the command started was undone")]
    Interrupted(String),
}

/// The library's result type: [`Error`] unless another error type is named.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The class of this error, which the CLI maps onto its exit status.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Usage(_) => ErrorKind::Usage,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Io { .. } | Error::NoSpace { .. } => ErrorKind::Io,
            Error::Source { .. } | Error::Target { .. } => ErrorKind::Source,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Damage { .. } => ErrorKind::Damage,
            Error::Format { .. } => ErrorKind::Format,
            Error::Interrupted(_) => ErrorKind::Interrupted,
        }
    }

    /// The message without the name a [`Error::Source`] starts with (what failed, for a
    /// line that already names the source); the whole message for the other kinds.
    pub fn detail(&self) -> String {
        match self {
            Error::Source { detail, .. } | Error::Target { detail, .. } => detail.clone(),
            e => e.to_string(),
        }
    }

    /// A [`Error::Usage`] with `msg` as the whole message.
    pub fn usage(msg: impl fmt::Display) -> Self {
        Error::Usage(msg.to_string())
    }

    /// A [`Error::Corrupt`]: archive file or folder `path` fails its checks as `detail` says.
    pub fn corrupt(path: impl AsRef<Path>, detail: impl fmt::Display) -> Self {
        Error::Corrupt {
            path: path.as_ref().to_path_buf(),
            detail: detail.to_string(),
        }
    }

    /// A [`Error::Format`]: file `path` is in a format or version this build does not read.
    pub fn format(path: impl AsRef<Path>, detail: impl fmt::Display) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            detail: detail.to_string(),
        }
    }

    /// A [`Error::Source`]: the source the user named `name` failed as `detail` says.
    pub fn source(name: impl fmt::Display, detail: impl fmt::Display) -> Self {
        Error::Source {
            source_name: name.to_string(),
            detail: detail.to_string(),
        }
    }

    /// A [`Error::Target`]: offsite target `name` failed as `detail` says.
    pub fn target(name: impl fmt::Display, detail: impl fmt::Display) -> Self {
        Error::Target {
            target_name: name.to_string(),
            detail: detail.to_string(),
        }
    }

    /// An I/O error on a repository or target path; ENOSPC becomes [`Error::NoSpace`] so
    /// that the message says what the administrator has to fix.
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Self {
        let path = path.as_ref();
        if is_full(&source) {
            return Error::NoSpace {
                path: path.to_path_buf(),
            };
        }
        Error::Io {
            context: path.display().to_string(),
            source,
        }
    }

    /// An I/O error with a free-form context (not a single path).
    pub fn io_ctx(context: impl fmt::Display, source: io::Error) -> Self {
        if is_full(&source) {
            return Error::NoSpace {
                path: PathBuf::from(context.to_string()),
            };
        }
        Error::Io {
            context: context.to_string(),
            source,
        }
    }
}

/// The file system is full, or the user's quota is (both leave the archive as it was).
fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Attach a path to `std::io` results.
pub trait IoContext<T> {
    /// Turn an I/O error into [`Error::io`] on `path` (so ENOSPC becomes
    /// [`Error::NoSpace`]); a success passes through.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_or_quota_is_no_space_whichever_constructor_sees_it() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let by_path = Error::io("/repo/vm/x", io::Error::from_raw_os_error(errno));
            let by_context = Error::io_ctx("writing x", io::Error::from_raw_os_error(errno));
            assert!(matches!(by_path, Error::NoSpace { .. }), "{by_path:?}");
            assert!(
                matches!(by_context, Error::NoSpace { .. }),
                "{by_context:?}"
            );
        }
        let other = Error::io_ctx("writing x", io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(other, Error::Io { .. }), "{other:?}");
    }
}
