//! Damage anywhere is found: a flipped byte or a truncation in every kind of archive file,
//! and a missing file, make `check` exit 3 naming the VM, generation, disk and place; a
//! restore never returns wrong bytes.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A VM with three generations of one disk; returns (env, generation ids oldest first).
fn archive() -> (Env, Vec<String>) {
    let env = Env::new();
    let disk = env.disk("disk.raw", 1 << 20);
    write_at(&disk, 0, &noise(1, 512 << 10));
    env.backup("vm", &disk, &["--block-size", "16K"]);
    write_at(&disk, 64 << 10, &noise(2, 64 << 10));
    env.backup("vm", &disk, &[]);
    write_at(&disk, 200 << 10, &text(100 << 10));
    env.backup("vm", &disk, &[]);
    env.ok(&["check", "vm", "--deep"]);
    let ids = env.generations("vm");
    (env, ids)
}

fn file(env: &Env, gen: &str, name: &str) -> PathBuf {
    env.repo().join("vm").join(gen).join(name)
}

/// Run check (fast or deep) and require exit 3 with a DAMAGE line containing every `needle`.
fn damaged(env: &Env, deep: bool, needles: &[&str]) -> String {
    let mut args = vec!["check", "vm"];
    if deep {
        args.push("--deep");
    }
    let out = env.run(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(3),
        "check {args:?} should find damage:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("DAMAGE:") && needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no DAMAGE line with {needles:?} in:\n{stdout}"));
    line.to_string()
}

fn len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn flipped_byte_in_the_newest_image_is_found_with_its_range() {
    let (env, ids) = archive();
    flip_byte(&file(&env, &ids[2], "vda.raw"), 70_000);
    let line = damaged(
        &env,
        false,
        &["generation", &ids[2], "disk vda", "bytes 65536..81920"],
    );
    assert!(line.contains("vda.raw"), "{line}");
    // Deep check names every generation whose restore would meet the block.
    let out = String::from_utf8(env.run(&["check", "vm", "--deep"]).stdout).unwrap();
    assert!(out.contains(&ids[2]), "{out}");
    // The JSON report carries the same facts.
    let js: serde_json::Value =
        serde_json::from_slice(&env.run(&["check", "vm", "--json"]).stdout).unwrap();
    assert_eq!(js["ok"], false);
    let p = &js["vms"][0]["problems"][0];
    assert_eq!(p["disk"], "vda");
    assert_eq!(p["range"][0], 65536);
    // status records the last check.
    assert!(env.ok(&["status", "vm"]).contains("problems"));
}

#[test]
fn flipped_bytes_in_reverse_diffs_are_found() {
    let (env, ids) = archive();
    let rdiff = file(&env, &ids[0], "vda.rdiff");
    // A body byte: the file checksum (fast) and the record digest (deep) catch it.
    flip_byte(&rdiff, 64 + 64 + 100);
    damaged(&env, false, &[&ids[0], "vda", "checksum"]);
    damaged(&env, true, &[&ids[0], "vda", "record fails its digest"]);
}

#[test]
fn flipped_bytes_in_headers_index_and_footer_are_found() {
    for (what, at) in [("header", 20u64), ("index", 48), ("footer", 8)] {
        let (env, ids) = archive();
        let rdiff = file(&env, &ids[1], "vda.rdiff");
        let off = match what {
            "header" => at,
            "index" => len(&rdiff) - 64 - at,
            _ => len(&rdiff) - 64 + at,
        };
        flip_byte(&rdiff, off);
        damaged(&env, false, &[&ids[1], "vda.rdiff"]);
    }
}

#[test]
fn flipped_byte_in_the_digest_file_is_found() {
    let (env, ids) = archive();
    flip_byte(&file(&env, &ids[2], "vda.digest"), 4096 + 32 * 5 + 3);
    damaged(&env, false, &[&ids[2], "vda", "digest"]);
    let (env, ids) = archive();
    flip_byte(&file(&env, &ids[2], "vda.digest"), 30);
    damaged(&env, false, &[&ids[2], "vda.digest"]);
}

#[test]
fn flipped_bytes_in_profiles_are_found() {
    let (env, ids) = archive();
    let p = file(&env, &ids[1], "generation.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replacen("read_bytes = ", "read_bytes = 1", 1)).unwrap();
    damaged(&env, false, &[&ids[1], "checksum"]);

    let (env, _) = archive();
    let p = env.repo().join("vm/vm.toml");
    flip_byte(&p, 40);
    damaged(&env, false, &["vm.toml"]);
}

#[test]
fn truncated_and_missing_files_are_found() {
    let (env, ids) = archive();
    let rdiff = file(&env, &ids[0], "vda.rdiff");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&rdiff)
        .unwrap();
    f.set_len(len(&rdiff) - 10).unwrap();
    damaged(&env, false, &[&ids[0], "vda.rdiff"]);

    let (env, ids) = archive();
    let img = file(&env, &ids[2], "vda.raw");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(500_000)
        .unwrap();
    damaged(&env, false, &[&ids[2], "vda.raw", "bytes"]);

    let (env, ids) = archive();
    let dg = file(&env, &ids[2], "vda.digest");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dg)
        .unwrap()
        .set_len(4096 + 32)
        .unwrap();
    damaged(&env, false, &[&ids[2], "vda.digest"]);

    let (env, ids) = archive();
    std::fs::remove_file(file(&env, &ids[1], "vda.rdiff")).unwrap();
    damaged(&env, false, &[&ids[1], "missing"]);

    let (env, ids) = archive();
    std::fs::remove_file(file(&env, &ids[2], "vda.raw")).unwrap();
    damaged(&env, false, &[&ids[2], "missing"]);
}

#[test]
fn damage_in_an_old_generation_fails_only_the_restores_that_need_it() {
    let (env, ids) = archive();
    let rdiff = file(&env, &ids[1], "vda.rdiff");
    flip_byte(&rdiff, 64 + 64 + 10);
    let out = env.path("r.raw");
    let e = env.fails(
        &[
            "restore",
            "vm",
            "-g",
            &ids[1],
            "--to",
            out.to_str().unwrap(),
        ],
        3,
    );
    assert!(e.contains("digest"), "{e}");
    assert!(!out.exists());
    // The newest generation does not depend on it.
    env.ok(&["restore", "vm", "--to", out.to_str().unwrap()]);
}
/// A damaged profile of an old generation costs that generation only: the newer ones still
/// restore, the next backup still runs, and check names the profile.
#[test]
fn a_damaged_old_profile_fails_only_its_own_generation() {
    let (env, ids) = archive();
    let disk = env.path("disk.raw");
    flip_byte(&file(&env, &ids[0], "generation.toml"), 30);
    let e = env.fails(
        &[
            "restore",
            "vm",
            "-g",
            &ids[0],
            "--to",
            env.path("r0.raw").to_str().unwrap(),
        ],
        1,
    );
    assert!(e.contains(&ids[0]) && e.contains("generation.toml"), "{e}");
    assert_eq!(env.restored("vm", &ids[1], None).len(), 1 << 20);
    write_at(&disk, 0, &noise(9, 16 << 10));
    env.backup("vm", &disk, &[]);
    assert_eq!(
        env.restored("vm", "latest", None),
        std::fs::read(&disk).unwrap()
    );
    damaged(&env, false, &[&ids[0], "profile"]);
}

#[test]
fn restore_refuses_damaged_blocks_unless_told() {
    let (env, disk) = Env::one_noise_generation(1 << 20, 5);
    flip_byte(&env.repo().join("vm/latest/vda.raw"), 200_000);
    let out = env.path("r.raw");
    let e = env.fails(&["restore", "vm", "--to", out.to_str().unwrap()], 3);
    assert!(
        e.contains("bytes 196608..262144") && e.contains("digest"),
        "{e}"
    );
    assert!(
        e.contains("damage: VM vm, generation") && e.contains("disk vda"),
        "{e}"
    );
    assert!(!out.exists(), "a failed restore leaves no file");
    let o = env.run(&[
        "restore",
        "vm",
        "--to",
        out.to_str().unwrap(),
        "--ignore-damage",
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "damage written on request is still damage"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("damaged: bytes 196608..262144"));
    let got = std::fs::read(&out).unwrap();
    let want = std::fs::read(&disk).unwrap();
    let diff: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    assert_eq!(diff, vec![200_000], "only the flipped byte differs");
}

#[test]
fn a_hole_punched_into_the_newest_image_is_found() {
    // check reads only the data extents of a sparse image and proves its holes from the
    // digests: a data block that became a hole must still be found.
    let (env, ids) = archive();
    let image = file(&env, &ids[2], "vda.raw");
    let st = std::process::Command::new("fallocate")
        .args(["--punch-hole", "--offset", "16384", "--length", "16384"])
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());
    let line = damaged(
        &env,
        false,
        &["generation", &ids[2], "disk vda", "bytes 16384..32768"],
    );
    assert!(line.contains("vda.raw"), "{line}");
}

#[test]
fn data_where_the_newest_image_has_a_zero_block_is_found_but_never_restored() {
    let (env, ids) = archive();
    let image = file(&env, &ids[2], "vda.raw");
    // Block 50 (16 KiB blocks) is zero at every generation: a hole in the image.
    write_at(&image, 50 * 16384 + 10, b"junk");
    damaged(
        &env,
        false,
        &["generation", &ids[2], "disk vda", "bytes 819200..835584"],
    );
    // Its digest says zero, so a restore writes zeros there and never reads the junk.
    let out = env.path("r.raw");
    env.ok(&["restore", "vm", "--to", out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert!(got[50 * 16384..51 * 16384].iter().all(|&b| b == 0));
    assert_eq!(got.len(), 1 << 20);
}
