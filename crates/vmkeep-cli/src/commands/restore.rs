//! `vmkeep restore`

use anyhow::Result;
use vmkeep::archive::Repository;
use vmkeep::engine::reader::DiskView;
use vmkeep::target::file::FileTarget;
use vmkeep::Error;

use super::Ctx;
use crate::cli::RestoreArgs;
use crate::output::bytes;

pub fn run(ctx: &Ctx, a: RestoreArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let view = open_view(&repo, &a.vm, &a.generation, a.disk.as_deref())?;
    write_view(ctx, &a.vm, &view, &a.to, a.ignore_damage)
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
    let target = Box::new(FileTarget::create(std::path::Path::new(to), view.size)?);
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
