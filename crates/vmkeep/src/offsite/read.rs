//! Reading an offsite copy: `restore --from`, `check --from`, `status --from`.
//!
//! Only the target and the key are needed. A restore reads the generation's manifest
//! (proven as [`manifest::decode`] says), then every non-zero block from its pack with a
//! ranged read; the blob must open as that block (its associated data binds the block
//! id), and the bytes must hash to the digest the manifest lists for the block, whose
//! list hashes to the digest root the generation profile records. Nothing unproven is
//! written.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::archive::digest::{block_digest, ZERO_DIGEST};
use crate::archive::format::block_len;
use crate::archive::{resolve_rev, GenerationId};
use crate::engine::pipeline;
use crate::engine::restore::{DiskRestore, RestoreReport};
use crate::error::{Error, Result};
use crate::offsite::index;
use crate::offsite::key::OffsiteKey;
use crate::offsite::manifest::{self, DiskMap, Head, Manifest, MANIFEST_PREFIX};
use crate::offsite::pack::{self, pack_key, Location, PackId};
use crate::offsite::store::{ObjectInfo, ObjectStore};
use crate::offsite::target;
use crate::progress::Progress;
use crate::target::Destination;

/// Bytes of a disk a restore job covers at most.
const CHUNK: u64 = 4 << 20;

/// A manifest as listed: its object, and its head or why it does not open.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The object.
    pub object: ObjectInfo,
    /// Its head, or what is wrong with it.
    pub head: std::result::Result<Head, String>,
}

/// Every manifest under `prefix` (all of them: [`MANIFEST_PREFIX`]), heads read.
pub fn list_manifests(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    prefix: &str,
) -> Result<Vec<Listed>> {
    store
        .list(prefix)?
        .into_iter()
        .map(|o| {
            let head = manifest::load_head(store, key, &o.key, o.size)?;
            Ok(Listed { object: o, head })
        })
        .collect()
}

/// The generations of VM `vm` on the target whose heads open, oldest first: (object
/// key, head). One that does not open is not on the target; `progress` hears of it.
pub fn vm_generations(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    vm: &str,
    progress: &dyn Progress,
) -> Result<Vec<(String, Head)>> {
    let mut out = Vec::new();
    for l in list_manifests(store, key, &manifest::vm_prefix(key, vm))? {
        match l.head {
            Ok(h) if h.vm == vm => out.push((l.object.key, h)),
            Ok(_) => progress.warn(&format!(
                "manifest {} names another VM; ignored (run check --from)",
                l.object.key
            )),
            Err(why) => progress.warn(&format!(
                "manifest {} {why}; ignored (run check --from)",
                l.object.key
            )),
        }
    }
    out.sort_by(|a, b| a.1.generation.cmp(&b.1.generation));
    Ok(out)
}

/// What `restore --from TARGET --to` asks for.
#[derive(Debug, Clone)]
pub struct RestoreFromOptions {
    /// The VM.
    pub vm: String,
    /// The generation: an id or unique prefix, N (0 = newest), or `latest`.
    pub rev: String,
    /// The disk; may be left out when the generation has one disk.
    pub disk: Option<String>,
    /// Where the disk goes.
    pub to: Destination,
}

/// Generation `rev` of `vm` on the target, its manifest read whole and proven.
pub fn open_generation(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    vm: &str,
    rev: &str,
    progress: &dyn Progress,
) -> Result<(String, Manifest)> {
    crate::archive::names::check_vm(vm)?;
    target::check_config(store, key, false)?;
    let gens = vm_generations(store, key, vm, progress)?;
    if gens.is_empty() {
        return Err(Error::usage(format!(
            "VM {vm} has no generations on {}",
            store.describe()
        )));
    }
    let ids: Vec<GenerationId> = gens.iter().map(|g| g.1.generation.clone()).collect();
    let id = resolve_rev(&ids, rev)
        .map_err(|e| Error::usage(format!("VM {vm} on {}: {e}", store.describe())))?;
    let (mkey, _) = gens
        .into_iter()
        .find(|g| g.1.generation == id)
        .expect("resolved among them");
    match manifest::load(store, key, &mkey)? {
        Ok(m) => Ok((mkey, m)),
        Err(why) => Err(Error::Damage {
            vm: vm.to_string(),
            generation: id.to_string(),
            disk: "-".into(),
            path: mkey.into(),
            detail: why,
        }),
    }
}

/// `vmkeep restore --from TARGET VM -g REV --to DEST`: one disk of a generation on the
/// target, every block proven, written to `opts.to`.
pub fn restore_from(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    opts: &RestoreFromOptions,
    progress: &dyn Progress,
) -> Result<DiskRestore> {
    let (_, m) = open_generation(store, key, &opts.vm, &opts.rev, progress)?;
    let disk = match &opts.disk {
        Some(d) => d.clone(),
        None => match m.head.disks.as_slice() {
            [only] => only.name.clone(),
            many => {
                return Err(Error::usage(format!(
                    "VM {} has several disks; name one with --disk ({})",
                    opts.vm,
                    many.iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        },
    };
    let report = restore_disk_from(store, key, &m, &disk, &opts.to, progress)?;
    Ok(DiskRestore {
        generation: m.head.generation.clone(),
        disk,
        report,
        unproven: None,
    })
}

/// One piece of a restore: blocks `[start, end)`.
struct Job {
    start: u64,
    end: u64,
}

/// Bytes of blocks `[start, end)` (`None` when all are zero), and which blocks hold
/// data (the others are zero and written as holes).
struct Piece {
    start: u64,
    end: u64,
    data: Option<Vec<u8>>,
    present: Vec<bool>,
}

/// Write disk `disk` of manifest `m` to `to`, every block proven.
pub fn restore_disk_from(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    m: &Manifest,
    disk: &str,
    to: &Destination,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let Some((hd, map)) = m.disk(disk) else {
        return Err(Error::usage(format!(
            "generation {} of VM {} has no disk {disk:?} (it has: {})",
            m.head.generation,
            m.head.vm,
            m.head
                .disks
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let bs = m.head.block_size as u64;
    let size = hd.size;
    // The index of each block's first reference: blocks are planned in order, and each
    // job needs to know where its references start.
    let per_chunk = (CHUNK / bs).max(1);
    let n = map.blocks();
    let mut starts = Vec::new();
    let mut r = 0usize;
    for b in 0..n {
        if b % per_chunk == 0 {
            starts.push(r);
        }
        if map.digest(b) != ZERO_DIGEST {
            r += 1;
        }
    }
    let mut target = crate::target::open(to, size)?;
    let task = progress.task(disk, size);
    let mut report = RestoreReport {
        size,
        ..Default::default()
    };
    let mut next = 0u64;
    let damage = |path: &str, detail: String| Error::Damage {
        vm: m.head.vm.clone(),
        generation: m.head.generation.to_string(),
        disk: disk.to_string(),
        path: path.into(),
        detail,
    };
    let work = |job: Job| -> Result<Piece> {
        let refs = &map.refs[starts[(job.start / per_chunk) as usize]..];
        let mut wanted = Vec::new();
        let mut k = 0;
        for b in job.start..job.end {
            if map.digest(b) != ZERO_DIGEST {
                wanted.push((b, m.locations[refs[k] as usize]));
                k += 1;
            }
        }
        if wanted.is_empty() {
            return Ok(Piece {
                start: job.start,
                end: job.end,
                data: None,
                present: Vec::new(),
            });
        }
        let mut present = vec![false; (job.end - job.start) as usize];
        for (b, _) in &wanted {
            present[(b - job.start) as usize] = true;
        }
        let from = job.start * bs;
        let to = (job.end * bs).min(size);
        let mut buf = vec![0u8; (to - from) as usize];
        for (b, data) in
            fetch_blocks(store, key, m, map, &wanted, hd.size).map_err(|(p, d)| damage(&p, d))?
        {
            let s = (b * bs - from) as usize;
            buf[s..s + data.len()].copy_from_slice(&data);
        }
        Ok(Piece {
            start: job.start,
            end: job.end,
            data: Some(buf),
            present,
        })
    };
    let sink = |p: Piece| -> Result<()> {
        let from = p.start * bs;
        let to = (p.end * bs).min(size);
        match &p.data {
            Some(d) => {
                // Runs of data blocks are written, runs of zero blocks made holes.
                let mut i = 0;
                while i < p.present.len() {
                    let mut j = i + 1;
                    while j < p.present.len() && p.present[j] == p.present[i] {
                        j += 1;
                    }
                    let a = i * bs as usize;
                    let e = (j * bs as usize).min(d.len());
                    if p.present[i] {
                        target.write(from + a as u64, &d[a..e])?;
                        report.written += (e - a) as u64;
                    } else {
                        target.zero(from + a as u64, (e - a) as u64)?;
                    }
                    i = j;
                }
            }
            None => target.zero(from, to - from)?,
        }
        task.advance(to - from);
        crate::fault::pause("restore-wrote");
        Ok(())
    };
    let workers = crate::engine::cpu_threads().max(4);
    let result = pipeline::ordered(
        workers,
        workers * 2,
        || {
            if next >= n {
                return Ok(None);
            }
            let job = Job {
                start: next,
                end: (next + per_chunk).min(n),
            };
            next = job.end;
            Ok(Some(job))
        },
        work,
        sink,
    );
    match result {
        Ok(()) => {
            target.finish()?;
            task.finish();
            Ok(report)
        }
        Err(e) => {
            target.abort();
            Err(e)
        }
    }
}

/// Why blocks could not be read: the object, and what failed.
type Failed = (String, String);

/// Read the blocks `wanted` (block, location) of disk `map` of `m`: adjacent blobs of a
/// pack in one ranged read, each opened as its block and checked against its digest and
/// length. The error names the object and what failed.
fn fetch_blocks(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    m: &Manifest,
    map: &DiskMap,
    wanted: &[(u64, Location)],
    size: u64,
) -> std::result::Result<Vec<(u64, Vec<u8>)>, Failed> {
    let mut out = Vec::with_capacity(wanted.len());
    let mut i = 0;
    while i < wanted.len() {
        // A run of blobs back to back in one pack.
        let first = wanted[i].1;
        let mut j = i + 1;
        let mut end = first.offset + first.len as u64;
        while j < wanted.len()
            && wanted[j].1.pack == first.pack
            && wanted[j].1.offset == end
            && end - first.offset < (16 << 20)
        {
            end += wanted[j].1.len as u64;
            j += 1;
        }
        let pkey = pack_key(&first.pack);
        let bytes = store
            .get_range(&pkey, first.offset, end - first.offset)
            .map_err(|e| (pkey.clone(), e.detail()))?;
        for &(b, loc) in &wanted[i..j] {
            let s = (loc.offset - first.offset) as usize;
            let blob = &bytes[s..s + loc.len as usize];
            let data = pack::open_block(key, &loc.block, blob).map_err(|why| {
                (
                    pkey.clone(),
                    format!("blob of block {b} at offset {}: {why}", loc.offset),
                )
            })?;
            let want_len = block_len(b, size, m.head.block_size);
            if data.len() != want_len || block_digest(&data) != map.digest(b) {
                return Err((
                    pkey.clone(),
                    format!(
                        "blob of block {b} at offset {}: its bytes fail the block's digest",
                        loc.offset
                    ),
                ));
            }
            out.push((b, data));
        }
        i = j;
    }
    Ok(out)
}

/// What `check --from` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OffsiteCheck {
    /// The target.
    pub target: String,
    /// Whether every blob of every referenced pack was read and proven.
    pub deep: bool,
    /// Manifests checked.
    pub manifests: u64,
    /// Packs listed.
    pub packs: u64,
    /// Packs some manifest references.
    pub packs_referenced: u64,
    /// Packs no manifest references (prune removes them after the grace period).
    pub packs_orphaned: u64,
    /// Index objects read.
    pub indexes: u64,
    /// Blobs opened and proven (deep).
    pub blobs_verified: u64,
    /// Bytes of blocks proven (deep).
    pub bytes_verified: u64,
    /// One line per problem, each naming the object.
    pub problems: Vec<String>,
}

impl OffsiteCheck {
    /// Whether nothing was wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// `check --from TARGET [--deep]`: every manifest (of `vms`, or all) opens and proves its
/// digest lists, every pack it references is there and long enough; with `deep`, every
/// blob of every referenced pack is read, opened and its block id proven from its bytes,
/// and every location a manifest names is one of its pack's blobs.
pub fn check_from(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    vms: &[String],
    deep: bool,
    progress: &dyn Progress,
) -> Result<OffsiteCheck> {
    target::check_config(store, key, false)?;
    let mut r = OffsiteCheck {
        target: store.describe(),
        deep,
        ..Default::default()
    };
    let prefixes: Vec<String> = if vms.is_empty() {
        vec![MANIFEST_PREFIX.to_string()]
    } else {
        vms.iter()
            .map(|v| {
                crate::archive::names::check_vm(v)?;
                Ok(manifest::vm_prefix(key, v))
            })
            .collect::<Result<_>>()?
    };
    let packs: HashMap<PackId, u64> = store
        .list("packs/")?
        .into_iter()
        .filter_map(|o| Some((pack::pack_of_key(&o.key)?, o.size)))
        .collect();
    r.packs = packs.len() as u64;
    // Which manifests reference each pack, and the locations they name in it.
    let mut uses: BTreeMap<PackId, (String, Vec<Location>)> = BTreeMap::new();
    let mut all_heads_ok = true;
    for prefix in &prefixes {
        for o in store.list(prefix)? {
            crate::interrupt::check()?;
            r.manifests += 1;
            let m = match manifest::load(store, key, &o.key)? {
                Ok(m) => m,
                Err(why) => {
                    all_heads_ok = false;
                    r.problems.push(format!("{}: {why}", o.key));
                    continue;
                }
            };
            let what = format!(
                "{} (generation {} of VM {})",
                o.key, m.head.generation, m.head.vm
            );
            let mut missing = HashSet::new();
            for l in &m.locations {
                match packs.get(&l.pack) {
                    None => {
                        if missing.insert(l.pack) {
                            r.problems
                                .push(format!("{}: missing; {what} needs it", pack_key(&l.pack)));
                        }
                        continue;
                    }
                    Some(&size) if l.offset + l.len as u64 > size => {
                        if missing.insert(l.pack) {
                            r.problems.push(format!(
                                "{}: is {size} bytes; {what} locates a blob up to byte {}",
                                pack_key(&l.pack),
                                l.offset + l.len as u64
                            ));
                        }
                        continue;
                    }
                    Some(_) => {}
                }
                uses.entry(l.pack)
                    .or_insert_with(|| (what.clone(), Vec::new()))
                    .1
                    .push(*l);
            }
        }
    }
    for o in store.list(index::INDEX_PREFIX)? {
        r.indexes += 1;
        if let Err(why) = index::load(store, key, &o.key, o.size)? {
            r.problems.push(format!("{}: {why}", o.key));
        }
    }
    r.packs_referenced = uses.len() as u64;
    if vms.is_empty() && all_heads_ok {
        r.packs_orphaned = packs.keys().filter(|p| !uses.contains_key(*p)).count() as u64;
    }
    if deep {
        let total: u64 = uses.keys().map(|p| packs[p]).sum();
        let task = progress.task("packs", total);
        let mut todo = uses.into_iter();
        let work = |(id, (what, locs)): (PackId, (String, Vec<Location>))| -> Result<(Vec<String>, u64, u64, u64)> {
            let pkey = pack_key(&id);
            let size = packs[&id];
            let mut problems = Vec::new();
            let (mut blobs, mut bytes) = (0u64, 0u64);
            if size > pack::MAX_PACK_LEN {
                problems.push(format!("{pkey}: is {size} bytes, more than a pack may be"));
                return Ok((problems, 0, 0, size));
            }
            let Some(data) = store.get(&pkey)? else {
                problems.push(format!("{pkey}: missing; {what} needs it"));
                return Ok((problems, 0, 0, size));
            };
            let entries = match pack::read_trailer(key, &id, &data) {
                Ok(e) => e,
                Err(why) => {
                    problems.push(format!("{pkey}: {why}"));
                    Vec::new()
                }
            };
            let mut good = HashSet::new();
            for e in &entries {
                let blob = &data[e.offset as usize..(e.offset + e.len as u64) as usize];
                match pack::open_block(key, &e.block, blob) {
                    Ok(plain) if key.block_id(&block_digest(&plain)) == e.block => {
                        blobs += 1;
                        bytes += plain.len() as u64;
                        good.insert((e.block, e.offset, e.len));
                    }
                    Ok(_) => problems.push(format!(
                        "{pkey}: blob at offset {}: its bytes are not the block it is named for",
                        e.offset
                    )),
                    Err(why) => problems.push(format!("{pkey}: blob at offset {}: {why}", e.offset)),
                }
            }
            let mut bad_locs = 0;
            for l in &locs {
                if !good.contains(&(l.block, l.offset, l.len)) {
                    // A blob the trailer lists but that failed was reported above; one
                    // the trailer does not list (or an unreadable trailer) is named here.
                    let listed = entries.iter().any(|e| (e.block, e.offset, e.len) == (l.block, l.offset, l.len));
                    if !listed {
                        bad_locs += 1;
                    }
                }
            }
            if bad_locs > 0 && !entries.is_empty() {
                problems.push(format!(
                    "{pkey}: {bad_locs} blobs {what} locates are not blobs of the pack"
                ));
            } else if bad_locs > 0 {
                problems.push(format!("{pkey}: {what} cannot be proven from it"));
            }
            Ok((problems, blobs, bytes, size))
        };
        pipeline::ordered(
            crate::engine::cpu_threads(),
            crate::engine::cpu_threads() * 2,
            || Ok(todo.next()),
            work,
            |(problems, blobs, bytes, size)| {
                r.problems.extend(problems);
                r.blobs_verified += blobs;
                r.bytes_verified += bytes;
                task.advance(size);
                Ok(())
            },
        )?;
        task.finish();
    }
    Ok(r)
}

/// One generation as `status --from` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct OffsiteGeneration {
    /// The generation id.
    pub id: GenerationId,
    /// When the backup started.
    pub time: String,
    /// What the backup run did.
    pub mode: String,
    /// Whether it is protected.
    pub protected: bool,
    /// The sum of its disks' sizes.
    pub size: u64,
    /// Bytes of its non-zero blocks.
    pub data_bytes: u64,
    /// Its disks: (name, size).
    pub disks: Vec<(String, u64)>,
    /// When it was synced.
    pub synced: String,
    /// Its manifest.
    pub manifest: String,
}

/// One VM as `status --from` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct OffsiteVm {
    /// The VM's name.
    pub name: String,
    /// Its generations, newest first.
    pub generations: Vec<OffsiteGeneration>,
}

/// What `status --from` shows.
#[derive(Debug, Clone, Serialize)]
pub struct OffsiteStatus {
    /// The target.
    pub target: String,
    /// The id of its key.
    pub key_id: String,
    /// When its first sync made it.
    pub created: String,
    /// Its VMs, by name.
    pub vms: Vec<OffsiteVm>,
    /// Manifests that do not open with this key.
    pub unreadable: Vec<String>,
    /// Objects and bytes: every object, packs, manifests, index objects, locks.
    pub objects: u64,
    /// Bytes of all objects.
    pub bytes: u64,
    /// Packs.
    pub packs: u64,
    /// Bytes of packs.
    pub pack_bytes: u64,
    /// Index objects.
    pub indexes: u64,
    /// Lock objects (syncs or prunes running, or killed).
    pub locks: u64,
}

/// `status --from TARGET`: the VMs and generations on the target (from the manifests'
/// heads) and what its objects add up to.
pub fn status_from(store: &dyn ObjectStore, key: &OffsiteKey) -> Result<OffsiteStatus> {
    let cfg = target::check_config(store, key, false)?;
    let all = store.list("")?;
    let mut s = OffsiteStatus {
        target: store.describe(),
        key_id: cfg.key_id,
        created: cfg.created,
        vms: Vec::new(),
        unreadable: Vec::new(),
        objects: all.len() as u64,
        bytes: all.iter().map(|o| o.size).sum(),
        packs: 0,
        pack_bytes: 0,
        indexes: 0,
        locks: 0,
    };
    for o in &all {
        if o.key.starts_with("packs/") {
            s.packs += 1;
            s.pack_bytes += o.size;
        } else if o.key.starts_with(index::INDEX_PREFIX) {
            s.indexes += 1;
        } else if o.key.starts_with(target::LOCK_PREFIX) {
            s.locks += 1;
        }
    }
    let mut vms: BTreeMap<String, Vec<OffsiteGeneration>> = BTreeMap::new();
    for l in list_manifests(store, key, MANIFEST_PREFIX)? {
        match l.head {
            Ok(h) => vms
                .entry(h.vm.clone())
                .or_default()
                .push(OffsiteGeneration {
                    id: h.generation.clone(),
                    time: h.time.clone(),
                    mode: h.mode.to_string(),
                    protected: h.protected,
                    size: h.disks.iter().map(|d| d.size).sum(),
                    data_bytes: h.disks.iter().map(|d| d.data_bytes).sum(),
                    disks: h.disks.iter().map(|d| (d.name.clone(), d.size)).collect(),
                    synced: h.synced.clone(),
                    manifest: l.object.key,
                }),
            Err(_) => s.unreadable.push(l.object.key),
        }
    }
    s.vms = vms
        .into_iter()
        .map(|(name, mut generations)| {
            generations.sort_by(|a, b| b.id.cmp(&a.id));
            OffsiteVm { name, generations }
        })
        .collect();
    Ok(s)
}
