//! The bitmap life cycle of one backup run around qcow2 images read as
//! `PATH?bitmap=PREFIX` (the rules are in [`super::bitmap`]): under the VM lock each image
//! gets this run's bitmap ([`BitmapRun::open`]), and after the run they are all committed
//! ([`BitmapRun::commit`]) or abandoned ([`BitmapRun::abandon`]) while the lock is still
//! held, so that two runs never interleave their bitmap steps.

use std::collections::HashSet;
use std::path::PathBuf;

use super::{bitmap, qemu, BlockSource, SourceIdentity};
use crate::archive::{GenerationId, Repository};
use crate::error::Result;
use crate::progress::Progress;

/// A qcow2 image whose persistent bitmaps the run manages: checked before the VM lock
/// (see [`super::open::open_disk_source`]), its bitmaps handled under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedImage {
    /// The image file.
    pub path: PathBuf,
    /// The bitmaps' prefix (`?bitmap=PREFIX`).
    pub prefix: String,
}

/// The newest generation's view of a disk: its id, and the bitmap its record of the disk
/// names (if any).
#[derive(Debug, Clone, Copy)]
pub struct Newest<'a> {
    /// The generation id.
    pub id: &'a str,
    /// `DiskRecord::bitmap` of the disk in that generation.
    pub recorded: Option<&'a str>,
}

/// A tracked image opened for the run, with what its bitmaps allow.
pub struct Tracked {
    /// The image, exporting the trusted bitmap if there is one.
    pub source: Box<dyn BlockSource>,
    /// What the image is (taken before the bitmap was added: the file it was added to).
    pub identity: SourceIdentity,
    /// This run's bitmap, recorded with the generation.
    pub bitmap: String,
    /// Byte ranges written since the newest generation, when its bitmap is trusted.
    pub changed: Option<Vec<(u64, u64)>>,
    /// Why the image must be read whole, when its bitmaps cannot be trusted.
    pub untracked_reason: Option<String>,
}

/// A bitmap this run added: committed or abandoned at the end of the run.
struct Prepared {
    path: PathBuf,
    prefix: String,
    new: String,
    /// This repository's bitmap of the newest generation under an earlier prefix.
    retired: Option<String>,
}

/// The bitmaps one run added, committed or abandoned together (call every method under
/// the VM's writer lock).
#[derive(Default)]
pub struct BitmapRun {
    added: Vec<Prepared>,
}

impl BitmapRun {
    /// No bitmaps yet.
    pub fn new() -> BitmapRun {
        BitmapRun::default()
    }

    /// Under the VM lock: decide whether the image's bitmap of the newest generation
    /// (`newest`, when that generation has the disk) can be trusted, add this run's
    /// (`PREFIX.<repository id>.<generation id>`, remembered here so that it is abandoned
    /// if anything fails from now on), and open the image, exporting the trusted bitmap if
    /// there is one (see [`super::bitmap`]).
    pub fn open(
        &mut self,
        image: &TrackedImage,
        repository: &str,
        newest: Option<Newest<'_>>,
        generation: &str,
        granularity: Option<u64>,
    ) -> Result<Tracked> {
        let (path, prefix) = (image.path.as_path(), image.prefix.as_str());
        let expected = newest.map(|n| bitmap::chain_name(prefix, repository, n.id));
        let recorded = newest.and_then(|n| n.recorded);
        let new = bitmap::chain_name(prefix, repository, generation);
        // The identity is taken before the bitmap is added: the file the bitmap is added to.
        let identity = SourceIdentity::of_path(path);
        let plan = bitmap::prepare(path, expected.as_deref(), recorded, &new, granularity)?;
        // A bitmap the newest generation recorded under another prefix (`?bitmap=` changed)
        // is still provably this repository's: it goes after success too.
        let newest_suffix = newest.map(|n| format!(".{repository}.{}", n.id));
        let retired = recorded
            .filter(|r| Some(*r) != expected.as_deref())
            .filter(|r| newest_suffix.as_deref().is_some_and(|s| r.ends_with(s)))
            .map(str::to_string);
        self.added.push(Prepared {
            path: path.to_path_buf(),
            prefix: prefix.to_string(),
            new: new.clone(),
            retired,
        });
        let from = match &plan {
            bitmap::Plan::Incremental(b) => Some(b.as_str()),
            bitmap::Plan::Full(_) => None,
        };
        let source = qemu::open_image(path, "qcow2", from)?;
        let (changed, untracked_reason) = match plan {
            bitmap::Plan::Incremental(_) => (source.changed_extents()?, None),
            bitmap::Plan::Full(why) => (None, Some(why)),
        };
        Ok(Tracked {
            source,
            identity,
            bitmap: new,
            changed,
            untracked_reason,
        })
    }

    /// Whether no bitmap was added.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
    }

    /// After a failed run: remove the bitmaps this run added; keep every other. The
    /// images' qemu-nbd servers (shared locks) must be stopped first: removing a bitmap
    /// needs the image's write lock.
    pub fn abandon(&self) {
        for b in &self.added {
            bitmap::abandon(&b.path, &b.new);
        }
    }

    /// After a successful generation of `vm`: remove this chain's older bitmaps of this
    /// VM (see [`bitmap::commit`]); a step that fails is a warning (the bitmaps cost QEMU
    /// a little on every write, and the next run tries again).
    pub fn commit(&self, repo: &Repository, vm: &str, progress: &dyn Progress) {
        let owned = match self.added.is_empty() {
            true => None,
            false => Generations::of(repo, vm),
        };
        for b in &self.added {
            let mine = |g: &str| owned.as_ref().is_some_and(|o| o.is_mine(g));
            let done = bitmap::commit(&b.path, &b.prefix, &repo.profile.id, &b.new, &mine)
                .and_then(|_| match &b.retired {
                    Some(r) => bitmap::remove(&b.path, r),
                    None => Ok(()),
                });
            if let Err(e) = done {
                let msg = format!(
                    "{vm}: older bitmaps of {} not removed ({e}); they cost QEMU a little on every write",
                    b.path.display()
                );
                progress.warn(&msg);
            }
        }
    }
}

/// Which generation ids are whose: a chain bitmap of this repository may be removed by a
/// run of this VM only for one of this VM's generations, or for an id that is no
/// generation at all (a run that failed or was killed).
struct Generations {
    this: HashSet<GenerationId>,
    others: HashSet<GenerationId>,
}

impl Generations {
    /// `None` when the repository cannot be listed: then nothing is removed.
    fn of(repo: &Repository, vm: &str) -> Option<Generations> {
        let mut g = Generations {
            this: repo
                .vm(vm)
                .ok()?
                .generation_ids()
                .ok()?
                .into_iter()
                .collect(),
            others: Default::default(),
        };
        for name in repo.vm_names().ok()?.iter().filter(|n| *n != vm) {
            if let Ok(a) = repo.vm(name) {
                g.others.extend(a.generation_ids().ok()?);
            }
        }
        Some(g)
    }

    fn is_mine(&self, id: &str) -> bool {
        self.this.contains(id) || !self.others.contains(id)
    }
}
