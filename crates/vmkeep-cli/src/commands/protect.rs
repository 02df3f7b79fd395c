//! `vmkeep protect VM --generation REV [--off]`

use anyhow::Result;
use vmkeep::archive::lock::VmLock;
use vmkeep::archive::profile;

use super::Ctx;
use crate::cli::ProtectArgs;

pub fn run(ctx: &Ctx, a: ProtectArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let vm = repo.vm(&a.vm)?;
    let _lock = VmLock::acquire(&vm.dir, &a.vm, "protect")?;
    let id = vm.resolve(&a.generation)?;
    let mut g = vm.generation(&id)?;
    g.profile.protected = !a.off;
    profile::store(&g.profile_path(), "vmkeep generation profile", &g.profile)?;
    ctx.say(format!(
        "{} generation {id}: {}",
        a.vm,
        if a.off {
            "no longer protected"
        } else {
            "protected from prune"
        }
    ));
    Ok(0)
}
