//! Reading any generation of a disk: the newest image plus the chain of reverse diffs.
//!
//! Numbering generations oldest first, block `b` of generation `k` is the first record for
//! `b` in rdiff(k), rdiff(k+1), …, else the newest image. Two rules end a walk early: a
//! reverse diff marked *base* (the next generation lacked the disk) means "no record: zero",
//! and a block at or past the next generation's size with no record so far is zero.
//!
//! Before a view hands out a byte, [`DiskView::open`] proves the digests it will use: the
//! header of every file names the generation it is read for, and the digests of every
//! block (from the reverse-diff records and the newest digest file) hash to the digest
//! root the generation's profile recorded. Every block is then verified against its
//! digest before it is returned.
//!
//! Readers take no lock: if a backup updates the newest image while a reader runs, a
//! block that no longer matches the digest the reader started with is looked up in the
//! reverse diffs of every generation from the one read that exists at the time of the
//! miss, finished or partial (a running backup's undo journal holds exactly the
//! overwritten content; a prune that merged a dropped generation's reverse diff into an
//! older one moved it there). Each file is indexed once and the index reused while the
//! file is unchanged.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::digest::{block_digest, Digest, DigestReader, RootHasher, ZERO_DIGEST};
use super::format::{block_count, block_len, DIGEST_LEN};
use super::rdiff::{JournalIndex, RdiffReader, Record};
use super::{generation_bytes, names, Generation, GenerationId, VmArchive};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;

/// Where a block of the generation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// Record `rec` of reverse diff `chain` (0 = the generation's own).
    Record {
        /// Position in [`DiskView::chain`]: 0 is the generation's own reverse diff, 1 the
        /// next newer one's, and so on.
        chain: u32,
        /// Position of the record in that reverse diff's index.
        rec: u32,
    },
    /// The newest image.
    Image,
    /// All zeros.
    Zero,
}

/// A run of blocks with one location kind (records are single blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First block of the run.
    pub start: u64,
    /// Block after the last one of the run (exclusive end).
    pub end: u64,
    /// Where every block of the run comes from.
    pub loc: Loc,
}

/// One block as read: its bytes, the digest it must have, and whether it matched.
pub struct Block {
    /// The block's bytes at the generation, at its length there (the last block of a disk
    /// may be short). When `ok` is false they are what was read, or zeros when nothing could be.
    pub data: Vec<u8>,
    /// The digest the generation records for the block.
    pub digest: Digest,
    /// Whether `data` matched `digest` (and, for a record, the record was not marked damaged).
    pub ok: bool,
}

/// One generation of a VM chosen by a REV, with the listing it was resolved against
/// ([`VmArchive::select`], [`VmArchive::select_pinned`]): every disk view opened from it
/// reads that generation and is proven against that same listing, so a prune or backup in
/// between cannot make the id and the index disagree, nor the disks of one restore, verify
/// or serve come from different generations. The one place restore, merge, verify, serve
/// and `restore --as-vm` open their disk views from (REV → listing → index).
pub struct Selected<'a> {
    archive: &'a VmArchive,
    /// The chosen generation (first) and every newer one, oldest first.
    chain: Vec<Generation>,
}

impl<'a> Selected<'a> {
    /// Generation `chain[0]` of `archive` (`chain`: it and every newer generation, oldest
    /// first; never empty).
    pub(crate) fn new(archive: &'a VmArchive, chain: Vec<Generation>) -> Self {
        debug_assert!(!chain.is_empty());
        Selected { archive, chain }
    }

    /// The chosen generation.
    pub fn generation(&self) -> &Generation {
        &self.chain[0]
    }

    /// Disk `disk` of the chosen generation, its digests proven ([`DiskView::open`]).
    pub fn view(&self, disk: &str) -> Result<DiskView> {
        DiskView::open(self.archive, &self.chain, 0, disk)
    }

    /// [`Self::view`], and with `ignore_damage` (`--ignore-damage`) a failed proof comes
    /// back beside a view that trusts no zero digest instead of failing (see
    /// [`DiskView::open_ignoring_damage`]).
    pub fn view_checked(
        &self,
        disk: &str,
        ignore_damage: bool,
    ) -> Result<(DiskView, Option<Error>)> {
        if ignore_damage {
            DiskView::open_ignoring_damage(self.archive, &self.chain, 0, disk)
        } else {
            Ok((self.view(disk)?, None))
        }
    }

    /// The chosen generation's id.
    pub fn id(&self) -> &GenerationId {
        &self.generation().id
    }

    /// The names of its disks, in the profile's order.
    pub fn disk_names(&self) -> Vec<&str> {
        self.generation()
            .profile
            .disks
            .iter()
            .map(|d| d.name.as_str())
            .collect()
    }
}

/// One disk of one generation, ready to be read.
pub struct DiskView {
    /// The disk's name.
    pub disk: String,
    /// The generation the view reads.
    pub generation: GenerationId,
    /// Disk size S in bytes at that generation.
    pub size: u64,
    /// Block size B in bytes, the VM's.
    pub block_size: u32,
    chain: Vec<RdiffReader>,
    image: Option<(File, PathBuf)>,
    digest: Option<DigestReader>,
    image_size: u64,
    /// Blocks resolved to a record, sorted: (block, chain index, record index).
    map: Vec<(u64, u32, u32)>,
    /// Blocks below this with no record come from the image; the rest are zero.
    image_limit: u64,
    vm_dir: PathBuf,
    vm_name: String,
    newest: GenerationId,
    /// The digests were proven against the generation's digest root. A view opened with
    /// [`DiskView::open_ignoring_damage`] whose proof failed is not trusted: a zero
    /// digest no longer proves a hole, so image blocks are read and hashed whatever
    /// their digests say.
    trusted: bool,
    /// Reverse diffs and journals of newer generations opened by [`DiskView::moved_on`],
    /// by path, kept while the file is the same.
    lookups: Mutex<HashMap<PathBuf, Lookup>>,
}

/// An indexed reverse diff found after the view was opened.
enum Lookup {
    Finished((u64, u64), RdiffReader),
    Journal(JournalIndex),
}

/// (device, inode, length) of a file, if it exists.
fn identity(path: &Path) -> Option<(u64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).ok()?;
    Some((md.dev(), md.ino(), md.len()))
}

/// Zero digests pushed at once into a root.
static ZEROS: [u8; DIGEST_LEN * 1024] = [0; DIGEST_LEN * 1024];

fn push_zeros(rh: &mut RootHasher, mut n: u64) {
    while n > 0 {
        let k = n.min(1024);
        rh.push_many(&ZEROS[..k as usize * DIGEST_LEN]);
        n -= k;
    }
}

/// Push the digests of blocks `[start, end)` from a digest file, reading only its data
/// extents (its holes are zero digests).
fn push_digest_file(rh: &mut RootHasher, d: &DigestReader, start: u64, end: u64) -> Result<()> {
    let mut pos = start;
    let mut buf = Vec::new();
    for (a, b) in d.data_ranges(start, end)? {
        push_zeros(rh, a - pos);
        let mut s = a;
        while s < b {
            let e = (s + 65536).min(b);
            buf.resize((e - s) as usize * DIGEST_LEN, 0);
            d.read_range(s, &mut buf)?;
            rh.push_many(&buf);
            s = e;
        }
        pos = b;
    }
    push_zeros(rh, end - pos);
    Ok(())
}

fn uuid_text(b: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*b).hyphenated().to_string()
}

impl DiskView {
    /// Open disk `disk` of generation `gens[k]` (`gens` is every generation, oldest first)
    /// and prove its digests ([`DiskView::prove`]): a file that is not what the
    /// generation recorded is an [`Error::Damage`] naming it.
    pub fn open(vm: &VmArchive, gens: &[Generation], k: usize, disk: &str) -> Result<DiskView> {
        let view = Self::open_unproven(vm, gens, k, disk)?;
        view.prove(gens, k)?;
        Ok(view)
    }

    /// [`DiskView::open`] for `--ignore-damage`: a failed proof is returned beside a view
    /// that trusts no zero digest (every image block is read and checked against its own
    /// digest, so what it hands out as good is still proven block by block).
    pub fn open_ignoring_damage(
        vm: &VmArchive,
        gens: &[Generation],
        k: usize,
        disk: &str,
    ) -> Result<(DiskView, Option<Error>)> {
        let mut view = Self::open_unproven(vm, gens, k, disk)?;
        match view.prove(gens, k) {
            Ok(()) => Ok((view, None)),
            Err(e) if e.kind() == ErrorKind::Damage => {
                view.trusted = false;
                Ok((view, Some(e)))
            }
            Err(e) => Err(e),
        }
    }

    /// Open without proving the digests (for `check`, which proves them itself and
    /// reports what it finds rather than stopping at the first problem).
    pub fn open_unproven(
        vm: &VmArchive,
        gens: &[Generation],
        k: usize,
        disk: &str,
    ) -> Result<DiskView> {
        let target = &gens[k];
        let Some(rec) = target.profile.disk(disk) else {
            let have: Vec<&str> = target
                .profile
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect();
            return Err(Error::usage(format!(
                "generation {} of VM {} has no disk {disk:?} (it has: {})",
                target.id,
                vm.name,
                have.join(", ")
            )));
        };
        let bs = target.profile.block_size;
        let size = rec.size;
        let mut chain = Vec::new();
        let mut ends_at_base = false;
        for j in k..gens.len() - 1 {
            let r = open_rdiff(gens, j, disk)?;
            if r.header.block_size != bs {
                return Err(Error::corrupt(
                    r.path(),
                    "block size differs from the generation's",
                ));
            }
            let is_base = r.header.is_base();
            chain.push(r);
            if is_base {
                ends_at_base = true;
                break;
            }
        }
        let newest = &gens[gens.len() - 1];
        let (image, digest, image_size) = if ends_at_base {
            (None, None, 0)
        } else {
            let nrec = newest.profile.disk(disk).ok_or_else(|| {
                Error::corrupt(&newest.dir, format!("newest generation lacks disk {disk}"))
            })?;
            let dpath = newest.digest_path(disk);
            let d = DigestReader::open(&dpath)?;
            if d.header.disk_size != nrec.size || d.header.block_size != bs {
                return Err(Error::corrupt(
                    &dpath,
                    "header does not match the generation profile",
                ));
            }
            let ipath = newest.image_path(disk);
            let f = fsutil::open_ro(&ipath)?;
            (Some((f, ipath)), Some(d), nrec.size)
        };
        let mut view = DiskView {
            disk: disk.to_string(),
            generation: target.id.clone(),
            size,
            block_size: bs,
            chain,
            image,
            digest,
            image_size,
            map: Vec::new(),
            image_limit: 0,
            vm_dir: vm.dir.clone(),
            vm_name: vm.name.clone(),
            newest: newest.id.clone(),
            trusted: true,
            lookups: Mutex::new(HashMap::new()),
        };
        // The map keeps a record's position in 32 bits: more records in one reverse diff
        // (over 16 TiB changed at 4 KiB blocks) are refused, never read as other records.
        if let Some(r) = view.chain.iter().find(|r| r.len() > u32::MAX as usize) {
            return Err(Error::format(
                r.path(),
                format!(
                    "{} records in one reverse diff; this build reads at most 2^32",
                    r.len()
                ),
            ));
        }
        view.build_map();
        Ok(view)
    }

    /// A block of this view failed its digest: damage of the generation (exit 3), named by
    /// its VM folder since the block may have come from any file of the chain.
    pub fn block_damage(&self, detail: impl std::fmt::Display) -> Error {
        self.damage(&self.vm_dir.join(&self.generation), detail)
    }

    fn damage(&self, path: &Path, detail: impl std::fmt::Display) -> Error {
        Error::Damage {
            vm: self.vm_name.clone(),
            generation: self.generation.to_string(),
            disk: self.disk.clone(),
            path: path.to_path_buf(),
            detail: detail.to_string(),
        }
    }

    /// Prove the files the view reads: each reverse diff's header names its own
    /// generation, the digest file's names the newest generation, and the digests of
    /// every block hash to the generation's digest root. Only the data extents of the
    /// digest file are read (its holes are zero digests), so a sparse disk costs little
    /// more than hashing its block count's worth of zero digests.
    pub fn prove(&self, gens: &[Generation], k: usize) -> Result<()> {
        for (c, r) in self.chain.iter().enumerate() {
            let g = &gens[k + c];
            self.header_names(r.path(), "reverse diff", &r.header.generation, &g.id)?;
        }
        if let Some(d) = &self.digest {
            self.header_names(d.path(), "digest file", &d.header.generation, &self.newest)?;
        }
        let want = gens[k]
            .profile
            .disk(&self.disk)
            .map(|d| d.digest_root.as_str())
            .unwrap_or_default();
        if self.root()? == want {
            return Ok(());
        }
        // Name the file at fault: the digest file if it fails the newest generation's own
        // root, else the reverse diffs.
        let newest_root = gens
            .last()
            .and_then(|g| g.profile.disk(&self.disk))
            .map(|d| d.digest_root.as_str());
        let blame = match &self.digest {
            Some(d) if self.chain.is_empty() => d.path().to_path_buf(),
            Some(d) if Some(self.digest_file_root(d)?.as_str()) != newest_root => {
                d.path().to_path_buf()
            }
            _ => PathBuf::from(
                self.chain
                    .iter()
                    .map(|r| r.path().display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        };
        Err(self.damage(
            &blame,
            "the digests do not match the generation's digest root (restore --ignore-damage writes the blocks that match their own digests and lists the rest)",
        ))
    }

    /// The header of `path` (the `what`) must name generation `id`.
    fn header_names(
        &self,
        path: &Path,
        what: &str,
        found: &[u8; 16],
        id: &GenerationId,
    ) -> Result<()> {
        if *found != generation_bytes(id) {
            return Err(self.damage(
                path,
                format!(
                    "the {what}'s header names generation {}, not {id} (a file of another generation or VM)",
                    uuid_text(found)
                ),
            ));
        }
        Ok(())
    }

    fn digest_file_root(&self, d: &DigestReader) -> Result<String> {
        let mut rh = RootHasher::new(d.header.block_size, d.header.disk_size);
        push_digest_file(&mut rh, d, 0, d.blocks())?;
        Ok(rh.finish())
    }

    /// The digest root of the generation as this view reads it.
    pub fn root(&self) -> Result<String> {
        let mut rh = RootHasher::new(self.block_size, self.size);
        for seg in self.segments() {
            match seg.loc {
                Loc::Zero => push_zeros(&mut rh, seg.end - seg.start),
                Loc::Image => push_digest_file(
                    &mut rh,
                    self.digest.as_ref().expect("image implies digest"),
                    seg.start,
                    seg.end,
                )?,
                Loc::Record { chain, rec } => {
                    rh.push(&self.chain[chain as usize].record_digest(rec as usize)?)
                }
            }
        }
        Ok(rh.finish())
    }

    /// Whether the digests were proven (see [`DiskView::open_ignoring_damage`]).
    pub fn trusted(&self) -> bool {
        self.trusted
    }

    fn build_map(&mut self) {
        let mut limit = block_count(self.size, self.block_size);
        let mut map: Vec<(u64, u32, u32)> = Vec::new();
        for (ci, r) in self.chain.iter().enumerate() {
            let mut merged = Vec::with_capacity(map.len() + r.len());
            let mut old = map.into_iter().peekable();
            for (ri, b) in r.blocks().enumerate() {
                if b >= limit {
                    break;
                }
                while let Some(&e) = old.peek() {
                    if e.0 < b {
                        merged.push(e);
                        old.next();
                    } else {
                        break;
                    }
                }
                if old.peek().is_some_and(|e| e.0 == b) {
                    continue; // a record of an older generation wins
                }
                merged.push((b, ci as u32, ri as u32));
            }
            merged.extend(old);
            map = merged;
            if r.header.is_base() {
                limit = 0;
                break;
            }
            limit = limit.min(block_count(r.header.next_size, self.block_size));
        }
        self.map = map;
        self.image_limit = if self.image.is_some() { limit } else { 0 };
    }

    /// Block count N = ceil(S / B) of the disk at this generation.
    pub fn blocks(&self) -> u64 {
        block_count(self.size, self.block_size)
    }

    /// Number of blocks served by reverse-diff records.
    pub fn record_blocks(&self) -> usize {
        self.map.len()
    }

    /// Where block `b` of the generation comes from. Blocks at or past the end are
    /// [`Loc::Zero`].
    pub fn locate(&self, b: u64) -> Loc {
        match self.map.binary_search_by_key(&b, |e| e.0) {
            Ok(i) => Loc::Record {
                chain: self.map[i].1,
                rec: self.map[i].2,
            },
            Err(_) if b < self.image_limit => Loc::Image,
            Err(_) => Loc::Zero,
        }
    }

    /// The generation's blocks as runs, in order.
    pub fn segments(&self) -> Vec<Segment> {
        let n = self.blocks();
        let mut out = Vec::new();
        let mut pos = 0;
        let push_gap = |out: &mut Vec<Segment>, from: u64, to: u64| {
            let mid = self.image_limit.clamp(from, to);
            if from < mid {
                out.push(Segment {
                    start: from,
                    end: mid,
                    loc: Loc::Image,
                });
            }
            if mid < to {
                out.push(Segment {
                    start: mid,
                    end: to,
                    loc: Loc::Zero,
                });
            }
        };
        for &(b, c, r) in &self.map {
            push_gap(&mut out, pos, b);
            out.push(Segment {
                start: b,
                end: b + 1,
                loc: Loc::Record { chain: c, rec: r },
            });
            pos = b + 1;
        }
        push_gap(&mut out, pos, n);
        out
    }

    /// The digest the generation records for block `b`, without reading data.
    pub fn digest_of(&self, b: u64) -> Result<Digest> {
        match self.locate(b) {
            Loc::Record { chain, rec } => {
                let r = &self.chain[chain as usize];
                Ok(r.read(rec as usize)?.digest)
            }
            Loc::Image => self.image_digest(b),
            Loc::Zero => Ok(ZERO_DIGEST),
        }
    }

    fn image_digest(&self, b: u64) -> Result<Digest> {
        let mut d = [0u8; DIGEST_LEN];
        self.digest
            .as_ref()
            .expect("image implies digest")
            .read_range(b, &mut d)?;
        Ok(d)
    }

    /// Read the digests of image blocks `[start, start + n)` into `out`.
    pub fn image_digests(&self, start: u64, out: &mut [u8]) -> Result<()> {
        self.digest
            .as_ref()
            .expect("image implies digest")
            .read_range(start, out)
    }

    /// Read record `rec` of chain member `chain`, as the generation's block.
    pub fn read_record(&self, chain: u32, rec: u32) -> Result<Block> {
        let r = &self.chain[chain as usize];
        let record = r.read(rec as usize)?;
        Ok(self.record_block(&record, r.path()))
    }

    fn record_block(&self, record: &Record, path: &Path) -> Block {
        let len = block_len(record.block, self.size, self.block_size);
        match record.data(path) {
            Ok(mut data) => {
                let ok = !record.is_damaged() && block_digest(&data) == record.digest;
                data.resize(len, 0);
                Block {
                    data,
                    digest: record.digest,
                    ok,
                }
            }
            Err(_) => Block {
                data: vec![0; len],
                digest: record.digest,
                ok: false,
            },
        }
    }

    /// Read image blocks `[start, end)` into one buffer (sized to this generation) and
    /// verify each; returns the buffer and the blocks that failed.
    pub fn read_image_run(&self, start: u64, end: u64) -> Result<(Vec<u8>, Vec<u64>)> {
        let bs = self.block_size as u64;
        let from = start * bs;
        let to = (end * bs).min(self.size);
        let mut buf = vec![0u8; (to - from) as usize];
        let mut digests = vec![0u8; ((end - start) as usize) * DIGEST_LEN];
        self.image_digests(start, &mut digests)?;
        let bad = self.read_image_verified(start, end, &digests, &mut buf)?;
        Ok((buf, bad))
    }

    /// The caller will say what it reads ([`DiskView::prefetch_image`]): the kernel's
    /// readahead is turned off for the image (it would also read into its holes). A
    /// reader driven by someone else's requests (serve) keeps it.
    pub fn planned_reads(&self) {
        if let Some((f, _)) = &self.image {
            fsutil::no_readahead(f);
        }
    }

    /// A hint: image blocks `[start, end)` will be read soon.
    pub fn prefetch_image(&self, start: u64, end: u64) {
        if let Some((f, _)) = &self.image {
            let bs = self.block_size as u64;
            let to = (end * bs).min(self.image_size);
            fsutil::will_need(f, start * bs, to.saturating_sub(start * bs));
        }
    }

    /// A hint: record `rec` of chain member `chain` will be read soon.
    pub fn prefetch_record(&self, chain: u32, rec: u32) {
        self.chain[chain as usize].prefetch(rec as usize);
    }

    /// Image block ranges within `[start, end)` whose digests may be other than the zero
    /// digest: the data extents of the digest file (the rest is holes: zero blocks). An
    /// untrusted view adds the data extents of the image: only a block that is a hole in
    /// both files is zero without being read.
    pub fn image_digest_ranges(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>> {
        let digest = self.digest.as_ref().expect("image implies digest");
        let ranges = digest.data_ranges(start, end)?;
        if self.trusted {
            return Ok(ranges);
        }
        let (file, path) = self.image.as_ref().expect("image implies digest");
        let bs = self.block_size as u64;
        let to = (end * bs).min(self.image_size);
        let from = (start * bs).min(to);
        let extents = fsutil::data_extents(file, from, to).map_err(|e| Error::io(path, e))?;
        let mut all: Vec<(u64, u64)> = ranges;
        all.extend(
            extents
                .into_iter()
                .map(|(off, len)| ((off / bs).max(start), (off + len).div_ceil(bs).min(end))),
        );
        all.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (a, b) in all {
            match out.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ if a < b => out.push((a, b)),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Read image blocks `[start, end)` into `buf` (exactly this generation's bytes of
    /// them), given their digests, and verify each; returns the blocks that failed.
    /// Blocks whose digest is the zero digest are zeros by definition: they are not read
    /// (unless the view is untrusted), and adjacent blocks that are read come in one
    /// request.
    pub fn read_image_verified(
        &self,
        start: u64,
        end: u64,
        digests: &[u8],
        buf: &mut [u8],
    ) -> Result<Vec<u64>> {
        let bs = self.block_size as u64;
        let (file, path) = self.image.as_ref().expect("image run without image");
        let from = start * bs;
        let to = (end * bs).min(self.size);
        debug_assert_eq!(buf.len() as u64, to - from);
        debug_assert_eq!(digests.len() as u64, (end - start) * DIGEST_LEN as u64);
        let want = |b: u64| -> Digest {
            let i = (b - start) as usize;
            digests[i * DIGEST_LEN..(i + 1) * DIGEST_LEN]
                .try_into()
                .expect("32")
        };
        let total = buf.len();
        let span = |b: u64| {
            let s = ((b - start) * bs) as usize;
            (s, (s + bs as usize).min(total))
        };
        let skip = |b: u64| self.trusted && want(b) == ZERO_DIGEST;
        let mut bad = Vec::new();
        let mut b = start;
        while b < end {
            if skip(b) {
                let (s, e) = span(b);
                buf[s..e].fill(0);
                b += 1;
                continue;
            }
            let mut c = b + 1;
            while c < end && !skip(c) {
                c += 1;
            }
            let (s, _) = span(b);
            let (_, e) = span(c - 1);
            let avail = self
                .image_size
                .saturating_sub(from + s as u64)
                .min((e - s) as u64) as usize;
            read_image_at(file, &mut buf[s..s + avail], from + s as u64, path)?;
            buf[s + avail..e].fill(0);
            for blk in b..c {
                let (s, e) = span(blk);
                // The image's block may be longer than this generation's (the disk grew
                // later); its digest covers the image's own length.
                let img_len = block_len(blk, self.image_size, self.block_size);
                let got = if img_len == e - s {
                    block_digest(&buf[s..e])
                } else {
                    let mut full = vec![0u8; img_len];
                    read_image_at(file, &mut full, blk * bs, path)?;
                    block_digest(&full)
                };
                let want = want(blk);
                if got != want {
                    match self.moved_on(blk, want)? {
                        Some(data) => {
                            let n = (e - s).min(data.len());
                            buf[s..s + n].copy_from_slice(&data[..n]);
                            buf[s + n..e].fill(0);
                        }
                        None => bad.push(blk),
                    }
                }
            }
            b = c;
        }
        Ok(bad)
    }

    /// Read one block of the generation, verified.
    pub fn read_block(&self, b: u64) -> Result<Block> {
        match self.locate(b) {
            Loc::Record { chain, rec } => self.read_record(chain, rec),
            Loc::Image => {
                let digest = self.image_digest(b)?;
                let (data, bad) = self.read_image_run(b, b + 1)?;
                Ok(Block {
                    data,
                    digest,
                    ok: bad.is_empty(),
                })
            }
            Loc::Zero => Ok(Block {
                data: vec![0; block_len(b, self.size, self.block_size)],
                digest: ZERO_DIGEST,
                ok: true,
            }),
        }
    }

    /// The image no longer holds block `b` as the newest generation had it: a backup that
    /// started after this view was opened has overwritten it, and its old content (digest
    /// `want`, proven with the view) is in a reverse diff of a generation from the one
    /// read on: the running backup's journal, a finished one, or an older one a prune
    /// merged a dropped generation's records into. Every generation that exists now is
    /// searched, oldest first; only bytes that match `want` are returned.
    ///
    /// The writers rename files while we search: a journal becomes its reverse diff, a
    /// prune's merged file replaces an older reverse diff just before the dropped
    /// generation goes. The journal is looked at before the finished name (a rename
    /// between the two looks then finds the finished file), and a search that finds
    /// nothing is made again, a few times, from a fresh listing: the bytes were durable
    /// somewhere before the image changed, so a miss is a race with a rename, or damage.
    fn moved_on(&self, b: u64, want: Digest) -> Result<Option<Vec<u8>>> {
        for _ in 0..MOVED_ON_TRIES {
            let ids = match VmArchive::generation_ids_in(&self.vm_dir) {
                Ok(ids) => ids,
                Err(_) => return Ok(None),
            };
            for id in ids.iter().filter(|id| **id >= self.generation) {
                let dir = self.vm_dir.join(id);
                let gid = generation_bytes(id);
                for path in [
                    names::journal_file(&dir, &self.disk),
                    names::rdiff_file(&dir, &self.disk),
                ] {
                    let Some(record) = self.lookup(&path, gid, b) else {
                        continue;
                    };
                    let blk = self.record_block(&record, &path);
                    if blk.ok && blk.digest == want {
                        return Ok(Some(blk.data));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The record for block `b` in the reverse diff or journal at `path` (of generation
    /// `gid`), through an index built once per file and reused while the file is the same
    /// (a journal's index is extended as it grows).
    fn lookup(&self, path: &Path, gid: [u8; 16], b: u64) -> Option<Record> {
        let mut cache = self.lookups.lock().unwrap_or_else(|e| e.into_inner());
        let Some(id) = identity(path) else {
            // Gone (renamed, merged, pruned): its open file must not keep its space.
            cache.remove(path);
            return None;
        };
        let journal = path.extension().is_some_and(|e| e == "partial");
        let fresh = match cache.get_mut(path) {
            Some(Lookup::Finished(same, _)) => *same != (id.0, id.1),
            Some(Lookup::Journal(j)) => {
                if j.identity != (id.0, id.1) {
                    true
                } else {
                    j.extend().ok()?;
                    false
                }
            }
            None => true,
        };
        if fresh {
            cache.remove(path);
            let entry = if journal {
                Lookup::Journal(JournalIndex::open(path).ok()??)
            } else {
                Lookup::Finished((id.0, id.1), RdiffReader::open(path).ok()?)
            };
            cache.insert(path.to_path_buf(), entry);
        }
        let (header, record) = match cache.get(path)? {
            Lookup::Finished(_, r) => (&r.header, r.get(b).ok()?),
            Lookup::Journal(j) => (&j.header, j.get(b).ok()?),
        };
        if header.generation != gid || header.block_size != self.block_size {
            return None;
        }
        record
    }

    /// The reverse diffs the view reads, the generation's own first (the index `chain` of
    /// [`Loc::Record`] counts into it), up to the newest or the first base one.
    pub fn chain(&self) -> &[RdiffReader] {
        &self.chain
    }
}

/// How often [`DiskView::moved_on`] searches before it calls a block damaged.
const MOVED_ON_TRIES: usize = 3;

/// Open the reverse diff of `disk` in generation `gens[j]` and check that its header
/// tells what the profiles tell: its own size and block size, and the next generation's
/// size. A base reverse diff is self-contained (the disk was absent from the next
/// generation when it was made; a later generation may hold a new disk of the same name);
/// any other must continue into the next generation's disk.
pub fn open_rdiff(gens: &[Generation], j: usize, disk: &str) -> Result<RdiffReader> {
    let g = &gens[j];
    let path = g.rdiff_path(disk);
    let r = RdiffReader::open(&path)?;
    let own = g.profile.disk(disk).map(|d| d.size);
    if own != Some(r.header.disk_size) || r.header.block_size != g.profile.block_size {
        return Err(Error::corrupt(
            &path,
            "header does not match the generation profile",
        ));
    }
    let next = gens
        .get(j + 1)
        .and_then(|n| n.profile.disk(disk))
        .map(|d| d.size);
    if !r.header.is_base() && next != Some(r.header.next_size) {
        return Err(Error::corrupt(
            &path,
            "header does not match the next generation",
        ));
    }
    Ok(r)
}

/// Read image bytes at `off`; bytes past the file's end read as zeros. A backup that
/// shrinks the disk truncates the image under a running reader: the cut blocks then fail
/// their digests and [`DiskView::moved_on`] finds them in that backup's journal, instead
/// of the whole read failing on a short file.
fn read_image_at(file: &File, buf: &mut [u8], off: u64, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => {
                buf[got..].fill(0);
                break;
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(())
}
