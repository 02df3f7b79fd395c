//! The backing chain of a disk image and a checkpoint's bitmaps across it: what an
//! external snapshot (`virsh snapshot-create-as --disk-only`) leaves behind.
//!
//! When libvirt puts a new overlay on top of a disk it re-creates the checkpoints' active
//! bitmaps in the overlay; the writes made since a checkpoint are then split between the
//! layers: those before the snapshot in the lower image's bitmap, those after it in the
//! overlay's. Only the union of the bitmaps of every layer since the checkpoint holds them
//! all; the top's alone misses the writes made before the snapshot.
//!
//! The rules (libvirt's for a valid bitmap chain, `docs/kbase/incrementalbackupinternals`):
//! the top image holds the bitmap; the layers below that hold it too are contiguous with
//! it (no layer without it in between); every one of them is enabled (`auto`: it saw every
//! write while it was the top) and consistent (not `in-use`: saved cleanly). vmkeep adds
//! one more where it reads the files itself: the image the newest generation read must be
//! one of those layers (see [`crate::engine::backup::DiskInput::earlier_origins`]), since
//! the checkpoint was made while it was the top.

use std::path::{Path, PathBuf};

use super::bitmap::{self, BitmapInfo};
use super::{qemu, BlockSource};
use crate::error::{Error, Result};

/// The most layers of a backing chain vmkeep follows (QEMU itself refuses deeper ones).
const MAX_LAYERS: usize = 1000;

/// One image of a backing chain as `qemu-img info --backing-chain` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The image file (a backing file's path as QEMU resolved it).
    pub path: PathBuf,
    /// Its format ("qcow2", "raw"…).
    pub format: String,
    /// Its own persistent bitmaps (qcow2 only), not those of the layers below.
    pub bitmaps: Vec<BitmapInfo>,
}

impl Layer {
    /// Its bitmap `name`, if it holds one.
    pub fn bitmap(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// The backing chain of the image `path` in `format`, top first (read with shared locks,
/// so a running VM may hold it).
pub fn layers(path: &Path, format: &str) -> Result<Vec<Layer>> {
    let value = bitmap::info_chain(path, format)?;
    let bad = |what: &str| {
        Error::source(
            path.display(),
            format!("qemu-img info --backing-chain: {what}"),
        )
    };
    let list = value
        .as_array()
        .ok_or_else(|| bad("not a list of images"))?;
    if list.is_empty() || list.len() > MAX_LAYERS {
        return Err(bad(&format!("{} images", list.len())));
    }
    list.iter()
        .map(|image| {
            let field = |k: &str| image.get(k).and_then(|v| v.as_str());
            match (field("filename"), field("format")) {
                (Some(file), Some(format)) => Ok(Layer {
                    path: PathBuf::from(file),
                    format: format.to_string(),
                    bitmaps: bitmap::parse_bitmaps(image),
                }),
                _ => Err(bad("an image without a file name or format")),
            }
        })
        .collect()
}

/// Which layers of a chain hold every write since checkpoint bitmap `name` was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// The top `n` layers (`n` ≥ 1) hold the bitmap, enabled and consistent, and no layer
    /// below them does: the union of their bitmaps is every write since the checkpoint.
    Layers(usize),
    /// The bitmaps cannot be trusted; the reason says why.
    Untracked(String),
}

/// Decide from a chain's `layers` (top first) whether bitmap `name` covers every write
/// since it was made, by the rules in the module documentation.
pub fn coverage(layers: &[Layer], name: &str) -> Coverage {
    let Some(top) = layers.first() else {
        return Coverage::Untracked("the image has no layers".into());
    };
    if top.bitmap(name).is_none() {
        return Coverage::Untracked(format!(
            "bitmap {name} is not in {}, the top of its backing chain (an overlay made outside libvirt, or the bitmap was removed)",
            top.path.display()
        ));
    }
    let held = layers
        .iter()
        .take_while(|l| l.bitmap(name).is_some())
        .count();
    if let Some(lower) = layers[held..].iter().find(|l| l.bitmap(name).is_some()) {
        return Coverage::Untracked(format!(
            "bitmap {name} is in {} but not in {} above it: the writes while that layer was the top are in no bitmap",
            lower.path.display(),
            layers[held].path.display()
        ));
    }
    for layer in &layers[..held] {
        let b = layer.bitmap(name).expect("held");
        if !b.consistent() {
            return Coverage::Untracked(format!(
                "bitmap {name} in {} was not saved cleanly (in-use)",
                layer.path.display()
            ));
        }
        if !b.enabled() {
            return Coverage::Untracked(format!(
                "bitmap {name} in {} is disabled: it did not see every write",
                layer.path.display()
            ));
        }
    }
    Coverage::Layers(held)
}

/// The layers below the top that, contiguous with it, hold bitmap `name` enabled and
/// consistent: those a running VM's backup job merges with the top's (libvirt checks the
/// top's itself; its stored copy is not current while QEMU runs).
pub fn holding_below_top<'a>(layers: &'a [Layer], name: &str) -> &'a [Layer] {
    let below = layers.get(1..).unwrap_or_default();
    let n = below
        .iter()
        .take_while(|l| {
            l.bitmap(name)
                .is_some_and(|b| b.consistent() && b.enabled())
        })
        .count();
    &below[..n]
}

/// What an image read from its files (a shut-off VM's disk) tells of the writes since
/// checkpoint bitmap `bitmap` was made: its backing chain's [`coverage`]. The top's bitmap
/// is exported with the image itself; each layer below that holds it too is read through
/// a qemu-nbd of its own, and the changes are the union of all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainTracking {
    /// The bitmap to export with the top image, when the chain's bitmaps can be trusted.
    bitmap: Option<String>,
    /// The layers below the top that hold it too, top first.
    lower: Vec<Layer>,
    /// Why the chain's bitmaps cannot be trusted, when the chain says why.
    pub reason: Option<String>,
}

impl ChainTracking {
    /// The tracking of the image `path` in `format` since `checkpoint` (none: not
    /// tracked; a format other than qcow2 carries no bitmap).
    pub fn of(path: &Path, format: &str, checkpoint: Option<&str>) -> ChainTracking {
        let untracked = |reason| ChainTracking {
            bitmap: None,
            lower: Vec::new(),
            reason,
        };
        let Some(cp) = checkpoint.filter(|_| format == "qcow2") else {
            return untracked(None);
        };
        let layers = match layers(path, format) {
            Ok(layers) => layers,
            Err(e) => {
                return untracked(Some(format!(
                    "its backing chain cannot be read ({})",
                    e.detail()
                )))
            }
        };
        match coverage(&layers, cp) {
            Coverage::Layers(n) => ChainTracking {
                bitmap: Some(cp.to_string()),
                lower: layers[1..n].to_vec(),
                reason: None,
            },
            Coverage::Untracked(why) => untracked(Some(why)),
        }
    }

    /// The bitmap to export with the top image, if any.
    pub fn bitmap(&self) -> Option<&str> {
        self.bitmap.as_deref()
    }

    /// Every write since the checkpoint: the changes `top` (the top image, opened
    /// exporting [`ChainTracking::bitmap`]) reports, with those of the layers below.
    /// `None` when not tracked.
    pub fn changes(&self, top: &dyn BlockSource) -> Result<Option<Vec<(u64, u64)>>> {
        let Some(cp) = self.bitmap.as_deref() else {
            return Ok(None);
        };
        let Some(first) = top.changed_extents()? else {
            return Ok(None);
        };
        let mut lists = vec![first];
        for layer in &self.lower {
            let source = qemu::open_image(&layer.path, &layer.format, Some(cp))?;
            match source.changed_extents()? {
                Some(list) => lists.push(list),
                None => return Ok(None),
            }
        }
        Ok(Some(union(&lists)))
    }

    /// The layers below the top whose bitmaps [`ChainTracking::changes`] merges, as the
    /// engine compares them with the newest generation's origin.
    pub fn earlier_origins(&self) -> Vec<String> {
        origins(&self.lower)
    }
}

/// The layers below the top of the image `path` (in `format`, a running VM's disk) that a
/// backup job from `checkpoint` merged the bitmaps of ([`holding_below_top`]), as the
/// engine compares them with the newest generation's origin; none when the chain cannot
/// be read.
pub fn merged_below(path: &Path, format: &str, checkpoint: &str) -> Vec<String> {
    match layers(path, format) {
        Ok(layers) => origins(holding_below_top(&layers, checkpoint)),
        Err(e) => {
            tracing::debug!("{}: backing chain not read: {e}", path.display());
            Vec::new()
        }
    }
}

/// The paths of `layers`, as origins are recorded.
fn origins(layers: &[Layer]) -> Vec<String> {
    layers
        .iter()
        .map(|l| l.path.display().to_string())
        .collect()
}

/// The union of byte-range lists (offset, length): sorted, overlapping and touching
/// ranges merged.
pub fn union(lists: &[Vec<(u64, u64)>]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = lists
        .iter()
        .flatten()
        .filter(|&&(_, len)| len > 0)
        .map(|&(off, len)| (off, off.saturating_add(len)))
        .collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (a, b) in all {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out.into_iter().map(|(a, b)| (a, b - a)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(path: &str, bitmaps: &[(&str, &[&str])]) -> Layer {
        Layer {
            path: PathBuf::from(path),
            format: "qcow2".into(),
            bitmaps: bitmaps
                .iter()
                .map(|(name, flags)| BitmapInfo {
                    name: name.to_string(),
                    granularity: 65536,
                    flags: flags.iter().map(|f| f.to_string()).collect(),
                })
                .collect(),
        }
    }

    const CP: &str = "vmkeep.r.g";
    const OK: &[(&str, &[&str])] = &[(CP, &["auto"])];

    #[test]
    fn a_contiguous_enabled_consistent_chain_is_covered() {
        assert_eq!(coverage(&[layer("/t", OK)], CP), Coverage::Layers(1));
        let chain = [layer("/t", OK), layer("/m", OK), layer("/b", &[])];
        assert_eq!(coverage(&chain, CP), Coverage::Layers(2));
        assert_eq!(holding_below_top(&chain, CP), &chain[1..2]);
        let all = [layer("/t", OK), layer("/m", OK), layer("/b", OK)];
        assert_eq!(coverage(&all, CP), Coverage::Layers(3));
    }

    #[test]
    fn a_missing_top_a_gap_or_a_bad_bitmap_is_untracked() {
        let untracked = |chain: &[Layer], says: &str| match coverage(chain, CP) {
            Coverage::Untracked(why) => assert!(why.contains(says), "{why}"),
            c => panic!("{c:?} for {chain:?}"),
        };
        // An overlay made outside libvirt: the base's bitmap stopped seeing writes.
        untracked(&[layer("/t", &[]), layer("/b", OK)], "not in /t");
        // A layer without it between two with it.
        untracked(
            &[layer("/t", OK), layer("/m", &[]), layer("/b", OK)],
            "in /b but not in /m",
        );
        untracked(
            &[layer("/t", OK), layer("/b", &[(CP, &["auto", "in-use"])])],
            "/b was not saved cleanly",
        );
        untracked(
            &[layer("/t", &[(CP, &[])]), layer("/b", OK)],
            "/t is disabled",
        );
        untracked(&[], "no layers");
        // Another bitmap of the same layers is no stand-in.
        untracked(&[layer("/t", &[("other", &["auto"])])], "not in /t");
    }

    #[test]
    fn below_the_top_only_contiguous_good_layers_hold() {
        let chain = [
            layer("/t", &[]),
            layer("/m", OK),
            layer("/x", &[(CP, &["auto", "in-use"])]),
            layer("/b", OK),
        ];
        assert_eq!(holding_below_top(&chain, CP), &chain[1..2]);
        let gap = [layer("/t", OK), layer("/m", &[]), layer("/b", OK)];
        assert!(holding_below_top(&gap, CP).is_empty());
        assert!(holding_below_top(&gap[..1], CP).is_empty());
    }

    /// Run `qemu-img` (or `qemu-io`) with `args`, requiring success.
    fn run(program: &str, args: &[&std::ffi::OsStr]) {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .expect("qemu-utils is installed");
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
    }

    /// 64 KiB written at `at` into the qcow2 image `image` (its enabled bitmaps see it).
    fn write(image: &Path, at: &str) {
        let op = format!("write -P 0x5a {at} 64k");
        run(
            "qemu-io",
            &[
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-c".as_ref(),
                op.as_ref(),
                image.as_ref(),
            ],
        );
    }

    /// Add enabled bitmap `name` to `image`.
    fn add_bitmap(image: &Path, name: &str) {
        run(
            "qemu-img",
            &[
                "bitmap".as_ref(),
                "--add".as_ref(),
                "--enable".as_ref(),
                image.as_ref(),
                name.as_ref(),
            ],
        );
    }

    /// A new qcow2 overlay `top` over `base`.
    fn overlay(base: &Path, top: &Path) {
        let b = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"];
        let mut args: Vec<&std::ffi::OsStr> = b.iter().map(|a| a.as_ref()).collect();
        args.extend([base.as_os_str(), top.as_os_str()]);
        run("qemu-img", &args);
    }

    /// A real chain on files: the changes are the union of both layers' bitmaps (the
    /// top's alone misses the write before the overlay); the base counts only while it
    /// holds the bitmap; an overlay without it is untracked.
    #[test]
    fn a_real_chain_is_tracked_by_the_union_of_its_layers() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        run(
            "qemu-img",
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                base.as_ref(),
                "16M".as_ref(),
            ],
        );
        write(&base, "0");
        add_bitmap(&base, CP);
        write(&base, "1M");
        write(&base, "2M");
        overlay(&base, &top);
        add_bitmap(&top, CP);
        write(&top, "2M");
        write(&top, "3M");

        let layers = layers(&top, "qcow2").unwrap();
        let paths: Vec<_> = layers.iter().map(|l| l.path.clone()).collect();
        assert_eq!(paths, [top.clone(), base.clone()]);
        assert_eq!(coverage(&layers, CP), Coverage::Layers(2));
        let tracking = ChainTracking::of(&top, "qcow2", Some(CP));
        assert_eq!(tracking.bitmap(), Some(CP));
        assert_eq!(tracking.earlier_origins(), [base.display().to_string()]);
        let source = qemu::open_image(&top, "qcow2", tracking.bitmap()).unwrap();
        assert_eq!(
            source.changed_extents().unwrap(),
            Some(vec![(2 << 20, 65536), (3 << 20, 65536)]),
            "the top's bitmap alone misses the write before the overlay"
        );
        let changes = tracking.changes(source.as_ref()).unwrap();
        assert_eq!(
            changes,
            Some(vec![(1 << 20, 65536), (2 << 20, 65536), (3 << 20, 65536)])
        );
        drop(source);
        // Not a qcow2 disk, or no checkpoint: untracked, with no reason of the chain's.
        assert_eq!(ChainTracking::of(&top, "raw", Some(CP)).bitmap(), None);
        assert_eq!(ChainTracking::of(&top, "qcow2", None).reason, None);

        // The base's bitmap removed: only the top counts, the base is no earlier origin.
        run(
            "qemu-img",
            &[
                "bitmap".as_ref(),
                "--remove".as_ref(),
                base.as_ref(),
                CP.as_ref(),
            ],
        );
        let tracking = ChainTracking::of(&top, "qcow2", Some(CP));
        assert_eq!(tracking.bitmap(), Some(CP));
        assert!(tracking.earlier_origins().is_empty());
        assert!(merged_below(&top, "qcow2", CP).is_empty());

        // An overlay without the bitmap over both: untracked, saying why.
        let outside = dir.path().join("outside.qcow2");
        overlay(&top, &outside);
        let tracking = ChainTracking::of(&outside, "qcow2", Some(CP));
        assert_eq!(tracking.bitmap(), None);
        let why = tracking.reason.unwrap();
        assert!(
            why.contains("is not in") && why.contains("outside.qcow2"),
            "{why}"
        );
        // A chain that cannot be read is untracked too.
        let gone = ChainTracking::of(&dir.path().join("gone.qcow2"), "qcow2", Some(CP));
        assert!(gone.reason.unwrap().contains("cannot be read"));
    }

    #[test]
    fn union_sorts_and_merges() {
        let u = union(&[
            vec![(4 << 20, 65536), (0, 10)],
            vec![(10, 5), (4 << 20, 131072), (1 << 20, 0)],
            vec![],
        ]);
        assert_eq!(u, vec![(0, 15), (4 << 20, 131072)]);
        assert_eq!(union(&[vec![(u64::MAX - 1, 10)]]), vec![(u64::MAX - 1, 1)]);
    }
}
