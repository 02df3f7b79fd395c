//! End-to-end tests of `vmkeep serve` with real NBD clients: libnbd's `nbdcopy` and
//! `nbdinfo`, and QEMU's `qemu-img` and `qemu-io`. Every server is started and stopped
//! by the test that uses it, on a unix socket or a loopback port.
//!
//! A test whose tool is not installed says so and passes without checking anything.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin;

mod common;
#[path = "../../vmkeep/tests/nbd_support/pki.rs"]
mod pki;
use common::{noise, spawn_first_line};
use pki::make_pki;

const BS: usize = 64 << 10;
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------- helpers

/// The outside tools these tests use are part of the test setup (scripts/test.sh installs
/// them): a missing one fails the test instead of letting it pass without checking.
fn have(tools: &[&str]) -> bool {
    let missing: Vec<&&str> = tools
        .iter()
        .filter(|t| Command::new(t).arg("--version").output().is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{missing:?} not installed: run scripts/test.sh, which installs them"
    );
    true
}

struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new() -> Repo {
        let r = Repo {
            dir: tempfile::tempdir().unwrap(),
        };
        let out = r.vmkeep(&["init"]);
        assert!(out.status.success(), "{}", text(&out));
        r
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    fn vmkeep(&self, args: &[&str]) -> Output {
        Command::new(cargo_bin("vmkeep"))
            .arg("--repo")
            .arg(self.repo())
            .args(args)
            .output()
            .unwrap()
    }

    /// Run a command that must be refused at once; one that starts serving instead is
    /// killed after a bound for a hang (not a speed goal) and fails the test.
    fn vmkeep_refused(&self, args: &[&str]) -> Output {
        let mut child = Command::new(cargo_bin("vmkeep"))
            .arg("--repo")
            .arg(self.repo())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("vmkeep {args:?} was not refused: it served: {}", text(&out));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// Back up `disks` (name, contents) as the next generation of `vm`.
    fn backup(&self, vm: &str, disks: &[(&str, &[u8])]) {
        let mut args = vec!["backup".to_string(), vm.to_string()];
        for (name, data) in disks {
            let file = self.path(&format!("src-{vm}-{name}.raw"));
            write_sparse(&file, data);
            args.push("--disk".into());
            args.push(format!("{name}={}", file.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.vmkeep(&args);
        assert!(out.status.success(), "backup: {}", text(&out));
    }

    fn restore(&self, vm: &str, generation: &str, disk: &str) -> Vec<u8> {
        let to = self.path(&format!("restored-{vm}-{generation}-{disk}.raw"));
        let to_s = to.display().to_string();
        let out = self.vmkeep(&[
            "restore",
            vm,
            "--generation",
            generation,
            "--disk",
            disk,
            "--to",
            &to_s,
        ]);
        assert!(out.status.success(), "restore: {}", text(&out));
        std::fs::read(&to).unwrap()
    }

    /// Start `vmkeep serve VM ARGS...` and wait for its line of URIs.
    fn serve(&self, vm: &str, args: &[&str]) -> Served {
        let log = self.path(&format!("serve-{}.log", rand_name()));
        let mut serve = Command::new(cargo_bin("vmkeep"));
        serve.arg("--repo").arg(self.repo()).arg("serve").arg(vm);
        let (child, line) = spawn_first_line(serve.args(args), &log);
        let uris = line
            .split_whitespace()
            .filter(|w| w.starts_with("nbd"))
            .map(str::to_string)
            .collect();
        let served = Served { child, log, uris };
        assert!(
            !served.uris.is_empty(),
            "serve printed {line:?}: {}",
            served.log()
        );
        served
    }
}

struct Served {
    child: Child,
    log: PathBuf,
    uris: Vec<String>,
}

impl Served {
    fn uri(&self, disk: &str) -> &str {
        self.uris
            .iter()
            .find(|u| u.contains(&format!("/{disk}")))
            .unwrap_or_else(|| panic!("no URI for {disk} in {:?}", self.uris))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then the exit status must be success within a few seconds.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "serve exited with {st}: {}", self.log());
                return self.log();
            }
            assert!(t.elapsed() < Duration::from_secs(10), "serve did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn rand_name() -> String {
    format!("{:x}", next_rand(&mut seed()))
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

/// xorshift64*: reproducible noise without a dependency.
fn next_rand(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Write `data` as a sparse file (zero blocks stay holes, as a VM disk would have them).
fn write_sparse(path: &Path, data: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for (i, c) in data.chunks(BS).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.write_all_at(c, (i * BS) as u64).unwrap();
        }
    }
}

fn nbdcopy(uri: &str, to: &Path) -> Output {
    Command::new("nbdcopy").arg(uri).arg(to).output().unwrap()
}

/// Copy an export with nbdcopy and return its bytes.
fn fetch(uri: &str, scratch: &Path) -> Vec<u8> {
    let out = nbdcopy(uri, scratch);
    assert!(out.status.success(), "nbdcopy {uri}: {}", text(&out));
    std::fs::read(scratch).unwrap()
}

/// `nbdinfo --map` as (offset, length, type) rows.
fn map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = Command::new("nbdinfo")
        .args(["--map", uri])
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdinfo --map: {}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// The map a disk should have: runs of zero blocks as hole+zero (3), the rest data (0).
fn expected_map(data: &[u8]) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (i, c) in data.chunks(BS).enumerate() {
        let t = if c.iter().all(|&b| b == 0) { 3 } else { 0 };
        match out.last_mut() {
            Some(last) if last.2 == t => last.1 += c.len() as u64,
            _ => out.push(((i * BS) as u64, c.len() as u64, t)),
        }
    }
    out
}

// ---------------------------------------------------------------- a raw client

/// Just enough of a client to send what no well-behaved tool would.
struct Raw {
    s: UnixStream,
}

const REQUEST_MAGIC: u32 = 0x2560_9513;

impl Raw {
    /// Connect and enter transmission on `export` with `NBD_OPT_EXPORT_NAME`.
    fn open(socket: &Path, export: &str) -> Raw {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt).unwrap();
        let mut info = [0u8; 10];
        s.read_exact(&mut info).unwrap();
        Raw { s }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(h[..4], 0x6744_6698u32.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, 9, offset, len, &[]);
        assert_eq!(self.reply(), (0, 9));
        let mut buf = vec![0u8; len as usize];
        self.s.read_exact(&mut buf).unwrap();
        buf
    }
}

// ---------------------------------------------------------------- tests

/// Four generations with writes, growth and shrink between them; two disks.
fn history(repo: &Repo) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut vda = vec![0u8; 4 * MIB];
    vda[..3 * BS].copy_from_slice(&noise(1, 3 * BS));
    vda[2 * MIB..2 * MIB + 100_000].copy_from_slice(&noise(2, 100_000));
    let vdb = noise(9, MIB + 4096);
    let mut gens = vec![(vda.clone(), vdb.clone())];
    // Grow to 6 MiB with data in the new part, overwrite a block, zero another.
    vda.resize(6 * MIB, 0);
    vda[5 * MIB..5 * MIB + BS].copy_from_slice(&noise(3, BS));
    vda[BS..2 * BS].copy_from_slice(&noise(4, BS));
    vda[2 * BS..3 * BS].fill(0);
    gens.push((vda.clone(), vdb.clone()));
    // Shrink to an unaligned 3 MiB + 777 bytes, write into the last partial block.
    vda.truncate(3 * MIB + 777);
    let tail = vda.len() - 500;
    vda[tail..].copy_from_slice(&noise(5, 500));
    gens.push((vda.clone(), vdb.clone()));
    // Grow again past the old end; the blocks that were cut come back as zeros.
    vda.resize(5 * MIB, 0);
    vda[4 * MIB..4 * MIB + 3000].copy_from_slice(&noise(6, 3000));
    vda[..BS].copy_from_slice(&noise(7, BS));
    gens.push((vda.clone(), vdb.clone()));
    for (a, b) in &gens {
        repo.backup("vm", &[("vda", a), ("vdb", b)]);
    }
    gens
}

#[test]
fn every_generation_reads_as_restore_writes_it() {
    if !have(&["nbdcopy", "nbdinfo", "qemu-img"]) {
        return;
    }
    let repo = Repo::new();
    let gens = history(&repo);
    for (n, (vda, vdb)) in gens.iter().rev().enumerate() {
        let rev = n.to_string(); // 0 = newest
        let sock = repo.path(&format!("g{n}.sock"));
        let server = repo.serve(
            "vm",
            &["--generation", &rev, "--socket", sock.to_str().unwrap()],
        );
        for (disk, want) in [("vda", vda), ("vdb", vdb)] {
            let restored = repo.restore("vm", &rev, disk);
            let copied = fetch(server.uri(disk), &repo.path(&format!("copy-{n}-{disk}")));
            assert!(
                copied == restored,
                "generation {n} disk {disk}: NBD differs from restore"
            );
            assert!(
                copied == *want,
                "generation {n} disk {disk}: NBD differs from the source"
            );
            let restored_file = repo.path(&format!("restored-vm-{rev}-{disk}.raw"));
            let out = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw", server.uri(disk)])
                .arg(&restored_file)
                .output()
                .unwrap();
            assert!(out.status.success(), "qemu-img compare: {}", text(&out));
        }
        assert_eq!(map(server.uri("vda")), expected_map(vda), "generation {n}");
        if n == 0 {
            let out = Command::new("nbdinfo")
                .args(["--list", server.uri("vda")])
                .output()
                .unwrap();
            let listing = text(&out);
            assert!(out.status.success(), "{listing}");
            assert!(
                listing.contains("export=\"vda\"") && listing.contains("export=\"vdb\""),
                "{listing}"
            );
        }
        server.stop();
        assert!(!sock.exists(), "socket left behind");
    }
}

#[test]
fn writes_are_refused() {
    if !have(&["qemu-io"]) {
        return;
    }
    let repo = Repo::new();
    let data = noise(11, 2 * MIB);
    repo.backup("vm", &[("vda", &data)]);
    let sock = repo.path("w.sock");
    let server = repo.serve("vm", &["--socket", sock.to_str().unwrap()]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 0 4k", server.uri("vda")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io wrote: {}", text(&out));
    // A raw NBD_CMD_WRITE gets EPERM, and the data is unchanged.
    let mut raw = Raw::open(&sock, "vda");
    raw.request(1, 1, 0, 4096, &[0x55; 4096]);
    assert_eq!(raw.reply(), (1, 1), "EPERM expected");
    raw.request(4, 2, 0, 4096, &[]); // trim
    assert_eq!(raw.reply(), (1, 2));
    assert_eq!(raw.read(0, 4096), data[..4096]);
    server.stop();
}

#[test]
fn a_damaged_block_is_eio_and_the_rest_still_reads() {
    if !have(&["nbdcopy", "qemu-io", "nbdinfo"]) {
        return;
    }
    let repo = Repo::new();
    let mut data = vec![0u8; 16 * BS];
    for (i, c) in data.chunks_mut(BS).enumerate() {
        c.fill(i as u8 + 1);
    }
    repo.backup("vm", &[("vda", &data)]);
    // Flip one byte of block 3 of the newest image.
    let image = repo.repo().join("vm/latest/vda.raw");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    f.write_all_at(&[0xee], (3 * BS + 10) as u64).unwrap();
    drop(f);
    let sock = repo.path("d.sock");
    let mut server = repo.serve("vm", &["--socket", sock.to_str().unwrap()]);
    let uri = server.uri("vda").to_string();

    let out = nbdcopy(&uri, &repo.path("copy.raw"));
    assert!(!out.status.success(), "nbdcopy copied a damaged disk");
    assert!(text(&out).contains("Input/output error"), "{}", text(&out));
    let io = |cmd: &str| {
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", cmd, &uri])
            .output()
            .unwrap()
    };
    let bad = io(&format!("read {} 4k", 3 * BS));
    assert!(
        !bad.status.success() || text(&bad).contains("failed"),
        "{}",
        text(&bad)
    );
    for b in [0usize, 2, 4, 15] {
        let ok = io(&format!("read -P {} {} {}", b + 1, b * BS, BS));
        assert!(
            ok.status.success() && !text(&ok).contains("fail"),
            "block {b}: {}",
            text(&ok)
        );
    }
    assert!(server.running(), "the server died on damage");
    let out = Command::new("nbdinfo").arg(&uri).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let log = server.stop();
    assert!(log.contains("fail their digest"), "no log line: {log}");
}

#[test]
fn hostile_clients_do_not_hurt_a_normal_one() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let repo = Repo::new();
    let data = noise(21, 3 * MIB);
    repo.backup("vm", &[("vda", &data)]);
    let sock = repo.path("h.sock");
    let mut server = repo.serve("vm", &["--socket", sock.to_str().unwrap()]);
    let uri = server.uri("vda").to_string();
    let mut calm = Raw::open(&sock, "vda");

    // Random bytes, from the first byte on and after a good handshake.
    let mut s = seed();
    for i in 0..50u64 {
        let mut c = UnixStream::connect(&sock).unwrap();
        let _ = c.write_all(&noise(next_rand(&mut s) + i, 4096));
    }
    for i in 0..20u64 {
        let mut r = Raw::open(&sock, "vda");
        let _ = r.s.write_all(&noise(next_rand(&mut s) + i, 64 << 10));
    }
    // Oversized and out-of-range requests get EINVAL without being served.
    let mut r = Raw::open(&sock, "vda");
    r.request(0, 1, 0, u32::MAX, &[]);
    assert_eq!(r.reply(), (22, 1));
    r.request(0, 2, data.len() as u64 - 10, 4096, &[]);
    assert_eq!(r.reply(), (22, 2));
    r.request(0, 3, u64::MAX - 100, 4096, &[]);
    assert_eq!(r.reply(), (22, 3));
    r.request(200, 4, 0, 0, &[]); // unknown command
    assert_eq!(r.reply(), (22, 4));
    assert_eq!(r.read(4096, 4096), data[4096..8192]);
    // Many quick connections, some left half-open.
    let mut held = Vec::new();
    for i in 0..1200 {
        match UnixStream::connect(&sock) {
            Ok(c) if i % 10 == 0 => held.push(c),
            Ok(_) => {}
            Err(e) => panic!("connection {i} refused: {e}"),
        }
    }
    drop(held);

    assert!(server.running(), "the server died");
    assert_eq!(calm.read(MIB as u64, 65536), data[MIB..MIB + 65536]);
    let copied = fetch(&uri, &repo.path("copy.raw"));
    assert!(copied == data, "a normal client read wrong bytes");
    server.stop();
}

/// Clients that pipeline large reads and never take the replies hold only their own
/// connection's budget (64 MiB): a normal client still copies the export, and the slow
/// ones keep their connections and get every reply, right, once they read. (Before, four
/// of them held the whole 512 MiB shared budget until the write timeout cut them off.)
#[test]
fn clients_that_do_not_read_their_replies_starve_no_one() {
    if !have(&["nbdcopy"]) {
        return;
    }
    const READ: usize = 32 << 20;
    let repo = Repo::new();
    let mut data = vec![0u8; 2 * READ];
    data[..MIB].copy_from_slice(&noise(51, MIB));
    data[READ..READ + MIB].copy_from_slice(&noise(52, MIB));
    repo.backup("vm", &[("vda", &data)]);
    let sock = repo.path("slow.sock");
    let mut server = repo.serve("vm", &["--socket", sock.to_str().unwrap()]);
    let mut slow: Vec<Raw> = (0..4)
        .map(|_| {
            let mut r = Raw::open(&sock, "vda");
            for i in 0..8u64 {
                r.request(0, i, (i % 2) * READ as u64, READ as u32, &[]);
            }
            r
        })
        .collect();
    // Let the server take up their requests: the replies fill the sockets and stall.
    std::thread::sleep(Duration::from_secs(1));

    let copied = fetch(server.uri("vda"), &repo.path("copy.raw"));
    assert!(copied == data, "the normal client read wrong bytes");
    assert!(server.running(), "the server died");
    for (n, r) in slow.iter_mut().enumerate() {
        let mut buf = vec![0u8; READ];
        for _ in 0..8 {
            let (err, cookie) = r.reply();
            assert_eq!(err, 0, "slow client {n}: an error reply");
            r.s.read_exact(&mut buf).unwrap_or_else(|e| {
                panic!("slow client {n} lost its connection: {e}: {}", server.log())
            });
            let off = (cookie % 2) as usize * READ;
            assert!(buf == data[off..off + READ], "slow client {n}: wrong bytes");
        }
    }
    server.stop();
}

#[test]
fn tcp_needs_tls_unless_insecure_and_is_loopback_only() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let repo = Repo::new();
    let data = noise(31, MIB);
    repo.backup("vm", &[("vda", &data)]);
    let nowhere = repo.path("no-such-tls-dir");
    let nowhere = nowhere.to_str().unwrap();
    for (args, why) in [
        // Plain TCP on loopback: any local user could connect, so it needs TLS.
        (vec!["--listen", "127.0.0.1:0"], "--listen needs TLS"),
        (
            vec!["--listen", "127.0.0.1:0", "--allow-remote"],
            "--listen needs TLS",
        ),
        (
            vec!["--listen", "0.0.0.0:0", "--insecure-tcp"],
            "not a loopback address",
        ),
        (
            vec!["--listen", "0.0.0.0:0", "--allow-remote", "--insecure-tcp"],
            "cannot be used with",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--tls-dir", nowhere],
            "no-such-tls-dir/ca-cert.pem",
        ),
        (vec![], "--socket"),
    ] {
        let mut full = vec!["serve", "vm"];
        full.extend(args);
        let out = repo.vmkeep_refused(&full);
        assert_eq!(out.status.code(), Some(2), "{full:?}: {}", text(&out));
        assert!(text(&out).contains(why), "{full:?}: {}", text(&out));
        if !matches!(why, "cannot be used with" | "--socket") {
            assert_eq!(
                text(&out).trim().lines().count(),
                1,
                "one line: {}",
                text(&out)
            );
        }
    }
    let server = repo.serve("vm", &["--listen", "127.0.0.1:0", "--insecure-tcp"]);
    let uri = server.uri("vda").to_string();
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    assert!(fetch(&uri, &repo.path("copy.raw")) == data);
    server.stop();
}

/// Run `nbdinfo`/`nbdcopy` as the unprivileged user `nobody`, as another local user would.
fn as_nobody(tool: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", tool])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn tls_serves_only_clients_with_a_certificate_from_its_ca() {
    if !have(&["nbdcopy", "nbdinfo", "certtool", "qemu-img"]) {
        return;
    }
    let repo = Repo::new();
    let gens = history(&repo);
    let pki = make_pki(repo.dir.path(), "ours");
    let foreign = make_pki(repo.dir.path(), "theirs");
    let tls_dir = pki.server.to_str().unwrap();
    let server = repo.serve(
        "vm",
        &[
            "-v",
            "--generation",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            tls_dir,
        ],
    );
    let uri = server.uri("vda").to_string();
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{uri}");
    let with = |dir: &Path| format!("{uri}?tls-certificates={}", dir.display());

    // The right client certificate reads exactly what restore writes.
    let restored = repo.restore("vm", "1", "vda");
    assert!(restored == gens[2].0);
    let copied = fetch(&with(&pki.client), &repo.path("copy.raw"));
    assert!(copied == restored, "nbds:// read differs from restore");
    // qemu-img with tls-creds-x509 (the client side of QEMU's layout) agrees.
    let qemu_client = repo.path("qemu-client");
    std::fs::create_dir_all(&qemu_client).unwrap();
    for (from, to) in [
        ("ca-cert.pem", "ca-cert.pem"),
        ("client-cert.pem", "client-cert.pem"),
        ("client-key.pem", "client-key.pem"),
    ] {
        std::fs::copy(pki.client.join(from), qemu_client.join(to)).unwrap();
    }
    let port = uri.split(':').nth(2).unwrap().split('/').next().unwrap();
    let out = Command::new("qemu-img")
        .arg("compare")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            qemu_client.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},\
             export=vda,tls-creds=tls0"
        ))
        .arg(format!(
            "driver=raw,file.driver=file,file.filename={}",
            repo.path("restored-vm-1-vda.raw").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare over TLS: {}",
        text(&out)
    );

    // Refused: plain NBD (as root and as another user), TLS without a certificate (as
    // another local user: nobody has no keys), a certificate from another CA.
    let plain = uri.replacen("nbds://", "nbd://", 1);
    let scratch = repo.path("stolen.raw");
    let attempts: Vec<(&str, Output)> = vec![
        (
            "plain nbdinfo",
            Command::new("nbdinfo").arg(&plain).output().unwrap(),
        ),
        ("plain nbdinfo as nobody", as_nobody("nbdinfo", &[&plain])),
        (
            "plain nbdinfo --list",
            Command::new("nbdinfo")
                .args(["--list", &plain])
                .output()
                .unwrap(),
        ),
        ("no certificate, as nobody", as_nobody("nbdinfo", &[&uri])),
        ("plain nbdcopy", nbdcopy(&plain, &scratch)),
        (
            "another CA's certificate",
            nbdcopy(&with(&foreign.client), &scratch),
        ),
    ];
    for (what, out) in &attempts {
        assert!(!out.status.success(), "{what}: admitted: {}", text(out));
        let said = text(out);
        assert!(
            !said.contains("export-size") && !said.contains("export=\"vda\""),
            "{what}: learnt about the export: {said}"
        );
    }
    let stolen = std::fs::read(&scratch).unwrap_or_default();
    assert!(
        stolen.iter().all(|&b| b == 0),
        "a refused client received disk bytes"
    );
    // A certificate of the other CA is refused in the TLS handshake; the server says so.
    let log = server.stop();
    assert!(log.contains("refused: TLS"), "no refusal logged: {log}");
}

/// vmkeep's own NBD client reads `serve --listen … --tls-dir` as a backup source, from
/// the very URI serve printed (with the client's folder added): the backup equals what
/// nbdcopy reads over the same TLS. Plain NBD, another CA's client certificate and a
/// missing credentials file are each refused with an error that says why.
#[test]
fn vmkeep_backs_up_from_serve_over_tls() {
    if !have(&["nbdcopy", "certtool"]) {
        return;
    }
    let repo = Repo::new();
    let data = noise(33, 3 * MIB + 4096);
    repo.backup("vm", &[("vda", &data)]);
    let pki = make_pki(repo.dir.path(), "own");
    let foreign = make_pki(repo.dir.path(), "other");
    let server = repo.serve(
        "vm",
        &[
            "-v",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            pki.server.to_str().unwrap(),
        ],
    );
    let printed = server.uri("vda").to_string();
    assert!(printed.starts_with("nbds://127.0.0.1:"), "{printed}");
    let with = |dir: &Path| format!("{printed}?tls-certificates={}", dir.display());
    let copied = fetch(&with(&pki.client), &repo.path("copy.raw"));
    assert!(copied == data, "nbdcopy over TLS differs from the backup");

    let spec = format!("vda={}", with(&pki.client));
    let out = repo.vmkeep(&["backup", "copy", "--disk", &spec]);
    assert!(out.status.success(), "backup over TLS: {}", text(&out));
    assert!(repo.restore("copy", "0", "vda") == copied);

    let plain = format!("vda={}", printed.replacen("nbds://", "nbd://", 1));
    let mixed = repo.path("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(pki.client.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(foreign.client.join(f), mixed.join(f)).unwrap();
    }
    let nowhere = repo.path("no-such-folder");
    for (spec, code, why) in [
        (plain, 1, "requires TLS"),
        (
            format!("vda={}", with(&mixed)),
            1,
            "refused the TLS session",
        ),
        (
            format!("vda={}", with(&foreign.client)),
            1,
            "invalid peer certificate",
        ),
        (
            format!("vda={}", with(&nowhere)),
            2,
            "no-such-folder/ca-cert.pem",
        ),
    ] {
        let out = repo.vmkeep(&["backup", "refused", "--disk", &spec]);
        assert_eq!(out.status.code(), Some(code), "{spec}: {}", text(&out));
        assert!(text(&out).contains(why), "{spec}: {}", text(&out));
        assert_eq!(text(&out).trim().lines().count(), 1, "{}", text(&out));
    }
    let log = server.stop();
    assert!(log.contains("refused: TLS"), "no refusal logged: {log}");
}

/// The `[serve]` keys of the config file name the TLS files too.
#[test]
fn tls_files_from_the_config_file() {
    if !have(&["nbdcopy", "certtool"]) {
        return;
    }
    let repo = Repo::new();
    let data = noise(32, MIB + 5);
    repo.backup("vm", &[("vda", &data)]);
    let pki = make_pki(repo.dir.path(), "cfg");
    let config = repo.path("vmkeep.toml");
    std::fs::write(
        &config,
        format!(
            "[serve]\ntls_cert = \"{0}/server-cert.pem\"\ntls_key = \"{0}/server-key.pem\"\n\
             tls_ca = \"{0}/ca-cert.pem\"\n",
            pki.server.display()
        ),
    )
    .unwrap();
    let server = repo.serve(
        "vm",
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let uri = format!(
        "{}?tls-certificates={}",
        server.uri("vda"),
        pki.client.display()
    );
    assert!(uri.starts_with("nbds://"), "{uri}");
    assert!(fetch(&uri, &repo.path("copy.raw")) == data);
    server.stop();
}

#[test]
fn a_served_generation_survives_backups_and_prune() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let repo = Repo::new();
    let original = noise(41, 12 * MIB);
    repo.backup("vm", &[("vda", &original)]);
    let sock = repo.path("p.sock");
    let server = repo.serve("vm", &["--socket", sock.to_str().unwrap()]);
    let uri = server.uri("vda").to_string();
    assert!(fetch(&uri, &repo.path("before.raw")) == original);

    // Copy over and over while a backup rewrites most of the image and shrinks it.
    let reader = {
        let (uri, scratch) = (uri.clone(), repo.path("during.raw"));
        let want = original.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let t = std::thread::spawn(move || {
            let mut rounds = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) || rounds == 0 {
                assert!(fetch(&uri, &scratch) == want, "wrong bytes during a backup");
                rounds += 1;
            }
            rounds
        });
        (t, stop)
    };
    let mut second = noise(42, 9 * MIB);
    second[..BS].copy_from_slice(&original[..BS]); // one block unchanged
    repo.backup("vm", &[("vda", &second)]);
    reader.1.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = reader.0.join().unwrap();
    eprintln!("{rounds} copies overlapped the backup");
    // The image is now shorter than the served generation: the cut blocks come from the
    // backup's reverse diff.
    assert!(fetch(&uri, &repo.path("shrunk.raw")) == original);

    // After that backup and a growing one, the image no longer holds our blocks.
    let mut third = second.clone();
    third.resize(14 * MIB, 0);
    third[10 * MIB..11 * MIB].copy_from_slice(&noise(43, MIB));
    third[2 * MIB..3 * MIB].copy_from_slice(&noise(44, MIB));
    repo.backup("vm", &[("vda", &third)]);
    assert!(fetch(&uri, &repo.path("after.raw")) == original);

    // Prune keeps the served generation (and drops the middle one).
    let out = repo.vmkeep(&["prune", "vm", "--keep-last", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("pinned by a running serve"),
        "{}",
        text(&out)
    );
    let status = repo.vmkeep(&["--json", "status", "vm"]);
    let gens = generation_count(&status);
    assert_eq!(gens, 2, "served + newest: {}", text(&status));
    assert!(fetch(&uri, &repo.path("pruned.raw")) == original);
    assert!(repo.restore("vm", "1", "vda") == original);
    server.stop();

    let out = repo.vmkeep(&["prune", "vm", "--keep-last", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        generation_count(&repo.vmkeep(&["--json", "status", "vm"])),
        1
    );
}

fn generation_count(status: &Output) -> usize {
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let vms = v
        .get("vms")
        .and_then(|x| x.as_array())
        .cloned()
        .unwrap_or_else(|| vec![v.clone()]);
    vms[0]["generations"].as_array().expect("generations").len()
}
