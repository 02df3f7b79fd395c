//! vmkeep as cron, systemd and monitoring see it: quiet runs, JSON that parses back, health
//! checks in the Nagios convention, Prometheus metrics, a quiet end on a closed pipe,
//! completions, the config file and the status table.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

use common::*;

fn with_config(env: &Env, text: &str) {
    std::fs::write(env.path("no-config.toml"), text).unwrap();
}

#[test]
fn quiet_runs_print_nothing_under_cron_conditions() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    write_at(&disk, 0, &noise(1, 100_000));
    let spec = format!("vda={}", disk.display());
    for _ in 0..2 {
        let out = env.run(&["-q", "backup", "vm", "--disk", &spec]);
        assert!(out.status.success());
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{:?}", out);
    }
    let out = env.run(&["-q", "prune", "vm", "--keep-last", "1"]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{out:?}"
    );
    let out = env.run(&["-q", "check", "vm"]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{out:?}"
    );
    // Errors still get their one line.
    let out = env.run(&["-q", "backup", "vm", "--disk", "vda=/nonexistent"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}

#[test]
fn backup_if_due_skips_silently() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    with_config(
        &env,
        &format!(
            "interval = \"1d\"\n[vm.vm]\ndisks = {{ vda = \"{}\" }}\n",
            disk.display()
        ),
    );
    env.ok(&["backup", "--all", "--if-due"]);
    assert_eq!(env.generations("vm").len(), 1);
    let out = env.run(&["backup", "--all", "--if-due"]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{out:?}"
    );
    assert_eq!(env.generations("vm").len(), 1, "nothing was due");
    env.ok(&["backup", "--group", "all"]);
    assert_eq!(env.generations("vm").len(), 2);
}

#[test]
fn json_outputs_parse_back() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    let spec = format!("vda={}", disk.display());
    let js: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "backup", "vm", "--disk", &spec])).unwrap();
    assert_eq!(js["vms"][0]["name"], "vm");
    assert_eq!(js["vms"][0]["ok"], true);
    assert_eq!(js["vms"][0]["generation"]["mode"], "full");
    env.ok(&["backup", "vm", "--disk", &spec]);
    let js: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "check", "vm", "--deep"])).unwrap();
    assert_eq!(js["ok"], true);
    assert_eq!(js["vms"][0]["generations_proven"], 2);
    let js: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "prune", "vm", "--keep-last", "1", "--dry-run"]))
            .unwrap();
    assert_eq!(js["vms"][0]["removed"].as_array().unwrap().len(), 1);
    assert_eq!(env.generations("vm").len(), 2, "dry run removes nothing");
}

#[test]
fn health_follows_the_nagios_convention() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    with_config(&env, "interval = \"2s\"\n");
    let out = env.run(&["status", "--check-health"]);
    assert_eq!(out.status.code(), Some(0), "no VMs: nothing to worry about");
    env.backup("vm", &disk, &[]);
    let out = env.run(&["status", "--check-health"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("VMKEEP OK"));
    // Generation times have second precision: 4.2 s after the backup the age is 4 or 5 s
    // (past 1.5 intervals of 2 s), 7.5 s after it 7 or 8 s (past 3 intervals).
    std::thread::sleep(std::time::Duration::from_millis(4200));
    let out = env.run(&["status", "--check-health"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "older than 1.5 intervals: WARNING"
    );
    std::thread::sleep(std::time::Duration::from_millis(3300));
    let out = env.run(&["status", "--check-health"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "older than 3 intervals: CRITICAL"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("VMKEEP CRITICAL") && text.contains("CRITICAL vm"),
        "{text}"
    );

    with_config(&env, "");
    flip_byte(&env.repo().join("vm/latest/vda.raw"), 10);
    env.fails(&["check", "vm"], 3);
    let out = env.run(&["status", "--check-health"]);
    assert_eq!(out.status.code(), Some(2), "a damaged archive is CRITICAL");
    assert!(String::from_utf8_lossy(&out.stdout).contains("problems"));
}

#[test]
fn prometheus_textfile() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    env.backup("web1", &disk, &[]);
    env.ok(&["check", "web1"]);
    let prom = env.path("vmkeep.prom");
    // Whatever the umask, the file is 0644: node_exporter reads it as its own user.
    under_umask(
        &env,
        "077",
        &["status", "--prometheus", prom.to_str().unwrap()],
    );
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&prom).unwrap().mode() & 0o7777, 0o644);
    }
    let text = std::fs::read_to_string(prom).unwrap();
    for needle in [
        "vmkeep_generations{vm=\"web1\"} 1",
        "vmkeep_last_check_ok{vm=\"web1\"} 1",
        "# TYPE vmkeep_last_backup_timestamp_seconds gauge",
        "vmkeep_space_used_bytes{vm=\"web1\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

#[test]
fn closed_pipe_ends_quietly() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 4 << 20);
    write_at(&disk, 0, &noise(2, 4 << 20));
    env.backup("vm", &disk, &["--block-size", "4K"]);
    let digest = env.repo().join("vm/latest/vda.digest");
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("vmkeep"))
        .args(["print", digest.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status:?} {err}");
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

#[test]
fn completions_and_help() {
    let env = Env::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = env.ok(&["completions", shell]);
        assert!(out.contains("vmkeep") && out.contains("backup"), "{shell}");
    }
    for cmd in [
        "backup", "restore", "check", "prune", "status", "merge", "print", "init", "sync",
    ] {
        let out = env.ok(&[cmd, "--help"]);
        assert!(out.contains("Example"), "{cmd} --help has no example");
    }
    let man = env.path("man");
    env.ok(&["manpages", man.to_str().unwrap()]);
    assert!(man.join("vmkeep.1").exists() && man.join("vmkeep-backup.1").exists());
}

#[test]
fn malformed_config_is_one_line_with_file_and_line() {
    let env = Env::new();
    with_config(&env, "repository = \"/x\"\n[retention]\nkeep_dayly = 3\n");
    let e = env.fails(&["status"], 2);
    assert!(
        e.contains("no-config.toml:3") && e.contains("keep_dayly"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    with_config(&env, "repository = [\n");
    let e = env.fails(&["status"], 2);
    assert!(e.contains("no-config.toml:"), "{e}");
    with_config(&env, "[groups]\nweb = [\"a/b\"]\n");
    let e = env.fails(&["status"], 2);
    assert!(e.contains("invalid VM name"), "{e}");
    with_config(&env, "");
    let e = env.fails(&["backup", "--group", "nosuch"], 2);
    assert!(e.contains("unknown group"), "{e}");
}

#[test]
fn shipped_example_config_parses() {
    let env = Env::new();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/vmkeep.toml"
    ))
    .unwrap();
    // Point the repository at the test's own.
    let example = example.replace("/var/lib/vmkeep", env.repo().to_str().unwrap());
    with_config(&env, &example);
    env.ok(&["status"]);
}

#[test]
fn status_table_is_pinned() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 2 << 20);
    write_at(&disk, 0, &text(300 << 10));
    env.backup("web1", &disk, &[]);
    write_at(&disk, 1 << 20, &text(64 << 10));
    env.backup("web1", &disk, &[]);
    let ids = env.generations("web1");
    env.ok(&["protect", "web1", "-g", &ids[0]]);
    let out = env.ok(&["status", "web1"]);
    let mut t = out.clone();
    for (i, id) in ids.iter().enumerate() {
        t = t.replace(id.as_str(), &format!("<gen{i}>"));
    }
    // Times, durations and space vary between runs; the layout and the numbers do not.
    let t: String = t
        .lines()
        .map(|l| {
            let mut words: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            for w in words.iter_mut() {
                if w.ends_with('Z') && w.contains('T') {
                    *w = "<time>".into();
                }
                if w.ends_with('s') && w[..w.len() - 1].parse::<f64>().is_ok() {
                    *w = "<took>".into();
                }
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let t = t.replace(
        &t.lines().next().unwrap().to_string(),
        "VM web1 — 2 generations, <space> on disk, block size 64.0 KiB",
    );
    let expected = "VM web1 — 2 generations, <space> on disk, block size 64.0 KiB
N GENERATION TIME MODE SIZE CHANGED STORED TOOK FLAGS
0 <gen1> <time> diff 2.0 MiB 64.0 KiB 64.2 KiB <took>
1 <gen0> <time> full 2.0 MiB 320.0 KiB 320.0 KiB <took> protected
last check: never";
    assert_eq!(t, expected, "status table changed:\n{out}");
}

#[test]
fn one_vm_failing_does_not_stop_the_others() {
    let env = Env::new();
    let disk = env.disk("good.raw", 1 << 20);
    with_config(
        &env,
        &format!(
            "[groups]\npair = [\"bad\", \"good\"]\n[vm.good]\ndisks = {{ vda = \"{}\" }}\n[vm.bad]\ndisks = {{ vda = \"/nonexistent.raw\" }}\n",
            disk.display()
        ),
    );
    for args in [&["backup", "--group", "pair"][..], &["backup", "--all"][..]] {
        let out = env.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: a failed VM makes the run fail"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("bad") && err.contains("/nonexistent.raw"),
            "{err}"
        );
    }
    assert_eq!(
        env.generations("good").len(),
        2,
        "the good VM was backed up both times"
    );
    let js: serde_json::Value =
        serde_json::from_slice(&env.run(&["--json", "backup", "--group", "pair"]).stdout).unwrap();
    let vms = js["vms"].as_array().unwrap();
    assert_eq!(vms.iter().filter(|v| v["ok"] == true).count(), 1);
    assert!(vms
        .iter()
        .any(|v| v["name"] == "bad" && v["error"].as_str().unwrap().contains("/nonexistent.raw")));
}

/// Run `vmkeep --repo REPO ARGS…` under umask 000, so that every mode it creates is its own
/// choice, not the umask's.
fn under_open_umask(env: &Env, args: &[&str]) {
    under_umask(env, "000", args)
}

/// Run `vmkeep --repo REPO ARGS…` under `umask MASK`, requiring success.
fn under_umask(env: &Env, mask: &str, args: &[&str]) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("umask {mask} && exec \"$0\" \"$@\""))
        .arg(assert_cmd::cargo::cargo_bin("vmkeep"))
        .env("VMKEEP_CONFIG", env.path("no-config.toml"))
        .arg("--repo")
        .arg(env.repo())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
}

#[test]
fn repository_files_and_restored_disks_are_private_whatever_the_umask() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    write_at(&disk, 0, &noise(3, 1 << 20));
    let d = disk.to_str().unwrap().to_string();
    under_open_umask(&env, &["backup", "vm", "--disk", &format!("vda={d}")]);
    write_at(&disk, 4096, &noise(4, 65536));
    under_open_umask(&env, &["backup", "vm", "--disk", &format!("vda={d}")]);
    under_open_umask(&env, &["check", "vm", "--deep"]);
    let out = env.path("r.raw");
    under_open_umask(
        &env,
        &["restore", "vm", "-g", "1", "--to", out.to_str().unwrap()],
    );
    let merged = env.path("m.raw");
    under_open_umask(
        &env,
        &[
            "merge",
            "vm",
            "-g",
            "1",
            "--disk",
            "vda",
            "--out",
            merged.to_str().unwrap(),
        ],
    );
    for f in [&out, &merged] {
        assert_eq!(
            std::fs::metadata(f).unwrap().mode() & 0o7777,
            0o600,
            "{f:?}"
        );
    }
    // Every file and folder of the VM's archive: 0600 / 0700 (the `latest` link aside).
    let mut seen = 0;
    let mut todo = vec![env.repo().join("vm")];
    while let Some(dir) = todo.pop() {
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o7777,
            0o700,
            "{dir:?}"
        );
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                assert_eq!(p.file_name().unwrap(), "latest", "only latest is a link");
            } else if m.is_dir() {
                todo.push(p);
            } else {
                assert_eq!(m.mode() & 0o7777, 0o600, "{p:?}");
                seen += 1;
            }
        }
    }
    assert!(
        seen >= 6,
        "profiles, image, digest, reverse diff, lock: {seen}"
    );
}

/// Back up `vm` from `disk` after writing a new 64 KiB of noise (seed `seed`) at its
/// start; the disk's bytes as backed up.
fn changed_backup(env: &Env, vm: &str, disk: &std::path::Path, seed: u64) -> (String, Vec<u8>) {
    write_at(disk, 0, &noise(seed, 65536));
    let out = env.backup(vm, disk, &[]);
    (out, std::fs::read(disk).unwrap())
}

#[test]
fn prune_after_backup_applies_the_schedule_in_the_same_run() {
    let env = Env::new();
    with_config(
        &env,
        "prune = \"after-backup\"\n[retention]\nkeep_last = 2\n",
    );
    let disk = env.disk("disk.raw", 1 << 20);
    let mut states = Vec::new();
    for seed in 1..=4 {
        let before = if seed == 1 {
            Vec::new()
        } else {
            env.generations("vm")
        };
        let (out, state) = changed_backup(&env, "vm", &disk, seed);
        states.push(state);
        let after = env.generations("vm");
        assert_eq!(after.len(), before.len().min(1) + 1, "{out}");
        if before.len() == 2 {
            assert!(
                out.contains(&format!("removed generation {}", before[0])),
                "{out}"
            );
        }
    }
    // The two newest remain, each as it was backed up.
    assert!(env.restored("vm", "0", Some("vda")) == states[3]);
    assert!(env.restored("vm", "1", Some("vda")) == states[2]);
    env.ok(&["check", "vm", "--deep"]);
    // JSON names what was pruned.
    write_at(&disk, 0, &noise(9, 65536));
    let spec = format!("vda={}", disk.display());
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "backup", "vm", "--disk", &spec])).unwrap();
    assert_eq!(
        json["vms"][0]["pruned"]["removed"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{json}"
    );
}

#[test]
fn prune_after_backup_is_per_vm_and_a_failed_backup_prunes_nothing() {
    let env = Env::new();
    let a = env.disk("a.raw", 1 << 20);
    let b = env.disk("b.raw", 1 << 20);
    for seed in 1..=3 {
        changed_backup(&env, "a", &a, seed);
        changed_backup(&env, "b", &b, seed + 10);
    }
    with_config(
        &env,
        "[retention]\nkeep_last = 1\n[vm.a]\nprune = \"after-backup\"\n",
    );
    // A backup that fails after it took the lock (the disk fills) removes nothing.
    let spec = format!("vda={}", a.display());
    let out = env.run_at(
        &env.repo(),
        &["backup", "a", "--disk", &spec],
        &[("VMKEEP_FAULT", "enospc:3")],
    );
    assert!(!out.status.success());
    assert_eq!(env.generations("a").len(), 3, "{}", stderr(&out));
    // A successful one prunes a, and only a.
    let (_, state) = changed_backup(&env, "a", &a, 7);
    changed_backup(&env, "b", &b, 17);
    assert_eq!(env.generations("a").len(), 1);
    assert_eq!(env.generations("b").len(), 4);
    assert!(env.restored("a", "0", Some("vda")) == state);
    env.ok(&["check", "a", "--deep"]);
    // A value other than the two is one error line.
    with_config(&env, "prune = \"sometimes\"\n");
    let e = env.fails(&["status"], 2);
    assert!(
        e.contains("no-config.toml:1") && e.contains("after-backup"),
        "{e}"
    );
}
