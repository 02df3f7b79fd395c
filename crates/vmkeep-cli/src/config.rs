//! The config file (`/etc/vmkeep/vmkeep.toml` by default; every key in docs/config.md).
//! Unknown keys are errors naming the file, line and key; command-line flags override it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmkeep::archive::retention::Schedule;
use vmkeep::engine::Mode;
use vmkeep::Error;

pub const DEFAULT_PATH: &str = "/etc/vmkeep/vmkeep.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub struct Config {
    /// Repository folder.
    pub repository: Option<PathBuf>,
    /// Block size of new VM archives ("64K", "1M" or bytes).
    pub block_size: Option<SizeValue>,
    /// zstd level of reverse diffs.
    pub compression_level: Option<i32>,
    /// libvirt URI (a VM's or group's `connect` overrides it).
    pub connect: Option<String>,
    /// VMs `backup` runs at once (`--jobs`); default 1.
    pub jobs: Option<usize>,
    /// Folder for the NBD sockets of live backups (short; closed to other users).
    pub run_dir: Option<PathBuf>,
    /// Folder for QEMU's copy-before-write scratch files during live backups.
    pub scratch_dir: Option<PathBuf>,
    /// How shut-off libvirt VMs are backed up: `"start"` (paused; the default) or `"files"`.
    pub offline_read: Option<crate::cli::OfflineReadArg>,
    /// Whether running libvirt VMs' guests are frozen for the backup (default `"auto"`).
    pub quiesce: Option<crate::cli::QuiesceArg>,
    /// TCP ports a remote host's backup job may listen on ("10810-10849").
    pub nbd_ports: Option<String>,
    /// The address a remote host's backup job listens on and vmkeep connects to (default:
    /// the host of the libvirt URI).
    pub nbd_address: Option<String>,
    /// vmkeep's TLS client credentials for remote backup jobs.
    pub nbd_tls_dir: Option<PathBuf>,
    /// The folder on a remote hypervisor for QEMU's scratch files.
    pub remote_scratch_dir: Option<PathBuf>,
    /// Bytes per bit of new persistent bitmaps ("64K").
    pub bitmap_granularity: Option<SizeValue>,
    /// Default backup mode.
    #[serde(default, deserialize_with = "mode")]
    pub mode: Option<Mode>,
    /// Minimum age of the newest generation before `backup --if-due` makes another ("1d").
    pub interval: Option<String>,
    #[serde(default)]
    pub retention: Schedule,
    /// When the retention schedule is applied: by `vmkeep prune` (`"separately"`, the
    /// default) or by each successful backup (`"after-backup"`).
    pub prune: Option<PruneWhen>,
    /// Program run before each VM's backup (a VM's own overrides it).
    pub pre_backup: Option<PathBuf>,
    /// Program run after each VM's backup, whether it succeeded or not.
    pub post_backup: Option<PathBuf>,
    /// Seconds a hook may run (default 300).
    pub hook_timeout: Option<u64>,
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default)]
    pub offsite: OffsiteConfig,
    #[serde(default)]
    pub groups: BTreeMap<String, GroupConfig>,
    #[serde(default)]
    pub vm: BTreeMap<String, VmConfig>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
pub struct VmConfig {
    /// Disks read from files, devices or NBD URIs instead of libvirt: name = source.
    #[serde(default)]
    pub disks: BTreeMap<String, String>,
    /// libvirt disks (targets) not to back up.
    #[serde(default)]
    pub skip_disks: Vec<String>,
    #[serde(default, deserialize_with = "mode")]
    pub mode: Option<Mode>,
    pub interval: Option<String>,
    pub retention: Option<Schedule>,
    /// This VM's `prune` (over the global one).
    pub prune: Option<PruneWhen>,
    /// This VM's `offline_read` (over the global one).
    pub offline_read: Option<crate::cli::OfflineReadArg>,
    /// This VM's `quiesce` (over the global one).
    pub quiesce: Option<crate::cli::QuiesceArg>,
    /// This VM's `nbd_address` (over the global one).
    pub nbd_address: Option<String>,
    pub bitmap_granularity: Option<SizeValue>,
    /// This VM's libvirt URI (over its group's and the global one).
    pub connect: Option<String>,
    /// This VM's `pre_backup` hook (over the global one; `""`: none).
    pub pre_backup: Option<PathBuf>,
    /// This VM's `post_backup` hook (over the global one; `""`: none).
    pub post_backup: Option<PathBuf>,
    /// This VM's `hook_timeout` (over the global one).
    pub hook_timeout: Option<u64>,
}

/// A `[groups]` entry: `NAME = ["vm1", …]`, or a table `{ vms = [...], connect = "URI" }`.
#[derive(Debug, Clone)]
pub enum GroupConfig {
    /// Just the members.
    List(Vec<String>),
    /// Members and settings.
    Table(GroupTable),
}

/// The table form of a group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupTable {
    pub vms: Vec<String>,
    /// libvirt URI of the group's VMs (under a VM's own `connect`).
    pub connect: Option<String>,
}

/// A list or a table, each with the parser's own errors (an unknown key in the table is
/// named, as everywhere else in the file).
impl<'de> Deserialize<'de> for GroupConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer as Map, SeqAccessDeserializer as Seq};
        use serde::de::{MapAccess, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GroupConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of VM names, or a table with `vms` and `connect`")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<GroupConfig, A::Error> {
                Vec::deserialize(Seq::new(a)).map(GroupConfig::List)
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<GroupConfig, A::Error> {
                GroupTable::deserialize(Map::new(a)).map(GroupConfig::Table)
            }
        }
        d.deserialize_any(V)
    }
}

impl GroupConfig {
    pub fn members(&self) -> &[String] {
        match self {
            GroupConfig::List(v) => v,
            GroupConfig::Table(t) => &t.vms,
        }
    }

    pub fn connect(&self) -> Option<&str> {
        match self {
            GroupConfig::List(_) => None,
            GroupConfig::Table(t) => t.connect.as_deref(),
        }
    }
}

/// Check the form of a libvirt URI: `DRIVER[+TRANSPORT]://[USER@][HOST[:PORT]]/[PATH][?…]`.
/// libvirt itself decides whether it can connect; this only turns a typo into one clear
/// line before anything runs.
pub fn check_uri(uri: &str) -> Result<(), Error> {
    let bad = |why: &str| {
        Error::usage(format!(
            "connect {uri:?}: {why} (a libvirt URI is DRIVER[+TRANSPORT]://[USER@][HOST]/PATH, e.g. qemu:///system or qemu+ssh://root@host/system)"
        ))
    };
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("spaces or control characters"));
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(bad("no \"://\""));
    };
    let mut parts = scheme.split('+');
    let driver = parts.next().unwrap_or_default();
    let transport = parts.next();
    let good_word = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_lowercase())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    if !good_word(driver) || transport.is_some_and(|t| !good_word(t)) || parts.next().is_some() {
        return Err(bad("the driver is not a word like qemu or qemu+ssh"));
    }
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if !rest[authority.len()..].starts_with('/') {
        return Err(bad("no path (like /system) after the host"));
    }
    Ok(())
}

/// The `prune` key: when a VM's retention schedule is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneWhen {
    /// Only by `vmkeep prune` (a timer of its own).
    Separately,
    /// After each successful backup, in the same run and lock; a failed one prunes nothing.
    AfterBackup,
}

/// `[serve]`: TLS credentials for `serve --listen` (flags override each key), and the
/// name remote hypervisors reach this host by (instant recovery onto them).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The host name or address a remote hypervisor's QEMU connects to for an instant
    /// recovery (the server certificate must name it); default: this host's name.
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub address: Option<String>,
    /// Folder with `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub tls_dir: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
}

/// `[offsite]`: what `sync` and the `--from` forms take when their flags are not given,
/// and `[offsite.s3]`, the S3 connection (each key wins over its `AWS_*` variable).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffsiteConfig {
    /// `sync --to`'s default target.
    pub to: Option<String>,
    /// The key file of `--key` (after `--key` and `VMKEEP_KEY`).
    pub key: Option<PathBuf>,
    /// `sync --jobs`.
    pub jobs: Option<u32>,
    /// `sync --limit-rate`.
    pub limit_rate: Option<SizeValue>,
    #[serde(default)]
    pub s3: S3Config,
}

/// `[offsite.s3]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    /// A file holding the secret access key (a secret never stands in the config file,
    /// which is usually readable by all).
    pub secret_access_key_file: Option<PathBuf>,
    pub path_style: Option<bool>,
    pub ca_file: Option<PathBuf>,
}

impl S3Config {
    /// The overrides of the S3 settings: these keys, the secret read from its file.
    pub fn overrides(&self) -> Result<vmkeep::offsite::s3::S3Overrides, Error> {
        let secret_access_key = match &self.secret_access_key_file {
            Some(p) => Some(
                vmkeep::offsite::s3::read_secret_file(p)
                    .map_err(|e| Error::usage(format!("offsite.s3.secret_access_key_file: {e}")))?,
            ),
            None => None,
        };
        Ok(vmkeep::offsite::s3::S3Overrides {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key,
            session_token: None,
            path_style: self.path_style,
            ca_file: self.ca_file.clone(),
        })
    }
}

/// A size given as a number of bytes or a string with a K/M/G suffix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    pub fn bytes(&self) -> Result<u64, Error> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s),
        }
    }
}

/// A `mode` key: the values of `--mode`, checked by the same enum.
fn mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Mode>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// "64K", "64KiB", "1M", "4096" → bytes.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::usage(format!("invalid size {s:?}")))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(Error::usage(format!("invalid size {s:?} (use K, M or G)"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::usage(format!("size {s:?} is too large")))
}

/// "30m", "12h", "1d", "2w", or seconds → seconds.
pub fn parse_duration(s: &str) -> Result<u64, Error> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::usage(format!("invalid interval {s:?}")))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => {
            return Err(Error::usage(format!(
                "invalid interval {s:?} (use s, m, h, d or w)"
            )))
        }
    };
    Ok(n * mult)
}

/// The line of a parse error: for an unknown key, the line naming that key (the parser
/// points at the table that holds it), else where the parser points.
fn error_line(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> Option<usize> {
    let start = span?.start.min(text.len());
    let first = text[..start].matches('\n').count() + 1;
    let key = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next());
    if let Some(key) = key {
        for (i, line) in text.lines().enumerate().skip(first - 1) {
            let l = line.trim_start();
            if l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
            {
                return Some(i + 1);
            }
        }
    }
    Some(first)
}

impl Config {
    /// Load `path`, or the default file if it exists, or an empty config.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default())
            }
            Err(e) => return Err(Error::usage(format!("config file {}: {e}", path.display()))),
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            let at = error_line(&text, e.span(), e.message())
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            let msg = e
                .message()
                .replace("unknown field", "unknown key")
                .replace('\n', " ");
            Error::usage(format!("config file {}{at}: {msg}", path.display()))
        })?;
        cfg.validate(&path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), Error> {
        let bad = |what: String| Error::usage(format!("config file {}: {what}", path.display()));
        if let Some(bs) = &self.block_size {
            let n = bs.bytes()?;
            if !vmkeep::archive::format::valid_block_size(n) {
                return Err(bad(format!(
                    "block_size {n} is not a power of two from 4K to 4M"
                )));
            }
        }
        for s in [&self.interval].into_iter().flatten() {
            parse_duration(s).map_err(|e| bad(e.to_string()))?;
        }
        for (name, vm) in &self.vm {
            vmkeep::archive::names::check_vm(name).map_err(|e| bad(e.to_string()))?;
            for d in vm.disks.keys() {
                vmkeep::archive::names::check_disk(d)
                    .map_err(|e| bad(format!("vm {name}: {e}")))?;
            }
            if let Some(i) = &vm.interval {
                parse_duration(i).map_err(|e| bad(format!("vm {name}: {e}")))?;
            }
            if let Some(u) = &vm.connect {
                check_uri(u).map_err(|e| bad(format!("vm {name}: {e}")))?;
            }
        }
        if let Some(u) = &self.connect {
            check_uri(u).map_err(|e| bad(e.to_string()))?;
        }
        if let Some(j) = self.jobs.filter(|j| !(1..=256).contains(j)) {
            return Err(bad(format!("jobs = {j}: must be 1 to 256")));
        }
        if let Some(j) = self.offsite.jobs.filter(|j| !(1..=64).contains(j)) {
            return Err(bad(format!("offsite.jobs = {j}: must be 1 to 64")));
        }
        if let Some(r) = &self.offsite.limit_rate {
            if r.bytes()
                .map_err(|e| bad(format!("offsite.limit_rate: {e}")))?
                == 0
            {
                return Err(bad("offsite.limit_rate must be more than 0".into()));
            }
        }
        // Which group's connect a VM takes: at most one group with a connect may hold it.
        let mut group_of: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for (g, group) in &self.groups {
            if g == "all" {
                return Err(bad("group 'all' is built in and cannot be redefined".into()));
            }
            for m in group.members() {
                vmkeep::archive::names::check_vm(m).map_err(|e| bad(format!("group {g}: {e}")))?;
            }
            let Some(u) = group.connect() else {
                continue;
            };
            check_uri(u).map_err(|e| bad(format!("group {g}: {e}")))?;
            for m in group.members() {
                if let Some((other, ou)) = group_of.insert(m, (g, u)) {
                    if ou != u
                        && self
                            .vm
                            .get(m.as_str())
                            .and_then(|v| v.connect.as_ref())
                            .is_none()
                    {
                        return Err(bad(format!(
                            "vm {m} is in groups {other} and {g}, which connect to different URIs; give [vm.{m}] its own connect"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The libvirt URI configured for VM `name`: its own `connect`, else its group's, else
    /// the global one (`None`: the default).
    pub fn connect_of(&self, name: &str) -> Option<&str> {
        if let Some(u) = self.vm.get(name).and_then(|v| v.connect.as_deref()) {
            return Some(u);
        }
        self.groups
            .values()
            .filter(|g| g.members().iter().any(|m| m == name))
            .find_map(GroupConfig::connect)
            .or(self.connect.as_deref())
    }

    /// Whether a VM or group names a libvirt URI of its own.
    pub fn has_own_connect(&self, name: &str) -> bool {
        self.connect_of(name) != self.connect.as_deref()
    }

    /// Every libvirt URI the file names (global, per VM, per group), each once, the global
    /// one first.
    pub fn configured_uris(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let all = self
            .connect
            .as_deref()
            .into_iter()
            .chain(self.vm.values().filter_map(|v| v.connect.as_deref()))
            .chain(self.groups.values().filter_map(GroupConfig::connect));
        for u in all {
            if !out.contains(&u) {
                out.push(u);
            }
        }
        out
    }

    pub fn vm(&self, name: &str) -> VmConfig {
        self.vm.get(name).cloned().unwrap_or_default()
    }

    /// VM `name`'s hook for `phase`: its own, else the global one (an empty path: none),
    /// with its time limit.
    pub fn hook(&self, name: &str, phase: vmkeep::hooks::Phase) -> Option<vmkeep::hooks::Hook> {
        use vmkeep::hooks::Phase;
        let own = self.vm.get(name);
        let path = match phase {
            Phase::PreBackup => own
                .and_then(|v| v.pre_backup.clone())
                .or_else(|| self.pre_backup.clone()),
            Phase::PostBackup => own
                .and_then(|v| v.post_backup.clone())
                .or_else(|| self.post_backup.clone()),
        }
        .filter(|p| !p.as_os_str().is_empty())?;
        let secs = own.and_then(|v| v.hook_timeout).or(self.hook_timeout);
        Some(vmkeep::hooks::Hook {
            path,
            timeout: secs.map_or(
                vmkeep::hooks::DEFAULT_TIMEOUT,
                std::time::Duration::from_secs,
            ),
        })
    }

    /// Whether a backup of VM `name` prunes as it goes (its `prune`, else the global one).
    pub fn prunes_after_backup(&self, name: &str) -> bool {
        let own = self.vm.get(name).and_then(|v| v.prune);
        own.or(self.prune) == Some(PruneWhen::AfterBackup)
    }

    /// How shut-off VM `name` is backed up: its `offline_read`, else the global one, else
    /// start it paused.
    #[cfg(feature = "libvirt")]
    pub fn offline_read_for(&self, name: &str) -> crate::cli::OfflineReadArg {
        let own = self.vm.get(name).and_then(|v| v.offline_read);
        own.or(self.offline_read)
            .unwrap_or(crate::cli::OfflineReadArg::Start)
    }

    /// The `nbd_ports` range (`"LOW-HIGH"` or one port); `None` when not set.
    #[cfg(feature = "libvirt")]
    pub fn nbd_ports(&self) -> Result<Option<std::ops::RangeInclusive<u16>>, Error> {
        let Some(text) = self.nbd_ports.as_deref() else {
            return Ok(None);
        };
        let bad = || {
            Error::usage(format!(
                "nbd_ports {text:?}: expected \"LOW-HIGH\" (ports 1-65535)"
            ))
        };
        let (low, high) = text.split_once('-').unwrap_or((text, text));
        let low: u16 = low.trim().parse().map_err(|_| bad())?;
        let high: u16 = high.trim().parse().map_err(|_| bad())?;
        if low == 0 || low > high {
            return Err(bad());
        }
        Ok(Some(low..=high))
    }

    /// The retention schedule of a VM: the global one with the VM's options over it.
    pub fn retention_for(&self, name: &str) -> Schedule {
        match self.vm.get(name).and_then(|v| v.retention.as_ref()) {
            Some(over) => self.retention.overridden_by(over),
            None => self.retention,
        }
    }

    /// Seconds a VM's newest generation must reach before `--if-due` backs it up again.
    pub fn interval_for(&self, name: &str) -> Result<Option<u64>, Error> {
        let s = self
            .vm
            .get(name)
            .and_then(|v| v.interval.clone())
            .or_else(|| self.interval.clone());
        s.map(|s| parse_duration(&s)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config, Error> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(Some(&p))
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = load_text("repository = \"/r\"\n\n[vm.web1]\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml:4"), "{err}");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn full_example_parses() {
        let c = load_text(
            "repository = \"/r\"\nblock_size = \"64K\"\ninterval = \"1d\"\n[retention]\nkeep_daily = 7\n[groups]\nweb = [\"a\", \"b\"]\n[vm.a]\ndisks = { vda = \"/dev/vg/a\" }\nretention = { keep_last = 3 }\n",
        )
        .unwrap();
        assert_eq!(c.block_size.as_ref().unwrap().bytes().unwrap(), 65536);
        assert_eq!(c.retention_for("a").keep_last, Some(3));
        assert_eq!(c.retention_for("a").keep_daily, Some(7));
        assert_eq!(c.interval_for("b").unwrap(), Some(86400));
    }

    #[test]
    fn groups_are_lists_or_tables_and_connect_has_a_precedence() {
        let c = load_text(
            "connect = \"qemu+ssh://g/system\"\n[groups]\nweb = [\"a\", \"b\"]\n[groups.far]\nvms = [\"b\", \"c\"]\nconnect = \"qemu+ssh://h2/system\"\n[vm.b]\nconnect = \"qemu+ssh://h3/system\"\n",
        )
        .unwrap();
        assert_eq!(c.groups["web"].members(), ["a", "b"]);
        assert_eq!(c.connect_of("a"), Some("qemu+ssh://g/system"));
        assert_eq!(c.connect_of("b"), Some("qemu+ssh://h3/system"));
        assert_eq!(c.connect_of("c"), Some("qemu+ssh://h2/system"));
        assert_eq!(c.connect_of("zz"), Some("qemu+ssh://g/system"));
        assert!(!c.has_own_connect("a") && c.has_own_connect("c"));
        assert_eq!(
            c.configured_uris(),
            [
                "qemu+ssh://g/system",
                "qemu+ssh://h3/system",
                "qemu+ssh://h2/system"
            ]
        );
        let err = load_text("[groups.far]\nvms = [\"a\"]\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml:3") && err.contains("colour"), "{err}");
    }

    #[test]
    fn the_offsite_table_gives_sync_defaults_and_the_s3_connection() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s3-secret");
        std::fs::write(&secret, "s3cr3t\n").unwrap();
        let text = format!(
            "[offsite]\nto = \"s3://b/hv1\"\nkey = \"/etc/vmkeep/offsite.key\"\njobs = 8\nlimit_rate = \"20M\"\n[offsite.s3]\nendpoint = \"http://127.0.0.1:3900\"\nregion = \"garage\"\naccess_key_id = \"GK1\"\nsecret_access_key_file = \"{}\"\npath_style = true\n",
            secret.display()
        );
        let c = load_text(&text).unwrap();
        assert_eq!(c.offsite.to.as_deref(), Some("s3://b/hv1"));
        assert_eq!(c.offsite.jobs, Some(8));
        assert_eq!(c.offsite.limit_rate.unwrap().bytes().unwrap(), 20 << 20);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let o = c.offsite.s3.overrides().unwrap();
        assert_eq!(o.secret_access_key.as_deref(), Some("s3cr3t"));
        assert_eq!(o.access_key_id.as_deref(), Some("GK1"));
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        // A secret others can read, a link to it, an empty one: refused, named.
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = c.offsite.s3.overrides().unwrap_err().to_string();
        assert!(e.contains("chmod 600") && e.contains("s3-secret"), "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let mut via_link = c.offsite.s3.clone();
        via_link.secret_access_key_file = Some(link);
        assert!(via_link.overrides().is_err());
        std::fs::write(&secret, "\n").unwrap();
        let e = c.offsite.s3.overrides().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        // Unknown keys and bad values are errors of the config file.
        assert!(load_text("[offsite.s3]\nsecret_access_key = \"x\"\n")
            .unwrap_err()
            .to_string()
            .contains("unknown key"));
        assert!(load_text("[offsite]\njobs = 0\n").is_err());
        assert!(load_text("[offsite]\nlimit_rate = 0\n").is_err());
    }

    #[test]
    fn uris_are_checked_for_form() {
        for good in [
            "qemu:///system",
            "qemu:///session",
            "qemu+ssh://root@h1.example:2222/system?keyfile=/k",
            "qemu+tls://h/system",
            "qemu+tcp://10.0.0.1/system",
            "qemu+unix:///system",
            "test:///default",
        ] {
            check_uri(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "system",
            "qemu:/system",
            "qemu://h",
            "QEMU:///system",
            "qemu+ssh+x://h/system",
            "qemu ssh://h/system",
            "qemu:///sys\ntem",
            "+ssh://h/system",
        ] {
            assert!(check_uri(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("1X").is_err());
        assert_eq!(parse_duration("12h").unwrap(), 43200);
    }
}
