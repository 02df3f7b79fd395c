//! The transaction record (`REPO/VM/txn.toml`) and crash recovery.
//!
//! A backup writes the record (state `running`) before it changes anything, journals the
//! old content of every image block into the previous generation's `DISK.rdiff.partial`
//! before overwriting it, and switches the record to `commit` once every new file is
//! durable. Recovery, run under the VM lock by the next command that touches the VM:
//! - `running`: the run is rolled back: each partial reverse diff is applied to the image
//!   (restoring the old bytes and size) and deleted, and the new generation folder removed;
//! - `commit`: the run is rolled forward: the remaining renames and removals are finished.
//!
//! Every step of both is idempotent, so a crash during recovery is recovered in turn.
//! The full order of writes and fsyncs is in `docs/FORMAT.md`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::names::{self, DELETING, JOURNAL_SUFFIX, LATEST, MERGE_SUFFIX, PARTIAL};
use super::profile::{self, GenerationProfile, Versioned, PROFILE_VERSION};
use super::{is_generation_name, rdiff};
use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// What a transaction changes. The record keeps whatever its file says: a value no run of
/// vmkeep writes is `Unknown`, and recovery refuses it as damage (nothing is touched).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TxnOp {
    /// A backup making a new generation.
    Backup,
    /// A prune dropping a generation into its older neighbour.
    Prune,
    /// Any other text: no run of vmkeep wrote it.
    Unknown(String),
}

/// How far a transaction got: whether recovery rolls it back or forward. As with
/// [`TxnOp`], a value no run of vmkeep writes is kept as `Unknown` and refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TxnState {
    /// Files are being written: recovery rolls the run back.
    Running,
    /// Every new file is durable: recovery rolls the run forward.
    Commit,
    /// Any other text: no run of vmkeep wrote it.
    Unknown(String),
}

/// The text of a record field that keeps unknown values: `as_str`, from and into `String`
/// (its serde form) and `Display`, for the names vmkeep writes and `Unknown`.
macro_rules! record_text {
    ($ty:ident { $($variant:ident = $text:literal),* }) => {
        impl $ty {
            /// The name written in `txn.toml`.
            pub fn as_str(&self) -> &str {
                match self {
                    $($ty::$variant => $text,)*
                    $ty::Unknown(s) => s,
                }
            }
        }

        impl From<&str> for $ty {
            fn from(s: &str) -> $ty {
                match s {
                    $($text => $ty::$variant,)*
                    _ => $ty::Unknown(s.to_string()),
                }
            }
        }

        impl From<String> for $ty {
            fn from(s: String) -> $ty {
                $ty::from(s.as_str())
            }
        }

        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.as_str().to_string()
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

record_text!(TxnOp {
    Backup = "backup",
    Prune = "prune"
});
record_text!(TxnState {
    Running = "running",
    Commit = "commit"
});

/// `REPO/VM/txn.toml`: the record of a backup or prune in flight, present only while one
/// runs (or was interrupted). Its fields are those `docs/FORMAT.md` lists under
/// `txn.toml`; [`recover`] acts on it only after [`Txn::validate`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Txn {
    /// Profile format version (`format`, 1).
    pub format: u32,
    /// "backup" or "prune".
    pub op: TxnOp,
    /// "running" (roll back) or "commit" (roll forward).
    pub state: TxnState,
    /// Process id of the command that wrote the record (`pid`), for messages only.
    pub pid: u32,
    /// When the command began (`started`, RFC 3339 UTC).
    pub started: String,
    /// backup: the generation that was newest when the run began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    /// backup: the generation being made; prune: the generation being dropped.
    pub new: String,
    /// prune: the generation that receives the dropped one's reverse diffs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older: Option<String>,
    /// Disks of the new generation (backup) or the merged disks (prune).
    #[serde(default)]
    pub disks: Vec<String>,
    /// prune: the file hash (footer) of each merged reverse diff, in the order of `disks`,
    /// so that recovery knows the merged file whether it is still `D.rdiff.merge` or
    /// already renamed to `D.rdiff`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

impl Versioned for Txn {
    fn version(&self) -> u32 {
        self.format
    }
}

impl Txn {
    /// The record a backup writes before it changes anything (step 2 of the protocol):
    /// state `running`, this process's pid, the current time; `old` is the newest generation
    /// when the run began (`None` for a VM's first backup), `new` the one being made, `disks`
    /// the new generation's disks.
    pub fn backup(old: Option<String>, new: String, disks: Vec<String>) -> Txn {
        Txn {
            format: PROFILE_VERSION,
            op: TxnOp::Backup,
            state: TxnState::Running,
            pid: std::process::id(),
            started: profile::now_rfc3339(),
            old,
            new,
            older: None,
            disks,
            merged: Vec::new(),
        }
    }

    /// The record of a prune dropping the middle generation `dropped` into `older`, written
    /// once every merged reverse diff is durable: state `commit` from the start (a prune is
    /// only ever rolled forward). The caller fills in [`merged`](Self::merged).
    pub fn prune(older: String, dropped: String, disks: Vec<String>) -> Txn {
        Txn {
            format: PROFILE_VERSION,
            op: TxnOp::Prune,
            state: TxnState::Commit,
            pid: std::process::id(),
            started: profile::now_rfc3339(),
            old: None,
            new: dropped,
            older: Some(older),
            disks,
            merged: Vec::new(),
        }
    }

    /// Write the record to `vm_dir/txn.toml` atomically (`txn.toml.tmp`, fsync, rename, fsync
    /// `vm_dir`).
    pub fn store(&self, vm_dir: &Path) -> Result<()> {
        profile::store(&names::txn_file(vm_dir), "vmkeep transaction", self)
    }

    /// Remove `vm_dir/txn.toml` and fsync `vm_dir`: the last step of a transaction.
    pub fn clear(vm_dir: &Path) -> Result<()> {
        fsutil::remove_file(&names::txn_file(vm_dir))?;
        fsutil::sync_dir(vm_dir)
    }

    /// Refuse a record that no run of vmkeep could have written. Recovery renames, links
    /// and deletes what the record names, so every name must be a generation or a disk of
    /// this VM folder, and every generation the state relies on must be there.
    pub fn validate(&self, vm_dir: &Path) -> Result<()> {
        let path = names::txn_file(vm_dir);
        let bad = |why: String| Err(Error::corrupt(&path, why));
        let ids = [self.old.as_ref(), self.older.as_ref(), Some(&self.new)];
        if let Some(id) = ids.into_iter().flatten().find(|id| !is_generation_name(id)) {
            return bad(format!("{id:?} is not a generation id"));
        }
        for d in &self.disks {
            names::check_disk(d).map_err(|e| Error::corrupt(&path, e))?;
        }
        // Every folder recovery may rename, write into or delete is the VM folder's own:
        // a symbolic link in the place of one is refused, never followed.
        for id in ids.into_iter().flatten() {
            fsutil::refuse_symlink(&gen_dir(vm_dir, id))?;
            fsutil::refuse_symlink(&names::partial_dir(vm_dir, id))?;
        }
        let exists = |id: &str| is_real_dir(&gen_dir(vm_dir, id));
        let (base, needed) = match self.op {
            TxnOp::Backup if self.older.is_none() => (self.old.as_ref(), self.old.as_ref()),
            TxnOp::Prune if self.old.is_none() => match &self.older {
                Some(older) => (Some(older), Some(older)),
                None => return bad("prune without older".into()),
            },
            TxnOp::Backup | TxnOp::Prune => return bad(format!("{} with a stray field", self.op)),
            TxnOp::Unknown(_) => return Ok(()), // an unknown kind is refused by `recover`
        };
        if let Some(b) = base.filter(|b| **b >= self.new) {
            return bad(format!("generation {} does not follow {b}", self.new));
        }
        if let Some(id) = needed.filter(|id| !exists(id)) {
            return bad(format!("generation {id} does not exist"));
        }
        let made = exists(&self.new) || is_real_dir(&names::partial_dir(vm_dir, &self.new));
        if self.op == TxnOp::Backup && self.state == TxnState::Commit && !made {
            return bad(format!("generation {} does not exist", self.new));
        }
        Ok(())
    }
}

/// Finish or undo whatever an interrupted command left in `vm_dir`; returns one line per
/// thing done. The caller holds the VM lock.
pub fn recover(vm_dir: &Path) -> Result<Vec<String>> {
    fsutil::refuse_symlink(vm_dir)?;
    let mut done = Vec::new();
    let txn_path = names::txn_file(vm_dir);
    if txn_path.exists() {
        let txn: Txn = profile::load(&txn_path)?;
        txn.validate(vm_dir)?;
        match (&txn.op, &txn.state) {
            (TxnOp::Backup, TxnState::Running) => {
                rollback_backup(vm_dir, &txn)?;
                done.push(format!(
                    "rolled back the interrupted backup {} (pid {}, started {})",
                    txn.new, txn.pid, txn.started
                ));
            }
            (TxnOp::Backup, TxnState::Commit) => {
                roll_forward_backup(vm_dir, &txn)?;
                done.push(format!(
                    "completed the interrupted commit of backup {}",
                    txn.new
                ));
            }
            (TxnOp::Prune, TxnState::Commit) => {
                roll_forward_prune(vm_dir, &txn)?;
                done.push(format!(
                    "completed the interrupted prune of generation {}",
                    txn.new
                ));
            }
            _ => {
                return Err(Error::corrupt(
                    &txn_path,
                    format!("unknown transaction {} {}", txn.op, txn.state),
                ))
            }
        }
        Txn::clear(vm_dir)?;
    }
    done.extend(cleanup_strays(vm_dir)?);
    Ok(done)
}

/// Is `path` a folder itself (not a symbolic link to one)?
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

fn gen_dir(vm_dir: &Path, id: &str) -> PathBuf {
    vm_dir.join(id)
}

/// Files in `dir` whose names end in `suffix`, as (stem, path).
fn files_with_suffix(dir: &Path, suffix: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in rd {
        let entry = entry.at(dir)?;
        if let Ok(name) = entry.file_name().into_string() {
            if let Some(stem) = name.strip_suffix(suffix) {
                out.push((stem.to_string(), entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Put back into `DISK.raw` of the generation folder `dir` the old blocks journaled in its
/// `DISK.rdiff.partial`. The journal must describe the disk as the generation's profile
/// does: one claiming another size or block size would resize the image or write blocks at
/// the wrong places, so it is refused as corrupt and left alone.
///
/// Undoing must not need free space the failed run did not take (a full disk is a common
/// reason for the failure): the image gets its old size back first (a grown tail is
/// freed), every hole is punched back next (freeing what the run wrote there), and only
/// then are the old data blocks written back, from the journal's end towards its start,
/// a chunk at a time: each chunk is made durable in the image, and then cut off the
/// journal, so the journal shrinks as the image fills in again. A crash at any point
/// leaves a shorter journal whose records still hold every block not yet made durable.
pub fn apply_undo(dir: &Path, disk: &str) -> Result<usize> {
    let image = names::image_file(dir, disk);
    let journal = names::journal_file(dir, disk);
    let Some(mut scan) = rdiff::PartialScan::open(&journal)? else {
        return Ok(0);
    };
    if !image.exists() {
        return Ok(0);
    }
    let h = scan.header.clone();
    let gp: GenerationProfile = profile::load(&names::generation_profile(dir))?;
    if gp.disk(disk).map(|d| d.size) != Some(h.disk_size) || gp.block_size != h.block_size {
        return Err(Error::corrupt(
            &journal,
            "header does not match the generation profile",
        ));
    }
    let file = fsutil::open_rw(&image)?;
    fsutil::set_len(&file, h.disk_size, &image)?;
    // First pass: the holes, and where each data record starts (16 bytes a record).
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut applied = 0;
    loop {
        let off = scan.offset();
        let Some(rec) = scan.next_record()? else {
            break;
        };
        if rec.is_zero() {
            let at = rec.block * h.block_size as u64;
            fsutil::punch_hole(&file, at, rec.raw_len as u64, &image)?;
        } else {
            data.push((off, rec.block));
        }
        applied += 1;
    }
    fsutil::sync_all(&file, &image)?;
    // Second pass: the data, last records first, the journal cut after each chunk.
    const CHUNK: usize = 64;
    let jf = fsutil::open_rw(&journal)?;
    while !data.is_empty() {
        let from = data.len().saturating_sub(CHUNK);
        for &(off, block) in &data[from..] {
            let rec = scan.record_at(off)?.ok_or_else(|| {
                Error::corrupt(&journal, format!("record of block {block} changed"))
            })?;
            let at = rec.block * h.block_size as u64;
            fsutil::write_at(&file, &rec.data(&journal)?, at, &image)?;
        }
        fsutil::sync_all(&file, &image)?;
        fsutil::set_len(&jf, data[from].0, &journal)?;
        fsutil::sync_all(&jf, &journal)?;
        data.truncate(from);
    }
    Ok(applied)
}

fn rollback_backup(vm_dir: &Path, txn: &Txn) -> Result<()> {
    // The new generation's files first: they hold space the journal may need back.
    fsutil::remove_dir_all(&names::partial_dir(vm_dir, &txn.new))?;
    if let Some(old) = &txn.old {
        let old_dir = gen_dir(vm_dir, old);
        for (disk, journal) in files_with_suffix(&old_dir, JOURNAL_SUFFIX)? {
            apply_undo(&old_dir, &disk)?;
            fsutil::remove_file(&journal)?;
        }
        fsutil::sync_dir(&old_dir)?;
    }
    fsutil::sync_dir(vm_dir)
}

/// The commit steps of a backup; also the normal path right after the record says commit.
pub fn roll_forward_backup(vm_dir: &Path, txn: &Txn) -> Result<()> {
    let partial = names::partial_dir(vm_dir, &txn.new);
    let new_dir = if partial.exists() {
        partial.clone()
    } else {
        gen_dir(vm_dir, &txn.new)
    };
    if let Some(old) = &txn.old {
        let old_dir = gen_dir(vm_dir, old);
        // The old images are removed below: every disk of the old generation must have
        // its reverse diff (the journal, or the file it was renamed to) first.
        let gp: GenerationProfile = profile::load(&names::generation_profile(&old_dir))?;
        for d in &gp.disks {
            let journal = names::journal_file(&old_dir, &d.name);
            if !journal.exists() && !names::rdiff_file(&old_dir, &d.name).exists() {
                return Err(Error::corrupt(
                    &journal,
                    format!(
                        "the reverse diff of disk {} is missing; the commit was not completed",
                        d.name
                    ),
                ));
            }
        }
        for (disk, journal) in files_with_suffix(&old_dir, JOURNAL_SUFFIX)? {
            fsutil::rename(&journal, &names::rdiff_file(&old_dir, &disk))?;
        }
        for disk in &txn.disks {
            let (from, to) = (
                names::image_file(&old_dir, disk),
                names::image_file(&new_dir, disk),
            );
            if from.exists() && !to.exists() {
                fsutil::hard_link(&from, &to)?;
            }
        }
        fsutil::sync_dir(&old_dir)?;
        fsutil::sync_dir(&new_dir)?;
    }
    if partial.exists() {
        fsutil::rename(&partial, &gen_dir(vm_dir, &txn.new))?;
        fsutil::sync_dir(vm_dir)?;
    }
    fsutil::atomic_symlink(Path::new(&txn.new), &vm_dir.join(LATEST))?;
    if let Some(old) = &txn.old {
        let old_dir = gen_dir(vm_dir, old);
        for suffix in [names::IMAGE_SUFFIX, names::DIGEST_SUFFIX] {
            for (_, path) in files_with_suffix(&old_dir, suffix)? {
                fsutil::remove_file(&path)?;
            }
        }
        fsutil::sync_dir(&old_dir)?;
    }
    Ok(())
}

/// The commit steps of dropping a middle generation.
///
/// Deleting the dropped generation is safe only once every disk's merged reverse diff is
/// in place: each is found first, as `D.rdiff.merge` or (renamed by an earlier attempt)
/// `D.rdiff`, by the file hash the record holds. If one is missing or another file, the
/// record is damage: nothing is renamed or deleted.
pub fn roll_forward_prune(vm_dir: &Path, txn: &Txn) -> Result<()> {
    let older = txn
        .older
        .as_deref()
        .ok_or_else(|| Error::corrupt(names::txn_file(vm_dir), "prune without older"))?;
    let older_dir = gen_dir(vm_dir, older);
    let mut renames = Vec::new();
    for (j, disk) in txn.disks.iter().enumerate() {
        let merge = names::merge_file(&older_dir, disk);
        let done = names::rdiff_file(&older_dir, disk);
        let want = txn.merged.get(j);
        let hash_is = |p: &Path| -> Result<bool> {
            Ok(want.is_some_and(|w| rdiff::file_hash(p).is_ok_and(|h| &h == w)))
        };
        let renamed_before = !merge.exists() && hash_is(&done)?;
        if merge.exists() && (want.is_none() || hash_is(&merge)?) {
            renames.push((merge, done));
        } else if !renamed_before {
            return Err(Error::corrupt(
                &merge,
                format!(
                    "the merged reverse diff of disk {disk} is missing or not the one prune wrote; nothing was deleted"
                ),
            ));
        }
    }
    for (from, to) in renames {
        fsutil::rename(&from, &to)?;
    }
    fsutil::sync_dir(&older_dir)?;
    delete_generation(vm_dir, &txn.new)
}

/// Delete a generation folder atomically: rename it aside, then remove it.
pub fn delete_generation(vm_dir: &Path, id: &str) -> Result<()> {
    let dir = gen_dir(vm_dir, id);
    let aside = names::deleting_dir(vm_dir, id);
    fsutil::refuse_symlink(vm_dir)?;
    fsutil::refuse_symlink(&dir)?;
    if is_real_dir(&dir) {
        fsutil::rename(&dir, &aside)?;
        fsutil::sync_dir(vm_dir)?;
    }
    fsutil::remove_dir_all(&aside)?;
    fsutil::sync_dir(vm_dir)
}

/// Remove what an interrupted command left that no transaction covers.
fn cleanup_strays(vm_dir: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    fsutil::refuse_symlink(vm_dir)?;
    let rd = std::fs::read_dir(vm_dir).at(vm_dir)?;
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        // Looked at with `lstat`: a stray that is a symbolic link is removed as a link,
        // and nothing is ever removed or written through one.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let is_link = meta.file_type().is_symlink();
        if name.ends_with(PARTIAL) || name.ends_with(DELETING) {
            if is_link {
                fsutil::remove_file(&path)?;
                done.push(format!("removed the leftover symbolic link {name}"));
            } else {
                fsutil::remove_dir_all(&path)?;
                done.push(format!("removed the leftover folder {name}"));
            }
        } else if name.ends_with(".tmp") {
            fsutil::remove_file(&path)?;
        } else if is_generation_name(&name) && is_link {
            return Err(fsutil::symlink_refused(&path));
        } else if is_generation_name(&name) && meta.is_dir() {
            for (disk, journal) in files_with_suffix(&path, JOURNAL_SUFFIX)? {
                // Without a transaction nothing can have been overwritten yet; applying
                // the journal anyway is harmless and is the safe reading.
                apply_undo(&path, &disk)?;
                fsutil::remove_file(&journal)?;
                done.push(format!(
                    "undid the leftover journal {name}/{disk}{JOURNAL_SUFFIX}"
                ));
            }
            for suffix in [MERGE_SUFFIX, ".tmp"] {
                for (_, p) in files_with_suffix(&path, suffix)? {
                    fsutil::remove_file(&p)?;
                }
            }
        }
    }
    if !done.is_empty() {
        fsutil::sync_dir(vm_dir)?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G1: &str = "0193a000-0000-7000-8000-000000000001";
    const G2: &str = "0193a000-0000-7000-8000-000000000002";

    /// The record's bytes are those the string fields wrote (docs/FORMAT.md).
    #[test]
    fn record_text_is_unchanged() {
        let mut t = Txn::backup(Some(G1.into()), G2.into(), vec!["vda".into()]);
        t.pid = 7;
        t.started = "2026-01-01T00:00:00Z".into();
        let body = format!(
            "format = 1\nop = \"backup\"\nstate = \"running\"\npid = 7\nstarted = \"2026-01-01T00:00:00Z\"\nold = \"{G1}\"\nnew = \"{G2}\"\ndisks = [\"vda\"]\n"
        );
        assert_eq!(toml::to_string_pretty(&t).unwrap(), body);
        t.state = TxnState::Commit;
        let text = toml::to_string_pretty(&t).unwrap();
        assert!(text.contains("\nstate = \"commit\"\n"), "{text}");
        let mut p = Txn::prune(G1.into(), G2.into(), vec![]);
        p.merged = vec!["m".into()];
        let text = toml::to_string_pretty(&p).unwrap();
        assert!(
            text.contains("op = \"prune\"\nstate = \"commit\"\n"),
            "{text}"
        );
        assert_eq!(toml::from_str::<Txn>(&text).unwrap(), p);
    }

    /// A value no run of vmkeep writes is kept as read, and recovery refuses it as damage
    /// with the message it always gave.
    #[test]
    fn unknown_op_or_state_is_refused_by_recovery() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(G1)).unwrap();
        for (op, state) in [("rm -rf", "running"), ("backup", "undo")] {
            let mut t = Txn::backup(Some(G1.into()), G2.into(), vec![]);
            t.op = op.into();
            t.state = state.into();
            t.store(dir.path()).unwrap();
            let back: Txn = profile::load(&names::txn_file(dir.path())).unwrap();
            assert_eq!((back.op.as_str(), back.state.as_str()), (op, state));
            let e = recover(dir.path()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "{e}");
            assert!(
                e.to_string()
                    .contains(&format!("unknown transaction {op} {state}")),
                "{e}"
            );
        }
    }
}
