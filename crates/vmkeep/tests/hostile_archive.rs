//! Archive files crafted to lie. Each case builds a real archive with the library, then
//! rewrites one file so that it lies — with its checksums recomputed wherever a checksum
//! would otherwise catch the lie first, so that the *structural* checks are what is under
//! test. Every reader must answer with a typed error (or `check` must report damage): never
//! a panic, an allocation far beyond the file or the block size, a loop without end, or a
//! write outside the repository and the restore target.
//!
//! The whole binary runs under an allocator that records the largest single allocation;
//! every test ends by requiring it to stay below [`LARGEST_ALLOWED`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;

use vmkeep::archive::format::{block_count, check64, HEADER_LEN};
use vmkeep::archive::lock::VmLock;
use vmkeep::archive::profile::{self, GenerationProfile, VmProfile};
use vmkeep::archive::rdiff::{self, RdiffHeader, RdiffReader, RdiffWriter, Record, REC_ZSTD};
use vmkeep::archive::txn::Txn;
use vmkeep::archive::view::DiskView;
use vmkeep::archive::Repository;
use vmkeep::engine::backup::{BackupOptions, BackupRun, DiskInput};
use vmkeep::engine::check::{check, CheckReport, GenSelect};
use vmkeep::engine::prune::{drop_generation, merge};
use vmkeep::engine::restore::restore;
use vmkeep::error::{Error, ErrorKind, Result};
use vmkeep::progress::NoProgress;
use vmkeep::source::file::FileSource;
use vmkeep::source::{BlockSource, Extent, ExtentKind};
use vmkeep::target::file::FileTarget;

// ---------------------------------------------------------------------------------------
// The allocation guard

/// No single allocation of any test may be larger than this: the biggest legitimate ones
/// are a 4 MiB restore chunk and a few MiB of zstd context.
const LARGEST_ALLOWED: usize = 64 << 20;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated and not yet freed, and the most there have been since the last reset.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// The system allocator, recording the largest request and the peak of live bytes.
struct Recording;

// SAFETY: every call is passed on unchanged to the system allocator.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Recording = Recording;

fn assert_no_huge_allocation() {
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= LARGEST_ALLOWED,
        "an allocation of {largest} bytes was made"
    );
}

// ---------------------------------------------------------------------------------------
// The archive under attack

const BS: u32 = 16 << 10;
const BLOCKS: usize = 16;
const SIZE: usize = BLOCKS * BS as usize;

use harness::noise;

fn text(seed: usize, len: usize) -> Vec<u8> {
    let s = b"the quick brown fox jumps over the lazy dog ";
    (0..len).map(|i| s[(i + seed) % s.len()]).collect()
}

fn block(img: &mut [u8], b: usize) -> &mut [u8] {
    &mut img[b * BS as usize..(b + 1) * BS as usize]
}

/// A VM `vm` with three generations of one disk `vda` (16 blocks of 16 KiB): the two older
/// generations' reverse diffs hold raw, zstd and zero records.
struct Archive {
    tmp: tempfile::TempDir,
    repo: Repository,
    ids: Vec<String>,
    snaps: Vec<Vec<u8>>,
}

impl Archive {
    /// A copy of one archive built once per run (for the many cases of a property).
    fn copied() -> Archive {
        static TEMPLATE: OnceLock<Archive> = OnceLock::new();
        let t = TEMPLATE.get_or_init(Archive::new);
        let tmp = tempfile::tempdir().unwrap();
        copy_tree(t.repo.root(), &tmp.path().join("repo"));
        std::fs::copy(t.tmp.path().join("disk.raw"), tmp.path().join("disk.raw")).unwrap();
        Archive {
            repo: Repository::open(&tmp.path().join("repo")).unwrap(),
            tmp,
            ids: t.ids.clone(),
            snaps: t.snaps.clone(),
        }
    }

    fn new() -> Archive {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repository::init(&tmp.path().join("repo")).unwrap();
        let mut a = Archive {
            tmp,
            repo,
            ids: Vec::new(),
            snaps: Vec::new(),
        };
        let mut img = vec![0u8; SIZE];
        img[..8 * BS as usize].copy_from_slice(&noise(1, 8 * BS as usize));
        img[8 * BS as usize..].copy_from_slice(&text(0, 8 * BS as usize));
        a.backup(&img);
        block(&mut img, 1).copy_from_slice(&noise(2, BS as usize));
        block(&mut img, 2).copy_from_slice(&noise(3, BS as usize));
        block(&mut img, 9).fill(0);
        block(&mut img, 10).copy_from_slice(&text(5, BS as usize));
        a.backup(&img);
        block(&mut img, 2).copy_from_slice(&noise(4, BS as usize));
        block(&mut img, 3).copy_from_slice(&noise(5, BS as usize));
        block(&mut img, 9).copy_from_slice(&noise(6, BS as usize));
        block(&mut img, 12).fill(0);
        a.backup(&img);
        let report = a.check(true).unwrap();
        assert!(report.ok(), "{:?}", report.problems);
        a
    }

    fn backup(&mut self, img: &[u8]) {
        let disk = self.tmp.path().join("disk.raw");
        std::fs::write(&disk, img).unwrap();
        let input = DiskInput::new("vda", Box::new(FileSource::open(&disk).unwrap()));
        let opts = BackupOptions {
            block_size: Some(BS),
            ..Default::default()
        };
        let report = BackupRun::begin(&self.repo, "vm")
            .unwrap()
            .execute(vec![input], &opts, &NoProgress)
            .unwrap();
        self.ids.push(report.generation.id.into());
        self.snaps.push(img.to_vec());
    }

    fn vm_dir(&self) -> PathBuf {
        self.repo.root().join("vm")
    }

    fn file(&self, k: usize, name: &str) -> PathBuf {
        self.vm_dir().join(&self.ids[k]).join(name)
    }

    fn rdiff(&self, k: usize) -> PathBuf {
        self.file(k, "vda.rdiff")
    }

    /// Generation `k` (0 = oldest) as restore opens it: by its id.
    fn view(&self, k: usize) -> Result<DiskView> {
        self.repo.vm("vm")?.select(&self.ids[k])?.view("vda")
    }

    /// Restore generation `k` to a file of the scratch folder; its bytes.
    fn restore(&self, k: usize) -> Result<Vec<u8>> {
        let view = self.view(k)?;
        let out = self.tmp.path().join(format!("restored-{k}.raw"));
        let target = FileTarget::create(&out, view.size)?;
        restore(&view, Box::new(target), false, &NoProgress)?;
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        Ok(bytes)
    }

    fn check(&self, deep: bool) -> Result<CheckReport> {
        check(&self.repo, "vm", deep, &GenSelect::All, &NoProgress)
    }

    /// Drop the middle generation: its reverse diff is merged into the oldest one's.
    fn drop_middle(&self) -> Result<()> {
        let vm = self.repo.vm("vm")?;
        let _lock = VmLock::acquire(&vm.dir, "vm", "test")?;
        let gens = vm.generations()?;
        drop_generation(&vm.dir, &gens, 1)
    }

    /// Merge the two reverse diffs into a file of the scratch folder.
    fn merge(&self) -> Result<u64> {
        let a = RdiffReader::open(&self.rdiff(0))?;
        let b = RdiffReader::open(&self.rdiff(1))?;
        let out = self.tmp.path().join("merged.rdiff");
        let r = merge(&a, &b, &out);
        let _ = std::fs::remove_file(&out);
        r
    }

    fn generation_count(&self) -> usize {
        vmkeep::archive::VmArchive::generation_ids_in(&self.vm_dir())
            .unwrap()
            .len()
    }

    /// Every reader refuses generations `lied` (whose reads pass through the lie): restore
    /// fails, a deep check reports damage, a fast check too when `fast` says it can see
    /// it, and dropping the middle generation fails without changing the archive when the
    /// lie is in a file the merge reads. The newest generation is never affected by a lie
    /// in an older generation's file.
    fn refused(&self, lied: &[usize], fast: bool, merge_reads_it: bool) {
        for &k in lied {
            expect_corrupt(self.restore(k), &format!("restore of generation {k}"));
        }
        let deep = self.check(true).expect("check runs");
        assert!(!deep.ok(), "deep check found nothing");
        if fast {
            let report = self.check(false).expect("check runs");
            assert!(!report.ok(), "fast check found nothing");
        }
        if merge_reads_it {
            expect_corrupt(self.drop_middle(), "drop of the middle generation");
            assert_eq!(
                self.generation_count(),
                3,
                "a failed drop changed the archive"
            );
        }
        assert_no_huge_allocation();
    }

    fn newest_still_restores(&self) {
        assert!(self.restore(2).unwrap() == self.snaps[2]);
    }
}

/// The error must be a typed corruption (or format) error.
#[track_caller]
fn expect_corrupt<T>(r: Result<T>, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: accepted a lying archive"),
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::Corrupt | ErrorKind::Format | ErrorKind::Damage
                ),
                "{what}: expected a corruption error, got {:?}: {e}",
                e.kind()
            );
            e
        }
    }
}

// ---------------------------------------------------------------------------------------
// Forging: change bytes, then recompute the checksums that cover them

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Recompute the check value of the 64-byte header at `at`.
fn seal_header(f: &mut [u8], at: usize) {
    let c = check64(&f[at..at + 56]);
    put64(f, at + 56, c);
}

/// Recompute a finished reverse diff's whole-file checksum (in its footer).
fn seal_file(f: &mut [u8]) {
    let n = f.len();
    let mut h = blake3::Hasher::new();
    h.update(&f[..n - HEADER_LEN]);
    h.update(&f[n - HEADER_LEN..n - 32]);
    f[n - 32..].copy_from_slice(h.finalize().as_bytes());
}

/// A finished reverse diff's bytes, with its footer and index at hand.
struct RdiffBytes(Vec<u8>);

impl RdiffBytes {
    fn footer(&self) -> usize {
        self.0.len() - HEADER_LEN
    }
    fn count(&self) -> u64 {
        le64(&self.0, self.footer() + 8)
    }
    fn index_offset(&self) -> u64 {
        le64(&self.0, self.footer() + 16)
    }
    fn set_footer(&mut self, count: u64, index_offset: u64) {
        let f = self.footer();
        put64(&mut self.0, f + 8, count);
        put64(&mut self.0, f + 16, index_offset);
    }
    fn entry(&self, i: usize) -> (u64, u64) {
        let at = self.index_offset() as usize + 16 * i;
        (le64(&self.0, at), le64(&self.0, at + 8))
    }
    fn set_entry(&mut self, i: usize, block: u64, off: u64) {
        let at = self.index_offset() as usize + 16 * i;
        put64(&mut self.0, at, block);
        put64(&mut self.0, at + 8, off);
    }
    /// Change record `i`'s header (by index position) and reseal it.
    fn record(&mut self, i: usize, f: impl FnOnce(&mut [u8])) {
        let at = self.entry(i).1 as usize;
        f(&mut self.0[at..at + HEADER_LEN]);
        seal_header(&mut self.0, at);
    }
    /// Change the file header and reseal it.
    fn header(&mut self, f: impl FnOnce(&mut [u8])) {
        f(&mut self.0[..HEADER_LEN]);
        seal_header(&mut self.0, 0);
    }
}

/// Rewrite a finished reverse diff byte by byte; the file checksum is recomputed.
fn forge_rdiff(path: &Path, f: impl FnOnce(&mut RdiffBytes)) {
    let mut r = RdiffBytes(std::fs::read(path).unwrap());
    f(&mut r);
    seal_file(&mut r.0);
    std::fs::write(path, &r.0).unwrap();
}

/// Rewrite a reverse diff through the library's writer, so that every checksum is valid.
fn rewrite_rdiff(path: &Path, f: impl FnOnce(&mut RdiffHeader, &mut Vec<Record>)) {
    let r = RdiffReader::open(path).unwrap();
    let mut header = r.header.clone();
    let mut records: Vec<Record> = (0..r.len()).map(|i| r.read(i).unwrap()).collect();
    drop(r);
    f(&mut header, &mut records);
    std::fs::remove_file(path).unwrap();
    let mut w = RdiffWriter::create(path, header).unwrap();
    for rec in &records {
        w.append(rec).unwrap();
    }
    w.finish().unwrap();
}

/// Rewrite a generation profile; its checksum is recomputed.
fn forge_generation(a: &Archive, k: usize, f: impl FnOnce(&mut GenerationProfile)) {
    let path = a.file(k, "generation.toml");
    let mut p: GenerationProfile = profile::load(&path).unwrap();
    f(&mut p);
    profile::store(&path, "vmkeep generation profile", &p).unwrap();
}

/// Rewrite a profile's text (for values TOML cannot carry); its checksum is recomputed.
fn forge_text(path: &Path, f: impl FnOnce(&str) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    let body = f(&text[..text.rfind("checksum = \"blake3:").unwrap()]);
    let sum = blake3::hash(body.as_bytes()).to_hex();
    std::fs::write(path, format!("{body}checksum = \"blake3:{sum}\"\n")).unwrap();
}

/// Copy a folder tree, symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// The names in a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// Reverse diffs: footer and index

#[test]
fn rdiff_index_offset_overflow_is_corrupt_not_panic() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        let (b, _) = r.entry(0);
        r.set_entry(0, b, u64::MAX - 8);
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(0)), "open");
    a.refused(&[0], true, true);
    a.newest_still_restores();
}

#[test]
fn rdiff_record_count_overflow_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        // 16 · count wraps around to the real index length.
        let (count, off) = (r.count(), r.index_offset());
        r.set_footer(count + (1 << 60), off);
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(0)), "open");
    a.refused(&[0], true, true);
}

#[test]
fn rdiff_index_offset_overflow_in_the_footer_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(1), |r| {
        let count = r.count();
        r.set_footer(count, u64::MAX - 100);
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(1)), "open");
    a.refused(&[0, 1], true, true);
}

#[test]
fn rdiff_index_offset_past_the_end_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(1), |r| {
        let (count, off) = (r.count(), r.index_offset());
        r.set_footer(count, off + 4096);
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(1)), "open");
    a.refused(&[0, 1], true, true);
}

#[test]
fn rdiff_record_offset_past_the_index_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        let last = r.count() as usize - 1;
        let (b, _) = r.entry(last);
        let off = r.index_offset();
        r.set_entry(last, b, off + 8);
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(0)), "open");
    a.refused(&[0], true, true);
}

#[test]
fn rdiff_duplicate_blocks_in_the_index_are_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        let (b0, _) = r.entry(0);
        let (_, o1) = r.entry(1);
        r.set_entry(1, b0, o1);
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(0)), "open");
    a.refused(&[0], true, true);
}

#[test]
fn rdiff_unsorted_index_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        let (e0, e1) = (r.entry(0), r.entry(1));
        r.set_entry(0, e1.0, e1.1);
        r.set_entry(1, e0.0, e0.1);
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(0)), "open");
    a.refused(&[0], true, true);
}

#[test]
fn rdiff_index_naming_another_block_than_its_record_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        // Still sorted and inside the disk; the record's own header says otherwise.
        let (b, o) = r.entry(0);
        assert!(b > 0);
        r.set_entry(0, 0, o);
    });
    let r = RdiffReader::open(&a.rdiff(0)).unwrap();
    expect_corrupt(r.read(0), "read");
    a.refused(&[0], false, true);
}

#[test]
fn rdiff_block_past_the_end_of_the_disk_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        let last = r.count() as usize - 1;
        let (_, o) = r.entry(last);
        let past = BLOCKS as u64 + 7;
        r.set_entry(last, past, o);
        r.record(last, |h| put64(h, 8, past));
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(0)), "open");
    a.refused(&[0], true, true);
}

#[test]
fn rdiff_record_header_naming_a_block_past_the_end_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| r.record(0, |h| put64(h, 8, u64::MAX)));
    let r = RdiffReader::open(&a.rdiff(0)).unwrap();
    expect_corrupt(r.read(0), "read");
    a.refused(&[0], false, true);
}

#[test]
fn rdiff_bytes_between_the_header_and_the_first_record_are_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        // Slip 64 bytes in after the header and move every offset along.
        let count = r.count() as usize;
        let entries: Vec<(u64, u64)> = (0..count).map(|i| r.entry(i)).collect();
        let off = r.index_offset();
        r.0.splice(HEADER_LEN..HEADER_LEN, [0xaa; HEADER_LEN]);
        r.set_footer(count as u64, off + HEADER_LEN as u64);
        for (i, (b, o)) in entries.into_iter().enumerate() {
            r.set_entry(i, b, o + HEADER_LEN as u64);
        }
    });
    expect_corrupt(RdiffReader::open(&a.rdiff(0)), "open");
}

// ---------------------------------------------------------------------------------------
// Reverse diffs: record headers and bodies

#[test]
fn rdiff_huge_stored_length_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| r.record(0, |h| put32(h, 16, u32::MAX)));
    let r = RdiffReader::open(&a.rdiff(0)).unwrap();
    expect_corrupt(r.read(0), "read");
    assert!(rdiff::scan_partial(&a.rdiff(0))
        .unwrap()
        .unwrap()
        .records
        .is_empty());
    a.refused(&[0], false, true);
    expect_corrupt(a.merge(), "merge");
}

#[test]
fn rdiff_huge_raw_length_is_corrupt() {
    let a = Archive::new();
    // Record 0 of the middle generation is block 2, which the oldest has a record of.
    forge_rdiff(&a.rdiff(1), |r| r.record(0, |h| put32(h, 20, u32::MAX)));
    let r = RdiffReader::open(&a.rdiff(1)).unwrap();
    expect_corrupt(r.read(0), "read");
    // Dropping the middle generation drops the lie with it: the oldest generation's own
    // record of block 2 wins, so the lying one is never read.
    a.refused(&[1], false, false);
    a.drop_middle().unwrap();
    assert!(a.restore(0).unwrap() == a.snaps[0]);
}

#[test]
fn rdiff_zero_record_with_a_body_is_corrupt() {
    let a = Archive::new();
    // Block 9 of the middle generation is a zero record; give it the next record's length.
    forge_rdiff(&a.rdiff(1), |r| {
        let i = (0..r.count() as usize)
            .find(|&i| r.entry(i).0 == 9)
            .unwrap();
        r.record(i, |h| put32(h, 16, 100));
    });
    let r = RdiffReader::open(&a.rdiff(1)).unwrap();
    expect_corrupt(r.get(9), "read");
}

#[test]
fn rdiff_zstd_bomb_is_bounded_by_the_block_length() {
    let a = Archive::new();
    // A frame of 256 MiB of zeros fits in a record's largest stored length. It is made
    // by streaming, so that the test itself never holds the 256 MiB.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
    }
    let bomb = enc.finish().unwrap();
    assert!(bomb.len() < BS as usize, "{} bytes", bomb.len());
    rewrite_rdiff(&a.rdiff(0), |_, recs| {
        let rec = recs.iter_mut().find(|r| !r.is_zero()).unwrap();
        rec.flags = REC_ZSTD;
        rec.body = bomb;
    });
    let r = RdiffReader::open(&a.rdiff(0)).unwrap();
    let rec = r.read(0).unwrap();
    expect_corrupt(rec.data(r.path()), "decompression");
    assert_no_huge_allocation();
    a.refused(&[0], false, false);
    // The merge copies records as they are; the bomb is still found when read.
    a.merge().unwrap();
}

#[test]
fn rdiff_zstd_body_of_garbage_or_too_short_is_corrupt() {
    let a = Archive::new();
    rewrite_rdiff(&a.rdiff(0), |_, recs| {
        let short = zstd::bulk::compress(&text(0, 100), 3).unwrap();
        let mut it = recs.iter_mut().filter(|r| !r.is_zero());
        let r0 = it.next().unwrap();
        r0.flags = REC_ZSTD;
        r0.body = short;
        let r1 = it.next().unwrap();
        r1.flags = REC_ZSTD;
        r1.body = vec![0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff, 0xff, 0xff];
    });
    let r = RdiffReader::open(&a.rdiff(0)).unwrap();
    expect_corrupt(r.read(0).unwrap().data(r.path()), "short frame");
    expect_corrupt(r.read(1).unwrap().data(r.path()), "garbage frame");
    a.refused(&[0], false, false);
}

#[test]
fn rdiff_record_digest_lie_is_found() {
    let a = Archive::new();
    rewrite_rdiff(&a.rdiff(1), |_, recs| {
        let rec = recs.iter_mut().find(|r| !r.is_zero()).unwrap();
        rec.digest = [7; 32];
    });
    a.refused(&[1], false, false);
}

// ---------------------------------------------------------------------------------------
// Reverse diffs: headers that disagree with the profiles

#[test]
fn rdiff_disk_size_other_than_its_profile_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| r.header(|h| put64(h, 24, SIZE as u64 * 2)));
    expect_corrupt(a.view(0), "open");
    a.refused(&[0], true, true);
    a.newest_still_restores();
}

#[test]
fn rdiff_block_size_other_than_its_profile_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| r.header(|h| put32(h, 16, BS / 4)));
    expect_corrupt(a.view(0), "open");
    a.refused(&[0], true, true);
}

#[test]
fn rdiff_next_size_other_than_the_next_generation_is_corrupt() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(0), |r| {
        r.header(|h| put64(h, 32, (SIZE / 2) as u64))
    });
    expect_corrupt(a.view(0), "open");
    a.refused(&[0], true, true);
}

#[test]
fn rdiff_middle_generation_block_size_lie_fails_the_merge() {
    let a = Archive::new();
    forge_rdiff(&a.rdiff(1), |r| r.header(|h| put32(h, 16, BS * 2)));
    expect_corrupt(a.merge(), "merge");
    a.refused(&[0, 1], true, true);
}

#[test]
fn rdiff_absurd_disk_size_is_corrupt() {
    let a = Archive::new();
    for size in [u64::MAX, u64::MAX - (BS as u64) + 1, i64::MAX as u64] {
        forge_rdiff(&a.rdiff(1), |r| r.header(|h| put64(h, 24, size)));
        forge_generation(&a, 1, |p| p.disks[0].size = size.min(i64::MAX as u64));
        // The older generation's reverse diff continues into the lie as well.
        forge_rdiff(&a.rdiff(0), |r| r.header(|h| put64(h, 32, size)));
        expect_corrupt(RdiffReader::open(&a.rdiff(1)), "open");
        a.refused(&[0, 1], true, true);
        expect_corrupt(a.merge(), "merge");
    }
}

#[test]
fn rdiff_partial_journal_lies_are_a_short_prefix() {
    let a = Archive::new();
    // A finished file read as a journal: every record is valid; a lying one ends the scan.
    let whole = rdiff::scan_partial(&a.rdiff(0)).unwrap().unwrap();
    assert_eq!(
        whole.records.len(),
        RdiffReader::open(&a.rdiff(0)).unwrap().len()
    );
    forge_rdiff(&a.rdiff(0), |r| r.record(1, |h| put32(h, 16, u32::MAX - 3)));
    let cut = rdiff::scan_partial(&a.rdiff(0)).unwrap().unwrap();
    assert_eq!(cut.records.len(), 1);
    forge_rdiff(&a.rdiff(0), |r| r.header(|h| put32(h, 16, 3)));
    assert!(rdiff::scan_partial(&a.rdiff(0)).unwrap().is_none());
    assert_no_huge_allocation();
}

// ---------------------------------------------------------------------------------------
// Digest files

fn forge_digest(a: &Archive, f: impl FnOnce(&mut Vec<u8>)) {
    let path = a.file(2, "vda.digest");
    let mut d = std::fs::read(&path).unwrap();
    f(&mut d);
    seal_header(&mut d, 0);
    std::fs::write(&path, &d).unwrap();
}

#[test]
fn digest_block_count_disagreeing_with_the_size_is_corrupt() {
    let a = Archive::new();
    forge_digest(&a, |d| put64(d, 32, BLOCKS as u64 + 1));
    expect_corrupt(
        vmkeep::archive::digest::DigestReader::open(&a.file(2, "vda.digest")),
        "open",
    );
    a.refused(&[0, 1, 2], true, false);
}

#[test]
fn digest_size_other_than_its_profile_is_corrupt() {
    let a = Archive::new();
    // Twice the disk, with the file grown to the length the header asks for.
    forge_digest(&a, |d| {
        put64(d, 24, SIZE as u64 * 2);
        put64(d, 32, BLOCKS as u64 * 2);
        d.resize(4096 + 32 * 2 * BLOCKS, 0);
    });
    a.refused(&[0, 1, 2], true, false);
}

#[test]
fn digest_absurd_disk_size_is_corrupt() {
    let a = Archive::new();
    forge_digest(&a, |d| {
        put64(d, 24, u64::MAX);
        put64(d, 32, block_count(u64::MAX, BS));
    });
    expect_corrupt(
        vmkeep::archive::digest::DigestReader::open(&a.file(2, "vda.digest")),
        "open",
    );
    a.refused(&[0, 1, 2], true, false);
}

// ---------------------------------------------------------------------------------------
// Profiles

#[test]
fn generation_profile_with_absurd_sizes_is_corrupt() {
    for k in [0, 2] {
        let a = Archive::new();
        forge_generation(&a, k, |p| {
            p.block_size = 3;
            p.disks[0].size = i64::MAX as u64;
        });
        a.refused(&[k], true, false);
        if k == 2 {
            // A backup starts from the newest generation.
            expect_corrupt(BackupRun::begin(&a.repo, "vm").map(|_| ()), "backup");
        }
        assert_eq!(a.generation_count(), 3);
    }
}

#[test]
fn generation_profile_size_beyond_u64_is_corrupt() {
    let a = Archive::new();
    forge_text(&a.file(1, "generation.toml"), |t| {
        let at = t.find("size = ").unwrap();
        let end = at + t[at..].find('\n').unwrap();
        format!("{}size = 18446744073709551615{}", &t[..at], &t[end..])
    });
    expect_corrupt(a.repo.vm("vm").unwrap().generations(), "load");
    a.refused(&[0, 1], true, false);
}

#[test]
fn generation_profile_disk_name_escaping_its_folder_is_corrupt() {
    let a = Archive::new();
    let outside = a.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // Valid reverse diffs wait where the escaping name points, so that only the name
    // check stands between a prune and a write outside the repository.
    let escape = "../../../outside/vda";
    for k in [0, 1] {
        std::fs::copy(a.rdiff(k), outside.join(format!("g{k}.rdiff"))).unwrap();
        forge_generation(&a, k, |p| p.disks[0].name = escape.into());
    }
    forge_generation(&a, 2, |p| p.disks[0].name = escape.into());
    let before = listing(a.tmp.path());
    let outside_before = listing(&outside);
    expect_corrupt(a.repo.vm("vm").unwrap().generations(), "load");
    let report = a.check(true).unwrap();
    assert!(!report.ok());
    expect_corrupt(a.drop_middle(), "drop");
    let run = BackupRun::begin(&a.repo, "vm").map(|_| ());
    expect_corrupt(run, "backup");
    assert_eq!(listing(a.tmp.path()), before);
    assert_eq!(listing(&outside), outside_before);
    assert_no_huge_allocation();
}

#[test]
fn generation_profile_naming_a_disk_twice_is_corrupt() {
    let a = Archive::new();
    forge_generation(&a, 1, |p| {
        let d = p.disks[0].clone();
        p.disks.push(d);
    });
    expect_corrupt(a.repo.vm("vm").unwrap().generations(), "load");
    assert!(!a.check(false).unwrap().ok());
}

#[test]
fn vm_profile_block_size_zero_is_corrupt_not_panic() {
    let a = Archive::new();
    let path = a.vm_dir().join("vm.toml");
    let mut p: VmProfile = profile::load(&path).unwrap();
    p.block_size = 0;
    profile::store(&path, "vmkeep VM profile", &p).unwrap();
    // A new disk would be cut into blocks of the VM's block size.
    let disk = a.tmp.path().join("disk.raw");
    let result = BackupRun::begin(&a.repo, "vm").and_then(|run| {
        let input = DiskInput::new("vdb", Box::new(FileSource::open(&disk).unwrap()));
        run.execute(vec![input], &BackupOptions::default(), &NoProgress)
    });
    expect_corrupt(result, "backup");
    let report = a.check(false).unwrap();
    assert!(!report.ok());
    assert_eq!(a.generation_count(), 3);
}

#[test]
fn oversized_profile_is_refused_without_reading_it() {
    let a = Archive::new();
    let path = a.file(1, "generation.toml");
    // A sparse 1 TiB profile: refused by its size, not read into memory.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(1 << 40).unwrap();
    drop(f);
    expect_corrupt(a.repo.vm("vm").unwrap().generations(), "load");
    assert!(!a.check(false).unwrap().ok());
    assert_no_huge_allocation();
}

#[test]
fn print_of_a_huge_profile_is_refused_without_reading_it() {
    let a = Archive::new();
    let path = a.file(1, "generation.toml");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let e = vmkeep::engine::print::print_file(&path, &mut std::io::sink()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_no_huge_allocation();
}

// ---------------------------------------------------------------------------------------
// Transaction records

fn write_txn(a: &Archive, t: &Txn) {
    // Txn::store renders and checksums; the content is what lies.
    t.store(&a.vm_dir()).unwrap();
}

/// Every command that recovers refuses the record, and the archive is as it was.
fn txn_refused(a: &Archive) {
    let latest = std::fs::read_link(a.vm_dir().join("latest")).unwrap();
    expect_corrupt(BackupRun::begin(&a.repo, "vm").map(|_| ()), "backup");
    let schedule = vmkeep::archive::retention::Schedule {
        keep_last: Some(1),
        ..Default::default()
    };
    expect_corrupt(
        vmkeep::engine::prune::prune(&a.repo, "vm", &schedule, false).map(|_| ()),
        "prune",
    );
    let report = a.check(false).expect("check reports a damaged transaction");
    assert!(!report.ok());
    assert_eq!(
        std::fs::read_link(a.vm_dir().join("latest")).unwrap(),
        latest
    );
    assert_eq!(a.generation_count(), 3);
    for k in 0..3 {
        assert!(
            a.restore(k).unwrap() == a.snaps[k],
            "generation {k} changed"
        );
    }
}

#[test]
fn txn_naming_missing_generations_is_corrupt() {
    let a = Archive::new();
    let missing = "01900000-0000-7000-8000-000000000000".to_string();
    let ghost = "ffffffff-ffff-7fff-bfff-ffffffffffff".to_string();
    for t in [
        Txn::backup(Some(a.ids[2].clone()), ghost.clone(), vec!["vda".into()]),
        Txn::backup(Some(missing.clone()), ghost.clone(), vec!["vda".into()]),
        Txn::prune(missing.clone(), a.ids[1].clone(), vec!["vda".into()]),
    ] {
        let mut t = t;
        t.state = "commit".into();
        write_txn(&a, &t);
        txn_refused(&a);
    }
}

#[test]
fn txn_with_parent_paths_touches_nothing_outside() {
    let a = Archive::new();
    // A victim folder beside the repository, shaped like what recovery works on.
    let victim = a.tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("vda.raw"), b"precious").unwrap();
    std::fs::create_dir(a.tmp.path().join("victim.partial")).unwrap();
    std::fs::create_dir(a.tmp.path().join("victim.deleting")).unwrap();
    std::fs::copy(a.rdiff(0), victim.join("vda.rdiff.partial")).unwrap();
    std::fs::copy(a.rdiff(0), victim.join("vda.rdiff.merge")).unwrap();
    let up = "../../victim".to_string();
    let before = listing(a.tmp.path());
    let victim_before = listing(&victim);
    let backup_running = Txn::backup(Some(up.clone()), up.clone(), vec!["vda".into()]);
    let mut backup_commit = Txn::backup(Some(a.ids[2].clone()), up.clone(), vec![]);
    backup_commit.state = "commit".into();
    let mut disks_up = Txn::backup(Some(a.ids[2].clone()), a.ids[2].clone(), vec![]);
    disks_up.state = "commit".into();
    disks_up.disks = vec!["../../../victim/vda".into()];
    for t in [
        backup_running,
        backup_commit,
        disks_up,
        Txn::prune(a.ids[0].clone(), up.clone(), vec![]),
        Txn::prune(up.clone(), a.ids[1].clone(), vec![]),
    ] {
        write_txn(&a, &t);
        txn_refused(&a);
        assert_eq!(listing(a.tmp.path()), before, "{t:?}");
        assert_eq!(listing(&victim), victim_before, "{t:?}");
        assert_eq!(std::fs::read(victim.join("vda.raw")).unwrap(), b"precious");
    }
}

#[test]
fn txn_of_an_unknown_kind_is_corrupt() {
    let a = Archive::new();
    let mut t = Txn::backup(Some(a.ids[2].clone()), a.ids[2].clone(), vec![]);
    t.op = "rm -rf".into();
    write_txn(&a, &t);
    txn_refused(&a);
}

// ---------------------------------------------------------------------------------------
// Any file, any lie

#[path = "support/fuzz.rs"]
#[allow(unused)]
mod harness;

/// The archive's files that a lie can be put in (every file but the lock), sorted.
fn archive_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let kind = e.file_type().unwrap();
        if kind.is_dir() {
            out.extend(archive_files(&e.path()));
        } else if kind.is_file() && e.file_name() != "lock" {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

#[derive(Debug, Clone)]
enum Lie {
    Flip(Index, u8),
    Set64(Index, u64),
    Set32(Index, u32),
    Truncate(Index),
    /// Profiles: the value of the n-th `key = value` line.
    Value(Index, &'static str),
}

fn lie() -> impl Strategy<Value = Lie> {
    let edge = prop_oneof![
        prop::sample::select(vec![0u64, 1, 64, 4096, 1 << 60, u64::MAX, i64::MAX as u64]),
        any::<u64>(),
    ];
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Lie::Flip(i, b)),
        3 => (any::<Index>(), edge.clone()).prop_map(|(i, v)| Lie::Set64(i, v)),
        2 => (any::<Index>(), edge).prop_map(|(i, v)| Lie::Set32(i, v as u32)),
        1 => any::<Index>().prop_map(Lie::Truncate),
        3 => (any::<Index>(), prop::sample::select(vec![
            "0", "3", "1152921504606846977", "9223372036854775807", "-1", "\"../../escape\"",
            "\"vda\"", "\"vdb\"", "\"\"", "[]", "true", "\"01900000-0000-7000-8000-000000000001\"",
        ])).prop_map(|(i, v)| Lie::Value(i, v)),
    ]
}

/// Tell `lie` in `path`, then recompute every checksum the file has.
fn tell(path: &Path, lie: &Lie) {
    let mut b = std::fs::read(path).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    if name.ends_with(".toml") {
        let at = b
            .windows(19)
            .rposition(|w| w == b"checksum = \"blake3:")
            .unwrap();
        b.truncate(at);
    }
    let n = b.len().max(1);
    match lie {
        Lie::Flip(i, bit) if !b.is_empty() => b[i.index(n)] ^= 1 << bit,
        Lie::Set64(i, v) => {
            let at = i.index(n) & !7;
            let end = (at + 8).min(b.len());
            b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
        }
        Lie::Set32(i, v) => {
            let at = i.index(n) & !3;
            let end = (at + 4).min(b.len());
            b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
        }
        Lie::Truncate(i) => b.truncate(i.index(n)),
        Lie::Value(i, v) => {
            let lines: Vec<usize> = (0..b.len().saturating_sub(2))
                .filter(|&p| &b[p..p + 3] == b" = ")
                .map(|p| p + 3)
                .collect();
            if !lines.is_empty() {
                let at = lines[i.index(lines.len())];
                let end = b[at..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |e| at + e);
                b.splice(at..end, v.bytes());
            }
        }
        _ => {}
    }
    if name.ends_with(".toml") {
        b = harness::seal_profile(&b);
    } else if name.ends_with(".rdiff") {
        harness::seal_rdiff(&mut b, true);
    } else if name.ends_with(".digest") && b.len() >= HEADER_LEN {
        seal_header(&mut b, 0);
    }
    std::fs::write(path, &b).unwrap();
}

/// A typed error that says the archive is damaged (or in a format this build refuses).
fn damage_or_ok<T>(r: &Result<T>, what: &str) -> std::result::Result<(), TestCaseError> {
    if let Err(e) = r {
        prop_assert!(
            matches!(
                e.kind(),
                ErrorKind::Corrupt | ErrorKind::Format | ErrorKind::Damage
            ),
            "{}: {:?}: {}",
            what,
            e.kind(),
            e
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// One lie, with its checksums forged, in any file of the archive: every reader either
    /// gives the right bytes or a typed corruption error, a deep check that passes means
    /// every generation restores as it was backed up, nothing outside the repository
    /// changes, and no allocation is huge.
    #[test]
    fn any_lie_in_any_file_is_found_or_harmless(file in any::<Index>(), lies in prop::collection::vec(lie(), 1..3)) {
        let a = Archive::copied();
        let files = archive_files(&a.vm_dir());
        let target = &files[file.index(files.len())];
        for l in &lies {
            tell(target, l);
        }
        let outside = listing(a.tmp.path());
        let mut restored = Vec::new();
        for k in 0..3 {
            let r = a.restore(k);
            // A lie can rename the disk: then the generation has no disk vda to restore.
            if !r.as_ref().is_err_and(|e| e.kind() == ErrorKind::Usage) {
                damage_or_ok(&r, &format!("restore {k}"))?;
            }
            restored.push(r.ok());
        }
        let deep = a.check(true);
        damage_or_ok(&deep, "deep check")?;
        damage_or_ok(&a.check(false), "check")?;
        if deep.as_ref().is_ok_and(|r| r.ok()) {
            for (k, r) in restored.iter().enumerate() {
                prop_assert!(r.as_ref() == Some(&a.snaps[k]), "generation {} restored wrong after a passing deep check", k);
            }
        }
        for (k, r) in restored.iter().enumerate() {
            if let Some(bytes) = r {
                prop_assert!(*bytes == a.snaps[k] || !deep.as_ref().is_ok_and(|r| r.ok()));
            }
        }
        damage_or_ok(&a.merge(), "merge")?;
        damage_or_ok(&a.drop_middle(), "drop")?;
        let disk = a.tmp.path().join("disk.raw");
        let backup = BackupRun::begin(&a.repo, "vm").and_then(|run| {
            let input = DiskInput::new("vda", Box::new(FileSource::open(&disk)?));
            run.execute(vec![input], &BackupOptions::default(), &NoProgress)
        });
        damage_or_ok(&backup, "backup")?;
        prop_assert_eq!(listing(a.tmp.path()), outside);
        assert_no_huge_allocation();
    }
}

/// Found by the property above: generation 0's profile cut short and resealed so that it
/// lists no disk. Deep check passed (it had nothing to prove) while the generation could no
/// longer be restored. Every cut of every generation's profile is tried.
#[test]
fn a_profile_cut_anywhere_and_resealed_is_found_or_harmless() {
    let template = Archive::copied();
    for k in 0..3 {
        let rel = template
            .file(k, "generation.toml")
            .strip_prefix(template.tmp.path())
            .unwrap()
            .to_path_buf();
        let len = std::fs::metadata(template.tmp.path().join(&rel))
            .unwrap()
            .len();
        for cut in 0..len {
            let a = Archive::copied();
            let path = a.tmp.path().join(&rel);
            let mut b = std::fs::read(&path).unwrap();
            b.truncate(cut as usize);
            if let Some(at) = b.windows(19).rposition(|w| w == b"checksum = \"blake3:") {
                b.truncate(at);
            }
            std::fs::write(&path, harness::seal_profile(&b)).unwrap();
            let restored: Vec<_> = (0..3).map(|g| a.restore(g)).collect();
            let deep = a.check(true).unwrap();
            if deep.ok() {
                for (g, r) in restored.iter().enumerate() {
                    assert!(
                        r.as_ref().ok() == Some(&a.snaps[g]),
                        "generation {k}'s profile cut at {cut}: deep check passed, generation {g} restores {:?}",
                        r.as_ref().map(|b| b.len()).map_err(|e| e.to_string())
                    );
                }
            }
        }
    }
}

/// A profile that lists no disk is damage (vmkeep never writes one): restore says so.
#[test]
fn a_profile_without_disks_is_corrupt() {
    let a = Archive::copied();
    let path = a.file(0, "generation.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let body = &text[..text.find("[[disk]]").unwrap()];
    std::fs::write(&path, harness::seal_profile(body.as_bytes())).unwrap();
    let e = a.restore(0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("lists no disks"), "{e}");
    let report = a.check(true).unwrap();
    assert!(!report.ok());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.to_string().contains("lists no disks")),
        "{:?}",
        report.problems
    );
    a.newest_still_restores();
}

/// A disk file in a generation's folder that the profile does not list (a profile that
/// lost a disk, or a file put there from elsewhere) is reported by check.
#[test]
fn a_disk_file_the_profile_does_not_list_is_reported() {
    for (k, from, to) in [
        (0, "vda.rdiff", "vdb.rdiff"),
        (2, "vda.raw", "vdb.raw"),
        (2, "vda.digest", "vdb.digest"),
    ] {
        let a = Archive::copied();
        std::fs::copy(a.file(k, from), a.file(k, to)).unwrap();
        let report = a.check(false).unwrap();
        assert!(!report.ok(), "{to} in generation {k} not reported");
        let p = report.problems.iter().find(|p| p.to_string().contains(to));
        assert!(
            p.is_some_and(|p| p.to_string().contains("does not list")),
            "{:?}",
            report.problems
        );
        std::fs::remove_file(a.file(k, to)).unwrap();
        assert!(a.check(true).unwrap().ok());
    }
}

// ---------------------------------------------------------------------------------------
// Undo journals left by an interrupted backup

/// Leave generation `k`'s journal with `records` under `header` and a running backup's
/// transaction, as a backup killed after journaling them would.
fn leave_journal(a: &Archive, k: usize, header: RdiffHeader, records: &[Record]) -> PathBuf {
    let path = a.file(k, "vda.rdiff.partial");
    let mut w = RdiffWriter::create(&path, header).unwrap();
    for r in records {
        w.append(r).unwrap();
    }
    w.sync().unwrap();
    drop(w);
    let new = vmkeep::archive::new_generation_id(Some(&a.ids[2].parse().unwrap()));
    write_txn(
        a,
        &Txn::backup(Some(a.ids[k].clone()), new.into(), vec!["vda".into()]),
    );
    path
}

fn journal_header(a: &Archive) -> RdiffHeader {
    let h = RdiffReader::open(&a.rdiff(1)).unwrap().header;
    RdiffHeader {
        generation: vmkeep::archive::generation_bytes(&a.ids[2].parse().unwrap()),
        ..h
    }
}

#[test]
fn journal_claiming_another_size_or_block_size_is_not_applied() {
    let image = |a: &Archive| std::fs::read(a.file(2, "vda.raw")).unwrap();
    for lie in 0..2 {
        let a = Archive::new();
        let mut h = journal_header(&a);
        let rec = if lie == 0 {
            // Recovery would make the image this big.
            h.disk_size = 1 << 40;
            Record::with_data(1, &noise(9, BS as usize), [1; 32], 0, true)
        } else {
            // Recovery would write blocks of this size, at the wrong places.
            h.block_size = BS * 2;
            h.disk_size = SIZE as u64;
            Record::with_data(1, &noise(9, 2 * BS as usize), [1; 32], 0, true)
        };
        let before = image(&a);
        leave_journal(&a, 2, h, &[rec]);
        expect_corrupt(BackupRun::begin(&a.repo, "vm").map(|_| ()), "backup");
        assert!(!a.check(false).unwrap().ok());
        assert!(image(&a) == before, "the lying journal was applied");
        assert!(a.file(2, "vda.rdiff.partial").exists());
    }
}

#[test]
fn journal_records_out_of_order_end_its_valid_prefix() {
    let a = Archive::new();
    let h = journal_header(&a);
    let img = std::fs::read(a.file(2, "vda.raw")).unwrap();
    let bs = BS as usize;
    let rec = |b: usize| {
        let data = &img[b * bs..(b + 1) * bs];
        Record::with_data(
            b as u64,
            data,
            vmkeep::archive::digest::block_digest(data),
            3,
            false,
        )
    };
    // Two journals of one record each, the second's record appended to the first.
    let first = leave_journal(&a, 2, h.clone(), &[rec(5)]);
    let other = a.tmp.path().join("other.partial");
    let mut w = RdiffWriter::create(&other, h).unwrap();
    w.append(&rec(3)).unwrap();
    w.sync().unwrap();
    drop(w);
    let mut bytes = std::fs::read(&first).unwrap();
    bytes.extend_from_slice(&std::fs::read(&other).unwrap()[HEADER_LEN..]);
    std::fs::write(&first, &bytes).unwrap();
    let scan = rdiff::scan_partial(&first).unwrap().unwrap();
    assert_eq!(
        scan.records.len(),
        1,
        "a record for an earlier block was accepted"
    );
    // The journal holds the image's own content: recovery changes nothing.
    drop(BackupRun::begin(&a.repo, "vm").unwrap());
    assert!(!first.exists());
    let report = a.check(true).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

#[test]
fn recovery_reads_a_large_journal_one_record_at_a_time() {
    // A 256 MiB disk, all zeros, and a journal of 256 MiB: one record of zeros (marked
    // damaged, so that it carries a body) for every block. Applying it changes nothing.
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(&tmp.path().join("repo")).unwrap();
    let size = 256u64 << 20;
    let bs = 64u32 << 10;
    let disk = tmp.path().join("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(size).unwrap();
    let input = DiskInput::new("vda", Box::new(FileSource::open(&disk).unwrap()));
    let report = BackupRun::begin(&repo, "vm")
        .unwrap()
        .execute(vec![input], &BackupOptions::default(), &NoProgress)
        .unwrap();
    let id = report.generation.id;
    let dir = repo.root().join("vm");
    let header = RdiffHeader {
        flags: 0,
        block_size: bs,
        compression: 0,
        disk_size: size,
        next_size: size,
        generation: vmkeep::archive::generation_bytes(&id),
    };
    let mut w = RdiffWriter::create(&dir.join(&id).join("vda.rdiff.partial"), header).unwrap();
    let zeros = vec![0u8; bs as usize];
    for b in 0..block_count(size, bs) {
        w.append(&Record::with_data(b, &zeros, [0; 32], 0, true))
            .unwrap();
    }
    w.sync().unwrap();
    drop(w);
    let new = vmkeep::archive::new_generation_id(Some(&id));
    Txn::backup(Some(id.to_string()), new.into(), vec!["vda".into()])
        .store(&dir)
        .unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let run = BackupRun::begin(&repo, "vm").unwrap();
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    assert_eq!(run.recovered().len(), 1, "{:?}", run.recovered());
    drop(run);
    // Other tests allocate meanwhile; a quarter of the journal leaves room for them.
    assert!(grown < 64 << 20, "recovery held {grown} bytes at once");
}

#[test]
fn lock_file_of_a_gigabyte_is_not_read_whole() {
    let a = Archive::new();
    let held = VmLock::acquire(&a.vm_dir(), "vm", "test").unwrap();
    // The holder line is read when the lock is busy; this one is 1 GiB of (sparse) zeros.
    std::fs::OpenOptions::new()
        .write(true)
        .open(held.path())
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let e = BackupRun::begin(&a.repo, "vm").map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(
        e.to_string().len() < 1024,
        "{} bytes of message",
        e.to_string().len()
    );
    assert_no_huge_allocation();
}

// ---------------------------------------------------------------------------------------
// Sources that lie about their size

/// A source of `size` zero bytes that has no data anywhere.
struct Vast(u64);

impl BlockSource for Vast {
    fn describe(&self) -> String {
        "vast".into()
    }
    fn size(&self) -> u64 {
        self.0
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            offset,
            length,
            kind: ExtentKind::Zero,
        }])
    }
}

#[test]
fn source_of_absurd_size_is_refused_not_panic() {
    let a = Archive::new();
    for size in [u64::MAX, u64::MAX - 4095, 1 << 62] {
        for disk in ["vda", "vdb"] {
            let run = BackupRun::begin(&a.repo, "vm").unwrap();
            let input = DiskInput::new(disk, Box::new(Vast(size)));
            let err = run
                .execute(vec![input], &BackupOptions::default(), &NoProgress)
                .map(|_| ())
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Source, "{err}");
        }
    }
    assert_eq!(a.generation_count(), 3);
    let report = a.check(true).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_no_huge_allocation();
}

// ---------------------------------------------------------------------------------------
// Names that try to leave the repository

const BAD_NAMES: &[&str] = &[
    "",
    ".",
    "..",
    "../escape",
    "../../escape",
    "a/../../escape",
    "/etc",
    "/tmp/escape",
    "a/b",
    "nul\0byte",
    "new\nline",
    ".hidden",
    "x.tmp",
    "x.partial",
    "repo.toml",
    "lock",
];

fn bad_names() -> Vec<String> {
    let mut v: Vec<String> = BAD_NAMES.iter().map(|s| s.to_string()).collect();
    v.push("v".repeat(201));
    v.push("é".repeat(101)); // 202 bytes
    v.push("\u{7f}delete".into());
    v
}

#[test]
fn vm_names_that_escape_the_repository_are_refused() {
    let a = Archive::new();
    let parent = a.tmp.path();
    let before = listing(parent);
    let repo_before = listing(a.repo.root());
    for name in bad_names() {
        let e = a.repo.vm_dir(&name).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{name:?}");
        let e = BackupRun::begin(&a.repo, &name).map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{name:?}");
        let e = a.repo.vm(&name).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{name:?}");
        let e = check(&a.repo, &name, false, &GenSelect::All, &NoProgress).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{name:?}");
    }
    assert_eq!(listing(parent), before);
    assert_eq!(listing(a.repo.root()), repo_before);
    assert!(!Path::new("/tmp/escape").exists());
}

#[test]
fn disk_names_that_escape_the_generation_are_refused() {
    let a = Archive::new();
    let disk = a.tmp.path().join("disk.raw");
    let parent = a.tmp.path();
    let before = listing(parent);
    let vm_before = listing(&a.vm_dir());
    for name in bad_names() {
        let run = BackupRun::begin(&a.repo, "vm").unwrap();
        let good = DiskInput::new("vda", Box::new(FileSource::open(&disk).unwrap()));
        let bad = DiskInput::new(&name, Box::new(FileSource::open(&disk).unwrap()));
        let e = run
            .execute(vec![good, bad], &BackupOptions::default(), &NoProgress)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{name:?}");
    }
    assert_eq!(listing(parent), before);
    // The lock file is the only thing a refused run may leave (it was there already).
    assert_eq!(listing(&a.vm_dir()), vm_before);
    assert_eq!(a.generation_count(), 3);
}

#[cfg(feature = "libvirt")]
#[test]
fn names_from_domain_xml_that_escape_are_refused() {
    use vmkeep::libvirt::xml::parse_domain;
    let a = Archive::new();
    let before = listing(a.tmp.path());
    let disk = a.tmp.path().join("disk.raw");
    for name in ["../escape", "a/b", ".hidden", "x\u{1}y"] {
        let esc = vmkeep::libvirt::xml::escape(name);
        let xml = format!(
            "<domain type='kvm'><name>{esc}</name><devices>\
             <disk type='file' device='disk'><source file='/a.img'/><target dev='{esc}'/></disk>\
             </devices></domain>"
        );
        let Ok(dom) = parse_domain(&xml) else {
            continue; // refused by the XML parser already (a control character)
        };
        let e = BackupRun::begin(&a.repo, &dom.name)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{name:?}");
        let run = BackupRun::begin(&a.repo, "vm").unwrap();
        let input = DiskInput::new(
            &dom.disks[0].target,
            Box::new(FileSource::open(&disk).unwrap()),
        );
        let e = run
            .execute(vec![input], &BackupOptions::default(), &NoProgress)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{name:?}");
    }
    assert_eq!(listing(a.tmp.path()), before);
}

// ---------------------------------------------------------------------------------------
// Symbolic and hard links planted in the archive
//
// Each planted link names a file or folder outside the VM's own folder that holds the very
// bytes the archive should hold, so that a reader following the link would get past every
// digest: only the refusal to follow it can fail these tests.

/// Move `path` to `outside` and put a symbolic link to it in its place.
fn plant_symlink(path: &Path, outside: &Path) {
    std::fs::rename(path, outside).unwrap();
    std::os::unix::fs::symlink(outside, path).unwrap();
}

/// The error is a corruption error naming `path` and saying it is a symbolic link.
#[track_caller]
fn names_symlink(e: &Error, path: &Path) {
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("symbolic link"),
        "the error does not name the symbolic link {}: {msg}",
        path.display()
    );
}

/// `check` refuses: a report with damage, or a corruption error naming `path`.
#[track_caller]
fn check_refuses(a: &Archive, path: &Path) {
    match a.check(true) {
        Ok(report) => assert!(!report.ok(), "check found nothing"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            names_symlink(&e, path);
        }
    }
}

#[test]
fn symlinked_newest_image_is_refused_even_with_the_right_bytes() {
    let a = Archive::copied();
    let img = a.file(2, "vda.raw");
    let outside = a.tmp.path().join("outside.raw");
    plant_symlink(&img, &outside);
    for k in 0..3 {
        let e = expect_corrupt(a.restore(k), &format!("restore of generation {k}"));
        names_symlink(&e, &img);
    }
    check_refuses(&a, &img);
    assert!(std::fs::read(&outside).unwrap() == a.snaps[2]);
}

#[test]
fn symlinked_digest_file_is_refused_even_with_the_right_bytes() {
    let a = Archive::copied();
    let digest = a.file(2, "vda.digest");
    let outside = a.tmp.path().join("outside.digest");
    let bytes = std::fs::read(&digest).unwrap();
    plant_symlink(&digest, &outside);
    let e = expect_corrupt(a.restore(2), "restore of the newest generation");
    names_symlink(&e, &digest);
    check_refuses(&a, &digest);
    assert_eq!(std::fs::read(&outside).unwrap(), bytes);
}

#[test]
fn symlinked_reverse_diff_is_refused_even_with_the_right_bytes() {
    let a = Archive::copied();
    let rdiff = a.rdiff(0);
    let outside = a.tmp.path().join("outside.rdiff");
    let bytes = std::fs::read(&rdiff).unwrap();
    plant_symlink(&rdiff, &outside);
    let e = expect_corrupt(a.restore(0), "restore of the oldest generation");
    names_symlink(&e, &rdiff);
    check_refuses(&a, &rdiff);
    a.newest_still_restores();
    assert_eq!(std::fs::read(&outside).unwrap(), bytes);
}

#[test]
fn generation_folder_symlinked_to_another_vms_generation_is_refused() {
    let a = Archive::copied();
    // VM "other" holds a copy of this VM's folder; this VM's oldest generation becomes a
    // link to the other VM's one (the same bytes, so only the refusal can fail the test).
    let other = a.repo.root().join("other");
    copy_tree(&a.vm_dir(), &other);
    let gen = a.vm_dir().join(&a.ids[0]);
    std::fs::remove_dir_all(&gen).unwrap();
    std::os::unix::fs::symlink(Path::new("../other").join(&a.ids[0]), &gen).unwrap();
    let before = listing(&other.join(&a.ids[0]));
    let bytes = std::fs::read(other.join(&a.ids[0]).join("vda.rdiff")).unwrap();

    let e = expect_corrupt(a.restore(0), "restore of the linked generation");
    names_symlink(&e, &gen);
    let e = expect_corrupt(a.restore(2), "restore of the newest generation");
    names_symlink(&e, &gen);
    check_refuses(&a, &gen);
    let e = expect_corrupt(a.drop_middle(), "drop of the middle generation");
    names_symlink(&e, &gen);
    let e = expect_corrupt(
        BackupRun::begin(&a.repo, "vm").map(|_| ()),
        "a backup's recovery",
    );
    names_symlink(&e, &gen);
    assert_eq!(listing(&other.join(&a.ids[0])), before);
    assert_eq!(
        std::fs::read(other.join(&a.ids[0]).join("vda.rdiff")).unwrap(),
        bytes
    );
    assert!(std::fs::symlink_metadata(&gen).unwrap().is_symlink());
}

#[test]
fn hard_linked_newest_image_is_never_written_in_place() {
    let a = Archive::copied();
    let img = a.file(2, "vda.raw");
    // A second name outside the VM folder (a `cp -al` copy of the repository, say).
    let outside = a.tmp.path().join("outside.raw");
    std::fs::hard_link(&img, &outside).unwrap();
    // Readers are not refused: the newest image is hard-linked by design during a
    // backup's roll-forward, and every block read is checked against its digest.
    a.newest_still_restores();

    let disk = a.tmp.path().join("disk.raw");
    let mut img4 = a.snaps[2].clone();
    block(&mut img4, 5).copy_from_slice(&noise(9, BS as usize));
    std::fs::write(&disk, &img4).unwrap();
    let input = DiskInput::new("vda", Box::new(FileSource::open(&disk).unwrap()));
    let opts = BackupOptions {
        block_size: Some(BS),
        ..Default::default()
    };
    let r = BackupRun::begin(&a.repo, "vm")
        .unwrap()
        .execute(vec![input], &opts, &NoProgress);
    let e = expect_corrupt(r, "a backup writing into a hard-linked image");
    assert!(
        e.to_string().contains(&img.display().to_string()) && e.to_string().contains("hard links"),
        "{e}"
    );
    assert!(std::fs::read(&outside).unwrap() == a.snaps[2]);
    assert_eq!(a.generation_count(), 3);
    a.newest_still_restores();
    assert!(a.check(true).unwrap().ok());
}
