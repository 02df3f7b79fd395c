//! Shut-off domains backed up like running ones: vmkeep starts the VM with its CPUs
//! paused (no guest code runs, as in Proxmox's stop-mode backup), backs it up with a
//! pull-mode job and a checkpoint, and shuts it off again; so shut-off VMs get
//! incrementals too, locally and on remote hosts.
//!
//! # Whose VM is it?
//! vmkeep stops only a VM it provably started itself. When it starts one, it writes a mark
//! ([`xml::StartedMark`]: repository id, random token of the run) into the *running* VM's
//! metadata (`VIR_DOMAIN_AFFECT_LIVE`), which ends with the QEMU process: a mark can never
//! outlive the instance it describes, nor reach the persistent definition. At the end the
//! VM is shut off only if it still carries this run's token and is still paused:
//! - someone resumed it (`virsh resume`) meanwhile: it is theirs now and keeps running
//!   (the mark is removed, so that no later run mistakes it for one of vmkeep's);
//! - someone started it first (libvirt serialises starts; vmkeep's start then finds it
//!   active): vmkeep backs up the running VM and never stops it;
//! - another repository's backup job runs on it: vmkeep waits for that job to end (up to
//!   the job wait) before it stops the VM.
//!
//! A run killed while its VM is paused leaves the mark behind. The next run of the same
//! repository holds the VM's lock, so the run that left it is dead: it adopts the paused
//! VM, backs it up and shuts it off. A mark of another repository is left to that
//! repository.
//!
//! # Never started
//! - a VM with a managed-save image (`virsh managedsave`): starting it would resume the
//!   saved memory, and stopping it again would throw that memory away;
//! - a VM whose configuration says `offline_read = "files"` (or `--offline-read files`);
//! - when the start fails (a device missing, not enough memory): on a local host vmkeep
//!   then reads the files, as `--offline-read files` does, with a warning; on a remote host
//!   the run fails.
//!
//! The window between the last check (still paused, still marked) and the stop is a few
//! milliseconds; a `virsh resume` landing exactly there is stopped with the VM. The guest
//! has run for at most those milliseconds, with nothing of it committed anywhere.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::libvirt::xml::{self, StartedMark};
use crate::libvirt::{Domain, DomainState, Hypervisor, Started};
use crate::progress::Progress;

/// How a shut-off domain is backed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OfflineRead {
    /// Start it paused and back it up with a pull-mode job and a checkpoint (incrementals).
    #[default]
    Start,
    /// Read its disk files directly, under QEMU's image locks (local hosts only; every run
    /// after the first is a diff, as libvirt cannot make checkpoints of inactive domains).
    Files,
}

/// A VM this run started paused (or adopted from a dead run of this repository); shut off
/// again by [`PausedForBackup::finish`].
pub(crate) struct PausedForBackup {
    mark: StartedMark,
}

/// What [`PausedForBackup::prepare`] decided.
pub(crate) enum Prepared {
    /// Back up the VM as it is (running, paused by someone, or shut off and read as files).
    AsIs,
    /// vmkeep holds the VM paused; it is active now.
    Paused(PausedForBackup),
}

impl PausedForBackup {
    /// Decide how to back up `dom` (state `state`), starting it paused when it is shut off
    /// and `how` says so. The caller holds this repository's lock of the VM.
    pub(crate) fn prepare(
        hv: &Hypervisor,
        dom: &Domain,
        state: DomainState,
        repo_id: &str,
        how: OfflineRead,
        progress: &dyn Progress,
    ) -> Result<Prepared> {
        let name = dom.name();
        if state.is_active() {
            let Some(mark) = dom.live_marker()?.and_then(|x| xml::parse_started_mark(&x)) else {
                return Ok(Prepared::AsIs);
            };
            if state != DomainState::Paused {
                // Resumed by someone after a vmkeep run started it: theirs now.
                let _ = dom.set_live_marker(None);
                return Ok(Prepared::AsIs);
            }
            if mark.repository != repo_id {
                return Ok(Prepared::AsIs);
            }
            progress.warn(&format!(
                "VM {name}: left paused by an interrupted run of this repository; backing it up and shutting it off again"
            ));
            return Ok(Prepared::Paused(PausedForBackup { mark }));
        }
        if how == OfflineRead::Files {
            return Ok(Prepared::AsIs);
        }
        let refuse = |why: String| -> Result<Prepared> {
            if hv.is_local() {
                progress.warn(&format!("VM {name}: {why}; reading its disk files instead"));
                Ok(Prepared::AsIs)
            } else {
                Err(Error::source(
                    format!("libvirt VM {name}"),
                    format!("{why}, and the files of a remote host cannot be read"),
                ))
            }
        };
        if dom.has_managed_save()? {
            return refuse(
                "it has a saved memory state (managedsave), which starting it would resume and stopping it would lose: not starting it".into(),
            );
        }
        let started = match dom.start_paused() {
            Ok(s) => s,
            Err(e) => return refuse(format!("cannot start it paused for the backup ({e})")),
        };
        if started == Started::AlreadyActive {
            progress.warn(&format!(
                "VM {name}: was started by someone else meanwhile; backing it up running"
            ));
            return Ok(Prepared::AsIs);
        }
        let mark = StartedMark {
            repository: repo_id.to_string(),
            token: uuid::Uuid::new_v4().simple().to_string(),
        };
        if let Err(e) = dom.set_live_marker(Some(&xml::started_mark_xml(&mark))) {
            // Unmarked, a later run could not tell it from a VM someone paused: stop it now.
            let _ = dom.destroy_graceful();
            return Err(e);
        }
        tracing::info!("VM {name}: started paused for the backup");
        Ok(Prepared::Paused(PausedForBackup { mark }))
    }

    /// Shut the VM off again if it is still this run's: marked with this run's token and
    /// still paused. Waits for another repository's backup job on it (up to `job_wait`;
    /// `ours`: whether a job is this run's, which stopping the VM ends). Never fails: what
    /// it could not do is one warning line.
    pub(crate) fn finish(
        self,
        dom: &Domain,
        job_wait: Duration,
        ours: &dyn Fn(&crate::libvirt::xml::BackupJobXml) -> bool,
        progress: &dyn Progress,
    ) {
        let name = dom.name();
        let deadline = Instant::now() + job_wait;
        let mut said = false;
        loop {
            let mine = matches!(
                dom.live_marker(),
                Ok(Some(x)) if xml::parse_started_mark(&x).as_ref() == Some(&self.mark)
            );
            if !mine {
                return;
            }
            match dom.state() {
                Ok(DomainState::Paused) => {}
                Ok(s) if !s.is_active() => return,
                Ok(s) => {
                    progress.warn(&format!(
                        "VM {name}: resumed by someone while vmkeep backed it up ({s}); it keeps running"
                    ));
                    let _ = dom.set_live_marker(None);
                    return;
                }
                Err(e) => {
                    progress.warn(&format!(
                        "VM {name}: cannot read its state to shut it off again ({e}); the next run of this repository will"
                    ));
                    return;
                }
            }
            match dom.backup_job() {
                Ok(Some(job)) if !ours(&job) => {
                    if Instant::now() >= deadline {
                        progress.warn(&format!(
                            "VM {name}: another backup job still runs after {} s; left paused for the next run of this repository to shut off",
                            job_wait.as_secs()
                        ));
                        return;
                    }
                    if !said {
                        progress.warn(&format!(
                            "VM {name}: another backup job runs; shutting the VM off when it ends"
                        ));
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                _ => {}
            }
            if let Err(e) = dom.destroy_graceful() {
                progress.warn(&format!(
                    "VM {name}: cannot shut it off again ({e}); the next run of this repository will"
                ));
            } else {
                tracing::info!("VM {name}: shut off again after the backup");
            }
            return;
        }
    }
}
