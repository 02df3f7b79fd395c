//! The real test guest (`scripts/guest-image.sh`): a Debian cloud kernel and a busybox +
//! qemu-guest-agent initramfs, booted by direct kernel boot under TCG, with an ext4 data
//! disk (qcow2) made from known files and mounted at `/data`. A [`Guest`] is a uniquely
//! named libvirt domain of it, destroyed and undefined on drop; the test talks to it
//! through the agent (`guest-exec`) and reads its console log.
//!
//! Needs `mod lv` (tests/support/libvirt.rs of the vmkeep crate) beside it in the test
//! crate. Tests skip (with a printed reason) only when `VMKEEP_TEST_GUEST` is unset;
//! `scripts/test.sh` always builds the image and sets it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::lv::{new_domain, remove_domain, run, virsh, URI};

/// The environment variable naming the folder of the built image.
pub const IMAGE_ENV: &str = "VMKEEP_TEST_GUEST";

/// The line the guest's init prints on the serial console once its agent runs.
pub const READY: &str = "vmkeep-guest: ready";

/// How long a boot may take until the agent answers (TCG on a busy 2-core machine).
const BOOT_SECS: u64 = 120;

/// OVMF's code (read-only pflash) for [`Firmware::Uefi`] guests (Debian's `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// OVMF's empty variable store, the template of each UEFI guest's `<nvram>`.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The firmware a guest boots its kernel with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, libvirt's default.
    Bios,
    /// OVMF (UEFI) with the guest's own variable store (`<nvram>`, in its folder, made
    /// by libvirt from [`OVMF_VARS`]); the guest mounts efivarfs.
    Uefi,
}

/// The built image's folder (with `vmlinuz` and `initrd.img`), or `None` after printing
/// why the test is skipped when [`IMAGE_ENV`] is unset. A set variable naming a folder
/// without the image is a failure, never a skip.
pub fn image() -> Option<PathBuf> {
    let Some(dir) = std::env::var_os(IMAGE_ENV) else {
        eprintln!(
            "skipped: {IMAGE_ENV} is unset (scripts/test.sh builds the test guest with \
             scripts/guest-image.sh and sets it)"
        );
        return None;
    };
    let dir = PathBuf::from(dir);
    for f in ["vmlinuz", "initrd.img"] {
        assert!(
            dir.join(f).is_file(),
            "{IMAGE_ENV}={} holds no {f}: run scripts/guest-image.sh {0}",
            dir.display()
        );
    }
    Some(dir)
}

/// `scripts/guest-image.sh` of this checkout.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/guest-image.sh")
}

/// Make the ext4 image `img` of `size` (e.g. `64M`) holding the files of `folder`
/// (`scripts/guest-image.sh --data-disk`, which runs `mke2fs -t ext4 -d`).
pub fn data_disk(folder: &Path, img: &Path, size: &str) {
    run(Command::new("bash")
        .arg(script())
        .arg("--data-disk")
        .arg(folder)
        .arg(img)
        .arg(size));
}

/// The content of `path` in the ext4 image `raw` (`debugfs -R 'cat PATH'`), or what
/// debugfs said when it cannot read it.
pub fn debugfs_cat(raw: &Path, path: &str) -> Result<Vec<u8>, String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(raw)
        .output()
        .unwrap_or_else(|e| panic!("cannot run debugfs: {e} (is e2fsprogs installed?)"));
    // debugfs exits 0 whatever the request did; anything past its banner is an error.
    let err = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !out.status.success() || !complaints.is_empty() {
        return Err(format!(
            "debugfs cat {path} on {}: {}",
            raw.display(),
            err.trim()
        ));
    }
    Ok(out.stdout)
}

/// `e2fsck -fn` on the ext4 image `raw`: `Ok` when it finds the file system clean, else
/// its report.
pub fn e2fsck_clean(raw: &Path) -> Result<(), String> {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(raw)
        .output()
        .unwrap_or_else(|e| panic!("cannot run e2fsck: {e} (is e2fsprogs installed?)"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn {} exited {:?}:\n{}{}",
            raw.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// What a `guest-exec` run ended with.
pub struct Exec {
    /// Its exit code (128 + the signal when a signal ended it).
    pub code: i64,
    /// Its standard output.
    pub out: Vec<u8>,
    /// Its standard error.
    pub err: Vec<u8>,
}

/// A domain of the test guest: kernel, initrd, data disk (`vda`, qcow2) and console log in
/// its own temp folder; destroyed and undefined (with its NVRAM) on drop, also when the
/// test panics, and then its folder removed.
pub struct Guest {
    /// The domain's name (`vmkeep-test-guest-TAG-PID-N`).
    pub name: String,
    /// The guest's folder: `vmlinuz`, `initrd.img`, `data.qcow2`, `console.log`, `files/`.
    pub dir: tempfile::TempDir,
    /// The data disk, `vda` (qcow2), holding an ext4 file system mounted at `/data`.
    pub disk: PathBuf,
    /// The serial console's log file.
    pub console: PathBuf,
    /// The UEFI variable store (`<nvram>`) of a [`Firmware::Uefi`] guest.
    pub nvram: Option<PathBuf>,
    /// How long the last [`Guest::start`] took until the agent answered `guest-ping`.
    pub boot_time: Duration,
}

impl Guest {
    /// Define and start a guest whose data disk holds `files` (path below `/data`,
    /// content), and wait for its agent; `None` (the test skips) when [`IMAGE_ENV`] is
    /// unset.
    pub fn boot(tag: &str, files: &[(&str, &[u8])]) -> Option<Guest> {
        Guest::boot_with(tag, files, Firmware::Bios)
    }

    /// [`Guest::boot`] with the firmware `firmware`.
    pub fn boot_with(tag: &str, files: &[(&str, &[u8])], firmware: Firmware) -> Option<Guest> {
        let image = image()?;
        let mut g = Guest::define(tag, &image, files, firmware, "");
        g.start();
        Some(g)
    }

    /// Define (not start) a guest of the image in `image` booting through `firmware`,
    /// whose data disk (64 MiB) holds `files`; `extra_devices` is spliced into `<devices>`.
    pub fn define(
        tag: &str,
        image: &Path,
        files: &[(&str, &[u8])],
        firmware: Firmware,
        extra_devices: &str,
    ) -> Guest {
        let (name, dir) = new_domain(&format!("guest-{tag}"));
        let folder = dir.path().join("files");
        std::fs::create_dir(&folder).unwrap();
        for (path, bytes) in files {
            let p = folder.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
        }
        let ext4 = dir.path().join("data.ext4");
        data_disk(&folder, &ext4, "64M");
        let disk = dir.path().join("data.qcow2");
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&ext4)
            .arg(&disk));
        std::fs::remove_file(&ext4).unwrap();
        // A copy per guest: libvirt relabels the kernel and initrd it boots, and the
        // cache stays as it was built.
        for f in ["vmlinuz", "initrd.img"] {
            std::fs::copy(image.join(f), dir.path().join(f)).unwrap();
        }
        let console = dir.path().join("console.log");
        let nvram = (firmware == Firmware::Uefi).then(|| dir.path().join("nvram.fd"));
        let loader = match &nvram {
            None => String::new(),
            Some(vars) => format!(
                "<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>\
                 <nvram template='{OVMF_VARS}'>{}</nvram>",
                vars.display()
            ),
        };
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type>{loader}\
             <kernel>{kernel}</kernel><initrd>{initrd}</initrd>\
             <cmdline>console=ttyS0 panic=-1</cmdline></os>\
             <features><acpi/><apic/></features>\
             <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\
             <devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <serial type='file'><source path='{console}'/><target port='0'/></serial>\
             <memballoon model='none'/>{extra_devices}</devices></domain>",
            kernel = dir.path().join("vmlinuz").display(),
            initrd = dir.path().join("initrd.img").display(),
            disk = disk.display(),
            console = console.display(),
        );
        let file = dir.path().join("domain.xml");
        std::fs::write(&file, xml).unwrap();
        virsh(&["define", file.to_str().unwrap()]);
        Guest {
            name,
            dir,
            disk,
            console,
            nvram,
            boot_time: Duration::ZERO,
        }
    }

    /// Take charge of the domain `name` that someone else defined from this image (a
    /// `vmkeep restore --as-vm` copy of a guest), whose data disk is `disk` and whose
    /// serial console writes `console`: like any [`Guest`] it is destroyed and undefined
    /// on drop, and then `dir` (the folder of its disks) is removed. Nothing is started or
    /// checked; the domain need not exist yet, so the guard can be in place before the
    /// command that defines it runs.
    pub fn adopt(name: &str, dir: tempfile::TempDir, disk: PathBuf, console: PathBuf) -> Guest {
        Guest {
            name: name.to_string(),
            dir,
            disk,
            console,
            nvram: None,
            boot_time: Duration::ZERO,
        }
    }

    /// Start the domain and wait (up to 120 s) until its agent answers `guest-ping`;
    /// records how long that took in [`Guest::boot_time`].
    pub fn start(&mut self) {
        let t0 = Instant::now();
        virsh(&["start", &self.name]);
        self.wait_for_agent(t0);
    }

    /// Wait until the agent of the running domain answers `guest-ping`, up to 120 s from
    /// `t0` (when it was started); records how long that took from `t0` in
    /// [`Guest::boot_time`]. Panics with the domain's state and console log when the
    /// domain stops running or the time is up.
    pub fn wait_for_agent(&mut self, t0: Instant) {
        let deadline = t0 + Duration::from_secs(BOOT_SECS);
        loop {
            if self.agent_try(&json!({"execute": "guest-ping"})).is_ok() {
                break;
            }
            let state = self.state();
            assert!(
                state == "running" && Instant::now() < deadline,
                "guest {}: no answer to guest-ping after {:.1} s (domain {state}); console:\n{}",
                self.name,
                t0.elapsed().as_secs_f64(),
                self.console_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.boot_time = t0.elapsed();
    }

    /// The domain's state as `virsh domstate` says it ("running", "shut off", ...).
    pub fn state(&self) -> String {
        virsh(&["domstate", &self.name]).trim().to_string()
    }

    /// What the guest printed on its serial console so far.
    pub fn console_log(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(no console log {}: {e})", self.console.display()))
    }

    /// Send one command to the guest agent (`virsh qemu-agent-command`): its `return`
    /// value, or virsh's complaint.
    pub fn agent_try(&self, command: &Value) -> Result<Value, String> {
        let out = Command::new("virsh")
            .args([
                "-c",
                URI,
                "qemu-agent-command",
                &self.name,
                "--timeout",
                "10",
            ])
            .arg(command.to_string())
            .output()
            .unwrap_or_else(|e| panic!("cannot run virsh: {e}"));
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let reply: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "agent reply is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| format!("agent reply without return: {reply}"))
    }

    /// Send one command to the guest agent; its `return` value. Panics (with the
    /// console log) when the agent does not answer.
    pub fn agent(&self, command: &Value) -> Value {
        self.agent_try(command).unwrap_or_else(|e| {
            panic!(
                "guest {}: agent command {command} failed: {e}; console:\n{}",
                self.name,
                self.console_log()
            )
        })
    }

    /// Run `cmd ARGS…` in the guest through `guest-exec` with `input` as its standard
    /// input, and wait (up to 60 s) for it to end.
    pub fn exec_with_input(&self, cmd: &str, args: &[&str], input: &[u8]) -> Exec {
        let mut arguments = json!({"path": cmd, "arg": args, "capture-output": true});
        if !input.is_empty() {
            arguments["input-data"] = Value::String(base64_encode(input));
        }
        let started = self.agent(&json!({"execute": "guest-exec", "arguments": arguments}));
        let pid = started["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("guest-exec {cmd}: no pid in {started}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st =
                self.agent(&json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
            if st["exited"] == Value::Bool(true) {
                let data = |key: &str| {
                    st[key]
                        .as_str()
                        .map(|s| base64_decode(s).unwrap_or_else(|e| panic!("{key} of {st}: {e}")))
                        .unwrap_or_default()
                };
                let code = match (st["exitcode"].as_i64(), st["signal"].as_i64()) {
                    (Some(c), _) => c,
                    (None, Some(s)) => 128 + s,
                    (None, None) => panic!("guest-exec {cmd}: ended without exit code: {st}"),
                };
                return Exec {
                    code,
                    out: data("out-data"),
                    err: data("err-data"),
                };
            }
            assert!(
                Instant::now() < deadline,
                "guest-exec {cmd} {args:?} still running after 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run `cmd ARGS…` in the guest (`guest-exec`): its exit code and standard output.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> (i64, Vec<u8>) {
        let e = self.exec_with_input(cmd, args, &[]);
        (e.code, e.out)
    }

    /// Run the shell command `script` in the guest (busybox sh) with `input` as its
    /// standard input; panic unless it exits 0. Its standard output.
    fn sh(&self, script: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
        let mut argv = vec!["-c", script, "sh"];
        argv.extend_from_slice(args);
        let e = self.exec_with_input("/bin/sh", &argv, input);
        assert_eq!(
            e.code,
            0,
            "guest {}: sh -c {script:?} {args:?} exited {}: {}",
            self.name,
            e.code,
            String::from_utf8_lossy(&e.err)
        );
        e.out
    }

    /// Write `bytes` to the guest's file `path` (replacing it), through busybox sh.
    pub fn write_file(&self, path: &str, bytes: &[u8]) {
        // The agent's command travels as one command-line argument of virsh: in pieces.
        const PIECE: usize = 48 * 1024;
        self.sh(": > \"$1\"", &[path], &[]);
        for piece in bytes.chunks(PIECE) {
            self.sh("cat >> \"$1\"", &[path], piece);
        }
    }

    /// The content of the guest's file `path`, through busybox sh.
    pub fn read_file(&self, path: &str) -> Vec<u8> {
        self.sh("cat \"$1\"", &[path], &[])
    }

    /// `sync` in the guest: what it wrote is on the data disk.
    pub fn sync(&self) {
        self.sh("sync", &[], &[]);
    }

    /// Power the guest off through its agent (it syncs and unmounts `/data` first) and
    /// wait (up to 60 s) until the domain is shut off.
    pub fn shutdown(&self) {
        virsh(&["shutdown", &self.name, "--mode", "agent"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.state() != "shut off" {
            assert!(
                Instant::now() < deadline,
                "guest {} still {} 60 s after shutdown; console:\n{}",
                self.name,
                self.state(),
                self.console_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The data disk as a raw ext4 image in the guest's folder (`disk.raw`, replaced on
    /// each call), converted from the qcow2 (`-U`: a running domain holds its lock).
    pub fn disk_raw(&self) -> PathBuf {
        let raw = self.dir.path().join("disk.raw");
        let _ = std::fs::remove_file(&raw);
        run(Command::new("qemu-img")
            .args(["convert", "-U", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(&self.disk)
            .arg(&raw));
        raw
    }

    /// The content of `path` (below `/data`) in the data disk's file system as it is on
    /// the image now, read from outside the guest with debugfs.
    pub fn disk_file(&self, path: &str) -> Result<Vec<u8>, String> {
        debugfs_cat(&self.disk_raw(), path)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        remove_domain(&self.name);
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what the agent's `input-data` takes).
fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let byte = |i: usize| u32::from(*c.get(i).unwrap_or(&0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() {
                B64[((n >> shift) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Decode standard base64 (the agent's `out-data`/`err-data`).
fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for ch in text.bytes().filter(|b| !b.is_ascii_whitespace()) {
        if ch == b'=' {
            break;
        }
        let v = B64
            .iter()
            .position(|&b| b == ch)
            .ok_or_else(|| format!("not base64: {:?}", ch as char))? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[test]
fn base64_round_trips() {
    for len in 0..70 {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
        assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data, "{len}");
    }
    assert_eq!(base64_encode(b"written\n"), "d3JpdHRlbgo=");
    assert_eq!(base64_decode("d3JpdHRlbgo=").unwrap(), b"written\n");
}
