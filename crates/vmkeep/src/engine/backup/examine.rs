//! The workers' stage: read and digest a job's blocks, compare them with the previous
//! image, and make the journal records of the old contents.

use std::sync::Arc;

use super::disk::OldDisk;
use super::plan::Job;
use crate::archive::digest::{block_digest, Digest, ZERO_DIGEST};
use crate::archive::format::{block_len, DIGEST_LEN};
use crate::archive::rdiff::Record;
use crate::bufpool::{BufPool, PoolBuf};
use crate::error::Result;
use crate::fsutil;
use crate::source::{BlockSource, ExtentKind};

/// A job's outcome.
pub(super) struct Done {
    pub(super) first: u64,
    pub(super) count: u64,
    pub(super) read_bytes: u64,
    pub(super) data: Option<Arc<PoolBuf>>,
    pub(super) digests: Vec<Digest>,
    /// Changed blocks (index within the job) with the journal record of their old content
    /// (none for blocks the previous generation did not have).
    pub(super) changes: Vec<(usize, Option<Record>)>,
    pub(super) damaged: u64,
}

/// What every job of one disk is examined against.
pub(super) struct Examiner<'a> {
    pub(super) source: &'a dyn BlockSource,
    /// The previous generation's image and digests of the disk, if it had the disk.
    pub(super) old: Option<&'a OldDisk>,
    pub(super) bs: u32,
    /// The disk's size now.
    pub(super) size: u64,
    /// zstd level of the journal records.
    pub(super) level: i32,
    /// Full mode: compare every block's bytes with the previous image, not its digest.
    pub(super) full_compare: bool,
    pub(super) pool: &'a Arc<BufPool>,
}

impl Examiner<'_> {
    /// Read and digest one job, and prepare the journal records of the blocks it changes.
    pub(super) fn examine(&self, job: Job) -> Result<Done> {
        let Examiner {
            source,
            old,
            bs,
            size,
            level,
            full_compare,
            pool,
        } = *self;
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
}

/// The journal record of block `b` of the previous image, whose bytes are `bytes` and
/// whose digest should be `od`.
pub(super) fn old_record_of(b: u64, bytes: &[u8], od: Digest, level: i32) -> Record {
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
pub(super) fn old_record(o: &OldDisk, b: u64, od: Digest, bs: u32, level: i32) -> Result<Record> {
    let mut buf = vec![0u8; block_len(b, o.size, bs)];
    fsutil::read_exact_at(&o.image, &mut buf, b * bs as u64, &o.image_path)?;
    Ok(old_record_of(b, &buf, od, level))
}

fn block_slice(data: &[u8], i: usize, bs: u32) -> &[u8] {
    let s = i * bs as usize;
    &data[s..(s + bs as usize).min(data.len())]
}
