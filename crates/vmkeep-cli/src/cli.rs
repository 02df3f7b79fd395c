//! The command-line surface (a contract: see docs/ARCHITECTURE.md). Help, completions and
//! the man page are generated from these definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "vmkeep",
    version,
    about = "Block-level backups of VM disks: the newest generation a plain sparse image, older ones compressed reverse diffs",
    after_help = "Exit status: 0 success, 1 failure, 2 usage error, 3 damage found (check; restore, merge, serve or verify meeting a damaged archive).\nDocumentation: docs/ in the source tree, or man vmkeep."
)]
pub struct Cli {
    /// Repository folder [default: from the config file, else /var/lib/vmkeep]
    #[arg(long, global = true, env = "VMKEEP_REPO", value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Config file [default: /etc/vmkeep/vmkeep.toml if it exists]
    #[arg(long, global = true, env = "VMKEEP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More detail (repeat for debug output); RUST_LOG works too
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository (idempotent)
    #[command(after_help = "Example:\n  vmkeep --repo /backup/vmkeep init")]
    Init,
    /// Record the hypervisor's inventory of VMs in the repository (allvm.toml)
    #[command(after_help = "Example:\n  vmkeep update --connect qemu:///system")]
    Update(UpdateArgs),
    /// Back up VMs or disk images
    #[command(
        after_help = "Examples:\n  vmkeep backup web1 db1                       live backup of libvirt domains\n  vmkeep backup --all --if-due                 every VM whose schedule says so\n  vmkeep backup demo --disk vda=/dev/vg/demo   a block device\n  vmkeep backup demo --disk vda=disk.qcow2?bitmap=vmkeep --mode incr"
    )]
    Backup(BackupArgs),
    /// Show generations and health
    #[command(after_help = "Example:\n  vmkeep status web1\n  vmkeep status --json")]
    Status(StatusArgs),
    /// Restore a generation to a file, device, qcow2 image or NBD server, or as a new VM
    #[command(
        after_help = "Examples:\n  vmkeep restore web1 --disk vda --to /tmp/vda.raw\n  vmkeep restore web1 --generation 3 --disk vda --to /dev/vg/web1-restore\n  vmkeep restore web1 --generation 1 --disk vda --to /tmp/vda.qcow2\n  vmkeep restore web1 --generation 1 --as-vm web1-restored --start"
    )]
    Restore(RestoreArgs),
    /// Verify archives; exit 3 when damage is found
    #[command(
        after_help = "Examples:\n  vmkeep check --all\n  vmkeep check web1 --deep --generation all"
    )]
    Check(CheckArgs),
    /// Drop generations that a retention schedule no longer keeps
    #[command(
        after_help = "Example:\n  vmkeep prune --all --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run"
    )]
    Prune(PruneArgs),
    /// Write a past generation of a disk as a sparse raw image
    #[command(
        after_help = "Example:\n  vmkeep merge web1 --generation 2 --disk vda --out /tmp/vda-2.raw"
    )]
    Merge(MergeArgs),
    /// Prove that disks hold a generation's bytes (a restored copy, a live disk); exit 1
    /// when they differ, 3 when the archive is damaged
    #[command(
        after_help = "Examples:\n  vmkeep verify web1 --generation 1 --disk vda=/var/lib/libvirt/images/web1-copy-vda.qcow2\n  vmkeep verify web1 --disk vda=/dev/vg0/web1 --disk vdb='nbd+unix:///vdb?socket=/run/x.sock'"
    )]
    Verify(VerifyArgs),
    /// Print any archive file in human-readable form
    #[command(after_help = "Example:\n  vmkeep print /backup/vmkeep/web1/latest/vda.digest")]
    Print(PrintArgs),
    /// List a VM's vmkeep checkpoints (libvirt) and whose they are; remove orphaned ones
    #[command(
        after_help = "Examples:\n  vmkeep checkpoints web1\n  vmkeep checkpoints web1 --remove-orphans"
    )]
    Checkpoints(CheckpointsArgs),
    /// Protect a generation from prune, or lift the protection
    #[command(after_help = "Example:\n  vmkeep protect web1 --generation 0")]
    Protect(ProtectArgs),
    /// Export a generation's disks read-only over NBD until interrupted
    #[command(
        after_help = "Examples:\n  vmkeep serve web1 --socket /run/vmkeep/web1.sock\n  vmkeep serve web1 --generation 3 --listen 127.0.0.1:10809 --tls-dir /etc/pki/vmkeep\n  nbdcopy 'nbd+unix:///vda?socket=/run/vmkeep/web1.sock' vda.raw\n  nbdcopy 'nbds://127.0.0.1:10809/vda?tls-certificates=/etc/pki/vmkeep-client' vda.raw\n\nThe served generation is pinned: prune keeps it until the server stops.\nStops on SIGINT or SIGTERM."
    )]
    Serve(ServeArgs),
    /// Copy finished generations to an offsite target, encrypted and authenticated
    #[command(
        after_help = "Examples:\n  vmkeep key create /root/vmkeep-offsite.key\n  vmkeep sync --all --to file:///mnt/offsite/vmkeep --key /root/vmkeep-offsite.key\n  vmkeep restore web1 --from file:///mnt/offsite/vmkeep --key /root/vmkeep-offsite.key -g 0 --disk vda --to /tmp/vda.raw\n\nOnly what the target lacks is uploaded; an interrupted sync is resumed by the next one.\nSee docs/offsite.md."
    )]
    Sync(SyncArgs),
    /// Offsite keys: create one
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print shell completions
    #[command(after_help = "Example:\n  vmkeep completions bash > /etc/bash_completion.d/vmkeep")]
    Completions(CompletionsArgs),
    /// Write the man pages to a folder
    #[command(hide = true)]
    Manpages(ManpagesArgs),
}

#[derive(Debug, Args)]
pub struct Targets {
    /// VMs to act on
    #[arg(value_name = "VM")]
    pub vms: Vec<String>,
    /// Every VM of a group from the config file
    #[arg(long, value_name = "G", conflicts_with = "all")]
    pub group: Option<String>,
    /// Every VM
    #[arg(long)]
    pub all: bool,
}

impl Targets {
    /// `--all`, or the built-in group `all`.
    pub fn is_all(&self) -> bool {
        self.all || self.group.as_deref() == Some("all")
    }
}

/// `--from TARGET --key FILE`: read an offsite copy instead of the repository.
#[derive(Debug, Args, Clone)]
pub struct FromArgs {
    /// Read the offsite copy at TARGET (file:///PATH or dir:PATH) instead of the repository
    #[arg(long, value_name = "TARGET")]
    pub from: Option<String>,
    /// The offsite key file (made by `vmkeep key create`)
    #[arg(long, value_name = "FILE", env = "VMKEEP_KEY")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Make a new offsite key file (mode 0600, never over an existing file); keep a copy
    /// elsewhere: without it the offsite copies cannot be read
    #[command(after_help = "Example:\n  vmkeep key create /root/vmkeep-offsite.key")]
    Create {
        /// The new key file
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub targets: Targets,
    /// Where to: file:///PATH or dir:PATH (a folder of encrypted objects), or a plain
    /// PATH (another vmkeep repository, made if missing: a replica)
    /// [default: the config's [offsite] to]
    #[arg(long, value_name = "TARGET")]
    pub to: Option<String>,
    /// The offsite key file (made by `vmkeep key create`; not for a replica PATH)
    #[arg(long, value_name = "FILE", env = "VMKEEP_KEY")]
    pub key: Option<PathBuf>,
    /// Uploads at once [default: the config's [offsite] jobs, else 4]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: Option<u32>,
    /// Upload at most RATE bytes per second on average (K, M or G suffixes: 20M)
    #[arg(long, value_name = "RATE")]
    pub limit_rate: Option<String>,
    /// Close packs at this size (K, M or G suffixes)
    #[arg(long, value_name = "SIZE", default_value = "8M", hide = true)]
    pub pack_size: String,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// libvirt connection URI [default: from the config file, else qemu:///system]
    #[arg(long, value_name = "URI")]
    pub connect: Option<String>,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub targets: Targets,
    /// Backup mode [default: from the config file, else auto]
    #[arg(long, value_name = "MODE")]
    pub mode: Option<ModeArg>,
    /// Back up disk NAME from SOURCE (a raw file or device, an image file for qemu-nbd,
    /// PATH?bitmap=PREFIX for qcow2 bitmaps PREFIX.<repository id>.<generation id>, or an
    /// NBD URI); repeat for more disks
    #[arg(long = "disk", value_name = "NAME=SOURCE")]
    pub disks: Vec<String>,
    /// Changed-block list for disk NAME (lines "OFFSET LENGTH", or vSphere changedArea JSON)
    #[arg(long = "changed-blocks", value_name = "NAME=FILE")]
    pub changed_blocks: Vec<String>,
    /// Block size of a VM's first backup (4K to 4M, a power of two)
    #[arg(long, value_name = "SIZE")]
    pub block_size: Option<String>,
    /// zstd level of reverse diffs (0 = none, 1-19)
    #[arg(long, value_name = "N")]
    pub compression: Option<i32>,
    /// libvirt connection URI [default: from the config file, else qemu:///system]
    #[arg(long, value_name = "URI")]
    pub connect: Option<String>,
    /// Bytes per bit of new persistent bitmaps (`?bitmap=` qcow2 sources; libvirt's
    /// checkpoints always use the qcow2 cluster size)
    #[arg(long, value_name = "SIZE")]
    pub bitmap_granularity: Option<String>,
    /// Skip VMs whose newest generation is younger than their interval
    #[arg(long)]
    pub if_due: bool,
    /// How a shut-off libvirt VM is backed up [default: from the config file, else start]
    #[arg(long, value_name = "HOW")]
    pub offline_read: Option<OfflineReadArg>,
    /// Freeze the guest's file systems (guest agent) at the backup point: require, auto
    /// (crash-consistent when no agent answers), off [default: from the config file, else
    /// auto]
    #[arg(long, value_name = "HOW")]
    pub quiesce: Option<QuiesceArg>,
    /// Let a remote host's backup job export the disks over plain TCP, without TLS: anyone
    /// on the network path can read them (a trusted, isolated network only)
    #[arg(long)]
    pub insecure_nbd: bool,
    /// Back up this many VMs at once, each under its own lock [default: from the config
    /// file, else 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub jobs: Option<u32>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// VMs to show (all by default)
    #[arg(value_name = "VM")]
    pub vms: Vec<String>,
    /// Exit 0/1/2 (OK/WARNING/CRITICAL) from the age of the newest generations and the last check
    #[arg(long)]
    pub check_health: bool,
    /// Write metrics for node_exporter's textfile collector to FILE
    #[arg(long, value_name = "FILE")]
    pub prometheus: Option<PathBuf>,
    #[command(flatten)]
    pub offsite: FromArgs,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    pub vm: String,
    /// Generation: id or unique prefix, N (0 = newest), or latest
    #[arg(long, short = 'g', value_name = "REV", default_value = "latest")]
    pub generation: String,
    /// Disk to restore (may be left out when the generation has one disk)
    #[arg(long, value_name = "NAME")]
    pub disk: Option<String>,
    /// Target: a file, block device, .qcow2 path or NBD URI
    #[arg(
        long,
        value_name = "TARGET",
        required_unless_present = "as_vm",
        conflicts_with = "as_vm"
    )]
    pub to: Option<std::ffi::OsString>,
    /// Define a new libvirt VM from the generation, named NEWNAME
    #[arg(long, value_name = "NEWNAME")]
    pub as_vm: Option<String>,
    /// Folder for the new VM's disks [default: /var/lib/libvirt/images]
    #[arg(long, value_name = "DIR", requires = "as_vm", conflicts_with = "pool")]
    pub disk_dir: Option<PathBuf>,
    /// Upload the new VM's disks into this libvirt storage pool (through the connection:
    /// the way onto a remote host, where it is the default, with pool "default")
    #[arg(long, value_name = "POOL", requires = "as_vm")]
    pub pool: Option<String>,
    /// Disk format for --as-vm
    #[arg(long, value_name = "FMT", requires = "as_vm", default_value = "qcow2")]
    pub format: FormatArg,
    /// Start the new VM
    #[arg(long, requires = "as_vm")]
    pub start: bool,
    /// Redefine an existing shut-off VM of that name (a running one is never touched)
    #[arg(long, requires = "as_vm")]
    pub replace: bool,
    /// Use network NEW where the saved VM used OLD: OLD=NEW
    #[arg(long = "network", value_name = "OLD=NEW", requires = "as_vm")]
    pub networks: Vec<String>,
    /// Boot the new VM at once from qcow2 overlays over an NBD export of the archive
    /// (instant recovery; `vmkeep serve` keeps running in the background)
    #[arg(long, requires = "as_vm")]
    pub instant: bool,
    /// libvirt connection URI
    #[arg(long, value_name = "URI")]
    pub connect: Option<String>,
    /// Write what can be read where blocks are damaged, and list the ranges
    #[arg(long)]
    pub ignore_damage: bool,
    #[command(flatten)]
    pub offsite: FromArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("endpoint").required(true).args(["socket", "listen"])))]
pub struct ServeArgs {
    pub vm: String,
    /// Generation: id or unique prefix, N (0 = newest), or latest
    #[arg(long, short = 'g', value_name = "REV", default_value = "latest")]
    pub generation: String,
    /// Listen on a unix socket at PATH (created mode 0600, removed on exit)
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Listen on TCP at HOST[:PORT] with TLS client certificates (port 10809 by default,
    /// 0 picks a free one; loopback only unless --allow-remote)
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Folder with ca-cert.pem, server-cert.pem and server-key.pem (libvirt's and QEMU's
    /// layout); clients must present a certificate signed by that CA
    #[arg(long, value_name = "DIR", requires = "listen")]
    pub tls_dir: Option<PathBuf>,
    /// The server's certificate chain (PEM), instead of DIR/server-cert.pem
    #[arg(long, value_name = "FILE", requires = "listen")]
    pub tls_cert: Option<PathBuf>,
    /// The server's private key (PEM), instead of DIR/server-key.pem
    #[arg(long, value_name = "FILE", requires = "listen")]
    pub tls_key: Option<PathBuf>,
    /// The CA that client certificates must chain to (PEM), instead of DIR/ca-cert.pem
    #[arg(long, value_name = "FILE", requires = "listen")]
    pub tls_ca: Option<PathBuf>,
    /// Serve plain TCP without TLS or authentication. UNSAFE on a multi-user host: every
    /// local user can connect to a loopback port and read every served disk
    #[arg(long, requires = "listen", conflicts_with_all = ["tls_dir", "tls_cert", "tls_key", "tls_ca", "allow_remote"])]
    pub insecure_tcp: bool,
    /// Serve on addresses beyond loopback (needs TLS)
    #[arg(long, requires = "listen")]
    pub allow_remote: bool,
    /// Close a connection after this many seconds without a request (0: never)
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    pub idle_timeout: u64,
    /// Make the socket 0660 with this group (name or id) so that, say, QEMU can connect
    #[arg(long, value_name = "GROUP", requires = "socket")]
    pub socket_group: Option<String>,
    /// Instant recovery: once libvirt domain NAME runs, pull the generation into the disks
    /// whose backing store is this server, and exit when none needs it
    #[arg(long, value_name = "NAME")]
    pub finish_domain: Option<String>,
    /// libvirt connection URI of --finish-domain [default: from the config file, else
    /// qemu:///system]
    #[arg(long, value_name = "URI", requires = "finish_domain")]
    pub connect: Option<String>,
    /// Write the progress of --finish-domain to FILE (JSON; `status` reads it)
    #[arg(long, value_name = "FILE", requires = "finish_domain")]
    pub state: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub targets: Targets,
    /// Generations a deep check reconstructs: REV or all
    #[arg(long, short = 'g', value_name = "REV", default_value = "all")]
    pub generation: String,
    /// Reconstruct generations and prove their digest roots (with --from: read and prove
    /// every block of every pack)
    #[arg(long)]
    pub deep: bool,
    #[command(flatten)]
    pub offsite: FromArgs,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub targets: Targets,
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Print what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub offsite: FromArgs,
    /// With --from: keep unreferenced packs younger than this (a sync in flight uploads
    /// its packs before its manifest): 30m, 12h, 1d
    #[arg(long, value_name = "DURATION", default_value = "1d")]
    pub grace: String,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    pub vm: String,
    #[arg(long, short = 'g', value_name = "REV")]
    pub generation: String,
    #[arg(long, value_name = "NAME")]
    pub disk: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub vm: String,
    /// Generation: id or unique prefix, N (0 = newest), or latest
    #[arg(long, short = 'g', value_name = "REV", default_value = "latest")]
    pub generation: String,
    /// Disk NAME of the generation against PATH: a raw file or device, an image qemu-nbd
    /// reads (qcow2, …), or an NBD URI (repeat for several disks)
    #[arg(long = "disk", value_name = "NAME=PATH", required = true)]
    pub disks: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PrintArgs {
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    pub vm: String,
    /// Delete checkpoints whose repository is gone, and this repository's that no
    /// generation needs
    #[arg(long)]
    pub remove_orphans: bool,
    /// libvirt connection URI
    #[arg(long, value_name = "URI")]
    pub connect: Option<String>,
}

#[derive(Debug, Args)]
pub struct ProtectArgs {
    pub vm: String,
    #[arg(long, short = 'g', value_name = "REV")]
    pub generation: String,
    /// Lift the protection
    #[arg(long)]
    pub off: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManpagesArgs {
    pub dir: PathBuf,
}

/// `backup --mode`: the values of [`vmkeep::engine::Mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Incr where changes are tracked, else diff where a previous generation exists, else full
    Auto,
    /// Read every allocated block and compare it with the stored image itself
    Full,
    /// Read every allocated block; store those whose digest changed
    Diff,
    /// Read only the blocks a change tracker names
    Incr,
}

/// `--quiesce` and the config's `quiesce`: whether the guest is frozen for the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuiesceArg {
    /// Freeze; fail the VM's backup when its guest agent does not answer
    Require,
    /// Freeze when the guest agent answers, else a crash-consistent backup (said in one line)
    Auto,
    /// Never freeze
    Off,
}

#[cfg(feature = "libvirt")]
impl From<QuiesceArg> for vmkeep::engine::quiesce::Quiesce {
    fn from(q: QuiesceArg) -> Self {
        use vmkeep::engine::quiesce::Quiesce;
        match q {
            QuiesceArg::Require => Quiesce::Require,
            QuiesceArg::Auto => Quiesce::Auto,
            QuiesceArg::Off => Quiesce::Off,
        }
    }
}

/// `--offline-read` and the config's `offline_read`: how a shut-off libvirt VM is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OfflineReadArg {
    /// Start it paused, back it up like a running VM (incrementals), shut it off again
    Start,
    /// Read its disk files directly (local hosts only; every later run is a diff)
    Files,
}

#[cfg(feature = "libvirt")]
impl From<OfflineReadArg> for vmkeep::engine::live::OfflineRead {
    fn from(m: OfflineReadArg) -> Self {
        match m {
            OfflineReadArg::Start => vmkeep::engine::live::OfflineRead::Start,
            OfflineReadArg::Files => vmkeep::engine::live::OfflineRead::Files,
        }
    }
}

impl From<ModeArg> for vmkeep::engine::Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Auto => Self::Auto,
            ModeArg::Full => Self::Full,
            ModeArg::Diff => Self::Diff,
            ModeArg::Incr => Self::Incr,
        }
    }
}

/// `restore --format`: the values of [`vmkeep::target::ImageFormat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// qcow2 images
    Qcow2,
    /// Sparse raw images
    Raw,
}

impl From<FormatArg> for vmkeep::target::ImageFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Qcow2 => Self::Qcow2,
            FormatArg::Raw => Self::Raw,
        }
    }
}
