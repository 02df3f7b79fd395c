//! The seed tool's integration rule, as a property: after any sequence of guest writes,
//! zero-fills, growth, shrink, backups in any mode and dropped generations, every path to a
//! generation produces the same bytes — every generation restores bit for bit equal to the
//! disk as it was, the newest `DISK.raw` equals the disk, and a deep check proves every
//! generation's digest root.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

mod support;

use proptest::prelude::*;
use support::archive::{deep_check_ok, restore_view};
use vmkeep::archive::view::DiskView;
use vmkeep::archive::{Generation, Repository, VmArchive};
use vmkeep::engine::backup::{BackupOptions, BackupRun, DiskInput};
use vmkeep::engine::check::{check, GenSelect};
use vmkeep::engine::Mode;
use vmkeep::progress::NoProgress;
use vmkeep::source::file::FileSource;

#[derive(Debug, Clone)]
enum Op {
    /// Write `len` bytes at `off` (fractions of the disk size), random or compressible.
    Write {
        at: f64,
        len: usize,
        seed: u64,
        text: bool,
    },
    /// Fill with zeros (by writing zeros, or by punching a hole).
    Zero {
        at: f64,
        len: usize,
        punch: bool,
    },
    /// Change the disk size to this many bytes.
    Resize {
        size: u64,
    },
    Backup {
        mode: Mode,
    },
    /// Drop the k-th oldest generation (never the newest).
    Drop {
        k: usize,
    },
}

impl Op {
    /// [`Op::Write`] of `len` bytes at `at`.
    fn write(at: f64, len: usize, seed: u64, text: bool) -> Op {
        Op::Write {
            at,
            len,
            seed,
            text,
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0.0..1.0f64, 1usize..=256, any::<u64>(), any::<bool>())
            .prop_map(|(at, kib, seed, text)| Op::Write { at, len: kib * 4096, seed, text }),
        1 => (0.0..1.0f64, 1usize..=64, any::<bool>()).prop_map(|(at, kib, punch)| Op::Zero { at, len: kib * 4096, punch }),
        1 => prop_oneof![Just(1u64 << 20), Just(3 << 20), Just((3 << 20) + 4096), Just((2 << 20) + 512), Just(4 << 20)]
            .prop_map(|size| Op::Resize { size }),
        3 => prop_oneof![Just(Mode::Auto), Just(Mode::Full), Just(Mode::Diff), Just(Mode::Incr)].prop_map(|mode| Op::Backup { mode }),
        1 => (0usize..8).prop_map(|k| Op::Drop { k }),
    ]
}

/// The disk as a file plus the model of what it holds.
struct Disk {
    path: PathBuf,
    file: File,
    model: Vec<u8>,
    /// Byte ranges written since the last backup (for incr).
    dirty: Vec<(u64, u64)>,
}

impl Disk {
    fn new(path: PathBuf, size: u64) -> Disk {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        Disk {
            path,
            file,
            model: vec![0; size as usize],
            dirty: Vec::new(),
        }
    }

    fn span(&self, at: f64, len: usize) -> (usize, usize) {
        let size = self.model.len();
        let off = ((at * size as f64) as usize / 512 * 512).min(size);
        (off, len.min(size - off))
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write {
                at,
                len,
                seed,
                text,
            } => {
                let (off, len) = self.span(at, len);
                let data = content(seed, len, text);
                self.file.write_all_at(&data, off as u64).unwrap();
                self.model[off..off + len].copy_from_slice(&data);
                self.dirty.push((off as u64, len as u64));
            }
            Op::Zero { at, len, punch } => {
                let (off, len) = self.span(at, len);
                if punch {
                    punch_hole(&self.file, off as u64, len as u64);
                } else {
                    self.file.write_all_at(&vec![0; len], off as u64).unwrap();
                }
                self.model[off..off + len].fill(0);
                self.dirty.push((off as u64, len as u64));
            }
            Op::Resize { size } => {
                // Not a write: the tracker (`dirty`) names none of it, as QEMU 7.2's
                // persistent bitmaps name nothing of a range regrown after a shrink.
                self.file.set_len(size).unwrap();
                self.model.resize(size as usize, 0);
            }
            Op::Backup { .. } | Op::Drop { .. } => {}
        }
    }
}

fn content(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            if text {
                b"the quick brown fox jumps over the lazy dog "[(i + seed as usize) % 44]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

fn punch_hole(f: &File, off: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate on a valid descriptor; no pointers.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            len as i64,
        )
    };
    if rc != 0 {
        f.write_all_at(&vec![0; len as usize], off).unwrap();
    }
}

fn backup(repo: &Repository, disk: &mut Disk, mode: Mode, block_size: u32) {
    let src = FileSource::open(&disk.path).unwrap();
    let mut input = DiskInput::new("vda", Box::new(src));
    if mode == Mode::Incr {
        input.changed = Some(std::mem::take(&mut disk.dirty));
    }
    let opts = BackupOptions {
        mode,
        block_size: Some(block_size),
        ..Default::default()
    };
    let run = BackupRun::begin(repo, "vm").unwrap();
    run.execute(vec![input], &opts, &NoProgress).unwrap();
    disk.dirty.clear();
}

fn restore_to(repo: &Repository, k: usize, out: &Path) -> Vec<u8> {
    let archive = repo.vm("vm").unwrap();
    let gens = archive.generations().unwrap();
    read_generation(&archive, &gens, k, "vda", out)
}

/// Disk `disk` of the `k`-th oldest of `gens`, restored to the file `out`.
fn read_generation(
    archive: &VmArchive,
    gens: &[Generation],
    k: usize,
    disk: &str,
    out: &Path,
) -> Vec<u8> {
    let view = DiskView::open(archive, gens, k, disk).unwrap();
    restore_view(&view, out).unwrap()
}

/// Drop the `k`-th oldest of `gens` under the VM's lock, as prune does.
fn drop_generation(archive: &VmArchive, gens: &[Generation], k: usize) {
    let _lock = vmkeep::archive::lock::VmLock::acquire(&archive.dir, "vm", "test").unwrap();
    vmkeep::engine::prune::drop_generation(&archive.dir, gens, k).unwrap();
}

/// Every generation restores to its snapshot; the newest image is the disk; check --deep ok.
fn verify(
    repo: &Repository,
    dir: &Path,
    snapshots: &[Vec<u8>],
    disk: &Disk,
) -> Result<(), TestCaseError> {
    let archive = repo.vm("vm").unwrap();
    let gens = archive.generations().unwrap();
    prop_assert_eq!(gens.len(), snapshots.len());
    for (k, snap) in snapshots.iter().enumerate() {
        let got = restore_to(repo, k, &dir.join(format!("restore-{k}.raw")));
        prop_assert!(
            got == *snap,
            "generation {} of {} differs from the disk it was made of",
            k,
            snapshots.len()
        );
    }
    let newest = std::fs::read(archive.dir.join("latest/vda.raw")).unwrap();
    prop_assert!(
        newest == *snapshots.last().unwrap(),
        "latest/vda.raw differs from the newest snapshot"
    );
    let _ = disk;
    let report = check(repo, "vm", true, &GenSelect::All, &NoProgress).unwrap();
    prop_assert!(report.ok(), "deep check found: {:?}", report.problems);
    prop_assert_eq!(report.generations_proven, snapshots.len());
    Ok(())
}

fn run_ops(ops: &[Op], block_size: u32) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let mut disk = Disk::new(dir.path().join("disk.raw"), 2 << 20);
    let mut snapshots: Vec<Vec<u8>> = Vec::new();
    for op in ops {
        disk.apply(op);
        match op {
            Op::Backup { mode } => {
                backup(&repo, &mut disk, *mode, block_size);
                snapshots.push(disk.model.clone());
                verify(&repo, dir.path(), &snapshots, &disk)?;
            }
            Op::Drop { k } if snapshots.len() > 1 => {
                let k = k % (snapshots.len() - 1);
                let archive = repo.vm("vm").unwrap();
                drop_generation(&archive, &archive.generations().unwrap(), k);
                snapshots.remove(k);
                verify(&repo, dir.path(), &snapshots, &disk)?;
            }
            _ => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_generation_restores_bit_for_bit(
        ops in proptest::collection::vec(op(), 1..14),
        bs in prop_oneof![Just(4096u32), Just(16384), Just(65536)],
    ) {
        let mut ops = ops;
        ops.push(Op::Backup { mode: Mode::Auto });
        run_ops(&ops, bs)?;
    }
}

#[test]
fn shrink_then_grow_with_a_dropped_middle_generation() {
    // Pins the merge rule for blocks past a middle generation's end: after dropping the
    // small middle generation, the old tail must still read as it was, not as the new tail.
    let ops = vec![
        Op::write(0.0, 2 << 20, 1, false),
        Op::Backup { mode: Mode::Full },
        Op::Resize { size: 1 << 20 },
        Op::Backup { mode: Mode::Diff },
        Op::Resize { size: 4 << 20 },
        Op::write(0.6, 1 << 20, 2, false),
        Op::Backup { mode: Mode::Incr },
        Op::Drop { k: 1 },
        Op::Backup { mode: Mode::Auto },
    ];
    run_ops(&ops, 65536).unwrap();
}

#[test]
fn shrink_then_grow_before_an_incremental() {
    // Pins a case proptest found: the tail cut off by a shrink and grown back reads as
    // zeros, the size is what the last generation recorded, and the tracker names none of
    // it; the incremental run must store zeros there, not keep the old tail.
    let ops = vec![
        Op::write(0.0, 2 << 20, 3, false),
        Op::Backup { mode: Mode::Full },
        Op::Resize { size: 1 << 20 },
        Op::Resize { size: 2 << 20 },
        Op::Backup { mode: Mode::Incr },
        // Then grown past its old size: the cut-off range lies before the old end.
        Op::write(0.5, 1 << 20, 4, true),
        Op::Backup { mode: Mode::Incr },
        Op::Resize { size: 1 << 20 },
        Op::Resize { size: 3 << 20 },
        Op::Backup { mode: Mode::Incr },
        Op::Backup { mode: Mode::Auto },
    ];
    run_ops(&ops, 4096).unwrap();
}

#[test]
fn disks_appear_and_disappear() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let mut a = Disk::new(dir.path().join("a.raw"), 1 << 20);
    let mut b = Disk::new(dir.path().join("b.raw"), 512 << 10);
    a.apply(&Op::write(0.1, 300 << 10, 5, true));
    b.apply(&Op::write(0.0, 100 << 10, 6, false));
    let run_with = |disks: &[&Disk]| {
        let inputs = disks
            .iter()
            .map(|d| {
                let name = d.path.file_stem().unwrap().to_str().unwrap();
                DiskInput::new(name, Box::new(FileSource::open(&d.path).unwrap()))
            })
            .collect();
        BackupRun::begin(&repo, "vm")
            .unwrap()
            .execute(inputs, &BackupOptions::default(), &NoProgress)
            .unwrap()
    };
    run_with(&[&a]); // g0: a
    let a0 = a.model.clone();
    run_with(&[&a, &b]); // g1: a, b
    let b1 = b.model.clone();
    a.apply(&Op::write(0.5, 64 << 10, 7, false));
    run_with(&[&b]); // g2: b only — a's last image becomes a base reverse diff of g1
    let a1 = a.model.clone();
    b.apply(&Op::write(0.2, 8 << 10, 8, false));
    run_with(&[&a, &b]); // g3: a (changed since g1) and b
    let archive = repo.vm("vm").unwrap();
    let gens = archive.generations().unwrap();
    let read = |k: usize, disk: &str| {
        let out = dir.path().join(format!("r-{k}-{disk}"));
        read_generation(&archive, &gens, k, disk, &out)
    };
    assert!(read(0, "a") == a0);
    assert!(read(1, "a") == a0);
    assert!(read(1, "b") == b1);
    assert!(read(2, "b") == b1);
    assert!(read(3, "a") == a1);
    assert!(read(3, "b") == b.model);
    assert!(
        DiskView::open(&archive, &gens, 2, "a").is_err(),
        "generation 2 has no disk a"
    );
    deep_check_ok(&repo, "vm");
    // Dropping g2 (the one without a) keeps g1's a readable.
    drop_generation(&archive, &gens, 2);
    let gens = archive.generations().unwrap();
    let out = dir.path().join("after-drop");
    assert!(read_generation(&archive, &gens, 1, "a", &out) == a0);
    deep_check_ok(&repo, "vm");
}
