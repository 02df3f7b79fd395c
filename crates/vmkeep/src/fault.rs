//! Crash and ENOSPC injection for the durability tests.
//!
//! Built only with the `fault-injection` feature. `VMKEEP_FAULT=kill:N` sends SIGKILL to the
//! process at the N-th durable operation (write, truncate, rename, fsync, removal) that goes
//! through [`crate::fsutil`]; `VMKEEP_FAULT=enospc:N` makes that operation and every later
//! one fail with ENOSPC, as a file system that has just filled up does.
//! `VMKEEP_FAULT_COUNT=FILE` writes the number of operations at exit, so a test knows
//! how many points there are to try.

use std::path::Path;

use crate::error::Result;

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

    pub fn point(path: &Path) -> Result<()> {
        let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
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

/// One durable operation on `path` is about to happen.
#[cfg(feature = "fault-injection")]
pub fn point(path: &Path) -> Result<()> {
    imp::point(path)
}

/// One durable operation on `path` is about to happen.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_path: &Path) -> Result<()> {
    Ok(())
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
