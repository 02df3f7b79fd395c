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
    #[error("{0}")]
    Usage(String),
    #[error("{path}: corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no space left on device (the archive is unchanged)")]
    NoSpace { path: PathBuf },
    #[error("source {source_name}: {detail}")]
    Source { source_name: String, detail: String },
    #[error("VM {vm} is busy: {holder}")]
    Busy { vm: String, holder: String },
    #[error("damage: VM {vm}, generation {generation}, disk {disk}: {}: {detail}", path.display())]
    Damage {
        vm: String,
        generation: String,
        disk: String,
        path: PathBuf,
        detail: String,
    },
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("interrupted by {0}; what the command started was undone")]
    Interrupted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Usage(_) => ErrorKind::Usage,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Io { .. } | Error::NoSpace { .. } => ErrorKind::Io,
            Error::Source { .. } => ErrorKind::Source,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Damage { .. } => ErrorKind::Damage,
            Error::Format { .. } => ErrorKind::Format,
            Error::Interrupted(_) => ErrorKind::Interrupted,
        }
    }

    pub fn usage(msg: impl fmt::Display) -> Self {
        Error::Usage(msg.to_string())
    }

    pub fn corrupt(path: impl AsRef<Path>, detail: impl fmt::Display) -> Self {
        Error::Corrupt {
            path: path.as_ref().to_path_buf(),
            detail: detail.to_string(),
        }
    }

    pub fn format(path: impl AsRef<Path>, detail: impl fmt::Display) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            detail: detail.to_string(),
        }
    }

    pub fn source(name: impl fmt::Display, detail: impl fmt::Display) -> Self {
        Error::Source {
            source_name: name.to_string(),
            detail: detail.to_string(),
        }
    }

    /// An I/O error on a repository or target path; ENOSPC becomes [`Error::NoSpace`] so
    /// that the message says what the administrator has to fix.
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Self {
        let path = path.as_ref();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
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
        if source.raw_os_error() == Some(libc::ENOSPC) {
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

/// Attach a path to `std::io` results.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
