//! A libvirt VM's firmware and TPM state on this host: read with every generation, written
//! back for a `restore --as-vm` copy (see "Firmware and TPM state" in `docs/libvirt.md`).
//!
//! - The UEFI variable store is the file the domain's `<nvram>` names. It is written by
//!   QEMU in place (a guest setting a variable), so it is read until two reads in a row
//!   agree.
//! - An emulated TPM's state is swtpm's folder, libvirt's `SWTPM_STATE_DIR/UUID` unless
//!   the definition names one. The folder belongs to the swtpm user (`tss`), which a guest
//!   that broke into swtpm could act as: it is walked without following any symbolic link
//!   (`openat` with `O_NOFOLLOW` at every level), only regular files are read, and what is
//!   not one is skipped with a line saying so. swtpm's lock file (`.lock`) is not state.
//!
//! A copy's variable store goes to libvirt's NVRAM folder under a name of its own and its
//! definition names it; its TPM state goes into the state folder of its new UUID, where
//! libvirt's swtpm finds it (libvirt gives the files to the swtpm user when it starts it).

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::archive::state::{self, StateFile, StateKind, MAX_STATE_FILE, MAX_TPM_FILES};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::libvirt::xml::FirmwareState;

/// libvirt's folder of swtpm state folders, one per domain UUID (Debian's build).
pub const SWTPM_STATE_DIR: &str = "/var/lib/libvirt/swtpm";

/// libvirt's folder of UEFI variable stores (Debian's build).
pub const NVRAM_DIR: &str = "/var/lib/libvirt/qemu/nvram";

/// How many times a file that changes while it is read is read again.
const STABLE_TRIES: usize = 5;

/// What [`capture`] read, and what it could not.
#[derive(Debug, Default)]
pub struct Captured {
    /// The state files, the NVRAM first.
    pub files: Vec<StateFile>,
    /// One line per thing not saved, and why.
    pub notes: Vec<String>,
}

/// The firmware and TPM state of a domain of this host whose definition says `fw` and
/// whose UUID is `uuid`, read now. What cannot be read is a note, never an error: the
/// disks are backed up whatever the state files do.
pub fn capture(fw: &FirmwareState, uuid: &str) -> Captured {
    let mut out = Captured::default();
    if let Some(path) = &fw.nvram {
        match read_stable(path) {
            Ok(Some((bytes, mode))) => out.files.push(StateFile::new(
                StateKind::Nvram,
                format!("{}nvram", state::FILE_PREFIX),
                path.display().to_string(),
                mode,
                bytes,
            )),
            Ok(None) => out.notes.push(format!(
                "its UEFI variable store {} does not exist yet (libvirt makes it when the VM first starts); not saved",
                path.display()
            )),
            Err(e) => out
                .notes
                .push(format!("its UEFI variable store is not saved: {e}")),
        }
    }
    if let Some(named) = &fw.tpm {
        let dir = named
            .clone()
            .unwrap_or_else(|| Path::new(SWTPM_STATE_DIR).join(uuid));
        match tpm_files(&dir, &mut out.notes) {
            Ok(files) if files.is_empty() => out.notes.push(format!(
                "its TPM state folder {} holds no state yet (made when the VM first starts); not saved",
                dir.display()
            )),
            Ok(files) => out.files.extend(files),
            Err(e) => out.notes.push(format!("its TPM state is not saved: {e}")),
        }
    }
    out
}

/// The content and permission bits of the file `path` (following links: the path is the
/// host's configuration, not a folder another user writes), read until two reads agree;
/// `None` when it does not exist.
fn read_stable(path: &Path) -> Result<Option<(Vec<u8>, u32)>> {
    use std::os::unix::fs::PermissionsExt;
    let read = || -> Result<Option<(Vec<u8>, u32)>> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::usage(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        Ok(Some((
            read_capped(&file, path)?,
            meta.permissions().mode() & 0o7777,
        )))
    };
    stable(read, path)
}

/// `read` until two results in a row agree.
fn stable<T: PartialEq>(mut read: impl FnMut() -> Result<T>, path: &Path) -> Result<T> {
    let mut last = read()?;
    for _ in 0..STABLE_TRIES {
        let next = read()?;
        if next == last {
            return Ok(next);
        }
        last = next;
    }
    Err(Error::usage(format!(
        "{} changed on every one of {} reads",
        path.display(),
        STABLE_TRIES + 1
    )))
}

/// The content of `file`, refused past [`MAX_STATE_FILE`].
fn read_capped(file: &std::fs::File, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(Error::usage(format!(
            "{} is larger than {} MiB",
            path.display(),
            MAX_STATE_FILE >> 20
        )));
    }
    Ok(bytes)
}

/// A regular file a walk found: (path in the state folder, content, permission bits).
type Found = (String, Vec<u8>, u32);

/// The regular files of the TPM state folder `dir`, walked without following links,
/// numbered in path order; nothing when the folder does not exist.
fn tpm_files(dir: &Path, notes: &mut Vec<String>) -> Result<Vec<StateFile>> {
    let root = match fsutil::open_dir_nofollow(dir) {
        Ok(fd) => fd,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    // Read the whole folder until two walks agree (swtpm replaces its files by rename).
    // (files in path order, lines about what was skipped), which must agree between two walks.
    let walk = || -> Result<(Vec<Found>, Vec<String>)> {
        let mut found = Vec::new();
        let mut skipped = Vec::new();
        walk_dir(root.as_fd(), dir, "", &mut found, &mut skipped)?;
        found.sort_by(|a, b| a.0.cmp(&b.0));
        if found.len() > MAX_TPM_FILES {
            return Err(Error::usage(format!(
                "{} holds more than {MAX_TPM_FILES} files",
                dir.display()
            )));
        }
        skipped.sort();
        skipped.dedup();
        Ok((found, skipped))
    };
    let (all, skipped) = stable(walk, dir)?;
    notes.extend(skipped);
    Ok(all
        .into_iter()
        .enumerate()
        .map(|(n, (path, bytes, mode))| {
            StateFile::new(
                StateKind::Tpm,
                format!("{}tpm.{n}", state::FILE_PREFIX),
                path,
                mode,
                bytes,
            )
        })
        .collect())
}

/// Walk the folder open as `fd` (`rel` inside the state folder): regular files into
/// `found`, lines about anything else into `skipped`. Paths deeper than
/// [`state::tpm_path_ok`] allows are skipped, which bounds the recursion.
fn walk_dir(
    fd: rustix::fd::BorrowedFd<'_>,
    root: &Path,
    rel: &str,
    found: &mut Vec<Found>,
    skipped: &mut Vec<String>,
) -> Result<()> {
    let shown = |name: &str| root.join(rel).join(name);
    let dir = rustix::fs::Dir::read_from(fd).map_err(|e| Error::io(root.join(rel), e.into()))?;
    for entry in dir {
        let entry = entry.map_err(|e| Error::io(root.join(rel), e.into()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." || name == ".lock" {
            continue;
        }
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if state::tpm_path_ok(&path).is_err() {
            skipped.push(format!(
                "{} is not saved (a name vmkeep does not keep, or nested too deep)",
                shown(&name).display()
            ));
            continue;
        }
        let child = match rustix::fs::openat(
            fd,
            entry.file_name(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(c) => c,
            Err(rustix::io::Errno::LOOP) => {
                skipped.push(format!(
                    "{} is a symbolic link; not saved",
                    shown(&name).display()
                ));
                continue;
            }
            Err(e) => return Err(Error::io(shown(&name), e.into())),
        };
        let st = rustix::fs::fstat(&child).map_err(|e| Error::io(shown(&name), e.into()))?;
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        match kind {
            rustix::fs::FileType::Directory => {
                walk_dir(child.as_fd(), root, &path, found, skipped)?;
            }
            rustix::fs::FileType::RegularFile => {
                let file = std::fs::File::from(child);
                let bytes = read_capped(&file, &shown(&name))?;
                found.push((path, bytes, st.st_mode & 0o7777));
            }
            _ => skipped.push(format!(
                "{} is not a regular file; not saved",
                shown(&name).display()
            )),
        }
    }
    Ok(())
}

/// Where a copy named `new_name` keeps its UEFI variables: libvirt's NVRAM folder.
pub fn nvram_path_for(new_name: &str) -> PathBuf {
    Path::new(NVRAM_DIR).join(format!("{new_name}_VARS.fd"))
}

/// Write a copy's UEFI variable store `file` (proven) to `path`: a new file, unless
/// `replace` (a shut-off VM of that name is being redefined), synced.
pub fn write_nvram(path: &Path, file: &StateFile, replace: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let f = if replace {
        fsutil::create_truncate(path)?
    } else {
        fsutil::create_new(path).map_err(|e| match e {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
                Error::usage(format!(
                    "{} exists (remove it, or use --replace)",
                    path.display()
                ))
            }
            e => e,
        })?
    };
    fsutil::write_at(&f, &file.bytes, 0, path)?;
    f.set_permissions(std::fs::Permissions::from_mode(file.record.mode & 0o777))
        .map_err(|e| Error::io(path, e))?;
    fsutil::sync_all(&f, path)
}

/// Write a copy's TPM state `files` (proven) into the state folder of its UUID `uuid`,
/// which must not exist yet; the folder.
pub fn write_tpm(uuid: &str, files: &[StateFile]) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = Path::new(SWTPM_STATE_DIR);
    // As libvirt makes it: root's, searchable by the swtpm user.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(base)
        .map_err(|e| Error::io(base, e))?;
    if uuid.is_empty() || uuid.contains('/') || uuid.starts_with('.') {
        return Err(Error::usage(format!("not a domain UUID: {uuid:?}")));
    }
    let root = base.join(uuid);
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&root)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::usage(format!(
                "TPM state folder {} exists already; vmkeep never writes over another VM's TPM",
                root.display()
            )),
            _ => Error::io(&root, e),
        })?;
    let written = write_tpm_files(&root, files);
    if written.is_err() {
        // The folder is this call's own (made above): nothing half-written stays.
        let _ = std::fs::remove_dir_all(&root);
    }
    written.map(|()| root)
}

/// The files of [`write_tpm`] into its new folder `root`.
fn write_tpm_files(root: &Path, files: &[StateFile]) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for f in files {
        let rec = &f.record;
        state::tpm_path_ok(&rec.path).map_err(Error::usage)?;
        let path = root.join(&rec.path);
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| Error::io(parent, e))?;
        }
        let file = fsutil::create_new(&path)?;
        fsutil::write_at(&file, &f.bytes, 0, &path)?;
        file.set_permissions(std::fs::Permissions::from_mode(rec.mode & 0o777))
            .map_err(|e| Error::io(&path, e))?;
        fsutil::sync_all(&file, &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk saves regular files with their modes and paths, skips swtpm's lock, and
    /// names (never follows) a symbolic link or a FIFO planted in the folder.
    #[test]
    fn the_tpm_walk_keeps_regular_files_and_follows_no_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tpm2 = dir.path().join("tpm2");
        std::fs::create_dir(&tpm2).unwrap();
        std::fs::write(tpm2.join("tpm2-00.permall"), b"permanent").unwrap();
        std::fs::set_permissions(
            tpm2.join("tpm2-00.permall"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(tpm2.join(".lock"), b"").unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"not the TPM's").unwrap();
        std::os::unix::fs::symlink(&secret, tpm2.join("tpm2-00.volatilestate")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            tpm2.join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let mut notes = Vec::new();
        let files = tpm_files(dir.path(), &mut notes).unwrap();
        let got: Vec<(&str, &[u8])> = files
            .iter()
            .map(|f| (f.record.path.as_str(), f.bytes.as_slice()))
            .collect();
        // `secret` is a regular file of the folder itself (kept); nothing through a link.
        assert_eq!(
            got,
            vec![
                ("secret", &b"not the TPM's"[..]),
                ("tpm2/tpm2-00.permall", &b"permanent"[..]),
            ]
        );
        assert_eq!(files[1].record.mode, 0o600);
        assert_eq!(files[0].record.file, "state.tpm.0");
        assert_eq!(files[1].record.file, "state.tpm.1");
        let all = notes.join("\n");
        assert!(
            all.contains("tpm2-00.volatilestate is a symbolic link"),
            "{all}"
        );
        assert!(all.contains("etc is a symbolic link"), "{all}");
        assert!(all.contains("fifo is not a regular file"), "{all}");
        // A missing folder is no state, not an error.
        assert!(tpm_files(&dir.path().join("none"), &mut notes)
            .unwrap()
            .is_empty());
        // The folder itself a symbolic link: refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(tpm_files(&link, &mut notes).is_err());
    }

    #[test]
    fn a_missing_nvram_is_a_note_and_a_present_one_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let nvram = dir.path().join("vm_VARS.fd");
        let fw = FirmwareState {
            nvram: Some(nvram.clone()),
            tpm: None,
        };
        let c = capture(&fw, "u");
        assert!(c.files.is_empty());
        assert!(c.notes[0].contains("does not exist yet"), "{:?}", c.notes);
        std::fs::write(&nvram, b"variables").unwrap();
        let c = capture(&fw, "u");
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        assert_eq!(c.files[0].bytes, b"variables");
        assert_eq!(c.files[0].record.path, nvram.display().to_string());
        assert_eq!(c.files[0].record.kind, StateKind::Nvram);
        c.files[0].record.validate().unwrap();
    }
}
