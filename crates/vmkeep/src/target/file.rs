//! Restore to a regular file (written beside and renamed into place, sparse) or onto a
//! block device (written in place, zeros discarded or written).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::Target;
use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// A restore target on the local file system: a regular file is written sparse to a
/// `.vmkeep-partial` file beside `path` and renamed into place on `finish`; a block device is
/// written in place.
pub struct FileTarget {
    file: File,
    /// Where the bytes go now.
    path: PathBuf,
    /// Where they end up (differs from `path` for regular files).
    final_path: PathBuf,
    fresh: bool,
    behind: fsutil::WriteBehind,
}

impl FileTarget {
    /// Prepare `path` to receive a disk of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<FileTarget> {
        let meta = std::fs::metadata(path).ok();
        if meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device())
        {
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .open(path)
                .at(path)?;
            let dev_size = fsutil::file_or_device_size(&file, path)?;
            if dev_size < size {
                return Err(Error::usage(format!(
                    "{} holds {dev_size} bytes; the disk needs {size}",
                    path.display()
                )));
            }
            return Ok(FileTarget {
                file,
                path: path.to_path_buf(),
                final_path: path.to_path_buf(),
                fresh: false,
                behind: fsutil::WriteBehind::default(),
            });
        }
        if meta.as_ref().is_some_and(|m| m.is_dir()) {
            return Err(Error::usage(format!("{} is a directory", path.display())));
        }
        let tmp = super::partial_path(path)?;
        let file = fsutil::create_new(&tmp)?;
        fsutil::set_len(&file, size, &tmp)?;
        Ok(FileTarget {
            file,
            path: tmp,
            final_path: path.to_path_buf(),
            fresh: true,
            behind: fsutil::WriteBehind::default(),
        })
    }
}

impl Target for FileTarget {
    fn describe(&self) -> String {
        self.final_path.display().to_string()
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        fsutil::write_at(&self.file, data, offset, &self.path)?;
        self.behind.wrote(&self.file, data.len() as u64);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.fresh {
            return Ok(()); // a new sparse file reads as zeros already
        }
        fsutil::punch_hole(&self.file, offset, len, &self.path)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        fsutil::sync_all(&self.file, &self.path)?;
        if self.path != self.final_path {
            fsutil::rename(&self.path, &self.final_path)?;
            fsutil::sync_dir(fsutil::parent(&self.final_path))?;
        }
        Ok(())
    }

    fn abort(self: Box<Self>) {
        if self.path != self.final_path {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
