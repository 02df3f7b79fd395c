//! Checkpoints of a VM: listing, creating (outside a backup) and deleting them, and
//! finding the disks whose bitmap of a checkpoint QEMU cannot use. See the module docs of
//! [`crate::libvirt`] on how vmkeep uses checkpoints.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use virt::error::ErrorNumber;
use virt::sys;

use super::xml::{self, CheckpointInfo, DiskDevice};
use super::{ffi, Domain};
use crate::error::Result;

impl Domain {
    /// All checkpoints, parents before children.
    ///
    /// Listing races with another run creating or deleting a checkpoint of the same VM
    /// (another repository's, at the same time): libvirt then fails the listing ("name
    /// ... must not be NULL") or a listed checkpoint is gone before its XML is read. Such
    /// a listing is tried again, a bounded number of times.
    pub fn list_checkpoints(&self) -> Result<Vec<CheckpointInfo>> {
        let mut tries = 0;
        loop {
            match self.list_checkpoints_once() {
                Err(_) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    fn list_checkpoints_once(&self) -> Result<Vec<CheckpointInfo>> {
        let handles =
            ffi::list_all_checkpoints(&self.dom, sys::VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
                .map_err(|e| self.err(format!("cannot list checkpoints: {e}")))?;
        handles
            .iter()
            .map(|c| {
                let text = c
                    .xml_desc(sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
                    .map_err(|e| self.err(e))?;
                xml::parse_checkpoint(&text)
            })
            .collect()
    }

    /// The checkpoint `name`; a missing one is a source error naming it.
    pub fn checkpoint(&self, name: &str) -> Result<CheckpointInfo> {
        let handle = self.lookup_checkpoint(name)?;
        let text = handle
            .xml_desc(sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
            .map_err(|e| self.err(e))?;
        xml::parse_checkpoint(&text)
    }

    fn lookup_checkpoint(&self, name: &str) -> Result<ffi::Checkpoint> {
        ffi::checkpoint_lookup(&self.dom, name).map_err(|e| {
            if e.is(ErrorNumber::NoDomainCheckpoint) {
                self.err(format!("no checkpoint named '{name}'"))
            } else {
                self.err(format!("checkpoint '{name}': {e}"))
            }
        })
    }

    /// Checkpoint `name`'s XML as libvirt describes it, without its `<domain>`: what
    /// [`Domain::redefine_checkpoint`] takes should libvirt lose the checkpoint.
    pub fn checkpoint_xml(&self, name: &str) -> Result<String> {
        self.lookup_checkpoint(name)?
            .xml_desc(sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
            .map_err(|e| self.err(format!("checkpoint '{name}': {e}")))
    }

    /// Give libvirt back checkpoint `name` from its saved XML `xml`
    /// (`VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE` with `_VALIDATE`: libvirt checks that every
    /// disk the checkpoint tracks carries its bitmap, consistent). The XML must name
    /// `name`; its `<parent>` is dropped (older checkpoints are gone by design). Needs a
    /// running VM.
    pub fn redefine_checkpoint(&self, name: &str, xml: &str) -> Result<()> {
        let saved = xml::parse_checkpoint(xml)?;
        if saved.name != name {
            return Err(self.err(format!(
                "the saved checkpoint XML names checkpoint '{}', not '{name}'",
                saved.name
            )));
        }
        let text = xml::without_parent(xml)?;
        ffi::checkpoint_create_xml(
            &self.dom,
            &text,
            sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                | sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE,
        )
        .map(drop)
        .map_err(|e| self.err(format!("cannot redefine checkpoint '{name}': {e}")))
    }

    /// The disks whose bitmap of checkpoint `name` QEMU cannot use: missing from the image
    /// or marked inconsistent (QEMU was killed, or the host crashed, before it saved the
    /// bitmap). libvirt reports a bitmap's size (`VIR_DOMAIN_CHECKPOINT_XML_SIZE`) only
    /// for a bitmap it found and QEMU can read, so a tracked disk without a size is broken.
    /// Needs a running VM; an error means the bitmaps could not be proven intact.
    pub fn broken_checkpoint_disks(&self, name: &str) -> Result<Vec<String>> {
        let handle = self.lookup_checkpoint(name)?;
        let text = handle
            .xml_desc(
                sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN | sys::VIR_DOMAIN_CHECKPOINT_XML_SIZE,
            )
            .map_err(|e| self.err(format!("checkpoint '{name}': {e}")))?;
        Ok(xml::checkpoint_bitmap_sizes(&text)?
            .into_iter()
            .filter(|(_, size)| size.is_none())
            .map(|(disk, _)| disk)
            .collect())
    }

    /// Whether the VM has a checkpoint named `name`; an error other than "no such checkpoint"
    /// is [`crate::error::Error::Source`].
    pub fn checkpoint_exists(&self, name: &str) -> Result<bool> {
        match ffi::checkpoint_lookup(&self.dom, name) {
            Ok(_) => Ok(true),
            Err(e) if e.is(ErrorNumber::NoDomainCheckpoint) => Ok(false),
            Err(e) => Err(self.err(format!("checkpoint '{name}': {e}"))),
        }
    }

    /// Create a checkpoint outside a backup, tracking `disks` (all qcow2 disks when
    /// empty). Needs a running VM.
    pub fn create_checkpoint(&self, name: &str, disks: &[&str]) -> Result<CheckpointInfo> {
        self.create_checkpoint_with(name, None, disks)
    }

    /// [`Domain::create_checkpoint`] with a description.
    pub fn create_checkpoint_with(
        &self,
        name: &str,
        description: Option<&str>,
        disks: &[&str],
    ) -> Result<CheckpointInfo> {
        let live = xml::parse_domain(&self.live_xml()?)?;
        let tracked: Vec<&str> = live
            .disks
            .iter()
            .filter(|d| {
                d.can_checkpoint() && (disks.is_empty() || disks.contains(&d.target.as_str()))
            })
            .map(|d| d.target.as_str())
            .collect();
        let untracked = untracked_disks(&live, &tracked);
        let text = xml::checkpoint_xml(name, description, &tracked, &untracked);
        let handle = ffi::checkpoint_create_xml(&self.dom, &text, 0)
            .map_err(|e| self.err(format!("cannot create checkpoint '{name}': {e}")))?;
        xml::parse_checkpoint(
            &handle
                .xml_desc(sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
                .map_err(|e| self.err(e))?,
        )
    }

    /// Delete a checkpoint. On a shut-off VM, where libvirt 9.0 refuses, the metadata is
    /// deleted and the qcow2 bitmaps removed with `qemu-img bitmap --remove`.
    pub fn delete_checkpoint(&self, name: &str, how: CheckpointDelete) -> Result<()> {
        let handle = self.lookup_checkpoint(name)?;
        let offline = !how.metadata_only && !self.state()?.is_active();
        if offline && how.children {
            return Err(self.err(format!(
                "cannot delete checkpoint '{name}' with its children while the VM is shut off"
            )));
        }
        let bitmaps = if offline {
            self.checkpoint(name)?.disks
        } else {
            Vec::new()
        };
        let mut flags = 0;
        if how.metadata_only || offline {
            flags |= sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY;
        }
        if how.children {
            flags |= sys::VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN;
        }
        handle
            .delete(flags)
            .map_err(|e| self.err(format!("cannot delete checkpoint '{name}': {e}")))?;
        if offline {
            let config = xml::parse_domain(&self.xml()?)?;
            for (target, bitmap) in bitmaps {
                let Some(disk) = config.disk(&target) else {
                    continue;
                };
                if let Some(path) = disk.source.path() {
                    remove_qcow2_bitmap(path, &bitmap).map_err(|e| self.err(e))?;
                    // As libvirt does for a running VM: also from the layers below, where an
                    // external snapshot left the bitmap (see `source::chain`).
                    let format = disk.format.as_deref().unwrap_or("qcow2");
                    for layer in lower_layers_holding(path, format, &bitmap) {
                        remove_qcow2_bitmap(&layer, &bitmap).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// How [`Domain::delete_checkpoint`] deletes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointDelete {
    /// Forget the checkpoint but leave the bitmaps in the images
    /// (`VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY`).
    pub metadata_only: bool,
    /// Delete its descendants too (`VIR_DOMAIN_CHECKPOINT_DELETE_CHILDREN`).
    pub children: bool,
}

/// The images below the top `path` (in `format`) of a backing chain that hold bitmap
/// `bitmap`; none when the chain cannot be read (the top's is removed all the same).
fn lower_layers_holding(path: &Path, format: &str, bitmap: &str) -> Vec<std::path::PathBuf> {
    let Ok(layers) = crate::source::chain::layers(path, format) else {
        return Vec::new();
    };
    layers
        .into_iter()
        .skip(1)
        .filter(|l| l.bitmap(bitmap).is_some())
        .map(|l| l.path)
        .collect()
}

fn remove_qcow2_bitmap(image: &Path, bitmap: &str) -> std::result::Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(image)
        .arg(bitmap)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Already gone is what we wanted.
    if stderr.contains("not found") {
        return Ok(());
    }
    Err(format!(
        "qemu-img bitmap --remove {} {bitmap}: {}",
        image.display(),
        stderr.trim()
    ))
}

/// The VM's disks (not CD-ROMs) outside `tracked`: a checkpoint names them `checkpoint='no'`.
pub(super) fn untracked_disks<'a>(live: &'a xml::DomainXml, tracked: &[&str]) -> Vec<&'a str> {
    live.disks
        .iter()
        .filter(|d| matches!(d.device, DiskDevice::Disk | DiskDevice::Lun))
        .map(|d| d.target.as_str())
        .filter(|t| !tracked.contains(t))
        .collect()
}
