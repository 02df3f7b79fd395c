//! Instant recovery finishes by itself: the `vmkeep serve` of an instant recovery
//! (`restore --as-vm --instant`) watches the new domain, pulls every block of the archive's
//! export into the domain's overlays once the domain runs (`virDomainBlockPull`, libvirt's
//! `virsh blockpull`), writes its progress for `status`, and ends the server once no disk
//! of the domain needs the export any more.
//!
//! What proves that the export is no longer needed is libvirt's own record of the disks'
//! backing chains, in both definitions: the running domain's (what QEMU has open) and the
//! persistent one (what the next start opens). libvirt drops the export from both when a
//! pull completes. A disk is ours when an NBD source of its chain is this server's: the
//! same unix socket (a fresh private path per recovery), or this server's TCP port with one
//! of its export names. A shut-off domain is waited for (the copy goes on when it runs
//! again); a domain that no longer exists needs nothing (one never seen is waited for ten
//! minutes: the restore defines it after the server listens).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, Result};
use crate::libvirt::{xml, Domain, Hypervisor};

/// The file in an instant recovery's folder that holds its progress ([`FinishState`]).
pub const STATE_FILE: &str = "progress.json";

/// How often the domain is looked at.
const POLL: Duration = Duration::from_secs(1);
/// The longest wait before a failed pull is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long the server waits for a domain it has never seen (the restore defines it after
/// the server listens; a restore killed before that leaves nothing to finish).
const FIRST_SIGHT: Duration = Duration::from_secs(600);

/// The export of this server, as a domain's backing chain names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OurExport {
    /// The unix socket it listens on.
    Unix(PathBuf),
    /// The TCP port it listens on (host names are not compared: a hypervisor may reach
    /// this host by any of its names).
    Tcp(u16),
}

/// What to finish.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The libvirt connection of the domain.
    pub uri: String,
    /// The recovered domain.
    pub domain: String,
    /// This server's export.
    pub ours: OurExport,
    /// The export names it serves (the generation's disks).
    pub exports: Vec<String>,
    /// The archived VM and generation (for `status`).
    pub vm: String,
    /// The generation id.
    pub generation: String,
    /// Where the progress is written ([`STATE_FILE`] in the recovery's folder).
    pub state: PathBuf,
}

/// Where a recovery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The domain does not run; the copy starts when it does.
    Waiting,
    /// Blocks are being pulled.
    Pulling,
    /// No disk needs the export: the copy is complete and the server has ended.
    Finished,
    /// The domain no longer exists: the server has ended.
    Gone,
}

/// One disk's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskProgress {
    /// The disk's target (vda…).
    pub target: String,
    /// Bytes pulled so far, as QEMU counts them (0 before the pull starts).
    pub done: u64,
    /// Bytes to pull in all (0 before the pull starts).
    pub total: u64,
    /// The disk no longer needs the export.
    pub pulled: bool,
}

/// The progress file of an instant recovery, as `status` reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishState {
    /// The recovered domain.
    pub domain: String,
    /// Its libvirt connection.
    pub uri: String,
    /// The archived VM.
    pub vm: String,
    /// The generation served.
    pub generation: String,
    /// The server's process id.
    pub pid: u32,
    /// The server has found the domain (a restore waits for this before it returns).
    #[serde(default)]
    pub seen: bool,
    /// Where it stands.
    pub phase: Phase,
    /// Each disk that needed the export, by target.
    pub disks: Vec<DiskProgress>,
    /// When this was written (RFC 3339).
    pub updated: String,
    /// The last problem met (a lost connection, a failed pull), if any.
    pub note: Option<String>,
}

impl FinishState {
    /// Read the progress file `path`.
    pub fn load(path: &Path) -> Result<FinishState> {
        let text = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
        serde_json::from_slice(&text)
            .map_err(|e| crate::Error::corrupt(path, format!("progress file: {e}")))
    }
}

impl OurExport {
    fn names(&self, src: &xml::NbdSourceXml, exports: &[String]) -> bool {
        match self {
            OurExport::Unix(socket) => src.socket.as_deref() == Some(socket.as_path()),
            OurExport::Tcp(port) => {
                src.tcp.as_ref().is_some_and(|(_, p)| p == port) && exports.contains(&src.export)
            }
        }
    }
}

/// The targets of the disks of definition `xml` whose backing chain holds our export.
fn needing(xml: &str, f: &Finish) -> Result<Vec<String>> {
    let mut out: Vec<String> = xml::nbd_backing_sources(xml)?
        .into_iter()
        .filter(|s| f.ours.names(s, &f.exports))
        .map(|s| s.target)
        .collect();
    out.dedup();
    Ok(out)
}

/// A failed pull is started again after a growing pause.
#[derive(Debug, Default)]
struct Pull {
    starts: u32,
    not_before: Option<Instant>,
}

/// Drive the recovery until no disk of the domain needs the export, or the domain is gone;
/// returns the last phase ([`Phase::Finished`] or [`Phase::Gone`]). Errors (a lost
/// connection, a failed pull) are written into the progress and tried again: the server
/// must keep serving while any disk needs it.
pub fn run(f: &Finish) -> Phase {
    let started = Instant::now();
    let mut hv: Option<Hypervisor> = None;
    let mut pulls: BTreeMap<String, Pull> = BTreeMap::new();
    let mut state = FinishState {
        domain: f.domain.clone(),
        uri: f.uri.clone(),
        vm: f.vm.clone(),
        generation: f.generation.clone(),
        pid: std::process::id(),
        seen: false,
        phase: Phase::Waiting,
        disks: Vec::new(),
        updated: String::new(),
        note: None,
    };
    loop {
        if hv.is_none() {
            match Hypervisor::connect(Some(&f.uri)) {
                Ok(h) => hv = Some(h),
                Err(e) => state.note = Some(e.to_string()),
            }
        }
        if let Some(h) = &hv {
            match step(h, f, &mut pulls, &mut state) {
                // Not defined yet: the restore defines it once this server listens.
                Ok(()) if state.phase == Phase::Gone && !state.seen => {
                    state.phase = Phase::Waiting;
                    if started.elapsed() > FIRST_SIGHT {
                        state.phase = Phase::Gone;
                        state.note = Some("the domain was never defined".into());
                    }
                }
                Ok(()) => state.seen = true,
                Err(e) => {
                    state.note = Some(e.to_string());
                    // Connect afresh: libvirtd may have restarted.
                    hv = None;
                }
            }
        }
        write_state(f, &mut state);
        if matches!(state.phase, Phase::Finished | Phase::Gone) {
            return state.phase;
        }
        std::thread::sleep(POLL);
    }
}

fn write_state(f: &Finish, state: &mut FinishState) {
    state.updated = crate::archive::profile::now_rfc3339();
    match serde_json::to_vec_pretty(state) {
        Ok(bytes) => {
            if let Err(e) = crate::fsutil::atomic_write(&f.state, &bytes) {
                tracing::warn!("cannot write the progress: {e}");
            }
        }
        Err(e) => tracing::warn!("cannot write the progress: {e}"),
    }
}

/// One look at the domain: start the pulls it needs, record their progress, and say
/// whether it is done.
fn step(
    hv: &Hypervisor,
    f: &Finish,
    pulls: &mut BTreeMap<String, Pull>,
    state: &mut FinishState,
) -> Result<()> {
    let dom = match hv.domain(&f.domain) {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::Usage => {
            tracing::info!(
                "domain {} no longer exists: nothing needs the export",
                f.domain
            );
            state.phase = Phase::Gone;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let active = dom.state()?.is_active();
    let mut needed = needing(&dom.xml()?, f)?;
    let live = if active {
        needing(&dom.live_xml()?, f)?
    } else {
        Vec::new()
    };
    for t in &live {
        if !needed.contains(t) {
            needed.push(t.clone());
        }
    }
    for t in &needed {
        if !state.disks.iter().any(|d| &d.target == t) {
            state.disks.push(DiskProgress {
                target: t.clone(),
                done: 0,
                total: 0,
                pulled: false,
            });
        }
    }
    for d in &mut state.disks {
        d.pulled = !needed.contains(&d.target);
        if d.pulled && d.total > 0 {
            d.done = d.total;
        }
    }
    if needed.is_empty() {
        tracing::info!(
            "every disk of {} has its data: the copy is complete",
            f.domain
        );
        state.phase = Phase::Finished;
        state.note = None;
        return Ok(());
    }
    if !active {
        state.phase = Phase::Waiting;
        return Ok(());
    }
    state.phase = Phase::Pulling;
    for t in &live {
        pull(&dom, t, pulls.entry(t.clone()).or_default(), state)?;
    }
    Ok(())
}

/// Record the progress of disk `t`'s pull, or start it (again, after a pause when it
/// failed before).
fn pull(dom: &Domain, t: &str, p: &mut Pull, state: &mut FinishState) -> Result<()> {
    let disk = state
        .disks
        .iter_mut()
        .find(|d| d.target == t)
        .expect("every needed disk is listed");
    if let Some((done, total)) = dom.block_job_progress(t)? {
        disk.done = done;
        disk.total = total;
        return Ok(());
    }
    if p.not_before.is_some_and(|at| Instant::now() < at) {
        return Ok(());
    }
    if p.starts > 0 {
        // The job ended and the disk still needs the export: it failed (a read the
        // server refused, the VM shut down). Start it again, later each time.
        let wait = Duration::from_secs(2u64.saturating_pow(p.starts.min(9))).min(MAX_BACKOFF);
        state.note = Some(format!(
            "the pull of {t} ended before it was complete ({} times); see the server's log",
            p.starts
        ));
        if p.not_before.is_none() {
            p.not_before = Some(Instant::now() + wait);
            return Ok(());
        }
    }
    tracing::info!("{}: pulling {t} from the archive", dom.name());
    dom.block_pull(t)?;
    p.starts += 1;
    p.not_before = None;
    Ok(())
}
