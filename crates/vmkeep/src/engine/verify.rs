//! `verify`: prove that a disk (a restored copy, a live disk, any source a backup can
//! read) holds exactly one generation's bytes, without trusting whatever wrote it.
//!
//! The generation's digests are proven first ([`DiskView::open`]: header ids and the
//! digest root), then every block of the disk is hashed and compared with its digest.
//! No archive data is read, only digests: a restore that wrote wrong bytes cannot hide
//! behind the archive it came from. Blocks that the source reports as holes or zero
//! extents are zero without being read.

use serde::Serialize;

use crate::archive::digest::{block_digest, Digest, ZERO_DIGEST};
use crate::archive::format::{block_count, DIGEST_LEN};
use crate::archive::view::{DiskView, Loc, Segment};
use crate::archive::GenerationId;
use crate::engine::pipeline;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::source::{BlockSource, ExtentKind};

/// What `verify` found for one disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskVerify {
    /// The disk of the generation compared.
    pub disk: String,
    /// What was verified, as the source describes itself (a path or URI).
    pub source: String,
    /// The disk's size at the generation.
    pub size: u64,
    /// The size of what was verified.
    pub source_size: u64,
    /// Bytes read from the source (holes and zero extents are not read).
    pub read_bytes: u64,
    /// Byte ranges that differ from the generation, coalesced, in order (a size
    /// difference is the range between the two sizes).
    pub differing: Vec<(u64, u64)>,
}

impl DiskVerify {
    /// Whether the source holds exactly the generation's bytes: same size, no differing range.
    pub fn ok(&self) -> bool {
        self.differing.is_empty()
    }
}

/// Reads at most this much of the source per job.
const CHUNK: u64 = 4 << 20;
/// Zero blocks compared per job.
const ZERO_JOB_BLOCKS: u64 = 1 << 16;

enum Job {
    /// Blocks `[start, end)` read from the source.
    Read { start: u64, end: u64 },
    /// Blocks `[start, end)` that the source says read as zeros.
    Zero { start: u64, end: u64 },
}

/// The digests of the generation, handed out in block order.
struct Expected<'a> {
    view: &'a DiskView,
    segments: Vec<Segment>,
    i: usize,
}

impl Expected<'_> {
    /// The generation's digests of blocks `[s, e)` (called with increasing ranges).
    fn fill(&mut self, s: u64, e: u64, out: &mut Vec<Digest>) -> Result<()> {
        out.clear();
        let mut b = s;
        let mut buf = Vec::new();
        while b < e {
            while self.segments[self.i].end <= b {
                self.i += 1;
            }
            let seg = self.segments[self.i];
            let to = seg.end.min(e);
            match seg.loc {
                Loc::Zero => out.extend((b..to).map(|_| ZERO_DIGEST)),
                Loc::Image => {
                    buf.resize((to - b) as usize * DIGEST_LEN, 0);
                    self.view.image_digests(b, &mut buf)?;
                    out.extend(
                        buf.chunks_exact(DIGEST_LEN)
                            .map(|c| <Digest>::try_from(c).expect("32")),
                    );
                }
                Loc::Record { chain, rec } => {
                    out.push(self.view.chain()[chain as usize].record_digest(rec as usize)?)
                }
            }
            b = to;
        }
        Ok(())
    }
}

/// Compare `source` with the generation `view` reads (opened with [`DiskView::open`], so
/// its digests are proven). Differences are returned, not raised: only a failure to read
/// either side is an error.
pub fn verify_disk(
    view: &DiskView,
    source: &dyn BlockSource,
    progress: &dyn Progress,
) -> Result<DiskVerify> {
    let bs = view.block_size as u64;
    let src_size = source.size();
    let shared = src_size.min(view.size);
    // Blocks compared: those that start below the shorter size.
    let blocks = block_count(shared, view.block_size);
    let mut report = DiskVerify {
        disk: view.disk.clone(),
        source: source.describe(),
        size: view.size,
        source_size: src_size,
        read_bytes: 0,
        differing: Vec::new(),
    };
    let task = progress.task(&view.disk, shared);
    let per_chunk = (CHUNK / bs).max(1);
    // Planner: source extents decide what is read; a block partly in a zero extent is read.
    let mut pos = 0u64; // next block to plan
    let mut extents: std::collections::VecDeque<(u64, u64, ExtentKind)> = Default::default();
    let next_job = || -> Result<Option<Job>> {
        if pos >= blocks {
            return Ok(None);
        }
        let off = pos * bs;
        while extents.front().is_some_and(|e| e.1 <= off) {
            extents.pop_front();
        }
        if extents.front().is_none_or(|e| e.0 > off) {
            extents.clear();
            for e in source.extents(off, shared - off)? {
                extents.push_back((e.offset, e.offset + e.length, e.kind));
            }
            if extents.front().is_none_or(|e| e.0 > off || e.1 <= off) {
                // Nothing said about `off`: read it.
                extents.clear();
                extents.push_back((off, (off + CHUNK).min(shared), ExtentKind::Data));
            }
        }
        let &(_, end, kind) = extents.front().expect("an extent covers off");
        let end_block = if end >= shared {
            blocks
        } else {
            end / bs // the block holding `end` is only partly in this extent
        };
        let job = if kind == ExtentKind::Zero && end_block > pos {
            let e = end_block.min(pos + ZERO_JOB_BLOCKS);
            Job::Zero { start: pos, end: e }
        } else {
            let e = end.div_ceil(bs).clamp(pos + 1, pos + per_chunk).min(blocks);
            Job::Read { start: pos, end: e }
        };
        pos = match job {
            Job::Read { end, .. } | Job::Zero { end, .. } => end,
        };
        Ok(Some(job))
    };
    // The generation's block lengths, clipped to what the source has.
    let span = |b: u64| (b * bs, ((b + 1) * bs).min(view.size));
    let work = |job: Job| -> Result<(u64, u64, Option<Vec<Digest>>, u64)> {
        match job {
            Job::Zero { start, end } => Ok((start, end, None, 0)),
            Job::Read { start, end } => {
                let from = start * bs;
                let to = span(end - 1).1;
                let have = to.min(src_size) - from;
                let mut buf = vec![0u8; (to - from) as usize];
                source.read_at(&mut buf[..have as usize], from)?;
                let digests = (start..end)
                    .map(|b| {
                        let (s, e) = span(b);
                        block_digest(&buf[(s - from) as usize..(e - from) as usize])
                    })
                    .collect();
                Ok((start, end, Some(digests), have))
            }
        }
    };
    let mut expected = Expected {
        view,
        segments: view.segments(),
        i: 0,
    };
    let mut want = Vec::new();
    let differing = &mut report.differing;
    let read_bytes = &mut report.read_bytes;
    let sink = |(start, end, got, read): (u64, u64, Option<Vec<Digest>>, u64)| -> Result<()> {
        expected.fill(start, end, &mut want)?;
        for (i, w) in want.iter().enumerate() {
            let g = got.as_ref().map_or(&ZERO_DIGEST, |g| &g[i]);
            if g != w {
                let (s, e) = span(start + i as u64);
                let e = e.min(shared);
                match differing.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => differing.push((s, e)),
                }
            }
        }
        *read_bytes += read;
        task.advance(span(end - 1).1.min(shared) - start * bs);
        Ok(())
    };
    let workers = crate::engine::cpu_threads().min(source.parallelism().max(1));
    pipeline::ordered(workers, workers * 3, next_job, work, sink)?;
    task.finish();
    if src_size != view.size {
        let range = (shared, src_size.max(view.size));
        match report.differing.last_mut() {
            Some(last) if last.1 == range.0 => last.1 = range.1,
            _ => report.differing.push(range),
        }
    }
    Ok(report)
}

/// The error for a `--disk NAME` that the generation does not have.
pub fn no_such_disk(vm: &str, generation: &str, disk: &str, have: &[&str]) -> Error {
    Error::usage(format!(
        "generation {generation} of VM {vm} has no disk {disk:?} (it has: {})",
        have.join(", ")
    ))
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The generation (its id).
    pub generation: GenerationId,
    /// One result per disk, in the order given.
    pub disks: Vec<DiskVerify>,
}

impl VerifyReport {
    /// Whether every disk is identical to the generation's.
    pub fn ok(&self) -> bool {
        self.disks.iter().all(DiskVerify::ok)
    }
}

/// Opens a source spec for [`verify`] (the caller's rules for sources apply).
pub type OpenSource<'a, E> = dyn FnMut(&str) -> std::result::Result<Box<dyn BlockSource>, E> + 'a;

/// `vmkeep verify`: prove that each `(disk, source)` of `disks` holds disk `disk` of
/// generation `rev` of `vm`. Every name is checked, and every disk's digests proven,
/// before anything is read; `open` opens a source spec (with the rules a backup applies);
/// `on_disk` hears of each disk as it is done (the generation's id, the source spec, the
/// result).
pub fn verify<E: From<Error>>(
    repo: &crate::archive::Repository,
    vm: &str,
    rev: &str,
    disks: &[(String, String)],
    open: &mut OpenSource<'_, E>,
    progress: &dyn Progress,
    on_disk: &mut dyn FnMut(&str, &str, &DiskVerify),
) -> std::result::Result<VerifyReport, E> {
    let archive = repo.vm(vm)?;
    let chosen = archive.select(rev)?;
    let id = chosen.id().clone();
    let have = chosen.disk_names();
    let mut jobs: Vec<(&str, &str, DiskView)> = Vec::new();
    for (name, path) in disks {
        if !have.contains(&name.as_str()) {
            return Err(no_such_disk(vm, &id, name, &have).into());
        }
        if jobs.iter().any(|(n, _, _)| n == name) {
            return Err(Error::usage(format!("--disk {name} given twice")).into());
        }
        jobs.push((name, path, chosen.view(name)?));
    }
    let mut results = Vec::new();
    for (_, path, view) in &jobs {
        let source = open(path)?;
        let r = verify_disk(view, source.as_ref(), progress)?;
        on_disk(&id, path, &r);
        results.push(r);
    }
    Ok(VerifyReport {
        generation: id,
        disks: results,
    })
}
