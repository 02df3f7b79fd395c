//! Shared helpers for the CLI tests: a repository in a temp folder, deterministic disks,
//! running the real `vmkeep` binary (on this repository or on a copy of it), runs paused at
//! a fault point, and reading back what the archive holds.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;

pub struct Env {
    pub dir: tempfile::TempDir,
    /// Environment variables every `vmkeep` this environment runs gets (see
    /// [`Env::set_var`]).
    vars: std::cell::RefCell<Vec<(String, String)>>,
}

impl Env {
    pub fn new() -> Env {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
            vars: Default::default(),
        };
        std::fs::write(env.path("no-config.toml"), "").unwrap();
        env.ok(&["init"]);
        env
    }

    /// A repository with VM `vm` backed up once from the disk `disk.raw` of `size` bytes,
    /// all of them noise of `seed`: the environment and the disk.
    pub fn one_noise_generation(size: u64, seed: u64) -> (Env, PathBuf) {
        let env = Env::new();
        let disk = env.disk("disk.raw", size);
        write_at(&disk, 0, &noise(seed, size as usize));
        env.backup("vm", &disk, &[]);
        (env, disk)
    }

    /// A per-test environment for live backups: its run and scratch folders are private
    /// to it (`run/` and `scratch/` in its temp folder), and QEMU (another user) may
    /// traverse to them.
    pub fn live() -> Env {
        let env = Env::new();
        env.live_folders(&env.path("run"), &env.path("scratch"));
        // QEMU (another user) must traverse to the per-run folders.
        set_mode(env.dir.path(), 0o711);
        env
    }

    /// Point the live-backup folders (`run_dir`, `scratch_dir`) at `run` and `scratch`.
    pub fn live_folders(&self, run: &Path, scratch: &Path) {
        std::fs::write(
            self.path("no-config.toml"),
            format!(
                "run_dir = \"{}\"\nscratch_dir = \"{}\"\n",
                run.display(),
                scratch.display()
            ),
        )
        .unwrap();
    }

    /// Give every `vmkeep` this environment runs from now on the variable `name=value`
    /// (not the test process: tests run side by side).
    pub fn set_var(&self, name: &str, value: &str) {
        self.vars
            .borrow_mut()
            .push((name.to_string(), value.to_string()));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }

    /// A new folder `disks` for restored disks that QEMU (another user) can enter.
    pub fn disk_dir(&self) -> PathBuf {
        let dir = self.path("disks");
        std::fs::create_dir(&dir).unwrap();
        set_mode(&dir, 0o755);
        dir
    }

    /// `vmkeep --repo REPO ARGS…` with no config file and no terminal.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::cargo_bin("vmkeep").unwrap();
        c.env_remove("VMKEEP_REPO")
            .env_remove("RUST_LOG")
            .env("VMKEEP_CONFIG", self.path("no-config.toml"))
            .envs(self.vars.borrow().iter().map(|(k, v)| (k, v)));
        c.arg("--repo").arg(self.repo()).args(args);
        c.write_stdin("");
        c
    }

    /// The same as [`Env::cmd`], as a plain `std::process::Command` (to spawn).
    pub fn std_cmd(&self, args: &[&str]) -> std::process::Command {
        self.std_cmd_at(&self.repo(), args)
    }

    /// `vmkeep --repo REPO ARGS…` on another repository (a copy of this one), with this
    /// test's config file, no terminal, and no fault hook inherited from the caller.
    pub fn std_cmd_at(&self, repo: &Path, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("vmkeep"));
        c.env_remove("VMKEEP_REPO")
            .env_remove("RUST_LOG")
            .env_remove("VMKEEP_FAULT")
            .env_remove("VMKEEP_FAULT_LOG")
            .env("VMKEEP_CONFIG", self.path("no-config.toml"))
            .envs(self.vars.borrow().iter().map(|(k, v)| (k, v)));
        c.arg("--repo").arg(repo).args(args).stdin(Stdio::null());
        c
    }

    /// Run `vmkeep ARGS…` on `repo` with the environment variables `vars` set.
    pub fn run_at(&self, repo: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut c = self.std_cmd_at(repo, args);
        c.envs(vars.iter().copied());
        c.output().unwrap()
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

    /// Spawn `vmkeep ARGS…` with stdout and stderr piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        piped(&mut self.std_cmd(args))
    }

    /// Spawn `vmkeep ARGS…` (stdout and stderr piped) that pauses at the fault point
    /// `point` (`NAME:SECONDS`, see `VMKEEP_FAULT_PAUSE`) and says so with a mark file.
    pub fn spawn_paused(&self, args: &[&str], point: &str) -> Paused {
        let name = point.split(':').next().unwrap_or(point);
        let mark = self.path(&format!("paused-{name}"));
        let _ = std::fs::remove_file(&mark);
        let child = piped(
            self.std_cmd(args)
                .env("VMKEEP_FAULT_PAUSE", point)
                .env("VMKEEP_FAULT_PAUSE_MARK", &mark),
        );
        Paused { child, mark }
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

    /// `vmkeep status VM --json`, parsed.
    pub fn status(&self, vm: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", vm, "--json"])).unwrap()
    }

    /// The newest generation's record of `disk` (from `status --json`).
    pub fn newest_disk(&self, vm: &str, disk: &str) -> serde_json::Value {
        let js = self.status(vm);
        js["vms"][0]["generations"][0]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == disk)
            .unwrap_or_else(|| panic!("no disk {disk}: {js}"))
            .clone()
    }

    /// The newest image of `disk` of `vm` (`VM/latest/DISK.raw`).
    pub fn latest(&self, vm: &str, disk: &str) -> Vec<u8> {
        std::fs::read(
            self.repo()
                .join(vm)
                .join("latest")
                .join(format!("{disk}.raw")),
        )
        .unwrap()
    }

    /// The repository's id (from `repo.toml`).
    pub fn repo_id(&self) -> String {
        std::fs::read_to_string(self.repo().join("repo.toml"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("id = "))
            .unwrap()
            .trim_matches('"')
            .to_string()
    }

    /// `vmkeep restore VM -g GEN [--disk DISK] --to FILE`, requiring success: the bytes.
    pub fn restored(&self, vm: &str, gen: &str, disk: Option<&str>) -> Vec<u8> {
        self.restored_at(&self.repo(), vm, gen, disk)
            .unwrap_or_else(|e| panic!("restore {vm} -g {gen} {disk:?}: {e}"))
    }

    /// `vmkeep restore VM -g GEN [--disk DISK] --to FILE` on `repo`: the restored bytes, or
    /// the run's stderr.
    pub fn restored_at(
        &self,
        repo: &Path,
        vm: &str,
        gen: &str,
        disk: Option<&str>,
    ) -> Result<Vec<u8>, String> {
        let out = self.path("restored.raw");
        let _ = std::fs::remove_file(&out);
        let mut args = vec!["restore", vm, "-g", gen];
        if let Some(d) = disk {
            args.extend(["--disk", d]);
        }
        args.extend(["--to", out.to_str().unwrap()]);
        let o = self.run_at(repo, &args, &[]);
        if !o.status.success() {
            return Err(stderr(&o));
        }
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        Ok(bytes)
    }

    /// Every generation of `vm` in `repo` with the bytes of each of its disks.
    pub fn archive_at(&self, repo: &Path, vm: &str) -> Archive {
        Env::generations_in(repo, vm)
            .into_iter()
            .map(|id| {
                let disks = disks_of(repo, vm, &id)
                    .into_iter()
                    .map(|d| {
                        let bytes = self
                            .restored_at(repo, vm, &id, Some(&d))
                            .unwrap_or_else(|e| panic!("restore {id} {d}: {e}"));
                        (d, bytes)
                    })
                    .collect();
                (id, disks)
            })
            .collect()
    }
}

/// The arguments of `vmkeep restore VM --as-vm NEW --disk-dir DIR` (more may follow).
pub fn restore_as_vm<'a>(vm: &'a str, new: &'a str, dir: &'a Path) -> Vec<&'a str> {
    let dir = dir.to_str().unwrap();
    vec!["restore", vm, "--as-vm", new, "--disk-dir", dir]
}

/// Every generation of a VM (by id, oldest first) with the bytes of each of its disks.
pub type Archive = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// The disks a generation folder names (as `.raw` or `.rdiff`), sorted.
pub fn disks_of(repo: &Path, vm: &str, id: &str) -> Vec<String> {
    let mut d: Vec<String> = std::fs::read_dir(repo.join(vm).join(id))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| {
            n.strip_suffix(".raw")
                .or_else(|| n.strip_suffix(".rdiff"))
                .map(str::to_string)
        })
        .collect();
    d.sort();
    d.dedup();
    d
}

/// Copy a repository (sparse, hard links kept), replacing `to`.
pub fn copy_repo(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A run of `vmkeep` paused at a fault point (see [`Env::spawn_paused`]).
pub struct Paused {
    pub child: Child,
    /// The file the run writes when it reaches the pause; removing it ends the pause.
    pub mark: PathBuf,
}

impl Paused {
    /// Wait (up to `secs` seconds) until the run reached its pause; else panic with `what`.
    pub fn reached(&self, secs: u64, what: &str) {
        wait_until(secs, what, || self.mark.exists());
    }

    /// Let the paused run go on now.
    pub fn resume(&self) {
        std::fs::remove_file(&self.mark).unwrap();
    }

    /// Wait for the run to end; its output.
    pub fn output(self) -> Output {
        self.child.wait_with_output().unwrap()
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawn `cmd` with stdout and stderr piped.
pub fn piped(cmd: &mut std::process::Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Spawn `cmd` with stdout piped and stderr written to the file `log`; the child and
/// the first line of its stdout (empty if the child ended without one).
pub fn spawn_first_line(cmd: &mut std::process::Command, log: &Path) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// Poll `done` every 20 ms until it holds; panic with `what` after `secs` seconds.
pub fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A run's stderr, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Require the run to have succeeded (its stderr, prefixed by `what`, if not); its stderr.
pub fn succeeded(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert!(out.status.success(), "{what}{err}");
    err
}

/// Set the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
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
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
}

/// Whether process `pid` still runs (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// The pid of the instant-recovery server a `restore --as-vm --instant` printed.
pub fn server_pid(out: &str) -> u32 {
    out.split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no server pid in: {out}"))
}

/// Ends an instant-recovery server the test started, whatever happens.
pub struct KillServer(pub u32);

impl Drop for KillServer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the server this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
    }
}

/// Wait (at most `secs`) until process `pid` has ended.
pub fn wait_gone(pid: u32, secs: u64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: server {pid} still runs after {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
