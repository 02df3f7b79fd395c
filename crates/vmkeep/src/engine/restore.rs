//! Restore: write one disk of one generation to a target, verifying every block.

use crate::archive::digest::ZERO_DIGEST;
use crate::archive::format::block_len;
use crate::engine::pipeline;
use crate::engine::reader::{DiskView, Loc};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::progress::Progress;
use crate::target::Target;

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub size: u64,
    /// Bytes of data written (holes excluded).
    pub written: u64,
    /// Byte ranges that failed their digests (only with `ignore_damage`).
    pub damaged: Vec<(u64, u64)>,
}

/// One piece of work for the restore pipeline.
enum Job {
    Image { start: u64, end: u64 },
    Zero { start: u64, end: u64 },
    Record { block: u64, chain: u32, rec: u32 },
}

/// A piece ready to write: blocks from `start`, their bytes, which are zero, which bad.
struct Piece {
    start: u64,
    end: u64,
    data: Option<Vec<u8>>,
    zero: Vec<bool>,
    bad: Vec<u64>,
}

const CHUNK: u64 = 4 << 20;

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

fn jobs(view: &DiskView) -> Vec<Job> {
    let per_chunk = (CHUNK / view.block_size as u64).max(1);
    let mut out = Vec::new();
    for seg in view.segments() {
        match seg.loc {
            Loc::Image => {
                let mut s = seg.start;
                while s < seg.end {
                    let e = (s + per_chunk).min(seg.end);
                    out.push(Job::Image { start: s, end: e });
                    s = e;
                }
            }
            Loc::Zero => out.push(Job::Zero {
                start: seg.start,
                end: seg.end,
            }),
            Loc::Record { chain, rec } => out.push(Job::Record {
                block: seg.start,
                chain,
                rec,
            }),
        }
    }
    out
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
    let mut jobs = jobs(view).into_iter();
    let work = |job: Job| -> Result<Piece> {
        match job {
            Job::Image { start, end } => {
                let (data, bad) = view.read_image_run(start, end)?;
                let mut digests = vec![0u8; ((end - start) as usize) * 32];
                view.image_digests(start, &mut digests)?;
                let zero = digests.chunks_exact(32).map(|d| d == ZERO_DIGEST).collect();
                Ok(Piece {
                    start,
                    end,
                    data: Some(data),
                    zero,
                    bad,
                })
            }
            Job::Zero { start, end } => Ok(Piece {
                start,
                end,
                data: None,
                zero: vec![],
                bad: vec![],
            }),
            Job::Record { block, chain, rec } => {
                let blk = view.read_record(chain, rec)?;
                let zero = vec![fsutil::is_zero(&blk.data)];
                let bad = if blk.ok { vec![] } else { vec![block] };
                Ok(Piece {
                    start: block,
                    end: block + 1,
                    data: Some(blk.data),
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
                return Err(Error::corrupt(
                    format!("{}/{}", view.generation, view.disk),
                    format!("bytes {}..{} fail their digest; the restore was stopped (use --ignore-damage to write what can be read)", range.0, range.1),
                ));
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
            None => target.zero(from, to - from)?,
            Some(data) => write_runs(target, &p, data, bs, &mut report.written)?,
        }
        task.advance(to - from);
        crate::fault::pause("restore-wrote");
        Ok(())
    };
    let workers = crate::engine::cpu_threads();
    pipeline::ordered(workers, workers * 3, || Ok(jobs.next()), work, sink)?;
    task.finish();
    Ok(report)
}

/// Write the non-zero blocks of a piece as runs; zero blocks become holes.
fn write_runs(
    target: &mut dyn Target,
    p: &Piece,
    data: &[u8],
    bs: u64,
    written: &mut u64,
) -> Result<()> {
    let n = (p.end - p.start) as usize;
    let base = p.start * bs;
    let mut i = 0;
    while i < n {
        let is_zero = |i: usize| {
            let (s, e) = (i * bs as usize, ((i + 1) * bs as usize).min(data.len()));
            // A bad block is written as read, whatever its digest claimed.
            p.zero.get(i).copied().unwrap_or(false) && !p.bad.contains(&(p.start + i as u64))
                || fsutil::is_zero(&data[s..e])
        };
        let zero = is_zero(i);
        let mut j = i + 1;
        while j < n && is_zero(j) == zero {
            j += 1;
        }
        let (s, e) = (i * bs as usize, (j * bs as usize).min(data.len()));
        if zero {
            target.zero(base + s as u64, (e - s) as u64)?;
        } else {
            target.write(base + s as u64, &data[s..e])?;
            *written += (e - s) as u64;
        }
        i = j;
    }
    Ok(())
}
