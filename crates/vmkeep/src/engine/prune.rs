//! `prune`: drop generations a retention schedule no longer keeps.
//!
//! Dropping the oldest generation deletes its folder. Dropping a middle one merges its
//! reverse diffs into the next older generation's (the older record wins, as the older
//! generation's content is what that record holds) under a transaction, so that a crash
//! leaves either the old or the new chain, never a mix.
//!
//! A generation that a running `serve` has pinned ([`crate::archive::pin`]) is kept
//! whatever the schedule says, and listed as `pinned` in the report; pins are looked at
//! again right before each generation is dropped.

use serde::Serialize;

use crate::archive::format::{block_count, block_len};
use crate::archive::lock::VmLock;
use crate::archive::pin::pinned_generations;
use crate::archive::profile::parse_time;
use crate::archive::rdiff::{RdiffHeader, RdiffReader, RdiffWriter, Record, FLAG_BASE};
use crate::archive::retention::{self, Item, Schedule};
use crate::archive::txn::{self, Txn};
use crate::archive::view::open_rdiff;
use crate::archive::{Generation, GenerationId, Repository, VmArchive};
use crate::error::{Error, Result};

/// What a prune did (or would do, with `dry_run`).
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// The VM pruned.
    pub vm: String,
    /// Whether this was a dry run: nothing was removed, `removed` says what would be.
    pub dry_run: bool,
    /// Generations kept, oldest first.
    pub kept: Vec<GenerationId>,
    /// Generations removed (or that a dry run would remove), oldest first.
    pub removed: Vec<GenerationId>,
    /// Generations the schedule would drop but a running reader has pinned (also in `kept`).
    pub pinned: Vec<GenerationId>,
    /// One line per recovery of an interrupted command that the prune performed first.
    pub recovered: Vec<String>,
}

/// Apply `schedule` to VM `vm`: take its lock, finish what an interrupted command left
/// (unless `dry_run`), then [`prune_held`].
pub fn prune(
    repo: &Repository,
    vm: &str,
    schedule: &Schedule,
    dry_run: bool,
) -> Result<PruneReport> {
    let archive = repo.vm(vm)?;
    let lock = VmLock::acquire(&archive.dir, vm, "prune")?;
    let recovered = if dry_run {
        Vec::new()
    } else {
        txn::recover(&archive.dir)?
    };
    prune_held(&archive, &lock, schedule, dry_run, recovered)
}

/// Apply `schedule` to `archive` while the caller holds its lock (`_held`; a backup that
/// prunes as it goes passes its own), with `recovered` the lines of what recovery did.
pub fn prune_held(
    archive: &VmArchive,
    held: &VmLock,
    schedule: &Schedule,
    dry_run: bool,
    recovered: Vec<String>,
) -> Result<PruneReport> {
    let vm = archive.name.as_str();
    if held.path() != crate::archive::names::lock_path(&archive.dir) {
        return Err(Error::usage(format!(
            "VM {vm}: pruning needs this VM's lock, not {}",
            held.path().display()
        )));
    }
    let gens = archive.generations()?;
    let items: Vec<Item> = gens
        .iter()
        .map(|g| {
            let time = parse_time(&g.profile.time).ok_or_else(|| {
                Error::corrupt(
                    g.profile_path(),
                    format!("unreadable time {:?}", g.profile.time),
                )
            })?;
            Ok(Item {
                time,
                protected: g.profile.protected,
            })
        })
        .collect::<Result<_>>()?;
    let keep = retention::keep(&items, schedule);
    let pinned = pinned_generations(&archive.dir)?;
    let mut report = PruneReport {
        vm: vm.to_string(),
        dry_run,
        kept: vec![],
        removed: vec![],
        pinned: vec![],
        recovered,
    };
    let mut doomed = Vec::new();
    for (g, k) in gens.iter().zip(&keep) {
        if *k {
            report.kept.push(g.id.clone())
        } else if pinned.contains(&g.id) {
            report.keep_pinned(&g.id);
        } else {
            doomed.push(g.id.clone())
        }
    }
    if dry_run {
        report.removed = doomed;
        return Ok(report);
    }
    for id in doomed {
        // A serve may have pinned it since the first look.
        if pinned_generations(&archive.dir)?.contains(&id) {
            report.keep_pinned(&id);
            continue;
        }
        let current = archive.generations()?;
        let m = current
            .iter()
            .position(|g| g.id == id)
            .expect("generation listed a moment ago");
        drop_generation(&archive.dir, &current, m)?;
        report.removed.push(id);
    }
    report.kept.sort();
    Ok(report)
}

impl PruneReport {
    fn keep_pinned(&mut self, id: &GenerationId) {
        self.kept.push(id.clone());
        self.pinned.push(id.clone());
    }
}

/// Remove generation `gens[m]` (never the newest) from the chain.
pub fn drop_generation(vm_dir: &std::path::Path, gens: &[Generation], m: usize) -> Result<()> {
    assert!(m + 1 < gens.len(), "the newest generation is never dropped");
    if m == 0 {
        return txn::delete_generation(vm_dir, &gens[0].id);
    }
    let older = &gens[m - 1];
    let mut merged = Vec::new();
    let written = (|| -> Result<()> {
        for d in &older.profile.disks {
            let a = open_rdiff(gens, m - 1, &d.name)?;
            if a.header.is_base() {
                continue; // the older generation's chain already ends at itself
            }
            let b = open_rdiff(gens, m, &d.name)?;
            merge(&a, &b, &older.merge_path(&d.name))?;
            merged.push(d.name.clone());
        }
        // The commit record makes recovery rename the merged files over the old ones and
        // delete the dropped generation: their names must be durable before it.
        if !merged.is_empty() {
            crate::fsutil::sync_dir(&older.dir)?;
        }
        crate::fault::pause("prune-merged");
        crate::interrupt::check()
    })();
    if let Err(e) = written {
        // Nothing is committed yet: the merged files are only drafts.
        for d in &merged {
            let _ = std::fs::remove_file(older.merge_path(d));
        }
        return Err(e);
    }
    let mut t = Txn::prune(older.id.to_string(), gens[m].id.to_string(), merged);
    t.merged = t
        .disks
        .iter()
        .map(|d| crate::archive::rdiff::file_hash(&older.merge_path(d)))
        .collect::<Result<_>>()?;
    t.store(vm_dir)?;
    txn::roll_forward_prune(vm_dir, &t)?;
    Txn::clear(vm_dir)
}

/// Write rdiff(A: g vs g+1) ∘ rdiff(B: g+1 vs g+2) = rdiff(g vs g+2) to `out`.
pub fn merge(a: &RdiffReader, b: &RdiffReader, out: &std::path::Path) -> Result<u64> {
    let bs = a.header.block_size;
    if b.header.block_size != bs || b.header.disk_size != a.header.next_size {
        return Err(Error::corrupt(
            b.path(),
            "does not continue the older generation's reverse diff",
        ));
    }
    let header = RdiffHeader {
        flags: b.header.flags & FLAG_BASE,
        block_size: bs,
        compression: a.header.compression.max(b.header.compression),
        disk_size: a.header.disk_size,
        next_size: if b.header.is_base() {
            0
        } else {
            b.header.next_size
        },
        generation: a.header.generation,
    };
    let _ = std::fs::remove_file(out);
    let mut w = RdiffWriter::create(out, header)?;
    let n_a = block_count(a.header.disk_size, bs);
    let n_mid = block_count(a.header.next_size, bs);
    // Blocks past the middle generation's end read as zero from A; past it, B and the
    // newer chain know nothing of them, so they need explicit zero records.
    let zero_end = if b.header.is_base() {
        n_mid
    } else {
        n_a.min(block_count(b.header.next_size, bs))
    };
    let (mut ia, mut ib) = (0usize, 0usize);
    let mut z = n_mid;
    loop {
        let na = (ia < a.len()).then(|| a.block_at(ia));
        let nb = (ib < b.len())
            .then(|| b.block_at(ib))
            .filter(|&x| x < n_mid.min(n_a));
        let nz = (z < zero_end).then_some(z);
        let Some(next) = [na, nb, nz].into_iter().flatten().min() else {
            break;
        };
        if na == Some(next) {
            w.append(&a.read(ia)?)?;
        } else if nb == Some(next) {
            let rec = b.read(ib)?;
            let len = block_len(next, a.header.disk_size, bs) as u32;
            if rec.raw_len == len {
                w.append(&rec)?;
            } else if rec.is_zero() {
                w.append(&Record::zero(next, len))?;
            } else {
                return Err(Error::corrupt(
                    b.path(),
                    format!("block {next} has a length the older generation cannot hold"),
                ));
            }
        } else {
            w.append(&Record::zero(
                next,
                block_len(next, a.header.disk_size, bs) as u32,
            ))?;
        }
        if na == Some(next) {
            ia += 1;
        }
        if nb == Some(next) {
            ib += 1;
        }
        if nz == Some(next) {
            z += 1;
        }
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::archive::pin::Pin;
    use crate::archive::view::DiskView;
    use crate::engine::backup::{BackupOptions, BackupRun, DiskInput};
    use crate::progress::NoProgress;
    use crate::source::file::FileSource;

    fn backup(repo: &Repository, img: &Path, fill: u8) -> GenerationId {
        std::fs::write(img, vec![fill; 200 << 10]).unwrap();
        let run = BackupRun::begin(repo, "vm").unwrap();
        let disk = DiskInput::new("vda", Box::new(FileSource::open(img).unwrap()));
        let opts = BackupOptions::default();
        run.execute(vec![disk], &opts, &NoProgress)
            .unwrap()
            .generation
            .id
    }

    #[test]
    fn prune_skips_pinned_generations() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo")).unwrap();
        let img = dir.path().join("vda.raw");
        let ids: Vec<GenerationId> = (1..=3).map(|i| backup(&repo, &img, i)).collect();
        let pin = Pin::acquire(&repo.vm_dir("vm").unwrap(), &ids[1], "test").unwrap();
        let last = Schedule {
            keep_last: Some(1),
            ..Default::default()
        };

        let r = prune(&repo, "vm", &last, false).unwrap();
        assert_eq!(r.removed, vec![ids[0].clone()]);
        assert_eq!(r.pinned, vec![ids[1].clone()]);
        let vm = repo.vm("vm").unwrap();
        assert_eq!(vm.generation_ids().unwrap(), ids[1..].to_vec());
        // The pinned generation still reads as it was backed up.
        let gens = vm.generations().unwrap();
        let view = DiskView::open(&vm, &gens, 0, "vda").unwrap();
        let blk = view.read_block(0).unwrap();
        assert!(blk.ok && blk.data.iter().all(|&b| b == 2));

        drop(pin);
        let r = prune(&repo, "vm", &last, false).unwrap();
        assert_eq!(r.removed, vec![ids[1].clone()]);
        assert!(r.pinned.is_empty());
        assert_eq!(vm.generation_ids().unwrap(), ids[2..].to_vec());
    }

    #[test]
    fn prune_held_refuses_a_lock_of_another_vm() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo")).unwrap();
        let img = dir.path().join("vda.raw");
        for i in 1..=2 {
            backup(&repo, &img, i);
        }
        let other = repo.vm_dir("other").unwrap();
        crate::fsutil::create_dir(&other).unwrap();
        let wrong = VmLock::acquire(&other, "other", "test").unwrap();
        let last = Schedule {
            keep_last: Some(1),
            ..Default::default()
        };
        let vm = repo.vm("vm").unwrap();
        let e = prune_held(&vm, &wrong, &last, false, Vec::new()).unwrap_err();
        assert!(e.to_string().contains("needs this VM's lock"), "{e}");
        assert_eq!(vm.generation_ids().unwrap().len(), 2, "nothing removed");
        drop(wrong);
        let right = VmLock::acquire(&vm.dir, "vm", "test").unwrap();
        let r = prune_held(&vm, &right, &last, false, Vec::new()).unwrap();
        assert_eq!(r.removed.len(), 1);
    }
}
