//! Drives every archive parser and the NBD server with arbitrary bytes.
//!
//! Shared, through `#[path]`, by the proptest harness that `cargo test` runs
//! (`tests/fuzz_parsers.rs`) and by the cargo-fuzz targets (`fuzz/`), so that both exercise
//! exactly the same code. Each entry point must return for any input without panicking;
//! the asserts in here are promises a parser makes about what it accepts.
//!
//! Most parsers check a checksum before anything else, so random bytes would only ever
//! test the checksum. Every entry point therefore takes a mode byte first: with bit 0 set
//! the harness *seals* the input (recomputes the header, record, file and profile
//! checksums) so that the structure behind them is what gets explored.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use vmkeep::archive::digest::DigestReader;
use vmkeep::archive::format::{check64, HEADER_LEN};
use vmkeep::archive::profile::{self, GenerationProfile, RepoProfile, VmProfile};
use vmkeep::archive::rdiff::{self, RdiffReader};
use vmkeep::archive::txn::Txn;
use vmkeep::archive::{Repository, VmArchive};
use vmkeep::engine::backup::{BackupOptions, BackupRun, DiskInput};
use vmkeep::engine::serve::{open_generation, ServedGeneration};
use vmkeep::nbd::proto::*;
use vmkeep::nbd::server::{Listen, Server, ServerConfig};
use vmkeep::progress::NoProgress;
use vmkeep::source::file::FileSource;

/// Block size and disk size of the archives the harness builds.
pub const BS: u32 = 4096;
pub const DISK_SIZE: usize = 16 * BS as usize;
/// The generation id the profile inputs are stored under.
pub const GEN_ID: &str = "01900000-0000-7000-8000-000000000001";
/// A later generation id that exists beside it (a transaction may name both).
pub const GEN_ID2: &str = "01900000-0000-7000-8000-000000000002";

thread_local! {
    /// In memory where there is a tmpfs: thousands of small files are written per second.
    static SCRATCH: tempfile::TempDir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("scratch folder");
}

/// The scratch folder of this thread: `vm/GEN_ID/` and `vm/GEN_ID2/` exist in it.
fn scratch<R>(f: impl FnOnce(&Path) -> R) -> R {
    SCRATCH.with(|d| {
        let vm = d.path().join("vm");
        for id in [GEN_ID, GEN_ID2] {
            std::fs::create_dir_all(vm.join(id)).expect("scratch generation");
        }
        f(d.path())
    })
}

fn split(data: &[u8]) -> (bool, &[u8]) {
    match data.split_first() {
        Some((mode, rest)) => (mode & 1 == 1, rest),
        None => (false, data),
    }
}

// ---------------------------------------------------------------------------------------
// Sealing

fn seal_header(f: &mut [u8], at: usize) {
    if f.len() >= at + HEADER_LEN {
        let c = check64(&f[at..at + 56]);
        f[at + 56..at + HEADER_LEN].copy_from_slice(&c.to_le_bytes());
    }
}

/// Recompute the header check, every record header check along the chain of stored
/// lengths, and (for a finished file) the footer's file checksum.
pub fn seal_rdiff(f: &mut [u8], finished: bool) {
    seal_header(f, 0);
    // Records end where the footer says the index starts (or at the end of a journal).
    let end = if finished && f.len() >= 2 * HEADER_LEN {
        let at = f.len() - HEADER_LEN + 16;
        let index = u64::from_le_bytes(f[at..at + 8].try_into().unwrap());
        index.min((f.len() - HEADER_LEN) as u64) as usize
    } else {
        f.len()
    };
    let mut off = HEADER_LEN;
    while off + HEADER_LEN <= end {
        seal_header(f, off);
        let stored = u32::from_le_bytes(f[off + 16..off + 20].try_into().unwrap()) as usize;
        off = off.saturating_add(HEADER_LEN).saturating_add(stored);
    }
    if finished && f.len() >= 2 * HEADER_LEN {
        let n = f.len();
        let mut h = blake3::Hasher::new();
        h.update(&f[..n - HEADER_LEN]);
        h.update(&f[n - HEADER_LEN..n - 32]);
        let sum = *h.finalize().as_bytes();
        f[n - 32..].copy_from_slice(&sum);
    }
}

/// Append the checksum line a profile ends with.
pub fn seal_profile(text: &[u8]) -> Vec<u8> {
    let mut body = text.to_vec();
    if !body.ends_with(b"\n") {
        body.push(b'\n');
    }
    let sum = blake3::hash(&body).to_hex();
    body.extend_from_slice(format!("checksum = \"blake3:{sum}\"\n").as_bytes());
    body
}

// ---------------------------------------------------------------------------------------
// Archive files

/// `print FILE` reads any archive file; it must fail cleanly too.
fn print(path: &Path) {
    let _ = vmkeep::engine::print::print_file(path, &mut std::io::sink());
}

/// A finished reverse diff: open, every record, every body, the file checksum, `print`.
pub fn rdiff(data: &[u8]) {
    let (seal, body) = split(data);
    let mut bytes = body.to_vec();
    if seal {
        seal_rdiff(&mut bytes, true);
    }
    scratch(|dir| {
        let path = dir.join("x.rdiff");
        std::fs::write(&path, &bytes).expect("scratch file");
        if let Ok(r) = RdiffReader::open(&path) {
            let bs = r.header.block_size as usize;
            assert!(r.len() as u64 <= r.header.blocks());
            assert!(r.len() * 16 < bytes.len());
            let _ = r.verify_file_hash();
            for i in 0..r.len() {
                let Ok(rec) = r.read(i) else { continue };
                assert_eq!(rec.block, r.block_at(i));
                assert!(rec.raw_len as usize <= bs);
                assert!(rec.body.len() <= bytes.len());
                if let Ok(d) = rec.data(&path) {
                    assert_eq!(d.len(), rec.raw_len as usize);
                }
            }
            for b in [0, 1, r.header.blocks(), u64::MAX] {
                let _ = r.get(b);
            }
        }
        print(&path);
    });
}

/// A partial reverse diff (an undo journal): its valid prefix, and `print`.
pub fn partial(data: &[u8]) {
    let (seal, body) = split(data);
    let mut bytes = body.to_vec();
    if seal {
        seal_rdiff(&mut bytes, false);
    }
    scratch(|dir| {
        let path = dir.join("x.rdiff.partial");
        std::fs::write(&path, &bytes).expect("scratch file");
        if let Ok(Some(p)) = rdiff::scan_partial(&path) {
            let mut used = HEADER_LEN;
            for rec in &p.records {
                assert!(rec.block < p.header.blocks());
                assert!(rec.raw_len <= p.header.block_size);
                used += HEADER_LEN + rec.body.len();
                let d = rec.data(&path).expect("the valid prefix decompresses");
                assert_eq!(d.len(), rec.raw_len as usize);
            }
            assert!(used <= bytes.len());
        }
        print(&path);
    });
}

/// A digest file: open, the root over every entry, lookups, `print`.
pub fn digest(data: &[u8]) {
    let (seal, body) = split(data);
    let mut bytes = body.to_vec();
    if seal {
        seal_header(&mut bytes, 0);
    }
    scratch(|dir| {
        let path = dir.join("x.digest");
        std::fs::write(&path, &bytes).expect("scratch file");
        if let Ok(mut r) = DigestReader::open(&path) {
            assert_eq!(4096 + 32 * r.blocks(), bytes.len() as u64);
            let _ = r.root();
            for b in [0, r.blocks().saturating_sub(1), r.blocks(), u64::MAX] {
                let _ = r.get(b);
            }
        }
        print(&path);
    });
}

/// The kinds of profile, chosen by bits 1–2 of the mode byte.
pub const PROFILE_KINDS: [&str; 4] = ["repository", "vm", "generation", "transaction"];

/// A profile of the kind the mode byte names, loaded the way vmkeep loads it (a
/// generation through its VM folder, a transaction with the checks recovery makes).
pub fn profile(data: &[u8]) {
    let (seal, body) = split(data);
    let kind = data
        .first()
        .map_or(0, |m| (m >> 1) as usize % PROFILE_KINDS.len());
    let bytes = if seal {
        seal_profile(body)
    } else {
        body.to_vec()
    };
    scratch(|dir| {
        let vm_dir = dir.join("vm");
        let path = match kind {
            0 => dir.join("repo.toml"),
            1 => vm_dir.join("vm.toml"),
            2 => vm_dir.join(GEN_ID).join("generation.toml"),
            _ => vm_dir.join("txn.toml"),
        };
        std::fs::write(&path, &bytes).expect("scratch file");
        match kind {
            0 => drop(profile::load::<RepoProfile>(&path)),
            1 => drop(VmArchive::open(vm_dir.clone(), "vm")),
            2 => {
                let vm = VmArchive {
                    dir: vm_dir.clone(),
                    name: "vm".into(),
                    profile: VmProfile {
                        format: 1,
                        name: "vm".into(),
                        block_size: BS,
                        created: String::new(),
                        last_check: None,
                        host: None,
                    },
                };
                if let Ok(g) = vm.generation(GEN_ID) {
                    for d in &g.profile.disks {
                        // Accepted names stay inside the generation folder.
                        assert_eq!(g.rdiff_path(&d.name).parent(), Some(g.dir.as_path()));
                        assert!(d.size <= vmkeep::archive::format::MAX_DISK_SIZE);
                    }
                }
            }
            _ => {
                if let Ok(t) = profile::load::<Txn>(&path) {
                    if t.validate(&vm_dir).is_ok() {
                        for id in t.old.iter().chain(&t.older).chain([&t.new]) {
                            assert!(vmkeep::archive::is_generation_name(id), "{id:?}");
                        }
                    }
                }
            }
        }
        print(&path);
        let _ = std::fs::remove_file(&path);
    });
}

/// A transaction record: [`profile`] of the fourth kind, whatever the mode byte says.
pub fn txn(data: &[u8]) {
    let mut d = data.to_vec();
    match d.first_mut() {
        Some(m) => *m = (*m & 1) | 3 << 1,
        None => d.push(3 << 1),
    }
    profile(&d);
}

/// A changed-block list (`--changed-blocks`: text or vSphere JSON), turned into the block
/// ranges a backup reads. The mode byte picks the disk's size in blocks.
pub fn changed(data: &[u8]) {
    let blocks = data.first().map_or(0, |&m| m as u64 * 1000);
    let text = String::from_utf8_lossy(data.get(1..).unwrap_or_default());
    let Ok(extents) = vmkeep::source::changed::parse(Path::new("list"), &text) else {
        return;
    };
    let ranges = vmkeep::source::changed::to_block_ranges(&extents, BS, blocks);
    for w in ranges.windows(2) {
        assert!(w[0].1 < w[1].0, "ranges overlap or touch: {w:?}");
    }
    for &(a, b) in &ranges {
        assert!(a < b && b <= blocks, "range {a}..{b} of {blocks} blocks");
    }
}

// ---------------------------------------------------------------------------------------
// Seeds: real files of a small archive

/// Real archive files to mutate: (target, bytes), bytes without the mode byte.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let tmp = tempfile::tempdir().expect("seed folder");
    let (repo, ids) = build_archive(tmp.path());
    let vm = repo.root().join("vm");
    let read = |p: PathBuf| std::fs::read(p).expect("seed file");
    let mut out = vec![
        ("rdiff", read(vm.join(&ids[0]).join("vda.rdiff"))),
        ("rdiff", read(vm.join(&ids[1]).join("vda.rdiff"))),
        ("digest", read(vm.join(&ids[2]).join("vda.digest"))),
        ("profile:0", read(repo.root().join("repo.toml"))),
        ("profile:1", read(vm.join("vm.toml"))),
    ];
    // Profile inputs are stored as generation GEN_ID.
    let mut g: GenerationProfile =
        profile::load(&vm.join(&ids[1]).join("generation.toml")).expect("seed");
    g.id = GEN_ID.parse().expect("seed id");
    let gp = tmp.path().join("generation.toml");
    profile::store(&gp, "vmkeep generation profile", &g).expect("seed");
    out.push(("profile:2", read(gp)));
    // An undo journal is a finished file without its index and footer.
    for k in [0, 1] {
        let r = RdiffReader::open(&vm.join(&ids[k]).join("vda.rdiff")).expect("seed");
        let mut bytes = read(vm.join(&ids[k]).join("vda.rdiff"));
        let cut = if r.is_empty() {
            HEADER_LEN
        } else {
            (bytes.len() - HEADER_LEN - 16 * r.len()).min(bytes.len())
        };
        bytes.truncate(cut);
        out.push(("partial", bytes));
    }
    let mut t = Txn::backup(Some(GEN_ID.into()), GEN_ID2.into(), vec!["vda".into()]);
    t.pid = 1;
    t.started = "2025-01-01T00:00:00Z".into();
    t.store(tmp.path()).expect("seed txn");
    out.push(("profile:3", read(tmp.path().join("txn.toml"))));
    let mut p = Txn::prune(GEN_ID.into(), GEN_ID2.into(), vec!["vda".into()]);
    p.pid = 1;
    p.started = t.started.clone();
    p.store(tmp.path()).expect("seed txn");
    out.push(("profile:3", read(tmp.path().join("txn.toml"))));
    out.push((
        "changed",
        b"# offset length\n0 4096\n0x10000 0x2000\n\n65536 1\n".to_vec(),
    ));
    out.push((
        "changed",
        br#"{"changedArea": [{"start": 0, "length": 65536}, {"start": 1048576, "length": 4096}]}"#
            .to_vec(),
    ));
    out
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Three generations of disk `vda` of VM `vm` in `dir/repo`: raw, zstd and zero records,
/// a disk that shrank and grew.
pub fn build_archive(dir: &Path) -> (Repository, Vec<vmkeep::archive::GenerationId>) {
    let repo = Repository::init(&dir.join("repo")).expect("repository");
    let disk = dir.join("disk.raw");
    let text = b"the quick brown fox jumps over the lazy dog ".repeat(DISK_SIZE / 44 + 1);
    let bs = BS as usize;
    let mut img = noise(1, DISK_SIZE);
    img[8 * bs..].copy_from_slice(&text[..8 * bs]);
    let mut ids = Vec::new();
    let mut backup = |img: &[u8]| {
        std::fs::write(&disk, img).expect("disk");
        let input = DiskInput::new("vda", Box::new(FileSource::open(&disk).expect("disk")));
        let opts = BackupOptions {
            block_size: Some(BS),
            ..Default::default()
        };
        let report = BackupRun::begin(&repo, "vm")
            .and_then(|run| run.execute(vec![input], &opts, &NoProgress))
            .expect("backup");
        ids.push(report.generation.id);
    };
    backup(&img);
    img[bs..3 * bs].copy_from_slice(&noise(2, 2 * bs));
    img[9 * bs..10 * bs].fill(0);
    img.truncate(DISK_SIZE - bs - 512);
    backup(&img);
    img.resize(DISK_SIZE, 0);
    img[2 * bs..4 * bs].copy_from_slice(&noise(3, 2 * bs));
    img[9 * bs..10 * bs].copy_from_slice(&text[5..5 + bs]);
    backup(&img);
    (repo, ids)
}

// ---------------------------------------------------------------------------------------
// The NBD server

/// A server on a unix socket exporting the middle generation of a built archive (reads
/// go through reverse-diff records and the newest image), started once per process.
struct NbdFixture {
    path: PathBuf,
    _served: ServedGeneration,
    _tmp: tempfile::TempDir,
}

static NBD: OnceLock<NbdFixture> = OnceLock::new();
static NBD_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Panics seen in the server's threads so far (they do not reach the caller).
pub fn nbd_panics() -> usize {
    NBD_PANICS.load(Ordering::SeqCst)
}

fn nbd_fixture() -> &'static NbdFixture {
    NBD.get_or_init(|| {
        // The client and the server share this process: a reply to a closed socket must
        // be an error, not a signal that ends the run.
        // SAFETY: setting a signal disposition; no handler runs our code.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().map(str::to_string);
            if name.is_some_and(|n| n.starts_with("nbd-")) {
                NBD_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            prev(info)
        }));
        let tmp = tempfile::tempdir().expect("server folder");
        let (repo, _) = build_archive(tmp.path());
        let served = open_generation(&repo, "vm", "1").expect("serve");
        let exports = served.nbd_exports();
        let config = ServerConfig {
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(5)),
            write_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        };
        let path = tmp.path().join("nbd.sock");
        let server =
            Server::bind(&Listen::Unix(path.clone()), exports, config).expect("server binds");
        std::thread::spawn(move || server.run());
        NbdFixture {
            path,
            _served: served,
            _tmp: tmp,
        }
    })
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A complete, well-formed handshake up to transmission on export `vda`.
pub fn handshake(structured: bool) -> Vec<u8> {
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let name = b"vda";
    if structured {
        b.extend(option(OPT_STRUCTURED_REPLY, &[]));
        let mut m = (name.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(name);
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
        m.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
        b.extend(option(OPT_SET_META_CONTEXT, &m));
    }
    let mut g = (name.len() as u32).to_be_bytes().to_vec();
    g.extend_from_slice(name);
    g.extend_from_slice(&0u16.to_be_bytes());
    b.extend(option(OPT_GO, &g));
    b
}

/// One transmission-phase request.
pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

/// Send `bytes` on a new connection, close our side, and read until the server closes;
/// returns how many bytes it sent. A server that neither answers nor closes is a bug.
pub fn exchange(bytes: &[u8]) -> usize {
    let f = nbd_fixture();
    let s = UnixStream::connect(&f.path).expect("the server accepts connections");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().expect("socket clone");
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = w.write_all(bytes);
            let _ = w.shutdown(Shutdown::Write);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0;
        loop {
            match (&s).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the server neither answered nor closed the connection")
                }
                Err(_) => break, // reset: the server ended the connection
            }
        }
        total
    })
}

/// Arbitrary bytes to the server: raw from the first byte on (mode bit 0 clear), or after
/// a well-formed handshake (bit 0 set; bit 1 asks for structured replies).
pub fn nbd(data: &[u8]) {
    let (prefixed, body) = split(data);
    let mut bytes = Vec::with_capacity(body.len() + 128);
    if prefixed {
        let structured = data.first().is_some_and(|m| m & 2 != 0);
        bytes.extend(handshake(structured));
    }
    bytes.extend_from_slice(body);
    exchange(&bytes);
}

/// The server still serves: a well-formed client reads the first 4 KiB of the export.
pub fn nbd_alive() -> bool {
    let mut bytes = handshake(false);
    bytes.extend(request(CMD_READ, 0, 7, 0, 4096));
    bytes.extend(request(CMD_DISC, 0, 8, 0, 0));
    // Greeting (18), GO replies (INFO export 32, INFO block size 34, ACK 20), the read's
    // simple reply (16) and its data.
    exchange(&bytes) == 18 + 32 + 34 + 20 + 16 + 4096
}
