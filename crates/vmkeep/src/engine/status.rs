//! The data behind `status`: every VM's generations, newest first, with their stats.

use serde::Serialize;

use crate::archive::profile::{parse_time, CheckRecord, GenerationMode, HostRecord};
use crate::archive::{names, GenerationId, Repository};
use crate::error::Result;

/// One disk of a generation as `status` shows it (from the disk's record in
/// `generation.toml`). Serialized as one entry of a generation's `disks` in `status --json`.
#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    /// Disk name.
    pub name: String,
    /// Disk size in bytes at the generation.
    pub size: u64,
    /// The mode this disk was backed up in (a disk may fall back from incr to diff).
    pub mode: GenerationMode,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes of the blocks whose content changed.
    pub changed_bytes: u64,
    /// Bytes the repository grew by: the reverse diff written for the previous generation plus
    /// the growth of the image's allocation.
    pub stored_bytes: u64,
}

/// One generation as `status` shows it (from its `generation.toml`).
#[derive(Debug, Clone, Serialize)]
pub struct GenerationStatus {
    /// The generation id.
    pub id: GenerationId,
    /// Start of the backup (RFC 3339 UTC).
    pub time: String,
    /// The mode the run used: full, diff or incr (with several disks, the widest).
    pub mode: GenerationMode,
    /// Wall-clock time the backup took, in seconds.
    pub duration_secs: f64,
    /// Whether prune keeps it whatever the retention rules say.
    pub protected: bool,
    /// libvirt checkpoint made with this generation (this repository's branch).
    pub checkpoint: Option<String>,
    /// How consistent its disks are (libvirt VMs): frozen, crash or offline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<crate::archive::profile::Consistency>,
    /// Its disks, in the profile's order.
    pub disks: Vec<DiskStatus>,
    /// The firmware and TPM state saved with it: `nvram`, `tpm` (each once, in that order).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<crate::archive::state::StateKind>,
}

/// One VM as `status` shows it; [`vm_status`] builds it. `status --json` prints a list of
/// these (`docs/json.md`).
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// The VM's name.
    pub name: String,
    /// Block size in bytes, fixed at the VM's first backup.
    pub block_size: u32,
    /// Newest first.
    pub generations: Vec<GenerationStatus>,
    /// Bytes the VM's folder occupies on disk.
    pub space_used: u64,
    /// The outcome of the last `check` (from `vm.toml`); `None` if the VM was never checked.
    pub last_check: Option<CheckRecord>,
    /// An interrupted command awaits recovery.
    pub interrupted: bool,
    /// The libvirt host the VM was last seen on: by its last live backup (`vm.toml`) or by
    /// `update` (`allvm.toml`), whichever is newer; `None` for image VMs never listed.
    pub host: Option<HostRecord>,
}

/// Status of VM `name`.
pub fn vm_status(repo: &Repository, name: &str) -> Result<VmStatus> {
    vm_status_seen(repo, name, &Hosts::load(repo))
}

/// Where `update` last saw the VMs, read once for many [`vm_status_seen`] calls.
pub struct Hosts {
    #[cfg(feature = "libvirt")]
    inventory: Option<crate::engine::inventory::Inventory>,
}

impl Hosts {
    /// The repository's inventory (none when `update` never ran, the build has no libvirt,
    /// or `allvm.toml` cannot be read: `status` reports backups, and `check` the damage).
    pub fn load(repo: &Repository) -> Hosts {
        #[cfg(feature = "libvirt")]
        return Hosts {
            inventory: crate::engine::inventory::load(repo).ok().flatten(),
        };
        #[cfg(not(feature = "libvirt"))]
        {
            let _ = repo;
            Hosts {}
        }
    }

    /// The newer of the VM's own record and the inventory's.
    fn newest(&self, name: &str, own: Option<HostRecord>) -> Option<HostRecord> {
        #[cfg(feature = "libvirt")]
        let listed = self.inventory.as_ref().and_then(|i| i.host_of(name));
        #[cfg(not(feature = "libvirt"))]
        let listed: Option<HostRecord> = {
            let _ = name;
            None
        };
        let when = |h: &HostRecord| parse_time(&h.time);
        match (own, listed) {
            (Some(o), Some(l)) => Some(if when(&l) > when(&o) { l } else { o }),
            (o, l) => o.or(l),
        }
    }
}

/// Status of VM `name`, its host looked up in `hosts`.
pub fn vm_status_seen(repo: &Repository, name: &str, hosts: &Hosts) -> Result<VmStatus> {
    let a = repo.vm(name)?;
    let mut generations: Vec<GenerationStatus> = a
        .generations()?
        .into_iter()
        .map(|g| GenerationStatus {
            id: g.id,
            time: g.profile.time,
            mode: g.profile.mode,
            duration_secs: g.profile.duration_secs,
            protected: g.profile.protected,
            checkpoint: g.profile.checkpoint,
            consistency: g.profile.consistency,
            state: {
                use crate::archive::state::StateKind;
                [StateKind::Nvram, StateKind::Tpm]
                    .into_iter()
                    .filter(|k| g.profile.state.iter().any(|r| r.kind == *k))
                    .collect()
            },
            disks: g
                .profile
                .disks
                .into_iter()
                .map(|d| DiskStatus {
                    name: d.name,
                    size: d.size,
                    mode: d.mode,
                    read_bytes: d.read_bytes,
                    changed_bytes: d.changed_bytes,
                    stored_bytes: d.stored_bytes,
                })
                .collect(),
        })
        .collect();
    generations.reverse();
    Ok(VmStatus {
        name: name.to_string(),
        block_size: a.profile.block_size,
        generations,
        space_used: du(&a.dir),
        last_check: a.profile.last_check.clone(),
        interrupted: names::txn_file(&a.dir).exists(),
        host: hosts.newest(name, a.profile.host.clone()),
    })
}

/// Bytes allocated below `path` (hard links counted once).
pub fn du(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
    }
    total
}

/// How a VM's backups stand, in the Nagios/Icinga convention (`status --check-health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum HealthLevel {
    /// Backed up within 1.5 intervals, last check clean.
    Ok,
    /// Older than 1.5 intervals, or an interrupted command awaits recovery.
    Warning,
    /// Older than 3 intervals, no generation at all, or the last check found damage.
    Critical,
}

impl HealthLevel {
    /// The plugin word (`OK`, `WARNING`, `CRITICAL`).
    pub fn word(self) -> &'static str {
        match self {
            HealthLevel::Ok => "OK",
            HealthLevel::Warning => "WARNING",
            HealthLevel::Critical => "CRITICAL",
        }
    }

    /// The plugin exit status: 0, 1 or 2.
    pub fn exit_code(self) -> i32 {
        self as i32
    }
}

/// The health of `vm` whose backups are due every `interval_secs`: WARNING past 1.5
/// intervals, CRITICAL past 3 or with no generation; a last check that found damage is
/// CRITICAL, an interrupted command awaiting recovery at least a WARNING. With the reason,
/// in one line.
pub fn health(vm: &VmStatus, interval_secs: u64) -> (HealthLevel, String) {
    let interval = interval_secs as i64;
    let age = vm
        .generations
        .first()
        .and_then(|g| crate::archive::profile::parse_time(&g.time))
        .map(|t| (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0));
    let (level, why) = match age {
        None => (HealthLevel::Critical, "no generation".to_string()),
        Some(age) => {
            let level = if age > 3 * interval {
                HealthLevel::Critical
            } else if age * 2 > 3 * interval {
                HealthLevel::Warning
            } else {
                HealthLevel::Ok
            };
            (level, format!("newest generation is {}h old", age / 3600))
        }
    };
    match &vm.last_check {
        Some(c) if !c.ok => (
            HealthLevel::Critical,
            format!("{why}; last check found {} problems", c.problems),
        ),
        _ if vm.interrupted => (
            level.max(HealthLevel::Warning),
            format!("{why}; an interrupted command awaits recovery"),
        ),
        _ => (level, why),
    }
}
