//! Raw image files and block devices, read with `pread` and mapped with
//! `SEEK_DATA`/`SEEK_HOLE` so that holes are never read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BlockSource, Extent, ExtentKind};
use crate::error::{Error, Result};
use crate::fsutil;

/// A raw image file or block device read in place with `pread`; holes of a file (`SEEK_HOLE`) are
/// reported as [`ExtentKind::Zero`] and never read.
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileSource {
    /// Open `path` read-only and take its size (a file's length or a block device's size in bytes);
    /// a folder or an unreadable path is [`Error::Source`].
    pub fn open(path: &Path) -> Result<FileSource> {
        let file = File::open(path).map_err(|e| Error::source(path.display(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::source(path.display(), e))?;
        if meta.is_dir() {
            return Err(Error::source(path.display(), "is a directory"));
        }
        let size = fsutil::file_or_device_size(&file, path)
            .map_err(|e| Error::source(path.display(), e))?;
        // The backup planner prefetches exactly the extents it hands out (see
        // `prefetch`); the kernel's own readahead would also read into holes.
        fsutil::no_readahead(&file);
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl BlockSource for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the file shrank while it was read".to_string()
            } else {
                e.to_string()
            };
            Error::source(
                self.path.display(),
                format!("read at byte {offset}: {what}"),
            )
        })
    }

    fn prefetch(&self, offset: u64, length: u64) {
        fsutil::will_need(&self.file, offset, length);
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = (offset + length).min(self.size);
        let data = fsutil::data_extents(&self.file, offset, end)
            .map_err(|e| Error::source(self.path.display(), e))?;
        let mut out = Vec::with_capacity(data.len() * 2 + 1);
        let mut pos = offset;
        for (off, len) in data {
            if off > pos {
                out.push(Extent {
                    offset: pos,
                    length: off - pos,
                    kind: ExtentKind::Zero,
                });
            }
            out.push(Extent {
                offset: off,
                length: len,
                kind: ExtentKind::Data,
            });
            pos = off + len;
        }
        if pos < end {
            out.push(Extent {
                offset: pos,
                length: end - pos,
                kind: ExtentKind::Zero,
            });
        }
        Ok(out)
    }
}
