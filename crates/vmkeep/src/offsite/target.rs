//! Targets: the TARGET of `sync --to` and `--from`, parsed into a store; the target's
//! `config` object (which key it belongs to); and the lock objects (`locks/<run id>`) by
//! which a prune sees a sync in flight.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::offsite::key::OffsiteKey;
use crate::offsite::store::{DirStore, ObjectStore};

/// The key of the target's `config` object.
pub const CONFIG_KEY: &str = "config";
/// Where lock objects are.
pub const LOCK_PREFIX: &str = "locks/";
/// Version of the offsite layout (`format` of `config`).
pub const LAYOUT_FORMAT: u32 = 1;

/// Open TARGET `target`: `s3://BUCKET/PREFIX` (an existing bucket; endpoint, region and
/// credentials from `s3` and else the `AWS_*` environment, see
/// [`super::s3::S3Settings::from_target`]), or `file:///PATH` or `dir:PATH` (an encrypted
/// copy in a local folder). `create`: the folder may be made (sync); else it must exist
/// (restore, check, status, prune).
pub fn open(
    target: &str,
    create: bool,
    s3: &super::s3::S3Overrides,
) -> Result<Box<dyn ObjectStore>> {
    let path = if let Some(p) = target.strip_prefix("file://") {
        if !p.starts_with('/') {
            return Err(Error::usage(format!(
                "{target}: a file:// target names an absolute path (file:///PATH)"
            )));
        }
        p
    } else if let Some(p) = target.strip_prefix("dir:") {
        p
    } else if target.starts_with("s3://") {
        // The bucket must exist (vmkeep never makes one).
        let settings = super::s3::S3Settings::from_target(target, s3)?;
        return Ok(Box::new(super::s3::S3Store::open(&settings)?));
    } else {
        return Err(Error::usage(format!(
            "{target:?} is not an offsite target: give s3://BUCKET/PREFIX, file:///PATH or dir:PATH"
        )));
    };
    if path.is_empty() {
        return Err(Error::usage(format!("{target}: no folder named")));
    }
    let path = std::path::Path::new(path);
    if !create && !path.is_dir() {
        return Err(Error::usage(format!(
            "{target}: no such folder ({} does not exist)",
            path.display()
        )));
    }
    Ok(Box::new(DirStore::open(path)?))
}

/// The `config` object: plain TOML.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Layout format (1).
    pub format: u32,
    /// When the first sync made the target (RFC 3339 UTC).
    pub created: String,
    /// The id of the key everything on the target is sealed with.
    pub key_id: String,
}

/// Read the target's `config` and require that `key` is its key. With `create`, a
/// target without one (a first sync) gets one naming `key`.
pub fn check_config(
    store: &dyn ObjectStore,
    key: &OffsiteKey,
    create: bool,
) -> Result<TargetConfig> {
    let cfg = match store.get(CONFIG_KEY)? {
        Some(bytes) => {
            if bytes.len() > 64 << 10 {
                return Err(Error::corrupt(CONFIG_KEY, "too large for a config object"));
            }
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::corrupt(CONFIG_KEY, "not UTF-8 text"))?;
            let cfg: TargetConfig = toml::from_str(&text).map_err(|e| {
                Error::corrupt(
                    format!("{}: {CONFIG_KEY}", store.describe()),
                    e.to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            })?;
            if cfg.format != LAYOUT_FORMAT {
                return Err(Error::format(
                    CONFIG_KEY,
                    format!(
                        "offsite layout format {} is not supported (this vmkeep reads {LAYOUT_FORMAT})",
                        cfg.format
                    ),
                ));
            }
            cfg
        }
        None if create => {
            let others = store.list("")?;
            if others.iter().any(|o| !o.key.starts_with(LOCK_PREFIX)) {
                return Err(Error::usage(format!(
                    "{} holds objects but no vmkeep config object; refusing to sync there",
                    store.describe()
                )));
            }
            let cfg = TargetConfig {
                format: LAYOUT_FORMAT,
                created: crate::archive::profile::now_rfc3339(),
                key_id: key.id.clone(),
            };
            let text = format!(
                "# vmkeep offsite copy (objects sealed with the key of this id)\n{}",
                toml::to_string(&cfg).map_err(|e| Error::usage(e.to_string()))?
            );
            store.put(CONFIG_KEY, text.as_bytes())?;
            return Ok(cfg);
        }
        None => {
            return Err(Error::usage(format!(
                "{} holds no vmkeep offsite copy (no config object)",
                store.describe()
            )))
        }
    };
    if cfg.key_id != key.id {
        return Err(Error::usage(format!(
            "the key {} (id {}) is not this target's key (id {})",
            key.path.display(),
            key.id,
            cfg.key_id
        )));
    }
    Ok(cfg)
}

/// What a lock object says (plain TOML).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LockInfo {
    /// The host the command runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// The command: sync or prune.
    pub command: String,
    /// When it started (RFC 3339 UTC).
    pub time: String,
}

/// A lock object this process wrote: `locks/<run id>`, removed by [`RunLock::release`]
/// (and, failing that, when dropped).
pub struct RunLock<'a> {
    store: &'a dyn ObjectStore,
    /// The object key.
    pub key: String,
    released: bool,
}

impl<'a> RunLock<'a> {
    /// Write `locks/<run>` for `command`.
    pub fn write(store: &'a dyn ObjectStore, run: &str, command: &str) -> Result<RunLock<'a>> {
        let info = LockInfo {
            host: hostname(),
            pid: std::process::id(),
            command: command.to_string(),
            time: crate::archive::profile::now_rfc3339(),
        };
        let key = format!("{LOCK_PREFIX}{run}");
        let text = toml::to_string(&info).map_err(|e| Error::usage(e.to_string()))?;
        store.put(&key, text.as_bytes())?;
        Ok(RunLock {
            store,
            key,
            released: false,
        })
    }

    /// Write the lock object again, with the time now: a run longer than a prune's grace
    /// period stays fresh (lock objects are the one kind vmkeep rewrites).
    pub fn refresh(&self, command: &str) -> Result<()> {
        let info = LockInfo {
            host: hostname(),
            pid: std::process::id(),
            command: command.to_string(),
            time: crate::archive::profile::now_rfc3339(),
        };
        let text = toml::to_string(&info).map_err(|e| Error::usage(e.to_string()))?;
        self.store.put(&self.key, text.as_bytes())
    }

    /// Remove the lock object.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.store.delete(&self.key)
    }
}

impl Drop for RunLock<'_> {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.store.delete(&self.key);
        }
    }
}

/// The lock objects other than `own` written less than `grace` ago (by the store's
/// time, else the time the lock says): the syncs and prunes that may still run. A lock
/// older than that is a run that died (kill -9, power loss) and is ignored.
pub fn fresh_locks(
    store: &dyn ObjectStore,
    own: &str,
    grace: Duration,
) -> Result<Vec<(String, Option<LockInfo>)>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    for o in store.list(LOCK_PREFIX)? {
        if o.key == own {
            continue;
        }
        let info: Option<LockInfo> = store
            .get(&o.key)?
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|t| toml::from_str(&t).ok());
        let written = o.modified.or_else(|| {
            let t = crate::archive::profile::parse_time(&info.as_ref()?.time)?;
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(t.unix_timestamp().max(0) as u64))
        });
        let fresh = match written {
            Some(w) => now.duration_since(w).unwrap_or_default() < grace,
            None => true,
        };
        if fresh {
            out.push((o.key, info));
        }
    }
    Ok(out)
}

/// This host's name, for lock objects.
pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_a_config_names_its_key() {
        let none = crate::offsite::s3::S3Overrides::default();
        let dir = tempfile::tempdir().unwrap();
        let k = OffsiteKey::create(&dir.path().join("k")).unwrap();
        let other = OffsiteKey::create(&dir.path().join("o")).unwrap();
        let t = dir.path().join("t");
        let url = format!("file://{}", t.display());
        assert!(
            open(&url, false, &none).is_err(),
            "missing folder, not made"
        );
        let s = open(&url, true, &none).unwrap();
        assert!(
            check_config(s.as_ref(), &k, false).is_err(),
            "no config yet"
        );
        let cfg = check_config(s.as_ref(), &k, true).unwrap();
        assert_eq!(cfg.key_id, k.id);
        assert_eq!(check_config(s.as_ref(), &k, false).unwrap(), cfg);
        let e = check_config(s.as_ref(), &other, true).unwrap_err();
        let want = format!("(id {}) is not this target's key (id {})", other.id, k.id);
        assert!(e.to_string().contains(&want), "{e}");
        assert!(open(&format!("dir:{}", t.display()), false, &none).is_ok());
        assert!(open("s3://bucket/prefix", true, &none).is_err());
        assert!(open("/plain/path", true, &none).is_err());
        assert!(open("file://relative", true, &none).is_err());
    }

    #[test]
    fn lock_objects_are_seen_while_fresh_and_removed_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(dir.path()).unwrap();
        let a = RunLock::write(&s, "aaaa", "sync").unwrap();
        let b = RunLock::write(&s, "bbbb", "prune").unwrap();
        let seen = fresh_locks(&s, &b.key, Duration::from_secs(3600)).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "locks/aaaa");
        assert_eq!(seen[0].1.as_ref().unwrap().command, "sync");
        assert!(fresh_locks(&s, &b.key, Duration::ZERO).unwrap().is_empty());
        a.release().unwrap();
        assert!(fresh_locks(&s, &b.key, Duration::from_secs(3600))
            .unwrap()
            .is_empty());
        drop(b);
        assert!(s.list(LOCK_PREFIX).unwrap().is_empty());
    }
}
