//! Test support for libvirt: start the daemons when none runs, and throw-away VMs that
//! need no guest OS (TCG, an idle BIOS, qcow2 or raw disks) and remove themselves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const URI: &str = "qemu:///system";

/// Run a command; panic with its stderr when it fails. Returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn virsh(args: &[&str]) -> String {
    run(Command::new("virsh").arg("-c").arg(URI).args(args))
}

/// `virsh` whose failure is expected or irrelevant (cleanup).
pub fn virsh_quiet(args: &[&str]) -> bool {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn libvirtd_answers() -> bool {
    virsh_quiet(&["version"])
}

/// Make sure libvirtd (and virtlogd, which QEMU's log goes through) runs; start both
/// when nothing answers on qemu:///system. Safe to call from every test.
pub fn ensure_libvirtd() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if libvirtd_answers() {
            return;
        }
        for daemon in ["virtlogd", "libvirtd"] {
            // `-d` daemonizes; a daemon already running just fails to take its pid file.
            let _ = Command::new(daemon).arg("-d").status();
        }
        let start = Instant::now();
        while !libvirtd_answers() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "libvirtd did not answer on {URI} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
}

/// Stop libvirtd and start it again as `libvirtd ARGS…` (`-d`, and a test's own config);
/// running VMs keep running. Returns once it answers on [`URI`].
pub fn restart_libvirtd(args: &[&str]) {
    let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        // A daemon busy winding down streams may take long: after 15 s, make it stop.
        if Instant::now() + Duration::from_secs(15) > deadline {
            let _ = Command::new("pkill")
                .args(["-KILL", "-x", "libvirtd"])
                .status();
        }
        assert!(Instant::now() < deadline, "libvirtd did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(Command::new("libvirtd")
        .args(args)
        .status()
        .is_ok_and(|s| s.success()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !libvirtd_answers() {
        assert!(Instant::now() < deadline, "libvirtd did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A disk of a test VM.
pub struct TestDisk {
    pub target: &'static str,
    pub format: &'static str,
    pub size_mib: u64,
    pub path: PathBuf,
}

/// A running throw-away VM; destroyed, undefined (with checkpoint metadata) and its
/// files removed on drop, also when the test panics.
pub struct TestVm {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub disks: Vec<TestDisk>,
}

/// Stands for the VM's name in the extra devices of [`TestVm::define`].
pub const NAME: &str = "@VM_NAME@";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique name for a test domain (`vmkeep-test-TAG-PID-N`) and a new temp folder for its
/// files that QEMU (libvirt-qemu) can traverse; libvirtd runs.
pub fn new_domain(tag: &str) -> (String, tempfile::TempDir) {
    ensure_libvirtd();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("vmkeep-test-{tag}-{}-{n}", std::process::id());
    let dir = tempfile::Builder::new()
        .prefix("vmkeep-lv-")
        .tempdir()
        .unwrap();
    set_mode(dir.path(), 0o755);
    (name, dir)
}

impl TestVm {
    /// Define and start a VM with the given disks (target, format, MiB); virtio, so the
    /// targets are vda, vdb… and QEMU's devices virtio-disk0, virtio-disk1…
    pub fn start(tag: &str, disks: &[(&'static str, &'static str, u64)]) -> TestVm {
        let vm = TestVm::define(tag, disks, "");
        virsh(&["start", &vm.name]);
        vm
    }

    /// Define (not start) a VM; `extra_devices` is spliced into `<devices>`, with the VM's
    /// name in place of each [`NAME`].
    pub fn define(
        tag: &str,
        disks: &[(&'static str, &'static str, u64)],
        extra_devices: &str,
    ) -> TestVm {
        let (name, dir) = new_domain(tag);
        let mut vm = TestVm {
            name,
            dir,
            disks: Vec::new(),
        };
        let mut devices = String::new();
        for &(target, format, size_mib) in disks {
            let path = vm.dir.path().join(format!("{target}.{format}"));
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", format])
                .arg(&path)
                .arg(format!("{size_mib}M")));
            devices.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{format}'/>\
                 <source file='{}'/><target dev='{target}' bus='virtio'/></disk>\n",
                path.display()
            ));
            vm.disks.push(TestDisk {
                target,
                format,
                size_mib,
                path,
            });
        }
        let xml = format!(
            "<domain type='qemu'><name>{}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\
             <on_poweroff>destroy</on_poweroff><devices>{devices}{}</devices></domain>",
            vm.name,
            extra_devices.replace(NAME, &vm.name)
        );
        let file = vm.dir.path().join("domain.xml");
        std::fs::write(&file, xml).unwrap();
        virsh(&["define", file.to_str().unwrap()]);
        vm
    }

    pub fn disk(&self, target: &str) -> &TestDisk {
        self.disks.iter().find(|d| d.target == target).unwrap()
    }

    /// Write `len` bytes of `pattern` at `offset` of disk `index` (0 = vda) as the guest
    /// would: QEMU's qemu-io on the virtio device, through the HMP monitor.
    pub fn guest_write(&self, index: usize, pattern: u8, offset: &str, len: &str) {
        let cmd = format!(
            "qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend \"write -P {pattern:#x} {offset} {len}\""
        );
        let out = virsh(&["qemu-monitor-command", &self.name, "--hmp", &cmd]);
        assert!(
            !out.contains("error") && !out.contains("failed"),
            "qemu-io: {out}"
        );
    }

    /// Make QEMU write its cached image metadata (qcow2 L2 tables) to disk `index`'s file,
    /// so that reading the file from outside (`qemu-img convert -U`) sees the guest's writes.
    pub fn flush(&self, index: usize) {
        let cmd = format!("qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend flush");
        virsh(&["qemu-monitor-command", &self.name, "--hmp", &cmd]);
    }

    /// `kill -9` the VM's QEMU, as the OOM killer or a host crash would, and wait until
    /// libvirt has seen it die (QEMU saves no bitmap then).
    pub fn kill_qemu(&self) {
        let pidfile = format!("/run/libvirt/qemu/{}.pid", self.name);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{pidfile}: {e}"))
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill(2) on the QEMU of the VM this test made.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !virsh(&["domstate", &self.name]).contains("shut off") {
            assert!(Instant::now() < deadline, "libvirt did not see QEMU die");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Path for a file of the test in the VM's folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        remove_domain(&self.name);
    }
}

/// Stop and undefine the domain `name` with its checkpoint and snapshot metadata and its
/// NVRAM file, if it has one; quietly, for cleanup.
pub fn remove_domain(name: &str) {
    virsh_quiet(&["destroy", name]);
    virsh_quiet(&[
        "undefine",
        name,
        "--nvram",
        "--checkpoints-metadata",
        "--snapshots-metadata",
    ]);
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A whole disk as raw bytes: `qemu-img convert` from an image (`-U`: the VM holds the
/// lock) or from an NBD URI.
pub fn read_all(source: &str, format: &str, scratch: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(scratch);
    let mut cmd = Command::new("qemu-img");
    cmd.arg("convert");
    if !source.starts_with("nbd") {
        cmd.arg("-U");
    }
    run(cmd.args(["-f", format, "-O", "raw", source]).arg(scratch));
    let data = std::fs::read(scratch).unwrap();
    std::fs::remove_file(scratch).unwrap();
    data
}

/// `nbdinfo --map=CONTEXT`: the (offset, length) ranges whose type has bit 0 set
/// (dirty for a dirty bitmap, hole for base:allocation).
pub fn map_ranges(uri: &str, context: &str) -> Vec<(u64, u64)> {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(uri));
    out.lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let offset: u64 = cols.next()?.parse().ok()?;
            let length: u64 = cols.next()?.parse().ok()?;
            let kind: u32 = cols.next()?.parse().ok()?;
            (kind & 1 == 1).then_some((offset, length))
        })
        .collect()
}

/// Undefines (and stops) a VM a test created by other means, on drop.
pub struct Undefine(pub String);

impl Drop for Undefine {
    fn drop(&mut self) {
        remove_domain(&self.0);
    }
}

/// A transient libvirt `dir` storage pool on a fresh folder `dir` (made here, mode 0755 so
/// that QEMU reaches its volumes); destroyed on drop (its folder stays with the test's).
pub struct PoolGuard(pub String);

impl PoolGuard {
    /// Create pool `name` on the new folder `dir`.
    pub fn create(name: &str, dir: &Path) -> PoolGuard {
        std::fs::create_dir(dir).unwrap();
        set_mode(dir, 0o755);
        virsh(&[
            "pool-create-as",
            name,
            "dir",
            "--target",
            dir.to_str().unwrap(),
        ]);
        PoolGuard(name.to_string())
    }
}

impl Drop for PoolGuard {
    fn drop(&mut self) {
        virsh_quiet(&["pool-destroy", &self.0]);
    }
}
