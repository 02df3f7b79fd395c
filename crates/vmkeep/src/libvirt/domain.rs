//! One libvirt connection ([`Hypervisor`]) and one VM ([`Domain`]): the inventory, the
//! run state, the definitions, starting and stopping, and defining a restored copy.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::process::Command;

use virt::connect::Connect;
use virt::domain::Domain as VirtDomain;
use virt::error::ErrorNumber;
use virt::sys;

use super::xml::{self, CopySpec, DiskDevice, DiskSource};
use super::{ffi, lv_error, DEFAULT_URI};
use crate::error::{Error, Result};

/// The XML namespace of vmkeep's element in a running VM's metadata.
const MARKER_NS: &str = "urn:vmkeep:live:1";
/// The namespace of vmkeep's mark on a guest whose file systems it froze (live metadata,
/// removed after the thaw; what a killed run leaves, the next run thaws).
const FROZEN_NS: &str = "urn:vmkeep:frozen:1";
/// The namespace prefix libvirt writes for it.
const MARKER_PREFIX: &str = "vmkeep";

/// What [`Domain::start_paused`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// vmkeep started the VM, paused.
    Paused,
    /// The VM was already running (or being started by someone else): vmkeep did nothing.
    AlreadyActive,
}

/// A VM's run state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// libvirt reports no state, or one this build does not know (`VIR_DOMAIN_NOSTATE`).
    NoState,
    /// QEMU runs the guest (`VIR_DOMAIN_RUNNING`).
    Running,
    /// The guest is blocked on a resource (`VIR_DOMAIN_BLOCKED`); QEMU still runs.
    Blocked,
    /// The guest's CPUs are paused (`VIR_DOMAIN_PAUSED`); QEMU runs and serves NBD.
    Paused,
    /// The guest is shutting down (`VIR_DOMAIN_SHUTDOWN`); QEMU still runs.
    ShuttingDown,
    /// No QEMU process (`VIR_DOMAIN_SHUTOFF`): the disks can be read as files.
    ShutOff,
    /// The guest crashed and QEMU is gone (`VIR_DOMAIN_CRASHED`).
    Crashed,
    /// The guest is suspended by power management (`VIR_DOMAIN_PMSUSPENDED`); QEMU still runs.
    Suspended,
}

impl DomainState {
    fn from_raw(raw: sys::virDomainState) -> Self {
        match raw {
            sys::VIR_DOMAIN_RUNNING => DomainState::Running,
            sys::VIR_DOMAIN_BLOCKED => DomainState::Blocked,
            sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
            sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
            sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
            sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => DomainState::Suspended,
            _ => DomainState::NoState,
        }
    }

    /// Whether QEMU runs (a pull backup needs it; a paused VM still serves NBD).
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            DomainState::ShutOff | DomainState::Crashed | DomainState::NoState
        )
    }
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainState::NoState => "no state",
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "shutting down",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::Suspended => "suspended",
        })
    }
}

/// A disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// vda, sdb… (also the NBD export name of a pull backup).
    pub target: String,
    /// What kind of device the guest sees (disk, cdrom, ...).
    pub device: DiskDevice,
    /// qcow2, raw…
    pub format: Option<String>,
    /// Where the disk's data lives on the host, from the live XML.
    pub source: DiskSource,
    /// `<readonly/>`: the guest cannot write the disk; such disks are not backed up.
    pub readonly: bool,
    /// Guest-visible size in bytes; `None` when unknown (no medium, unreadable image).
    pub size: Option<u64>,
}

/// A VM as the inventory shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// The libvirt domain name, also the VM's name in the repository.
    pub name: String,
    /// The domain's UUID as libvirt formats it (36 characters with dashes).
    pub uuid: String,
    /// The run state when the inventory was read.
    pub state: DomainState,
    /// Every `<disk>` of the live definition, in document order, backed up or not.
    pub disks: Vec<DiskInfo>,
}

/// A connection to libvirt.
pub struct Hypervisor {
    pub(super) conn: Connect,
    uri: String,
}

impl Hypervisor {
    /// Connect read-write to `uri` ([`DEFAULT_URI`] when `None`).
    pub fn connect(uri: Option<&str>) -> Result<Self> {
        let uri = uri.unwrap_or(DEFAULT_URI).to_string();
        // libvirt's default handler prints every error on stderr; vmkeep reports them.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&uri)).map_err(|e| {
            let shown = crate::engine::inventory::public_uri(&uri);
            lv_error("", format!("cannot connect to {shown}: {}", e.message()))
        })?;
        Ok(Hypervisor { conn, uri })
    }

    /// The libvirt URI this connection was opened with (e.g. `qemu:///system`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the connection is to this machine: a URI with no host part
    /// (`qemu:///system`, `qemu+unix:///system`). Any URI naming a host, even
    /// `localhost`, is treated as remote: its files are not assumed to be visible here.
    pub fn is_local(&self) -> bool {
        uri_is_local(&self.uri)
    }

    /// The name of the host libvirt runs on (`virConnectGetHostname`): the remote
    /// system's for a remote URI.
    pub fn hostname(&self) -> Result<String> {
        self.conn.hostname().map_err(|e| {
            lv_error(
                "",
                format!("cannot ask {} for its hostname: {}", self.uri, e.message()),
            )
        })
    }

    /// Every VM libvirt knows, running or defined, with its disks.
    pub fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        let all = self
            .conn
            .list_all_domains(0)
            .map_err(|e| lv_error("", format!("cannot list VMs: {}", e.message())))?;
        let mut out = Vec::with_capacity(all.len());
        for dom in all {
            let name = dom.name().map_err(|e| lv_error("", e.message()))?;
            match (Domain {
                dom,
                name: name.clone(),
                local: self.is_local(),
            })
            .info()
            {
                Ok(info) => out.push(info),
                // A VM undefined between the listing and the query is simply gone.
                Err(_) if self.conn.lookup_domain_by_name(&name).is_err() => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The VM called `name`; an unknown name is a usage error.
    pub fn domain(&self, name: &str) -> Result<Domain> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Domain {
                dom,
                name: name.to_string(),
                local: self.is_local(),
            }),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => {
                Err(Error::usage(format!("unknown VM {name} on {}", self.uri)))
            }
            Err(e) => Err(lv_error(name, e.message())),
        }
    }

    /// Names of the libvirt networks defined on the host (active or not).
    pub fn list_networks(&self) -> Result<Vec<String>> {
        let nets = self
            .conn
            .list_all_networks(0)
            .map_err(|e| lv_error("", format!("cannot list networks: {}", e.message())))?;
        let mut names = nets
            .iter()
            .map(|n| n.name().map_err(|e| lv_error("", e.message())))
            .collect::<Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    /// Define a new VM from a saved definition (see [`xml::copy_domain_xml`]): new name,
    /// new UUID, fresh MACs, the disks of `spec`. An existing VM of that name is an error
    /// unless `spec.replace`, and a running one is never replaced.
    pub fn define_copy(&self, saved_xml: &str, spec: &CopySpec) -> Result<Domain> {
        let networks = self.list_networks()?;
        let mut used = BTreeSet::new();
        let mut mac = || loop {
            let bytes = *uuid::Uuid::new_v4().as_bytes();
            let tail = [bytes[0], bytes[1], bytes[2]];
            if used.insert(tail) {
                return tail;
            }
        };
        let new_xml = xml::copy_domain_xml(saved_xml, spec, &networks, &mut mac)?;
        let name = &spec.new_name;
        let replaced = match self.conn.lookup_domain_by_name(name) {
            Err(e) if e.code().is(ErrorNumber::NoDomain) => None,
            Err(e) => return Err(lv_error(name, e.message())),
            Ok(_) if !spec.replace => {
                return Err(Error::usage(format!(
                    "VM {name} already exists on {} (choose another name or replace it)",
                    self.uri
                )))
            }
            Ok(dom) => {
                let old = Domain {
                    dom,
                    name: name.clone(),
                    local: self.is_local(),
                };
                if old.state()?.is_active() {
                    return Err(Error::usage(format!(
                        "VM {name} is running; vmkeep never replaces a running VM"
                    )));
                }
                let old_xml = old.xml()?;
                old.undefine()?;
                Some(old_xml)
            }
        };
        match self.conn.define_domain_xml(&new_xml) {
            Ok(dom) => Ok(Domain {
                dom,
                name: name.clone(),
                local: self.is_local(),
            }),
            Err(e) => {
                if let Some(old_xml) = replaced {
                    // Put the replaced VM back rather than leave nothing.
                    let _ = self.conn.define_domain_xml(&old_xml);
                }
                Err(lv_error(
                    name,
                    format!("cannot define the copy: {}", e.message()),
                ))
            }
        }
    }
}

/// One VM.
pub struct Domain {
    pub(super) dom: VirtDomain,
    pub(super) name: String,
    /// Whether its host is this machine ([`Hypervisor::is_local`]): only then are its
    /// image paths files here.
    pub(super) local: bool,
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Domain").field("name", &self.name).finish()
    }
}

impl Domain {
    /// The domain's libvirt name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn err(&self, detail: impl fmt::Display) -> Error {
        lv_error(&self.name, detail)
    }

    /// The domain's UUID as libvirt formats it; fails with [`Error::Source`] if libvirt cannot
    /// answer.
    pub fn uuid(&self) -> Result<String> {
        self.dom.uuid_string().map_err(|e| self.err(e.message()))
    }

    /// The current run state, asked from libvirt on each call; a state libvirt adds later reads as
    /// [`DomainState::NoState`].
    pub fn state(&self) -> Result<DomainState> {
        let (state, _) = self.dom.state().map_err(|e| self.err(e.message()))?;
        Ok(match state {
            virt::enumutil::Enum::Known(_) => DomainState::from_raw(state.to_raw()),
            virt::enumutil::Enum::Unknown(_) => DomainState::NoState,
        })
    }

    /// The persistent configuration with secrets, as a backup archives it
    /// (`VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_SECURE`).
    pub fn xml(&self) -> Result<String> {
        self.dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(|e| self.err(e.message()))
    }

    /// The live configuration (actual image paths, QEMU's security label).
    pub fn live_xml(&self) -> Result<String> {
        self.dom.xml_desc(0).map_err(|e| self.err(e.message()))
    }

    /// Name, UUID, state and disks with their sizes.
    pub fn info(&self) -> Result<DomainInfo> {
        let parsed = xml::parse_domain(&self.live_xml()?)?;
        let disks = parsed
            .disks
            .into_iter()
            .map(|d| DiskInfo {
                size: self.disk_size(&d),
                target: d.target,
                device: d.device,
                format: d.format,
                source: d.source,
                readonly: d.readonly,
            })
            .collect();
        Ok(DomainInfo {
            name: self.name.clone(),
            uuid: self.uuid()?,
            state: self.state()?,
            disks,
        })
    }

    /// `virDomainGetBlockInfo`, else (on a local host only: a remote host's paths are not
    /// files here) `qemu-img info -U` of the image, else its file size.
    fn disk_size(&self, disk: &xml::DiskXml) -> Option<u64> {
        if disk.source == DiskSource::None {
            return None;
        }
        if let Ok(size) = ffi::block_capacity(&self.dom, &disk.target) {
            return Some(size);
        }
        if !self.local {
            return None;
        }
        let path = disk.source.path()?;
        qemu_img_virtual_size(path).or_else(|| std::fs::metadata(path).ok().map(|m| m.len()))
    }

    /// Boot the defined VM (`virDomainCreate`); fails if it is already running.
    pub fn start(&self) -> Result<()> {
        self.dom
            .create()
            .map(drop)
            .map_err(|e| self.err(format!("cannot start: {}", e.message())))
    }

    /// Stop the VM at once (pull the plug).
    pub fn destroy(&self) -> Result<()> {
        self.dom
            .destroy()
            .map_err(|e| self.err(format!("cannot stop: {}", e.message())))
    }

    /// Boot the defined VM with its CPUs paused (`VIR_DOMAIN_START_PAUSED`): QEMU runs and
    /// can serve a backup job, the guest runs no code. [`Started::AlreadyActive`] when the
    /// VM was not shut off (someone else started it first; libvirt serialises starts).
    pub fn start_paused(&self) -> Result<Started> {
        match self.dom.create_with_flags(sys::VIR_DOMAIN_START_PAUSED) {
            Ok(_) => Ok(Started::Paused),
            Err(e) if self.state().is_ok_and(|s| s.is_active()) => {
                tracing::debug!("{}: start --paused: {}", self.name, e.message());
                Ok(Started::AlreadyActive)
            }
            Err(e) => Err(self.err(format!("cannot start paused: {}", e.message()))),
        }
    }

    /// Stop the VM the way QEMU ends cleanly (SIGTERM only,
    /// `VIR_DOMAIN_DESTROY_GRACEFUL`), so that it writes its persistent dirty bitmaps into
    /// the images; when QEMU does not end in time, pull the plug.
    pub fn destroy_graceful(&self) -> Result<()> {
        match self.dom.destroy_flags(sys::VIR_DOMAIN_DESTROY_GRACEFUL) {
            Ok(()) => Ok(()),
            Err(e) if !self.state().is_ok_and(|s| s.is_active()) => {
                tracing::debug!("{}: destroy --graceful: {}", self.name, e.message());
                Ok(())
            }
            Err(e) => {
                tracing::debug!("{}: destroy --graceful: {}", self.name, e.message());
                self.destroy()
            }
        }
    }

    /// Whether the VM has a managed-save image (`virsh managedsave`): starting it would
    /// resume the saved memory state, not boot.
    pub fn has_managed_save(&self) -> Result<bool> {
        self.dom
            .has_managed_save(0)
            .map_err(|e| self.err(e.message()))
    }

    /// Set (`Some`) or remove (`None`) vmkeep's element in the *running* VM's metadata
    /// (`VIR_DOMAIN_AFFECT_LIVE` only: it ends with the QEMU process and never reaches the
    /// persistent definition). `xml` is one element, e.g. `<started .../>`.
    pub fn set_live_marker(&self, xml: Option<&str>) -> Result<()> {
        self.set_marker_in(MARKER_NS, xml)
    }

    /// vmkeep's element in the running VM's metadata, `None` when there is none.
    pub fn live_marker(&self) -> Result<Option<String>> {
        self.marker_in(MARKER_NS)
    }

    /// Set or remove vmkeep's frozen-guest mark (live metadata, as [`Self::set_live_marker`]).
    pub fn set_frozen_marker(&self, xml: Option<&str>) -> Result<()> {
        self.set_marker_in(FROZEN_NS, xml)
    }

    /// vmkeep's frozen-guest mark, `None` when there is none.
    pub fn frozen_marker(&self) -> Result<Option<String>> {
        self.marker_in(FROZEN_NS)
    }

    /// Freeze every file system of the guest through its agent, waiting at most
    /// `timeout_secs` for the agent's answer: the number frozen. No agent, or one that
    /// does not answer in time, is an error. libvirt's wait for the agent is put back to
    /// its default afterwards.
    pub fn fs_freeze(&self, timeout_secs: i32) -> Result<u32> {
        let _ = ffi::agent_timeout(&self.dom, timeout_secs);
        let frozen = ffi::fs_freeze(&self.dom);
        let _ = ffi::agent_timeout(&self.dom, sys::VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT);
        frozen.map_err(|e| self.err(format!("cannot freeze the guest's file systems: {e}")))
    }

    /// Thaw every file system of the guest: the number thawed (0 when none was frozen).
    pub fn fs_thaw(&self, timeout_secs: i32) -> Result<u32> {
        let _ = ffi::agent_timeout(&self.dom, timeout_secs);
        let thawed = ffi::fs_thaw(&self.dom);
        let _ = ffi::agent_timeout(&self.dom, sys::VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT);
        thawed.map_err(|e| self.err(format!("cannot thaw the guest's file systems: {e}")))
    }

    fn set_marker_in(&self, ns: &str, xml: Option<&str>) -> Result<()> {
        self.dom
            .set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                xml,
                xml.map(|_| MARKER_PREFIX),
                Some(ns),
                sys::VIR_DOMAIN_AFFECT_LIVE,
            )
            .map_err(|e| self.err(format!("cannot set live metadata: {}", e.message())))
    }

    fn marker_in(&self, ns: &str) -> Result<Option<String>> {
        match self.dom.metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(ns),
            sys::VIR_DOMAIN_AFFECT_LIVE,
        ) {
            Ok(xml) => Ok(Some(xml)),
            Err(e)
                if matches!(
                    e.code(),
                    virt::enumutil::Enum::Known(ErrorNumber::NoDomainMetadata)
                ) =>
            {
                Ok(None)
            }
            // An inactive domain has no live metadata.
            Err(_) if !self.state()?.is_active() => Ok(None),
            Err(e) => Err(self.err(format!("cannot read live metadata: {}", e.message()))),
        }
    }

    /// Remove the VM's definition with its snapshot and checkpoint metadata, managed-save
    /// image and NVRAM (disk images stay).
    pub fn undefine(&self) -> Result<()> {
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        self.dom
            .undefine_flags(flags)
            .map_err(|e| self.err(format!("cannot undefine: {}", e.message())))
    }

    /// Start pulling every block of disk `target`'s backing chain into its top image
    /// (`virsh blockpull`); when the job completes the disk has no backing store.
    pub fn block_pull(&self, target: &str) -> Result<()> {
        ffi::block_pull(&self.dom, target)
            .map_err(|e| self.err(format!("cannot pull disk {target}: {e}")))
    }

    /// The progress of disk `target`'s block job: `None` without one, else (bytes done,
    /// bytes in all).
    pub fn block_job_progress(&self, target: &str) -> Result<Option<(u64, u64)>> {
        ffi::block_job_progress(&self.dom, target)
            .map_err(|e| self.err(format!("block job of disk {target}: {e}")))
    }

    /// QEMU's group (from the running VM's DAC label), `None` if QEMU runs as the caller.
    pub fn qemu_gid(&self) -> Result<Option<u32>> {
        Ok(xml::parse_domain(&self.live_xml()?)?
            .qemu_ids
            .map(|(_, gid)| gid))
    }
}

/// The host a libvirt URI names (`qemu+ssh://root@hv1:2222/system` → `hv1`; an IPv6
/// literal without its brackets); `None` for a local URI.
pub fn uri_host(uri: &str) -> Option<String> {
    let (_, rest) = uri.split_once("://")?;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        hostport.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// Whether a libvirt URI has no host part (see [`Hypervisor::is_local`]).
pub(crate) fn uri_is_local(uri: &str) -> bool {
    match uri.split_once("://") {
        Some((_, rest)) => rest.starts_with('/'),
        // A bare alias or driver name ("qemu"): libvirt resolves it locally unless an alias
        // in libvirt.conf says otherwise; not provably local.
        None => false,
    }
}

fn qemu_img_virtual_size(path: &Path) -> Option<u64> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    info.get("virtual-size")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_state_names() {
        assert_eq!(DomainState::ShutOff.to_string(), "shut off");
        assert!(DomainState::Paused.is_active());
        assert!(!DomainState::ShutOff.is_active());
    }

    #[test]
    fn only_uris_without_a_host_are_local() {
        assert!(uri_is_local("qemu:///system"));
        assert!(uri_is_local("qemu+unix:///system"));
        assert!(uri_is_local("qemu:///session"));
        assert!(!uri_is_local("qemu+ssh://root@localhost/system"));
        assert!(!uri_is_local("qemu+tcp://127.0.0.1/system"));
        assert!(!uri_is_local("qemu+tls://host.example/system"));
        assert!(!uri_is_local("qemu"));
    }

    #[test]
    fn the_host_of_a_libvirt_uri() {
        assert_eq!(uri_host("qemu:///system"), None);
        assert_eq!(
            uri_host("qemu+ssh://root@hv1.example:2222/system?keyfile=/k").as_deref(),
            Some("hv1.example")
        );
        assert_eq!(
            uri_host("qemu+tls://10.0.0.5/system").as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(
            uri_host("qemu+tcp://[fd00::5]:16509/system").as_deref(),
            Some("fd00::5")
        );
    }
}
