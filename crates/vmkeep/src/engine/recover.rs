//! `restore --as-vm`: a generation back as a new libvirt VM, either copied (every disk
//! written under a folder, then the domain defined) or instant (the domain boots at once
//! from qcow2 overlays over an NBD export of the archive). A copy is made from a local
//! repository or from an offsite target ([`AsVmSource`]), with the same proofs and the
//! same steps.
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

use crate::archive::state::{StateFile, StateKind, StateRecord};
use crate::archive::view::{DiskView, Selected};
use crate::archive::{GenerationId, Repository};
use crate::engine::firmware;
use crate::engine::restore::{restore_to, RestoreReport};
use crate::engine::serve::group_id;
use crate::error::{Error, Result};
use crate::fsutil::Share;
use crate::libvirt::{xml, CopySpec, Hypervisor, NewDisk};
use crate::offsite::key::OffsiteKey;
use crate::offsite::manifest::Manifest;
use crate::offsite::read::{open_generation, restore_disk_from};
use crate::offsite::store::ObjectStore;
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

/// Where the generation of `restore --as-vm` is read from.
#[derive(Clone, Copy)]
pub enum AsVmSource<'a> {
    /// A local repository: the generation's folder, every disk through its proven view.
    Repository(&'a Repository),
    /// An offsite target in the encrypted object layout, and its key: the generation's
    /// manifest (proven as it opens: its digest lists hash to the digest roots of the
    /// profile it carries, its state files to their digests) and every block from its pack,
    /// each proven before it is written ([`crate::offsite::read`]). Copies only: serving an
    /// instant recovery needs a local repository.
    Offsite {
        /// The target.
        store: &'a dyn ObjectStore,
        /// Its key.
        key: &'a OffsiteKey,
    },
}

/// Why an instant recovery from an offsite target is refused: its server serves the
/// generation from a local repository.
pub const INSTANT_NEEDS_REPOSITORY: &str = "restore --from cannot --instant: serving a generation needs a local repository; restore it first (--as-vm without --instant)";

impl<'a> From<&'a Repository> for AsVmSource<'a> {
    fn from(repo: &'a Repository) -> Self {
        AsVmSource::Repository(repo)
    }
}

/// `restore --as-vm`: every disk of the generation written under the disk folder (or, with
/// `instant`, a qcow2 overlay over a served export of it), and a new libvirt VM defined
/// from the saved XML with a new name, UUID and MACs. The generation is read from
/// `source`: a local repository (`&Repository`) or an offsite target
/// ([`AsVmSource::Offsite`], copies only). Every disk's digests are proven and every name
/// checked before the first byte is written or served; a copy that fails removes the disks
/// it wrote (and the definition, once made, when its state cannot be written). `on_event`
/// hears of each step as it is done.
pub fn restore_as_vm<'a>(
    source: impl Into<AsVmSource<'a>>,
    opts: &AsVmOptions,
    progress: &dyn Progress,
    on_event: &mut dyn FnMut(AsVmEvent<'_>),
) -> Result<AsVmReport> {
    crate::archive::names::check_vm(&opts.new_name)?;
    // libvirt's XML names each disk by a UTF-8 path: a folder whose path is not UTF-8
    // could not be named in the new domain (its disks would be written and never found).
    if opts.disk_dir.to_str().is_none() {
        return Err(Error::usage(format!(
            "--disk-dir {}: not UTF-8, and libvirt names disks by UTF-8 paths; choose another folder",
            opts.disk_dir.display()
        )));
    }
    match source.into() {
        AsVmSource::Repository(repo) => {
            let archive = repo.vm(&opts.vm)?;
            let chosen = archive.select(&opts.rev)?;
            let mut src = LocalGeneration {
                repo,
                chosen,
                views: Vec::new(),
            };
            make_vm(&mut src, opts, progress, on_event)
        }
        AsVmSource::Offsite { store, key } => {
            if opts.instant {
                return Err(Error::usage(INSTANT_NEEDS_REPOSITORY));
            }
            if opts.ignore_damage {
                return Err(Error::usage("restore --from does not take --ignore-damage"));
            }
            let (_, manifest) = open_generation(store, key, &opts.vm, &opts.rev, progress)?;
            let mut src = OffsiteGeneration {
                store,
                key,
                manifest,
            };
            make_vm(&mut src, opts, progress, on_event)
        }
    }
}

/// A generation as a copy is made from it, wherever it is read from: its definition,
/// disks and state, and the proven restore of each disk.
trait CopySource {
    /// The generation's id.
    fn id(&self) -> GenerationId;
    /// The saved libvirt domain XML, if the generation has one.
    fn domain_xml(&self) -> Option<String>;
    /// The disks, (name, size) in the profile's order.
    fn disks(&self) -> Vec<(String, u64)>;
    /// Prove every disk's digests against the profile's digest roots before anything is
    /// written or served; with `ignore_damage` a disk that fails is kept with its error,
    /// for its restore to warn of and check block by block.
    fn prove(&mut self, ignore_damage: bool) -> Result<()>;
    /// Let go of what [`CopySource::prove`] holds open (an instant recovery's server opens
    /// the generation itself).
    fn release(&mut self);
    /// The generation's firmware and TPM state records.
    fn state_records(&self) -> &[StateRecord];
    /// The bytes of state file `rec`, proven against its digest.
    fn read_state(&self, rec: &StateRecord) -> Result<Vec<u8>>;
    /// Write disk `disk` (proven by [`CopySource::prove`]) to `to`, every block checked
    /// against its digest on the way: what was written, and whether the disk was unproven
    /// (only with `ignore_damage`).
    fn write_disk(
        &self,
        disk: &str,
        to: &Destination,
        ignore_damage: bool,
        progress: &dyn Progress,
    ) -> Result<(RestoreReport, bool)>;
    /// The repository an instant recovery serves the generation from; `None`: it cannot.
    fn repository(&self) -> Option<&Repository>;
}

/// A generation of a local repository.
struct LocalGeneration<'a> {
    repo: &'a Repository,
    chosen: Selected<'a>,
    views: Vec<(DiskView, Option<Error>)>,
}

impl CopySource for LocalGeneration<'_> {
    fn id(&self) -> GenerationId {
        self.chosen.generation().id.clone()
    }

    fn domain_xml(&self) -> Option<String> {
        std::fs::read_to_string(self.chosen.generation().domain_xml_path()).ok()
    }

    fn disks(&self) -> Vec<(String, u64)> {
        let gen = self.chosen.generation();
        gen.profile
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.size))
            .collect()
    }

    fn prove(&mut self, ignore_damage: bool) -> Result<()> {
        self.views.clear();
        for d in &self.chosen.generation().profile.disks {
            self.views
                .push(self.chosen.view_checked(&d.name, ignore_damage)?);
        }
        Ok(())
    }

    fn release(&mut self) {
        self.views.clear();
    }

    fn state_records(&self) -> &[StateRecord] {
        &self.chosen.generation().profile.state
    }

    fn read_state(&self, rec: &StateRecord) -> Result<Vec<u8>> {
        crate::archive::state::read_verified(&self.chosen.generation().dir, rec)
    }

    fn write_disk(
        &self,
        disk: &str,
        to: &Destination,
        ignore_damage: bool,
        progress: &dyn Progress,
    ) -> Result<(RestoreReport, bool)> {
        let Some((view, problem)) = self.views.iter().find(|(v, _)| v.disk == disk) else {
            return Err(Error::usage(format!("disk {disk} was not proven")));
        };
        // A failed proof is warned about (by restore_to), and every block read and
        // checked against its own digest.
        let report = restore_to(view, to, ignore_damage, problem.as_ref(), progress)?;
        Ok((report, problem.is_some()))
    }

    fn repository(&self) -> Option<&Repository> {
        Some(self.repo)
    }
}

/// A generation on an offsite target: its manifest, opened and proven.
struct OffsiteGeneration<'a> {
    store: &'a dyn ObjectStore,
    key: &'a OffsiteKey,
    manifest: Manifest,
}

impl CopySource for OffsiteGeneration<'_> {
    fn id(&self) -> GenerationId {
        self.manifest.head.generation.clone()
    }

    fn domain_xml(&self) -> Option<String> {
        self.manifest.head.domain_xml.clone()
    }

    fn disks(&self) -> Vec<(String, u64)> {
        self.manifest
            .head
            .disks
            .iter()
            .map(|d| (d.name.clone(), d.size))
            .collect()
    }

    fn prove(&mut self, _ignore_damage: bool) -> Result<()> {
        // Proven as the manifest opened: each disk's digest list hashes to the digest root
        // of the profile it carries, and every block's location is that block's.
        Ok(())
    }

    fn release(&mut self) {}

    fn state_records(&self) -> &[StateRecord] {
        &self.manifest.head.state
    }

    fn read_state(&self, rec: &StateRecord) -> Result<Vec<u8>> {
        // Proven against its digest as the manifest opened.
        let i = self
            .manifest
            .head
            .state
            .iter()
            .position(|r| r == rec)
            .ok_or_else(|| {
                Error::usage(format!("state file {} is not the manifest's", rec.file))
            })?;
        Ok(self.manifest.state[i].clone())
    }

    fn write_disk(
        &self,
        disk: &str,
        to: &Destination,
        _ignore_damage: bool,
        progress: &dyn Progress,
    ) -> Result<(RestoreReport, bool)> {
        let report = restore_disk_from(self.store, self.key, &self.manifest, disk, to, progress)?;
        Ok((report, false))
    }

    fn repository(&self) -> Option<&Repository> {
        None
    }
}

/// What a copy has written so far: removed again when it fails.
enum Written<'a> {
    /// Disk files under the disk folder.
    Files(Vec<PathBuf>),
    /// Volumes in a pool.
    Volumes(PoolUpload<'a>),
}

impl Written<'_> {
    /// Remove everything written.
    fn discard(self) {
        match self {
            Written::Files(files) => {
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
            }
            Written::Volumes(volumes) => volumes.discard(),
        }
    }
}

/// [`restore_as_vm`] from `src`, once the names are checked.
fn make_vm(
    src: &mut dyn CopySource,
    opts: &AsVmOptions,
    progress: &dyn Progress,
    on_event: &mut dyn FnMut(AsVmEvent<'_>),
) -> Result<AsVmReport> {
    let new_name = opts.new_name.as_str();
    let id = src.id();
    let saved = src.domain_xml().ok_or_else(|| {
        Error::usage(format!(
            "generation {id} of VM {} has no saved libvirt XML (it was not backed up from libvirt)",
            opts.vm
        ))
    })?;
    let disk_list = src.disks();
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
    for (name, _) in &disk_list {
        let file = format!("{new_name}-{name}.{format}");
        disks.insert(
            name.clone(),
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
    src.prove(opts.ignore_damage && !opts.instant)?;
    // The firmware and TPM state too, and the copy's NVRAM path checked, before anything
    // is written.
    let state = CopyState::load(&*src, &id, opts, &hv, progress)?;
    state.name_nvram(&mut spec, opts.replace)?;
    let names: Vec<String> = disk_list.iter().map(|d| d.0.clone()).collect();
    if opts.instant {
        let sizes: Vec<u64> = disk_list.iter().map(|d| d.1).collect();
        src.release();
        let Some(repo) = src.repository() else {
            return Err(Error::usage(
                "an instant recovery needs a local repository to serve the generation from",
            ));
        };
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
        let (damaged, volumes) = to_pool(
            &hv, pool, &*src, &disk_list, &mut spec, opts, format, &id, progress, on_event,
        )?;
        return define_and_start(
            &hv,
            &saved,
            &spec,
            &state,
            opts,
            id,
            names,
            damaged,
            Written::Volumes(volumes),
            on_event,
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
    let mut written = Vec::new();
    let copied = (|| -> Result<bool> {
        let mut damaged = false;
        for name in &names {
            let path = &spec.disks[name].path;
            let (report, unproven) = src.write_disk(
                name,
                &Destination::from(path.as_path()),
                opts.ignore_damage,
                progress,
            )?;
            written.push(path.clone());
            on_event(AsVmEvent::DiskRestored {
                generation: &id,
                disk: name,
                path,
                report: &report,
            });
            damaged |= unproven || !report.damaged.is_empty();
        }
        Ok(damaged)
    })();
    let damaged = match copied {
        Ok(d) => d,
        Err(e) => {
            // A failed disk removed its own partial file; the ones before it go too.
            Written::Files(written).discard();
            return Err(e);
        }
    };
    define_and_start(
        &hv,
        &saved,
        &spec,
        &state,
        opts,
        id,
        names,
        damaged,
        Written::Files(written),
        on_event,
    )
}

/// Define the copy (a failure removes what `written` names), start it when asked; the
/// report. A copy that is defined but does not start stays defined with its disks (the
/// error says why it did not start).
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
    written: Written<'_>,
    on_event: &mut dyn FnMut(AsVmEvent<'_>),
) -> Result<AsVmReport> {
    let dom = match state.define(hv, saved, spec, &id, on_event) {
        Ok(dom) => dom,
        Err(e) => {
            written.discard();
            return Err(e);
        }
    };
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
    /// The state of generation `id` from `src`, every file proven against its digest (a
    /// damaged one is an error, or with `ignore_damage` left out with one line).
    fn load(
        src: &dyn CopySource,
        id: &GenerationId,
        opts: &AsVmOptions,
        hv: &Hypervisor,
        progress: &dyn Progress,
    ) -> Result<CopyState> {
        let mut out = CopyState {
            nvram: None,
            tpm: Vec::new(),
        };
        let records = src.state_records();
        if records.is_empty() {
            return Ok(out);
        }
        if !hv.is_local() {
            progress.warn(&format!(
                "generation {id} of VM {}: its UEFI variables and TPM state are not restored onto a remote host (the copy starts with empty ones; docs/libvirt.md)",
                opts.vm
            ));
            return Ok(out);
        }
        let mut tpm_damaged = false;
        for rec in records {
            let bytes = match src.read_state(rec) {
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

/// Every disk of `disks` (name, size) restored from `src` (proven, as `restore --to`) into
/// a staged image here, then uploaded into a new volume of `pool` through the libvirt
/// connection; `spec`'s disks then name the volumes. Volumes of a failed run are deleted.
/// Returns whether a disk was damaged, and the volumes made.
#[allow(clippy::too_many_arguments)]
fn to_pool<'h>(
    hv: &'h Hypervisor,
    pool: &'h str,
    src: &dyn CopySource,
    disks: &[(String, u64)],
    spec: &mut CopySpec,
    opts: &AsVmOptions,
    format: &str,
    id: &GenerationId,
    progress: &dyn Progress,
    on_event: &mut dyn FnMut(AsVmEvent<'_>),
) -> Result<(bool, PoolUpload<'h>)> {
    let volume_name = |disk: &str| format!("{}-{disk}.{format}", opts.new_name);
    let names: Vec<String> = disks.iter().map(|(d, _)| volume_name(d)).collect();
    let mut volumes = PoolUpload::new(hv, pool, &names, opts.replace)?;
    let staging = crate::fsutil::private_dir(&opts.staging_dir, "vmkeep-upload-", Share::Nobody)?;
    let _cleanup = RemoveDir(staging.path.clone());
    let mut damaged = false;
    let result = (|| -> Result<()> {
        for (disk, size) in disks {
            let name = volume_name(disk);
            let staged = staging.path.join(&name);
            let (report, unproven) = src.write_disk(
                disk,
                &Destination::from(staged.as_path()),
                opts.ignore_damage,
                progress,
            )?;
            damaged |= unproven || !report.damaged.is_empty();
            let vol = volumes.upload(&name, format, *size, &staged)?;
            if let Some(d) = spec.disks.get_mut(disk) {
                d.path = vol.path().to_path_buf();
            }
            on_event(AsVmEvent::DiskRestored {
                generation: id,
                disk,
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
    Ok((damaged, volumes))
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
