//! libvirt: the VM inventory, pull-mode backups with checkpoints, and defining a restored
//! copy of a VM.
//!
//! [`Hypervisor`] is a connection (`qemu:///system` by default), [`Domain`] one VM. A
//! backup of a running VM is a libvirt *pull-mode* backup ([`Domain::begin_backup`]):
//! QEMU freezes a point-in-time view of the chosen disks (copy-before-write into a qcow2
//! scratch file per disk) and serves each one over NBD on a unix socket; vmkeep's NBD
//! client reads them and [`PullBackup::end`] stops the job. The `virt` crate supplies the
//! connection and domain calls; the backup and checkpoint calls exist only as raw C
//! functions in `virt::sys` and are wrapped once, in `ffi.rs`, the only `unsafe` of this
//! module. The XML in and out is handled by pure functions in [`xml`].
//!
//! # Names on the NBD socket (libvirt 9.0, QEMU 7.2)
//! Each disk is exported under its target name (`vda`). An incremental backup also
//! exports a dirty bitmap named `backup-<target>`, read through the NBD metadata context
//! `qemu:dirty-bitmap:backup-vda`; a full backup offers only `base:allocation`. vmkeep
//! takes the names from the running job's XML and falls back to
//! [`xml::default_export_names`]; [`xml::dirty_bitmap_context`] builds the context name.
//!
//! # Detecting a failed backup
//! A pull-mode job never completes on its own: it runs until someone aborts it, QEMU stops,
//! or copy-before-write fails (scratch space exhausted). The NBD client cannot tell all of
//! these from a good read (the export may just vanish), and libvirt reports an abort from
//! outside (`virsh domjobabort`) exactly like vmkeep's own normal end: a *completed*
//! backup job with the message "Operation canceled"; a destroyed VM leaves a *cancelled*
//! job. So a [`PullBackup`] is trusted only while [`PullBackup::state`] says
//! [`BackupJobState::Running`] (an active backup job serving *our* socket), and
//! [`PullBackup::end`] succeeds only when it was still running when vmkeep ended it and
//! did not end as failed. Callers check the state after reading the last block and
//! before committing a generation.
//!
//! # Permissions
//! QEMU runs as `libvirt-qemu` (Debian; uid and gid come from the running VM's DAC label).
//! It creates the NBD socket and writes the scratch files, so their folders must be
//! writable by it; whoever can connect to the socket can read the VM's disks, so nobody
//! else may enter the socket folder. vmkeep creates missing folders with
//! [`prepare_private_dir`]: owner root (vmkeep itself), group QEMU's gid, mode 0770. Root
//! ownership rather than `libvirt-qemu:… 0700` keeps a compromised QEMU from loosening the
//! folder's mode (only the owner may chmod), while still letting it create and remove its
//! socket. QEMU creates the socket itself `rwxrwxr-x` (no write for others, so they could
//! not connect even with a looser folder). Folders the caller passes in are used as they
//! are (`engine::live` makes them fresh with [`crate::fsutil::private_dir`]); a missing
//! one is made fresh, in a parent checked by [`crate::fsutil::safe_base`]. libvirt
//! removes the scratch files when the job ends; when QEMU dies the socket file stays
//! behind, and [`PullBackup::end`] (or dropping the handle) removes it.
//!
//! # AppArmor (Debian, Ubuntu)
//! With AppArmor enabled, libvirt's per-VM profile admits the scratch files (libvirt
//! labels them when the job starts), but not a socket in an arbitrary folder. Allow the
//! socket folder once, in `/etc/apparmor.d/local/abstractions/libvirt-qemu`:
//! `/run/vmkeep/** rwk,` (or wherever the sockets live), then reload the profiles. The
//! test machine had AppArmor disabled, so this is from the profiles' text, not a test.
//!
//! # Checkpoints
//! A checkpoint is libvirt metadata plus a persistent dirty bitmap of the same name in
//! each tracked qcow2 image (raw disks cannot be tracked; they are always read in full).
//! All bitmaps stay active: checkpoint `c1` records every write since `c1`, whatever was
//! created after it, so deleting any checkpoint leaves the others valid. libvirt 9.0
//! refuses to delete a checkpoint of a shut-off VM; [`Domain::delete_checkpoint`] then
//! deletes the metadata and removes the bitmaps with `qemu-img bitmap --remove`.
//! libvirt 9.0 cannot choose the bitmap granularity; QEMU uses the qcow2 cluster size
//! (64 KiB by default).

mod ffi;
pub mod xml;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain as VirtDomain;
use virt::error::ErrorNumber;
use virt::sys;

use crate::error::{Error, Result};
pub use xml::{dirty_bitmap_context, CheckpointInfo, CopySpec, DiskDevice, DiskSource, NewDisk};

/// The connection used when none is given.
pub const DEFAULT_URI: &str = "qemu:///system";

/// How long to wait for libvirt to wind a backup job down after an abort.
const JOB_END_TIMEOUT: Duration = Duration::from_secs(30);

fn lv_error(vm: &str, detail: impl fmt::Display) -> Error {
    if vm.is_empty() {
        Error::source("libvirt", detail)
    } else {
        Error::source(format!("libvirt {vm}"), detail)
    }
}

/// A VM's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    NoState,
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    Suspended,
}

impl DomainState {
    fn from_raw(raw: sys::virDomainState) -> Self {
        match raw {
            sys::VIR_DOMAIN_RUNNING => DomainState::Running,
            sys::VIR_DOMAIN_BLOCKED => DomainState::Blocked,
            sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
            sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
            sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
            sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => DomainState::Suspended,
            _ => DomainState::NoState,
        }
    }

    /// Whether QEMU runs (a pull backup needs it; a paused VM still serves NBD).
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            DomainState::ShutOff | DomainState::Crashed | DomainState::NoState
        )
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainState::NoState => "no state",
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "shutting down",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::Suspended => "suspended",
        })
    }
}

/// A disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// vda, sdb… (also the NBD export name of a pull backup).
    pub target: String,
    pub device: DiskDevice,
    /// qcow2, raw…
    pub format: Option<String>,
    pub source: DiskSource,
    pub readonly: bool,
    /// Guest-visible size in bytes; `None` when unknown (no medium, unreadable image).
    pub size: Option<u64>,
}

/// A VM as the inventory shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub disks: Vec<DiskInfo>,
}

/// A connection to libvirt.
pub struct Hypervisor {
    conn: Connect,
    uri: String,
}

impl Hypervisor {
    /// Connect read-write to `uri` ([`DEFAULT_URI`] when `None`).
    pub fn connect(uri: Option<&str>) -> Result<Self> {
        let uri = uri.unwrap_or(DEFAULT_URI).to_string();
        // libvirt's default handler prints every error on stderr; vmkeep reports them.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&uri))
            .map_err(|e| lv_error("", format!("cannot connect to {uri}: {}", e.message())))?;
        Ok(Hypervisor { conn, uri })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Every VM libvirt knows, running or defined, with its disks.
    pub fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        let all = self
            .conn
            .list_all_domains(0)
            .map_err(|e| lv_error("", format!("cannot list VMs: {}", e.message())))?;
        let mut out = Vec::with_capacity(all.len());
        for dom in all {
            let name = dom.name().map_err(|e| lv_error("", e.message()))?;
            match (Domain {
                dom,
                name: name.clone(),
            })
            .info()
            {
                Ok(info) => out.push(info),
                // A VM undefined between the listing and the query is simply gone.
                Err(_) if self.conn.lookup_domain_by_name(&name).is_err() => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The VM called `name`; an unknown name is a usage error.
    pub fn domain(&self, name: &str) -> Result<Domain> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Domain {
                dom,
                name: name.to_string(),
            }),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {
                Err(Error::usage(format!("unknown VM {name} on {}", self.uri)))
            }
            Err(e) => Err(lv_error(name, e.message())),
        }
    }

    /// Names of the libvirt networks defined on the host (active or not).
    pub fn list_networks(&self) -> Result<Vec<String>> {
        let nets = self
            .conn
            .list_all_networks(0)
            .map_err(|e| lv_error("", format!("cannot list networks: {}", e.message())))?;
        let mut names = nets
            .iter()
            .map(|n| n.name().map_err(|e| lv_error("", e.message())))
            .collect::<Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    /// Define a new VM from a saved definition (see [`xml::copy_domain_xml`]): new name,
    /// new UUID, fresh MACs, the disks of `spec`. An existing VM of that name is an error
    /// unless `spec.replace`, and a running one is never replaced.
    pub fn define_copy(&self, saved_xml: &str, spec: &CopySpec) -> Result<Domain> {
        let networks = self.list_networks()?;
        let mut used = BTreeSet::new();
        let mut mac = || loop {
            let bytes = *uuid::Uuid::new_v4().as_bytes();
            let tail = [bytes[0], bytes[1], bytes[2]];
            if used.insert(tail) {
                return tail;
            }
        };
        let new_xml = xml::copy_domain_xml(saved_xml, spec, &networks, &mut mac)?;
        let name = &spec.new_name;
        let replaced = match self.conn.lookup_domain_by_name(name) {
            Err(e) if e.code().is(ErrorNumber::NoDomain) => None,
            Err(e) => return Err(lv_error(name, e.message())),
            Ok(_) if !spec.replace => {
                return Err(Error::usage(format!(
                    "VM {name} already exists on {} (choose another name or replace it)",
                    self.uri
                )))
            }
            Ok(dom) => {
                let old = Domain {
                    dom,
                    name: name.clone(),
                };
                if old.state()?.is_active() {
                    return Err(Error::usage(format!(
                        "VM {name} is running; vmkeep never replaces a running VM"
                    )));
                }
                let old_xml = old.xml()?;
                old.undefine()?;
                Some(old_xml)
            }
        };
        match self.conn.define_domain_xml(&new_xml) {
            Ok(dom) => Ok(Domain {
                dom,
                name: name.clone(),
            }),
            Err(e) => {
                if let Some(old_xml) = replaced {
                    // Put the replaced VM back rather than leave nothing.
                    let _ = self.conn.define_domain_xml(&old_xml);
                }
                Err(lv_error(
                    name,
                    format!("cannot define the copy: {}", e.message()),
                ))
            }
        }
    }
}

/// One VM.
pub struct Domain {
    dom: VirtDomain,
    name: String,
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Domain").field("name", &self.name).finish()
    }
}

impl Domain {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, detail: impl fmt::Display) -> Error {
        lv_error(&self.name, detail)
    }

    pub fn uuid(&self) -> Result<String> {
        self.dom.uuid_string().map_err(|e| self.err(e.message()))
    }

    pub fn state(&self) -> Result<DomainState> {
        let (state, _) = self.dom.state().map_err(|e| self.err(e.message()))?;
        Ok(match state {
            virt::enumutil::Enum::Known(_) => DomainState::from_raw(state.to_raw()),
            virt::enumutil::Enum::Unknown(_) => DomainState::NoState,
        })
    }

    /// The persistent configuration with secrets, as a backup archives it
    /// (`VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE`).
    pub fn xml(&self) -> Result<String> {
        self.dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(|e| self.err(e.message()))
    }

    /// The live configuration (actual image paths, QEMU's security label).
    pub fn live_xml(&self) -> Result<String> {
        self.dom.xml_desc(0).map_err(|e| self.err(e.message()))
    }

    /// Name, UUID, state and disks with their sizes.
    pub fn info(&self) -> Result<DomainInfo> {
        let parsed = xml::parse_domain(&self.live_xml()?)?;
        let disks = parsed
            .disks
            .into_iter()
            .map(|d| DiskInfo {
                size: self.disk_size(&d),
                target: d.target,
                device: d.device,
                format: d.format,
                source: d.source,
                readonly: d.readonly,
            })
            .collect();
        Ok(DomainInfo {
            name: self.name.clone(),
            uuid: self.uuid()?,
            state: self.state()?,
            disks,
        })
    }

    /// `virDomainGetBlockInfo`, else `qemu-img info -U` of the image, else its file size.
    fn disk_size(&self, disk: &xml::DiskXml) -> Option<u64> {
        if disk.source == DiskSource::None {
            return None;
        }
        if let Ok(size) = ffi::block_capacity(&self.dom, &disk.target) {
            return Some(size);
        }
        let path = disk.source.path()?;
        qemu_img_virtual_size(path).or_else(|| std::fs::metadata(path).ok().map(|m| m.len()))
    }

    pub fn start(&self) -> Result<()> {
        self.dom
            .create()
            .map(drop)
            .map_err(|e| self.err(format!("cannot start: {}", e.message())))
    }

    /// Stop the VM at once (pull the plug).
    pub fn destroy(&self) -> Result<()> {
        self.dom
            .destroy()
            .map_err(|e| self.err(format!("cannot stop: {}", e.message())))
    }

    /// Remove the VM's definition with its snapshot and checkpoint metadata, managed-save
    /// image and NVRAM (disk images stay).
    pub fn undefine(&self) -> Result<()> {
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        self.dom
            .undefine_flags(flags)
            .map_err(|e| self.err(format!("cannot undefine: {}", e.message())))
    }

    /// Start a pull-mode backup; see [`BackupPlan`].
    pub fn begin_backup(&self, plan: &BackupPlan<'_>) -> Result<PullBackup> {
        match self.try_begin_backup(plan)? {
            BackupStart::Started(job) => Ok(job),
            BackupStart::CheckpointInconsistent(message) => {
                Err(self.err(backup_begin_failure(&message, None)))
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
        self.clear_stale_job(plan.socket)?;
        let gid = live.qemu_ids.map(|(_, gid)| gid);
        for dir in [
            plan.socket.parent().unwrap_or(Path::new("/")),
            plan.scratch_dir,
        ] {
            if !dir.exists() {
                prepare_private_dir(dir, gid)?;
            }
        }
        let specs: Vec<xml::BackupDiskSpec> = selected
            .iter()
            .map(|d| xml::BackupDiskSpec {
                target: d.target.clone(),
                scratch: plan.scratch_dir.join(scratch_name(&self.name, &d.target)),
                incremental_from: plan
                    .incremental_from
                    .filter(|_| bitmaps.contains(&d.target))
                    .map(str::to_string),
            })
            .collect();
        for spec in &specs {
            remove_if_present(&spec.scratch)?;
        }
        remove_if_present(plan.socket)?;
        let chosen: BTreeSet<&str> = selected.iter().map(|d| d.target.as_str()).collect();
        let others: Vec<&str> = live
            .disks
            .iter()
            .filter(|d| matches!(d.device, DiskDevice::Disk | DiskDevice::Lun))
            .map(|d| d.target.as_str())
            .filter(|t| !chosen.contains(t))
            .collect();
        let backup_xml = xml::backup_xml(plan.socket, &specs, &others);
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
        if let Err(e) = ffi::backup_begin(&self.dom, &backup_xml, checkpoint_xml.as_deref(), 0) {
            if e.is(ErrorNumber::CheckpointInconsistent) && plan.incremental_from.is_some() {
                return Ok(BackupStart::CheckpointInconsistent(e.message));
            }
            return Err(self.err(backup_begin_failure(&e.message, live.qemu_ids)));
        }
        let mut backup = PullBackup {
            dom: self.dom.clone(),
            vm: self.name.clone(),
            socket: plan.socket.to_path_buf(),
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
                        .unwrap_or_else(|| spec.scratch.clone()),
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

    /// A backup job serving `socket` can only be a leftover of a vmkeep run that died
    /// (the VM's lock file admits one vmkeep at a time): end it. Any other backup job is
    /// someone else's.
    fn clear_stale_job(&self, socket: &Path) -> Result<()> {
        let Some(job_socket) = self.running_backup_socket()? else {
            return Ok(());
        };
        if job_socket.as_deref() != Some(socket) {
            return Err(self.err(format!(
                "another backup job is running (NBD socket {}); end it with `virsh domjobabort {}`",
                job_socket.as_deref().unwrap_or(Path::new("none")).display(),
                self.name
            )));
        }
        tracing::warn!(vm = %self.name, "ending a backup job left behind by an earlier run");
        ffi::abort_job(&self.dom)
            .map_err(|e| self.err(format!("cannot end the stale backup job: {e}")))?;
        wait_job_end(&self.dom);
        Ok(())
    }

    /// End the backup job if `owned` says its NBD socket is one of ours: a job a vmkeep
    /// run of this repository left behind when it died or lost its connection (libvirtd
    /// restarted). Returns whether there was one. Jobs of anyone else (another
    /// repository's run in flight, another tool) are left alone.
    pub fn end_stale_backup(&self, owned: &dyn Fn(&Path) -> bool) -> Result<bool> {
        match self.running_backup_socket()? {
            Some(Some(socket)) if owned(&socket) => {
                tracing::warn!(vm = %self.name, "ending a backup job left behind by an earlier vmkeep run");
                ffi::abort_job(&self.dom)
                    .map_err(|e| self.err(format!("cannot end the stale backup job: {e}")))?;
                wait_job_end_of(&self.dom, &socket);
                let _ = std::fs::remove_file(&socket);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The NBD socket of the active backup job: `None` without one, `Some(None)` for a
    /// job without a unix socket (push mode, TCP).
    pub fn backup_job_socket(&self) -> Result<Option<Option<PathBuf>>> {
        self.running_backup_socket()
    }

    fn running_backup_socket(&self) -> Result<Option<Option<PathBuf>>> {
        if !backup_job_active(&self.dom) {
            return Ok(None);
        }
        let job =
            xml::parse_backup_job(&ffi::backup_xml_desc(&self.dom).map_err(|e| self.err(e))?)?;
        Ok(Some(job.socket))
    }

    /// QEMU's group (from the running VM's DAC label), `None` if QEMU runs as the caller.
    pub fn qemu_gid(&self) -> Result<Option<u32>> {
        Ok(xml::parse_domain(&self.live_xml()?)?
            .qemu_ids
            .map(|(_, gid)| gid))
    }

    /// All checkpoints, parents before children.
    ///
    /// Listing races with another run creating or deleting a checkpoint of the same VM
    /// (another repository's, at the same time): libvirt then fails the listing ("name
    /// ... must not be NULL") or a listed checkpoint is gone before its XML is read. Such
    /// a listing is tried again, a bounded number of times.
    pub fn list_checkpoints(&self) -> Result<Vec<CheckpointInfo>> {
        let mut tries = 0;
        loop {
            match self.list_checkpoints_once() {
                Err(_) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    fn list_checkpoints_once(&self) -> Result<Vec<CheckpointInfo>> {
        let handles =
            ffi::list_all_checkpoints(&self.dom, sys::VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
                .map_err(|e| self.err(format!("cannot list checkpoints: {e}")))?;
        handles
            .iter()
            .map(|c| {
                let text = c
                    .xml_desc(sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
                    .map_err(|e| self.err(e))?;
                xml::parse_checkpoint(&text)
            })
            .collect()
    }

    /// The checkpoint `name`; a missing one is a source error naming it.
    pub fn checkpoint(&self, name: &str) -> Result<CheckpointInfo> {
        let handle = self.lookup_checkpoint(name)?;
        let text = handle
            .xml_desc(sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
            .map_err(|e| self.err(e))?;
        xml::parse_checkpoint(&text)
    }

    fn lookup_checkpoint(&self, name: &str) -> Result<ffi::Checkpoint> {
        ffi::checkpoint_lookup(&self.dom, name).map_err(|e| {
            if e.is(ErrorNumber::NoDomainCheckpoint) {
                self.err(format!("no checkpoint named '{name}'"))
            } else {
                self.err(format!("checkpoint '{name}': {e}"))
            }
        })
    }

    /// The disks whose bitmap of checkpoint `name` QEMU cannot use: missing from the image
    /// or marked inconsistent (QEMU was killed, or the host crashed, before it saved the
    /// bitmap). libvirt reports a bitmap's size (`VIR_DOMAIN_CHECKPOINT_XML_SIZE`) only
    /// for a bitmap it found and QEMU can read, so a tracked disk without a size is broken.
    /// Needs a running VM; an error means the bitmaps could not be proven intact.
    pub fn broken_checkpoint_disks(&self, name: &str) -> Result<Vec<String>> {
        let handle = self.lookup_checkpoint(name)?;
        let text = handle
            .xml_desc(
                sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN | sys::VIR_DOMAIN_CHECKPOINT_XML_SIZE,
            )
            .map_err(|e| self.err(format!("checkpoint '{name}': {e}")))?;
        Ok(xml::checkpoint_bitmap_sizes(&text)?
            .into_iter()
            .filter(|(_, size)| size.is_none())
            .map(|(disk, _)| disk)
            .collect())
    }

    pub fn checkpoint_exists(&self, name: &str) -> Result<bool> {
        match ffi::checkpoint_lookup(&self.dom, name) {
            Ok(_) => Ok(true),
            Err(e) if e.is(ErrorNumber::NoDomainCheckpoint) => Ok(false),
            Err(e) => Err(self.err(format!("checkpoint '{name}': {e}"))),
        }
    }

    /// Create a checkpoint outside a backup, tracking `disks` (all qcow2 disks when
    /// empty). Needs a running VM.
    pub fn create_checkpoint(&self, name: &str, disks: &[&str]) -> Result<CheckpointInfo> {
        self.create_checkpoint_with(name, None, disks)
    }

    /// [`Domain::create_checkpoint`] with a description.
    pub fn create_checkpoint_with(
        &self,
        name: &str,
        description: Option<&str>,
        disks: &[&str],
    ) -> Result<CheckpointInfo> {
        let live = xml::parse_domain(&self.live_xml()?)?;
        let tracked: Vec<&str> = live
            .disks
            .iter()
            .filter(|d| {
                d.can_checkpoint() && (disks.is_empty() || disks.contains(&d.target.as_str()))
            })
            .map(|d| d.target.as_str())
            .collect();
        let untracked = untracked_disks(&live, &tracked);
        let text = xml::checkpoint_xml(name, description, &tracked, &untracked);
        let handle = ffi::checkpoint_create_xml(&self.dom, &text, 0)
            .map_err(|e| self.err(format!("cannot create checkpoint '{name}': {e}")))?;
        xml::parse_checkpoint(
            &handle
                .xml_desc(sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
                .map_err(|e| self.err(e))?,
        )
    }

    /// Delete a checkpoint. On a shut-off VM, where libvirt 9.0 refuses, the metadata is
    /// deleted and the qcow2 bitmaps removed with `qemu-img bitmap --remove`.
    pub fn delete_checkpoint(&self, name: &str, how: CheckpointDelete) -> Result<()> {
        let handle = self.lookup_checkpoint(name)?;
        let offline = !how.metadata_only && !self.state()?.is_active();
        if offline && how.children {
            return Err(self.err(format!(
                "cannot delete checkpoint '{name}' with its children while the VM is shut off"
            )));
        }
        let bitmaps = if offline {
            self.checkpoint(name)?.disks
        } else {
            Vec::new()
        };
        let mut flags = 0;
        if how.metadata_only || offline {
            flags |= sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY;
        }
        if how.children {
            flags |= sys::VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN;
        }
        handle
            .delete(flags)
            .map_err(|e| self.err(format!("cannot delete checkpoint '{name}': {e}")))?;
        if offline {
            let config = xml::parse_domain(&self.xml()?)?;
            for (target, bitmap) in bitmaps {
                if let Some(path) = config.disk(&target).and_then(|d| d.source.path()) {
                    remove_qcow2_bitmap(path, &bitmap).map_err(|e| self.err(e))?;
                }
            }
        }
        Ok(())
    }
}

/// How [`Domain::delete_checkpoint`] deletes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointDelete {
    /// Forget the checkpoint but leave the bitmaps in the images
    /// (`VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY`).
    pub metadata_only: bool,
    /// Delete its descendants too (`VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN`).
    pub children: bool,
}

fn remove_qcow2_bitmap(image: &Path, bitmap: &str) -> std::result::Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(image)
        .arg(bitmap)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Already gone is what we wanted.
    if stderr.contains("not found") {
        return Ok(());
    }
    Err(format!(
        "qemu-img bitmap --remove {} {bitmap}: {}",
        image.display(),
        stderr.trim()
    ))
}

fn qemu_img_virtual_size(path: &Path) -> Option<u64> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    info.get("virtual-size")?.as_u64()
}

/// What [`Domain::begin_backup`] exports.
#[derive(Debug, Clone, Copy)]
pub struct BackupPlan<'a> {
    /// Disk targets to export; empty means every writable disk with a medium. The VM's
    /// other disks get `backup='no'`.
    pub disks: &'a [&'a str],
    /// Unix socket QEMU's NBD server listens on (see the module docs on permissions).
    pub socket: &'a Path,
    /// Folder for the per-disk scratch files, which hold the old content of blocks the
    /// guest overwrites while the backup runs (at most the disk's size each).
    pub scratch_dir: &'a Path,
    /// Create this checkpoint atomically with the backup, tracking every exported qcow2
    /// disk (skipped when none is qcow2).
    pub checkpoint: Option<&'a str>,
    /// Export only what changed since this checkpoint: each disk it tracks offers the
    /// dirty bitmap; disks it does not track (added since) are exported in full.
    pub incremental_from: Option<&'a str>,
    /// Description of the new checkpoint (vmkeep names its repository there).
    pub checkpoint_description: Option<&'a str>,
}

/// What [`Domain::try_begin_backup`] did.
#[derive(Debug)]
pub enum BackupStart {
    Started(PullBackup),
    /// libvirt refused the incremental backup: a bitmap of the checkpoint it was to start
    /// from is missing or broken (libvirt's message). No job was started.
    CheckpointInconsistent(String),
}

/// A disk of a running pull backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDisk {
    pub target: String,
    /// NBD export name (the target, unless libvirt says otherwise).
    pub export_name: String,
    /// NBD metadata context of the changed blocks (`qemu:dirty-bitmap:backup-vda`) for an
    /// incremental export; `None` for a full one.
    pub dirty_bitmap_context: Option<String>,
    pub scratch: PathBuf,
    /// Whether the checkpoint created with this backup tracks the disk.
    pub in_checkpoint: bool,
}

/// What has become of a pull-mode backup job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupJobState {
    /// The job serves our socket: what the exports show is the point-in-time view.
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
    socket: PathBuf,
    checkpoint: Option<String>,
    disks: Vec<BackupDisk>,
    ended: bool,
}

impl fmt::Debug for PullBackup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullBackup")
            .field("vm", &self.vm)
            .field("socket", &self.socket)
            .field("checkpoint", &self.checkpoint)
            .field("disks", &self.disks)
            .finish()
    }
}

impl PullBackup {
    pub fn vm(&self) -> &str {
        &self.vm
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The checkpoint created with this backup, if any.
    pub fn checkpoint(&self) -> Option<&str> {
        self.checkpoint.as_deref()
    }

    pub fn disks(&self) -> &[BackupDisk] {
        &self.disks
    }

    pub fn disk(&self, target: &str) -> Option<&BackupDisk> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// `nbd+unix:///EXPORT?socket=PATH` for a disk of this backup.
    pub fn nbd_uri(&self, disk: &BackupDisk) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            uri_escape(&disk.export_name),
            uri_escape(&self.socket.to_string_lossy())
        )
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
            if job.socket.as_deref() == Some(self.socket.as_path()) {
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
        if wait_job_end_of(&self.dom, &self.socket) {
            return Err(self.err("the backup job did not end within 30 s of the abort"));
        }
        match self.state()? {
            BackupJobState::Failed(why) => Err(self.err(format!("backup failed: {why}"))),
            _ => Ok(()),
        }
    }

    /// Remove the scratch files (libvirt normally does) and the socket (left behind when
    /// QEMU dies).
    fn remove_files(&self) {
        for path in self
            .disks
            .iter()
            .map(|d| d.scratch.as_path())
            .chain([self.socket.as_path()])
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
            wait_job_end_of(&self.dom, &self.socket);
        }
        self.remove_files();
    }
}

/// The message for a failed `virDomainBackupBegin`, with a hint when QEMU could not
/// create its socket or scratch file.
fn backup_begin_failure(message: &str, qemu_ids: Option<(u32, u32)>) -> String {
    let mut text = format!("cannot start the backup: {message}");
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

/// Wait (at most [`JOB_END_TIMEOUT`]) until no backup job serves `socket`; returns
/// whether one still does.
fn wait_job_end_of(dom: &VirtDomain, socket: &Path) -> bool {
    let serving = || {
        backup_job_active(dom)
            && ffi::backup_xml_desc(dom)
                .ok()
                .and_then(|x| xml::parse_backup_job(&x).ok())
                .is_some_and(|job| job.socket.as_deref() == Some(socket))
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

/// Percent-encode what an NBD URI path or query value cannot carry as is.
fn uri_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Create `dir` for NBD sockets or scratch files: a fresh folder (it must not exist) in a
/// parent only root can change (checked, and created 0711 where missing, by
/// [`crate::fsutil::safe_base`]); owned by the caller (root), group `qemu_gid`, mode 0770,
/// so QEMU can create files in it and nobody else can enter; without a gid (session
/// libvirt, QEMU runs as the caller) mode 0700. Group and mode are set on the open folder.
/// See the module docs for why.
pub fn prepare_private_dir(dir: &Path, qemu_gid: Option<u32>) -> Result<()> {
    crate::fsutil::new_private_dir(dir, crate::fsutil::Share::qemu(qemu_gid)).map(drop)
}

/// The VM's disks (not CD-ROMs) outside `tracked`: a checkpoint names them `checkpoint='no'`.
fn untracked_disks<'a>(live: &'a xml::DomainXml, tracked: &[&str]) -> Vec<&'a str> {
    live.disks
        .iter()
        .filter(|d| matches!(d.device, DiskDevice::Disk | DiskDevice::Lun))
        .map(|d| d.target.as_str())
        .filter(|t| !tracked.contains(t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn nbd_uri_escapes_socket_path() {
        assert_eq!(
            uri_escape("/run/vm keep/a&b.sock"),
            "/run/vm%20keep/a%26b.sock"
        );
        assert_eq!(uri_escape("vda"), "vda");
    }

    #[test]
    fn private_dir_is_closed_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        prepare_private_dir(&dir, None).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // An existing folder is never taken over.
        assert!(prepare_private_dir(&dir, None).is_err());
        std::fs::remove_dir(&dir).unwrap();
        let gid = own_gid();
        prepare_private_dir(&dir, Some(gid)).unwrap();
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

    #[test]
    fn domain_state_names() {
        assert_eq!(DomainState::ShutOff.to_string(), "shut off");
        assert!(DomainState::Paused.is_active());
        assert!(!DomainState::ShutOff.is_active());
    }
}
