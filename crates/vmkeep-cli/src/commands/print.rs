//! `vmkeep print FILE`

use anyhow::Result;

use super::Ctx;
use crate::cli::PrintArgs;

pub fn run(_ctx: &Ctx, a: PrintArgs) -> Result<i32> {
    let mut text = Vec::new();
    vmkeep::engine::print::print_file(&a.file, &mut text)?;
    crate::output::say(String::from_utf8_lossy(&text).trim_end());
    Ok(0)
}
