//! Backups of libvirt domains through a pull-mode backup job: running ones as they are,
//! shut-off ones started paused for it ([`crate::engine::paused`]); or, with
//! [`OfflineRead::Files`], shut-off ones from their disk files.
//!
//! Each generation gets a libvirt checkpoint `vmkeep.<repository id>.<generation>`; the
//! repository id keeps the chains of two repositories backing up the same VM apart (a
//! *branch* each), and vmkeep never trusts or deletes a checkpoint of another branch or
//! another tool. The next run is incremental from that checkpoint's dirty bitmap when the
//! checkpoint still exists and is the one the newest generation recorded; any other state
//! (missing, foreign, not matching, or broken: a bitmap QEMU lost when it was killed) makes
//! the run a diff — read everything, store only changes — and starts a fresh chain. Disks
//! that cannot carry bitmaps (raw) are read in diff mode. After a successful generation only the new checkpoint of this branch is
//! kept; after a failed one, the new checkpoint is deleted. A shut-off VM's disks read as
//! files are read under QEMU's own image locks (`ImageLock`), so the VM cannot start
//! mid-read.

use std::path::PathBuf;

use crate::archive::profile::SourceKind;
use crate::archive::Repository;
use crate::engine::backup::{BackupOptions, BackupReport, BackupRun, DiskInput};
pub use crate::engine::paused::OfflineRead;
use crate::engine::paused::{PausedForBackup, Prepared};
use crate::error::{Error, Result};
use crate::libvirt::xml::{BackupJobXml, NbdServer};
use crate::libvirt::{
    BackupJobState, BackupPlan, BackupStart, CheckpointDelete, DiskDevice, DiskInfo, DiskSource,
    Domain, Hypervisor, PullBackup,
};
use crate::nbd::proto::META_DIRTY_BITMAP_PREFIX;
use crate::progress::Progress;
use crate::source::nbd::NbdSource;
use crate::source::{chain, file::FileSource, qemu, BlockSource, Labelled};

/// Where live backups put their sockets and scratch files.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// Disks (targets) not to back up.
    pub skip_disks: Vec<String>,
    /// Parent of the per-run socket folder (short: unix socket paths hold 107 bytes).
    pub run_dir: PathBuf,
    /// Parent of the per-run scratch folder (copy-before-write data; needs disk space).
    pub scratch_dir: PathBuf,
    /// How long to wait for another repository's backup job of the same VM to end
    /// (libvirt runs one backup job per VM at a time).
    pub job_wait: std::time::Duration,
    /// How a shut-off domain is backed up (started paused, or read as files).
    pub offline_read: OfflineRead,
    /// How the backup job of a domain on a remote host exports its disks (TCP).
    pub remote: RemoteExport,
    /// Whether to freeze the guest's file systems at the backup point.
    pub quiesce: crate::engine::quiesce::Quiesce,
}

/// The NBD export of a backup job on a remote host: TCP, with TLS unless `insecure`.
#[derive(Debug, Clone)]
pub struct RemoteExport {
    /// The address QEMU listens on and vmkeep connects to; `None`: the host of the
    /// libvirt URI. The server certificate must name it.
    pub address: Option<String>,
    /// The TCP ports to try, lowest first (the first one free on the host is used).
    pub ports: std::ops::RangeInclusive<u16>,
    /// vmkeep's TLS client credentials (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
    pub tls_dir: PathBuf,
    /// Plain NBD without TLS (`--insecure-nbd`): anyone on the network path can read the
    /// disks. Never the default.
    pub insecure: bool,
    /// The folder *on the hypervisor* for QEMU's copy-before-write scratch files (libvirt
    /// 9.0 needs a name for each; it creates and removes them). QEMU must be able to write
    /// there: the default is libvirt's own state folder of QEMU domains.
    pub scratch_dir: PathBuf,
}

/// Where a remote host's scratch files go by default (libvirt's QEMU state folder).
pub const DEFAULT_REMOTE_SCRATCH_DIR: &str = "/var/lib/libvirt/qemu";

/// The ports remote backup jobs listen on by default.
pub const DEFAULT_NBD_PORTS: std::ops::RangeInclusive<u16> = 10810..=10849;
/// Where vmkeep's NBD TLS client credentials are by default.
pub const DEFAULT_NBD_TLS_DIR: &str = "/etc/pki/vmkeep";

impl Default for RemoteExport {
    fn default() -> Self {
        RemoteExport {
            address: None,
            ports: DEFAULT_NBD_PORTS,
            tls_dir: PathBuf::from(DEFAULT_NBD_TLS_DIR),
            insecure: false,
            scratch_dir: PathBuf::from(DEFAULT_REMOTE_SCRATCH_DIR),
        }
    }
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            skip_disks: Vec::new(),
            run_dir: PathBuf::from("/run/vmkeep"),
            scratch_dir: PathBuf::from("/var/tmp/vmkeep"),
            job_wait: std::time::Duration::from_secs(3600),
            offline_read: OfflineRead::default(),
            remote: RemoteExport::default(),
            quiesce: Default::default(),
        }
    }
}

impl LiveOptions {
    /// The options from plain settings: the disks to skip, and the folders for sockets and
    /// scratch files (`None`: the defaults).
    pub fn from_settings(
        skip_disks: Vec<String>,
        run_dir: Option<PathBuf>,
        scratch_dir: Option<PathBuf>,
    ) -> LiveOptions {
        let defaults = LiveOptions::default();
        LiveOptions {
            skip_disks,
            run_dir: run_dir.unwrap_or(defaults.run_dir),
            scratch_dir: scratch_dir.unwrap_or(defaults.scratch_dir),
            job_wait: defaults.job_wait,
            offline_read: defaults.offline_read,
            remote: defaults.remote,
            quiesce: defaults.quiesce,
        }
    }
}

/// The checkpoint-name prefix of this repository's branch.
pub fn branch_prefix(repo: &Repository) -> String {
    format!("vmkeep.{}.", repo.profile.id)
}

/// Back up domain `name`. A shut-off domain is started paused for the backup and shut
/// off again ([`crate::engine::paused`]), unless `live.offline_read` says to read its files.
pub fn backup_domain(
    repo: &Repository,
    hv: &Hypervisor,
    name: &str,
    opts: &BackupOptions,
    live: &LiveOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let dom = hv.domain(name)?;
    let info = dom.info()?;
    let xml = dom.xml()?;
    select_disks(&info.disks, live, progress, name)?;
    let run = BackupRun::begin(repo, name)?;
    if info.state.is_active() {
        // A guest a killed run left frozen is thawed first, whichever repository it was.
        crate::engine::quiesce::thaw_leftover(&dom, progress);
    }
    // This run holds the VM's lock of this repository from here on.
    let paused = match PausedForBackup::prepare(
        hv,
        &dom,
        info.state,
        &repo.profile.id,
        live.offline_read,
        progress,
    )? {
        Prepared::Paused(p) => Some(p),
        Prepared::AsIs => None,
    };
    // This run's backup job, once it tries to start one.
    let our_job = std::cell::RefCell::new(None);
    let started = paused.is_some();
    let result = backup_prepared(
        repo, hv, &dom, run, xml, opts, live, &our_job, started, progress,
    );
    if let Some(p) = paused {
        let mine = our_job.borrow().clone();
        let ours = |j: &BackupJobXml| mine.as_ref().is_some_and(|m: &OurJob| m.is(j));
        p.finish(&dom, live.job_wait, &ours, progress);
    }
    result
}

/// The backup of `dom` once it is in the state it is backed up in (`run` holds its lock).
#[allow(clippy::too_many_arguments)]
fn backup_prepared(
    repo: &Repository,
    hv: &Hypervisor,
    dom: &Domain,
    run: BackupRun,
    xml: String,
    opts: &BackupOptions,
    live: &LiveOptions,
    our_job: &std::cell::RefCell<Option<OurJob>>,
    started_paused: bool,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let name = dom.name();
    // Read again: a VM started paused now has its live definition and sizes.
    let info = dom.info()?;
    let disks = select_disks(&info.disks, live, progress, name)?;
    let prefix = branch_prefix(repo);
    let new_checkpoint = format!("{prefix}{}", run.generation_id());
    let basis = incr_basis(dom, &run, &prefix, progress)?;
    let mut opts = opts.clone();
    opts.kind = SourceKind::Libvirt;
    opts.domain_xml = Some(xml);
    // This branch's checkpoint found broken (its bitmap lost when QEMU died): after a
    // good generation it goes with the older ones.
    let broken = std::cell::RefCell::new(None);
    use crate::engine::quiesce::{Freezer, Quiesce};
    // Only a guest that runs can be frozen; one vmkeep started paused (or read from its
    // files) was shut off, as consistent as that.
    let freezer = (info.state == crate::libvirt::DomainState::Running && !started_paused)
        .then(|| Freezer::new(dom, live.quiesce, progress));
    if info.state.is_active() && !started_paused {
        if freezer.is_none() && live.quiesce == Quiesce::Require {
            return Err(Error::source(
                format!("libvirt VM {name}"),
                format!(
                    "--quiesce require: the VM is {}, its guest cannot be frozen",
                    info.state
                ),
            ));
        }
        opts.consistency = Some(crate::archive::profile::Consistency::Crash);
    } else {
        opts.consistency = Some(crate::archive::profile::Consistency::Offline);
    }
    let result = if info.state.is_active() {
        backup_running(
            dom,
            hv,
            run,
            &repo.profile.id,
            our_job,
            &disks,
            &new_checkpoint,
            basis.as_deref(),
            &broken,
            freezer.as_ref(),
            &opts,
            live,
            progress,
        )
    } else if !hv.is_local() {
        Err(Error::source(
            format!("libvirt VM {name}"),
            "the VM is shut off and the host is remote: its files cannot be read from here (use --offline-read start)",
        ))
    } else {
        backup_shut_off(
            dom,
            run,
            &disks,
            &new_checkpoint,
            basis.as_deref(),
            &opts,
            progress,
        )
    };
    match &result {
        Ok(_) => forget_old_checkpoints(
            dom,
            &prefix,
            &new_checkpoint,
            broken.borrow().as_deref(),
            progress,
        ),
        Err(_) => {
            // The connection may be what failed (libvirtd restarted): use a fresh one to
            // end a job that is still running and to drop the new checkpoint.
            let fresh = Hypervisor::connect(Some(hv.uri())).and_then(|h| h.domain(name));
            let dom = fresh.as_ref().unwrap_or(dom);
            if let Some(ours) = our_job.borrow().as_ref() {
                let _ = dom.end_stale_backup(&|j: &BackupJobXml| ours.is(j));
            }
            if dom.checkpoint_exists(&new_checkpoint).unwrap_or(false) {
                let _ = dom.delete_checkpoint(&new_checkpoint, CheckpointDelete::default());
            }
        }
    }
    result
}

/// The disks to back up: real disks with a local source, minus the skipped ones.
fn select_disks(
    disks: &[DiskInfo],
    live: &LiveOptions,
    progress: &dyn Progress,
    vm: &str,
) -> Result<Vec<DiskInfo>> {
    let mut out = Vec::new();
    for d in disks {
        if !matches!(d.device, DiskDevice::Disk | DiskDevice::Lun) {
            let kind = format!("{:?}", d.device).to_lowercase();
            progress.warn(&format!(
                "VM {vm}: skipping {} ({kind}): not a disk",
                d.target
            ));
            continue;
        }
        if live.skip_disks.contains(&d.target) {
            continue;
        }
        if matches!(d.source, DiskSource::None) {
            progress.warn(&format!("VM {vm}: skipping {}: no medium", d.target));
            continue;
        }
        crate::archive::names::check_disk(&d.target)?;
        out.push(d.clone());
    }
    if out.is_empty() {
        return Err(Error::usage(format!("VM {vm} has no disks to back up")));
    }
    Ok(out)
}

/// The checkpoint to be incremental from, if it can be trusted: it is this branch's, the
/// newest generation recorded it, and libvirt still has it.
fn incr_basis(
    dom: &Domain,
    run: &BackupRun,
    prefix: &str,
    progress: &dyn Progress,
) -> Result<Option<String>> {
    let Some(prev) = run.previous() else {
        return Ok(None);
    };
    let Some(cp) = prev.profile.checkpoint.clone() else {
        if prev.profile.kind == SourceKind::Libvirt {
            progress.warn(&format!(
                "VM {}: the newest generation has no checkpoint; reading all disks (diff)",
                dom.name()
            ));
        }
        return Ok(None);
    };
    if !cp.starts_with(prefix) {
        progress.warn(&format!(
            "VM {}: checkpoint {cp} is not this repository's; reading all disks (diff)",
            dom.name()
        ));
        return Ok(None);
    }
    if !dom.checkpoint_exists(&cp)? {
        // libvirt lost the metadata (the domain was undefined and defined again, made
        // transient, moved) but the disks may still carry the bitmaps: give the checkpoint
        // back from the generation's copy, which libvirt validates against the bitmaps.
        match redefine(dom, prev, &cp) {
            Ok(()) => {
                progress.warn(&format!(
                    "VM {}: libvirt had lost checkpoint {cp}; redefined it from the newest generation (its bitmaps validated)",
                    dom.name()
                ));
                return Ok(Some(cp));
            }
            Err(why) => {
                progress.warn(&format!(
                    "VM {}: checkpoint {cp} of the newest generation is gone ({why}); reading all disks (diff) and starting a new checkpoint chain",
                    dom.name()
                ));
                return Ok(None);
            }
        }
    }
    Ok(Some(cp))
}

/// The most a saved checkpoint XML may be (a few KiB; larger is damage, not read).
const MAX_CHECKPOINT_XML: u64 = 1 << 20;

/// Redefine checkpoint `cp` of `dom` from generation `prev`'s saved XML; why not, if not.
fn redefine(
    dom: &Domain,
    prev: &crate::archive::Generation,
    cp: &str,
) -> std::result::Result<(), String> {
    use std::io::Read;
    let path = prev.checkpoint_xml_path();
    let file = crate::fsutil::open_ro(&path).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "no saved checkpoint XML".to_string()
        }
        // A symbolic link planted there, say: said as it is.
        e => e.to_string(),
    })?;
    let mut text = String::new();
    file.take(MAX_CHECKPOINT_XML)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    dom.redefine_checkpoint(cp, &text).map_err(|e| e.detail())
}

/// Whether the bitmaps of checkpoint `cp` (this branch's, of a running VM) are intact
/// enough for an incremental backup; when they are not, say so once and record `cp` as
/// broken. A check that cannot be made means a diff too (always correct), without
/// recording the checkpoint as broken.
fn checkpoint_intact(
    dom: &Domain,
    cp: &str,
    broken: &std::cell::RefCell<Option<String>>,
    progress: &dyn Progress,
) -> bool {
    let why = match dom.broken_checkpoint_disks(cp) {
        Ok(disks) if disks.is_empty() => return true,
        Ok(disks) => format!(
            "its bitmap of {} is missing or inconsistent (QEMU stopped without saving it)",
            disks.join(", ")
        ),
        Err(e) => {
            // Not proven broken: it is left to the usual deletion of old checkpoints.
            progress.warn(&format!(
                "VM {}: the bitmaps of checkpoint {cp} cannot be checked ({e}); reading all disks (diff) and starting a new checkpoint chain",
                dom.name()
            ));
            return false;
        }
    };
    abandon_checkpoint(dom, cp, &why, broken, progress);
    false
}

/// One line about a broken checkpoint of this branch, which the run replaces.
fn abandon_checkpoint(
    dom: &Domain,
    cp: &str,
    why: &str,
    broken: &std::cell::RefCell<Option<String>>,
    progress: &dyn Progress,
) {
    progress.warn(&format!(
        "VM {}: checkpoint {cp} is broken: {why}; reading all disks (diff) and starting a new checkpoint chain",
        dom.name()
    ));
    *broken.borrow_mut() = Some(cp.to_string());
}

/// The job this run starts: its NBD server and, for TCP, the export-name prefix that
/// carries the repository id and a token of the run.
#[derive(Debug, Clone)]
struct OurJob {
    server: NbdServer,
    export_prefix: Option<String>,
}

impl OurJob {
    /// Whether `job` is this run's.
    fn is(&self, job: &BackupJobXml) -> bool {
        job.server.as_ref() == Some(&self.server)
            && match &self.export_prefix {
                None => true,
                Some(p) => {
                    !job.disks.is_empty()
                        && job
                            .disks
                            .iter()
                            .all(|d| d.export_name.starts_with(p.as_str()))
                }
            }
    }
}

/// How this run's job exports its disks: a unix socket on a local host, TCP on a remote
/// one (the port is chosen when the job begins).
enum Export {
    Unix(PathBuf),
    Tcp { name: String, tls: bool },
}

impl Export {
    /// The TCP export of a remote host: at `nbd_address`, else at the URI's host.
    fn remote(hv: &Hypervisor, live: &LiveOptions) -> Result<Export> {
        let name = match &live.remote.address {
            Some(a) => a.clone(),
            None => crate::libvirt::uri_host(hv.uri()).ok_or_else(|| {
                Error::usage(format!(
                    "libvirt URI {}: no host to reach the backup export at (set nbd_address)",
                    hv.uri()
                ))
            })?,
        };
        Ok(Export::Tcp {
            name,
            tls: !live.remote.insecure,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn backup_running(
    dom: &Domain,
    hv: &Hypervisor,
    run: BackupRun,
    repo_id: &str,
    our_job: &std::cell::RefCell<Option<OurJob>>,
    disks: &[DiskInfo],
    new_checkpoint: &str,
    basis: Option<&str>,
    broken: &std::cell::RefCell<Option<String>>,
    freezer: Option<&crate::engine::quiesce::Freezer<'_>>,
    opts: &BackupOptions,
    live: &LiveOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let targets: Vec<&str> = disks.iter().map(|d| d.target.as_str()).collect();
    // Fresh folders with random names, in parents only root can change; the name says
    // which repository's run made them (see `owned_job`). A remote host's job needs none.
    let prefix = format!("vmkeep-{repo_id}-");
    let (_cleanup, export, scratch_dir) = if hv.is_local() {
        let (cleanup, socket, scratch_dir) = run_dirs(dom, live, &prefix)?;
        (cleanup, Export::Unix(socket), scratch_dir)
    } else {
        (
            RemoveDirs(Vec::new()),
            Export::remote(hv, live)?,
            live.remote.scratch_dir.clone(),
        )
    };
    // TCP exports are named vmkeep.<repository id>.<run token>.<target>: the job is
    // told from another one on the same port, and from a dead run of this repository.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let export_prefix = match &export {
        Export::Unix(_) => None,
        Export::Tcp { .. } => Some(format!("{}{}.", tcp_export_prefix(repo_id), &token[..12])),
    };
    // A job left behind by a dead run of this repository would hold the bitmaps: end it
    // first. This run holds the VM's lock of this repository, so any such run is dead.
    // Another repository's job in flight is waited for, never ended.
    let owned = |j: &BackupJobXml| owned_job(j, &live.run_dir, &prefix, repo_id);
    let mut others = OtherJobs {
        dom,
        owned: &owned,
        job_wait: live.job_wait,
        deadline: std::time::Instant::now() + live.job_wait,
        said: false,
        progress,
    };
    others.wait()?;
    let mut basis = basis.filter(|cp| checkpoint_intact(dom, cp, broken, progress));
    let description = description(run.repository());
    let mut ports = live.remote.ports.clone();
    let first = loop {
        let server = match &export {
            Export::Unix(socket) => NbdServer::Unix(socket.clone()),
            Export::Tcp { name, tls } => {
                let Some(port) = ports.next() else {
                    return Err(job_failed(
                        dom,
                        format!(
                            "no free port for the backup export in {}-{} on the host (nbd_ports)",
                            live.remote.ports.start(),
                            live.remote.ports.end()
                        ),
                    ));
                };
                NbdServer::Tcp {
                    name: name.clone(),
                    port,
                    tls: *tls,
                }
            }
        };
        *our_job.borrow_mut() = Some(OurJob {
            server: server.clone(),
            export_prefix: export_prefix.clone(),
        });
        let mut plan = BackupPlan {
            disks: &targets,
            server: &server,
            export_prefix: export_prefix.as_deref(),
            scratch_dir: &scratch_dir,
            checkpoint: Some(new_checkpoint),
            incremental_from: basis,
            around_begin: freezer.map(|f| f as &dyn crate::libvirt::AroundBegin),
            checkpoint_description: Some(&description),
        };
        match start_job(dom, &mut plan, &mut basis, broken, &mut others, progress) {
            Err(e)
                if matches!(server, NbdServer::Tcp { .. })
                    && crate::libvirt::port_taken(&e.to_string()) =>
            {
                tracing::debug!("VM {}: {server} is taken; trying the next port", dom.name());
            }
            other => break other?,
        }
    };
    let job = std::cell::RefCell::new(Some(first));
    crate::fault::pause("after-backup-begin");
    // A job that failed (aborted from outside, the VM stopped, scratch space exhausted)
    // surfaces as a broken NBD connection; say what really happened.
    let explain = |e: Error| -> Error {
        let state = job.borrow().as_ref().map(|j| j.state());
        match state {
            Some(Ok(BackupJobState::Completed)) => job_failed(
                dom,
                "the backup job ended before vmkeep finished reading".into(),
            ),
            Some(Ok(BackupJobState::Failed(why))) => {
                job_failed(dom, format!("the backup job failed: {why}"))
            }
            _ => e,
        }
    };
    let broken_cp = broken.borrow().clone();
    let inputs = open_exports(
        job.borrow().as_ref().expect("job just began"),
        disks,
        basis,
        broken_cp.as_deref(),
        &live.remote.tls_dir,
        hv.is_local(),
    )
    .map_err(explain)?;
    let mut opts = opts.clone();
    // At the backup point too (the job has begun): the firmware and TPM state.
    opts.state = read_state(dom, hv.is_local(), progress)?;
    opts.checkpoint = job
        .borrow()
        .as_ref()
        .and_then(|j| j.checkpoint().map(str::to_string));
    // Saved with the generation: libvirt can be given the checkpoint back should it lose
    // it (the domain undefined and defined again, made transient, moved).
    opts.checkpoint_xml = opts
        .checkpoint
        .as_deref()
        .and_then(|cp| dom.checkpoint_xml(cp).ok());
    if let Some(f) = freezer {
        let (consistency, why) = f.consistency();
        opts.consistency = Some(consistency);
        if let Some(why) = why {
            progress.warn(&format!(
                "VM {}: crash-consistent backup: the guest's file systems were not frozen ({why})",
                dom.name()
            ));
        }
    }
    let mut confirm = || -> Result<()> {
        let j = job.borrow_mut().take().expect("confirmed once");
        match j.state()? {
            BackupJobState::Running => j.end(),
            BackupJobState::Completed => Err(job_failed(
                dom,
                "the backup job ended before vmkeep finished reading".into(),
            )),
            BackupJobState::Failed(why) => {
                Err(job_failed(dom, format!("the backup job failed: {why}")))
            }
        }
    };
    run.execute_with(inputs, &opts, progress, &mut confirm)
        .map_err(explain)
}

/// The per-run socket folder and scratch folder (group QEMU's, see
/// [`crate::fsutil::Share::qemu`]), removed when the returned guard drops; and the
/// socket's path in the first.
fn run_dirs(
    dom: &Domain,
    live: &LiveOptions,
    prefix: &str,
) -> Result<(RemoveDirs, PathBuf, PathBuf)> {
    let share = crate::fsutil::Share::qemu(dom.qemu_gid()?);
    let mut cleanup = RemoveDirs(Vec::new());
    let socket_dir = crate::fsutil::private_dir(&live.run_dir, prefix, share)?.path;
    cleanup.0.push(socket_dir.clone());
    let scratch_dir = crate::fsutil::private_dir(&live.scratch_dir, prefix, share)?.path;
    cleanup.0.push(scratch_dir.clone());
    Ok((cleanup, socket_dir.join("nbd.sock"), scratch_dir))
}

/// Waiting for the backup jobs of others (libvirt runs one backup job per VM at a time),
/// ending this repository's leftovers on the way.
struct OtherJobs<'a> {
    dom: &'a Domain,
    /// Whether a job is one a run of this repository made.
    owned: &'a dyn Fn(&BackupJobXml) -> bool,
    job_wait: std::time::Duration,
    deadline: std::time::Instant,
    /// The warning about waiting was given.
    said: bool,
    progress: &'a dyn Progress,
}

impl OtherJobs<'_> {
    /// Return once the VM has no backup job (after ending any of this repository's); fail
    /// when another one is still running at the deadline.
    fn wait(&mut self) -> Result<()> {
        let dom = self.dom;
        loop {
            dom.end_stale_backup(self.owned)?;
            let other = match dom.backup_job()? {
                None => return Ok(()),
                Some(job) => crate::libvirt::describe_job(&job),
            };
            if std::time::Instant::now() >= self.deadline {
                return Err(job_failed(
                    dom,
                    format!(
                        "another backup job ({other}) is still running after {} s; end it with `virsh domjobabort {}` if nobody uses it",
                        self.job_wait.as_secs(),
                        dom.name()
                    ),
                ));
            }
            if !self.said {
                self.progress.warn(&format!(
                    "VM {}: another backup job is running ({other}); waiting for it to end",
                    dom.name(),
                ));
                self.said = true;
            }
            crate::interrupt::check()?;
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

/// Begin the pull backup of `plan`; when libvirt finds the bitmap of `basis` broken, say
/// so, record it in `broken` and begin again as a diff (`basis` and the plan's
/// `incremental_from` become `None`).
fn start_job(
    dom: &Domain,
    plan: &mut BackupPlan<'_>,
    basis: &mut Option<&str>,
    broken: &std::cell::RefCell<Option<String>>,
    others: &mut OtherJobs<'_>,
    progress: &dyn Progress,
) -> Result<PullBackup> {
    let deadline = others.deadline;
    // Another repository's job may begin between the wait and ours: wait again.
    let begin = |plan: &BackupPlan<'_>, others: &mut OtherJobs<'_>| loop {
        match dom.try_begin_backup(plan) {
            Err(e) if matches!(dom.backup_job(), Ok(Some(j)) if j.server.as_ref() != Some(plan.server)) =>
            {
                if std::time::Instant::now() >= deadline {
                    return Err(e);
                }
                others.wait()?;
            }
            other => return other,
        }
    };
    Ok(match begin(plan, others)? {
        BackupStart::Started(job) => job,
        // The check above passed, but libvirt found the bitmap broken when it started the
        // job (or it broke in between): start again as a diff with a fresh chain, once.
        BackupStart::CheckpointInconsistent(why) => {
            if let Some(cp) = basis.take() {
                abandon_checkpoint(dom, cp, &why, broken, progress);
            }
            plan.incremental_from = None;
            match begin(plan, others)? {
                BackupStart::Started(job) => job,
                BackupStart::CheckpointInconsistent(why) => {
                    return Err(job_failed(
                        dom,
                        format!("cannot start the backup job: {why}"),
                    ))
                }
            }
        }
    })
}

fn job_failed(dom: &Domain, detail: String) -> Error {
    Error::source(format!("libvirt VM {}", dom.name()), detail)
}

/// Connect to every export of the job; incremental where it exports a dirty bitmap.
/// `local`: the host is this one, and the disks' files can be read.
fn open_exports(
    job: &crate::libvirt::PullBackup,
    disks: &[DiskInfo],
    basis: Option<&str>,
    broken: Option<&str>,
    tls_dir: &std::path::Path,
    local: bool,
) -> Result<Vec<DiskInput>> {
    let mut inputs = Vec::new();
    for d in job.disks() {
        let bitmap = d
            .dirty_bitmap_context
            .as_deref()
            .and_then(|c| c.strip_prefix(META_DIRTY_BITMAP_PREFIX));
        let source = NbdSource::open(&job.nbd_uri(d, Some(tls_dir)), bitmap)?;
        let label = disk_label(disks, &d.target);
        let mut input = DiskInput::new(
            &d.target,
            // Described by the disk's path rather than the temporary NBD socket.
            Box::new(Labelled::new(Box::new(source), label, ())),
        );
        if bitmap.is_some() {
            input.changed = input.source.changed_extents()?;
            // The job merged the checkpoint's bitmaps of the layers external snapshots put
            // the disk over since; which those are is read from the files (local hosts).
            if let (true, Some(cp)) = (local, basis) {
                input.earlier_origins = merged_layers(disks, &d.target, cp);
            }
        } else {
            input.untracked_reason = Some(untracked_reason(disks, &d.target, basis, broken));
        }
        inputs.push(input);
    }
    Ok(inputs)
}

fn backup_shut_off(
    dom: &Domain,
    run: BackupRun,
    disks: &[DiskInfo],
    new_checkpoint: &str,
    basis: Option<&str>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let mut opts = opts.clone();
    let qcow2: Vec<&str> = disks
        .iter()
        .filter(|d| d.format.as_deref() == Some("qcow2"))
        .map(|d| d.target.as_str())
        .collect();
    // The VM is off, so nothing writes between this checkpoint and the read below; writes
    // after it (the VM started meanwhile) land in the new bitmap and the next run.
    if !qcow2.is_empty() {
        match dom.create_checkpoint_with(new_checkpoint, Some(&description(run.repository())), &qcow2) {
            Ok(_) => opts.checkpoint = Some(new_checkpoint.to_string()),
            Err(e) => progress.warn(&format!("VM {}: cannot create checkpoint {new_checkpoint} ({e}); the next run will be a diff", dom.name())),
        }
    }
    // The VM is off: its firmware and TPM state are as they will be restored.
    opts.state = read_state(dom, true, progress)?;
    let mut inputs = Vec::new();
    let mut held = Vec::new();
    for d in disks {
        let path = match &d.source {
            DiskSource::File(p) | DiskSource::Block(p) => p.clone(),
            _ => {
                return Err(Error::source(
                    format!("libvirt VM {}", dom.name()),
                    format!("disk {} has no local file or device", d.target),
                ))
            }
        };
        let format = d.format.clone().unwrap_or_else(|| "raw".into());
        // The checkpoint's bitmap must be in the image and consistent (a VM killed without
        // shutting down leaves it marked in-use, and then only a full read is safe), and
        // in every layer an external snapshot has put over it since, which all count.
        let tracking = chain::ChainTracking::of(&path, &format, basis);
        let tracked = tracking.bitmap();
        // QEMU's own locks keep the VM from starting while vmkeep reads (qemu-nbd without
        // --force-share takes them for other formats); see docs/libvirt.md.
        let lock = ImageLock::take(&path, dom.name())?;
        let source: Box<dyn BlockSource> = if format == "raw" {
            Box::new(FileSource::open(&path)?)
        } else {
            qemu::open_image(&path, &format, tracked)?
        };
        lock.same_file(&path, dom.name())?;
        held.push(lock);
        let mut input = DiskInput::new(&d.target, source);
        if tracked.is_some() {
            input.changed = tracking.changes(input.source.as_ref())?;
            input.earlier_origins = tracking.earlier_origins();
        } else {
            // A chain that says why is said in one line (the disk was tracked until now).
            input.expects_tracking = tracking.reason.is_some();
            input.untracked_reason = Some(
                tracking
                    .reason
                    .unwrap_or_else(|| untracked_reason(disks, &d.target, basis, None)),
            );
        }
        inputs.push(input);
    }
    crate::fault::pause("shut-off-read");
    // Should the locks not have held (a file system without OFD locks, QEMU configured
    // with locking=off), a VM that started, or a file that changed, while vmkeep read
    // fails the generation before it is committed.
    let mut confirm = || -> Result<()> {
        let state = dom.state()?;
        if state.is_active() {
            return Err(job_failed(
                dom,
                format!(
                    "the VM started ({state}) while vmkeep read its disks; nothing was committed"
                ),
            ));
        }
        for lock in &held {
            lock.unchanged(dom.name())?;
        }
        Ok(())
    };
    run.execute_with(inputs, &opts, progress, &mut confirm)
}

/// The firmware and TPM state of `dom` (see [`crate::engine::firmware`]), read now when
/// its host is this one (`local`); what is not saved is said in one line each. A remote
/// host's state files are not reachable from here: one line says that they are not saved.
fn read_state(
    dom: &Domain,
    local: bool,
    progress: &dyn Progress,
) -> Result<Vec<crate::archive::state::StateFile>> {
    let fw = crate::libvirt::xml::firmware_state(&dom.xml()?)?;
    if fw.nvram.is_none() && fw.tpm.is_none() {
        return Ok(Vec::new());
    }
    if !local {
        progress.warn(&format!(
            "VM {}: its UEFI variables and TPM state are files of the remote host; not saved (docs/libvirt.md)",
            dom.name()
        ));
        return Ok(Vec::new());
    }
    let captured = crate::engine::firmware::capture(&fw, &dom.uuid()?);
    for note in &captured.notes {
        progress.warn(&format!("VM {}: {note}", dom.name()));
    }
    Ok(captured.files)
}

/// The locks QEMU itself takes on an image file (block/file-posix.c), held by vmkeep while
/// it reads a shut-off VM's disk: open file description (OFD) read locks on byte 100 + bit
/// of each permission held and on byte 200 + bit of each permission not shared. vmkeep
/// holds *consistent read* and shares neither *write* nor *resize*, as `qemu-img convert`
/// does; a QEMU starting then fails with `Failed to get "write" lock`. Like QEMU, vmkeep
/// locks first and then tests for holders of what it excludes, so of two racing openers at
/// least one sees the other.
struct ImageLock {
    file: std::fs::File,
    path: PathBuf,
    /// (device, inode, size, mtime) when the lock was taken.
    identity: (u64, u64, u64, i64, i64),
}

/// QEMU's permission bits (include/block/block-common.h), as bit numbers.
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;
/// QEMU's lock byte bases (RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE).
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

/// The bytes vmkeep's read locks: *consistent read* held, *write* and *resize* not shared.
const MINE: [i64; 3] = [
    LOCK_PERM_BASE + PERM_CONSISTENT_READ,
    LOCK_SHARED_BASE + PERM_WRITE,
    LOCK_SHARED_BASE + PERM_RESIZE,
];

impl Drop for ImageLock {
    /// Unlock now, not at close: a child that any thread is spawning holds a copy of the
    /// descriptor until it runs its program, and with it the locks that keep QEMU out.
    fn drop(&mut self) {
        for byte in MINE {
            let _ = ofd_lock(&self.file, libc::F_OFD_SETLK, libc::F_UNLCK, byte);
        }
    }
}

impl ImageLock {
    fn take(path: &std::path::Path, vm: &str) -> Result<ImageLock> {
        let file = std::fs::File::open(path).map_err(|e| Error::source(path.display(), e))?;
        for byte in MINE {
            if let Err(e) = ofd_lock(&file, libc::F_OFD_SETLK, libc::F_RDLCK, byte) {
                return Err(lock_error(path, vm, &format!("cannot lock it ({e})")));
            }
        }
        let theirs = [
            (LOCK_PERM_BASE + PERM_WRITE, "write"),
            (LOCK_PERM_BASE + PERM_RESIZE, "resize"),
            (LOCK_SHARED_BASE + PERM_CONSISTENT_READ, "consistent read"),
        ];
        for (byte, what) in theirs {
            match ofd_lock(&file, libc::F_OFD_GETLK, libc::F_WRLCK, byte) {
                Ok(libc::F_UNLCK) => {}
                Ok(_) => {
                    return Err(lock_error(
                        path,
                        vm,
                        &format!("another process (the VM's QEMU?) holds its \"{what}\" lock"),
                    ))
                }
                Err(e) => {
                    return Err(lock_error(
                        path,
                        vm,
                        &format!("cannot test its locks ({e})"),
                    ))
                }
            }
        }
        let identity = identity(
            &file
                .metadata()
                .map_err(|e| Error::source(path.display(), e))?,
        );
        Ok(ImageLock {
            file,
            path: path.to_path_buf(),
            identity,
        })
    }

    /// `path` still names the locked file (not replaced before the reader opened it).
    fn same_file(&self, path: &std::path::Path, vm: &str) -> Result<()> {
        let now = std::fs::metadata(path).map_err(|e| Error::source(path.display(), e))?;
        let id = identity(&now);
        if (id.0, id.1) != (self.identity.0, self.identity.1) {
            return Err(lock_error(
                path,
                vm,
                "the file was replaced while vmkeep opened it",
            ));
        }
        Ok(())
    }

    /// Nothing wrote to or resized the file since the lock was taken.
    fn unchanged(&self, vm: &str) -> Result<()> {
        let now =
            std::fs::metadata(&self.path).map_err(|e| Error::source(self.path.display(), e))?;
        let held = self
            .file
            .metadata()
            .map_err(|e| Error::source(self.path.display(), e))?;
        if identity(&now) != self.identity || identity(&held) != self.identity {
            return Err(lock_error(
                &self.path,
                vm,
                "the disk changed while vmkeep read it (did the VM start?); nothing was committed",
            ));
        }
        Ok(())
    }
}

fn identity(m: &std::fs::Metadata) -> (u64, u64, u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())
}

fn lock_error(path: &std::path::Path, vm: &str, detail: &str) -> Error {
    Error::source(
        format!("libvirt VM {vm}"),
        format!("disk {}: {detail}", path.display()),
    )
}

/// One OFD lock call on byte `byte`; returns the lock type `F_OFD_GETLK` found. Not the
/// archive's `flock` ([`crate::archive::lock::flock`]): QEMU's image locks are byte-range
/// `fcntl` OFD locks, which an `flock` never conflicts with.
fn ofd_lock(
    file: &std::fs::File,
    cmd: libc::c_int,
    kind: libc::c_int,
    byte: i64,
) -> std::io::Result<libc::c_int> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a zeroed flock is a valid value; every field the call reads is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0; // required for OFD locks
                  // SAFETY: fcntl on an open descriptor with a pointer to a live flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type as libc::c_int)
}

/// The layers below disk `target`'s top image whose bitmaps of checkpoint `cp` a backup job
/// merged (see [`chain::merged_below`]); none for a disk that is no qcow2 file.
fn merged_layers(disks: &[DiskInfo], target: &str, cp: &str) -> Vec<String> {
    match disks.iter().find(|d| d.target == target) {
        Some(DiskInfo {
            source: DiskSource::File(path),
            format: Some(format),
            ..
        }) if format == "qcow2" => chain::merged_below(path, format, cp),
        _ => Vec::new(),
    }
}

fn disk_label(disks: &[DiskInfo], target: &str) -> String {
    match disks.iter().find(|d| d.target == target).map(|d| &d.source) {
        Some(DiskSource::File(p)) | Some(DiskSource::Block(p)) => p.display().to_string(),
        _ => target.to_string(),
    }
}

fn untracked_reason(
    disks: &[DiskInfo],
    target: &str,
    basis: Option<&str>,
    broken: Option<&str>,
) -> String {
    let format = disks
        .iter()
        .find(|d| d.target == target)
        .and_then(|d| d.format.clone())
        .unwrap_or_default();
    match basis {
        _ if format != "qcow2" => format!("a {format} disk cannot carry a dirty bitmap"),
        None if broken.is_some() => format!(
            "checkpoint {} is broken (its bitmap was lost or left inconsistent when QEMU stopped)",
            broken.unwrap_or_default()
        ),
        None => "no checkpoint of this repository to start from".into(),
        Some(cp) => format!("checkpoint {cp} does not track this disk"),
    }
}

/// Delete this branch's checkpoints other than `keep` (the next run needs only it). The
/// `broken` one (its bitmap lost: libvirt cannot delete what is not there) loses at least
/// its metadata, so that it is not found broken again on every run.
fn forget_old_checkpoints(
    dom: &Domain,
    prefix: &str,
    keep: &str,
    broken: Option<&str>,
    progress: &dyn Progress,
) {
    let all = match dom.list_checkpoints() {
        Ok(all) => all,
        Err(e) => {
            progress.warn(&format!(
                "VM {}: cannot list checkpoints to delete old ones: {e}",
                dom.name()
            ));
            return;
        }
    };
    for cp in all
        .iter()
        .filter(|c| c.name.starts_with(prefix) && c.name != keep)
    {
        let mut result = dom.delete_checkpoint(&cp.name, CheckpointDelete::default());
        if result.is_err() && broken == Some(cp.name.as_str()) {
            let how = CheckpointDelete {
                metadata_only: true,
                ..CheckpointDelete::default()
            };
            result = dom.delete_checkpoint(&cp.name, how);
        }
        if let Err(e) = result {
            progress.warn(&format!(
                "VM {}: cannot delete old checkpoint {}: {e}",
                dom.name(),
                cp.name
            ));
        }
    }
}

/// The export-name prefix of this repository's TCP backup jobs (a run adds its token).
fn tcp_export_prefix(repo_id: &str) -> String {
    format!("vmkeep.{repo_id}.")
}

/// Whether a backup job is one a run of this repository made: a unix socket in a folder
/// directly under `run_dir` whose name starts with `prefix` (`vmkeep-<repository id>-`),
/// or a TCP job whose every export is named `vmkeep.<repository id>.…`.
fn owned_job(job: &BackupJobXml, run_dir: &std::path::Path, prefix: &str, repo_id: &str) -> bool {
    match &job.server {
        Some(NbdServer::Unix(socket)) => {
            let Some(folder) = socket.parent() else {
                return false;
            };
            folder.parent() == Some(run_dir)
                && folder
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
        }
        Some(NbdServer::Tcp { .. }) => {
            let ours = tcp_export_prefix(repo_id);
            !job.disks.is_empty()
                && job
                    .disks
                    .iter()
                    .all(|d| d.export_name.starts_with(ours.as_str()))
        }
        None => false,
    }
}

/// Removes folders when dropped (per-run socket and scratch folders).
struct RemoveDirs(Vec<PathBuf>);

impl Drop for RemoveDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The description vmkeep gives its checkpoints: which repository made them, so that a
/// chain that outlives its repository can be recognised.
fn description(repo: &std::path::Path) -> String {
    let abs = repo.canonicalize().unwrap_or_else(|_| repo.to_path_buf());
    format!("vmkeep repository {}", abs.display())
}

/// One vmkeep checkpoint of a VM, and whose it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BranchCheckpoint {
    /// The checkpoint's name: `vmkeep.<repository id>.<generation id>`.
    pub name: String,
    /// The repository id in the name.
    pub repository_id: String,
    /// The repository folder the checkpoint's description names, if any.
    pub repository: Option<PathBuf>,
    /// "this", "other" (a live repository elsewhere), "orphan" (its repository is gone, or
    /// it is this repository's but no generation needs it) or "unknown" (no description).
    pub owner: String,
}

/// Every `vmkeep.*` checkpoint of `dom`, classified against `repo`.
pub fn branch_checkpoints(repo: &Repository, dom: &Domain) -> Result<Vec<BranchCheckpoint>> {
    let archive = repo.vm(dom.name()).ok();
    let needed = archive.as_ref().and_then(|a| {
        let id = a.generation_ids().ok()?.pop()?;
        a.generation(&id).ok()?.profile.checkpoint
    });
    let mut out = Vec::new();
    for cp in dom.list_checkpoints()? {
        let Some(rest) = cp.name.strip_prefix("vmkeep.") else {
            continue;
        };
        let repository_id = rest.split('.').next().unwrap_or("").to_string();
        let repository = cp
            .description
            .as_deref()
            .and_then(|d| d.strip_prefix("vmkeep repository "))
            .map(PathBuf::from);
        let owner = if repository_id == repo.profile.id {
            if needed.as_deref() == Some(cp.name.as_str()) {
                "this"
            } else {
                "orphan"
            }
        } else {
            match &repository {
                None => "unknown",
                Some(path) => match Repository::open(path) {
                    Ok(other) if other.profile.id == repository_id => "other",
                    _ => "orphan",
                },
            }
        };
        out.push(BranchCheckpoint {
            name: cp.name,
            repository_id,
            repository,
            owner: owner.to_string(),
        });
    }
    Ok(out)
}

/// Delete the orphaned vmkeep checkpoints of `dom`; returns their names.
pub fn remove_orphans(repo: &Repository, dom: &Domain) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for cp in branch_checkpoints(repo, dom)?
        .into_iter()
        .filter(|c| c.owner == "orphan")
    {
        dom.delete_checkpoint(&cp.name, CheckpointDelete::default())?;
        removed.push(cp.name);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_io_write(path: &std::path::Path) -> std::process::Output {
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 4k"])
            .arg(path)
            .output()
            .expect("qemu-io (qemu-utils) is installed")
    }

    #[test]
    fn image_lock_keeps_qemu_out_and_sees_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let lock = ImageLock::take(&path, "t").unwrap();
        // QEMU cannot open the image for writing while vmkeep reads it…
        let out = qemu_io_write(&path);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "qemu-io wrote under the lock");
        assert!(err.contains("\"write\" lock"), "{err}");
        // …but a reader that does not write (qemu-img info) may.
        let out = Command::new("qemu-img")
            .arg("info")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lock.unchanged("t").unwrap();
        // A change behind the lock's back (no locks honoured) is seen.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        let e = lock.unchanged("t").unwrap_err().to_string();
        assert!(e.contains("changed while vmkeep read it"), "{e}");
        drop(lock);
        let out = qemu_io_write(&path);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // An image a QEMU process holds for writing is refused.
        let sock = dir.path().join("nbd.sock");
        let mut writer = Command::new("qemu-nbd")
            .args(["-f", "raw"])
            .arg(format!("--socket={}", sock.display()))
            .arg(&path)
            .spawn()
            .unwrap();
        // qemu-nbd opens (and locks) the image before it creates its socket.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-nbd did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let e = ImageLock::take(&path, "t").err().map(|e| e.to_string());
        let _ = writer.kill();
        let _ = writer.wait();
        let e = e.expect("the lock was taken while QEMU writes");
        assert!(e.contains("\"write\" lock"), "{e}");
    }

    #[test]
    fn image_locks_end_when_dropped_while_a_thread_spawns_children() {
        // A child spawned meanwhile holds a copy of the descriptor until it runs its
        // program; QEMU starting the VM right after the read must not find the locks.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = Command::new("true").status();
                }
            })
        };
        let probe = std::fs::File::open(&path).unwrap();
        let mut held = 0;
        for _ in 0..300 {
            drop(ImageLock::take(&path, "t").unwrap());
            for byte in MINE {
                if ofd_lock(&probe, libc::F_OFD_GETLK, libc::F_WRLCK, byte).unwrap()
                    != libc::F_UNLCK
                {
                    held += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spawner.join().unwrap();
        assert_eq!(held, 0, "a dropped image lock was still held {held} times");
    }
}
