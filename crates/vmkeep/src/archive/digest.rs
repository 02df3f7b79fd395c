//! Block digests and the `DISK.digest` file of the newest generation.
//!
//! A block's digest is BLAKE3-256 of its bytes, except that an all-zero block (of any
//! length) has the digest of 32 zero bytes. That sentinel lets the digest file of a sparse
//! disk stay sparse and lets every reader recognise a hole without hashing it.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::archive::format::*;
use crate::error::{Error, Result};
use crate::fsutil;

/// A block digest: BLAKE3-256 of the block's bytes, or [`ZERO_DIGEST`] for an all-zero block.
pub type Digest = [u8; DIGEST_LEN];

/// The digest of an all-zero block.
pub const ZERO_DIGEST: Digest = [0; DIGEST_LEN];

/// The digest of one block's bytes.
pub fn block_digest(data: &[u8]) -> Digest {
    if fsutil::is_zero(data) {
        ZERO_DIGEST
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// Hex form used in profiles and reports.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams the digests of one generation of one disk, in block order, into its root.
pub struct RootHasher {
    h: blake3::Hasher,
    count: u64,
    expected: u64,
}

impl RootHasher {
    /// Start the root of a disk of `disk_size` bytes cut into blocks of `block_size`
    /// bytes; exactly `ceil(disk_size / block_size)` digests must be pushed before
    /// [`finish`](Self::finish).
    pub fn new(block_size: u32, disk_size: u64) -> Self {
        let mut h = blake3::Hasher::new_derive_key("vmkeep digest root v1");
        h.update(&(block_size as u64).to_le_bytes());
        h.update(&disk_size.to_le_bytes());
        RootHasher {
            h,
            count: 0,
            expected: block_count(disk_size, block_size),
        }
    }
    /// Add the digest of the next block.
    pub fn push(&mut self, d: &Digest) {
        self.h.update(d);
        self.count += 1;
    }
    /// Add the digests of the next blocks: `ds` holds whole 32-byte digests, back to back
    /// (as in the entry area of a digest file).
    pub fn push_many(&mut self, ds: &[u8]) {
        debug_assert_eq!(ds.len() % DIGEST_LEN, 0);
        self.h.update(ds);
        self.count += (ds.len() / DIGEST_LEN) as u64;
    }
    /// The root as `blake3:<hex>`.
    pub fn finish(self) -> String {
        assert_eq!(
            self.count, self.expected,
            "digest root over the wrong number of blocks"
        );
        format!("blake3:{}", self.h.finalize().to_hex())
    }
}

/// The fixed header of a digest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestHeader {
    /// Block size B of the disk, in bytes (header offset 16).
    pub block_size: u32,
    /// Disk size S in bytes (header offset 24).
    pub disk_size: u64,
    /// The generation whose newest image the file describes: the 16 bytes of its UUID
    /// (header offset 40). Readers require it to name the generation they open.
    pub generation: [u8; 16],
}

impl DigestHeader {
    /// Block count N = ceil(S / B): the number of entries in the file.
    pub fn blocks(&self) -> u64 {
        block_count(self.disk_size, self.block_size)
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        FileHeader {
            flags: 0,
            block_size: self.block_size,
            aux32: 0,
            disk_size: self.disk_size,
            aux64: self.blocks(),
            generation: self.generation,
        }
        .encode(&DIGEST_MAGIC)
    }

    fn decode(path: &Path, b: &[u8; HEADER_LEN]) -> Result<Self> {
        let f = FileHeader::decode(path, b, &DIGEST_MAGIC, "digest")?;
        check_block_size(path, f.block_size)?;
        check_disk_sizes(path, &[f.disk_size])?;
        let h = DigestHeader {
            block_size: f.block_size,
            disk_size: f.disk_size,
            generation: f.generation,
        };
        if f.aux64 != h.blocks() {
            return Err(Error::corrupt(
                path,
                "block count does not match the disk size",
            ));
        }
        Ok(h)
    }

    fn file_len(&self) -> u64 {
        DIGEST_DATA_OFFSET + self.blocks() * DIGEST_LEN as u64
    }
}

/// Read access to a digest file, with a window cache for sequential lookups.
pub struct DigestReader {
    file: File,
    path: PathBuf,
    /// The decoded header of the file.
    pub header: DigestHeader,
    window_start: u64,
    window: Vec<u8>,
}

const WINDOW_BLOCKS: u64 = 4096;

impl DigestReader {
    /// Open the digest file at `path` and check its header (magic, version, check value, block
    /// size, disk size, block count) and that the file is exactly 4096 + 32·N bytes long.
    /// An unknown format version is a format error; any other mismatch, a missing file and
    /// a symbolic link are corrupt-file errors naming `path`; a read that fails is an I/O
    /// error.
    pub fn open(path: &Path) -> Result<Self> {
        let file = fsutil::open_ro(path)?;
        let mut hb = [0u8; HEADER_LEN];
        fsutil::read_exact_at(&file, &mut hb, 0, path)?;
        let header = DigestHeader::decode(path, &hb)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len != header.file_len() {
            return Err(Error::corrupt(
                path,
                format!("file is {len} bytes, its header says {}", header.file_len()),
            ));
        }
        Ok(DigestReader {
            file,
            path: path.to_path_buf(),
            header,
            window_start: 0,
            window: Vec::new(),
        })
    }

    /// The file this reader reads, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Block count N of the disk: the number of entries.
    pub fn blocks(&self) -> u64 {
        self.header.blocks()
    }

    /// The digest of block `b`; blocks past the end are zero blocks.
    pub fn get(&mut self, b: u64) -> Result<Digest> {
        if b >= self.blocks() {
            return Ok(ZERO_DIGEST);
        }
        let in_window = b >= self.window_start
            && b < self.window_start + (self.window.len() / DIGEST_LEN) as u64;
        if !in_window {
            let n = WINDOW_BLOCKS.min(self.blocks() - b);
            self.window.resize(n as usize * DIGEST_LEN, 0);
            fsutil::read_exact_at(
                &self.file,
                &mut self.window,
                DIGEST_DATA_OFFSET + b * DIGEST_LEN as u64,
                &self.path,
            )?;
            self.window_start = b;
        }
        let i = (b - self.window_start) as usize * DIGEST_LEN;
        Ok(self.window[i..i + DIGEST_LEN].try_into().expect("32 bytes"))
    }

    /// Read the digests of blocks `[start, start + out.len()/32)` into `out`.
    pub fn read_range(&self, start: u64, out: &mut [u8]) -> Result<()> {
        fsutil::read_exact_at(
            &self.file,
            out,
            DIGEST_DATA_OFFSET + start * DIGEST_LEN as u64,
            &self.path,
        )
    }

    /// Block ranges within `[start, end)` whose entries may be other than the zero
    /// digest: the data extents of the file, widened to whole entries. Entries outside
    /// them are holes, which read as the zero digest.
    pub fn data_ranges(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let end = end.min(self.blocks());
        if start >= end {
            return Ok(Vec::new());
        }
        let at = |b: u64| DIGEST_DATA_OFFSET + b * DIGEST_LEN as u64;
        let extents = fsutil::data_extents(&self.file, at(start), at(end))
            .map_err(|e| Error::io(&self.path, e))?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (off, len) in extents {
            let a = ((off - DIGEST_DATA_OFFSET) / DIGEST_LEN as u64).max(start);
            let b = (off + len - DIGEST_DATA_OFFSET)
                .div_ceil(DIGEST_LEN as u64)
                .min(end);
            match out.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ if a < b => out.push((a, b)),
                _ => {}
            }
        }
        Ok(out)
    }

    /// A hint: the digests of blocks `[start, start + count)` will be read soon.
    pub fn prefetch(&self, start: u64, count: u64) {
        fsutil::will_need(
            &self.file,
            DIGEST_DATA_OFFSET + start * DIGEST_LEN as u64,
            count * DIGEST_LEN as u64,
        );
    }

    /// The digest root over every entry.
    pub fn root(&self) -> Result<String> {
        let mut rh = RootHasher::new(self.header.block_size, self.header.disk_size);
        let mut buf = vec![0u8; (WINDOW_BLOCKS as usize) * DIGEST_LEN * 16];
        let mut b = 0;
        while b < self.blocks() {
            let n = ((buf.len() / DIGEST_LEN) as u64).min(self.blocks() - b);
            let chunk = &mut buf[..n as usize * DIGEST_LEN];
            self.read_range(b, chunk)?;
            rh.push_many(chunk);
            b += n;
        }
        Ok(rh.finish())
    }
}

/// Writes a new digest file. Entries not written read as zero blocks.
pub struct DigestWriter {
    file: File,
    path: PathBuf,
    header: DigestHeader,
    run_start: u64,
    run: Vec<u8>,
}

const RUN_MAX: usize = 64 << 10;

impl DigestWriter {
    /// Create `path` (which must not exist) with `header`, its entries all zero digests.
    pub fn create(path: &Path, header: DigestHeader) -> Result<Self> {
        let file = fsutil::create_new(path)?;
        fsutil::write_at(&file, &header.encode(), 0, path)?;
        fsutil::set_len(&file, header.file_len(), path)?;
        Ok(DigestWriter {
            file,
            path: path.to_path_buf(),
            header,
            run_start: 0,
            run: Vec::new(),
        })
    }

    /// Create `path` holding the entries of `old` for the blocks both sizes share.
    pub fn create_from(path: &Path, header: DigestHeader, old: &DigestReader) -> Result<Self> {
        if header.block_size != old.header.block_size {
            return Err(Error::corrupt(
                old.path(),
                "block size differs from the VM's",
            ));
        }
        let w = Self::create(path, header)?;
        let shared = w.header.blocks().min(old.blocks());
        let end = DIGEST_DATA_OFFSET + shared * DIGEST_LEN as u64;
        let extents = fsutil::data_extents(&old.file, DIGEST_DATA_OFFSET, end)
            .map_err(|e| Error::io(old.path(), e))?;
        let mut buf = vec![0u8; 1 << 20];
        for (off, len) in extents {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                fsutil::read_exact_at(&old.file, &mut buf[..n], off + done, old.path())?;
                if !fsutil::is_zero(&buf[..n]) {
                    fsutil::write_at(&w.file, &buf[..n], off + done, path)?;
                }
                done += n as u64;
            }
        }
        Ok(w)
    }

    /// The header written at the start of the file.
    pub fn header(&self) -> &DigestHeader {
        &self.header
    }

    /// Set the digest of block `b`.
    pub fn put(&mut self, b: u64, d: &Digest) -> Result<()> {
        debug_assert!(b < self.header.blocks());
        let next = self.run_start + (self.run.len() / DIGEST_LEN) as u64;
        if self.run.is_empty() || b != next || self.run.len() >= RUN_MAX {
            self.flush_run()?;
            self.run_start = b;
        }
        self.run.extend_from_slice(d);
        Ok(())
    }

    fn flush_run(&mut self) -> Result<()> {
        if !self.run.is_empty() {
            let off = DIGEST_DATA_OFFSET + self.run_start * DIGEST_LEN as u64;
            fsutil::write_at(&self.file, &self.run, off, &self.path)?;
            self.run.clear();
        }
        Ok(())
    }

    /// Flush and fsync; the file is complete afterwards.
    pub fn finish(mut self) -> Result<()> {
        self.flush_run()?;
        fsutil::sync_all(&self.file, &self.path)
    }
}
