//! `vmkeep restore`

use anyhow::Result;
use vmkeep::archive::Repository;
use vmkeep::engine::reader::DiskView;
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
    let view = open_view(&repo, &a.vm, &a.generation, a.disk.as_deref())?;
    write_view(ctx, &a.vm, &view, to, a.ignore_damage)
}

/// Open disk `disk` (or the only disk) of generation `rev` of `vm`.
pub fn open_view(repo: &Repository, vm: &str, rev: &str, disk: Option<&str>) -> Result<DiskView> {
    let archive = repo.vm(vm)?;
    let id = archive.resolve(rev)?;
    let gens = archive.generations()?;
    let k = gens
        .iter()
        .position(|g| g.id == id)
        .expect("resolved id is listed");
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
    Ok(DiskView::open(&archive, &gens, k, &disk)?)
}

/// Write a view to TARGET and report.
pub fn write_view(
    ctx: &Ctx,
    vm: &str,
    view: &DiskView,
    to: &str,
    ignore_damage: bool,
) -> Result<i32> {
    let target = vmkeep::target::open(to, view.size)?;
    let report = vmkeep::engine::restore::restore(view, target, ignore_damage, &ctx.progress)?;
    if ctx.json {
        crate::output::json(&serde_json::json!({
            "vm": vm, "generation": view.generation, "disk": view.disk, "target": to,
            "size": report.size, "written_bytes": report.written, "damaged": report.damaged,
        }));
    } else {
        ctx.say(format!(
            "{vm}: disk {} of generation {} restored to {to} ({}, {} of data)",
            view.disk,
            view.generation,
            bytes(report.size),
            bytes(report.written)
        ));
        for (s, e) in &report.damaged {
            ctx.say(format!("  damaged: bytes {s}..{e}"));
        }
    }
    Ok(if report.damaged.is_empty() {
        0
    } else {
        crate::output::EXIT_FAILURE
    })
}

/// `restore --as-vm`: every disk of the generation written under the disk folder, and a new
/// libvirt VM defined from the saved XML with a new name, UUID and MACs.
#[cfg(feature = "libvirt")]
fn as_vm(ctx: &Ctx, repo: &Repository, a: &RestoreArgs, new_name: &str) -> Result<i32> {
    use std::collections::BTreeMap;
    use vmkeep::libvirt::{xml, CopySpec, Hypervisor, NewDisk};

    vmkeep::archive::names::check_vm(new_name)?;
    if !["qcow2", "raw"].contains(&a.format.as_str()) {
        return Err(Error::usage(format!("--format {}: use qcow2 or raw", a.format)).into());
    }
    let archive = repo.vm(&a.vm)?;
    let id = archive.resolve(&a.generation)?;
    let gens = archive.generations()?;
    let k = gens
        .iter()
        .position(|g| g.id == id)
        .expect("resolved id is listed");
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
    for d in &gen.profile.disks {
        let path = dir.join(format!("{new_name}-{}.{}", d.name, a.format));
        disks.insert(
            d.name.clone(),
            NewDisk {
                path,
                format: a.format.clone(),
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
    for d in &gen.profile.disks {
        let path = &spec.disks[&d.name].path;
        if path.exists() && !a.replace {
            return Err(Error::usage(format!(
                "{} exists (remove it, or use --replace)",
                path.display()
            ))
            .into());
        }
        let view = DiskView::open(&archive, &gens, k, &d.name)?;
        let target = vmkeep::target::open(path.to_str().expect("UTF-8 path"), view.size)?;
        vmkeep::engine::restore::restore(&view, target, a.ignore_damage, &ctx.progress)?;
        ctx.say(format!(
            "{}: disk {} of generation {id} restored to {}",
            a.vm,
            d.name,
            path.display()
        ));
    }
    let dom = hv.define_copy(&saved, &spec)?;
    ctx.say(format!("VM {new_name} defined (UUID {})", dom.uuid()?));
    if a.start {
        dom.start()?;
        ctx.say(format!("VM {new_name} started"));
    }
    Ok(0)
}

#[cfg(not(feature = "libvirt"))]
fn as_vm(_ctx: &Ctx, _repo: &Repository, _a: &RestoreArgs, _new_name: &str) -> Result<i32> {
    Err(super::no_libvirt().into())
}
