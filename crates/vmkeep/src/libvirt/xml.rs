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
        splice.remove(nvram);
    }
    let mut used_disks = BTreeSet::new();
    if let Some(devices) = child(root, "devices") {
        for dev in devices.children().filter(Node::is_element) {
            match dev.tag_name().name() {
                "disk" => copy_disk(dev, spec, &mut splice, &mut used_disks)?,
                "interface" => copy_interface(dev, spec, networks, &mut splice, new_mac)?,
                "channel" => {
                    // A per-domain socket path (the guest agent's) would clash with the
                    // original's; without one libvirt generates a fresh path.
                    if let Some(src) =
                        child(dev, "source").filter(|s| s.attribute("mode") == Some("bind"))
                    {
                        if dev.attribute("type") == Some("unix") {
                            splice.remove_attr(src, "path");
                        }
                    }
                }
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
}
