//! Restore to an NBD export (any server that accepts writes), and to a new qcow2 image
//! written through a private writable qemu-nbd.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::Target;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::nbd::client::{NbdClient, NbdOptions, NbdUri, PendingWrite};
use crate::source::qemu::{QemuImage, QemuOptions};

/// Largest single WRITE_ZEROES/TRIM request (their length field is 32 bits).
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Writes kept in flight: a restore waits for one reply per this many requests, not
/// for each (the server writes while the next ones travel).
const WRITE_DEPTH: usize = 8;

enum Conn {
    Direct(NbdClient),
    /// A qcow2 image behind its own qemu-nbd, with the file's temporary and final paths.
    Qemu {
        image: Box<QemuImage>,
        tmp: PathBuf,
        path: PathBuf,
    },
}

/// A restore target reached through NBD: an export of any writable server, or a new qcow2 image
/// behind a private qemu-nbd that is renamed into place when the restore finishes.
pub struct NbdTarget {
    conn: Conn,
    name: String,
    /// A freshly created image reads as zeros: zero ranges need no request.
    fresh: bool,
    /// Writes sent and not answered yet, oldest first.
    in_flight: std::collections::VecDeque<PendingWrite>,
}

impl NbdTarget {
    /// Write to an NBD export that holds at least `size` bytes.
    pub fn connect(uri: &str, size: u64) -> Result<NbdTarget> {
        let parsed = NbdUri::parse(uri)?;
        let client = NbdClient::connect(
            &parsed,
            &NbdOptions {
                connections: 1,
                ..NbdOptions::default()
            },
        )?;
        if client.read_only() {
            return Err(Error::usage(format!("{uri} is read-only")));
        }
        if client.size() < size {
            return Err(Error::usage(format!(
                "{uri} holds {} bytes; the disk needs {size}",
                client.size()
            )));
        }
        Ok(NbdTarget {
            conn: Conn::Direct(client),
            name: uri.to_string(),
            fresh: false,
            in_flight: Default::default(),
        })
    }

    /// Create a qcow2 image of `size` bytes at `path` (written beside, renamed at the end).
    pub fn qcow2(path: &Path, size: u64) -> Result<NbdTarget> {
        let tmp = super::partial_path(path)?;
        // A restored disk is as private as the archive it came from: the file is made
        // 0600 before qemu-img writes into it, so it is never readable by others.
        fsutil::remove_file(&tmp)?;
        drop(fsutil::create_new(&tmp)?);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&tmp)
            .arg(size.to_string())
            .output()
            .map_err(|e| Error::io_ctx("qemu-img (install qemu-utils)", e))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io_ctx(
                format!("qemu-img create {}", tmp.display()),
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            ));
        }
        check_private(&tmp)?;
        let opts = QemuOptions {
            writable: true,
            connections: 1,
            ..QemuOptions::default()
        };
        let image = match QemuImage::open_with(&tmp, "qcow2", None, &opts) {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        Ok(NbdTarget {
            conn: Conn::Qemu {
                image: Box::new(image),
                tmp,
                path: path.to_path_buf(),
            },
            name: path.display().to_string(),
            fresh: true,
            in_flight: Default::default(),
        })
    }

    fn client(&self) -> &NbdClient {
        match &self.conn {
            Conn::Direct(c) => c,
            Conn::Qemu { image, .. } => image.nbd().client(),
        }
    }

    /// Wait for every write in flight.
    fn drain(&mut self) -> Result<()> {
        while let Some(w) = self.in_flight.pop_front() {
            self.client().finish_write(w)?;
        }
        Ok(())
    }
}

impl Target for NbdTarget {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let max = self.client().max_payload() as usize;
        for (i, chunk) in data.chunks(max).enumerate() {
            if self.in_flight.len() >= WRITE_DEPTH {
                let oldest = self.in_flight.pop_front().expect("in flight");
                self.client().finish_write(oldest)?;
            }
            let w = self
                .client()
                .start_write(offset + (i * max) as u64, chunk)?;
            self.in_flight.push_back(w);
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.fresh || len == 0 {
            return Ok(());
        }
        let c = self.client();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_ZERO_REQUEST);
            if c.can_write_zeroes() {
                c.write_zeroes(offset + done, n, false)?;
            } else {
                // TRIM does not promise zeros: write them.
                let zeros = vec![0u8; (n as usize).min(4 << 20)];
                let mut w = 0;
                while w < n {
                    let k = (n - w).min(zeros.len() as u64) as usize;
                    c.write(offset + done + w, &zeros[..k])?;
                    w += k as u64;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.drain()?;
        if self.client().can_flush() {
            self.client().flush()?;
        }
        self.client().disconnect()?;
        match self.conn {
            Conn::Direct(_) => Ok(()),
            Conn::Qemu { image, tmp, path } => {
                drop(image); // stops qemu-nbd, which has written everything out
                fsutil::sync_all(
                    &std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?,
                    &tmp,
                )?;
                fsutil::rename(&tmp, &path)?;
                fsutil::sync_dir(fsutil::parent(&path))
            }
        }
    }

    fn abort(self: Box<Self>) {
        if let Conn::Qemu { image, tmp, .. } = self.conn {
            drop(image);
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// `path` (made by vmkeep) is still a regular file only its owner may read: `qemu-img
/// create` truncates an existing file and keeps its mode.
fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.mode() & 0o077 != 0 {
        return Err(Error::format(
            path,
            format!("mode {:04o}: expected a private file", meta.mode() & 0o7777),
        ));
    }
    Ok(())
}
