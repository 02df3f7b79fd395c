//! `vmkeep status`

use anyhow::Result;
use vmkeep::engine::status::{vm_status, VmStatus};

use super::Ctx;
use crate::cli::StatusArgs;
use crate::output::bytes;

pub fn run(ctx: &Ctx, a: StatusArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let names = if a.vms.is_empty() {
        repo.vm_names()?
    } else {
        a.vms.clone()
    };
    let vms: Vec<VmStatus> = names
        .iter()
        .map(|n| vm_status(&repo, n))
        .collect::<Result<_, _>>()?;
    if ctx.json {
        crate::output::json(&serde_json::json!({ "repository": repo.root(), "vms": vms }));
        return Ok(0);
    }
    for (i, vm) in vms.iter().enumerate() {
        if i > 0 {
            crate::output::say("");
        }
        crate::output::say(table(vm));
    }
    if vms.is_empty() {
        crate::output::say(format!("no VMs in {}", repo.root().display()));
    }
    Ok(0)
}

/// The human table for one VM.
pub fn table(vm: &VmStatus) -> String {
    let mut out = format!(
        "VM {} — {} generations, {} on disk, block size {}\n",
        vm.name,
        vm.generations.len(),
        bytes(vm.space_used),
        bytes(vm.block_size as u64)
    );
    out.push_str(&format!(
        "{:<3} {:<36} {:<20} {:<5} {:>10} {:>10} {:>10} {:>8} {}\n",
        "N", "GENERATION", "TIME", "MODE", "SIZE", "CHANGED", "STORED", "TOOK", "FLAGS"
    ));
    for (n, g) in vm.generations.iter().enumerate() {
        let size: u64 = g.disks.iter().map(|d| d.size).sum();
        let changed: u64 = g.disks.iter().map(|d| d.changed_bytes).sum();
        let stored: u64 = g.disks.iter().map(|d| d.stored_bytes).sum();
        out.push_str(&format!(
            "{:<3} {:<36} {:<20} {:<5} {:>10} {:>10} {:>10} {:>7.1}s {}\n",
            n,
            g.id,
            g.time,
            g.mode,
            bytes(size),
            bytes(changed),
            bytes(stored),
            g.duration_secs,
            if g.protected { "protected" } else { "" }
        ));
    }
    if vm.interrupted {
        out.push_str(
            "an interrupted command awaits recovery (the next command on this VM does it)\n",
        );
    }
    match &vm.last_check {
        Some(c) => out.push_str(&format!(
            "last {}check: {} {}\n",
            if c.deep { "deep " } else { "" },
            c.time,
            if c.ok {
                "ok".to_string()
            } else {
                format!("{} problems", c.problems)
            }
        )),
        None => out.push_str("last check: never\n"),
    }
    out.trim_end().to_string()
}
