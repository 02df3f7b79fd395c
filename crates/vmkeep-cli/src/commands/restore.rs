//! `vmkeep restore`

use anyhow::Result;
use vmkeep::archive::Repository;
use vmkeep::engine::reader::DiskView;
use vmkeep::progress::Progress;
use vmkeep::Error;

use super::Ctx;
use crate::cli::RestoreArgs;
use crate::output::bytes;

pub fn run(ctx: &Ctx, a: RestoreArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    if let Some(new_name) = a.as_vm.clone() {
        return as_vm(ctx, &repo, &a, &new_name);
    }
    let to = a.to.as_deref().expect("clap requires --to without --as-vm");
    let (view, unproven) = open_view(
        &repo,
        &a.vm,
        &a.generation,
        a.disk.as_deref(),
        a.ignore_damage,
    )?;
    write_view(ctx, &a.vm, &view, to, a.ignore_damage, unproven)
}

/// Open disk `disk` (or the only disk) of generation `rev` of `vm`, its digests proven.
/// With `ignore_damage`, a failed proof comes back beside a view that trusts no zero
/// digest instead of failing (see [`DiskView::open_ignoring_damage`]).
pub fn open_view(
    repo: &Repository,
    vm: &str,
    rev: &str,
    disk: Option<&str>,
    ignore_damage: bool,
) -> Result<(DiskView, Option<Error>)> {
    let archive = repo.vm(vm)?;
    let (gens, k) = archive.resolve_generation(rev)?;
    let disk = match disk {
        Some(d) => d.to_string(),
        None => match gens[k].profile.disks.as_slice() {
            [only] => only.name.clone(),
            many => {
                let names: Vec<&str> = many.iter().map(|d| d.name.as_str()).collect();
                return Err(Error::usage(format!(
                    "VM {vm} has several disks; name one with --disk ({})",
                    names.join(", ")
                ))
                .into());
            }
        },
    };
    if ignore_damage {
        Ok(DiskView::open_ignoring_damage(&archive, &gens, k, &disk)?)
    } else {
        Ok((DiskView::open(&archive, &gens, k, &disk)?, None))
    }
}

/// Write a view to TARGET and report. `unproven` is the failed proof of a view opened to
/// ignore damage (the restore then reads and checks every block, lists what fails, and
/// exits 3); `None` for a proven view, whose damaged blocks (with `ignore_damage`) are
/// listed, also with exit 3.
pub fn write_view(
    ctx: &Ctx,
    vm: &str,
    view: &DiskView,
    to: &str,
    ignore_damage: bool,
    unproven: Option<Error>,
) -> Result<i32> {
    let target = vmkeep::target::open(to, view.size)?;
    if let Some(e) = &unproven {
        ctx.progress.warn(&format!(
            "{e}; every block is read and checked against its own digest, and those that fail are listed"
        ));
    }
    let report = vmkeep::engine::restore::restore(view, target, ignore_damage, &ctx.progress)?;
    if ctx.json {
        crate::output::json(&serde_json::json!({
            "vm": vm, "generation": view.generation, "disk": view.disk, "target": to,
            "size": report.size, "written_bytes": report.written, "damaged": report.damaged,
            "unproven": unproven.as_ref().map(|e| e.to_string()),
        }));
    } else {
        ctx.say(format!(
            "{vm}: disk {} of generation {} restored to {to} ({}, {} of data)",
            view.disk,
            view.generation,
            bytes(report.size),
            bytes(report.written)
        ));
        if let Some(e) = &unproven {
            ctx.say(format!("  unproven: {e}"));
        }
        for (s, e) in &report.damaged {
            ctx.say(format!("  damaged: bytes {s}..{e}"));
        }
    }
    Ok(if unproven.is_some() || !report.damaged.is_empty() {
        crate::output::EXIT_DAMAGE
    } else {
        0
    })
}

/// `restore --as-vm`: every disk of the generation written under the disk folder, and a new
/// libvirt VM defined from the saved XML with a new name, UUID and MACs.
#[cfg(feature = "libvirt")]
fn as_vm(ctx: &Ctx, repo: &Repository, a: &RestoreArgs, new_name: &str) -> Result<i32> {
    use std::collections::BTreeMap;
    use vmkeep::libvirt::{xml, CopySpec, Hypervisor, NewDisk};

    vmkeep::archive::names::check_vm(new_name)?;
    let archive = repo.vm(&a.vm)?;
    let (gens, k) = archive.resolve_generation(&a.generation)?;
    let id = gens[k].id.clone();
    let gen = &gens[k];
    let saved = std::fs::read_to_string(gen.dir.join("domain.xml")).map_err(|_| {
        Error::usage(format!(
            "generation {id} of VM {} has no saved libvirt XML (it was not backed up from libvirt)",
            a.vm
        ))
    })?;
    let dir = a
        .disk_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("/var/lib/libvirt/images"));
    std::fs::create_dir_all(&dir).map_err(|e| vmkeep::Error::io(&dir, e))?;
    let mut disks = BTreeMap::new();
    // Instant recovery boots from qcow2 overlays whatever --format says.
    let format = if a.instant {
        "qcow2".to_string()
    } else {
        vmkeep::target::ImageFormat::from(a.format)
            .as_str()
            .to_string()
    };
    for d in &gen.profile.disks {
        let path = dir.join(format!("{new_name}-{}.{format}", d.name));
        disks.insert(
            d.name.clone(),
            NewDisk {
                path,
                format: format.clone(),
                block: false,
            },
        );
    }
    let mut networks = BTreeMap::new();
    for n in &a.networks {
        let (old, new) = super::name_value(n, "--network")?;
        networks.insert(old.to_string(), new.to_string());
    }
    let spec = CopySpec {
        new_name: new_name.to_string(),
        disks,
        networks,
        replace: a.replace,
    };
    let hv = Hypervisor::connect(Some(&ctx.connect_uri(a.connect.as_deref())))?;
    // Refuse before writing gigabytes: the name, the networks, the disk mapping.
    if let Ok(existing) = hv.domain(new_name) {
        if !a.replace {
            return Err(Error::usage(format!(
                "VM {new_name} already exists (choose another name, or --replace a shut-off one)"
            ))
            .into());
        }
        if existing.state()?.is_active() {
            return Err(Error::usage(format!(
                "VM {new_name} is running; vmkeep never replaces a running VM"
            ))
            .into());
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
        views.push(if a.ignore_damage && !a.instant {
            DiskView::open_ignoring_damage(&archive, &gens, k, &d.name)?
        } else {
            (DiskView::open(&archive, &gens, k, &d.name)?, None)
        });
    }
    if a.instant {
        drop(views);
        return instant(ctx, repo, a, &id, gen, spec, &saved, &hv);
    }
    for d in &gen.profile.disks {
        let path = &spec.disks[&d.name].path;
        if path.exists() && !a.replace {
            return Err(Error::usage(format!(
                "{} exists (remove it, or use --replace)",
                path.display()
            ))
            .into());
        }
    }
    let mut unproven = false;
    for (view, problem) in &views {
        let path = &spec.disks[&view.disk].path;
        if let Some(e) = problem {
            ctx.progress.warn(&format!(
                "{e}; every block is read and checked against its own digest, and those that fail are listed"
            ));
            unproven = true;
        }
        let target = vmkeep::target::open(path.to_str().expect("UTF-8 path"), view.size)?;
        let report =
            vmkeep::engine::restore::restore(view, target, a.ignore_damage, &ctx.progress)?;
        ctx.say(format!(
            "{}: disk {} of generation {id} restored to {}",
            a.vm,
            view.disk,
            path.display()
        ));
        for (s, e) in &report.damaged {
            ctx.say(format!("  damaged: bytes {s}..{e}"));
        }
        unproven |= !report.damaged.is_empty();
    }
    let dom = hv.define_copy(&saved, &spec)?;
    ctx.say(format!("VM {new_name} defined (UUID {})", dom.uuid()?));
    if a.start {
        dom.start()?;
        ctx.say(format!("VM {new_name} started"));
    }
    Ok(if unproven {
        crate::output::EXIT_DAMAGE
    } else {
        0
    })
}

#[cfg(not(feature = "libvirt"))]
fn as_vm(_ctx: &Ctx, _repo: &Repository, _a: &RestoreArgs, _new_name: &str) -> Result<i32> {
    Err(super::no_libvirt().into())
}

/// Instant recovery: `vmkeep serve` in the background exports the generation; each new
/// disk is a qcow2 overlay whose backing file is that export, so the VM boots at once and
/// reads what it has not written from the archive. Its writes stay in the overlays.
#[cfg(feature = "libvirt")]
#[allow(clippy::too_many_arguments)]
fn instant(
    ctx: &Ctx,
    repo: &Repository,
    a: &RestoreArgs,
    id: &str,
    gen: &vmkeep::archive::Generation,
    spec: vmkeep::libvirt::CopySpec,
    saved: &str,
    hv: &vmkeep::libvirt::Hypervisor,
) -> Result<i32> {
    let new_name = &spec.new_name;
    let (socket, log, mut child) = start_server(ctx, repo, &a.vm, id)?;
    let stop = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    for d in &gen.profile.disks {
        let overlay = &spec.disks[&d.name].path;
        if overlay.exists() && !a.replace {
            stop(&mut child);
            return Err(Error::usage(format!(
                "{} exists (remove it, or use --replace)",
                overlay.display()
            ))
            .into());
        }
        let _ = std::fs::remove_file(overlay);
        // The recovered guest's writes land here: 0600 from the start (qemu-img create
        // truncates the file and keeps its mode; libvirt gives QEMU the file when the VM
        // starts, by owner, not by mode).
        if let Err(e) = vmkeep::fsutil::create_new(overlay) {
            stop(&mut child);
            return Err(e.into());
        }
        let backing = format!("nbd+unix:///{}?socket={}", d.name, socket.display());
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing])
            .arg(overlay)
            .output()?;
        if !out.status.success() {
            stop(&mut child);
            let _ = std::fs::remove_file(overlay);
            return Err(Error::source(
                "qemu-img create",
                String::from_utf8_lossy(&out.stderr).trim(),
            )
            .into());
        }
    }
    let dom = match hv.define_copy(saved, &spec) {
        Ok(d) => d,
        Err(e) => {
            stop(&mut child);
            return Err(e.into());
        }
    };
    ctx.say(format!(
        "VM {new_name} defined on overlays over generation {id} of {} (UUID {})",
        a.vm,
        dom.uuid()?
    ));
    if a.start {
        dom.start()?;
        ctx.say(format!("VM {new_name} started"));
    }
    let pid = child.id();
    ctx.say(format!(
        "vmkeep serve (pid {pid}) exports the generation on {} (log: {})",
        socket.display(),
        log.display()
    ));
    ctx.say("The VM's unwritten data stays in the archive. To make the copy permanent:");
    for d in &gen.profile.disks {
        ctx.say(format!(
            "  virsh blockpull {new_name} {} --wait --verbose",
            d.name
        ));
    }
    ctx.say(format!(
        "  kill {pid}    # once every blockpull has finished, or the VM is gone"
    ));
    ctx.say("  (or, shut off: qemu-img convert -O qcow2 OVERLAY FULL.qcow2 and point the VM at FULL.qcow2)");
    Ok(0)
}

/// Start `vmkeep serve` for generation `id` of `vm`, detached, on a socket QEMU may use;
/// returns the socket, the server's log file and the process.
#[cfg(feature = "libvirt")]
fn start_server(
    ctx: &Ctx,
    repo: &Repository,
    vm: &str,
    id: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf, std::process::Child)> {
    use std::os::unix::process::CommandExt;

    let gid = super::serve::group_id("libvirt-qemu").or_else(|_| super::serve::group_id("qemu"))?;
    let base = ctx
        .config
        .run_dir
        .clone()
        .unwrap_or_else(|| "/run/vmkeep".into());
    // A fresh folder in a parent only root can change: root-owned, QEMU's group may
    // enter (to connect), nobody else.
    let run = vmkeep::fsutil::private_dir(&base, 0o711, "instant-", Some(gid), 0o750)?.path;
    let socket = run.join("nbd.sock");
    let log = run.join("serve.log");
    // 0600: QEMU's group may enter the folder, the server's log is root's.
    let log_file = vmkeep::fsutil::create_truncate(&log)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--repo")
        .arg(repo.root())
        .args(["serve", vm, "-g", id, "--idle-timeout", "0"]);
    cmd.arg("--socket-group")
        .arg(gid.to_string())
        .arg("--socket")
        .arg(&socket);
    cmd.stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: setsid() is async-signal-safe and touches no memory; it detaches the server
    // from this terminal's session so that it outlives this command.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Some(status) = child.try_wait()? {
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(Error::source(
                "vmkeep serve",
                format!("exited ({status}): {}", msg.trim()),
            )
            .into());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err(
                Error::source("vmkeep serve", "did not start listening within 20 s").into(),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok((socket, log, child))
}
