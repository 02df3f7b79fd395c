//! Human-readable profiles: the repository, VM and generation descriptions (TOML).
//!
//! Each profile ends with a `checksum = "blake3:…"` line over every byte before it, so
//! that a flipped bit in a profile is found by `check`; unknown keys are rejected so that a
//! profile written by a newer vmkeep is never half-understood. Keys added later get
//! `#[serde(default)]`.

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::GenerationId;
use crate::error::{Error, Result};
use crate::fsutil;

/// Version of the profile formats this build writes and reads.
pub const PROFILE_VERSION: u32 = 1;

const CHECKSUM_KEY: &str = "checksum = \"blake3:";

/// Serialize `value` with a header comment and the trailing checksum line.
pub fn render<T: Serialize>(title: &str, value: &T) -> Result<String> {
    let body = toml::to_string_pretty(value)
        .map_err(|e| Error::usage(format!("cannot serialize {title}: {e}")))?;
    let mut text = format!("# {title} (written by vmkeep; edits break the checksum)\n{body}");
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let sum = blake3::hash(text.as_bytes()).to_hex();
    text.push_str(&format!("{CHECKSUM_KEY}{sum}\"\n"));
    Ok(text)
}

/// Parse a profile written by [`render`], verifying its checksum and version.
pub fn parse<T: DeserializeOwned + Versioned>(path: &Path, text: &str) -> Result<T> {
    let Some(pos) = text.rfind(CHECKSUM_KEY) else {
        return Err(Error::corrupt(path, "checksum line is missing"));
    };
    let (body, line) = text.split_at(pos);
    let sum = line[CHECKSUM_KEY.len()..].trim_end().trim_end_matches('"');
    if blake3::hash(body.as_bytes()).to_hex().as_str() != sum || !line.ends_with("\"\n") {
        return Err(Error::corrupt(path, "checksum mismatch"));
    }
    let value: T =
        toml::from_str(body).map_err(|e| Error::corrupt(path, one_line(&e.to_string())))?;
    if value.version() != PROFILE_VERSION {
        return Err(Error::format(
            path,
            format!(
                "profile format {} is not supported (this vmkeep reads {PROFILE_VERSION})",
                value.version()
            ),
        ));
    }
    Ok(value)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Profiles are a few KiB (an inventory of thousands of VMs stays under a MiB); a file
/// larger than this is damage, and is not read into memory.
pub const MAX_PROFILE_LEN: u64 = 16 << 20;

/// Read and parse a profile file.
pub fn load<T: DeserializeOwned + Versioned>(path: &Path) -> Result<T> {
    // A profile that is a symbolic link is refused, never read through (the link could
    // name any file of the host): `open_ro` opens with `O_NOFOLLOW`.
    let file = fsutil::open_ro(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > MAX_PROFILE_LEN {
        return Err(Error::corrupt(path, "file is too large for a profile"));
    }
    let mut text = Vec::with_capacity(len as usize);
    (&file)
        .take(MAX_PROFILE_LEN + 1)
        .read_to_end(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > MAX_PROFILE_LEN {
        return Err(Error::corrupt(path, "file is too large for a profile"));
    }
    let text = String::from_utf8(text).map_err(|_| Error::corrupt(path, "not UTF-8 text"))?;
    parse(path, &text)
}

/// Write a profile atomically.
pub fn store<T: Serialize>(path: &Path, title: &str, value: &T) -> Result<()> {
    fsutil::atomic_write(path, render(title, value)?.as_bytes())
}

/// A profile that carries a `format` number; [`parse`] refuses any other than
/// [`PROFILE_VERSION`] with a format error.
pub trait Versioned {
    /// The profile's `format` key.
    fn version(&self) -> u32;
}

/// `REPO/repo.toml`: marks a folder as a vmkeep repository.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RepoProfile {
    /// Profile format version (`format`, 1).
    pub format: u32,
    /// Stable identity of this repository (names its checkpoints and bitmaps).
    pub id: String,
    /// When the repository was made (`created`, RFC 3339 UTC).
    pub created: String,
}

/// `REPO/VM/vm.toml`: settings fixed at a VM's first backup, and its health record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmProfile {
    /// Profile format version (`format`, 1).
    pub format: u32,
    /// The VM's name (`name`); must match its folder's name, else the profile is corrupt.
    pub name: String,
    /// Block size B in bytes (`block_size`), fixed at the first backup: a power of two from
    /// 4 KiB to 4 MiB.
    pub block_size: u32,
    /// When the first backup made the profile (`created`, RFC 3339 UTC).
    pub created: String,
    /// The outcome of the last `check` (`[last_check]`); absent until one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckRecord>,
    /// The libvirt host of the VM's last live backup (`[host]`); absent for image VMs and
    /// in profiles written before vmkeep recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostRecord>,
}

/// Which libvirt host a VM was on, and when that was seen (`[host]` of `vm.toml`, a
/// `[[vm]]` of `allvm.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// The libvirt URI as configured, without user or password (`uri`).
    pub uri: String,
    /// The host's name as libvirt reports it (`hostname`, `virConnectGetHostname`).
    pub hostname: String,
    /// When it was seen there (`time`, RFC 3339 UTC).
    pub time: String,
}

/// The outcome of the last `check` of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckRecord {
    /// When the check finished (`time`, RFC 3339 UTC).
    pub time: String,
    /// Whether it was a deep check (`deep`): every block read and verified.
    pub deep: bool,
    /// Whether it found no problem (`ok`).
    pub ok: bool,
    /// Number of problems it reported (`problems`).
    pub problems: u64,
}

/// `REPO/VM/GEN/generation.toml`: what one backup run made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerationProfile {
    /// Profile format version (`format`, 1).
    pub format: u32,
    /// The generation id (`id`), equal to its folder's name.
    pub id: GenerationId,
    /// The VM the generation belongs to (`vm`).
    pub vm: String,
    /// Start of the backup (RFC 3339, UTC).
    pub time: String,
    /// The mode actually used: full, diff or incr.
    pub mode: GenerationMode,
    /// Wall-clock time the backup took (`duration_secs`), in seconds, to the millisecond.
    pub duration_secs: f64,
    /// Whether the generation is protected (`protected`): prune never removes it.
    #[serde(default)]
    pub protected: bool,
    /// Block size B in bytes (`block_size`), the VM's.
    pub block_size: u32,
    /// Where the disks came from: "image", "nbd" or "libvirt".
    #[serde(default)]
    pub kind: SourceKind,
    /// libvirt checkpoint made with this generation (incr basis for the next run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// How consistent the disks are (libvirt VMs; absent for images and in generations
    /// written before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// One `[[disk]]` table per disk the generation holds.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskRecord>,
    /// One `[[state]]` table per firmware or TPM state file saved whole with the
    /// generation (libvirt VMs with an `<nvram>` or an emulated `<tpm>`; none otherwise).
    #[serde(default, rename = "state", skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<super::state::StateRecord>,
}

/// How consistent a libvirt generation's disks are (`consistency` in `generation.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The guest's file systems were frozen by its agent at the backup point: what the
    /// guest had written is on the disks, as after a clean unmount.
    Frozen,
    /// The disks as at a power cut (no agent, or it did not answer).
    Crash,
    /// The VM was shut off (started paused for the backup, or its files read).
    Offline,
}

impl Consistency {
    /// The name in the profile.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Frozen => "frozen",
            Consistency::Crash => "crash",
            Consistency::Offline => "offline",
        }
    }
}

/// Where a generation's disks came from (`kind` in `generation.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Image files, devices or NBD URIs given as SOURCE.
    Image,
    /// An NBD server.
    Nbd,
    /// A libvirt domain.
    Libvirt,
    /// Not recorded (a profile without `kind`, written as `kind = ""`), or a kind this
    /// version does not know.
    #[default]
    #[serde(rename = "", other)]
    Unknown,
}

/// One disk of a generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskRecord {
    /// Disk name (`name`): the `DISK` of its file names (see "Names" in `docs/FORMAT.md`).
    pub name: String,
    /// Disk size S in bytes (`size`) at this generation.
    pub size: u64,
    /// Mode used for this disk (a disk may fall back from incr to diff).
    pub mode: GenerationMode,
    /// The source as described for messages (`source`): a path or URI.
    pub source: String,
    /// Bytes read from the source (`read_bytes`).
    pub read_bytes: u64,
    /// Bytes of blocks whose content changed (`changed_bytes`).
    pub changed_bytes: u64,
    /// Bytes the repository grew by (`stored_bytes`): the reverse diff written for the
    /// previous generation plus the growth of the image's allocation.
    pub stored_bytes: u64,
    /// Digest root of the disk at this generation (`digest_root`), `blake3:<64 hex digits>`:
    /// see "Blocks and digests" in `docs/FORMAT.md`.
    pub digest_root: String,
    /// Persistent bitmap (qcow2) that tracks writes after this generation:
    /// `PREFIX.<repository id>.<generation id>`, the run's token inside the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    /// What the disk was read from, compared by the next run before it trusts a change
    /// tracker: the absolute path of a file or device (folders resolved, the last name as
    /// given), or an NBD URI (see `source::SourceIdentity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Device number (`st_dev`) of a regular-file source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_device: Option<u64>,
    /// Inode number (`st_ino`) of a regular-file source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_inode: Option<u64>,
}

/// The mode a generation (or one of its disks) was made in. A stored generation is never
/// `auto`: that is a request (`engine::Mode`), resolved to one of these for each disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenerationMode {
    /// Every allocated block read and compared with the stored image itself.
    Full,
    /// Every allocated block read; those whose digest changed stored.
    Diff,
    /// Only the blocks a change tracker named read.
    Incr,
}

impl GenerationMode {
    /// The name written in profiles: full, diff or incr.
    pub fn as_str(self) -> &'static str {
        match self {
            GenerationMode::Full => "full",
            GenerationMode::Diff => "diff",
            GenerationMode::Incr => "incr",
        }
    }
}

impl fmt::Display for GenerationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Versioned for RepoProfile {
    fn version(&self) -> u32 {
        self.format
    }
}
impl Versioned for VmProfile {
    fn version(&self) -> u32 {
        self.format
    }
}
impl Versioned for GenerationProfile {
    fn version(&self) -> u32 {
        self.format
    }
}

impl GenerationProfile {
    /// The record of disk `name`, if the generation has that disk.
    pub fn disk(&self, name: &str) -> Option<&DiskRecord> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// Current time in RFC 3339 (UTC, second precision).
pub fn now_rfc3339() -> String {
    format_time(time::OffsetDateTime::now_utc())
}

/// `t` in RFC 3339 at UTC, to the second (`2026-01-02T03:04:05Z`), as profiles store times.
pub fn format_time(t: time::OffsetDateTime) -> String {
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.to_offset(time::UtcOffset::UTC)
        .format(&f)
        .unwrap_or_default()
}

/// Parse a time written by [`format_time`] (or any RFC 3339 time).
pub fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_round_trip_and_checksum() {
        let p = RepoProfile {
            format: 1,
            id: "abc".into(),
            created: now_rfc3339(),
        };
        let text = render("repository", &p).unwrap();
        let back: RepoProfile = parse(Path::new("x"), &text).unwrap();
        assert_eq!(back, p);
        let flipped = text.replacen("abc", "abd", 1);
        let err = parse::<RepoProfile>(Path::new("x"), &flipped).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let body = "format = 1\nid = \"a\"\ncreated = \"b\"\ncolour = 3\n";
        let text = format!(
            "{body}checksum = \"blake3:{}\"\n",
            blake3::hash(body.as_bytes()).to_hex()
        );
        let err = parse::<RepoProfile>(Path::new("x"), &text).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn newer_versions_are_refused() {
        let p = RepoProfile {
            format: 2,
            id: "a".into(),
            created: "b".into(),
        };
        let text = render("repository", &p).unwrap();
        let err = parse::<RepoProfile>(Path::new("x"), &text).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
    }
}
