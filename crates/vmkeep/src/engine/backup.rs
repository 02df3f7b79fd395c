//! Backup: make a new generation from the disks' current contents.
//!
//! The newest image is updated in place. Before any of its blocks is overwritten, the old
//! content is appended to the previous generation's new reverse diff (its undo journal) and
//! fsynced; the transaction record in the VM folder tells recovery whether to roll back or
//! forward (see [`crate::archive::txn`]). A run is split into [`BackupRun::begin`], which
//! takes the lock and picks the new generation's id (libvirt names its checkpoint after
//! it), and [`BackupRun::execute`], which reads the sources.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::archive::digest::{
    block_digest, Digest, DigestHeader, DigestReader, DigestWriter, ZERO_DIGEST,
};
use crate::archive::format::{
    block_count, block_len, valid_block_size, valid_disk_size, DEFAULT_BLOCK_SIZE, DIGEST_LEN,
};
use crate::archive::lock::VmLock;
use crate::archive::profile::{
    self, DiskRecord, GenerationMode, GenerationProfile, VmProfile, PROFILE_VERSION,
};
use crate::archive::rdiff::{RdiffHeader, RdiffWriter, Record, COMPRESSION_ZSTD, FLAG_BASE};
use crate::archive::txn::{self, Txn};
use crate::archive::{self, names, Generation, GenerationId, Repository, VmArchive, PARTIAL};
use crate::bufpool::{BufPool, PoolBuf};
use crate::engine::{cpu_threads, pipeline, Mode};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::Progress;
use crate::source::changed::{merge_ranges, to_block_ranges};
use crate::source::{BlockSource, ExtentKind, SourceIdentity};

/// One disk to back up.
pub struct DiskInput {
    pub name: String,
    pub source: Box<dyn BlockSource>,
    /// Byte ranges changed since the previous generation, when a trusted tracker says so.
    pub changed: Option<Vec<(u64, u64)>>,
    /// Why `changed` is absent, for the message when incr falls back to diff.
    pub untracked_reason: Option<String>,
    /// Persistent bitmap that records writes after this generation (qcow2 sources).
    pub bitmap: Option<String>,
    /// What the source is (recorded, and compared with the newest generation's record
    /// before `changed` is trusted); `None` means known by [`BlockSource::describe`] only.
    pub identity: Option<SourceIdentity>,
    /// `changed` is a list the user vouches for (`--changed-blocks`): only the source's
    /// origin must match the newest generation's. A tracker inside the source (a qcow2
    /// bitmap) must also be in the same file (device and inode).
    pub user_list: bool,
    /// The source has a tracker of its own (a qcow2 bitmap): when it cannot be used, an
    /// auto run says why too, not only an incr one.
    pub expects_tracking: bool,
}

impl DiskInput {
    pub fn new(name: &str, source: Box<dyn BlockSource>) -> DiskInput {
        DiskInput {
            name: name.to_string(),
            source,
            changed: None,
            untracked_reason: None,
            bitmap: None,
            identity: None,
            user_list: false,
            expects_tracking: false,
        }
    }
}

/// Why the source of a disk is not the one `rec` (the newest generation's record of the
/// disk) read, or `None` when it is as far as the record tells. `same_file` also requires
/// the same file (device and inode), for trackers stored inside the source.
pub fn source_changed(
    rec: &DiskRecord,
    now: &SourceIdentity,
    describe: &str,
    same_file: bool,
) -> Option<String> {
    match &rec.origin {
        Some(o) if *o != now.origin => {
            return Some(format!(
                "its source changed: the newest generation read {o}, this run reads {}",
                now.origin
            ))
        }
        // A profile written before origins were recorded: its source as described then.
        None if rec.source != describe => {
            return Some(format!(
                "its source changed: the newest generation read {}, this run reads {describe}",
                rec.source
            ))
        }
        _ => {}
    }
    let then = rec.file_device.zip(rec.file_inode);
    if same_file && then != now.file {
        let show = |f: Option<(u64, u64)>| match f {
            Some((d, i)) => format!("device {d} inode {i}"),
            None => "no file identity".to_string(),
        };
        return Some(format!(
            "{} is another file than the newest generation read ({}, now {})",
            now.origin,
            show(then),
            show(now.file)
        ));
    }
    None
}

/// Settings of one backup run.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub mode: Mode,
    /// Block size for a VM's first backup; an error if it differs from an existing VM's.
    pub block_size: Option<u32>,
    /// Block size for a VM's first backup when none is given (from the config file).
    pub default_block_size: u32,
    /// zstd level for reverse diffs (0 stores blocks uncompressed).
    pub compression_level: i32,
    /// "image", "nbd" or "libvirt".
    pub kind: String,
    pub domain_xml: Option<String>,
    pub checkpoint: Option<String>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            mode: Mode::Auto,
            block_size: None,
            default_block_size: DEFAULT_BLOCK_SIZE,
            compression_level: 3,
            kind: "image".into(),
            domain_xml: None,
            checkpoint: None,
        }
    }
}

/// What a run made.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub vm: String,
    pub generation: GenerationProfile,
    /// Lines describing what recovery did before the run.
    pub recovered: Vec<String>,
    pub warnings: Vec<String>,
}

impl BackupReport {
    pub fn read_bytes(&self) -> u64 {
        self.generation.disks.iter().map(|d| d.read_bytes).sum()
    }
    pub fn changed_bytes(&self) -> u64 {
        self.generation.disks.iter().map(|d| d.changed_bytes).sum()
    }
    pub fn stored_bytes(&self) -> u64 {
        self.generation.disks.iter().map(|d| d.stored_bytes).sum()
    }
}

/// A backup that holds the VM lock and knows its generation id.
pub struct BackupRun {
    vm: String,
    vm_dir: PathBuf,
    existing: Option<VmArchive>,
    prev: Option<Generation>,
    gen_id: GenerationId,
    recovered: Vec<String>,
    started: Instant,
    start_time: String,
    _lock: VmLock,
}

impl BackupRun {
    /// Lock the VM, recover what an interrupted run left, and pick the new generation id.
    pub fn begin(repo: &Repository, vm: &str) -> Result<BackupRun> {
        let vm_dir = repo.vm_dir(vm)?;
        fsutil::create_dir(&vm_dir)?;
        let lock = VmLock::acquire(&vm_dir, vm, "backup")?;
        let recovered = txn::recover(&vm_dir)?;
        let existing = if vm_dir.join("vm.toml").exists() {
            Some(VmArchive::open(vm_dir.clone(), vm)?)
        } else {
            None
        };
        let prev = match &existing {
            Some(a) => match a.generation_ids()?.last() {
                Some(id) => Some(a.generation(id)?),
                None => None,
            },
            None => None,
        };
        let gen_id = archive::new_generation_id(prev.as_ref().map(|g| &g.id));
        Ok(BackupRun {
            vm: vm.to_string(),
            vm_dir,
            existing,
            prev,
            gen_id,
            recovered,
            started: Instant::now(),
            start_time: profile::now_rfc3339(),
            _lock: lock,
        })
    }

    pub fn generation_id(&self) -> &GenerationId {
        &self.gen_id
    }

    pub fn previous(&self) -> Option<&Generation> {
        self.prev.as_ref()
    }

    /// The repository folder.
    pub fn repository(&self) -> &Path {
        self.vm_dir.parent().unwrap_or(Path::new("."))
    }

    pub fn recovered(&self) -> &[String] {
        &self.recovered
    }

    /// Read every disk and commit the new generation; on failure the archive is left
    /// exactly as it was.
    pub fn execute(
        self,
        disks: Vec<DiskInput>,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> Result<BackupReport> {
        self.execute_with(disks, opts, progress, &mut || Ok(()))
    }

    /// [`BackupRun::execute`], calling `before_commit` once every disk is read and written
    /// and before the generation is committed; its error fails the run (a libvirt backup
    /// job confirms there that it did not fail while vmkeep read it).
    pub fn execute_with(
        self,
        disks: Vec<DiskInput>,
        opts: &BackupOptions,
        progress: &dyn Progress,
        before_commit: &mut dyn FnMut() -> Result<()>,
    ) -> Result<BackupReport> {
        self.run(disks, opts, progress, before_commit)
    }

    /// [`BackupRun::execute`], then `after` with the outcome while the VM lock is still
    /// held: qcow2 bitmaps are committed or abandoned there, so that two runs never
    /// interleave their bitmap steps.
    pub fn execute_then(
        self,
        disks: Vec<DiskInput>,
        opts: &BackupOptions,
        progress: &dyn Progress,
        after: &mut dyn FnMut(&Result<BackupReport>),
    ) -> Result<BackupReport> {
        let result = self.run(disks, opts, progress, &mut || Ok(()));
        after(&result);
        result
    }

    fn run(
        &self,
        disks: Vec<DiskInput>,
        opts: &BackupOptions,
        progress: &dyn Progress,
        before_commit: &mut dyn FnMut() -> Result<()>,
    ) -> Result<BackupReport> {
        let block_size = self.block_size(opts)?;
        let mut seen = std::collections::HashSet::new();
        for d in &disks {
            names::check_disk(&d.name)?;
            if !seen.insert(d.name.clone()) {
                return Err(Error::usage(format!("disk {} is given twice", d.name)));
            }
        }
        if disks.is_empty() {
            return Err(Error::usage(format!("VM {}: no disks to back up", self.vm)));
        }
        let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
        let txn = Txn::backup(
            self.prev.as_ref().map(|g| g.id.to_string()),
            self.gen_id.to_string(),
            names,
        );
        txn.store(&self.vm_dir)?;
        let new_dir = self.vm_dir.join(format!("{}{PARTIAL}", self.gen_id));
        let result = self
            .write_generation(&new_dir, disks, block_size, opts, progress)
            .and_then(|written| before_commit().map(|()| written))
            .and_then(|(gp, warnings)| {
                self.commit(txn, &new_dir, gp, block_size, opts)
                    .map(|gp| (gp, warnings))
            });
        match result {
            Ok((generation, warnings)) => Ok(BackupReport {
                vm: self.vm.clone(),
                generation,
                recovered: self.recovered.clone(),
                warnings,
            }),
            Err(e) => {
                if let Err(undo) = txn::recover(&self.vm_dir) {
                    progress.warn(&format!("VM {}: the failed run could not be rolled back yet ({undo}); the next command will", self.vm));
                }
                Err(e)
            }
        }
    }

    fn block_size(&self, opts: &BackupOptions) -> Result<u32> {
        match (&self.existing, opts.block_size) {
            (Some(a), Some(bs)) if bs != a.profile.block_size => Err(Error::usage(format!(
                "VM {} has block size {}; --block-size applies only to a VM's first backup",
                self.vm, a.profile.block_size
            ))),
            (Some(a), _) => Ok(a.profile.block_size),
            (None, bs) => {
                let bs = bs.unwrap_or(opts.default_block_size);
                if !valid_block_size(bs as u64) {
                    return Err(Error::usage(format!(
                        "block size {bs} is not a power of two from 4 KiB to 4 MiB"
                    )));
                }
                Ok(bs)
            }
        }
    }

    fn write_generation(
        &self,
        new_dir: &Path,
        disks: Vec<DiskInput>,
        block_size: u32,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> Result<(GenerationProfile, Vec<String>)> {
        fsutil::create_dir(new_dir)?;
        let ctx = RunCtx {
            block_size,
            level: opts.compression_level,
            new_dir,
            prev: self.prev.as_ref(),
            gen: archive::generation_bytes(&self.gen_id),
            progress,
        };
        // One disk at a time when the power-loss explorer logs the operations, so that
        // their order is the same in every run.
        let serial = disks.len() == 1 || crate::fault::serial();
        let results: Vec<Result<(DiskRecord, Vec<String>)>> = if serial {
            disks.into_iter().map(|d| ctx.disk(d, opts.mode)).collect()
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = disks
                    .into_iter()
                    .map(|d| s.spawn(|| ctx.disk(d, opts.mode)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("disk thread panicked"))
                    .collect()
            })
        };
        let mut records = Vec::new();
        let mut warnings = Vec::new();
        for r in results {
            let (rec, w) = r?;
            records.push(rec);
            warnings.extend(w);
        }
        if let Some(prev) = &self.prev {
            for old in &prev.profile.disks {
                if !records.iter().any(|r| r.name == old.name) {
                    ctx.retire_disk(&old.name)?;
                    warnings.push(format!(
                        "disk {} is no longer backed up; its last image moved into generation {}",
                        old.name, prev.id
                    ));
                }
            }
        }
        let modes: Vec<GenerationMode> = records.iter().map(|r| r.mode).collect();
        let mode = [
            GenerationMode::Full,
            GenerationMode::Diff,
            GenerationMode::Incr,
        ]
        .into_iter()
        .find(|m| modes.contains(m))
        .unwrap_or(GenerationMode::Full);
        if let Some(xml) = &opts.domain_xml {
            let p = new_dir.join("domain.xml");
            let f = fsutil::create_new(&p)?;
            fsutil::write_at(&f, xml.as_bytes(), 0, &p)?;
            fsutil::sync_all(&f, &p)?;
        }
        let gp = GenerationProfile {
            format: PROFILE_VERSION,
            id: self.gen_id.clone(),
            vm: self.vm.clone(),
            time: self.start_time.clone(),
            mode,
            duration_secs: 0.0,
            protected: false,
            block_size,
            kind: opts.kind.clone(),
            checkpoint: opts.checkpoint.clone(),
            disks: records,
        };
        Ok((gp, warnings))
    }

    fn commit(
        &self,
        mut txn: Txn,
        new_dir: &Path,
        mut gp: GenerationProfile,
        block_size: u32,
        _opts: &BackupOptions,
    ) -> Result<GenerationProfile> {
        gp.duration_secs = (self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        profile::store(
            &new_dir.join("generation.toml"),
            "vmkeep generation profile",
            &gp,
        )?;
        if self.existing.is_none() {
            let vp = VmProfile {
                format: PROFILE_VERSION,
                name: self.vm.clone(),
                block_size,
                created: self.start_time.clone(),
                last_check: None,
            };
            profile::store(&self.vm_dir.join("vm.toml"), "vmkeep VM profile", &vp)?;
        }
        txn.state = "commit".into();
        txn.store(&self.vm_dir)?;
        txn::roll_forward_backup(&self.vm_dir, &txn)?;
        Txn::clear(&self.vm_dir)?;
        Ok(gp)
    }
}

/// What every disk of a run shares.
struct RunCtx<'a> {
    block_size: u32,
    level: i32,
    new_dir: &'a Path,
    prev: Option<&'a Generation>,
    gen: [u8; 16],
    progress: &'a dyn Progress,
}

/// The previous generation's files of one disk.
struct OldDisk {
    image: File,
    image_path: PathBuf,
    digest: DigestReader,
    size: u64,
    blocks: u64,
}

impl OldDisk {
    fn digest_of(&self, b: u64) -> Result<Digest> {
        let mut d = [0u8; DIGEST_LEN];
        self.digest.read_range(b, &mut d)?;
        Ok(d)
    }
}

/// Pending image writes, applied after the journal records that save their old contents
/// are durable.
#[derive(Default)]
struct PendingWrites {
    runs: Vec<Run>,
    /// Memory the pending writes hold: every distinct buffer they point into, whole.
    bytes: usize,
    /// Those buffers (by address), to count each once.
    buffers: std::collections::HashSet<usize>,
}

struct Run {
    pos: u64,
    data: Option<Arc<PoolBuf>>,
    off: usize,
    len: usize,
}

const JOURNAL_BATCH: usize = 32 << 20;

impl RunCtx<'_> {
    fn open_old(&self, name: &str, write: bool) -> Result<Option<OldDisk>> {
        let Some(prev) = self.prev else {
            return Ok(None);
        };
        let Some(rec) = prev.profile.disk(name) else {
            return Ok(None);
        };
        let image_path = prev.image_path(name);
        let image = if write {
            fsutil::open_rw(&image_path)?
        } else {
            fsutil::open_ro(&image_path)?
        };
        let digest = DigestReader::open(&prev.digest_path(name))?;
        let actual = image
            .metadata()
            .map_err(|e| Error::io(&image_path, e))?
            .len();
        if digest.header.disk_size != rec.size || actual != rec.size {
            return Err(Error::corrupt(
                &image_path,
                format!(
                    "size {actual} (digest says {}, profile {}); run 'vmkeep check'",
                    digest.header.disk_size, rec.size
                ),
            ));
        }
        if digest.header.block_size != self.block_size {
            return Err(Error::corrupt(
                digest.path(),
                "block size differs from the VM's",
            ));
        }
        Ok(Some(OldDisk {
            image,
            image_path,
            blocks: digest.blocks(),
            digest,
            size: rec.size,
        }))
    }

    /// Back up one disk into the new generation.
    fn disk(&self, mut input: DiskInput, requested: Mode) -> Result<(DiskRecord, Vec<String>)> {
        let bs = self.block_size;
        let size = input.source.size();
        if !valid_disk_size(size) {
            return Err(Error::source(
                input.source.describe(),
                format!("reports a size of {size} bytes, more than vmkeep handles"),
            ));
        }
        let new_blocks = block_count(size, bs);
        let old = self.open_old(&input.name, true)?;
        let mut warnings = Vec::new();
        let describe = input.source.describe();
        let identity = input
            .identity
            .clone()
            .unwrap_or_else(|| SourceIdentity::named(&describe));
        // A tracker's changes are trusted only for the source the newest generation read.
        let mut changed = input.changed.take();
        let mut untracked = input.untracked_reason.clone();
        let mut say_why = input.expects_tracking;
        let recorded = self.prev.and_then(|p| p.profile.disk(&input.name));
        if let (Some(rec), Some(_), Some(_)) = (recorded, &old, &changed) {
            if let Some(why) = source_changed(rec, &identity, &describe, !input.user_list) {
                changed = None;
                untracked = Some(why);
                say_why = true;
            }
        }
        let mode = match (requested, &old, &changed) {
            (_, None, _) => GenerationMode::Full,
            (Mode::Full, Some(_), _) => GenerationMode::Full,
            (Mode::Diff, Some(_), _) => GenerationMode::Diff,
            (Mode::Incr | Mode::Auto, Some(_), Some(_)) => GenerationMode::Incr,
            (Mode::Incr | Mode::Auto, Some(_), None) => {
                if requested == Mode::Incr || say_why {
                    let why = untracked
                        .clone()
                        .unwrap_or_else(|| "no change tracking for this source".into());
                    warnings.push(format!(
                        "disk {}: incr not possible ({why}); reading it all (diff)",
                        input.name
                    ));
                }
                GenerationMode::Diff
            }
        };
        let ranges = match (&mode, &old) {
            (GenerationMode::Incr, Some(o)) => {
                let mut r = to_block_ranges(changed.as_deref().unwrap_or(&[]), bs, new_blocks);
                if o.size != size {
                    // The block at the old end and everything past it changed length.
                    r.push((o.blocks.min(new_blocks).saturating_sub(1), new_blocks));
                    r.retain(|&(a, b)| a < b);
                    merge_ranges(&mut r);
                }
                r
            }
            _ => vec![(0, new_blocks)]
                .into_iter()
                .filter(|&(a, b)| a < b)
                .collect(),
        };
        let examined: u64 = ranges
            .iter()
            .map(|&(a, b)| (b - a) * bs as u64)
            .sum::<u64>()
            .min(size);
        let task = self.progress.task(&input.name, examined);

        let image_path = self.new_dir.join(format!("{}.raw", input.name));
        let digest_path = self.new_dir.join(format!("{}.digest", input.name));
        let dh = DigestHeader {
            block_size: bs,
            disk_size: size,
            generation: self.gen,
        };
        let mut sink = match old.as_ref() {
            Some(o) => {
                let prev = self.prev.expect("old disk implies a previous generation");
                let journal_path = prev.dir.join(format!("{}.rdiff.partial", input.name));
                let rh = RdiffHeader {
                    flags: 0,
                    block_size: bs,
                    compression: COMPRESSION_ZSTD,
                    disk_size: o.size,
                    next_size: size,
                    generation: archive::generation_bytes(&prev.id),
                };
                let mut journal = RdiffWriter::create(&journal_path, rh)?;
                // The header (with the old size) must be durable before the image changes
                // at all, growth included: recovery reads the size to restore from it. So
                // must its name: without a folder fsync a power loss can lose the journal
                // while the image writes after it reach the disk.
                journal.sync()?;
                fsutil::sync_dir(&prev.dir)?;
                let digests = DigestWriter::create_from(&digest_path, dh, &o.digest)?;
                let alloc_before = fsutil::allocated_bytes(&o.image_path);
                if size > o.size {
                    // Growing first is safe: rollback truncates to the size in the journal.
                    fsutil::set_len(&o.image, size, &o.image_path)?;
                }
                Sink::new(
                    SinkTarget::Update {
                        old: o,
                        journal: Box::new(journal),
                        alloc_before,
                    },
                    digests,
                    bs,
                    size,
                )
            }
            None => {
                let image = fsutil::create_new(&image_path)?;
                fsutil::set_len(&image, size, &image_path)?;
                let digests = DigestWriter::create(&digest_path, dh)?;
                Sink::new(
                    SinkTarget::Fresh {
                        image,
                        path: image_path.clone(),
                    },
                    digests,
                    bs,
                    size,
                )
            }
        };
        let read_bytes = AtomicU64::new(0);
        let level = self.level;
        let full_compare = mode == GenerationMode::Full;
        {
            let source = input.source.as_ref();
            let old_ref = old.as_ref();
            let mut planner = Planner::new(source, &ranges, bs, size);
            let workers = cpu_threads().max(source.parallelism());
            let window = workers + 2 * cpu_threads();
            // Every buffer in flight comes from here and returns here.
            let pool = BufPool::new(window + 2);
            // An incremental run reads scattered blocks: its own thread keeps the reads of
            // the next blocks (source, previous image, digests) in flight well ahead of
            // the workers, far more of them than the pipeline's window holds.
            let incr = mode == GenerationMode::Incr;
            let planned = AtomicU64::new(0);
            let stop = AtomicBool::new(false);
            let mut next_job = || -> Result<Option<Job>> {
                let job = planner.next()?;
                if let Some(j) = &job {
                    if incr {
                        planned.fetch_add(j.count * bs as u64, Ordering::Relaxed);
                    } else {
                        hint(j, source, old_ref, bs, size, false);
                    }
                }
                Ok(job)
            };
            let work = |job: Job| -> Result<Done> {
                let done = examine(job, source, old_ref, bs, size, level, full_compare, &pool)?;
                read_bytes.fetch_add(done.read_bytes, Ordering::Relaxed);
                task.advance(done.count * bs as u64);
                Ok(done)
            };
            std::thread::scope(|s| {
                if incr {
                    let (ranges, planned, stop) = (&ranges, &planned, &stop);
                    s.spawn(move || {
                        prefetch_ranges(ranges, source, old_ref, bs, size, planned, stop)
                    });
                }
                let result = pipeline::ordered(workers, window, &mut next_job, work, |done| {
                    sink.accept(done)
                });
                stop.store(true, Ordering::Relaxed);
                result
            })?;
        }
        let (stored, changed_bytes, damaged) = sink.finish()?;
        task.finish();
        if damaged > 0 {
            warnings.push(format!(
                "disk {}: {damaged} blocks of the previous image failed their digests; they are marked damaged in the previous generation (run 'vmkeep check')",
                input.name
            ));
        }
        let digest_root = DigestReader::open(&digest_path)?.root()?;
        let rec = DiskRecord {
            name: input.name.clone(),
            size,
            mode,
            source: describe,
            read_bytes: read_bytes.load(Ordering::Relaxed),
            changed_bytes,
            stored_bytes: stored,
            digest_root,
            bitmap: input.bitmap.clone(),
            origin: Some(identity.origin),
            file_device: identity.file.map(|f| f.0),
            file_inode: identity.file.map(|f| f.1),
        };
        Ok((rec, warnings))
    }

    /// A disk the new generation no longer has: its whole last image becomes the
    /// previous generation's reverse diff (a base of the chain).
    fn retire_disk(&self, name: &str) -> Result<()> {
        let Some(old) = self.open_old(name, false)? else {
            return Ok(());
        };
        let prev = self.prev.expect("old disk implies a previous generation");
        let rh = RdiffHeader {
            flags: FLAG_BASE,
            block_size: self.block_size,
            compression: COMPRESSION_ZSTD,
            disk_size: old.size,
            next_size: 0,
            generation: archive::generation_bytes(&prev.id),
        };
        let mut w = RdiffWriter::create(&prev.dir.join(format!("{name}.rdiff.partial")), rh)?;
        for b in 0..old.blocks {
            let d = old.digest_of(b)?;
            if d != ZERO_DIGEST {
                w.append(&old_record(&old, b, d, self.block_size, self.level)?)?;
            }
        }
        w.finish()?;
        // The image is removed at the commit: the reverse diff that replaces it must have
        // a durable name first.
        fsutil::sync_dir(&prev.dir)?;
        Ok(())
    }
}

/// A run of blocks for one worker.
struct Job {
    first: u64,
    count: u64,
    kind: ExtentKind,
}

/// A job's outcome.
struct Done {
    first: u64,
    count: u64,
    read_bytes: u64,
    data: Option<Arc<PoolBuf>>,
    digests: Vec<Digest>,
    /// Changed blocks (index within the job) with the journal record of their old content
    /// (none for blocks the previous generation did not have).
    changes: Vec<(usize, Option<Record>)>,
    damaged: u64,
}

/// Tell the sources what the planner just handed out, so that the reads of scattered
/// blocks are in flight before a worker asks for them: the source's range, and, in incr
/// mode (where most examined blocks did change), the previous image's range too; the old
/// digests are always wanted.
fn hint(
    job: &Job,
    source: &dyn BlockSource,
    old: Option<&OldDisk>,
    bs: u32,
    size: u64,
    incr: bool,
) {
    let start = job.first * bs as u64;
    let end = ((job.first + job.count) * bs as u64).min(size);
    // The planner reads ahead within a range; across ranges, the incr prefetcher does.
    if incr && job.kind == ExtentKind::Data {
        source.prefetch(start, end - start);
    }
    if let Some(o) = old {
        let shared = o.blocks.saturating_sub(job.first).min(job.count);
        o.digest.prefetch(job.first, shared);
        if incr && shared > 0 {
            let old_end = ((job.first + shared) * bs as u64).min(o.size);
            fsutil::will_need(&o.image, start, old_end - start);
        }
    }
}

/// Bytes of scattered blocks whose reads [`prefetch_ranges`] keeps in flight ahead of
/// the planner (page cache only; no buffer of ours).
const PREFETCH_AHEAD: u64 = 64 << 20;

/// Walk the block ranges an incremental run examines and start the reads they need
/// ([`hint`]), staying at most [`PREFETCH_AHEAD`] bytes ahead of what the planner has
/// handed out (`planned`), until `stop`.
fn prefetch_ranges(
    ranges: &[(u64, u64)],
    source: &dyn BlockSource,
    old: Option<&OldDisk>,
    bs: u32,
    size: u64,
    planned: &AtomicU64,
    stop: &AtomicBool,
) {
    let piece = ((4u64 << 20) / bs as u64).max(1);
    let mut issued = 0u64;
    for &(a, b) in ranges {
        let mut first = a;
        while first < b {
            let count = (b - first).min(piece);
            while issued > planned.load(Ordering::Relaxed) + PREFETCH_AHEAD {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let job = Job {
                first,
                count,
                kind: ExtentKind::Data,
            };
            hint(&job, source, old, bs, size, true);
            issued += count * bs as u64;
            first += count;
        }
    }
}

/// Read and digest one job, and prepare the journal records of the blocks it changes.
#[allow(clippy::too_many_arguments)]
fn examine(
    job: Job,
    source: &dyn BlockSource,
    old: Option<&OldDisk>,
    bs: u32,
    size: u64,
    level: i32,
    full_compare: bool,
    pool: &Arc<BufPool>,
) -> Result<Done> {
    let start = job.first * bs as u64;
    let end = ((job.first + job.count) * bs as u64).min(size);
    let mut read_bytes = 0;
    let data = match job.kind {
        ExtentKind::Data => {
            let buf = source.read_buf(pool, start, (end - start) as usize)?;
            read_bytes = buf.len() as u64;
            Some(buf)
        }
        ExtentKind::Zero => None,
    };
    let n = job.count as usize;
    let mut digests = Vec::with_capacity(n);
    for i in 0..n {
        digests.push(match &data {
            Some(d) => block_digest(block_slice(d, i, bs)),
            None => ZERO_DIGEST,
        });
    }
    let mut changes = Vec::new();
    let mut damaged = 0;
    match old {
        None => {
            for (i, d) in digests.iter().enumerate() {
                if *d != ZERO_DIGEST {
                    changes.push((i, None));
                }
            }
        }
        Some(o) => {
            let shared = o.blocks.saturating_sub(job.first).min(job.count) as usize;
            let mut old_digests = vec![0u8; shared * DIGEST_LEN];
            o.digest.read_range(job.first, &mut old_digests)?;
            let od = |i: usize| -> Digest {
                old_digests[i * DIGEST_LEN..(i + 1) * DIGEST_LEN]
                    .try_into()
                    .expect("32")
            };
            // Blocks whose old content must be looked at: those that changed (and, in full
            // mode, every block: the image bytes are compared, not the stored digest).
            let candidates: Vec<usize> = (0..shared)
                .filter(|&i| full_compare || od(i) != digests[i])
                .collect();
            // Old contents are read in one request per run of adjacent candidates.
            let mut k = 0;
            while k < candidates.len() {
                let mut m = k + 1;
                while m < candidates.len() && candidates[m] == candidates[m - 1] + 1 {
                    m += 1;
                }
                let (a, b) = (candidates[k], candidates[m - 1] + 1);
                let from = (job.first + a as u64) * bs as u64;
                let to = ((job.first + b as u64) * bs as u64).min(o.size);
                let mut old_buf = vec![0u8; (to - from) as usize];
                fsutil::read_exact_at(&o.image, &mut old_buf, from, &o.image_path)?;
                for &i in &candidates[k..m] {
                    let blk = job.first + i as u64;
                    let ob = block_slice(&old_buf, i - a, bs);
                    let rec = old_record_of(blk, ob, od(i), level);
                    if od(i) == digests[i] {
                        // Full mode: trust the image bytes, not the stored digest.
                        let same = match &data {
                            Some(v) => ob == block_slice(v, i, bs),
                            None => fsutil::is_zero(ob),
                        };
                        if same {
                            continue;
                        }
                    }
                    damaged += rec.is_damaged() as u64;
                    changes.push((i, Some(rec)));
                }
                k = m;
            }
            for (i, d) in digests.iter().enumerate().skip(shared) {
                if *d != ZERO_DIGEST {
                    changes.push((i, None));
                }
            }
        }
    }
    Ok(Done {
        first: job.first,
        count: job.count,
        read_bytes,
        data: data.map(Arc::new),
        digests,
        changes,
        damaged,
    })
}

/// The journal record of block `b` of the previous image, whose bytes are `bytes` and
/// whose digest should be `od`.
fn old_record_of(b: u64, bytes: &[u8], od: Digest, level: i32) -> Record {
    if od == ZERO_DIGEST {
        // A hole in the image; not zero only when the image was damaged there.
        if fsutil::is_zero(bytes) {
            return Record::zero(b, bytes.len() as u32);
        }
        return Record::with_data(b, bytes, od, level, true);
    }
    let damaged = block_digest(bytes) != od;
    Record::with_data(b, bytes, od, level, damaged)
}

/// The journal record of block `b` of the previous image (digest `od`).
fn old_record(o: &OldDisk, b: u64, od: Digest, bs: u32, level: i32) -> Result<Record> {
    let mut buf = vec![0u8; block_len(b, o.size, bs)];
    fsutil::read_exact_at(&o.image, &mut buf, b * bs as u64, &o.image_path)?;
    Ok(old_record_of(b, &buf, od, level))
}

fn block_slice(data: &[u8], i: usize, bs: u32) -> &[u8] {
    let s = i * bs as usize;
    &data[s..(s + bs as usize).min(data.len())]
}

enum SinkTarget<'a> {
    /// First backup of this disk: a new sparse image.
    Fresh { image: File, path: PathBuf },
    /// Update the previous image in place, journaling old blocks first.
    Update {
        old: &'a OldDisk,
        journal: Box<RdiffWriter>,
        alloc_before: u64,
    },
}

/// The ordered end of the pipeline: journal, image and digest writes.
struct Sink<'a> {
    target: SinkTarget<'a>,
    digests: DigestWriter,
    pending: PendingWrites,
    unsynced_records: bool,
    behind: fsutil::WriteBehind,
    bs: u32,
    size: u64,
    changed: u64,
    damaged: u64,
}

impl<'a> Sink<'a> {
    fn new(target: SinkTarget<'a>, digests: DigestWriter, bs: u32, size: u64) -> Sink<'a> {
        Sink {
            target,
            digests,
            pending: PendingWrites::default(),
            unsynced_records: false,
            behind: fsutil::WriteBehind::default(),
            bs,
            size,
            changed: 0,
            damaged: 0,
        }
    }

    fn accept(&mut self, done: Done) -> Result<()> {
        self.damaged += done.damaged;
        let bs = self.bs;
        let update = matches!(self.target, SinkTarget::Update { .. });
        // Updating in place, the image writes wait for the journal's fsync, a batch at a
        // time. A job of which only a few blocks changed (diff mode) must not keep its
        // whole read buffer alive until then: its changed blocks are copied out.
        let changed_data: usize = done
            .changes
            .iter()
            .filter(|(i, _)| done.digests[*i] != ZERO_DIGEST)
            .map(|(i, _)| block_len(done.first + *i as u64, self.size, bs))
            .sum();
        let keep_whole = !update
            || done
                .data
                .as_ref()
                .is_some_and(|d| changed_data * 2 >= d.footprint());
        let mut compact: Vec<u8> = Vec::with_capacity(if keep_whole { 0 } else { changed_data });
        let mut compact_runs: Vec<(u64, usize, usize)> = Vec::new();
        for (i, rec) in &done.changes {
            let b = done.first + *i as u64;
            let len = block_len(b, self.size, bs);
            self.changed += len as u64;
            self.digests.put(b, &done.digests[*i])?;
            if let (Some(rec), SinkTarget::Update { journal, .. }) = (rec, &mut self.target) {
                journal.append(rec)?;
                self.unsynced_records = true;
            }
            let data = done
                .data
                .as_ref()
                .filter(|_| done.digests[*i] != ZERO_DIGEST);
            match data {
                Some(d) if !keep_whole => {
                    let s = *i * bs as usize;
                    compact_runs.push((b * bs as u64, compact.len(), len));
                    compact.extend_from_slice(&d[s..s + len]);
                }
                Some(d) => self
                    .pending
                    .push(b * bs as u64, Some(d.clone()), *i * bs as usize, len),
                None => self.pending.push(b * bs as u64, None, 0, len),
            }
        }
        if !compact_runs.is_empty() {
            let compact = Arc::new(PoolBuf::adopt(compact, None));
            for (pos, off, len) in compact_runs {
                self.pending.push(pos, Some(compact.clone()), off, len);
            }
        }
        // A new image has no journal to wait for: its blocks are written at once, while
        // the buffer is still warm in the cache, and the buffer goes back to the pool.
        if !update || self.pending.bytes >= JOURNAL_BATCH || self.pending.runs.len() >= 4096 {
            self.flush()?;
        }
        Ok(())
    }

    /// The undo-journal barrier: records first, durable; then the image writes.
    fn flush(&mut self) -> Result<()> {
        let fresh = matches!(self.target, SinkTarget::Fresh { .. });
        let (image, path) = match &mut self.target {
            SinkTarget::Fresh { image, path } => (&*image, path.as_path()),
            SinkTarget::Update { old, journal, .. } => {
                if self.unsynced_records {
                    journal.sync()?;
                    self.unsynced_records = false;
                }
                (&old.image, old.image_path.as_path())
            }
        };
        for run in self.pending.runs.drain(..) {
            match run.data {
                Some(d) => {
                    fsutil::write_at(image, &d[run.off..run.off + run.len], run.pos, path)?;
                    self.behind.wrote(image, run.len as u64);
                }
                None if fresh => {}
                None => fsutil::punch_hole(image, run.pos, run.len as u64, path)?,
            }
        }
        self.pending.bytes = 0;
        self.pending.buffers.clear();
        crate::fault::pause("backup-flushed");
        Ok(())
    }

    /// Finish the disk: journal the tail a shrink cuts off, apply the last writes, set
    /// the size, make everything durable. Returns (stored, changed, damaged).
    fn finish(mut self) -> Result<(u64, u64, u64)> {
        if let SinkTarget::Update { old, journal, .. } = &mut self.target {
            let new_blocks = block_count(self.size, self.bs);
            for b in new_blocks..old.blocks {
                let d = old.digest_of(b)?;
                if d != ZERO_DIGEST {
                    let rec = old_record(old, b, d, self.bs, 3)?;
                    self.damaged += rec.is_damaged() as u64;
                    journal.append(&rec)?;
                    self.unsynced_records = true;
                }
            }
        }
        self.flush()?;
        let size = self.size;
        let stored = match self.target {
            SinkTarget::Fresh { image, path } => {
                fsutil::sync_all(&image, &path)?;
                fsutil::allocated_bytes(&path)
            }
            SinkTarget::Update {
                old,
                journal,
                alloc_before,
            } => {
                if size < old.size {
                    fsutil::set_len(&old.image, size, &old.image_path)?;
                }
                fsutil::sync_all(&old.image, &old.image_path)?;
                let rdiff_len = journal.finish()?;
                rdiff_len + fsutil::allocated_bytes(&old.image_path).saturating_sub(alloc_before)
            }
        };
        self.digests.finish()?;
        Ok((stored, self.changed, self.damaged))
    }
}

impl PendingWrites {
    /// Queue a write of `len` bytes at disk position `pos`: `data[off..off+len]`, or a
    /// hole when `data` is `None`.
    fn push(&mut self, pos: u64, data: Option<Arc<PoolBuf>>, off: usize, len: usize) {
        if let Some(d) = &data {
            if self.buffers.insert(Arc::as_ptr(d) as usize) {
                self.bytes += d.footprint();
            }
        }
        // Adjacent blocks from the same buffer become one write.
        if let Some(last) = self.runs.last_mut() {
            let contiguous = last.pos + last.len as u64 == pos;
            let same = match (&last.data, &data) {
                (Some(a), Some(d)) => Arc::ptr_eq(a, d) && last.off + last.len == off,
                (None, None) => true,
                _ => false,
            };
            if contiguous && same {
                last.len += len;
                return;
            }
        }
        self.runs.push(Run {
            pos,
            data,
            off,
            len,
        });
    }
}

/// Hands out jobs: runs of blocks of one kind (data to read, or known zeros), following
/// the block ranges to examine and the source's allocation map.
struct Planner<'a> {
    source: &'a dyn BlockSource,
    ranges: &'a [(u64, u64)],
    range: usize,
    next: u64,
    bs: u32,
    size: u64,
    max_data_blocks: u64,
    /// Zero byte ranges known for `[map_start, map_end)`.
    zeros: Vec<(u64, u64)>,
    map_start: u64,
    map_end: u64,
    /// Bytes up to which the source's data has been prefetched.
    ahead: u64,
}

const MAP_WINDOW: u64 = 1 << 30;
/// How far ahead of the job being planned the source's data is prefetched, and in
/// pieces of what size.
const READ_AHEAD: u64 = 32 << 20;
const READ_AHEAD_PIECE: u64 = 2 << 20;
const MAX_ZERO_BLOCKS: u64 = 1 << 16;

impl<'a> Planner<'a> {
    fn new(source: &'a dyn BlockSource, ranges: &'a [(u64, u64)], bs: u32, size: u64) -> Self {
        let request = crate::engine::tuning("VMKEEP_READ_SIZE", 4096..=32 << 20).unwrap_or(4 << 20);
        let chunk = (source.max_read().min(request) as u64).max(bs as u64);
        Planner {
            source,
            ranges,
            range: 0,
            next: ranges.first().map(|r| r.0).unwrap_or(0),
            bs,
            size,
            max_data_blocks: (chunk / bs as u64).max(1),
            zeros: Vec::new(),
            map_start: 0,
            map_end: 0,
            ahead: 0,
        }
    }

    fn next(&mut self) -> Result<Option<Job>> {
        let bs = self.bs as u64;
        loop {
            let Some(&(_, end)) = self.ranges.get(self.range) else {
                return Ok(None);
            };
            if self.next >= end {
                self.range += 1;
                if let Some(&(start, _)) = self.ranges.get(self.range) {
                    self.next = start;
                }
                continue;
            }
            let first = self.next;
            let pos = first * bs;
            if pos < self.map_start || pos >= self.map_end {
                self.map(pos, (end * bs).min(self.size))?;
            }
            let kind = self.kind_of(first);
            let limit = if kind == ExtentKind::Zero {
                MAX_ZERO_BLOCKS
            } else {
                self.max_data_blocks
            };
            let mut count = 1;
            while count < limit && first + count < end {
                let b = first + count;
                if ((b + 1) * bs).min(self.size) > self.map_end {
                    break;
                }
                if self.kind_of(b) != kind {
                    break;
                }
                count += 1;
            }
            self.next = first + count;
            self.read_ahead(first * bs, (end * bs).min(self.size));
            if first == self.ranges[0].0 {
                crate::fault::pause("backup-planned");
            }
            return Ok(Some(Job { first, count, kind }));
        }
    }

    /// Keep the source reading [`READ_AHEAD`] bytes of data past `from` (within the
    /// range being planned and the current map): only data extents, so that no hole is
    /// read, in pieces that the kernel queues at once.
    fn read_ahead(&mut self, from: u64, range_end: u64) {
        let to = (from + READ_AHEAD).min(self.map_end).min(range_end);
        let mut at = self.ahead.max(from);
        while at < to {
            let i = self.zeros.partition_point(|&(_, ze)| ze <= at);
            match self.zeros.get(i) {
                Some(&(zs, ze)) if zs <= at => at = ze,
                next => {
                    let data_end = next.map_or(to, |z| z.0).min(to);
                    let piece = data_end.min(at + READ_AHEAD_PIECE);
                    self.source.prefetch(at, piece - at);
                    at = piece;
                }
            }
        }
        self.ahead = self.ahead.max(to);
    }

    /// Whether block `b` lies wholly in a zero range of the current map.
    fn kind_of(&self, b: u64) -> ExtentKind {
        let s = b * self.bs as u64;
        let e = (s + self.bs as u64).min(self.size);
        let i = self.zeros.partition_point(|&(_, ze)| ze <= s);
        match self.zeros.get(i) {
            Some(&(zs, ze)) if zs <= s && ze >= e => ExtentKind::Zero,
            _ => ExtentKind::Data,
        }
    }

    /// Learn the allocation map from `pos` up to a window's length (block aligned).
    fn map(&mut self, pos: u64, range_end: u64) -> Result<()> {
        let bs = self.bs as u64;
        let want = (pos + MAP_WINDOW).min(range_end);
        let want = if want < range_end {
            (want / bs * bs).max(pos + bs)
        } else {
            want
        };
        self.zeros.clear();
        let mut at = pos;
        while at < want {
            let extents = self.source.extents(at, want - at)?;
            let mut progressed = false;
            for e in extents {
                if e.offset != at || e.length == 0 {
                    return Err(Error::source(
                        self.source.describe(),
                        format!("allocation map has a gap or overlap at byte {at}"),
                    ));
                }
                let e_end = (e.offset + e.length).min(want);
                if e.kind == ExtentKind::Zero {
                    match self.zeros.last_mut() {
                        Some(last) if last.1 == at => last.1 = e_end,
                        _ => self.zeros.push((at, e_end)),
                    }
                }
                at = e_end;
                progressed = true;
                if at >= want {
                    break;
                }
            }
            if !progressed {
                return Err(Error::source(
                    self.source.describe(),
                    format!("allocation map is empty at byte {at}"),
                ));
            }
        }
        self.map_start = pos;
        self.map_end = want;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(origin: Option<&str>, file: Option<(u64, u64)>) -> DiskRecord {
        DiskRecord {
            name: "vda".into(),
            size: 1,
            mode: GenerationMode::Full,
            source: "d.qcow2".into(),
            read_bytes: 0,
            changed_bytes: 0,
            stored_bytes: 0,
            digest_root: String::new(),
            bitmap: None,
            origin: origin.map(str::to_string),
            file_device: file.map(|f| f.0),
            file_inode: file.map(|f| f.1),
        }
    }

    #[test]
    fn a_source_is_the_same_only_by_origin_and_for_trackers_inside_it_by_file() {
        let now = SourceIdentity {
            origin: "/i/a.qcow2".into(),
            file: Some((1, 2)),
        };
        let same = record(Some("/i/a.qcow2"), Some((1, 2)));
        assert_eq!(source_changed(&same, &now, "x", true), None);
        let swapped = record(Some("/i/b.qcow2"), Some((1, 3)));
        let why = source_changed(&swapped, &now, "x", false).unwrap();
        assert!(why.contains("source changed"), "{why}");
        // Replaced at the same path: only a tracker inside the file cares.
        let replaced = record(Some("/i/a.qcow2"), Some((1, 9)));
        assert!(source_changed(&replaced, &now, "x", true).is_some());
        assert_eq!(source_changed(&replaced, &now, "x", false), None);
        assert!(source_changed(&record(Some("/i/a.qcow2"), None), &now, "x", true).is_some());
        // A profile from before origins: its description then.
        assert_eq!(
            source_changed(&record(None, None), &now, "d.qcow2", false),
            None
        );
        assert!(source_changed(&record(None, None), &now, "e.qcow2", false).is_some());
    }
}
