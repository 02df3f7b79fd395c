//! Every path that hands out bytes proves them first (issue 15): restore to a file and to
//! a qcow2 image, merge and serve refuse digests that do not hash to the generation's
//! digest root, and files whose header names another generation (exit 3, naming VM,
//! generation, disk and file); `--ignore-damage` writes what matches its own digests and
//! lists the rest. A served generation still reads after the generations it found its
//! moved blocks in are pruned. `vmkeep verify` proves a disk equals a generation.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::*;

const BS: u64 = 64 << 10;

/// One VM `vm` with one generation of a 1 MiB disk of noise; returns (env, disk path).
fn one_generation() -> (Env, PathBuf) {
    Env::one_noise_generation(1 << 20, 1)
}

/// Zero 128 bytes at offset 4096 of the newest digest file: the entries of blocks 0..4.
fn zero_digest_entries(env: &Env) {
    write_at(&env.repo().join("vm/latest/vda.digest"), 4096, &[0u8; 128]);
}

/// [`one_generation`] with its digest file damaged ([`zero_digest_entries`]); returns
/// (env, disk path, generation id).
fn damaged_generation() -> (Env, PathBuf, String) {
    let (env, disk) = one_generation();
    let gen = env.generations("vm").pop().unwrap();
    zero_digest_entries(&env);
    (env, disk, gen)
}

/// Copy the newest digest file of VM `from` over VM `vm`'s.
fn copy_digest_file(env: &Env, from: &str) {
    std::fs::copy(
        env.repo().join(from).join("latest/vda.digest"),
        env.repo().join("vm/latest/vda.digest"),
    )
    .unwrap();
}

/// Run `args`, requiring exit status `code`; returns stdout.
fn stdout_of(env: &Env, args: &[&str], code: i32) -> String {
    let o = env.run(args);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(code), "{stdout}");
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The stderr of a refused command must name the VM, generation, disk and file.
fn names_everything(e: &str, gen: &str, file: &str) {
    for needle in ["VM vm", gen, "disk vda", file] {
        assert!(e.contains(needle), "{needle:?} not in: {e}");
    }
}

/// Run `args`, requiring exit status 3 and a stderr that names everything
/// ([`names_everything`]); returns stderr.
fn refused(env: &Env, args: &[&str], gen: &str, file: &str) -> String {
    let e = env.fails(args, 3);
    names_everything(&e, gen, file);
    e
}

/// `restore vm --to r.raw` is refused, naming everything and generation `gen`'s digest
/// file, and writes nothing; returns stderr.
fn restore_refused(env: &Env, gen: &str) -> String {
    let out = env.path("r.raw");
    let e = refused(env, &["restore", "vm", "--to", s(&out)], gen, "vda.digest");
    assert!(!out.exists(), "nothing written as a restore");
    e
}

#[test]
fn a_damaged_digest_file_fails_restore_to_a_file() {
    let (env, disk, gen) = damaged_generation();
    let e = restore_refused(&env, &gen);
    assert!(e.contains("digest root"), "{e}");
    let out = env.path("r.raw");

    // --ignore-damage writes the blocks that match their own digests and lists the rest.
    let stdout = stdout_of(
        &env,
        &["restore", "vm", "--to", s(&out), "--ignore-damage"],
        3,
    );
    assert!(
        stdout.contains("unproven") && stdout.contains("vda.digest"),
        "{stdout}"
    );
    assert!(stdout.contains("damaged: bytes 0..262144"), "{stdout}");
    // The blocks whose digests were zeroed are written as read (here: the real bytes),
    // never as zeros.
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&disk).unwrap());
}

#[test]
fn ignore_damage_on_a_sparse_disk_reads_what_the_unproven_digests_call_holes() {
    // Data in blocks 0..6 and 8 of 16 (64 KiB blocks); the rest holes.
    let env = Env::new();
    let disk = env.disk("disk.raw", 16 * BS);
    write_at(&disk, 0, &noise(1, 6 * BS as usize));
    write_at(&disk, 8 * BS, &noise(2, BS as usize));
    env.backup("vm", &disk, &[]);
    zero_digest_entries(&env); // blocks 0..4 now claim to be holes
                               // Block 8 of the image becomes a hole: its (intact) digest says data.
    let image = env.repo().join("vm/latest/vda.raw");
    let st = Command::new("fallocate")
        .args(["--punch-hole", "--offset", &(8 * BS).to_string()])
        .args(["--length", &BS.to_string()])
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());
    let out = env.path("r.raw");
    let stdout = stdout_of(
        &env,
        &["restore", "vm", "--to", s(&out), "--ignore-damage"],
        3,
    );
    assert!(stdout.contains("damaged: bytes 0..262144"), "{stdout}");
    assert!(stdout.contains("damaged: bytes 524288..589824"), "{stdout}");
    let got = std::fs::read(&out).unwrap();
    let want = std::fs::read(&disk).unwrap();
    assert!(
        got[..8 * BS as usize] == want[..8 * BS as usize],
        "blocks 0..8"
    );
    assert!(got[8 * BS as usize..9 * BS as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(
        got[9 * BS as usize..] == want[9 * BS as usize..],
        "the holes"
    );
}

#[test]
fn a_damaged_digest_file_fails_restore_to_qcow2_and_merge() {
    let (env, _, gen) = damaged_generation();
    let q = env.path("r.qcow2");
    refused(&env, &["restore", "vm", "--to", s(&q)], &gen, "vda.digest");
    assert!(!q.exists());
    let m = env.path("m.raw");
    let merge = ["merge", "vm", "-g", "0", "--disk", "vda", "--out", s(&m)];
    refused(&env, &merge, &gen, "vda.digest");
    assert!(!m.exists());
}

#[test]
fn a_damaged_digest_file_of_an_older_generations_chain_is_refused() {
    let (env, disk) = one_generation();
    write_at(&disk, 300 << 10, &noise(2, 64 << 10));
    env.backup("vm", &disk, &[]);
    let ids = env.generations("vm");
    zero_digest_entries(&env);
    let out = env.path("r.raw");
    let restore = ["restore", "vm", "-g", &ids[0], "--to", s(&out)];
    refused(&env, &restore, &ids[0], "vda.digest");
    assert!(!out.exists());
}

/// Start `vmkeep serve vm` on a socket; `Ok` once it listens, `Err(stderr)` if it exits.
fn serve(env: &Env, gen: &str) -> Result<(Child, PathBuf), String> {
    let sock = env.path(&format!("{gen}.sock"));
    let log = env.path(&format!("{gen}.log"));
    let mut serve = env.std_cmd(&["serve", "vm", "-g", gen, "--socket", s(&sock)]);
    let (mut child, line) = spawn_first_line(&mut serve, &log);
    if line.is_empty() {
        let st = child.wait().unwrap();
        let err = std::fs::read_to_string(&log).unwrap();
        return Err(format!("exit {:?}: {err}", st.code()));
    }
    Ok((child, sock))
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// nbdcopy the export `vda` from `sock` to a file; the bytes, or nbdcopy's complaint.
fn nbdcopy(env: &Env, sock: &Path, name: &str) -> Result<Vec<u8>, String> {
    let to = env.path(name);
    let out = Command::new("nbdcopy")
        .arg(format!("nbd+unix:///vda?socket={}", sock.display()))
        .arg(&to)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(std::fs::read(&to).unwrap())
}

#[test]
fn a_damaged_digest_file_is_never_served() {
    let (env, disk, gen) = damaged_generation();
    match serve(&env, &gen) {
        Err(e) => {
            assert!(e.contains("exit Some(3)"), "{e}");
            names_everything(&e, &gen, "vda.digest");
        }
        Ok((child, sock)) => {
            // A server that started must at least not hand out wrong bytes.
            let got = nbdcopy(&env, &sock, "served.raw");
            stop(child);
            if let Ok(got) = got {
                assert!(
                    got == std::fs::read(&disk).unwrap(),
                    "serve handed out wrong bytes from a damaged digest file"
                );
            }
            panic!("serve started on a damaged digest file");
        }
    }
}

#[test]
fn a_digest_file_of_another_vm_is_refused() {
    // Two VMs backed up from the same bytes: their digest files differ only in the
    // generation id of their headers, and their digest roots are equal.
    let (env, disk) = one_generation();
    env.backup("other", &disk, &[]);
    let gen = env.generations("vm").pop().unwrap();
    copy_digest_file(&env, "other");
    let e = restore_refused(&env, &gen);
    assert!(e.contains("another generation"), "{e}");
    let out = env.path("r.raw");
    // check reports it too.
    let stdout = stdout_of(&env, &["check", "vm"], 3);
    assert!(
        stdout.contains("DAMAGE:") && stdout.contains("another generation"),
        "{stdout}"
    );

    // Another VM's digest file of the same geometry but other content.
    let (env, _) = one_generation();
    let other = env.disk("other.raw", 1 << 20);
    write_at(&other, 0, &noise(7, 1 << 20));
    env.backup("other", &other, &[]);
    copy_digest_file(&env, "other");
    env.fails(&["restore", "vm", "--to", s(&out)], 3);
    assert!(!out.exists());
}

#[test]
fn a_reverse_diff_of_another_generation_is_refused() {
    // Three generations of the same size: the reverse diffs of the first two have valid
    // headers that fit each other's place.
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    write_at(&disk, 0, &noise(1, 512 << 10));
    env.backup("vm", &disk, &["--block-size", "16K"]);
    write_at(&disk, 0, &noise(2, 64 << 10));
    env.backup("vm", &disk, &[]);
    write_at(&disk, 0, &noise(3, 64 << 10));
    env.backup("vm", &disk, &[]);
    let ids = env.generations("vm");
    let rdiff = |g: &str| env.repo().join("vm").join(g).join("vda.rdiff");
    std::fs::copy(rdiff(&ids[0]), rdiff(&ids[1])).unwrap();
    let out = env.path("r.raw");
    let restore = ["restore", "vm", "-g", &ids[1], "--to", s(&out)];
    let e = refused(&env, &restore, &ids[1], "vda.rdiff");
    assert!(
        e.contains(&ids[0]),
        "names the generation the header names: {e}"
    );
    assert!(!out.exists());
    let stdout = stdout_of(&env, &["check", "vm"], 3);
    assert!(stdout.contains("another generation"), "{stdout}");
}

#[test]
fn a_served_generation_reads_after_the_generations_it_relies_on_are_pruned() {
    let (env, disk) = one_generation();
    // g2 changes a block far from block 0: g1's reverse diff has no record for block 0,
    // so a reader of g1 finds block 0 in the newest image.
    write_at(&disk, 10 * BS, &noise(2, BS as usize));
    env.backup("vm", &disk, &[]);
    let ids = env.generations("vm");
    let before = env.path("before.raw");
    env.ok(&["restore", "vm", "-g", &ids[0], "--to", s(&before)]);
    let want = std::fs::read(&before).unwrap();

    let (child, sock) = serve(&env, &ids[0]).expect("serve starts");
    assert!(nbdcopy(&env, &sock, "first.raw").unwrap() == want);
    // Block 0 changes: g3's backup moves g2's block 0 into g2's reverse diff; a fourth
    // backup, then prune drops g2 and g3 (the served g1 is pinned), merging block 0
    // into g1's reverse diff.
    write_at(&disk, 0, &noise(3, BS as usize));
    env.backup("vm", &disk, &[]);
    write_at(&disk, 20 * BS, &noise(4, BS as usize));
    env.backup("vm", &disk, &[]);
    env.ok(&["prune", "vm", "--keep-last", "1"]);
    assert_eq!(env.generations("vm").len(), 2, "served + newest");
    let got = nbdcopy(&env, &sock, "after.raw");
    stop(child);
    assert!(
        got.as_ref().is_ok_and(|g| *g == want),
        "the served generation no longer reads right: {:?}",
        got.err()
    );
}

/// Three generations of a sparse disk with holes, changed blocks and a size change.
fn history() -> (Env, PathBuf, Vec<String>) {
    let env = Env::new();
    let disk = env.disk("disk.raw", 2 << 20);
    write_at(&disk, 0, &noise(1, 300 << 10));
    write_at(&disk, 1 << 20, &text(200 << 10));
    env.backup("vm", &disk, &["--block-size", "16K"]);
    write_at(&disk, 100 << 10, &noise(2, 50 << 10));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    write_at(&disk, (5 << 19) + 7, &noise(3, 10_000));
    env.backup("vm", &disk, &[]);
    write_at(&disk, 0, &noise(4, 16 << 10));
    env.backup("vm", &disk, &[]);
    let ids = env.generations("vm");
    (env, disk, ids)
}

#[test]
fn verify_proves_good_restores_of_every_generation_and_kind() {
    let (env, disk, ids) = history();
    for (i, id) in ids.iter().enumerate() {
        let raw = env.path(&format!("g{i}.raw"));
        let q = env.path(&format!("g{i}.qcow2"));
        env.ok(&["restore", "vm", "-g", id, "--to", s(&raw)]);
        env.ok(&["restore", "vm", "-g", id, "--to", s(&q)]);
        let out = env.ok(&[
            "verify",
            "vm",
            "-g",
            id,
            "--disk",
            &format!("vda={}", raw.display()),
        ]);
        assert!(out.contains("identical"), "{out}");
        let js: serde_json::Value = serde_json::from_str(&env.ok(&[
            "--json",
            "verify",
            "vm",
            "-g",
            id,
            "--disk",
            &format!("vda={}", q.display()),
        ]))
        .unwrap();
        assert_eq!(js["ok"], true, "{js}");
        assert_eq!(js["generation"], id.as_str());
        assert_eq!(js["disks"][0]["differing"], serde_json::json!([]));
    }
    // The live source itself is the newest generation.
    env.ok(&["verify", "vm", "--disk", &format!("vda={}", disk.display())]);
    // An NBD URI: the generation served by vmkeep itself.
    let (child, sock) = serve(&env, &ids[0]).expect("serve starts");
    let uri = format!("vda=nbd+unix:///vda?socket={}", sock.display());
    let out = env.run(&["verify", "vm", "-g", &ids[0], "--disk", &uri]);
    let wrong = env.run(&["verify", "vm", "--disk", &uri]);
    stop(child);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        wrong.status.code(),
        Some(1),
        "g1 is not the newest: {wrong:?}"
    );
}

#[test]
fn verify_names_the_range_of_a_changed_byte_and_a_size_difference() {
    let (env, _, ids) = history();
    let raw = env.path("r.raw");
    env.ok(&["restore", "vm", "-g", &ids[1], "--to", s(&raw)]);
    flip_byte(&raw, 40_000); // block 2 of 16 KiB
    let spec = format!("vda={}", raw.display());
    let verify = ["verify", "vm", "-g", &ids[1], "--disk", &spec];
    let stdout = stdout_of(&env, &verify, 1);
    assert!(stdout.contains("differs: bytes 32768..49152"), "{stdout}");
    let js: serde_json::Value = serde_json::from_slice(
        &env.run(&["--json", "verify", "vm", "-g", &ids[1], "--disk", &spec])
            .stdout,
    )
    .unwrap();
    assert_eq!(js["ok"], false);
    assert_eq!(
        js["disks"][0]["differing"],
        serde_json::json!([[32768, 49152]])
    );
    // Data written into a hole of the restored copy is found too.
    flip_byte(&raw, 40_000);
    write_at(&raw, (2 << 20) + 5, b"x");
    let o = env.run(&verify);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("differs: bytes 2097152..2113536"),
        "{o:?}"
    );
    // A copy one block short: the missing tail is the difference.
    write_at(&raw, (2 << 20) + 5, b"\0");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len((3 << 20) - 16384)
        .unwrap();
    let stdout = stdout_of(&env, &verify, 1);
    assert!(
        stdout.contains("differs: bytes 3129344..3145728"),
        "{stdout}"
    );
}

#[test]
fn verify_refuses_a_damaged_archive_and_unknown_disks() {
    let (env, disk) = one_generation();
    let spec = format!("vda={}", disk.display());
    env.ok(&["verify", "vm", "--disk", &spec]);
    env.fails(
        &["verify", "vm", "--disk", &format!("vdb={}", disk.display())],
        2,
    );
    zero_digest_entries(&env);
    let e = env.fails(&["verify", "vm", "--disk", &spec], 3);
    assert!(e.contains("vda.digest") && e.contains("digest root"), "{e}");
}

#[cfg(feature = "libvirt")]
#[path = "../../vmkeep/tests/support/libvirt.rs"]
#[allow(dead_code)]
mod lv;

/// `restore --as-vm` (copied and instant) proves every disk before it writes a disk,
/// starts a server or defines a domain.
#[cfg(feature = "libvirt")]
#[test]
fn restore_as_a_new_vm_refuses_a_damaged_digest_file_before_defining_anything() {
    let vm = lv::TestVm::start("trust", &[("vda", "qcow2", 32)]);
    let env = Env::live();
    vm.guest_write(0, 0x11, "0", "1M");
    env.ok(&["backup", &vm.name]);
    let gen = Env::generations_in(&env.repo(), &vm.name).pop().unwrap();
    let dir = env.disk_dir();
    // A good copy first, proven by verify (as scripts/demo.sh does).
    {
        let new = format!("{}-good", vm.name);
        let _guard = lv::Undefine(new.clone());
        env.ok(&restore_as_vm(&vm.name, &new, &dir));
        let copy = dir.join(format!("{new}-vda.qcow2"));
        env.ok(&[
            "verify",
            &vm.name,
            "--disk",
            &format!("vda={}", copy.display()),
        ]);
        std::fs::remove_file(copy).unwrap();
    }
    write_at(
        &env.repo().join(&vm.name).join("latest/vda.digest"),
        4096,
        &[0u8; 128],
    );
    for instant in [false, true] {
        let new = format!("{}-copy", vm.name);
        let _guard = lv::Undefine(new.clone());
        let mut args = restore_as_vm(&vm.name, &new, &dir);
        if instant {
            args.push("--instant");
        }
        let e = env.fails(&args, 3);
        for needle in [vm.name.as_str(), gen.as_str(), "disk vda", "vda.digest"] {
            assert!(e.contains(needle), "{needle:?} not in: {e}");
        }
        assert!(
            std::fs::read_dir(&dir).unwrap().next().is_none(),
            "no disk written"
        );
        let defined = Command::new("virsh")
            .args(["-q", "dominfo", &new])
            .output()
            .unwrap();
        assert!(!defined.status.success(), "no domain defined");
    }
}
