//! The command line as administrators and outside checks use it: generations, restores,
//! status, print (golden), and the documented exit codes and error lines.

mod common;

use common::*;

#[test]
fn generations_restore_and_status_json() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 8 << 20);
    write_at(&disk, 1 << 20, &noise(1, 2 << 20));
    write_at(&disk, 5 << 20, &text(512 << 10));
    env.backup("web1", &disk, &[]);
    let g0 = std::fs::read(&disk).unwrap();
    write_at(&disk, 3 << 20, &noise(2, 4096));
    env.backup("web1", &disk, &[]);
    let g1 = std::fs::read(&disk).unwrap();

    // The newest generation is a plain file anyone can read.
    assert!(std::fs::read(env.repo().join("web1/latest/vda.raw")).unwrap() == g1);

    env.ok(&[
        "restore",
        "web1",
        "--disk",
        "vda",
        "--to",
        env.path("r0").to_str().unwrap(),
    ]);
    env.ok(&[
        "restore",
        "web1",
        "--generation",
        "1",
        "--to",
        env.path("r1").to_str().unwrap(),
    ]);
    assert!(std::fs::read(env.path("r0")).unwrap() == g1);
    assert!(std::fs::read(env.path("r1")).unwrap() == g0);
    let ids = env.generations("web1");
    env.ok(&[
        "restore",
        "web1",
        "-g",
        &ids[0][..30],
        "--to",
        env.path("r2").to_str().unwrap(),
    ]);
    assert!(std::fs::read(env.path("r2")).unwrap() == g0);

    let js: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    let vm = &js["vms"][0];
    assert_eq!(vm["name"], "web1");
    let gens = vm["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 2);
    assert_eq!(gens[0]["id"], ids[1].as_str(), "newest first");
    assert_eq!(gens[0]["mode"], "diff");
    assert_eq!(gens[1]["mode"], "full");
    let d = &gens[0]["disks"][0];
    assert_eq!(d["name"], "vda");
    assert_eq!(d["size"], 8 << 20);
    assert_eq!(d["changed_bytes"], 65536);
    for key in ["read_bytes", "stored_bytes"] {
        assert!(d[key].as_u64().is_some(), "{key} missing");
    }
    assert!(gens[0]["time"].as_str().unwrap().ends_with('Z'));

    let table = env.ok(&["status", "web1"]);
    assert!(
        table.contains("VM web1") && table.contains(&ids[0]) && table.contains("diff"),
        "{table}"
    );
}

#[test]
fn diff_after_one_percent_change_stores_about_one_percent() {
    let env = Env::new();
    let size = 64u64 << 20;
    let disk = env.disk("disk.raw", size);
    write_at(&disk, 0, &noise(3, size as usize));
    env.backup("vm", &disk, &["--mode", "full"]);
    // 1% of the disk in scattered 4–64 KiB writes.
    let mut written = 0u64;
    let mut i = 0u64;
    while written < size / 100 {
        let len = 4096 * (1 + (i * 7) % 16);
        let off = (i * 2_654_435_761 % (size - len)) / 4096 * 4096;
        write_at(&disk, off, &noise(100 + i, len as usize));
        written += len;
        i += 1;
    }
    env.backup("vm", &disk, &["--mode", "diff"]);
    let js: serde_json::Value = serde_json::from_str(&env.ok(&["status", "vm", "--json"])).unwrap();
    let d = &js["vms"][0]["generations"][0]["disks"][0];
    let (read, changed, stored) = (
        d["read_bytes"].as_u64().unwrap(),
        d["changed_bytes"].as_u64().unwrap(),
        d["stored_bytes"].as_u64().unwrap(),
    );
    assert_eq!(read, size, "diff reads every allocated block");
    // Each scattered write dirties at most two 64 KiB blocks.
    assert!(
        changed <= i * 2 * 65536 && changed >= written,
        "changed {changed} for {written} written in {i} writes"
    );
    assert!(
        stored < size / 10,
        "stored {stored} of {size}: the diff must not store the disk"
    );
    assert!(
        stored <= changed + changed / 20 + 4096,
        "stored {stored} > changed {changed}"
    );
}

#[test]
fn incr_from_changed_block_list_reads_only_listed_blocks() {
    let (env, disk) = Env::one_noise_generation(16 << 20, 4);
    write_at(&disk, 4 << 20, &noise(5, 8192));
    write_at(&disk, 9 << 20, &noise(6, 100_000));
    std::fs::write(
        env.path("cbt.txt"),
        format!("{} 8192\n{} 100000\n", 4 << 20, 9 << 20),
    )
    .unwrap();
    let cbt = format!("vda={}", env.path("cbt.txt").display());
    env.backup("vm", &disk, &["--mode", "incr", "--changed-blocks", &cbt]);
    let js: serde_json::Value = serde_json::from_str(&env.ok(&["status", "vm", "--json"])).unwrap();
    let d = &js["vms"][0]["generations"][0]["disks"][0];
    assert_eq!(d["mode"], "incr");
    // 8 KiB in one 64 KiB block, 100000 bytes over two or three blocks.
    assert!(d["read_bytes"].as_u64().unwrap() <= 4 * 65536, "{d}");
    env.ok(&["restore", "vm", "--to", env.path("r").to_str().unwrap()]);
    assert!(std::fs::read(env.path("r")).unwrap() == std::fs::read(&disk).unwrap());

    // vSphere's QueryChangedDiskAreas JSON works the same way.
    write_at(&disk, 1 << 20, &noise(7, 4096));
    std::fs::write(
        env.path("cbt.json"),
        format!(
            r#"{{"changedArea": [{{"start": {}, "length": 4096}}]}}"#,
            1 << 20
        ),
    )
    .unwrap();
    let cbt = format!("vda={}", env.path("cbt.json").display());
    env.backup("vm", &disk, &["--mode", "incr", "--changed-blocks", &cbt]);
    env.ok(&["restore", "vm", "--to", env.path("r").to_str().unwrap()]);
    assert!(std::fs::read(env.path("r")).unwrap() == std::fs::read(&disk).unwrap());
}

/// Write `data` at `off` into a qcow2 image through QEMU (so its bitmaps see the write).
fn qemu_write(env: &Env, image: &std::path::Path, off: u64, data: &[u8]) {
    let src = env.path("qemu-io.bin");
    std::fs::write(&src, data).unwrap();
    let cmd = format!("write -s {} {off} {}", src.display(), data.len());
    let st = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &cmd])
        .arg(image)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

fn bitmaps_of(image: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn qcow2_bitmap_incrementals_read_only_what_was_written_since() {
    let env = Env::new();
    let raw = env.disk("src.raw", 8 << 20);
    write_at(&raw, 0, &noise(8, 3 << 20));
    let image = env.path("disk.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());
    let spec = format!("vda={}?bitmap=bm", image.display());
    // The first run reads everything and starts the bitmap.
    // Its bitmap is named after this repository and the newest generation.
    let own_bitmap = |env: &Env| {
        let repo = std::fs::read_to_string(env.repo().join("repo.toml")).unwrap();
        let id = repo.lines().find_map(|l| l.strip_prefix("id = ")).unwrap();
        let newest = env.generations("vm").pop().unwrap();
        vec![format!("bm.{}.{newest}", id.trim_matches('"'))]
    };
    env.ok(&["backup", "vm", "--disk", &spec]);
    assert_eq!(bitmaps_of(&image), own_bitmap(&env));
    let mut want = std::fs::read(&raw).unwrap();
    let disk_json = |env: &Env| -> serde_json::Value {
        let js: serde_json::Value =
            serde_json::from_str(&env.ok(&["status", "vm", "--json"])).unwrap();
        js["vms"][0]["generations"][0]["disks"][0].clone()
    };
    // Each later run reads only the clusters written since the run before.
    // (offset, length, 64 KiB blocks it touches)
    for (round, (off, len, blocks)) in [(5u64 << 20, 70_000usize, 2u64), (1 << 20, 4096, 1)]
        .into_iter()
        .enumerate()
    {
        let data = noise(20 + round as u64, len);
        qemu_write(&env, &image, off, &data);
        want[off as usize..off as usize + len].copy_from_slice(&data);
        env.ok(&["backup", "vm", "--disk", &spec, "--mode", "incr"]);
        let d = disk_json(&env);
        assert_eq!(d["mode"], "incr", "round {round}: {d}");
        assert_eq!(d["read_bytes"], blocks * 65536, "round {round}: {d}");
        assert_eq!(bitmaps_of(&image), own_bitmap(&env), "round {round}");
        let out = env.path("r.raw");
        env.ok(&["restore", "vm", "--to", out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == want, "round {round}");
    }
    env.ok(&["check", "vm", "--deep"]);
}

#[test]
fn block_size_is_chosen_at_the_first_backup() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    env.backup("vm", &disk, &["--block-size", "16K"]);
    let vm = std::fs::read_to_string(env.repo().join("vm/vm.toml")).unwrap();
    assert!(vm.contains("block_size = 16384"), "{vm}");
    env.backup("vm", &disk, &[]);
    let spec = format!("vda={}", disk.display());
    let err = env.fails(&["backup", "vm", "--disk", &spec, "--block-size", "64K"], 2);
    assert!(err.contains("first backup"), "{err}");
    let err = env.fails(
        &["backup", "other", "--disk", &spec, "--block-size", "3000"],
        2,
    );
    assert!(err.contains("power of two"), "{err}");
}

#[test]
fn bad_input_gets_one_clear_line_and_its_exit_code() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    env.backup("vm", &disk, &[]);
    let spec = format!("vda={}", disk.display());
    let one_line = |s: &str| {
        assert_eq!(
            s.trim_end().lines().count(),
            1,
            "expected one line, got: {s}"
        );
        assert!(s.starts_with("vmkeep: error: "), "{s}");
    };

    let e = env.fails(&["restore", "nosuch", "--to", "/tmp/x"], 2);
    one_line(&e);
    assert!(e.contains("unknown VM") && e.contains("nosuch"), "{e}");

    let e = env.fails(&["restore", "vm", "--generation", "7", "--to", "/tmp/x"], 2);
    one_line(&e);
    assert!(e.contains("generation"), "{e}");
    let e = env.fails(
        &[
            "restore",
            "vm",
            "--generation",
            "ffffffff",
            "--to",
            "/tmp/x",
        ],
        2,
    );
    assert!(e.contains("unknown generation"), "{e}");

    let e = env.fails(&["backup", "vm", "--disk", "vda=/nonexistent/disk.raw"], 1);
    one_line(&e);
    assert!(e.contains("/nonexistent/disk.raw"), "{e}");

    let unreadable = env.path("dir-as-disk");
    std::fs::create_dir(&unreadable).unwrap();
    let e = env.fails(
        &[
            "backup",
            "vm",
            "--disk",
            &format!("vda={}", unreadable.display()),
        ],
        1,
    );
    assert!(e.contains("directory"), "{e}");

    for bad_vm in ["", "a/b", ".hidden", "..", "../escape"] {
        let e = env.fails(&["backup", bad_vm, "--disk", &spec], 2);
        one_line(&e);
        assert!(e.contains("invalid VM name"), "{bad_vm:?}: {e}");
    }
    for bad_disk in ["", "a/b", ".x"] {
        let e = env.fails(
            &[
                "backup",
                "vm2",
                "--disk",
                &format!("{bad_disk}={}", disk.display()),
            ],
            2,
        );
        one_line(&e);
        assert!(e.contains("invalid disk name"), "{bad_disk:?}: {e}");
    }
    assert!(!env.repo().join("vm2/vm.toml").exists());

    let not_repo = tempfile::tempdir().unwrap();
    let mut c = assert_cmd::Command::cargo_bin("vmkeep").unwrap();
    let out = c
        .env("VMKEEP_CONFIG", env.path("no-config.toml"))
        .args(["--repo", not_repo.path().to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a vmkeep repository"));

    let e = env.fails(&["restore", "vm", "--disk", "vdz", "--to", "/tmp/x"], 2);
    assert!(e.contains("no disk") && e.contains("vdz"), "{e}");

    // Usage errors from the parser are exit 2 as well.
    env.fails(&["backup", "--mode"], 2);
    env.fails(&["frobnicate"], 2);
    let e = env.fails(&["backup", "vm", "--disk", &spec, "--mode", "sideways"], 2);
    // clap names the flag and lists the values (`--mode` is a value enum).
    assert!(
        e.contains("invalid value 'sideways' for '--mode <MODE>'")
            && e.contains("[possible values: auto, full, diff, incr]"),
        "{e}"
    );
}

#[test]
fn busy_vm_names_the_holder() {
    use std::os::unix::io::AsRawFd;
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    env.backup("vm", &disk, &[]);
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.repo().join("vm/lock"))
        .unwrap();
    assert_eq!(
        // SAFETY: flock on a descriptor we own (`lock` is open for the whole call); it
        // takes no pointers.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    std::fs::write(env.repo().join("vm/lock"), "pid 4242 (backup)").unwrap();
    let e = env.fails(
        &["backup", "vm", "--disk", &format!("vda={}", disk.display())],
        1,
    );
    assert!(e.contains("busy") && e.contains("4242"), "{e}");
    drop(lock);
    env.backup("vm", &disk, &[]);
}

#[test]
fn init_is_idempotent_and_refuses_foreign_folders() {
    let env = Env::new();
    env.ok(&["init"]);
    let id1 = std::fs::read_to_string(env.repo().join("repo.toml")).unwrap();
    env.ok(&["init"]);
    assert_eq!(
        id1,
        std::fs::read_to_string(env.repo().join("repo.toml")).unwrap()
    );
    let other = env.path("full");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("precious"), "x").unwrap();
    let mut c = assert_cmd::Command::cargo_bin("vmkeep").unwrap();
    let out = c
        .env("VMKEEP_CONFIG", env.path("no-config.toml"))
        .args(["--repo", other.to_str().unwrap(), "init"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Replace what varies between runs (ids, times, temp paths) with placeholders.
fn normalize(text: &str, env: &Env, ids: &[String]) -> String {
    let mut t = text.replace(env.dir.path().to_str().unwrap(), "<tmp>");
    for (i, id) in ids.iter().enumerate() {
        t = t.replace(id.as_str(), &format!("<gen{i}>"));
    }
    let repo_id = std::fs::read_to_string(env.repo().join("repo.toml")).unwrap();
    let repo_id = repo_id
        .lines()
        .find(|l| l.starts_with("id = "))
        .unwrap()
        .trim_start_matches("id = ")
        .trim_matches('"')
        .to_string();
    t = t.replace(&repo_id, "<repo-id>");
    t.lines()
        .map(|l| {
            let key = l.trim_start().split(" = ").next().unwrap_or("");
            if [
                "time",
                "created",
                "duration_secs",
                "file_device",
                "file_inode",
            ]
            .contains(&key)
            {
                format!("{} = <{key}>", l.split(" = ").next().unwrap())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing golden file {}; run with UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "print output of {name} changed; if intended, run with UPDATE_GOLDEN=1"
    );
}

#[test]
fn print_output_is_pinned_for_every_file_kind() {
    let env = Env::new();
    let disk = env.disk("disk.raw", 64 << 10);
    write_at(&disk, 4096, &text(8192));
    write_at(&disk, 40 << 10, &noise(9, 4096));
    env.backup("vm", &disk, &["--block-size", "4K"]);
    write_at(&disk, 4096, &noise(10, 4096));
    write_at(&disk, 40 << 10, &[0u8; 4096]);
    env.backup("vm", &disk, &[]);
    let ids = env.generations("vm");
    let files = [
        ("digest.txt", format!("vm/{}/vda.digest", ids[1])),
        ("rdiff.txt", format!("vm/{}/vda.rdiff", ids[0])),
        ("generation.txt", format!("vm/{}/generation.toml", ids[1])),
        ("vm.txt", "vm/vm.toml".to_string()),
        ("repo.txt", "repo.toml".to_string()),
    ];
    for (golden_name, rel) in files {
        let out = env.ok(&["print", env.repo().join(rel).to_str().unwrap()]);
        golden(golden_name, &normalize(&out, &env, &ids));
    }
    let e = env.fails(&["print", disk.to_str().unwrap()], 2);
    assert!(e.contains("not a vmkeep archive file"), "{e}");
}

#[test]
fn probed_image_with_a_backing_file_is_refused_unless_the_format_is_given() {
    // A guest that owns a raw image file could write a qcow2 header into it naming a host
    // file as backing file; vmkeep must not follow that on its own.
    let env = Env::new();
    let base = env.path("secret.raw");
    std::fs::write(&base, b"host secret").unwrap();
    let top = env.path("guest.img");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top)
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let e = env.fails(
        &["backup", "vm", "--disk", &format!("vda={}", top.display())],
        2,
    );
    assert!(
        e.contains("backing file") && e.contains("?format=qcow2"),
        "{e}"
    );
    // A persistent bitmap asked for does not make the probe trustworthy either.
    let e = env.fails(
        &[
            "backup",
            "vm",
            "--disk",
            &format!("vda={}?bitmap=bm", top.display()),
        ],
        2,
    );
    assert!(e.contains("backing file"), "{e}");
    assert!(!env.repo().join("vm/vm.toml").exists());
    env.ok(&[
        "backup",
        "vm",
        "--disk",
        &format!("vda={}?format=qcow2", top.display()),
    ]);
}
