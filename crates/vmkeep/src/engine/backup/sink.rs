//! The ordered end of the pipeline: journal records made durable before the image writes
//! they protect, then the image and digest writes.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use super::disk::OldDisk;
use super::examine::{old_record, Done};
use crate::archive::digest::{DigestWriter, ZERO_DIGEST};
use crate::archive::format::{block_count, block_len};
use crate::archive::rdiff::RdiffWriter;
use crate::bufpool::PoolBuf;
use crate::error::Result;
use crate::fsutil;

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

pub(super) enum SinkTarget<'a> {
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
pub(super) struct Sink<'a> {
    target: SinkTarget<'a>,
    digests: DigestWriter,
    pending: PendingWrites,
    unsynced_records: bool,
    behind: fsutil::WriteBehind,
    bs: u32,
    size: u64,
    /// zstd level of the journal records, the tail a shrink cuts off included.
    level: i32,
    changed: u64,
    damaged: u64,
}

impl<'a> Sink<'a> {
    pub(super) fn new(
        target: SinkTarget<'a>,
        digests: DigestWriter,
        bs: u32,
        size: u64,
        level: i32,
    ) -> Sink<'a> {
        Sink {
            target,
            digests,
            pending: PendingWrites::default(),
            unsynced_records: false,
            behind: fsutil::WriteBehind::default(),
            bs,
            size,
            level,
            changed: 0,
            damaged: 0,
        }
    }

    pub(super) fn accept(&mut self, done: Done) -> Result<()> {
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
    pub(super) fn finish(mut self) -> Result<(u64, u64, u64)> {
        if let SinkTarget::Update { old, journal, .. } = &mut self.target {
            let new_blocks = block_count(self.size, self.bs);
            for b in new_blocks..old.blocks {
                let d = old.digest_of(b)?;
                if d != ZERO_DIGEST {
                    let rec = old_record(old, b, d, self.bs, self.level)?;
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
