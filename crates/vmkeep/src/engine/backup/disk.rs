//! One disk of a run ([`RunCtx`]): the trust and mode decision, the block ranges, the
//! sink, the pipeline, the disk's record; and a disk the new generation no longer has.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::examine::{old_record, Done, Examiner};
use super::plan::{block_ranges, hint, prefetch_ranges, Job, Planner};
use super::sink::{Sink, SinkTarget};
use super::{read_earlier_layer, source_changed, DiskInput};
use crate::archive::digest::{Digest, DigestHeader, DigestReader, DigestWriter, ZERO_DIGEST};
use crate::archive::format::{valid_disk_size, DIGEST_LEN};
use crate::archive::profile::{DiskRecord, GenerationMode};
use crate::archive::rdiff::{RdiffHeader, RdiffWriter, COMPRESSION_ZSTD, FLAG_BASE};
use crate::archive::{self, names, Generation};
use crate::bufpool::BufPool;
use crate::engine::{pipeline, Mode};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::{Progress, Task};
use crate::source::{BlockSource, SourceIdentity};
use crate::tuning::cpu_threads;

/// What every disk of a run shares.
pub(super) struct RunCtx<'a> {
    pub(super) block_size: u32,
    pub(super) level: i32,
    pub(super) new_dir: &'a Path,
    pub(super) prev: Option<&'a Generation>,
    pub(super) gen: [u8; 16],
    pub(super) progress: &'a dyn Progress,
}

/// What the trust and mode stage decided for one disk.
struct Choice {
    mode: GenerationMode,
    /// The tracker's changed byte ranges, when they are trusted.
    changed: Option<Vec<(u64, u64)>>,
    warnings: Vec<String>,
}

/// The previous generation's files of one disk.
pub(super) struct OldDisk {
    pub(super) image: File,
    pub(super) image_path: PathBuf,
    pub(super) digest: DigestReader,
    pub(super) size: u64,
    pub(super) blocks: u64,
}

impl OldDisk {
    pub(super) fn digest_of(&self, b: u64) -> Result<Digest> {
        let mut d = [0u8; DIGEST_LEN];
        self.digest.read_range(b, &mut d)?;
        Ok(d)
    }
}

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

    /// Back up one disk into the new generation: decide what to trust and which mode
    /// ([`RunCtx::choose`]), which blocks to examine ([`block_ranges`]), open the sink
    /// ([`RunCtx::open_sink`]), run the pipeline ([`RunCtx::copy`]), and record the disk.
    pub(super) fn disk(
        &self,
        mut input: DiskInput,
        requested: Mode,
    ) -> Result<(DiskRecord, Vec<String>)> {
        let bs = self.block_size;
        let size = input.source.size();
        if !valid_disk_size(size) {
            return Err(Error::source(
                input.source.describe(),
                format!("reports a size of {size} bytes, more than vmkeep handles"),
            ));
        }
        let old = self.open_old(&input.name, true)?;
        let describe = input.source.describe();
        let identity = input
            .identity
            .clone()
            .unwrap_or_else(|| SourceIdentity::named(&describe));
        let choice = self.choose(&mut input, old.as_ref(), requested, &identity, &describe);
        let mut warnings = choice.warnings;
        let ranges = block_ranges(
            choice.mode,
            old.as_ref(),
            choice.changed.as_deref(),
            input.source.as_ref(),
            bs,
            size,
        )?;
        let examined: u64 = ranges
            .iter()
            .map(|&(a, b)| (b - a) * bs as u64)
            .sum::<u64>()
            .min(size);
        let task = self.progress.task(&input.name, examined);

        let image_path = names::image_file(self.new_dir, &input.name);
        let digest_path = names::digest_file(self.new_dir, &input.name);
        let mut sink =
            self.open_sink(&input.name, old.as_ref(), size, &image_path, &digest_path)?;
        let read_bytes = self.copy(
            input.source.as_ref(),
            old.as_ref(),
            &ranges,
            choice.mode,
            &mut sink,
            &*task,
        )?;
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
            mode: choice.mode,
            source: describe,
            read_bytes,
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

    /// The trust and mode stage: a tracker's changes are trusted only for the source the
    /// newest generation read; then the mode `requested` becomes the one this disk can
    /// have, with a line saying why when incr is not possible.
    fn choose(
        &self,
        input: &mut DiskInput,
        old: Option<&OldDisk>,
        requested: Mode,
        identity: &SourceIdentity,
        describe: &str,
    ) -> Choice {
        let mut warnings = Vec::new();
        // A tracker's changes are trusted only for the source the newest generation read.
        let mut changed = input.changed.take();
        let mut untracked = input.untracked_reason.clone();
        let mut say_why = input.expects_tracking;
        let recorded = self.prev.and_then(|p| p.profile.disk(&input.name));
        if let (Some(rec), Some(_), Some(_)) = (recorded, &old, &changed) {
            // A layer an external snapshot has put the source over since.
            let earlier = read_earlier_layer(rec, &input.earlier_origins);
            let changed_source = match earlier {
                true => None,
                false => source_changed(rec, identity, describe, !input.user_list),
            };
            if let Some(why) = changed_source {
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
        Choice {
            mode,
            changed,
            warnings,
        }
    }

    /// The sink stage: a new sparse image, or the previous image updated in place behind
    /// its journal (the previous generation's new reverse diff).
    fn open_sink<'o>(
        &self,
        name: &str,
        old: Option<&'o OldDisk>,
        size: u64,
        image_path: &Path,
        digest_path: &Path,
    ) -> Result<Sink<'o>> {
        let bs = self.block_size;
        let dh = DigestHeader {
            block_size: bs,
            disk_size: size,
            generation: self.gen,
        };
        let sink = match old {
            Some(o) => {
                let prev = self.prev.expect("old disk implies a previous generation");
                let journal_path = prev.journal_path(name);
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
                let digests = DigestWriter::create_from(digest_path, dh, &o.digest)?;
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
                    self.level,
                )
            }
            None => {
                let image = fsutil::create_new(image_path)?;
                fsutil::set_len(&image, size, image_path)?;
                let digests = DigestWriter::create(digest_path, dh)?;
                Sink::new(
                    SinkTarget::Fresh {
                        image,
                        path: image_path.to_path_buf(),
                    },
                    digests,
                    bs,
                    size,
                    self.level,
                )
            }
        };
        Ok(sink)
    }

    /// The pipeline stage: plan jobs over `ranges`, examine them on the workers, and feed
    /// the results to `sink` in order. Returns the bytes read from the source.
    fn copy(
        &self,
        source: &dyn BlockSource,
        old: Option<&OldDisk>,
        ranges: &[(u64, u64)],
        mode: GenerationMode,
        sink: &mut Sink<'_>,
        task: &dyn Task,
    ) -> Result<u64> {
        let bs = self.block_size;
        let size = source.size();
        let read_bytes = AtomicU64::new(0);
        let mut planner = Planner::new(source, ranges, bs, size);
        let workers = cpu_threads().max(source.parallelism());
        let window = workers + 2 * cpu_threads();
        // Every buffer in flight comes from here and returns here.
        let pool = BufPool::new(window + 2);
        let examiner = Examiner {
            source,
            old,
            bs,
            size,
            level: self.level,
            full_compare: mode == GenerationMode::Full,
            pool: &pool,
        };
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
                    hint(j, source, old, bs, size, false);
                }
            }
            Ok(job)
        };
        let work = |job: Job| -> Result<Done> {
            let done = examiner.examine(job)?;
            read_bytes.fetch_add(done.read_bytes, Ordering::Relaxed);
            task.advance(done.count * bs as u64);
            Ok(done)
        };
        std::thread::scope(|s| {
            if incr {
                let (planned, stop) = (&planned, &stop);
                s.spawn(move || prefetch_ranges(ranges, source, old, bs, size, planned, stop));
            }
            let result = pipeline::ordered(workers, window, &mut next_job, work, |done| {
                sink.accept(done)
            });
            stop.store(true, Ordering::Relaxed);
            result
        })?;
        Ok(read_bytes.load(Ordering::Relaxed))
    }

    /// A disk the new generation no longer has: its whole last image becomes the
    /// previous generation's reverse diff (a base of the chain).
    pub(super) fn retire_disk(&self, name: &str) -> Result<()> {
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
        let mut w = RdiffWriter::create(&prev.journal_path(name), rh)?;
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
