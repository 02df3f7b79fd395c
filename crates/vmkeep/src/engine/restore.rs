//! Restore: write one disk of one generation to a target, verifying every block.
//!
//! [`restore_disk`] is the whole of `vmkeep restore --to` (and `merge`): pick the disk,
//! prove its digests, open the target, write. [`restore`] is the pipeline underneath, also
//! used by `restore --as-vm` ([`crate::engine::recover`]) for each disk.

use std::collections::VecDeque;

use crate::archive::digest::ZERO_DIGEST;
use crate::archive::format::{block_len, DIGEST_LEN};
use crate::archive::view::{DiskView, Loc, Segment};
use crate::archive::{GenerationId, Repository};
use crate::bufpool::{BufPool, PoolBuf};
use crate::engine::pipeline;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::target::{Destination, Target};

/// What `vmkeep restore --to` (or `merge`) asks for.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The VM.
    pub vm: String,
    /// The generation: an id or unique prefix, N (0 = newest), or `latest`.
    pub rev: String,
    /// The disk; may be left out when the generation has one disk.
    pub disk: Option<String>,
    /// Where the disk goes.
    pub to: Destination,
    /// Write what can be read where blocks are damaged, and list the ranges.
    pub ignore_damage: bool,
}

/// What [`restore_disk`] did.
#[derive(Debug)]
pub struct DiskRestore {
    /// The generation restored (its id).
    pub generation: GenerationId,
    /// The disk restored.
    pub disk: String,
    /// The restore's own report.
    pub report: RestoreReport,
    /// The failed proof of a view opened to ignore damage (every block was then read and
    /// checked against its own digest); `None` when the digests were proven.
    pub unproven: Option<Error>,
}

impl DiskRestore {
    /// Whether anything was unproven or damaged (the CLI's exit 3).
    pub fn damaged(&self) -> bool {
        self.unproven.is_some() || !self.report.damaged.is_empty()
    }
}

/// `vmkeep restore --to`: disk `opts.disk` (or the only disk) of the generation, its
/// digests proven before anything is written, to `opts.to`.
pub fn restore_disk(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<DiskRestore> {
    let (view, unproven) = open_view(
        repo,
        &opts.vm,
        &opts.rev,
        opts.disk.as_deref(),
        opts.ignore_damage,
    )?;
    let report = restore_to(
        &view,
        &opts.to,
        opts.ignore_damage,
        unproven.as_ref(),
        progress,
    )?;
    Ok(DiskRestore {
        generation: view.generation.clone(),
        disk: view.disk.clone(),
        report,
        unproven,
    })
}

/// Open disk `disk` (or the only disk) of generation `rev` of `vm`, its digests proven.
/// With `ignore_damage`, a failed proof comes back beside a view that trusts no zero
/// digest instead of failing (see [`DiskView::open_ignoring_damage`]).
pub fn open_view(
    repo: &Repository,
    vm: &str,
    rev: &str,
    disk: Option<&str>,
    ignore_damage: bool,
) -> Result<(DiskView, Option<Error>)> {
    let archive = repo.vm(vm)?;
    let chosen = archive.select(rev)?;
    let disk = match disk {
        Some(d) => d.to_string(),
        None => match chosen.disk_names().as_slice() {
            [only] => only.to_string(),
            many => {
                return Err(Error::usage(format!(
                    "VM {vm} has several disks; name one with --disk ({})",
                    many.join(", ")
                )))
            }
        },
    };
    chosen.view_checked(&disk, ignore_damage)
}

/// Write `view` to `to`. `unproven` is the failed proof of a view opened to ignore damage
/// (the restore then reads and checks every block, and lists what fails); `None` for a
/// proven view, whose damaged blocks (with `ignore_damage`) are listed too.
pub fn restore_to(
    view: &DiskView,
    to: &Destination,
    ignore_damage: bool,
    unproven: Option<&Error>,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let target = crate::target::open(to, view.size)?;
    if let Some(e) = unproven {
        progress.warn(&format!(
            "{e}; every block is read and checked against its own digest, and those that fail are listed"
        ));
    }
    restore(view, target, ignore_damage, progress)
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// The disk's size.
    pub size: u64,
    /// Bytes of data written (holes excluded).
    pub written: u64,
    /// Byte ranges that failed their digests (only with `ignore_damage`).
    pub damaged: Vec<(u64, u64)>,
}

/// One piece of work for the restore pipeline.
enum Job {
    /// Image blocks `[start, end)`, none of them zero, with their digests.
    Image {
        start: u64,
        end: u64,
        digests: Vec<u8>,
    },
    Zero {
        start: u64,
        end: u64,
    },
    Record {
        block: u64,
        chain: u32,
        rec: u32,
    },
}

/// A piece ready to write: blocks from `start`, their bytes (`None`: all zero), which
/// of them are zero (records only), which failed their digests.
struct Piece {
    start: u64,
    end: u64,
    data: Option<PoolBuf>,
    zero: bool,
    bad: Vec<u64>,
}

const CHUNK: u64 = 4 << 20;
/// Digests read at once while planning (2 MiB of them).
const DIGEST_WINDOW: u64 = 1 << 16;

/// Write `view` to `target`. Damage fails the restore (and removes a partial file target)
/// unless `ignore_damage`, which writes what could be read and lists the damaged ranges.
pub fn restore(
    view: &DiskView,
    target: Box<dyn Target>,
    ignore_damage: bool,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let mut target = target;
    let result = run(view, target.as_mut(), ignore_damage, progress);
    match result {
        Ok(report) => {
            target.finish()?;
            Ok(report)
        }
        Err(e) => {
            target.abort();
            Err(e)
        }
    }
}

/// Hands out the jobs in disk order. Image blocks are planned from their digests, read
/// a window at a time (and not at all where the digest file has a hole): zero blocks
/// become zero jobs and are never read, the rest become reads of at most [`CHUNK`]
/// bytes. The planner stays [`READ_AHEAD`] bytes of the disk ahead of the job it hands
/// out and prefetches what the jobs in between will read (image runs, reverse-diff
/// records), so that the reads between the records of an older generation, small and
/// scattered, are in flight long before a worker needs them.
struct Planner<'a> {
    view: &'a DiskView,
    segments: std::vec::IntoIter<Segment>,
    queue: VecDeque<Job>,
    /// Jobs at the front of the queue whose reads have been prefetched.
    prefetched: usize,
    /// A run of zero blocks not handed out yet (adjacent ones are merged).
    zero: Option<(u64, u64)>,
    /// The image segment being planned, a digest window at a time.
    image: Option<ImagePart>,
    per_chunk: u64,
    ahead_blocks: u64,
}

/// What is left of an image segment: from `pos` to `end`, with the block ranges where
/// its digests may be non-zero.
struct ImagePart {
    pos: u64,
    end: u64,
    ranges: VecDeque<(u64, u64)>,
}

/// How far ahead of the job handed out the planner plans and prefetches.
const READ_AHEAD: u64 = 32 << 20;

fn job_blocks(job: &Job) -> (u64, u64) {
    match *job {
        Job::Image { start, end, .. } | Job::Zero { start, end } => (start, end),
        Job::Record { block, .. } => (block, block + 1),
    }
}

impl<'a> Planner<'a> {
    fn new(view: &'a DiskView) -> Self {
        let bs = view.block_size as u64;
        Planner {
            view,
            segments: view.segments().into_iter(),
            queue: VecDeque::new(),
            prefetched: 0,
            zero: None,
            image: None,
            per_chunk: (CHUNK / bs).max(1),
            ahead_blocks: (READ_AHEAD / bs).max(1),
        }
    }

    fn next(&mut self) -> Result<Option<Job>> {
        loop {
            let enough = match (self.queue.front(), self.queue.back()) {
                (Some(f), Some(b)) => job_blocks(b).1 >= job_blocks(f).0 + self.ahead_blocks,
                _ => false,
            };
            if enough || !self.plan_more()? {
                break;
            }
        }
        for job in self.queue.iter().skip(self.prefetched) {
            match *job {
                Job::Image { start, end, .. } => self.view.prefetch_image(start, end),
                Job::Record { chain, rec, .. } => self.view.prefetch_record(chain, rec),
                Job::Zero { .. } => {}
            }
        }
        self.prefetched = self.queue.len();
        let job = self.queue.pop_front();
        if job.is_some() {
            self.prefetched -= 1;
        }
        Ok(job)
    }

    /// Plan one more step (a segment, or a digest window of an image segment); false
    /// when everything is planned.
    fn plan_more(&mut self) -> Result<bool> {
        if let Some(part) = &mut self.image {
            match part.ranges.front().copied() {
                None => {
                    let (pos, end) = (part.pos, part.end);
                    self.image = None;
                    if pos < end {
                        self.zero(pos, end);
                    }
                }
                Some((a, _)) if a > part.pos => {
                    let pos = part.pos;
                    part.pos = a;
                    self.zero(pos, a);
                }
                Some((a, b)) => {
                    let we = (a + DIGEST_WINDOW).min(b);
                    if we == b {
                        part.ranges.pop_front();
                    } else {
                        part.ranges[0].0 = we;
                    }
                    part.pos = we;
                    let mut digests = vec![0u8; ((we - a) as usize) * DIGEST_LEN];
                    self.view.image_digests(a, &mut digests)?;
                    self.window(a, &digests);
                }
            }
            return Ok(true);
        }
        let Some(seg) = self.segments.next() else {
            self.end_zero();
            return Ok(false);
        };
        match seg.loc {
            Loc::Zero => self.zero(seg.start, seg.end),
            Loc::Record { chain, rec } => {
                self.end_zero();
                self.queue.push_back(Job::Record {
                    block: seg.start,
                    chain,
                    rec,
                });
            }
            Loc::Image => {
                let ranges = self.view.image_digest_ranges(seg.start, seg.end)?;
                self.image = Some(ImagePart {
                    pos: seg.start,
                    end: seg.end,
                    ranges: ranges.into(),
                });
            }
        }
        Ok(true)
    }

    fn zero(&mut self, start: u64, end: u64) {
        match &mut self.zero {
            Some(z) if z.1 == start => z.1 = end,
            _ => {
                self.end_zero();
                self.zero = Some((start, end));
            }
        }
    }

    fn end_zero(&mut self) {
        if let Some((start, end)) = self.zero.take() {
            self.queue.push_back(Job::Zero { start, end });
        }
    }

    /// Plan blocks from `first`, whose digests are `digests`.
    fn window(&mut self, first: u64, digests: &[u8]) {
        let n = (digests.len() / DIGEST_LEN) as u64;
        // An untrusted view (a failed proof under --ignore-damage) reads every block.
        let trusted = self.view.trusted();
        let is_zero = |i: u64| {
            let i = i as usize;
            trusted && digests[i * DIGEST_LEN..(i + 1) * DIGEST_LEN] == ZERO_DIGEST
        };
        let mut i = 0;
        while i < n {
            let mut j = i + 1;
            if is_zero(i) {
                while j < n && is_zero(j) {
                    j += 1;
                }
                self.zero(first + i, first + j);
            } else {
                while j < n && j - i < self.per_chunk && !is_zero(j) {
                    j += 1;
                }
                self.end_zero();
                self.queue.push_back(Job::Image {
                    start: first + i,
                    end: first + j,
                    digests: digests[i as usize * DIGEST_LEN..j as usize * DIGEST_LEN].to_vec(),
                });
            }
            i = j;
        }
    }
}

fn run(
    view: &DiskView,
    target: &mut dyn Target,
    ignore_damage: bool,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let bs = view.block_size as u64;
    let mut report = RestoreReport {
        size: view.size,
        ..Default::default()
    };
    let task = progress.task(&view.disk, view.size);
    view.planned_reads();
    let mut planner = Planner::new(view);
    let workers = crate::engine::cpu_threads();
    let window = workers * 3;
    let pool = BufPool::new(window + 2);
    let work = |job: Job| -> Result<Piece> {
        match job {
            Job::Image {
                start,
                end,
                digests,
            } => {
                let len = ((end * bs).min(view.size) - start * bs) as usize;
                let mut data = pool.take(len);
                let bad = view.read_image_verified(start, end, &digests, &mut data)?;
                Ok(Piece {
                    start,
                    end,
                    data: Some(data),
                    zero: false,
                    bad,
                })
            }
            Job::Zero { start, end } => Ok(Piece {
                start,
                end,
                data: None,
                zero: true,
                bad: vec![],
            }),
            Job::Record { block, chain, rec } => {
                let blk = view.read_record(chain, rec)?;
                let bad = if blk.ok { vec![] } else { vec![block] };
                // A bad block is written as read, whatever its digest claimed.
                let zero = blk.ok && blk.digest == ZERO_DIGEST;
                Ok(Piece {
                    start: block,
                    end: block + 1,
                    data: Some(PoolBuf::adopt(blk.data, None)),
                    zero,
                    bad,
                })
            }
        }
    };
    let sink = |p: Piece| -> Result<()> {
        for &b in &p.bad {
            let range = (
                b * bs,
                b * bs + block_len(b, view.size, view.block_size) as u64,
            );
            if !ignore_damage {
                return Err(view.block_damage(format!(
                    "bytes {}..{} fail their digest; the restore was stopped (use --ignore-damage to write what can be read)",
                    range.0, range.1
                )));
            }
            progress.warn(&format!(
                "disk {}: bytes {}..{} are damaged",
                view.disk, range.0, range.1
            ));
            match report.damaged.last_mut() {
                Some(last) if last.1 == range.0 => last.1 = range.1,
                _ => report.damaged.push(range),
            }
        }
        let from = p.start * bs;
        let to = (p.end * bs).min(view.size);
        match &p.data {
            Some(data) if !p.zero => {
                target.write(from, data)?;
                report.written += data.len() as u64;
            }
            _ => target.zero(from, to - from)?,
        }
        task.advance(to - from);
        crate::fault::pause("restore-wrote");
        Ok(())
    };
    pipeline::ordered(workers, window, || planner.next(), work, sink)?;
    task.finish();
    Ok(report)
}
