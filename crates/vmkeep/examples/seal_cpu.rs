//! What sealing costs in CPU: seals GiB of 64 KiB blocks into packs with the offsite code
//! `vmkeep sync` uses (`offsite::pack::seal_block`, `PackWriter`) on one thread, and
//! prints the CPU seconds (user + system, from `getrusage`) per GiB of block bytes.
//!
//! ```text
//! cargo run --release -p vmkeep --example seal_cpu [GIB]     (default 1)
//! ```
//!
//! Phases, each over GIB GiB of block bytes (the inputs are made before the clock
//! starts and reused: 64 MiB of each kind, cycled):
//!
//! - `aead`: XChaCha20-Poly1305 alone (`OffsiteKey::seal` of the raw block), the
//!   encryption proper;
//! - `zstd-random`: zstd level 3 of incompressible blocks alone (what `seal_block` tries
//!   before it keeps such a block raw);
//! - `seal-random`, `seal-text`: `seal_block` and `PackWriter` (8 MiB packs, trailer
//!   sealed) of incompressible blocks and of compressible text (bench/gen.py's text);
//! - `seal-mix`: the benchmark disk's data as `sync` sees it, 4 random blocks for every 3
//!   text blocks (gen.py's 40 % random and 30 % text; holes are never sealed);
//! - `blake3`: BLAKE3 of the same bytes, for comparison: what verifying a block against its
//!   digest costs a sync besides sealing.
//!
//! Output: one tab-separated line per phase: name, GiB, CPU s, wall s, CPU s per GiB,
//! output bytes (sealed boxes or packs) per input byte.

use std::path::Path;
use std::time::Instant;

use vmkeep::offsite::key::OffsiteKey;
use vmkeep::offsite::pack::{self, PackWriter, DEFAULT_PACK_SIZE};

/// The block size of a default repository.
const BLOCK: usize = 64 << 10;
/// Bytes of prepared input of each kind.
const POOL: usize = 64 << 20;
/// bench/gen.py's compressible text.
const TEXT: &[u8] = b"Lorem ipsum dolor sit amet, vmkeep keeps generations of virtual disks. ";

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Time `f` over `total` bytes; print its line. `f` returns the bytes it produced.
fn phase(name: &str, total: u64, f: impl FnOnce() -> u64) {
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let produced = f();
    let (cpu, wall) = (cpu_seconds() - c0, t0.elapsed().as_secs_f64());
    let gib = total as f64 / (1u64 << 30) as f64;
    println!(
        "{name}\t{gib:.3}\t{cpu:.3}\t{wall:.3}\t{:.3}\t{:.4}",
        cpu / gib,
        produced as f64 / total as f64
    );
}

/// Seal the blocks `next` hands out (until `total` bytes) into packs; the bytes of the
/// packs.
fn seal_packs(key: &OffsiteKey, total: u64, mut next: impl FnMut(u64) -> &'static [u8]) -> u64 {
    let mut written = 0u64;
    let mut pack = PackWriter::new(DEFAULT_PACK_SIZE).expect("pack");
    let mut i = 0u64;
    while i * (BLOCK as u64) < total {
        let data = next(i);
        let id = *blake3::hash(&i.to_le_bytes()).as_bytes();
        let blob = pack::seal_block(key, &id, data).expect("seal");
        pack.add(id, &blob);
        if pack.len() >= DEFAULT_PACK_SIZE {
            let full =
                std::mem::replace(&mut pack, PackWriter::new(DEFAULT_PACK_SIZE).expect("pack"));
            written += full.finish(key).expect("finish").data.len() as u64;
        }
        i += 1;
    }
    if !pack.is_empty() {
        written += pack.finish(key).expect("finish").data.len() as u64;
    }
    written
}

fn main() {
    let gib: f64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("GIB: a number"))
        .unwrap_or(1.0);
    let total = (gib * (1u64 << 30) as f64) as u64;
    let key = OffsiteKey::from_master(&[7u8; 32], Path::new("(benchmark key)"));
    let mut random = vec![0u8; POOL];
    blake3::Hasher::new()
        .update(b"seal_cpu random blocks")
        .finalize_xof()
        .fill(&mut random);
    let text: Vec<u8> = TEXT.iter().copied().cycle().take(POOL).collect();
    let random: &'static [u8] = random.leak();
    let text: &'static [u8] = text.leak();
    let blocks = (POOL / BLOCK) as u64;
    let block = |pool: &'static [u8], i: u64| {
        let at = (i % blocks) as usize * BLOCK;
        &pool[at..at + BLOCK]
    };
    let count = total.div_ceil(BLOCK as u64);
    println!("phase\tGiB\tcpu_s\twall_s\tcpu_s_per_GiB\tout_per_in");
    phase("aead", total, || {
        (0..count)
            .map(|i| key.seal(b"ad", block(random, i)).expect("seal").len() as u64)
            .sum()
    });
    phase("zstd-random", total, || {
        (0..count)
            .map(|i| {
                zstd::bulk::compress(block(random, i), 3)
                    .expect("zstd")
                    .len() as u64
            })
            .sum()
    });
    phase("seal-random", total, || {
        seal_packs(&key, total, |i| block(random, i))
    });
    phase("seal-text", total, || {
        seal_packs(&key, total, |i| block(text, i))
    });
    phase("seal-mix", total, || {
        seal_packs(&key, total, |i| {
            if i % 7 < 4 {
                block(random, i)
            } else {
                block(text, i)
            }
        })
    });
    phase("blake3", total, || {
        (0..count)
            .map(|i| {
                std::hint::black_box(blake3::hash(block(random, i)));
                BLOCK as u64
            })
            .sum()
    });
}
