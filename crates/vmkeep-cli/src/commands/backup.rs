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
use vmkeep::source::{bitmap, changed, qemu, BlockSource, SourceIdentity};
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
        job_wait: defaults.job_wait,
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
    let level = a.compression.or(ctx.config.compression_level).unwrap_or(3);
    if !(0..=19).contains(&level) {
        return Err(Error::usage(format!("compression level {level} is not in 0..=19")).into());
    }
    Ok(BackupOptions {
        mode,
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
    // Before the lock: every source that needs no bitmap is opened, bitmap sources are
    // checked. The bitmaps themselves are decided on and added under the lock.
    let mut pending = Vec::new();
    for (name, spec) in &specs {
        vmkeep::archive::names::check_disk(name)?;
        pending.push(open_disk(name, spec)?);
    }
    let granularity = bitmap_granularity(ctx, vm, a)?;
    let run = BackupRun::begin(repo, vm)?;
    let mut bitmaps: Vec<Prepared> = Vec::new();
    let mut disks = Vec::new();
    let opened = (|| -> Result<()> {
        for p in pending {
            let mut input = match p {
                Pending::Ready(input) => input,
                Pending::Bitmap { name, path, prefix } => {
                    open_tracked(repo, &run, &name, &path, &prefix, granularity, &mut bitmaps)?
                }
            };
            if let Some(list) = changed_lists.remove(&input.name) {
                input.changed = Some(list);
                input.user_list = true;
            }
            disks.push(input);
        }
        Ok(())
    })();
    if let Err(e) = opened {
        // The images' qemu-nbd servers (shared locks) stop first: removing a bitmap needs
        // the image's write lock.
        drop(disks);
        for b in &bitmaps {
            bitmap::abandon(&b.path, &b.new);
        }
        return Err(e);
    }
    let result = run.execute_then(disks, &opts, &ctx.progress, &mut |result| {
        let owned = match result {
            Ok(_) if !bitmaps.is_empty() => Generations::of(repo, vm),
            _ => None,
        };
        for b in &bitmaps {
            match result {
                Ok(_) => {
                    let mine = |g: &str| owned.as_ref().is_some_and(|o| o.is_mine(g));
                    let done = bitmap::commit(&b.path, &b.prefix, &repo.profile.id, &b.new, &mine)
                        .and_then(|_| match &b.retired {
                            Some(r) => bitmap::remove(&b.path, r),
                            None => Ok(()),
                        });
                    if let Err(e) = done {
                        let msg = format!(
                            "{vm}: older bitmaps of {} not removed ({e}); they cost QEMU a little on every write",
                            b.path.display()
                        );
                        vmkeep::progress::Progress::warn(&ctx.progress, &msg);
                    }
                }
                Err(_) => bitmap::abandon(&b.path, &b.new),
            }
        }
    });
    Ok(result?)
}

/// Which generation ids are whose: a chain bitmap of this repository may be removed by a
/// run of this VM only for one of this VM's generations, or for an id that is no
/// generation at all (a run that failed or was killed).
struct Generations {
    this: std::collections::HashSet<vmkeep::archive::GenerationId>,
    others: std::collections::HashSet<vmkeep::archive::GenerationId>,
}

impl Generations {
    /// `None` when the repository cannot be listed: then nothing is removed.
    fn of(repo: &Repository, vm: &str) -> Option<Generations> {
        let mut g = Generations {
            this: repo
                .vm(vm)
                .ok()?
                .generation_ids()
                .ok()?
                .into_iter()
                .collect(),
            others: Default::default(),
        };
        for name in repo.vm_names().ok()?.iter().filter(|n| *n != vm) {
            if let Ok(a) = repo.vm(name) {
                g.others.extend(a.generation_ids().ok()?);
            }
        }
        Some(g)
    }

    fn is_mine(&self, id: &str) -> bool {
        self.this.contains(id) || !self.others.contains(id)
    }
}

/// A disk source opened before the VM lock is taken, or one whose bitmap waits for it.
enum Pending {
    Ready(DiskInput),
    Bitmap {
        name: String,
        path: PathBuf,
        prefix: String,
    },
}

/// A bitmap this run added: committed or abandoned at the end of the run.
struct Prepared {
    path: PathBuf,
    prefix: String,
    new: String,
    /// This repository's bitmap of the newest generation under an earlier prefix.
    retired: Option<String>,
}

/// Open one disk's SOURCE; a qcow2 `PATH?bitmap=PREFIX` is only checked here (its bitmaps
/// are handled under the lock, by [`open_tracked`]).
fn open_disk(name: &str, spec: &str) -> Result<Pending> {
    let SourceSpec::Path {
        path,
        format,
        bitmap: Some(prefix),
    } = SourceSpec::parse(spec)?
    else {
        let (source, identity) = open_source(spec)?;
        let mut input = DiskInput::new(name, source);
        input.identity = Some(identity);
        return Ok(Pending::Ready(input));
    };
    let fmt = format_of(&path, format.as_deref())?;
    if fmt != "qcow2" {
        return Err(Error::usage(format!(
            "{}: ?bitmap= needs a qcow2 image (this is {fmt})",
            path.display()
        ))
        .into());
    }
    if format.is_none() {
        refuse_probed_backing_file(&path, &fmt)?;
    }
    Ok(Pending::Bitmap {
        name: name.to_string(),
        path,
        prefix,
    })
}

/// Under the VM lock: decide whether the image's bitmap of the newest generation can be
/// trusted, add this run's (`PREFIX.<repository id>.<generation id>`, remembered in
/// `bitmaps`), and open the image, exporting the trusted bitmap if there is one (see
/// `vmkeep::source::bitmap`).
fn open_tracked(
    repo: &Repository,
    run: &BackupRun,
    name: &str,
    path: &std::path::Path,
    prefix: &str,
    granularity: Option<u64>,
    bitmaps: &mut Vec<Prepared>,
) -> Result<DiskInput> {
    let repo_id = &repo.profile.id;
    let newest = run
        .previous()
        .and_then(|g| Some((g, g.profile.disk(name)?)));
    let expected = newest.map(|(g, _)| bitmap::chain_name(prefix, repo_id, &g.id));
    let recorded = newest.and_then(|(_, d)| d.bitmap.as_deref());
    let new = bitmap::chain_name(prefix, repo_id, run.generation_id());
    // The identity is taken before the bitmap is added: the file the bitmap is added to.
    let identity = SourceIdentity::of_path(path);
    let plan = bitmap::prepare(path, expected.as_deref(), recorded, &new, granularity)?;
    // A bitmap the newest generation recorded under another prefix (`?bitmap=` changed)
    // is still provably this repository's: it goes after success too.
    let newest_suffix = newest.map(|(g, _)| format!(".{repo_id}.{}", g.id));
    let retired = recorded
        .filter(|r| Some(*r) != expected.as_deref())
        .filter(|r| newest_suffix.as_deref().is_some_and(|s| r.ends_with(s)))
        .map(str::to_string);
    bitmaps.push(Prepared {
        path: path.to_path_buf(),
        prefix: prefix.to_string(),
        new: new.clone(),
        retired,
    });
    let from = match &plan {
        bitmap::Plan::Incremental(b) => Some(b.as_str()),
        bitmap::Plan::Full(_) => None,
    };
    let source = qemu::open_image(path, "qcow2", from)?;
    let mut input = DiskInput::new(name, source);
    input.bitmap = Some(new);
    input.identity = Some(identity);
    input.expects_tracking = true;
    match plan {
        bitmap::Plan::Incremental(_) => input.changed = input.source.changed_extents()?,
        bitmap::Plan::Full(why) => input.untracked_reason = Some(why),
    }
    Ok(input)
}

/// Open a SOURCE string: a raw file or device, an image for qemu-nbd, or an NBD URI; and
/// what the source is (recorded with the generation).
pub(super) fn open_source(spec: &str) -> Result<(Box<dyn BlockSource>, SourceIdentity)> {
    match SourceSpec::parse(spec)? {
        SourceSpec::Path {
            path,
            format,
            bitmap: _,
        } => {
            let identity = SourceIdentity::of_path(&path);
            let fmt = format_of(&path, format.as_deref())?;
            if fmt == "raw" {
                return Ok((open_raw(&path)?, identity));
            }
            if format.is_none() {
                refuse_probed_backing_file(&path, &fmt)?;
            }
            Ok((qemu::open_image(&path, &fmt, None)?, identity))
        }
        SourceSpec::Nbd(uri) => Ok((
            Box::new(NbdSource::open(&uri, None)?),
            SourceIdentity::named(&uri),
        )),
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
