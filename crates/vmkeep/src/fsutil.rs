//! Small file-system primitives with the durability rules the archive relies on.
//!
//! Every write, truncate, rename and fsync that changes the repository goes through this
//! module, so that the crash tests can stop the process at any one of them
//! (see [`crate::fault`]) and so that ENOSPC is reported the same way everywhere.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::fault::{self, Op};

/// Mode of every file vmkeep creates: backups hold whole disks, so only the owner reads them.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every folder vmkeep creates.
pub const DIR_MODE: u32 = 0o700;

/// Write all of `buf` at `off`.
pub fn write_at(file: &File, buf: &[u8], off: u64, path: &Path) -> Result<()> {
    fault::point(Op::Write, path, None)?;
    file.write_all_at(buf, off).at(path)
}

/// Append to a buffered writer (counted as one write for the crash tests).
pub fn append(w: &mut impl Write, buf: &[u8], path: &Path) -> Result<()> {
    fault::point(Op::Write, path, None)?;
    w.write_all(buf).at(path)
}

/// Read exactly `buf.len()` bytes at `off`; a short file is corruption of `path`.
pub fn read_exact_at(file: &File, buf: &mut [u8], off: u64, path: &Path) -> Result<()> {
    match file.read_exact_at(buf, off) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::corrupt(
            path,
            format!("file ends before byte {}", off + buf.len() as u64),
        )),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Make a file's data durable.
pub fn sync_data(file: &File, path: &Path) -> Result<()> {
    fault::point(Op::DataSync, path, None)?;
    file.sync_data().at(path)
}

/// Make a file's data and metadata (its size) durable.
pub fn sync_all(file: &File, path: &Path) -> Result<()> {
    fault::point(Op::Sync, path, None)?;
    file.sync_all().at(path)
}

/// Make a folder's entries (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fault::point(Op::SyncDir, dir, None)?;
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Change a file's length.
pub fn set_len(file: &File, len: u64, path: &Path) -> Result<()> {
    fault::point(Op::Truncate, path, None)?;
    file.set_len(len).at(path)
}

/// Rename `from` to `to` (atomic within one file system).
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    fault::point(Op::Rename, to, Some(from))?;
    fs::rename(from, to)
        .map_err(|e| Error::io_ctx(format!("rename {} -> {}", from.display(), to.display()), e))
}

/// Remove a file if it exists.
pub fn remove_file(path: &Path) -> Result<()> {
    fault::point(Op::Unlink, path, None)?;
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Remove a folder and everything in it if it exists. A symbolic link in its place is
/// refused: callers remove a stray link with [`remove_file`], on purpose.
pub fn remove_dir_all(path: &Path) -> Result<()> {
    refuse_symlink(path)?;
    fault::point(Op::RemoveTree, path, None)?;
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Create a folder (mode 0700); an existing one is fine.
pub fn create_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !path.is_dir() {
        fault::point(Op::Mkdir, path, None)?;
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The error for a symbolic link found where a repository file or folder belongs.
pub fn symlink_refused(path: &Path) -> Error {
    Error::corrupt(
        path,
        "is a symbolic link; vmkeep never follows one inside a repository (refused)",
    )
}

/// Refuse `path` when it is a symbolic link (checked with `lstat`, so the link itself is
/// looked at, never its target); a missing entry is fine.
pub fn refuse_symlink(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(symlink_refused(path)),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Open the folder `dir` itself (`O_DIRECTORY | O_NOFOLLOW`), to open files relative to it
/// (`openat`): a symbolic link in its place is refused.
pub fn open_dir_nofollow(dir: &Path) -> Result<rustix::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        if refuse_symlink(dir).is_err() {
            symlink_refused(dir)
        } else {
            Error::io(dir, e.into())
        }
    })
}

/// An `open` error of a repository file opened with `O_NOFOLLOW`: `ELOOP` means the last
/// component is a symbolic link.
fn open_error(path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        symlink_refused(path)
    } else {
        not_found_is_corrupt(path, e)
    }
}

/// Refuse an opened file that is not a regular file, or (for a file about to be written in
/// place) one with another name elsewhere: a hard link would carry the write to whatever
/// else shares the inode (a `cp -al` copy of the repository, or a file outside it).
fn require_regular(file: &File, path: &Path, single_link: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().at(path)?;
    if !meta.file_type().is_file() {
        return Err(Error::corrupt(path, "is not a regular file (refused)"));
    }
    if single_link && meta.nlink() > 1 {
        return Err(Error::corrupt(
            path,
            format!(
                "has {} hard links; vmkeep never writes in place into a file that has another name (refused)",
                meta.nlink()
            ),
        ));
    }
    Ok(())
}

/// Create a new file for writing (mode 0600); it must not exist yet (not even as a
/// symbolic link).
pub fn create_new(path: &Path) -> Result<File> {
    fault::point(Op::Create, path, None)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists && refuse_symlink(path).is_err() {
                symlink_refused(path)
            } else {
                Error::io(path, e)
            }
        })
}

/// Create or truncate a file for writing (mode 0600). A symbolic link in its place is
/// refused, never truncated through (`O_NOFOLLOW`), and so is a hard-linked file.
pub fn create_truncate(path: &Path) -> Result<File> {
    let existed = fs::symlink_metadata(path).is_ok();
    if existed {
        fault::point(Op::Truncate, path, None)?;
    } else {
        fault::point(Op::Create, path, None)?;
    }
    // Opened without `O_TRUNC`: the file is looked at before anything is cut off.
    let f = open_in_place(path)?;
    f.set_len(0).at(path)?;
    Ok(f)
}

/// Open an existing repository file for reading and writing in place. A symbolic link is
/// refused (`O_NOFOLLOW`), and so is a file with a second hard link (the write would
/// change the other name's bytes too).
pub fn open_rw(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    require_regular(&f, path, true)?;
    Ok(f)
}

/// Open an existing archive file for reading; a missing one is damage to the archive, and
/// a symbolic link (which could serve a host file such as `/etc/shadow` as disk bytes) or
/// anything but a regular file is refused.
pub fn open_ro(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    require_regular(&f, path, false)?;
    Ok(f)
}

fn not_found_is_corrupt(path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::corrupt(path, "file is missing")
    } else {
        Error::io(path, e)
    }
}

/// Open (creating it 0600 if needed) a lock or pin file for reading and writing, without
/// truncating it: a symbolic link in its place is refused (`O_NOFOLLOW`), and so is a file
/// that is not regular or has a second hard link (its holder line is rewritten in place).
pub fn open_lock_file(path: &Path) -> Result<File> {
    open_in_place(path)
}

/// Open (creating it 0600 if needed) a file to be written in place, without truncating
/// it: not through a symbolic link, and only a regular file with a single name.
fn open_in_place(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|e| open_error(path, e))?;
    require_regular(&f, path, true)?;
    Ok(f)
}

/// Replace `path` with `data` atomically: write beside, fsync, rename, fsync the folder.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let f = create_truncate(&tmp)?;
    if let Err(e) = write_at(&f, data, 0, &tmp).and_then(|()| sync_all(&f, &tmp)) {
        // Out of space, say: a half-written draft would only hold on to what is left.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    drop(f);
    rename(&tmp, path)?;
    sync_dir(parent(path))
}

/// Point the symlink `link` at `target` atomically.
pub fn atomic_symlink(target: &Path, link: &Path) -> Result<()> {
    let tmp = tmp_path(link);
    if fs::symlink_metadata(&tmp).is_ok() {
        remove_file(&tmp)?;
    }
    fault::point(Op::Symlink, &tmp, Some(target))?;
    std::os::unix::fs::symlink(target, &tmp).at(&tmp)?;
    rename(&tmp, link)?;
    sync_dir(parent(link))
}

/// The name a file is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The folder holding `path`: its parent, or `.` for a bare file name (and for `/`).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Free a range of a file so that it reads as zeros and takes no space.
pub fn punch_hole(file: &File, off: u64, len: u64, path: &Path) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    fault::point(Op::Write, path, None)?;
    // SAFETY: fallocate on a valid open descriptor; it takes no pointers.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // File systems (and block devices) without hole punching get explicit zeros.
        Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::EINVAL) => {
            write_zeros(file, off, len, path)
        }
        _ => Err(Error::io(path, err)),
    }
}

/// Write zeros over a range (where holes cannot be made).
pub fn write_zeros(file: &File, off: u64, len: u64, path: &Path) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        write_at(file, &zeros[..n], off + done, path)?;
        done += n as u64;
    }
    Ok(())
}

/// Data ranges of `file` within `[start, end)`, found with `SEEK_DATA`/`SEEK_HOLE`.
/// Where the file system cannot say, the whole range is data.
pub fn data_extents(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a valid descriptor; no pointers involved.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    out.push((pos, end - pos));
                    Ok(out)
                }
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data, hole - data));
        pos = hole;
    }
    Ok(out)
}

/// Start writing `file`'s dirty pages back now, without waiting for it (write-behind).
///
/// Linux starts background writeback only when dirty pages pass a share of memory (10 %
/// by default), so a file of a few GiB written and then fsynced is copied first and
/// written to disk after, one phase behind the other. Kicking the writeback every few tens
/// of megabytes overlaps the two; the final fsync then finds little left to do. Purely
/// advisory: durability still comes from fsync, and errors show up there.
pub fn start_writeback(file: &File) {
    // SAFETY: sync_file_range on a valid descriptor; it takes no pointers.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Ask the kernel to start reading `[off, off + len)` of `file` into the page cache now
/// (`POSIX_FADV_WILLNEED`), so that a later read finds it there. Advisory.
pub fn will_need(file: &File, off: u64, len: u64) {
    if len == 0 {
        return;
    }
    // SAFETY: posix_fadvise on a valid descriptor; it takes no pointers.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            off as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

/// Turn the kernel's readahead off for `file` (`POSIX_FADV_RANDOM`): the caller says what
/// it will read with [`will_need`]. Readahead runs past the end of the range read, into
/// holes it then fills with zeros and data nobody asked for; the pipelines know exactly
/// which extents they will read, a few jobs ahead.
pub fn no_readahead(file: &File) {
    // SAFETY: posix_fadvise on a valid descriptor; it takes no pointers.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
    }
}

/// Counts bytes written to one file and kicks its writeback every [`WRITE_BEHIND`] bytes.
#[derive(Debug)]
pub struct WriteBehind {
    since: u64,
    every: u64,
}

impl Default for WriteBehind {
    fn default() -> Self {
        WriteBehind::every(WRITE_BEHIND)
    }
}

/// Bytes written between two writeback kicks.
pub const WRITE_BEHIND: u64 = 32 << 20;

impl WriteBehind {
    /// Kick writeback every `every` bytes.
    pub fn every(every: u64) -> Self {
        WriteBehind { since: 0, every }
    }

    /// Count `n` more bytes written to `file`; past the threshold, start its writeback
    /// ([`start_writeback`]) and count again from zero.
    pub fn wrote(&mut self, file: &File, n: u64) {
        self.since += n;
        if self.since >= self.every {
            start_writeback(file);
            self.since = 0;
        }
    }
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // OR-ing 64-byte chunks into one word vectorises well and exits early on data.
    let mut chunks = buf.chunks_exact(64);
    for chunk in &mut chunks {
        let acc = chunk.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
        });
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Size of a file or block device opened as `file`.
pub fn file_or_device_size(file: &File, path: &Path) -> Result<u64> {
    let meta = file.metadata().at(path)?;
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we pass, which lives on
        // our stack for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(Error::io(path, io::Error::last_os_error()));
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

/// `_IOR(0x12, 114, size_t)`
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Bytes a file really occupies on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Make `to` a second name of the file `from` (same file system).
pub fn hard_link(from: &Path, to: &Path) -> Result<()> {
    fault::point(Op::Link, to, Some(from))?;
    fs::hard_link(from, to)
        .map_err(|e| Error::io_ctx(format!("link {} -> {}", from.display(), to.display()), e))
}

mod private;
pub use private::{
    new_private_dir, private_dir, private_dir_beside, safe_base, temp_dir, PrivateDir, Share,
    BASE_MODE,
};
