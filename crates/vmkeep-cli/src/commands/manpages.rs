//! `vmkeep manpages DIR` (hidden): write vmkeep.1 and one page per subcommand.

use anyhow::{Context, Result};

use crate::cli::{Cli, ManpagesArgs};

pub fn run(a: ManpagesArgs) -> Result<i32> {
    let cmd = <Cli as clap::CommandFactory>::command();
    std::fs::create_dir_all(&a.dir).with_context(|| a.dir.display().to_string())?;
    clap_mangen::generate_to(cmd, &a.dir).with_context(|| a.dir.display().to_string())?;
    Ok(0)
}
