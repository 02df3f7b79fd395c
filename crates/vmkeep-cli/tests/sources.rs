//! Backups from real NBD servers and QEMU images, compared with what `nbdcopy` copies from
//! the same export; incremental backups from a persistent qcow2 bitmap; restores to qcow2
//! and NBD targets checked with `qemu-img compare`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/test.sh installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never accepted",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start a server on `sock` with `cmd` and wait until it accepts.
fn serve(mut cmd: Command, sock: &Path) -> Proc {
    let p = Proc(
        cmd.stderr(Stdio::null())
            .spawn()
            .expect("installed by scripts/test.sh"),
    );
    wait_socket(sock);
    p
}

fn qemu_nbd(image: &Path, format: &str, sock: &Path, extra: &[&str]) -> Proc {
    let mut c = Command::new("qemu-nbd");
    c.args(["-r", "-t", "-f", format, "--shared=4", "-k"])
        .arg(sock)
        .args(extra)
        .arg(image);
    serve(c, sock)
}

fn nbdkit(sock: &Path, args: &[&str]) -> Proc {
    let mut c = Command::new("nbdkit");
    c.args(["--foreground", "--exit-with-parent", "-U"])
        .arg(sock)
        .args(args);
    serve(c, sock)
}

fn nbdcopy(uri: &str, out: &Path) -> Vec<u8> {
    run(Command::new("nbdcopy").arg(uri).arg(out));
    std::fs::read(out).unwrap()
}

/// Back up `uri` as VM `vm` and require the newest image to equal what nbdcopy reads.
fn backup_equals_nbdcopy(env: &Env, vm: &str, uri: &str) {
    env.ok(&["backup", vm, "--disk", &format!("vda={uri}")]);
    let want = nbdcopy(uri, &env.path(&format!("{vm}.copy")));
    let got = std::fs::read(env.repo().join(vm).join("latest/vda.raw")).unwrap();
    assert!(
        got == want,
        "{vm}: the backup differs from nbdcopy of {uri}"
    );
}

#[test]
fn backups_from_qemu_nbd_equal_nbdcopy() {
    let env = Env::new();
    let qcow = env.path("d.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("48M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 1M 5M",
            "-c",
            "write -z 20M 4M",
            "-c",
            "write -P 0x62 30M 64k",
        ])
        .arg(&qcow));
    let sock = env.path("q.sock");
    let server = qemu_nbd(&qcow, "qcow2", &sock, &[]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    backup_equals_nbdcopy(&env, "qcow", &uri);
    drop(server);

    let raw = env.disk("d.raw", 40 << 20);
    write_at(&raw, 3 << 20, &noise(1, 7 << 20));
    let sock = env.path("r.sock");
    let _server = qemu_nbd(&raw, "raw", &sock, &[]);
    backup_equals_nbdcopy(
        &env,
        "raw",
        &format!("nbd+unix:///?socket={}", sock.display()),
    );

    // The same image read through vmkeep's own private qemu-nbd.
    env.ok(&[
        "backup",
        "direct",
        "--disk",
        &format!("vda={}", qcow.display()),
    ]);
    let got = std::fs::read(env.repo().join("direct/latest/vda.raw")).unwrap();
    assert!(got == std::fs::read(env.repo().join("qcow/latest/vda.raw")).unwrap());
}

#[test]
fn backups_from_nbdkit_plugins_equal_nbdcopy() {
    let env = Env::new();
    for (name, args) in [
        ("memory", vec!["memory", "size=16M"]),
        ("random", vec!["random", "size=16M", "seed=7"]),
        (
            "sparse",
            vec!["sparse-random", "size=64M", "seed=9", "percent=5"],
        ),
        ("pattern", vec!["pattern", "size=9M"]),
    ] {
        let sock = env.path(&format!("{name}.sock"));
        let _server = nbdkit(&sock, &args);
        backup_equals_nbdcopy(
            &env,
            name,
            &format!("nbd+unix:///?socket={}", sock.display()),
        );
    }
    // sparse-random's holes were never read.
    let js: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "sparse", "--json"])).unwrap();
    let read = js["vms"][0]["generations"][0]["disks"][0]["read_bytes"]
        .as_u64()
        .unwrap();
    assert!(read < 32 << 20, "read {read} of a 5 % dense 64 MiB disk");
}

#[test]
fn incr_from_a_persistent_qcow2_bitmap_reads_only_dirty_extents() {
    let env = Env::new();
    let img = env.path("vm.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 8M"])
        .arg(&img));
    let spec = format!("vda={}?bitmap=vmkeep", img.display());
    let copy = |tag: &str| {
        let out = env.path(&format!("{tag}.raw"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&img)
            .arg(&out));
        out
    };
    env.ok(&["backup", "vm", "--disk", &spec]);
    let mut states = vec![copy("g0")];
    for (i, (off, len)) in [("2M", "64k"), ("40M", "1M"), ("7M", "4k")]
        .iter()
        .enumerate()
    {
        run(Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {:#x} {off} {len}", 0x20 + i),
            ])
            .arg(&img));
        env.ok(&["backup", "vm", "--disk", &spec]);
        let js: serde_json::Value =
            serde_json::from_str(&env.ok(&["status", "vm", "--json"])).unwrap();
        let d = &js["vms"][0]["generations"][0]["disks"][0];
        assert_eq!(d["mode"], "incr");
        let expect = [65536u64, 1 << 20, 65536][i];
        assert_eq!(
            d["read_bytes"].as_u64().unwrap(),
            expect,
            "round {i}: read more than the dirty extents"
        );
        states.push(copy(&format!("g{}", i + 1)));
    }
    // Every generation restores bit for bit, checked by qemu itself.
    let n = states.len();
    for (k, state) in states.iter().enumerate() {
        let out = env.path(&format!("restored-{k}.qcow2"));
        env.ok(&[
            "restore",
            "vm",
            "-g",
            &(n - 1 - k).to_string(),
            "--to",
            out.to_str().unwrap(),
        ]);
        run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
            .arg(state)
            .arg(&out));
    }
    // A failed run keeps the bitmap's history: the next run still reads the write.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x55 50M 64k"])
        .arg(&img));
    // The second disk's source is missing: the run fails after vda's bitmap was prepared.
    env.fails(
        &[
            "backup",
            "vm",
            "--disk",
            &spec,
            "--disk",
            "vdb=/nonexistent.raw",
        ],
        1,
    );
    env.ok(&["backup", "vm", "--disk", &spec]);
    let js: serde_json::Value = serde_json::from_str(&env.ok(&["status", "vm", "--json"])).unwrap();
    assert_eq!(
        js["vms"][0]["generations"][0]["disks"][0]["read_bytes"],
        65536
    );
    let out = env.path("after-failure.raw");
    env.ok(&["restore", "vm", "--to", out.to_str().unwrap()]);
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(&out)
        .arg(&img));
}

#[test]
fn restore_to_an_nbd_server_and_to_qcow2() {
    let env = Env::new();
    let disk = env.disk("d.raw", 16 << 20);
    write_at(&disk, 1 << 20, &noise(2, 3 << 20));
    env.backup("vm", &disk, &[]);
    // A writable qemu-nbd over a raw file that already holds other data: zeros must be
    // written (or punched) where the disk has holes.
    let target = env.path("t.raw");
    std::fs::write(&target, noise(3, 16 << 20)).unwrap();
    let sock = env.path("w.sock");
    let mut c = Command::new("qemu-nbd");
    c.args(["-f", "raw", "-k"]).arg(&sock).arg(&target);
    let server = serve(c, &sock);
    env.ok(&[
        "restore",
        "vm",
        "--to",
        &format!("nbd+unix:///?socket={}", sock.display()),
    ]);
    drop(server);
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&disk).unwrap());
    let q = env.path("r.qcow2");
    env.ok(&["restore", "vm", "--to", q.to_str().unwrap()]);
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(&disk)
        .arg(&q));
}

#[test]
fn bitmap_granularity_is_chosen_for_new_bitmaps() {
    let env = Env::new();
    let img = env.path("g.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    let spec = format!("vda={}?bitmap=fine", img.display());
    env.ok(&[
        "backup",
        "vm",
        "--disk",
        &spec,
        "--bitmap-granularity",
        "16K",
    ]);
    let info = String::from_utf8(
        Command::new("qemu-img")
            .args(["info", "-U"])
            .arg(&img)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(info.contains("granularity: 16384"), "{info}");
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x1 1M 4k"])
        .arg(&img));
    env.ok(&["backup", "vm", "--disk", &spec]);
    let js: serde_json::Value = serde_json::from_str(&env.ok(&["status", "vm", "--json"])).unwrap();
    let d = &js["vms"][0]["generations"][0]["disks"][0];
    assert_eq!(d["mode"], "incr");
    // A 4 KiB write dirties one 16 KiB bit; the 64 KiB block holding it is what is read.
    assert_eq!(d["read_bytes"], 65536);
    let e = env.fails(
        &[
            "backup",
            "vm",
            "--disk",
            &spec,
            "--bitmap-granularity",
            "1000",
        ],
        2,
    );
    assert!(e.contains("power of two"), "{e}");
}
