//! `restore --as-vm`: a generation back as a new libvirt VM, either copied (every disk
//! written under a folder, then the domain defined) or instant (the domain boots at once
//! from qcow2 overlays over an NBD export of the archive).
//!
//! Instant recovery needs a server that outlives the command that set it up (the VM reads
//! from it until every `virsh blockpull` has finished): [`restore_as_vm`] starts the
//! `vmkeep` executable as `serve` in a session of its own and hands back an
//! [`InstantServer`]; dropping that leaves the server running, [`InstantServer::stop`]
//! ends it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::archive::state::{StateFile, StateKind};
use crate::archive::{GenerationId, Repository};
use crate::engine::firmware;
use crate::engine::restore::{restore_to, RestoreReport};
use crate::engine::serve::group_id;
use crate::error::{Error, Result};
use crate::fsutil::Share;
use crate::libvirt::{xml, CopySpec, Hypervisor, NewDisk};
use crate::progress::Progress;
use crate::target::{Destination, ImageFormat};

/// Where `--as-vm` puts the new VM's disks unless told otherwise.
pub const DEFAULT_DISK_DIR: &str = "/var/lib/libvirt/images";
/// Where instant recovery makes the folder of its server's socket unless told otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/vmkeep";
/// How long a starting instant-recovery server may take to listen.
const SERVER_START: Duration = Duration::from_secs(20);

/// Everything `restore --as-vm` needs, resolved from flags and config.
#[derive(Debug, Clone)]
pub struct AsVmOptions {
    /// The archived VM.
    pub vm: String,
    /// The generation: an id or unique prefix, N (0 = newest), or `latest`.
    pub rev: String,
    /// The new VM's name.
    pub new_name: String,
    /// The folder for the new VM's disks (or overlays).
    pub disk_dir: PathBuf,
    /// The new disks' format (instant recovery always makes qcow2).
    pub format: ImageFormat,
    /// Start the new VM.
    pub start: bool,
    /// Redefine an existing shut-off VM of that name, overwrite existing disk files.
    pub replace: bool,
    /// Networks to use instead of the saved ones: old name → new name.
    pub networks: BTreeMap<String, String>,
    /// Boot from overlays over a served export instead of writing the disks.
    pub instant: bool,
    /// The libvirt connection URI.
    pub connect: String,
    /// Write what can be read where blocks are damaged, and list the ranges (copies only;
    /// an instant recovery serves nothing unproven).
    pub ignore_damage: bool,
    /// Where instant recovery makes its server's folder.
    pub run_dir: PathBuf,
    /// The `vmkeep` executable that instant recovery starts as `serve`; `None`: this
    /// process's own ([`std::env::current_exe`]).
    pub serve_exe: Option<PathBuf>,
    /// Put the disks into this libvirt storage pool, uploaded through the connection,
    /// instead of files under `disk_dir`. A remote connection always uses a pool
    /// ([`DEFAULT_POOL`] unless given).
    pub pool: Option<String>,
    /// Where a disk is staged here before its upload into a pool (a fresh private folder
    /// in it, removed afterwards).
    pub staging_dir: PathBuf,
    /// How instant recovery onto a remote host serves the generation: TCP with TLS.
    pub instant_tcp: InstantTcp,
}

/// The TCP export of an instant recovery onto a remote host: `vmkeep serve --listen` on
/// this host, with TLS, which the hypervisor's QEMU connects to.
#[derive(Debug, Clone)]
pub struct InstantTcp {
    /// The name (or address) the hypervisor reaches this host by; the server certificate
    /// must name it. `None`: this host's name (`uname -n`).
    pub address: Option<String>,
    /// The TCP ports to try, lowest first.
    pub ports: std::ops::RangeInclusive<u16>,
    /// The server's TLS folder (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`): the
    /// hypervisor's client certificate must chain to that CA.
    pub tls_dir: PathBuf,
}

impl Default for InstantTcp {
    fn default() -> Self {
        InstantTcp {
            address: None,
            ports: crate::engine::live::DEFAULT_NBD_PORTS,
            tls_dir: PathBuf::from(crate::engine::live::DEFAULT_NBD_TLS_DIR),
        }
    }
}

/// The storage pool of a restore onto a remote host when none is given.
pub const DEFAULT_POOL: &str = "default";
/// Where disks are staged before an upload unless told otherwise.
pub const DEFAULT_STAGING_DIR: &str = "/var/tmp/vmkeep";

impl AsVmOptions {
    /// Options with the defaults: qcow2 disks under [`DEFAULT_DISK_DIR`], not started,
    /// nothing replaced, the saved networks, [`crate::libvirt::DEFAULT_URI`],
    /// [`DEFAULT_RUN_DIR`].
    pub fn new(vm: &str, rev: &str, new_name: &str) -> AsVmOptions {
        AsVmOptions {
            vm: vm.to_string(),
            rev: rev.to_string(),
            new_name: new_name.to_string(),
            disk_dir: PathBuf::from(DEFAULT_DISK_DIR),
            format: ImageFormat::Qcow2,
            start: false,
            replace: false,
            networks: BTreeMap::new(),
            instant: false,
            connect: crate::libvirt::DEFAULT_URI.to_string(),
            ignore_damage: false,
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            serve_exe: None,
            pool: None,
            staging_dir: PathBuf::from(DEFAULT_STAGING_DIR),
            instant_tcp: InstantTcp::default(),
        }
    }
}

/// What [`restore_as_vm`] has done so far, as it happens (for a front end to print).
#[derive(Debug)]
pub enum AsVmEvent<'a> {
    /// A disk was written to `path` (for a pool: the volume's path on its host).
    DiskRestored {
        /// The generation (its id).
        generation: &'a str,
        /// The disk.
        disk: &'a str,
        /// Its new file.
        path: &'a Path,
        /// What the restore did.
        report: &'a RestoreReport,
    },
    /// The new VM was defined.
    Defined {
        /// The generation (its id).
        generation: &'a str,
        /// Its UUID.
        uuid: &'a str,
    },
    /// Saved firmware or TPM state was written for the new VM.
    StateRestored {
        /// What: "UEFI variables" or "TPM state".
        what: &'a str,
        /// Where (the variable store, or the TPM state folder).
        path: &'a Path,
    },
    /// The new VM was started.
    Started,
}

/// What [`restore_as_vm`] did.
#[derive(Debug)]
pub struct AsVmReport {
    /// The generation (its id).
    pub generation: GenerationId,
    /// The generation's disks, in the profile's order.
    pub disks: Vec<String>,
    /// Some disk was unproven or had damaged blocks (only with `ignore_damage`).
    pub damaged: bool,
    /// Instant recovery's server, still running.
    pub server: Option<InstantServer>,
}

/// The `vmkeep serve` process of an instant recovery: it runs in a session of its own
/// and outlives this process; dropping this value leaves it running.
#[derive(Debug)]
pub struct InstantServer {
    child: Child,
    /// Where it serves, as QEMU connects to it.
    pub server: xml::NbdServer,
    /// Its folder: the log and the progress of the copy ([`crate::engine::finish`]).
    pub dir: PathBuf,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

impl InstantServer {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (at most [`SERVER_START`]) until the server has found the new domain and the
    /// disks it is to finish, so that whatever happens to the domain from now on (even
    /// its removal at once) is seen by the server.
    fn wait_seen(&self) {
        let path = self.dir.join(crate::engine::finish::STATE_FILE);
        let deadline = Instant::now() + SERVER_START;
        while Instant::now() < deadline {
            if crate::engine::finish::FinishState::load(&path).is_ok_and(|s| s.seen) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::warn!("the instant-recovery server has not found the new VM yet");
    }

    /// End the server and wait for it.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `restore --as-vm`: every disk of the generation written under the disk folder (or, with
/// `instant`, a qcow2 overlay over a served export of it), and a new libvirt VM defined
/// from the saved XML with a new name, UUID and MACs. Every disk's digests are proven and
/// every name checked before the first byte is written or served. `on_event` hears of
/// each step as it is done.
pub fn restore_as_vm(
    repo: &Repository,
    opts: &AsVmOptions,
    progress: &dyn Progress,
    on_event: &mut dyn FnMut(AsVmEvent<'_>),
) -> Result<AsVmReport> {
    let new_name = opts.new_name.as_str();
    crate::archive::names::check_vm(new_name)?;
    // libvirt's XML names each disk by a UTF-8 path: a folder whose path is not UTF-8
    // could not be named in the new domain (its disks would be written and never found).
    if opts.disk_dir.to_str().is_none() {
        return Err(Error::usage(format!(
            "--disk-dir {}: not UTF-8, and libvirt names disks by UTF-8 paths; choose another folder",
            opts.disk_dir.display()
        )));
    }
    let archive = repo.vm(&opts.vm)?;
    let chosen = archive.select(&opts.rev)?;
    let gen = chosen.generation();
    let id = gen.id.clone();
    let saved = std::fs::read_to_string(gen.domain_xml_path()).map_err(|_| {
        Error::usage(format!(
            "generation {id} of VM {} has no saved libvirt XML (it was not backed up from libvirt)",
            opts.vm
        ))
    })?;
    let hv = Hypervisor::connect(Some(&opts.connect))?;
    // A remote host's files are not here: its disks go into a storage pool.
    let pool = opts
        .pool
        .clone()
        .or_else(|| (!hv.is_local()).then(|| DEFAULT_POOL.to_string()));
    let dir = &opts.disk_dir;
    if pool.is_none() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut disks = BTreeMap::new();
    // Instant recovery boots from qcow2 overlays whatever --format says.
    let format = if opts.instant {
        ImageFormat::Qcow2
    } else {
        opts.format
    }
    .as_str();
    for d in &gen.profile.disks {
        let file = format!("{new_name}-{}.{format}", d.name);
        disks.insert(
            d.name.clone(),
            NewDisk {
                // In a pool: a stand-in until the volume exists (its path is the host's).
                path: match &pool {
                    Some(p) => Path::new("/").join(p).join(&file),
                    None => dir.join(&file),
                },
                format: format.to_string(),
                block: false,
                backing: None,
            },
        );
    }
    let mut spec = CopySpec {
        new_name: new_name.to_string(),
        disks,
        networks: opts.networks.clone(),
        replace: opts.replace,
        nvram: None,
    };
    // Refuse before writing gigabytes: the name, the networks, the disk mapping.
    if let Ok(existing) = hv.domain(new_name) {
        if !opts.replace {
            return Err(Error::usage(format!(
                "VM {new_name} already exists (choose another name, or --replace a shut-off one)"
            )));
        }
        if existing.state()?.is_active() {
            return Err(Error::usage(format!(
                "VM {new_name} is running; vmkeep never replaces a running VM"
            )));
        }
    }
    let mut n = 0u8;
    xml::copy_domain_xml(&saved, &spec, &hv.list_networks()?, &mut || {
        n = n.wrapping_add(1);
        [0, 0, n]
    })?;
    // Every disk's digests are proven before the first byte is written or served (an
    // instant recovery's server proves them again; this makes a failure exit 3 here).
    let mut views = Vec::new();
    for d in &gen.profile.disks {
        views.push(chosen.view_checked(&d.name, opts.ignore_damage && !opts.instant)?);
    }
    // The firmware and TPM state too, and the copy's NVRAM path checked, before anything
    // is written.
    let state = CopyState::load(gen, opts, &hv, progress)?;
    state.name_nvram(&mut spec, opts.replace)?;
    let names: Vec<String> = gen.profile.disks.iter().map(|d| d.name.clone()).collect();
    if opts.instant {
        let sizes: Vec<u64> = views.iter().map(|(v, _)| v.size).collect();
        drop(views);
        let server = instant(
            repo,
            opts,
            &id,
            &names,
            &sizes,
            &mut spec,
            &saved,
            &hv,
            pool.as_deref(),
            &state,
            on_event,
        )?;
        return Ok(AsVmReport {
            generation: id,
            disks: names,
            damaged: false,
            server: Some(server),
        });
    }
    if let Some(pool) = &pool {
        let damaged = to_pool(
            &hv, pool, &views, &mut spec, opts, format, &id, progress, on_event,
        )?;
        return define_and_start(
            &hv, &saved, &spec, &state, opts, id, names, damaged, on_event,
        );
    }
    for name in &names {
        let path = &spec.disks[name].path;
        if path.exists() && !opts.replace {
            return Err(Error::usage(format!(
                "{} exists (remove it, or use --replace)",
                path.display()
            )));
        }
    }
    let mut damaged = false;
    for (view, problem) in &views {
        let path = &spec.disks[&view.disk].path;
        // A failed proof is warned about (by restore_to), and every block read and
        // checked against its own digest.
        damaged |= problem.is_some();
        let report = restore_to(
            view,
            &Destination::from(path.as_path()),
            opts.ignore_damage,
            problem.as_ref(),
            progress,
        )?;
        on_event(AsVmEvent::DiskRestored {
            generation: &id,
            disk: &view.disk,
            path,
            report: &report,
        });
        damaged |= !report.damaged.is_empty();
    }
    define_and_start(
        &hv, &saved, &spec, &state, opts, id, names, damaged, on_event,
    )
}

/// Define the copy, start it when asked; the report.
#[allow(clippy::too_many_arguments)]
fn define_and_start(
    hv: &Hypervisor,
    saved: &str,
    spec: &CopySpec,
    state: &CopyState,
    opts: &AsVmOptions,
    id: GenerationId,
    names: Vec<String>,
    damaged: bool,
    on_event: &mut dyn FnMut(AsVmEvent<'_>),
) -> Result<AsVmReport> {
    let dom = state.define(hv, saved, spec, &id, on_event)?;
    if opts.start {
        dom.start()?;
        on_event(AsVmEvent::Started);
    }
    Ok(AsVmReport {
        generation: id,
        disks: names,
        damaged,
        server: None,
    })
}

/// A generation's firmware and TPM state (`[[state]]`), proven, as a copy gets it: on
/// this host its UEFI variables go to a store of its own ([`firmware::nvram_path_for`])
/// that its definition names, and its TPM state into the state folder of its new UUID.
/// A remote host's files are not reachable from here: the copy starts with the
/// firmware's empty variables and a new TPM, and one line says so.
struct CopyState {
    nvram: Option<StateFile>,
    tpm: Vec<StateFile>,
}

impl CopyState {
    /// The state of generation `gen`, every file proven against its digest (a damaged one
    /// is an error, or with `ignore_damage` left out with one line).
    fn load(
        gen: &crate::archive::Generation,
        opts: &AsVmOptions,
        hv: &Hypervisor,
        progress: &dyn Progress,
    ) -> Result<CopyState> {
        let mut out = CopyState {
            nvram: None,
            tpm: Vec::new(),
        };
        if gen.profile.state.is_empty() {
            return Ok(out);
        }
        if !hv.is_local() {
            progress.warn(&format!(
                "generation {} of VM {}: its UEFI variables and TPM state are not restored onto a remote host (the copy starts with empty ones; docs/libvirt.md)",
                gen.id, opts.vm
            ));
            return Ok(out);
        }
        let mut tpm_damaged = false;
        for rec in &gen.profile.state {
            let bytes = match crate::archive::state::read_verified(&gen.dir, rec) {
                Ok(b) => b,
                Err(e) if opts.ignore_damage => {
                    progress.warn(&format!("{e}; not restored (--ignore-damage)"));
                    tpm_damaged |= rec.kind == StateKind::Tpm;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let file = StateFile {
                record: rec.clone(),
                bytes,
            };
            match rec.kind {
                StateKind::Nvram => out.nvram = Some(file),
                StateKind::Tpm => out.tpm.push(file),
            }
        }
        if tpm_damaged && !out.tpm.is_empty() {
            // Part of a TPM's state is no TPM: the copy gets a new one.
            progress.warn(
                "the rest of the TPM state is not restored either: the copy starts with a new TPM",
            );
            out.tpm.clear();
        }
        Ok(out)
    }

    /// Name the copy's variable store in `spec` (when there is one to restore), refusing
    /// an existing file unless `replace`.
    fn name_nvram(&self, spec: &mut CopySpec, replace: bool) -> Result<()> {
        if self.nvram.is_some() {
            let path = firmware::nvram_path_for(&spec.new_name);
            if !replace && std::fs::symlink_metadata(&path).is_ok() {
                return Err(Error::usage(format!(
                    "{} exists (remove it, or use --replace)",
                    path.display()
                )));
            }
            spec.nvram = Some(path);
        }
        Ok(())
    }

    /// Define the copy, then write its state; a failure to write it undefines the copy
    /// again (and removes what was written).
    fn define(
        &self,
        hv: &Hypervisor,
        saved: &str,
        spec: &CopySpec,
        id: &str,
        on_event: &mut dyn FnMut(AsVmEvent<'_>),
    ) -> Result<crate::libvirt::Domain> {
        let dom = hv.define_copy(saved, spec)?;
        let written = (|| -> Result<()> {
            let uuid = dom.uuid()?;
            on_event(AsVmEvent::Defined {
                generation: id,
                uuid: &uuid,
            });
            if let (Some(file), Some(path)) = (&self.nvram, &spec.nvram) {
                firmware::write_nvram(path, file, spec.replace)?;
                on_event(AsVmEvent::StateRestored {
                    what: "UEFI variables",
                    path,
                });
            }
            if !self.tpm.is_empty() {
                // A failed write removes the folder it made.
                let dir = firmware::write_tpm(&uuid, &self.tpm)?;
                on_event(AsVmEvent::StateRestored {
                    what: "TPM state",
                    path: &dir,
                });
            }
            Ok(())
        })();
        if let Err(e) = written {
            // libvirt removes the variable store with the definition.
            let _ = dom.undefine();
            return Err(e);
        }
        Ok(dom)
    }
}

/// Every disk restored (proven, as `restore --to`) into a staged image here, then uploaded
/// into a new volume of `pool` through the libvirt connection; `spec`'s disks then name
/// the volumes. Volumes of a failed run are deleted. Returns whether a disk was damaged.
#[allow(clippy::too_many_arguments)]
fn to_pool(
    hv: &Hypervisor,
    pool: &str,
    views: &[(crate::archive::view::DiskView, Option<Error>)],
    spec: &mut CopySpec,
    opts: &AsVmOptions,
    format: &str,
    id: &GenerationId,
    progress: &dyn Progress,
    on_event: &mut dyn FnMut(AsVmEvent<'_>),
) -> Result<bool> {
    let volume_name = |disk: &str| format!("{}-{disk}.{format}", opts.new_name);
    let names: Vec<String> = views.iter().map(|(v, _)| volume_name(&v.disk)).collect();
    let mut volumes = PoolUpload::new(hv, pool, &names, opts.replace)?;
    let staging = crate::fsutil::private_dir(&opts.staging_dir, "vmkeep-upload-", Share::Nobody)?;
    let _cleanup = RemoveDir(staging.path.clone());
    let mut damaged = false;
    let result = (|| -> Result<()> {
        for (view, problem) in views {
            let name = volume_name(&view.disk);
            let staged = staging.path.join(&name);
            damaged |= problem.is_some();
            let report = restore_to(
                view,
                &Destination::from(staged.as_path()),
                opts.ignore_damage,
                problem.as_ref(),
                progress,
            )?;
            damaged |= !report.damaged.is_empty();
            let vol = volumes.upload(&name, format, view.size, &staged)?;
            if let Some(d) = spec.disks.get_mut(&view.disk) {
                d.path = vol.path().to_path_buf();
            }
            on_event(AsVmEvent::DiskRestored {
                generation: id,
                disk: &view.disk,
                path: vol.path(),
                report: &report,
            });
        }
        Ok(())
    })();
    if let Err(e) = result {
        volumes.discard();
        return Err(e);
    }
    Ok(damaged)
}

/// The volumes a restore makes in a pool: an existing one of the names is refused before
/// anything is written (unless `replace`); each is made and filled from a staged file
/// here; [`PoolUpload::discard`] deletes them all when the restore fails.
struct PoolUpload<'a> {
    hv: &'a Hypervisor,
    pool: &'a str,
    replace: bool,
    made: Vec<crate::libvirt::Volume>,
}

impl<'a> PoolUpload<'a> {
    fn new(hv: &'a Hypervisor, pool: &'a str, names: &[String], replace: bool) -> Result<Self> {
        for name in names {
            if hv.volume_exists(pool, name)? && !replace {
                return Err(Error::usage(format!(
                    "volume {name} exists in pool {pool} on {} (remove it, or use --replace)",
                    hv.uri()
                )));
            }
        }
        Ok(PoolUpload {
            hv,
            pool,
            replace,
            made: Vec::new(),
        })
    }

    /// Volume `name` of `format` and `capacity`, its content the file `staged` (removed
    /// afterwards, uploaded or not).
    fn upload(
        &mut self,
        name: &str,
        format: &str,
        capacity: u64,
        staged: &Path,
    ) -> Result<&crate::libvirt::Volume> {
        let vol = self
            .hv
            .create_volume(self.pool, name, format, capacity, self.replace)?;
        let uploaded = vol.upload_file(self.hv, staged, capacity);
        let _ = std::fs::remove_file(staged);
        self.made.push(vol);
        uploaded?;
        Ok(self.made.last().expect("just pushed"))
    }

    /// Delete every volume made.
    fn discard(self) {
        for vol in self.made {
            vol.delete();
        }
    }
}

/// Removes a folder tree when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Instant recovery: `vmkeep serve` in the background exports the generation; each new
/// disk is a qcow2 overlay whose backing store is that export, named in the definition
/// (and in the overlay's header), so the VM boots at once and reads what it has not written
/// from the archive. Its writes stay in the overlays. The server pulls the rest into the
/// overlays once the VM runs ([`crate::engine::finish`]) and then exits.
///
/// On this host the export is a unix socket and the overlays are files under the disk
/// folder; into a pool (and on a remote host, always) each overlay is made here and
/// uploaded as a volume. A remote host's QEMU reaches the export over TCP with TLS.
#[allow(clippy::too_many_arguments)]
fn instant(
    repo: &Repository,
    opts: &AsVmOptions,
    id: &str,
    disks: &[String],
    sizes: &[u64],
    spec: &mut CopySpec,
    saved: &str,
    hv: &Hypervisor,
    pool: Option<&str>,
    state: &CopyState,
    on_event: &mut dyn FnMut(AsVmEvent<'_>),
) -> Result<InstantServer> {
    let listen = if hv.is_local() {
        ServeListen::Unix
    } else {
        ServeListen::Tcp(&opts.instant_tcp)
    };
    let volume_name = |d: &str| format!("{}-{d}.qcow2", opts.new_name);
    let mut volumes = match pool {
        Some(pool) => {
            let names: Vec<String> = disks.iter().map(|d| volume_name(d)).collect();
            Some(PoolUpload::new(hv, pool, &names, opts.replace)?)
        }
        None => None,
    };
    let server = start_server(repo, opts, id, &listen, hv.uri())?;
    let result = (|| -> Result<()> {
        for (d, size) in disks.iter().zip(sizes) {
            let backing = xml::NbdBacking {
                server: server.server.clone(),
                export: d.clone(),
            };
            match volumes.as_mut() {
                None => overlay(&spec.disks[d].path, &backing, *size, opts.replace)?,
                Some(volumes) => {
                    let staged = server.dir.join(volume_name(d));
                    overlay(&staged, &backing, *size, false)?;
                    let vol = volumes.upload(&volume_name(d), "qcow2", *size, &staged)?;
                    if let Some(new) = spec.disks.get_mut(d) {
                        new.path = vol.path().to_path_buf();
                    }
                }
            }
            if let Some(new) = spec.disks.get_mut(d) {
                new.backing = Some(backing);
            }
        }
        let dom = state.define(hv, saved, spec, id, on_event)?;
        if opts.start {
            if let Err(e) = dom.start() {
                // Its disks read from a server that ends now: the definition goes too.
                let _ = dom.undefine();
                return Err(e);
            }
            on_event(AsVmEvent::Started);
        }
        server.wait_seen();
        Ok(())
    })();
    if let Err(e) = result {
        server.stop();
        if let Some(volumes) = volumes {
            volumes.discard();
        }
        return Err(e);
    }
    Ok(server)
}

/// Create the qcow2 overlay `overlay` of `size` bytes whose backing file is `backing`
/// (for a TCP export without its TLS, which only the domain definition can give QEMU:
/// the file alone cannot be read, it is never read as plain zeros).
fn overlay(overlay: &Path, backing: &xml::NbdBacking, size: u64, replace: bool) -> Result<()> {
    if overlay.exists() && !replace {
        return Err(Error::usage(format!(
            "{} exists (remove it, or use --replace)",
            overlay.display()
        )));
    }
    let _ = std::fs::remove_file(overlay);
    // The recovered guest's writes land here: 0600 from the start (qemu-img create
    // truncates the file and keeps its mode; libvirt gives QEMU the file when the VM
    // starts, by owner, not by mode).
    crate::fsutil::create_new(overlay)?;
    let mut name = std::ffi::OsString::new();
    match &backing.server {
        xml::NbdServer::Unix(socket) => {
            name.push(format!("nbd+unix:///{}?socket=", backing.export));
            name.push(socket);
        }
        xml::NbdServer::Tcp {
            name: host, port, ..
        } => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            name.push(format!("nbd://{host}:{port}/{}", backing.export));
        }
    }
    // -u: the export is not opened (a TCP one needs TLS credentials only QEMU has).
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-u", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&name)
        .arg(overlay)
        .arg(size.to_string())
        .output()
        .map_err(|e| Error::io_ctx("qemu-img (install qemu-utils)", e))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(overlay);
        return Err(Error::source(
            "qemu-img create",
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    Ok(())
}

/// Where an instant recovery's server listens.
enum ServeListen<'a> {
    /// A unix socket in its folder, QEMU's group may connect: the hypervisor is this host.
    Unix,
    /// TCP with TLS, for a remote hypervisor.
    Tcp(&'a InstantTcp),
}

/// Start `vmkeep serve` for generation `id` of `opts.vm`, detached, where `listen` says,
/// told to finish the copy into domain `opts.new_name` on `uri` and exit then; wait until
/// it listens. A TCP port that is taken moves on to the next of the range.
fn start_server(
    repo: &Repository,
    opts: &AsVmOptions,
    id: &str,
    listen: &ServeListen<'_>,
    uri: &str,
) -> Result<InstantServer> {
    let gid = group_id("libvirt-qemu").or_else(|_| group_id("qemu"))?;
    // A fresh folder in a parent only root can change: root-owned, QEMU's group may
    // enter (to connect), nobody else.
    let run = crate::fsutil::private_dir(&opts.run_dir, "instant-", Share::Enter(gid))?.path;
    let log = run.join("serve.log");
    let exe = match &opts.serve_exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().map_err(|e| Error::io_ctx("this executable", e))?,
    };
    let mut cmd = Command::new(&exe);
    cmd.arg("--repo")
        .arg(repo.root())
        .args(["serve", &opts.vm, "-g", id, "--idle-timeout", "0"])
        .arg("--finish-domain")
        .arg(&opts.new_name)
        .arg("--connect")
        .arg(uri)
        .arg("--state")
        .arg(run.join(crate::engine::finish::STATE_FILE));
    let tcp = match listen {
        ServeListen::Unix => {
            let socket = run.join("nbd.sock");
            cmd.arg("--socket-group")
                .arg(gid.to_string())
                .arg("--socket")
                .arg(&socket);
            return spawn_server(cmd, &exe, &run, &log, xml::NbdServer::Unix(socket));
        }
        ServeListen::Tcp(tcp) => tcp,
    };
    let name = tcp
        .address
        .clone()
        .unwrap_or_else(crate::libvirt::this_host);
    // An address is listened on as it is; a name on every address of this host.
    let bind = match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) => format!("[{a}]"),
        Ok(a) => a.to_string(),
        Err(_) => "0.0.0.0".to_string(),
    };
    cmd.arg("--allow-remote").arg("--tls-dir").arg(&tcp.tls_dir);
    let mut last = None;
    for port in tcp.ports.clone() {
        let mut attempt = Command::new(cmd.get_program());
        attempt
            .args(cmd.get_args())
            .arg("--listen")
            .arg(format!("{bind}:{port}"));
        let server = xml::NbdServer::Tcp {
            name: name.clone(),
            port,
            tls: true,
        };
        match spawn_server(attempt, &exe, &run, &log, server) {
            Err(e) if crate::libvirt::port_taken(&e.to_string()) => last = Some(e),
            other => return other,
        }
    }
    let _ = std::fs::remove_dir_all(&run);
    Err(last.unwrap_or_else(|| Error::usage("nbd_ports is an empty range")))
}

/// Spawn the server `cmd` in a session of its own, its output into `log`, and wait until
/// it announces that it listens (its first line); its exit before that is the error.
fn spawn_server(
    mut cmd: Command,
    exe: &Path,
    run: &Path,
    log: &Path,
    server: xml::NbdServer,
) -> Result<InstantServer> {
    use std::os::unix::process::CommandExt;

    // 0600: QEMU's group may enter the folder, the server's log is root's.
    let log_file = crate::fsutil::create_truncate(log)?;
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| Error::io(log, e))?)
        .stderr(log_file);
    // SAFETY: setsid() is async-signal-safe and touches no memory; it detaches the server
    // from this terminal's session so that it outlives this command.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::io(exe, e))?;
    let mut server = InstantServer {
        child,
        server,
        dir: run.to_path_buf(),
        log: log.to_path_buf(),
    };
    let deadline = Instant::now() + SERVER_START;
    loop {
        let said = std::fs::read_to_string(&server.log).unwrap_or_default();
        if said.contains(": serving generation ") {
            return Ok(server);
        }
        if let Some(status) = server
            .child
            .try_wait()
            .map_err(|e| Error::io_ctx("vmkeep serve", e))?
        {
            return Err(Error::source(
                "vmkeep serve",
                format!("exited ({status}): {}", said.trim()),
            ));
        }
        if Instant::now() > deadline {
            let _ = server.child.kill();
            let _ = server.child.wait();
            return Err(Error::source(
                "vmkeep serve",
                "did not start listening within 20 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
