//! Offsite keys: the key file `vmkeep key create` writes, the keys derived from it, and the
//! sealed boxes (XChaCha20-Poly1305) every encrypted object is made of.
//!
//! A key file holds one 32-byte master key from the operating system's random source.
//! Everything else is derived from it with BLAKE3's key derivation, each with its own
//! context string (see "Offsite layout" in `docs/FORMAT.md`):
//!
//! - `vmkeep offsite block id v1`: the key of the block ids, BLAKE3-keyed over a block's
//!   local digest, so the provider sees neither digests nor which blocks two VMs share
//!   with anyone else's copy;
//! - `vmkeep offsite data v1`: the XChaCha20-Poly1305 key of every sealed box;
//! - `vmkeep offsite name v1`: the key of the object names of VMs and generations;
//! - `vmkeep offsite key id v1`: the key id, 8 bytes, written in the target's `config`
//!   object so that the wrong key is one clear error.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::archive::digest::{hex, Digest};
use crate::error::{Error, Result};

/// Version of the key file format (`format`).
pub const KEY_FORMAT: u32 = 1;

/// Bytes of a sealed box's nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes of a sealed box's authentication tag.
pub const TAG_LEN: usize = 16;
/// What a sealed box adds to its plaintext: the nonce and the tag.
pub const BOX_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The context strings of the derived keys (BLAKE3 `derive_key`).
const CTX_BLOCK_ID: &str = "vmkeep offsite block id v1";
const CTX_DATA: &str = "vmkeep offsite data v1";
const CTX_NAME: &str = "vmkeep offsite name v1";
const CTX_KEY_ID: &str = "vmkeep offsite key id v1";

/// A block's name on the target: BLAKE3-keyed over its local digest.
pub type BlockId = [u8; 32];

/// The key file as TOML.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: u32,
    id: String,
    key: String,
}

/// An offsite key, loaded: the master key and what is derived from it.
pub struct OffsiteKey {
    /// The key file it was read from (or written to), for messages.
    pub path: PathBuf,
    /// The key id: 16 hex digits, the first 8 bytes of the key id derivation.
    pub id: String,
    id_key: [u8; 32],
    name_key: [u8; 32],
    aead: XChaCha20Poly1305,
}

impl std::fmt::Debug for OffsiteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("OffsiteKey")
            .field("path", &self.path)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The key id of master key `master`.
fn key_id(master: &[u8; 32]) -> String {
    hex(&blake3::derive_key(CTX_KEY_ID, master)[..8])
}

impl OffsiteKey {
    /// The keys derived from `master`; `path` names the key file for messages.
    pub fn from_master(master: &[u8; 32], path: &Path) -> OffsiteKey {
        let data_key = blake3::derive_key(CTX_DATA, master);
        OffsiteKey {
            path: path.to_path_buf(),
            id: key_id(master),
            id_key: blake3::derive_key(CTX_BLOCK_ID, master),
            name_key: blake3::derive_key(CTX_NAME, master),
            aead: XChaCha20Poly1305::new((&data_key).into()),
        }
    }

    /// `vmkeep key create FILE`: a new master key from the operating system's random
    /// source, written to a new file `path` (mode 0600, never over an existing file).
    pub fn create(path: &Path) -> Result<OffsiteKey> {
        let mut master = [0u8; 32];
        random(&mut master)?;
        let id = key_id(&master);
        let text = format!(
            "# vmkeep offsite key (keep a copy elsewhere: without it the offsite copy cannot be read)\n\
             format = {KEY_FORMAT}\nid = \"{id}\"\nkey = \"{}\"\n",
            hex(&master)
        );
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::usage(format!(
                        "{} exists; a key file is never overwritten (losing a key loses its offsite copies)",
                        path.display()
                    ))
                } else {
                    Error::io(path, e)
                }
            })?;
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(path);
            return Err(Error::io(path, e));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsutil::sync_dir(dir)?;
        }
        Ok(OffsiteKey::from_master(&master, path))
    }

    /// Read the key file `path`. A file that others may read or write is refused (as ssh
    /// refuses such a private key), and so is one whose id does not match its key (a
    /// damaged or hand-edited file).
    pub fn load(path: &Path) -> Result<OffsiteKey> {
        let file = std::fs::File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::usage(format!("key file {} does not exist", path.display()))
            } else {
                Error::io(path, e)
            }
        })?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::usage(format!(
                "key file {} is not a regular file",
                path.display()
            )));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(Error::usage(format!(
                "key file {} may be read or changed by others (mode {mode:04o}); make it private: chmod 600 {}",
                path.display(),
                path.display()
            )));
        }
        if meta.len() > 64 << 10 {
            return Err(Error::usage(format!(
                "{} is not a vmkeep key file (too large)",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |why: &str| {
            Error::usage(format!(
                "{} is not a vmkeep key file: {why}",
                path.display()
            ))
        };
        let kf: KeyFile = toml::from_str(&text).map_err(|e| bad(&one_line(&e.to_string())))?;
        if kf.format != KEY_FORMAT {
            return Err(Error::format(
                path,
                format!(
                    "key file format {} is not supported (this vmkeep reads {KEY_FORMAT})",
                    kf.format
                ),
            ));
        }
        let master: [u8; 32] = parse_hex(&kf.key)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("key is not 64 hex digits"))?;
        let key = OffsiteKey::from_master(&master, path);
        if key.id != kf.id {
            return Err(bad(&format!(
                "its id {} is not the id of its key ({}): the file is damaged",
                kf.id, key.id
            )));
        }
        Ok(key)
    }

    /// The block id of a block whose local digest is `digest`.
    pub fn block_id(&self, digest: &Digest) -> BlockId {
        *blake3::keyed_hash(&self.id_key, digest).as_bytes()
    }

    /// The object name of a VM or generation called `text`: 32 hex digits.
    pub fn name(&self, text: &str) -> String {
        hex(&blake3::keyed_hash(&self.name_key, text.as_bytes()).as_bytes()[..16])
    }

    /// Seal `plain` with associated data `ad`: nonce (24 random bytes), ciphertext, tag.
    pub fn seal(&self, ad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let sealed = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: ad,
                },
            )
            .map_err(|_| Error::usage("encryption failed"))?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Open a box [`seal`](Self::seal) made with the same associated data `ad`; `None`
    /// when it does not authenticate (another key, another role or object, a changed
    /// byte, a short box).
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < BOX_OVERHEAD {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.aead
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad: ad })
            .ok()
    }
}

/// Fill `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::io_ctx(
            "the operating system's random source",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// `len` random bytes as lowercase hex (object names: pack ids, run ids).
pub fn random_hex(len: usize) -> Result<String> {
    let mut b = vec![0u8; len];
    random(&mut b)?;
    Ok(hex(&b))
}

/// The bytes of lowercase or uppercase hex `s`; `None` for anything else.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_in(dir: &Path) -> OffsiteKey {
        OffsiteKey::create(&dir.join("k")).unwrap()
    }

    #[test]
    fn a_created_key_loads_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k = OffsiteKey::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# vmkeep offsite key"), "{text}");
        assert_eq!(k.id.len(), 16);
        let again = OffsiteKey::load(&path).unwrap();
        assert_eq!(again.id, k.id);
        assert_eq!(again.name("web1"), k.name("web1"));
        let e = OffsiteKey::create(&path).unwrap_err();
        assert!(e.to_string().contains("never overwritten"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "untouched");
        // Two keys are different keys.
        let other = OffsiteKey::create(&dir.path().join("k2")).unwrap();
        assert_ne!(other.id, k.id);
        assert_ne!(other.block_id(&[7; 32]), k.block_id(&[7; 32]));
    }

    #[test]
    fn a_key_file_others_can_read_or_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = key_in(dir.path());
        let path = k.path.clone();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = OffsiteKey::load(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let key_line = text.lines().find(|l| l.starts_with("key = ")).unwrap();
        let mut bad = key_line.to_string();
        let last = bad.pop().unwrap();
        let c = bad.pop().unwrap();
        bad.push(if c == '0' { '1' } else { '0' });
        bad.push(last);
        std::fs::write(&path, text.replace(key_line, &bad)).unwrap();
        let e = OffsiteKey::load(&path).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        let e = OffsiteKey::load(&dir.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn a_box_opens_only_with_its_key_and_associated_data_and_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let k = key_in(dir.path());
        let other = OffsiteKey::create(&dir.path().join("o")).unwrap();
        let plain = b"the bytes of one block, or a manifest".to_vec();
        let sealed = k.seal(b"vmkeep manifest v1manifests/a/b", &plain).unwrap();
        assert_eq!(sealed.len(), plain.len() + BOX_OVERHEAD);
        assert!(!sealed.windows(plain.len()).any(|w| w == plain.as_slice()));
        assert_eq!(
            k.open(b"vmkeep manifest v1manifests/a/b", &sealed).unwrap(),
            plain
        );
        // Moved to another object or role.
        assert!(k
            .open(b"vmkeep manifest v1manifests/a/c", &sealed)
            .is_none());
        assert!(k.open(b"vmkeep index v1manifests/a/b", &sealed).is_none());
        // Another key.
        assert!(other
            .open(b"vmkeep manifest v1manifests/a/b", &sealed)
            .is_none());
        // Every byte matters.
        for i in 0..sealed.len() {
            let mut s = sealed.clone();
            s[i] ^= 0x01;
            assert!(
                k.open(b"vmkeep manifest v1manifests/a/b", &s).is_none(),
                "byte {i}"
            );
        }
        assert!(k.open(b"", &sealed[..BOX_OVERHEAD - 1]).is_none());
        // Two seals of the same plaintext differ (random nonces).
        assert_ne!(k.seal(b"x", &plain).unwrap(), k.seal(b"x", &plain).unwrap());
    }
}
