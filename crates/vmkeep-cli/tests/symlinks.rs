//! Symbolic links (and a hard link) planted in a repository never make vmkeep write,
//! truncate or delete anything outside it. Each case plants one link to a victim file or
//! folder outside the repository, runs `check`, `backup`, `prune`, `status` and `restore`
//! against the VM (the plant renewed before each), and requires the victim to be exactly as
//! it was; a command that refuses says so in one line naming the link.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{noise, Env};

const SIZE: u64 = 4 << 20;
const VICTIM: &[u8] = b"the victim's own bytes, which vmkeep must never touch\n";

/// A repository with two generations of VM `vm` (disk `vda`), a victim file and a victim
/// folder (holding files named like every stray vmkeep cleans up) outside the repository.
struct Setup {
    env: Env,
    disk: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let env = Env::new();
        let disk = env.disk("disk.raw", SIZE);
        common::write_at(&disk, 0, &noise(1, 256 << 10));
        env.backup("vm", &disk, &["--block-size", "64K"]);
        common::write_at(&disk, 1 << 20, &noise(2, 128 << 10));
        env.backup("vm", &disk, &[]);
        let s = Setup { env, disk };
        std::fs::write(s.victim(), VICTIM).unwrap();
        std::fs::create_dir(s.victim_dir()).unwrap();
        for name in ["a.tmp", "vda.rdiff.merge", "123-x", "lock"] {
            std::fs::write(s.victim_dir().join(name), VICTIM).unwrap();
        }
        s
    }

    fn victim(&self) -> PathBuf {
        self.env.path("victim")
    }

    fn victim_dir(&self) -> PathBuf {
        self.env.path("victim-dir")
    }

    fn vm_dir(&self) -> PathBuf {
        self.env.repo().join("vm")
    }

    /// Every name and byte of the victim file and folder.
    fn victims(&self) -> Vec<(String, Option<Vec<u8>>)> {
        let mut v = vec![("victim".to_string(), std::fs::read(self.victim()).ok())];
        let mut names: Vec<_> = std::fs::read_dir(self.victim_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            v.push((name, std::fs::read(&p).ok()));
        }
        v
    }

    /// Run every command against `vm`, `plant` renewing the link before each; the victims
    /// must survive every one. Returns each command's name and output.
    fn attack(&self, plant: impl Fn()) -> Vec<(&'static str, Output)> {
        let spec = format!("vda={}", self.disk.display());
        let out = self.env.path("restored.raw");
        let out_s = out.display().to_string();
        let cmds: [(&str, Vec<&str>); 5] = [
            ("check", vec!["check", "vm"]),
            ("backup", vec!["backup", "vm", "--disk", &spec]),
            ("prune", vec!["prune", "vm", "--keep-last", "1"]),
            ("status", vec!["status", "vm"]),
            ("restore", vec!["restore", "vm", "--to", &out_s]),
        ];
        let mut outputs = Vec::new();
        let before = self.victims();
        assert_eq!(before[0].1.as_deref(), Some(VICTIM));
        for (name, args) in cmds {
            let _ = std::fs::remove_file(&out);
            plant();
            let o = self.env.run(&args);
            assert!(
                self.victims() == before,
                "after {name}: a file outside the repository was changed, truncated or removed"
            );
            outputs.push((name, o));
        }
        outputs
    }
}

/// Replace whatever is at `at` with a symbolic link to `to`.
fn relink(to: &Path, at: &Path) {
    if let Ok(m) = std::fs::symlink_metadata(at) {
        if m.is_dir() {
            std::fs::remove_dir_all(at).unwrap();
        } else {
            std::fs::remove_file(at).unwrap();
        }
    }
    symlink(to, at).unwrap();
}

/// `out` failed with one line on stderr naming `link` as a symbolic link: exit 1, or 3 for
/// `check` (damage found).
#[track_caller]
fn refused(cmd: &str, out: &Output, link: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    let code = if cmd == "check" { 3 } else { 1 };
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd}: expected exit {code}, stderr:\n{err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{cmd}: not one line:\n{err}"
    );
    // `check` names the path relative to the repository.
    let named = link
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        + "/"
        + link.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(named.as_ref()) && err.contains("symbolic link"),
        "{cmd}: the line does not name the link {}: {err}",
        link.display()
    );
}

#[track_caller]
fn succeeded(cmd: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{cmd} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_symlinked_lock_is_refused_and_never_truncates_its_target() {
    let s = Setup::new();
    let lock = s.vm_dir().join("lock");
    for (cmd, out) in s.attack(|| relink(&s.victim(), &lock)) {
        match cmd {
            // The writers take the lock: they refuse the link.
            "check" | "backup" | "prune" => refused(cmd, &out, &lock),
            // Readers take no lock and never open it.
            _ => succeeded(cmd, &out),
        }
    }
}

#[test]
fn a_symlinked_transaction_record_or_its_draft_is_refused() {
    let s = Setup::new();
    let txn = s.vm_dir().join("txn.toml");
    for (cmd, out) in s.attack(|| relink(&s.victim(), &txn)) {
        match cmd {
            // Recovery reads the record: a link is refused, never read or replaced.
            "check" | "backup" | "prune" => refused(cmd, &out, &txn),
            _ => succeeded(cmd, &out),
        }
    }
    std::fs::remove_file(&txn).unwrap();
    // The draft every profile is written to before its rename: a backup rewrites
    // txn.toml.tmp and vm.toml.tmp, so a link there must not truncate its target.
    for draft in ["txn.toml.tmp", "vm.toml.tmp"] {
        let tmp = s.vm_dir().join(draft);
        for (cmd, out) in s.attack(|| relink(&s.victim(), &tmp)) {
            // Recovery removes a stray `*.tmp` (the link itself) before anything is
            // written, so every command succeeds.
            succeeded(cmd, &out);
        }
    }
}

#[test]
fn a_symlinked_vm_folder_is_refused() {
    let s = Setup::new();
    // The VM folder moves into the victim folder, with the victim files beside its own,
    // and the repository keeps only a link to it.
    let real = s.victim_dir();
    let moved = s.env.path("moved-vm");
    std::fs::rename(s.vm_dir(), &moved).unwrap();
    for entry in std::fs::read_dir(&moved).unwrap() {
        let e = entry.unwrap();
        let to = real.join(e.file_name());
        if e.file_name() != "lock" {
            std::fs::rename(e.path(), to).unwrap();
        }
    }
    let vm = s.vm_dir();
    for (cmd, out) in s.attack(|| relink(&real, &vm)) {
        refused(cmd, &out, &vm);
    }
    // `check --all` lists the VM and refuses it the same way.
    let out = s.env.run(&["check", "--all"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("symbolic link"));
    assert_eq!(s.victims()[0].1.as_deref(), Some(VICTIM));
}

#[test]
fn a_symlinked_generation_folder_is_refused() {
    let s = Setup::new();
    let gens = s.env.generations("vm");
    // A generation-named folder (the oldest one's, moved outside) is a link to the victim
    // folder, which also holds the strays a recovery would clean up in a generation.
    let gen = s.vm_dir().join(&gens[0]);
    for e in std::fs::read_dir(&gen).unwrap() {
        let e = e.unwrap();
        std::fs::rename(e.path(), s.victim_dir().join(e.file_name())).unwrap();
    }
    std::fs::remove_dir(&gen).unwrap();
    // Every command lists the generations first, and refuses the link.
    for (cmd, out) in s.attack(|| relink(&s.victim_dir(), &gen)) {
        refused(cmd, &out, &gen);
    }
}

#[test]
fn symlinked_strays_are_removed_as_links_and_their_targets_survive() {
    let s = Setup::new();
    let gens = s.env.generations("vm");
    let strays = [
        (
            format!("{}.partial", "0193a000-0000-7000-8000-00000000ffff"),
            s.victim_dir(),
        ),
        (format!("{}.deleting", gens[0]), s.victim_dir()),
        ("x.tmp".to_string(), s.victim()),
        ("latest.tmp".to_string(), s.victim()),
        (format!("{}/vda.rdiff.merge", gens[0]), s.victim()),
        (format!("{}/vda.raw.tmp", gens[1]), s.victim()),
    ];
    let plant = || {
        for (name, to) in &strays {
            let at = s.vm_dir().join(name);
            // (A generation prune removed takes its strays with it.)
            if at.parent().unwrap().is_dir() {
                relink(to, &at);
            }
        }
    };
    for (cmd, out) in s.attack(plant) {
        succeeded(cmd, &out);
    }
    // The last writer (prune) removed every stray link, and only the link.
    plant();
    s.env.ok(&["check", "vm"]);
    for (name, _) in &strays {
        assert!(
            std::fs::symlink_metadata(s.vm_dir().join(name)).is_err(),
            "{name} is still there"
        );
    }
}

#[test]
fn latest_pointing_outside_or_at_no_generation_is_never_followed() {
    let s = Setup::new();
    let latest = s.vm_dir().join("latest");
    let gens = s.env.generations("vm");
    for target in [
        s.victim(),
        s.victim_dir(),
        PathBuf::from("../../victim-dir"),
        PathBuf::from(format!("{}/vda.raw", gens[1])),
        PathBuf::from("pins"),
    ] {
        // check reports it as damage (exit 3) naming `latest`; the writers replace it with
        // the right link; the readers never open it.
        for (cmd, out) in s.attack(|| symlink_again(&latest, &target)) {
            if cmd == "check" {
                assert_eq!(out.status.code(), Some(3), "check of latest -> {target:?}");
                let report = String::from_utf8_lossy(&out.stdout);
                assert!(report.contains("'latest' does not point at"), "{report}");
            } else {
                succeeded(cmd, &out);
            }
        }
        // After the backup and prune, `latest` names the newest generation again.
        s.env.ok(&[
            "backup",
            "vm",
            "--disk",
            &format!("vda={}", s.disk.display()),
        ]);
        let newest = s.env.generations("vm").pop().unwrap();
        assert_eq!(std::fs::read_link(&latest).unwrap(), PathBuf::from(newest));
    }
}

fn symlink_again(latest: &Path, target: &Path) {
    let _ = std::fs::remove_file(latest);
    symlink(target, latest).unwrap();
}

#[test]
fn a_symlinked_pins_folder_is_refused_and_its_target_keeps_its_files() {
    let s = Setup::new();
    let gens = s.env.generations("vm");
    // A file in the victim folder named like a stale pin of an existing generation: a
    // pruner removes stale pins.
    std::fs::write(s.victim_dir().join(format!("1-{}", gens[0])), VICTIM).unwrap();
    let pins = s.vm_dir().join("pins");
    for (cmd, out) in s.attack(|| relink(&s.victim_dir(), &pins)) {
        match cmd {
            "prune" => refused(cmd, &out, &pins),
            _ => succeeded(cmd, &out),
        }
    }
}
