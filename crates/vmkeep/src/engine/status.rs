//! The data behind `status`: every VM's generations, newest first, with their stats.

use serde::Serialize;

use crate::archive::profile::{CheckRecord, GenerationMode};
use crate::archive::{names, GenerationId, Repository};
use crate::error::Result;

#[derive(Debug, Clone, Serialize)]
pub struct DiskStatus {
    pub name: String,
    pub size: u64,
    pub mode: GenerationMode,
    pub read_bytes: u64,
    pub changed_bytes: u64,
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationStatus {
    pub id: GenerationId,
    pub time: String,
    pub mode: GenerationMode,
    pub duration_secs: f64,
    pub protected: bool,
    /// libvirt checkpoint made with this generation (this repository's branch).
    pub checkpoint: Option<String>,
    pub disks: Vec<DiskStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub block_size: u32,
    /// Newest first.
    pub generations: Vec<GenerationStatus>,
    /// Bytes the VM's folder occupies on disk.
    pub space_used: u64,
    pub last_check: Option<CheckRecord>,
    /// An interrupted command awaits recovery.
    pub interrupted: bool,
}

/// Status of VM `name`.
pub fn vm_status(repo: &Repository, name: &str) -> Result<VmStatus> {
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
