//! The real test guest (scripts/guest-image.sh, tests/support/guest.rs): it boots under
//! TCG, its agent answers, it reads the known files of its data disk and writes new ones,
//! `virsh domfsfreeze`/`domfsthaw` freeze and thaw its file system, and what it wrote is
//! on the disk image once it is shut down; booted by UEFI firmware (OVMF), a variable it
//! sets is kept in its `<nvram>` file across a restart. Backed up frozen (and killed while
//! frozen), it restores: copies made with `restore --as-vm --start` boot and read their
//! generation's files through their agent (also one made from an offsite target after the
//! repository was deleted), and one file of an older generation is read
//! through `serve` + nbdfuse as docs/recovery.md shows it (a crash-consistent one through
//! a qcow2 overlay that replays its journal). Skipped only when VMKEEP_TEST_GUEST is unset.

#![cfg(feature = "libvirt")]

mod common;
#[path = "support/guest.rs"]
#[allow(dead_code)]
mod guest;
#[path = "../../vmkeep/tests/support/libvirt.rs"]
#[allow(dead_code)]
mod lv;

use common::noise;
use guest::{debugfs_cat, e2fsck_clean, Firmware, Guest, OVMF_VARS, READY};
use lv::virsh;
use serde_json::json;

const HELLO: &[u8] = b"hello from the host\n";

/// The ext4 image `raw` is clean (`e2fsck -fn`) and holds each file with its content.
fn assert_image_holds(raw: &std::path::Path, files: &[(&str, &[u8])]) {
    e2fsck_clean(raw).unwrap();
    for (path, bytes) in files {
        let got = debugfs_cat(raw, path).unwrap();
        assert!(
            got == *bytes,
            "{path}: {} bytes on the image, {} expected",
            got.len(),
            bytes.len()
        );
    }
}

#[test]
fn the_guest_boots_reads_writes_freezes_and_its_writes_reach_the_disk() {
    let known = noise(1, 200 * 1024);
    let Some(g) = Guest::boot("basic", &[("hello.txt", HELLO), ("dir/known.bin", &known)]) else {
        return;
    };
    eprintln!(
        "guest {}: agent answered {:.1} s after start",
        g.name,
        g.boot_time.as_secs_f64()
    );
    assert!(g.console_log().contains(READY), "{}", g.console_log());
    assert!(
        g.console_log()
            .contains("vmkeep-guest: data disk /dev/vda mounted at /data"),
        "{}",
        g.console_log()
    );

    // The known files, read by the guest from its data disk.
    assert_eq!(g.read_file("/data/hello.txt"), HELLO);
    assert_eq!(g.read_file("/data/dir/known.bin"), known);

    // guest-exec: exit codes and standard output as the guest's command left them.
    assert_eq!(
        g.exec("/bin/sh", &["-c", "echo out; exit 7"]),
        (7, b"out\n".to_vec())
    );
    let missing = g.exec("/bin/cat", &["/data/no-such-file"]);
    assert_ne!(missing.0, 0, "cat of a missing file succeeded");

    // A new file, larger than one piece of write_file, read back through the guest.
    let written = noise(2, 150 * 1024 + 17);
    assert_eq!(g.exec("/bin/mkdir", &["-p", "/data/written"]).0, 0);
    g.write_file("/data/written/new.bin", &written);
    assert_eq!(g.read_file("/data/written/new.bin"), written);

    // Freeze: what the guest wrote (without a sync) is on the image, whose file system is
    // clean, while it stays frozen; the agent refuses other commands until the thaw.
    g.write_file(
        "/data/before-freeze.txt",
        b"written just before the freeze\n",
    );
    let froze = virsh(&["domfsfreeze", &g.name]);
    assert!(froze.contains("Froze 1 filesystem(s)"), "{froze}");
    assert_eq!(
        g.agent(&json!({"execute": "guest-fsfreeze-status"})),
        "frozen"
    );
    let refused =
        g.agent_try(&json!({"execute": "guest-exec", "arguments": {"path": "/bin/true"}}));
    assert!(
        refused.is_err(),
        "guest-exec ran in a frozen guest: {refused:?}"
    );
    assert_image_holds(
        &g.disk_raw(),
        &[
            ("/before-freeze.txt", b"written just before the freeze\n"),
            ("/written/new.bin", &written),
        ],
    );
    let thawed = virsh(&["domfsthaw", &g.name]);
    assert!(thawed.contains("Thawed 1 filesystem(s)"), "{thawed}");
    assert_eq!(
        g.agent(&json!({"execute": "guest-fsfreeze-status"})),
        "thawed"
    );

    // After the thaw the guest writes again; shut down, the image holds it all.
    g.write_file("/data/after-thaw.txt", b"after the thaw\n");
    g.sync();
    g.shutdown();
    assert!(
        g.console_log().contains("reboot: Power down"),
        "{}",
        g.console_log()
    );
    let raw = g.disk_raw();
    assert_image_holds(
        &raw,
        &[
            ("/after-thaw.txt", b"after the thaw\n"),
            ("/written/new.bin", &written),
            ("/hello.txt", HELLO),
            ("/dir/known.bin", &known),
        ],
    );
    // A file the guest never wrote is reported missing, never read as empty.
    let err = debugfs_cat(&raw, "/no-such-file").unwrap_err();
    assert!(err.contains("not found"), "{err}");
}

/// `needle` occurs somewhere in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_uefi_guest_keeps_the_variable_it_set_in_its_nvram_across_a_restart() {
    let Some(mut g) = Guest::boot_with("uefi", &[("hello.txt", HELLO)], Firmware::Uefi) else {
        return;
    };
    eprintln!(
        "UEFI guest {}: agent answered {:.1} s after start",
        g.name,
        g.boot_time.as_secs_f64()
    );
    let log = g.console_log();
    assert!(log.contains("efi: EFI v"), "not booted by UEFI:\n{log}");
    assert!(
        log.contains("vmkeep-guest: UEFI variables at /sys/firmware/efi/efivars"),
        "{log}"
    );
    assert_eq!(g.read_file("/data/hello.txt"), HELLO);

    // efivarfs: 4 bytes of attributes (non-volatile, boot and runtime access), then the
    // data, in one write.
    let name = "VmkeepTest-6c1f3b2a-8d4e-4f5a-9b7c-0e2d1a3f4b5c";
    let path = format!("/sys/firmware/efi/efivars/{name}");
    let mut var = vec![7, 0, 0, 0];
    var.extend_from_slice(b"kept across boots");
    let of = format!("of={path}");
    let dd = g.exec_with_input("/bin/dd", &[&of, "bs=4096"], &var);
    assert_eq!(dd.code, 0, "{}", String::from_utf8_lossy(&dd.err));
    assert_eq!(g.read_file(&path), var);

    g.shutdown();
    // The variable is in the domain's own variable store, never in OVMF's template.
    let nvram = std::fs::read(g.nvram.as_ref().unwrap()).unwrap();
    let utf16: Vec<u8> = "VmkeepTest"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    assert!(
        contains(&nvram, &utf16),
        "variable name not in the NVRAM file"
    );
    assert!(
        contains(&nvram, b"kept across boots"),
        "variable data not in the NVRAM file"
    );
    assert!(!contains(&std::fs::read(OVMF_VARS).unwrap(), &utf16));

    g.start();
    assert_eq!(
        g.read_file(&path),
        var,
        "the variable did not survive the restart"
    );
}

// ---------------------------------------------------------------------------------------
// Application-consistent backups (--quiesce)

/// The guest agent's freeze state.
fn freeze_status(g: &Guest) -> String {
    g.agent(&json!({"execute": "guest-fsfreeze-status"}))
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The consistency `status --json` records for the newest generation of `vm`.
fn newest_consistency(env: &common::Env, vm: &str) -> String {
    env.status(vm)["vms"][0]["generations"][0]["consistency"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// With the guest writing all the time, a backup frozen through the agent restores to a
/// file system `e2fsck` finds clean, holding what the guest had synced before it; the guest
/// is thawed afterwards, and the generation says it was frozen.
#[test]
fn a_frozen_backup_of_a_busy_guest_restores_a_clean_file_system() {
    let synced = noise(7, 300 * 1024);
    let Some(g) = Guest::boot("freeze", &[("hello.txt", HELLO)]) else {
        return;
    };
    g.write_file("/data/synced.bin", &synced);
    g.sync();
    // A writer that never stops (its output nowhere, so guest-exec returns at once).
    let (code, _) = g.exec(
        "/bin/sh",
        &[
            "-c",
            "(while :; do dd if=/dev/urandom of=/data/busy.bin bs=64k count=8 2>/dev/null; done) </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(code, 0);
    let env = common::Env::live();
    let out = env.run(&["backup", &g.name, "--quiesce", "require"]);
    let e = common::stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(!e.contains("crash-consistent"), "{e}");
    assert_eq!(newest_consistency(&env, &g.name), "frozen");
    assert_eq!(
        freeze_status(&g),
        "thawed",
        "the guest is thawed after the backup"
    );
    let raw = env.path("restored.raw");
    std::fs::write(&raw, env.restored(&g.name, "latest", Some("vda"))).unwrap();
    assert_image_holds(&raw, &[("/hello.txt", HELLO), ("/synced.bin", &synced)]);
    // The status table shows it.
    let table = env.ok(&["status", &g.name]);
    assert!(table.contains("frozen"), "{table}");
}

/// A run killed (SIGKILL) while the guest is frozen leaves it frozen; the next backup of
/// the VM thaws it, says so, and is itself frozen and complete.
#[test]
fn a_guest_left_frozen_by_a_killed_run_is_thawed_by_the_next_one() {
    let Some(g) = Guest::boot("killfrozen", &[("hello.txt", HELLO)]) else {
        return;
    };
    let env = common::Env::live();
    let run = env.spawn_paused(&["backup", &g.name], "while-frozen:300");
    run.reached(60, "the freeze");
    assert_eq!(freeze_status(&g), "frozen");
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGKILL) };
    let _ = run.output();
    assert_eq!(freeze_status(&g), "frozen", "nothing thawed the guest yet");
    let out = env.run(&["backup", &g.name]);
    let e = common::stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains("thawed") && e.contains("left frozen by a vmkeep run"),
        "{e}"
    );
    assert_eq!(freeze_status(&g), "thawed");
    assert_eq!(newest_consistency(&env, &g.name), "frozen");
    let raw = env.path("restored.raw");
    std::fs::write(&raw, env.restored(&g.name, "latest", Some("vda"))).unwrap();
    assert_image_holds(&raw, &[("/hello.txt", HELLO)]);
}

// ---------------------------------------------------------------------------------------
// Firmware state restored with a copy

/// The variable store the definition of domain `name` names (`<nvram>PATH</nvram>`).
fn nvram_of(name: &str) -> Option<std::path::PathBuf> {
    virsh(&["dumpxml", name])
        .split("<nvram")
        .nth(1)
        .and_then(|s| s.split('>').nth(1))
        .and_then(|s| s.split('<').next())
        .map(std::path::PathBuf::from)
}

/// A UEFI guest sets a variable; a backup of it running saves its variable store; the
/// copy restored from that generation gets a store of its own (not the original's file)
/// holding the variable, boots by UEFI and reads the variable and its files back.
#[test]
fn a_uefi_copy_boots_with_the_variables_of_its_generation() {
    let Some(g) = Guest::boot_with("uefivars", &[("hello.txt", HELLO)], Firmware::Uefi) else {
        return;
    };
    let name = "VmkeepTest-6c1f3b2a-8d4e-4f5a-9b7c-0e2d1a3f4b5c";
    let path = format!("/sys/firmware/efi/efivars/{name}");
    let mut var = vec![7, 0, 0, 0];
    var.extend_from_slice(b"saved with the generation");
    let of = format!("of={path}");
    let dd = g.exec_with_input("/bin/dd", &[&of, "bs=4096"], &var);
    assert_eq!(dd.code, 0, "{}", String::from_utf8_lossy(&dd.err));

    let env = common::Env::live();
    let out = env.run(&["backup", &g.name]);
    let said = common::succeeded(&out, "backup");
    assert!(!said.contains("not saved"), "{said}");
    let id = env.generations(&g.name).pop().unwrap();
    let saved = std::fs::read(env.repo().join(&g.name).join(&id).join("state.nvram")).unwrap();
    assert_eq!(
        saved,
        std::fs::read(g.nvram.as_ref().unwrap()).unwrap(),
        "the variable store, whole"
    );
    let utf16: Vec<u8> = "VmkeepTest"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    assert!(
        contains(&saved, &utf16),
        "the variable is in the saved store"
    );
    let st = env.status(&g.name);
    assert_eq!(st["vms"][0]["generations"][0]["state"], json!(["nvram"]));
    env.ok(&["check", &g.name]);

    let (new, copy_dir) = lv::new_domain("guest-uefi-copy");
    let disk = copy_dir.path().join(format!("{new}-vda.qcow2"));
    let console = g.dir.path().join(format!("{new}-console.log"));
    let disk_dir = copy_dir.path().to_path_buf();
    let mut copy = Guest::adopt(&new, copy_dir, disk, console);
    let out = env.ok(&common::restore_as_vm(&g.name, &new, &disk_dir));
    let copy_nvram = nvram_of(&new).expect("the copy names a variable store");
    assert_ne!(Some(&copy_nvram), g.nvram.as_ref(), "a store of its own");
    assert!(
        out.contains(&format!(
            "UEFI variables of the generation restored to {}",
            copy_nvram.display()
        )),
        "{out}"
    );
    assert_eq!(std::fs::read(&copy_nvram).unwrap(), saved);
    // A variable the original sets after the backup is not the copy's.
    let later = "/sys/firmware/efi/efivars/VmkeepLater-6c1f3b2a-8d4e-4f5a-9b7c-0e2d1a3f4b5c";
    let of_later = format!("of={later}");
    let dd = g.exec_with_input("/bin/dd", &[&of_later, "bs=4096"], &[7, 0, 0, 0, 1]);
    assert_eq!(dd.code, 0, "{}", String::from_utf8_lossy(&dd.err));
    copy.start();
    let log = copy.console_log();
    assert!(log.contains("efi: EFI v"), "the copy boots by UEFI:\n{log}");
    assert_eq!(
        copy.read_file(&path),
        var,
        "the copy has the generation's variable"
    );
    assert_eq!(copy.read_file("/data/hello.txt"), HELLO);
    assert_ne!(copy.exec("/bin/cat", &[later]).0, 0, "nor a later one");
    assert_eq!(g.read_file(later), [7, 0, 0, 0, 1]);
}

// The guest restored: as a VM that boots, and one file of an older generation

/// `vmkeep backup VM --quiesce require` of the running guest `g`: it must succeed and the
/// new generation be frozen, which the run's summary line says at its end.
fn frozen_backup(env: &common::Env, g: &Guest) {
    let out = env.run(&["backup", &g.name, "--quiesce", "require"]);
    let e = common::succeeded(&out, "backup: ");
    assert!(!e.contains("crash-consistent"), "{e}");
    assert_eq!(newest_consistency(env, &g.name), "frozen");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.trim_end().ends_with("s, frozen"), "{said}");
}

/// `vmkeep restore VM -g GEN --as-vm COPY --disk-dir DIR --start` of the guest `g`, the
/// copy adopted (undefined on drop, before anything else can fail) and booted until its
/// agent answers. The copy's disk is in its own folder and its console log beside the
/// original's, with the copy's name in front (docs/libvirt.md), which its definition must
/// name.
fn restored_copy(env: &common::Env, g: &Guest, gen: &str) -> Guest {
    restored_copy_with(env, g, gen, &[])
}

/// [`restored_copy`] with more arguments for the restore (`--from TARGET --key FILE`).
fn restored_copy_with(env: &common::Env, g: &Guest, gen: &str, more: &[&str]) -> Guest {
    let (name, dir) = lv::new_domain("guest-copy");
    let disk = dir.path().join(format!("{name}-vda.qcow2"));
    let console = g.dir.path().join(format!("{name}-console.log"));
    let disk_dir = dir.path().to_path_buf();
    let mut copy = Guest::adopt(&name, dir, disk, console);
    let t0 = std::time::Instant::now();
    let mut args = common::restore_as_vm(&g.name, &name, &disk_dir);
    args.extend(["-g", gen, "--start"]);
    args.extend_from_slice(more);
    common::succeeded(&env.run(&args), "restore --as-vm: ");
    copy.wait_for_agent(t0);
    eprintln!(
        "copy {name} of generation {gen}: agent answered {:.1} s after the restore began",
        copy.boot_time.as_secs_f64()
    );
    let xml = virsh(&["dumpxml", &name]);
    for path in [&copy.disk, &copy.console] {
        assert!(
            xml.contains(&format!("'{}'", path.display())),
            "the copy's definition does not name {}:\n{xml}",
            path.display()
        );
    }
    assert!(
        !xml.contains(&format!("'{}'", g.disk.display()))
            && !xml.contains(&format!("'{}'", g.console.display())),
        "the copy names the original's disk or console:\n{xml}"
    );
    let log = copy.console_log();
    assert!(log.contains(READY), "{log}");
    assert!(
        log.contains("vmkeep-guest: data disk /dev/vda mounted at /data"),
        "{log}"
    );
    copy
}

/// The guest's file `path` does not exist (cat fails, saying so).
fn assert_missing(g: &Guest, path: &str) {
    let e = g.exec_with_input("/bin/cat", &[path], &[]);
    assert_ne!(e.code, 0, "{path} exists in {}", g.name);
    let err = String::from_utf8_lossy(&e.err);
    assert!(err.contains("No such file"), "{err}");
}

/// Two frozen backups of the guest, then the original changes its file once more: the
/// newest generation and the older one (`-g 1`), each restored as a new VM and started,
/// boot the real guest, which reads the files of its own generation back through its
/// agent — neither the other generation's nor what the original holds now. A copy's writes
/// stay on its own disk.
#[test]
fn restored_copies_of_the_guest_boot_and_read_the_files_of_their_generation() {
    let first = noise(11, 100 * 1024 + 5);
    let second = noise(12, 120 * 1024 + 3);
    let now: &[u8] = b"written by the original after the last backup\n";
    let Some(g) = Guest::boot("restore", &[("hello.txt", HELLO)]) else {
        return;
    };
    let env = common::Env::live();
    g.write_file("/data/state.bin", &first);
    g.sync();
    frozen_backup(&env, &g);
    g.write_file("/data/state.bin", &second);
    g.write_file("/data/only-in-2.txt", b"the second generation only\n");
    g.sync();
    frozen_backup(&env, &g);
    g.write_file("/data/state.bin", now);
    g.sync();
    assert_eq!(env.generations(&g.name).len(), 2);

    {
        let copy = restored_copy(&env, &g, "latest");
        assert!(
            copy.read_file("/data/state.bin") == second,
            "latest: state.bin"
        );
        assert_eq!(
            copy.read_file("/data/only-in-2.txt"),
            b"the second generation only\n"
        );
        assert_eq!(copy.read_file("/data/hello.txt"), HELLO);
        // The copy writes to its own disk: the original still reads its own content.
        copy.write_file("/data/state.bin", b"written by the copy\n");
        copy.sync();
        assert_eq!(copy.read_file("/data/state.bin"), b"written by the copy\n");
        assert_eq!(g.read_file("/data/state.bin"), now);
    }
    {
        let copy = restored_copy(&env, &g, "1");
        assert!(
            copy.read_file("/data/state.bin") == first,
            "-g 1: state.bin"
        );
        assert_missing(&copy, "/data/only-in-2.txt");
        assert_eq!(copy.read_file("/data/hello.txt"), HELLO);
    }
    assert_eq!(g.read_file("/data/state.bin"), now);
}

/// A UEFI guest sets a variable and is backed up twice (frozen), its file changed in
/// between; the generations are synced to a folder target and the repository deleted.
/// The older generation, restored from the target alone as a new VM and started, boots by
/// UEFI with the variable (its store came from the manifest) and reads that generation's
/// files: not the newer one's.
#[test]
fn a_copy_made_from_an_offsite_target_alone_boots_with_its_generation() {
    let first = noise(21, 90 * 1024 + 7);
    let Some(g) = Guest::boot_with("offsite", &[("hello.txt", HELLO)], Firmware::Uefi) else {
        return;
    };
    let var_path = "/sys/firmware/efi/efivars/VmkeepOffsite-6c1f3b2a-8d4e-4f5a-9b7c-0e2d1a3f4b5c";
    let mut var = vec![7, 0, 0, 0];
    var.extend_from_slice(b"synced with the generation");
    let of = format!("of={var_path}");
    let dd = g.exec_with_input("/bin/dd", &[&of, "bs=4096"], &var);
    assert_eq!(dd.code, 0, "{}", String::from_utf8_lossy(&dd.err));
    let env = common::Env::live();
    g.write_file("/data/state.bin", &first);
    g.sync();
    frozen_backup(&env, &g);
    g.write_file("/data/state.bin", b"the second generation\n");
    g.write_file("/data/only-in-2.txt", b"the second generation only\n");
    g.sync();
    frozen_backup(&env, &g);
    let older = env.generations(&g.name)[0].clone();
    let key = env.path("offsite.key");
    let key = key.to_str().unwrap();
    env.ok(&["key", "create", key]);
    let target = format!("file://{}", env.path("target").display());
    env.ok(&["sync", &g.name, "--to", &target, "--key", key]);
    std::fs::remove_dir_all(env.repo()).unwrap();

    let copy = restored_copy_with(&env, &g, &older, &["--from", &target, "--key", key]);
    assert!(
        copy.console_log().contains("efi: EFI v"),
        "the copy boots by UEFI:\n{}",
        copy.console_log()
    );
    assert_ne!(nvram_of(&copy.name), g.nvram, "a variable store of its own");
    assert_eq!(copy.read_file(var_path), var, "the generation's variable");
    assert!(copy.read_file("/data/state.bin") == first, "state.bin");
    assert_missing(&copy, "/data/only-in-2.txt");
    assert_eq!(copy.read_file("/data/hello.txt"), HELLO);
}

/// Wait (up to 30 s) for `child` to end: its exit status, or `None` after killing it.
fn ended_within_30s(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `vmkeep serve` run by a test: stopped on drop (SIGTERM, killed when it does not end
/// within 30 s), also when the test panics.
struct Serving(Option<std::process::Child>);

impl Serving {
    /// SIGTERM (what `kill %1` sends): the server's exit status, `None` when it had to be
    /// killed after 30 s.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.0.take()?;
        // SAFETY: kill(2) on the child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        ended_within_30s(&mut child)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A mount of the test's, released on drop, also when the test panics: unmounted
/// (`umount`, lazily when busy), its loop device detached, the nbdfuse process that
/// serves it waited for (it ends once unmounted) and killed after 30 s.
struct Mounted {
    /// The mount point.
    at: std::path::PathBuf,
    /// nbdfuse, when it serves the mount.
    fuse: Option<std::process::Child>,
    /// The loop device whose file system is mounted at `at`.
    loop_dev: Option<String>,
}

impl Mounted {
    /// Unmount, detach and wait as on drop: nbdfuse's exit status (`None` when there is
    /// none or it had to be killed).
    fn release(&mut self) -> Option<std::process::ExitStatus> {
        let umount = |lazy: bool| {
            let mut c = std::process::Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(&self.at).output().is_ok_and(|o| o.status.success())
        };
        if mounted(&self.at) && !umount(false) {
            umount(true);
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &dev])
                .output();
        }
        let mut child = self.fuse.take()?;
        ended_within_30s(&mut child)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether something is mounted at `at` (`/proc/self/mountinfo`).
fn mounted(at: &std::path::Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let at = at.to_str().unwrap();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|p| p == at))
}

/// `vmkeep serve VM --generation GEN --socket DIR/serve.sock` in the background, once it
/// printed the URI of the disk `vda` on that socket (which it must): the server and that
/// URI. Its log is `DIR/serve.log`.
fn serve(env: &common::Env, vm: &str, gen: &str) -> (Serving, String) {
    let sock = env.path("serve.sock");
    let mut cmd = env.std_cmd(&["serve", vm, "--generation", gen, "--socket"]);
    cmd.arg(&sock);
    let log = env.path("serve.log");
    let (child, line) = common::spawn_first_line(&mut cmd, &log);
    let server = Serving(Some(child));
    let uri = format!("nbd+unix:///vda?socket={}", sock.display());
    assert!(
        line.split_whitespace().any(|w| w == uri),
        "serve printed {line:?}, not {uri}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (server, uri)
}

/// `mkdir -p AT; nbdfuse AT SERVER… &`, once `AT/nbd` exists: the mount, and that file.
fn nbdfuse(at: &std::path::Path, server: &[&str]) -> (Mounted, std::path::PathBuf) {
    std::fs::create_dir_all(at).unwrap();
    let child = std::process::Command::new("nbdfuse")
        .arg(at)
        .args(server)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("cannot run nbdfuse (libnbd-bin)");
    let mount = Mounted {
        at: at.to_path_buf(),
        fuse: Some(child),
        loop_dev: None,
    };
    let file = at.join("nbd");
    common::wait_until(30, "nbdfuse did not mount its file", || file.exists());
    (mount, file)
}

/// `losetup [-r] -P -f --show FILE`, then `mount -o OPTIONS /dev/loopN AT`: the mount
/// (the loop device detached on release), or mount's complaint (the device detached).
fn loop_mount(
    file: &std::path::Path,
    read_only: bool,
    options: &str,
    at: &std::path::Path,
) -> Result<Mounted, String> {
    let mut losetup = std::process::Command::new("losetup");
    if read_only {
        losetup.arg("-r");
    }
    let out = losetup
        .args(["-P", "-f", "--show"])
        .arg(file)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "losetup {}: {e}", file.display());
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::create_dir_all(at).unwrap();
    let mut mount = Mounted {
        at: at.to_path_buf(),
        fuse: None,
        loop_dev: Some(dev.clone()),
    };
    let out = std::process::Command::new("mount")
        .args(["-o", options, &dev])
        .arg(at)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(mount)
    } else {
        mount.release();
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The pins of the VM `vm`: the file names in `REPO/VM/pins`.
fn pins(env: &common::Env, vm: &str) -> Vec<String> {
    std::fs::read_dir(env.repo().join(vm).join("pins"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// File-level restore as docs/recovery.md section 3 shows it: an older generation (`-g 1`)
/// of the guest's data disk (a whole ext4 file system) served on a unix socket, exposed as
/// a file by nbdfuse, read with `debugfs -R 'cat …'` and through a read-only loop mount:
/// the file as the guest wrote it then, not the newest generation's content nor the
/// original's now. Unmounting ends nbdfuse; the server, which pins the generation while it
/// serves, stops on SIGTERM and leaves neither its socket nor the pin.
#[test]
fn one_file_of_an_older_generation_is_read_through_serve_and_nbdfuse() {
    let first = noise(21, 90 * 1024 + 11);
    let second = noise(22, 90 * 1024 + 11);
    let Some(g) = Guest::boot("filelevel", &[("hello.txt", HELLO)]) else {
        return;
    };
    let env = common::Env::live();
    g.write_file("/data/notes.bin", &first);
    g.sync();
    frozen_backup(&env, &g);
    g.write_file("/data/notes.bin", &second);
    g.sync();
    frozen_backup(&env, &g);
    g.write_file("/data/notes.bin", b"now\n");
    g.sync();
    let gens = env.generations(&g.name);
    assert_eq!(gens.len(), 2);

    // vmkeep serve VM --generation 1 --socket SOCK &
    let (mut server, uri) = serve(&env, &g.name, "1");
    let pin = format!("{}-{}", server.0.as_ref().unwrap().id(), gens[0]);
    let held = pins(&env, &g.name);
    assert!(
        held.iter().any(|p| p.starts_with(&pin)),
        "no pin {pin}: {held:?}"
    );

    // mkdir -p MNT; nbdfuse MNT URI &
    let (mut fused, file) = nbdfuse(&env.path("fuse"), &[&uri]);
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        std::fs::metadata(g.disk_raw()).unwrap().len()
    );

    // debugfs -R 'cat /notes.bin' MNT/nbd
    let got = debugfs_cat(&file, "/notes.bin").unwrap();
    assert!(
        got == first,
        "generation 1's notes.bin: {} bytes",
        got.len()
    );
    assert!(got != second, "the newest generation's content was served");
    assert_eq!(debugfs_cat(&file, "/hello.txt").unwrap(), HELLO);
    e2fsck_clean(&file).unwrap();
    // The newest generation and the original hold the other contents.
    let latest = env.path("latest.raw");
    std::fs::write(&latest, env.restored(&g.name, "latest", Some("vda"))).unwrap();
    assert!(debugfs_cat(&latest, "/notes.bin").unwrap() == second);
    assert_eq!(g.read_file("/data/notes.bin"), b"now\n");

    // losetup -r -P -f --show MNT/nbd; mount -o ro /dev/loopN MNT2 (no partition table)
    let mnt = env.path("mnt");
    let mut looped = loop_mount(&file, true, "ro", &mnt).unwrap();
    assert!(std::fs::read(mnt.join("notes.bin")).unwrap() == first);
    assert_eq!(std::fs::read(mnt.join("hello.txt")).unwrap(), HELLO);
    looped.release();
    assert!(!mounted(&mnt), "{} still mounted", mnt.display());

    // The kernel lets go of a detached loop device's file in the background: until then
    // the FUSE file is busy and its unmount only lazy.
    common::wait_until(60, "the loop device to let go of the FUSE file", || {
        let out = std::process::Command::new("losetup")
            .arg("-j")
            .arg(&file)
            .output()
            .unwrap();
        out.stdout.is_empty()
    });
    // umount MNT: nbdfuse ends by itself, successfully.
    let fuse_exit = fused.release();
    assert!(!mounted(&fused.at), "{} still mounted", fused.at.display());
    assert!(
        fuse_exit.is_some_and(|st| st.success()),
        "nbdfuse after the unmount: {fuse_exit:?}"
    );
    // kill %1: the server ends cleanly, without its socket and its pin.
    let served = server.stop();
    assert!(
        served.is_some_and(|st| st.success()),
        "serve after SIGTERM: {served:?}: {}",
        std::fs::read_to_string(env.path("serve.log")).unwrap_or_default()
    );
    assert!(
        !env.path("serve.sock").exists(),
        "the server left its socket"
    );
    let held = pins(&env, &g.name);
    assert!(held.is_empty(), "pins left: {held:?}");
}

/// Whether the ext4 image `raw` records a journal to replay (`dumpe2fs -h`).
fn needs_recovery(raw: &std::path::Path) -> bool {
    let out = lv::run(std::process::Command::new("dumpe2fs").arg("-h").arg(raw));
    let features = out
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("no features in dumpe2fs -h {}:\n{out}", raw.display()));
    features.split_whitespace().any(|f| f == "needs_recovery")
}

/// A crash-consistent generation (`--quiesce off`) of the running guest holds an ext4 file
/// system whose journal is still to be replayed: mounted read-only straight from the
/// served export it is refused (the kernel cannot replay onto a read-only device), and
/// mounts with `noload` (the journal skipped). Through
/// a qcow2 overlay whose backing store is the export (docs/recovery.md), the mount
/// replays the journal into the overlay and the file the guest synced before the backup
/// reads back; the archive is not changed by it.
#[test]
fn a_crash_consistent_generation_mounts_through_an_overlay_that_replays_its_journal() {
    let synced = noise(31, 80 * 1024 + 7);
    let Some(g) = Guest::boot("crashmount", &[("hello.txt", HELLO)]) else {
        return;
    };
    let env = common::Env::live();
    g.write_file("/data/synced.bin", &synced);
    g.sync();
    let out = env.run(&["backup", &g.name, "--quiesce", "off"]);
    common::succeeded(&out, "backup: ");
    assert_eq!(newest_consistency(&env, &g.name), "crash");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.trim_end().ends_with("s, crash"), "{said}");
    let before = env.restored(&g.name, "latest", Some("vda"));
    let raw = env.path("restored.raw");
    std::fs::write(&raw, &before).unwrap();
    assert!(
        needs_recovery(&raw),
        "the mounted guest's file system needs no replay"
    );

    let (_server, uri) = serve(&env, &g.name, "latest");
    {
        let (_fused, file) = nbdfuse(&env.path("fuse"), &[&uri]);
        let refused = loop_mount(&file, true, "ro", &env.path("mnt"));
        assert!(
            refused.is_err(),
            "a journal to replay mounted from a read-only device"
        );
        // The journal is what stops it: skipped (noload), the same device mounts.
        let noload = loop_mount(&file, true, "ro,noload", &env.path("mnt"));
        assert!(noload.is_ok(), "ro,noload: {:?}", noload.err());
    }

    // qemu-img create -f qcow2 -b URI -F raw OVERLAY
    // nbdfuse MNT [ qemu-nbd -f qcow2 OVERLAY ] &
    // losetup -P -f --show MNT/nbd; mount -o ro /dev/loopN MNT2
    let overlay = env.path("overlay.qcow2");
    lv::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b", &uri, "-F", "raw"])
            .arg(&overlay),
    );
    let overlay_s = overlay.to_str().unwrap();
    let (mut fused, file) = nbdfuse(
        &env.path("fuse-overlay"),
        &["[", "qemu-nbd", "-f", "qcow2", overlay_s, "]"],
    );
    let mnt = env.path("mnt-overlay");
    let mut looped = loop_mount(&file, false, "ro", &mnt).unwrap();
    assert!(std::fs::read(mnt.join("synced.bin")).unwrap() == synced);
    assert_eq!(std::fs::read(mnt.join("hello.txt")).unwrap(), HELLO);
    looped.release();
    let fuse_exit = fused.release();
    assert!(
        fuse_exit.is_some_and(|st| st.success()),
        "nbdfuse after the unmount: {fuse_exit:?}"
    );
    // The replay went into the overlay; the generation is as it was.
    assert!(env.restored(&g.name, "latest", Some("vda")) == before);
    let table = env.ok(&["status", &g.name]);
    assert!(table.contains("crash"), "{table}");
}
