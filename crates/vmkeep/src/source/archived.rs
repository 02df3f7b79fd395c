//! One disk of an archived generation as a backup source: what `sync` reads to append a
//! generation to a replica repository ([`crate::engine::replicate`]). Every block handed
//! out is verified against the generation's digest (the view was proven against its
//! digest root), a damaged one is an error, and the generation's holes are reported as
//! zero extents without reading anything.

use crate::archive::digest::ZERO_DIGEST;
use crate::archive::view::DiskView;
use crate::error::Result;
use crate::source::{BlockSource, Extent, ExtentKind};

/// The most blocks one [`BlockSource::extents`] call looks at.
const EXTENT_BLOCKS: u64 = 1 << 16;

/// A disk of an archived generation, read through its proven view.
pub struct ArchivedDisk {
    view: DiskView,
    label: String,
}

impl ArchivedDisk {
    /// The disk `view` reads, described as `label`.
    pub fn new(view: DiskView, label: String) -> Self {
        ArchivedDisk { view, label }
    }
}

/// The byte ranges of `to` whose blocks' digests differ from `from`'s (two proven views
/// of one disk with the same block size): exactly the blocks whose content differs. Past
/// the smaller size everything of `to` counts as changed.
pub fn changed_blocks(from: &DiskView, to: &DiskView) -> Result<Vec<(u64, u64)>> {
    let bs = to.block_size as u64;
    let common = from.blocks().min(to.blocks());
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |b: u64| {
        let start = b * bs;
        let end = ((b + 1) * bs).min(to.size);
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    };
    for b in 0..common {
        // A block at the old end may be short in one and whole in the other.
        let short = (b + 1) * bs > from.size.min(to.size);
        if short || from.digest_of(b)? != to.digest_of(b)? {
            push(b);
        }
    }
    for b in common..to.blocks() {
        push(b);
    }
    Ok(out)
}

impl BlockSource for ArchivedDisk {
    fn describe(&self) -> String {
        self.label.clone()
    }

    fn size(&self) -> u64 {
        self.view.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bs = self.view.block_size as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let b = pos / bs;
            let block = self.view.read_block(b)?;
            if !block.ok {
                return Err(self
                    .view
                    .block_damage(format!("block {b} does not match its digest; not copied")));
            }
            let within = (pos - b * bs) as usize;
            let n = (block.data.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&block.data[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let bs = self.view.block_size as u64;
        let end = (offset + length).min(self.view.size);
        let first = offset / bs;
        let last = end.div_ceil(bs).min(first + EXTENT_BLOCKS);
        let mut out: Vec<Extent> = Vec::new();
        for b in first..last {
            let kind = if self.view.digest_of(b)? == ZERO_DIGEST {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            let start = (b * bs).max(offset);
            let stop = ((b + 1) * bs).min(end);
            match out.last_mut() {
                Some(e) if e.kind == kind && e.offset + e.length == start => {
                    e.length = stop - e.offset
                }
                _ => out.push(Extent {
                    offset: start,
                    length: stop - start,
                    kind,
                }),
            }
        }
        Ok(out)
    }

    fn parallelism(&self) -> usize {
        4
    }
}
