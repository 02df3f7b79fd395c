//! `check`: find damage anywhere in a VM's archive. Read-only apart from finishing an
//! interrupted command (which it reports) and recording its own result in `vm.toml`.
//!
//! Fast mode validates every file's structure and checksum and the newest image against
//! its digests. Deep mode also decompresses every reverse-diff record and proves its digest,
//! then, for each requested generation, resolves every block to where a restore would take
//! it from and proves that the digests of those sources hash to the generation's recorded
//! digest root. Because every source block is verified against its digest, the two together
//! prove that a restore of that generation returns what was read at backup time.

use std::collections::{HashSet, VecDeque};
use std::path::Path;

use serde::Serialize;

use crate::archive::digest::{block_digest, DigestReader, RootHasher, ZERO_DIGEST};
use crate::archive::format::{block_len, DIGEST_LEN};
use crate::archive::lock::VmLock;
use crate::archive::profile::{self, CheckRecord};
use crate::archive::rdiff::RdiffReader;
use crate::archive::view::{open_rdiff, DiskView, Loc};
use crate::archive::{
    generation_bytes, names, txn, Generation, GenerationId, Repository, VmArchive,
};
use crate::bufpool::BufPool;
use crate::engine::pipeline;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Which generations a deep check reconstructs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenSelect {
    /// Every generation (`--generation all`).
    All,
    /// The one generation a REV names (`--generation REV`): an id or unique prefix, N (0 =
    /// newest) or `latest`.
    Rev(String),
}

/// One piece of damage.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The VM the damage is in.
    pub vm: String,
    /// The generation it is in, when it is in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// The disk it is in, when it concerns one disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The damaged file, relative to the repository.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Damaged bytes of the disk, `[start, end)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub range: Option<(u64, u64)>,
    /// What is wrong, in one line.
    pub detail: String,
}

impl Problem {
    /// A problem of VM `vm`; `detail` says what is wrong. The setters below say where.
    pub fn new(vm: &str, detail: impl Into<String>) -> Problem {
        Problem {
            vm: vm.to_string(),
            generation: None,
            disk: None,
            file: None,
            range: None,
            detail: detail.into(),
        }
    }

    /// In generation `id`.
    pub fn generation(mut self, id: &str) -> Problem {
        self.generation = Some(id.to_string());
        self
    }

    /// Of disk `name`.
    pub fn disk(mut self, name: &str) -> Problem {
        self.disk = Some(name.to_string());
        self
    }

    /// In `file` (relative to the repository).
    pub fn file(mut self, file: impl Into<String>) -> Problem {
        self.file = Some(file.into());
        self
    }

    /// Damaged bytes `[start, end)` of the disk.
    pub fn bytes(mut self, (start, end): (u64, u64)) -> Problem {
        self.range = Some((start, end));
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VM {}", self.vm)?;
        if let Some(g) = &self.generation {
            write!(f, " generation {g}")?;
        }
        if let Some(d) = &self.disk {
            write!(f, " disk {d}")?;
        }
        if let Some((a, b)) = self.range {
            write!(f, " bytes {a}..{b}")?;
        }
        write!(f, ": {}", self.detail)?;
        if let Some(file) = &self.file {
            write!(f, " ({file})")?;
        }
        Ok(())
    }
}

/// What a check found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The VM checked.
    pub vm: String,
    /// Whether it was a deep check.
    pub deep: bool,
    /// Number of generations the VM folder lists.
    pub generations: usize,
    /// Number of generations a deep check resolved block by block and proved against their
    /// digest roots (0 for a fast check).
    pub generations_proven: usize,
    /// Bytes read and verified: newest-image bytes checked against their digests plus the
    /// length of every reverse-diff file hashed.
    pub bytes_verified: u64,
    /// One line per recovery of an interrupted command that the check performed first.
    pub recovered: Vec<String>,
    /// Every problem found; empty when the archive is sound.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// Whether no problem was found (exit status 0; any problem makes it 3).
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Checker<'a> {
    repo: &'a Repository,
    vm: String,
    problems: Vec<Problem>,
    bytes: u64,
    /// Damaged image blocks of the newest generation: (disk, block).
    bad_image: HashSet<(String, u64)>,
    /// An interrupted backup awaits its rollback: the newest image may hold its writes,
    /// whose overwritten blocks are in the journal beside it.
    pending: bool,
    /// Damaged reverse-diff records: (generation, disk, block).
    bad_records: HashSet<(GenerationId, String, u64)>,
    progress: &'a dyn Progress,
}

/// Check one VM.
pub fn check(
    repo: &Repository,
    vm: &str,
    deep: bool,
    select: &GenSelect,
    progress: &dyn Progress,
) -> Result<CheckReport> {
    let dir = repo.vm_dir(vm)?;
    if !names::vm_profile(&dir).exists() && !names::txn_file(&dir).exists() {
        return Err(Error::usage(format!(
            "unknown VM {vm:?}: no backups of it in {}",
            repo.root().display()
        )));
    }
    // A read-only repository (an offsite copy mounted ro, say) is checked as it is: no
    // lock, no recovery, no result recorded.
    let lock = match VmLock::acquire(&dir, vm, "check") {
        Ok(l) => Some(l),
        Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EROFS) => None,
        Err(e) => return Err(e),
    };
    let mut c = Checker {
        repo,
        vm: vm.to_string(),
        problems: Vec::new(),
        bytes: 0,
        bad_image: HashSet::new(),
        pending: false,
        bad_records: HashSet::new(),
        progress,
    };
    if lock.is_none() && names::txn_file(&dir).exists() {
        let detail =
            "an interrupted command awaits recovery, which a read-only repository cannot do";
        c.found(c.vm_problem(detail).file(c.rel(&names::txn_file(&dir))));
    }
    let mut pending = false;
    let recovered = if lock.is_none() {
        Vec::new()
    } else {
        match txn::recover(&dir) {
            Ok(r) => r,
            Err(Error::Corrupt { path, detail }) => {
                // A damaged transaction record is left alone: nothing else can be trusted
                // until someone looks at it.
                c.found(c.vm_problem(detail).file(c.rel(&path)));
                return Ok(c.report(deep, 0, 0, Vec::new()));
            }
            Err(e @ (Error::Io { .. } | Error::NoSpace { .. })) => {
                // Still no space, say: what recovery left is as safe as before it, and the
                // old generations read through the undo journal, so they are checked.
                let why = match &e {
                    Error::NoSpace { path } => format!("{}: no space left", path.display()),
                    e => e.to_string(),
                };
                progress.warn(&format!(
                    "VM {vm}: an interrupted command awaits recovery, which cannot run yet ({why}); checking the archive as it was before it"
                ));
                pending = true;
                c.pending = true;
                Vec::new()
            }
            Err(e) => return Err(e),
        }
    };
    let archive = match VmArchive::open(dir.clone(), vm) {
        Ok(a) => a,
        Err(e) => {
            c.found(
                c.vm_problem(e.to_string())
                    .file(c.rel(&names::vm_profile(&dir))),
            );
            return Ok(c.report(deep, 0, 0, recovered));
        }
    };
    let ids = archive.generation_ids()?;
    if let GenSelect::Rev(rev) = select {
        archive.resolve(rev)?;
    }
    let mut gens = Vec::new();
    for id in &ids {
        match archive.generation(id) {
            Ok(g) => gens.push(g),
            Err(e) => {
                let detail = format!("generation profile unreadable: {e}");
                c.found(c.vm_problem(detail).generation(id));
            }
        }
    }
    if gens.len() != ids.len() {
        // Without every profile the chains cannot be followed; report what was found.
        return Ok(c.report(deep, ids.len(), 0, recovered));
    }
    if let Some(newest) = ids.last() {
        if archive.latest_target().as_deref() != Some(newest.as_str()) {
            let detail = format!("'latest' does not point at the newest generation {newest}");
            c.found(c.vm_problem(detail).file(c.rel(&dir.join(names::LATEST))));
        }
        c.check_newest(&gens[gens.len() - 1]);
    }
    for g in &gens {
        c.check_disk_files(g);
        c.check_state_files(g);
    }
    for j in 0..gens.len().saturating_sub(1) {
        c.check_rdiffs(&gens, j, deep);
    }
    let mut proven = 0;
    if deep {
        for (k, g) in gens.iter().enumerate() {
            let wanted = match select {
                GenSelect::All => true,
                GenSelect::Rev(rev) => archive.resolve(rev)? == g.id,
            };
            if wanted && c.prove(&archive, &gens, k) {
                proven += 1;
            }
        }
    }
    let report = c.report(deep, ids.len(), proven, recovered);
    let mut a = archive;
    a.profile.last_check = Some(CheckRecord {
        time: profile::now_rfc3339(),
        deep,
        ok: report.ok(),
        problems: report.problems.len() as u64,
    });
    if lock.is_none() || pending {
        return Ok(report);
    }
    if let Err(e) = a.save_profile() {
        progress.warn(&format!("VM {vm}: could not record the check result: {e}"));
    }
    Ok(report)
}

impl Checker<'_> {
    fn report(
        self,
        deep: bool,
        generations: usize,
        proven: usize,
        recovered: Vec<String>,
    ) -> CheckReport {
        CheckReport {
            vm: self.vm,
            deep,
            generations,
            generations_proven: proven,
            bytes_verified: self.bytes,
            recovered,
            problems: self.problems,
        }
    }

    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(self.repo.root())
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// A problem of this VM.
    fn vm_problem(&self, detail: impl Into<String>) -> Problem {
        Problem::new(&self.vm, detail)
    }

    /// A problem of disk `disk` of generation `id`.
    fn of(&self, id: &str, disk: &str, detail: impl Into<String>) -> Problem {
        self.vm_problem(detail).generation(id).disk(disk)
    }

    /// Report `p`: a warning now, a line of the report later.
    fn found(&mut self, p: Problem) {
        self.progress.warn(&p.to_string());
        self.problems.push(p);
    }

    /// `e`: what is wrong with `path`, a file of disk `disk` of generation `g`.
    fn file_error(&mut self, g: &Generation, disk: &str, path: &Path, e: &Error) {
        self.found(self.of(&g.id, disk, strip_path(e)).file(self.rel(path)));
    }

    /// The header of `path`, a file of disk `disk` of generation `g`, must name `g`.
    fn header_names_own(&mut self, g: &Generation, disk: &str, path: &Path, found: &[u8; 16]) {
        if *found != generation_bytes(&g.id) {
            self.found(
                self.of(&g.id, disk, foreign_header(found))
                    .file(self.rel(path)),
            );
        }
    }

    /// Newest generation: digest file against the root, image against the digests.
    /// A disk file (image, digests, reverse diff, journal) in a generation's folder whose
    /// disk the profile does not list: the profile has lost a disk, or a file was put there.
    fn check_disk_files(&mut self, g: &Generation) {
        let Ok(entries) = std::fs::read_dir(&g.dir) else {
            return;
        };
        const SUFFIXES: [&str; 5] = [
            names::IMAGE_SUFFIX,
            names::DIGEST_SUFFIX,
            names::RDIFF_SUFFIX,
            names::JOURNAL_SUFFIX,
            names::MERGE_SUFFIX,
        ];
        let mut stray: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| {
                SUFFIXES
                    .iter()
                    .filter_map(|s| name.strip_suffix(s))
                    .any(|disk| !disk.is_empty() && g.profile.disk(disk).is_none())
            })
            .collect();
        stray.sort();
        let listed: Vec<&str> = g.profile.disks.iter().map(|d| d.name.as_str()).collect();
        for name in stray {
            let detail = format!(
                "file of a disk the generation's profile does not list (it lists: {})",
                listed.join(", ")
            );
            let p = self.vm_problem(detail).generation(&g.id);
            self.found(p.file(self.rel(&g.dir.join(name))));
        }
    }

    /// The firmware and TPM state files of a generation: each one whole, against its
    /// length and digest (they are small, so also without `--deep`); and no state file
    /// in the folder that the profile does not list.
    fn check_state_files(&mut self, g: &Generation) {
        for rec in &g.profile.state {
            if let Err(e) = crate::archive::state::read_verified(&g.dir, rec) {
                let p = self.vm_problem(strip_path(&e)).generation(&g.id);
                self.found(p.file(self.rel(&rec.saved_path(&g.dir))));
            }
        }
        let Ok(entries) = std::fs::read_dir(&g.dir) else {
            return;
        };
        let mut stray: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| crate::archive::state::is_state_file_name(n))
            .filter(|n| !g.profile.state.iter().any(|r| &r.file == n))
            .collect();
        stray.sort();
        for name in stray {
            let detail = "firmware or TPM state file the generation's profile does not list";
            let p = self.vm_problem(detail).generation(&g.id);
            self.found(p.file(self.rel(&g.dir.join(name))));
        }
    }

    fn check_newest(&mut self, g: &Generation) {
        for d in &g.profile.disks {
            let dpath = g.digest_path(&d.name);
            let digest = match DigestReader::open(&dpath) {
                Ok(r) => r,
                Err(e) => {
                    self.file_error(g, &d.name, &dpath, &e);
                    continue;
                }
            };
            self.header_names_own(g, &d.name, &dpath, &digest.header.generation);
            let wrong = match digest.root() {
                Ok(root) if root == d.digest_root && digest.header.disk_size == d.size => None,
                Ok(_) => Some("digests do not match the generation's digest root".into()),
                Err(e) => Some(strip_path(&e)),
            };
            if let Some(detail) = wrong {
                self.found(self.of(&g.id, &d.name, detail).file(self.rel(&dpath)));
            }
            let ipath = g.image_path(&d.name);
            let journal = g.journal_path(&d.name);
            let grown = self.pending && journal.exists();
            match std::fs::metadata(&ipath) {
                Ok(m) if m.len() == d.size || (grown && m.len() > d.size) => {}
                Ok(m) => {
                    let detail =
                        format!("image is {} bytes, the generation says {}", m.len(), d.size);
                    self.found(self.of(&g.id, &d.name, detail).file(self.rel(&ipath)));
                    continue;
                }
                Err(_) => {
                    let detail = "image file is missing";
                    self.found(self.of(&g.id, &d.name, detail).file(self.rel(&ipath)));
                    continue;
                }
            }
            if let Err(e) = self.verify_image(g, &d.name, d.size, &digest) {
                self.file_error(g, &d.name, &ipath, &e);
            }
        }
    }

    fn verify_image(
        &mut self,
        g: &Generation,
        disk: &str,
        size: u64,
        digest: &DigestReader,
    ) -> Result<()> {
        let ipath = g.image_path(disk);
        let file = crate::fsutil::open_ro(&ipath)?;
        crate::fsutil::no_readahead(&file);
        let bs = digest.header.block_size;
        let blocks = digest.blocks();
        let per = ((4u64 << 20) / bs as u64).max(1);
        let task = self.progress.task(&format!("{disk} image"), size);
        let mut bad = Vec::new();
        let pool = BufPool::new(8);
        let work = |job: ImageJob| -> Result<(u64, Vec<u64>)> {
            let (start, end) = (job.start, job.end);
            let from = start * bs as u64;
            let to = (end * bs as u64).min(size);
            let mut bad = Vec::new();
            if job.hole {
                // A hole reads as zeros: its blocks must have the zero digest. Only the
                // data extents of the digest file can hold anything else.
                for (a, b) in digest.data_ranges(start, end)? {
                    let mut want = vec![0u8; (b - a) as usize * DIGEST_LEN];
                    digest.read_range(a, &mut want)?;
                    for (i, d) in want.chunks_exact(DIGEST_LEN).enumerate() {
                        if d != ZERO_DIGEST {
                            bad.push(a + i as u64);
                        }
                    }
                }
            } else {
                let mut buf = pool.take((to - from) as usize);
                crate::fsutil::read_exact_at(&file, &mut buf, from, &ipath)?;
                let mut want = vec![0u8; (end - start) as usize * DIGEST_LEN];
                digest.read_range(start, &mut want)?;
                for (i, chunk) in buf.chunks(bs as usize).enumerate() {
                    if block_digest(chunk)[..] != want[i * DIGEST_LEN..(i + 1) * DIGEST_LEN] {
                        bad.push(start + i as u64);
                    }
                }
            }
            task.advance(to - from);
            Ok((to - from, bad))
        };
        let mut plan = ImagePlan {
            file: &file,
            size,
            bs: bs as u64,
            blocks,
            per,
            next: 0,
            extents: VecDeque::new(),
            mapped_to: 0,
        };
        let mut verified = 0;
        let workers = crate::engine::cpu_threads();
        pipeline::ordered(
            workers,
            workers * 3,
            || {
                let job = plan.next().map_err(|e| Error::io(&ipath, e))?;
                if let Some(j) = job.as_ref().filter(|j| !j.hole) {
                    let from = j.start * bs as u64;
                    let to = (j.end * bs as u64).min(size);
                    crate::fsutil::will_need(&file, from, to - from);
                }
                Ok(job)
            },
            work,
            |(n, b)| {
                verified += n;
                bad.extend(b);
                Ok(())
            },
        )?;
        task.finish();
        self.bytes += verified;
        if self.pending && !bad.is_empty() {
            bad = self.journaled(g, disk, digest, bad)?;
        }
        for (a, b) in coalesce(&bad) {
            let range = (a * bs as u64, (b * bs as u64).min(size));
            let p = self.of(&g.id, disk, "image blocks fail their digests");
            self.found(p.file(self.rel(&ipath)).bytes(range));
        }
        for b in bad {
            self.bad_image.insert((disk.to_string(), b));
        }
        Ok(())
    }

    /// Of the image blocks `bad` that fail their digests, those whose old content the
    /// journal of a pending rollback holds intact are not damage: the rollback will write
    /// them back, and readers take them from there meanwhile.
    fn journaled(
        &self,
        g: &Generation,
        disk: &str,
        digest: &DigestReader,
        bad: Vec<u64>,
    ) -> Result<Vec<u64>> {
        let journal = g.journal_path(disk);
        let Ok(Some(mut scan)) = crate::archive::rdiff::PartialScan::open(&journal) else {
            return Ok(bad);
        };
        let mut left: std::collections::BTreeSet<u64> = bad.into_iter().collect();
        while let Some(rec) = scan.next_record()? {
            if !left.contains(&rec.block) || rec.is_damaged() {
                continue;
            }
            let mut want = [0u8; DIGEST_LEN];
            digest.read_range(rec.block, &mut want)?;
            // The scan proved the record's bytes against its digest.
            if rec.digest == want {
                left.remove(&rec.block);
            }
        }
        Ok(left.into_iter().collect())
    }

    /// An older generation: each reverse diff's structure and checksum; deep also proves
    /// every record's digest.
    fn check_rdiffs(&mut self, gens: &[Generation], j: usize, deep: bool) {
        let g = &gens[j];
        for d in &g.profile.disks {
            let path = g.rdiff_path(&d.name);
            let r = match open_rdiff(gens, j, &d.name) {
                Ok(r) => r,
                Err(e) => {
                    self.file_error(g, &d.name, &path, &e);
                    continue;
                }
            };
            self.header_names_own(g, &d.name, &path, &r.header.generation);
            // The file checksum on one thread while, in deep mode, the records are
            // decompressed and proven on the others.
            let (hashed, bad) = std::thread::scope(|s| {
                let hashing = s.spawn(|| r.verify_file_hash());
                let bad = if deep {
                    verify_records(&r)
                } else {
                    Ok(Vec::new())
                };
                (hashing.join().expect("hash thread panicked"), bad)
            });
            if let Err(e) = hashed {
                self.file_error(g, &d.name, &path, &e);
            }
            self.bytes += r.file_len;
            if !deep {
                continue;
            }
            let bs = r.header.block_size as u64;
            let bad = match bad {
                Ok(bad) => bad,
                Err(e) => {
                    self.file_error(g, &d.name, &path, &e);
                    continue;
                }
            };
            for &b in &bad {
                self.bad_records.insert((g.id.clone(), d.name.clone(), b));
                let range = (
                    b * bs,
                    b * bs + block_len(b, d.size, r.header.block_size) as u64,
                );
                let p = self.of(&g.id, &d.name, "reverse-diff record fails its digest");
                self.found(p.file(self.rel(&path)).bytes(range));
            }
        }
    }

    /// Resolve every block of generation `gens[k]` and prove its digest root.
    fn prove(&mut self, archive: &VmArchive, gens: &[Generation], k: usize) -> bool {
        let g = &gens[k];
        let mut ok = true;
        for d in &g.profile.disks {
            let proven = DiskView::open_unproven(archive, gens, k, &d.name)
                .and_then(|view| Ok((self.root_of(&view, gens, k)?, view)));
            let ((root, damaged), view) = match proven {
                Ok(p) => p,
                Err(e) => {
                    let detail = format!("cannot be reconstructed: {e}");
                    self.found(self.of(&g.id, &d.name, detail));
                    ok = false;
                    continue;
                }
            };
            if root != d.digest_root {
                let detail = "reconstructed digests do not match the generation's digest root";
                self.found(self.of(&g.id, &d.name, detail));
                ok = false;
            }
            let bs = view.block_size as u64;
            for (a, b) in coalesce(&damaged) {
                if k + 1 < gens.len() {
                    let range = (a * bs, (b * bs).min(view.size));
                    let detail = "a restore of this generation would meet damaged blocks";
                    self.found(self.of(&g.id, &d.name, detail).bytes(range));
                }
                ok = false;
            }
        }
        ok
    }

    /// The digest root of a view's generation, and the blocks whose source is damaged.
    fn root_of(
        &self,
        view: &DiskView,
        gens: &[Generation],
        k: usize,
    ) -> Result<(String, Vec<u64>)> {
        let mut rh = RootHasher::new(view.block_size, view.size);
        let mut damaged = Vec::new();
        let chain_gen = |c: u32| -> &GenerationId { &gens[k + c as usize].id };
        let mut buf = Vec::new();
        for seg in view.segments() {
            match seg.loc {
                Loc::Zero => {
                    for _ in seg.start..seg.end {
                        rh.push(&ZERO_DIGEST);
                    }
                }
                Loc::Image => {
                    let mut s = seg.start;
                    while s < seg.end {
                        let e = (s + 65536).min(seg.end);
                        buf.resize((e - s) as usize * DIGEST_LEN, 0);
                        view.image_digests(s, &mut buf)?;
                        rh.push_many(&buf);
                        for b in s..e {
                            if self.bad_image.contains(&(view.disk.clone(), b)) {
                                damaged.push(b);
                            }
                        }
                        s = e;
                    }
                }
                Loc::Record { chain, rec } => {
                    let r = &view.chain()[chain as usize];
                    rh.push(&r.record_digest(rec as usize)?);
                    if self.bad_records.contains(&(
                        chain_gen(chain).clone(),
                        view.disk.clone(),
                        seg.start,
                    )) {
                        damaged.push(seg.start);
                    }
                }
            }
        }
        Ok((rh.finish(), damaged))
    }
}

/// The problem of a file whose header names another generation than the one it is in.
fn foreign_header(id: &[u8; 16]) -> String {
    format!(
        "the header names generation {}, not this one (a file of another generation or VM)",
        uuid::Uuid::from_bytes(*id).hyphenated()
    )
}

/// A piece of the newest image to verify: blocks to read and hash, or blocks wholly in a
/// hole of the image file, which only need their digests to be the zero digest.
struct ImageJob {
    start: u64,
    end: u64,
    hole: bool,
}

/// Splits the image into [`ImageJob`]s along its data extents (`SEEK_DATA`), so that the
/// holes of a sparse image are never read.
struct ImagePlan<'a> {
    file: &'a std::fs::File,
    size: u64,
    bs: u64,
    blocks: u64,
    /// Blocks per read job.
    per: u64,
    next: u64,
    /// Data extents (bytes) learnt so far, up to `mapped_to`.
    extents: VecDeque<(u64, u64)>,
    mapped_to: u64,
}

/// Bytes of the image mapped at a time.
const MAP_WINDOW: u64 = 1 << 30;
/// Blocks of one hole job (their digests are read only where the digest file has data).
const HOLE_BLOCKS: u64 = 1 << 20;

impl ImagePlan<'_> {
    fn next(&mut self) -> std::io::Result<Option<ImageJob>> {
        let b = self.next;
        if b >= self.blocks {
            return Ok(None);
        }
        let pos = b * self.bs;
        // Extents that end before this block are done with.
        while self.extents.front().is_some_and(|&(o, l)| o + l <= pos) {
            self.extents.pop_front();
        }
        if self.extents.is_empty() && self.mapped_to < self.size {
            let from = self.mapped_to.max(pos);
            let to = (from + MAP_WINDOW).min(self.size);
            self.extents = crate::fsutil::data_extents(self.file, from, to)?.into();
            self.mapped_to = to;
        }
        let job = match self.extents.front() {
            // The block touches data: read blocks up to the extent's end (rounded up).
            Some(&(o, l)) if o < pos + self.bs => {
                let end = (o + l).div_ceil(self.bs).min(b + self.per);
                ImageJob {
                    start: b,
                    end: end.max(b + 1).min(self.blocks),
                    hole: false,
                }
            }
            // A hole up to the next extent (or to the end of what is mapped).
            next => {
                let hole_end = match next {
                    Some(&(o, _)) => o / self.bs,
                    None if self.mapped_to >= self.size => self.blocks,
                    None => self.mapped_to / self.bs,
                };
                ImageJob {
                    start: b,
                    end: hole_end.clamp(b + 1, b + HOLE_BLOCKS).min(self.blocks),
                    hole: true,
                }
            }
        };
        self.next = job.end;
        Ok(Some(job))
    }
}

/// Decompress every record of a reverse diff and prove its digest, on every core; returns
/// the blocks whose record is damaged.
fn verify_records(r: &RdiffReader) -> Result<Vec<u64>> {
    const BATCH: usize = 64;
    let mut next = 0usize;
    let plan = || {
        let s = next;
        next += BATCH;
        Ok((s < r.len()).then(|| (s, (s + BATCH).min(r.len()))))
    };
    let work = |(a, b): (usize, usize)| -> Result<Vec<u64>> {
        Ok((a..b)
            .filter(|&i| {
                let ok = r.read(i).is_ok_and(|rec| {
                    !rec.is_damaged()
                        && rec
                            .data(r.path())
                            .is_ok_and(|data| block_digest(&data) == rec.digest)
                });
                !ok
            })
            .map(|i| r.block_at(i))
            .collect())
    };
    let mut bad = Vec::new();
    let workers = crate::engine::cpu_threads();
    pipeline::ordered(workers, workers * 3, plan, work, |b| {
        bad.extend(b);
        Ok(())
    })?;
    Ok(bad)
}

/// Sorted block numbers as runs `[a, b)`.
fn coalesce(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut v = blocks.to_vec();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in v {
        match out.last_mut() {
            Some(last) if last.1 == b => last.1 = b + 1,
            _ => out.push((b, b + 1)),
        }
    }
    out
}

/// An error's text without the path prefix (the problem names the file already).
fn strip_path(e: &Error) -> String {
    match e {
        Error::Corrupt { detail, .. } | Error::Format { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}
