//! `update`: the hypervisor's inventory of VMs, kept in the repository (`allvm.toml`), so
//! that an administrator can see from the backups alone what the host ran.

use serde::{Deserialize, Serialize};

use crate::archive::profile::{self, Versioned, PROFILE_VERSION};
use crate::archive::Repository;
use crate::error::Result;
use crate::libvirt::{DiskSource, Hypervisor};

/// `REPO/allvm.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Profile format version (`format`, 1).
    pub format: u32,
    /// When `update` read the inventory (`updated`, RFC 3339 UTC).
    pub updated: String,
    /// The libvirt connection URI it was read from (`uri`).
    pub uri: String,
    /// One `[[vm]]` table per domain libvirt listed.
    #[serde(default, rename = "vm")]
    pub vms: Vec<InventoryVm>,
}

/// One domain of the inventory (a `[[vm]]` table of `allvm.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryVm {
    /// The libvirt domain name.
    pub name: String,
    /// The domain's UUID as libvirt formats it (36 characters with dashes).
    pub uuid: String,
    /// Its run state when the inventory was read (`running`, `shut off`, …).
    pub state: String,
    /// One `[[disk]]` table per disk of the domain.
    #[serde(default, rename = "disk")]
    pub disks: Vec<InventoryDisk>,
}

/// One disk of a domain in the inventory (a `[[disk]]` table of a `[[vm]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryDisk {
    /// `<target dev=…>`: the guest's name for the disk (vda, sdb…), the disk name backups use.
    pub target: String,
    /// What the guest sees (`disk`, `cdrom`, `floppy`, `lun`, …), in lowercase.
    pub device: String,
    /// `<driver type=…>`: the image format (qcow2, raw…), when the domain XML names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The host path of a file or block device source, or a one-line description of any other
    /// source (network, volume…); absent for a drive without a medium.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Guest-visible size in bytes; absent when libvirt could not tell (no medium, unreadable
    /// image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl Versioned for Inventory {
    fn version(&self) -> u32 {
        self.format
    }
}

/// Read the inventory from libvirt and store it in the repository.
pub fn update(repo: &Repository, hv: &Hypervisor) -> Result<Inventory> {
    let vms = hv
        .list_domains()?
        .into_iter()
        .map(|d| InventoryVm {
            name: d.name,
            uuid: d.uuid,
            state: d.state.to_string(),
            disks: d
                .disks
                .into_iter()
                .map(|k| InventoryDisk {
                    target: k.target,
                    device: format!("{:?}", k.device).to_lowercase(),
                    format: k.format,
                    path: match k.source {
                        DiskSource::File(p) | DiskSource::Block(p) => Some(p.display().to_string()),
                        DiskSource::Other(s) => Some(s),
                        DiskSource::None => None,
                    },
                    size: k.size,
                })
                .collect(),
        })
        .collect();
    let inv = Inventory {
        format: PROFILE_VERSION,
        updated: profile::now_rfc3339(),
        uri: hv.uri().to_string(),
        vms,
    };
    profile::store(&repo.inventory_path(), "vmkeep inventory", &inv)?;
    Ok(inv)
}
