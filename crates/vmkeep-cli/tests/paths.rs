//! Paths are paths: restore targets and disk folders need not be UTF-8.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use common::{noise, Env};

/// A folder in the test's temp folder whose name is not UTF-8.
fn non_utf8_dir(env: &Env) -> PathBuf {
    let dir = env.dir.path().join(OsStr::from_bytes(b"disks-\xff\xfe"));
    std::fs::create_dir(&dir).unwrap();
    assert!(dir.to_str().is_none());
    dir
}

fn backed_up(env: &Env) -> Vec<u8> {
    let data = noise(7, 1 << 20);
    let disk = env.path("vda.raw");
    std::fs::write(&disk, &data).unwrap();
    env.backup("vm", &disk, &[]);
    data
}

#[test]
fn restore_and_merge_write_to_a_path_that_is_not_utf8() {
    let env = Env::new();
    let data = backed_up(&env);
    let dir = non_utf8_dir(&env);
    for (cmd, flag) in [("restore", "--to"), ("merge", "--out")] {
        let to = dir.join(format!("{cmd}.raw"));
        let mut args = vec![cmd, "vm"];
        if cmd == "merge" {
            args.extend(["-g", "latest"]);
        }
        let out = env.std_cmd(&args).arg(flag).arg(&to).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(&to).unwrap() == data,
            "{cmd}: the disk's bytes"
        );
    }
}

#[cfg(feature = "libvirt")]
#[path = "../../vmkeep/tests/support/libvirt.rs"]
#[allow(dead_code)]
mod lv;

/// libvirt names disks by UTF-8 paths: a `--disk-dir` that is not UTF-8 is refused with
/// one line (exit 2) before anything is written or defined (it used to panic).
#[cfg(feature = "libvirt")]
#[test]
fn restore_as_vm_refuses_a_disk_dir_that_is_not_utf8() {
    lv::ensure_libvirtd();
    let env = Env::new();
    backed_up(&env);
    // A saved definition, as a backup from libvirt leaves beside the disks.
    let gen = env.generations("vm").pop().unwrap();
    std::fs::write(
        env.repo().join("vm").join(&gen).join("domain.xml"),
        "<domain type='qemu'><name>vm</name><memory unit='MiB'>64</memory>\
         <os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>\
         <driver name='qemu' type='raw'/><source file='/nonexistent/vda.raw'/>\
         <target dev='vda' bus='virtio'/></disk></devices></domain>",
    )
    .unwrap();
    let dir = non_utf8_dir(&env);
    let new = format!("vmkeep-test-paths-{}", std::process::id());
    let _guard = lv::Undefine(new.clone());
    let out = env
        .std_cmd(&["restore", "vm", "--as-vm", &new, "--disk-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("--disk-dir") && stderr.contains("UTF-8"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "no disk written"
    );
    assert!(!lv::virsh_quiet(&["dominfo", &new]), "no domain defined");
}
