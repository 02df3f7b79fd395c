//! `prune --from TARGET`: drop the generations a retention schedule no longer keeps from
//! an offsite copy, then the packs nothing references.
//!
//! The order makes every crash safe: first the manifests of the dropped generations are
//! deleted (a generation is on the target only while its manifest is); then, when no
//! other sync or prune holds a fresh lock object, the packs that no remaining manifest
//! references and that are older than the grace period (a sync in flight uploads its
//! packs before its manifest) are left out of a new index object, the old index objects
//! are deleted, and only then the packs. A crash in between leaves orphan packs, which
//! the next prune removes. A manifest that does not open stops the removal of packs (its
//! packs are unknown), never the removal of manifests the schedule drops.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::archive::profile::parse_time;
use crate::archive::retention::{self, Item, Schedule};
use crate::archive::GenerationId;
use crate::error::{Error, Result};
use crate::offsite::index;
use crate::offsite::key::{random_hex, OffsiteKey};
use crate::offsite::manifest::{head_packs, Head, MANIFEST_PREFIX};
use crate::offsite::pack::{self, pack_key, PackId};
use crate::offsite::read::list_manifests;
use crate::offsite::store::ObjectStore;
use crate::offsite::target::{self, RunLock};
use crate::progress::Progress;

/// How old an unreferenced pack must be before prune deletes it, unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// What `prune --from` asks for besides the schedules.
#[derive(Debug, Clone)]
pub struct PruneFromOptions {
    /// The VMs to apply a schedule to (empty: every VM on the target).
    pub vms: Vec<String>,
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// Unreferenced packs younger than this are kept, and so are lock objects.
    pub grace: Duration,
}

/// What a prune did to one VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmPruned {
    /// The VM.
    pub vm: String,
    /// Generations kept, oldest first.
    pub kept: Vec<GenerationId>,
    /// Generations removed (or that a dry run would remove), oldest first.
    pub removed: Vec<GenerationId>,
}

/// What `prune --from` did.
#[derive(Debug, Clone, Serialize)]
pub struct OffsitePruneReport {
    /// The target.
    pub target: String,
    /// Whether nothing was removed.
    pub dry_run: bool,
    /// Each VM pruned.
    pub vms: Vec<VmPruned>,
    /// Packs removed (or that a dry run would remove).
    pub packs_removed: u64,
    /// Their bytes.
    pub bytes_removed: u64,
    /// Unreferenced packs kept because they are younger than the grace period.
    pub packs_in_grace: u64,
    /// Why no pack was removed, when none could be (a fresh lock, a manifest that does
    /// not open).
    pub packs_kept_because: Option<String>,
    /// Index objects replaced by one.
    pub indexes_merged: u64,
}

/// Prune the target with `schedule_of(vm)` for each VM.
pub fn prune_from(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    schedule_of: &dyn Fn(&str) -> Schedule,
    opts: &PruneFromOptions,
    progress: &dyn Progress,
) -> Result<OffsitePruneReport> {
    for v in &opts.vms {
        crate::archive::names::check_vm(v)?;
    }
    target::check_config(store, key, false)?;
    let run = random_hex(16)?;
    let lock = if opts.dry_run {
        None
    } else {
        Some(RunLock::write(store, &run, "prune")?)
    };
    let own = lock.as_ref().map(|l| l.key.clone()).unwrap_or_default();
    let mut report = OffsitePruneReport {
        target: store.describe(),
        dry_run: opts.dry_run,
        vms: Vec::new(),
        packs_removed: 0,
        bytes_removed: 0,
        packs_in_grace: 0,
        packs_kept_because: None,
        indexes_merged: 0,
    };
    let mut by_vm: HashMap<String, Vec<(String, Head)>> = HashMap::new();
    let mut unreadable = Vec::new();
    for l in list_manifests(store, key, MANIFEST_PREFIX)? {
        match l.head {
            Ok(h) => by_vm
                .entry(h.vm.clone())
                .or_default()
                .push((l.object.key, h)),
            Err(why) => {
                progress.warn(&format!("manifest {} {why}; kept", l.object.key));
                unreadable.push(l.object.key);
            }
        }
    }
    let mut names: Vec<String> = if opts.vms.is_empty() {
        by_vm.keys().cloned().collect()
    } else {
        opts.vms.clone()
    };
    names.sort();
    let mut removed_keys = HashSet::new();
    for vm in &names {
        crate::interrupt::check()?;
        let Some(gens) = by_vm.get_mut(vm) else {
            return Err(Error::usage(format!(
                "VM {vm} has no generations on {}",
                store.describe()
            )));
        };
        gens.sort_by(|a, b| a.1.generation.cmp(&b.1.generation));
        let items: Vec<Item> = gens
            .iter()
            .map(|(k, h)| {
                Ok(Item {
                    time: parse_time(&h.time).ok_or_else(|| {
                        Error::corrupt(k, format!("unreadable time {:?}", h.time))
                    })?,
                    protected: h.protected,
                })
            })
            .collect::<Result<_>>()?;
        let schedule = schedule_of(vm);
        let keep = retention::keep(&items, &schedule);
        let mut done = VmPruned {
            vm: vm.clone(),
            kept: Vec::new(),
            removed: Vec::new(),
        };
        for ((k, h), keep) in gens.iter().zip(keep) {
            if keep {
                done.kept.push(h.generation.clone());
                continue;
            }
            if !opts.dry_run {
                store.delete(k)?;
            }
            removed_keys.insert(k.clone());
            done.removed.push(h.generation.clone());
        }
        report.vms.push(done);
    }
    // The packs: only when every remaining manifest is known, and no one else runs.
    let remaining: Vec<&Head> = by_vm
        .values()
        .flatten()
        .filter(|(k, _)| !removed_keys.contains(k))
        .map(|(_, h)| h)
        .collect();
    let referenced: HashSet<PackId> = remaining.iter().flat_map(|h| head_packs(h)).collect();
    if let Some(first) = unreadable.first() {
        report.packs_kept_because = Some(format!(
            "manifest {first} does not open, so the packs it references are unknown"
        ));
    } else if let Some(why) = others_running(store, &own, opts.grace)? {
        report.packs_kept_because = Some(why);
    } else {
        let now = SystemTime::now();
        let mut doomed: Vec<(PackId, u64)> = Vec::new();
        let mut existing = HashSet::new();
        for o in store.list("packs/")? {
            let Some(id) = pack::pack_of_key(&o.key) else {
                continue;
            };
            existing.insert(id);
            if referenced.contains(&id) {
                continue;
            }
            let old = o
                .modified
                .is_some_and(|m| now.duration_since(m).unwrap_or_default() >= opts.grace);
            if old {
                doomed.push((id, o.size));
            } else {
                report.packs_in_grace += 1;
            }
        }
        let indexes = store.list(index::INDEX_PREFIX)?;
        let doomed_set: HashSet<PackId> = doomed.iter().map(|d| d.0).collect();
        report.packs_removed = doomed.len() as u64;
        report.bytes_removed = doomed.iter().map(|d| d.1).sum();
        if !opts.dry_run && (!doomed.is_empty() || indexes.len() > index::MERGE_AT) {
            // One index of what stays, before anything it leaves out goes.
            let mut entries = Vec::new();
            for o in &indexes {
                match index::load(store, key, &o.key, o.size)? {
                    Ok(e) => {
                        entries.extend(e.into_iter().filter(|l| {
                            existing.contains(&l.pack) && !doomed_set.contains(&l.pack)
                        }))
                    }
                    Err(why) => progress.warn(&format!("index object {} {why}; dropped", o.key)),
                }
            }
            entries.sort_by_key(|l| l.block);
            entries.dedup_by(|a, b| a.block == b.block);
            let new_key = index::index_key(&run, 0);
            store.put(&new_key, &index::encode(key, &new_key, &entries)?)?;
            for o in &indexes {
                store.delete(&o.key)?;
            }
            report.indexes_merged = indexes.len() as u64;
            crate::fault::pause("prune-indexed");
            // A sync that started since the first look holds a lock now.
            if let Some(why) = others_running(store, &own, opts.grace)? {
                report.packs_kept_because = Some(why);
                report.packs_removed = 0;
                report.bytes_removed = 0;
            } else {
                for (id, _) in &doomed {
                    crate::interrupt::check()?;
                    store.delete(&pack_key(id))?;
                }
            }
        }
    }
    if let Some(l) = lock {
        l.release()?;
    }
    Ok(report)
}

/// Why packs may not be deleted now: another run's fresh lock object.
fn others_running(store: &dyn ObjectStore, own: &str, grace: Duration) -> Result<Option<String>> {
    let locks = target::fresh_locks(store, own, grace)?;
    Ok(locks.first().map(|(k, info)| match info {
        Some(i) => format!(
            "{k}: a {} on {} (pid {}) since {} may still be running",
            i.command, i.host, i.pid, i.time
        ),
        None => format!("{k}: another run may still be running"),
    }))
}
