//! `vmkeep update`: record the hypervisors' inventory of VMs in the repository.

use anyhow::Result;

use super::Ctx;
use crate::cli::UpdateArgs;

#[cfg(feature = "libvirt")]
pub fn run(ctx: &Ctx, a: UpdateArgs) -> Result<i32> {
    use vmkeep::libvirt::Hypervisor;
    let repo = ctx.open_repo()?;
    let uris = ctx.libvirt_uris(a.connect.as_deref(), true)?;
    // A host that does not answer is a warning; the others are still recorded.
    let mut hosts = Vec::new();
    let mut unreachable = Vec::new();
    let mut first_error = None;
    for uri in &uris {
        match Hypervisor::connect(Some(uri)) {
            Ok(hv) => hosts.push(hv),
            Err(e) if uris.len() > 1 => {
                vmkeep::progress::Progress::warn(
                    &ctx.progress,
                    &format!("{e}; its VMs stay as the last update recorded them"),
                );
                unreachable.push(uri.clone());
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if hosts.is_empty() {
        if let Some(e) = first_error {
            return Err(e.into());
        }
    }
    let refs: Vec<&Hypervisor> = hosts.iter().collect();
    let inv = vmkeep::engine::inventory::update_hosts(&repo, &refs, &unreachable)?;
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
                "{:<24} {:<10} {:<20} {}",
                vm.name,
                vm.state,
                vm.hostname.as_deref().unwrap_or_default(),
                disks.join(", ")
            ));
        }
        ctx.say(format!(
            "{} VMs recorded in {}",
            inv.vms.len(),
            repo.inventory_path().display()
        ));
    }
    Ok(if first_error.is_some() {
        crate::output::EXIT_FAILURE
    } else {
        0
    })
}

#[cfg(not(feature = "libvirt"))]
pub fn run(_ctx: &Ctx, _a: UpdateArgs) -> Result<i32> {
    Err(super::no_libvirt().into())
}
