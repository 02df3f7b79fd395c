//! Packs: the objects that hold the blocks of an offsite copy, a few MiB each.
//!
//! ```text
//! "VMKPACK1"                      8 bytes
//! blob, blob, …                   sealed boxes, back to back: one block each
//! trailer                         a sealed box: the (block id, offset, length) of every blob
//! u32le trailer length
//! "VMKPEND1"                      8 bytes
//! ```
//! A blob's plaintext is one byte (0 raw, 1 zstd) and the block's bytes, compressed when
//! that is smaller; its associated data is `"vmkeep block v1"` and the block id, so a
//! blob authenticates only as the block it was made for. The trailer's associated data is
//! `"vmkeep pack v1"` and the pack id. See "Offsite layout" in `docs/FORMAT.md`.

use crate::archive::format::MAX_BLOCK_SIZE;
use crate::error::{Error, Result};
use crate::offsite::key::{parse_hex, BlockId, OffsiteKey, BOX_OVERHEAD};

/// The first 8 bytes of a pack.
pub const PACK_MAGIC: [u8; 8] = *b"VMKPACK1";
/// The last 8 bytes of a pack.
pub const PACK_END: [u8; 8] = *b"VMKPEND1";
/// The size a pack is closed at by default (it may be a blob longer).
pub const DEFAULT_PACK_SIZE: usize = 8 << 20;
/// Bytes of one trailer entry: block id (32), offset (u64le), length (u32le).
const TRAILER_ENTRY: usize = 32 + 8 + 4;
/// A pack's bytes past its blobs: the trailer length and the end magic.
const PACK_TAIL: usize = 4 + 8;
/// The largest pack a reader accepts (a pack is closed at a few MiB).
pub const MAX_PACK_LEN: u64 = 1 << 30;

const AD_BLOCK: &[u8] = b"vmkeep block v1";
const AD_PACK: &[u8] = b"vmkeep pack v1";

/// A pack's id: 16 random bytes, named as 32 hex digits.
pub type PackId = [u8; 16];

/// Where one block is: its id, its pack, and the bytes of its blob there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    /// The block id (keyed hash of its digest).
    pub block: BlockId,
    /// The pack holding its blob.
    pub pack: PackId,
    /// Offset of the blob in the pack.
    pub offset: u64,
    /// Length of the blob (a sealed box).
    pub len: u32,
}

/// Bytes of an encoded [`Location`]: block id, pack id, offset (u64le), length (u32le).
pub const LOCATION_LEN: usize = 32 + 16 + 8 + 4;

impl Location {
    /// Append the 60-byte form of this location to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.block);
        out.extend_from_slice(&self.pack);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    /// Decode the 60 bytes of `b`.
    pub fn decode(b: &[u8]) -> Location {
        debug_assert_eq!(b.len(), LOCATION_LEN);
        Location {
            block: b[..32].try_into().expect("32"),
            pack: b[32..48].try_into().expect("16"),
            offset: u64::from_le_bytes(b[48..56].try_into().expect("8")),
            len: u32::from_le_bytes(b[56..60].try_into().expect("4")),
        }
    }
}

/// The object key of pack `id`: `packs/XX/ID` (XX its first two hex digits).
pub fn pack_key(id: &PackId) -> String {
    let h = crate::archive::digest::hex(id);
    format!("packs/{}/{h}", &h[..2])
}

/// The pack id an object key `packs/XX/ID` names, if it is one.
pub fn pack_of_key(key: &str) -> Option<PackId> {
    let rest = key.strip_prefix("packs/")?;
    let (xx, id) = rest.split_once('/')?;
    let bytes: PackId = parse_hex(id)?.try_into().ok()?;
    (id.len() == 32 && id.starts_with(xx) && xx.len() == 2 && id == id.to_ascii_lowercase())
        .then_some(bytes)
}

fn block_ad(id: &BlockId) -> Vec<u8> {
    [AD_BLOCK, id.as_slice()].concat()
}

fn trailer_ad(id: &PackId) -> Vec<u8> {
    [AD_PACK, id.as_slice()].concat()
}

/// Seal the bytes of one block as its blob: zstd level 3 when that is smaller, else raw.
pub fn seal_block(key: &OffsiteKey, id: &BlockId, data: &[u8]) -> Result<Vec<u8>> {
    let mut plain = Vec::with_capacity(data.len() + 1);
    match zstd::bulk::compress(data, 3) {
        Ok(z) if z.len() < data.len() => {
            plain.push(1);
            plain.extend_from_slice(&z);
        }
        _ => {
            plain.push(0);
            plain.extend_from_slice(data);
        }
    }
    key.seal(&block_ad(id), &plain)
}

/// Open the blob of block `id`: its bytes (at most [`MAX_BLOCK_SIZE`]); the message says
/// why not.
pub fn open_block(
    key: &OffsiteKey,
    id: &BlockId,
    blob: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    let plain = key
        .open(&block_ad(id), blob)
        .ok_or("does not authenticate as its block (changed bytes, or another key)")?;
    match plain.split_first() {
        Some((0, raw)) if raw.len() <= MAX_BLOCK_SIZE as usize => Ok(raw.to_vec()),
        Some((1, z)) => zstd::bulk::decompress(z, MAX_BLOCK_SIZE as usize)
            .map_err(|e| format!("does not decompress: {e}")),
        _ => Err("is not a block blob vmkeep writes".into()),
    }
}

/// One blob as a pack's trailer lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The block id.
    pub block: BlockId,
    /// Offset of the blob in the pack.
    pub offset: u64,
    /// Length of the blob.
    pub len: u32,
}

/// A pack being filled, in memory.
pub struct PackWriter {
    /// The pack's id.
    pub id: PackId,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A closed pack, ready to upload whole.
pub struct SealedPack {
    /// The pack's id.
    pub id: PackId,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Where each of its blocks is.
    pub locations: Vec<Location>,
}

impl PackWriter {
    /// An empty pack with a new random id.
    pub fn new(capacity: usize) -> Result<PackWriter> {
        let mut id = [0u8; 16];
        crate::offsite::key::random(&mut id)?;
        let mut buf = Vec::with_capacity(capacity + (1 << 20));
        buf.extend_from_slice(&PACK_MAGIC);
        Ok(PackWriter {
            id,
            buf,
            entries: Vec::new(),
        })
    }

    /// Append the sealed blob of block `block`; its location.
    pub fn add(&mut self, block: BlockId, blob: &[u8]) -> Location {
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(blob);
        let e = PackEntry {
            block,
            offset,
            len: blob.len() as u32,
        };
        self.entries.push(e);
        Location {
            block,
            pack: self.id,
            offset,
            len: e.len,
        }
    }

    /// Bytes of blobs so far (with the leading magic).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Seal the trailer and close the pack.
    pub fn finish(mut self, key: &OffsiteKey) -> Result<SealedPack> {
        let mut plain = Vec::with_capacity(4 + self.entries.len() * TRAILER_ENTRY);
        plain.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            plain.extend_from_slice(&e.block);
            plain.extend_from_slice(&e.offset.to_le_bytes());
            plain.extend_from_slice(&e.len.to_le_bytes());
        }
        let trailer = key.seal(&trailer_ad(&self.id), &plain)?;
        self.buf.extend_from_slice(&trailer);
        self.buf
            .extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&PACK_END);
        let locations = self
            .entries
            .iter()
            .map(|e| Location {
                block: e.block,
                pack: self.id,
                offset: e.offset,
                len: e.len,
            })
            .collect();
        Ok(SealedPack {
            id: self.id,
            data: self.buf,
            locations,
        })
    }
}

/// The blobs a whole pack `data` of pack `id` lists in its trailer, checked: magic, end
/// magic, a trailer that authenticates as this pack's, and entries that lie between the
/// magic and the trailer without overlapping. The message says what is wrong.
pub fn read_trailer(
    key: &OffsiteKey,
    id: &PackId,
    data: &[u8],
) -> std::result::Result<Vec<PackEntry>, String> {
    if data.len() < PACK_MAGIC.len() + BOX_OVERHEAD + PACK_TAIL || data[..8] != PACK_MAGIC {
        return Err("is not a pack (no VMKPACK1 magic)".into());
    }
    let n = data.len();
    if data[n - 8..] != PACK_END {
        return Err("is cut short (no VMKPEND1 end magic)".into());
    }
    let tlen = u32::from_le_bytes(data[n - 12..n - 8].try_into().expect("4")) as usize;
    if tlen < BOX_OVERHEAD || tlen > n - PACK_TAIL - PACK_MAGIC.len() {
        return Err("has an impossible trailer length".into());
    }
    let tstart = n - PACK_TAIL - tlen;
    let plain = key
        .open(&trailer_ad(id), &data[tstart..n - PACK_TAIL])
        .ok_or("trailer does not authenticate as this pack's (changed bytes, or another key)")?;
    if plain.len() < 4 {
        return Err("trailer is malformed".into());
    }
    let count = u32::from_le_bytes(plain[..4].try_into().expect("4")) as usize;
    if plain.len() != 4 + count * TRAILER_ENTRY {
        return Err("trailer is malformed".into());
    }
    let mut out = Vec::with_capacity(count);
    let mut end = PACK_MAGIC.len() as u64;
    for e in plain[4..].chunks_exact(TRAILER_ENTRY) {
        let entry = PackEntry {
            block: e[..32].try_into().expect("32"),
            offset: u64::from_le_bytes(e[32..40].try_into().expect("8")),
            len: u32::from_le_bytes(e[40..44].try_into().expect("4")),
        };
        if entry.offset < end || entry.offset + entry.len as u64 > tstart as u64 {
            return Err("trailer lists a blob outside the pack's blobs".into());
        }
        end = entry.offset + entry.len as u64;
        out.push(entry);
    }
    Ok(out)
}

/// A blob's plaintext is at most this much larger than the largest block (the kind byte,
/// and zstd's bound for incompressible data, which the raw form is used for instead).
pub fn max_blob_len() -> u32 {
    (MAX_BLOCK_SIZE as usize + 1 + BOX_OVERHEAD) as u32
}

/// A location's blob cannot be one vmkeep wrote: an error for messages.
pub fn check_location(loc: &Location) -> Result<()> {
    if loc.len < BOX_OVERHEAD as u32 + 1 || loc.len > max_blob_len() || loc.offset < 8 {
        return Err(Error::corrupt(
            pack_key(&loc.pack),
            format!(
                "impossible blob at offset {} ({} bytes)",
                loc.offset, loc.len
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (tempfile::TempDir, OffsiteKey) {
        let dir = tempfile::tempdir().unwrap();
        let k = OffsiteKey::create(&dir.path().join("k")).unwrap();
        (dir, k)
    }

    #[test]
    fn a_pack_round_trips_its_blocks_and_trailer() {
        let (_d, k) = key();
        let text = b"compressible text, compressible text, ".repeat(1000);
        let mut noise = vec![0u8; 65536];
        blake3::Hasher::new()
            .update(b"noise")
            .finalize_xof()
            .fill(&mut noise);
        let mut w = PackWriter::new(1 << 20).unwrap();
        let ids = [[1u8; 32], [2u8; 32]];
        let b0 = seal_block(&k, &ids[0], &text).unwrap();
        let b1 = seal_block(&k, &ids[1], &noise).unwrap();
        assert!(b0.len() < text.len() / 4, "text is compressed");
        assert_eq!(
            b1.len(),
            noise.len() + 1 + BOX_OVERHEAD,
            "noise is kept raw"
        );
        let l0 = w.add(ids[0], &b0);
        let l1 = w.add(ids[1], &b1);
        let p = w.finish(&k).unwrap();
        assert_eq!(p.locations, vec![l0, l1]);
        let entries = read_trailer(&k, &p.id, &p.data).unwrap();
        assert_eq!(entries.len(), 2);
        for (loc, want) in [(l0, &text[..]), (l1, &noise[..])] {
            let blob = &p.data[loc.offset as usize..(loc.offset + loc.len as u64) as usize];
            assert_eq!(open_block(&k, &loc.block, blob).unwrap(), want);
        }
        // The plaintext appears nowhere in the pack.
        assert!(!p.data.windows(64).any(|w| w == &noise[1000..1064]));
        assert!(!p.data.windows(38).any(|w| w == &text[..38]));
    }

    #[test]
    fn a_flipped_byte_a_moved_blob_or_another_key_fails() {
        let (_d, k) = key();
        let (_d2, other) = key();
        let mut w = PackWriter::new(1 << 20).unwrap();
        let data = vec![7u8; 4096];
        let loc = w.add([9; 32], &seal_block(&k, &[9; 32], &data).unwrap());
        let p = w.finish(&k).unwrap();
        let blob = &p.data[loc.offset as usize..(loc.offset + loc.len as u64) as usize];
        assert!(
            open_block(&k, &[8; 32], blob).is_err(),
            "moved to another block id"
        );
        assert!(open_block(&other, &loc.block, blob).is_err(), "another key");
        assert!(read_trailer(&other, &p.id, &p.data).is_err(), "another key");
        assert!(
            read_trailer(&k, &[0; 16], &p.data).is_err(),
            "another pack's id"
        );
        for i in 0..p.data.len() {
            let mut d = p.data.clone();
            d[i] ^= 0x10;
            let blob = &d[loc.offset as usize..(loc.offset + loc.len as u64) as usize];
            let blob_ok = open_block(&k, &loc.block, blob).is_ok();
            let trailer_ok = read_trailer(&k, &p.id, &d).is_ok();
            assert!(!(blob_ok && trailer_ok), "flipped byte {i} went unnoticed");
        }
        assert!(read_trailer(&k, &p.id, &p.data[..p.data.len() - 1]).is_err());
    }

    #[test]
    fn pack_keys_round_trip() {
        let id = [0xab; 16];
        let key = pack_key(&id);
        assert_eq!(key, format!("packs/ab/{}", "ab".repeat(16)));
        assert_eq!(pack_of_key(&key), Some(id));
        assert_eq!(
            pack_of_key("packs/cd/abababababababababababababababab"),
            None
        );
        assert_eq!(pack_of_key("index/x"), None);
        crate::offsite::store::check_key(&key).unwrap();
    }
}
