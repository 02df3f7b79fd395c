//! Shared helpers for the CLI tests: a repository in a temp folder, deterministic disks,
//! and running the real `vmkeep` binary.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::write(env.path("no-config.toml"), "").unwrap();
        env.ok(&["init"]);
        env
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    /// `vmkeep --repo REPO ARGS…` with no config file and no terminal.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::cargo_bin("vmkeep").unwrap();
        c.env_remove("VMKEEP_REPO")
            .env_remove("RUST_LOG")
            .env("VMKEEP_CONFIG", self.path("no-config.toml"));
        c.arg("--repo").arg(self.repo()).args(args);
        c.write_stdin("");
        c
    }

    /// The same as [`Env::cmd`], as a plain `std::process::Command` (to spawn).
    pub fn std_cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmkeep"));
        c.env_remove("VMKEEP_REPO")
            .env_remove("RUST_LOG")
            .env("VMKEEP_CONFIG", self.path("no-config.toml"));
        c.arg("--repo")
            .arg(self.repo())
            .args(args)
            .stdin(std::process::Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vmkeep {args:?} failed ({:?}):\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and require exit status `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "vmkeep {args:?}: expected exit {code}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Create a sparse disk of `size` bytes.
    pub fn disk(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(size).unwrap();
        p
    }

    /// Back up disk `vda` of `vm` from `disk` with extra args; returns stdout.
    pub fn backup(&self, vm: &str, disk: &Path, extra: &[&str]) -> String {
        let spec = format!("vda={}", disk.display());
        let mut args = vec!["backup", vm, "--disk", &spec];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    /// The generation ids of `vm`, oldest first.
    pub fn generations(&self, vm: &str) -> Vec<String> {
        Env::generations_in(&self.repo(), vm)
    }

    /// The generation ids of `vm` in repository `repo`, oldest first.
    pub fn generations_in(repo: &Path, vm: &str) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(repo.join(vm))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.len() == 36 && n.matches('-').count() == 4)
            .collect();
        ids.sort();
        ids
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible text.
pub fn text(len: usize) -> Vec<u8> {
    b"vmkeep keeps many generations of every disk. "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

pub fn write_at(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
}

pub fn flip_byte(path: &Path, off: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
}
