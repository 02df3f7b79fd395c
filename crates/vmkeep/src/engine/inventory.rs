//! `update`: the hypervisor's inventory of VMs, kept in the repository (`allvm.toml`), so
//! that an administrator can see from the backups alone what the host ran.

use serde::{Deserialize, Serialize};

use crate::archive::lock::VmLock;
use crate::archive::profile::{self, HostRecord, Versioned, PROFILE_VERSION};
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
    /// The libvirt connection URI it was read from (`uri`; the first one when `update`
    /// asked several hosts), without user or password.
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
    /// The libvirt URI it was listed by, without user or password (`uri`); absent in
    /// inventories written before vmkeep recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The name of that libvirt host (`hostname`, `virConnectGetHostname`); absent as `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
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
    update_hosts(repo, &[hv], &[])
}

/// Read the inventory of every host in `hosts` (in order) and store it in the repository,
/// replacing the previous one; every VM records the URI and hostname it was listed by.
/// The previous inventory's VMs on the hosts `unreachable` names (URIs that did not
/// answer this time) are kept as they were.
pub fn update_hosts(
    repo: &Repository,
    hosts: &[&Hypervisor],
    unreachable: &[String],
) -> Result<Inventory> {
    let mut vms = Vec::new();
    for hv in hosts {
        let uri = public_uri(hv.uri());
        let hostname = hv.hostname()?;
        for d in hv.list_domains()? {
            vms.push(InventoryVm {
                name: d.name,
                uuid: d.uuid,
                state: d.state.to_string(),
                uri: Some(uri.clone()),
                hostname: Some(hostname.clone()),
                disks: d
                    .disks
                    .into_iter()
                    .map(|k| InventoryDisk {
                        target: k.target,
                        device: format!("{:?}", k.device).to_lowercase(),
                        format: k.format,
                        path: match k.source {
                            DiskSource::File(p) | DiskSource::Block(p) => {
                                Some(p.display().to_string())
                            }
                            DiskSource::Other(s) => Some(s),
                            DiskSource::None => None,
                        },
                        size: k.size,
                    })
                    .collect(),
            });
        }
    }
    if !unreachable.is_empty() {
        let gone: Vec<String> = unreachable.iter().map(|u| public_uri(u)).collect();
        if let Some(old) = load(repo)? {
            vms.extend(
                old.vms
                    .into_iter()
                    .filter(|v| v.uri.as_ref().is_some_and(|u| gone.contains(u))),
            );
        }
    }
    let inv = Inventory {
        format: PROFILE_VERSION,
        updated: profile::now_rfc3339(),
        uri: hosts
            .first()
            .map(|h| public_uri(h.uri()))
            .unwrap_or_default(),
        vms,
    };
    profile::store(&repo.inventory_path(), "vmkeep inventory", &inv)?;
    Ok(inv)
}

/// Where a backup found VM `vm`: `hv`'s URI and hostname, recorded in the VM's `vm.toml`
/// under its lock (a held lock is a `Busy` error: the record waits for the next backup).
pub fn record_host(repo: &Repository, vm: &str, hv: &Hypervisor) -> Result<HostRecord> {
    let host = HostRecord {
        uri: public_uri(hv.uri()),
        hostname: hv.hostname()?,
        time: profile::now_rfc3339(),
    };
    let dir = repo.vm_dir(vm)?;
    let _lock = VmLock::acquire(&dir, vm, "record the VM's host")?;
    let mut a = repo.vm(vm)?;
    a.profile.host = Some(host.clone());
    a.save_profile()?;
    Ok(host)
}

/// The stored inventory, if `update` ever ran.
pub fn load(repo: &Repository) -> Result<Option<Inventory>> {
    let path = repo.inventory_path();
    if !path.exists() {
        return Ok(None);
    }
    profile::load(&path).map(Some)
}

impl Inventory {
    /// The host the inventory lists VM `name` on (the first host that listed it), seen at
    /// the inventory's time; `None` for a VM it does not list or an inventory older than
    /// the per-VM host fields.
    pub fn host_of(&self, name: &str) -> Option<HostRecord> {
        let vm = self.vms.iter().find(|v| v.name == name)?;
        Some(HostRecord {
            uri: vm.uri.clone()?,
            hostname: vm.hostname.clone()?,
            time: self.updated.clone(),
        })
    }
}

/// A libvirt URI as vmkeep records and shows it: the `USER[:PASSWORD]@` of the authority
/// removed, the rest as configured.
pub fn public_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_uri_drops_user_and_password() {
        assert_eq!(public_uri("qemu:///system"), "qemu:///system");
        assert_eq!(
            public_uri("qemu+ssh://root@h1.example:2222/system?keyfile=/k"),
            "qemu+ssh://h1.example:2222/system?keyfile=/k"
        );
        assert_eq!(
            public_uri("qemu+tcp://alice:s3cret@10.0.0.5/system"),
            "qemu+tcp://10.0.0.5/system"
        );
        assert_eq!(
            public_uri("qemu+tcp://a:b@c@h/system"),
            "qemu+tcp://h/system"
        );
        assert_eq!(public_uri("qemu+ssh://u@h"), "qemu+ssh://h");
    }

    /// Profiles written before the host fields (no `uri`/`hostname` per VM, no `[host]`)
    /// still parse; the fields come back as written.
    #[test]
    fn profiles_without_host_fields_stay_readable() {
        let old_inventory = "format = 1\nupdated = \"2026-01-01T00:00:00Z\"\nuri = \"qemu:///system\"\n\n[[vm]]\nname = \"a\"\nuuid = \"u\"\nstate = \"running\"\n";
        let text = profile::render(
            "vmkeep inventory",
            &toml::from_str::<toml::Value>(old_inventory).unwrap(),
        )
        .unwrap();
        let inv: Inventory = profile::parse(std::path::Path::new("allvm.toml"), &text).unwrap();
        assert_eq!(inv.vms[0].uri, None);
        assert_eq!(inv.host_of("a"), None);
        let old_vm =
            "format = 1\nname = \"a\"\nblock_size = 65536\ncreated = \"2026-01-01T00:00:00Z\"\n";
        let text = profile::render(
            "vmkeep VM profile",
            &toml::from_str::<toml::Value>(old_vm).unwrap(),
        )
        .unwrap();
        let mut vp: profile::VmProfile =
            profile::parse(std::path::Path::new("vm.toml"), &text).unwrap();
        assert_eq!(vp.host, None);
        vp.host = Some(HostRecord {
            uri: "qemu+ssh://h1/system".into(),
            hostname: "h1.example".into(),
            time: "2026-01-02T00:00:00Z".into(),
        });
        let text = profile::render("vmkeep VM profile", &vp).unwrap();
        assert!(
            text.contains(
                "[host]\nuri = \"qemu+ssh://h1/system\"\nhostname = \"h1.example\"\ntime = "
            ),
            "{text}"
        );
        let back: profile::VmProfile =
            profile::parse(std::path::Path::new("vm.toml"), &text).unwrap();
        assert_eq!(back, vp);
    }
}
