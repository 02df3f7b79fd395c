//! Offsite copies: `key create`, `sync`, and the `--from TARGET` forms of `restore`,
//! `check`, `status` and `prune`. The workflows are in `vmkeep::offsite`; this resolves
//! the options, calls them and prints.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use vmkeep::archive::retention::Schedule;
use vmkeep::engine::restore::RestoreOptions;
use vmkeep::offsite::key::OffsiteKey;
use vmkeep::offsite::prune::{prune_from, PruneFromOptions};
use vmkeep::offsite::read::{check_from, restore_from, status_from, RestoreFromOptions};
use vmkeep::offsite::store::ObjectStore;
use vmkeep::offsite::sync::{sync, SyncOptions};
use vmkeep::target::Destination;
use vmkeep::Error;

use super::Ctx;
use crate::cli::{CheckArgs, FromArgs, KeyCommand, PruneArgs, RestoreArgs, StatusArgs, SyncArgs};
use crate::output::{bytes, EXIT_DAMAGE};

/// `vmkeep key create FILE`.
pub fn key(ctx: &Ctx, k: KeyCommand) -> Result<i32> {
    match k {
        KeyCommand::Create { file } => {
            let key = OffsiteKey::create(&file)?;
            if ctx.json {
                crate::output::json(&serde_json::json!({ "file": file, "id": key.id }));
            } else {
                ctx.say(format!(
                    "key {} written to {} (mode 0600): keep a copy elsewhere, without it the offsite copies cannot be read",
                    key.id,
                    file.display()
                ));
            }
            Ok(0)
        }
    }
}

/// The key file named by `--key` (or `VMKEEP_KEY`, else the config's `[offsite] key`),
/// loaded.
fn load_key(ctx: &Ctx, path: Option<&Path>) -> Result<OffsiteKey> {
    let path = path.or(ctx.config.offsite.key.as_deref()).ok_or_else(|| {
        Error::usage(
            "an offsite target needs its key: give --key FILE (or VMKEEP_KEY, or [offsite] key in the config)",
        )
    })?;
    Ok(OffsiteKey::load(path)?)
}

/// Open offsite target `target` with the config's S3 settings (read only for an `s3://`
/// target: its secret file is not needed for a folder).
fn open_target(ctx: &Ctx, target: &str, create: bool) -> Result<Box<dyn ObjectStore>> {
    let s3 = if target.starts_with("s3://") {
        ctx.config.offsite.s3.overrides()?
    } else {
        Default::default()
    };
    Ok(vmkeep::offsite::target::open(target, create, &s3)?)
}

/// The store and key of `--from TARGET --key FILE`.
fn open_from(ctx: &Ctx, f: &FromArgs) -> Result<(Box<dyn ObjectStore>, OffsiteKey)> {
    let target = f.from.as_deref().expect("--from given");
    let key = load_key(ctx, f.key.as_deref())?;
    let store = open_target(ctx, target, false)?;
    Ok((store, key))
}

/// `vmkeep sync VM… --to TARGET --key FILE`.
pub fn sync_cmd(ctx: &Ctx, a: SyncArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let vms = ctx.archived_targets(&repo, &a.targets)?;
    let to =
        a.to.as_deref()
            .or(ctx.config.offsite.to.as_deref())
            .ok_or_else(|| Error::usage("give --to TARGET (or [offsite] to in the config)"))?;
    if !to.contains("://") && !to.starts_with("dir:") {
        return replica(ctx, &repo, &vms, Path::new(to));
    }
    let key = load_key(ctx, a.key.as_deref())?;
    let pack_size = crate::config::parse_size(&a.pack_size)?;
    if !(1 << 16..=1 << 30).contains(&pack_size) {
        return Err(Error::usage("--pack-size must be from 64K to 1G").into());
    }
    let limit_rate = match (&a.limit_rate, &ctx.config.offsite.limit_rate) {
        (Some(r), _) => Some(crate::config::parse_size(r)?),
        (None, Some(r)) => Some(r.bytes()?),
        (None, None) => None,
    };
    let opts = SyncOptions {
        jobs: a.jobs.or(ctx.config.offsite.jobs).unwrap_or(4) as usize,
        limit_rate,
        pack_size: pack_size as usize,
    };
    if opts.limit_rate == Some(0) {
        return Err(Error::usage("--limit-rate must be more than 0").into());
    }
    let store = open_target(ctx, to, true)?;
    let r = sync(&repo, &vms, store.as_ref(), &key, &opts, &ctx.progress)?;
    if ctx.json {
        crate::output::json(&r);
        return Ok(0);
    }
    for vm in &r.vms {
        ctx.say(format!(
            "{}: {} generations synced, {} already on the target{}",
            vm.vm,
            vm.synced.len(),
            vm.present,
            if vm.skipped.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} removed locally before they could be copied",
                    vm.skipped.len()
                )
            }
        ));
    }
    ctx.say(format!(
        "synced {} generations to {}: {} of blocks, {} read, {} new, {} deduplicated; {} objects written ({} uploaded)",
        r.generations_synced,
        r.target,
        bytes(r.bytes_total),
        bytes(r.bytes_read),
        bytes(r.bytes_new),
        bytes(r.bytes_deduplicated),
        r.objects_written,
        bytes(r.bytes_uploaded)
    ));
    Ok(0)
}

/// `vmkeep sync VM… --to PATH`: the VMs' generations appended to the repository at PATH
/// (a plain replica, made if missing), each VM in turn; a VM that fails gets its error line
/// and the others are still copied; the last failure is the command's.
fn replica(
    ctx: &Ctx,
    repo: &vmkeep::archive::Repository,
    vms: &[String],
    path: &Path,
) -> Result<i32> {
    use vmkeep::engine::replicate::{open_replica, replicate_vm};
    let dst = open_replica(repo, path)?;
    let mut failed: Option<anyhow::Error> = None;
    for vm in vms {
        match replicate_vm(repo, &dst, vm, &ctx.progress) {
            Ok(r) => {
                ctx.say(format!(
                    "{vm}: {} generations copied to {}, {} already there ({} read, {} stored)",
                    r.copied.len(),
                    path.display(),
                    r.present,
                    bytes(r.read_bytes),
                    bytes(r.stored_bytes)
                ));
                for (id, why) in &r.skipped {
                    ctx.say(format!("{vm}: generation {id} not copied: {why}"));
                }
            }
            Err(e) => {
                if let Some(earlier) = failed.take() {
                    crate::output::error_line(&earlier);
                }
                failed = Some(anyhow::Error::from(e).context(format!("VM {vm}")));
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(0),
    }
}

/// `vmkeep restore --from TARGET VM -g REV --to DEST | --as-vm NEWNAME`.
pub fn restore(ctx: &Ctx, a: &RestoreArgs) -> Result<i32> {
    if a.ignore_damage {
        return Err(Error::usage("restore --from does not take --ignore-damage").into());
    }
    if a.as_vm.is_some() {
        #[cfg(feature = "libvirt")]
        {
            if a.instant {
                return Err(Error::usage(vmkeep::engine::recover::INSTANT_NEEDS_REPOSITORY).into());
            }
            let (store, key) = open_from(ctx, &a.offsite)?;
            let source = vmkeep::engine::recover::AsVmSource::Offsite {
                store: store.as_ref(),
                key: &key,
            };
            return super::restore::as_vm(ctx, source, a);
        }
        #[cfg(not(feature = "libvirt"))]
        return Err(super::no_libvirt().into());
    }
    let Some(to) = a.to.as_deref() else {
        return Err(Error::usage("give --to TARGET").into());
    };
    let (store, key) = open_from(ctx, &a.offsite)?;
    let opts = RestoreFromOptions {
        vm: a.vm.clone(),
        rev: a.generation.clone(),
        disk: a.disk.clone(),
        to: Destination::parse(to),
    };
    let done = restore_from(store.as_ref(), &key, &opts, &ctx.progress)?;
    let shown = RestoreOptions {
        vm: opts.vm.clone(),
        rev: opts.rev.clone(),
        disk: opts.disk.clone(),
        to: opts.to.clone(),
        ignore_damage: false,
    };
    Ok(super::restore::print_restore(ctx, &shown, &done))
}

/// `vmkeep check --from TARGET [--deep] [VM…]`.
pub fn check(ctx: &Ctx, a: &CheckArgs) -> Result<i32> {
    let (store, key) = open_from(ctx, &a.offsite)?;
    let r = check_from(store.as_ref(), &key, &a.targets.vms, a.deep, &ctx.progress)?;
    if ctx.json {
        crate::output::json(&serde_json::json!({ "ok": r.ok(), "offsite": r }));
    } else {
        for p in &r.problems {
            crate::output::say(format!("DAMAGE: {p}"));
        }
        let kind = if r.deep { "deep check" } else { "check" };
        if r.ok() {
            let deep = if r.deep {
                format!(
                    ", {} blobs ({}) proven",
                    r.blobs_verified,
                    bytes(r.bytes_verified)
                )
            } else {
                String::new()
            };
            ctx.say(format!(
                "{}: {kind} ok ({} manifests, {} packs, {} index objects{deep})",
                r.target, r.manifests, r.packs, r.indexes
            ));
        } else {
            ctx.say(format!(
                "{}: {kind} found {} problems",
                r.target,
                r.problems.len()
            ));
        }
        if r.packs_orphaned > 0 {
            ctx.say(format!(
                "{} packs are referenced by no manifest (prune --from removes them)",
                r.packs_orphaned
            ));
        }
    }
    Ok(if r.ok() { 0 } else { EXIT_DAMAGE })
}

/// `vmkeep status --from TARGET`.
pub fn status(ctx: &Ctx, a: &StatusArgs) -> Result<i32> {
    if a.check_health || a.prometheus.is_some() {
        return Err(Error::usage(
            "status --from shows the target; --check-health and --prometheus read the repository",
        )
        .into());
    }
    let (store, key) = open_from(ctx, &a.offsite)?;
    let mut s = status_from(store.as_ref(), &key)?;
    if !a.vms.is_empty() {
        s.vms.retain(|v| a.vms.contains(&v.name));
    }
    if ctx.json {
        crate::output::json(&s);
        return Ok(0);
    }
    let mut out = format!(
        "offsite copy at {} (key {}, made {})\n",
        s.target, s.key_id, s.created
    );
    for vm in &s.vms {
        out.push_str(&format!(
            "\nVM {} — {} generations\n{:<3} {:<36} {:<20} {:<5} {:>10} {:>10} {}\n",
            vm.name,
            vm.generations.len(),
            "N",
            "GENERATION",
            "TIME",
            "MODE",
            "SIZE",
            "DATA",
            "FLAGS"
        ));
        for (n, g) in vm.generations.iter().enumerate() {
            out.push_str(&format!(
                "{:<3} {:<36} {:<20} {:<5} {:>10} {:>10} {}\n",
                n,
                g.id.to_string(),
                g.time,
                g.mode,
                bytes(g.size),
                bytes(g.data_bytes),
                if g.protected { "protected" } else { "" }
            ));
        }
    }
    if s.vms.is_empty() {
        out.push_str("\nno generations on the target\n");
    }
    for u in &s.unreadable {
        out.push_str(&format!(
            "\nUNREADABLE: manifest {u} does not open with this key\n"
        ));
    }
    out.push_str(&format!(
        "\n{} objects ({}): {} packs ({}), {} index objects, {} locks\n",
        s.objects,
        bytes(s.bytes),
        s.packs,
        bytes(s.pack_bytes),
        s.indexes,
        s.locks
    ));
    crate::output::say(out.trim_end());
    Ok(0)
}

/// `vmkeep prune --from TARGET` with the retention options.
pub fn prune(ctx: &Ctx, a: &PruneArgs, flags: &Schedule) -> Result<i32> {
    if a.targets.group.is_some() {
        return Err(Error::usage("prune --from takes VM names or --all, not --group").into());
    }
    if a.targets.vms.is_empty() && !a.targets.all {
        return Err(Error::usage("name at least one VM, or use --all").into());
    }
    let grace = Duration::from_secs(crate::config::parse_duration(&a.grace)?);
    let (store, key) = open_from(ctx, &a.offsite)?;
    let opts = PruneFromOptions {
        vms: a.targets.vms.clone(),
        dry_run: a.dry_run,
        grace,
    };
    let schedule_of = |vm: &str| ctx.config.retention_for(vm).overridden_by(flags);
    let r = prune_from(store.as_ref(), &key, &schedule_of, &opts, &ctx.progress)?;
    if ctx.json {
        crate::output::json(&r);
        return Ok(0);
    }
    let verb = if a.dry_run { "would remove" } else { "removed" };
    for vm in &r.vms {
        for id in &vm.removed {
            ctx.say(format!("{}: {verb} generation {id}", vm.vm));
        }
        ctx.say(format!(
            "{}: {} kept, {} {verb}",
            vm.vm,
            vm.kept.len(),
            vm.removed.len()
        ));
    }
    match &r.packs_kept_because {
        Some(why) => ctx.say(format!("no pack removed: {why}")),
        None => ctx.say(format!(
            "{} packs {verb} ({}); {} unreferenced packs younger than {} kept",
            r.packs_removed,
            bytes(r.bytes_removed),
            r.packs_in_grace,
            a.grace
        )),
    }
    Ok(0)
}
