//! `sync`: copy the finished generations of a repository to an offsite target.
//!
//! For each VM, every local generation whose manifest the target lacks is copied, oldest
//! first: the generation is pinned (prune leaves it alone; the local repository is
//! otherwise only read), each disk opened through its proven view, and every non-zero
//! block the target does not hold yet (by block id, across generations and VMs: the
//! target's index objects and this run's own blocks) read, verified against its digest,
//! sealed and appended to a pack. Full packs are uploaded by `jobs` threads; an index
//! object is written after every [`INDEX_EVERY`] packs and after each generation; the
//! generation's manifest goes last, once every pack it references exists (its commit
//! point).
//!
//! A sync killed anywhere leaves packs (the last ones maybe not indexed) and no manifest
//! for the generation it was copying; the next sync finds the indexed blocks and uploads
//! at most the blocks of the unindexed packs again. Their orphans are pruned later.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::archive::digest::{Digest, ZERO_DIGEST};
use crate::archive::format::{block_len, DIGEST_LEN};
use crate::archive::pin::Pin;
use crate::archive::profile::{self, GenerationProfile};
use crate::archive::view::{DiskView, Loc, Segment};
use crate::archive::{state, Generation, GenerationId, Repository};
use crate::engine::pipeline;
use crate::error::{Error, ErrorKind, Result};
use crate::offsite::index;
use crate::offsite::key::{random_hex, BlockId, OffsiteKey};
use crate::offsite::manifest::{self, DiskMap, Head, HeadDisk, ManifestParts};
use crate::offsite::pack::{self, pack_key, Location, PackId, PackWriter, SealedPack};
use crate::offsite::store::ObjectStore;
use crate::offsite::target::{self, RunLock};
use crate::progress::Progress;

/// An index object is written after this many packs (and after each generation).
pub const INDEX_EVERY: usize = 16;
/// Image blocks are read and sealed in runs of at most this many bytes.
const CHUNK: u64 = 4 << 20;
/// Digests planned at once.
const DIGEST_WINDOW: u64 = 1 << 14;
/// Bytes of planned reads announced to the kernel ahead of the job handed out (the view
/// turns the kernel's own readahead off: the planner says what it will read).
const READ_AHEAD: u64 = 32 << 20;
/// The most a saved domain or checkpoint XML may be to be copied.
const MAX_XML: u64 = 16 << 20;

/// What `vmkeep sync` asks for.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Uploads at once.
    pub jobs: usize,
    /// Upload at most this many bytes per second, on average (`None`: no limit).
    pub limit_rate: Option<u64>,
    /// Close a pack once its blobs reach this size.
    pub pack_size: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            jobs: 4,
            limit_rate: None,
            pack_size: pack::DEFAULT_PACK_SIZE,
        }
    }
}

/// What a sync did for one VM.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmSync {
    /// The VM.
    pub vm: String,
    /// The generations copied by this run, oldest first.
    pub synced: Vec<GenerationId>,
    /// Local generations the target already had.
    pub present: usize,
    /// Local generations removed (by prune) before they could be copied.
    pub skipped: Vec<GenerationId>,
}

/// What a sync did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// The target, as its store describes it.
    pub target: String,
    /// Each VM, in the order asked for.
    pub vms: Vec<VmSync>,
    /// Generations copied.
    pub generations_synced: u64,
    /// Bytes of non-zero blocks of the copied generations (each disk, each block).
    pub bytes_total: u64,
    /// Bytes read from the local repository (the new blocks).
    pub bytes_read: u64,
    /// Bytes of blocks the target did not hold, uploaded (before compression).
    pub bytes_new: u64,
    /// Bytes of blocks the target already held, or that this run uploaded before
    /// (another generation, disk or VM): not uploaded again.
    pub bytes_deduplicated: u64,
    /// Bytes uploaded (packs, index objects, manifests: sealed and compressed).
    pub bytes_uploaded: u64,
    /// Objects written (packs, index objects, manifests; not the lock object).
    pub objects_written: u64,
    /// Packs uploaded.
    pub packs_written: u64,
}

/// Copy every local generation of `vms` that `store` lacks, sealed with `key`.
pub fn sync(
    repo: &Repository,
    vms: &[String],
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    opts: &SyncOptions,
    progress: &dyn Progress,
) -> Result<SyncReport> {
    // Every VM is opened before anything is written to the target: a mistyped name is
    // one error and no lock object.
    let archives = vms.iter().map(|v| repo.vm(v)).collect::<Result<Vec<_>>>()?;
    let run = random_hex(16)?;
    target::check_config(store, key, true)?;
    let lock = RunLock::write(store, &run, "sync")?;
    let limiter = opts.limit_rate.map(Limiter::new);
    let ctx = Ctx {
        store,
        key,
        limiter: limiter.as_ref(),
        counters: Mutex::new(Counters::default()),
    };
    let known = Mutex::new(known_blocks(&ctx, progress)?);
    let shared = Shared::default();
    let jobs = opts.jobs.max(1);
    let result = std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<SealedPack>(jobs);
        for _ in 0..jobs {
            let (rx, shared, ctx) = (rx.clone(), &shared, &ctx);
            s.spawn(move || upload_packs(rx, shared, ctx));
        }
        drop(rx);
        let mut run_state = Run {
            ctx: &ctx,
            lock: &lock,
            opts,
            run: &run,
            tx: Some(tx),
            shared: &shared,
            known: &known,
            pack: None,
            indexes: 0,
        };
        let mut report = SyncReport {
            target: store.describe(),
            ..Default::default()
        };
        let done = (|| -> Result<()> {
            for archive in &archives {
                crate::interrupt::check()?;
                let mut vm = VmSync {
                    vm: archive.name.clone(),
                    ..Default::default()
                };
                let listed: HashSet<String> = store
                    .list(&manifest::vm_prefix(key, &archive.name))?
                    .into_iter()
                    .map(|o| o.key)
                    .collect();
                for id in archive.generation_ids()? {
                    crate::interrupt::check()?;
                    let mkey = manifest::manifest_key(key, &archive.name, id.as_str());
                    if listed.contains(&mkey) {
                        vm.present += 1;
                        continue;
                    }
                    match run_state.generation(archive, &id, &mkey, progress) {
                        Ok(()) => vm.synced.push(id),
                        Err(e) if e.kind() == ErrorKind::Usage && !archive_has(archive, &id) => {
                            progress.warn(&format!(
                                "VM {}: generation {id} was removed locally before it was copied",
                                archive.name
                            ));
                            vm.skipped.push(id);
                        }
                        Err(e) => return Err(e),
                    }
                }
                report.vms.push(vm);
            }
            Ok(())
        })();
        // Whatever happened, what was uploaded is indexed for the next run.
        let flushed = run_state.finish(done.is_ok());
        drop(run_state);
        done.and(flushed).map(|()| report)
    });
    let mut report = result?;
    lock.release()?;
    let c = ctx.counters.into_inner().unwrap_or_else(|e| e.into_inner());
    report.bytes_read = c.bytes_read;
    report.bytes_new = c.bytes_new;
    report.bytes_deduplicated = c.bytes_dedup;
    report.bytes_total = c.bytes_total;
    report.bytes_uploaded = c.bytes_uploaded;
    report.objects_written = c.objects;
    report.packs_written = c.packs;
    report.generations_synced = report.vms.iter().map(|v| v.synced.len() as u64).sum();
    Ok(report)
}

fn archive_has(archive: &crate::archive::VmArchive, id: &GenerationId) -> bool {
    archive.generation_ids().is_ok_and(|ids| ids.contains(id))
}

/// The blocks the target's index objects locate, in packs that are listed with room for
/// the blob (an entry is a hint; one naming a pack that is gone is dropped).
fn known_blocks(
    ctx: &Ctx<'_>,
    progress: &dyn Progress,
) -> Result<HashMap<BlockId, Option<Location>>> {
    let packs: HashMap<PackId, u64> = ctx
        .store
        .list("packs/")?
        .into_iter()
        .filter_map(|o| Some((pack::pack_of_key(&o.key)?, o.size)))
        .collect();
    let mut known = HashMap::new();
    for o in ctx.store.list(index::INDEX_PREFIX)? {
        match index::load(ctx.store, ctx.key, &o.key, o.size)? {
            Ok(entries) => {
                for l in entries {
                    if packs
                        .get(&l.pack)
                        .is_some_and(|&size| l.offset + l.len as u64 <= size)
                    {
                        known.insert(l.block, Some(l));
                    }
                }
            }
            Err(why) => progress.warn(&format!(
                "index object {} {why}; ignored (run check --from)",
                o.key
            )),
        }
    }
    Ok(known)
}

/// What every part of the run shares.
struct Ctx<'a> {
    store: &'a dyn ObjectStore,
    key: &'a OffsiteKey,
    limiter: Option<&'a Limiter>,
    counters: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    bytes_total: u64,
    bytes_read: u64,
    bytes_new: u64,
    bytes_dedup: u64,
    bytes_uploaded: u64,
    objects: u64,
    packs: u64,
}

impl Ctx<'_> {
    /// Upload object `key` whole, within the rate limit, counted.
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        if let Some(l) = self.limiter {
            l.take(data.len() as u64);
        }
        self.store.put(key, data)?;
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.bytes_uploaded += data.len() as u64;
        c.objects += 1;
        Ok(())
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.counters.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A token bucket on upload bytes: each upload waits until the bytes before it have had
/// their time at `rate` bytes per second.
struct Limiter {
    rate: u64,
    next: Mutex<Instant>,
}

impl Limiter {
    fn new(rate: u64) -> Limiter {
        Limiter {
            rate: rate.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    fn take(&self, bytes: u64) {
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
            start
        };
        let now = Instant::now();
        if start > now {
            std::thread::sleep(start - now);
        }
    }
}

/// The uploads in flight, shared with the upload threads.
#[derive(Default)]
struct Shared {
    state: Mutex<UpState>,
    changed: Condvar,
}

#[derive(Default)]
struct UpState {
    in_flight: usize,
    /// Locations in packs uploaded since the last index object.
    unindexed: Vec<Location>,
    /// Packs uploaded since the last index object.
    unindexed_packs: usize,
    error: Option<Error>,
}

fn upload_packs(rx: crossbeam_channel::Receiver<SealedPack>, shared: &Shared, ctx: &Ctx<'_>) {
    for p in rx {
        let failed = shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .error
            .is_some();
        let result = if failed {
            Ok(())
        } else {
            ctx.put(&pack_key(&p.id), &p.data)
        };
        {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(()) if !failed => {
                    st.unindexed.extend_from_slice(&p.locations);
                    st.unindexed_packs += 1;
                    ctx.count(|c| c.packs += 1);
                }
                Ok(()) => {}
                Err(e) => {
                    st.error.get_or_insert(e);
                }
            }
            st.in_flight -= 1;
        }
        shared.changed.notify_all();
        crate::fault::pause("sync-pack-uploaded");
    }
}

/// The state of the run while generations are copied.
struct Run<'a, 'c> {
    ctx: &'a Ctx<'c>,
    lock: &'a RunLock<'c>,
    opts: &'a SyncOptions,
    run: &'a str,
    tx: Option<crossbeam_channel::Sender<SealedPack>>,
    shared: &'a Shared,
    known: &'a Mutex<HashMap<BlockId, Option<Location>>>,
    pack: Option<PackWriter>,
    indexes: u32,
}

/// One piece of work: new blocks to read and seal.
enum Job {
    /// Image blocks `[start, end)`, all new and non-zero, with their digests and ids.
    Image {
        start: u64,
        end: u64,
        digests: Vec<u8>,
        ids: Vec<BlockId>,
    },
    /// A block held by a reverse-diff record.
    Record {
        block: u64,
        chain: u32,
        rec: u32,
        id: BlockId,
    },
}

/// Sealed blobs of new blocks: (block id, blob, the block's length).
type Sealed = Vec<(BlockId, Vec<u8>, u64)>;

impl Run<'_, '_> {
    /// Copy generation `id` of `archive` (manifest `mkey`).
    fn generation(
        &mut self,
        archive: &crate::archive::VmArchive,
        id: &GenerationId,
        mkey: &str,
        progress: &dyn Progress,
    ) -> Result<()> {
        // Pin first, then open: once pinned, prune no longer drops it under us.
        let pin = Pin::acquire(&archive.dir, id, "sync")?;
        let chosen = archive.select_pinned(&pin)?;
        let g = chosen.generation();
        let (profile_text, profile) = profile_text(g)?;
        let states = state::read_all_verified(&g.dir, &g.profile.state)?;
        let mut disks = Vec::new();
        let mut head_disks = Vec::new();
        for d in &g.profile.disks {
            let view = chosen.view(&d.name)?;
            let map = self.disk(&archive.name, &view, progress)?;
            let (blocks, data_bytes) = nonzero(&map, d.size, g.profile.block_size);
            head_disks.push(HeadDisk {
                name: d.name.clone(),
                size: d.size,
                digest_root: d.digest_root.clone(),
                blocks,
                data_bytes,
            });
            disks.push(map);
        }
        // Every pack the manifest will name is uploaded before it.
        self.close_pack()?;
        self.wait_uploads()?;
        self.write_index(1)?;
        let (mut locations, mut slot): (Vec<Location>, HashMap<BlockId, u32>) =
            (Vec::new(), HashMap::new());
        {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            for map in &mut disks {
                for b in 0..map.blocks() {
                    let digest = map.digest(b);
                    if digest == ZERO_DIGEST {
                        continue;
                    }
                    let bid = self.ctx.key.block_id(&digest);
                    let i = match slot.get(&bid) {
                        Some(&i) => i,
                        None => {
                            let loc = known.get(&bid).copied().flatten().ok_or_else(|| {
                                Error::usage(format!(
                                    "internal error: block {b} of generation {id} has no location"
                                ))
                            })?;
                            locations.push(loc);
                            slot.insert(bid, locations.len() as u32 - 1);
                            locations.len() as u32 - 1
                        }
                    };
                    map.refs.push(i);
                }
            }
        }
        let read_xml = |p: std::path::PathBuf| -> Result<Option<String>> {
            match std::fs::metadata(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(&p, e)),
                Ok(m) if m.len() > MAX_XML => Err(Error::corrupt(&p, "too large")),
                Ok(_) => Ok(Some(
                    std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?,
                )),
            }
        };
        let head = Head {
            format: manifest::MANIFEST_FORMAT,
            vm: archive.name.clone(),
            generation: id.clone(),
            time: profile.time.clone(),
            mode: profile.mode,
            consistency: profile.consistency,
            protected: profile.protected,
            block_size: profile.block_size,
            profile_text,
            domain_xml: read_xml(g.domain_xml_path())?,
            checkpoint_xml: read_xml(g.checkpoint_xml_path())?,
            state: states.iter().map(|s| s.record.clone()).collect(),
            disks: head_disks,
            locations: 0,
            packs: Vec::new(),
            synced: profile::now_rfc3339(),
            body_len: 0,
            body_hash: String::new(),
        };
        let state_bytes: Vec<Vec<u8>> = states.into_iter().map(|s| s.bytes).collect();
        let data = manifest::encode(
            self.ctx.key,
            mkey,
            ManifestParts {
                head,
                state: &state_bytes,
                disks: &disks,
                locations: &locations,
            },
        )?;
        self.ctx.put(mkey, &data)?;
        crate::fault::pause("sync-manifest-written");
        self.lock.refresh("sync")?;
        drop(pin);
        Ok(())
    }

    /// Plan, read, seal and pack the new blocks of one disk; its digests.
    fn disk(&mut self, vm: &str, view: &DiskView, progress: &dyn Progress) -> Result<DiskMap> {
        let task = progress.task(&format!("{vm}/{}", view.disk), view.size);
        view.planned_reads();
        let mut planner = Planner {
            view,
            key: self.ctx.key,
            known: self.known,
            ctx: self.ctx,
            segments: view.segments().into_iter(),
            current: None,
            digests: Vec::with_capacity(view.blocks() as usize * DIGEST_LEN),
            queue: VecDeque::new(),
            prefetched: 0,
            ahead: 0,
            planned: false,
            per_chunk: (CHUNK / view.block_size as u64).max(1),
            task: task.as_ref(),
        };
        let key = self.ctx.key;
        let ctx = self.ctx;
        let bs = view.block_size as u64;
        let work = |job: Job| -> Result<Sealed> {
            let mut out = Vec::new();
            match job {
                Job::Image {
                    start,
                    end,
                    digests,
                    ids,
                } => {
                    let len = ((end * bs).min(view.size) - start * bs) as usize;
                    let mut buf = vec![0u8; len];
                    let bad = view.read_image_verified(start, end, &digests, &mut buf)?;
                    if let Some(b) = bad.first() {
                        return Err(view.block_damage(format!(
                            "block {b} fails its digest; the sync was stopped"
                        )));
                    }
                    for (i, id) in ids.iter().enumerate() {
                        let from = i * bs as usize;
                        let to = (from + bs as usize).min(len);
                        out.push((
                            *id,
                            pack::seal_block(key, id, &buf[from..to])?,
                            (to - from) as u64,
                        ));
                    }
                }
                Job::Record {
                    block,
                    chain,
                    rec,
                    id,
                } => {
                    let blk = view.read_record(chain, rec)?;
                    if !blk.ok {
                        return Err(view.block_damage(format!(
                            "block {block} fails its digest; the sync was stopped"
                        )));
                    }
                    let n = block_len(block, view.size, view.block_size);
                    out.push((id, pack::seal_block(key, &id, &blk.data[..n])?, n as u64));
                }
            }
            let read: u64 = out.iter().map(|o| o.2).sum();
            ctx.count(|c| c.bytes_read += read);
            Ok(out)
        };
        let workers = crate::engine::cpu_threads();
        let sink = |sealed: Sealed| -> Result<()> { self.add_blobs(sealed) };
        pipeline::ordered(workers, workers * 3, || planner.next(), work, sink)?;
        task.finish();
        Ok(DiskMap {
            digests: planner.digests,
            refs: Vec::new(),
        })
    }

    /// Append sealed blobs to the open pack, closing it when full.
    fn add_blobs(&mut self, sealed: Sealed) -> Result<()> {
        for (id, blob, n) in sealed {
            if self.pack.is_none() {
                self.pack = Some(PackWriter::new(self.opts.pack_size)?);
            }
            let pack = self.pack.as_mut().expect("made above");
            let loc = pack.add(id, &blob);
            self.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, Some(loc));
            self.ctx.count(|c| c.bytes_new += n);
            if pack.len() >= self.opts.pack_size {
                self.close_pack()?;
                self.write_index(INDEX_EVERY)?;
            }
        }
        Ok(())
    }

    /// Seal the open pack (if it has a blob) and hand it to the upload threads.
    fn close_pack(&mut self) -> Result<()> {
        let Some(p) = self.pack.take() else {
            return Ok(());
        };
        if p.is_empty() {
            return Ok(());
        }
        let sealed = p.finish(self.ctx.key)?;
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            st.in_flight += 1;
        }
        let tx = self.tx.as_ref().expect("uploads open");
        if tx.send(sealed).is_err() {
            return Err(Error::usage("internal error: the upload threads stopped"));
        }
        Ok(())
    }

    /// Wait until every pack handed out is uploaded; the first upload error.
    fn wait_uploads(&self) -> Result<()> {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.in_flight > 0 {
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Write an index object of the packs uploaded since the last one, when there are at
    /// least `min_packs` of them.
    fn write_index(&mut self, min_packs: usize) -> Result<()> {
        let entries = {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.unindexed_packs < min_packs.max(1) {
                return Ok(());
            }
            st.unindexed_packs = 0;
            std::mem::take(&mut st.unindexed)
        };
        let key = index::index_key(self.run, self.indexes);
        self.indexes += 1;
        let data = index::encode(self.ctx.key, &key, &entries)?;
        self.ctx.put(&key, &data)?;
        crate::fault::pause("sync-index-written");
        Ok(())
    }

    /// End the run: upload the open pack (when `ok`), stop the upload threads, index what
    /// they uploaded.
    fn finish(&mut self, ok: bool) -> Result<()> {
        let closed = if ok { self.close_pack() } else { Ok(()) };
        self.tx = None;
        let waited = self.wait_uploads();
        let indexed = self.write_index(1);
        closed.and(waited).and(indexed)
    }
}

/// The count and bytes of the non-zero blocks of `map`.
fn nonzero(map: &DiskMap, size: u64, bs: u32) -> (u64, u64) {
    let (mut n, mut bytes) = (0, 0);
    for b in 0..map.blocks() {
        if map.digest(b) != ZERO_DIGEST {
            n += 1;
            bytes += block_len(b, size, bs) as u64;
        }
    }
    (n, bytes)
}

/// The generation profile's text as it is on disk, checked and parsed (it must be the
/// generation the view was proven for).
fn profile_text(g: &Generation) -> Result<(String, GenerationProfile)> {
    let path = g.profile_path();
    let file = crate::fsutil::open_ro(&path)?;
    let mut text = String::new();
    use std::io::Read;
    (&file)
        .take(profile::MAX_PROFILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(&path, e))?;
    let p: GenerationProfile = profile::parse(&path, &text)?;
    if p.id != g.id || p.disks != g.profile.disks || p.block_size != g.profile.block_size {
        return Err(Error::corrupt(
            &path,
            "changed while the generation was read",
        ));
    }
    Ok((text, p))
}

/// Plans the blocks of one disk: records every digest in order, and hands out jobs for
/// the non-zero blocks the target lacks (each block id once per run).
struct Planner<'a, 'c> {
    view: &'a DiskView,
    key: &'a OffsiteKey,
    known: &'a Mutex<HashMap<BlockId, Option<Location>>>,
    ctx: &'a Ctx<'c>,
    segments: std::vec::IntoIter<Segment>,
    /// The image segment being planned, and the next block of it.
    current: Option<(Segment, u64)>,
    digests: Vec<u8>,
    queue: VecDeque<Job>,
    /// The jobs at the front of `queue` whose reads were announced ([`READ_AHEAD`]).
    prefetched: usize,
    /// Their bytes.
    ahead: u64,
    /// Whether every segment is planned.
    planned: bool,
    per_chunk: u64,
    task: &'a dyn crate::progress::Task,
}

impl Planner<'_, '_> {
    fn next(&mut self) -> Result<Option<Job>> {
        while self.ahead < READ_AHEAD {
            if let Some(job) = self.queue.get(self.prefetched) {
                self.ahead += self.prefetch(job);
                self.prefetched += 1;
            } else if self.planned || !self.plan_more()? {
                self.planned = true;
                break;
            }
        }
        let job = self.queue.pop_front();
        if let Some(j) = &job {
            if self.prefetched > 0 {
                self.prefetched -= 1;
                self.ahead -= self.job_bytes(j);
            }
        }
        Ok(job)
    }

    /// The bytes `job` reads, about (a whole last block).
    fn job_bytes(&self, job: &Job) -> u64 {
        let bs = self.view.block_size as u64;
        match *job {
            Job::Image { start, end, .. } => (end - start) * bs,
            Job::Record { .. } => bs,
        }
    }

    /// Tell the kernel `job` will be read soon; its bytes.
    fn prefetch(&self, job: &Job) -> u64 {
        match *job {
            Job::Image { start, end, .. } => self.view.prefetch_image(start, end),
            Job::Record { chain, rec, .. } => self.view.prefetch_record(chain, rec),
        }
        self.job_bytes(job)
    }

    /// Whether `digest` is a block to upload (and mark it so); counts the rest.
    fn is_new(&self, b: u64, digest: &Digest) -> Option<BlockId> {
        let n = block_len(b, self.view.size, self.view.block_size) as u64;
        let id = self.key.block_id(digest);
        let fresh = {
            let mut k = self.known.lock().unwrap_or_else(|e| e.into_inner());
            match k.entry(id) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(None);
                    true
                }
            }
        };
        self.ctx.count(|c| {
            c.bytes_total += n;
            if !fresh {
                c.bytes_dedup += n;
            }
        });
        fresh.then_some(id)
    }

    fn plan_more(&mut self) -> Result<bool> {
        let bs = self.view.block_size as u64;
        if let Some((seg, pos)) = self.current {
            let end = (pos + DIGEST_WINDOW).min(seg.end);
            let mut ds = vec![0u8; ((end - pos) as usize) * DIGEST_LEN];
            self.view.image_digests(pos, &mut ds)?;
            self.digests.extend_from_slice(&ds);
            let mut run: Option<(u64, Vec<u8>, Vec<BlockId>)> = None;
            for b in pos..end {
                let i = (b - pos) as usize * DIGEST_LEN;
                let d: Digest = ds[i..i + DIGEST_LEN].try_into().expect("32");
                let id = if d == ZERO_DIGEST {
                    None
                } else {
                    self.is_new(b, &d)
                };
                match (id, &mut run) {
                    (Some(id), Some((s, rd, ids)))
                        if *s + ids.len() as u64 == b && (ids.len() as u64) < self.per_chunk =>
                    {
                        rd.extend_from_slice(&d);
                        ids.push(id);
                    }
                    (Some(id), _) => {
                        self.push_run(run.take());
                        run = Some((b, d.to_vec(), vec![id]));
                    }
                    (None, _) => self.push_run(run.take()),
                }
            }
            self.push_run(run);
            self.task
                .advance(((end - pos) * bs).min(self.view.size - pos * bs));
            self.current = (end < seg.end).then_some((seg, end));
            return Ok(true);
        }
        let Some(seg) = self.segments.next() else {
            return Ok(false);
        };
        let bytes = ((seg.end * bs).min(self.view.size)).saturating_sub(seg.start * bs);
        match seg.loc {
            Loc::Zero => {
                self.digests.resize(
                    self.digests.len() + ((seg.end - seg.start) as usize) * DIGEST_LEN,
                    0,
                );
                self.task.advance(bytes);
            }
            Loc::Record { chain, rec } => {
                let d = self.view.chain()[chain as usize].record_digest(rec as usize)?;
                self.digests.extend_from_slice(&d);
                if d != ZERO_DIGEST {
                    if let Some(id) = self.is_new(seg.start, &d) {
                        self.queue.push_back(Job::Record {
                            block: seg.start,
                            chain,
                            rec,
                            id,
                        });
                    }
                }
                self.task.advance(bytes);
            }
            Loc::Image => self.current = Some((seg, seg.start)),
        }
        Ok(true)
    }

    fn push_run(&mut self, run: Option<(u64, Vec<u8>, Vec<BlockId>)>) {
        if let Some((start, digests, ids)) = run {
            self.queue.push_back(Job::Image {
                start,
                end: start + ids.len() as u64,
                digests,
                ids,
            });
        }
    }
}
