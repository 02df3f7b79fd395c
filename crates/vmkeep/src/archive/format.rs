//! On-disk constants and the little helpers that encode fixed-size headers.
//!
//! The layouts are described byte for byte in `docs/FORMAT.md`; a change to anything here
//! is a format change and needs a new version number there.

use std::path::Path;

use crate::error::{Error, Result};

/// Magic of a digest file. Do not modify: archives in the field carry it.
pub const DIGEST_MAGIC: [u8; 8] = *b"VMKDGST\0";
/// Magic of a reverse-diff file. Do not modify.
pub const RDIFF_MAGIC: [u8; 8] = *b"VMKRDIF\0";
/// Magic of a reverse-diff footer. Do not modify.
pub const RDIFF_END_MAGIC: [u8; 8] = *b"VMKRDEND";
/// Magic of a reverse-diff record header. Do not modify.
pub const RECORD_MAGIC: [u8; 4] = *b"VKR1";

/// Version of the binary files this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Size of every fixed header and footer.
pub const HEADER_LEN: usize = 64;
/// Digest entries start here, so that the entry area is page aligned and can stay sparse.
pub const DIGEST_DATA_OFFSET: u64 = 4096;
/// Bytes of one block digest (BLAKE3-256).
pub const DIGEST_LEN: usize = 32;
/// Bytes of one reverse-diff index entry: block number and record offset.
pub const INDEX_ENTRY_LEN: usize = 16;

/// Smallest block size in bytes (4 KiB).
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size in bytes (4 MiB).
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;
/// Default block size; see docs/FORMAT.md for the measurements behind it.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
/// Largest disk size accepted (1 EiB), from a file or a source: far beyond any real disk,
/// and small enough that no block or byte arithmetic on a disk can overflow a u64.
pub const MAX_DISK_SIZE: u64 = 1 << 60;

const _: () = assert!(DIGEST_DATA_OFFSET as usize >= HEADER_LEN);
const _: () = assert!(DEFAULT_BLOCK_SIZE.is_power_of_two());

/// Check a block size read from a file or given on the command line.
pub fn valid_block_size(bs: u64) -> bool {
    bs.is_power_of_two() && bs >= MIN_BLOCK_SIZE as u64 && bs <= MAX_BLOCK_SIZE as u64
}

/// Check a disk size read from a file or reported by a source.
pub fn valid_disk_size(size: u64) -> bool {
    size <= MAX_DISK_SIZE
}

/// Number of blocks of a disk of `size` bytes.
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(block_size as u64)
}

/// Length of block `b` of a disk of `size` bytes (the last one may be short).
pub fn block_len(b: u64, size: u64, block_size: u32) -> usize {
    let start = b * block_size as u64;
    (size.saturating_sub(start)).min(block_size as u64) as usize
}

/// The first eight bytes of the BLAKE3 hash of `bytes`, as a u64: the check value of
/// every fixed header.
pub fn check64(bytes: &[u8]) -> u64 {
    let h = blake3::hash(bytes);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Write the check value of a fixed header's first 56 bytes into its last 8.
pub fn seal(b: &mut [u8; HEADER_LEN]) {
    let c = check64(&b[..56]);
    b[56..].copy_from_slice(&c.to_le_bytes());
}

/// The 64-byte header that digest and reverse-diff files share: magic, version, then the
/// same field layout for both (`docs/FORMAT.md`), sealed with [`seal`]. `aux32` and
/// `aux64` mean what each kind says: in a digest file a reserved zero and the block
/// count, in a reverse diff the compression and the next generation's disk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Header flags (none in a digest file).
    pub flags: u32,
    /// Block size of the disk.
    pub block_size: u32,
    /// The kind's own 32-bit field.
    pub aux32: u32,
    /// Size of the disk at the file's generation.
    pub disk_size: u64,
    /// The kind's own 64-bit field.
    pub aux64: u64,
    /// The generation the file belongs to (its id's 16 bytes).
    pub generation: [u8; 16],
}

impl FileHeader {
    /// The header's bytes, with `magic` and this build's [`FORMAT_VERSION`].
    pub fn encode(&self, magic: &[u8; 8]) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        Put::new(&mut b)
            .bytes(magic)
            .u32(FORMAT_VERSION)
            .u32(self.flags)
            .u32(self.block_size)
            .u32(self.aux32)
            .u64(self.disk_size)
            .u64(self.aux64)
            .bytes(&self.generation);
        seal(&mut b);
        b
    }

    /// Read a header of the `what` kind (`magic`): the magic, the version and the check
    /// value are verified here; the fields are the caller's to check.
    pub fn decode(path: &Path, b: &[u8; HEADER_LEN], magic: &[u8; 8], what: &str) -> Result<Self> {
        let mut g = Get::new(b);
        let found: [u8; 8] = g.bytes();
        let version = g.u32();
        verify_magic(path, &found, magic, version, what)?;
        let h = FileHeader {
            flags: g.u32(),
            block_size: g.u32(),
            aux32: g.u32(),
            disk_size: g.u64(),
            aux64: g.u64(),
            generation: g.bytes(),
        };
        verify_check64(path, "header", &b[..56], g.u64())?;
        Ok(h)
    }
}

/// Reject a block size read from a file (`path`) that no vmkeep writes.
pub fn check_block_size(path: &Path, bs: u32) -> Result<()> {
    if !valid_block_size(bs as u64) {
        return Err(Error::corrupt(path, format!("invalid block size {bs}")));
    }
    Ok(())
}

/// Reject disk sizes read from a file header (`path`) that no disk can have.
pub fn check_disk_sizes(path: &Path, sizes: &[u64]) -> Result<()> {
    if !sizes.iter().all(|&s| valid_disk_size(s)) {
        return Err(Error::corrupt(path, "impossible disk size"));
    }
    Ok(())
}

/// A cursor for writing little-endian fields into a fixed buffer.
pub struct Put<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Put<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Put { buf, pos: 0 }
    }
    /// Copy `b` to the cursor and move past it. Panics if `buf` has no room for it.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
        self
    }
    /// Write `v` as 2 bytes, little-endian.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Write `v` as 4 bytes, little-endian.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Write `v` as 8 bytes, little-endian.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
}

/// A cursor for reading little-endian fields from a fixed buffer.
pub struct Get<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Get<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Get { buf, pos: 0 }
    }
    /// The next `N` bytes, moving past them. Panics if fewer than `N` are left.
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let v = self.buf[self.pos..self.pos + N]
            .try_into()
            .expect("N bytes");
        self.pos += N;
        v
    }
    /// The next 2 bytes as a little-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    /// The next 4 bytes as a little-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    /// The next 8 bytes as a little-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// Reject a file whose header check value does not match.
pub fn verify_check64(path: &Path, what: &str, covered: &[u8], stored: u64) -> Result<()> {
    if check64(covered) != stored {
        return Err(Error::corrupt(path, format!("{what} checksum mismatch")));
    }
    Ok(())
}

/// Reject a file that is not of the expected kind or version.
pub fn verify_magic(
    path: &Path,
    found: &[u8],
    expected: &[u8],
    version: u32,
    what: &str,
) -> Result<()> {
    if found != expected {
        return Err(Error::corrupt(
            path,
            format!("not a vmkeep {what} file (bad magic)"),
        ));
    }
    if version != FORMAT_VERSION {
        return Err(Error::format(
            path,
            format!("{what} format version {version} is not supported (this vmkeep reads {FORMAT_VERSION})"),
        ));
    }
    Ok(())
}
