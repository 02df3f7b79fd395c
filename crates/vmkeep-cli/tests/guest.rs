//! The real test guest (scripts/guest-image.sh, tests/support/guest.rs): it boots under
//! TCG, its agent answers, it reads the known files of its data disk and writes new ones,
//! `virsh domfsfreeze`/`domfsthaw` freeze and thaw its file system, and what it wrote is
//! on the disk image once it is shut down; booted by UEFI firmware (OVMF), a variable it
//! sets is kept in its `<nvram>` file across a restart. Skipped only when
//! VMKEEP_TEST_GUEST is unset.

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

/// The `restore --as-vm` copy `name` (defined, not started) as a [`Guest`] to talk to:
/// its disk `disk`, the console log its definition names (a path of its own) and its
/// variable store; undefined on drop.
fn copy_guest(name: &str, disk: std::path::PathBuf) -> Guest {
    let xml = virsh(&["dumpxml", name]);
    let attr_after = |anchor: &str, attr: &str| -> Option<String> {
        let at = xml.find(anchor)?;
        let rest = &xml[at..];
        let v = rest.split(&format!("{attr}='")).nth(1)?;
        Some(v.split('\'').next()?.to_string())
    };
    let console = attr_after("<serial type='file'>", "path").expect("a file console");
    let nvram = xml
        .split("<nvram")
        .nth(1)
        .and_then(|s| s.split('>').nth(1))
        .and_then(|s| s.split('<').next())
        .map(std::path::PathBuf::from);
    Guest {
        name: name.to_string(),
        dir: tempfile::tempdir().unwrap(),
        disk,
        console: console.into(),
        nvram,
        boot_time: std::time::Duration::ZERO,
    }
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

    let new = format!("{}-copy", g.name);
    let _guard = lv::Undefine(new.clone());
    let dir = env.disk_dir();
    let out = env.ok(&common::restore_as_vm(&g.name, &new, &dir));
    let mut copy = copy_guest(&new, dir.join(format!("{new}-vda.qcow2")));
    let copy_nvram = copy.nvram.clone().expect("the copy names a variable store");
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
