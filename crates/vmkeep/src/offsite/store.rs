//! Where an offsite copy's objects live: an S3-compatible bucket ([`super::s3`]) or a
//! folder ([`DirStore`]). vmkeep writes every object once, whole, under a name of its own
//! and never changes it (so bucket versioning and object lock can protect them); it deletes
//! objects only when pruning.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::fsutil;

/// One object a listing found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key, relative to the store's prefix.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was written, when the store says.
    pub modified: Option<SystemTime>,
}

/// A flat namespace of immutable objects, blocking. Keys are relative to the target's
/// prefix, `/`-separated, of ASCII lowercase letters, digits, `.`, `-` and `/`
/// ([`check_key`]).
pub trait ObjectStore: Send + Sync {
    /// The store for messages (`s3://bucket/prefix at https://host:port`, a folder).
    fn describe(&self) -> String;
    /// Write object `key` whole.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Object `key` whole; `None` when there is no such object.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Bytes `start..start + len` of object `key`: exactly `len` bytes, else an error.
    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Vec<u8>>;
    /// Every object whose key starts with `prefix`, in key order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Remove object `key`; an absent object is no error.
    fn delete(&self, key: &str) -> Result<()>;
}

/// Refuse a key vmkeep would never make (it could leave a folder store, or mean something
/// else to a server).
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && !key.starts_with('/')
        && !key.ends_with('/')
        && key
            .split('/')
            .all(|n| !n.is_empty() && n != "." && n != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"./-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "not an object key vmkeep makes: {key:?}"
        )))
    }
}

/// Objects as files under a folder: `ROOT/KEY`. Each object is written to a temporary
/// file and renamed into place, so a reader never sees half an object.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// The store in folder `root` (made if missing).
    pub fn open(root: &Path) -> Result<DirStore> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        Ok(DirStore {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

impl ObjectStore for DirStore {
    fn describe(&self) -> String {
        format!("folder {}", self.root.display())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let parent = fsutil::parent(&path);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        fsutil::atomic_write(&path, data)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::corrupt(
                &path,
                format!(
                    "object is {size} bytes; bytes {start}..{} asked",
                    start + len
                ),
            ));
        }
        let mut buf = vec![0u8; len as usize];
        fsutil::read_exact_at(&file, &mut buf, start, &path)?;
        Ok(buf)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out)?;
        out.retain(|o| o.key.starts_with(prefix));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// Every object file under `dir` (temporary files of a write in progress left out).
fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectInfo>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let meta = entry.metadata().map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            walk(root, &path, out)?;
            continue;
        }
        let Some(key) = path
            .strip_prefix(root)
            .ok()
            .and_then(|k| k.to_str())
            .filter(|k| check_key(k).is_ok() && !k.ends_with(".tmp"))
        else {
            continue;
        };
        out.push(ObjectInfo {
            key: key.to_string(),
            size: meta.len(),
            modified: meta.modified().ok(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_store_keeps_lists_reads_and_deletes_objects() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(&dir.path().join("t")).unwrap();
        assert_eq!(s.get("config").unwrap(), None);
        s.put("packs/ab/ab01", b"0123456789").unwrap();
        s.put("config", b"format = 1\n").unwrap();
        assert_eq!(s.get("config").unwrap().unwrap(), b"format = 1\n");
        assert_eq!(s.get_range("packs/ab/ab01", 2, 3).unwrap(), b"234");
        assert!(s.get_range("packs/ab/ab01", 8, 3).is_err(), "past the end");
        let keys: Vec<String> = s.list("").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(keys, ["config", "packs/ab/ab01"]);
        assert_eq!(s.list("packs/").unwrap()[0].size, 10);
        s.delete("packs/ab/ab01").unwrap();
        s.delete("packs/ab/ab01").unwrap();
        assert!(s.list("packs/").unwrap().is_empty());
    }

    #[test]
    fn keys_that_could_leave_the_store_are_refused() {
        for k in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "A",
            "a b",
            "a\\b",
        ] {
            assert!(check_key(k).is_err(), "{k:?}");
        }
        check_key("manifests/0123abcd/89ef").unwrap();
    }
}
