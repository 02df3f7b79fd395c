//! `vmkeep backup`

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use serde::Serialize;
use vmkeep::archive::profile::parse_time;
use vmkeep::archive::Repository;
use vmkeep::engine::backup::{BackupOptions, BackupReport, BackupRun, DiskInput};
use vmkeep::engine::Mode;
use vmkeep::source::nbd::NbdSource;
use vmkeep::source::open::{format_of, open_raw, SourceSpec};
use vmkeep::source::{bitmap, changed, qemu, BlockSource};
use vmkeep::Error;

use super::{name_value, Ctx};
use crate::cli::BackupArgs;
use crate::config::parse_size;
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
        if a.if_due && !is_due(ctx, &repo, vm)? {
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
                out.push(JsonVm {
                    name: vm.clone(),
                    ok: true,
                    generation: Some(r.generation),
                    error: None,
                    warnings: r.warnings,
                    recovered: r.recovered,
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
    let hv = vmkeep::libvirt::Hypervisor::connect(Some(&ctx.connect_uri(a.connect.as_deref())))?;
    let defaults = LiveOptions::default();
    let live = LiveOptions {
        skip_disks: ctx.config.vm(vm).skip_disks,
        run_dir: ctx.config.run_dir.clone().unwrap_or(defaults.run_dir),
        scratch_dir: ctx
            .config
            .scratch_dir
            .clone()
            .unwrap_or(defaults.scratch_dir),
    };
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

/// Is the VM's newest generation older than its interval (or is there none)?
fn is_due(ctx: &Ctx, repo: &Repository, vm: &str) -> Result<bool> {
    let Some(interval) = ctx.config.interval_for(vm)? else {
        return Ok(true);
    };
    let Ok(archive) = repo.vm(vm) else {
        return Ok(true);
    };
    let Some(id) = archive.generation_ids()?.pop() else {
        return Ok(true);
    };
    let g = archive.generation(&id)?;
    let Some(t) = parse_time(&g.profile.time) else {
        return Ok(true);
    };
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64);
    let age = SystemTime::now().duration_since(when).unwrap_or_default();
    // A little slack so that a daily timer that fires a few seconds early still runs.
    Ok(age.as_secs() + 300 >= interval)
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

fn options(ctx: &Ctx, vm: &str, a: &BackupArgs) -> Result<BackupOptions> {
    let vmc = ctx.config.vm(vm);
    let mode = a
        .mode
        .clone()
        .or(vmc.mode.clone())
        .or(ctx.config.mode.clone())
        .unwrap_or_else(|| "auto".into());
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
    let level = a.compression.or(ctx.config.compression_level).unwrap_or(3);
    if !(0..=19).contains(&level) {
        return Err(Error::usage(format!("compression level {level} is not in 0..=19")).into());
    }
    Ok(BackupOptions {
        mode: mode.parse::<Mode>()?,
        block_size,
        default_block_size,
        compression_level: level,
        kind: "image".into(),
        domain_xml: None,
        checkpoint: None,
    })
}

fn backup_vm(ctx: &Ctx, repo: &Repository, vm: &str, a: &BackupArgs) -> Result<BackupReport> {
    vmkeep::archive::names::check_vm(vm)?;
    let opts = options(ctx, vm, a)?;
    let specs: Vec<(String, String)> = if !a.disks.is_empty() {
        a.disks
            .iter()
            .map(|d| name_value(d, "--disk").map(|(n, v)| (n.to_string(), v.to_string())))
            .collect::<Result<_>>()?
    } else {
        let vmc = ctx.config.vm(vm);
        if vmc.disks.is_empty() {
            return backup_domain(ctx, repo, vm, a, &opts);
        }
        vmc.disks.into_iter().collect()
    };
    let mut changed_lists = std::collections::HashMap::new();
    for c in &a.changed_blocks {
        let (name, file) = name_value(c, "--changed-blocks")?;
        if !specs.iter().any(|(n, _)| n == name) {
            return Err(Error::usage(format!(
                "--changed-blocks names disk {name:?}, which is not backed up"
            ))
            .into());
        }
        let path = std::path::Path::new(file);
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::usage(format!("changed-block list {file}: {e}")))?;
        changed_lists.insert(name.to_string(), changed::parse(path, &text)?);
    }
    let recorded = newest_bitmaps(repo, vm);
    let granularity = bitmap_granularity(ctx, vm, a)?;
    let mut disks = Vec::new();
    let mut bitmaps = Vec::new();
    for (name, spec) in &specs {
        vmkeep::archive::names::check_disk(name)?;
        let mut input = open_disk(
            name,
            spec,
            recorded.get(name.as_str()).map(String::as_str),
            granularity,
            &mut bitmaps,
        )?;
        if let Some(list) = changed_lists.remove(name) {
            input.changed = Some(list);
        }
        disks.push(input);
    }
    let result =
        BackupRun::begin(repo, vm).and_then(|run| run.execute(disks, &opts, &ctx.progress));
    for (path, name) in &bitmaps {
        match &result {
            Ok(_) => {
                if let Err(e) = bitmap::commit(path, name) {
                    let msg = format!(
                        "{vm}: bitmap {name} not renewed ({e}); the next incr run reads more"
                    );
                    vmkeep::progress::Progress::warn(&ctx.progress, &msg);
                }
            }
            Err(_) => bitmap::abandon(path, name),
        }
    }
    Ok(result?)
}

/// The persistent bitmap each disk of the newest generation recorded.
fn newest_bitmaps(repo: &Repository, vm: &str) -> std::collections::HashMap<String, String> {
    let newest = repo.vm(vm).ok().and_then(|a| {
        let id = a.generation_ids().ok()?.pop()?;
        a.generation(&id).ok()
    });
    newest
        .map(|g| {
            g.profile
                .disks
                .into_iter()
                .filter_map(|d| Some((d.name, d.bitmap?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Open one disk's SOURCE; a qcow2 `?bitmap=NAME` gets its life cycle (see
/// `vmkeep::source::bitmap`) and is remembered in `bitmaps` for the end of the run.
fn open_disk(
    name: &str,
    spec: &str,
    recorded: Option<&str>,
    granularity: Option<u64>,
    bitmaps: &mut Vec<(PathBuf, String)>,
) -> Result<DiskInput> {
    let SourceSpec::Path {
        path,
        format,
        bitmap: Some(bm),
    } = SourceSpec::parse(spec)?
    else {
        return Ok(DiskInput::new(name, open_source(spec)?));
    };
    let fmt = format_of(&path, format.as_deref())?;
    if fmt != "qcow2" {
        return Err(Error::usage(format!(
            "{}: ?bitmap= needs a qcow2 image (this is {fmt})",
            path.display()
        ))
        .into());
    }
    let plan = bitmap::prepare(&path, &bm, recorded, granularity)?;
    bitmaps.push((path.clone(), bm.clone()));
    let incremental = plan == bitmap::Plan::Incremental;
    let source = qemu::open_image(&path, "qcow2", incremental.then_some(bm.as_str()))?;
    let mut input = DiskInput::new(name, source);
    input.bitmap = Some(bm);
    match plan {
        bitmap::Plan::Incremental => input.changed = input.source.changed_extents()?,
        bitmap::Plan::Full(why) => input.untracked_reason = Some(why),
    }
    Ok(input)
}

/// Open a SOURCE string: a raw file or device, an image for qemu-nbd, or an NBD URI.
pub fn open_source(spec: &str) -> Result<Box<dyn BlockSource>> {
    match SourceSpec::parse(spec)? {
        SourceSpec::Path {
            path,
            format,
            bitmap: _,
        } => {
            let fmt = format_of(&path, format.as_deref())?;
            if fmt == "raw" {
                return Ok(open_raw(&path)?);
            }
            if format.is_none() {
                refuse_probed_backing_file(&path, &fmt)?;
            }
            Ok(qemu::open_image(&path, &fmt, None)?)
        }
        SourceSpec::Nbd(uri) => Ok(Box::new(NbdSource::open(&uri, None)?)),
    }
}

/// A probed image with a backing file is refused: a guest that can write a raw image file
/// could plant an image header naming any file of the host as its backing file, and
/// following it would copy that file into the backup. `?format=FMT` says the format is
/// known, and then the chain is followed.
fn refuse_probed_backing_file(path: &std::path::Path, fmt: &str) -> Result<()> {
    let info = bitmap::info(path, Some(fmt))?;
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(Error::usage(format!(
            "{} looks like a {fmt} image with backing file {backing}; vmkeep follows backing files only when the format is given: use {}?format={fmt}",
            path.display(),
            path.display()
        ))
        .into());
    }
    Ok(())
}

/// Bytes per bit for new persistent bitmaps: the flag, the VM's config, the global config.
fn bitmap_granularity(ctx: &Ctx, vm: &str, a: &BackupArgs) -> Result<Option<u64>> {
    let g = match &a.bitmap_granularity {
        Some(s) => Some(parse_size(s)?),
        None => match ctx
            .config
            .vm(vm)
            .bitmap_granularity
            .or_else(|| ctx.config.bitmap_granularity.clone())
        {
            Some(v) => Some(v.bytes()?),
            None => None,
        },
    };
    if let Some(g) = g {
        if !g.is_power_of_two() || !(512..=(1 << 31)).contains(&g) {
            return Err(Error::usage(format!(
                "bitmap granularity {g} is not a power of two from 512 bytes to 2 GiB"
            ))
            .into());
        }
    }
    Ok(g)
}
