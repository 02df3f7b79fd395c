//! Storage volumes: a restored disk put onto a (remote) host through libvirt's storage
//! API — a volume created in a pool, its content sent over libvirt's own connection
//! (`virStorageVolUpload`, a sparse stream: holes are sent as holes, not as zeros).
//! Nothing but the libvirt connection is needed, so the host's files need not be
//! visible here.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::{lv_error, xml, Hypervisor};
use crate::error::{Error, Result};

/// Bytes sent per stream message.
const CHUNK: usize = 1 << 20;

/// A storage volume vmkeep created for a restored disk.
pub struct Volume {
    vol: StorageVol,
    name: String,
    path: PathBuf,
    /// A raw volume, created as one hole: holes may be sent as holes. A receiver skips a
    /// hole rather than writing zeros, so into any other file (a qcow2 volume starts with
    /// the header `qemu-img create` wrote) everything is sent as data.
    sparse: bool,
}

impl Hypervisor {
    fn pool(&self, pool: &str) -> Result<StoragePool> {
        let p = self.conn.lookup_storage_pool_by_name(pool).map_err(|e| {
            Error::usage(format!(
                "storage pool {pool} on {}: {} (list them with `virsh pool-list --all`)",
                self.uri(),
                e.message()
            ))
        })?;
        if !p.is_active().map_err(|e| lv_error("", e.message()))? {
            return Err(Error::usage(format!(
                "storage pool {pool} on {} is not active (`virsh pool-start {pool}`)",
                self.uri()
            )));
        }
        Ok(p)
    }

    /// Whether pool `pool` has a volume `name`.
    pub fn volume_exists(&self, pool: &str, name: &str) -> Result<bool> {
        let p = self.pool(pool)?;
        let _ = p.refresh(0);
        Ok(p.lookup_storage_vol_by_name(name).is_ok())
    }

    /// Create volume `name` of `capacity` bytes in the format `format` (`qcow2`, `raw`) in
    /// pool `pool`. An existing volume of that name is refused, unless `replace`: then it
    /// is deleted first.
    pub fn create_volume(
        &self,
        pool: &str,
        name: &str,
        format: &str,
        capacity: u64,
        replace: bool,
    ) -> Result<Volume> {
        let p = self.pool(pool)?;
        let _ = p.refresh(0);
        if let Ok(old) = p.lookup_storage_vol_by_name(name) {
            if !replace {
                return Err(Error::usage(format!(
                    "volume {name} exists in pool {pool} on {} (remove it, or use --replace)",
                    self.uri()
                )));
            }
            old.delete(0).map_err(|e| {
                lv_error("", format!("cannot delete volume {name}: {}", e.message()))
            })?;
        }
        // Allocation 0: a sparse raw file, or a qcow2 file with no preallocated metadata,
        // so that nothing of the new file lies beyond what the upload writes.
        let doc = format!(
            "<volume><name>{}</name><capacity unit='bytes'>{capacity}</capacity>\
             <allocation unit='bytes'>0</allocation>\
             <target><format type='{}'/></target></volume>",
            xml::escape(name),
            xml::escape(format)
        );
        let vol = StorageVol::create_xml(&p, &doc, 0).map_err(|e| {
            lv_error(
                "",
                format!(
                    "cannot create volume {name} in pool {pool}: {}",
                    e.message()
                ),
            )
        })?;
        let path = vol
            .path()
            .map_err(|e| lv_error("", format!("volume {name}: {}", e.message())))?;
        Ok(Volume {
            vol,
            name: name.to_string(),
            path: PathBuf::from(path),
            sparse: format == "raw",
        })
    }
}

impl Volume {
    /// The volume's path on its host (what the domain XML names).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replace the volume's content by the local file `file` (into a raw volume holes are
    /// sent as holes); returns the data bytes sent. Afterwards libvirt must report the
    /// volume's capacity as `capacity` (what the image says; libvirt reads it back from
    /// the uploaded file) and its file as exactly as long as `file`: nothing of what was
    /// there before is left behind.
    pub fn upload_file(&self, hv: &Hypervisor, file: &Path, capacity: u64) -> Result<u64> {
        let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
        let len = f.metadata().map_err(|e| Error::io(file, e))?.len();
        let extents = if self.sparse {
            crate::fsutil::data_extents(&f, 0, len).map_err(|e| Error::io(file, e))?
        } else {
            vec![(0, len)]
        };
        let stream = Stream::new(&hv.conn, 0).map_err(|e| self.err(e.message()))?;
        let flags = if self.sparse {
            sys::VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM
        } else {
            0
        };
        self.vol
            .upload(&stream, 0, 0, flags)
            .map_err(|e| self.err(format!("cannot upload: {}", e.message())))?;
        let sent = match send_file(&stream, &f, &extents, len) {
            Ok(n) => n,
            Err(e) => {
                let _ = stream.abort();
                return Err(self.err(format!("upload of {} failed: {e}", file.display())));
            }
        };
        stream
            .finish()
            .map_err(|e| self.err(format!("upload did not complete: {}", e.message())))?;
        let info = self.vol.info().map_err(|e| self.err(e.message()))?;
        if info.capacity != capacity {
            return Err(self.err(format!(
                "after the upload libvirt reports a capacity of {} bytes, not {capacity}",
                info.capacity
            )));
        }
        // VIR_STORAGE_VOL_GET_PHYSICAL: `allocation` is then the file's length.
        let physical = self
            .vol
            .info_flags(sys::VIR_STORAGE_VOL_GET_PHYSICAL)
            .map_err(|e| self.err(e.message()))?
            .allocation;
        if physical != len {
            return Err(self.err(format!(
                "after the upload its file holds {physical} bytes, not the {len} sent"
            )));
        }
        Ok(sent)
    }

    /// Delete the volume (after a failed restore).
    pub fn delete(self) {
        let _ = self.vol.delete(0);
    }

    fn err(&self, detail: impl std::fmt::Display) -> Error {
        lv_error("", format!("volume {}: {detail}", self.name))
    }
}

/// Send `len` bytes of `f`: its data `extents` (start, length) as data, the gaps as holes.
fn send_file(
    stream: &Stream,
    f: &std::fs::File,
    extents: &[(u64, u64)],
    len: u64,
) -> std::result::Result<u64, String> {
    let mut pos = 0u64;
    let mut sent = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for &(start, length) in extents {
        let end = start + length;
        if start > pos {
            send_hole(stream, start - pos)?;
        }
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..n], at)
                .map_err(|e| format!("read at {at}: {e}"))?;
            send_all(stream, &buf[..n])?;
            at += n as u64;
            sent += n as u64;
        }
        pos = end;
    }
    if len > pos {
        send_hole(stream, len - pos)?;
    }
    Ok(sent)
}

fn send_all(stream: &Stream, mut data: &[u8]) -> std::result::Result<(), String> {
    while !data.is_empty() {
        let n = stream.send(data).map_err(|e| e.message().to_string())?;
        if n <= 0 {
            return Err("the stream accepted no data".into());
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn send_hole(stream: &Stream, mut length: u64) -> std::result::Result<(), String> {
    // A hole message carries a signed 64-bit length; send very long holes in pieces.
    while length > 0 {
        let n = length.min(i64::MAX as u64);
        super::ffi::stream_send_hole(stream, n as i64).map_err(|e| e.message)?;
        length -= n;
    }
    Ok(())
}
