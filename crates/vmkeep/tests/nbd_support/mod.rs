//! Real NBD servers (qemu-nbd, nbdkit) started by the tests on private unix sockets, and
//! the command-line tools (nbdcopy, nbdinfo, qemu-img, qemu-io) the tests compare with.
//! Every server is killed when its handle drops.

#![allow(dead_code)]

pub mod fake;
pub mod pki;

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vmkeep::nbd::client::NbdUri;

/// A server process on a unix socket in its own temp folder, or on a loopback TCP port.
pub struct Server {
    child: Child,
    pub dir: TempDir,
    pub sock: PathBuf,
    /// The TCP port on 127.0.0.1, for a server started with [`qemu_nbd_tcp`].
    pub port: Option<u16>,
}

impl Server {
    pub fn uri(&self) -> NbdUri {
        NbdUri::unix(&self.sock, "")
    }

    /// `nbd://127.0.0.1:PORT/` of a server started with [`qemu_nbd_tcp`].
    pub fn tcp_uri(&self) -> NbdUri {
        NbdUri::tcp("127.0.0.1", self.port.expect("a TCP server"), "")
    }

    pub fn uri_string(&self) -> String {
        self.uri().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `qemu-nbd --persistent ARGS IMAGE` (persistent: the tests connect more than once).
pub fn qemu_nbd(args: &[&str], image: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--persistent")
        .arg(format!("--socket={}", sock.display()))
        .args(args)
        .arg(image);
    start(cmd, dir, sock, None)
}

/// `qemu-nbd --persistent ARGS IMAGE` on a free port of 127.0.0.1.
pub fn qemu_nbd_tcp(args: &[&str], image: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = pki::free_port();
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg("--persistent")
        .arg("--bind=127.0.0.1")
        .arg(format!("--port={port}"))
        .args(args)
        .arg(image);
    let sock = dir.path().join("unused");
    start(cmd, dir, sock, Some(port))
}

/// `nbdkit -f -U SOCKET ARGS` (plugin, filters and parameters in ARGS).
pub fn nbdkit(args: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let mut cmd = Command::new("nbdkit");
    cmd.arg("-f")
        .arg("--exit-with-parent")
        .arg("-U")
        .arg(&sock)
        .args(args);
    start(cmd, dir, sock, None)
}

/// Servers and tools die with the test thread that started them, even if it panics.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn start(mut cmd: Command, dir: TempDir, sock: PathBuf, port: Option<u16>) -> Server {
    let log = dir.path().join("log");
    die_with_parent(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap());
    let mut server = Server {
        child: cmd.spawn().expect("start the NBD server"),
        dir,
        sock,
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            panic!(
                "{cmd:?} exited ({st}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let listening = match port {
            Some(p) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
            None => UnixStream::connect(&server.sock).is_ok(),
        };
        if listening {
            return server;
        }
        assert!(Instant::now() < deadline, "{cmd:?} did not listen in time");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run a tool for at most 30 s; panic with its stderr if it fails. Returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    File::open(&err_path)
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{program} {args:?}: {err}");
    std::fs::read_to_string(&out_path).unwrap()
}

/// BLAKE3 of what `nbdcopy` copies from `uri`.
pub fn nbdcopy_hash(uri: &str, scratch: &Path) -> blake3::Hash {
    let out = scratch.join("nbdcopy.raw");
    run("nbdcopy", &[uri, out.to_str().unwrap()]);
    let h = blake3::hash(&std::fs::read(&out).unwrap());
    std::fs::remove_file(&out).unwrap();
    h
}

/// `nbdinfo --map=CONTEXT`: (offset, length, flags), adjacent equal flags merged.
pub fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let text = run("nbdinfo", &[&format!("--map={context}"), uri]);
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (o, l, t) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Whether process `pid` still exists (a zombie counts: it was not reaped).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` is running (a zombie waiting for its reaper is not).
pub fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
                == Some(false)
        }
        Err(_) => false,
    }
}
