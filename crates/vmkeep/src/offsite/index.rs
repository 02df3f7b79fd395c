//! Index objects: `index/<run id>-<n>`, sealed lists of where blocks are, so that a sync
//! learns what the target holds from a few objects instead of every pack's trailer.
//!
//! An index is only a hint for deduplication: a restore never reads one (a manifest
//! carries the location of every block it needs), and a sync trusts an entry only when
//! the pack it names is listed with room for the blob.
//!
//! Plaintext: `"VMKIDX01"`, u64le count, then `count` locations of 60 bytes (block id 32,
//! pack id 16, offset u64le, length u32le). Associated data: `"vmkeep index v1"` and the
//! object key.

use crate::error::{Error, Result};
use crate::offsite::key::OffsiteKey;
use crate::offsite::pack::{Location, LOCATION_LEN};
use crate::offsite::store::ObjectStore;

/// The first 8 bytes of an index's plaintext.
const INDEX_MAGIC: [u8; 8] = *b"VMKIDX01";
const AD_INDEX: &[u8] = b"vmkeep index v1";
/// Where index objects are.
pub const INDEX_PREFIX: &str = "index/";
/// The largest index object a reader takes (a sync writes one every 16 packs: a few
/// MiB at most; prune's consolidated one lists every block of the target).
pub const MAX_INDEX_LEN: u64 = 4 << 30;

/// A prune that finds more index objects than this merges them into one (it always
/// does when it removes packs).
pub const MERGE_AT: usize = 64;

/// The object key of the `n`-th index of run `run`.
pub fn index_key(run: &str, n: u32) -> String {
    format!("{INDEX_PREFIX}{run}-{n}")
}

fn ad(key: &str) -> Vec<u8> {
    [AD_INDEX, key.as_bytes()].concat()
}

/// The sealed index object `key` listing `entries`.
pub fn encode(k: &OffsiteKey, key: &str, entries: &[Location]) -> Result<Vec<u8>> {
    let mut plain = Vec::with_capacity(16 + entries.len() * LOCATION_LEN);
    plain.extend_from_slice(&INDEX_MAGIC);
    plain.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        e.encode(&mut plain);
    }
    k.seal(&ad(key), &plain)
}

/// The entries of the sealed index object `key`; the message says what is wrong.
pub fn decode(
    k: &OffsiteKey,
    key: &str,
    sealed: &[u8],
) -> std::result::Result<Vec<Location>, String> {
    let plain = k
        .open(&ad(key), sealed)
        .ok_or("does not authenticate (changed bytes, moved, or another key)")?;
    if plain.len() < 16 || plain[..8] != INDEX_MAGIC {
        return Err("is not an index vmkeep writes".into());
    }
    let count = u64::from_le_bytes(plain[8..16].try_into().expect("8"));
    if (plain.len() - 16) as u64 != count.saturating_mul(LOCATION_LEN as u64) {
        return Err("is malformed (its count does not match its length)".into());
    }
    Ok(plain[16..]
        .chunks_exact(LOCATION_LEN)
        .map(Location::decode)
        .collect())
}

/// Read index object `key` from `store` (listed with `size` bytes).
pub fn load(
    store: &dyn ObjectStore,
    k: &OffsiteKey,
    key: &str,
    size: u64,
) -> Result<std::result::Result<Vec<Location>, String>> {
    if size > MAX_INDEX_LEN {
        return Ok(Err(format!("is {size} bytes, more than an index can be")));
    }
    let Some(data) = store.get(key)? else {
        return Err(Error::source(
            store.describe(),
            format!("object {key} was listed but is gone"),
        ));
    };
    Ok(decode(k, key, &data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_cannot_be_moved_or_changed() {
        let dir = tempfile::tempdir().unwrap();
        let k = OffsiteKey::create(&dir.path().join("k")).unwrap();
        let entries: Vec<Location> = (0..5u8)
            .map(|i| Location {
                block: [i; 32],
                pack: [i + 1; 16],
                offset: 8 + i as u64 * 100,
                len: 90,
            })
            .collect();
        let key = index_key("0123abcd", 3);
        assert_eq!(key, "index/0123abcd-3");
        let sealed = encode(&k, &key, &entries).unwrap();
        assert_eq!(decode(&k, &key, &sealed).unwrap(), entries);
        assert!(decode(&k, "index/0123abcd-4", &sealed).is_err(), "moved");
        let mut bad = sealed.clone();
        let n = bad.len();
        bad[n / 2] ^= 1;
        assert!(decode(&k, &key, &bad).is_err(), "changed");
        assert!(decode(&k, &key, &encode(&k, &key, &[]).unwrap())
            .unwrap()
            .is_empty());
    }
}
