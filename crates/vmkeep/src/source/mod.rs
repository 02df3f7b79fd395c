//! Where backups read disks from. Every kind of source sits behind [`BlockSource`]; the
//! engine never knows whether the bytes come from a file, an NBD server or libvirt.

pub mod archived;
pub mod bitmap;
pub mod chain;
pub mod changed;
pub(crate) mod children;
pub mod file;
pub mod labelled;
pub mod nbd;
pub mod open;
pub mod qemu;
pub mod tracked;

use std::path::Path;
use std::sync::Arc;

use crate::bufpool::{BufPool, PoolBuf};
use crate::error::Result;

pub use labelled::Labelled;
pub use open::{open_disk_source, open_source, Opened};

/// What a range of a source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated: must be read.
    Data,
    /// Known to read as zeros (a hole, or a zero extent): never read.
    Zero,
}

/// A byte range of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start of the range, in bytes from the start of the disk.
    pub offset: u64,
    /// Length of the range in bytes (not blocks).
    pub length: u64,
    /// Whether the range must be read or is known to read as zeros.
    pub kind: ExtentKind,
}

/// A disk to back up.
///
/// Implementations must be safe to read from several threads at once: the pipeline keeps
/// several reads in flight to hide a network source's latency.
pub trait BlockSource: Send + Sync {
    /// A short human-readable name (a path or URI) for messages and profiles.
    fn describe(&self) -> String;

    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// Read exactly `buf.len()` bytes at `offset` (within the disk).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Read `len` bytes at `offset` into a buffer from `pool` (a source that receives
    /// its data in a buffer of its own hands that over instead of copying it).
    fn read_buf(&self, pool: &Arc<BufPool>, offset: u64, len: usize) -> Result<PoolBuf> {
        let mut buf = pool.take(len);
        self.read_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// A hint: `[offset, offset + length)` will be read soon (a file source starts
    /// reading it into the page cache, so that reads of scattered blocks overlap).
    fn prefetch(&self, _offset: u64, _length: u64) {}

    /// What `[offset, offset + length)` holds, as extents in order that cover at least
    /// the start of the range (callers ask again for the rest).
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;

    /// Byte ranges written since the source's change-tracking point, or `None` when the
    /// source does not track changes.
    fn changed_extents(&self) -> Result<Option<Vec<(u64, u64)>>> {
        Ok(None)
    }

    /// How many reads the pipeline should keep in flight.
    fn parallelism(&self) -> usize {
        2
    }

    /// Largest read the source handles well.
    fn max_read(&self) -> usize {
        4 << 20
    }
}

/// What a disk's source is. Every generation records it per disk, and a run trusts a
/// change tracker (a bitmap, a changed-block list) only for a disk whose source is the one
/// the newest generation read: two disks swapped under their names, or an image replaced
/// by another file, are read whole (diff).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIdentity {
    /// The absolute path of a file or device, its folders resolved and its last name kept
    /// as given (an LVM snapshot `/dev/VG/LV` re-created for every run stays itself; a
    /// symbolic link to an image stays the link), or an NBD URI.
    pub origin: String,
    /// `(st_dev, st_ino)` of a regular file: a file put in the place of another has other
    /// numbers (a copy written over the file in place keeps them; see `source::bitmap` for
    /// what proves that an image was not rolled back).
    pub file: Option<(u64, u64)>,
}

impl SourceIdentity {
    /// A source known only by a name (an NBD URI, a libvirt disk's label).
    pub fn named(origin: &str) -> SourceIdentity {
        SourceIdentity {
            origin: origin.to_string(),
            file: None,
        }
    }

    /// The identity of the file or device at `path`.
    pub fn of_path(path: &Path) -> SourceIdentity {
        use std::os::unix::fs::MetadataExt;
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        let origin = match (abs.parent(), abs.file_name()) {
            (Some(dir), Some(name)) => dir
                .canonicalize()
                .map(|d| d.join(name))
                .unwrap_or_else(|_| abs.clone()),
            _ => abs.canonicalize().unwrap_or_else(|_| abs.clone()),
        };
        let file = std::fs::metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| (m.dev(), m.ino()));
        SourceIdentity {
            origin: origin.display().to_string(),
            file,
        }
    }
}
