//! Firmware and TPM state saved with a generation: the VM's UEFI variable store
//! (`<nvram>`) and the files of its emulated TPM's state folder (swtpm), each kept whole in
//! the generation's folder with its length and BLAKE3 digest in the profile (`[[state]]`
//! of `generation.toml`, see "Firmware and TPM state" in `docs/FORMAT.md`).
//!
//! These files are small (an OVMF variable store is 528 KiB, a TPM's state a few KiB) and
//! change rarely, so they are neither diffed nor deduplicated: every generation has its own
//! copy, and pruning a generation deletes its copy with its folder.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;

/// The most one state file may hold; a larger one is not saved (the backup fails with one
/// line) and a larger saved one is damage, never read into memory.
pub const MAX_STATE_FILE: u64 = 64 << 20;

/// The most files one TPM state folder may have (swtpm keeps one or two).
pub const MAX_TPM_FILES: usize = 64;

/// Prefix of the names of saved state files in a generation's folder
/// (`state.nvram`, `state.tpm.0`, `state.tpm.1`, …).
pub const FILE_PREFIX: &str = "state.";

/// What a saved state file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateKind {
    /// The UEFI variable store of the domain's `<nvram>` (one file).
    Nvram,
    /// One file of the domain's emulated TPM state folder.
    Tpm,
}

impl StateKind {
    /// The name in the profile.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Nvram => "nvram",
            StateKind::Tpm => "tpm",
        }
    }

    /// What a saved file of this kind is, for messages.
    pub fn label(self) -> &'static str {
        match self {
            StateKind::Nvram => "UEFI variable store",
            StateKind::Tpm => "TPM state file",
        }
    }
}

/// One saved state file (`[[state]]` of `generation.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateRecord {
    /// What it is (`kind`): `nvram` or `tpm`.
    pub kind: StateKind,
    /// Its name in the generation's folder (`file`): `state.nvram`, or `state.tpm.N`.
    pub file: String,
    /// Where it was read from (`path`): for `nvram` the host's absolute path of the
    /// variable store; for `tpm` the path inside the TPM state folder
    /// (`tpm2/tpm2-00.permall`), one to four names of letters, digits, `.`, `_` and `-`.
    pub path: String,
    /// Its length in bytes (`size`).
    pub size: u64,
    /// BLAKE3 of its content (`digest`), `blake3:<64 hex digits>`.
    pub digest: String,
    /// Its permission bits (`mode`), given back on restore.
    pub mode: u32,
}

impl StateRecord {
    /// Whether this record is well formed: a file name vmkeep writes for its kind, a
    /// relative TPM path that cannot leave the state folder, a digest of the right shape.
    /// Why not, if not.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let file_ok = match self.kind {
            StateKind::Nvram => self.file == format!("{FILE_PREFIX}nvram"),
            StateKind::Tpm => self
                .file
                .strip_prefix(&format!("{FILE_PREFIX}tpm."))
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n < MAX_TPM_FILES && self.file == format!("{FILE_PREFIX}tpm.{n}")),
        };
        if !file_ok {
            return Err(format!(
                "state file name {:?} is not one vmkeep writes for {}",
                self.file,
                self.kind.as_str()
            ));
        }
        if self.kind == StateKind::Tpm {
            tpm_path_ok(&self.path)?;
        } else if !self.path.starts_with('/') {
            return Err(format!("NVRAM path {:?} is not absolute", self.path));
        }
        if self.size > MAX_STATE_FILE {
            return Err(format!("state file {} is too large", self.file));
        }
        if !is_digest(&self.digest) {
            return Err(format!("state file {} has a malformed digest", self.file));
        }
        if self.mode & !0o7777 != 0 {
            return Err(format!("state file {} has a malformed mode", self.file));
        }
        Ok(())
    }

    /// The saved file in generation folder `dir`.
    pub fn saved_path(&self, dir: &Path) -> PathBuf {
        dir.join(&self.file)
    }
}

/// Whether `path` is a TPM state path vmkeep saves: one to four names, each of ASCII
/// letters, digits, `.`, `_` and `-`, none `.` or `..`.
pub fn tpm_path_ok(path: &str) -> std::result::Result<(), String> {
    let names: Vec<&str> = path.split('/').collect();
    let good = (1..=4).contains(&names.len())
        && names.iter().all(|n| {
            !n.is_empty()
                && *n != "."
                && *n != ".."
                && n.len() <= 255
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if good {
        Ok(())
    } else {
        Err(format!(
            "TPM state path {path:?} is not a plain relative path"
        ))
    }
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("blake3:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `blake3:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(bytes).to_hex())
}

/// A state file read from the host, to be saved with a generation.
#[derive(Debug, Clone)]
pub struct StateFile {
    /// Its record (digest and size of `bytes`).
    pub record: StateRecord,
    /// Its content.
    pub bytes: Vec<u8>,
}

impl StateFile {
    /// A state file of `kind` read from `path` (see [`StateRecord::path`]), saved as
    /// `file`, with permission bits `mode`.
    pub fn new(kind: StateKind, file: String, path: String, mode: u32, bytes: Vec<u8>) -> Self {
        StateFile {
            record: StateRecord {
                kind,
                file,
                path,
                size: bytes.len() as u64,
                digest: digest_of(&bytes),
                mode: mode & 0o7777,
            },
            bytes,
        }
    }
}

/// Write `files` into the generation folder `dir` being made (new files, synced).
pub fn save(dir: &Path, files: &[StateFile]) -> Result<()> {
    for f in files {
        f.record
            .validate()
            .map_err(|why| Error::usage(format!("cannot save firmware state: {why}")))?;
        let p = f.record.saved_path(dir);
        let file = fsutil::create_new(&p)?;
        fsutil::write_at(&file, &f.bytes, 0, &p)?;
        fsutil::sync_all(&file, &p)?;
    }
    Ok(())
}

/// The saved file of `rec` in generation folder `dir`, proven: a regular file (never
/// through a symbolic link) of the recorded length whose BLAKE3 is the recorded digest.
/// Anything else is a corrupt-archive error naming the file.
pub fn read_verified(dir: &Path, rec: &StateRecord) -> Result<Vec<u8>> {
    let p = rec.saved_path(dir);
    rec.validate().map_err(|why| Error::corrupt(&p, why))?;
    let file = fsutil::open_ro(&p)?;
    let meta = file.metadata().map_err(|e| Error::io(&p, e))?;
    if !meta.is_file() {
        return Err(Error::corrupt(&p, "not a regular file"));
    }
    if meta.len() != rec.size {
        return Err(Error::corrupt(
            &p,
            format!(
                "{} is {} bytes, the generation says {}",
                rec.kind.label(),
                meta.len(),
                rec.size
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(rec.size as usize);
    (&file)
        .take(rec.size + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(&p, e))?;
    if bytes.len() as u64 != rec.size || digest_of(&bytes) != rec.digest {
        return Err(Error::corrupt(
            &p,
            format!(
                "{} does not match its digest in the generation",
                rec.kind.label()
            ),
        ));
    }
    Ok(bytes)
}

/// Every record of `records` proven ([`read_verified`]), in order.
pub fn read_all_verified(dir: &Path, records: &[StateRecord]) -> Result<Vec<StateFile>> {
    records
        .iter()
        .map(|r| {
            read_verified(dir, r).map(|bytes| StateFile {
                record: r.clone(),
                bytes,
            })
        })
        .collect()
}

/// Whether `name` in a generation's folder is a state file's name (`state.…`).
pub fn is_state_file_name(name: &str) -> bool {
    name.starts_with(FILE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: StateKind, file: &str, path: &str) -> StateRecord {
        StateFile::new(kind, file.into(), path.into(), 0o600, b"x".to_vec()).record
    }

    #[test]
    fn records_vmkeep_writes_are_valid() {
        rec(
            StateKind::Nvram,
            "state.nvram",
            "/var/lib/libvirt/qemu/nvram/a_VARS.fd",
        )
        .validate()
        .unwrap();
        rec(StateKind::Tpm, "state.tpm.0", "tpm2/tpm2-00.permall")
            .validate()
            .unwrap();
        rec(StateKind::Tpm, "state.tpm.63", "tpm2/x")
            .validate()
            .unwrap();
    }

    /// A profile naming a file outside the generation's folder, or a TPM path that
    /// would leave the new state folder on restore, is refused.
    #[test]
    fn names_that_could_leave_their_folder_are_refused() {
        for (kind, file, path) in [
            (StateKind::Nvram, "../state.nvram", "/x"),
            (StateKind::Nvram, "state.nvram", "relative"),
            (StateKind::Nvram, "state.tpm.0", "/x"),
            (StateKind::Tpm, "state.tpm.64", "tpm2/a"),
            (StateKind::Tpm, "state.tpm.01", "tpm2/a"),
            (StateKind::Tpm, "state.tpm.0/../x", "tpm2/a"),
            (StateKind::Tpm, "state.tpm.0", "../etc/shadow"),
            (StateKind::Tpm, "state.tpm.0", "/etc/shadow"),
            (StateKind::Tpm, "state.tpm.0", "tpm2/../../x"),
            (StateKind::Tpm, "state.tpm.0", "tpm2//x"),
            (StateKind::Tpm, "state.tpm.0", "a/b/c/d/e"),
            (StateKind::Tpm, "state.tpm.0", "tpm2/a b"),
        ] {
            assert!(
                rec(kind, file, path).validate().is_err(),
                "{kind:?} {file} {path} accepted"
            );
        }
        let mut r = rec(StateKind::Tpm, "state.tpm.0", "tpm2/a");
        r.digest = "blake3:00".into();
        assert!(r.validate().is_err());
    }

    #[test]
    fn a_saved_file_is_read_only_when_it_is_the_recorded_one() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(
            StateKind::Tpm,
            "state.tpm.0".into(),
            "tpm2/tpm2-00.permall".into(),
            0o600,
            b"permanent state".to_vec(),
        );
        save(dir.path(), std::slice::from_ref(&f)).unwrap();
        assert_eq!(read_verified(dir.path(), &f.record).unwrap(), f.bytes);
        // Same length, one byte changed.
        std::fs::write(dir.path().join("state.tpm.0"), b"permanent stato").unwrap();
        let err = read_verified(dir.path(), &f.record).unwrap_err();
        assert!(
            err.to_string().contains("does not match its digest"),
            "{err}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        // Another length.
        std::fs::write(dir.path().join("state.tpm.0"), b"short").unwrap();
        let err = read_verified(dir.path(), &f.record).unwrap_err();
        assert!(err.to_string().contains("5 bytes"), "{err}");
        // A symbolic link put in its place (to a file with the right bytes) is refused.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"permanent state").unwrap();
        std::fs::remove_file(dir.path().join("state.tpm.0")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("state.tpm.0")).unwrap();
        assert!(read_verified(dir.path(), &f.record).is_err());
        // Saving never overwrites.
        assert!(save(dir.path(), &[f]).is_err());
    }
}
