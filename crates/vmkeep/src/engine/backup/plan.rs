//! Planning: which blocks a disk's run examines, in jobs, and the reads started ahead of
//! them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::disk::OldDisk;
use crate::archive::format::block_count;
use crate::archive::profile::GenerationMode;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::source::changed::{merge_ranges, to_block_ranges};
use crate::source::{BlockSource, ExtentKind};

/// The block ranges a disk's run examines: in incr mode the blocks the tracker names
/// (`changed`, byte ranges) and those [`zeroed_since`] finds, else every block of the new
/// size.
pub(super) fn block_ranges(
    mode: GenerationMode,
    old: Option<&OldDisk>,
    changed: Option<&[(u64, u64)]>,
    source: &dyn BlockSource,
    bs: u32,
    size: u64,
) -> Result<Vec<(u64, u64)>> {
    let new_blocks = block_count(size, bs);
    Ok(match (&mode, old) {
        (GenerationMode::Incr, Some(o)) => {
            let mut r = to_block_ranges(changed.unwrap_or(&[]), bs, new_blocks);
            if o.size != size {
                // The block at the old end and everything past it changed length.
                r.push((o.blocks.min(new_blocks).saturating_sub(1), new_blocks));
            }
            r.extend(zeroed_since(source, o, bs, size)?);
            r.retain(|&(a, b)| a < b);
            merge_ranges(&mut r);
            r
        }
        _ => vec![(0, new_blocks)]
            .into_iter()
            .filter(|&(a, b)| a < b)
            .collect(),
    })
}

/// The blocks an incremental run reads although no tracker names them: where the source
/// now reads as zeros (its allocation map says so) and the previous image holds data.
///
/// A tracker sees writes, not every way bytes can vanish: a disk shrunk and grown back
/// between two runs reads as zeros past the cut, often with the size the last generation
/// recorded, and QEMU 7.2's persistent bitmaps leave the regrown range clean (so would a
/// changed-block list that names only writes). Reading those blocks costs no I/O (they
/// are holes or zero extents), and keeps the old bytes out of the new generation. The
/// previous image's holes read as zeros, so only its data ranges need asking about.
fn zeroed_since(
    source: &dyn BlockSource,
    old: &OldDisk,
    bs: u32,
    size: u64,
) -> Result<Vec<(u64, u64)>> {
    let bs = bs as u64;
    let shared = old.size.min(size);
    let data =
        fsutil::data_extents(&old.image, 0, shared).map_err(|e| Error::io(&old.image_path, e))?;
    let (Some(first), Some(last)) = (data.first(), data.last()) else {
        return Ok(Vec::new());
    };
    // One walk over the source's allocation map from the first to the last data range, in
    // queries as long as the source takes (a few for a whole disk), intersected here with
    // the data ranges: not a query per data range, each a round trip (1054 of them for the
    // 4 GiB benchmark disk, 17 s over TLS to QEMU 7.2's NBD server).
    let (lo, hi) = (first.0, (last.0 + last.1).min(shared));
    let mut zeros = Vec::new();
    let mut at = lo;
    while at < hi {
        let before = at;
        for e in source.extents(at, hi - at)? {
            if e.offset > at {
                return Err(Error::source(
                    source.describe(),
                    format!("allocation map has a gap at byte {at}"),
                ));
            }
            let (s, e_end) = (e.offset.max(at), (e.offset + e.length).min(hi));
            if e_end <= s {
                continue;
            }
            if e.kind == ExtentKind::Zero {
                zeros.push((s, e_end));
            }
            at = at.max(e_end);
        }
        if at == before {
            return Err(Error::source(
                source.describe(),
                format!("allocation map is empty at byte {at}"),
            ));
        }
    }
    Ok(intersect_blocks(&zeros, &data, shared, bs))
}

/// The blocks (first, end) of `bs` bytes touched by both the byte ranges `zeros`
/// (start, end) and the ranges `data` (start, length, cut at `limit`); both sorted.
fn intersect_blocks(
    zeros: &[(u64, u64)],
    data: &[(u64, u64)],
    limit: u64,
    bs: u64,
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < zeros.len() && j < data.len() {
        let (zs, ze) = zeros[i];
        let (ds, de) = (data[j].0, (data[j].0 + data[j].1).min(limit));
        let (s, e) = (zs.max(ds), ze.min(de));
        if s < e {
            out.push((s / bs, e.div_ceil(bs)));
        }
        if ze <= de {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// A run of blocks for one worker.
pub(super) struct Job {
    pub(super) first: u64,
    pub(super) count: u64,
    pub(super) kind: ExtentKind,
}

/// Tell the sources what the planner just handed out, so that the reads of scattered
/// blocks are in flight before a worker asks for them: the source's range, and, in incr
/// mode (where most examined blocks did change), the previous image's range too; the old
/// digests are always wanted.
pub(super) fn hint(
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
pub(super) fn prefetch_ranges(
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

/// Hands out jobs: runs of blocks of one kind (data to read, or known zeros), following
/// the block ranges to examine and the source's allocation map.
pub(super) struct Planner<'a> {
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
    pub(super) fn new(
        source: &'a dyn BlockSource,
        ranges: &'a [(u64, u64)],
        bs: u32,
        size: u64,
    ) -> Self {
        let request = crate::tuning::tuning("VMKEEP_READ_SIZE", 4096..=32 << 20).unwrap_or(4 << 20);
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

    pub(super) fn next(&mut self) -> Result<Option<Job>> {
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
    use super::intersect_blocks;

    #[test]
    fn zero_ranges_meet_data_ranges_block_by_block() {
        const B: u64 = 64 << 10;
        // Data at [0, 2B) and [4B, 6B) (start, length); zeros at [B, 5B) (start, end).
        let data = [(0, 2 * B), (4 * B, 2 * B)];
        assert_eq!(
            intersect_blocks(&[(B, 5 * B)], &data, 10 * B, B),
            vec![(1, 2), (4, 5)]
        );
        // Unaligned ends touch their blocks; the limit cuts the data.
        assert_eq!(
            intersect_blocks(&[(B + 1, 9 * B)], &data, 5 * B + 7, B),
            vec![(1, 2), (4, 6)]
        );
        // Zeros outside every data range touch nothing.
        assert_eq!(
            intersect_blocks(&[(2 * B, 4 * B)], &data, 10 * B, B),
            vec![]
        );
        assert_eq!(intersect_blocks(&[], &data, 10 * B, B), vec![]);
    }
}
