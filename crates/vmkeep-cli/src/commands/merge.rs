//! `vmkeep merge VM --generation REV --disk NAME --out PATH`: a past generation as a
//! sparse raw image (the seed tool's "make past dump").

use anyhow::Result;

use super::restore::{open_view, write_view};
use super::Ctx;
use crate::cli::MergeArgs;

pub fn run(ctx: &Ctx, a: MergeArgs) -> Result<i32> {
    let repo = ctx.open_repo()?;
    let (view, unproven) = open_view(&repo, &a.vm, &a.generation, a.disk.as_deref(), false)?;
    write_view(
        ctx,
        &a.vm,
        &view,
        &a.out.display().to_string(),
        false,
        unproven,
    )
}
