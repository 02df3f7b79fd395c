//! The fuzzing that CI runs: every archive parser (reverse diffs finished and partial,
//! digest files, the four kinds of profile, transaction records), changed-block lists, and
//! the NBD server's option and request parsing, fed random bytes, mutations of real archive files and
//! sessions, and every file of the checked-in cargo-fuzz corpus (`fuzz/corpus/`). Nothing
//! may panic, hang or make the server stop serving. The harness is shared with the
//! cargo-fuzz targets (`fuzz/`, run by `scripts/fuzz.sh`), which grow the corpus.

#[path = "support/fuzz.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use vmkeep::nbd::proto::*;

/// The harness entry point of each cargo-fuzz target.
fn target(name: &str) -> Option<fn(&[u8])> {
    Some(match name {
        "rdiff" => harness::rdiff,
        "partial" => harness::partial,
        "digest" => harness::digest,
        "profile" => harness::profile,
        "txn" => harness::txn,
        "changed" => harness::changed,
        "nbd" => harness::nbd,
        _ => return None,
    })
}

fn seeds() -> &'static [(&'static str, Vec<u8>)] {
    static SEEDS: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(harness::seeds)
}

/// The seed files of one target, with the mode byte each needs (profiles name their kind).
fn seeds_of(name: &str) -> Vec<(u8, Vec<u8>)> {
    seeds()
        .iter()
        .filter_map(|(t, bytes)| match t.split_once(':') {
            // A changed-block list's mode byte is the disk size, in thousands of blocks.
            None if *t == name => Some((if name == "changed" { 16 } else { 0 }, bytes.clone())),
            Some(("profile", k)) if name == "profile" => {
                Some((k.parse::<u8>().unwrap() << 1, bytes.clone()))
            }
            _ => None,
        })
        .collect()
}

fn interesting64() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0u64,
            1,
            63,
            64,
            128,
            4096,
            16384,
            1 << 20,
            (1 << 60) + 1,
            i64::MAX as u64,
            u64::MAX,
            u64::MAX - 63,
            (u64::MAX >> 4) + 1,
        ]),
        1 => any::<u64>(),
    ]
}

/// One change to a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set64(Index, u64),
    Set32(Index, u32),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
    /// Profiles: the value of the n-th `key = value` line.
    Value(Index, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        3 => (any::<Index>(), interesting64()).prop_map(|(i, v)| Mutation::Set64(i, v)),
        2 => (any::<Index>(), interesting64()).prop_map(|(i, v)| Mutation::Set32(i, v as u32)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..80)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1usize..200).prop_map(|(i, n)| Mutation::Remove(i, n)),
        2 => (any::<Index>(), prop::sample::select(vec![
            "18446744073709551615", "9223372036854775807", "1152921504606846977", "-1", "0",
            "3", "1e400", "\"../../escape\"", "\"a/b\"", "\"\"", "\"vda\"", "[]", "{}",
            "\"01900000-0000-7000-8000-000000000002\"", "\"../01900000-0000-7000-8000-000000000001\"",
            "\"commit\"", "\"prune\"", "[\"../x\"]", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        ])).prop_map(|(i, v)| Mutation::Value(i, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    if n == 0 {
        if let Mutation::Insert(_, b) = m {
            bytes.extend_from_slice(b);
        }
        return;
    }
    let put = |bytes: &mut Vec<u8>, at: usize, v: &[u8]| {
        let end = (at + v.len()).min(bytes.len());
        bytes[at..end].copy_from_slice(&v[..end - at]);
    };
    match m {
        Mutation::Flip(i, b) => bytes[i.index(n)] ^= 1 << b,
        Mutation::Set64(i, v) => put(bytes, i.index(n) & !7, &v.to_le_bytes()),
        Mutation::Set32(i, v) => put(bytes, i.index(n) & !3, &v.to_le_bytes()),
        Mutation::Truncate(i) => bytes.truncate(i.index(n)),
        Mutation::Insert(i, b) => {
            let at = i.index(n + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Remove(i, len) => {
            let at = i.index(n);
            bytes.drain(at..(at + len).min(n));
        }
        Mutation::Value(i, v) => {
            let lines: Vec<usize> = bytes
                .windows(3)
                .enumerate()
                .filter(|(_, w)| w == b" = ")
                .map(|(p, _)| p + 3)
                .collect();
            if lines.is_empty() {
                return;
            }
            let at = lines[i.index(lines.len())];
            let end = bytes[at..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(n, |e| at + e);
            bytes.splice(at..end, v.bytes());
        }
    }
}

/// A seed of `name`, mutated, with its mode byte (sealed or not) in front.
fn mutated(name: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds_of(name);
    assert!(!seeds.is_empty(), "no seeds for {name}");
    (
        any::<Index>(),
        prop::collection::vec(mutation(), 0..6),
        any::<bool>(),
    )
        .prop_map(move |(i, ms, seal)| {
            let (mode, seed) = &seeds[i.index(seeds.len())];
            let mut bytes = seed.clone();
            for m in &ms {
                apply(&mut bytes, m);
            }
            let mut out = vec![mode | seal as u8];
            out.extend(bytes);
            out
        })
}

/// Random bytes behind a random mode byte, sometimes starting with `magic`.
fn random(magic: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..1024),
    )
        .prop_map(move |(mode, with_magic, tail)| {
            let mut out = vec![mode];
            if with_magic {
                out.extend_from_slice(magic);
            }
            out.extend(tail);
            out
        })
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(8192))]

    #[test]
    fn rdiff_reader_takes_any_bytes(data in prop_oneof![random(b"VMKRDIF\0\x01\0\0\0"), mutated("rdiff")]) {
        harness::rdiff(&data);
    }

    #[test]
    fn partial_rdiff_scan_takes_any_bytes(data in prop_oneof![random(b"VMKRDIF\0\x01\0\0\0"), mutated("partial")]) {
        harness::partial(&data);
    }

    #[test]
    fn digest_reader_takes_any_bytes(data in prop_oneof![random(b"VMKDGST\0\x01\0\0\0"), mutated("digest")]) {
        harness::digest(&data);
    }

    #[test]
    fn profile_parser_takes_any_text(data in prop_oneof![
        random(b"# vmkeep generation profile\nformat = 1\n"),
        mutated("profile"),
    ]) {
        harness::profile(&data);
    }

    #[test]
    fn changed_block_list_takes_any_text(data in prop_oneof![
        random(b"{\"changedArea\": [{\"start\": "),
        mutated("changed"),
        (any::<u8>(), prop::collection::vec((interesting64(), interesting64()), 0..20)).prop_map(|(m, v)| {
            let lines: String = v.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
            [vec![m], lines.into_bytes()].concat()
        }),
    ]) {
        harness::changed(&data);
    }
}

/// A handshake option with random contents, biased to the ones the server knows.
fn nbd_option() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![4 => 1u32..12, 1 => any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..40),
        any::<bool>(),
    )
        .prop_map(|(opt, data, well_formed_name)| {
            let mut d = Vec::new();
            if well_formed_name {
                d.extend_from_slice(&3u32.to_be_bytes());
                d.extend_from_slice(b"vda");
            }
            d.extend(data);
            let mut b = IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&opt.to_be_bytes());
            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
            b.extend(d);
            b
        })
}

/// A transmission request with random fields, biased to the edges of the export.
fn nbd_request() -> impl Strategy<Value = Vec<u8>> {
    let size = harness::DISK_SIZE as u64;
    (
        prop_oneof![8 => 0u16..9, 1 => any::<u16>()],
        prop_oneof![3 => Just(0u16), 2 => 0u16..32, 1 => any::<u16>()],
        prop_oneof![3 => 0..size, 1 => Just(size), 1 => interesting64()],
        prop_oneof![3 => 0u32..(64 << 10), 1 => Just(32 << 20), 1 => any::<u32>()],
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(kind, flags, offset, length, payload)| {
            let mut b = harness::request(kind, flags, 1, offset, length);
            if kind == CMD_WRITE {
                b.extend(payload); // usually shorter than the length claims
            }
            b
        })
}

fn nbd_session() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        prop::collection::vec(nbd_option(), 0..4),
        prop::collection::vec(nbd_request(), 0..12),
        prop::collection::vec(mutation(), 0..3),
    )
        .prop_map(|(mode, opts, reqs, ms)| {
            let mut body: Vec<u8> = Vec::new();
            if mode & 1 == 0 {
                // Raw: our own handshake prefix, with random options before GO.
                body.extend((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
                body.extend(opts.concat());
                body.extend(&harness::handshake(mode & 2 != 0)[4..]);
            }
            body.extend(reqs.concat());
            for m in &ms {
                apply(&mut body, m);
            }
            let mut out = vec![mode];
            out.extend(body);
            out
        })
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn nbd_server_takes_any_bytes(data in prop_oneof![
        1 => random(b"\0\0\0\x03IHAVEOPT"),
        4 => nbd_session(),
    ]) {
        harness::nbd(&data);
    }
}

#[test]
fn nbd_server_survives_the_fuzzing() {
    // Runs after (or beside) the fuzz cases above in the same process; either way the
    // server must still answer and none of its threads may have panicked.
    for data in [
        vec![0u8; 0],
        vec![1, 0xff, 0xff],
        [
            vec![3u8],
            harness::request(CMD_READ, 0, 1, u64::MAX, u32::MAX),
        ]
        .concat(),
        [vec![1u8], harness::request(CMD_WRITE, 0, 1, 0, 64 << 20)].concat(),
    ] {
        harness::nbd(&data);
    }
    assert!(harness::nbd_alive(), "the server stopped serving");
    assert_eq!(harness::nbd_panics(), 0, "a server thread panicked");
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

/// Every input the fuzzers found interesting, on every run.
#[test]
fn checked_in_corpus_replays() {
    let mut count = 0;
    for entry in std::fs::read_dir(corpus_dir()).expect("fuzz/corpus exists") {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let run = target(&name).unwrap_or_else(|| panic!("corpus of unknown target {name}"));
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            run(&std::fs::read(&path).unwrap());
            count += 1;
        }
    }
    assert!(count > 0, "the corpus is empty");
    assert_eq!(harness::nbd_panics(), 0, "a server thread panicked");
}

/// Write the seed inputs into `fuzz/corpus/` (run by hand when the formats change:
/// `cargo test -p vmkeep --test fuzz_parsers -- --ignored write_seed_corpus`).
#[test]
#[ignore]
fn write_seed_corpus() {
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    for name in ["rdiff", "partial", "digest", "profile", "changed"] {
        for (mode, bytes) in seeds_of(name) {
            for seal in [0, 1] {
                files.push((name, [vec![mode | seal], bytes.clone()].concat()));
            }
        }
    }
    for (mode, bytes) in seeds_of("profile").into_iter().filter(|(m, _)| m >> 1 == 3) {
        files.push(("txn", [vec![mode | 1], bytes].concat()));
    }
    let reqs = [
        harness::request(CMD_READ, 0, 1, 0, 65536),
        harness::request(CMD_BLOCK_STATUS, 0, 2, 0, harness::DISK_SIZE as u32),
        harness::request(CMD_CACHE, 0, 3, 4096, 4096),
        harness::request(CMD_FLUSH, 0, 4, 0, 0),
        harness::request(CMD_WRITE, 0, 5, 0, 4),
        b"data".to_vec(),
        harness::request(CMD_DISC, 0, 6, 0, 0),
    ]
    .concat();
    files.push((
        "nbd",
        [vec![0u8], harness::handshake(true), reqs.clone()].concat(),
    ));
    files.push(("nbd", [vec![3u8], reqs].concat()));
    for (name, bytes) in files {
        let dir = corpus_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let sum = blake3::hash(&bytes).to_hex();
        std::fs::write(dir.join(format!("seed-{}", &sum[..16])), bytes).unwrap();
    }
}
