//! Soak: 200 generations of a VM with random guest writes, growth and shrink, pruned on a
//! schedule as they go (some generations protected), then checked deep and every
//! generation left restored bit for bit. CI runs it at a reduced disk size; set
//! `VMKEEP_SOAK_GENERATIONS` and `VMKEEP_SOAK_DISK_KIB` for a longer run.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

mod support;

use support::archive::{deep_check_ok, restore_view};
use vmkeep::archive::profile;
use vmkeep::archive::retention::Schedule;
use vmkeep::archive::view::DiskView;
use vmkeep::archive::Repository;
use vmkeep::engine::backup::{BackupOptions, BackupRun, DiskInput};
use vmkeep::engine::prune::prune;
use vmkeep::engine::Mode;
use vmkeep::progress::NoProgress;
use vmkeep::source::file::FileSource;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn two_hundred_generations_pruned_as_they_go() {
    let generations = env_or("VMKEEP_SOAK_GENERATIONS", 200);
    let base = env_or("VMKEEP_SOAK_DISK_KIB", 768) << 10;
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo")).unwrap();
    let disk_path = dir.path().join("disk.raw");
    let disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk_path)
        .unwrap();
    disk.set_len(base).unwrap();
    let mut model = vec![0u8; base as usize];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // The disk as it was at each generation still in the archive.
    let mut snapshots: HashMap<vmkeep::archive::GenerationId, Vec<u8>> = HashMap::new();
    let schedule = Schedule {
        keep_last: Some(12),
        ..Default::default()
    };
    for round in 0..generations {
        // A few scattered writes; now and then a resize.
        for _ in 0..1 + rng.below(6) {
            let len = (1 + rng.below(16)) as usize * 4096;
            let off = rng.below(model.len().saturating_sub(len) as u64 / 512) as usize * 512;
            let len = len.min(model.len() - off);
            let fill = if rng.below(5) == 0 {
                0
            } else {
                rng.next() as u8 | 1
            };
            let data = vec![fill; len];
            disk.write_all_at(&data, off as u64).unwrap();
            model[off..off + len].copy_from_slice(&data);
        }
        if rng.below(25) == 0 {
            let size = base / 2 + rng.below(base) / 4096 * 4096;
            disk.set_len(size).unwrap();
            model.resize(size as usize, 0);
        }
        let mode = [Mode::Auto, Mode::Diff, Mode::Full][rng.below(3) as usize];
        let opts = BackupOptions {
            mode,
            block_size: Some(4096),
            ..Default::default()
        };
        let input = DiskInput::new("vda", Box::new(FileSource::open(&disk_path).unwrap()));
        let report = BackupRun::begin(&repo, "vm")
            .unwrap()
            .execute(vec![input], &opts, &NoProgress)
            .unwrap();
        snapshots.insert(report.generation.id.clone(), model.clone());
        // Protect one generation in twenty-five; prune every tenth round.
        if round % 25 == 3 {
            let archive = repo.vm("vm").unwrap();
            let mut g = archive.generation(&report.generation.id).unwrap();
            g.profile.protected = true;
            profile::store(&g.profile_path(), "vmkeep generation profile", &g.profile).unwrap();
        }
        if round % 10 == 9 {
            let r = prune(&repo, "vm", &schedule, false).unwrap();
            for id in &r.removed {
                snapshots.remove(id);
            }
        }
    }
    let archive = repo.vm("vm").unwrap();
    let gens = archive.generations().unwrap();
    let protected = gens.iter().filter(|g| g.profile.protected).count();
    assert_eq!(
        protected as u64,
        generations.div_ceil(25),
        "protected generations survive every prune"
    );
    assert!(gens.len() as u64 <= 12 + 10 + protected as u64);
    assert_eq!(gens.len(), snapshots.len());
    let report = deep_check_ok(&repo, "vm");
    assert_eq!(report.generations_proven, gens.len());
    for (k, g) in gens.iter().enumerate() {
        let view = DiskView::open(&archive, &gens, k, "vda").unwrap();
        let out = dir.path().join("restore.raw");
        assert!(
            restore_view(&view, &out).unwrap() == snapshots[&g.id],
            "generation {} ({k}) differs",
            g.id
        );
    }
    assert!(std::fs::read(archive.dir.join("latest/vda.raw")).unwrap() == model);
}
