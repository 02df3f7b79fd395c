//! The life cycle of the persistent qcow2 bitmaps used for incremental backups of an image
//! file (`PATH?bitmap=PREFIX`), named and trusted like libvirt checkpoints.
//!
//! - Every run adds a bitmap of its own, `PREFIX.<repository id>.<generation id>` (the
//!   generation the run makes), enabled, before it reads the image: it tracks every write
//!   from then on. The generation records that name (`DiskRecord::bitmap`). The name is the
//!   run's token inside the image: generation ids are unique (UUIDv7, 74 random bits), so
//!   only an image that was carried on from that run holds it.
//! - A run is incremental only when the bitmap the newest generation recorded is exactly
//!   `PREFIX.<this repository>.<that generation>`, the image holds it, it is enabled
//!   (`auto`: it saw every write) and consistent (not `in-use`: QEMU saved it cleanly), and
//!   the image is the file the newest generation read (same path, device and inode: see
//!   `engine::backup::source_changed`). Anything else is a diff: read everything, store
//!   only changes, with one line saying why.
//! - Why this catches a rolled-back image (an older copy of the file put back): the copy
//!   was taken before the newest generation's run added its bitmap, so it lacks that name,
//!   whatever older bitmaps of this chain it carries (also those of a failed run, which
//!   never became a generation). A copy taken after that bitmap was added holds it with
//!   every write since, so it is trustworthy as it is.
//! - Another repository (another id), another prefix or another tool never shares a
//!   name: each chain sees only its own bitmap, and every bitmap gets every write.
//! - After a successful generation this repository's other bitmaps of this prefix for
//!   this VM are removed (those of its generations, and those of runs that never became a
//!   generation); another VM's of this repository (a libvirt checkpoint's, say) and
//!   another repository's never are. A failed run removes only the bitmap it
//!   added, so the newest generation's bitmap keeps accumulating. If a step cannot run (a
//!   VM holds the image's lock), the bitmaps are left as they are: the next run reads
//!   more than it must, or all of it, never less.
//! - Every step runs under the VM's writer lock (`BackupRun`), so two runs of one VM
//!   never interleave them.
//!
//! Bitmaps named `PREFIX` or `PREFIX-next`, left by earlier vmkeep versions, are never
//! trusted or removed (two repositories may share them); remove them with
//! `qemu-img bitmap --remove IMAGE NAME` once no older vmkeep uses them.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// A persistent bitmap as `qemu-img info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name in the image.
    pub name: String,
    /// Bytes of the disk one bit of the bitmap covers (0 when `qemu-img` did not say).
    pub granularity: u64,
    /// Flags such as `auto` (enabled) and `in-use` (not saved cleanly: untrustworthy).
    pub flags: Vec<String>,
}

impl BitmapInfo {
    /// Whether the bitmap was saved cleanly (no `in-use` flag); an inconsistent bitmap cannot be
    /// trusted for an incremental run.
    pub fn consistent(&self) -> bool {
        !self.flags.iter().any(|f| f == "in-use")
    }

    /// Enabled (`auto`): it records every write to the image.
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
}

/// Run `qemu-img BEFORE… PATH AFTER…`; its stdout, or its message as a source error.
fn qemu_img(path: &Path, before: &[&str], after: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img")
        .args(before)
        .arg(path)
        .args(after)
        .output()
        .map_err(|e| {
            Error::source(
                path.display(),
                format!("cannot run qemu-img (install qemu-utils): {e}"),
            )
        })?;
    if !out.status.success() {
        let what = before
            .iter()
            .chain(after)
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(Error::source(
            path.display(),
            format!("qemu-img {what}: {}", msg.trim()),
        ));
    }
    Ok(out.stdout)
}

/// `qemu-img info` of an image (read with shared locks, so a running VM may hold it).
pub fn info(path: &Path, format: Option<&str>) -> Result<serde_json::Value> {
    let fmt = format.map(|f| format!("--format={f}"));
    let mut args = vec!["info", "-U", "--output=json"];
    args.extend(fmt.as_deref());
    let out = qemu_img(path, &args, &[])?;
    serde_json::from_slice(&out)
        .map_err(|e| Error::source(path.display(), format!("qemu-img info: {e}")))
}

/// `qemu-img info --backing-chain` of an image in `format`: a list of every image of its
/// backing chain, top first (read with shared locks, so a running VM may hold them).
pub fn info_chain(path: &Path, format: &str) -> Result<serde_json::Value> {
    let fmt = format!("--format={format}");
    let args = [
        "info",
        "-U",
        "--backing-chain",
        "--output=json",
        fmt.as_str(),
    ];
    let out = qemu_img(path, &args, &[])?;
    serde_json::from_slice(&out)
        .map_err(|e| Error::source(path.display(), format!("qemu-img info: {e}")))
}

/// The persistent bitmaps of a qcow2 image.
pub fn list(path: &Path) -> Result<Vec<BitmapInfo>> {
    Ok(parse_bitmaps(&info(path, None)?))
}

/// The persistent bitmaps in one image's `qemu-img info` (its own, not its backing
/// file's).
pub fn parse_bitmaps(info: &serde_json::Value) -> Vec<BitmapInfo> {
    let Some(bitmaps) = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(|b| b.as_array())
    else {
        return Vec::new();
    };
    bitmaps
        .iter()
        .filter_map(|b| {
            Some(BitmapInfo {
                name: b.get("name")?.as_str()?.to_string(),
                granularity: b.get("granularity").and_then(|g| g.as_u64()).unwrap_or(0),
                flags: b
                    .get("flags")
                    .and_then(|f| f.as_array())
                    .map(|f| {
                        f.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Add bitmap `name` to the image (enabled, persistent), with `granularity` bytes per bit
/// (QEMU's default, the cluster size, when `None`).
pub fn add(path: &Path, name: &str, granularity: Option<u64>) -> Result<()> {
    let g = granularity.map(|g| g.to_string());
    let mut before = vec!["bitmap", "--add", "--enable"];
    if let Some(g) = &g {
        before.extend(["-g", g.as_str()]);
    }
    qemu_img(path, &before, &[name]).map(drop)
}

fn bitmap_op(path: &Path, op: &str, name: &str) -> Result<()> {
    qemu_img(path, &["bitmap", op], &[name]).map(drop)
}

/// Check a granularity for new bitmaps (bytes per bit): a power of two from 512 bytes to
/// 2 GiB, as QEMU takes.
pub fn check_granularity(g: u64) -> Result<()> {
    if !g.is_power_of_two() || !(512..=(1 << 31)).contains(&g) {
        return Err(Error::usage(format!(
            "bitmap granularity {g} is not a power of two from 512 bytes to 2 GiB"
        )));
    }
    Ok(())
}

/// The bitmap of generation `generation` of repository `repository`, for `prefix`.
pub fn chain_name(prefix: &str, repository: &str, generation: &str) -> String {
    format!("{prefix}.{repository}.{generation}")
}

/// The generation id of `name` if it is a bitmap of this chain (`prefix` and
/// `repository`).
pub fn chain_generation<'a>(name: &'a str, prefix: &str, repository: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_prefix(repository))
        .and_then(|r| r.strip_prefix('.'))
        .filter(|g| crate::archive::is_generation_name(g))
}

/// Is `name` a bitmap of this chain (`prefix` and `repository`) and some generation?
pub fn in_chain(name: &str, prefix: &str, repository: &str) -> bool {
    chain_generation(name, prefix, repository).is_some()
}

/// What the coming run may do with the image's bitmaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Export this bitmap: it holds every write since the newest generation was read.
    Incremental(String),
    /// Read everything; the reason says why.
    Full(String),
}

/// Decide from the image's `bitmaps` whether the bitmap `expected` (the name the newest
/// generation of the disk must have recorded, `None` when there is no such generation)
/// can be trusted; `recorded` is what that generation recorded.
pub fn plan(bitmaps: &[BitmapInfo], expected: Option<&str>, recorded: Option<&str>) -> Plan {
    let Some(expected) = expected else {
        return Plan::Full("no earlier generation of this disk".into());
    };
    match recorded {
        None => return Plan::Full("the newest generation recorded no bitmap for this disk".into()),
        Some(r) if r != expected => {
            return Plan::Full(format!(
                "the newest generation recorded bitmap {r}, not this chain's {expected}"
            ))
        }
        Some(_) => {}
    }
    match bitmaps.iter().find(|b| b.name == expected) {
        None => Plan::Full(format!(
            "bitmap {expected} of the newest generation is not in the image (removed, or the image was replaced or rolled back to an older copy)"
        )),
        Some(b) if !b.consistent() => Plan::Full(format!(
            "bitmap {expected} was not saved cleanly (in-use)"
        )),
        Some(b) if !b.enabled() => Plan::Full(format!(
            "bitmap {expected} is disabled: it did not see every write"
        )),
        Some(_) => Plan::Incremental(expected.to_string()),
    }
}

/// Decide what this run may do ([`plan`]) and add its own bitmap `new` (enabled, with
/// `granularity` bytes per bit, or the cluster size), which tracks every write from now
/// on. Call under the VM's writer lock.
pub fn prepare(
    path: &Path,
    expected: Option<&str>,
    recorded: Option<&str>,
    new: &str,
    granularity: Option<u64>,
) -> Result<Plan> {
    let bitmaps = list(path)?;
    let plan = plan(&bitmaps, expected, recorded);
    if bitmaps.iter().any(|b| b.name == new) {
        // Generation ids are unique: no generation can need it.
        bitmap_op(path, "--remove", new)?;
    }
    add(path, new, granularity)?;
    Ok(plan)
}

/// After a successful generation that recorded `keep`: remove this chain's other
/// bitmaps (`prefix` and `repository`) whose generation `mine` accepts (the caller's: one
/// of this VM's generations, or a run's that never became a generation; not another VM's
/// of the same repository, nor a libvirt checkpoint's); nobody else's. Returns the names
/// removed.
pub fn commit(
    path: &Path,
    prefix: &str,
    repository: &str,
    keep: &str,
    mine: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for b in list(path)? {
        let ours = chain_generation(&b.name, prefix, repository).is_some_and(mine);
        if b.name != keep && ours {
            bitmap_op(path, "--remove", &b.name)?;
            removed.push(b.name);
        }
    }
    Ok(removed)
}

/// Remove bitmap `name` if the image has it.
pub fn remove(path: &Path, name: &str) -> Result<()> {
    if list(path)?.iter().any(|b| b.name == name) {
        bitmap_op(path, "--remove", name)?;
    }
    Ok(())
}

/// After a failed run: remove the bitmap `new` it added; keep every other.
pub fn abandon(path: &Path, new: &str) {
    let _ = bitmap_op(path, "--remove", new);
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEN: &str = "01a22a38-56ac-76fe-8306-b7344d45b0ff";

    fn bm(name: &str, flags: &[&str]) -> BitmapInfo {
        BitmapInfo {
            name: name.into(),
            granularity: 65536,
            flags: flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn chain_names() {
        let n = chain_name("vmkeep", "0123456789ab", GEN);
        assert_eq!(n, format!("vmkeep.0123456789ab.{GEN}"));
        assert!(in_chain(&n, "vmkeep", "0123456789ab"));
        assert!(!in_chain(&n, "vmkeep", "0123456789ac"));
        assert!(!in_chain(&n, "vmk", "0123456789ab"));
        assert!(!in_chain("vmkeep", "vmkeep", "0123456789ab"));
        assert!(!in_chain("vmkeep.0123456789ab.x", "vmkeep", "0123456789ab"));
        assert!(!in_chain(&format!("{n}x"), "vmkeep", "0123456789ab"));
    }

    #[test]
    fn only_the_recorded_enabled_consistent_bitmap_is_trusted() {
        let e = "p.r.g";
        let good = [bm(e, &["auto"])];
        assert_eq!(plan(&good, Some(e), Some(e)), Plan::Incremental(e.into()));
        let full = |p: Plan| matches!(p, Plan::Full(_));
        assert!(full(plan(&good, None, None)));
        assert!(full(plan(&good, Some(e), None)));
        assert!(full(plan(&good, Some(e), Some("p"))));
        assert!(full(plan(&[bm("p.r.h", &["auto"])], Some(e), Some(e))));
        assert!(full(plan(&[bm(e, &[])], Some(e), Some(e))));
        assert!(full(plan(&[bm(e, &["auto", "in-use"])], Some(e), Some(e))));
    }
}
