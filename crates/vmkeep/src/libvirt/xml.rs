//! The libvirt XML that vmkeep reads and writes, as pure functions: domain disks and
//! interfaces, the `<domainbackup>` and `<domaincheckpoint>` documents a pull backup
//! starts with, checkpoint descriptions, and the rewrite of a saved domain definition into
//! a copy. Nothing here talks to libvirt, so all of it is unit-tested.
//!
//! Reading uses `roxmltree`. Rewriting splices the original text at the byte ranges
//! `roxmltree` reports instead of re-serialising a tree, so everything vmkeep does not
//! mean to change (comments, element order, metadata of other tools) stays as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};

use crate::error::{Error, Result};

/// What kind of device a domain disk is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDevice {
    /// `device='disk'` (also the default when the attribute is absent): an ordinary virtual disk.
    Disk,
    /// `device='cdrom'`: a CD-ROM drive; never backed up.
    Cdrom,
    /// `device='floppy'`: a floppy drive; never backed up.
    Floppy,
    /// `device='lun'`: a SCSI LUN passed through to the guest; backed up like a disk.
    Lun,
    /// Any other `device=` value, kept verbatim; never backed up.
    Other(String),
}

impl DiskDevice {
    fn parse(value: &str) -> Self {
        match value {
            "disk" => DiskDevice::Disk,
            "cdrom" => DiskDevice::Cdrom,
            "floppy" => DiskDevice::Floppy,
            "lun" => DiskDevice::Lun,
            other => DiskDevice::Other(other.to_string()),
        }
    }

    /// The `device=` attribute value as libvirt writes it (`disk`, `cdrom`, ...).
    pub fn as_str(&self) -> &str {
        match self {
            DiskDevice::Disk => "disk",
            DiskDevice::Cdrom => "cdrom",
            DiskDevice::Floppy => "floppy",
            DiskDevice::Lun => "lun",
            DiskDevice::Other(s) => s,
        }
    }
}

/// Where a domain disk's data lives on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// No medium (an empty CD-ROM drive).
    None,
    /// `<disk type='file'>`: an image file.
    File(PathBuf),
    /// `<disk type='block'>`: a block device.
    Block(PathBuf),
    /// Anything else (network, volume, nvme…), described in one line.
    Other(String),
}

impl DiskSource {
    /// The host path, for file and block sources.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DiskSource::File(p) | DiskSource::Block(p) => Some(p),
            _ => None,
        }
    }
}

/// A disk as the domain XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskXml {
    /// `<target dev=…>`: vda, sdb…; also the NBD export name of a pull backup.
    pub target: String,
    /// `<disk device=…>`: what kind of device the guest sees.
    pub device: DiskDevice,
    /// `<driver type=…>`: qcow2, raw…
    pub format: Option<String>,
    /// Where the disk's data lives on the host (`<source>`).
    pub source: DiskSource,
    /// `<readonly/>`: the guest cannot write the disk; such disks are not backed up.
    pub readonly: bool,
}

impl DiskXml {
    /// Whether a pull backup can include the disk: a writable disk with a medium.
    pub fn backupable(&self) -> bool {
        matches!(self.device, DiskDevice::Disk | DiskDevice::Lun)
            && !self.readonly
            && self.source != DiskSource::None
    }

    /// Whether the disk can carry a checkpoint bitmap (QEMU keeps persistent bitmaps in
    /// qcow2 only).
    pub fn can_checkpoint(&self) -> bool {
        self.backupable() && self.format.as_deref() == Some("qcow2")
    }
}

/// The parts of a domain definition vmkeep needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    /// `<name>`: the libvirt domain name, which is also the VM's name in the repository.
    pub name: String,
    /// `<uuid>`, as libvirt writes it; `None` when the XML has none.
    pub uuid: Option<String>,
    /// The `<disk>` elements under `<devices>`, in document order.
    pub disks: Vec<DiskXml>,
    /// The uid and gid QEMU runs as, from the live XML's DAC `<seclabel>` label
    /// (`+64055:+64055`); `None` in the inactive XML or without the DAC driver.
    pub qemu_ids: Option<(u32, u32)>,
}

impl DomainXml {
    /// The disk whose `<target dev=…>` is `target`, if the domain has one.
    pub fn disk(&self, target: &str) -> Option<&DiskXml> {
        self.disks.iter().find(|d| d.target == target)
    }
}

fn parse_doc<'x>(xml: &'x str, what: &str) -> Result<Document<'x>> {
    Document::parse(xml).map_err(|e| Error::source("libvirt XML", format!("{what}: {e}")))
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn child_text(node: Node<'_, '_>, name: &str) -> Option<String> {
    child(node, name)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
}

/// Parse a domain definition (live or inactive XML).
pub fn parse_domain(xml: &str) -> Result<DomainXml> {
    let doc = parse_doc(xml, "domain")?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(Error::source("libvirt XML", "not a <domain> definition"));
    }
    let name = child_text(root, "name")
        .ok_or_else(|| Error::source("libvirt XML", "domain without <name>"))?;
    let disks = child(root, "devices")
        .map(|devices| {
            devices
                .children()
                .filter(|c| c.has_tag_name("disk"))
                .filter_map(parse_disk)
                .collect()
        })
        .unwrap_or_default();
    Ok(DomainXml {
        name,
        uuid: child_text(root, "uuid"),
        disks,
        qemu_ids: dac_ids(root),
    })
}

fn parse_disk(disk: Node<'_, '_>) -> Option<DiskXml> {
    let target = child(disk, "target")?.attribute("dev")?.to_string();
    let kind = disk.attribute("type").unwrap_or("file");
    let source = match child(disk, "source") {
        None => DiskSource::None,
        Some(src) => match kind {
            "file" => src
                .attribute("file")
                .map_or(DiskSource::None, |f| DiskSource::File(f.into())),
            "block" => src
                .attribute("dev")
                .map_or(DiskSource::None, |d| DiskSource::Block(d.into())),
            "network" => DiskSource::Other(format!(
                "{}:{}",
                src.attribute("protocol").unwrap_or("network"),
                src.attribute("name").unwrap_or("")
            )),
            "volume" => DiskSource::Other(format!(
                "volume {}/{}",
                src.attribute("pool").unwrap_or(""),
                src.attribute("volume").unwrap_or("")
            )),
            other => DiskSource::Other(other.to_string()),
        },
    };
    Some(DiskXml {
        target,
        device: DiskDevice::parse(disk.attribute("device").unwrap_or("disk")),
        format: child(disk, "driver")
            .and_then(|d| d.attribute("type"))
            .map(str::to_string),
        source,
        readonly: child(disk, "readonly").is_some(),
    })
}

/// `+uid:+gid` of the DAC security label of a running domain.
fn dac_ids(root: Node<'_, '_>) -> Option<(u32, u32)> {
    let label = root
        .children()
        .filter(|c| c.has_tag_name("seclabel") && c.attribute("model") == Some("dac"))
        .find_map(|c| child_text(c, "label"))?;
    let (uid, gid) = label.split_once(':')?;
    Some((
        uid.strip_prefix('+')?.parse().ok()?,
        gid.strip_prefix('+')?.parse().ok()?,
    ))
}

/// Escape text for use in XML content or a quoted attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// vmkeep's mark on a VM it started paused for a backup, kept in the running VM's live
/// metadata (it ends with the QEMU process): which repository's run started it, and a
/// token of that run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedMark {
    /// The id of the repository whose run started the VM.
    pub repository: String,
    /// A random token of that run.
    pub token: String,
}

/// The live-metadata element of a [`StartedMark`].
pub fn started_mark_xml(mark: &StartedMark) -> String {
    format!(
        "<started-for-backup repository=\"{}\" token=\"{}\"/>",
        escape(&mark.repository),
        escape(&mark.token)
    )
}

/// The [`StartedMark`] in a live-metadata element; `None` for anything else (another
/// shape is not vmkeep's mark, and nothing is trusted from it).
pub fn parse_started_mark(xml: &str) -> Option<StartedMark> {
    let doc = Document::parse(xml).ok()?;
    let root = doc.root_element();
    if root.tag_name().name() != "started-for-backup" {
        return None;
    }
    let repository = root.attribute("repository")?.to_string();
    let token = root.attribute("token")?.to_string();
    if repository.is_empty() || token.is_empty() {
        return None;
    }
    Some(StartedMark { repository, token })
}

/// The NBD export name and the name of the dirty bitmap that libvirt gives a disk of a
/// pull backup when the backup XML does not choose them: the export is the disk target,
/// the bitmap `backup-<target>` (libvirt's qemu_backup.c; the running job's XML from
/// `virDomainBackupGetXMLDesc` states the names that were really used).
pub fn default_export_names(target: &str) -> (String, String) {
    (target.to_string(), format!("backup-{target}"))
}

/// The NBD metadata context through which QEMU's NBD server publishes a dirty bitmap.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("{}{bitmap}", crate::nbd::proto::META_DIRTY_BITMAP_PREFIX)
}

/// Where the NBD server of a pull backup listens (`<server>` of the backup XML).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServer {
    /// A unix socket on the hypervisor (`transport='unix'`): local backups.
    Unix(PathBuf),
    /// TCP (`transport='tcp'`): `name` is the address QEMU listens on and clients connect
    /// to; `tls` makes QEMU require TLS with the host's `backup_tls_x509_cert_dir`.
    Tcp {
        /// Host name or IP address.
        name: String,
        /// TCP port.
        port: u16,
        /// Whether the export requires TLS (`tls='yes'`).
        tls: bool,
    },
}

impl NbdServer {
    /// The unix socket, for a unix server.
    pub fn socket(&self) -> Option<&Path> {
        match self {
            NbdServer::Unix(p) => Some(p),
            NbdServer::Tcp { .. } => None,
        }
    }
}

impl std::fmt::Display for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdServer::Unix(p) => write!(f, "NBD socket {}", p.display()),
            NbdServer::Tcp { name, port, tls } => write!(
                f,
                "NBD server {name}:{port}{}",
                if *tls { " (TLS)" } else { " (no TLS)" }
            ),
        }
    }
}

/// One disk of a pull backup as the XML will request it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDiskSpec {
    /// The disk's `<target dev=…>` (vda, sdb, ...).
    pub target: String,
    /// The NBD export name to ask for (`exportname`); `None`: libvirt's default, the target.
    pub export_name: Option<String>,
    /// Host file (`<scratch file=…>`) where QEMU keeps the old content of blocks the guest
    /// overwrites while the backup runs; QEMU creates it, so it must not exist yet. `None`
    /// writes no `<scratch>` (libvirt 9.0 then refuses a pull backup).
    pub scratch: Option<PathBuf>,
    /// Export only what changed since this checkpoint; `None` exports the whole disk.
    pub incremental_from: Option<String>,
}

/// The `<domainbackup mode='pull'>` document: an NBD server on `server`, a scratch file per
/// exported disk, and `backup='no'` for the domain's other disks.
pub fn backup_xml(server: &NbdServer, disks: &[BackupDiskSpec], other_disks: &[&str]) -> String {
    let mut xml = String::from("<domainbackup mode='pull'>\n");
    let _ = match server {
        NbdServer::Unix(socket) => writeln!(
            xml,
            "  <server transport='unix' socket='{}'/>",
            escape(&socket.to_string_lossy())
        ),
        NbdServer::Tcp { name, port, tls } => writeln!(
            xml,
            "  <server transport='tcp' name='{}' port='{port}' tls='{}'/>",
            escape(name),
            if *tls { "yes" } else { "no" }
        ),
    };
    xml.push_str("  <disks>\n");
    for disk in disks {
        let mode = match &disk.incremental_from {
            Some(cp) => format!("backupmode='incremental' incremental='{}'", escape(cp)),
            None => "backupmode='full'".to_string(),
        };
        let export = match &disk.export_name {
            Some(e) => format!(" exportname='{}'", escape(e)),
            None => String::new(),
        };
        let scratch = match &disk.scratch {
            Some(p) => format!(
                "\n      <scratch file='{}'/>\n    ",
                escape(&p.to_string_lossy())
            ),
            None => String::new(),
        };
        let _ = writeln!(
            xml,
            "    <disk name='{}' backup='yes' type='file' {mode}{export}>{scratch}</disk>",
            escape(&disk.target),
        );
    }
    for other in other_disks {
        let _ = writeln!(xml, "    <disk name='{}' backup='no'/>", escape(other));
    }
    xml.push_str("  </disks>\n</domainbackup>\n");
    xml
}

/// The `<domaincheckpoint>` document: a bitmap on each of `tracked`, `checkpoint='no'` on
/// `untracked`. libvirt 9.0 has no way to choose the bitmap granularity (QEMU picks it
/// from the cluster size, 64 KiB for default qcow2).
pub fn checkpoint_xml(
    name: &str,
    description: Option<&str>,
    tracked: &[&str],
    untracked: &[&str],
) -> String {
    let mut xml = String::from("<domaincheckpoint>\n");
    let _ = writeln!(xml, "  <name>{}</name>", escape(name));
    if let Some(d) = description {
        let _ = writeln!(xml, "  <description>{}</description>", escape(d));
    }
    xml.push_str("  <disks>\n");
    for disk in tracked {
        let _ = writeln!(
            xml,
            "    <disk name='{}' checkpoint='bitmap'/>",
            escape(disk)
        );
    }
    for disk in untracked {
        let _ = writeln!(xml, "    <disk name='{}' checkpoint='no'/>", escape(disk));
    }
    xml.push_str("  </disks>\n</domaincheckpoint>\n");
    xml
}

/// A disk of a running pull backup, from `virDomainBackupGetXMLDesc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJobDisk {
    /// The disk's `<target dev=…>` (the `name` attribute of the job's `<disk>`).
    pub target: String,
    /// The NBD export name to connect to for this disk (`exportname`, or libvirt's default for the
    /// target when absent).
    pub export_name: String,
    /// The exported dirty bitmap (incremental disks only).
    pub export_bitmap: Option<String>,
    /// The scratch file libvirt reports for the disk, if any.
    pub scratch: Option<PathBuf>,
}

/// What the running backup job's XML says: its NBD server and its disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupJobXml {
    /// The job's NBD server (`<server>`); `None` for a push job or one that names none.
    pub server: Option<NbdServer>,
    /// The disks the job exports (those without `backup='no'`).
    pub disks: Vec<BackupJobDisk>,
}

impl BackupJobXml {
    /// The export names of the job's disks.
    pub fn export_names(&self) -> Vec<String> {
        self.disks.iter().map(|d| d.export_name.clone()).collect()
    }
}

/// Parse the XML of a running backup job.
pub fn parse_backup_job(xml: &str) -> Result<BackupJobXml> {
    let doc = parse_doc(xml, "domainbackup")?;
    let root = doc.root_element();
    // No transport: a socket means unix, a name TCP (libvirt's default).
    let server = child(root, "server").and_then(|s| {
        match (s.attribute("transport"), s.attribute("socket")) {
            (Some("unix") | None, Some(p)) => Some(NbdServer::Unix(p.into())),
            (Some("tcp") | None, None) => Some(NbdServer::Tcp {
                name: s.attribute("name")?.to_string(),
                port: s.attribute("port")?.parse().ok()?,
                tls: s.attribute("tls") == Some("yes"),
            }),
            _ => None,
        }
    });
    let disks = child(root, "disks")
        .map(|disks| {
            disks
                .children()
                .filter(|d| d.has_tag_name("disk") && d.attribute("backup") != Some("no"))
                .filter_map(|d| {
                    let target = d.attribute("name")?.to_string();
                    let (default_export, _) = default_export_names(&target);
                    Some(BackupJobDisk {
                        export_name: d
                            .attribute("exportname")
                            .unwrap_or(&default_export)
                            .to_string(),
                        export_bitmap: d.attribute("exportbitmap").map(str::to_string),
                        scratch: child(d, "scratch")
                            .and_then(|s| s.attribute("file"))
                            .map(PathBuf::from),
                        target,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(BackupJobXml { server, disks })
}

/// A checkpoint: a point in time from which libvirt tracks the changed blocks of some
/// disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The checkpoint's name (`<name>`), unique within the domain.
    pub name: String,
    /// The name of the checkpoint before it, if any: changes since the parent are what this
    /// checkpoint's bitmaps extend.
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub creation_time: Option<i64>,
    /// Disks with a bitmap, as (disk target, bitmap name).
    pub disks: Vec<(String, String)>,
    /// Free text; vmkeep writes the repository that made the checkpoint.
    pub description: Option<String>,
}

/// Parse `virDomainCheckpointGetXMLDesc` output.
pub fn parse_checkpoint(xml: &str) -> Result<CheckpointInfo> {
    let doc = parse_doc(xml, "domaincheckpoint")?;
    let root = doc.root_element();
    let name = child_text(root, "name")
        .ok_or_else(|| Error::source("libvirt XML", "checkpoint without <name>"))?;
    let disks = child(root, "disks")
        .map(|disks| {
            disks
                .children()
                .filter(|d| d.has_tag_name("disk") && d.attribute("checkpoint") == Some("bitmap"))
                .filter_map(|d| {
                    let disk = d.attribute("name")?;
                    Some((
                        disk.to_string(),
                        d.attribute("bitmap").unwrap_or(&name).to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CheckpointInfo {
        parent: child(root, "parent").and_then(|p| child_text(p, "name")),
        creation_time: child_text(root, "creationTime").and_then(|t| t.parse().ok()),
        description: child_text(root, "description"),
        disks,
        name,
    })
}

/// A checkpoint's XML without its `<parent>` element (to redefine it alone).
pub fn without_parent(xml: &str) -> Result<String> {
    let doc = parse_doc(xml, "domaincheckpoint")?;
    let mut splice = Splice::default();
    if let Some(parent) = child(doc.root_element(), "parent") {
        splice.remove(parent);
    }
    Ok(splice.apply(xml))
}

/// The disks of a checkpoint's XML that carry a bitmap, as (disk target, bitmap size):
/// the size is what libvirt adds with `VIR_DOMAIN_CHECKPOINT_XML_SIZE` for a bitmap QEMU
/// holds and can read; `None` when it added none (the bitmap is missing or inconsistent).
pub fn checkpoint_bitmap_sizes(xml: &str) -> Result<Vec<(String, Option<u64>)>> {
    let doc = parse_doc(xml, "domaincheckpoint")?;
    let root = doc.root_element();
    Ok(child(root, "disks")
        .map(|disks| {
            disks
                .children()
                .filter(|d| d.has_tag_name("disk") && d.attribute("checkpoint") == Some("bitmap"))
                .filter_map(|d| {
                    let size = d.attribute("size").and_then(|s| s.parse().ok());
                    Some((d.attribute("name")?.to_string(), size))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Where a disk of a copied domain lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDisk {
    /// Host path of the disk's new image file or block device.
    pub path: PathBuf,
    /// `raw`, `qcow2`…
    pub format: String,
    /// A block device (`<disk type='block'>`) rather than a file.
    pub block: bool,
    /// An NBD export the disk reads what it has not written from (instant recovery's
    /// overlays), written into the definition as the disk's `<backingStore>`.
    pub backing: Option<NbdBacking>,
}

/// An NBD export as the backing store of a copied disk: a raw image read from `export` on
/// `server` (a unix socket, or TCP with TLS unless `tls` is false).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdBacking {
    /// Where QEMU connects.
    pub server: NbdServer,
    /// The export name.
    pub export: String,
}

impl NbdBacking {
    /// The `<backingStore>` element.
    fn element(&self) -> String {
        let (tls, host) = match &self.server {
            NbdServer::Unix(socket) => (
                String::new(),
                format!(
                    "<host transport='unix' socket='{}'/>",
                    escape(&socket.to_string_lossy())
                ),
            ),
            NbdServer::Tcp { name, port, tls } => (
                format!(" tls='{}'", if *tls { "yes" } else { "no" }),
                format!("<host name='{}' port='{port}'/>", escape(name)),
            ),
        };
        format!(
            "<backingStore type='network'>\n        <format type='raw'/>\n        \
             <source protocol='nbd' name='{}'{tls}>\n          {host}\n        </source>\n        \
             <backingStore/>\n      </backingStore>",
            escape(&self.export)
        )
    }
}

/// An NBD source somewhere in a disk's backing chain, as a domain definition names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdSourceXml {
    /// The disk's `<target dev=…>`.
    pub target: String,
    /// The export name (`name`), empty when the XML has none.
    pub export: String,
    /// The unix socket (`<host transport='unix' socket=…>`).
    pub socket: Option<PathBuf>,
    /// The TCP host name and port (`<host name=… port=…>`; 10809 when no port is given).
    pub tcp: Option<(String, u16)>,
}

/// Every NBD source in the backing chains (`<backingStore>`, nested) of the domain's
/// disks, in document order. The disk's own `<source>` is not a backing store and is not
/// listed.
pub fn nbd_backing_sources(xml: &str) -> Result<Vec<NbdSourceXml>> {
    let doc = parse_doc(xml, "domain")?;
    let mut out = Vec::new();
    let Some(devices) = child(doc.root_element(), "devices") else {
        return Ok(out);
    };
    for disk in devices.children().filter(|c| c.has_tag_name("disk")) {
        let Some(target) = child(disk, "target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let mut store = child(disk, "backingStore");
        while let Some(b) = store {
            if let Some(src) = child(b, "source").filter(|s| s.attribute("protocol") == Some("nbd"))
            {
                let host = child(src, "host");
                let socket = host
                    .filter(|h| h.attribute("transport") == Some("unix"))
                    .and_then(|h| h.attribute("socket"))
                    .map(PathBuf::from);
                let tcp = host
                    .filter(|h| h.attribute("transport").unwrap_or("tcp") == "tcp")
                    .and_then(|h| {
                        let port = match h.attribute("port") {
                            None => 10809,
                            Some(p) => p.parse().ok()?,
                        };
                        Some((h.attribute("name")?.to_string(), port))
                    });
                out.push(NbdSourceXml {
                    target: target.to_string(),
                    export: src.attribute("name").unwrap_or_default().to_string(),
                    socket,
                    tcp,
                });
            }
            store = child(b, "backingStore");
        }
    }
    Ok(out)
}

/// How to turn a saved domain definition into a new domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopySpec {
    /// Name of the new domain (not empty, no `/`); the copy's `<uuid>` is dropped so libvirt makes
    /// a new one.
    pub new_name: String,
    /// Old disk target → the disk's new home. Every writable disk must be mapped: a
    /// copy must never share a disk with the original.
    pub disks: BTreeMap<String, NewDisk>,
    /// Old libvirt network name → network to use in the copy.
    pub networks: BTreeMap<String, String>,
    /// Redefine an existing shut-off domain of that name (never a running one).
    pub replace: bool,
    /// The copy's own UEFI variable store, already written there: its `<nvram>` names
    /// it (keeping the template). `None`: the `<nvram>` is dropped and libvirt makes the
    /// copy a fresh store from the firmware's template.
    pub nvram: Option<PathBuf>,
}

/// Where a domain keeps firmware and TPM state on its host, as its definition says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirmwareState {
    /// The UEFI variable store (`<os><nvram>`), a file on the host.
    pub nvram: Option<PathBuf>,
    /// The domain has an emulated TPM (`<tpm><backend type='emulator'>`); its state
    /// folder, when the definition names one (`<source type='dir' path=…>`); else
    /// libvirt's folder of the domain's UUID.
    pub tpm: Option<Option<PathBuf>>,
}

/// The firmware and TPM state `xml` (a domain definition) names.
pub fn firmware_state(xml: &str) -> Result<FirmwareState> {
    let doc = parse_doc(xml, "domain")?;
    let root = doc.root_element();
    let mut out = FirmwareState::default();
    if let Some(nvram) = child(root, "os").and_then(|os| child(os, "nvram")) {
        // `<nvram>PATH</nvram>`, or (libvirt 8.5 and later) `<nvram type='file'><source
        // file=PATH/></nvram>`; a network-backed store is not a file here.
        let path = match nvram.attribute("type") {
            None | Some("file") => child(nvram, "source")
                .and_then(|s| s.attribute("file"))
                .map(str::to_string)
                .or_else(|| nvram.text().map(|t| t.trim().to_string())),
            Some(_) => None,
        };
        out.nvram = path.filter(|p| p.starts_with('/')).map(PathBuf::from);
    }
    if let Some(devices) = child(root, "devices") {
        for tpm in devices.children().filter(|c| c.has_tag_name("tpm")) {
            let Some(backend) = child(tpm, "backend") else {
                continue;
            };
            if backend.attribute("type") == Some("emulator") {
                let dir = child(backend, "source")
                    .filter(|s| s.attribute("type") == Some("dir"))
                    .and_then(|s| s.attribute("path"))
                    .map(PathBuf::from);
                out.tpm = Some(dir);
            }
        }
    }
    Ok(out)
}

/// Replacements of byte ranges of the original text.
#[derive(Default)]
struct Splice {
    edits: Vec<(Range<usize>, String)>,
}

impl Splice {
    fn replace(&mut self, range: Range<usize>, text: impl Into<String>) {
        self.edits.push((range, text.into()));
    }

    /// Remove an element together with the indentation before it.
    fn remove(&mut self, node: Node<'_, '_>) {
        let mut range = node.range();
        if let Some(prev) = node.prev_sibling() {
            if prev.is_text() && prev.text().is_some_and(|t| t.trim().is_empty()) {
                range.start = prev.range().start;
            }
        }
        self.replace(range, "");
    }

    /// Set an attribute, replacing its old value or adding it after the tag name.
    fn set_attr(&mut self, node: Node<'_, '_>, name: &str, value: &str) {
        let text = format!("{name}='{}'", escape(value));
        match node.attributes().find(|a| a.name() == name) {
            Some(attr) => self.replace(attr.range(), text),
            None => {
                let at = node.range().start + 1 + node.tag_name().name().len();
                self.replace(at..at, format!(" {text}"));
            }
        }
    }

    fn remove_attr(&mut self, node: Node<'_, '_>, name: &str) {
        if let Some(attr) = node.attributes().find(|a| a.name() == name) {
            // The attribute and the blank before it.
            self.replace(attr.range().start - 1..attr.range().end, "");
        }
    }

    fn apply(mut self, source: &str) -> String {
        self.edits.sort_by_key(|(r, _)| (r.start, r.end));
        let mut out = String::with_capacity(source.len());
        let mut at = 0;
        for (range, text) in self.edits {
            debug_assert!(range.start >= at, "overlapping XML edits");
            out.push_str(&source[at..range.start]);
            out.push_str(&text);
            at = range.end;
        }
        out.push_str(&source[at..]);
        out
    }
}

/// A locally administered unicast MAC in QEMU's 52:54:00 range.
pub fn format_mac(tail: [u8; 3]) -> String {
    format!("52:54:00:{:02x}:{:02x}:{:02x}", tail[0], tail[1], tail[2])
}

/// Rewrite a saved domain definition into a new domain: the new name, no UUID (libvirt
/// makes one), fresh MACs, mapped disks and networks; `<backingStore>` and checkpoint
/// elements, the NVRAM path and per-domain channel socket paths are dropped so libvirt
/// chooses new ones. `networks` is every network the host has; a referenced network it
/// lacks and the spec does not map is an error, as is a writable disk without a new home.
pub fn copy_domain_xml(
    xml: &str,
    spec: &CopySpec,
    networks: &[String],
    new_mac: &mut dyn FnMut() -> [u8; 3],
) -> Result<String> {
    if spec.new_name.trim().is_empty() || spec.new_name.contains('/') {
        return Err(Error::usage(format!("invalid VM name {:?}", spec.new_name)));
    }
    let doc = parse_doc(xml, "saved domain")?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(Error::source(
            "libvirt XML",
            "saved definition is not a <domain>",
        ));
    }
    let mut splice = Splice::default();
    let name =
        child(root, "name").ok_or_else(|| Error::source("libvirt XML", "domain without <name>"))?;
    splice.replace(
        name.range(),
        format!("<name>{}</name>", escape(&spec.new_name)),
    );
    if let Some(uuid) = child(root, "uuid") {
        splice.remove(uuid);
    }
    if let Some(nvram) = child(root, "os").and_then(|os| child(os, "nvram")) {
        match &spec.nvram {
            None => splice.remove(nvram),
            Some(path) => {
                let path = path.to_str().ok_or_else(|| {
                    Error::usage(format!("NVRAM path {} is not UTF-8", path.display()))
                })?;
                let template = nvram
                    .attribute("template")
                    .map(|t| format!(" template='{}'", escape(t)))
                    .unwrap_or_default();
                splice.replace(
                    nvram.range(),
                    format!("<nvram{template}>{}</nvram>", escape(path)),
                );
            }
        }
    }
    let mut used_disks = BTreeSet::new();
    let mut fresh = Fresh::new(&doc, spec)?;
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(Node::is_element) {
            match dev.tag_name().name() {
                "disk" => copy_disk(dev, spec, &mut splice, &mut used_disks)?,
                "interface" => copy_interface(dev, spec, networks, &mut splice, new_mac)?,
                "serial" | "console" | "parallel" | "channel" | "redirdev" => {
                    copy_chardev(dev, &mut fresh, &mut splice)?;
                }
                "graphics" => copy_graphics(dev, &mut splice),
                "tpm" => copy_tpm(dev, &mut splice)?,
                "filesystem" => check_filesystem(dev)?,
                "hostdev" => return Err(not_copied(dev, "a host device only one VM can own")),
                "shmem" => copy_shmem(dev, &mut fresh, &mut splice)?,
                "vsock" => copy_vsock(dev, &mut splice),
                _ => {}
            }
        }
    }
    for node in root.descendants().filter(|n| n.has_tag_name("checkpoint")) {
        splice.remove(node);
    }
    if let Some(unused) = spec.disks.keys().find(|k| !used_disks.contains(*k)) {
        return Err(Error::usage(format!(
            "the saved VM definition has no disk {unused}"
        )));
    }
    Ok(splice.apply(xml))
}

fn copy_disk(
    disk: Node<'_, '_>,
    spec: &CopySpec,
    splice: &mut Splice,
    used: &mut BTreeSet<String>,
) -> Result<()> {
    let Some(parsed) = parse_disk(disk) else {
        return Ok(());
    };
    let Some(new) = spec.disks.get(&parsed.target) else {
        if parsed.readonly
            || !matches!(parsed.device, DiskDevice::Disk | DiskDevice::Lun)
            || parsed.source == DiskSource::None
        {
            return Ok(());
        }
        return Err(Error::usage(format!(
            "disk {} of the saved VM has no new location; the copy would share it with the original",
            parsed.target
        )));
    };
    used.insert(parsed.target.clone());
    let (kind, attr) = if new.block {
        ("block", "dev")
    } else {
        ("file", "file")
    };
    splice.set_attr(disk, "type", kind);
    let source = format!("<source {attr}='{}'/>", escape(&new.path.to_string_lossy()));
    match child(disk, "source") {
        Some(old) => splice.replace(old.range(), source),
        None => {
            let target = child(disk, "target").expect("parse_disk found the target");
            splice.replace(
                target.range().start..target.range().start,
                format!("{source}\n      "),
            );
        }
    }
    match child(disk, "driver") {
        Some(driver) => splice.set_attr(driver, "type", &new.format),
        None => {
            let target = child(disk, "target").expect("parse_disk found the target");
            splice.replace(
                target.range().start..target.range().start,
                format!(
                    "<driver name='qemu' type='{}'/>\n      ",
                    escape(&new.format)
                ),
            );
        }
    }
    for stale in disk
        .children()
        .filter(|c| c.has_tag_name("backingStore") || c.has_tag_name("auth"))
    {
        splice.remove(stale);
    }
    if let Some(backing) = &new.backing {
        let target = child(disk, "target").expect("parse_disk found the target");
        splice.replace(
            target.range().start..target.range().start,
            format!("{}\n      ", backing.element()),
        );
    }
    Ok(())
}

fn copy_interface(
    iface: Node<'_, '_>,
    spec: &CopySpec,
    networks: &[String],
    splice: &mut Splice,
    new_mac: &mut dyn FnMut() -> [u8; 3],
) -> Result<()> {
    if let Some(mac) = child(iface, "mac") {
        splice.set_attr(mac, "address", &format_mac(new_mac()));
    }
    if iface.attribute("type") == Some("hostdev") {
        return Err(not_copied(iface, "a host device only one VM can own"));
    }
    if iface.attribute("type") != Some("network") {
        return Ok(());
    }
    let Some(source) = child(iface, "source") else {
        return Ok(());
    };
    let old = source.attribute("network").unwrap_or_default();
    let wanted = spec.networks.get(old).map_or(old, String::as_str);
    if !networks.iter().any(|n| n == wanted) {
        return Err(Error::usage(format!(
            "the VM uses libvirt network '{wanted}', which this host does not have \
             (map it to one of: {})",
            if networks.is_empty() {
                "none defined".to_string()
            } else {
                networks.join(", ")
            }
        )));
    }
    if wanted != old {
        splice.set_attr(source, "network", wanted);
    }
    // The port and bridge of the original's connection belong to the original.
    for attr in ["portid", "bridge"] {
        splice.remove_attr(source, attr);
    }
    Ok(())
}

/// The fresh per-domain names of a copy: host files (chardev files and sockets, `<log>`
/// files) and shared-memory names. A path stays in its folder; in its file name the old
/// domain name becomes the new one, or, when the file name does not contain the old name,
/// the new name and a dash go in front (`console.log` → `NEW-console.log`). The mapping is
/// a function of the old path (a `<console>` that is the first `<serial>` gets the same new
/// path), and a new path equal to any path the original names, or to another of the copy's,
/// is refused.
struct Fresh {
    old_name: String,
    new_name: String,
    /// Every absolute path the original's definition names.
    taken: BTreeSet<String>,
    /// The copy's new paths → the original's paths they replace.
    given: BTreeMap<String, String>,
}

impl Fresh {
    fn new(doc: &Document<'_>, spec: &CopySpec) -> Result<Fresh> {
        let old_name = child_text(doc.root_element(), "name")
            .ok_or_else(|| Error::source("libvirt XML", "domain without <name>"))?;
        let taken = doc
            .descendants()
            .flat_map(|n| n.attributes())
            .map(|a| a.value().trim())
            .chain(doc.descendants().filter_map(|n| n.text()).map(str::trim))
            .filter(|v| v.starts_with('/'))
            .map(str::to_string)
            .collect();
        Ok(Fresh {
            old_name,
            new_name: spec.new_name.clone(),
            taken,
            given: BTreeMap::new(),
        })
    }

    /// `name` with the old domain name replaced by the new one, or the new one in front.
    fn rename(&self, name: &str) -> String {
        if !self.old_name.is_empty() && name.contains(&self.old_name) {
            name.replace(&self.old_name, &self.new_name)
        } else {
            format!("{}-{name}", self.new_name)
        }
    }

    /// The copy's path for the original's host file `old`, named for `dev`.
    fn path(&mut self, dev: Node<'_, '_>, old: &str) -> Result<String> {
        let (folder, file) = old.rsplit_once('/').map_or(("", old), |(d, f)| (d, f));
        let new = if old.contains('/') {
            format!("{folder}/{}", self.rename(file))
        } else {
            self.rename(file)
        };
        let clash =
            self.taken.contains(&new) || self.given.get(&new).is_some_and(|earlier| earlier != old);
        if clash {
            return Err(Error::usage(format!(
                "{} of the saved VM names {old}; its copy's path {new} is also a path of \
                 the original VM: choose another name for the copy",
                describe(dev)
            )));
        }
        self.given.insert(new.clone(), old.to_string());
        Ok(new)
    }
}

/// A device element as the messages name it: `<serial type='file'>`.
fn describe(dev: Node<'_, '_>) -> String {
    match dev.attribute("type") {
        Some(t) => format!("<{} type='{t}'>", dev.tag_name().name()),
        None => format!("<{}>", dev.tag_name().name()),
    }
}

/// The usage error of a device a copy cannot have.
fn not_copied(dev: Node<'_, '_>, why: &str) -> Error {
    Error::usage(format!(
        "the saved VM has {}, {why}: a copy beside the original cannot have it too, \
         so vmkeep does not copy this VM (restore its disks with --to instead)",
        describe(dev)
    ))
}

/// A character device (`<serial>`, `<console>`, `<parallel>`, `<channel>`, `<redirdev>`):
/// its host file, its `<log>` file and a unix socket it listens on get fresh paths (a
/// virtio channel's socket loses its path, which libvirt then generates per domain); a TCP
/// or UDP port it listens on becomes `0`, a free port QEMU picks; a host device or named
/// pipe, which the original owns, is refused.
fn copy_chardev(dev: Node<'_, '_>, fresh: &mut Fresh, splice: &mut Splice) -> Result<()> {
    for log in dev.children().filter(|c| c.has_tag_name("log")) {
        if let Some(file) = log.attribute("file") {
            let new = fresh.path(dev, file)?;
            splice.set_attr(log, "file", &new);
        }
    }
    let sources = dev.children().filter(|c| c.has_tag_name("source"));
    match dev.attribute("type").unwrap_or("pty") {
        "file" => {
            for src in sources {
                if let Some(path) = src.attribute("path") {
                    let new = fresh.path(dev, path)?;
                    splice.set_attr(src, "path", &new);
                }
            }
        }
        "unix" => {
            let virtio = child(dev, "target").and_then(|t| t.attribute("type")) == Some("virtio");
            for src in sources.filter(|s| s.attribute("mode") == Some("bind")) {
                match src.attribute("path") {
                    Some(_) if virtio && dev.has_tag_name("channel") => {
                        splice.remove_attr(src, "path");
                    }
                    Some(path) => {
                        let new = fresh.path(dev, path)?;
                        splice.set_attr(src, "path", &new);
                    }
                    None => {}
                }
            }
        }
        "tcp" | "udp" => {
            for src in sources.filter(|s| s.attribute("mode") == Some("bind")) {
                if src.attribute("service").is_some_and(|p| p != "0") {
                    splice.set_attr(src, "service", "0");
                }
            }
        }
        "dev" => return Err(not_copied(dev, "a host device only one VM can own")),
        "pipe" => return Err(not_copied(dev, "a named pipe of the original's")),
        _ => {}
    }
    Ok(())
}

/// `<graphics>`: ports chosen by libvirt (`autoport='yes'`, a websocket port too) instead
/// of the original's fixed ones, and a VNC/SPICE unix socket libvirt names per domain; the
/// listen addresses stay.
fn copy_graphics(dev: Node<'_, '_>, splice: &mut Splice) {
    let fixed = ["port", "tlsPort"]
        .iter()
        .any(|a| dev.attribute(*a).is_some_and(|p| p != "-1"));
    if fixed || dev.attribute("autoport") == Some("no") {
        splice.set_attr(dev, "autoport", "yes");
    }
    for attr in ["port", "tlsPort"] {
        splice.remove_attr(dev, attr);
    }
    if dev.attribute("websocket").is_some_and(|p| p != "-1") {
        splice.set_attr(dev, "websocket", "-1");
    }
    let sockets: Vec<_> = dev
        .children()
        .filter(|l| l.has_tag_name("listen") && l.attribute("type") == Some("socket"))
        .collect();
    for listen in &sockets {
        splice.remove_attr(*listen, "socket");
    }
    if !sockets.is_empty() {
        splice.remove_attr(dev, "socket");
    }
}

/// `<tpm>`: an emulator's state folder is libvirt's per domain UUID (the copy has a new
/// one) unless the XML names one (`<backend><source type='dir' path=…>`): that is dropped.
/// A host TPM passed through is refused.
fn copy_tpm(dev: Node<'_, '_>, splice: &mut Splice) -> Result<()> {
    let Some(backend) = child(dev, "backend") else {
        return Ok(());
    };
    match backend.attribute("type") {
        Some("emulator") => {
            for src in backend.children().filter(|c| c.has_tag_name("source")) {
                splice.remove(src);
            }
            Ok(())
        }
        Some("passthrough") => Err(not_copied(dev, "the host's TPM")),
        _ => Ok(()),
    }
}

/// `<filesystem>`: a host folder, file or device shared with the guest is the original's;
/// a copy that could write it would write the original's files, so only a read-only one
/// (and guest memory, `type='ram'`) is copied, and never one served by an external
/// virtiofsd (`<source socket=…>`).
fn check_filesystem(dev: Node<'_, '_>) -> Result<()> {
    if dev.attribute("type") == Some("ram") {
        return Ok(());
    }
    let external = child(dev, "source").is_some_and(|s| s.attribute("socket").is_some());
    if external {
        return Err(not_copied(dev, "served by the original's virtiofsd socket"));
    }
    if child(dev, "readonly").is_none() {
        let what = child(dev, "source")
            .and_then(|s| {
                ["dir", "file", "dev", "name"]
                    .iter()
                    .find_map(|a| s.attribute(*a))
            })
            .map_or_else(String::new, |p| format!(" {p}"));
        return Err(not_copied(
            dev,
            &format!("host files{what} the guest can write"),
        ));
    }
    Ok(())
}

/// `<shmem name=…>`: the copy's shared memory gets a name of its own (the rule of
/// [`Fresh`]); one served by an ivshmem server (`<server>`) is the original's and refused.
fn copy_shmem(dev: Node<'_, '_>, fresh: &mut Fresh, splice: &mut Splice) -> Result<()> {
    if child(dev, "server").is_some() {
        return Err(not_copied(
            dev,
            "memory shared through the original's ivshmem server",
        ));
    }
    if let Some(name) = dev.attribute("name") {
        splice.set_attr(dev, "name", &fresh.rename(name));
    }
    Ok(())
}

/// `<vsock>`: a fixed guest CID is the original's; the copy gets one libvirt picks.
fn copy_vsock(dev: Node<'_, '_>, splice: &mut Splice) {
    if let Some(cid) = child(dev, "cid") {
        splice.set_attr(cid, "auto", "yes");
        splice.remove_attr(cid, "address");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn started_mark_round_trips_and_nothing_else_parses() {
        let mark = StartedMark {
            repository: "ab12<\"&".into(),
            token: "t0k3n".into(),
        };
        assert_eq!(parse_started_mark(&started_mark_xml(&mark)), Some(mark));
        // As libvirt gives it back, with its namespace prefix.
        assert_eq!(
            parse_started_mark(
                "<vmkeep:started-for-backup xmlns:vmkeep=\"urn:vmkeep:live:1\" repository=\"r\" token=\"t\"/>"
            ),
            Some(StartedMark { repository: "r".into(), token: "t".into() })
        );
        for other in [
            "<started-for-backup repository=\"r\"/>",
            "<started-for-backup repository=\"\" token=\"t\"/>",
            "<other repository=\"r\" token=\"t\"/>",
            "not xml",
        ] {
            assert_eq!(parse_started_mark(other), None, "{other}");
        }
    }

    const DOMAIN: &str = r#"<domain type='kvm' id='3'>
  <name>web1</name>
  <uuid>7fa83f96-3e40-4d8e-9656-58259e306419</uuid>
  <!-- kept -->
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web1.qcow2' index='2'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default' portid='1b6c' bridge='virbr0'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:cd'/>
      <source bridge='br0'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+107</label>
    <imagelabel>+64055:+107</imagelabel>
  </seclabel>
</domain>
"#;

    #[test]
    fn parses_disks_and_dac_label() {
        let d = parse_domain(DOMAIN).unwrap();
        assert_eq!(d.name, "web1");
        assert_eq!(
            d.uuid.as_deref(),
            Some("7fa83f96-3e40-4d8e-9656-58259e306419")
        );
        assert_eq!(d.qemu_ids, Some((64055, 107)));
        assert_eq!(d.disks.len(), 3);
        let vda = d.disk("vda").unwrap();
        assert_eq!(vda.format.as_deref(), Some("qcow2"));
        assert_eq!(
            vda.source,
            DiskSource::File("/var/lib/libvirt/images/web1.qcow2".into())
        );
        assert!(vda.can_checkpoint());
        let vdb = d.disk("vdb").unwrap();
        assert_eq!(vdb.source, DiskSource::Block("/dev/vg0/web1-data".into()));
        assert!(vdb.backupable() && !vdb.can_checkpoint());
        let sda = d.disk("sda").unwrap();
        assert_eq!(sda.device, DiskDevice::Cdrom);
        assert_eq!(sda.source, DiskSource::None);
        assert!(sda.readonly && !sda.backupable());
    }

    #[test]
    fn backup_xml_exports_selected_disks_and_excludes_the_rest() {
        let disks = [BackupDiskSpec {
            target: "vda".into(),
            export_name: None,
            scratch: Some("/s/web1.vda.scratch".into()),
            incremental_from: Some("g'1".into()),
        }];
        let socket = NbdServer::Unix("/run/vmkeep/web1/nbd.sock".into());
        let xml = backup_xml(&socket, &disks, &["vdb"]);
        let doc = Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("mode"), Some("pull"));
        let server = child(root, "server").unwrap();
        assert_eq!(server.attribute("transport"), Some("unix"));
        assert_eq!(
            server.attribute("socket"),
            Some("/run/vmkeep/web1/nbd.sock")
        );
        let list: Vec<_> = child(root, "disks")
            .unwrap()
            .children()
            .filter(Node::is_element)
            .collect();
        assert_eq!(list[0].attribute("name"), Some("vda"));
        assert_eq!(list[0].attribute("backupmode"), Some("incremental"));
        assert_eq!(list[0].attribute("incremental"), Some("g'1"));
        assert_eq!(
            child(list[0], "scratch").unwrap().attribute("file"),
            Some("/s/web1.vda.scratch")
        );
        assert_eq!(list[1].attribute("name"), Some("vdb"));
        assert_eq!(list[1].attribute("backup"), Some("no"));
    }

    /// A TCP export with TLS, chosen export names and no scratch element (libvirt puts
    /// the scratch file on the hypervisor); the job XML libvirt gives back parses to the
    /// same server.
    #[test]
    fn backup_xml_over_tcp_round_trips_through_the_job_parser() {
        let disks = [BackupDiskSpec {
            target: "vda".into(),
            export_name: Some("vmkeep.r1.t1.vda".into()),
            scratch: None,
            incremental_from: None,
        }];
        let tcp = NbdServer::Tcp {
            name: "hv1.example".into(),
            port: 10811,
            tls: true,
        };
        let xml = backup_xml(&tcp, &disks, &[]);
        let doc = Document::parse(&xml).unwrap();
        let server = child(doc.root_element(), "server").unwrap();
        assert_eq!(server.attribute("transport"), Some("tcp"));
        assert_eq!(server.attribute("tls"), Some("yes"));
        let disk = child(child(doc.root_element(), "disks").unwrap(), "disk").unwrap();
        assert_eq!(disk.attribute("exportname"), Some("vmkeep.r1.t1.vda"));
        assert!(child(disk, "scratch").is_none());
        let job = parse_backup_job(&xml).unwrap();
        assert_eq!(job.server, Some(tcp));
        assert_eq!(job.disks[0].export_name, "vmkeep.r1.t1.vda");
        let plain =
            "<domainbackup mode='pull'><server transport='tcp' name='h' port='1'/></domainbackup>";
        assert_eq!(
            parse_backup_job(plain).unwrap().server,
            Some(NbdServer::Tcp {
                name: "h".into(),
                port: 1,
                tls: false
            })
        );
    }

    #[test]
    fn checkpoint_xml_tracks_only_the_named_disks() {
        let xml = checkpoint_xml("g2", None, &["vda"], &["vdb"]);
        let doc = Document::parse(&xml).unwrap();
        assert_eq!(
            child_text(doc.root_element(), "name").as_deref(),
            Some("g2")
        );
        let info = parse_checkpoint(&xml).unwrap();
        assert_eq!(info.disks, vec![("vda".to_string(), "g2".to_string())]);
    }

    #[test]
    fn parses_checkpoint_description() {
        let xml = "<domaincheckpoint><name>c2</name><parent><name>c1</name></parent>\
                   <creationTime>1525889631</creationTime><disks>\
                   <disk name='vda' checkpoint='bitmap' bitmap='c2'/>\
                   <disk name='vdb' checkpoint='no'/></disks>\
                   <domain type='kvm'><name>x</name></domain></domaincheckpoint>";
        let info = parse_checkpoint(xml).unwrap();
        assert_eq!(info.name, "c2");
        assert_eq!(info.parent.as_deref(), Some("c1"));
        assert_eq!(info.creation_time, Some(1525889631));
        assert_eq!(info.disks, vec![("vda".to_string(), "c2".to_string())]);
    }

    #[test]
    fn checkpoint_bitmap_sizes_show_missing_bitmaps() {
        // libvirt 9.0 with VIR_DOMAIN_CHECKPOINT_XML_SIZE: a size for a bitmap QEMU holds,
        // none for one lost or left inconsistent when QEMU was killed.
        let xml = "<domaincheckpoint><name>c2</name><disks>\
                   <disk name='vda' checkpoint='bitmap' bitmap='c2' size='1048576'/>\
                   <disk name='vdb' checkpoint='bitmap' bitmap='c2'/>\
                   <disk name='vdc' checkpoint='no'/></disks></domaincheckpoint>";
        assert_eq!(
            checkpoint_bitmap_sizes(xml).unwrap(),
            vec![
                ("vda".to_string(), Some(1 << 20)),
                ("vdb".to_string(), None)
            ]
        );
    }

    #[test]
    fn parses_backup_job_names() {
        let xml = "<domainbackup mode='pull'><incremental>c1</incremental>\
                   <server transport='unix' socket='/tmp/s.sock'/><disks>\
                   <disk name='vda' backup='yes' type='file' backupmode='incremental' \
                   incremental='c1' exportname='vda' exportbitmap='backup-vda' index='4'>\
                   <driver type='qcow2'/><scratch file='/tmp/vda.scratch'/></disk>\
                   <disk name='vdb' backup='no'/></disks></domainbackup>";
        let job = parse_backup_job(xml).unwrap();
        assert_eq!(job.server, Some(NbdServer::Unix("/tmp/s.sock".into())));
        assert_eq!(
            job.disks,
            vec![BackupJobDisk {
                target: "vda".into(),
                export_name: "vda".into(),
                export_bitmap: Some("backup-vda".into()),
                scratch: Some("/tmp/vda.scratch".into()),
            }]
        );
        assert_eq!(
            dirty_bitmap_context("backup-vda"),
            "qemu:dirty-bitmap:backup-vda"
        );
    }

    fn spec() -> CopySpec {
        let mut spec = CopySpec {
            new_name: "web1-restored".into(),
            ..CopySpec::default()
        };
        spec.disks.insert(
            "vda".into(),
            NewDisk {
                path: "/restore/vda.raw".into(),
                format: "raw".into(),
                block: false,
                backing: None,
            },
        );
        spec.disks.insert(
            "vdb".into(),
            NewDisk {
                path: "/restore/vdb & co.raw".into(),
                format: "raw".into(),
                block: false,
                backing: None,
            },
        );
        spec
    }

    fn macs() -> impl FnMut() -> [u8; 3] {
        let mut n = 0u8;
        move || {
            n += 1;
            [0x10, 0x20, n]
        }
    }

    #[test]
    fn copy_renames_remaps_and_drops_identity() {
        let out = copy_domain_xml(DOMAIN, &spec(), &["default".into()], &mut macs()).unwrap();
        let d = parse_domain(&out).unwrap();
        assert_eq!(d.name, "web1-restored");
        assert_eq!(d.uuid, None);
        let vda = d.disk("vda").unwrap();
        assert_eq!(vda.source, DiskSource::File("/restore/vda.raw".into()));
        assert_eq!(vda.format.as_deref(), Some("raw"));
        let vdb = d.disk("vdb").unwrap();
        assert_eq!(vdb.source, DiskSource::File("/restore/vdb & co.raw".into()));
        assert_eq!(d.disk("sda").unwrap().source, DiskSource::None);
        assert!(!out.contains("backingStore"), "{out}");
        assert!(!out.contains("<nvram"), "{out}");
        assert!(
            !out.contains("domain-3-web1"),
            "channel path dropped: {out}"
        );
        assert!(
            out.contains("cache='none'"),
            "other driver attributes stay: {out}"
        );
        assert!(out.contains("<!-- kept -->"));
        let doc = Document::parse(&out).unwrap();
        let macs: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("mac"))
            .map(|n| n.attribute("address").unwrap().to_string())
            .collect();
        assert_eq!(macs, ["52:54:00:10:20:01", "52:54:00:10:20:02"]);
        let src = doc
            .descendants()
            .find(|n| n.has_tag_name("source") && n.attribute("network").is_some())
            .unwrap();
        assert_eq!(src.attribute("portid"), None);
        assert_eq!(src.attribute("bridge"), None);
    }

    /// Instant recovery's overlays name their NBD backing in the definition, for a unix
    /// socket and for TCP with TLS; the parser finds exactly those sources again.
    #[test]
    fn copy_writes_nbd_backing_stores_that_parse_back() {
        let mut spec = spec();
        spec.disks.get_mut("vda").unwrap().backing = Some(NbdBacking {
            server: NbdServer::Unix("/run/vmkeep/instant-x/nbd.sock".into()),
            export: "vda".into(),
        });
        spec.disks.get_mut("vdb").unwrap().backing = Some(NbdBacking {
            server: NbdServer::Tcp {
                name: "backup1.example".into(),
                port: 10811,
                tls: true,
            },
            export: "vdb & co".into(),
        });
        let out = copy_domain_xml(DOMAIN, &spec, &["default".into()], &mut macs()).unwrap();
        Document::parse(&out).unwrap();
        assert!(out.contains("tls='yes'"), "{out}");
        let found = nbd_backing_sources(&out).unwrap();
        assert_eq!(
            found,
            [
                NbdSourceXml {
                    target: "vda".into(),
                    export: "vda".into(),
                    socket: Some("/run/vmkeep/instant-x/nbd.sock".into()),
                    tcp: None,
                },
                NbdSourceXml {
                    target: "vdb".into(),
                    export: "vdb & co".into(),
                    socket: None,
                    tcp: Some(("backup1.example".into(), 10811)),
                },
            ]
        );
        // The disks' own sources are the overlays.
        let d = parse_domain(&out).unwrap();
        assert_eq!(
            d.disk("vda").unwrap().source,
            DiskSource::File("/restore/vda.raw".into())
        );
        // A definition without backing stores has none.
        assert!(nbd_backing_sources(DOMAIN).unwrap().is_empty());
    }

    #[test]
    fn copy_refuses_unknown_network_unless_mapped() {
        let err = copy_domain_xml(DOMAIN, &spec(), &["lan".into()], &mut macs()).unwrap_err();
        assert!(err.to_string().contains("network 'default'"), "{err}");
        assert!(err.to_string().contains("lan"), "{err}");
        let mut mapped = spec();
        mapped.networks.insert("default".into(), "lan".into());
        let out = copy_domain_xml(DOMAIN, &mapped, &["lan".into()], &mut macs()).unwrap();
        assert!(out.contains("<source network='lan'/>"), "{out}");
    }

    #[test]
    fn copy_refuses_to_share_an_unmapped_disk() {
        let mut partial = spec();
        partial.disks.remove("vdb");
        let err = copy_domain_xml(DOMAIN, &partial, &["default".into()], &mut macs()).unwrap_err();
        assert!(err.to_string().contains("disk vdb"), "{err}");
        let mut extra = spec();
        extra.disks.insert(
            "vdz".into(),
            NewDisk {
                path: "/x".into(),
                format: "raw".into(),
                block: false,
                backing: None,
            },
        );
        let err = copy_domain_xml(DOMAIN, &extra, &["default".into()], &mut macs()).unwrap_err();
        assert!(err.to_string().contains("no disk vdz"), "{err}");
    }

    #[test]
    fn copy_to_block_device_and_disk_without_driver() {
        let xml = "<domain type='qemu'><name>a</name><devices>\
                   <disk type='file' device='disk'><source file='/a.img'/><target dev='vda'/></disk>\
                   </devices></domain>";
        let mut spec = CopySpec {
            new_name: "b".into(),
            ..CopySpec::default()
        };
        spec.disks.insert(
            "vda".into(),
            NewDisk {
                path: "/dev/vg/b".into(),
                format: "raw".into(),
                block: true,
                backing: None,
            },
        );
        let out = copy_domain_xml(xml, &spec, &[], &mut macs()).unwrap();
        let d = parse_domain(&out).unwrap();
        assert_eq!(d.disks[0].source, DiskSource::Block("/dev/vg/b".into()));
        assert_eq!(d.disks[0].format.as_deref(), Some("raw"));
    }

    /// A copy named web1-restored of a diskless domain web1 with these devices.
    fn copy_of(devices: &str) -> Result<String> {
        let xml = format!(
            "<domain type='qemu'><name>web1</name><uuid>7fa83f96-3e40-4d8e-9656-58259e306419</uuid>\
             <devices>{devices}</devices></domain>"
        );
        let spec = CopySpec {
            new_name: "web1-restored".into(),
            ..CopySpec::default()
        };
        copy_domain_xml(&xml, &spec, &[], &mut macs())
    }

    /// Every host path (absolute attribute value) a definition names.
    fn host_paths(xml: &str) -> BTreeSet<String> {
        let doc = Document::parse(xml).unwrap();
        let paths = doc
            .descendants()
            .flat_map(|n| n.attributes())
            .map(|a| a.value().to_string())
            .filter(|v| v.starts_with('/'))
            .collect();
        paths
    }

    /// The attribute `attr` of every element `tag`, in document order.
    fn attrs(xml: &str, tag: &str, attr: &str) -> Vec<Option<String>> {
        let doc = Document::parse(xml).unwrap();
        let found = doc
            .descendants()
            .filter(|n| n.has_tag_name(tag))
            .map(|n| n.attribute(attr).map(str::to_string))
            .collect();
        found
    }

    const FILE_CHARDEVS: &str = "\
        <serial type='file'><source path='/var/log/vms/web1-serial.log' append='on'/>\
          <log file='/var/log/vms/qemu-serial.log' append='off'/><target port='0'/></serial>\
        <console type='file'><source path='/var/log/vms/web1-serial.log'/><target type='serial' port='0'/></console>\
        <parallel type='file'><source path='/srv/console.log'/><target port='0'/></parallel>\
        <channel type='pty'><source path='/dev/pts/4'/><log file='/var/log/ch.log'/>\
          <target type='virtio' name='org.example.0'/></channel>";

    /// File chardevs and `<log>` files: beside the original, the old domain name replaced
    /// by the new one, else the new one in front; a console that is the first serial gets
    /// the serial's new path; the copy names none of the original's files.
    #[test]
    fn copy_gives_chardev_and_log_files_fresh_paths() {
        let original =
            format!("<domain><name>web1</name><devices>{FILE_CHARDEVS}</devices></domain>");
        let out = copy_of(FILE_CHARDEVS).unwrap();
        Document::parse(&out).unwrap();
        assert_eq!(
            attrs(&out, "source", "path"),
            [
                Some("/var/log/vms/web1-restored-serial.log".into()),
                Some("/var/log/vms/web1-restored-serial.log".into()),
                Some("/srv/web1-restored-console.log".into()),
                Some("/dev/pts/4".into()),
            ]
        );
        assert_eq!(
            attrs(&out, "log", "file"),
            [
                Some("/var/log/vms/web1-restored-qemu-serial.log".into()),
                Some("/var/log/web1-restored-ch.log".into()),
            ]
        );
        assert!(
            out.contains("append='on'") && out.contains("append='off'"),
            "{out}"
        );
        // Only the pty, which libvirt allocates anew, is in both.
        let shared: Vec<_> = host_paths(&original)
            .intersection(&host_paths(&out))
            .cloned()
            .collect();
        assert_eq!(shared, ["/dev/pts/4"]);
    }

    /// The copy's path is refused when the original names it too, or when two of the
    /// original's files would get the same one.
    #[test]
    fn copy_refuses_a_fresh_path_the_original_has() {
        let taken = "<serial type='file'><source path='/l/console.log'/></serial>\
                     <parallel type='file'><source path='/l/web1-restored-console.log'/></parallel>";
        let err = copy_of(taken).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Usage, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("<serial type='file'>"), "{msg}");
        assert!(msg.contains("/l/web1-restored-console.log"), "{msg}");
        let two = "<serial type='file'><source path='/l/console.log'/></serial>\
                   <parallel type='file'><source path='/l/web1-console.log'/></parallel>";
        let err = copy_of(two).unwrap_err();
        assert!(err.to_string().contains("<parallel type='file'>"), "{err}");
    }

    /// Unix sockets the copy would listen on: a virtio channel's path is dropped (libvirt
    /// makes one per domain), another gets a fresh path; a client socket stays.
    #[test]
    fn copy_gives_listening_unix_sockets_fresh_paths() {
        let devices = "\
            <serial type='unix'><source mode='bind' path='/run/vms/web1.serial'/><target port='0'/></serial>\
            <console type='unix'><source mode='bind' path='/run/vms/web1.serial'/><target type='serial'/></console>\
            <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.qemu.guest_agent.0'/>\
              <target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
            <channel type='unix'><source mode='bind' path='/run/fwd.sock'/>\
              <target type='guestfwd' address='10.0.2.1' port='4600'/></channel>\
            <serial type='unix'><source mode='connect' path='/run/hub.sock'/><target port='1'/></serial>";
        let out = copy_of(devices).unwrap();
        assert_eq!(
            attrs(&out, "source", "path"),
            [
                Some("/run/vms/web1-restored.serial".into()),
                Some("/run/vms/web1-restored.serial".into()),
                None,
                Some("/run/web1-restored-fwd.sock".into()),
                Some("/run/hub.sock".into()),
            ]
        );
    }

    /// A TCP or UDP port the original listens on becomes 0 (QEMU picks a free one); the
    /// host address and the ports it connects to stay.
    #[test]
    fn copy_lets_qemu_pick_listening_tcp_and_udp_ports() {
        let devices = "\
            <serial type='tcp'><source mode='bind' host='127.0.0.1' service='4555'/><protocol type='telnet'/></serial>\
            <serial type='tcp'><source mode='connect' host='10.0.0.1' service='4556'/></serial>\
            <serial type='udp'><source mode='bind' host='0.0.0.0' service='4557'/>\
              <source mode='connect' host='10.0.0.2' service='4558'/></serial>";
        let out = copy_of(devices).unwrap();
        assert_eq!(
            attrs(&out, "source", "service"),
            [
                Some("0".into()),
                Some("4556".into()),
                Some("0".into()),
                Some("4558".into())
            ]
        );
        assert_eq!(
            attrs(&out, "source", "host"),
            [
                Some("127.0.0.1".into()),
                Some("10.0.0.1".into()),
                Some("0.0.0.0".into()),
                Some("10.0.0.2".into())
            ]
        );
    }

    /// VNC and SPICE with fixed ports get libvirt's ports (websocket too), keep their
    /// listen addresses, and a socket listener loses the original's socket path.
    #[test]
    fn copy_gives_graphics_automatic_ports() {
        let devices = "\
            <graphics type='vnc' port='5911' autoport='no' websocket='5711' listen='127.0.0.1'>\
              <listen type='address' address='127.0.0.1'/></graphics>\
            <graphics type='spice' port='5912' tlsPort='5913' autoport='no'>\
              <listen type='address' address='0.0.0.0'/></graphics>\
            <graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-3-web1/vnc.sock'>\
              <listen type='socket' socket='/var/lib/libvirt/qemu/domain-3-web1/vnc.sock'/></graphics>";
        let out = copy_of(devices).unwrap();
        Document::parse(&out).unwrap();
        assert_eq!(
            attrs(&out, "graphics", "autoport"),
            [Some("yes".into()), Some("yes".into()), None]
        );
        for attr in ["port", "tlsPort", "socket"] {
            assert_eq!(
                attrs(&out, "graphics", attr),
                [None, None, None],
                "{attr}: {out}"
            );
        }
        assert_eq!(
            attrs(&out, "graphics", "websocket"),
            [Some("-1".into()), None, None]
        );
        assert_eq!(
            attrs(&out, "graphics", "listen"),
            [Some("127.0.0.1".into()), None, None]
        );
        assert_eq!(
            attrs(&out, "listen", "address"),
            [Some("127.0.0.1".into()), Some("0.0.0.0".into()), None]
        );
        assert_eq!(attrs(&out, "listen", "socket"), [None, None, None]);
        assert!(!out.contains("domain-3-web1"), "{out}");
    }

    /// An emulated TPM keeps its state in libvirt's folder of the domain's UUID, which the
    /// copy does not have; a state path the XML names is dropped; a host TPM is refused.
    /// The firmware state a definition names: the variable store in either of libvirt's
    /// forms, an emulated TPM with or without a named folder; none for a passed-through TPM.
    #[test]
    fn firmware_state_names_the_nvram_file_and_the_tpm() {
        let fw = firmware_state(DOMAIN).unwrap();
        assert_eq!(
            fw.nvram.as_deref(),
            Some(Path::new("/var/lib/libvirt/qemu/nvram/web1_VARS.fd"))
        );
        assert_eq!(fw.tpm, None);
        let xml = "<domain><os><nvram type='file' template='/t.fd'><source file='/n/a.fd'/></nvram></os>\
                   <devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>";
        let fw = firmware_state(xml).unwrap();
        assert_eq!(fw.nvram.as_deref(), Some(Path::new("/n/a.fd")));
        assert_eq!(fw.tpm, Some(None));
        let xml = "<domain><os><nvram type='network'><source protocol='nbd' name='x'/></nvram></os>\
                   <devices><tpm><backend type='emulator'><source type='dir' path='/s/t'/></backend></tpm></devices></domain>";
        let fw = firmware_state(xml).unwrap();
        assert_eq!(fw.nvram, None);
        assert_eq!(fw.tpm, Some(Some(PathBuf::from("/s/t"))));
        let xml = "<domain><devices><tpm><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm></devices></domain>";
        assert_eq!(firmware_state(xml).unwrap(), FirmwareState::default());
    }

    /// A copy given its own variable store names it, keeping the firmware's template.
    #[test]
    fn copy_names_its_own_nvram_when_given_one() {
        let xml = DOMAIN.replace(
            "<nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>",
            "<nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>",
        );
        let mut spec = spec();
        spec.nvram = Some("/var/lib/libvirt/qemu/nvram/web1-restored_VARS.fd".into());
        let out = copy_domain_xml(&xml, &spec, &["default".into()], &mut macs()).unwrap();
        assert!(
            out.contains("<nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web1-restored_VARS.fd</nvram>"),
            "{out}"
        );
        assert!(!out.contains("web1_VARS"), "{out}");
        assert_eq!(
            firmware_state(&out).unwrap().nvram,
            spec.nvram,
            "what the copy names is what firmware_state reads"
        );
    }

    #[test]
    fn copy_tpm_names_none_of_the_originals_state() {
        let devices =
            "<tpm model='tpm-crb'><backend type='emulator' version='2.0' persistent_state='yes'>\
                       <source type='dir' path='/var/lib/swtpm/web1'/>\
                       <active_pcr_banks><sha256/></active_pcr_banks></backend></tpm>";
        let out = copy_of(devices).unwrap();
        let doc = Document::parse(&out).unwrap();
        assert!(
            doc.descendants().all(|n| !n.has_tag_name("source")),
            "{out}"
        );
        assert!(host_paths(&out).is_empty(), "{out}");
        assert_eq!(parse_domain(&out).unwrap().uuid, None);
        assert!(
            out.contains("<active_pcr_banks><sha256/></active_pcr_banks>"),
            "{out}"
        );
        assert_eq!(attrs(&out, "backend", "type"), [Some("emulator".into())]);
        let host = "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>";
        let err = copy_of(host).unwrap_err();
        assert!(err.to_string().contains("<tpm>"), "{err}");
    }

    /// What only one VM may own or write is refused, one usage error naming the element:
    /// host devices (also as an interface), a writable host folder, a host serial port, a
    /// named pipe; a read-only folder and guest memory are copied.
    #[test]
    fn copy_refuses_what_only_the_original_may_own() {
        for (devices, named) in [
            (
                "<hostdev mode='subsystem' type='pci' managed='yes'><source>\
                 <address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>",
                "<hostdev type='pci'>",
            ),
            (
                "<interface type='hostdev'><source><address type='pci' bus='0x04'/></source></interface>",
                "<interface type='hostdev'>",
            ),
            (
                "<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>\
                 <source dir='/srv/web1-data'/><target dir='data'/></filesystem>",
                "<filesystem type='mount'>",
            ),
            (
                "<filesystem type='mount'><driver type='virtiofs' queue='1024'/>\
                 <source socket='/run/virtiofsd.sock'/><target dir='data'/><readonly/></filesystem>",
                "<filesystem type='mount'>",
            ),
            (
                "<serial type='dev'><source path='/dev/ttyS0'/></serial>",
                "<serial type='dev'>",
            ),
            (
                "<channel type='pipe'><source path='/tmp/pipe'/><target type='virtio' name='x'/></channel>",
                "<channel type='pipe'>",
            ),
            (
                "<shmem name='web1-shm'><model type='ivshmem-doorbell'/>\
                 <server path='/tmp/ivshmem_socket'/></shmem>",
                "<shmem>",
            ),
        ] {
            let err = copy_of(devices).unwrap_err();
            assert_eq!(err.kind(), crate::error::ErrorKind::Usage, "{err}");
            assert!(err.to_string().contains(named), "{named}: {err}");
        }
        let fine = "<filesystem type='mount'><source dir='/srv/iso'/><target dir='iso'/><readonly/></filesystem>\
                    <filesystem type='ram'><source usage='1024' units='KiB'/><target dir='tmp'/></filesystem>";
        let out = copy_of(fine).unwrap();
        assert!(out.contains("<source dir='/srv/iso'/>"), "{out}");
    }

    /// Shared memory gets a name of the copy's own; a fixed vsock CID becomes automatic.
    #[test]
    fn copy_renames_shared_memory_and_frees_the_vsock_cid() {
        let devices =
            "<shmem name='web1-shm'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>\
                       <shmem name='board'><model type='ivshmem-plain'/></shmem>\
                       <vsock model='virtio'><cid auto='no' address='7'/></vsock>";
        let out = copy_of(devices).unwrap();
        assert_eq!(
            attrs(&out, "shmem", "name"),
            [
                Some("web1-restored-shm".into()),
                Some("web1-restored-board".into())
            ]
        );
        assert_eq!(attrs(&out, "cid", "auto"), [Some("yes".into())]);
        assert_eq!(attrs(&out, "cid", "address"), [None]);
    }
}
