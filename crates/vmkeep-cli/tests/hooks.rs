//! Hook scripts around backups (`pre_backup`, `post_backup`, `hook_timeout`, global and per
//! VM): what they are told, what their failure does to the run and to the archive, and
//! the hooks that are refused unrun.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;

/// A hook at `name` in the test's folder: a shell script with `body`, mode `mode`.
fn hook(env: &Env, name: &str, body: &str, mode: u32) -> PathBuf {
    let p = env.path(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// A hook that appends its phase and the variables vmkeep gives it to `log`, then exits
/// with `code`.
fn recording(env: &Env, name: &str, log: &Path, code: i32) -> PathBuf {
    hook(
        env,
        name,
        &format!(
            "echo \"$VMKEEP_PHASE vm=$VMKEEP_VM status=$VMKEEP_STATUS gen=$VMKEEP_GENERATION \
             mode=$VMKEEP_MODE repo=$VMKEEP_REPOSITORY err=$VMKEEP_ERROR\" >> {}\n\
             [ {code} -eq 0 ] || echo 'the database said no' >&2\nexit {code}",
            log.display()
        ),
        0o755,
    )
}

/// The number of generations of `vm` (none before its first backup).
fn generations(env: &Env, vm: &str) -> usize {
    if env.repo().join(vm).exists() {
        env.generations(vm).len()
    } else {
        0
    }
}

fn config(env: &Env, text: &str) {
    std::fs::write(env.path("no-config.toml"), text).unwrap();
}

fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn hooks_run_around_each_backup_and_are_told_the_outcome() {
    let env = Env::new();
    let disk = env.disk("a.raw", 1 << 20);
    write_at(&disk, 0, &noise(1, 256 << 10));
    let log = env.path("hooks.log");
    let pre = recording(&env, "pre", &log, 0);
    let post = recording(&env, "post", &log, 0);
    config(
        &env,
        &format!(
            "pre_backup = \"{}\"\npost_backup = \"{}\"\n[vm.a]\ndisks = {{ vda = \"{}\" }}\n[vm.b]\ndisks = {{ vda = \"{}\" }}\npre_backup = \"\"\n",
            pre.display(),
            post.display(),
            disk.display(),
            disk.display()
        ),
    );
    env.ok(&["backup", "a"]);
    let ids = env.generations("a");
    let lines = log_lines(&log);
    let repo = env.repo().display().to_string();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("pre-backup vm=a status= gen= "),
        "{lines:?}"
    );
    assert!(lines[0].contains(&format!("repo={repo}")), "{lines:?}");
    assert_eq!(
        lines[1],
        format!(
            "post-backup vm=a status=ok gen={} mode=full repo={repo} err=",
            ids[0]
        )
    );
    // A VM's own empty `pre_backup` turns the global one off for it.
    env.ok(&["backup", "b"]);
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[2].starts_with("post-backup vm=b status=ok"),
        "{lines:?}"
    );
}

#[test]
fn a_failing_pre_backup_hook_fails_the_vm_before_anything_is_read() {
    let env = Env::new();
    let disk = env.disk("a.raw", 1 << 20);
    write_at(&disk, 0, &noise(1, 256 << 10));
    let log = env.path("hooks.log");
    let pre = recording(&env, "pre", &log, 4);
    let post = recording(&env, "post", &log, 0);
    let good = env.disk("b.raw", 1 << 20);
    config(
        &env,
        &format!(
            "[vm.a]\ndisks = {{ vda = \"{}\" }}\npre_backup = \"{}\"\npost_backup = \"{}\"\n[vm.b]\ndisks = {{ vda = \"{}\" }}\n",
            disk.display(),
            pre.display(),
            post.display(),
            good.display()
        ),
    );
    let out = env.run(&["backup", "a", "b"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    let errors: Vec<&str> = e.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{e}");
    assert!(
        errors[0].contains("VM a")
            && errors[0].contains("pre-backup hook")
            && errors[0].contains("the database said no"),
        "{e}"
    );
    assert_eq!(generations(&env, "a"), 0, "nothing backed up");
    assert_eq!(generations(&env, "b"), 1, "the other VM is backed up");
    // The post-backup hook still ran, told of the failure (to undo what pre began).
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].starts_with("post-backup vm=a status=failed gen="),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("err=") && lines[1].contains("the database said no"),
        "{lines:?}"
    );
}

#[test]
fn a_failing_post_backup_hook_keeps_the_generation_and_fails_the_run() {
    let env = Env::new();
    let disk = env.disk("a.raw", 1 << 20);
    write_at(&disk, 0, &noise(2, 256 << 10));
    let log = env.path("hooks.log");
    let post = recording(&env, "post", &log, 2);
    config(
        &env,
        &format!(
            "[vm.a]\ndisks = {{ vda = \"{}\" }}\npost_backup = \"{}\"\n",
            disk.display(),
            post.display()
        ),
    );
    let out = env.run(&["backup", "a", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("backed up, but post-backup hook"), "{e}");
    let js: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(js["vms"][0]["ok"], false);
    assert!(js["vms"][0]["generation"]["id"].is_string(), "{js}");
    assert_eq!(generations(&env, "a"), 1);
    assert_eq!(
        env.restored("a", "latest", None),
        std::fs::read(&disk).unwrap()
    );
}

#[test]
fn a_hook_past_its_time_is_killed_and_fails_the_vm() {
    let env = Env::new();
    let disk = env.disk("a.raw", 1 << 20);
    let pre = hook(&env, "slow", "sleep 30", 0o755);
    config(
        &env,
        &format!(
            "hook_timeout = 1\n[vm.a]\ndisks = {{ vda = \"{}\" }}\npre_backup = \"{}\"\n",
            disk.display(),
            pre.display()
        ),
    );
    let t = std::time::Instant::now();
    let e = env.fails(&["backup", "a"], 1);
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
    assert!(e.contains("did not finish within 1 s"), "{e}");
    assert_eq!(generations(&env, "a"), 0);
}

#[test]
fn a_hook_others_may_change_is_refused_unrun() {
    let env = Env::new();
    let disk = env.disk("a.raw", 1 << 20);
    let ran = env.path("ran");
    let loose = hook(&env, "loose", &format!("touch {}", ran.display()), 0o777);
    config(
        &env,
        &format!(
            "[vm.a]\ndisks = {{ vda = \"{}\" }}\npre_backup = \"{}\"\n",
            disk.display(),
            loose.display()
        ),
    );
    let e = env.fails(&["backup", "a"], 2);
    assert!(e.contains("writable by others"), "{e}");
    assert!(!ran.exists(), "the hook never ran");
    assert_eq!(generations(&env, "a"), 0);
    // A relative path is refused too (it would depend on the current folder).
    config(
        &env,
        &format!(
            "[vm.a]\ndisks = {{ vda = \"{}\" }}\npre_backup = \"hooks/pre\"\n",
            disk.display()
        ),
    );
    let e = env.fails(&["backup", "a"], 2);
    assert!(e.contains("absolute"), "{e}");
}
