//! One file per subcommand; this module holds what they share.

mod backup;
mod check;
mod checkpoints;
mod init;
mod manpages;
mod merge;
mod offsite;
mod print;
mod protect;
mod prune;
mod restore;
mod serve;
mod status;
mod update;
mod verify;

use std::path::PathBuf;

use anyhow::Result;
use vmkeep::archive::Repository;
use vmkeep::Error;

use crate::cli::{Cli, Command, Targets};
use crate::config::Config;
use crate::output::CliProgress;

/// Everything a command needs besides its own arguments.
pub struct Ctx {
    pub repo_flag: Option<PathBuf>,
    pub config: Config,
    pub json: bool,
    pub quiet: bool,
    pub progress: CliProgress,
}

/// Default repository when neither flag nor config names one.
pub const DEFAULT_REPO: &str = "/var/lib/vmkeep";

/// libvirt URI when neither flag nor config names one.
pub const DEFAULT_CONNECT: &str = "qemu:///system";

impl Ctx {
    pub fn repo_path(&self) -> PathBuf {
        self.repo_flag
            .clone()
            .or_else(|| self.config.repository.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_REPO))
    }

    pub fn open_repo(&self) -> Result<Repository> {
        Ok(Repository::open(&self.repo_path())?)
    }

    /// Print a line unless quiet or printing JSON.
    pub fn say(&self, line: impl AsRef<str>) {
        if !self.quiet && !self.json {
            crate::output::say(line);
        }
    }

    /// The libvirt URI of VM `vm` (`None`: no particular VM): `--connect`, else the VM's
    /// `connect`, else its group's, else the global one, else qemu:///system. A malformed
    /// flag is a usage error (the config file's values were checked when it was read).
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub fn connect_uri(&self, vm: Option<&str>, flag: Option<&str>) -> Result<String> {
        if let Some(f) = flag {
            crate::config::check_uri(f)?;
            return Ok(f.to_string());
        }
        let configured = match vm {
            Some(vm) => self.config.connect_of(vm),
            None => self.config.connect.as_deref(),
        };
        Ok(configured.unwrap_or(DEFAULT_CONNECT).to_string())
    }

    /// The libvirt hosts to ask for their domains: `--connect` alone, else every URI the
    /// config file names (global first), with qemu:///system first when there is no global
    /// `connect` and `default_host` (the VMs without a connect of their own are there).
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub fn libvirt_uris(&self, flag: Option<&str>, default_host: bool) -> Result<Vec<String>> {
        if flag.is_some() {
            return Ok(vec![self.connect_uri(None, flag)?]);
        }
        let mut uris: Vec<String> = Vec::new();
        if self.config.connect.is_none() && default_host {
            uris.push(DEFAULT_CONNECT.to_string());
        }
        for u in self.config.configured_uris() {
            if !uris.iter().any(|x| x == u) {
                uris.push(u.to_string());
            }
        }
        Ok(uris)
    }

    /// VM names for a command that takes `VM... | --group G | --all`, from the repository.
    pub fn archived_targets(&self, repo: &Repository, t: &Targets) -> Result<Vec<String>> {
        if t.is_all() {
            return Ok(repo.vm_names()?);
        }
        self.named_targets(t)
    }

    /// VM names given by name or group.
    pub fn named_targets(&self, t: &Targets) -> Result<Vec<String>> {
        let mut out = t.vms.clone();
        if let Some(g) = &t.group {
            let members = self.config.groups.get(g).ok_or_else(|| {
                Error::usage(format!(
                    "unknown group {g:?} (groups come from the config file)"
                ))
            })?;
            out.extend(members.members().iter().cloned());
        }
        if out.is_empty() {
            return Err(Error::usage("name at least one VM, or use --group G or --all").into());
        }
        for vm in &out {
            vmkeep::archive::names::check_vm(vm)?;
        }
        out.dedup();
        Ok(out)
    }
}

/// Whether `--from TARGET` was given (the command reads an offsite copy).
pub fn from_target(f: &crate::cli::FromArgs) -> bool {
    f.from.is_some()
}

/// Run the parsed command line; returns the exit status.
pub fn run(cli: Cli) -> Result<i32> {
    if let Command::Completions(a) = &cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(a.shell, &mut cmd, "vmkeep", &mut std::io::stdout());
        return Ok(0);
    }
    let config = Config::load(cli.config.as_deref())?;
    let ctx = Ctx {
        repo_flag: cli.repo.clone(),
        config,
        json: cli.json,
        quiet: cli.quiet,
        progress: CliProgress::new(cli.quiet, cli.json),
    };
    match cli.command {
        Command::Init => init::run(&ctx),
        Command::Update(a) => update::run(&ctx, a),
        Command::Backup(a) => backup::run(&ctx, a),
        Command::Status(a) => status::run(&ctx, a),
        Command::Restore(a) => restore::run(&ctx, a),
        Command::Check(a) => check::run(&ctx, a),
        Command::Prune(a) => prune::run(&ctx, a),
        Command::Merge(a) => merge::run(&ctx, a),
        Command::Verify(a) => verify::run(&ctx, a),
        Command::Print(a) => print::run(&ctx, a),
        Command::Checkpoints(a) => checkpoints::run(&ctx, a),
        Command::Protect(a) => protect::run(&ctx, a),
        Command::Serve(a) => serve::run(&ctx, a),
        Command::Sync(a) => offsite::sync_cmd(&ctx, a),
        Command::Key(k) => offsite::key(&ctx, k),
        Command::Manpages(a) => manpages::run(a),
        Command::Completions(_) => unreachable!("handled above"),
    }
}

/// Split `NAME=VALUE`.
pub fn name_value<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str)> {
    match s.split_once('=') {
        Some((n, v)) if !v.is_empty() => Ok((n, v)),
        _ => Err(Error::usage(format!("{what} must be NAME=VALUE, got {s:?}")).into()),
    }
}

/// The error for libvirt features in a build without them.
#[cfg(not(feature = "libvirt"))]
pub fn no_libvirt() -> vmkeep::Error {
    Error::usage("this vmkeep was built without libvirt support (cargo feature 'libvirt')")
}
