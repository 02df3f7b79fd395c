//! `vmkeep backup`

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;
use vmkeep::archive::profile::SourceKind;
use vmkeep::archive::Repository;
use vmkeep::engine::backup::{
    backup_images, check_compression_level, is_due, BackupOptions, BackupReport, ImageBackup,
    DEFAULT_COMPRESSION_LEVEL,
};
use vmkeep::engine::Mode;
use vmkeep::progress::Progress;
use vmkeep::source::bitmap;
use vmkeep::Error;

use super::{name_value, Ctx};
use crate::cli::BackupArgs;
use crate::config::{parse_size, VmConfig};
use crate::output::{bytes, CliProgress, EXIT_FAILURE};

#[derive(Serialize)]
struct JsonVm {
    name: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<vmkeep::archive::profile::GenerationProfile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    warnings: Vec<String>,
    recovered: Vec<String>,
    /// What pruning after the backup did (`prune = "after-backup"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pruned: Option<vmkeep::engine::prune::PruneReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prune_error: Option<String>,
}

/// One VM of the run: its name and, for a libvirt domain `--all` found on a host, that
/// host's URI; `failed`: the VM's host did not answer, so it fails without being tried.
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
struct Planned {
    name: String,
    uri: Option<String>,
    failed: Option<String>,
}

impl Planned {
    fn named(name: &str) -> Planned {
        Planned {
            name: name.to_string(),
            uri: None,
            failed: None,
        }
    }
}

/// What one VM's backup came to.
enum Outcome {
    /// `--if-due` and not due.
    Skipped,
    /// Backed up; the post-backup hook's failure, if it failed.
    Done(Box<BackupReport>, Option<String>),
    Failed(anyhow::Error),
}

pub fn run(ctx: &Ctx, a: BackupArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    if let Some(f) = &a.connect {
        crate::config::check_uri(f)?;
    }
    let mut vms = if a.targets.is_all() {
        all_vms(ctx, &a)?
    } else {
        ctx.named_targets(&a.targets)?
            .iter()
            .map(|n| Planned::named(n))
            .collect()
    };
    if !a.disks.is_empty() && vms.len() != 1 {
        return Err(Error::usage("--disk needs exactly one VM").into());
    }
    let jobs = a
        .jobs
        .map(|j| j as usize)
        .or(ctx.config.jobs)
        .unwrap_or(1)
        .min(vms.len());
    let single = vms.len() == 1;
    let mut report = Report::default();
    if jobs <= 1 {
        for vm in &vms {
            vmkeep::interrupt::check()?;
            match run_one(ctx, &repo, vm, &a, &ctx.progress) {
                Outcome::Failed(e) if single && !ctx.json => return Err(e),
                o => report.add(ctx, &vm.name, o),
            }
        }
    } else {
        // A VM named twice (by name and by group) runs once: two jobs would contend for
        // its lock.
        let mut seen = std::collections::HashSet::new();
        vms.retain(|v| seen.insert(v.name.clone()));
        let outcomes = run_parallel(ctx, &repo, &vms, &a, jobs);
        for (vm, o) in vms.iter().zip(outcomes) {
            report.add(ctx, &vm.name, o);
        }
        // As without --jobs: what finished is reported, then the signal ends the run.
        vmkeep::interrupt::check()?;
    }
    if ctx.json {
        crate::output::json(&serde_json::json!({ "vms": report.out }));
    }
    Ok(if report.failed > 0 { EXIT_FAILURE } else { 0 })
}

/// `jobs` workers take the VMs in list order; each VM's outcome lands in its list slot,
/// so the summary follows the list, not the order the backups finish in. A signal stops
/// the workers taking more VMs; the backups running see it through `vmkeep::interrupt`
/// and roll back (the next command on the VM finishes the recovery).
fn run_parallel(
    ctx: &Ctx,
    repo: &Repository,
    vms: &[Planned],
    a: &BackupArgs,
    jobs: usize,
) -> Vec<Outcome> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Outcome>>> = vms.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                if vmkeep::interrupt::requested().is_some() {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(vm) = vms.get(i) else {
                    break;
                };
                let named = Named {
                    inner: &ctx.progress,
                    vm: &vm.name,
                };
                let o = run_one(ctx, repo, vm, a, &named);
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
            });
        }
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or(Outcome::Skipped)
        })
        .collect()
}

/// Progress of one VM among several running at once: each warning names the VM, each bar
/// is labelled `VM/DISK`. Lines are written whole (the terminal's lock), so two VMs'
/// lines never mix.
struct Named<'a> {
    inner: &'a CliProgress,
    vm: &'a str,
}

impl Progress for Named<'_> {
    fn task(&self, label: &str, total: u64) -> Box<dyn vmkeep::progress::Task> {
        self.inner.task(&format!("{}/{label}", self.vm), total)
    }

    fn warn(&self, msg: &str) {
        self.inner.warn(&format!("{}: {msg}", self.vm));
    }
}

fn run_one(
    ctx: &Ctx,
    repo: &Repository,
    vm: &Planned,
    a: &BackupArgs,
    progress: &dyn Progress,
) -> Outcome {
    if let Some(why) = &vm.failed {
        return Outcome::Failed(anyhow::anyhow!("{why}"));
    }
    let due = || -> Result<bool> {
        Ok(!a.if_due || is_due(repo, &vm.name, ctx.config.interval_for(&vm.name)?)?)
    };
    match due() {
        Ok(false) => Outcome::Skipped,
        Ok(true) => with_hooks(ctx, repo, vm, a, progress),
        Err(e) => Outcome::Failed(e),
    }
}

/// The backup of `vm` between its hooks: a pre-backup hook that fails fails the VM
/// before anything is read; the post-backup hook runs after every attempt (also after a
/// failed pre-backup hook, to undo what it began), told how it went.
fn with_hooks(
    ctx: &Ctx,
    repo: &Repository,
    vm: &Planned,
    a: &BackupArgs,
    progress: &dyn Progress,
) -> Outcome {
    use vmkeep::hooks::{self, Phase};
    let mut env = vec![
        ("VMKEEP_VM", vm.name.clone()),
        ("VMKEEP_REPOSITORY", repo.root().display().to_string()),
    ];
    let result = match ctx.config.hook(&vm.name, Phase::PreBackup) {
        Some(pre) => hooks::run(&pre, Phase::PreBackup, &env).map_err(anyhow::Error::from),
        None => Ok(()),
    }
    .and_then(|()| backup_vm(ctx, repo, vm, a, progress));
    let Some(post) = ctx.config.hook(&vm.name, Phase::PostBackup) else {
        return match result {
            Ok(r) => Outcome::Done(Box::new(r), None),
            Err(e) => Outcome::Failed(e),
        };
    };
    match &result {
        Ok(r) => {
            env.push(("VMKEEP_STATUS", "ok".into()));
            env.push(("VMKEEP_GENERATION", r.generation.id.to_string()));
            env.push(("VMKEEP_MODE", r.generation.mode.to_string()));
        }
        Err(e) => {
            env.push(("VMKEEP_STATUS", "failed".into()));
            env.push(("VMKEEP_ERROR", e.to_string()));
        }
    }
    let post = hooks::run(&post, Phase::PostBackup, &env);
    match (result, post) {
        (Ok(r), post) => Outcome::Done(Box::new(r), post.err().map(|e| e.to_string())),
        (Err(e), Ok(())) => Outcome::Failed(e),
        (Err(e), Err(p)) => Outcome::Failed(e.context(format!("{p}; and before that"))),
    }
}

/// The lines and the JSON of the run, one VM after the other.
#[derive(Default)]
struct Report {
    failed: usize,
    out: Vec<JsonVm>,
}

impl Report {
    fn add(&mut self, ctx: &Ctx, vm: &str, o: Outcome) {
        match o {
            Outcome::Skipped => {}
            Outcome::Done(r, hook) => self.done(ctx, vm, *r, hook),
            Outcome::Failed(e) => {
                self.failed += 1;
                let msg = e.to_string();
                crate::output::error_line(&e.context(format!("VM {vm}")));
                self.out.push(JsonVm {
                    name: vm.to_string(),
                    ok: false,
                    generation: None,
                    error: Some(msg),
                    warnings: vec![],
                    recovered: vec![],
                    pruned: None,
                    prune_error: None,
                });
            }
        }
    }

    fn done(&mut self, ctx: &Ctx, vm: &str, r: BackupReport, hook_error: Option<String>) {
        for w in &r.warnings {
            ctx.progress.warn(&format!("{vm}: {w}"));
        }
        for line in &r.recovered {
            ctx.progress.warn(&format!("{vm}: {line}"));
        }
        ctx.say(summary(&r));
        let (pruned, prune_error) = match r.pruned {
            Some(Ok(p)) => {
                super::prune::say_pruned(ctx, vm, &p, "removed");
                (Some(p), None)
            }
            Some(Err(e)) => {
                // The generation is committed; the run still fails so that
                // monitoring sees a repository that no longer shrinks.
                self.failed += 1;
                crate::output::error_line(&anyhow::anyhow!(
                    "VM {vm}: backed up, but pruning after the backup failed: {e}"
                ));
                (None, Some(e))
            }
            None => (None, None),
        };
        if let Some(e) = &hook_error {
            // The generation is committed; the run fails so that monitoring sees it.
            self.failed += 1;
            crate::output::error_line(&anyhow::anyhow!("VM {vm}: backed up, but {e}"));
        }
        self.out.push(JsonVm {
            name: vm.to_string(),
            ok: prune_error.is_none() && hook_error.is_none(),
            generation: Some(r.generation),
            error: prune_error.clone().or(hook_error),
            warnings: r.warnings,
            recovered: r.recovered,
            pruned,
            prune_error,
        });
    }
}

/// `--all`: every VM the config file defines with disks, and every libvirt domain of
/// every configured host when libvirt is configured (or nothing else is). A host that
/// does not answer is one warning; the VMs the config file puts on it fail, the others
/// run.
fn all_vms(ctx: &Ctx, a: &BackupArgs) -> Result<Vec<Planned>> {
    let mut vms: Vec<Planned> = ctx
        .config
        .vm
        .iter()
        .filter(|(_, v)| !v.disks.is_empty())
        .map(|(n, _)| Planned::named(n))
        .collect();
    // Image-only hosts configure no `connect`: their --all is the configured VMs, with no
    // libvirt warning on every run. Otherwise libvirt's domains are part of "all".
    let uris = ctx.libvirt_uris(a.connect.as_deref(), vms.is_empty())?;
    let mut answered = 0;
    let mut first_error = None;
    for uri in &uris {
        match libvirt_domains(uri) {
            Ok(domains) => {
                answered += 1;
                for d in domains {
                    if vms.iter().any(|v| v.name == d) {
                        continue;
                    }
                    // A VM the config puts on another host is backed up from there.
                    let own = a.connect.is_none() && ctx.config.has_own_connect(&d);
                    vms.push(Planned {
                        uri: (!own).then(|| uri.clone()),
                        name: d,
                        failed: None,
                    });
                }
            }
            Err(e) => {
                if uris.len() > 1 || !vms.is_empty() {
                    let rest = if uris.len() == 1 {
                        "backing up the configured images only"
                    } else {
                        "its VMs fail, the others are backed up"
                    };
                    ctx.progress.warn(&format!("libvirt: {e}; {rest}"));
                }
                // The VMs the config file names without disks: libvirt domains.
                let named = ctx
                    .config
                    .vm
                    .iter()
                    .filter(|(_, v)| v.disks.is_empty())
                    .map(|(n, _)| n)
                    .chain(ctx.config.groups.values().flat_map(|g| g.members()));
                for name in named {
                    let here = a.connect.is_some() || ctx.config.connect_of(name) == Some(uri);
                    if here && !vms.iter().any(|v| &v.name == name) {
                        vms.push(Planned {
                            name: name.clone(),
                            uri: None,
                            failed: Some(format!("its host did not answer: {e}")),
                        });
                    }
                }
                first_error.get_or_insert(e);
            }
        }
    }
    if answered == 0 && vms.is_empty() {
        if let Some(e) = first_error {
            return Err(e);
        }
    }
    if vms.is_empty() {
        return Err(
            Error::usage("--all: no VMs (none in the config file, none in libvirt)").into(),
        );
    }
    Ok(vms)
}

#[cfg(feature = "libvirt")]
fn libvirt_domains(uri: &str) -> Result<Vec<String>> {
    let hv = vmkeep::libvirt::Hypervisor::connect(Some(uri))?;
    Ok(hv.list_domains()?.into_iter().map(|d| d.name).collect())
}

#[cfg(not(feature = "libvirt"))]
fn libvirt_domains(_uri: &str) -> Result<Vec<String>> {
    Ok(Vec::new())
}

/// A VM with no disks given: a libvirt domain, on the host `--all` found it on, else on
/// its configured host. The host it was backed up on is recorded in its `vm.toml`.
#[cfg(feature = "libvirt")]
fn backup_domain(
    ctx: &Ctx,
    repo: &Repository,
    vm: &Planned,
    a: &BackupArgs,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    use vmkeep::engine::live::{backup_domain, LiveOptions};
    let uri = match &vm.uri {
        Some(u) => u.clone(),
        None => ctx.connect_uri(Some(&vm.name), a.connect.as_deref())?,
    };
    let hv = vmkeep::libvirt::Hypervisor::connect(Some(&uri))?;
    let name = vm.name.as_str();
    let mut live = LiveOptions::from_settings(
        ctx.config.vm(name).skip_disks,
        ctx.config.run_dir.clone(),
        ctx.config.scratch_dir.clone(),
    );
    live.offline_read = a
        .offline_read
        .unwrap_or_else(|| ctx.config.offline_read_for(name))
        .into();
    if let Some(q) = a
        .quiesce
        .or_else(|| ctx.config.vm.get(name).and_then(|v| v.quiesce))
        .or(ctx.config.quiesce)
    {
        live.quiesce = q.into();
    }
    if let Some(ports) = ctx.config.nbd_ports()? {
        live.remote.ports = ports;
    }
    live.remote.address = ctx
        .config
        .vm
        .get(name)
        .and_then(|v| v.nbd_address.clone())
        .or_else(|| ctx.config.nbd_address.clone());
    if let Some(dir) = &ctx.config.nbd_tls_dir {
        live.remote.tls_dir = dir.clone();
    }
    if let Some(dir) = &ctx.config.remote_scratch_dir {
        live.remote.scratch_dir = dir.clone();
    }
    live.remote.insecure = a.insecure_nbd;
    let mut report = backup_domain(repo, &hv, name, opts, &live, progress)?;
    if let Err(e) = vmkeep::engine::inventory::record_host(repo, name, &hv) {
        report
            .warnings
            .push(format!("could not record the VM's host: {e}"));
    }
    Ok(report)
}

#[cfg(not(feature = "libvirt"))]
fn backup_domain(
    _ctx: &Ctx,
    _repo: &Repository,
    vm: &Planned,
    _a: &BackupArgs,
    _opts: &BackupOptions,
    _progress: &dyn Progress,
) -> Result<BackupReport> {
    let vm = &vm.name;
    Err(Error::usage(format!(
        "VM {vm}: no disks given (use --disk NAME=SOURCE or define [vm.{vm}] disks in the config; this build has no libvirt support)"
    ))
    .into())
}

/// The run's line for one VM's new generation; a libvirt VM's ends with how consistent it
/// is (`, frozen`, `, crash` or `, offline`, as `status` shows it).
fn summary(r: &BackupReport) -> String {
    let g = &r.generation;
    let line = format!(
        "{}: generation {} {} read {} changed {} stored {} in {:.1}s",
        r.vm,
        g.id,
        g.mode,
        bytes(r.read_bytes()),
        bytes(r.changed_bytes()),
        bytes(r.stored_bytes()),
        g.duration_secs
    );
    match g.consistency {
        Some(c) => format!("{line}, {}", c.as_str()),
        None => line,
    }
}

/// `vmkeep backup`'s settings for one VM, resolved once: the flags over the VM's config
/// over the global config, every value checked here.
struct Settings {
    opts: BackupOptions,
    /// The disks as SOURCE specs; `None`: a libvirt domain.
    images: Option<ImageBackup>,
}

impl Settings {
    fn resolve(ctx: &Ctx, vm: &str, a: &BackupArgs) -> Result<Settings> {
        let vmc = ctx.config.vm(vm);
        let mode = a
            .mode
            .map(Mode::from)
            .or(vmc.mode)
            .or(ctx.config.mode)
            .unwrap_or_default();
        let block_size = a
            .block_size
            .as_deref()
            .map(parse_size)
            .transpose()?
            .map(|b| b as u32);
        let default_block_size = match &ctx.config.block_size {
            Some(b) => b.bytes()? as u32,
            None => vmkeep::archive::format::DEFAULT_BLOCK_SIZE,
        };
        let level = a
            .compression
            .or(ctx.config.compression_level)
            .unwrap_or(DEFAULT_COMPRESSION_LEVEL);
        check_compression_level(level)?;
        let prune_after = if ctx.config.prunes_after_backup(vm) {
            let schedule = ctx.config.retention_for(vm);
            if schedule.is_empty() {
                ctx.say(format!(
                    "{vm}: prune = \"after-backup\" but no retention schedule; keeping everything"
                ));
                None
            } else {
                Some(schedule)
            }
        } else {
            None
        };
        let opts = BackupOptions {
            mode,
            block_size,
            default_block_size,
            compression_level: level,
            kind: SourceKind::Image,
            domain_xml: None,
            checkpoint: None,
            checkpoint_xml: None,
            consistency: None,
            state: Vec::new(),
            expect_roots: Vec::new(),
            prune_after,
        };
        let disks: Vec<(String, String)> = if !a.disks.is_empty() {
            a.disks
                .iter()
                .map(|d| name_value(d, "--disk").map(|(n, v)| (n.to_string(), v.to_string())))
                .collect::<Result<_>>()?
        } else {
            vmc.disks.clone().into_iter().collect()
        };
        if disks.is_empty() {
            Settings::check_domain(a)?;
            return Ok(Settings { opts, images: None });
        }
        let changed_blocks = a
            .changed_blocks
            .iter()
            .map(|c| {
                name_value(c, "--changed-blocks").map(|(n, f)| (n.to_string(), PathBuf::from(f)))
            })
            .collect::<Result<_>>()?;
        let granularity = Settings::granularity(ctx, &vmc, a)?;
        let images = ImageBackup {
            disks,
            changed_blocks,
            granularity,
        };
        Ok(Settings {
            opts,
            images: Some(images),
        })
    }

    /// The flags that only image VMs take.
    fn check_domain(a: &BackupArgs) -> Result<()> {
        if !cfg!(feature = "libvirt") {
            return Ok(());
        }
        if !a.changed_blocks.is_empty() {
            return Err(Error::usage(
                "--changed-blocks goes with --disk; libvirt VMs are tracked by checkpoints",
            )
            .into());
        }
        if a.bitmap_granularity.is_some() {
            return Err(Error::usage(
                "--bitmap-granularity: libvirt cannot set a checkpoint's granularity (its checkpoint XML has no such setting); QEMU uses the disk's qcow2 cluster size",
            )
            .into());
        }
        Ok(())
    }

    /// Bytes per bit for new persistent bitmaps: the flag, the VM's config, the global
    /// config.
    fn granularity(ctx: &Ctx, vmc: &VmConfig, a: &BackupArgs) -> Result<Option<u64>> {
        let g = match &a.bitmap_granularity {
            Some(s) => Some(parse_size(s)?),
            None => match vmc
                .bitmap_granularity
                .clone()
                .or_else(|| ctx.config.bitmap_granularity.clone())
            {
                Some(v) => Some(v.bytes()?),
                None => None,
            },
        };
        if let Some(g) = g {
            bitmap::check_granularity(g)?;
        }
        Ok(g)
    }
}

fn backup_vm(
    ctx: &Ctx,
    repo: &Repository,
    vm: &Planned,
    a: &BackupArgs,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    vmkeep::archive::names::check_vm(&vm.name)?;
    let settings = Settings::resolve(ctx, &vm.name, a)?;
    match &settings.images {
        Some(images) => Ok(backup_images(
            repo,
            &vm.name,
            images,
            &settings.opts,
            progress,
        )?),
        None => backup_domain(ctx, repo, vm, a, &settings.opts, progress),
    }
}
