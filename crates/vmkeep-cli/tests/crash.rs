//! Crash safety, with the fault hook compiled in (`--features fault-injection`): a backup
//! or prune killed with SIGKILL at every durable operation (write, truncate, rename, fsync,
//! removal), or hitting ENOSPC there, leaves an archive whose deep check passes, whose newest
//! generation is the old or the new disk and never a mix, whose older generations are
//! unchanged, and on which the next backup works.

#![cfg(feature = "fault-injection")]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::*;

/// Every generation of `vm` in `repo` (`-g 0` the newest), restored.
fn restore_all(env: &Env, repo: &Path, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|k| {
            env.restored_at(repo, "vm", &k.to_string(), None)
                .unwrap_or_else(|e| panic!("restore -g {k}: {e}"))
        })
        .collect()
}

/// `vmkeep ARGS…` on `repo` with no fault hook.
fn vmkeep_at(env: &Env, repo: &Path, args: &[&str]) -> std::process::Output {
    env.run_at(repo, args, &[])
}

/// Copy `base` to `repo` and run `args` there, killed (SIGKILL) at its `k`-th durable
/// operation; `what` names the point when it was not killed.
fn killed_copy(env: &Env, base: &Path, repo: &Path, args: &[&str], k: u64, what: &str) {
    copy_repo(base, repo);
    let kill = format!("kill:{k}");
    let out = env.run_at(repo, args, &[("VMKEEP_FAULT", &kill)]);
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{what}: not killed ({:?})",
        out.status
    );
}

/// `check vm --deep` on `repo` passes; `what` names the state when it does not.
fn deep_check_passes(env: &Env, repo: &Path, what: &str) {
    let out = vmkeep_at(env, repo, &["check", "vm", "--deep"]);
    assert!(
        out.status.success(),
        "{what}: check --deep failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Count the durable operations of a command on a copy of `base`.
fn count_points(env: &Env, base: &Path, args: &[&str]) -> u64 {
    let scratch = env.path("count-repo");
    copy_repo(base, &scratch);
    let counter = env.path("count");
    let count = counter.display().to_string();
    let out = env.run_at(&scratch, args, &[("VMKEEP_FAULT_COUNT", &count)]);
    succeeded(&out, "");
    std::fs::read_to_string(counter).unwrap().parse().unwrap()
}

/// A VM with three generations, and a disk changed (grown, rewritten, zeroed) after them.
fn setup() -> (Env, std::path::PathBuf, Vec<Vec<u8>>) {
    let env = Env::new();
    let disk = env.disk("disk.raw", 2 << 20);
    write_at(&disk, 0, &noise(1, 1 << 20));
    env.backup("vm", &disk, &["--block-size", "16K"]);
    write_at(&disk, 300 << 10, &text(200 << 10));
    env.backup("vm", &disk, &[]);
    write_at(&disk, 100 << 10, &noise(2, 64 << 10));
    env.backup("vm", &disk, &[]);
    let before = restore_all(&env, &env.repo(), 3);
    // The change the crashing backup records: overwrite, zero, grow.
    write_at(&disk, 0, &noise(3, 48 << 10));
    write_at(&disk, 600 << 10, &[0u8; 128 << 10]);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len(3 << 20).unwrap();
    write_at(&disk, (5 << 19) + 4096, &noise(4, 300 << 10));
    (env, disk, before)
}

/// [`setup`], and the backup that records the changed disk, to be crashed.
struct CrashingBackup {
    env: Env,
    /// The bytes of the old generations, newest first.
    before: Vec<Vec<u8>>,
    /// The disk's bytes now: what the backup records.
    new_disk: Vec<u8>,
    spec: String,
    /// The backup's durable operations.
    points: u64,
}

impl CrashingBackup {
    fn new() -> CrashingBackup {
        let (env, disk, before) = setup();
        let mut c = CrashingBackup {
            new_disk: std::fs::read(&disk).unwrap(),
            spec: format!("vda={}", disk.display()),
            env,
            before,
            points: 0,
        };
        c.points = count_points(&c.env, &c.env.repo(), &c.args());
        c
    }

    /// `backup vm --disk vda=DISK`.
    fn args(&self) -> [&str; 4] {
        ["backup", "vm", "--disk", &self.spec]
    }
}

fn assert_consistent(env: &Env, repo: &Path, before: &[Vec<u8>], new_disk: &[u8], point: &str) {
    deep_check_passes(env, repo, point);
    let n = Env::generations_in(repo, "vm").len();
    assert!(
        n == before.len() || n == before.len() + 1,
        "{point}: {n} generations"
    );
    let now = restore_all(env, repo, n);
    let newest = &now[0];
    if n == before.len() {
        assert!(
            newest == &before[0],
            "{point}: rolled back, but the newest generation is not the old disk"
        );
    } else {
        assert!(
            newest == new_disk,
            "{point}: committed, but the newest generation is not the new disk"
        );
    }
    for (k, old) in before.iter().enumerate() {
        assert!(
            &now[k + (n - before.len())] == old,
            "{point}: generation {k} of the old archive changed"
        );
    }
    let latest = std::fs::read(repo.join("vm/latest/vda.raw")).unwrap();
    assert!(
        &latest == newest,
        "{point}: latest/vda.raw is not the newest generation"
    );
}

#[test]
fn backup_killed_at_every_durable_operation() {
    let c = CrashingBackup::new();
    let (env, args, n) = (&c.env, c.args(), c.points);
    assert!(n > 20, "only {n} durable operations counted");
    let repo = env.path("crash-repo");
    for k in 1..=n {
        let point = format!("point {k} of {n}");
        killed_copy(env, &env.repo(), &repo, &args, k, &point);
        let point = format!("kill at {k}/{n}");
        assert_consistent(env, &repo, &c.before, &c.new_disk, &point);
        // The next backup works and records the disk.
        let out = vmkeep_at(env, &repo, &args);
        succeeded(&out, &format!("kill at {k}: next backup failed: "));
        let latest = std::fs::read(repo.join("vm/latest/vda.raw")).unwrap();
        assert!(
            latest == c.new_disk,
            "kill at {k}: the next backup did not record the disk"
        );
    }
}

#[test]
fn backup_meeting_enospc_fails_cleanly_and_loses_nothing() {
    let c = CrashingBackup::new();
    let (env, args, n) = (&c.env, c.args(), c.points);
    let repo = env.path("enospc-repo");
    for k in (1..=n).step_by(3) {
        copy_repo(&env.repo(), &repo);
        let out = env.run_at(&repo, &args, &[("VMKEEP_FAULT", &format!("enospc:{k}"))]);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            continue; // the fault hit after the commit's last needed step
        }
        assert_eq!(out.status.code(), Some(1), "enospc at {k}: {err}");
        assert!(err.contains("no space left"), "enospc at {k}: {err}");
        assert_eq!(
            err.trim_end()
                .lines()
                .filter(|l| l.starts_with("vmkeep: error"))
                .count(),
            1,
            "{err}"
        );
        let point = format!("enospc at {k}/{n}");
        assert_consistent(env, &repo, &c.before, &c.new_disk, &point);
    }
}

#[test]
fn prune_killed_at_every_durable_operation() {
    let (env, disk, _) = setup();
    env.backup("vm", &disk, &[]);
    env.backup("vm", &disk, &["--mode", "full"]);
    let before = restore_all(&env, &env.repo(), 5);
    // Keep the newest and the oldest: both middle generations are merged away.
    let ids = env.generations("vm");
    env.ok(&["protect", "vm", "-g", &ids[0]]);
    let args = ["prune", "vm", "--keep-last", "2"];
    let n = count_points(&env, &env.repo(), &args);
    let repo = env.path("prune-repo");
    for k in 1..=n {
        let point = format!("prune point {k}");
        killed_copy(&env, &env.repo(), &repo, &args, k, &point);
        deep_check_passes(&env, &repo, &format!("prune kill at {k}"));
        // Every generation that is left still restores to what it was.
        let left = Env::generations_in(&repo, "vm");
        for (i, id) in left.iter().enumerate() {
            let orig = ids
                .iter()
                .position(|x| x == id)
                .expect("no new generations appear");
            let got = env
                .restored_at(&repo, "vm", id, None)
                .unwrap_or_else(|e| panic!("restore {i}: {e}"));
            assert!(
                got == before[ids.len() - 1 - orig],
                "prune kill at {k}: generation {id} changed"
            );
        }
    }
}

/// The operation numbers of `args` that match `kind` and whose path ends in `suffix`,
/// from a run on a copy of `base` with the operation log on.
fn ops_matching(env: &Env, base: &Path, args: &[&str], kind: &str, suffix: &str) -> Vec<u64> {
    let scratch = env.path("log-repo");
    copy_repo(base, &scratch);
    let log = env.path("oplog");
    let _ = std::fs::remove_dir_all(&log);
    std::fs::create_dir_all(&log).unwrap();
    let log_dir = log.display().to_string();
    let vars = [
        ("VMKEEP_FAULT_LOG", log_dir.as_str()),
        ("VMKEEP_FAULT_LOG_SNAPSHOTS", "0"),
    ];
    assert!(env.run_at(&scratch, args, &vars).status.success());
    std::fs::read_to_string(log.join("log"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[1] == kind && f[2].ends_with(suffix)).then(|| f[0].parse().unwrap())
        })
        .collect()
}

#[test]
fn prune_roll_forward_without_its_merged_reverse_diff_deletes_nothing() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    for i in 0..3 {
        write_at(&disk, i * 65536, &noise(30 + i, 65536));
        env.backup("vm", &disk, &["--block-size", "16K"]);
    }
    let ids = env.generations("vm");
    env.ok(&["protect", "vm", "-g", &ids[0]]);
    let args = ["prune", "vm", "--keep-last", "1"];
    // Stop the prune at its commit's first rename of a merged reverse diff: the commit
    // record is durable, the merged file is there.
    let renames = ops_matching(&env, &env.repo(), &args, "rename", "vda.rdiff");
    let repo = env.path("merge-repo");
    killed_copy(
        &env,
        &env.repo(),
        &repo,
        &args,
        renames[0],
        "the first rename",
    );
    let merge = repo.join("vm").join(&ids[0]).join("vda.rdiff.merge");
    assert!(merge.exists(), "the merged reverse diff was written");
    // The merged file is lost (say, its name never reached the disk).
    std::fs::remove_file(&merge).unwrap();
    let out = vmkeep_at(&env, &repo, &["check", "vm"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("merged reverse diff of disk vda is missing"),
        "{stdout}"
    );
    // Nothing deleted: every generation and the record are still there.
    assert_eq!(Env::generations_in(&repo, "vm"), ids);
    assert!(repo.join("vm/txn.toml").exists());
    let out = vmkeep_at(&env, &repo, &args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines()
            .filter(|l| l.starts_with("vmkeep: error"))
            .count(),
        1,
        "{err}"
    );
    assert_eq!(Env::generations_in(&repo, "vm"), ids);
}

/// Every generation of `vm` with the bytes of each disk (the disks a generation folder
/// names, as `.raw` or `.rdiff`).
fn archive_of(env: &Env, repo: &Path) -> Archive {
    env.archive_at(repo, "vm")
}

/// `now` is `want`, generation by generation and disk by disk; generations of `old`
/// keep their ids (a new generation's id differs from run to run).
fn same_archive(now: &Archive, want: &Archive, old: &Archive) -> bool {
    now.len() == want.len()
        && now.iter().zip(want).all(|((ni, nd), (wi, wd))| {
            nd == wd && (ni == wi || !old.keys().any(|oi| oi == wi || oi == ni))
        })
}

/// Kill `args` at every durable operation on a copy of `base`; after each, a deep check
/// passes and the archive is exactly the one before or the one after the command.
fn killed_everywhere(env: &Env, base: &Path, args: &[&str], name: &str) {
    let old = archive_of(env, base);
    let done = env.path(&format!("{name}-done"));
    copy_repo(base, &done);
    let out = vmkeep_at(env, &done, args);
    assert!(out.status.success());
    let new = archive_of(env, &done);
    let n = count_points(env, base, args);
    let repo = env.path(&format!("{name}-crash"));
    for k in 1..=n {
        killed_copy(env, base, &repo, args, k, &format!("{name}: point {k}/{n}"));
        deep_check_passes(env, &repo, &format!("{name}: kill at {k}/{n}"));
        let now = archive_of(env, &repo);
        assert!(
            same_archive(&now, &old, &old) || same_archive(&now, &new, &old),
            "{name}: kill at {k}/{n}: neither the old nor the new archive"
        );
    }
}

fn small(env: &Env, name: &str, size: u64, seed: u64) -> std::path::PathBuf {
    let d = env.disk(name, size);
    write_at(&d, 0, &noise(seed, (size / 2) as usize));
    d
}

fn spec(name: &str, p: &Path) -> String {
    format!("{name}={}", p.display())
}

#[test]
fn backup_killed_everywhere_shrinking_adding_and_removing_disks() {
    let env = Env::new();
    let a = small(&env, "a.raw", 256 << 10, 41);
    let b = small(&env, "b.raw", 128 << 10, 42);
    let (sa, sb) = (spec("vda", &a), spec("vdb", &b));
    env.ok(&["backup", "vm", "--disk", &sa, "--block-size", "16K"]);
    write_at(&a, 16 << 10, &noise(43, 32 << 10));
    env.ok(&["backup", "vm", "--disk", &sa]);
    // A disk added (and the first one shrunk and changed).
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.set_len(160 << 10).unwrap();
    write_at(&a, 0, &noise(44, 16 << 10));
    let added = ["backup", "vm", "--disk", &sa, "--disk", &sb];
    killed_everywhere(&env, &env.repo(), &added, "shrink+added");
    env.ok(&added);
    // Two disks changed at once.
    write_at(&a, 32 << 10, &noise(45, 16 << 10));
    write_at(&b, 64 << 10, &noise(46, 32 << 10));
    killed_everywhere(&env, &env.repo(), &added, "two-disks");
    env.ok(&added);
    // A disk removed.
    let removed = ["backup", "vm", "--disk", &sb];
    killed_everywhere(&env, &env.repo(), &removed, "removed");
}

/// The repository of `base` after `args` was killed at the first operation of `kind` on
/// a path ending in `suffix`.
fn killed_at(env: &Env, base: &Path, args: &[&str], kind: &str, suffix: &str, to: &Path) {
    let k = ops_matching(env, base, args, kind, suffix)[0];
    killed_copy(env, base, to, args, k, &format!("{kind} {suffix}"));
}

#[test]
fn recovery_killed_at_every_durable_operation_still_recovers() {
    let (env, disk, _) = setup();
    let old = archive_of(&env, &env.repo());
    let spec = format!("vda={}", disk.display());
    let args = ["backup", "vm", "--disk", spec.as_str()];
    let done = env.path("rec-done");
    copy_repo(&env.repo(), &done);
    assert!(vmkeep_at(&env, &done, &args).status.success());
    let new = archive_of(&env, &done);
    // A backup stopped mid-way (its image rewritten, not yet fsynced nor committed) is rolled
    // back; one stopped right after its commit record is rolled forward.
    for (kind, suffix, want) in [("fsync", "vda.raw", &old), ("rename", "vda.rdiff", &new)] {
        let stopped = env.path("rec-stopped");
        killed_at(&env, &env.repo(), &args, kind, suffix, &stopped);
        let check = ["check", "vm"];
        let n = count_points(&env, &stopped, &check);
        assert!(n > 3, "{kind}: recovery has only {n} operations");
        let repo = env.path("rec-crash");
        for k in 1..=n {
            killed_copy(
                &env,
                &stopped,
                &repo,
                &check,
                k,
                &format!("recovery point {k}/{n}"),
            );
            deep_check_passes(&env, &repo, &format!("{kind}: recovery killed at {k}/{n}"));
            assert!(
                same_archive(&archive_of(&env, &repo), want, &old),
                "{kind}: recovery killed at {k}/{n}: not the archive recovery makes"
            );
        }
    }
}
