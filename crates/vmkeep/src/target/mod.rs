//! Where restores write: a raw file, a block device, a new qcow2 image, an NBD export.

pub mod file;
mod format;
pub mod nbd;

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

/// Open TARGET for a disk of `size` bytes: an NBD URI, a path ending in `.qcow2` (a new
/// qcow2 image), or a raw file or block device.
pub fn open(to: &str, size: u64) -> Result<Box<dyn Target>> {
    if to.starts_with("nbd://") || to.starts_with("nbd+unix://") || to.starts_with("nbds://") {
        return Ok(Box::new(nbd::NbdTarget::connect(to, size)?));
    }
    let path = std::path::Path::new(to);
    if to.ends_with(".qcow2") && !crate::source::open::is_block_device(path) {
        return Ok(Box::new(nbd::NbdTarget::qcow2(path, size)?));
    }
    Ok(Box::new(file::FileTarget::create(path, size)?))
}

/// Where a new file target is written before it is renamed into place (a stale one from an
/// interrupted restore is removed).
pub(crate) fn partial_path(path: &std::path::Path) -> Result<std::path::PathBuf> {
    let mut name = path
        .file_name()
        .ok_or_else(|| crate::Error::usage(format!("{} is not a file name", path.display())))?
        .to_os_string();
    name.push(".vmkeep-partial");
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    Ok(tmp)
}
