//! Images in any format QEMU reads (qcow2, vmdk, vdi, vhdx, raw…), served by a private
//! `qemu-nbd` and read with vmkeep's NBD client.
//!
//! Why qemu-nbd and not a format parser of our own: it reads every format, follows
//! backing chains, and exports persistent qcow2 bitmaps as `qemu:dirty-bitmap:NAME`,
//! which is what incremental backups of shut-off VMs need.
//!
//! The server is started `--read-only` on a unix socket in a fresh folder only we can
//! enter (mode 0700, under `$XDG_RUNTIME_DIR` or `/tmp`), so no other user can connect
//! to it. It is stopped on every exit path (see `source/children.rs`). It runs without
//! `--persistent`: once our last connection closes it exits by itself, one more way for
//! it not to outlive us.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::children::Helper;
use super::labelled::Labelled;
use super::nbd::{contexts_for, NbdSource};
use super::BlockSource;
use crate::error::{Error, Result};
use crate::nbd::client::{NbdClient, NbdOptions, NbdUri, DEFAULT_MAX_REQUEST};

/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How to run qemu-nbd.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The qemu-nbd program.
    pub program: PathBuf,
    /// Connections (`--shared`), used in parallel since a read-only qemu-nbd allows it.
    pub connections: usize,
    /// Deadline for each NBD reply.
    pub timeout: Duration,
    /// How long qemu-nbd may take to open the image and listen.
    pub start_timeout: Duration,
    /// Serve the image writable (a restore target) instead of `--read-only`.
    pub writable: bool,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            program: PathBuf::from("qemu-nbd"),
            connections: 4,
            timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(30),
            writable: false,
        }
    }
}

/// An image read through a private qemu-nbd, which lives exactly as long as this value;
/// described by the image's path, every other method forwarded to the NBD connection.
pub type QemuImage = Labelled<NbdSource, QemuServer>;

/// The private qemu-nbd behind a [`QemuImage`].
pub struct QemuServer {
    // Drop order is field order (and a `Labelled` drops its source first): the NBD
    // connections close, then qemu-nbd is stopped, then its folder is removed.
    helper: Helper,
    dir: PrivateDir,
}

/// Open `path` (in `format`, e.g. "qcow2") as a source; `bitmap` names a persistent
/// bitmap whose dirty ranges become [`BlockSource::changed_extents`].
pub fn open_image(path: &Path, format: &str, bitmap: Option<&str>) -> Result<Box<dyn BlockSource>> {
    Ok(Box::new(QemuImage::open(path, format, bitmap)?))
}

impl Labelled<NbdSource, QemuServer> {
    /// Serve `path` (in `format`) with a private read-only qemu-nbd and connect to it;
    /// `bitmap` names a persistent bitmap to export.
    pub fn open(path: &Path, format: &str, bitmap: Option<&str>) -> Result<QemuImage> {
        QemuImage::open_with(path, format, bitmap, &QemuOptions::default())
    }

    /// [`QemuImage::open`] with explicit options.
    pub fn open_with(
        path: &Path,
        format: &str,
        bitmap: Option<&str>,
        opts: &QemuOptions,
    ) -> Result<QemuImage> {
        check_arguments(path, format, bitmap, opts)?;
        let abs = path
            .canonicalize()
            .map_err(|e| Error::source(path.display(), e))?;
        let dir = PrivateDir::create().map_err(|e| Error::source(path.display(), e))?;
        let sock = dir.path.join("nbd.sock");
        let log = dir.path.join("qemu-nbd.log");
        let cmd = command(&abs, format, bitmap, opts, &sock, &log)
            .map_err(|e| Error::source(path.display(), e))?;
        let mut helper = Helper::spawn(cmd, &dir.path, &[sock.clone(), log.clone()])
            .map_err(|e| spawn_error(path, &opts.program, e))?;
        let nbd_opts = NbdOptions {
            contexts: contexts_for(bitmap),
            connections: opts.connections,
            timeout: opts.timeout,
            max_request: DEFAULT_MAX_REQUEST,
            name: Some(format!("{} (qemu-nbd)", path.display())),
        };
        let client = NbdClient::connect_when_ready(
            &NbdUri::unix(&sock, ""),
            &nbd_opts,
            Instant::now() + opts.start_timeout,
            &mut || still_running(&mut helper, path, &log),
        )
        .map_err(|e| explain_failure(&mut helper, path, &log).unwrap_or(e))?;
        Ok(Labelled::new(
            Box::new(NbdSource::from_client(client, bitmap)),
            path.display().to_string(),
            QemuServer { helper, dir },
        ))
    }

    /// The qemu-nbd process id.
    pub fn pid(&self) -> u32 {
        self.kept().helper.id()
    }

    /// The private folder holding the socket.
    pub fn private_dir(&self) -> &Path {
        &self.kept().dir.path
    }

    /// The NBD connection to qemu-nbd.
    pub fn nbd(&self) -> &NbdSource {
        self.inner()
    }
}

fn check_arguments(
    path: &Path,
    format: &str,
    bitmap: Option<&str>,
    opts: &QemuOptions,
) -> Result<()> {
    let ok_format = !format.is_empty()
        && format
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    if !ok_format {
        return Err(Error::usage(format!(
            "{}: bad image format {format:?}",
            path.display()
        )));
    }
    if bitmap.is_some_and(|b| b.is_empty() || b.contains('\0')) {
        return Err(Error::usage(format!("{}: bad bitmap name", path.display())));
    }
    if opts.connections == 0 {
        return Err(Error::usage("qemu-nbd needs at least one connection"));
    }
    Ok(())
}

fn command(
    image: &Path,
    format: &str,
    bitmap: Option<&str>,
    opts: &QemuOptions,
    sock: &Path,
    log: &Path,
) -> std::io::Result<Command> {
    let mut socket_arg = OsString::from("--socket=");
    socket_arg.push(sock);
    let mut cmd = Command::new(&opts.program);
    if opts.writable {
        // Zero writes become unallocated clusters rather than written zeros.
        cmd.arg("--discard=unmap").arg("--detect-zeroes=unmap");
    } else {
        cmd.arg("--read-only");
    }
    cmd.arg(format!("--format={format}"))
        .arg(format!("--shared={}", opts.connections))
        .arg(socket_arg);
    if let Some(b) = bitmap {
        cmd.arg(format!("--bitmap={b}"));
    }
    // An absolute path: qemu never mistakes it for a "protocol:" filename.
    cmd.arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(crate::fsutil::create_truncate(log).map_err(std::io::Error::other)?);
    Ok(cmd)
}

fn spawn_error(path: &Path, program: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        return Error::source(
            path.display(),
            format!(
                "{} was not found; install the qemu-utils package (it provides qemu-nbd) to read this image",
                program.display()
            ),
        );
    }
    Error::source(
        path.display(),
        format!("cannot start {}: {e}", program.display()),
    )
}

/// An error when qemu-nbd has exited (it failed to open the image), with its message.
fn still_running(helper: &mut Helper, path: &Path, log: &Path) -> Result<()> {
    match helper.try_wait() {
        Ok(Some(status)) => {
            let msg = std::fs::read_to_string(log).unwrap_or_default();
            let msg = msg.trim();
            Err(Error::source(
                path.display(),
                format!("qemu-nbd exited ({status}) before serving the image: {msg}"),
            ))
        }
        _ => Ok(()),
    }
}

/// qemu-nbd listens before it has checked everything (a missing `--bitmap`, say), so a
/// connection can fail because qemu-nbd is exiting: then its own message is the one to
/// show. Waits briefly for it to exit.
fn explain_failure(helper: &mut Helper, path: &Path, log: &Path) -> Option<Error> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Err(e) = still_running(helper, path, log) {
            return Some(e);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A folder only we can enter, removed with everything in it when dropped.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create() -> std::io::Result<PrivateDir> {
        let mut last = std::io::Error::other("no usable folder for the qemu-nbd socket");
        for base in socket_bases() {
            // "vmkeep-" + 12 random characters.
            let len = base.as_os_str().len() + 1 + 19;
            if len + "/nbd.sock".len() > MAX_SOCKET_PATH {
                continue;
            }
            match crate::fsutil::temp_dir(&base, "vmkeep-") {
                Ok(d) => return Ok(PrivateDir { path: d.path }),
                Err(e) => last = std::io::Error::other(e.to_string()),
            }
        }
        Err(last)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn socket_bases() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        if d.is_absolute() && d.is_dir() {
            v.push(d);
        }
    }
    v.push(PathBuf::from("/tmp"));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn bad_arguments_are_usage_errors() {
        let p = Path::new("/nonexistent.qcow2");
        let o = QemuOptions::default();
        for (fmt, bm) in [("", None), ("qcow2 --x", None), ("qcow2", Some(""))] {
            let e = QemuImage::open_with(p, fmt, bm, &o).err().unwrap();
            assert_eq!(e.kind(), ErrorKind::Usage);
        }
    }

    #[test]
    fn private_dir_is_0700_and_removed() {
        let d = PrivateDir::create().unwrap();
        let p = d.path.clone();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(p.join("x"), b"x").unwrap();
        drop(d);
        assert!(!p.exists());
    }
}
