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
use vmkeep::source::bitmap;
use vmkeep::Error;

use super::{name_value, Ctx};
use crate::cli::BackupArgs;
use crate::config::{parse_size, VmConfig};
use crate::output::{bytes, EXIT_FAILURE};

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

pub fn run(ctx: &Ctx, a: BackupArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let vms = if a.targets.is_all() {
        all_vms(ctx, &a)?
    } else {
        ctx.named_targets(&a.targets)?
    };
    if !a.disks.is_empty() && vms.len() != 1 {
        return Err(Error::usage("--disk needs exactly one VM").into());
    }
    let single = vms.len() == 1;
    let mut failed = 0;
    let mut out = Vec::new();
    for vm in &vms {
        vmkeep::interrupt::check()?;
        if a.if_due && !is_due(&repo, vm, ctx.config.interval_for(vm)?)? {
            continue;
        }
        match backup_vm(ctx, &repo, vm, &a) {
            Ok(r) => {
                for w in &r.warnings {
                    vmkeep::progress::Progress::warn(&ctx.progress, &format!("{vm}: {w}"));
                }
                for line in &r.recovered {
                    vmkeep::progress::Progress::warn(&ctx.progress, &format!("{vm}: {line}"));
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
                        failed += 1;
                        crate::output::error_line(&anyhow::anyhow!(
                            "VM {vm}: backed up, but pruning after the backup failed: {e}"
                        ));
                        (None, Some(e))
                    }
                    None => (None, None),
                };
                out.push(JsonVm {
                    name: vm.clone(),
                    ok: prune_error.is_none(),
                    generation: Some(r.generation),
                    error: prune_error.clone(),
                    warnings: r.warnings,
                    recovered: r.recovered,
                    pruned,
                    prune_error,
                });
            }
            Err(e) if single && !ctx.json => return Err(e),
            Err(e) => {
                failed += 1;
                let msg = e.to_string();
                crate::output::error_line(&e.context(format!("VM {vm}")));
                out.push(JsonVm {
                    name: vm.clone(),
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
    if ctx.json {
        crate::output::json(&serde_json::json!({ "vms": out }));
    }
    Ok(if failed > 0 { EXIT_FAILURE } else { 0 })
}

/// `--all`: every VM the config file defines with disks, and every libvirt domain when
/// libvirt is configured (or nothing else is).
fn all_vms(ctx: &Ctx, a: &BackupArgs) -> Result<Vec<String>> {
    let mut vms: Vec<String> = ctx
        .config
        .vm
        .iter()
        .filter(|(_, v)| !v.disks.is_empty())
        .map(|(n, _)| n.clone())
        .collect();
    // Image-only hosts configure no `connect`: their --all is the configured VMs, with no
    // libvirt warning on every run. Otherwise libvirt's domains are part of "all".
    let ask_libvirt = vms.is_empty() || a.connect.is_some() || ctx.config.connect.is_some();
    if !ask_libvirt {
        return Ok(vms);
    }
    match libvirt_domains(ctx, a) {
        Ok(domains) => {
            for d in domains {
                if !vms.contains(&d) {
                    vms.push(d);
                }
            }
        }
        Err(e) if !vms.is_empty() => vmkeep::progress::Progress::warn(
            &ctx.progress,
            &format!("libvirt: {e}; backing up the configured images only"),
        ),
        Err(e) => return Err(e),
    }
    if vms.is_empty() {
        return Err(
            Error::usage("--all: no VMs (none in the config file, none in libvirt)").into(),
        );
    }
    Ok(vms)
}

#[cfg(feature = "libvirt")]
fn libvirt_domains(ctx: &Ctx, a: &BackupArgs) -> Result<Vec<String>> {
    let hv = vmkeep::libvirt::Hypervisor::connect(Some(&ctx.connect_uri(a.connect.as_deref())))?;
    Ok(hv.list_domains()?.into_iter().map(|d| d.name).collect())
}

#[cfg(not(feature = "libvirt"))]
fn libvirt_domains(_ctx: &Ctx, _a: &BackupArgs) -> Result<Vec<String>> {
    Ok(Vec::new())
}

/// A VM with no disks given: a libvirt domain.
#[cfg(feature = "libvirt")]
fn backup_domain(
    ctx: &Ctx,
    repo: &Repository,
    vm: &str,
    a: &BackupArgs,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    use vmkeep::engine::live::{backup_domain, LiveOptions};
    let hv = vmkeep::libvirt::Hypervisor::connect(Some(&ctx.connect_uri(a.connect.as_deref())))?;
    let mut live = LiveOptions::from_settings(
        ctx.config.vm(vm).skip_disks,
        ctx.config.run_dir.clone(),
        ctx.config.scratch_dir.clone(),
    );
    live.offline_read = a
        .offline_read
        .unwrap_or_else(|| ctx.config.offline_read_for(vm))
        .into();
    if let Some(ports) = ctx.config.nbd_ports()? {
        live.remote.ports = ports;
    }
    live.remote.address = ctx
        .config
        .vm
        .get(vm)
        .and_then(|v| v.nbd_address.clone())
        .or_else(|| ctx.config.nbd_address.clone());
    if let Some(dir) = &ctx.config.nbd_tls_dir {
        live.remote.tls_dir = dir.clone();
    }
    if let Some(dir) = &ctx.config.remote_scratch_dir {
        live.remote.scratch_dir = dir.clone();
    }
    live.remote.insecure = a.insecure_nbd;
    Ok(backup_domain(repo, &hv, vm, opts, &live, &ctx.progress)?)
}

#[cfg(not(feature = "libvirt"))]
fn backup_domain(
    _ctx: &Ctx,
    _repo: &Repository,
    vm: &str,
    _a: &BackupArgs,
    _opts: &BackupOptions,
) -> Result<BackupReport> {
    Err(Error::usage(format!(
        "VM {vm}: no disks given (use --disk NAME=SOURCE or define [vm.{vm}] disks in the config; this build has no libvirt support)"
    ))
    .into())
}

fn summary(r: &BackupReport) -> String {
    let g = &r.generation;
    format!(
        "{}: generation {} {} read {} changed {} stored {} in {:.1}s",
        r.vm,
        g.id,
        g.mode,
        bytes(r.read_bytes()),
        bytes(r.changed_bytes()),
        bytes(r.stored_bytes()),
        g.duration_secs
    )
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

fn backup_vm(ctx: &Ctx, repo: &Repository, vm: &str, a: &BackupArgs) -> Result<BackupReport> {
    vmkeep::archive::names::check_vm(vm)?;
    let settings = Settings::resolve(ctx, vm, a)?;
    match &settings.images {
        Some(images) => Ok(backup_images(
            repo,
            vm,
            images,
            &settings.opts,
            &ctx.progress,
        )?),
        None => backup_domain(ctx, repo, vm, a, &settings.opts),
    }
}
