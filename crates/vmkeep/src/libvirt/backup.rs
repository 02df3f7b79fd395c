//! Pull-mode backups: [`Domain::begin_backup`] starts a libvirt backup job whose NBD
//! exports vmkeep reads, [`PullBackup`] watches it and ends it, and leftover jobs of dead
//! runs are found and ended. See the module docs of [`crate::libvirt`] on detecting a
//! failed backup and on the permissions of the socket and scratch folders.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virt::domain::Domain as VirtDomain;
use virt::error::ErrorNumber;
use virt::sys;

use super::checkpoint::untracked_disks;
use super::xml::{self, dirty_bitmap_context, DiskDevice};
use super::{ffi, lv_error, Domain};
use crate::error::{Error, Result};
use crate::fsutil::Share;
use crate::nbd::client::NbdUri;
use crate::nbd::uri::NbdTls;

/// How long to wait for libvirt to wind a backup job down after an abort.
const JOB_END_TIMEOUT: Duration = Duration::from_secs(30);

impl Domain {
    /// Start a pull-mode backup; see [`BackupPlan`].
    pub fn begin_backup(&self, plan: &BackupPlan<'_>) -> Result<PullBackup> {
        match self.try_begin_backup(plan)? {
            BackupStart::Started(job) => Ok(job),
            BackupStart::CheckpointInconsistent(message) => {
                Err(self.err(backup_begin_failure(&message, None, plan.server)))
            }
        }
    }

    /// [`Domain::begin_backup`], telling apart libvirt's refusal because the checkpoint to
    /// be incremental from has a missing or broken bitmap (`VIR_ERR_CHECKPOINT_INCONSISTENT`,
    /// what QEMU leaves when it dies without saving its bitmaps): nothing was started then,
    /// and a backup without `incremental_from` can go ahead.
    pub fn try_begin_backup(&self, plan: &BackupPlan<'_>) -> Result<BackupStart> {
        let live = xml::parse_domain(&self.live_xml()?)?;
        if !self.state()?.is_active() {
            return Err(self.err("the VM is not running; a pull-mode backup needs a running VM"));
        }
        let selected = self.select_disks(&live, plan.disks)?;
        let bitmaps = match plan.incremental_from {
            Some(cp) => self
                .checkpoint(cp)?
                .disks
                .into_iter()
                .map(|(d, _)| d)
                .collect(),
            None => BTreeSet::new(),
        };
        let gid = live.qemu_ids.map(|(_, gid)| gid);
        // Folders and files are this host's only for a local job (a unix socket); a TCP
        // job's scratch folder is on the hypervisor, which libvirt looks after.
        let local = plan.server.socket().is_some();
        let socket_dir = plan
            .server
            .socket()
            .map(|s| s.parent().unwrap_or(Path::new("/")));
        for dir in socket_dir
            .into_iter()
            .chain(local.then_some(plan.scratch_dir))
        {
            if !dir.exists() {
                // A fresh folder (it must not exist) in a parent only root can change
                // (checked, and created 0711 where missing, by `fsutil::safe_base`); owned
                // by the caller (root), group and mode as `fsutil::Share::qemu` says, both
                // set on the open folder. See the module docs for why.
                crate::fsutil::new_private_dir(dir, Share::qemu(gid))?;
            }
        }
        let specs: Vec<xml::BackupDiskSpec> = selected
            .iter()
            .map(|d| xml::BackupDiskSpec {
                target: d.target.clone(),
                export_name: plan.export_prefix.map(|p| format!("{p}{}", d.target)),
                scratch: Some(plan.scratch_dir.join(format!(
                    "{}{}",
                    plan.export_prefix.unwrap_or(""),
                    scratch_name(&self.name, &d.target)
                ))),
                incremental_from: plan
                    .incremental_from
                    .filter(|_| bitmaps.contains(&d.target))
                    .map(str::to_string),
            })
            .collect();
        let planned: Vec<String> = specs
            .iter()
            .map(|s| {
                s.export_name
                    .clone()
                    .unwrap_or_else(|| xml::default_export_names(&s.target).0)
            })
            .collect();
        self.clear_stale_job(plan.server, &planned)?;
        for scratch in specs
            .iter()
            .filter_map(|s| s.scratch.as_deref())
            .filter(|_| local)
        {
            remove_if_present(scratch)?;
        }
        if let Some(socket) = plan.server.socket() {
            remove_if_present(socket)?;
        }
        let chosen: BTreeSet<&str> = selected.iter().map(|d| d.target.as_str()).collect();
        let others: Vec<&str> = live
            .disks
            .iter()
            .filter(|d| matches!(d.device, DiskDevice::Disk | DiskDevice::Lun))
            .map(|d| d.target.as_str())
            .filter(|t| !chosen.contains(t))
            .collect();
        let backup_xml = xml::backup_xml(plan.server, &specs, &others);
        let tracked: Vec<&str> = selected
            .iter()
            .filter(|d| d.can_checkpoint())
            .map(|d| d.target.as_str())
            .collect();
        let untracked = untracked_disks(&live, &tracked);
        // A checkpoint over no disk would be metadata tracking nothing.
        let checkpoint = plan.checkpoint.filter(|_| !tracked.is_empty());
        let checkpoint_xml = checkpoint.map(|name| {
            xml::checkpoint_xml(name, plan.checkpoint_description, &tracked, &untracked)
        });
        if let Some(a) = plan.around_begin {
            a.before()?;
        }
        let began = ffi::backup_begin(&self.dom, &backup_xml, checkpoint_xml.as_deref(), 0);
        if let Some(a) = plan.around_begin {
            a.after();
        }
        if let Err(e) = began {
            if e.is(ErrorNumber::CheckpointInconsistent) && plan.incremental_from.is_some() {
                return Ok(BackupStart::CheckpointInconsistent(e.message));
            }
            return Err(self.err(backup_begin_failure(&e.message, live.qemu_ids, plan.server)));
        }
        let mut backup = PullBackup {
            dom: self.dom.clone(),
            vm: self.name.clone(),
            server: plan.server.clone(),
            checkpoint: checkpoint.map(str::to_string),
            disks: Vec::new(),
            ended: false,
        };
        // On an error here `backup` aborts the job as it drops.
        let job = ffi::backup_xml_desc(&self.dom)
            .map_err(|e| self.err(e))
            .and_then(|x| xml::parse_backup_job(&x))?;
        backup.disks = specs
            .iter()
            .map(|spec| {
                let from_job = job.disks.iter().find(|d| d.target == spec.target);
                let (default_export, default_bitmap) = xml::default_export_names(&spec.target);
                let bitmap = match from_job.and_then(|d| d.export_bitmap.clone()) {
                    Some(b) => Some(b),
                    None => spec.incremental_from.as_ref().map(|_| default_bitmap),
                };
                BackupDisk {
                    target: spec.target.clone(),
                    export_name: from_job.map_or(default_export, |d| d.export_name.clone()),
                    dirty_bitmap_context: bitmap.as_deref().map(dirty_bitmap_context),
                    scratch: from_job
                        .and_then(|d| d.scratch.clone())
                        .or_else(|| spec.scratch.clone()),
                    in_checkpoint: checkpoint.is_some() && tracked.contains(&spec.target.as_str()),
                }
            })
            .collect();
        Ok(BackupStart::Started(backup))
    }

    fn select_disks(&self, live: &xml::DomainXml, wanted: &[&str]) -> Result<Vec<xml::DiskXml>> {
        if wanted.is_empty() {
            let all: Vec<_> = live
                .disks
                .iter()
                .filter(|d| d.backupable())
                .cloned()
                .collect();
            if all.is_empty() {
                return Err(Error::usage(format!(
                    "VM {} has no disk to back up",
                    self.name
                )));
            }
            return Ok(all);
        }
        wanted
            .iter()
            .map(|target| {
                let disk = live.disk(target).ok_or_else(|| {
                    Error::usage(format!("VM {} has no disk {target}", self.name))
                })?;
                if !disk.backupable() {
                    return Err(Error::usage(format!(
                        "disk {target} of VM {} is a {} {}and cannot be backed up",
                        self.name,
                        disk.device.as_str(),
                        if disk.readonly {
                            "(read-only) "
                        } else {
                            "without medium "
                        }
                    )));
                }
                Ok(disk.clone())
            })
            .collect()
    }

    /// A backup job with the identity this run plans (`server` and `exports`) can only be
    /// a leftover of a vmkeep run that died (the VM's lock file admits one vmkeep at a
    /// time): end it. Any other backup job is someone else's.
    fn clear_stale_job(&self, server: &xml::NbdServer, exports: &[String]) -> Result<()> {
        let Some(job) = self.backup_job()? else {
            return Ok(());
        };
        if !same_job(&job, server, exports) {
            return Err(self.err(format!(
                "another backup job is running ({}); end it with `virsh domjobabort {}`",
                describe(&job),
                self.name
            )));
        }
        tracing::warn!(vm = %self.name, "ending a backup job left behind by an earlier run");
        ffi::abort_job(&self.dom)
            .map_err(|e| self.err(format!("cannot end the stale backup job: {e}")))?;
        wait_job_end(&self.dom);
        Ok(())
    }

    /// End the backup job if `owned` says it is one of ours: a job a vmkeep run of this
    /// repository left behind when it died or lost its connection (libvirtd restarted).
    /// Returns whether there was one. Jobs of anyone else (another repository's run in
    /// flight, another tool) are left alone.
    pub fn end_stale_backup(&self, owned: &dyn Fn(&xml::BackupJobXml) -> bool) -> Result<bool> {
        match self.backup_job()? {
            Some(job) if owned(&job) => {
                tracing::warn!(vm = %self.name, "ending a backup job left behind by an earlier vmkeep run");
                ffi::abort_job(&self.dom)
                    .map_err(|e| self.err(format!("cannot end the stale backup job: {e}")))?;
                if let Some(server) = &job.server {
                    wait_job_end_of(&self.dom, server, &job.export_names());
                    if let Some(socket) = server.socket() {
                        let _ = std::fs::remove_file(socket);
                    }
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The active backup job as its XML describes it (NBD server, disks, export names);
    /// `None` without one.
    pub fn backup_job(&self) -> Result<Option<xml::BackupJobXml>> {
        if !backup_job_active(&self.dom) {
            return Ok(None);
        }
        let job =
            xml::parse_backup_job(&ffi::backup_xml_desc(&self.dom).map_err(|e| self.err(e))?)?;
        Ok(Some(job))
    }
}

/// Whether `job` is the job with NBD server `server` and exactly the export names
/// `exports`: for a unix socket its per-run folder makes it unique, for TCP the export
/// names carry the run's token (a port is reused by the next job).
pub(crate) fn same_job(
    job: &xml::BackupJobXml,
    server: &xml::NbdServer,
    exports: &[String],
) -> bool {
    let mut theirs = job.export_names();
    let mut ours = exports.to_vec();
    theirs.sort_unstable();
    ours.sort_unstable();
    job.server.as_ref() == Some(server) && theirs == ours
}

/// How messages name a backup job: its NBD server.
pub fn describe(job: &xml::BackupJobXml) -> String {
    match &job.server {
        Some(s) => s.to_string(),
        None => "no NBD server".into(),
    }
}

/// What [`Domain::begin_backup`] exports.
#[derive(Debug, Clone, Copy)]
pub struct BackupPlan<'a> {
    /// Disk targets to export; empty means every writable disk with a medium. The VM's
    /// other disks get `backup='no'`.
    pub disks: &'a [&'a str],
    /// Where QEMU's NBD server listens: a unix socket (see the module docs on
    /// permissions) or TCP, with TLS or without.
    pub server: &'a xml::NbdServer,
    /// Export names are this prefix followed by the disk target (`None`: the target).
    /// vmkeep gives TCP exports a prefix naming the repository and the run, so that a job
    /// can be told from another one on the same port.
    pub export_prefix: Option<&'a str>,
    /// Folder for the per-disk scratch files, which hold the old content of blocks the
    /// guest overwrites while the backup runs (at most the disk's size each). For a TCP
    /// job it is a folder on the hypervisor, neither made nor checked here (libvirt 9.0
    /// refuses a pull backup without scratch files, so there is always one).
    pub scratch_dir: &'a Path,
    /// Create this checkpoint atomically with the backup, tracking every exported qcow2
    /// disk (skipped when none is qcow2).
    pub checkpoint: Option<&'a str>,
    /// Export only what changed since this checkpoint: each disk it tracks offers the
    /// dirty bitmap; disks it does not track (added since) are exported in full.
    pub incremental_from: Option<&'a str>,
    /// Called right before the job begins and right after, whatever happened (the guest's
    /// file systems frozen for exactly that moment).
    pub around_begin: Option<&'a dyn AroundBegin>,
    /// Description of the new checkpoint (vmkeep names its repository there).
    pub checkpoint_description: Option<&'a str>,
}

/// What [`Domain::try_begin_backup`] did.
#[derive(Debug)]
pub enum BackupStart {
    /// libvirt started the job; the handle must be ended with [`PullBackup::end`] (dropping it
    /// aborts the job).
    Started(PullBackup),
    /// libvirt refused the incremental backup: a bitmap of the checkpoint it was to start
    /// from is missing or broken (libvirt's message). No job was started.
    CheckpointInconsistent(String),
}

/// A disk of a running pull backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDisk {
    /// The disk's `<target dev=…>` (vda, sdb, ...).
    pub target: String,
    /// NBD export name (the target, unless libvirt says otherwise).
    pub export_name: String,
    /// NBD metadata context of the changed blocks (`qemu:dirty-bitmap:backup-vda`) for an
    /// incremental export; `None` for a full one.
    pub dirty_bitmap_context: Option<String>,
    /// The scratch file QEMU holds the disk's overwritten blocks in while the job runs
    /// (when libvirt names it); removed when the job ends.
    pub scratch: Option<PathBuf>,
    /// Whether the checkpoint created with this backup tracks the disk.
    pub in_checkpoint: bool,
}

/// What has become of a pull-mode backup job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupJobState {
    /// The job serves our exports: what they show is the point-in-time view.
    Running,
    /// The job ended with no error (libvirt reported it completed, without a message).
    Completed,
    /// The job is gone or broken; what was read cannot be trusted.
    Failed(String),
}

/// A running pull-mode backup. Reads are trustworthy while [`PullBackup::state`] is
/// [`BackupJobState::Running`]; [`PullBackup::end`] is the normal end. Dropping the handle
/// without ending aborts the job (if it is still ours) and removes its files.
pub struct PullBackup {
    dom: VirtDomain,
    vm: String,
    server: xml::NbdServer,
    checkpoint: Option<String>,
    disks: Vec<BackupDisk>,
    ended: bool,
}

impl fmt::Debug for PullBackup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullBackup")
            .field("vm", &self.vm)
            .field("server", &self.server)
            .field("checkpoint", &self.checkpoint)
            .field("disks", &self.disks)
            .finish()
    }
}

impl PullBackup {
    /// The name of the VM being backed up.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// The job's NBD server; the handle removes a unix socket when the job ends.
    pub fn server(&self) -> &xml::NbdServer {
        &self.server
    }

    /// The export names of the job's disks: with [`PullBackup::server`], the job's
    /// identity.
    fn exports(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.export_name.clone()).collect()
    }

    /// Whether `job` is this one.
    pub fn is(&self, job: &xml::BackupJobXml) -> bool {
        same_job(job, &self.server, &self.exports())
    }

    /// The checkpoint created with this backup, if any.
    pub fn checkpoint(&self) -> Option<&str> {
        self.checkpoint.as_deref()
    }

    /// Every disk the job exports, in the order they were requested.
    pub fn disks(&self) -> &[BackupDisk] {
        &self.disks
    }

    /// The exported disk whose target is `target`; `None` when the job does not export it.
    pub fn disk(&self, target: &str) -> Option<&BackupDisk> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// The NBD URI of a disk of this backup: `nbd+unix:///EXPORT?socket=PATH`, or for TCP
    /// `nbd://NAME:PORT/EXPORT`, with TLS `nbds://NAME:PORT/EXPORT?tls-certificates=DIR`
    /// (`tls_dir`: the client's credentials, `ca-cert.pem`, `client-cert.pem`,
    /// `client-key.pem`; the server's certificate must name NAME).
    pub fn nbd_uri(&self, disk: &BackupDisk, tls_dir: Option<&Path>) -> String {
        let uri = match &self.server {
            xml::NbdServer::Unix(socket) => NbdUri::unix(socket.clone(), &disk.export_name),
            xml::NbdServer::Tcp { name, port, tls } => {
                let uri = NbdUri::tcp(name, *port, &disk.export_name);
                match (tls, tls_dir) {
                    (true, Some(dir)) => uri.with_tls(NbdTls::with_certificates(dir)),
                    (true, None) => uri.with_tls(NbdTls::default()),
                    (false, _) => uri,
                }
            }
        };
        uri.to_string()
    }

    fn err(&self, detail: impl fmt::Display) -> Error {
        lv_error(&self.vm, detail)
    }

    /// Whether the job still serves the point-in-time view (see the module docs on why
    /// an ended job counts as failed until vmkeep itself ends it).
    pub fn state(&self) -> Result<BackupJobState> {
        let active = self.dom.is_active().map_err(|e| self.err(e.message()))?;
        if !active {
            return Ok(BackupJobState::Failed(
                "the VM stopped during the backup".into(),
            ));
        }
        // A job that ends between the two calls leaves no XML: it is then no longer
        // running, which the completed-job check below reports.
        if let Some(Ok(job)) = backup_job_active(&self.dom)
            .then(|| ffi::backup_xml_desc(&self.dom))
            .and_then(Result::ok)
            .map(|x| xml::parse_backup_job(&x))
        {
            if self.is(&job) {
                return Ok(BackupJobState::Running);
            }
            // After vmkeep ended its job, another one (another repository's run, which
            // waited for this one) may have begun: the completed job below is ours.
            if !self.ended {
                return Ok(BackupJobState::Failed(
                    "another backup job replaced vmkeep's".into(),
                ));
            }
        }
        let last = ffi::job_stats(
            &self.dom,
            sys::VIR_DOMAIN_JOB_STATS_COMPLETED | sys::VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED,
        )
        .ok();
        let message = last.as_ref().and_then(|s| s.error.clone());
        if !self.ended {
            return Ok(BackupJobState::Failed(match message {
                Some(m) => format!("the backup job ended before vmkeep finished reading: {m}"),
                None => "the backup job ended before vmkeep finished reading".into(),
            }));
        }
        Ok(match last {
            Some(s) if s.job_type == sys::VIR_DOMAIN_JOB_COMPLETED as i32 && s.error.is_none() => {
                BackupJobState::Completed
            }
            Some(s) if s.job_type == sys::VIR_DOMAIN_JOB_FAILED as i32 => {
                BackupJobState::Failed(s.error.unwrap_or_else(|| "the backup job failed".into()))
            }
            Some(s) => match s.error {
                // vmkeep's own abort: the normal end of a pull backup.
                Some(m) if m == "Operation canceled" => BackupJobState::Completed,
                Some(m) => BackupJobState::Failed(m),
                None => BackupJobState::Completed,
            },
            None => BackupJobState::Completed,
        })
    }

    /// End the backup: stop the job (an abort is the normal end of a pull backup),
    /// remove its files, and fail if the job had already ended or failed, because then
    /// what was read is not the point-in-time view.
    pub fn end(mut self) -> Result<()> {
        let before = self.state();
        let outcome = match before {
            Ok(BackupJobState::Running) => self.stop(),
            Ok(BackupJobState::Failed(why)) => Err(self.err(format!("backup failed: {why}"))),
            Ok(BackupJobState::Completed) => Ok(()),
            Err(e) => Err(e),
        };
        self.ended = true;
        self.remove_files();
        outcome
    }

    fn stop(&mut self) -> Result<()> {
        ffi::abort_job(&self.dom)
            .map_err(|e| self.err(format!("cannot end the backup job: {e}")))?;
        self.ended = true;
        // Another repository's run may begin its job as soon as this one ends: wait for
        // this job, not for the domain to have none.
        if wait_job_end_of(&self.dom, &self.server, &self.exports()) {
            return Err(self.err("the backup job did not end within 30 s of the abort"));
        }
        match self.state()? {
            BackupJobState::Failed(why) => Err(self.err(format!("backup failed: {why}"))),
            _ => Ok(()),
        }
    }

    /// Remove the scratch files (libvirt normally does) and the socket (left behind when
    /// QEMU dies); only for a local job (a unix socket): the paths of a TCP job are on
    /// another host, and a file of the same name here is not its.
    fn remove_files(&self) {
        let Some(socket) = self.server.socket() else {
            return;
        };
        for path in self
            .disks
            .iter()
            .filter_map(|d| d.scratch.as_deref())
            .chain([socket])
        {
            if let Err(e) = remove_if_present(path) {
                tracing::warn!(vm = %self.vm, "{e}");
            }
        }
    }
}

impl Drop for PullBackup {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if matches!(self.state(), Ok(BackupJobState::Running)) {
            tracing::warn!(vm = %self.vm, "aborting a backup job that was not ended");
            let _ = ffi::abort_job(&self.dom);
            wait_job_end_of(&self.dom, &self.server, &self.exports());
        }
        self.remove_files();
    }
}

/// The message for a failed `virDomainBackupBegin`, with a hint when QEMU could not
/// create its socket or scratch file, or has no TLS credentials for a TCP export.
fn backup_begin_failure(
    message: &str,
    qemu_ids: Option<(u32, u32)>,
    server: &xml::NbdServer,
) -> String {
    let mut text = format!("cannot start the backup: {message}");
    if let xml::NbdServer::Tcp { tls: true, .. } = server {
        if tls_setup_missing(message) {
            text.push_str(
                " (the host has no TLS credentials for backups: set backup_tls_x509_cert_dir \
                 in its /etc/libvirt/qemu.conf, see docs/remote.md; or use --insecure-nbd \
                 on a network you trust)",
            );
        }
    }
    if message.contains("Permission denied") {
        let who = qemu_ids.map_or("QEMU".to_string(), |(uid, gid)| {
            format!("QEMU (uid {uid}, gid {gid})")
        });
        text.push_str(&format!(
            " ({who} must be able to create the NBD socket and the scratch files; \
             see the permissions notes of vmkeep::libvirt, and AppArmor)"
        ));
    }
    text
}

/// Whether the domain has an active backup job.
fn backup_job_active(dom: &VirtDomain) -> bool {
    match ffi::job_stats(dom, 0) {
        Ok(s) => {
            let running = s.job_type == sys::VIR_DOMAIN_JOB_BOUNDED as i32
                || s.job_type == sys::VIR_DOMAIN_JOB_UNBOUNDED as i32;
            running && s.operation == Some(sys::VIR_DOMAIN_JOB_OPERATION_BACKUP as i32)
        }
        // Job statistics fail on a shut-off VM: no job there.
        Err(_) => false,
    }
}

/// Whether libvirt's message for a failed TLS export says the credentials are missing.
pub(crate) fn tls_setup_missing(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("tls") || m.contains("x509") || m.contains("cert")
}

impl std::fmt::Debug for dyn AroundBegin + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AroundBegin")
    }
}

/// What runs around the instant a backup job begins (its point in time): the guest
/// agent's freeze before and thaw after ([`crate::engine::quiesce`]).
pub trait AroundBegin {
    /// Right before the job begins; an error stops the backup before it.
    fn before(&self) -> Result<()>;
    /// Right after, whether the job began or not.
    fn after(&self);
}

/// Whether libvirt's message for a failed TCP export says the port is taken.
pub(crate) fn port_taken(message: &str) -> bool {
    message.contains("Address already in use") || message.contains("address already in use")
}

/// Wait (at most [`JOB_END_TIMEOUT`]) until the backup job with NBD server `server` and
/// export names `exports` no longer runs; returns whether it still does.
fn wait_job_end_of(dom: &VirtDomain, server: &xml::NbdServer, exports: &[String]) -> bool {
    let serving = || {
        backup_job_active(dom)
            && ffi::backup_xml_desc(dom)
                .ok()
                .and_then(|x| xml::parse_backup_job(&x).ok())
                .is_some_and(|j| same_job(&j, server, exports))
    };
    let start = Instant::now();
    while serving() {
        if start.elapsed() >= JOB_END_TIMEOUT {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn wait_job_end(dom: &VirtDomain) {
    let start = Instant::now();
    while backup_job_active(dom) && start.elapsed() < JOB_END_TIMEOUT {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn scratch_name(vm: &str, target: &str) -> String {
    format!("{}.{target}.scratch.qcow2", vm.replace('/', "_"))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn prepare(dir: &Path, qemu_gid: Option<u32>) -> Result<()> {
        crate::fsutil::new_private_dir(dir, Share::qemu(qemu_gid)).map(drop)
    }

    #[test]
    fn private_dir_is_closed_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        prepare(&dir, None).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // An existing folder is never taken over.
        assert!(prepare(&dir, None).is_err());
        std::fs::remove_dir(&dir).unwrap();
        let gid = own_gid();
        prepare(&dir, Some(gid)).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o770);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.gid(), gid);
    }

    /// The caller's own group: chown to it works without privileges.
    fn own_gid() -> u32 {
        use std::os::unix::fs::MetadataExt;
        let probe = tempfile::tempfile().unwrap();
        probe.metadata().unwrap().gid()
    }
}
