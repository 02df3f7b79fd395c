//! Private folders made safely: vmkeep's per-run folders (live-backup sockets and scratch
//! files, instant recovery's server, qemu-nbd helpers) live under parents that may already
//! exist, possibly made by someone else. Nothing is trusted by its name:
//!
//! - [`safe_base`] walks the parent from `/` one component at a time through open folder
//!   descriptors (`openat` with `O_NOFOLLOW`), creating missing components, and checks each
//!   folder it looks a name up in: owned by root (or the user running vmkeep) and not
//!   writable by others — except that a sticky world-writable folder such as `/tmp` or
//!   `/var/tmp` may be an *ancestor*, because the sticky bit keeps others from replacing
//!   the root-owned entry vmkeep then checks. The parent itself must not be writable by
//!   others at all. A symlink is followed only where root alone could have made it (in a
//!   folder nobody else can write); anywhere else it is refused.
//! - [`private_dir`] creates a fresh folder with a random name in that parent (`mkdirat`,
//!   so an existing entry is never reused), opens it without following symlinks, checks it
//!   is the folder just made, and sets group and mode on the open descriptor (`fchown`,
//!   `fchmod`), never by path.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, CWD};

use crate::error::{Error, Result};

/// `dir` refused: one line naming the folder and what is wrong with it.
fn unsafe_dir(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::format(
        dir,
        format!("refusing to use this folder: {what} (vmkeep's private folders must be under folders only root can change)"),
    )
}

fn io_err(dir: &Path, e: rustix::io::Errno) -> Error {
    Error::io(dir, e.into())
}

fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

/// Others (not the owner, not group root) may create, rename or remove entries.
fn writable_by_others(st: &Stat) -> bool {
    let mode = st.st_mode;
    mode & 0o002 != 0 || (mode & 0o020 != 0 && st.st_gid != 0)
}

fn is_sticky(st: &Stat) -> bool {
    st.st_mode & 0o1000 != 0
}

/// What is wrong with folder `st` (at `dir`) as a place vmkeep looks names up in;
/// `final_parent`: the folder the private folders go in (no sticky exception).
fn problem(st: &Stat, final_parent: bool) -> Option<String> {
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Some("not a folder".into());
    }
    if !trusted_owner(st.st_uid) {
        return Some(format!("owned by uid {} (must be root's)", st.st_uid));
    }
    if writable_by_others(st) && (final_parent || !is_sticky(st)) {
        return Some(format!(
            "mode {:04o} lets other users create or rename entries in it",
            st.st_mode & 0o7777
        ));
    }
    None
}

/// Open (creating what is missing, mode `create_mode`) the folder `dir` after checking it
/// and every ancestor as the module docs say. Returns the open folder.
pub fn safe_base(dir: &Path, create_mode: u32) -> Result<OwnedFd> {
    walk(dir, create_mode, false)
}

fn walk(dir: &Path, create_mode: u32, sticky_parent: bool) -> Result<OwnedFd> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(dir, e))?
            .join(dir)
    };
    let names: Vec<&std::ffi::OsStr> = abs
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::RootDir | Component::CurDir => None,
            _ => Some(Err(())),
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|()| unsafe_dir(dir, "the path contains `..`"))?;
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
    let mut here = PathBuf::from("/");
    let mut fd =
        rustix::fs::openat(CWD, "/", flags, Mode::empty()).map_err(|e| io_err(&here, e))?;
    let mut st = rustix::fs::fstat(&fd).map_err(|e| io_err(&here, e))?;
    if let Some(p) = problem(&st, names.is_empty()) {
        return Err(unsafe_dir(&here, p));
    }
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        let parent_st = st;
        here.push(name);
        let mut created = false;
        let entry = match rustix::fs::statat(&fd, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => Some(s),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(io_err(&here, e)),
        };
        let follow = match entry {
            None => {
                match rustix::fs::mkdirat(&fd, *name, Mode::from_raw_mode(create_mode)) {
                    Ok(()) => created = true,
                    // Someone made it in between: check it like any existing one.
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_err(&here, e)),
                }
                false
            }
            Some(s) if FileType::from_raw_mode(s.st_mode) == FileType::Symlink => {
                if last {
                    return Err(unsafe_dir(&here, "it is a symlink"));
                }
                if writable_by_others(&parent_st) || !trusted_owner(s.st_uid) {
                    return Err(unsafe_dir(
                        &here,
                        "it is a symlink in a folder other users can write to",
                    ));
                }
                true
            }
            Some(_) => false,
        };
        let mut oflags = flags;
        if !follow {
            oflags |= OFlags::NOFOLLOW;
        }
        let next = rustix::fs::openat(&fd, *name, oflags, Mode::empty()).map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                unsafe_dir(&here, "not a folder (or a symlink)")
            }
            e => io_err(&here, e),
        })?;
        st = rustix::fs::fstat(&next).map_err(|e| io_err(&here, e))?;
        if created && st.st_uid == rustix::process::geteuid().as_raw() {
            // The umask may have taken bits away.
            rustix::fs::fchmod(&next, Mode::from_raw_mode(create_mode))
                .map_err(|e| io_err(&here, e))?;
            st = rustix::fs::fstat(&next).map_err(|e| io_err(&here, e))?;
        }
        if let Some(p) = problem(&st, last && !sticky_parent) {
            return Err(unsafe_dir(&here, p));
        }
        fd = next;
    }
    Ok(fd)
}

/// Mode of the missing parents [`private_dir`] and [`new_private_dir`] make: others may
/// pass through to a folder shared with them, not list or change anything.
pub const BASE_MODE: u32 = 0o711;

/// Who besides vmkeep's user may use a private folder; sets its group and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Nobody (mode 0700).
    Nobody,
    /// Group `gid` may enter and create files (mode 0770): QEMU's sockets and scratch files.
    Group(u32),
    /// Group `gid` may enter, not create (mode 0750): a server's socket folder.
    Enter(u32),
}

impl Share {
    /// For QEMU: its group `gid` may create files (mode 0770) when libvirt runs it under
    /// one; without a gid (session libvirt, QEMU runs as vmkeep's user) nobody (0700).
    pub fn qemu(gid: Option<u32>) -> Share {
        gid.map_or(Share::Nobody, Share::Group)
    }

    fn gid(self) -> Option<u32> {
        match self {
            Share::Nobody => None,
            Share::Group(g) | Share::Enter(g) => Some(g),
        }
    }

    fn mode(self) -> u32 {
        match self {
            Share::Nobody => 0o700,
            Share::Group(_) => 0o770,
            Share::Enter(_) => 0o750,
        }
    }
}

/// A fresh folder made by [`private_dir`].
#[derive(Debug)]
pub struct PrivateDir {
    /// Its path (inside the checked parent).
    pub path: PathBuf,
    /// The open folder.
    pub fd: OwnedFd,
}

/// Create a fresh folder `PREFIX` + random characters in `base` (checked, and created
/// with mode [`BASE_MODE`] where missing, by [`safe_base`]): owned by vmkeep's user, group
/// and mode as `share` says. The one home of vmkeep's private folders (live-backup
/// sockets and scratch files, instant recovery's server); [`new_private_dir`],
/// [`temp_dir`] and [`private_dir_beside`] are its variants.
pub fn private_dir(base: &Path, prefix: &str, share: Share) -> Result<PrivateDir> {
    let parent = safe_base(base, BASE_MODE)?;
    fresh_named(&parent, base, prefix, share)
}

/// Like [`private_dir`] (mode 0700) in an existing `base` that may be sticky and
/// world-writable (`/tmp`): the sticky bit keeps others from renaming or removing the new
/// folder, and it is made fresh (`mkdirat` fails on any existing entry), so nobody else's
/// entry is used.
pub fn temp_dir(base: &Path, prefix: &str) -> Result<PrivateDir> {
    let parent = walk(base, 0o700, true)?;
    fresh_named(&parent, base, prefix, Share::Nobody)
}

/// A fresh folder `PREFIX` + 12 random characters in the open folder `parent` (at `base`).
fn fresh_named(parent: &OwnedFd, base: &Path, prefix: &str, share: Share) -> Result<PrivateDir> {
    for _ in 0..16 {
        let name = format!(
            "{prefix}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        if let Some(d) = fresh(parent, &base.join(&name), &name, share)? {
            return Ok(d);
        }
    }
    Err(unsafe_dir(base, "cannot find a free name in it"))
}

/// The parent folder and last name of `path`, for creating exactly `path`.
fn split(path: &Path) -> Result<(&Path, &str)> {
    let (Some(base), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
    else {
        return Err(unsafe_dir(path, "not a folder name"));
    };
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    Ok((base, name))
}

/// Create exactly the folder `path` (it must not exist) in a parent checked by
/// [`safe_base`] (missing components made with [`BASE_MODE`]), like [`private_dir`].
pub fn new_private_dir(path: &Path, share: Share) -> Result<PrivateDir> {
    let (base, name) = split(path)?;
    let parent = safe_base(base, BASE_MODE)?;
    fresh(&parent, path, name, share)?
        .ok_or_else(|| unsafe_dir(path, "it exists already (vmkeep makes this folder itself)"))
}

/// Create exactly the folder `path` (mode 0700; it must not exist) beside a file whose
/// place the user chose (a unix socket's): its parent is taken as it is, not checked like
/// [`safe_base`] checks, but the folder is still made fresh and checked on its open
/// descriptor like [`private_dir`]'s.
pub fn private_dir_beside(path: &Path) -> Result<PrivateDir> {
    let (base, name) = split(path)?;
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
    let parent =
        rustix::fs::openat(CWD, base, flags, Mode::empty()).map_err(|e| io_err(base, e))?;
    fresh(&parent, path, name, Share::Nobody)?.ok_or_else(|| io_err(path, rustix::io::Errno::EXIST))
}

/// `mkdirat` + checks + `fchown`/`fchmod` on the open folder; `None` if `name` exists.
fn fresh(parent: &OwnedFd, path: &Path, name: &str, share: Share) -> Result<Option<PrivateDir>> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => return Ok(None),
        Err(e) => return Err(io_err(path, e)),
    }
    let fd = rustix::fs::openat(parent, name, flags, Mode::empty()).map_err(|e| io_err(path, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io_err(path, e))?;
    if st.st_uid != rustix::process::geteuid().as_raw()
        || FileType::from_raw_mode(st.st_mode) != FileType::Directory
    {
        return Err(unsafe_dir(path, "replaced while it was being made"));
    }
    if let Some(g) = share.gid() {
        rustix::fs::fchown(&fd, None, Some(rustix::fs::Gid::from_raw(g)))
            .map_err(|e| io_err(path, e))?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(share.mode())).map_err(|e| io_err(path, e))?;
    Ok(Some(PrivateDir {
        path: path.to_path_buf(),
        fd,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn set_mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn fresh_folders_get_their_mode_and_a_missing_base_is_made() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("a/b");
        let gid = std::fs::metadata(tmp.path()).unwrap().gid();
        let d = private_dir(&base, "run-", Share::Group(gid)).unwrap();
        assert_eq!(mode(&base), 0o711);
        assert_eq!(mode(&tmp.path().join("a")), 0o711);
        assert_eq!(mode(&d.path), 0o770);
        assert!(d
            .path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("run-"));
        let e = private_dir(&base, "run-", Share::Nobody).unwrap();
        assert_ne!(d.path, e.path);
        assert_eq!(mode(&e.path), 0o700);
    }

    #[test]
    fn shares_set_group_and_mode_and_a_folder_beside_is_made_fresh() {
        let tmp = tempfile::tempdir().unwrap();
        let gid = std::fs::metadata(tmp.path()).unwrap().gid();
        let d = private_dir(&tmp.path().join("run"), "s-", Share::Enter(gid)).unwrap();
        assert_eq!(mode(&d.path), 0o750);
        assert_eq!(std::fs::metadata(&d.path).unwrap().gid(), gid);
        assert_eq!(Share::qemu(None), Share::Nobody);
        assert_eq!(Share::qemu(Some(gid)), Share::Group(gid));
        let beside = tmp.path().join(".beside");
        assert_eq!(mode(&private_dir_beside(&beside).unwrap().path), 0o700);
        assert!(private_dir_beside(&beside).is_err());
    }

    #[test]
    fn a_base_others_can_write_or_a_symlink_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        // Sticky and world-writable: fine as an ancestor, not as the parent itself.
        let public = tmp.path().join("public");
        std::fs::create_dir(&public).unwrap();
        set_mode(&public, 0o1777);
        private_dir(&public.join("ours"), "x-", Share::Nobody).unwrap();
        let err = private_dir(&public, "x-", Share::Nobody)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mode 1777") && err.contains("public"), "{err}");
        // World-writable without the sticky bit: not even as an ancestor.
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        set_mode(&open, 0o777);
        let err = safe_base(&open.join("x"), 0o711).unwrap_err().to_string();
        assert!(err.contains("mode 0777"), "{err}");
        // A symlink as the parent, even one root made.
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        set_mode(&victim, 0o755);
        let link = public.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = private_dir(&link, "x-", Share::Nobody)
            .unwrap_err()
            .to_string();
        assert!(err.contains("symlink") && err.contains("link"), "{err}");
        // A symlink in a world-writable folder as an ancestor.
        let err = safe_base(&link.join("sub"), 0o711).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        assert_eq!(mode(&victim), 0o755);
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        // A root-made symlink in a folder only root can write is followed (like /var/run).
        let safe_link = tmp.path().join("safe-link");
        std::os::unix::fs::symlink(&victim, &safe_link).unwrap();
        safe_base(&safe_link.join("sub"), 0o711).unwrap();
        assert!(victim.join("sub").is_dir());
        // Sticky /tmp-like parents are for fresh temporary folders only.
        let t = temp_dir(&public, "t-").unwrap();
        assert_eq!(mode(&t.path), 0o700);
        assert!(temp_dir(&open, "t-").is_err());
    }
}
