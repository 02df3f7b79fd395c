//! Backup: make a new generation from the disks' current contents.
//!
//! The newest image is updated in place. Before any of its blocks is overwritten, the old
//! content is appended to the previous generation's new reverse diff (its undo journal) and
//! fsynced; the transaction record in the VM folder tells recovery whether to roll back or
//! forward (see [`crate::archive::txn`]). A run is split into [`BackupRun::begin`], which
//! takes the lock and picks the new generation's id (libvirt names its checkpoint after
//! it), and [`BackupRun::execute`], which reads the sources. [`backup_images`] is the
//! whole workflow of an image VM (SOURCE specs, bitmaps, changed-block lists).
//!
//! The stages of one disk, each in its own file: `disk` (the trust and mode decision and
//! the wiring), `plan` (which blocks, in jobs, and the reads started ahead of them),
//! `examine` (the workers: read, digest, compare, journal records), `sink` (the ordered
//! writes behind the undo journal).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::archive::format::{valid_block_size, DEFAULT_BLOCK_SIZE};
use crate::archive::lock::VmLock;
use crate::archive::profile::{
    self, DiskRecord, GenerationMode, GenerationProfile, SourceKind, VmProfile, PROFILE_VERSION,
};
use crate::archive::retention::Schedule;
use crate::archive::txn::{self, Txn};
use crate::archive::{self, names, Generation, GenerationId, Repository, VmArchive};
use crate::engine::prune::{prune_held, PruneReport};
use crate::engine::Mode;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::Progress;
use crate::source::{BlockSource, SourceIdentity};
use disk::RunCtx;

mod disk;
mod examine;
mod images;
mod plan;
mod sink;

pub use images::{backup_images, ImageBackup};

/// One disk to back up.
pub struct DiskInput {
    /// The disk's name in the archive (`DISK` of its file names; a valid name, see
    /// `docs/FORMAT.md`, "Names").
    pub name: String,
    /// Where the disk's bytes are read from.
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
    /// The images below the source in its backing chain whose trackers `changed` also
    /// holds (the layers an external snapshot put the source over, each with the
    /// checkpoint's bitmap): the newest generation may have read one of them, when the
    /// snapshot came after it, and is then still the same disk (see [`read_earlier_layer`]).
    pub earlier_origins: Vec<String>,
}

impl DiskInput {
    /// A disk named `name` read from `source`, with no change list, bitmap or identity
    /// set (so it is never incr until a caller fills them in).
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
            earlier_origins: Vec::new(),
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

/// Whether the newest generation (`rec`) read one of the `earlier` layers below this
/// run's source (the caller proved that the tracker covers every layer from the source down
/// to them): the disk got an external snapshot since, and it is still the disk that
/// generation read.
pub fn read_earlier_layer(rec: &DiskRecord, earlier: &[String]) -> bool {
    rec.origin
        .as_deref()
        .is_some_and(|o| earlier.iter().any(|e| e == o))
}

/// The zstd level of reverse diffs when none is given.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;

/// Check a zstd level for reverse diffs: 0 (stored uncompressed) to 19.
pub fn check_compression_level(level: i32) -> Result<()> {
    if !(0..=19).contains(&level) {
        return Err(Error::usage(format!(
            "compression level {level} is not in 0..=19"
        )));
    }
    Ok(())
}

/// Is VM `vm` due for a backup: is its newest generation older than `interval` seconds
/// (or is there none, or no interval)? A little slack (five minutes) lets a daily timer
/// that fires a few seconds early still run.
pub fn is_due(repo: &Repository, vm: &str, interval: Option<u64>) -> Result<bool> {
    let Some(interval) = interval else {
        return Ok(true);
    };
    let Ok(archive) = repo.vm(vm) else {
        return Ok(true);
    };
    let Some(id) = archive.generation_ids()?.pop() else {
        return Ok(true);
    };
    let g = archive.generation(&id)?;
    let Some(t) = profile::parse_time(&g.profile.time) else {
        return Ok(true);
    };
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64);
    let age = SystemTime::now().duration_since(when).unwrap_or_default();
    // A little slack so that a daily timer that fires a few seconds early still runs.
    Ok(age.as_secs() + 300 >= interval)
}

/// Settings of one backup run.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The mode requested; each disk gets the one it can have (incr falls back to diff when
    /// no trusted tracker names its changes).
    pub mode: Mode,
    /// Block size for a VM's first backup; an error if it differs from an existing VM's.
    pub block_size: Option<u32>,
    /// Block size for a VM's first backup when none is given (from the config file).
    pub default_block_size: u32,
    /// zstd level for reverse diffs (0 stores blocks uncompressed).
    pub compression_level: i32,
    /// Where the disks come from (recorded with the generation).
    pub kind: SourceKind,
    /// The libvirt domain's XML, saved with the generation.
    pub domain_xml: Option<String>,
    /// The libvirt checkpoint made with this generation.
    pub checkpoint: Option<String>,
    /// That checkpoint's XML, saved with the generation (`checkpoint.xml`).
    pub checkpoint_xml: Option<String>,
    /// How consistent the disks are (libvirt VMs).
    pub consistency: Option<crate::archive::profile::Consistency>,
    /// Firmware and TPM state files, saved whole with the generation (libvirt VMs).
    pub state: Vec<crate::archive::state::StateFile>,
    /// The digest root each disk must end with (a replica's generation copies a source
    /// generation: any other root fails the run before it commits).
    pub expect_roots: Vec<(String, String)>,
    /// Prune as it goes (config `prune = "after-backup"`): once the generation is
    /// committed, apply this retention schedule in the same run and lock. A failed
    /// backup prunes nothing.
    pub prune_after: Option<Schedule>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            mode: Mode::Auto,
            block_size: None,
            default_block_size: DEFAULT_BLOCK_SIZE,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            kind: SourceKind::Image,
            domain_xml: None,
            checkpoint: None,
            checkpoint_xml: None,
            consistency: None,
            state: Vec::new(),
            expect_roots: Vec::new(),
            prune_after: None,
        }
    }
}

/// What a run made.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The VM.
    pub vm: String,
    /// The new generation's profile, as committed.
    pub generation: GenerationProfile,
    /// Lines describing what recovery did before the run.
    pub recovered: Vec<String>,
    /// Lines the user should read (a disk read whole, and why; damaged old blocks).
    pub warnings: Vec<String>,
    /// What pruning after the backup did ([`BackupOptions::prune_after`]), or why it
    /// failed: the generation is committed all the same, and nothing was removed that the
    /// schedule keeps.
    pub pruned: Option<std::result::Result<PruneReport, String>>,
}

impl BackupReport {
    /// Bytes read from the sources.
    pub fn read_bytes(&self) -> u64 {
        self.generation.disks.iter().map(|d| d.read_bytes).sum()
    }
    /// Bytes of blocks whose content changed.
    pub fn changed_bytes(&self) -> u64 {
        self.generation.disks.iter().map(|d| d.changed_bytes).sum()
    }
    /// Bytes the repository grew by.
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
    lock: VmLock,
}

impl BackupRun {
    /// Lock the VM, recover what an interrupted run left, and pick the new generation id.
    pub fn begin(repo: &Repository, vm: &str) -> Result<BackupRun> {
        BackupRun::begin_with(repo, vm, None)
    }

    /// [`BackupRun::begin`] for a copy of generation `id` of another repository, made at
    /// `time` (RFC 3339): the new generation gets that id and time. `id` must sort after
    /// every generation the VM has here, else the run does not begin (a usage error).
    pub fn begin_as(
        repo: &Repository,
        vm: &str,
        id: &GenerationId,
        time: &str,
    ) -> Result<BackupRun> {
        BackupRun::begin_with(repo, vm, Some((id, time)))
    }

    fn begin_with(
        repo: &Repository,
        vm: &str,
        given: Option<(&GenerationId, &str)>,
    ) -> Result<BackupRun> {
        let vm_dir = repo.vm_dir(vm)?;
        fsutil::create_dir(&vm_dir)?;
        let lock = VmLock::acquire(&vm_dir, vm, "backup")?;
        let recovered = txn::recover(&vm_dir)?;
        let existing = if names::vm_profile(&vm_dir).exists() {
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
        let (gen_id, start_time) = match given {
            None => (
                archive::new_generation_id(prev.as_ref().map(|g| &g.id)),
                profile::now_rfc3339(),
            ),
            Some((id, time)) => {
                if let Some(p) = prev.as_ref().filter(|p| p.id >= *id) {
                    return Err(Error::usage(format!(
                        "VM {vm}: generation {id} does not sort after the newest one here ({})",
                        p.id
                    )));
                }
                (id.clone(), time.to_string())
            }
        };
        Ok(BackupRun {
            vm: vm.to_string(),
            vm_dir,
            existing,
            prev,
            gen_id,
            recovered,
            started: Instant::now(),
            start_time,
            lock,
        })
    }

    /// The id the new generation will have: after every existing one's.
    pub fn generation_id(&self) -> &GenerationId {
        &self.gen_id
    }

    /// The newest generation when the run began (the one this run writes reverse diffs for),
    /// or `None` for a VM's first backup.
    pub fn previous(&self) -> Option<&Generation> {
        self.prev.as_ref()
    }

    /// The repository folder.
    pub fn repository(&self) -> &Path {
        self.vm_dir.parent().unwrap_or(Path::new("."))
    }

    /// One line per recovery of an interrupted command that [`begin`](Self::begin) performed.
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
        let new_dir = names::partial_dir(&self.vm_dir, &self.gen_id);
        let result = self
            .write_generation(&new_dir, disks, block_size, opts, progress)
            .and_then(|written| {
                expect_roots(&written.0, &opts.expect_roots, &new_dir).map(|()| written)
            })
            .and_then(|written| before_commit().map(|()| written))
            .and_then(|(gp, warnings)| {
                self.commit(txn, &new_dir, gp, block_size)
                    .map(|gp| (gp, warnings))
            });
        match result {
            Ok((generation, warnings)) => {
                let pruned = opts
                    .prune_after
                    .as_ref()
                    .map(|schedule| self.prune_after(schedule).map_err(|e| e.to_string()));
                Ok(BackupReport {
                    vm: self.vm.clone(),
                    generation,
                    recovered: self.recovered.clone(),
                    warnings,
                    pruned,
                })
            }
            Err(e) => {
                if let Err(undo) = txn::recover(&self.vm_dir) {
                    progress.warn(&format!("VM {}: the failed run could not be rolled back yet ({undo}); the next command will", self.vm));
                }
                Err(e)
            }
        }
    }

    /// Apply `schedule` to the VM under this run's lock, its new generation committed.
    fn prune_after(&self, schedule: &Schedule) -> Result<PruneReport> {
        let archive = VmArchive::open(self.vm_dir.clone(), &self.vm)?;
        prune_held(&archive, &self.lock, schedule, false, Vec::new())
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
        for (name, xml) in [
            (names::DOMAIN_XML, &opts.domain_xml),
            (names::CHECKPOINT_XML, &opts.checkpoint_xml),
        ] {
            if let Some(xml) = xml {
                let p = new_dir.join(name);
                let f = fsutil::create_new(&p)?;
                fsutil::write_at(&f, xml.as_bytes(), 0, &p)?;
                fsutil::sync_all(&f, &p)?;
            }
        }
        crate::archive::state::save(new_dir, &opts.state)?;
        let gp = GenerationProfile {
            format: PROFILE_VERSION,
            id: self.gen_id.clone(),
            vm: self.vm.clone(),
            time: self.start_time.clone(),
            mode,
            duration_secs: 0.0,
            protected: false,
            block_size,
            kind: opts.kind,
            checkpoint: opts.checkpoint.clone(),
            consistency: opts.consistency,
            disks: records,
            state: opts.state.iter().map(|f| f.record.clone()).collect(),
        };
        Ok((gp, warnings))
    }

    fn commit(
        &self,
        mut txn: Txn,
        new_dir: &Path,
        mut gp: GenerationProfile,
        block_size: u32,
    ) -> Result<GenerationProfile> {
        gp.duration_secs = (self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        profile::store(
            &names::generation_profile(new_dir),
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
                host: None,
            };
            profile::store(&names::vm_profile(&self.vm_dir), "vmkeep VM profile", &vp)?;
        }
        txn.state = "commit".into();
        txn.store(&self.vm_dir)?;
        txn::roll_forward_backup(&self.vm_dir, &txn)?;
        Txn::clear(&self.vm_dir)?;
        Ok(gp)
    }
}

/// Every disk of `expected` ended with its digest root in `gp`, and `gp` has no other
/// disk (nothing when `expected` is empty).
fn expect_roots(gp: &GenerationProfile, expected: &[(String, String)], dir: &Path) -> Result<()> {
    if expected.is_empty() {
        return Ok(());
    }
    let got: Vec<(&str, &str)> = gp
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.digest_root.as_str()))
        .collect();
    let want: Vec<(&str, &str)> = expected
        .iter()
        .map(|(n, r)| (n.as_str(), r.as_str()))
        .collect();
    if got != want {
        return Err(Error::corrupt(
            dir,
            format!("the copy of generation {} does not have the digest roots of its source (nothing committed)", gp.id),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::rdiff::{RdiffReader, REC_ZSTD};
    use crate::progress::NoProgress;
    use crate::source::file::FileSource;

    /// Back up `bytes` as disk vda of VM vm at zstd level `level`.
    fn backup_bytes(repo: &Repository, disk: &Path, bytes: &[u8], level: i32) -> BackupReport {
        std::fs::write(disk, bytes).unwrap();
        let input = DiskInput::new("vda", Box::new(FileSource::open(disk).unwrap()));
        let opts = BackupOptions {
            block_size: Some(4096),
            compression_level: level,
            ..BackupOptions::default()
        };
        BackupRun::begin(repo, "vm")
            .unwrap()
            .execute(vec![input], &opts, &NoProgress)
            .unwrap()
    }

    /// Whether the reverse diff of the first generation after a shrink of a compressible
    /// disk, made at `level`, holds compressed records.
    fn shrink_rdiff_is_compressed(level: i32) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo")).unwrap();
        let disk = dir.path().join("d.raw");
        let text: Vec<u8> = b"every block of this disk compresses well. "
            .iter()
            .copied()
            .cycle()
            .take(16 * 4096)
            .collect();
        let first = backup_bytes(&repo, &disk, &text, level);
        // The same first block, the other fifteen cut off.
        backup_bytes(&repo, &disk, &text[..4096], level);
        let g = repo
            .vm("vm")
            .unwrap()
            .generation(&first.generation.id)
            .unwrap();
        let r = RdiffReader::open(&g.rdiff_path("vda")).unwrap();
        assert_eq!(r.len(), 15);
        (0..r.len()).any(|i| r.read(i).unwrap().flags & REC_ZSTD != 0)
    }

    #[test]
    fn a_shrink_journals_the_cut_off_tail_at_the_runs_level() {
        // Level 0 stores every record as it is, the cut-off tail included.
        assert!(!shrink_rdiff_is_compressed(0));
        assert!(shrink_rdiff_is_compressed(3));
    }

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

    #[test]
    fn an_earlier_layer_is_the_same_disk_only_by_its_recorded_origin() {
        let below = ["/i/a.qcow2".to_string(), "/i/base.qcow2".to_string()];
        assert!(read_earlier_layer(
            &record(Some("/i/base.qcow2"), None),
            &below
        ));
        assert!(!read_earlier_layer(
            &record(Some("/i/other.qcow2"), None),
            &below
        ));
        assert!(!read_earlier_layer(
            &record(Some("/i/base.qcow2"), None),
            &[]
        ));
        // A profile from before origins proves nothing about the chain.
        assert!(!read_earlier_layer(&record(None, None), &below));
    }
}
