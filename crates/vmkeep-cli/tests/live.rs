//! Live backups of libvirt domains through the real binary, against a real libvirtd and
//! QEMU (started by the harness when none runs): full then incremental from checkpoints,
//! lost checkpoints, added disks, shut-off domains, failures of the backup job, restore as
//! a new VM, and two repositories keeping independent checkpoint chains of one VM.

#![cfg(feature = "libvirt")]

mod common;
#[path = "../../vmkeep/tests/support/garage.rs"]
#[allow(dead_code)]
mod garage;
#[path = "../../vmkeep/tests/support/libvirt.rs"]
#[allow(dead_code)]
mod lv;

use common::*;
use lv::{virsh, TestVm};

/// Tests share libvirtd; the one that restarts it runs alone.
static LIBVIRTD: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    LIBVIRTD.read().unwrap_or_else(|e| e.into_inner())
}

/// (mode, read_bytes) of disk `disk` in the newest generation.
fn newest(env: &Env, vm: &str, disk: &str) -> (String, u64) {
    let d = env.newest_disk(vm, disk);
    (
        d["mode"].as_str().unwrap().to_string(),
        d["read_bytes"].as_u64().unwrap(),
    )
}

/// The mode disk vda of the newest generation of `vm` was backed up in.
fn newest_mode(env: &Env, vm: &TestVm) -> String {
    newest(env, &vm.name, "vda").0
}

/// Back up `vm` into `env`; the mode and read bytes of its disk vda.
fn backup(env: &Env, vm: &TestVm) -> (String, u64) {
    env.ok(&["backup", &vm.name]);
    newest(env, &vm.name, "vda")
}

/// Back up `vm` into `env`, requiring success; the run's stderr.
fn backup_says(env: &Env, vm: &TestVm) -> String {
    // These guests have no agent: without `--quiesce off` each run would also say that it
    // is crash-consistent (tested on its own), and the lines counted here are the others.
    succeeded(&env.run(&["backup", &vm.name, "--quiesce", "off"]), "")
}

/// The disk as the guest sees it now (QEMU's caches flushed to the file first).
fn disk_now(vm: &TestVm, target: &str) -> Vec<u8> {
    if lv::virsh(&["domstate", &vm.name]).contains("running") {
        vm.flush(vm.disks.iter().position(|d| d.target == target).unwrap());
    }
    let d = vm.disk(target);
    lv::read_all(d.path.to_str().unwrap(), d.format, &vm.path("now.raw"))
}

/// A running one-disk domain (`disk`: name, format, MiB) with `len` bytes of 0x11
/// written at its start, in a live environment of its own, and its first generation.
fn backed_up_with(tag: &str, disk: (&'static str, &'static str, u64), len: &str) -> (TestVm, Env) {
    let vm = TestVm::start(tag, &[disk]);
    let env = Env::live();
    vm.guest_write(0, 0x11, "0", len);
    env.ok(&["backup", &vm.name]);
    (vm, env)
}

/// A running one-disk domain with 1 MiB written, and its first generation.
fn backed_up(tag: &str) -> (TestVm, Env) {
    backed_up_with(tag, ("vda", "qcow2", 32), "1M")
}

/// The newest image of `target` equals the domain's disk now.
fn assert_latest_is_disk(env: &Env, vm: &TestVm, target: &str) {
    assert!(
        env.latest(&vm.name, target) == disk_now(vm, target),
        "latest/{target}.raw differs from the disk"
    );
}

/// Generation `rev` of disk `disk` of `vm`, restored to a file.
fn restored(env: &Env, vm: &str, rev: &str, disk: &str) -> Vec<u8> {
    env.restored(vm, rev, Some(disk))
}

fn checkpoints(vm: &str) -> Vec<String> {
    virsh(&["checkpoint-list", vm, "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// No socket or scratch file is left in `env`'s live-backup folders.
fn assert_no_leftovers(env: &Env) {
    for d in ["run", "scratch"] {
        let left: Vec<_> = std::fs::read_dir(env.path(d)).unwrap().collect();
        assert!(left.is_empty(), "{d}: {left:?}");
    }
}

/// No backup job of `vm` is running.
fn assert_no_backup_job(vm: &TestVm) {
    assert!(!virsh(&["domjobinfo", &vm.name]).contains("Backup"));
}

/// `qemu-img info -U` of an image.
fn image_info(image: &std::path::Path) -> String {
    lv::run(
        std::process::Command::new("qemu-img")
            .args(["info", "-U"])
            .arg(image),
    )
}

/// Back up `vm` twice: after `len` bytes of 0x11 at `at`, then after 64 KiB of 0x22
/// there. The disk as the older generation (`-g 1`) holds it.
fn two_generations(env: &Env, vm: &TestVm, at: &str, len: &str) -> Vec<u8> {
    vm.guest_write(0, 0x11, at, len);
    env.ok(&["backup", &vm.name]);
    let gen0 = disk_now(vm, "vda");
    vm.guest_write(0, 0x22, at, "64k");
    env.ok(&["backup", &vm.name]);
    gen0
}

/// Disk vda of the newest generation was backed up in `mode`, and its newest image is
/// the disk now.
fn assert_newest(env: &Env, vm: &TestVm, mode: &str) {
    assert_eq!(newest_mode(env, vm), mode);
    assert_latest_is_disk(env, vm, "vda");
}

/// Two live environments (repositories A and B) with one run folder and one scratch
/// folder for both (A's), as with the defaults.
fn sharing_folders() -> (Env, Env) {
    let a = Env::live();
    let b = Env::live();
    b.live_folders(&a.path("run"), &a.path("scratch"));
    a.live_folders(&a.path("run"), &a.path("scratch"));
    (a, b)
}

#[test]
fn full_then_incremental_from_guest_writes() {
    let _shared = shared();
    let vm = TestVm::start("incr", &[("vda", "qcow2", 64)]);
    let env = Env::live();
    vm.guest_write(0, 0x11, "1M", "4M");
    env.ok(&["backup", &vm.name]);
    assert_newest(&env, &vm, "full");
    let gen0 = disk_now(&vm, "vda");

    vm.guest_write(0, 0x22, "8M", "1M");
    vm.guest_write(0, 0x33, "20M", "64k");
    let (mode, read) = backup(&env, &vm);
    assert_eq!(mode, "incr");
    assert!(
        read <= (1 << 20) + 65536,
        "incr read {read} bytes for 1 MiB + 64 KiB written"
    );
    assert!(
        read >= (1 << 20) + 65536,
        "incr read {read}: less than was written"
    );
    assert_latest_is_disk(&env, &vm, "vda");
    assert!(restored(&env, &vm.name, "1", "vda") == gen0);
    // The saved XML, and only the newest checkpoint of this repository is kept.
    assert!(
        std::fs::read_to_string(env.repo().join(&vm.name).join("latest/domain.xml"))
            .unwrap()
            .contains(&vm.name)
    );
    let cps = checkpoints(&vm.name);
    assert_eq!(cps.len(), 1, "{cps:?}");
    let ids = env.generations(&vm.name);
    assert!(cps[0].ends_with(&ids[1]), "{cps:?} vs {ids:?}");
    env.ok(&["check", &vm.name, "--deep"]);
    // No socket or scratch file is left.
    assert_no_leftovers(&env);
}

#[test]
fn update_records_the_inventory() {
    let _shared = shared();
    let vm = TestVm::start("inventory", &[("vda", "qcow2", 16), ("vdb", "raw", 8)]);
    let env = Env::live();
    let out = env.ok(&["update"]);
    assert!(out.contains(&vm.name), "{out}");
    let text = std::fs::read_to_string(env.repo().join("allvm.toml")).unwrap();
    assert!(text.contains(&format!("name = \"{}\"", vm.name)), "{text}");
    assert!(
        text.contains("format = \"qcow2\"") && text.contains("format = \"raw\""),
        "{text}"
    );
    assert!(
        text.contains(vm.disk("vdb").path.to_str().unwrap()),
        "{text}"
    );
    assert!(env
        .ok(&["print", env.repo().join("allvm.toml").to_str().unwrap()])
        .contains("checksum: ok"));
}

#[test]
fn lost_checkpoint_means_diff_not_a_second_full_copy() {
    let _shared = shared();
    let (vm, env) = backed_up_with("lost", ("vda", "qcow2", 64), "8M");
    for cp in checkpoints(&vm.name) {
        virsh(&["checkpoint-delete", &vm.name, &cp]);
    }
    vm.guest_write(0, 0x44, "2M", "64k");
    let err = backup_says(&env, &vm);
    assert!(err.contains("is gone"), "{err}");
    let (mode, read) = newest(&env, &vm.name, "vda");
    assert_eq!(mode, "diff");
    assert!(read >= 8 << 20, "a diff reads every allocated block");
    let stored = env.newest_disk(&vm.name, "vda")["stored_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        stored < 1 << 20,
        "diff stored {stored}: only the change, not a second copy"
    );
    assert_latest_is_disk(&env, &vm, "vda");
    vm.guest_write(0, 0x55, "3M", "64k");
    assert_eq!(backup(&env, &vm).0, "incr", "a fresh chain started");
    assert_latest_is_disk(&env, &vm, "vda");
}

#[test]
fn a_disk_added_after_the_first_generation() {
    let _shared = shared();
    let (vm, env) = backed_up("two");
    let vdb = vm.path("vdb.qcow2");
    lv::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&vdb)
            .arg("16M"),
    );
    // TCG's pc machine has no PCI hotplug here: add the disk to the definition and restart
    // (gracefully, so QEMU saves vda's bitmap and the next run stays incremental).
    virsh(&[
        "attach-disk",
        &vm.name,
        vdb.to_str().unwrap(),
        "vdb",
        "--driver",
        "qemu",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
        "--config",
    ]);
    virsh(&["destroy", &vm.name, "--graceful"]);
    virsh(&["start", &vm.name]);
    // (vdb is not one of the disks the test VM was made with.)
    let assert_latest_is_vdb = || {
        vm.flush(1);
        let vdb_now = lv::read_all(vdb.to_str().unwrap(), "qcow2", &vm.path("b.raw"));
        assert!(
            env.latest(&vm.name, "vdb") == vdb_now,
            "latest/vdb.raw differs from the disk"
        );
    };
    vm.guest_write(1, 0x66, "1M", "1M");
    vm.guest_write(0, 0x22, "2M", "64k");
    assert_eq!(backup(&env, &vm).0, "incr");
    assert_eq!(newest(&env, &vm.name, "vdb").0, "full");
    assert_latest_is_vdb();
    vm.guest_write(1, 0x77, "3M", "64k");
    env.ok(&["backup", &vm.name]);
    assert_eq!(newest(&env, &vm.name, "vdb").0, "incr");
    assert_latest_is_vdb();
    // The first generation has no vdb.
    let e = env.fails(
        &[
            "restore", &vm.name, "-g", "2", "--disk", "vdb", "--to", "/tmp/x",
        ],
        2,
    );
    assert!(e.contains("no disk"), "{e}");
    env.ok(&["check", &vm.name, "--deep"]);
}

#[test]
fn shut_off_domain_is_read_from_its_files() {
    let _shared = shared();
    let (vm, env) = backed_up_with("off", ("vda", "qcow2", 32), "2M");
    vm.guest_write(0, 0x22, "4M", "64k");
    virsh(&["shutdown", &vm.name]);
    // A guest without an OS ignores ACPI: stop it the hard way, but let QEMU save bitmaps.
    virsh(&["destroy", &vm.name, "--graceful"]);
    env.ok(&["backup", &vm.name, "--offline-read", "files"]);
    let (mode, read) = newest(&env, &vm.name, "vda");
    // QEMU saved the checkpoint's bitmap when it stopped: qemu-nbd exports it.
    assert_eq!(mode, "incr");
    assert_eq!(read, 65536);
    assert_latest_is_disk(&env, &vm, "vda");
    env.ok(&["check", &vm.name, "--deep"]);
}

/// The domain's state as `virsh domstate` says it ("shut off", "running", "paused").
fn domstate(vm: &TestVm) -> String {
    virsh(&["domstate", &vm.name]).trim().to_string()
}

/// vmkeep's checkpoints of `vm`.
fn vmkeep_checkpoints(vm: &TestVm) -> Vec<String> {
    checkpoints(&vm.name)
        .into_iter()
        .filter(|c| c.starts_with("vmkeep."))
        .collect()
}

/// A shut-off domain is started paused, backed up through a pull job with a checkpoint,
/// and shut off again; so the next run of the shut-off domain is incremental and reads
/// only what the guest wrote in between.
#[test]
fn a_shut_off_domain_is_started_paused_and_backed_up_incrementally() {
    let _shared = shared();
    let vm = TestVm::define("offincr", &[("vda", "qcow2", 32)], "");
    lv::run(
        std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x11 0 2M"])
            .arg(&vm.disk("vda").path),
    );
    let env = Env::live();
    assert_eq!(backup(&env, &vm).0, "full");
    assert_eq!(domstate(&vm), "shut off", "shut off again after the backup");
    assert_eq!(
        vmkeep_checkpoints(&vm).len(),
        1,
        "the run made a checkpoint"
    );
    assert_latest_is_disk(&env, &vm, "vda");
    // The guest runs for a while, writes, and is shut off (its bitmaps saved).
    virsh(&["start", &vm.name]);
    vm.guest_write(0, 0x22, "4M", "64k");
    virsh(&["destroy", &vm.name, "--graceful"]);
    assert_eq!(
        backup(&env, &vm),
        ("incr".to_string(), 65536),
        "incremental, reading only what was written"
    );
    assert_eq!(domstate(&vm), "shut off");
    assert_latest_is_disk(&env, &vm, "vda");
    let cps = vmkeep_checkpoints(&vm);
    assert_eq!(cps.len(), 1, "only the newest checkpoint is kept: {cps:?}");
    assert!(cps[0].ends_with(&newest_id(&env, &vm.name)), "{cps:?}");
    // Shut off throughout: a third run reads nothing and is still incremental.
    assert_eq!(backup(&env, &vm), ("incr".to_string(), 0));
    assert_eq!(domstate(&vm), "shut off");
    env.ok(&["check", &vm.name, "--deep"]);
    assert_no_leftovers(&env);
    // Every generation restores to the disk it was.
    let mut gen0 = vec![0u8; 32 << 20];
    gen0[..2 << 20].fill(0x11);
    assert!(restored(&env, &vm.name, "2", "vda") == gen0, "generation 2");
}

/// A domain saved with `virsh managedsave` is never started for a backup: starting it would
/// resume the saved memory and shutting it off would lose it. Its files are read instead,
/// and the saved state is still there afterwards.
#[test]
fn a_domain_with_a_saved_memory_state_is_never_started() {
    let _shared = shared();
    let (vm, env) = backed_up_with("managedsave", ("vda", "qcow2", 32), "1M");
    vm.guest_write(0, 0x22, "4M", "64k");
    virsh(&["managedsave", &vm.name]);
    assert!(virsh(&["dominfo", &vm.name]).contains("Managed save:   yes"));
    let err = backup_says(&env, &vm);
    assert!(err.contains("managedsave"), "{err}");
    assert_eq!(err.matches("reading its disk files").count(), 1, "{err}");
    assert_eq!(domstate(&vm), "shut off");
    assert!(
        virsh(&["dominfo", &vm.name]).contains("Managed save:   yes"),
        "the saved state is kept"
    );
    assert_latest_is_disk(&env, &vm, "vda");
    // And it resumes where it was.
    virsh(&["start", &vm.name]);
    assert_eq!(domstate(&vm), "running");
}

/// `offline_read = "files"` in the config reads a shut-off domain's files (never starting
/// it); `--offline-read start` on the command line overrides it.
#[test]
fn offline_read_from_the_config_and_the_command_line() {
    let _shared = shared();
    let (vm, env) = backed_up_with("offcfg", ("vda", "qcow2", 32), "1M");
    virsh(&["destroy", &vm.name, "--graceful"]);
    let cfg = env.path("no-config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[vm.\"{}\"]\noffline_read = \"files\"\n",
        vm.name
    ));
    std::fs::write(&cfg, text).unwrap();
    // A running VM would hold its image: the files run proves it was never started by
    // leaving libvirt's log of the domain with one start only.
    let log = format!("/var/log/libvirt/qemu/{}.log", vm.name);
    let starts = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("starting up")
            .count()
    };
    let before = starts();
    env.ok(&["backup", &vm.name]);
    assert_eq!(starts(), before, "offline_read = files never starts the VM");
    env.ok(&["backup", &vm.name, "--offline-read", "start"]);
    assert_eq!(starts(), before + 1, "--offline-read start starts it once");
    assert_eq!(domstate(&vm), "shut off");
    assert_latest_is_disk(&env, &vm, "vda");
    let bad = env.run(&["backup", &vm.name, "--offline-read", "maybe"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn restore_as_a_new_vm() {
    let _shared = shared();
    let nic = "<interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>";
    let vm = TestVm::define("asvm", &[("vda", "qcow2", 32)], nic);
    virsh(&["start", &vm.name]);
    let env = Env::live();
    let gen0 = two_generations(&env, &vm, "0", "1M");
    let new = format!("{}-copy", vm.name);
    let _guard = lv::Undefine(new.clone());
    let dir = env.disk_dir();
    let mut args = restore_as_vm(&vm.name, &new, &dir);
    args.extend(["-g", "1", "--start"]);
    env.ok(&args);
    let xml = virsh(&["dumpxml", &new]);
    let orig = virsh(&["dumpxml", &vm.name]);
    let uuid = |x: &str| {
        x.split("<uuid>")
            .nth(1)
            .and_then(|s| s.split("</uuid>").next())
            .map(str::to_string)
    };
    assert_ne!(uuid(&xml), uuid(&orig), "new UUID");
    assert!(orig.contains("52:54:00:12:34:56"));
    assert!(
        !xml.contains("52:54:00:12:34:56") && xml.contains("<mac address='52:54:00:"),
        "new MAC:\n{xml}"
    );
    assert!(
        xml.contains(dir.to_str().unwrap()),
        "disk paths point into --disk-dir"
    );
    assert!(virsh(&["domstate", &new]).contains("running"));
    let copy = lv::read_all(
        dir.join(format!("{new}-vda.qcow2")).to_str().unwrap(),
        "qcow2",
        &vm.path("copy.raw"),
    );
    assert!(copy == gen0, "the new VM's disk is the generation");
    let e = env.fails(&restore_as_vm(&vm.name, &new, &dir), 2);
    assert!(e.contains("already exists"), "{e}");
}

/// Every file under `dir` (recursively), as paths relative to it, sorted.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// A two-disk VM with a TPM, backed up twice (different content each time), synced to a
/// folder target, and then its local repository deleted: `restore --from TARGET -g OLDER
/// --as-vm` makes a VM whose disks are the older generation's bytes (as restored from the
/// repository before it went) and whose TPM state is the one saved with it, and it starts.
/// `--instant` is refused (it needs a local repository); a wrong key is one error and
/// defines nothing; a flipped byte in a pack of the second disk fails the restore with
/// exit 3 naming the pack, defines nothing, and leaves no disk file (not even the first,
/// complete, disk's).
#[test]
fn restore_from_a_target_as_a_new_vm_without_the_repository() {
    let _shared = shared();
    let tpm = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>";
    let vm = TestVm::define("offvm", &[("vda", "qcow2", 16), ("vdb", "raw", 4)], tpm);
    // vdb: 1 MiB of noise, so that its blocks are the large blobs of the target.
    write_at(&vm.disk("vdb").path, 0, &noise(7, 1 << 20));
    virsh(&["start", &vm.name]);
    let permall = swtpm_dir(&domuuid(&vm.name)).join("tpm2/tpm2-00.permall");
    wait_until(30, "swtpm's state file", || permall.exists());
    let env = Env::live();
    vm.guest_write(0, 0x11, "0", "1M");
    vm.guest_write(1, 0x33, "2M", "256k");
    env.ok(&["backup", &vm.name, "--quiesce", "off"]);
    vm.guest_write(0, 0x22, "512k", "64k");
    vm.guest_write(1, 0x44, "2M", "64k");
    env.ok(&["backup", &vm.name, "--quiesce", "off"]);
    let gens = env.generations(&vm.name);
    assert_eq!(gens.len(), 2);
    let older = &gens[0];
    let want: Vec<(&str, Vec<u8>)> = ["vda", "vdb"]
        .into_iter()
        .map(|d| (d, env.restored(&vm.name, older, Some(d))))
        .collect();
    for (d, bytes) in &want {
        assert!(
            *bytes != env.restored(&vm.name, &gens[1], Some(d)),
            "the generations differ on {d}"
        );
    }
    let saved_tpm = std::fs::read(env.repo().join(&vm.name).join(older).join("state.tpm.0"))
        .expect("the TPM state saved with the older generation");

    let key = env.path("offsite.key");
    let key = key.to_str().unwrap();
    env.ok(&["key", "create", key]);
    let folder = env.path("target");
    let target = format!("file://{}", folder.display());
    // Small packs, one upload at a time: vdb's noise blocks are packs of their own.
    env.ok(&[
        "sync",
        &vm.name,
        "--to",
        &target,
        "--key",
        key,
        "--pack-size",
        "64K",
        "--jobs",
        "1",
    ]);
    // The same generations in a real bucket, when the tests have Garage: its connection
    // from the config file.
    let bucket = garage::Garage::start();
    let s3_target = bucket.as_ref().map(|g| {
        let cfg = env.path("no-config.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let s3 = g.offsite_config(&env.path("s3-secret"));
        std::fs::write(&cfg, format!("{text}{s3}")).unwrap();
        let t = format!("s3://{}/asvm", g.bucket);
        env.ok(&["sync", &vm.name, "--to", &t, "--key", key]);
        t
    });
    std::fs::remove_dir_all(env.repo()).unwrap();

    let from = |new: &str, dir: &std::path::Path, key: &str| -> Vec<String> {
        let mut a: Vec<String> = restore_as_vm(&vm.name, new, dir)
            .into_iter()
            .map(str::to_string)
            .collect();
        a.extend(["-g", older, "--from", &target, "--key", key].map(str::to_string));
        a
    };
    let run = |a: Vec<String>, code: i32| -> String {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        if code == 0 {
            env.ok(&a)
        } else {
            env.fails(&a, code)
        }
    };

    let new = format!("{}-off", vm.name);
    let _guard = lv::Undefine(new.clone());
    let dir = env.disk_dir();
    let mut args = from(&new, &dir, key);
    args.push("--start".into());
    let out = run(args, 0);
    assert!(out.contains(&format!("VM {new} started")), "{out}");
    assert!(virsh(&["domstate", &new]).contains("running"));
    let xml = virsh(&["dumpxml", &new]);
    assert!(
        xml.contains(dir.to_str().unwrap()),
        "disks in --disk-dir: {xml}"
    );
    assert_ne!(domuuid(&new), domuuid(&vm.name), "a new UUID");
    for (d, bytes) in &want {
        let file = dir.join(format!("{new}-{d}.qcow2"));
        let got = lv::read_all(file.to_str().unwrap(), "qcow2", &vm.path("got.raw"));
        assert!(
            got == *bytes,
            "disk {d} of the copy is the older generation's"
        );
    }
    assert_eq!(
        std::fs::read(swtpm_dir(&domuuid(&new)).join("tpm2/tpm2-00.permall")).unwrap(),
        saved_tpm,
        "the copy's TPM state is the one saved with the generation"
    );

    // From the bucket: the same older generation, disk for disk.
    if let Some(t) = &s3_target {
        let from_s3 = format!("{}-s3", vm.name);
        let _guard_s3 = lv::Undefine(from_s3.clone());
        let s3_dir = env.path("disks-s3");
        std::fs::create_dir(&s3_dir).unwrap();
        set_mode(&s3_dir, 0o755);
        let mut a: Vec<String> = restore_as_vm(&vm.name, &from_s3, &s3_dir)
            .into_iter()
            .map(str::to_string)
            .collect();
        a.extend(["-g", older, "--from", t, "--key", key].map(str::to_string));
        run(a, 0);
        assert!(lv::virsh_quiet(&["dominfo", &from_s3]), "defined");
        for (d, bytes) in &want {
            let file = s3_dir.join(format!("{from_s3}-{d}.qcow2"));
            let got = lv::read_all(file.to_str().unwrap(), "qcow2", &vm.path("got.raw"));
            assert!(
                got == *bytes,
                "disk {d} of the copy from the bucket is the older generation's"
            );
        }
    }

    // Instant recovery serves from a repository: refused, one usage line.
    let other = format!("{}-off2", vm.name);
    let _guard2 = lv::Undefine(other.clone());
    let bad_dir = env.path("disks-bad");
    std::fs::create_dir(&bad_dir).unwrap();
    set_mode(&bad_dir, 0o755);
    let mut args = from(&other, &bad_dir, key);
    args.push("--instant".into());
    let e = run(args, 2);
    assert!(
        e.contains("needs a local repository") && e.contains("restore it first"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");

    // Another key: one clear error, nothing defined.
    let wrong = env.path("wrong.key");
    env.ok(&["key", "create", wrong.to_str().unwrap()]);
    let e = run(from(&other, &bad_dir, wrong.to_str().unwrap()), 2);
    assert!(e.contains("is not this target's key"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!lv::virsh_quiet(&["dominfo", &other]), "nothing defined");
    assert!(files_under(&bad_dir).is_empty());

    // One byte flipped in a pack of vdb's noise (the largest packs): vda is written, then
    // vdb fails at that block; both go, and nothing is defined.
    let mut packs: Vec<(u64, String)> = files_under(&folder.join("packs"))
        .into_iter()
        .map(|p| {
            (
                std::fs::metadata(folder.join("packs").join(&p))
                    .unwrap()
                    .len(),
                p,
            )
        })
        .collect();
    packs.sort();
    let (size, pack) = packs.pop().unwrap();
    assert!(size > 32 << 10, "a pack of noise: {packs:?}");
    flip_byte(&folder.join("packs").join(&pack), 1000);
    let e = run(from(&other, &bad_dir, key), 3);
    assert!(e.contains(&format!("packs/{pack}")), "names the pack: {e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(!lv::virsh_quiet(&["dominfo", &other]), "nothing defined");
    assert!(
        files_under(&bad_dir).is_empty(),
        "no disk file left: {:?}",
        files_under(&bad_dir)
    );
    // The copy made before the damage is untouched.
    assert!(virsh(&["domstate", &new]).contains("running"));
}

#[test]
fn instant_recovery_boots_from_the_archive_and_finishes_by_itself() {
    let _shared = shared();
    let vm = TestVm::start("instant", &[("vda", "qcow2", 32)]);
    let env = Env::live();
    let gen0 = two_generations(&env, &vm, "1M", "2M");
    let new = format!("{}-instant", vm.name);
    let _guard = lv::Undefine(new.clone());
    let dir = env.disk_dir();
    let mut args = restore_as_vm(&vm.name, &new, &dir);
    args.extend(["-g", "1", "--instant"]);
    let out = env.ok(&args);
    let pid = server_pid(&out);
    let _server = KillServer(pid);
    assert!(out.contains("vmkeep status"), "{out}");
    let overlay = dir.join(format!("{new}-vda.qcow2"));
    // The recovered guest's writes are as private as every other restore target; libvirt
    // gives the file to QEMU by owner (DAC labelling), the mode stays.
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&overlay).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600, "overlay mode");
    }
    let info = image_info(&overlay);
    assert!(
        info.contains("backing file: nbd+unix:///vda?socket="),
        "{info}"
    );
    // The definition names the export as the disk's backing store.
    let inactive = virsh(&["dumpxml", "--inactive", &new]);
    assert!(
        inactive.contains("<backingStore type='network'") && inactive.contains("protocol='nbd'"),
        "{inactive}"
    );
    // Reading the overlay chain reads the generation from the archive.
    let through = lv::read_all(overlay.to_str().unwrap(), "qcow2", &vm.path("through.raw"));
    assert!(through == gen0, "the instant VM's disk is the generation");
    // Not started yet: the server waits for the VM, and status says so.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(alive(pid), "the server must wait while the VM is shut off");
    let status = env.ok(&["status", &vm.name]);
    assert!(
        status.contains("instant recoveries:")
            && status.contains(&new)
            && status.contains("waiting for the VM to run"),
        "{status}"
    );
    // Started: the server copies everything into the overlay, then ends by itself.
    virsh(&["start", &new]);
    wait_gone(pid, 180, "instant recovery");
    let status = env.ok(&["status", &vm.name]);
    assert!(status.contains("finished"), "{status}");
    assert!(status.contains("100.0 % copied"), "{status}");
    let js: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "status", &vm.name])).unwrap();
    assert_eq!(js["instant"][0]["phase"], "finished", "{js}");
    assert_eq!(js["instant"][0]["domain"], new.as_str(), "{js}");
    assert!(virsh(&["domstate", &new]).contains("running"));
    for xml in [
        virsh(&["dumpxml", &new]),
        virsh(&["dumpxml", "--inactive", &new]),
    ] {
        assert!(
            !xml.contains("protocol='nbd'"),
            "the export is still named: {xml}"
        );
    }
    let info = image_info(&overlay);
    assert!(
        !info.contains("backing file"),
        "the pull left a backing file: {info}"
    );
    // QEMU keeps the overlay's new metadata in memory until it flushes.
    virsh(&[
        "qemu-monitor-command",
        &new,
        "--hmp",
        "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend flush",
    ]);
    let pulled = lv::read_all(overlay.to_str().unwrap(), "qcow2", &vm.path("pulled.raw"));
    assert!(
        pulled == gen0,
        "after the copy the disk no longer needs the archive"
    );
    // A restart opens the overlay alone.
    virsh(&["destroy", &new]);
    virsh(&["start", &new]);
    assert!(virsh(&["domstate", &new]).contains("running"));
}

/// An instant recovery whose domain is removed before it ever runs: nothing needs the
/// export, and the server ends by itself; one whose server was killed shows so in status.
#[test]
fn instant_recovery_server_ends_with_its_domain_and_status_shows_a_dead_one() {
    let _shared = shared();
    let vm = TestVm::start("instgone", &[("vda", "qcow2", 16)]);
    let env = Env::live();
    two_generations(&env, &vm, "1M", "1M");
    let dir = env.disk_dir();
    let gone = format!("{}-gone", vm.name);
    let _g1 = lv::Undefine(gone.clone());
    let mut args = restore_as_vm(&vm.name, &gone, &dir);
    args.extend(["--instant"]);
    let pid = server_pid(&env.ok(&args));
    let _s1 = KillServer(pid);
    virsh(&["undefine", &gone]);
    wait_gone(pid, 30, "undefined domain");
    let status = env.ok(&["status", &vm.name]);
    assert!(
        status.contains("ended: the VM no longer exists"),
        "{status}"
    );
    let dead = format!("{}-dead", vm.name);
    let _g2 = lv::Undefine(dead.clone());
    let mut args = restore_as_vm(&vm.name, &dead, &dir);
    args.extend(["--instant"]);
    let pid = server_pid(&env.ok(&args));
    std::thread::sleep(std::time::Duration::from_secs(2));
    // SAFETY: kill(2) on the server this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_gone(pid, 10, "killed server");
    let status = env.ok(&["status", &vm.name]);
    assert!(
        status.contains(&format!("SERVER NOT RUNNING (pid {pid})")),
        "{status}"
    );
}

/// A guest without an agent: `--quiesce auto` (the default) backs it up crash-consistent
/// and says so in one line, `require` fails the VM with nothing made, `off` says nothing;
/// the generation records it, and the run's line for the VM ends with it. A shut-off VM
/// started paused is recorded offline.
#[test]
fn without_a_guest_agent_backups_are_crash_consistent_and_say_so() {
    let _shared = shared();
    let vm = TestVm::start("noagent", &[("vda", "qcow2", 16)]);
    let env = Env::live();
    vm.guest_write(0, 0x31, "0", "1M");
    let out = env.run(&["backup", &vm.name]);
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    let said: Vec<&str> = e
        .lines()
        .filter(|l| l.contains("crash-consistent"))
        .collect();
    assert_eq!(said.len(), 1, "{e}");
    assert!(
        said[0].contains(&vm.name) && said[0].contains("agent"),
        "{e}"
    );
    let consistency = |env: &Env| {
        env.status(&vm.name)["vms"][0]["generations"][0]["consistency"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(consistency(&env), "crash");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(line.trim_end().ends_with("s, crash"), "{line}");
    let e = env.fails(&["backup", &vm.name, "--quiesce", "require"], 1);
    assert!(e.contains("--quiesce require"), "{e}");
    assert_eq!(env.generations(&vm.name).len(), 1, "nothing made");
    assert!(
        !virsh(&["domjobinfo", &vm.name]).contains("Backup"),
        "no job left"
    );
    let out = env.run(&["backup", &vm.name, "--quiesce", "off"]);
    assert!(out.status.success());
    assert!(
        !stderr(&out).contains("crash-consistent"),
        "{}",
        stderr(&out)
    );
    assert_eq!(consistency(&env), "crash");
    vm.flush(0);
    virsh(&["destroy", &vm.name, "--graceful"]);
    let line = env.ok(&["backup", &vm.name, "--quiesce", "require"]);
    assert_eq!(consistency(&env), "offline");
    assert!(line.trim_end().ends_with("s, offline"), "{line}");
}

/// The domain undefined and defined again between two backups (libvirt loses the
/// checkpoint metadata, the disks keep their bitmaps): the next backup redefines the
/// checkpoint from the generation's saved XML, validated against the bitmaps, and stays
/// incremental and right. A saved XML of another generation put in its place is refused
/// (it names another checkpoint): a diff, never a wrong incremental.
#[test]
fn a_redefined_domain_stays_incremental_through_its_saved_checkpoint() {
    let _shared = shared();
    let (vm, env) = backed_up("redefine");
    let redefine_domain = || {
        let xml = virsh(&["dumpxml", "--inactive", "--security-info", &vm.name]);
        let file = vm.path("domain.xml");
        std::fs::write(&file, xml).unwrap();
        // Shut off cleanly (QEMU saves the bitmaps into the qcow2), the definition and its
        // checkpoint metadata removed, defined again from the same XML, started.
        vm.flush(0);
        virsh(&["destroy", "--graceful", &vm.name]);
        virsh(&["undefine", "--checkpoints-metadata", &vm.name]);
        virsh(&["define", file.to_str().unwrap()]);
        assert!(virsh(&["checkpoint-list", "--name", &vm.name])
            .trim()
            .is_empty());
        virsh(&["start", &vm.name]);
    };
    let ids = env.generations(&vm.name);
    assert!(
        env.repo()
            .join(&vm.name)
            .join(&ids[0])
            .join("checkpoint.xml")
            .exists(),
        "the checkpoint's XML is saved with the generation"
    );
    redefine_domain();
    vm.guest_write(0, 0x44, "10M", "64k");
    let err = backup_says(&env, &vm);
    assert!(
        err.contains("redefined it from the newest generation"),
        "{err}"
    );
    assert_eq!(newest(&env, &vm.name, "vda"), ("incr".to_string(), 65536));
    assert_latest_is_disk(&env, &vm, "vda");
    // Once more, with the older generation's saved XML in the newest one's place.
    let ids = env.generations(&vm.name);
    let dir = env.repo().join(&vm.name);
    std::fs::copy(
        dir.join(&ids[0]).join("checkpoint.xml"),
        dir.join(&ids[1]).join("checkpoint.xml"),
    )
    .unwrap();
    redefine_domain();
    vm.guest_write(0, 0x45, "12M", "64k");
    let err = backup_says(&env, &vm);
    assert!(err.contains("names checkpoint"), "{err}");
    assert_newest(&env, &vm, "diff");
    assert_latest_is_disk(&env, &vm, "vda");
    // And the fresh chain is incremental again.
    vm.guest_write(0, 0x46, "14M", "64k");
    backup_says(&env, &vm);
    assert_eq!(newest(&env, &vm.name, "vda"), ("incr".to_string(), 65536));
    assert_latest_is_disk(&env, &vm, "vda");
    env.ok(&["check", &vm.name, "--deep"]);
}

/// A port on 127.0.0.1 nobody listens on, from `range`.
fn free_port(range: std::ops::RangeInclusive<u16>) -> u16 {
    range
        .into_iter()
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}

/// Every host path (absolute attribute value) in a domain's XML, and its graphics ports.
fn paths_and_ports(xml: &str) -> (std::collections::BTreeSet<String>, Vec<String>) {
    let doc = roxmltree::Document::parse(xml).unwrap();
    let paths = doc
        .descendants()
        .flat_map(|n| n.attributes())
        .map(|a| a.value().to_string())
        .filter(|v| v.starts_with('/'))
        .collect();
    let ports = doc
        .descendants()
        .filter(|n| n.has_tag_name("graphics"))
        .flat_map(|g| ["port", "websocket"].map(|a| g.attribute(a).unwrap_or("").to_string()))
        .collect();
    (paths, ports)
}

/// Copies of a running domain with file-backed serial and console, a `<log>` file and VNC
/// on fixed ports, restored beside it (copied, instant, into a pool) and started: each
/// starts, names none of the original's files or ports, and writes its console beside the
/// original's under its own name; all of them and the original run.
#[test]
fn copies_beside_the_running_original_share_no_file_or_port() {
    let _shared = shared();
    let dir = tempfile::Builder::new()
        .prefix("vmkeep-share-")
        .tempdir()
        .unwrap();
    lv::set_mode(dir.path(), 0o755);
    let (vnc, ws) = (free_port(5990..=6200), free_port(15790..=16000));
    let console = dir.path().join("console.log");
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // The log's file name carries the VM's name, the console's does not.
    let devices = format!(
        "<serial type='file'><source path='{c}'/><log file='{log}'/><target port='0'/></serial>\
         <console type='file'><source path='{c}'/><target type='serial' port='0'/></console>\
         <graphics type='vnc' port='{vnc}' autoport='no' websocket='{ws}' listen='127.0.0.1'/>",
        c = console.display(),
        log = at(&format!("{}.serial.log", lv::NAME)),
    );
    let vm = TestVm::define("shared", &[("vda", "qcow2", 16)], &devices);
    virsh(&["start", &vm.name]);
    let env = Env::live();
    env.ok(&["backup", &vm.name]);
    let original = virsh(&["dumpxml", &vm.name]);
    let (orig_paths, orig_ports) = paths_and_ports(&original);
    assert!(orig_paths.contains(console.to_str().unwrap()), "{original}");
    assert_eq!(orig_ports, [vnc.to_string(), ws.to_string()], "{original}");

    let disks = env.disk_dir();
    let pool = format!("vmkeep-test-share-{}", std::process::id());
    let _pool = lv::PoolGuard::create(&pool, &env.path("pool"));
    let copied = format!("{}-copy", vm.name);
    let instant = format!("{}-instant", vm.name);
    let pooled = format!("{}-pool", vm.name);
    let _guards = [&copied, &instant, &pooled].map(|n| lv::Undefine(n.to_string()));
    let mut args = restore_as_vm(&vm.name, &copied, &disks);
    args.push("--start");
    env.ok(&args);
    let mut args = restore_as_vm(&vm.name, &instant, &disks);
    args.extend(["--instant", "--start"]);
    let _server = KillServer(server_pid(&env.ok(&args)));
    env.ok(&[
        "restore", &vm.name, "--as-vm", &pooled, "--pool", &pool, "--start",
    ]);

    for copy in [&copied, &instant, &pooled] {
        assert!(virsh(&["domstate", copy]).contains("running"), "{copy}");
        let xml = virsh(&["dumpxml", copy]);
        let (paths, ports) = paths_and_ports(&xml);
        let shared: Vec<_> = paths.intersection(&orig_paths).collect();
        assert!(shared.is_empty(), "{copy} shares {shared:?}:\n{xml}");
        for port in [vnc, ws] {
            assert!(
                !ports.contains(&port.to_string()),
                "{copy}: port {port}:\n{xml}"
            );
        }
        assert_eq!(ports.len(), 2, "VNC and its websocket: {xml}");
        // The console and the log beside the original's, named for the copy.
        for file in [
            at(&format!("{copy}-console.log")),
            at(&format!("{copy}.serial.log")),
        ] {
            assert!(paths.contains(&file), "{copy}: no {file}:\n{xml}");
            assert!(std::path::Path::new(&file).exists(), "{file}");
        }
    }
    assert!(virsh(&["domstate", &vm.name]).contains("running"));
    assert_eq!(
        paths_and_ports(&virsh(&["dumpxml", &vm.name])).1,
        orig_ports
    );
}

#[test]
fn two_repositories_keep_independent_incremental_chains() {
    let _shared = shared();
    let vm = TestVm::start("branch", &[("vda", "qcow2", 32)]);
    let a = Env::live();
    let b = Env::live();
    vm.guest_write(0, 0x01, "0", "1M");
    a.ok(&["backup", &vm.name]);
    let mut snaps_a = vec![disk_now(&vm, "vda")];
    vm.guest_write(0, 0x02, "2M", "64k");
    b.ok(&["backup", &vm.name]);
    let mut snaps_b = vec![disk_now(&vm, "vda")];
    let offsets = ["4M", "6M", "8M", "10M"];
    for (i, off) in offsets.iter().enumerate() {
        vm.guest_write(0, 0x10 + i as u8, off, "64k");
        let (env, snaps) = if i % 2 == 0 {
            (&a, &mut snaps_a)
        } else {
            (&b, &mut snaps_b)
        };
        let (mode, read) = backup(env, &vm);
        assert_eq!(mode, "incr", "run {i}");
        // Everything written since this repository's own previous run: two 64 KiB writes
        // (one before the other repository's turn, one after), and no more.
        assert_eq!(read, 2 * 65536, "run {i}");
        snaps.push(disk_now(&vm, "vda"));
    }
    for (env, snaps) in [(&a, &snaps_a), (&b, &snaps_b)] {
        let n = snaps.len();
        for (k, snap) in snaps.iter().enumerate() {
            assert!(
                &restored(env, &vm.name, &(n - 1 - k).to_string(), "vda") == snap,
                "generation {k}"
            );
        }
    }
    // Each repository keeps exactly its own checkpoint.
    let cps = checkpoints(&vm.name);
    assert_eq!(cps.len(), 2, "{cps:?}");
    // Deleting A's checkpoints leaves B incremental.
    let a_id = a.repo_id();
    let a_cps: Vec<&String> = cps
        .iter()
        .filter(|c| c.starts_with(&format!("vmkeep.{a_id}.")))
        .collect();
    assert_eq!(a_cps.len(), 1, "{cps:?}");
    for cp in a_cps {
        virsh(&["checkpoint-delete", &vm.name, cp]);
    }
    vm.guest_write(0, 0x40, "12M", "64k");
    assert_eq!(backup(&b, &vm).0, "incr");
    assert_eq!(backup(&a, &vm).0, "diff");

    // A chain that outlives its repository is found and removed by the other one.
    let out = b.ok(&["checkpoints", &vm.name]);
    assert!(
        out.contains("this repository's") && out.contains("another branch"),
        "{out}"
    );
    std::fs::remove_dir_all(a.repo()).unwrap();
    let out = b.ok(&["checkpoints", &vm.name]);
    assert!(out.contains("orphan: repository"), "{out}");
    b.ok(&["checkpoints", &vm.name, "--remove-orphans"]);
    let left = checkpoints(&vm.name);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(!left[0].contains(&a_id), "{left:?}");
    vm.guest_write(0, 0x41, "14M", "64k");
    assert_eq!(backup(&b, &vm).0, "incr");
}

#[test]
fn killed_qemu_costs_one_diff_then_incremental_again() {
    let _shared = shared();
    let (vm, env) = backed_up("killed");
    // QEMU dies before it ever saved the checkpoint's bitmap: the bitmap is missing.
    vm.kill_qemu();
    virsh(&["start", &vm.name]);
    vm.guest_write(0, 0x22, "8M", "1M");
    let err = backup_says(&env, &vm);
    assert_eq!(
        err.matches("is broken").count(),
        1,
        "said once, in one line"
    );
    assert_eq!(err.matches('\n').count(), 1, "one line");
    assert_newest(&env, &vm, "diff");
    // The broken checkpoint's metadata is gone; the fresh chain's one is there.
    let cps = checkpoints(&vm.name);
    let ids = env.generations(&vm.name);
    assert_eq!(cps.len(), 1, "{cps:?}");
    assert!(cps[0].ends_with(&ids[1]), "{cps:?} vs {ids:?}");
    vm.guest_write(0, 0x33, "20M", "64k");
    assert_eq!(
        backup(&env, &vm),
        ("incr".to_string(), 65536),
        "incr again, reading only what was written"
    );
    assert_latest_is_disk(&env, &vm, "vda");

    // QEMU saved the bitmap once (a graceful stop), then died: the bitmap is in the image
    // but marked in-use, so QEMU loads it as inconsistent.
    virsh(&["destroy", &vm.name, "--graceful"]);
    virsh(&["start", &vm.name]);
    vm.kill_qemu();
    virsh(&["start", &vm.name]);
    vm.guest_write(0, 0x44, "2M", "64k");
    let err = backup_says(&env, &vm);
    assert_eq!(err.matches("is broken").count(), 1);
    assert_newest(&env, &vm, "diff");
    assert_eq!(checkpoints(&vm.name).len(), 1);
    vm.guest_write(0, 0x55, "24M", "64k");
    assert_eq!(backup(&env, &vm), ("incr".to_string(), 65536));
    assert_latest_is_disk(&env, &vm, "vda");
    env.ok(&["check", &vm.name, "--deep"]);
}

#[test]
fn a_broken_checkpoint_of_another_repository_or_tool_is_left_alone() {
    let _shared = shared();
    let vm = TestVm::start("brokenother", &[("vda", "qcow2", 32)]);
    let a = Env::live();
    let b = Env::live();
    vm.guest_write(0, 0x01, "0", "1M");
    a.ok(&["backup", &vm.name]);
    b.ok(&["backup", &vm.name]);
    virsh(&["checkpoint-create-as", &vm.name, "othertool"]);
    let before = checkpoints(&vm.name);
    assert_eq!(before.len(), 3, "{before:?}");
    vm.kill_qemu();
    virsh(&["start", &vm.name]);
    vm.guest_write(0, 0x02, "4M", "64k");
    backup_says(&a, &vm);
    assert_newest(&a, &vm, "diff");
    let after = checkpoints(&vm.name);
    let a_old = before
        .iter()
        .find(|c| c.ends_with(&a.generations(&vm.name)[0]))
        .unwrap();
    for cp in before.iter().filter(|c| *c != a_old) {
        assert!(after.contains(cp), "{cp} was deleted: {after:?}");
    }
    assert!(!after.contains(a_old), "{after:?}");
    // The broken checkpoints of others do not stand in the way of A's fresh chain.
    vm.guest_write(0, 0x03, "6M", "64k");
    let err = backup_says(&a, &vm);
    assert_eq!(err.matches("warning").count(), 0, "{err}");
    assert_eq!(newest(&a, &vm.name, "vda"), ("incr".to_string(), 65536));
    assert_latest_is_disk(&a, &vm, "vda");
    // B finds its own checkpoint broken in turn, and deletes only that one.
    let err = backup_says(&b, &vm);
    assert_eq!(err.matches("is broken").count(), 1);
    assert_newest(&b, &vm, "diff");
    let left = checkpoints(&vm.name);
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left.contains(&"othertool".to_string()), "{left:?}");
}

#[cfg(feature = "fault-injection")]
mod failures {
    use super::*;
    use std::time::{Duration, Instant};

    /// Start a backup that pauses after the libvirt job began, do `act`, and return its
    /// output.
    fn interrupted(env: &Env, vm: &TestVm, act: impl FnOnce()) -> std::process::Output {
        let run = env.spawn_paused(&["backup", &vm.name], "after-backup-begin:4");
        run.reached(30, "the backup never reached the pause");
        act();
        run.output()
    }

    /// A backup of `vm` paused at `point`, once it has reached the pause.
    fn paused_backup(env: &Env, vm: &TestVm, point: &str) -> Paused {
        let run = env.spawn_paused(&["backup", &vm.name], point);
        run.reached(60, "the backup never reached the pause");
        run
    }

    fn assert_clean_failure(
        env: &Env,
        vm: &TestVm,
        out: &std::process::Output,
        before: usize,
        needle: &str,
    ) {
        let err = stderr(out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
        assert_eq!(
            env.generations(&vm.name).len(),
            before,
            "no generation was added"
        );
        env.ok(&["check", &vm.name, "--deep"]);
        assert_no_leftovers(env);
        if virsh(&["domstate", &vm.name]).contains("running") {
            assert!(
                !virsh(&["domjobinfo", &vm.name]).contains("Backup"),
                "no backup job is left"
            );
        }
    }

    /// Repository A's job is in flight (paused after it began) when repository B's run
    /// starts, with the same run folder: B waits for A's job, says so in one line, and
    /// never ends it; both generations equal the disk.
    #[test]
    fn another_repositorys_job_in_flight_is_waited_for_never_ended() {
        let _shared = shared();
        let vm = TestVm::start("inflight", &[("vda", "qcow2", 32)]);
        let (a, b) = sharing_folders();
        vm.guest_write(0, 0x41, "0", "2M");
        let disk = disk_now(&vm, "vda");
        let first = paused_backup(&a, &vm, "after-backup-begin:300");
        let log = b.path("second.err");
        let mut second = b
            .std_cmd(&["backup", &vm.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Until B says it waits (or, wrongly, finishes without waiting).
        let deadline = Instant::now() + Duration::from_secs(60);
        let waited = loop {
            if std::fs::read_to_string(&log)
                .unwrap()
                .contains("another backup job is running")
            {
                break true;
            }
            if second.try_wait().unwrap().is_some() {
                break false;
            }
            assert!(
                Instant::now() < deadline,
                "the second run neither waited nor ended"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        first.resume();
        succeeded(&first.output(), "A: ");
        let status = second.wait().unwrap();
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "B: {err}");
        assert!(waited, "B did not wait for A's job: {err}");
        assert_eq!(err.matches("waiting for it to end").count(), 1, "{err}");
        for env in [&a, &b] {
            assert!(
                env.latest(&vm.name, "vda") == disk,
                "latest/vda.raw differs"
            );
            env.ok(&["check", &vm.name, "--deep"]);
        }
        assert_no_backup_job(&vm);
        assert!(entries(&a.path("run")).is_empty() && entries(&a.path("scratch")).is_empty());
    }

    /// A backup of a shut-off domain that fails while vmkeep holds it paused (its job
    /// aborted from outside) leaves the domain shut off, with no checkpoint and no job,
    /// and the next run works.
    #[test]
    fn a_failed_backup_of_a_shut_off_domain_leaves_it_shut_off_and_clean() {
        let _shared = shared();
        let vm = TestVm::define("offfail", &[("vda", "qcow2", 32)], "");
        let env = Env::live();
        assert_eq!(backup(&env, &vm).0, "full");
        let kept = vmkeep_checkpoints(&vm);
        let out = interrupted(&env, &vm, || {
            assert_eq!(domstate(&vm), "paused", "started paused for the backup");
            virsh(&["domjobabort", &vm.name]);
        });
        assert_clean_failure(&env, &vm, &out, 1, "backup job");
        assert_eq!(domstate(&vm), "shut off");
        assert_eq!(
            vmkeep_checkpoints(&vm),
            kept,
            "the failed run's checkpoint is gone"
        );
        assert_eq!(backup(&env, &vm), ("incr".to_string(), 0));
        assert_eq!(domstate(&vm), "shut off");
        assert_eq!(vmkeep_checkpoints(&vm).len(), 1);
    }

    /// Someone resumes the VM vmkeep started paused: it is theirs now and keeps running;
    /// the backup still succeeds with the point-in-time of its start.
    #[test]
    fn a_vm_resumed_during_its_backup_keeps_running() {
        let _shared = shared();
        let vm = TestVm::define("offresume", &[("vda", "qcow2", 32)], "");
        lv::run(
            std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x11 0 1M"])
                .arg(&vm.disk("vda").path),
        );
        let env = Env::live();
        let off = disk_now(&vm, "vda");
        let run = paused_backup(&env, &vm, "after-backup-begin:300");
        virsh(&["resume", &vm.name]);
        vm.guest_write(0, 0x22, "0", "64k");
        run.resume();
        let err = succeeded(&run.output(), "");
        assert!(err.contains("it keeps running"), "{err}");
        assert_eq!(domstate(&vm), "running");
        assert!(
            env.latest(&vm.name, "vda") == off,
            "the disk as it was when the job began"
        );
        // The mark is gone: a later run does not take the VM for one it started.
        assert!(!lv::virsh_quiet(&[
            "metadata",
            &vm.name,
            "--uri",
            "urn:vmkeep:live:1",
            "--live"
        ]));
        virsh(&["suspend", &vm.name]);
        env.ok(&["backup", &vm.name]);
        assert_eq!(
            domstate(&vm),
            "paused",
            "a VM paused by someone is never shut off"
        );
    }

    /// A run killed while its VM is paused for the backup: the next run of the same
    /// repository ends the stale job, backs the VM up, and shuts it off.
    #[test]
    fn a_run_killed_while_its_vm_is_paused_is_cleaned_up_by_the_next() {
        let _shared = shared();
        let vm = TestVm::define("offkill", &[("vda", "qcow2", 32)], "");
        let env = Env::live();
        let mut run = paused_backup(&env, &vm, "after-backup-begin:300");
        run.child.kill().unwrap();
        run.child.wait().unwrap();
        assert_eq!(domstate(&vm), "paused");
        let err = backup_says(&env, &vm);
        assert!(err.contains("left paused by an interrupted run"), "{err}");
        // Shut off, so no job is left either.
        assert_eq!(domstate(&vm), "shut off");
        assert_eq!(vmkeep_checkpoints(&vm).len(), 1);
        assert_latest_is_disk(&env, &vm, "vda");
        // A VM left paused by another repository's run is backed up as it is and never
        // stopped: only that repository's next run may.
        virsh(&["start", "--paused", &vm.name]);
        virsh(&[
            "metadata",
            &vm.name,
            "--uri",
            "urn:vmkeep:live:1",
            "--key",
            "vmkeep",
            "--live",
            "--set",
            "<started-for-backup repository=\"0123456789ab\" token=\"t\"/>",
        ]);
        env.ok(&["backup", &vm.name]);
        assert_eq!(
            domstate(&vm),
            "paused",
            "another repository's VM is left paused"
        );
        assert_latest_is_disk(&env, &vm, "vda");
    }

    #[test]
    fn a_shut_off_domain_started_mid_read_never_tears_a_generation() {
        let _shared = shared();
        for format in ["raw", "qcow2"] {
            let (vm, env) =
                backed_up_with(&format!("offstart-{format}"), ("vda", format, 32), "2M");
            vm.guest_write(0, 0x22, "4M", "1M");
            virsh(&["destroy", &vm.name, "--graceful"]);
            let off = disk_now(&vm, "vda");
            // The backup pauses with its sources open, before it reads a block; the VM is
            // started there, and writes if it runs.
            let run = env.spawn_paused(
                &["backup", &vm.name, "--offline-read", "files"],
                "shut-off-read:120",
            );
            run.reached(60, "the backup never reached the pause");
            let start = std::process::Command::new("virsh")
                .args(["-c", lv::URI, "start", &vm.name])
                .output()
                .unwrap();
            let started = start.status.success();
            if started {
                vm.guest_write(0, 0x33, "0", "1M");
                vm.guest_write(0, 0x33, "8M", "1M");
                vm.flush(0);
            }
            run.resume();
            let out = run.output();
            let err = stderr(&out);
            if started {
                // Never a committed generation that mixes states.
                assert_eq!(out.status.code(), Some(1), "{format}: {err}");
                assert_eq!(
                    env.generations(&vm.name).len(),
                    1,
                    "{format}: nothing committed"
                );
                env.ok(&["check", &vm.name, "--deep"]);
            } else {
                // The VM could not start: vmkeep holds QEMU's lock on the image. Under
                // load libvirt may report only "qemu unexpectedly closed the monitor"
                // before QEMU's own line reaches it; QEMU's log of the domain has it.
                let why = String::from_utf8_lossy(&start.stderr);
                let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", vm.name))
                    .unwrap_or_default();
                assert!(
                    why.contains("lock") || log.contains("\"write\" lock"),
                    "{format}: {why}\n{log}"
                );
                assert!(out.status.success(), "{format}: {err}");
                assert_eq!(env.generations(&vm.name).len(), 2);
                assert!(
                    env.latest(&vm.name, "vda") == off,
                    "{format}: the generation is the disk as it was shut off"
                );
                env.ok(&["check", &vm.name, "--deep"]);
                // Once vmkeep is done, the VM starts.
                virsh(&["start", &vm.name]);
            }
        }
    }

    /// The guest's writer of `consistent_under_concurrent_writes`: write k (k = 0, 1…)
    /// puts 64 KiB of pattern `slot_pattern(k)` at 16 MiB + k × 64 KiB, one after the other.
    const SLOTS_AT: usize = 16 << 20;
    const SLOT: usize = 64 << 10;

    fn slot_pattern(k: usize) -> u8 {
        (k % 254) as u8 + 1
    }

    /// How many of the writer's writes `image` holds, proving they are a prefix: writes
    /// 0..n whole, none after, and nothing torn.
    fn writes_held(image: &[u8], what: &str) -> usize {
        let slots = (image.len() - SLOTS_AT) / SLOT;
        let mut held = 0;
        for k in 0..slots {
            let block = &image[SLOTS_AT + k * SLOT..SLOTS_AT + (k + 1) * SLOT];
            if block.iter().all(|&b| b == slot_pattern(k)) {
                assert_eq!(
                    held, k,
                    "{what}: write {k} is there but write {held} is not"
                );
                held += 1;
            } else {
                assert!(block.iter().all(|&b| b == 0), "{what}: write {k} is torn");
            }
        }
        held
    }

    /// Run a backup that pauses once its job began, and let it go on only after the
    /// guest wrote twice more, so that writes overlap the job whatever the timing. Returns
    /// the range of writes the point-in-time view may hold: every write done before the
    /// backup started, at most the one in flight when its job had begun.
    fn backup_while_writing(
        env: &Env,
        vm: &TestVm,
        count: &std::sync::atomic::AtomicUsize,
    ) -> std::ops::RangeInclusive<usize> {
        use std::sync::atomic::Ordering;
        let done_before = count.load(Ordering::SeqCst);
        let run = paused_backup(env, vm, "after-backup-begin:600");
        let seen = count.load(Ordering::SeqCst);
        while count.load(Ordering::SeqCst) < seen + 2 {
            std::thread::sleep(Duration::from_millis(20));
        }
        run.resume();
        succeeded(&run.output(), "");
        done_before..=seen + 1
    }

    #[test]
    fn consistent_under_concurrent_writes() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let _shared = shared();
        let vm = TestVm::start("writer", &[("vda", "qcow2", 64)]);
        let env = Env::live();
        vm.guest_write(0, 0x11, "0", "1M");
        let stop = AtomicBool::new(false);
        let count = AtomicUsize::new(0);
        let slots = ((64 << 20) - SLOTS_AT) / SLOT;
        let mut moments = Vec::new();
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                for k in 0..slots {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let offset = (SLOTS_AT + k * SLOT).to_string();
                    vm.guest_write(0, slot_pattern(k), &offset, "64k");
                    count.store(k + 1, Ordering::SeqCst);
                }
            });
            let full = backup_while_writing(&env, &vm, &count);
            assert_eq!(newest_mode(&env, &vm), "full");
            let incr = backup_while_writing(&env, &vm, &count);
            assert_eq!(newest_mode(&env, &vm), "incr");
            moments = vec![full, incr];
            stop.store(true, Ordering::SeqCst);
            writer.join().unwrap();
        });
        let written = count.load(Ordering::SeqCst);
        assert!(written < slots, "the writer ran out of room");
        env.ok(&["backup", &vm.name]);
        assert_newest(&env, &vm, "incr");
        // Every generation is one moment of the guest's writes: a prefix of them, taken
        // while its job began (no write of before missing, none of after in it).
        moments.push(written..=written);
        for (rev, moment) in ["2", "1", "0"].iter().zip(&moments) {
            let image = restored(&env, &vm.name, rev, "vda");
            assert!(
                image[..1 << 20].iter().all(|&b| b == 0x11),
                "generation {rev}"
            );
            let held = writes_held(&image, &format!("generation {rev}"));
            assert!(
                moment.contains(&held),
                "generation {rev} holds {held} writes, not {moment:?}"
            );
        }
        env.ok(&["check", &vm.name, "--deep"]);
    }

    #[test]
    fn job_aborted_from_outside_fails_the_run() {
        let _shared = shared();
        let (vm, env) = backed_up("abort");
        vm.guest_write(0, 0x22, "0", "64k");
        let out = interrupted(&env, &vm, || {
            virsh(&["domjobabort", &vm.name]);
        });
        assert_clean_failure(&env, &vm, &out, 1, "backup job");
        // The next run works.
        env.ok(&["backup", &vm.name]);
        assert_latest_is_disk(&env, &vm, "vda");
    }

    #[test]
    fn libvirtd_restarted_mid_backup_fails_the_run_cleanly() {
        let _exclusive = LIBVIRTD.write().unwrap_or_else(|e| e.into_inner());
        let (vm, env) = backed_up("restart");
        vm.guest_write(0, 0x22, "0", "64k");
        let out = interrupted(&env, &vm, || {
            lv::restart_libvirtd(&["-d"]);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !lv::virsh_quiet(&["domstate", &vm.name]) {
                assert!(Instant::now() < deadline, "libvirtd did not come back");
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // vmkeep lost its connection in the middle: the run fails, and what it began (the
        // job, the new checkpoint) is ended through a fresh connection.
        assert_clean_failure(&env, &vm, &out, 1, &vm.name);
        env.ok(&["backup", &vm.name]);
        assert_newest(&env, &vm, "incr");
    }

    #[test]
    fn domain_destroyed_mid_backup_fails_the_run() {
        let _shared = shared();
        let (vm, env) = backed_up("destroy");
        let out = interrupted(&env, &vm, || {
            virsh(&["destroy", &vm.name]);
        });
        assert_clean_failure(&env, &vm, &out, 1, "backup job");
    }
}

/// The id of the newest generation of `vm`.
fn newest_id(env: &Env, vm: &str) -> String {
    env.status(vm)["vms"][0]["generations"][0]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The unprivileged user the tests plant files as (made once; safe in parallel).
fn attacker() -> u32 {
    const NAME: &str = "vmkeep-test-attacker";
    for _ in 0..50 {
        let id = std::process::Command::new("id")
            .args(["-u", NAME])
            .output()
            .unwrap();
        if id.status.success() {
            return String::from_utf8_lossy(&id.stdout).trim().parse().unwrap();
        }
        // Exit 9 (exists: another test made it meanwhile) or 10 (the password file is
        // locked by a parallel useradd): look again.
        let _ = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                NAME,
            ])
            .status();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("cannot create user {NAME}");
}

fn owner_and_mode(p: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.mode() & 0o7777)
}

/// Entries of a folder, sorted.
fn entries(p: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn scratch_or_socket_folders_another_user_controls_are_refused() {
    let _shared = shared();
    let uid = attacker();
    let (vm, env) = backed_up("planted");
    let good = newest_id(&env, &vm.name);
    // A world-writable sticky folder like /var/tmp, where anyone can make the folder
    // vmkeep would use first.
    let public = env.path("public");
    std::fs::create_dir(&public).unwrap();
    lv::set_mode(&public, 0o1777);
    let planted = public.join("vmkeep");
    std::fs::create_dir(&planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(uid), Some(uid)).unwrap();
    lv::set_mode(&planted, 0o777);
    // A symlink planted where the scratch folder would be, at a folder of root's.
    let victim = env.path("victim");
    std::fs::create_dir(&victim).unwrap();
    lv::set_mode(&victim, 0o750);
    let link = public.join("scratch-link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(uid), Some(uid)).unwrap();
    let run = env.path("run");
    let scratch = env.path("scratch");
    for (run_dir, scratch_dir, needle) in [
        (&run, &planted, "owned by uid"),
        (&planted, &scratch, "owned by uid"),
        (&run, &link, "symlink"),
        (&run, &public, "lets other users"),
    ] {
        env.live_folders(run_dir, scratch_dir);
        vm.guest_write(0, 0x22, "2M", "64k");
        let err = env.fails(&["backup", &vm.name], 1);
        let bad = if run_dir == &run {
            scratch_dir
        } else {
            run_dir
        };
        assert!(
            err.lines().count() == 1
                && err.contains(&bad.display().to_string())
                && err.contains(needle),
            "{err}"
        );
        // Nothing made, chowned or chmodded in what another user controls.
        assert_eq!(owner_and_mode(&planted), (uid, 0o777));
        assert!(entries(&planted).is_empty(), "{:?}", entries(&planted));
        assert_eq!(owner_and_mode(&victim), (0, 0o750));
        assert!(entries(&victim).is_empty(), "{:?}", entries(&victim));
        assert_eq!(
            entries(&public),
            ["scratch-link".to_string(), "vmkeep".to_string()]
        );
        // Nothing already backed up is lost, and no job was left running.
        assert_eq!(newest_id(&env, &vm.name), good);
        assert_no_backup_job(&vm);
    }
}

#[test]
fn two_repositories_backing_up_one_running_vm_at_once_both_succeed() {
    let _shared = shared();
    let vm = TestVm::start("together", &[("vda", "qcow2", 32)]);
    // One run folder and one scratch folder for both, as with the defaults.
    let (a, b) = sharing_folders();
    vm.guest_write(0, 0x31, "0", "4M");
    for round in 0..2 {
        if round == 1 {
            vm.guest_write(0, 0x32, "8M", "64k");
        }
        // Started together: libvirt runs one backup job per VM, so one of them may wait
        // for the other's job; it never ends it.
        let children: Vec<_> = [&a, &b]
            .iter()
            .map(|env| env.spawn(&["backup", &vm.name]))
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            succeeded(&out, &format!("round {round}: "));
        }
        let now = disk_now(&vm, "vda");
        for env in [&a, &b] {
            assert!(
                env.latest(&vm.name, "vda") == now,
                "round {round}: latest/vda.raw differs from the disk"
            );
            assert_eq!(env.generations(&vm.name).len(), round + 1);
        }
        assert_no_backup_job(&vm);
    }
    // Each chain is still its own: the second round was incremental in both.
    for env in [&a, &b] {
        assert_eq!(newest_mode(env, &vm), "incr");
    }
    let cps = checkpoints(&vm.name);
    assert_eq!(cps.len(), 2, "{cps:?}");
}

#[test]
fn a_running_disk_shrunk_and_grown_back_restores_as_the_guest_sees_it() {
    // virsh blockresize cuts off the tail of a running disk and grows it back: the guest
    // reads zeros past the cut at the size the last generation recorded.
    let _shared = shared();
    let (vm, env) = backed_up_with("regrow", ("vda", "qcow2", 32), "12M");
    let gen0 = disk_now(&vm, "vda");
    let path = vm.disk("vda").path.to_str().unwrap().to_string();
    let resize = |size: &str| {
        let out = std::process::Command::new("virsh")
            .args(["blockresize", &vm.name, &path, size])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (shrunk, why) = resize("4M");
    assert!(shrunk, "blockresize to 4M: {why}");
    let (grown, why) = resize("32M");
    assert!(grown, "blockresize to 32M: {why}");
    let now = disk_now(&vm, "vda");
    assert!(
        now[4 << 20..12 << 20].iter().all(|&b| b == 0),
        "the cut-off tail reads zeros"
    );
    let (mode, _) = backup(&env, &vm);
    assert_eq!(mode, "incr", "the checkpoint's bitmap is still the disk's");
    assert_latest_is_disk(&env, &vm, "vda");
    assert!(restored(&env, &vm.name, "0", "vda") == now);
    assert!(restored(&env, &vm.name, "1", "vda") == gen0);
    env.ok(&["check", &vm.name, "--deep"]);
}

// ---------------------------------------------------------------------------------------
// Firmware and TPM state

/// libvirt's swtpm state folder of the domain with UUID `uuid`.
fn swtpm_dir(uuid: &str) -> std::path::PathBuf {
    std::path::Path::new("/var/lib/libvirt/swtpm").join(uuid)
}

fn domuuid(name: &str) -> String {
    virsh(&["domuuid", name]).trim().to_string()
}

/// An emulated TPM's state is saved whole with the generation (a symbolic link the swtpm
/// user planted in its folder is named and never followed), shown by `status`, proven by
/// `check`, and given to a `restore --as-vm` copy in the state folder of its new UUID,
/// where the copy's swtpm starts from it. A flipped byte in the saved file, or a state
/// file the profile does not list, is damage that `check` names and a restore refuses.
#[test]
fn a_tpm_state_is_saved_checked_and_given_to_the_copy() {
    let _shared = shared();
    let tpm = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>";
    let vm = TestVm::define("tpm", &[("vda", "qcow2", 32)], tpm);
    virsh(&["start", &vm.name]);
    let folder = swtpm_dir(&domuuid(&vm.name));
    let permall = folder.join("tpm2/tpm2-00.permall");
    wait_until(30, "swtpm's state file", || permall.exists());
    std::os::unix::fs::symlink("/etc/shadow", folder.join("tpm2/planted")).unwrap();
    vm.guest_write(0, 0x11, "0", "1M");
    let env = Env::live();
    let said = backup_says(&env, &vm);
    assert!(
        said.contains("tpm2/planted is a symbolic link; not saved"),
        "{said}"
    );
    let id = env.generations(&vm.name).pop().unwrap();
    let gen = env.repo().join(&vm.name).join(&id);
    let saved = std::fs::read(gen.join("state.tpm.0")).unwrap();
    assert_eq!(
        saved,
        std::fs::read(&permall).unwrap(),
        "the state file, whole"
    );
    assert!(
        !gen.join("state.tpm.1").exists(),
        "nothing through the link"
    );
    let st = env.status(&vm.name);
    assert_eq!(
        st["vms"][0]["generations"][0]["state"],
        serde_json::json!(["tpm"])
    );
    assert!(env.ok(&["status", &vm.name]).contains("tpm"));
    env.ok(&["check", &vm.name, "--deep"]);

    let new = format!("{}-copy", vm.name);
    let _guard = lv::Undefine(new.clone());
    let dir = env.disk_dir();
    let out = env.ok(&restore_as_vm(&vm.name, &new, &dir));
    let copy_folder = swtpm_dir(&domuuid(&new));
    assert_ne!(copy_folder, folder);
    assert!(
        out.contains(&format!(
            "TPM state of the generation restored to {}",
            copy_folder.display()
        )),
        "{out}"
    );
    assert_eq!(
        std::fs::read(copy_folder.join("tpm2/tpm2-00.permall")).unwrap(),
        saved,
        "the copy's TPM state is the saved one"
    );
    assert!(!copy_folder.join("tpm2/planted").exists());
    virsh(&["start", &new]);
    assert!(
        virsh(&["domstate", &new]).contains("running"),
        "swtpm took the state"
    );
    virsh(&["destroy", &new]);

    // One byte of the saved state flipped: check names the file; a restore refuses.
    flip_byte(&gen.join("state.tpm.0"), 100);
    let e = env.fails(&["check", &vm.name], 3);
    assert!(
        e.contains("state.tpm.0") && e.contains("does not match its digest"),
        "{e}"
    );
    let other = format!("{}-copy2", vm.name);
    let _guard2 = lv::Undefine(other.clone());
    let e = env.fails(&restore_as_vm(&vm.name, &other, &dir), 1);
    assert!(
        e.contains("state.tpm.0: corrupt: TPM state file does not match its digest"),
        "{e}"
    );
    assert!(
        !lv::virsh_quiet(&["dominfo", &other]),
        "nothing defined from damaged state"
    );
    flip_byte(&gen.join("state.tpm.0"), 100);
    env.ok(&["check", &vm.name]);
    // A state file put into the folder that the profile does not list.
    std::fs::write(gen.join("state.tpm.1"), &saved).unwrap();
    let e = env.fails(&["check", &vm.name], 3);
    assert!(
        e.contains("state.tpm.1") && e.contains("does not list"),
        "{e}"
    );
}

/// The image disk `target` of `vm` reads from now, as libvirt's definition names it
/// (`virsh domblklist`: the top of its backing chain).
fn top_image(vm: &TestVm, target: &str) -> std::path::PathBuf {
    virsh(&["domblklist", &vm.name])
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            Some((cols.next()?, cols.next()?))
        })
        .find(|(t, _)| *t == target)
        .map(|(_, p)| std::path::PathBuf::from(p))
        .unwrap_or_else(|| panic!("no disk {target} in {}", vm.name))
}

/// `virsh snapshot-create-as VM NAME --disk-only --atomic` (with `--no-metadata` unless
/// `metadata`): libvirt puts a new qcow2 overlay over disk vda (`IMAGE.NAME` beside it),
/// and the test's disk becomes that overlay. Returns the run's output: whether it
/// succeeded and what it said.
fn external_snapshot(vm: &mut TestVm, name: &str, metadata: bool) -> (bool, String) {
    let mut args = vec![
        "-c",
        lv::URI,
        "snapshot-create-as",
        &vm.name,
        name,
        "--disk-only",
        "--atomic",
    ];
    if !metadata {
        args.push("--no-metadata");
    }
    let out = std::process::Command::new("virsh")
        .args(&args)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let top = top_image(vm, "vda");
    if out.status.success() {
        assert!(
            top.to_str().unwrap().ends_with(&format!(".{name}")),
            "the overlay is the disk now: {top:?}"
        );
    }
    vm.disks[0].path = top;
    (out.status.success(), said)
}

/// Write `len` bytes of `pattern` at `offset` into the qcow2 image `image` of a shut-off
/// VM (`qemu-io`, which updates the image's enabled persistent bitmaps as QEMU would).
fn offline_write(image: &std::path::Path, pattern: u8, offset: &str, len: &str) {
    lv::run(
        std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {pattern:#x} {offset} {len}"),
            ])
            .arg(image),
    );
}

/// The persistent bitmaps stored in the qcow2 image `image` (its own layer only).
fn stored_bitmaps(image: &std::path::Path) -> Vec<String> {
    let out = lv::run(
        std::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(image),
    );
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    info.pointer("/format-specific/data/bitmaps")
        .and_then(|b| b.as_array())
        .map(|bs| {
            bs.iter()
                .filter_map(|b| b["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Generations `0..` (newest first) of disk vda restore to `expected` (the disk as each
/// generation read it, newest first).
fn assert_generations(env: &Env, vm: &TestVm, expected: &[&Vec<u8>]) {
    assert_eq!(env.generations(&vm.name).len(), expected.len());
    for (back, disk) in expected.iter().enumerate() {
        assert!(
            restored(env, &vm.name, &back.to_string(), "vda") == **disk,
            "generation -g {back} differs from the disk it read"
        );
    }
}

/// External snapshots of a running VM (`snapshot-create-as --disk-only`, without and with
/// libvirt's snapshot metadata) between backups: libvirt re-creates the checkpoint's bitmap
/// in each new overlay and its backup job merges the bitmaps of the chain, so every run is
/// incremental and reads exactly what was written — before the snapshot (in the base),
/// after it (in the overlay), and the same block in both — and each generation restores to
/// the disk it read; the newest also as a new VM, whose definition names none of the chain.
#[test]
fn external_snapshots_of_a_running_vm_stay_incremental() {
    let _shared = shared();
    let mut vm = TestVm::start("snaprun", &[("vda", "qcow2", 32)]);
    let env = Env::live();
    let base = vm.disk("vda").path.clone();
    vm.guest_write(0, 0x11, "0", "2M");
    assert_eq!(backup(&env, &vm).0, "full");
    let gen0 = disk_now(&vm, "vda");
    // Before the snapshot (into the base), one of them overwritten after it.
    vm.guest_write(0, 0x22, "4M", "64k");
    vm.guest_write(0, 0x23, "6M", "64k");
    let (made, said) = external_snapshot(&mut vm, "s1", false);
    assert!(made, "{said}");
    vm.guest_write(0, 0x33, "8M", "64k");
    vm.guest_write(0, 0x34, "6M", "64k");
    assert_eq!(
        backup(&env, &vm),
        ("incr".to_string(), 3 * 65536),
        "incremental across the chain: 4M and 6M (base) and 8M (overlay)"
    );
    assert_latest_is_disk(&env, &vm, "vda");
    let gen1 = disk_now(&vm, "vda");
    assert!(gen1[4 << 20..(4 << 20) + 65536].iter().all(|&b| b == 0x22));
    assert!(gen1[6 << 20..(6 << 20) + 65536].iter().all(|&b| b == 0x34));

    // A third run after a write into the overlay only.
    vm.guest_write(0, 0x44, "10M", "64k");
    assert_eq!(backup(&env, &vm), ("incr".to_string(), 65536));
    assert_latest_is_disk(&env, &vm, "vda");
    let gen2 = disk_now(&vm, "vda");

    // A second snapshot, with libvirt's snapshot metadata: a chain of three.
    vm.guest_write(0, 0x55, "12M", "64k");
    let (made, said) = external_snapshot(&mut vm, "s2", true);
    assert!(made, "{said}");
    vm.guest_write(0, 0x56, "14M", "64k");
    assert_eq!(backup(&env, &vm), ("incr".to_string(), 2 * 65536));
    assert_latest_is_disk(&env, &vm, "vda");
    let gen3 = disk_now(&vm, "vda");
    assert_generations(&env, &vm, &[&gen3, &gen2, &gen1, &gen0]);
    env.ok(&["check", &vm.name, "--deep"]);

    // The saved definition names the chain; a new VM from it gets one flat image.
    let saved =
        std::fs::read_to_string(env.repo().join(&vm.name).join("latest/domain.xml")).unwrap();
    assert!(saved.contains("<backingStore"), "{saved}");
    let new = format!("{}-copy", vm.name);
    let _guard = lv::Undefine(new.clone());
    let dir = env.disk_dir();
    let mut args = restore_as_vm(&vm.name, &new, &dir);
    args.push("--start");
    env.ok(&args);
    assert!(virsh(&["domstate", &new]).contains("running"));
    let xml = virsh(&["dumpxml", "--inactive", &new]);
    let (paths, _) = paths_and_ports(&xml);
    for layer in [&base, &vm.disk("vda").path] {
        assert!(
            !paths.contains(layer.to_str().unwrap()),
            "the copy names {layer:?}:\n{xml}"
        );
    }
    assert!(
        !xml.contains("<backingStore type"),
        "no backing chain:\n{xml}"
    );
    let copy = lv::read_all(
        dir.join(format!("{new}-vda.qcow2")).to_str().unwrap(),
        "qcow2",
        &vm.path("copy.raw"),
    );
    assert!(copy == gen3, "the new VM's disk is the generation");
}

/// A running VM backed up (full, its checkpoint's bitmap in the base), written to, given an
/// external snapshot, written to again (one block in both layers), shut off cleanly (QEMU
/// saves the bitmaps into both layers), and written to in the overlay while off: base
/// 4M and 6M, overlay 6M, 8M and 12M. Returns the VM (its disk: the overlay), its
/// environment, the base image and the disk as the first generation read it.
fn chained_then_shut_off(tag: &str) -> (TestVm, Env, std::path::PathBuf, Vec<u8>) {
    let mut vm = TestVm::start(tag, &[("vda", "qcow2", 32)]);
    let env = Env::live();
    let base = vm.disk("vda").path.clone();
    vm.guest_write(0, 0x11, "0", "2M");
    assert_eq!(backup(&env, &vm).0, "full");
    let gen0 = disk_now(&vm, "vda");
    vm.guest_write(0, 0x22, "4M", "64k");
    vm.guest_write(0, 0x23, "6M", "64k");
    let (made, said) = external_snapshot(&mut vm, "s1", false);
    assert!(made, "{said}");
    vm.guest_write(0, 0x33, "8M", "64k");
    vm.guest_write(0, 0x34, "6M", "64k");
    virsh(&["destroy", &vm.name, "--graceful"]);
    let cp = vmkeep_checkpoints(&vm);
    assert_eq!(cp.len(), 1, "{cp:?}");
    // libvirt re-created the checkpoint's bitmap in the overlay; both layers hold it.
    assert_eq!(stored_bitmaps(&base), cp, "base");
    assert_eq!(stored_bitmaps(&vm.disk("vda").path), cp, "overlay");
    offline_write(&vm.disk("vda").path, 0x44, "12M", "64k");
    (vm, env, base, gen0)
}

/// A shut-off VM whose disk got an external snapshot since its last backup, read through
/// a backup job (`--offline-read start`, the default): libvirt merges the bitmaps of both
/// layers, so the run is incremental, reads every block written before and after the
/// snapshot, and restores as the disk. libvirt 9.0 refuses an external snapshot of a
/// shut-off VM that has checkpoints; should a later one make it, the run must still equal
/// the disk.
#[test]
fn a_shut_off_vm_with_an_external_snapshot_started_for_its_backup() {
    let _shared = shared();
    let (mut vm, env, _base, gen0) = chained_then_shut_off("snapstart");
    let (made, said) = external_snapshot(&mut vm, "off1", false);
    if made {
        offline_write(&vm.disk("vda").path, 0x45, "14M", "64k");
    } else {
        assert!(said.contains("checkpoint exists"), "{said}");
    }
    let (mode, read) = backup(&env, &vm);
    assert_eq!(domstate(&vm), "shut off", "shut off again after the backup");
    assert_latest_is_disk(&env, &vm, "vda");
    if !made {
        assert_eq!(
            (mode.as_str(), read),
            ("incr", 4 * 65536),
            "4M, 6M, 8M and 12M"
        );
    }
    let gen1 = disk_now(&vm, "vda");
    // And the next run, from the checkpoint the backup job made in the overlay.
    offline_write(&vm.disk("vda").path, 0x46, "16M", "64k");
    assert_eq!(backup(&env, &vm), ("incr".to_string(), 65536));
    assert_latest_is_disk(&env, &vm, "vda");
    let gen2 = disk_now(&vm, "vda");
    assert_generations(&env, &vm, &[&gen2, &gen1, &gen0]);
    env.ok(&["check", &vm.name, "--deep"]);
}

/// The same chain read from its files (`--offline-read files`, vmkeep's own qemu-nbd):
/// the checkpoint's bitmap is in both layers, so the changes are the union of both
/// bitmaps — the writes before the snapshot are only in the base's. The run is incremental
/// and reads every block written before and after the snapshot; none is missed. Then,
/// with no checkpoint left (libvirt cannot make one for a shut-off VM), an external
/// snapshot of the shut-off VM (which libvirt then allows) and a write into it: a diff,
/// the disk again.
#[test]
fn a_shut_off_vm_with_an_external_snapshot_read_from_its_files() {
    let _shared = shared();
    let (mut vm, env, base, gen0) = chained_then_shut_off("snapfiles");
    let cp = vmkeep_checkpoints(&vm);
    env.ok(&["backup", &vm.name, "--offline-read", "files"]);
    assert_eq!(
        newest(&env, &vm.name, "vda"),
        ("incr".to_string(), 4 * 65536),
        "the union of both layers' bitmaps: 4M, 6M, 8M and 12M"
    );
    assert_latest_is_disk(&env, &vm, "vda");
    let gen1 = disk_now(&vm, "vda");
    // The old checkpoint is gone, with its bitmap in every layer.
    assert!(vmkeep_checkpoints(&vm).is_empty());
    for layer in [&base, &vm.disk("vda").path] {
        let left: Vec<_> = stored_bitmaps(layer)
            .into_iter()
            .filter(|b| cp.contains(b))
            .collect();
        assert!(left.is_empty(), "{layer:?} keeps {left:?}");
    }

    let (made, said) = external_snapshot(&mut vm, "off1", false);
    assert!(made, "no checkpoint, so libvirt makes it: {said}");
    assert!(stored_bitmaps(&vm.disk("vda").path).is_empty());
    offline_write(&vm.disk("vda").path, 0x55, "14M", "64k");
    env.ok(&["backup", &vm.name, "--offline-read", "files"]);
    assert_newest(&env, &vm, "diff");
    let gen2 = disk_now(&vm, "vda");
    assert_generations(&env, &vm, &[&gen2, &gen1, &gen0]);
    env.ok(&["check", &vm.name, "--deep"]);
}

/// A chain whose base lost the checkpoint's bitmap (`qemu-img bitmap --remove`) while
/// the overlay keeps it: by libvirt's rules the chain is valid (only the top holds the
/// bitmap), but the newest generation read the base, and the writes made there before
/// the snapshot are in no bitmap now. Read from the files and through a backup job, the
/// run is a diff saying why, never incremental from the overlay's bitmap alone, and its
/// newest image is the disk.
#[test]
fn a_chain_whose_base_lost_its_bitmap_is_read_in_full() {
    let _shared = shared();
    for how in ["files", "start"] {
        let (vm, env, base, _) = chained_then_shut_off(&format!("snaplost{how}"));
        for b in vmkeep_checkpoints(&vm) {
            lv::run(
                std::process::Command::new("qemu-img")
                    .args(["bitmap", "--remove"])
                    .arg(&base)
                    .arg(&b),
            );
        }
        let out = env.run(&[
            "backup",
            &vm.name,
            "--offline-read",
            how,
            "--quiesce",
            "off",
        ]);
        let err = succeeded(&out, how);
        assert_newest(&env, &vm, "diff");
        let why: Vec<_> = err
            .lines()
            .filter(|l| l.contains("incr not possible"))
            .collect();
        assert_eq!(why.len(), 1, "{how}: said once: {err}");
        assert!(why[0].contains(base.to_str().unwrap()), "{how}: {err}");
        assert_latest_is_disk(&env, &vm, "vda");
    }
}

/// Adversarial: an overlay made outside libvirt (`qemu-img create -b`) while the VM is
/// shut off, and the definition pointed at it: the overlay holds no bitmap, the base's
/// checkpoint bitmap stopped seeing writes. Read from the files and, after a backup job
/// made a fresh checkpoint, through a backup job over a second such overlay: each run is
/// a diff saying why, never incremental from the stale bitmap, and its newest image is
/// the disk.
#[test]
fn an_overlay_made_outside_libvirt_is_read_in_full() {
    let _shared = shared();
    let (mut vm, env) = backed_up_with("snapout", ("vda", "qcow2", 32), "2M");
    vm.guest_write(0, 0x22, "4M", "64k");
    virsh(&["destroy", &vm.name, "--graceful"]);
    let overlay = |vm: &mut TestVm, name: &str| {
        let below = vm.disk("vda").path.clone();
        let top = vm.path(name);
        lv::run(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&below)
                .arg(&top),
        );
        let xml = virsh(&["dumpxml", "--inactive", "--security-info", &vm.name]);
        let xml = xml.replace(below.to_str().unwrap(), top.to_str().unwrap());
        let file = vm.path("domain.xml");
        std::fs::write(&file, xml).unwrap();
        virsh(&["define", file.to_str().unwrap()]);
        assert_eq!(top_image(vm, "vda"), top);
        vm.disks[0].path = top;
    };
    overlay(&mut vm, "out1.qcow2");
    offline_write(&vm.disk("vda").path, 0x33, "8M", "64k");
    let err = succeeded(
        &env.run(&["backup", &vm.name, "--offline-read", "files"]),
        "files",
    );
    assert_newest(&env, &vm, "diff");
    assert!(err.contains("incr not possible"), "{err}");
    // A backup job makes a checkpoint (its bitmap in out1), then another outside overlay.
    offline_write(&vm.disk("vda").path, 0x44, "10M", "64k");
    env.ok(&["backup", &vm.name, "--offline-read", "start"]);
    assert_latest_is_disk(&env, &vm, "vda");
    assert_eq!(vmkeep_checkpoints(&vm).len(), 1);
    overlay(&mut vm, "out2.qcow2");
    offline_write(&vm.disk("vda").path, 0x55, "12M", "64k");
    let err = backup_says(&env, &vm);
    assert_newest(&env, &vm, "diff");
    assert!(err.contains("is broken"), "{err}");
    assert_eq!(domstate(&vm), "shut off");
    env.ok(&["check", &vm.name, "--deep"]);
}
