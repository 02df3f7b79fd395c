//! `vmkeep merge VM --generation REV --disk NAME --out PATH`: a past generation as a
//! sparse raw image (the seed tool's "make past dump").

use anyhow::Result;
use vmkeep::engine::restore::{restore_disk, RestoreOptions};
use vmkeep::target::Destination;

use super::restore::print_restore;
use super::Ctx;
use crate::cli::MergeArgs;

pub fn run(ctx: &Ctx, a: MergeArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let opts = RestoreOptions {
        vm: a.vm.clone(),
        rev: a.generation.clone(),
        disk: a.disk.clone(),
        to: Destination::parse(a.out.as_os_str()),
        ignore_damage: false,
    };
    let done = restore_disk(&repo, &opts, &ctx.progress)?;
    Ok(print_restore(ctx, &opts, &done))
}
