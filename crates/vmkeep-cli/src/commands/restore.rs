//! `vmkeep restore`. The workflows are `vmkeep::engine::restore::restore_disk` (`--to`)
//! and `vmkeep::engine::recover::restore_as_vm` (`--as-vm`, `--instant`); this resolves
//! the options, calls one of them and prints.

use anyhow::Result;
use vmkeep::engine::restore::{restore_disk, DiskRestore, RestoreOptions};
use vmkeep::target::Destination;

use super::Ctx;
use crate::cli::RestoreArgs;
use crate::output::bytes;

pub fn run(ctx: &Ctx, a: RestoreArgs) -> Result<i32> {
    if super::from_target(&a.offsite) {
        return super::offsite::restore(ctx, &a);
    }
    let repo = ctx.open_repo()?;
    if a.as_vm.is_some() {
        #[cfg(feature = "libvirt")]
        return as_vm(ctx, (&repo).into(), &a);
        #[cfg(not(feature = "libvirt"))]
        return Err(super::no_libvirt().into());
    }
    let Some(to) = a.to.as_deref() else {
        return Err(vmkeep::Error::usage("give --to TARGET or --as-vm NEWNAME").into());
    };
    let opts = RestoreOptions {
        vm: a.vm.clone(),
        rev: a.generation.clone(),
        disk: a.disk.clone(),
        to: Destination::parse(to),
        ignore_damage: a.ignore_damage,
    };
    let done = restore_disk(&repo, &opts, &ctx.progress)?;
    Ok(print_restore(ctx, &opts, &done))
}

/// Report a restore of one disk (`restore --to`, `merge`); returns the exit status.
pub fn print_restore(ctx: &Ctx, opts: &RestoreOptions, done: &DiskRestore) -> i32 {
    let (vm, to, report) = (&opts.vm, &opts.to, &done.report);
    if ctx.json {
        crate::output::json(&serde_json::json!({
            "vm": vm, "generation": done.generation, "disk": done.disk,
            "target": to.to_string(), "size": report.size, "written_bytes": report.written,
            "damaged": report.damaged,
            "unproven": done.unproven.as_ref().map(|e| e.to_string()),
        }));
    } else {
        ctx.say(format!(
            "{vm}: disk {} of generation {} restored to {to} ({}, {} of data)",
            done.disk,
            done.generation,
            bytes(report.size),
            bytes(report.written)
        ));
        if let Some(e) = &done.unproven {
            ctx.say(format!("  unproven: {e}"));
        }
        for (s, e) in &report.damaged {
            ctx.say(format!("  damaged: bytes {s}..{e}"));
        }
    }
    if done.damaged() {
        crate::output::EXIT_DAMAGE
    } else {
        0
    }
}

/// `restore --as-vm` (and `--instant`) from `source` (the repository, or with `--from` an
/// offsite target): the options from flags and config, the library's workflow, each step
/// printed as it is done.
#[cfg(feature = "libvirt")]
pub(super) fn as_vm(
    ctx: &Ctx,
    source: vmkeep::engine::recover::AsVmSource<'_>,
    a: &RestoreArgs,
) -> Result<i32> {
    use vmkeep::engine::recover::{restore_as_vm, AsVmEvent, AsVmOptions};

    let new_name = a.as_vm.as_deref().unwrap_or_default();
    let mut opts = AsVmOptions::new(&a.vm, &a.generation, new_name);
    if let Some(dir) = &a.disk_dir {
        opts.disk_dir = dir.clone();
    }
    if let Some(run) = &ctx.config.run_dir {
        opts.run_dir = run.clone();
    }
    if let Some(scratch) = &ctx.config.scratch_dir {
        opts.staging_dir = scratch.clone();
    }
    let serve = &ctx.config.serve;
    opts.instant_tcp.address = serve.address.clone();
    if let Some(ports) = ctx.config.nbd_ports()? {
        opts.instant_tcp.ports = ports;
    }
    if let Some(dir) = serve.tls_dir.as_ref().or(ctx.config.nbd_tls_dir.as_ref()) {
        opts.instant_tcp.tls_dir = dir.clone();
    }
    opts.pool = a.pool.clone();
    opts.format = a.format.into();
    opts.start = a.start;
    opts.replace = a.replace;
    opts.instant = a.instant;
    opts.ignore_damage = a.ignore_damage;
    // The new VM's own connect when the config gives it one, else the source VM's host.
    let host_of = if ctx.config.has_own_connect(new_name) {
        new_name
    } else {
        a.vm.as_str()
    };
    opts.connect = ctx.connect_uri(Some(host_of), a.connect.as_deref())?;
    for n in &a.networks {
        let (old, new) = super::name_value(n, "--network")?;
        opts.networks.insert(old.to_string(), new.to_string());
    }
    let report = restore_as_vm(source, &opts, &ctx.progress, &mut |event| match event {
        AsVmEvent::DiskRestored {
            generation,
            disk,
            path,
            report,
        } => {
            ctx.say(format!(
                "{}: disk {disk} of generation {generation} restored to {}",
                a.vm,
                path.display()
            ));
            for (s, e) in &report.damaged {
                ctx.say(format!("  damaged: bytes {s}..{e}"));
            }
        }
        AsVmEvent::Defined { generation, uuid } if opts.instant => ctx.say(format!(
            "VM {new_name} defined on overlays over generation {generation} of {} (UUID {uuid})",
            a.vm
        )),
        AsVmEvent::Defined { uuid, .. } => ctx.say(format!("VM {new_name} defined (UUID {uuid})")),
        AsVmEvent::StateRestored { what, path } => ctx.say(format!(
            "VM {new_name}: {what} of the generation restored to {}",
            path.display()
        )),
        AsVmEvent::Started => ctx.say(format!("VM {new_name} started")),
    })?;
    if let Some(server) = &report.server {
        ctx.say(format!(
            "vmkeep serve (pid {}) exports the generation on {} (log: {})",
            server.pid(),
            server.server,
            server.log.display()
        ));
        ctx.say(format!(
            "Once {new_name} runs, it copies the generation into the VM's disks and then exits; `vmkeep status` shows the progress."
        ));
    }
    // The instant server outlives this command: the report is dropped, the server runs on.
    Ok(if report.damaged {
        crate::output::EXIT_DAMAGE
    } else {
        0
    })
}
