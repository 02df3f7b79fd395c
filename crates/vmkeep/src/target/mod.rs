//! Where restores write: a raw file, a block device, a new qcow2 image, an NBD export.

pub mod file;
mod format;
pub mod nbd;

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use format::ImageFormat;

use crate::error::Result;

/// A restore destination. Writes come in increasing offset order.
pub trait Target: Send {
    /// A short name for messages.
    fn describe(&self) -> String;
    /// Write `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make `[offset, offset + len)` read as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Make everything durable and put the result in place.
    fn finish(self: Box<Self>) -> Result<()>;
    /// Give up: remove whatever partial result can be removed.
    fn abort(self: Box<Self>);
}

/// A restore destination as given: an NBD URI, or a path (a `.qcow2` path is a new qcow2
/// image, anything else a raw file or block device). Parsed once from the argument, so
/// that a path need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `nbd://`, `nbd+unix://`, `nbds://` or `nbds+unix://`: an export that accepts writes.
    Nbd(String),
    /// A file, block device or new `.qcow2` image.
    Path(PathBuf),
}

impl Destination {
    /// An NBD URI when `to` starts with one of the NBD schemes, else a path.
    pub fn parse(to: &OsStr) -> Destination {
        match to.to_str() {
            Some(s) if crate::nbd::uri::is_nbd_uri(s) => Destination::Nbd(s.to_string()),
            _ => Destination::Path(PathBuf::from(to)),
        }
    }
}

impl From<&Path> for Destination {
    fn from(path: &Path) -> Destination {
        Destination::Path(path.to_path_buf())
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Nbd(uri) => f.write_str(uri),
            Destination::Path(path) => path.display().fmt(f),
        }
    }
}

/// Open `to` for a disk of `size` bytes: an NBD export, a new qcow2 image (a path ending
/// in `.qcow2` that is not a block device), or a raw file or block device.
pub fn open(to: &Destination, size: u64) -> Result<Box<dyn Target>> {
    let path = match to {
        Destination::Nbd(uri) => return Ok(Box::new(nbd::NbdTarget::connect(uri, size)?)),
        Destination::Path(path) => path,
    };
    if path.as_os_str().as_bytes().ends_with(b".qcow2")
        && !crate::source::open::is_block_device(path)
    {
        return Ok(Box::new(nbd::NbdTarget::qcow2(path, size)?));
    }
    Ok(Box::new(file::FileTarget::create(path, size)?))
}

/// Where a new file target is written before it is renamed into place (a stale one from an
/// interrupted restore is removed).
pub(crate) fn partial_path(path: &Path) -> Result<PathBuf> {
    let mut name = path
        .file_name()
        .ok_or_else(|| crate::Error::usage(format!("{} is not a file name", path.display())))?
        .to_os_string();
    name.push(".vmkeep-partial");
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nbd_scheme_is_a_uri_target() {
        for s in [
            "nbd://h/vda",
            "nbd+unix:///vda?socket=/s",
            "nbds://h/vda?tls-certificates=/d",
            "nbds+unix:///vda?socket=/s&tls-certificates=/d",
        ] {
            assert!(
                matches!(Destination::parse(OsStr::new(s)), Destination::Nbd(u) if u == s),
                "{s}"
            );
        }
        assert!(matches!(
            Destination::parse(OsStr::new("/tmp/nbds.raw")),
            Destination::Path(_)
        ));
    }
}
