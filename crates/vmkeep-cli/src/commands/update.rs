//! `vmkeep update`: record the hypervisor's inventory in the repository.

use anyhow::Result;

use super::Ctx;
use crate::cli::UpdateArgs;

#[cfg(feature = "libvirt")]
pub fn run(ctx: &Ctx, a: UpdateArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let hv = vmkeep::libvirt::Hypervisor::connect(Some(&ctx.connect_uri(a.connect.as_deref())))?;
    let inv = vmkeep::engine::inventory::update(&repo, &hv)?;
    if ctx.json {
        crate::output::json(&inv);
    } else {
        for vm in &inv.vms {
            let disks: Vec<String> = vm
                .disks
                .iter()
                .map(|d| format!("{} ({})", d.target, d.device))
                .collect();
            ctx.say(format!(
                "{:<24} {:<10} {}",
                vm.name,
                vm.state,
                disks.join(", ")
            ));
        }
        ctx.say(format!(
            "{} VMs recorded in {}",
            inv.vms.len(),
            repo.inventory_path().display()
        ));
    }
    Ok(0)
}

#[cfg(not(feature = "libvirt"))]
pub fn run(_ctx: &Ctx, _a: UpdateArgs) -> Result<i32> {
    Err(super::no_libvirt().into())
}
