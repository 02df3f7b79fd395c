//! The power-loss explorer: every state a power loss during a backup or a prune could
//! leave recovers to exactly the old or exactly the new archive.
//!
//! A command runs once with `VMKEEP_FAULT_LOG` (feature `fault-injection`), which logs
//! every durable operation in order (create, mkdir, symlink, rename, link, unlink,
//! recursive removal, write, truncate, hole punch, fsync, fdatasync, folder fsync) and
//! saves what each is about to change. For every prefix of the log (the power fails after
//! operation k), the explorer builds the on-disk state the file system could be left in:
//!
//! - **Folder entries** (a creation, rename, link, removal) are durable only once their
//!   folder has been fsynced after them; every entry change not yet made durable is lost,
//!   and with it everything under a folder whose own entry is lost.
//! - **File data** (writes, truncations, punched holes) is durable only once the file has
//!   been fsynced or fdatasynced after it. Each prefix gives two states: one where every
//!   undurable change of file data is lost (each file holds what it held at its last
//!   fsync, or before the command if it was never synced, or nothing if it was created and
//!   never synced), and one where all of it reached the disk. (A power loss can also keep
//!   some of them; the two extremes, together with the SIGKILL tests of `crash.rs`, which
//!   keep everything, are what is explored.)
//! - Entry changes and file data are independent: a file whose name is durable may have
//!   lost its data, and the reverse.
//!
//! Each distinct state is then recovered and checked by `vmkeep check --deep`, which must
//! pass; the generations must be exactly those of the archive before the command or after
//! it (for a prune, one of the archives between, each dropping more), and every generation
//! must restore, disk by disk, to exactly the bytes it held. The number of states explored
//! is printed (`cargo test -- --nocapture`) and recorded in `docs/testing.md`.

#![cfg(feature = "fault-injection")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

#[derive(Clone, Debug, PartialEq)]
enum Node {
    Dir,
    File(usize),
    Link(PathBuf),
}

/// One logged operation, paths relative to the repository.
#[derive(Clone, Debug)]
struct LogOp {
    n: u64,
    kind: String,
    a: PathBuf,
    b: Option<PathBuf>,
}

fn parse_log(dir: &Path, repo: &Path) -> Vec<LogOp> {
    let text = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let rel = |p: &str| Path::new(p).strip_prefix(repo).ok().map(Path::to_path_buf);
        let Some(a) = rel(f[2]) else { continue };
        let b = f.get(3).map(|p| {
            if f[1] == "symlink" {
                PathBuf::from(p)
            } else {
                rel(p).expect("both paths of an operation are in the repository")
            }
        });
        out.push(LogOp {
            n: f[0].parse().unwrap(),
            kind: f[1].to_string(),
            a,
            b,
        });
    }
    out
}

fn parent(p: &Path) -> PathBuf {
    p.parent().unwrap_or(Path::new("")).to_path_buf()
}

/// What is known of one file (an inode).
#[derive(Default, Clone, Debug)]
struct Inode {
    /// Its path in the repository before the command ran.
    base: Option<PathBuf>,
    /// Operations that made its data durable, with the saved copy of the data.
    syncs: Vec<(usize, PathBuf)>,
    /// Operations that changed or removed it, with the saved copy of what it was before.
    snaps: Vec<(usize, PathBuf)>,
}

/// The log replayed over the repository as it was before the command.
struct Replay {
    ops: Vec<LogOp>,
    inodes: Vec<Inode>,
    /// Per operation: the file it created (for `create`).
    created: Vec<Option<usize>>,
    base: BTreeMap<PathBuf, Node>,
    /// The namespace after every operation.
    end: BTreeMap<PathBuf, Node>,
    log_dir: PathBuf,
}

fn scan_tree(root: &Path, rel: &Path, ns: &mut BTreeMap<PathBuf, Node>, inodes: &mut Vec<Inode>) {
    let mut by_ino: BTreeMap<u64, usize> = BTreeMap::new();
    scan_into(root, rel, ns, inodes, &mut by_ino);
}

fn scan_into(
    root: &Path,
    rel: &Path,
    ns: &mut BTreeMap<PathBuf, Node>,
    inodes: &mut Vec<Inode>,
    by_ino: &mut BTreeMap<u64, usize>,
) {
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(root.join(rel)).unwrap().flatten() {
        let r = rel.join(e.file_name());
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            ns.insert(r.clone(), Node::Dir);
            scan_into(root, &r, ns, inodes, by_ino);
        } else if m.file_type().is_symlink() {
            ns.insert(r, Node::Link(std::fs::read_link(e.path()).unwrap()));
        } else {
            let id = *by_ino.entry(m.ino()).or_insert_with(|| {
                inodes.push(Inode {
                    base: Some(r.clone()),
                    ..Default::default()
                });
                inodes.len() - 1
            });
            ns.insert(r, Node::File(id));
        }
    }
}

fn under<'a>(ns: &'a BTreeMap<PathBuf, Node>, p: &'a Path) -> impl Iterator<Item = PathBuf> + 'a {
    ns.keys().filter(move |k| k.starts_with(p)).cloned()
}

/// Apply entry operation `i` to `ns`; with `strict`, an operation whose source or folder
/// is missing is a bug of the replay, else it is dropped (its folder's entry was lost).
fn apply_entry(r: &Replay, i: usize, ns: &mut BTreeMap<PathBuf, Node>, strict: bool) {
    let op = &r.ops[i];
    let has_parent = |ns: &BTreeMap<PathBuf, Node>, p: &Path| {
        let d = parent(p);
        d.as_os_str().is_empty() || ns.get(&d) == Some(&Node::Dir)
    };
    if !has_parent(ns, &op.a) {
        assert!(!strict, "op {}: no folder for {}", op.n, op.a.display());
        return;
    }
    match op.kind.as_str() {
        "create" => {
            ns.insert(op.a.clone(), Node::File(r.created[i].unwrap()));
        }
        "mkdir" => {
            ns.insert(op.a.clone(), Node::Dir);
        }
        "symlink" => {
            ns.insert(op.a.clone(), Node::Link(op.b.clone().unwrap()));
        }
        "link" => {
            let from = op.b.as_ref().unwrap();
            match ns.get(from).cloned() {
                Some(n) => {
                    ns.insert(op.a.clone(), n);
                }
                None => assert!(!strict, "op {}: link of a missing file", op.n),
            }
        }
        "rename" => {
            let from = op.b.as_ref().unwrap();
            if !ns.contains_key(from) {
                assert!(!strict, "op {}: rename of a missing file", op.n);
                return;
            }
            for k in under(ns, &op.a).collect::<Vec<_>>() {
                ns.remove(&k);
            }
            for k in under(ns, from).collect::<Vec<_>>() {
                let n = ns.remove(&k).unwrap();
                let rel = k.strip_prefix(from).unwrap();
                let to = if rel.as_os_str().is_empty() {
                    op.a.clone()
                } else {
                    op.a.join(rel)
                };
                ns.insert(to, n);
            }
        }
        "unlink" | "rmtree" => {
            for k in under(ns, &op.a).collect::<Vec<_>>() {
                ns.remove(&k);
            }
        }
        _ => {}
    }
}

fn is_entry(kind: &str) -> bool {
    matches!(
        kind,
        "create" | "mkdir" | "symlink" | "link" | "rename" | "unlink" | "rmtree"
    )
}

impl Replay {
    fn new(base_repo: &Path, log_dir: &Path, repo_path: &Path) -> Replay {
        let ops = parse_log(log_dir, repo_path);
        let mut inodes = Vec::new();
        let mut base = BTreeMap::new();
        scan_tree(base_repo, Path::new(""), &mut base, &mut inodes);
        let mut r = Replay {
            created: vec![None; ops.len()],
            ops,
            inodes,
            base: base.clone(),
            end: BTreeMap::new(),
            log_dir: log_dir.to_path_buf(),
        };
        let mut ns = base;
        for i in 0..r.ops.len() {
            let op = r.ops[i].clone();
            let snap = log_dir.join("snap").join(op.n.to_string());
            let file_at = |ns: &BTreeMap<PathBuf, Node>, p: &Path| match ns.get(p) {
                Some(Node::File(id)) => Some(*id),
                _ => None,
            };
            match op.kind.as_str() {
                "create" => {
                    r.inodes.push(Inode::default());
                    r.created[i] = Some(r.inodes.len() - 1);
                }
                "write" | "truncate" | "unlink" => {
                    if let Some(id) = file_at(&ns, &op.a) {
                        r.inodes[id].snaps.push((i, snap.clone()));
                    }
                }
                "fsync" | "fdatasync" => {
                    let id = file_at(&ns, &op.a).expect("a synced file exists");
                    r.inodes[id].snaps.push((i, snap.clone()));
                    r.inodes[id].syncs.push((i, snap.clone()));
                }
                "rename" => {
                    if let Some(id) = file_at(&ns, &op.a) {
                        r.inodes[id].snaps.push((i, snap.clone()));
                    }
                }
                "rmtree" => {
                    for k in under(&ns, &op.a).collect::<Vec<_>>() {
                        if let Some(id) = file_at(&ns, &k) {
                            let rel = k.strip_prefix(&op.a).unwrap();
                            r.inodes[id].snaps.push((i, snap.join(rel)));
                        }
                    }
                }
                _ => {}
            }
            if is_entry(&op.kind) {
                if op.kind == "rename" {
                    assert_eq!(parent(&op.a), parent(op.b.as_ref().unwrap()));
                }
                apply_entry(&r, i, &mut ns, true);
            }
        }
        r.end = ns;
        r
    }

    /// The state after the first `k` operations; `keep_data`: undurable file data kept.
    /// Returns each path with where its content comes from.
    fn state(&self, k: usize, keep_data: bool, final_repo: &Path) -> BTreeMap<PathBuf, Src> {
        let durable = |i: usize| {
            let d = parent(&self.ops[i].a);
            self.ops[i + 1..k]
                .iter()
                .any(|o| o.kind == "syncdir" && o.a == d)
        };
        let mut ns = self.base.clone();
        for i in 0..k {
            if is_entry(&self.ops[i].kind) && durable(i) {
                apply_entry(self, i, &mut ns, false);
            }
        }
        let mut out = BTreeMap::new();
        for (p, n) in ns {
            let src = match n {
                Node::Dir => Src::Dir,
                Node::Link(t) => Src::Link(t),
                Node::File(id) => {
                    let ino = &self.inodes[id];
                    let content = if keep_data {
                        match ino.snaps.iter().find(|(i, _)| *i >= k) {
                            Some((_, s)) => Some(s.clone()),
                            None => {
                                let at = self
                                    .end
                                    .iter()
                                    .find(|(_, n)| **n == Node::File(id))
                                    .map(|(p, _)| final_repo.join(p))
                                    // Removed, its name not yet durably: as at its removal.
                                    .or_else(|| ino.snaps.last().map(|(_, s)| s.clone()))
                                    .unwrap_or_else(|| {
                                        panic!("{}: gone without a trace", p.display())
                                    });
                                Some(at)
                            }
                        }
                    } else {
                        match ino.syncs.iter().rev().find(|(i, _)| *i < k) {
                            Some((_, s)) => Some(s.clone()),
                            None => ino.base.as_ref().map(|b| self.log_dir.join("base").join(b)),
                        }
                    };
                    Src::File(id, content)
                }
            };
            out.insert(p, src);
        }
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Src {
    Dir,
    Link(PathBuf),
    /// A file (inode) and the copy of its content (none: empty).
    File(usize, Option<PathBuf>),
}

/// Make the state on disk at `to`.
fn build(state: &BTreeMap<PathBuf, Src>, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    let mut first: BTreeMap<usize, PathBuf> = BTreeMap::new();
    for (p, s) in state {
        let dest = to.join(p);
        match s {
            Src::Dir => std::fs::create_dir_all(&dest).unwrap(),
            Src::Link(t) => std::os::unix::fs::symlink(t, &dest).unwrap(),
            Src::File(id, content) => {
                if let Some(f) = first.get(id) {
                    std::fs::hard_link(f, &dest).unwrap();
                    continue;
                }
                match content {
                    Some(c) => {
                        let st = Command::new("cp")
                            .arg("--sparse=always")
                            .arg(c)
                            .arg(&dest)
                            .status()
                            .unwrap();
                        assert!(st.success(), "copy {}", c.display());
                    }
                    None => {
                        std::fs::File::create(&dest).unwrap();
                    }
                }
                first.insert(*id, dest);
            }
        }
    }
}

/// Run `args` on a copy of `env`'s repository with the log on, then check every state a
/// power loss could leave. `allowed(ids)` says which sets of generations are acceptable.
/// Returns the number of distinct states checked.
fn explore(env: &Env, name: &str, vm: &str, args: &[&str], prune: bool) -> usize {
    let base = env.path(&format!("{name}-base"));
    copy_repo(&env.repo(), &base);
    let old = env.archive_at(&base, vm);
    let log = env.path(&format!("{name}-log"));
    std::fs::create_dir_all(&log).unwrap();
    // The repository as it was, for the files a state takes from before the command.
    copy_repo(&base, &log.join("base"));
    let run = env.path(&format!("{name}-run"));
    copy_repo(&base, &run);
    let log_dir = log.display().to_string();
    let out = env.run_at(&run, args, &[("VMKEEP_FAULT_LOG", &log_dir)]);
    succeeded(&out, &format!("{name}: "));
    let new = env.archive_at(&run, vm);
    let replay = Replay::new(&base, &log, &run);
    let n = replay.ops.len();
    assert!(n > 3, "{name}: only {n} operations logged");
    let mut seen = BTreeSet::new();
    let scratch = env.path(&format!("{name}-state"));
    for k in 0..=n {
        for keep in [false, true] {
            let state = replay.state(k, keep, &run);
            if !seen.insert(state.clone()) {
                continue;
            }
            build(&state, &scratch);
            let at = format!("{name}: power lost after op {k}/{n} (data kept: {keep})");
            let o = env.run_at(&scratch, &["check", vm, "--deep"], &[]);
            assert!(
                o.status.success(),
                "{at}: check --deep failed ({:?}):\n{}{}",
                o.status.code(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                !scratch.join(vm).join("txn.toml").exists(),
                "{at}: recovery left the transaction"
            );
            let ids = Env::generations_in(&scratch, vm);
            let old_ids: Vec<String> = old.keys().cloned().collect();
            let new_ids: Vec<String> = new.keys().cloned().collect();
            if prune {
                assert!(
                    new_ids.iter().all(|i| ids.contains(i))
                        && ids.iter().all(|i| old_ids.contains(i)),
                    "{at}: generations {ids:?}, not between {old_ids:?} and {new_ids:?}"
                );
            } else {
                assert!(
                    ids == old_ids || ids == new_ids,
                    "{at}: generations {ids:?}, neither {old_ids:?} nor {new_ids:?}"
                );
            }
            let want = if ids == new_ids { &new } else { &old };
            for id in &ids {
                for (disk, bytes) in &want[id] {
                    let got = env
                        .restored_at(&scratch, vm, id, Some(disk))
                        .unwrap_or_else(|e| panic!("{at}: restore {id} {disk}: {e}"));
                    assert!(&got == bytes, "{at}: generation {id} disk {disk} changed");
                }
                assert_eq!(
                    disks_of(&scratch, vm, id),
                    want[id].keys().cloned().collect::<Vec<_>>(),
                    "{at}: the disks of {id}"
                );
            }
            let latest = std::fs::read_link(scratch.join(vm).join("latest")).unwrap();
            assert_eq!(
                latest.to_str(),
                ids.last().map(String::as_str),
                "{at}: latest"
            );
        }
    }
    println!("{name}: {n} operations, {} distinct states", seen.len());
    seen.len()
}

fn backup(disks: &[(&str, &Path)], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["backup".into(), "vm".into()];
    for (d, p) in disks {
        args.push("--disk".into());
        args.push(format!("{d}={}", p.display()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_backup(env: &Env, disks: &[(&str, &Path)], extra: &[&str]) {
    let args = backup(disks, extra);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    env.ok(&a);
}

fn set_len(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Two generations of a small one-disk VM (16 KiB blocks), ready for a third.
fn small_vm(env: &Env) -> PathBuf {
    let disk = env.disk("a.raw", 256 << 10);
    write_at(&disk, 0, &noise(1, 160 << 10));
    run_backup(env, &[("vda", &disk)], &["--block-size", "16K"]);
    write_at(&disk, 32 << 10, &noise(2, 48 << 10));
    run_backup(env, &[("vda", &disk)], &[]);
    disk
}

fn explore_backup(env: &Env, name: &str, disks: &[(&str, &Path)]) -> usize {
    let args = backup(disks, &[]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    explore(env, name, "vm", &a, false)
}

#[test]
fn power_loss_during_backup_recovers_old_or_new() {
    let mut total = 0;
    // Overwrite: data changed, a block zeroed.
    let env = Env::new();
    let disk = small_vm(&env);
    write_at(&disk, 0, &noise(3, 20 << 10));
    write_at(&disk, 96 << 10, &[0u8; 32 << 10]);
    total += explore_backup(&env, "overwrite", &[("vda", &disk)]);
    // Grow.
    let env = Env::new();
    let disk = small_vm(&env);
    set_len(&disk, 400 << 10);
    write_at(&disk, 300 << 10, &noise(4, 40 << 10));
    write_at(&disk, 16 << 10, &noise(5, 8 << 10));
    total += explore_backup(&env, "grow", &[("vda", &disk)]);
    // Shrink.
    let env = Env::new();
    let disk = small_vm(&env);
    set_len(&disk, 100 << 10);
    write_at(&disk, 0, &noise(6, 8 << 10));
    total += explore_backup(&env, "shrink", &[("vda", &disk)]);
    // A disk added.
    let env = Env::new();
    let disk = small_vm(&env);
    let second = env.disk("b.raw", 128 << 10);
    write_at(&second, 16 << 10, &noise(7, 40 << 10));
    write_at(&disk, 0, &noise(8, 16 << 10));
    total += explore_backup(&env, "disk-added", &[("vda", &disk), ("vdb", &second)]);
    // A disk removed, and two disks changed at once.
    let env = Env::new();
    let disk = env.disk("a.raw", 256 << 10);
    let second = env.disk("b.raw", 128 << 10);
    write_at(&disk, 0, &noise(9, 100 << 10));
    write_at(&second, 0, &noise(10, 60 << 10));
    let both = [("vda", disk.as_path()), ("vdb", second.as_path())];
    run_backup(&env, &both, &["--block-size", "16K"]);
    write_at(&disk, 48 << 10, &noise(11, 32 << 10));
    write_at(&second, 16 << 10, &noise(12, 16 << 10));
    run_backup(&env, &both, &[]);
    write_at(&disk, 0, &noise(13, 16 << 10));
    write_at(&second, 64 << 10, &noise(14, 32 << 10));
    total += explore_backup(&env, "two-disks", &both);
    total += explore_backup(&env, "disk-removed", &[("vda", &disk)]);
    println!("power-loss explorer, backups: {total} distinct states");
}

#[test]
fn power_loss_during_prune_keeps_every_kept_generation() {
    let mut total = 0;
    let env = Env::new();
    let disk = small_vm(&env);
    for i in 0..2u64 {
        write_at(&disk, (i * 64) << 10, &noise(20 + i, 24 << 10));
        run_backup(&env, &[("vda", &disk)], &[]);
    }
    let ids = env.generations("vm");
    assert_eq!(ids.len(), 4);
    // Drop the oldest.
    total += explore(
        &env,
        "drop-oldest",
        "vm",
        &["prune", "vm", "--keep-last", "3"],
        true,
    );
    // Merge the middle ones away: keep the oldest (protected) and the newest.
    env.ok(&["protect", "vm", "-g", &ids[0]]);
    total += explore(
        &env,
        "merge-middle",
        "vm",
        &["prune", "vm", "--keep-last", "1"],
        true,
    );
    println!("power-loss explorer, prunes: {total} distinct states");
}
