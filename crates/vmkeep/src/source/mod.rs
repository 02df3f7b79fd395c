//! Where backups read disks from. Every kind of source sits behind [`BlockSource`]; the
//! engine never knows whether the bytes come from a file, an NBD server or libvirt.

pub mod bitmap;
pub mod changed;
pub(crate) mod children;
pub mod file;
pub mod nbd;
pub mod open;
pub mod qemu;

use std::sync::Arc;

use crate::bufpool::{BufPool, PoolBuf};
use crate::error::Result;

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
    pub offset: u64,
    pub length: u64,
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
