//! Backups from real NBD servers and QEMU images, compared with what `nbdcopy` copies from
//! the same export; incremental backups from a persistent qcow2 bitmap; restores to qcow2
//! and NBD targets checked with `qemu-img compare`.

mod common;
#[path = "../../vmkeep/tests/nbd_support/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

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
    wait_until(20, &format!("{} never accepted", sock.display()), || {
        std::os::unix::net::UnixStream::connect(sock).is_ok()
    });
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
    let got = env.latest(vm, "vda");
    assert!(
        got == want,
        "{vm}: the backup differs from nbdcopy of {uri}"
    );
}

#[test]
fn backups_from_qemu_nbd_equal_nbdcopy() {
    let env = Env::new();
    let qcow = qcow2(&env, "d.qcow2", "48M");
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
    assert!(env.latest("direct", "vda") == env.latest("qcow", "vda"));
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
    let read = env.newest_disk("sparse", "vda")["read_bytes"]
        .as_u64()
        .unwrap();
    assert!(read < 32 << 20, "read {read} of a 5 % dense 64 MiB disk");
}

#[test]
fn incr_from_a_persistent_qcow2_bitmap_reads_only_dirty_extents() {
    let env = Env::new();
    let img = qcow2(&env, "vm.qcow2", "64M");
    qemu_write(&img, 0x11, "0", "8M");
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
        qemu_write(&img, 0x20 + i as u8, off, len);
        env.ok(&["backup", "vm", "--disk", &spec]);
        let d = env.newest_disk("vm", "vda");
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
        qemu_compare(state, &out);
    }
    // A failed run keeps the bitmap's history: the next run still reads the write.
    qemu_write(&img, 0x55, "50M", "64k");
    // The second disk's source is missing: the run fails (see also
    // a_failed_run_removes_only_the_bitmap_it_added for a failure after vda's bitmap step).
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
    assert_eq!(env.newest_disk("vm", "vda")["read_bytes"], 65536);
    let out = env.path("after-failure.raw");
    env.ok(&["restore", "vm", "--to", out.to_str().unwrap()]);
    qemu_compare(&out, &img);
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
    qemu_compare(&disk, &q);
    // As private as the archive it came from.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&q).unwrap().mode() & 0o7777, 0o600);
}

/// A persistent qemu-nbd on a free loopback port that requires TLS with a client
/// certificate (`tls-creds-x509` from the server folder `creds`); and its port.
fn qemu_nbd_tls(image: &Path, creds: &Path, extra: &[&str]) -> (Proc, u16) {
    let port = pki::free_port();
    let mut c = Command::new("qemu-nbd");
    c.args(["-t", "-f", "raw", "--bind=127.0.0.1"])
        .arg(format!("--port={port}"))
        .args(pki::qemu_tls_args(creds))
        .args(extra)
        .arg(image);
    let p = Proc(c.stderr(Stdio::null()).spawn().expect("qemu-nbd"));
    wait_until(20, "qemu-nbd never listened", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (p, port)
}

/// `--disk vda=nbds://…` backs up a qemu-nbd export that requires TLS, and `restore --to
/// nbds://…` writes one: the bytes are the disk's. Plain NBD and missing credentials are
/// refused with errors that say so.
#[test]
fn backup_from_and_restore_to_nbds() {
    let env = Env::new();
    let pki = pki::make_pki(&env.path("pki"), "ca");
    let disk = env.disk("d.raw", 24 << 20);
    write_at(&disk, 2 << 20, &noise(5, 5 << 20));
    write_at(&disk, 20 << 20, &noise(6, 1 << 20));
    let (source, port) = qemu_nbd_tls(&disk, &pki.server, &["-r", "--shared=4"]);
    let nbds = |port: u16| {
        format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            pki.client.display()
        )
    };
    env.ok(&["backup", "vm", "--disk", &format!("vda={}", nbds(port))]);
    let want = std::fs::read(&disk).unwrap();
    assert!(
        env.latest("vm", "vda") == want,
        "the backup differs from the disk"
    );

    // Plain NBD to the TLS-only server: told to use nbds://.
    let plain = format!("vda=nbd://127.0.0.1:{port}/");
    let err = env.fails(&["backup", "vm", "--disk", &plain], 1);
    assert!(
        err.contains("requires TLS") && err.contains("nbds://"),
        "{err}"
    );
    // A credentials folder that does not exist: one line naming the file.
    let nowhere = env.path("no-creds");
    let spec = format!(
        "vda=nbds://127.0.0.1:{port}/?tls-certificates={}",
        nowhere.display()
    );
    let err = env.fails(&["backup", "vm", "--disk", &spec], 2);
    assert!(
        err.contains(&format!("{}/ca-cert.pem", nowhere.display())),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    drop(source);

    // Restore through TLS into an export that holds other data.
    let target = env.path("t.raw");
    std::fs::write(&target, noise(7, 24 << 20)).unwrap();
    let (dest, port) = qemu_nbd_tls(&target, &pki.server, &[]);
    env.ok(&["restore", "vm", "--to", &nbds(port)]);
    drop(dest);
    let gen = env.generations("vm").pop().unwrap();
    assert!(std::fs::read(&target).unwrap() == env.restored("vm", &gen, None));
    assert!(std::fs::read(&target).unwrap() == want);
}

/// `?format=` with nothing after it is a mistake, not "probe the file".
#[test]
fn an_empty_format_is_refused() {
    let env = Env::new();
    let disk = env.disk("d.raw", 1 << 20);
    let spec = format!("vda={}?format=", disk.display());
    let err = env.fails(&["backup", "vm", "--disk", &spec], 2);
    assert!(err.contains("format="), "{err}");
}

#[test]
fn bitmap_granularity_is_chosen_for_new_bitmaps() {
    let env = Env::new();
    let img = qcow2(&env, "g.qcow2", "16M");
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
    qemu_write(&img, 0x1, "1M", "4k");
    env.ok(&["backup", "vm", "--disk", &spec]);
    let d = env.newest_disk("vm", "vda");
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

// Bitmaps and disk identity: a change tracker is trusted only when it is proven to be this
// repository's, of the newest generation, enabled, consistent, and in the disk's own file.

fn qcow2(env: &Env, name: &str, size: &str) -> PathBuf {
    let img = env.path(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(size));
    img
}

/// `qemu-img compare` of a raw file and a qcow2 image: they must hold the same bytes.
fn qemu_compare(raw: &Path, qcow2: &Path) {
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(qcow2));
}

/// A 16 MiB qcow2 image `d.qcow2` with `len` bytes of 0x11 at its start: the image, and
/// its disk spec `vda=IMAGE?bitmap=vmkeep`.
fn bitmap_disk(env: &Env, len: &str) -> (PathBuf, String) {
    let img = qcow2(env, "d.qcow2", "16M");
    qemu_write(&img, 0x11, "0", len);
    let spec = format!("vda={}?bitmap=vmkeep", img.display());
    (img, spec)
}

/// [`bitmap_disk`] backed up once as VM `vm`: the image, its spec, and the guest's view
/// of the first generation (the first of the states [`every_generation_restores`] takes).
fn first_generation(env: &Env, len: &str) -> (PathBuf, String, Vec<Vec<u8>>) {
    let (img, spec) = bitmap_disk(env, len);
    env.ok(&["backup", "vm", "--disk", &spec]);
    let states = vec![guest_view(env, &img, "g0")];
    (img, spec, states)
}

/// Write `len` bytes of `pattern` at `off` through QEMU (so the image's bitmaps see it).
fn qemu_write(img: &Path, pattern: u8, off: &str, len: &str) {
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern:#x} {off} {len}"),
        ])
        .arg(img));
}

/// The guest's view of a qcow2 image, as qemu-img converts it.
fn guest_view(env: &Env, img: &Path, tag: &str) -> Vec<u8> {
    let out = env.path(&format!("{tag}.view.raw"));
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&out));
    std::fs::read(&out).unwrap()
}

/// The image's persistent bitmaps: (name, flags), by name.
fn bitmaps(img: &Path) -> Vec<(String, Vec<String>)> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(img)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut all: Vec<(String, Vec<String>)> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let flags = b["flags"].as_array().cloned().unwrap_or_default();
            (
                b["name"].as_str().unwrap().to_string(),
                flags
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    all.sort();
    all
}

/// The names of the image's persistent bitmaps, sorted.
fn bitmap_names(img: &Path) -> Vec<String> {
    bitmaps(img).into_iter().map(|b| b.0).collect()
}

/// The image's only bitmap is `PREFIX.REPO-ID.NEWEST-GENERATION` of VM `vm`.
fn assert_only_bitmap(env: &Env, img: &Path, prefix: &str) {
    let newest = env.generations("vm").pop().unwrap();
    assert_eq!(
        bitmap_names(img),
        vec![format!("{prefix}.{}.{newest}", env.repo_id())]
    );
}

/// Disk `disk` of the newest generation of `vm` was backed up in `mode`; its record.
fn assert_mode(env: &Env, vm: &str, disk: &str, mode: &str) -> serde_json::Value {
    let d = env.newest_disk(vm, disk);
    assert_eq!(d["mode"], mode, "{d}");
    d
}

/// Disk vda of the newest generation of `vm` is incremental and read `read` bytes.
fn assert_incr_read(env: &Env, vm: &str, read: u64) {
    let d = assert_mode(env, vm, "vda", "incr");
    assert_eq!(d["read_bytes"], read, "{d}");
}

/// `vmkeep backup` with these args; (stdout, stderr), requiring success.
fn backup_says(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["backup"];
    all.extend_from_slice(args);
    let out = env.run(&all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "vmkeep {all:?}: {err}");
    err
}

/// Every generation of `disk` restores to the state in `states` (oldest first), the
/// newest image is the last state, and a deep check passes.
fn every_generation_restores(env: &Env, vm: &str, disk: &str, states: &[Vec<u8>]) {
    let n = states.len();
    assert_eq!(env.generations(vm).len(), n);
    for (k, want) in states.iter().enumerate() {
        assert!(
            &env.restored(vm, &(n - 1 - k).to_string(), Some(disk)) == want,
            "{vm}/{disk}: generation {k} of {n} restores wrong"
        );
    }
    assert!(
        &env.latest(vm, disk) == states.last().unwrap(),
        "{vm}/{disk}: newest image"
    );
    env.ok(&["check", vm, "--deep"]);
}

#[test]
fn two_repositories_sharing_a_bitmap_name_each_see_every_write() {
    // Local and offsite: both back up d.qcow2?bitmap=vmkeep.
    let a = Env::new();
    let b = Env::new();
    let (img, spec) = bitmap_disk(&a, "4M");
    let (mut sa, mut sb) = (Vec::new(), Vec::new());
    a.ok(&["backup", "q1", "--disk", &spec]);
    sa.push(guest_view(&a, &img, "a0"));
    b.ok(&["backup", "q1", "--disk", &spec]);
    sb.push(guest_view(&b, &img, "b0"));
    qemu_write(&img, 0x22, "1M", "64k"); // X
    a.ok(&["backup", "q1", "--disk", &spec]);
    assert_incr_read(&a, "q1", 65536);
    sa.push(guest_view(&a, &img, "a1"));
    qemu_write(&img, 0x33, "8M", "64k"); // Y
    b.ok(&["backup", "q1", "--disk", &spec]);
    // B read X and Y: everything written since B's own previous run.
    assert_incr_read(&b, "q1", 2 * 65536);
    sb.push(guest_view(&b, &img, "b1"));
    every_generation_restores(&a, "q1", "vda", &sa);
    every_generation_restores(&b, "q1", "vda", &sb);
    // Each repository keeps exactly its own bitmap, the one of its newest generation.
    let names = bitmap_names(&img);
    let mut want = vec![
        format!("vmkeep.{}.{}", a.repo_id(), a.generations("q1")[1]),
        format!("vmkeep.{}.{}", b.repo_id(), b.generations("q1")[1]),
    ];
    want.sort();
    assert_eq!(names, want);
    // ...which is the one that generation recorded.
    for env in [&a, &b] {
        let profile =
            std::fs::read_to_string(env.repo().join("q1/latest/generation.toml")).unwrap();
        let name = want.iter().find(|n| n.contains(&env.repo_id())).unwrap();
        assert!(
            profile.contains(&format!("bitmap = \"{name}\"")),
            "{profile}"
        );
    }
}

#[test]
fn a_disabled_bitmap_gives_a_diff() {
    let env = Env::new();
    let (img, spec, mut states) = first_generation(&env, "2M");
    for (name, _) in bitmaps(&img) {
        run(Command::new("qemu-img")
            .args(["bitmap", "--disable"])
            .arg(&img)
            .arg(&name));
    }
    qemu_write(&img, 0x22, "5M", "64k"); // not seen by the disabled bitmap
    let err = backup_says(&env, &["vm", "--disk", &spec]);
    assert_mode(&env, "vm", "vda", "diff");
    assert!(err.contains("disabled"), "{err}");
    states.push(guest_view(&env, &img, "g1"));
    every_generation_restores(&env, "vm", "vda", &states);
    // The run's own bitmap is enabled, and the next run is incremental again.
    let bms = bitmaps(&img);
    assert_eq!(bms.len(), 1, "{bms:?}");
    assert!(bms[0].1.contains(&"auto".to_string()), "{bms:?}");
    qemu_write(&img, 0x33, "9M", "64k");
    env.ok(&["backup", "vm", "--disk", &spec]);
    assert_mode(&env, "vm", "vda", "incr");
    states.push(guest_view(&env, &img, "g2"));
    every_generation_restores(&env, "vm", "vda", &states);
    // Another prefix: a diff, and this repository's bitmap under the old prefix goes.
    let other = format!("vda={}?bitmap=other", img.display());
    let err = backup_says(&env, &["vm", "--disk", &other]);
    assert_mode(&env, "vm", "vda", "diff");
    assert!(err.contains("recorded bitmap vmkeep."), "{err}");
    assert_only_bitmap(&env, &img, "other");
}

#[test]
fn a_shrink_and_growth_between_runs_reads_the_regrown_tail() {
    // qemu-img resize cuts off the tail and grows the image back with the bitmap in place:
    // the regrown bytes read as zeros and the next run, incremental or not, must say so.
    let env = Env::new();
    let (img, spec, mut states) = first_generation(&env, "12M");
    let resize = |size: &str| {
        run(Command::new("qemu-img")
            .args(["resize", "--shrink", "-f", "qcow2"])
            .arg(&img)
            .arg(size))
    };
    resize("4M");
    resize("16M");
    qemu_write(&img, 0x33, "1M", "64k");
    env.ok(&["backup", "vm", "--disk", &spec]);
    let regrown = guest_view(&env, &img, "g1");
    assert!(regrown[4 << 20..12 << 20].iter().all(|&b| b == 0));
    assert!(regrown != states[0], "the resize changed nothing");
    states.push(regrown);
    every_generation_restores(&env, "vm", "vda", &states);
}

#[test]
fn an_image_rolled_back_to_an_older_copy_gives_a_diff() {
    let env = Env::new();
    let (img, spec, mut states) = first_generation(&env, "2M");
    qemu_write(&img, 0x21, "3M", "64k");
    // A failed run (refused after its bitmaps were prepared), then the copy is taken.
    env.fails(&["backup", "vm", "--disk", &spec, "--block-size", "16K"], 2);
    let copy = env.path("d.qcow2.bak");
    std::fs::copy(&img, &copy).unwrap();
    qemu_write(&img, 0x22, "6M", "64k"); // X: only in the image that is then replaced
    env.ok(&["backup", "vm", "--disk", &spec]);
    assert_mode(&env, "vm", "vda", "incr");
    states.push(guest_view(&env, &img, "g1"));
    // Rolled back: the old copy written over the image (same file, same inode).
    std::fs::copy(&copy, &img).unwrap();
    let err = backup_says(&env, &["vm", "--disk", &spec]);
    assert_mode(&env, "vm", "vda", "diff");
    assert!(err.contains("not in the image"), "{err}");
    let rolled_back = guest_view(&env, &img, "g2");
    assert!(rolled_back != states[1], "the roll-back changed nothing");
    states.push(rolled_back);
    every_generation_restores(&env, "vm", "vda", &states);
}

#[test]
fn swapped_or_replaced_disks_give_a_diff() {
    let env = Env::new();
    let a = qcow2(&env, "a.qcow2", "8M");
    let b = qcow2(&env, "b.qcow2", "8M");
    qemu_write(&a, 0xaa, "0", "1M");
    qemu_write(&b, 0xbb, "2M", "1M");
    let spec = |disk: &str, img: &Path| format!("{disk}={}?bitmap=vmkeep", img.display());
    env.ok(&[
        "backup",
        "vm",
        "--disk",
        &spec("vda", &a),
        "--disk",
        &spec("vdb", &b),
    ]);
    qemu_write(&a, 0xa1, "4M", "64k");
    qemu_write(&b, 0xb1, "5M", "64k");
    let err = backup_says(
        &env,
        &[
            "vm",
            "--disk",
            &spec("vda", &b),
            "--disk",
            &spec("vdb", &a),
            "--mode",
            "incr",
        ],
    );
    for (disk, img) in [("vda", &b), ("vdb", &a)] {
        assert_mode(&env, "vm", disk, "diff");
        assert!(
            err.contains(&format!(
                "disk {disk}: incr not possible (its source changed"
            )),
            "{err}"
        );
        assert!(
            env.latest("vm", disk) == guest_view(&env, img, disk),
            "{disk}: newest image"
        );
    }
    // The same disks again: incremental.
    qemu_write(&a, 0xa2, "6M", "64k");
    env.ok(&[
        "backup",
        "vm",
        "--disk",
        &spec("vda", &b),
        "--disk",
        &spec("vdb", &a),
    ]);
    let d = assert_mode(&env, "vm", "vdb", "incr");
    assert_eq!(d["read_bytes"], 65536, "{d}");
    // An image replaced by another file (a copy moved into its place) at the same path.
    let moved = env.path("a.qcow2.new");
    std::fs::copy(&a, &moved).unwrap();
    std::fs::rename(&moved, &a).unwrap();
    let err = backup_says(
        &env,
        &["vm", "--disk", &spec("vda", &b), "--disk", &spec("vdb", &a)],
    );
    assert_mode(&env, "vm", "vdb", "diff");
    assert!(err.contains("another file"), "{err}");
    assert_mode(&env, "vm", "vda", "incr");
    env.ok(&["check", "vm", "--deep"]);

    // Changed-block lists: the user vouches for the list, not for a swapped source.
    let r1 = env.disk("r1.raw", 1 << 20);
    let r2 = env.disk("r2.raw", 1 << 20);
    write_at(&r1, 0, &noise(1, 256 << 10));
    write_at(&r2, 512 << 10, &noise(2, 256 << 10));
    let raw = |disk: &str, p: &Path| format!("{disk}={}", p.display());
    env.ok(&[
        "backup",
        "lists",
        "--disk",
        &raw("vda", &r1),
        "--disk",
        &raw("vdb", &r2),
    ]);
    std::fs::write(env.path("none.txt"), "").unwrap();
    let none = |disk: &str| format!("{disk}={}", env.path("none.txt").display());
    let err = backup_says(
        &env,
        &[
            "lists",
            "--disk",
            &raw("vda", &r2),
            "--disk",
            &raw("vdb", &r1),
            "--changed-blocks",
            &none("vda"),
            "--changed-blocks",
            &none("vdb"),
            "--mode",
            "incr",
        ],
    );
    for (disk, p) in [("vda", &r2), ("vdb", &r1)] {
        assert_mode(&env, "lists", disk, "diff");
        assert!(
            err.contains(&format!(
                "disk {disk}: incr not possible (its source changed"
            )),
            "{err}"
        );
        assert!(
            env.latest("lists", disk) == std::fs::read(p).unwrap(),
            "{disk}: newest image"
        );
    }
}

#[test]
fn an_in_use_bitmap_gives_a_diff() {
    let env = Env::new();
    let (img, spec, mut states) = first_generation(&env, "4M");
    // A writer killed while it has the image open leaves its bitmaps marked in-use (their
    // bits on disk are stale). The write goes to an allocated cluster, so its data is in
    // the file without any metadata update.
    let mut writer = Proc(
        Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x44 1M 64k",
                "-c",
                "sleep 600000",
            ])
            .arg(&img)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // (qemu-io's output is buffered: look at the image instead.)
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("qemu-io")
            .args(["-U", "-r", "-f", "qcow2", "-c", "read -P 0x44 1M 64k"])
            .arg(&img)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        if said.contains("read 65536/65536") && !said.contains("failed") {
            break;
        }
        assert!(Instant::now() < deadline, "the writer never wrote: {said}");
        std::thread::sleep(Duration::from_millis(50));
    }
    writer.0.kill().unwrap();
    writer.0.wait().unwrap();
    let bms = bitmaps(&img);
    assert!(
        bms.iter().all(|b| b.1.contains(&"in-use".to_string())),
        "{bms:?}"
    );
    let err = backup_says(&env, &["vm", "--disk", &spec]);
    assert_mode(&env, "vm", "vda", "diff");
    assert!(err.contains("in-use"), "{err}");
    states.push(guest_view(&env, &img, "g1"));
    assert!(states[1] != states[0]);
    every_generation_restores(&env, "vm", "vda", &states);
    // The stale bitmap is gone, this run's is clean.
    let bms = bitmaps(&img);
    assert_eq!(bms.len(), 1, "{bms:?}");
    assert_eq!(bms[0].1, vec!["auto".to_string()]);
}

#[test]
fn a_failed_run_removes_only_the_bitmap_it_added() {
    let env = Env::new();
    let (img, spec) = bitmap_disk(&env, "2M");
    let other = qcow2(&env, "e.qcow2", "1M");
    env.ok(&["backup", "vm", "--disk", &spec]);
    let before = bitmaps(&img);
    qemu_write(&img, 0x22, "5M", "64k");
    // vda's bitmap is added and its image opened, then vdb's bitmap cannot be added (QEMU
    // refuses a name this long): the run fails, and vda's new bitmap goes.
    let long = format!("vdb={}?bitmap={}", other.display(), "x".repeat(1100));
    env.fails(&["backup", "vm", "--disk", &spec, "--disk", &long], 1);
    assert_eq!(bitmaps(&img), before);
    assert!(bitmaps(&other).is_empty());
    env.ok(&["backup", "vm", "--disk", &spec]);
    assert_incr_read(&env, "vm", 65536);
}

/// A second run of a VM whose backup is under way touches none of its bitmaps: every
/// bitmap step runs under the VM's writer lock.
#[cfg(feature = "fault-injection")]
#[test]
fn bitmaps_are_prepared_under_the_vm_lock() {
    let env = Env::new();
    let (img, spec) = bitmap_disk(&env, "2M");
    env.ok(&["backup", "vm", "--disk", &spec]);
    qemu_write(&img, 0x22, "5M", "64k");
    let first = env.spawn_paused(&["backup", "vm", "--disk", &spec], "backup-planned:10");
    first.reached(60, "the first run never paused");
    let during = bitmaps(&img);
    assert_eq!(
        during.len(),
        2,
        "the newest generation's and the run's: {during:?}"
    );
    // (The first run waits 10 s at its pause; this one takes a fraction of a second.)
    let err = env.fails(&["backup", "vm", "--disk", &spec], 1);
    assert!(err.contains("is busy"), "{err}");
    assert_eq!(bitmaps(&img), during, "the refused run changed the bitmaps");
    succeeded(&first.output(), "");
    assert_incr_read(&env, "vm", 65536);
    assert_only_bitmap(&env, &img, "vmkeep");
}

/// A run killed after it added its bitmap leaves that bitmap behind: the next run is
/// incremental from the newest generation's bitmap all the same, and removes it.
#[cfg(feature = "fault-injection")]
#[test]
fn a_killed_run_leaves_a_bitmap_the_next_run_removes() {
    let env = Env::new();
    let (img, spec, mut states) = first_generation(&env, "2M");
    qemu_write(&img, 0x22, "5M", "64k");
    // SIGKILL while the run reads (its bitmap added, its image open).
    let mut run = env.spawn_paused(&["backup", "vm", "--disk", &spec], "backup-planned:10");
    let deadline = Instant::now() + Duration::from_secs(60);
    run.reached(60, "the run never paused");
    run.child.kill().unwrap();
    assert_eq!(run.child.wait().unwrap().code(), None, "killed");
    // (Its qemu-nbd exits when the connections close.)
    let serving = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("qemu-nbd") && c.contains(img.to_str().unwrap())
            })
        })
    };
    while serving() {
        assert!(Instant::now() < deadline, "qemu-nbd never exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(bitmaps(&img).len(), 2, "{:?}", bitmaps(&img));
    qemu_write(&img, 0x33, "9M", "64k");
    env.ok(&["backup", "vm", "--disk", &spec]);
    assert_incr_read(&env, "vm", 2 * 65536);
    states.push(guest_view(&env, &img, "g1"));
    every_generation_restores(&env, "vm", "vda", &states);
    assert_only_bitmap(&env, &img, "vmkeep");
}

/// One image backed up as two VMs of one repository: each VM's run removes only its own
/// older bitmaps, so both stay incremental.
#[test]
fn a_run_never_removes_another_vms_bitmap() {
    let env = Env::new();
    let (img, spec) = bitmap_disk(&env, "2M");
    env.ok(&["backup", "one", "--disk", &spec]);
    env.ok(&["backup", "two", "--disk", &spec]);
    let mut after = std::collections::HashMap::new();
    for (i, vm) in ["one", "two", "one"].iter().enumerate() {
        qemu_write(&img, 0x20 + i as u8, &format!("{}M", 4 + i), "64k");
        env.ok(&["backup", vm, "--disk", &spec]);
        let d = env.newest_disk(vm, "vda");
        assert_eq!(d["mode"], "incr", "run {i} of {vm}: {d}");
        after.insert(*vm, guest_view(&env, &img, &format!("r{i}")));
    }
    assert_eq!(bitmaps(&img).len(), 2, "{:?}", bitmaps(&img));
    for vm in ["one", "two"] {
        assert!(env.latest(vm, "vda") == after[vm], "{vm}: newest image");
        env.ok(&["check", vm, "--deep"]);
    }
}
