//! Many VMs in one run: `backup --all / --group / VM… --jobs N` over image VMs of the
//! config file (every generation restores to its source's bytes, one broken source fails
//! alone, the summary and JSON follow the list order, `--if-due` and prune-after-backup
//! per VM, SIGINT and SIGTERM under `--jobs 3`), and the `connect` keys: precedence,
//! malformed values, and a libvirt host that does not answer.

mod common;

use common::*;

fn with_config(env: &Env, text: &str) {
    std::fs::write(env.path("no-config.toml"), text).unwrap();
}

/// `[vm.NAME] disks = { vda = "…" }` for each (name, disk).
fn image_vms(vms: &[(&str, &std::path::Path)]) -> String {
    vms.iter()
        .map(|(n, d)| format!("[vm.{n}]\ndisks = {{ vda = \"{}\" }}\n", d.display()))
        .collect()
}

/// Image VMs `names`, each with a `size`-byte disk of noise (seed: its position).
fn noisy_vms(env: &Env, names: &[&str], size: u64) -> Vec<std::path::PathBuf> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let d = env.disk(&format!("{n}.raw"), size);
            write_at(&d, 0, &noise(i as u64 + 1, size as usize));
            d
        })
        .collect()
}

/// [`noisy_vms`] and their `[vm.NAME]` tables.
fn noisy_config(env: &Env, names: &[&str], size: u64) -> (Vec<std::path::PathBuf>, String) {
    let disks = noisy_vms(env, names, size);
    let vms: Vec<(&str, &std::path::Path)> = names
        .iter()
        .zip(&disks)
        .map(|(n, d)| (*n, d.as_path()))
        .collect();
    let text = image_vms(&vms);
    (disks, text)
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

fn names_in(js: &serde_json::Value) -> Vec<String> {
    js["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn jobs_3_backs_up_every_vm_and_a_broken_source_fails_alone() {
    let env = Env::new();
    // Config order is name order (a table); "c" has a source that does not exist.
    let names = ["a", "b", "d", "e", "f"];
    let disks = noisy_vms(&env, &names, 3 << 20);
    let missing = env.path("gone.raw");
    let mut vms: Vec<(&str, &std::path::Path)> = names
        .iter()
        .zip(&disks)
        .map(|(n, d)| (*n, d.as_path()))
        .collect();
    vms.insert(2, ("c", missing.as_path()));
    with_config(&env, &format!("jobs = 3\n{}", image_vms(&vms)));

    let out = env.run(&["--json", "backup", "--all"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let js = json_of(&out);
    assert_eq!(
        names_in(&js),
        ["a", "b", "c", "d", "e", "f"],
        "list order: {js}"
    );
    for v in js["vms"].as_array().unwrap() {
        let ok = v["name"] != "c";
        assert_eq!(v["ok"], ok, "{v}");
        if ok {
            assert!(v["generation"]["id"].is_string(), "{v}");
        } else {
            assert!(v["error"].as_str().unwrap().contains("gone.raw"), "{v}");
            assert!(v.get("generation").is_none(), "{v}");
        }
    }
    let err = stderr(&out);
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "{err}"
    );
    assert!(err.contains("VM c"), "{err}");

    // A second generation of each after a change; text summaries in list order.
    let mut states = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        states.push(std::fs::read(d).unwrap());
        write_at(d, (i as u64) << 16, &noise(100 + i as u64, 1 << 16));
    }
    let vm_flags: Vec<&str> = names.to_vec();
    // --mode incr on raw files: every VM warns that it reads all (diff), on a line of its
    // own that names it.
    let mut args = vec!["backup", "--jobs", "3", "--mode", "incr"];
    args.extend(&vm_flags);
    let out = env.run(&args);
    let err = succeeded(&out, "second run: ");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut warned: Vec<&str> = err
        .lines()
        .map(|l| {
            let rest = l
                .strip_prefix("vmkeep: warning: ")
                .unwrap_or_else(|| panic!("{err}"));
            let (vm, what) = rest.split_once(": ").unwrap();
            assert!(
                what.starts_with("disk vda: incr not possible") && what.ends_with("(diff)"),
                "a whole line: {err}"
            );
            vm
        })
        .collect();
    warned.sort();
    assert_eq!(warned, names, "{err}");
    let order: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.split(": generation ")
                .next()
                .filter(|_| l.contains(": generation "))
        })
        .collect();
    assert_eq!(order, names, "{text}");
    for (i, n) in names.iter().enumerate() {
        let ids = env.generations(n);
        assert_eq!(ids.len(), 2, "{n}");
        assert!(
            env.restored(n, "1", Some("vda")) == states[i],
            "{n}: older generation"
        );
        assert!(
            env.restored(n, "0", Some("vda")) == std::fs::read(&disks[i]).unwrap(),
            "{n}: newest generation"
        );
    }
    env.ok(&["check", "--all", "--deep"]);
}

#[test]
fn group_and_if_due_and_prune_after_backup_hold_per_vm_under_jobs() {
    let env = Env::new();
    let names = ["p", "q", "r", "s"];
    let (disks, vms) = noisy_config(&env, &names, 1 << 20);
    let base = format!(
        "prune = \"after-backup\"\n[retention]\nkeep_last = 1\n[groups]\ng = [\"s\", \"q\", \"p\"]\n{vms}"
    );
    with_config(&env, &base);
    // --group keeps the group's order; r is not in it; q named twice runs once.
    let js = json_of(&env.run(&["--json", "backup", "q", "--group", "g", "--jobs", "3"]));
    assert_eq!(names_in(&js), ["q", "s", "p"], "{js}");
    assert!(
        js["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["ok"] == true),
        "{js}"
    );
    assert!(!env.repo().join("r").exists());
    for (i, d) in disks.iter().enumerate() {
        write_at(d, 0, &noise(50 + i as u64, 4096));
    }
    // q's interval is long: --if-due skips it alone.
    with_config(
        &env,
        &base.replace("[vm.q]\n", "[vm.q]\ninterval = \"1w\"\n"),
    );
    let js = json_of(&env.run(&["--json", "backup", "--all", "--jobs", "3", "--if-due"]));
    assert_eq!(names_in(&js), ["p", "r", "s"], "{js}");
    for v in js["vms"].as_array().unwrap() {
        assert_eq!(v["ok"], true, "{v}");
        if v["name"] != "r" {
            assert_eq!(v["pruned"]["removed"].as_array().unwrap().len(), 1, "{v}");
        }
    }
    for (i, n) in names.iter().enumerate() {
        let ids = env.generations(n);
        assert_eq!(ids.len(), 1, "{n}: keep_last = 1");
        if *n != "q" {
            assert!(env.restored(n, "0", Some("vda")) == std::fs::read(&disks[i]).unwrap());
        }
    }
}

#[test]
fn jobs_flag_and_key_are_checked() {
    let env = Env::new();
    let e = env.fails(&["backup", "--all", "--jobs", "0"], 2);
    assert!(e.contains("--jobs"), "{e}");
    with_config(&env, "jobs = 0\n");
    let e = env.fails(&["status"], 2);
    assert!(e.contains("no-config.toml") && e.contains("jobs"), "{e}");
}

#[cfg(unix)]
#[test]
fn a_signal_stops_every_job_and_the_next_run_recovers() {
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let env = Env::new();
        let names = ["w", "x", "y", "z"];
        let (disks, vms) = noisy_config(&env, &names, 48 << 20);
        with_config(&env, &vms);
        // A first generation of each, so that the interrupted run has undo journals.
        env.ok(&["backup", "--all", "--jobs", "3"]);
        let before: Vec<Vec<u8>> = disks.iter().map(|d| std::fs::read(d).unwrap()).collect();
        for (i, d) in disks.iter().enumerate() {
            write_at(d, 0, &noise(77 + i as u64, 40 << 20));
        }
        let mut child = Proc(
            env.std_cmd(&["backup", "--all", "--jobs", "3"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // Stop it once at least two jobs are writing.
        wait_until(60, "two jobs running", || {
            names
                .iter()
                .filter(|n| env.repo().join(n).join("txn.toml").exists())
                .count()
                >= 2
        });
        // SAFETY: the child is ours and still running.
        unsafe { libc::kill(child.0.id() as i32, sig) };
        let status = child.0.wait().unwrap();
        assert_eq!(status.code(), Some(1), "{name}");
        let mut err = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(err.contains("interrupted"), "{name}: {err}");
        // The repository still holds the first generation of every VM.
        for (i, n) in names.iter().enumerate() {
            let ids = env.generations(n);
            assert!(!ids.is_empty(), "{name}: {n}");
            assert!(
                env.restored(n, &ids[0], Some("vda")) == before[i],
                "{name}: {n}: first generation"
            );
        }
        // The next run recovers and finishes, with no human.
        env.ok(&["backup", "--all", "--jobs", "3"]);
        for (i, n) in names.iter().enumerate() {
            assert!(
                env.restored(n, "0", Some("vda")) == std::fs::read(&disks[i]).unwrap(),
                "{name}: {n}: newest generation"
            );
            assert!(!env.repo().join(n).join("txn.toml").exists());
        }
        env.ok(&["check", "--all"]);
    }
}

#[test]
fn malformed_connect_is_one_clear_line() {
    let env = Env::new();
    for (text, line) in [
        ("connect = \"qemu:/system\"\n", None),
        (
            "[vm.web1]\nconnect = \"qemu+ssh://host\"\n",
            Some("vm web1"),
        ),
        (
            "[groups.g]\nvms = [\"a\"]\nconnect = \"qemu ssh://h/system\"\n",
            Some("group g"),
        ),
    ] {
        with_config(&env, text);
        let e = env.fails(&["status"], 2);
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(e.contains("no-config.toml") && e.contains("connect"), "{e}");
        if let Some(l) = line {
            assert!(e.contains(l), "{e}");
        }
    }
    with_config(&env, "");
    let e = env.fails(&["backup", "x", "--connect", "system"], 2);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains("connect \"system\""), "{e}");
    // A VM in two groups that connect to different hosts, without a connect of its own.
    with_config(
        &env,
        "[groups.g1]\nvms = [\"a\"]\nconnect = \"qemu+ssh://h1/system\"\n[groups.g2]\nvms = [\"a\"]\nconnect = \"qemu+ssh://h2/system\"\n",
    );
    let e = env.fails(&["status"], 2);
    assert!(e.contains("vm a is in groups g1 and g2"), "{e}");
    with_config(
        &env,
        "[groups.g1]\nvms = [\"a\"]\nconnect = \"qemu+ssh://h1/system\"\n[groups.g2]\nvms = [\"a\"]\nconnect = \"qemu+ssh://h2/system\"\n[vm.a]\nconnect = \"qemu:///system\"\n",
    );
    env.ok(&["status"]);
}

/// A host that does not answer fails the VMs the config puts on it, with one warning;
/// the other VMs are backed up.
#[cfg(feature = "libvirt")]
#[test]
fn a_host_that_does_not_answer_fails_only_its_vms() {
    let env = Env::new();
    let disks = noisy_vms(&env, &["img1", "img2"], 1 << 20);
    // Nothing listens on port 1: libvirt's TCP transport is refused at once.
    let dead = "qemu+tcp://127.0.0.1:1/system";
    with_config(
        &env,
        &format!(
            "jobs = 2\n{}[vm.ghost]\nconnect = \"{dead}\"\n[groups.far]\nvms = [\"ghost2\"]\nconnect = \"{dead}\"\n",
            image_vms(&[("img1", &disks[0]), ("img2", &disks[1])])
        ),
    );
    let out = env.run(&["--json", "backup", "--all"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let js = json_of(&out);
    assert_eq!(names_in(&js), ["img1", "img2", "ghost", "ghost2"], "{js}");
    let oks: Vec<bool> = js["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["ok"].as_bool().unwrap())
        .collect();
    assert_eq!(oks, [true, true, false, false], "{js}");
    for v in &js["vms"].as_array().unwrap()[2..] {
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("did not answer") && e.contains("127.0.0.1:1"),
            "{e}"
        );
    }
    let err = stderr(&out);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "one line for the host: {err}");
    assert!(warnings[0].contains("127.0.0.1:1"), "{err}");
    for (i, n) in ["img1", "img2"].iter().enumerate() {
        assert!(env.restored(n, "0", Some("vda")) == std::fs::read(&disks[i]).unwrap());
    }
    // A single VM on the dead host: its own error, exit 1.
    let e = env.fails(&["backup", "ghost"], 1);
    assert!(e.contains("127.0.0.1:1"), "{e}");
    // `checkpoints` asks the VM's host too; a group member its group's.
    let e = env.fails(&["checkpoints", "ghost"], 1);
    assert!(e.contains("127.0.0.1:1"), "{e}");
    let e = env.fails(&["checkpoints", "ghost2"], 1);
    assert!(e.contains("127.0.0.1:1"), "{e}");
    // --connect overrides the VM's connect.
    let other = [
        "backup",
        "ghost",
        "--connect",
        "qemu+tcp://127.0.0.1:2/system",
    ];
    let e = env.fails(&other, 1);
    assert!(e.contains("127.0.0.1:2"), "{e}");
}
