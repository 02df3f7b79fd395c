//! Application-consistent backups: the guest's file systems frozen by its agent
//! (`virDomainFSFreeze`) right before the pull-mode job and its checkpoint begin, and
//! thawed right after, so that the freeze lasts as long as libvirt takes to start the job
//! (the job's point in time), not the backup.
//!
//! Before freezing, vmkeep marks the running domain (live metadata, namespace
//! `urn:vmkeep:frozen:1`: this host, this process, the time); after the thaw it removes the
//! mark. A run killed in between (SIGKILL, power loss of the backup host) leaves the mark,
//! and the next backup of the VM (from any repository) thaws the guest when the mark is
//! stale: its process is gone (same host), or it is older than [`STALE_AFTER`] (no run is
//! frozen that long). A mark of a run that is still in its freeze window is left alone.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::archive::profile::Consistency;
use crate::error::{Error, Result};
use crate::libvirt::{AroundBegin, Domain};
use crate::progress::Progress;

/// How long the guest agent may take to answer a freeze or thaw, in seconds.
pub const AGENT_TIMEOUT: i32 = 10;
/// A frozen mark older than this (seconds) is stale whoever left it.
pub const STALE_AFTER: u64 = 120;

/// Whether to freeze the guest (`--quiesce`, config `quiesce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quiesce {
    /// Freeze, or fail the backup when the guest agent does not answer.
    Require,
    /// Freeze when the agent answers; otherwise a crash-consistent backup, said in one line.
    #[default]
    Auto,
    /// Never freeze.
    Off,
}

impl std::str::FromStr for Quiesce {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "require" => Ok(Quiesce::Require),
            "auto" => Ok(Quiesce::Auto),
            "off" => Ok(Quiesce::Off),
            _ => Err(Error::usage(format!(
                "unknown quiesce {s:?} (require, auto or off)"
            ))),
        }
    }
}

/// The freeze around one job's beginning ([`AroundBegin`]); afterwards, what it achieved.
pub struct Freezer<'a> {
    dom: &'a Domain,
    mode: Quiesce,
    progress: &'a dyn Progress,
    /// Frozen now (between `before` and `after`).
    frozen: RefCell<bool>,
    /// What the last beginning got: frozen, or crash-consistent and why.
    outcome: RefCell<Option<std::result::Result<u32, String>>>,
}

impl<'a> Freezer<'a> {
    /// A freezer of `dom`'s guest in `mode` (the domain runs its guest: not paused).
    pub fn new(dom: &'a Domain, mode: Quiesce, progress: &'a dyn Progress) -> Self {
        Freezer {
            dom,
            mode,
            progress,
            frozen: RefCell::new(false),
            outcome: RefCell::new(None),
        }
    }

    /// How consistent the job's point in time is, and, when it is not frozen although a
    /// freeze was tried, why.
    pub fn consistency(&self) -> (Consistency, Option<String>) {
        match &*self.outcome.borrow() {
            Some(Ok(_)) => (Consistency::Frozen, None),
            Some(Err(why)) => (Consistency::Crash, Some(why.clone())),
            None => (Consistency::Crash, None),
        }
    }
}

impl AroundBegin for Freezer<'_> {
    fn before(&self) -> Result<()> {
        if self.mode == Quiesce::Off {
            *self.outcome.borrow_mut() = None;
            return Ok(());
        }
        let tried = self.dom.set_frozen_marker(Some(&mark())).and_then(|()| {
            match self.dom.fs_freeze(AGENT_TIMEOUT) {
                Ok(n) => Ok(n),
                Err(e) => {
                    let _ = self.dom.set_frozen_marker(None);
                    Err(e)
                }
            }
        });
        match tried {
            Ok(n) => {
                *self.frozen.borrow_mut() = true;
                *self.outcome.borrow_mut() = Some(Ok(n));
                crate::fault::pause("while-frozen");
                Ok(())
            }
            Err(e) if self.mode == Quiesce::Require => Err(Error::source(
                format!("libvirt VM {}", self.dom.name()),
                format!("--quiesce require: {}", e.detail()),
            )),
            Err(e) => {
                *self.outcome.borrow_mut() = Some(Err(e.detail()));
                Ok(())
            }
        }
    }

    fn after(&self) {
        if !self.frozen.replace(false) {
            return;
        }
        match thaw(self.dom) {
            Ok(_) => {
                let _ = self.dom.set_frozen_marker(None);
            }
            Err(e) => self.progress.warn(&format!(
                "VM {}: {e}; the next backup of the VM thaws it (or `virsh domfsthaw {}`)",
                self.dom.name(),
                self.dom.name()
            )),
        }
    }
}

/// Thaw, trying three times.
fn thaw(dom: &Domain) -> Result<u32> {
    let mut last = None;
    for _ in 0..3 {
        match dom.fs_thaw(AGENT_TIMEOUT) {
            Ok(n) => return Ok(n),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Err(last.expect("tried"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The mark of this run: `<frozen host=… pid=… since=…/>`.
fn mark() -> String {
    format!(
        "<frozen host='{}' pid='{}' since='{}'/>",
        crate::libvirt::xml::escape(&crate::libvirt::this_host()),
        std::process::id(),
        now()
    )
}

/// Whether a mark is stale: its run's process is gone, or it is too old to be any run's.
fn stale(mark: &str) -> bool {
    let attr = |name: &str| -> Option<String> {
        let doc = roxmltree::Document::parse(mark).ok()?;
        doc.root_element().attribute(name).map(str::to_string)
    };
    let since: u64 = attr("since").and_then(|s| s.parse().ok()).unwrap_or(0);
    if now().saturating_sub(since) > STALE_AFTER {
        return true;
    }
    let same_host = attr("host").is_some_and(|h| h == crate::libvirt::this_host());
    let pid: Option<u32> = attr("pid").and_then(|p| p.parse().ok());
    same_host && pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
}

/// Thaw a guest a killed vmkeep run left frozen (its mark is stale), and say so.
pub fn thaw_leftover(dom: &Domain, progress: &dyn Progress) {
    let Ok(Some(m)) = dom.frozen_marker() else {
        return;
    };
    if !stale(&m) {
        return;
    }
    match thaw(dom) {
        Ok(n) => {
            let _ = dom.set_frozen_marker(None);
            progress.warn(&format!(
                "VM {}: thawed {n} file system(s) of the guest, left frozen by a vmkeep run that ended before it thawed them",
                dom.name()
            ));
        }
        Err(e) => progress.warn(&format!(
            "VM {}: the guest may still be frozen by a vmkeep run that was killed: {e}",
            dom.name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_stale_when_old_or_their_process_is_gone() {
        assert!(!stale(&mark()), "this run's own mark");
        let old = format!(
            "<frozen host='x' pid='1' since='{}'/>",
            now() - STALE_AFTER - 5
        );
        assert!(stale(&old));
        let other_host = format!("<frozen host='elsewhere' pid='999999' since='{}'/>", now());
        assert!(!stale(&other_host), "a fresh mark of another host's run");
        let dead = format!(
            "<frozen host='{}' pid='999999999' since='{}'/>",
            crate::libvirt::this_host(),
            now()
        );
        assert!(stale(&dead), "this host's dead run");
        assert!(stale("<frozen/>"), "no time: stale");
        assert_eq!("require".parse::<Quiesce>().unwrap(), Quiesce::Require);
        assert!("always".parse::<Quiesce>().is_err());
    }
}
