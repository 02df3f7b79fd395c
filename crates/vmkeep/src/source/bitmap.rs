//! The life cycle of a persistent qcow2 bitmap used for incremental backups of an image
//! file (`PATH?bitmap=NAME`).
//!
//! - A run may be incremental only when the bitmap exists, is consistent (QEMU clears the
//!   `in-use` flag when it closes the image cleanly), and the newest generation of the disk
//!   recorded the same bitmap: then the bitmap holds every write since that generation
//!   was read.
//! - Before the read, a second bitmap `NAME-next` is added: it tracks every write from
//!   then on, for the run after this one.
//! - After a successful generation, `NAME` is replaced by `NAME-next` (`NAME` cleared and
//!   merged from `NAME-next` in one `qemu-img` run, then `NAME-next` removed), so the next
//!   run sees only writes made since this run began reading. A write made at any moment
//!   lands in `NAME-next`, so none is missed.
//! - A failed run removes `NAME-next` and leaves `NAME` as it was: it only ever
//!   accumulates. If a step cannot run (a VM holds the image's lock), the bitmaps are left
//!   as they are: the next run reads more than it must, or all of it, never less.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// A persistent bitmap as `qemu-img info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// Flags such as `auto` (enabled) and `in-use` (not saved cleanly: untrustworthy).
    pub flags: Vec<String>,
}

impl BitmapInfo {
    pub fn consistent(&self) -> bool {
        !self.flags.iter().any(|f| f == "in-use")
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

/// The persistent bitmaps of a qcow2 image.
pub fn list(path: &Path) -> Result<Vec<BitmapInfo>> {
    let v = info(path, None)?;
    let bitmaps = v
        .pointer("/format-specific/data/bitmaps")
        .and_then(|b| b.as_array())
        .cloned()
        .unwrap_or_default();
    Ok(bitmaps
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
        .collect())
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

/// What the coming run may do with the bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Export the bitmap: it holds every write since the newest generation.
    Incremental,
    /// Read everything; the reason says why.
    Full(String),
}

/// The bitmap that tracks writes for the run after this one.
pub fn next_name(name: &str) -> String {
    format!("{name}-next")
}

/// Decide what this run may do, and start `NAME-next`. `recorded` is the bitmap the newest
/// generation of this disk recorded (if any).
pub fn prepare(
    path: &Path,
    name: &str,
    recorded: Option<&str>,
    granularity: Option<u64>,
) -> Result<Plan> {
    let bitmaps = list(path)?;
    let next = next_name(name);
    if bitmaps.iter().any(|b| b.name == next) {
        bitmap_op(path, "--remove", &next)?; // left by a run that died
    }
    let plan = match bitmaps.iter().find(|b| b.name == name) {
        None => Plan::Full(format!("bitmap {name} does not exist yet")),
        Some(b) if !b.consistent() => {
            bitmap_op(path, "--remove", name)?;
            Plan::Full(format!("bitmap {name} was not saved cleanly (in-use)"))
        }
        Some(_) if recorded != Some(name) => Plan::Full(format!(
            "the newest generation did not record bitmap {name}"
        )),
        Some(_) => Plan::Incremental,
    };
    add(path, &next, granularity)?;
    Ok(plan)
}

/// After a successful generation: `NAME` becomes what `NAME-next` tracked.
///
/// After listing the bitmaps, two `qemu-img` runs: `NAME` is cleared (or, when it does
/// not exist or has another granularity than `NAME-next`, added), enabled and given
/// `NAME-next`'s bits in one run (the operations apply in order to the one image they
/// open), then `NAME-next` goes. A crash in between leaves `NAME` either as it was, or
/// missing or marked in-use (the next run reads everything), or complete with
/// `NAME-next` still there (the next run removes it).
pub fn commit(path: &Path, name: &str) -> Result<()> {
    let next = next_name(name);
    let bitmaps = list(path)?;
    let granularity = |n: &str| {
        bitmaps
            .iter()
            .find(|b| b.name == n)
            .map(|b| b.granularity)
            .filter(|&g| g > 0)
    };
    let g = granularity(&next);
    // `NAME` keeps its granularity when cleared: one of another granularity (the
    // configured one changed) is removed and added afresh.
    let reuse = match granularity(name) {
        Some(old) => {
            g.is_none() || g == Some(old) || {
                bitmap_op(path, "--remove", name)?;
                false
            }
        }
        None => false,
    };
    let gs = g.map(|g| g.to_string());
    let mut before = vec!["bitmap"];
    if reuse {
        before.push("--clear");
    } else {
        before.push("--add");
        if let Some(gs) = &gs {
            before.extend(["-g", gs.as_str()]);
        }
    }
    before.extend(["--enable", "--merge", &next]);
    qemu_img(path, &before, &[name])?;
    bitmap_op(path, "--remove", &next)
}

/// After a failed run: drop `NAME-next`, keep `NAME`.
pub fn abandon(path: &Path, name: &str) {
    let _ = bitmap_op(path, "--remove", &next_name(name));
}
