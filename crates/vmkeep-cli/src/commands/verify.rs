//! `vmkeep verify VM [--generation REV] --disk NAME=PATH...`: prove disks hold a
//! generation's bytes. The workflow is `vmkeep::engine::verify::verify`; this parses and
//! prints.

use anyhow::Result;
use vmkeep::engine::verify::verify;
use vmkeep::source::open_source;

use super::Ctx;
use crate::cli::VerifyArgs;
use crate::output::{bytes, EXIT_FAILURE};

pub fn run(ctx: &Ctx, a: VerifyArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let mut disks = Vec::new();
    for spec in &a.disks {
        let (name, path) = super::name_value(spec, "--disk")?;
        disks.push((name.to_string(), path.to_string()));
    }
    let vm = &a.vm;
    let report = verify::<anyhow::Error>(
        &repo,
        vm,
        &a.generation,
        &disks,
        &mut |path| Ok(open_source(path)?.0),
        &ctx.progress,
        &mut |id, path, r| {
            let name = &r.disk;
            if r.ok() {
                ctx.say(format!(
                    "{vm}: disk {name} of generation {id}: {path} is identical ({}, {} read)",
                    bytes(r.size),
                    bytes(r.read_bytes)
                ));
                return;
            }
            if r.source_size != r.size {
                ctx.say(format!(
                    "{vm}: disk {name} of generation {id}: {path} is {} bytes, the generation's disk {}",
                    r.source_size, r.size
                ));
            }
            ctx.say(format!(
                "{vm}: disk {name} of generation {id}: {path} DIFFERS in {} range(s):",
                r.differing.len()
            ));
            for (s, e) in &r.differing {
                ctx.say(format!("  differs: bytes {s}..{e}"));
            }
        },
    )?;
    let ok = report.ok();
    if ctx.json {
        crate::output::json(&serde_json::json!({
            "vm": a.vm, "generation": report.generation, "ok": ok, "disks": report.disks,
        }));
    }
    Ok(if ok { 0 } else { EXIT_FAILURE })
}
