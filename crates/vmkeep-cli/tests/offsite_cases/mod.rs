//! The offsite cases, each run on a folder target (`tests/offsite.rs`) and on a real
//! S3-compatible bucket (`tests/offsite_s3.rs`, a Garage the test starts): sync ten
//! generations of a two-disk VM and restore every one bit for bit, deduplication across
//! generations and VMs, a sync killed halfway and resumed, `check --from` finding damage,
//! wrong or missing keys, no plaintext in the target, the rate limit, and prune from the
//! target. The target's objects are read and damaged through the library's own stores
//! (a folder, or the bucket over HTTP), never through vmkeep's CLI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde_json::Value;
use vmkeep::offsite::store::{DirStore, ObjectStore};

use crate::common::*;
use crate::garage::Garage;

/// The VM's name: long enough that finding it in an object would not be chance.
pub const VM: &str = "offsite-web1";

/// Where a case's targets are.
#[derive(Clone)]
pub enum Backend {
    /// `file:///…` folders in the test's temp folder.
    Folder,
    /// Prefixes of the bucket of a running Garage; vmkeep reads the connection from its
    /// config file (`[offsite.s3]`, the secret in a mode 0600 file).
    S3(Rc<Garage>),
}

/// An environment with a key file and a target.
pub struct Off {
    pub env: Env,
    pub key: PathBuf,
    pub target: String,
    backend: Backend,
    store: Box<dyn ObjectStore>,
}

/// Prefixes handed out in this process (each target of a bucket its own).
static PREFIXES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Off {
    pub fn new(backend: &Backend) -> Off {
        let env = Env::new();
        let key = env.path("offsite.key");
        env.ok(&["key", "create", key.to_str().unwrap()]);
        if let Backend::S3(g) = backend {
            let config = g.offsite_config(&env.path("s3-secret"));
            std::fs::write(env.path("no-config.toml"), config).unwrap();
        }
        let (target, store) = Off::place(&env, backend, "target");
        Off {
            env,
            key,
            target,
            backend: backend.clone(),
            store,
        }
    }

    /// Another target of the same kind, named `name`: its TARGET and its store.
    pub fn other_target(&self, name: &str) -> (String, Box<dyn ObjectStore>) {
        Off::place(&self.env, &self.backend, name)
    }

    fn place(env: &Env, backend: &Backend, name: &str) -> (String, Box<dyn ObjectStore>) {
        match backend {
            Backend::Folder => {
                let dir = env.path(name);
                std::fs::create_dir_all(&dir).unwrap();
                let store = DirStore::open(&dir).unwrap();
                (format!("file://{}", dir.display()), Box::new(store))
            }
            Backend::S3(g) => {
                let n = PREFIXES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let target = format!("s3://{}/{name}-{n}", g.bucket);
                let store = g.store(&target);
                (target, Box::new(store))
            }
        }
    }

    pub fn key(&self) -> &str {
        self.key.to_str().unwrap()
    }

    /// `sync ARGS… --to TARGET --key KEY --json`, required to succeed: its report.
    pub fn sync(&self, args: &[&str]) -> Value {
        let mut a = vec!["sync"];
        a.extend_from_slice(args);
        a.extend(["--to", &self.target, "--key", self.key(), "--json"]);
        serde_json::from_str(&self.env.ok(&a)).unwrap()
    }

    /// `restore VM -g GEN --disk DISK --from TARGET --to FILE`: the bytes, or stderr.
    pub fn restore_from(&self, vm: &str, gen: &str, disk: &str) -> Result<Vec<u8>, String> {
        let out = self.env.path("from-target.raw");
        let _ = std::fs::remove_file(&out);
        let o = self.env.run(&[
            "restore",
            vm,
            "-g",
            gen,
            "--disk",
            disk,
            "--from",
            &self.target,
            "--key",
            self.key(),
            "--to",
            out.to_str().unwrap(),
        ]);
        if !o.status.success() {
            return Err(format!("exit {:?}: {}", o.status.code(), stderr(&o)));
        }
        let b = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        Ok(b)
    }

    /// `status --from TARGET --json`.
    pub fn status(&self) -> Value {
        serde_json::from_str(&self.env.ok(&[
            "status",
            "--from",
            &self.target,
            "--key",
            self.key(),
            "--json",
        ]))
        .unwrap()
    }

    /// `check --from TARGET [--deep]`: exit status, stdout.
    pub fn check(&self, deep: bool) -> (i32, String) {
        let mut a = vec!["check", "--from", &self.target, "--key", self.key()];
        if deep {
            a.push("--deep");
        }
        let o = self.env.run(&a);
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o),
        )
    }

    /// Every object of the target: (key, bytes), by key.
    pub fn objects(&self) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = self
            .store
            .list("")
            .unwrap()
            .into_iter()
            .map(|o| {
                let b = self.store.get(&o.key).unwrap().unwrap();
                (o.key, b)
            })
            .collect();
        out.sort();
        out
    }

    /// The keys of the target's objects under `prefix`, by key.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut k: Vec<String> = self
            .store
            .list(prefix)
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        k.sort();
        k
    }

    /// The size of object `key`.
    pub fn size(&self, key: &str) -> u64 {
        self.store
            .list(key)
            .unwrap()
            .iter()
            .find(|o| o.key == key)
            .unwrap()
            .size
    }

    /// Object `key`'s bytes.
    pub fn get(&self, key: &str) -> Vec<u8> {
        self.store
            .get(key)
            .unwrap()
            .unwrap_or_else(|| panic!("no object {key}"))
    }

    /// Write object `key`.
    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.store.put(key, bytes).unwrap();
    }

    /// Delete object `key`.
    pub fn delete(&self, key: &str) {
        self.store.delete(key).unwrap();
    }

    /// Put the target back to `snapshot` (of [`Off::objects`]): objects it lacks are
    /// deleted, the others written again.
    pub fn reset(&self, snapshot: &[(String, Vec<u8>)]) {
        for k in self.keys("") {
            if !snapshot.iter().any(|o| o.0 == k) {
                self.delete(&k);
            }
        }
        for (k, b) in snapshot {
            self.put(k, b);
        }
    }
}

/// Back up VM `vm` from disks `vda` and `vdb`.
pub fn backup2(env: &Env, vm: &str, vda: &Path, vdb: &Path) {
    let a = format!("vda={}", vda.display());
    let b = format!("vdb={}", vdb.display());
    env.ok(&["backup", vm, "--disk", &a, "--disk", &b]);
}

/// Ten generations of a two-disk VM: vda 3 MiB (noise, a text region, a hole) that
/// changes a little each time, grows once and loses a region to zeros; vdb 1 MiB that
/// changes twice. The ids, oldest first.
pub fn ten_generations(env: &Env, vm: &str) -> Vec<String> {
    let vda = env.disk("vda.raw", 3 << 20);
    let vdb = env.disk("vdb.raw", 1 << 20);
    write_at(&vda, 0, &noise(1, 2 << 20));
    write_at(&vda, 2 << 20, &text(256 << 10));
    write_at(&vdb, 0, &noise(2, 1 << 20));
    backup2(env, vm, &vda, &vdb);
    for k in 1..10u64 {
        write_at(
            &vda,
            (k * (192 << 10)) % (5 << 19),
            &noise(100 + k, 64 << 10),
        );
        match k {
            4 => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&vda)
                    .unwrap()
                    .set_len(4 << 20)
                    .unwrap();
                write_at(&vda, 7 << 19, &noise(200, 128 << 10));
            }
            6 | 9 => write_at(&vdb, k << 16, &noise(300 + k, 128 << 10)),
            8 => write_at(&vda, 0, &vec![0u8; 128 << 10]),
            _ => {}
        }
        backup2(env, vm, &vda, &vdb);
    }
    let gens = env.generations(vm);
    assert_eq!(gens.len(), 10);
    gens
}

/// Every generation of `vm` restored from the target equals its local restore, disk
/// for disk.
pub fn assert_target_restores_like_local(off: &Off, vm: &str, gens: &[String]) {
    for g in gens {
        for d in ["vda", "vdb"] {
            let local = off.env.restored(vm, g, Some(d));
            let remote = off
                .restore_from(vm, g, d)
                .unwrap_or_else(|e| panic!("restore {g} {d} from the target: {e}"));
            assert!(local == remote, "generation {g} disk {d} differs");
        }
    }
}

pub fn ten_generations_sync_and_every_one_restores_bit_for_bit_from_the_target(backend: &Backend) {
    let off = Off::new(backend);
    let gens = ten_generations(&off.env, VM);
    let r = off.sync(&[VM]);
    assert_eq!(r["generations_synced"], 10, "{r}");
    assert!(
        r["bytes_deduplicated"].as_u64().unwrap() > r["bytes_new"].as_u64().unwrap(),
        "generations share most blocks: {r}"
    );
    assert_eq!(
        r["bytes_read"], r["bytes_new"],
        "only new blocks are read: {r}"
    );
    let st = off.status();
    let listed: Vec<&str> = st["vms"][0]["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    let mut newest_first = gens.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    assert_eq!(st["vms"][0]["name"], VM);
    assert_target_restores_like_local(&off, VM, &gens);
    // -g N counts from the newest on the target as in the repository.
    assert_eq!(
        off.restore_from(VM, "0", "vda").unwrap(),
        off.env.restored(VM, &gens[9], Some("vda"))
    );

    // The second sync of the same VM uploads nothing.
    let objects = off.objects().len();
    let again = off.sync(&[VM]);
    assert_eq!(again["generations_synced"], 0, "{again}");
    assert_eq!(again["bytes_new"], 0, "{again}");
    assert_eq!(again["objects_written"], 0, "{again}");
    assert_eq!(off.objects().len(), objects);

    // One more generation: only its changed blocks go up.
    let vda = off.env.path("vda.raw");
    write_at(&vda, 64 << 10, &noise(999, 64 << 10));
    backup2(&off.env, VM, &vda, &off.env.path("vdb.raw"));
    let inc = off.sync(&["--all"]);
    assert_eq!(inc["generations_synced"], 1, "{inc}");
    assert_eq!(
        inc["bytes_new"],
        64 << 10,
        "one changed 64 KiB block: {inc}"
    );
    let (code, out) = off.check(true);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deep check ok"), "{out}");
}

pub fn the_target_holds_no_plaintext_block_digest_or_vm_name(backend: &Backend) {
    let off = Off::new(backend);
    let gens = ten_generations(&off.env, VM);
    off.sync(&[VM]);
    let local = off.env.restored(VM, &gens[0], Some("vda"));
    let vda = off.env.repo().join(VM).join("latest").join("vda.digest");
    let digests = std::fs::read(vda).unwrap();
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("noise block bytes".into(), local[100_000..100_048].to_vec()),
        (
            "text block bytes".into(),
            local[(2 << 20) + 1000..(2 << 20) + 1048].to_vec(),
        ),
        ("VM name".into(), VM.as_bytes().to_vec()),
    ];
    for b in [3usize, 20, 33, 56] {
        let d = &digests[4096 + b * 32..4096 + (b + 1) * 32];
        assert!(d.iter().any(|&x| x != 0), "block {b} has data");
        needles.push((format!("digest of block {b}"), d.to_vec()));
        let hex: String = d.iter().map(|x| format!("{x:02x}")).collect();
        needles.push((format!("hex digest of block {b}"), hex.into_bytes()));
    }
    let objects = off.objects();
    assert!(objects.len() >= 12, "packs, indexes, manifests, config");
    for (key, bytes) in &objects {
        assert!(!key.contains(VM), "object name {key} shows the VM's name");
        for (what, needle) in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "object {key} holds the {what} in plain"
            );
        }
    }
}

pub fn two_vms_cloned_from_one_image_share_their_blocks(backend: &Backend) {
    let off = Off::new(backend);
    let img = off.env.disk("base.raw", 4 << 20);
    write_at(&img, 0, &noise(7, 3 << 20));
    let copy = off.env.path("clone.raw");
    std::fs::copy(&img, &copy).unwrap();
    off.env.backup("web-a", &img, &[]);
    off.env.backup("web-b", &copy, &[]);
    let a = off.sync(&["web-a"]);
    assert_eq!(a["bytes_new"], 3 << 20, "{a}");
    let b = off.sync(&["web-b"]);
    assert_eq!(b["generations_synced"], 1, "{b}");
    assert_eq!(b["bytes_new"], 0, "the clone uploads no block: {b}");
    assert_eq!(b["bytes_deduplicated"], 3 << 20, "{b}");
    assert_eq!(b["packs_written"], 0, "{b}");
    let want = std::fs::read(&img).unwrap();
    assert_eq!(off.restore_from("web-b", "0", "vda").unwrap(), want);
    assert_eq!(off.restore_from("web-a", "0", "vda").unwrap(), want);
}

pub fn limit_rate_bounds_the_upload_rate(backend: &Backend) {
    let off = Off::new(backend);
    let img = off.env.disk("vda.raw", 3 << 20);
    write_at(&img, 0, &noise(11, 3 << 20));
    off.env.backup(VM, &img, &[]);
    let t = std::time::Instant::now();
    let r = off.sync(&[
        VM,
        "--limit-rate",
        "1M",
        "--pack-size",
        "64K",
        "--jobs",
        "4",
    ]);
    let took = t.elapsed().as_secs_f64();
    let up = r["bytes_uploaded"].as_u64().unwrap() as f64;
    // A token bucket of one object: 3 MiB at 1 MiB/s takes at least 2 s.
    assert!(up > 3.0 * 1048576.0, "{r}");
    assert!(
        took >= (up - 200_000.0) / 1048576.0,
        "{up} bytes in {took} s"
    );
    assert_eq!(
        off.restore_from(VM, "0", "vda").unwrap(),
        std::fs::read(&img).unwrap()
    );
    let e = off.env.fails(
        &[
            "sync",
            VM,
            "--to",
            &off.target,
            "--key",
            off.key(),
            "--limit-rate",
            "0",
        ],
        2,
    );
    assert!(e.contains("--limit-rate"), "{e}");
}

pub fn without_the_key_or_with_a_wrong_key_one_clear_error_and_nothing_is_read(backend: &Backend) {
    let off = Off::new(backend);
    let gens = ten_generations(&off.env, VM);
    off.sync(&[VM]);
    let out = off.env.path("x.raw");
    let out = out.to_str().unwrap();
    // No key.
    let e = off.env.fails(
        &[
            "restore",
            VM,
            "--disk",
            "vda",
            "--from",
            &off.target,
            "--to",
            out,
        ],
        2,
    );
    assert!(e.contains("needs its key: give --key FILE"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    // Another key: one line naming both ids, for every command that reads the target.
    let other = off.env.path("other.key");
    off.env.ok(&["key", "create", other.to_str().unwrap()]);
    let other = other.to_str().unwrap();
    for args in [
        vec!["restore", VM, "--disk", "vda", "--to", out],
        vec!["status"],
        vec!["check", "--deep"],
        vec!["prune", "--all", "--keep-last", "1"],
        vec!["sync", VM],
    ] {
        let mut a = args.clone();
        if a[0] == "sync" {
            a.extend(["--to", &off.target, "--key", other]);
        } else {
            a.extend(["--from", &off.target, "--key", other]);
        }
        let e = off.env.fails(&a, 2);
        assert!(e.contains("is not this target's key"), "{a:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{a:?}: {e}");
    }
    assert!(!Path::new(out).exists());
    // A key that was not made for this target but copied over its config still opens
    // nothing: every manifest fails to decrypt (check names them) and nothing restores.
    let text = String::from_utf8(off.get("config")).unwrap();
    let their_id = std::fs::read_to_string(other)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("id = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let mine = text
        .lines()
        .find_map(|l| l.strip_prefix("key_id = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    off.put("config", text.replace(&mine, &their_id).as_bytes());
    let o = off
        .env
        .run(&["check", "--from", &off.target, "--key", other]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        report.matches("does not decrypt with this key").count(),
        gens.len(),
        "{report}"
    );
    let o = off.env.run(&[
        "restore",
        VM,
        "--disk",
        "vda",
        "--from",
        &off.target,
        "--key",
        other,
        "--to",
        out,
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("has no generations"), "{}", stderr(&o));
    // A key file others can read is refused before anything is read.
    let k = off.key.clone();
    set_mode(&k, 0o644);
    let e = off
        .env
        .fails(&["status", "--from", &off.target, "--key", off.key()], 2);
    assert!(e.contains("chmod 600"), "{e}");
}

pub fn check_from_finds_a_flipped_byte_in_a_pack_a_deleted_pack_and_a_forged_manifest(
    backend: &Backend,
) {
    let off = Off::new(backend);
    let gens = ten_generations(&off.env, VM);
    off.sync(&[VM]);
    let (code, out) = off.check(true);
    assert_eq!(code, 0, "{out}");
    let clean = off.objects();
    let reset = || off.reset(&clean);
    let packs = off.keys("packs/");
    let manifests = off.keys("manifests/");
    assert!(packs.len() >= 2 && manifests.len() == 10);

    // A flipped byte inside a blob of the first pack (gen 0's blocks): a deep check
    // names the pack; a restore of a generation that needs the block fails (exit 3)
    // naming it, and writes nothing.
    let pack0 = packs.iter().max_by_key(|k| off.size(k)).unwrap().clone();
    let mut damaged = off.get(&pack0);
    damaged[5000] ^= 0x40;
    off.put(&pack0, &damaged);
    let (code, out) = off.check(true);
    assert_eq!(code, 3, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("DAMAGE:")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains(&pack0) && lines[0].contains("does not authenticate"),
        "{out}"
    );
    let (code, out) = off.check(false);
    assert_eq!(code, 0, "a quick check does not read blobs: {out}");
    let failures: Vec<String> = gens
        .iter()
        .filter_map(|g| off.restore_from(VM, g, "vda").err())
        .collect();
    assert!(
        !failures.is_empty(),
        "some generation needs the damaged block"
    );
    for f in &failures {
        assert!(f.starts_with("exit Some(3)") && f.contains(&pack0), "{f}");
    }
    assert!(!off.env.path("from-target.raw").exists());
    reset();

    // A deleted pack: the quick check names it and the manifests that need it.
    off.delete(&pack0);
    let (code, out) = off.check(false);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("DAMAGE:") && l.contains(&pack0) && l.contains("missing")),
        "{out}"
    );
    // The repair docs/offsite.md gives: delete the manifests that need the pack, sync
    // again; the generations come back whole.
    for l in out.lines().filter(|l| l.starts_with("DAMAGE:")) {
        let m = l.split("; ").nth(1).unwrap().split(' ').next().unwrap();
        assert!(m.starts_with("manifests/"), "{l}");
        off.delete(m);
    }
    let r = off.sync(&[VM]);
    assert!(r["generations_synced"].as_u64().unwrap() >= 1, "{r}");
    let (code, out) = off.check(true);
    assert_eq!(code, 0, "{out}");
    assert_target_restores_like_local(&off, VM, &gens);
    reset();

    // A forged manifest: random bytes under a manifest's name, and another key's
    // manifest moved in; both named, nothing else.
    let len = off.size(&manifests[0]) as usize;
    off.put(&manifests[0], &noise(42, len));
    let (code, out) = off.check(false);
    assert_eq!(code, 3, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("DAMAGE:")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].contains(&manifests[0]), "{out}");
    reset();
    // A manifest of the same VM and generation sealed by another key.
    let other = Off::new(backend);
    let vda = off.env.path("vda.raw");
    let spec = format!("vda={}", vda.display());
    other.env.ok(&["backup", VM, "--disk", &spec]);
    other.sync(&[VM]);
    let theirs = other.keys("manifests/");
    off.put(&manifests[1], &other.get(&theirs[0]));
    let (code, out) = off.check(false);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("DAMAGE:")
            && l.contains(&manifests[1])
            && l.contains("does not decrypt")),
        "{out}"
    );
    reset();
    let (code, out) = off.check(true);
    assert_eq!(code, 0, "{out}");
}

pub fn prune_from_the_target_then_what_remains_restores(backend: &Backend) {
    let off = Off::new(backend);
    let gens = ten_generations(&off.env, VM);
    off.sync(&["--all", "--pack-size", "64K"]);
    let before: u64 = off
        .objects()
        .iter()
        .filter(|o| o.0.starts_with("packs/"))
        .map(|o| o.1.len() as u64)
        .sum();
    let from = ["--from", off.target.as_str(), "--key", off.key()];
    // A dry run removes nothing.
    let mut a = vec![
        "prune",
        VM,
        "--keep-last",
        "3",
        "--dry-run",
        "--grace",
        "0s",
        "--json",
    ];
    a.extend(from);
    let r: Value = serde_json::from_str(&off.env.ok(&a)).unwrap();
    assert_eq!(r["vms"][0]["removed"].as_array().unwrap().len(), 7, "{r}");
    assert_eq!(off.keys("manifests/").len(), 10);
    // Another run's fresh lock keeps every pack (the manifests still go).
    off.put(
        "locks/0123456789abcdef",
        b"host = \"elsewhere\"\npid = 1\ncommand = \"sync\"\ntime = \"2026-01-01T00:00:00Z\"\n",
    );
    let mut a = vec!["prune", VM, "--keep-last", "3", "--grace", "0s", "--json"];
    a.extend(from);
    let out = off.env.ok(&[
        "prune",
        VM,
        "--keep-last",
        "3",
        "--grace",
        "1h",
        "--json",
        "--from",
        &off.target,
        "--key",
        off.key(),
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert!(
        r["packs_kept_because"]
            .as_str()
            .unwrap()
            .contains("elsewhere"),
        "{r}"
    );
    assert_eq!(off.keys("manifests/").len(), 3);
    off.delete("locks/0123456789abcdef");
    // Now the unreferenced packs go.
    let r: Value = serde_json::from_str(&off.env.ok(&a)).unwrap();
    assert!(r["packs_kept_because"].is_null(), "{r}");
    assert!(r["packs_removed"].as_u64().unwrap() > 0, "{r}");
    let after: u64 = off
        .objects()
        .iter()
        .filter(|o| o.0.starts_with("packs/"))
        .map(|o| o.1.len() as u64)
        .sum();
    assert!(after < before, "{after} < {before}");
    assert_eq!(off.keys("index/").len(), 1, "one merged index");
    let (code, out) = off.check(true);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("referenced by no manifest"), "{out}");
    assert_target_restores_like_local(&off, VM, &gens[7..]);
    let e = off.restore_from(VM, &gens[6], "vda").unwrap_err();
    assert!(e.starts_with("exit Some(2)"), "{e}");
    // A sync after the prune uploads the dropped generations again, whole and proven.
    let r = off.sync(&[VM]);
    assert_eq!(r["generations_synced"], 7, "{r}");
    assert_target_restores_like_local(&off, VM, &gens[..2]);
}

/// A sync killed with SIGKILL while it uploads (paused at a fault point, then killed),
/// then run again: the second run completes, does not upload again what the first one
/// indexed, and every generation restores bit for bit.
pub fn a_sync_killed_halfway_resumes_and_uploads_little_twice(backend: &Backend) {
    for point in ["sync-index-written", "sync-manifest-written"] {
        let off = Off::new(backend);
        let gens = ten_generations(&off.env, VM);
        // What an uninterrupted sync uploads, into another folder.
        let (url, _) = off.other_target("fresh-target");
        let full: Value = serde_json::from_str(&off.env.ok(&[
            "sync",
            VM,
            "--to",
            &url,
            "--key",
            off.key(),
            "--pack-size",
            "64K",
            "--json",
        ]))
        .unwrap();
        let full_new = full["bytes_new"].as_u64().unwrap();
        let paused = off.env.spawn_paused(
            &[
                "sync",
                VM,
                "--to",
                &off.target,
                "--key",
                off.key(),
                "--pack-size",
                "64K",
                "--jobs",
                "2",
            ],
            &format!("{point}:60"),
        );
        paused.reached(60, &format!("sync never reached {point}"));
        let mut child = paused.child;
        child.kill().unwrap();
        child.wait().unwrap();
        let first_packs = off.keys("packs/").len();
        assert!(first_packs > 0, "{point}: something was uploaded");
        assert_eq!(
            off.keys("locks/").len(),
            1,
            "{point}: the killed run's lock stays"
        );
        let manifests_before = off.keys("manifests/").len();
        let again = off.sync(&[VM, "--pack-size", "64K"]);
        assert_eq!(
            again["generations_synced"].as_u64().unwrap() as usize,
            10 - manifests_before,
            "{point}: {again}"
        );
        let again_new = again["bytes_new"].as_u64().unwrap();
        // The first run indexed at least 16 packs (sync-index-written) or one generation
        // (sync-manifest-written); none of that goes up again.
        assert!(
            again_new + (16 << 16) <= full_new,
            "{point}: the resumed sync uploaded {again_new} of {full_new}"
        );
        // Re-uploaded at most the unindexed packs the killed run had in flight.
        let total_packs = off.keys("packs/").len();
        let full_packs = full["packs_written"].as_u64().unwrap() as usize;
        assert!(
            total_packs <= full_packs + 8,
            "{point}: {total_packs} packs for {full_packs}"
        );
        let (code, out) = off.check(true);
        assert_eq!(code, 0, "{point}: {out}");
        assert_target_restores_like_local(&off, VM, &gens);
    }
}
