//! `vmkeep verify VM [--generation REV] --disk NAME=PATH...`: prove disks hold a
//! generation's bytes. The workflow is `vmkeep::engine::verify`; this parses and prints.

use anyhow::Result;
use vmkeep::archive::view::DiskView;
use vmkeep::engine::verify::{no_such_disk, verify_disk, DiskVerify};

use super::backup::open_source;
use super::Ctx;
use crate::cli::VerifyArgs;
use crate::output::{bytes, EXIT_FAILURE};

pub fn run(ctx: &Ctx, a: VerifyArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let archive = repo.vm(&a.vm)?;
    let chosen = archive.select(&a.generation)?;
    let id = chosen.generation().id.clone();
    let have: Vec<&str> = chosen
        .generation()
        .profile
        .disks
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    // Every argument is checked, and every disk's digests proven, before anything is read.
    let mut jobs = Vec::new();
    for spec in &a.disks {
        let (name, path) = super::name_value(spec, "--disk")?;
        if !have.contains(&name) {
            return Err(no_such_disk(&a.vm, &id, name, &have).into());
        }
        if jobs
            .iter()
            .any(|(n, _, _): &(String, String, DiskView)| n == name)
        {
            return Err(vmkeep::Error::usage(format!("--disk {name} given twice")).into());
        }
        let view = chosen.view(name)?;
        jobs.push((name.to_string(), path.to_string(), view));
    }
    let mut results: Vec<DiskVerify> = Vec::new();
    for (name, path, view) in &jobs {
        let (source, _identity) = open_source(path)?;
        let r = verify_disk(view, source.as_ref(), &ctx.progress)?;
        if r.ok() {
            ctx.say(format!(
                "{}: disk {name} of generation {id}: {path} is identical ({}, {} read)",
                a.vm,
                bytes(r.size),
                bytes(r.read_bytes)
            ));
        } else {
            if r.source_size != r.size {
                ctx.say(format!(
                    "{}: disk {name} of generation {id}: {path} is {} bytes, the generation's disk {}",
                    a.vm, r.source_size, r.size
                ));
            }
            ctx.say(format!(
                "{}: disk {name} of generation {id}: {path} DIFFERS in {} range(s):",
                a.vm,
                r.differing.len()
            ));
            for (s, e) in &r.differing {
                ctx.say(format!("  differs: bytes {s}..{e}"));
            }
        }
        results.push(r);
    }
    let ok = results.iter().all(DiskVerify::ok);
    if ctx.json {
        crate::output::json(&serde_json::json!({
            "vm": a.vm, "generation": id, "ok": ok, "disks": results,
        }));
    }
    Ok(if ok { 0 } else { EXIT_FAILURE })
}
