//! Manifests: `manifests/<vm name>/<generation name>`, one per generation on the target,
//! the commit point of its sync (uploaded after every pack it references exists). A
//! generation is on the target when its manifest exists and opens.
//!
//! ```text
//! "VMKMANI1"             8 bytes
//! u32le H                the head's length
//! head                   H bytes, a sealed box: zstd'd JSON (Head)
//! body                   a sealed box: zstd'd binary (digests, block references, locations,
//!                        firmware and TPM state)
//! ```
//! The head is small and read alone (`status`, `prune`); it names the body's length and
//! BLAKE3, so the two cannot be paired otherwise. Associated data: the head
//! `"vmkeep manifest v1"` and the object key, the body `"vmkeep manifest body v1"` and
//! the object key.
//!
//! The body is, uncompressed: the bytes of each state file in the head's order; for each
//! disk in the head's order its N digests (32 bytes each, the zero digest for a hole,
//! N = ceil(size / block size)) then one u32le per non-zero digest, in block order, the
//! index of its location; then the locations, 60 bytes each (see [`Location`]).
//!
//! Decoding proves everything a restore relies on: the generation profile carried
//! verbatim (its checksum), its disks and digest roots against the digest lists, every
//! location's block id against its digest (keyed hash), every pack named in the head.
//! Nothing is allocated from a length a hostile object claims before the bytes are there.

use std::collections::BTreeSet;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::archive::digest::{hex, Digest, RootHasher, ZERO_DIGEST};
use crate::archive::format::{block_count, check_block_size, valid_disk_size, DIGEST_LEN};
use crate::archive::profile::{self, Consistency, GenerationMode, GenerationProfile};
use crate::archive::state::StateRecord;
use crate::archive::{names, GenerationId};
use crate::error::{Error, Result};
use crate::offsite::key::{parse_hex, OffsiteKey};
use crate::offsite::pack::{check_location, Location, PackId, LOCATION_LEN};
use crate::offsite::store::ObjectStore;

/// The first 8 bytes of a manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"VMKMANI1";
/// Version of the manifest format (`format` of the head).
pub const MANIFEST_FORMAT: u32 = 1;
/// Where manifests are.
pub const MANIFEST_PREFIX: &str = "manifests/";
/// The largest head a reader takes (profile, XML, the list of packs).
pub const MAX_HEAD_LEN: u32 = 256 << 20;
/// The largest uncompressed body a reader takes (the digests of 64 TiB at 64 KiB blocks).
pub const MAX_BODY_LEN: u64 = 48 << 30;

const AD_HEAD: &[u8] = b"vmkeep manifest v1";
const AD_BODY: &[u8] = b"vmkeep manifest body v1";
/// Bytes before the head: magic and its length.
const PRELUDE: u64 = 12;

/// The object key of generation `gen` of VM `vm` (both as names under `key`).
pub fn manifest_key(key: &OffsiteKey, vm: &str, generation: &str) -> String {
    format!("{MANIFEST_PREFIX}{}/{}", key.name(vm), key.name(generation))
}

/// The prefix under which VM `vm`'s manifests are.
pub fn vm_prefix(key: &OffsiteKey, vm: &str) -> String {
    format!("{MANIFEST_PREFIX}{}/", key.name(vm))
}

/// One disk as the head describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadDisk {
    /// The disk's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its digest root, as the generation profile records it.
    pub digest_root: String,
    /// Its non-zero blocks (the references in the body).
    pub blocks: u64,
    /// Bytes of its non-zero blocks.
    pub data_bytes: u64,
}

/// What a manifest says about its generation, read without the body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// Manifest format (1).
    pub format: u32,
    /// The VM.
    pub vm: String,
    /// The generation id.
    pub generation: GenerationId,
    /// When the backup started (RFC 3339 UTC, from the profile).
    pub time: String,
    /// What the backup run did: full, diff or incr.
    pub mode: GenerationMode,
    /// How consistent the disks are (libvirt VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// Whether the generation was protected locally when it was synced (offsite prune
    /// keeps protected generations).
    pub protected: bool,
    /// Block size in bytes.
    pub block_size: u32,
    /// The generation's `generation.toml`, verbatim (its checksum proves it).
    pub profile_text: String,
    /// The saved libvirt domain XML, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<String>,
    /// The saved libvirt checkpoint XML, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_xml: Option<String>,
    /// The firmware and TPM state files (their bytes are in the body, in this order).
    #[serde(default)]
    pub state: Vec<StateRecord>,
    /// The disks, in the profile's order.
    pub disks: Vec<HeadDisk>,
    /// Distinct blocks the body locates.
    pub locations: u64,
    /// Every pack the body's locations name, as 32 hex digits, sorted.
    pub packs: Vec<String>,
    /// When it was synced (RFC 3339 UTC).
    pub synced: String,
    /// Length of the body box.
    pub body_len: u64,
    /// BLAKE3 of the body box, hex.
    pub body_hash: String,
}

/// One disk's block map.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskMap {
    /// Its N digests, back to back.
    pub digests: Vec<u8>,
    /// For each non-zero digest, in block order, the index of its location.
    pub refs: Vec<u32>,
}

impl DiskMap {
    /// The digest of block `b`.
    pub fn digest(&self, b: u64) -> Digest {
        let i = b as usize * DIGEST_LEN;
        self.digests[i..i + DIGEST_LEN].try_into().expect("32")
    }

    /// The number of blocks.
    pub fn blocks(&self) -> u64 {
        (self.digests.len() / DIGEST_LEN) as u64
    }
}

/// A whole manifest, opened and proven.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The head.
    pub head: Head,
    /// The generation profile the head carries, parsed.
    pub profile: GenerationProfile,
    /// The bytes of each state file of the head.
    pub state: Vec<Vec<u8>>,
    /// Each disk's block map, in the head's order.
    pub disks: Vec<DiskMap>,
    /// The distinct blocks.
    pub locations: Vec<Location>,
}

impl Manifest {
    /// The block map of disk `name`, with its head record.
    pub fn disk(&self, name: &str) -> Option<(&HeadDisk, &DiskMap)> {
        let i = self.head.disks.iter().position(|d| d.name == name)?;
        Some((&self.head.disks[i], &self.disks[i]))
    }

    /// The packs the manifest references.
    pub fn pack_ids(&self) -> Vec<PackId> {
        head_packs(&self.head)
    }
}

/// The packs a head names (its list was checked against the body when decoded; a head
/// read alone was authenticated).
pub fn head_packs(head: &Head) -> Vec<PackId> {
    head.packs
        .iter()
        .filter_map(|p| parse_hex(p)?.try_into().ok())
        .collect()
}

fn head_ad(key: &str) -> Vec<u8> {
    [AD_HEAD, key.as_bytes()].concat()
}

fn body_ad(key: &str) -> Vec<u8> {
    [AD_BODY, key.as_bytes()].concat()
}

/// Everything a manifest is made from, before it is sealed.
pub struct ManifestParts<'a> {
    /// The head, without `packs`, `locations`, `body_len` and `body_hash` (filled here).
    pub head: Head,
    /// The bytes of each state file.
    pub state: &'a [Vec<u8>],
    /// Each disk's block map.
    pub disks: &'a [DiskMap],
    /// The distinct blocks.
    pub locations: &'a [Location],
}

/// Seal manifest `obj_key` from its parts.
pub fn encode(k: &OffsiteKey, obj_key: &str, parts: ManifestParts<'_>) -> Result<Vec<u8>> {
    let mut head = parts.head;
    let mut raw = Vec::new();
    for s in parts.state {
        raw.extend_from_slice(s);
    }
    for d in parts.disks {
        raw.extend_from_slice(&d.digests);
        for r in &d.refs {
            raw.extend_from_slice(&r.to_le_bytes());
        }
    }
    for l in parts.locations {
        l.encode(&mut raw);
    }
    let packs: BTreeSet<String> = parts.locations.iter().map(|l| hex(&l.pack)).collect();
    head.packs = packs.into_iter().collect();
    head.locations = parts.locations.len() as u64;
    let z = zstd::bulk::compress(&raw, 3).map_err(|e| Error::usage(format!("zstd: {e}")))?;
    let body = k.seal(&body_ad(obj_key), &z)?;
    head.body_len = body.len() as u64;
    head.body_hash = blake3::hash(&body).to_hex().to_string();
    let json = serde_json::to_vec(&head).map_err(|e| Error::usage(format!("manifest: {e}")))?;
    let zhead = zstd::bulk::compress(&json, 3).map_err(|e| Error::usage(format!("zstd: {e}")))?;
    let sealed_head = k.seal(&head_ad(obj_key), &zhead)?;
    let mut out = Vec::with_capacity(12 + sealed_head.len() + body.len());
    out.extend_from_slice(&MANIFEST_MAGIC);
    out.extend_from_slice(&(sealed_head.len() as u32).to_le_bytes());
    out.extend_from_slice(&sealed_head);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decompress `z` into at most `limit` bytes (never allocating ahead of the bytes); the
/// message says why not.
fn unzstd(z: &[u8], limit: u64) -> std::result::Result<Vec<u8>, String> {
    let dec = zstd::stream::read::Decoder::new(z).map_err(|e| format!("zstd: {e}"))?;
    let mut out = Vec::new();
    dec.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("does not decompress: {e}"))?;
    if out.len() as u64 > limit {
        return Err("decompresses to more than it may hold".into());
    }
    Ok(out)
}

/// The length of the head box, from the object's first 12 bytes.
fn head_len(prelude: &[u8]) -> std::result::Result<u32, String> {
    if prelude.len() < PRELUDE as usize || prelude[..8] != MANIFEST_MAGIC {
        return Err("is not a manifest (no VMKMANI1 magic)".into());
    }
    let h = u32::from_le_bytes(prelude[8..12].try_into().expect("4"));
    if h > MAX_HEAD_LEN {
        return Err(format!("has a head of {h} bytes, more than a head may be"));
    }
    Ok(h)
}

/// Open and check the head box of manifest `obj_key`.
fn open_head(k: &OffsiteKey, obj_key: &str, sealed: &[u8]) -> std::result::Result<Head, String> {
    let z = k
        .open(&head_ad(obj_key), sealed)
        .ok_or("does not decrypt with this key (forged, changed, moved, or another key's)")?;
    let json = unzstd(&z, MAX_HEAD_LEN as u64 * 4)?;
    let head: Head =
        serde_json::from_slice(&json).map_err(|e| format!("head is malformed: {e}"))?;
    if head.format != MANIFEST_FORMAT {
        return Err(format!(
            "is manifest format {}; this vmkeep reads {MANIFEST_FORMAT}",
            head.format
        ));
    }
    if obj_key
        != format!(
            "{MANIFEST_PREFIX}{}/{}",
            k.name(&head.vm),
            k.name(head.generation.as_str())
        )
    {
        return Err(format!(
            "names generation {} of VM {}, which is not stored under this name",
            head.generation, head.vm
        ));
    }
    Ok(head)
}

/// The head of manifest `obj_key` (listed with `size` bytes), read without the body; the
/// inner message says why it is not a manifest of this key.
pub fn load_head(
    store: &dyn ObjectStore,
    k: &OffsiteKey,
    obj_key: &str,
    size: u64,
) -> Result<std::result::Result<Head, String>> {
    if size < PRELUDE {
        return Ok(Err("is not a manifest (too short)".into()));
    }
    let first = store.get_range(obj_key, 0, size.min(64 << 10))?;
    let h = match head_len(&first) {
        Ok(h) => h as u64,
        Err(e) => return Ok(Err(e)),
    };
    if PRELUDE + h > size {
        return Ok(Err("is cut short".into()));
    }
    let sealed = if PRELUDE + h <= first.len() as u64 {
        first[PRELUDE as usize..(PRELUDE + h) as usize].to_vec()
    } else {
        store.get_range(obj_key, PRELUDE, h)?
    };
    let head = match open_head(k, obj_key, &sealed) {
        Ok(head) => head,
        Err(e) => return Ok(Err(e)),
    };
    if PRELUDE + h + head.body_len != size {
        return Ok(Err(format!(
            "is {size} bytes; its head says {}",
            PRELUDE + h + head.body_len
        )));
    }
    Ok(Ok(head))
}

/// Read and prove the whole manifest `obj_key`; the inner message says what is wrong.
pub fn load(
    store: &dyn ObjectStore,
    k: &OffsiteKey,
    obj_key: &str,
) -> Result<std::result::Result<Manifest, String>> {
    let Some(data) = store.get(obj_key)? else {
        return Ok(Err("does not exist".into()));
    };
    Ok(decode(k, obj_key, &data))
}

/// Open and prove the manifest object `obj_key` whose bytes are `data`.
pub fn decode(k: &OffsiteKey, obj_key: &str, data: &[u8]) -> std::result::Result<Manifest, String> {
    let h = head_len(data)? as usize;
    let body_at = PRELUDE as usize + h;
    if data.len() < body_at {
        return Err("is cut short".into());
    }
    let head = open_head(k, obj_key, &data[PRELUDE as usize..body_at])?;
    let body = &data[body_at..];
    if body.len() as u64 != head.body_len || blake3::hash(body).to_hex().as_str() != head.body_hash
    {
        return Err("body is not the one its head names".into());
    }
    let z = k
        .open(&body_ad(obj_key), body)
        .ok_or("body does not decrypt with this key")?;
    // What the body must hold, from the head (checked arithmetic: a head is trusted only
    // as far as it authenticates, its numbers still bound what is read).
    check_block_size(std::path::Path::new(obj_key), head.block_size).map_err(|e| e.to_string())?;
    let mut want: u64 = 0;
    for s in &head.state {
        s.validate()?;
        want = want.saturating_add(s.size);
    }
    let mut seen = BTreeSet::new();
    for d in &head.disks {
        names::check_disk(&d.name).map_err(|e| e.to_string())?;
        if !seen.insert(d.name.as_str()) || !valid_disk_size(d.size) {
            return Err(format!(
                "lists disk {} twice or at an impossible size",
                d.name
            ));
        }
        let n = block_count(d.size, head.block_size);
        if d.blocks > n {
            return Err(format!(
                "disk {} has more blocks than its size holds",
                d.name
            ));
        }
        want = want
            .saturating_add(n.saturating_mul(DIGEST_LEN as u64))
            .saturating_add(d.blocks.saturating_mul(4));
    }
    want = want.saturating_add(head.locations.saturating_mul(LOCATION_LEN as u64));
    if want > MAX_BODY_LEN {
        return Err("says it holds more than a manifest may".into());
    }
    let raw = unzstd(&z, want)?;
    if raw.len() as u64 != want {
        return Err(format!(
            "body holds {} bytes; its head says {want}",
            raw.len()
        ));
    }
    let mut at = 0usize;
    let mut take = |n: u64| {
        let s = &raw[at..at + n as usize];
        at += n as usize;
        s
    };
    let state: Vec<Vec<u8>> = head.state.iter().map(|s| take(s.size).to_vec()).collect();
    for (s, bytes) in head.state.iter().zip(&state) {
        if crate::archive::state::digest_of(bytes) != s.digest {
            return Err(format!("state file {} fails its digest", s.file));
        }
    }
    let mut disks = Vec::with_capacity(head.disks.len());
    for d in &head.disks {
        let n = block_count(d.size, head.block_size);
        let digests = take(n * DIGEST_LEN as u64).to_vec();
        let refs: Vec<u32> = take(d.blocks * 4)
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        disks.push(DiskMap { digests, refs });
    }
    let locations: Vec<Location> = take(head.locations * LOCATION_LEN as u64)
        .chunks_exact(LOCATION_LEN)
        .map(Location::decode)
        .collect();
    prove(k, &head, &disks, &locations)?;
    let profile: GenerationProfile =
        profile::parse(std::path::Path::new(obj_key), &head.profile_text)
            .map_err(|e| format!("its generation profile: {}", e.detail()))?;
    check_profile(&head, &profile, &disks)?;
    Ok(Manifest {
        head,
        profile,
        state,
        disks,
        locations,
    })
}

/// Every reference names a location of the block whose digest it stands for, every
/// non-zero block has one, and the head's pack list is the locations' packs.
fn prove(
    k: &OffsiteKey,
    head: &Head,
    disks: &[DiskMap],
    locations: &[Location],
) -> std::result::Result<(), String> {
    for l in locations {
        check_location(l).map_err(|e| e.to_string())?;
    }
    for (d, map) in head.disks.iter().zip(disks) {
        let mut refs = map.refs.iter();
        let mut bytes = 0u64;
        for b in 0..map.blocks() {
            let digest = map.digest(b);
            if digest == ZERO_DIGEST {
                continue;
            }
            let Some(&r) = refs.next() else {
                return Err(format!("disk {}: fewer references than blocks", d.name));
            };
            let Some(loc) = locations.get(r as usize) else {
                return Err(format!("disk {}: block {b} names no location", d.name));
            };
            if loc.block != k.block_id(&digest) {
                return Err(format!(
                    "disk {}: block {b} names the location of another block",
                    d.name
                ));
            }
            bytes += crate::archive::format::block_len(b, d.size, head.block_size) as u64;
        }
        if refs.next().is_some() || bytes != d.data_bytes {
            return Err(format!(
                "disk {}: references do not match its blocks",
                d.name
            ));
        }
    }
    let packs: BTreeSet<String> = locations.iter().map(|l| hex(&l.pack)).collect();
    if packs.into_iter().collect::<Vec<_>>() != head.packs {
        return Err("its pack list is not the packs its blocks are in".into());
    }
    Ok(())
}

/// The profile carried is the head's generation, disk for disk and state file for state
/// file, and each digest list hashes to the disk's digest root.
fn check_profile(
    head: &Head,
    p: &GenerationProfile,
    disks: &[DiskMap],
) -> std::result::Result<(), String> {
    if p.id != head.generation || p.vm != head.vm || p.block_size != head.block_size {
        return Err("its generation profile is another generation's".into());
    }
    if p.disks.len() != head.disks.len() {
        return Err("its generation profile lists other disks".into());
    }
    if p.state != head.state {
        return Err("its generation profile lists other firmware or TPM state".into());
    }
    for ((rec, d), map) in p.disks.iter().zip(&head.disks).zip(disks) {
        if rec.name != d.name || rec.size != d.size || rec.digest_root != d.digest_root {
            return Err(format!(
                "disk {}: not the disk its generation profile records",
                d.name
            ));
        }
        let mut rh = RootHasher::new(head.block_size, d.size);
        rh.push_many(&map.digests);
        if rh.finish() != rec.digest_root {
            return Err(format!(
                "disk {}: its digests do not hash to the generation's digest root",
                d.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::digest::block_digest;
    use crate::archive::profile::{DiskRecord, SourceKind};

    /// A two-disk generation of 4 KiB blocks: vda has blocks [a, 0, b], vdb [a].
    fn parts(k: &OffsiteKey) -> (Head, Vec<DiskMap>, Vec<Location>, String) {
        let bs = 4096u32;
        let a = block_digest(&[1u8; 4096]);
        let b = block_digest(&[2u8; 100]);
        let la = Location {
            block: k.block_id(&a),
            pack: [5; 16],
            offset: 8,
            len: 100,
        };
        let lb = Location {
            block: k.block_id(&b),
            pack: [6; 16],
            offset: 8,
            len: 90,
        };
        let vda = DiskMap {
            digests: [a, ZERO_DIGEST, b].concat(),
            refs: vec![0, 1],
        };
        let vdb = DiskMap {
            digests: a.to_vec(),
            refs: vec![0],
        };
        let root = |m: &DiskMap, size| {
            let mut rh = RootHasher::new(bs, size);
            rh.push_many(&m.digests);
            rh.finish()
        };
        let id: GenerationId = "0193a000-0000-7000-8000-000000000001".parse().unwrap();
        let disk = |name: &str, size, root: String| DiskRecord {
            name: name.into(),
            size,
            mode: GenerationMode::Full,
            source: "x".into(),
            read_bytes: 0,
            changed_bytes: 0,
            stored_bytes: 0,
            digest_root: root,
            bitmap: None,
            origin: None,
            file_device: None,
            file_inode: None,
        };
        let profile = GenerationProfile {
            format: 1,
            id: id.clone(),
            vm: "web1".into(),
            time: "2026-01-02T03:04:05Z".into(),
            mode: GenerationMode::Full,
            duration_secs: 1.0,
            protected: false,
            block_size: bs,
            kind: SourceKind::Image,
            checkpoint: None,
            consistency: None,
            disks: vec![
                disk("vda", 8292, root(&vda, 8292)),
                disk("vdb", 4096, root(&vdb, 4096)),
            ],
            state: vec![],
        };
        let text = profile::render("vmkeep generation", &profile).unwrap();
        let head = Head {
            format: 1,
            vm: "web1".into(),
            generation: id,
            time: profile.time.clone(),
            mode: GenerationMode::Full,
            consistency: None,
            protected: false,
            block_size: bs,
            profile_text: text,
            domain_xml: Some("<domain/>".into()),
            checkpoint_xml: None,
            state: vec![],
            disks: vec![
                HeadDisk {
                    name: "vda".into(),
                    size: 8292,
                    digest_root: root(&vda, 8292),
                    blocks: 2,
                    data_bytes: 4196,
                },
                HeadDisk {
                    name: "vdb".into(),
                    size: 4096,
                    digest_root: root(&vdb, 4096),
                    blocks: 1,
                    data_bytes: 4096,
                },
            ],
            locations: 0,
            packs: vec![],
            synced: "2026-01-02T04:00:00Z".into(),
            body_len: 0,
            body_hash: String::new(),
        };
        let key = manifest_key(k, "web1", head.generation.as_str());
        (head, vec![vda, vdb], vec![la, lb], key)
    }

    fn sealed(k: &OffsiteKey) -> (Vec<u8>, String) {
        let (head, disks, locs, key) = parts(k);
        let data = encode(
            k,
            &key,
            ManifestParts {
                head,
                state: &[],
                disks: &disks,
                locations: &locs,
            },
        )
        .unwrap();
        (data, key)
    }

    #[test]
    fn a_manifest_round_trips_and_its_head_reads_alone() {
        let dir = tempfile::tempdir().unwrap();
        let k = OffsiteKey::create(&dir.path().join("k")).unwrap();
        let (data, key) = sealed(&k);
        let m = decode(&k, &key, &data).unwrap();
        let (_, _, locs, _) = parts(&k);
        assert_eq!(m.locations, locs);
        assert_eq!(m.head.packs.len(), 2);
        assert_eq!(m.disk("vda").unwrap().1.refs, vec![0, 1]);
        assert_eq!(m.profile.vm, "web1");
        let store = crate::offsite::store::DirStore::open(&dir.path().join("t")).unwrap();
        store.put(&key, &data).unwrap();
        let head = load_head(&store, &k, &key, data.len() as u64)
            .unwrap()
            .unwrap();
        assert_eq!(head, m.head);
    }

    #[test]
    fn a_changed_moved_or_foreign_manifest_fails() {
        let dir = tempfile::tempdir().unwrap();
        let k = OffsiteKey::create(&dir.path().join("k")).unwrap();
        let other = OffsiteKey::create(&dir.path().join("o")).unwrap();
        let (data, key) = sealed(&k);
        for i in 0..data.len() {
            let mut d = data.clone();
            d[i] ^= 0x04;
            assert!(decode(&k, &key, &d).is_err(), "flipped byte {i}");
        }
        let e = decode(&other, &key, &data).unwrap_err();
        assert!(e.contains("does not decrypt"), "{e}");
        let moved = manifest_key(&k, "web1", "0193a000-0000-7000-8000-000000000002");
        assert!(decode(&k, &moved, &data).is_err(), "moved to another name");
        assert!(decode(&k, &key, &data[..data.len() - 1]).is_err(), "cut");
    }

    #[test]
    fn a_manifest_whose_blocks_do_not_prove_is_refused_even_when_sealed_by_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = OffsiteKey::create(&dir.path().join("k")).unwrap();
        let seal = |head: Head, disks: &[DiskMap], locs: &[Location], key: &str| {
            let data = encode(
                &k,
                key,
                ManifestParts {
                    head,
                    state: &[],
                    disks,
                    locations: locs,
                },
            )
            .unwrap();
            decode(&k, key, &data)
        };
        // A reference to another block's location.
        let (head, disks, mut locs, key) = parts(&k);
        locs.swap(0, 1);
        let e = seal(head, &disks, &locs, &key).unwrap_err();
        assert!(e.contains("another block"), "{e}");
        // A digest list that is not the profile's (every location proven, the root not).
        let (head, mut disks, mut locs, key) = parts(&k);
        let c = block_digest(&[3u8; 4096]);
        disks[1] = DiskMap {
            digests: c.to_vec(),
            refs: vec![2],
        };
        locs.push(Location {
            block: k.block_id(&c),
            pack: [7; 16],
            offset: 8,
            len: 100,
        });
        let e = seal(head, &disks, &locs, &key).unwrap_err();
        assert!(e.contains("digest root"), "{e}");
        // A head that claims a huge body is bounded by what is there.
        let (mut head, disks, locs, key) = parts(&k);
        head.disks[0].size = 1 << 50;
        assert!(seal(head, &disks, &locs, &key).is_err());
    }

    /// A state file the head lists (its bytes in the body, its digest right) that the
    /// generation profile it carries does not list is refused: a copy restored from the
    /// manifest gets only the state its profile records.
    #[test]
    fn a_manifest_whose_state_is_not_its_profiles_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = OffsiteKey::create(&dir.path().join("k")).unwrap();
        let (mut head, disks, locs, key) = parts(&k);
        let file = crate::archive::state::StateFile::new(
            crate::archive::state::StateKind::Tpm,
            "state.tpm.0".into(),
            "tpm2/tpm2-00.permall".into(),
            0o600,
            b"a TPM the profile does not list".to_vec(),
        );
        head.state = vec![file.record.clone()];
        let data = encode(
            &k,
            &key,
            ManifestParts {
                head,
                state: &[file.bytes],
                disks: &disks,
                locations: &locs,
            },
        )
        .unwrap();
        let e = decode(&k, &key, &data).unwrap_err();
        assert!(e.contains("firmware or TPM state"), "{e}");
    }
}
