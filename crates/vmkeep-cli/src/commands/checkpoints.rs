//! `vmkeep checkpoints VM [--remove-orphans]`: the VM's vmkeep checkpoints and whose they
//! are (this repository, another live one, an orphan whose repository is gone).

use anyhow::Result;

use super::Ctx;
use crate::cli::CheckpointsArgs;

#[cfg(feature = "libvirt")]
pub fn run(ctx: &Ctx, a: CheckpointsArgs) -> Result<i32> {
    use vmkeep::engine::live::{branch_checkpoints, remove_orphans};
    let repo = ctx.open_repo()?;
    vmkeep::archive::names::check_vm(&a.vm)?;
    let hv = vmkeep::libvirt::Hypervisor::connect(Some(
        &ctx.connect_uri(Some(&a.vm), a.connect.as_deref())?,
    ))?;
    let dom = hv.domain(&a.vm)?;
    let removed = if a.remove_orphans {
        remove_orphans(&repo, &dom)?
    } else {
        Vec::new()
    };
    let list = branch_checkpoints(&repo, &dom)?;
    if ctx.json {
        crate::output::json(
            &serde_json::json!({ "vm": a.vm, "checkpoints": list, "removed": removed }),
        );
        return Ok(0);
    }
    for name in &removed {
        ctx.say(format!("removed orphaned checkpoint {name}"));
    }
    for c in &list {
        let whose = match (c.owner.as_str(), &c.repository) {
            ("this", _) => "this repository's (the next backup starts from it)".to_string(),
            ("other", Some(p)) => format!("repository {} (another branch)", p.display()),
            ("orphan", Some(p)) if c.repository_id != repo.profile.id => {
                format!("orphan: repository {} is gone", p.display())
            }
            ("orphan", _) => "orphan: this repository's, no generation needs it".to_string(),
            _ => "unknown repository (no description)".to_string(),
        };
        ctx.say(format!("{}  {whose}", c.name));
    }
    if list.is_empty() {
        ctx.say(format!("VM {} has no vmkeep checkpoints", a.vm));
    }
    Ok(0)
}

#[cfg(not(feature = "libvirt"))]
pub fn run(_ctx: &Ctx, _a: CheckpointsArgs) -> Result<i32> {
    Err(super::no_libvirt().into())
}
