//! `sync --to PATH` (engine::replicate): generations appended to a second repository,
//! which then restores and checks on its own, bit for bit the same as the local one.

#[path = "support/fuzz.rs"]
mod fuzz;
mod support;

use std::path::Path;

use fuzz::noise;
use support::archive::{deep_check_ok, restore_view};
use vmkeep::archive::Repository;
use vmkeep::engine::backup::{BackupOptions, BackupRun, DiskInput};
use vmkeep::engine::replicate::{open_replica, replicate_vm};
use vmkeep::progress::NoProgress;
use vmkeep::source::file::FileSource;
use vmkeep::ErrorKind;

const BS: u32 = 4096;

/// One generation of VM `vm` with disks `vda` and `vdb` holding `a` and `b`.
fn backup(repo: &Repository, dir: &Path, vm: &str, a: &[u8], b: &[u8]) {
    let mut inputs = Vec::new();
    for (name, bytes) in [("vda", a), ("vdb", b)] {
        let path = dir.join(format!("{vm}-{name}.raw"));
        std::fs::write(&path, bytes).unwrap();
        inputs.push(DiskInput::new(
            name,
            Box::new(FileSource::open(&path).unwrap()),
        ));
    }
    let opts = BackupOptions {
        block_size: Some(BS),
        ..Default::default()
    };
    BackupRun::begin(repo, vm)
        .and_then(|run| run.execute(inputs, &opts, &NoProgress))
        .unwrap();
}

/// Every generation of `vm` in `repo`, each disk restored: (id, vda, vdb).
fn restored_all(repo: &Repository, dir: &Path, vm: &str) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let a = repo.vm(vm).unwrap();
    a.generation_ids()
        .unwrap()
        .into_iter()
        .map(|id| {
            let s = a.select(id.as_str()).unwrap();
            let out = dir.join("out.raw");
            let vda = restore_view(&s.view("vda").unwrap(), &out).unwrap();
            let vdb = restore_view(&s.view("vdb").unwrap(), &out).unwrap();
            (id.to_string(), vda, vdb)
        })
        .collect()
}

/// Ten generations (writes, zeroed blocks, a shrink and a growth) copied to a replica:
/// the replica restores every generation as the local repository does and passes a deep
/// check; a second sync copies nothing; later generations are copied reading only what
/// changed; a generation the replica pruned is not copied back.
#[test]
fn a_replica_restores_every_generation_as_the_source_does() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Repository::init(&tmp.path().join("local")).unwrap();
    let size = 64 * BS as usize;
    let mut a = noise(1, size);
    let mut b = vec![0u8; size];
    b[..8 * BS as usize].copy_from_slice(&noise(2, 8 * BS as usize));
    for g in 0..10u64 {
        let at = (g as usize * 5 % 60) * BS as usize;
        a[at..at + 2 * BS as usize].copy_from_slice(&noise(10 + g, 2 * BS as usize));
        if g == 4 {
            a[..4 * BS as usize].fill(0);
        }
        if g == 6 {
            b.truncate(size - 3 * BS as usize - 100);
        }
        if g == 8 {
            b.resize(size + BS as usize, 0);
            let n = b.len();
            b[n - 100..].copy_from_slice(&noise(99, 100));
        }
        backup(&src, tmp.path(), "vm", &a, &b);
    }
    let dst = open_replica(&src, &tmp.path().join("replica")).unwrap();
    let r = replicate_vm(&src, &dst, "vm", &NoProgress).unwrap();
    assert_eq!(r.copied.len(), 10);
    let local = restored_all(&src, tmp.path(), "vm");
    assert!(
        restored_all(&dst, tmp.path(), "vm") == local,
        "every generation restores the same from the replica"
    );
    // The replica on its own: reopened from its folder, deep-checked.
    let alone = Repository::open(&tmp.path().join("replica")).unwrap();
    deep_check_ok(&alone, "vm");
    // Its profiles keep the source's ids and times.
    let (sa, da) = (src.vm("vm").unwrap(), alone.vm("vm").unwrap());
    for (s, d) in sa
        .generations()
        .unwrap()
        .iter()
        .zip(da.generations().unwrap())
    {
        assert_eq!(s.id, d.id);
        assert_eq!(s.profile.time, d.profile.time);
    }

    let again = replicate_vm(&src, &dst, "vm", &NoProgress).unwrap();
    assert!(again.copied.is_empty());
    assert_eq!(again.present, 10);

    // Two more: only the changed blocks are read (two blocks of vda).
    for g in 10..12u64 {
        a[..2 * BS as usize].copy_from_slice(&noise(50 + g, 2 * BS as usize));
        backup(&src, tmp.path(), "vm", &a, &b);
    }
    let more = replicate_vm(&src, &dst, "vm", &NoProgress).unwrap();
    assert_eq!(more.copied.len(), 2);
    assert_eq!(
        more.read_bytes,
        2 * 2 * BS as u64,
        "only what changed is read"
    );
    let newest = dst.vm("vm").unwrap().generations().unwrap().pop().unwrap();
    assert!(newest
        .profile
        .disks
        .iter()
        .all(|d| d.mode == vmkeep::archive::profile::GenerationMode::Incr));
    assert!(restored_all(&dst, tmp.path(), "vm") == restored_all(&src, tmp.path(), "vm"));
    deep_check_ok(&dst, "vm");

    // The replica's newest image is a plain raw image.
    let latest = std::fs::read(tmp.path().join("replica/vm/latest/vda.raw")).unwrap();
    assert_eq!(latest, a);
}

/// A replica refuses to be the repository itself; a block damaged in the local archive
/// fails that generation's copy with the damage named, and the replica keeps what it had
/// (its deep check passes, the damaged generation is not there).
#[test]
fn damage_in_the_source_is_never_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Repository::init(&tmp.path().join("local")).unwrap();
    let size = 16 * BS as usize;
    let a = noise(1, size);
    let b = noise(2, size);
    backup(&src, tmp.path(), "vm", &a, &b);
    let e = open_replica(&src, &tmp.path().join("local")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");

    // A byte of the newest image flipped: its digest no longer matches.
    let img = tmp.path().join("local/vm/latest/vdb.raw");
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[5 * BS as usize + 7] ^= 0x10;
    std::fs::write(&img, &bytes).unwrap();
    let dst = open_replica(&src, &tmp.path().join("replica")).unwrap();
    let e = replicate_vm(&src, &dst, "vm", &NoProgress).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Damage, "{e}");
    assert!(e.to_string().contains("block 5"), "{e}");
    let ids = dst
        .vm("vm")
        .map(|a| a.generation_ids().unwrap())
        .unwrap_or_default();
    assert!(ids.is_empty(), "nothing committed: {ids:?}");
    // Repaired, the next sync copies it.
    bytes[5 * BS as usize + 7] ^= 0x10;
    std::fs::write(&img, &bytes).unwrap();
    let r = replicate_vm(&src, &dst, "vm", &NoProgress).unwrap();
    assert_eq!(r.copied.len(), 1);
    deep_check_ok(&dst, "vm");
}
