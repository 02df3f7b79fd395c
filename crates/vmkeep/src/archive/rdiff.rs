//! Reverse-diff files (`DISK.rdiff`): the blocks of one generation that differ from the
//! next newer one, each with its digest, compressed one by one so that any block can be
//! read on its own (restore, serve).
//!
//! While a backup runs, the new reverse diff of the previous generation is also the undo
//! journal: records are appended and fsynced before the image blocks they save are
//! overwritten. Such a *partial* file has the header and records but no index or footer;
//! [`scan_partial`] reads back its valid prefix.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::archive::digest::{Digest, ZERO_DIGEST};
use crate::archive::format::*;
use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// Header flag: the next newer generation has no such disk, so the chain ends here and
/// blocks without a record are zero.
pub const FLAG_BASE: u32 = 1;

/// Record flag: the block is all zeros; there is no body.
pub const REC_ZERO: u16 = 1;
/// Record flag: the body is a zstd frame.
pub const REC_ZSTD: u16 = 2;
/// Record flag: when the record was made the block already failed its digest (the image
/// was damaged); the body holds what was read, the digest what should have been.
pub const REC_DAMAGED: u16 = 4;
const REC_KNOWN: u16 = REC_ZERO | REC_ZSTD | REC_DAMAGED;

/// Header compression code 0: no compression. The code is informational: each record's
/// [`REC_ZSTD`] flag says how its own body is stored.
pub const COMPRESSION_NONE: u32 = 0;
/// Header compression code 1: record bodies may be zstd frames (what this build writes).
pub const COMPRESSION_ZSTD: u32 = 1;

/// The 64-byte header of a reverse diff of generation g against the next newer one, g+1
/// (`docs/FORMAT.md`, "DISK.rdiff"). Decoding refuses unknown flags or compression codes
/// (a format error) and impossible block or disk sizes (corrupt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdiffHeader {
    /// Header flags (offset 12): only [`FLAG_BASE`] is defined.
    pub flags: u32,
    /// Block size B in bytes (offset 16), the VM's.
    pub block_size: u32,
    /// Compression code (offset 20): [`COMPRESSION_NONE`] or [`COMPRESSION_ZSTD`].
    pub compression: u32,
    /// Size of the disk at this generation.
    pub disk_size: u64,
    /// Size of the disk at the next newer generation (0 with [`FLAG_BASE`]).
    pub next_size: u64,
    /// The generation g the file belongs to: the 16 bytes of its UUID (offset 40). Readers
    /// require it to name the generation whose folder holds the file.
    pub generation: [u8; 16],
}

impl RdiffHeader {
    /// Whether [`FLAG_BASE`] is set: the chain ends here, and a block without a record is zero.
    pub fn is_base(&self) -> bool {
        self.flags & FLAG_BASE != 0
    }

    /// Block count N(g) = ceil(S(g) / B): every record's block number is below it.
    pub fn blocks(&self) -> u64 {
        block_count(self.disk_size, self.block_size)
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        FileHeader {
            flags: self.flags,
            block_size: self.block_size,
            aux32: self.compression,
            disk_size: self.disk_size,
            aux64: self.next_size,
            generation: self.generation,
        }
        .encode(&RDIFF_MAGIC)
    }

    fn decode(path: &Path, b: &[u8; HEADER_LEN]) -> Result<Self> {
        let f = FileHeader::decode(path, b, &RDIFF_MAGIC, "reverse diff")?;
        let h = RdiffHeader {
            flags: f.flags,
            block_size: f.block_size,
            compression: f.aux32,
            disk_size: f.disk_size,
            next_size: f.aux64,
            generation: f.generation,
        };
        if h.flags & !FLAG_BASE != 0 {
            return Err(Error::format(
                path,
                format!("unknown header flags {:#x}", h.flags),
            ));
        }
        check_block_size(path, h.block_size)?;
        check_disk_sizes(path, &[h.disk_size, h.next_size])?;
        if h.compression > COMPRESSION_ZSTD {
            return Err(Error::format(
                path,
                format!("unknown compression {}", h.compression),
            ));
        }
        Ok(h)
    }
}

/// One block of a reverse diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Block number b, below N(g).
    pub block: u64,
    /// Record flags: [`REC_ZERO`], [`REC_ZSTD`], [`REC_DAMAGED`].
    pub flags: u16,
    /// Length of the block's bytes (the last block of a disk may be short).
    pub raw_len: u32,
    /// Digest of the block at this generation (for a [`REC_DAMAGED`] record, what it should
    /// have been).
    pub digest: Digest,
    /// The stored body: empty for zero blocks, else raw or zstd-compressed bytes.
    pub body: Vec<u8>,
}

impl Record {
    /// A record of an all-zero block.
    pub fn zero(block: u64, raw_len: u32) -> Self {
        Record {
            block,
            flags: REC_ZERO,
            raw_len,
            digest: ZERO_DIGEST,
            body: Vec::new(),
        }
    }

    /// A record holding `data`, compressed at `level` when that saves space (level 0:
    /// stored raw). `digest` is the digest the block should have.
    pub fn with_data(block: u64, data: &[u8], digest: Digest, level: i32, damaged: bool) -> Self {
        let mut flags = if damaged { REC_DAMAGED } else { 0 };
        if digest == ZERO_DIGEST && !damaged {
            return Record::zero(block, data.len() as u32);
        }
        let body = if level > 0 {
            match compress(data, level) {
                Some(c) => {
                    flags |= REC_ZSTD;
                    c
                }
                None => data.to_vec(),
            }
        } else {
            data.to_vec()
        };
        Record {
            block,
            flags,
            raw_len: data.len() as u32,
            digest,
            body,
        }
    }

    /// Whether the record is [`REC_ZERO`]: the block is all zeros and has no body.
    pub fn is_zero(&self) -> bool {
        self.flags & REC_ZERO != 0
    }

    /// Whether the record is [`REC_DAMAGED`]: the block failed its digest before the record
    /// was made, so its bytes are not the generation's.
    pub fn is_damaged(&self) -> bool {
        self.flags & REC_DAMAGED != 0
    }

    fn encode_header(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        Put::new(&mut b)
            .bytes(&RECORD_MAGIC)
            .u16(self.flags)
            .u16(0)
            .u64(self.block)
            .u32(self.body.len() as u32)
            .u32(self.raw_len)
            .bytes(&self.digest);
        seal(&mut b);
        b
    }

    /// The block's bytes; `Err` when the body is not what its header says.
    pub fn data(&self, path: &Path) -> Result<Vec<u8>> {
        if self.is_zero() {
            return Ok(vec![0; self.raw_len as usize]);
        }
        let bad = |d: String| Error::corrupt(path, format!("block {}: {d}", self.block));
        if self.flags & REC_ZSTD != 0 {
            let out = decompress(&self.body, self.raw_len as usize)
                .map_err(|e| bad(format!("cannot decompress: {e}")))?;
            if out.len() != self.raw_len as usize {
                return Err(bad("decompressed length differs from the header".into()));
            }
            Ok(out)
        } else if self.body.len() != self.raw_len as usize {
            Err(bad("stored length differs from the block length".into()))
        } else {
            Ok(self.body.clone())
        }
    }
}

thread_local! {
    /// zstd contexts, one per thread and reused: a fresh context per 64 KiB block (what
    /// `zstd::bulk::compress` makes) allocates and clears its tables every time, which
    /// cost more than compressing the block.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `data` as one zstd frame at `level`, or `None` when that does not make it smaller.
fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, z) = c.as_mut().expect("set above");
        // A frame at least as long as the data is not worth storing: stop there.
        let mut out = Vec::with_capacity(data.len());
        match z.compress_to_buffer(data, &mut out) {
            Ok(n) if n < data.len() => Some(out),
            _ => None,
        }
    })
}

/// Decompress one frame that must hold exactly `len` bytes (or fewer: the caller checks).
fn decompress(body: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("set above").decompress(body, len)
    })
}

/// A parsed record header: everything but the body.
#[derive(Debug, Clone, Copy)]
struct RecordHead {
    flags: u16,
    block: u64,
    stored_len: u32,
    raw_len: u32,
    digest: Digest,
}

fn decode_record_head(
    path: &Path,
    off: u64,
    b: &[u8; HEADER_LEN],
    h: &RdiffHeader,
) -> Result<RecordHead> {
    let bad = |d: &str| Error::corrupt(path, format!("record at byte {off}: {d}"));
    let mut g = Get::new(b);
    let magic: [u8; 4] = g.bytes();
    if magic != RECORD_MAGIC {
        return Err(bad("bad record magic"));
    }
    let flags = g.u16();
    let _reserved = g.u16();
    let block = g.u64();
    let stored_len = g.u32();
    let raw_len = g.u32();
    let digest = g.bytes();
    if check64(&b[..56]) != g.u64() {
        return Err(bad("record header checksum mismatch"));
    }
    if flags & !REC_KNOWN != 0 {
        return Err(bad("unknown record flags"));
    }
    if block >= h.blocks() {
        return Err(bad(&format!("block {block} is past the end of the disk")));
    }
    if raw_len as usize != block_len(block, h.disk_size, h.block_size) {
        return Err(bad("block length does not match the disk size"));
    }
    let max_stored = zstd::zstd_safe::compress_bound(raw_len as usize);
    if flags & REC_ZERO != 0 && stored_len != 0 || stored_len as usize > max_stored {
        return Err(bad("impossible stored length"));
    }
    Ok(RecordHead {
        flags,
        block,
        stored_len,
        raw_len,
        digest,
    })
}

/// Appends records to a new reverse diff.
pub struct RdiffWriter {
    out: BufWriter<File>,
    path: PathBuf,
    header: RdiffHeader,
    hasher: blake3::Hasher,
    pos: u64,
    index: Vec<(u64, u64)>,
    data_bytes: u64,
    /// Writeback is started every few MiB, so that the undo-journal barrier (`sync`)
    /// waits for the last few MiB only, not for everything appended since the last one.
    behind: fsutil::WriteBehind,
}

/// Bytes appended between two writeback kicks of a reverse diff.
const RDIFF_WRITE_BEHIND: u64 = 4 << 20;

impl RdiffWriter {
    /// Create `path` (it must not exist) and write its header.
    pub fn create(path: &Path, header: RdiffHeader) -> Result<Self> {
        let file = fsutil::create_new(path)?;
        let mut w = RdiffWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            header,
            hasher: blake3::Hasher::new(),
            pos: 0,
            index: Vec::new(),
            data_bytes: 0,
            behind: fsutil::WriteBehind::every(RDIFF_WRITE_BEHIND),
        };
        let hb = w.header.encode();
        w.put(&hb)?;
        Ok(w)
    }

    /// The header written at the start of the file.
    pub fn header(&self) -> &RdiffHeader {
        &self.header
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        fsutil::append(&mut self.out, bytes, &self.path)?;
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
        self.behind.wrote(self.out.get_ref(), bytes.len() as u64);
        Ok(())
    }

    /// Append one record; blocks must come in increasing order.
    pub fn append(&mut self, rec: &Record) -> Result<()> {
        if let Some(&(last, _)) = self.index.last() {
            assert!(rec.block > last, "reverse-diff records out of order");
        }
        debug_assert_eq!(
            rec.raw_len as usize,
            block_len(rec.block, self.header.disk_size, self.header.block_size)
        );
        self.index.push((rec.block, self.pos));
        if !rec.is_zero() {
            self.data_bytes += rec.raw_len as u64;
        }
        self.put(&rec.encode_header())?;
        self.put(&rec.body)
    }

    /// Number of records appended so far.
    pub fn records(&self) -> usize {
        self.index.len()
    }

    /// Block number of the last record appended, if any.
    pub fn last_block(&self) -> Option<u64> {
        self.index.last().map(|&(b, _)| b)
    }

    /// Make every record appended so far durable (the undo-journal barrier).
    pub fn sync(&mut self) -> Result<()> {
        self.out.flush().at(&self.path)?;
        fsutil::sync_data(self.out.get_ref(), &self.path)
    }

    /// Write the index and footer and fsync; returns the file's size.
    pub fn finish(mut self) -> Result<u64> {
        let index_offset = self.pos;
        let mut ib = Vec::with_capacity(self.index.len() * INDEX_ENTRY_LEN);
        for &(b, off) in &self.index {
            ib.extend_from_slice(&b.to_le_bytes());
            ib.extend_from_slice(&off.to_le_bytes());
        }
        self.put(&ib)?;
        let mut footer = [0u8; HEADER_LEN];
        Put::new(&mut footer)
            .bytes(&RDIFF_END_MAGIC)
            .u64(self.index.len() as u64)
            .u64(index_offset)
            .u64(self.data_bytes);
        self.hasher.update(&footer[..32]);
        let h = self.hasher.finalize();
        footer[32..].copy_from_slice(h.as_bytes());
        fsutil::append(&mut self.out, &footer, &self.path)?;
        self.out.flush().at(&self.path)?;
        fsutil::sync_all(self.out.get_ref(), &self.path)?;
        Ok(self.pos + HEADER_LEN as u64)
    }
}

/// The file hash of a finished reverse diff (its footer's BLAKE3 of everything before
/// it), as `blake3:<hex>`; identifies the file without reading it.
pub fn file_hash(path: &Path) -> Result<String> {
    let file = fsutil::open_ro(path)?;
    let len = file.metadata().at(path)?.len();
    if len < (2 * HEADER_LEN) as u64 {
        return Err(Error::corrupt(path, "too short for a reverse diff"));
    }
    let mut h = [0u8; 32];
    fsutil::read_exact_at(&file, &mut h, len - 32, path)?;
    Ok(format!("blake3:{}", crate::archive::digest::hex(&h)))
}

/// Random access to a finished reverse diff.
pub struct RdiffReader {
    file: File,
    path: PathBuf,
    /// The file's decoded header.
    pub header: RdiffHeader,
    index: Vec<(u64, u64)>,
    index_offset: u64,
    file_hash: [u8; 32],
    footer_head: [u8; 32],
    /// Data bytes from the footer: the sum of the raw lengths of the non-zero records.
    pub data_bytes: u64,
    /// Length of the file in bytes.
    pub file_len: u64,
}

impl RdiffReader {
    /// Open the finished reverse diff at `path`, check its header, footer and index (footer
    /// consistent with the file's length, index entries strictly increasing in block and
    /// offset, the first record right after the header) and load the index: 16 bytes of
    /// memory per record. Records are checked when they are read. A missing, short or
    /// inconsistent file is corrupt; an unknown version, flag or compression a format error.
    pub fn open(path: &Path) -> Result<Self> {
        let file = fsutil::open_ro(path)?;
        let len = file.metadata().at(path)?.len();
        if len < 2 * HEADER_LEN as u64 {
            return Err(Error::corrupt(
                path,
                format!("file is truncated ({len} bytes)"),
            ));
        }
        let mut hb = [0u8; HEADER_LEN];
        fsutil::read_exact_at(&file, &mut hb, 0, path)?;
        let header = RdiffHeader::decode(path, &hb)?;
        let mut fb = [0u8; HEADER_LEN];
        fsutil::read_exact_at(&file, &mut fb, len - HEADER_LEN as u64, path)?;
        let mut g = Get::new(&fb);
        let magic: [u8; 8] = g.bytes();
        if magic != RDIFF_END_MAGIC {
            return Err(Error::corrupt(
                path,
                "footer missing (truncated or unfinished file)",
            ));
        }
        let count = g.u64();
        let index_offset = g.u64();
        let data_bytes = g.u64();
        let file_hash: [u8; 32] = g.bytes();
        let index_len = count.checked_mul(INDEX_ENTRY_LEN as u64);
        let consistent = index_len
            .and_then(|l| l.checked_add(index_offset))
            .and_then(|l| l.checked_add(HEADER_LEN as u64))
            == Some(len)
            && index_offset >= HEADER_LEN as u64
            && count <= header.blocks();
        if !consistent {
            return Err(Error::corrupt(
                path,
                "footer does not match the file's length",
            ));
        }
        let mut ib = vec![0u8; (count as usize) * INDEX_ENTRY_LEN];
        fsutil::read_exact_at(&file, &mut ib, index_offset, path)?;
        let mut index = Vec::with_capacity(count as usize);
        let mut prev: Option<(u64, u64)> = None;
        for e in ib.chunks_exact(INDEX_ENTRY_LEN) {
            let b = u64::from_le_bytes(e[..8].try_into().expect("8"));
            let off = u64::from_le_bytes(e[8..].try_into().expect("8"));
            // The records are contiguous: the first starts right after the header.
            let placed = prev.map_or(off == HEADER_LEN as u64, |(pb, po)| b > pb && off > po);
            if !placed
                || b >= header.blocks()
                || off > index_offset.saturating_sub(HEADER_LEN as u64)
            {
                return Err(Error::corrupt(path, "index is damaged"));
            }
            prev = Some((b, off));
            index.push((b, off));
        }
        if index.is_empty() && index_offset != HEADER_LEN as u64 {
            return Err(Error::corrupt(path, "index is damaged"));
        }
        Ok(RdiffReader {
            file,
            path: path.to_path_buf(),
            header,
            index,
            index_offset,
            file_hash,
            footer_head: fb[..32].try_into().expect("32"),
            data_bytes,
            file_len: len,
        })
    }

    /// The file being read, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the file has no record: every block of the generation resolves further
    /// along the chain (or is zero, past the next newer size or with [`FLAG_BASE`]).
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Block numbers with a record, in increasing order.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.iter().map(|&(b, _)| b)
    }

    /// Position in the index of the record for block `b`.
    pub fn find(&self, b: u64) -> Option<usize> {
        self.index.binary_search_by_key(&b, |&(blk, _)| blk).ok()
    }

    /// Block number of record `i` (by index position). Panics if `i` is not below
    /// [`len`](Self::len).
    pub fn block_at(&self, i: usize) -> u64 {
        self.index[i].0
    }

    /// Read record `i` (by index position), checking its header against the index.
    pub fn read(&self, i: usize) -> Result<Record> {
        let (b, off) = self.index[i];
        let end = self
            .index
            .get(i + 1)
            .map(|&(_, o)| o)
            .unwrap_or(self.index_offset);
        // Header and body in one read: the index says where the record ends. A length
        // the header cannot have is refused before anything that large is allocated.
        let max = HEADER_LEN + zstd::zstd_safe::compress_bound(self.header.block_size as usize);
        let len = end.saturating_sub(off);
        if len < HEADER_LEN as u64 || len > max as u64 {
            return Err(Error::corrupt(
                &self.path,
                format!("record for block {b} does not match the index"),
            ));
        }
        let mut body = vec![0u8; len as usize];
        fsutil::read_exact_at(&self.file, &mut body, off, &self.path)?;
        let hb: [u8; HEADER_LEN] = body[..HEADER_LEN].try_into().expect("64 bytes");
        let head = decode_record_head(&self.path, off, &hb, &self.header)?;
        if head.block != b || off + HEADER_LEN as u64 + head.stored_len as u64 != end {
            return Err(Error::corrupt(
                &self.path,
                format!("record for block {b} does not match the index"),
            ));
        }
        body.drain(..HEADER_LEN);
        Ok(Record {
            block: b,
            flags: head.flags,
            raw_len: head.raw_len,
            digest: head.digest,
            body,
        })
    }

    /// A hint: record `i` will be read soon.
    pub fn prefetch(&self, i: usize) {
        let (_, off) = self.index[i];
        let end = self
            .index
            .get(i + 1)
            .map(|&(_, o)| o)
            .unwrap_or(self.index_offset);
        fsutil::will_need(&self.file, off, end.saturating_sub(off));
    }

    /// The digest in record `i`'s header (the body is not read or checked).
    pub fn record_digest(&self, i: usize) -> Result<Digest> {
        let (b, off) = self.index[i];
        let mut hb = [0u8; HEADER_LEN];
        fsutil::read_exact_at(&self.file, &mut hb, off, &self.path)?;
        let head = decode_record_head(&self.path, off, &hb, &self.header)?;
        if head.block != b {
            return Err(Error::corrupt(
                &self.path,
                format!("record for block {b} does not match the index"),
            ));
        }
        Ok(head.digest)
    }

    /// Read the record for block `b`, if there is one.
    pub fn get(&self, b: u64) -> Result<Option<Record>> {
        self.find(b).map(|i| self.read(i)).transpose()
    }

    /// Re-hash the whole file against the checksum in its footer.
    pub fn verify_file_hash(&self) -> Result<()> {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let end = self.file_len - HEADER_LEN as u64;
        let mut pos = 0;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            fsutil::read_exact_at(&self.file, &mut buf[..n], pos, &self.path)?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
        h.update(&self.footer_head);
        if h.finalize().as_bytes() != &self.file_hash {
            return Err(Error::corrupt(&self.path, "file checksum mismatch"));
        }
        Ok(())
    }
}

/// The valid prefix of a partial reverse diff (an interrupted backup's undo journal).
pub struct PartialRdiff {
    /// The journal's header (the sizes and the generation it undoes).
    pub header: RdiffHeader,
    /// The records of the valid prefix, in increasing block order.
    pub records: Vec<Record>,
}

/// Reads the valid prefix of a partial reverse diff one record at a time, so that
/// recovery holds one block in memory however much the interrupted backup journaled.
///
/// The prefix is every complete, intact record, in increasing block order as the writer
/// appends them. A torn record at the end (the crash happened while it was written) ends
/// it: its image block was never overwritten, because image writes wait for the journal's
/// fsync.
pub struct PartialScan {
    file: File,
    path: PathBuf,
    len: u64,
    /// Where the next record starts; the file's length once the prefix has ended.
    off: u64,
    last: Option<u64>,
    /// The journal's header.
    pub header: RdiffHeader,
}

impl PartialScan {
    /// Open a journal. One whose header is incomplete or unreadable was never synced, so
    /// no image block was overwritten under it: it opens as `None` (nothing to undo).
    pub fn open(path: &Path) -> Result<Option<PartialScan>> {
        let file = fsutil::open_ro(path)?;
        let len = file.metadata().at(path)?.len();
        if len < HEADER_LEN as u64 {
            return Ok(None);
        }
        let mut hb = [0u8; HEADER_LEN];
        fsutil::read_exact_at(&file, &mut hb, 0, path)?;
        let Ok(header) = RdiffHeader::decode(path, &hb) else {
            tracing::warn!(
                "{}: journal header unreadable; nothing was overwritten under it",
                path.display()
            );
            return Ok(None);
        };
        Ok(Some(PartialScan {
            file,
            path: path.to_path_buf(),
            len,
            off: HEADER_LEN as u64,
            last: None,
            header,
        }))
    }

    /// Where the next record starts.
    pub fn offset(&self) -> u64 {
        self.off
    }

    /// Read the record at `off` again (an offset [`PartialScan::offset`] gave before it).
    pub fn record_at(&mut self, off: u64) -> Result<Option<Record>> {
        let (o, l) = (self.off, self.last);
        self.off = off;
        self.last = None;
        let rec = self.read_next();
        self.off = o;
        self.last = l;
        rec
    }

    /// The next record of the valid prefix; `None` once it has ended.
    pub fn next_record(&mut self) -> Result<Option<Record>> {
        let rec = self.read_next()?;
        match &rec {
            Some(r) => self.last = Some(r.block),
            None => self.off = self.len,
        }
        Ok(rec)
    }

    fn read_next(&mut self) -> Result<Option<Record>> {
        let (off, path) = (self.off, self.path.as_path());
        if self.len - off < HEADER_LEN as u64 {
            return Ok(None);
        }
        let mut hb = [0u8; HEADER_LEN];
        fsutil::read_exact_at(&self.file, &mut hb, off, path)?;
        let Ok(head) = decode_record_head(path, off, &hb, &self.header) else {
            return Ok(None);
        };
        let body_end = off + HEADER_LEN as u64 + head.stored_len as u64;
        if body_end > self.len || self.last.is_some_and(|l| head.block <= l) {
            return Ok(None);
        }
        let mut body = vec![0u8; head.stored_len as usize];
        fsutil::read_exact_at(&self.file, &mut body, off + HEADER_LEN as u64, path)?;
        let rec = Record {
            block: head.block,
            flags: head.flags,
            raw_len: head.raw_len,
            digest: head.digest,
            body,
        };
        let Ok(data) = rec.data(path) else {
            return Ok(None);
        };
        if !rec.is_damaged() && crate::archive::digest::block_digest(&data) != rec.digest {
            return Ok(None);
        }
        self.off = body_end;
        Ok(Some(rec))
    }
}

/// A reader's index of a journal (a `DISK.rdiff.partial` a running backup appends to):
/// block → offset of each record, built from the record headers alone and extended,
/// never rebuilt, when the file grows. A record found through it is checked when read
/// (its body against the digest the reader wants), so a torn or damaged record past the
/// valid prefix can never be returned as good bytes.
pub struct JournalIndex {
    file: File,
    path: PathBuf,
    /// The journal's header.
    pub header: RdiffHeader,
    /// (device, inode) of the file indexed.
    pub identity: (u64, u64),
    /// The file's length when last extended.
    pub len: u64,
    /// Where the next record header is expected.
    next: u64,
    entries: Vec<(u64, u64)>,
}

impl JournalIndex {
    /// Index the journal at `path`; `None` for one without a readable header.
    pub fn open(path: &Path) -> Result<Option<JournalIndex>> {
        use std::os::unix::fs::MetadataExt;
        let file = fsutil::open_ro(path)?;
        let md = file.metadata().at(path)?;
        if md.len() < HEADER_LEN as u64 {
            return Ok(None);
        }
        let mut hb = [0u8; HEADER_LEN];
        fsutil::read_exact_at(&file, &mut hb, 0, path)?;
        let Ok(header) = RdiffHeader::decode(path, &hb) else {
            return Ok(None);
        };
        let mut idx = JournalIndex {
            file,
            path: path.to_path_buf(),
            header,
            identity: (md.dev(), md.ino()),
            len: 0,
            next: HEADER_LEN as u64,
            entries: Vec::new(),
        };
        idx.extend()?;
        Ok(Some(idx))
    }

    /// Index the records appended since the last call (reads only their headers).
    pub fn extend(&mut self) -> Result<()> {
        let len = self.file.metadata().at(&self.path)?.len();
        if len == self.len {
            return Ok(());
        }
        self.len = len;
        while len - self.next.min(len) >= HEADER_LEN as u64 {
            let mut hb = [0u8; HEADER_LEN];
            fsutil::read_exact_at(&self.file, &mut hb, self.next, &self.path)?;
            let Ok(head) = decode_record_head(&self.path, self.next, &hb, &self.header) else {
                break;
            };
            let end = self.next + HEADER_LEN as u64 + head.stored_len as u64;
            if end > len || self.entries.last().is_some_and(|&(b, _)| head.block <= b) {
                break;
            }
            self.entries.push((head.block, self.next));
            self.next = end;
        }
        Ok(())
    }

    /// The record for block `b`, if the indexed part holds one (its body unchecked).
    pub fn get(&self, b: u64) -> Result<Option<Record>> {
        let Ok(i) = self.entries.binary_search_by_key(&b, |&(blk, _)| blk) else {
            return Ok(None);
        };
        let off = self.entries[i].1;
        let mut hb = [0u8; HEADER_LEN];
        fsutil::read_exact_at(&self.file, &mut hb, off, &self.path)?;
        let head = decode_record_head(&self.path, off, &hb, &self.header)?;
        let mut body = vec![0u8; head.stored_len as usize];
        fsutil::read_exact_at(&self.file, &mut body, off + HEADER_LEN as u64, &self.path)?;
        Ok(Some(Record {
            block: head.block,
            flags: head.flags,
            raw_len: head.raw_len,
            digest: head.digest,
            body,
        }))
    }

    /// Number of records indexed so far.
    pub fn records(&self) -> usize {
        self.entries.len()
    }
}

/// Read back every record of a partial reverse diff's valid prefix (see [`PartialScan`]);
/// `None` for a journal without a readable header.
pub fn scan_partial(path: &Path) -> Result<Option<PartialRdiff>> {
    let Some(mut scan) = PartialScan::open(path)? else {
        return Ok(None);
    };
    let mut records = Vec::new();
    while let Some(rec) = scan.next_record()? {
        records.push(rec);
    }
    Ok(Some(PartialRdiff {
        header: scan.header,
        records,
    }))
}
