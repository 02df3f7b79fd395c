//! Crash and ENOSPC injection for the durability tests.
//!
//! Built only with the `fault-injection` feature. `VMKEEP_FAULT=kill:N` sends SIGKILL to the
//! process at the N-th durable operation (create, mkdir, write, truncate, rename, link,
//! symlink, fsync, removal; see [`Op`]) that goes
//! through [`crate::fsutil`]; `VMKEEP_FAULT=enospc:N` makes that operation and every later
//! one fail with ENOSPC, as a file system that has just filled up does.
//! `VMKEEP_FAULT_COUNT=FILE` writes the number of operations at exit, so a test knows
//! how many points there are to try.
//!
//! `VMKEEP_FAULT_LOG=DIR` records every operation, in order, as a line
//! `N<TAB>KIND<TAB>PATH[<TAB>PATH2]` of `DIR/log` (see [`Op`]), and saves what operation
//! N is about to change or make durable, as it is before it, to `DIR/snap/N`: the file
//! written, truncated, synced or removed, the file a rename replaces, the folder a
//! recursive removal takes (a copy of its tree). The
//! power-loss explorer (`crates/vmkeep-cli/tests/powerloss.rs`) builds from these the
//! states a power loss after any prefix of the operations could leave. With a log, the
//! disks of a backup are written one after the other, so that the order is the same in
//! every run. `VMKEEP_FAULT_LOG_SNAPSHOTS=0` keeps the log and skips the copies (for
//! tests that need only the order of the operations).

use std::path::Path;

use crate::error::Result;

/// The kind of a durable operation, as the log names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Data written into a file (also an append, a hole punched, zeros written).
    Write,
    /// A file's length changed.
    Truncate,
    /// fdatasync of a file.
    DataSync,
    /// fsync of a file.
    Sync,
    /// fsync of a folder: its entries are durable.
    SyncDir,
    /// A new file (entry in its folder).
    Create,
    /// A new folder.
    Mkdir,
    /// A new symlink; the second path is its target.
    Symlink,
    /// A rename from the second path to the first.
    Rename,
    /// A hard link named by the first path, to the second.
    Link,
    /// A file removed.
    Unlink,
    /// A folder removed with everything in it.
    RemoveTree,
}

impl Op {
    /// The operation's name in the `KIND` column of the `VMKEEP_FAULT_LOG` log (`fsync`, `rename`,
    /// `rmtree`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Truncate => "truncate",
            Op::DataSync => "fdatasync",
            Op::Sync => "fsync",
            Op::SyncDir => "syncdir",
            Op::Create => "create",
            Op::Mkdir => "mkdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Unlink => "unlink",
            Op::RemoveTree => "rmtree",
        }
    }
}

#[cfg(feature = "fault-injection")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    use super::*;
    use crate::error::Error;

    static COUNT: AtomicU64 = AtomicU64::new(0);

    #[derive(Clone, Copy)]
    enum Plan {
        Off,
        Kill(u64),
        NoSpace(u64),
    }

    fn plan() -> Plan {
        static PLAN: OnceLock<Plan> = OnceLock::new();
        *PLAN.get_or_init(|| {
            let v = std::env::var("VMKEEP_FAULT").unwrap_or_default();
            let parse = |s: &str| s.parse::<u64>().ok();
            match v.split_once(':') {
                Some(("kill", n)) => parse(n).map(Plan::Kill).unwrap_or(Plan::Off),
                Some(("enospc", n)) => parse(n).map(Plan::NoSpace).unwrap_or(Plan::Off),
                _ => Plan::Off,
            }
        })
    }

    fn log_dir() -> Option<&'static std::path::PathBuf> {
        static DIR: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
        DIR.get_or_init(|| std::env::var_os("VMKEEP_FAULT_LOG").map(Into::into))
            .as_ref()
    }

    pub fn logging() -> bool {
        log_dir().is_some()
    }

    fn log(n: u64, op: Op, path: &Path, other: Option<&Path>) {
        use std::io::Write;
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let Some(dir) = log_dir() else { return };
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // What the operation is about to change (or make durable), as it is now; a test
        // that needs only the order of operations says VMKEEP_FAULT_LOG_SNAPSHOTS=0.
        static SNAPSHOTS: OnceLock<bool> = OnceLock::new();
        let snapshots = *SNAPSHOTS.get_or_init(|| {
            std::env::var_os("VMKEEP_FAULT_LOG_SNAPSHOTS").is_none_or(|v| v != "0")
        });
        let snap = dir.join("snap").join(n.to_string());
        let is_file = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
        match op {
            _ if !snapshots => {}
            Op::Write | Op::Truncate | Op::Sync | Op::DataSync | Op::Unlink | Op::Rename
                if is_file =>
            {
                let _ = std::fs::create_dir_all(dir.join("snap"));
                let _ = std::fs::copy(path, &snap);
            }
            Op::RemoveTree if path.is_dir() => copy_tree(path, &snap),
            _ => {}
        }
        let mut line = format!("{n}\t{}\t{}", op.name(), path.display());
        if let Some(o) = other {
            line.push_str(&format!("\t{}", o.display()));
        }
        line.push('\n');
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
        {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// Copy the files of the folder `from` to `to` (folders and files only).
    fn copy_tree(from: &Path, to: &Path) {
        let _ = std::fs::create_dir_all(to);
        for e in std::fs::read_dir(from).into_iter().flatten().flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let dest = to.join(e.file_name());
            if ft.is_dir() {
                copy_tree(&e.path(), &dest);
            } else if ft.is_file() {
                let _ = std::fs::copy(e.path(), dest);
            }
        }
    }

    pub fn point(op: Op, path: &Path, other: Option<&Path>) -> Result<()> {
        let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
        if !matches!(plan(), Plan::Kill(k) if n == k) {
            log(n, op, path, other);
        }
        match plan() {
            Plan::Kill(k) if n == k => {
                // SAFETY: kill(2) on our own pid; never returns for SIGKILL.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                Ok(())
            }
            Plan::NoSpace(k) if n >= k => Err(Error::io(
                path,
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            )),
            _ => Ok(()),
        }
    }

    pub fn count() -> u64 {
        COUNT.load(Ordering::SeqCst)
    }
}

/// One durable operation `op` on `path` is about to happen (`other`: the second path of
/// a rename's source, a link's target or a symlink's target).
#[cfg(feature = "fault-injection")]
pub fn point(op: Op, path: &Path, other: Option<&Path>) -> Result<()> {
    imp::point(op, path, other)
}

/// One durable operation `op` on `path` is about to happen.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_op: Op, _path: &Path, _other: Option<&Path>) -> Result<()> {
    Ok(())
}

/// True when operations are being logged for the power-loss explorer: work that could
/// run in parallel runs in order then.
pub fn serial() -> bool {
    #[cfg(feature = "fault-injection")]
    return imp::logging();
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// Write the number of operations seen so far where `VMKEEP_FAULT_COUNT` says.
pub fn report() {
    #[cfg(feature = "fault-injection")]
    if let Ok(file) = std::env::var("VMKEEP_FAULT_COUNT") {
        let _ = std::fs::write(file, imp::count().to_string());
    }
}

/// Test hook: with `VMKEEP_FAULT_PAUSE=NAME:SECONDS`, stop at the point called `name` for
/// that long, after creating the file named by `VMKEEP_FAULT_PAUSE_MARK` (so a test knows
/// the process is there and can, say, destroy the VM under it). Removing the mark ends the
/// pause early, so a test can also decide when the process goes on.
pub fn pause(name: &str) {
    #[cfg(feature = "fault-injection")]
    if let Ok(v) = std::env::var("VMKEEP_FAULT_PAUSE") {
        if let Some((point, secs)) = v.split_once(':') {
            if point == name {
                let mark = std::env::var_os("VMKEEP_FAULT_PAUSE_MARK");
                if let Some(mark) = &mark {
                    let _ = std::fs::write(mark, name);
                }
                let secs: f64 = secs.parse().unwrap_or(0.0);
                let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
                while std::time::Instant::now() < end
                    && mark
                        .as_ref()
                        .is_none_or(|m| std::path::Path::new(m).exists())
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}
