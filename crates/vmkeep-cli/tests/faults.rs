//! Faults with real processes: NBD servers that die, fail or stall mid-backup, a qemu-nbd
//! helper killed under vmkeep, a repository on a tmpfs that fills up or turns read-only,
//! libvirtd restarted under a live backup, and SIGINT/SIGTERM during backup, restore and
//! prune. After each: the documented exit status, one clear message, a deep check that
//! passes, every older generation unchanged, and a next backup that works.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Wait (up to 20 s) until the file `path` exists.
fn wait_for(path: &Path) {
    wait_until(20, &format!("{} never appeared", path.display()), || {
        path.exists()
    });
}

fn nbdkit(env: &Env, name: &str, args: &[&str]) -> (Proc, String) {
    let sock = env.path(&format!("{name}.sock"));
    let pidfile = env.path(&format!("{name}.pid"));
    let child = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-U"])
        .arg(&sock)
        .arg("-P")
        .arg(&pidfile)
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit is installed by scripts/test.sh");
    wait_for(&pidfile);
    (
        Proc(child),
        format!("nbd+unix:///?socket={}", sock.display()),
    )
}

/// An archive with two generations and the restores of both; returns (restores, ids).
fn two_generations(env: &Env, vm: &str) -> (Vec<Vec<u8>>, Vec<String>) {
    let disk = env.disk("base.raw", 8 << 20);
    write_at(&disk, 0, &noise(1, 4 << 20));
    env.backup(vm, &disk, &[]);
    write_at(&disk, 1 << 20, &noise(2, 65536));
    env.backup(vm, &disk, &[]);
    let restores = (0..2).map(|k| restore(env, vm, &k.to_string())).collect();
    (restores, env.generations(vm))
}

/// Generation `rev` of `vm`, restored.
fn restore(env: &Env, vm: &str, rev: &str) -> Vec<u8> {
    env.restored(vm, rev, None)
}

/// The archive of `vm` is exactly as before: same generations, same bytes, deep check ok.
fn unchanged(env: &Env, vm: &str, restores: &[Vec<u8>], ids: &[String]) {
    assert_eq!(&env.generations(vm), ids, "the generations changed");
    env.ok(&["check", vm, "--deep"]);
    for (k, r) in restores.iter().enumerate() {
        assert!(
            &restore(env, vm, &k.to_string()) == r,
            "generation {k} changed"
        );
    }
    assert!(
        !env.repo().join(vm).join("txn.toml").exists(),
        "a transaction was left behind"
    );
}

fn one_error_line(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr).into_owned();
    assert_eq!(
        s.lines().filter(|l| l.starts_with("vmkeep: error")).count(),
        1,
        "{s}"
    );
    s
}

#[test]
fn nbd_server_failing_reads_fails_the_backup_cleanly() {
    let env = Env::new();
    let (restores, ids) = two_generations(&env, "vm");
    // The pattern plugin has data everywhere; the error filter fails every read.
    let (_kit, uri) = nbdkit(
        &env,
        "err",
        &[
            "--filter=error",
            "pattern",
            "size=8M",
            "error-pread-rate=1",
            "error=EIO",
        ],
    );
    let out = env.run(&["backup", "vm", "--disk", &format!("vda={uri}")]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out.stderr);
    assert!(err.contains("nbd+unix") && err.contains("EIO"), "{err}");
    unchanged(&env, "vm", &restores, &ids);
}

#[test]
fn slow_nbd_server_still_gives_a_correct_backup() {
    let env = Env::new();
    let (_kit, uri) = nbdkit(
        &env,
        "slow",
        &["--filter=delay", "pattern", "size=4M", "rdelay=20ms"],
    );
    env.ok(&["backup", "vm", "--disk", &format!("vda={uri}")]);
    let copy = env.path("copy.raw");
    let st = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        std::fs::read(env.repo().join("vm/latest/vda.raw")).unwrap()
            == std::fs::read(copy).unwrap()
    );
}

#[test]
fn nbd_server_killed_mid_backup() {
    let env = Env::new();
    let (restores, ids) = two_generations(&env, "vm");
    // Slow reads, so the backup is surely still reading when the server dies.
    let (mut kit, uri) = nbdkit(
        &env,
        "dies",
        &["--filter=delay", "pattern", "size=256M", "rdelay=400ms"],
    );
    let child = env
        .std_cmd(&["backup", "vm", "--disk", &format!("vda={uri}")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    kit.0.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out.stderr);
    assert!(err.contains("nbd+unix"), "{err}");
    unchanged(&env, "vm", &restores, &ids);
}

fn qemu_nbd_children(parent: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &parent.to_string(), "qemu-nbd"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[cfg(feature = "fault-injection")]
#[test]
fn qemu_nbd_helper_killed_mid_backup_leaves_nothing_behind() {
    let env = Env::new();
    let img = env.path("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 48M"])
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let raw = env.disk("first.raw", 64 << 20);
    write_at(&raw, 0, &noise(3, 1 << 20));
    env.backup("vm", &raw, &[]);
    let before = restore(&env, "vm", "0");
    let spec = format!("vda={}", img.display());
    let run = env.spawn_paused(&["backup", "vm", "--disk", &spec], "backup-planned:3");
    wait_for(&run.mark);
    let helpers = qemu_nbd_children(run.child.id());
    assert_eq!(helpers.len(), 1, "vmkeep runs one qemu-nbd");
    // SAFETY: kill(2) on the helper this test found.
    unsafe { libc::kill(helpers[0] as i32, libc::SIGKILL) };
    let pid = run.child.id();
    let out = run.output();
    assert_eq!(out.status.code(), Some(1));
    one_error_line(&out.stderr);
    assert!(qemu_nbd_children(pid).is_empty());
    env.ok(&["check", "vm", "--deep"]);
    assert!(
        restore(&env, "vm", "0") == before,
        "the archive is as it was"
    );
    assert_eq!(env.generations("vm").len(), 1);
    // The next run works.
    env.ok(&["backup", "vm", "--disk", &format!("vda={}", img.display())]);
}

/// A tmpfs of `mib` MiB at `path`, unmounted on drop. These tests run as root (as the
/// test script does); a tmpfs is the only way to get a real full or read-only file system.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Tmpfs {
        assert_eq!(
            // SAFETY: getuid has no preconditions and cannot fail.
            unsafe { libc::getuid() },
            0,
            "the tmpfs tests need root (run scripts/test.sh as root)"
        );
        std::fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(path.to_path_buf())
    }

    fn remount(&self, opt: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn repository_filling_up_fails_cleanly_and_loses_nothing() {
    let env = Env::new();
    let _fs = Tmpfs::mount(&env.repo(), 40);
    env.ok(&["init"]);
    let disk = env.disk("disk.raw", 64 << 20);
    write_at(&disk, 0, &noise(4, 20 << 20));
    env.backup("vm", &disk, &[]);
    write_at(&disk, 4 << 20, &noise(5, 1 << 20));
    env.backup("vm", &disk, &[]);
    let restores: Vec<Vec<u8>> = (0..2)
        .map(|k| restore(&env, "vm", &k.to_string()))
        .collect();
    let ids = env.generations("vm");
    // 24 MiB of new data cannot fit in what is left (and its journal even less).
    write_at(&disk, 24 << 20, &noise(6, 24 << 20));
    let out = env.run(&["backup", "vm", "--disk", &format!("vda={}", disk.display())]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out.stderr);
    assert!(err.contains("no space left"), "{err}");
    unchanged(&env, "vm", &restores, &ids);
    // An overwrite that fits (journal plus new blocks) still works on the nearly full disk.
    write_at(&disk, 24 << 20, &[0u8; 24 << 20]);
    write_at(&disk, 0, &noise(7, 2 << 20));
    env.backup("vm", &disk, &[]);
    env.ok(&["check", "vm", "--deep"]);
}

/// Fill the file system at `dir` to the last byte with a file `fill` in it.
fn fill_up(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("fill");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0x55u8; 1 << 16];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&chunk[..4096]).is_ok() {}
    while f.write_all(&[0x55]).is_ok() {}
    p
}

#[test]
fn full_repository_rolls_back_without_free_space() {
    // The failing run zeroes 32 MiB (its journal takes their old content, the image
    // gives the space back) and then writes 56 MiB of new data into holes: the disk fills
    // up with the zeroed blocks' old content only in the journal. Rolling back must not
    // need space that is not there.
    let env = Env::new();
    let _fs = Tmpfs::mount(&env.repo(), 80);
    env.ok(&["init"]);
    let disk = env.disk("disk.raw", 96 << 20);
    write_at(&disk, 0, &noise(11, 40 << 20));
    env.backup("vm", &disk, &[]);
    let old = restore(&env, "vm", "0");
    let ids = env.generations("vm");
    write_at(&disk, 0, &vec![0u8; 32 << 20]);
    write_at(&disk, 40 << 20, &noise(12, 56 << 20));
    let out = env.run(&["backup", "vm", "--disk", &format!("vda={}", disk.display())]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out.stderr);
    assert!(err.contains("no space left"), "{err}");
    assert!(!err.contains("could not be rolled back"), "{err}");
    // Whatever is left, with the disk full to the last byte, check recovers and passes.
    let fill = fill_up(&env.repo());
    let out = env.run(&["check", "vm", "--deep"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        restore(&env, "vm", "0") == old,
        "the old generation changed"
    );
    assert_eq!(env.generations("vm"), ids);
    assert!(!env.repo().join("vm/txn.toml").exists());
    // Space again: the next backup that fits works.
    std::fs::remove_file(fill).unwrap();
    write_at(&disk, 0, &noise(11, 40 << 20));
    write_at(&disk, 40 << 20, &vec![0u8; 56 << 20]);
    write_at(&disk, 1 << 20, &noise(13, 1 << 20));
    env.backup("vm", &disk, &[]);
    env.ok(&["check", "vm", "--deep"]);
    assert!(restore(&env, "vm", "1") == old);
    assert!(restore(&env, "vm", "0") == std::fs::read(&disk).unwrap());
}

/// A backup killed after it punched 32 MiB of old data out of the image, on a disk then
/// filled to the last byte: its rollback cannot run yet. `check` says so in one line and
/// still proves the old generation (through the journal), a restore returns it, and once
/// there is space again the next command rolls back.
#[cfg(feature = "fault-injection")]
#[test]
fn check_and_restore_while_the_rollback_waits_for_space() {
    let env = Env::new();
    let _fs = Tmpfs::mount(&env.repo(), 80);
    env.ok(&["init"]);
    let disk = env.disk("disk.raw", 64 << 20);
    write_at(&disk, 0, &noise(14, 40 << 20));
    env.backup("vm", &disk, &[]);
    let old = restore(&env, "vm", "0");
    write_at(&disk, 0, &vec![0u8; 32 << 20]);
    let spec = format!("vda={}", disk.display());
    // Where the image is fsynced (every block rewritten), from a logged run on a copy.
    let copy = env.path("logged");
    copy_repo(&env.repo(), &copy);
    let log = env.path("oplog");
    std::fs::create_dir_all(&log).unwrap();
    let log_dir = log.display().to_string();
    let vars = [
        ("VMKEEP_FAULT_LOG", log_dir.as_str()),
        ("VMKEEP_FAULT_LOG_SNAPSHOTS", "0"), // only the order; copies would take GiBs
    ];
    let out = env.run_at(&copy, &["backup", "vm", "--disk", &spec], &vars);
    assert!(out.status.success(), "{out:?}");
    let k: u64 = std::fs::read_to_string(log.join("log"))
        .unwrap()
        .lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f[1] == "fsync" && f[2].ends_with("vda.raw"))
        .map(|f| f[0].parse().unwrap())
        .unwrap();
    let out = env
        .std_cmd(&["backup", "vm", "--disk", &spec])
        .env("VMKEEP_FAULT", format!("kill:{k}"))
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(9));
    let fill = fill_up(&env.repo());
    let out = env.run(&["check", "vm", "--deep"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("awaits recovery"))
            .count(),
        1,
        "{err}"
    );
    assert!(
        restore(&env, "vm", "0") == old,
        "the old generation reads back"
    );
    std::fs::remove_file(fill).unwrap();
    let out = env.ok(&["check", "vm", "--deep"]);
    assert!(out.contains("rolled back"), "{out}");
    assert!(!env.repo().join("vm/txn.toml").exists());
    assert!(restore(&env, "vm", "0") == old);
    assert!(std::fs::read(env.repo().join("vm/latest/vda.raw")).unwrap() == old);
    env.backup("vm", &disk, &[]);
}

#[test]
fn read_only_repository_refuses_writes_and_still_restores_and_checks() {
    let env = Env::new();
    let fs = Tmpfs::mount(&env.repo(), 64);
    env.ok(&["init"]);
    let (restores, ids) = two_generations(&env, "vm");
    fs.remount("ro");
    let disk = env.path("base.raw");
    write_at(&disk, 0, &noise(8, 65536));
    let out = env.run(&["backup", "vm", "--disk", &format!("vda={}", disk.display())]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out.stderr);
    assert!(err.contains("Read-only file system"), "{err}");
    // Reading needs no write access.
    for (k, r) in restores.iter().enumerate() {
        assert!(&restore(&env, "vm", &k.to_string()) == r);
    }
    env.ok(&["check", "vm", "--deep"]);
    env.ok(&["status", "vm"]);
    fs.remount("rw");
    unchanged(&env, "vm", &restores, &ids);
    env.backup("vm", &disk, &[]);
}

#[cfg(feature = "fault-injection")]
mod signals {
    use super::*;

    /// Run `args` paused at `point`, send `sig` during the pause, return the output.
    fn signalled(env: &Env, args: &[&str], point: &str, sig: i32) -> std::process::Output {
        let run = env.spawn_paused(args, &format!("{point}:3"));
        wait_for(&run.mark);
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(run.child.id() as i32, sig) };
        run.output()
    }

    fn interrupted(out: &std::process::Output, name: &str) {
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = one_error_line(&out.stderr);
        assert!(err.contains(&format!("interrupted by {name}")), "{err}");
    }

    fn big_change(env: &Env) -> PathBuf {
        // More than one journal batch (32 MiB), so the pause point is reached mid-run.
        let disk = env.disk("big.raw", 96 << 20);
        write_at(&disk, 0, &noise(9, 80 << 20));
        disk
    }

    #[test]
    fn sigint_and_sigterm_during_backup_roll_it_back() {
        for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
            let env = Env::new();
            let (restores, ids) = two_generations(&env, "vm");
            let disk = big_change(&env);
            let spec = format!("vda={}", disk.display());
            let out = signalled(
                &env,
                &["backup", "vm", "--disk", &spec],
                "backup-flushed",
                sig,
            );
            interrupted(&out, name);
            unchanged(&env, "vm", &restores, &ids);
            env.ok(&["backup", "vm", "--disk", &spec]);
            assert!(
                std::fs::read(env.repo().join("vm/latest/vda.raw")).unwrap()
                    == std::fs::read(&disk).unwrap()
            );
        }
    }

    #[test]
    fn sigint_during_restore_leaves_no_partial_file() {
        let env = Env::new();
        let disk = big_change(&env);
        env.backup("vm", &disk, &[]);
        let to = env.path("restored.raw");
        let out = signalled(
            &env,
            &["restore", "vm", "--to", to.to_str().unwrap()],
            "restore-wrote",
            libc::SIGINT,
        );
        interrupted(&out, "SIGINT");
        assert!(!to.exists());
        let partial: Vec<_> = std::fs::read_dir(env.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(partial.is_empty(), "{partial:?}");
    }

    #[test]
    fn sigterm_during_prune_keeps_every_generation() {
        let env = Env::new();
        let disk = env.disk("p.raw", 4 << 20);
        for i in 0..4 {
            write_at(&disk, i << 20, &noise(20 + i, 65536));
            env.backup("vm", &disk, &[]);
        }
        let before: Vec<Vec<u8>> = (0..4)
            .map(|k| restore(&env, "vm", &k.to_string()))
            .collect();
        let ids = env.generations("vm");
        env.ok(&["protect", "vm", "-g", &ids[0]]);
        let out = signalled(
            &env,
            &["prune", "vm", "--keep-last", "1"],
            "prune-merged",
            libc::SIGTERM,
        );
        interrupted(&out, "SIGTERM");
        unchanged(&env, "vm", &before, &ids);
        let merges: Vec<_> = walk(&env.repo())
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".merge"))
            .collect();
        assert!(merges.is_empty(), "{merges:?}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
