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
    pub format: u32,
    pub updated: String,
    pub uri: String,
    #[serde(default, rename = "vm")]
    pub vms: Vec<InventoryVm>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryVm {
    pub name: String,
    pub uuid: String,
    pub state: String,
    #[serde(default, rename = "disk")]
    pub disks: Vec<InventoryDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InventoryDisk {
    pub target: String,
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
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
