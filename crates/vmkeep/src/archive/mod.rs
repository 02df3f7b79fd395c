//! The archive: a repository of VMs, each a folder of generations.
//!
//! ```text
//! REPO/repo.toml                 repository identity
//! REPO/allvm.toml                hypervisor inventory (`update`)
//! REPO/VM/vm.toml                block size, health
//! REPO/VM/lock                   writer lock (flock)
//! REPO/VM/txn.toml               present only while a change is in flight
//! REPO/VM/pins/PID-GEN           generations held by readers (`serve`); prune skips them
//! REPO/VM/latest -> GEN          newest generation
//! REPO/VM/GEN/generation.toml    what the run made
//! REPO/VM/GEN/DISK.raw|.digest   newest generation only
//! REPO/VM/GEN/DISK.rdiff         older generations only
//! ```
//! See `docs/FORMAT.md` for every byte.

pub mod digest;
pub mod format;
mod id;
pub mod lock;
pub mod names;
pub mod pin;
pub mod profile;
pub mod rdiff;
pub mod retention;
pub mod state;
pub mod txn;
pub mod view;

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
pub use id::GenerationId;
use profile::{GenerationProfile, RepoProfile, VmProfile, PROFILE_VERSION};

/// A repository folder.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
    /// The repository's `repo.toml`, as [`open`](Self::open) read it or
    /// [`init`](Self::init) wrote it.
    pub profile: RepoProfile,
}

impl Repository {
    /// Create a repository at `root`, or open the one that is there.
    pub fn init(root: &Path) -> Result<Repository> {
        let marker = root.join(names::REPO_PROFILE);
        if marker.exists() {
            return Repository::open(root);
        }
        if root.exists() {
            let non_empty = std::fs::read_dir(root).at(root)?.next().is_some();
            if non_empty {
                return Err(Error::usage(format!(
                    "{} is not empty and not a vmkeep repository; refusing to init there",
                    root.display()
                )));
            }
        } else {
            std::fs::create_dir_all(fsutil::parent(root)).at(root)?;
        }
        fsutil::create_dir(root)?;
        let profile = RepoProfile {
            format: PROFILE_VERSION,
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            created: profile::now_rfc3339(),
        };
        profile::store(&marker, "vmkeep repository", &profile)?;
        Ok(Repository {
            root: root.to_path_buf(),
            profile,
        })
    }

    /// Open an existing repository.
    pub fn open(root: &Path) -> Result<Repository> {
        let marker = root.join(names::REPO_PROFILE);
        if !marker.exists() {
            return Err(Error::usage(format!(
                "{} is not a vmkeep repository (run 'vmkeep --repo {} init')",
                root.display(),
                root.display()
            )));
        }
        let profile = profile::load(&marker)?;
        Ok(Repository {
            root: root.to_path_buf(),
            profile,
        })
    }

    /// The repository folder, as given to [`init`](Self::init) or [`open`](Self::open).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `REPO/allvm.toml`: the hypervisor inventory `update` writes.
    pub fn inventory_path(&self) -> PathBuf {
        self.root.join(names::INVENTORY)
    }

    /// Names of the VMs that have at least a VM profile, sorted.
    pub fn vm_names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.root).at(&self.root)? {
            let entry = entry.at(&self.root)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if names::check_vm(&name).is_ok() && names::vm_profile(&entry.path()).exists() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The folder of VM `name` (which may not exist yet). A VM folder that is a symbolic
    /// link is refused: everything vmkeep writes, truncates and deletes under it would land
    /// wherever the link points.
    pub fn vm_dir(&self, name: &str) -> Result<PathBuf> {
        names::check_vm(name)?;
        let dir = self.root.join(name);
        fsutil::refuse_symlink(&dir)?;
        Ok(dir)
    }

    /// Open the archive of VM `name`; an unknown VM is a usage error.
    pub fn vm(&self, name: &str) -> Result<VmArchive> {
        let dir = self.vm_dir(name)?;
        if !names::vm_profile(&dir).exists() {
            return Err(Error::usage(format!(
                "unknown VM {name:?}: no backups of it in {}",
                self.root.display()
            )));
        }
        VmArchive::open(dir, name)
    }
}

/// One VM's folder.
#[derive(Debug, Clone)]
pub struct VmArchive {
    /// The VM folder `REPO/VM`.
    pub dir: PathBuf,
    /// The VM's name, also its folder's name.
    pub name: String,
    /// The VM's `vm.toml` as loaded (block size, last check); [`save_profile`](Self::save_profile)
    /// writes it back.
    pub profile: VmProfile,
}

/// One generation, as listed from its folder.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generation id, also its folder's name.
    pub id: GenerationId,
    /// The generation folder `REPO/VM/GEN`.
    pub dir: PathBuf,
    /// The generation's `generation.toml`, checked: it names this id, a valid block size,
    /// distinct valid disk names and possible disk sizes.
    pub profile: GenerationProfile,
}

impl Generation {
    /// `DISK.raw`: the image of `disk` (newest generation only).
    pub fn image_path(&self, disk: &str) -> PathBuf {
        names::image_file(&self.dir, disk)
    }
    /// `DISK.digest`: the digests of `disk` (newest generation only).
    pub fn digest_path(&self, disk: &str) -> PathBuf {
        names::digest_file(&self.dir, disk)
    }
    /// `DISK.rdiff`: the reverse diff of `disk` (older generations only).
    pub fn rdiff_path(&self, disk: &str) -> PathBuf {
        names::rdiff_file(&self.dir, disk)
    }
    /// `DISK.rdiff.partial`: the reverse diff of `disk` being written, the undo journal of
    /// a running backup.
    pub fn journal_path(&self, disk: &str) -> PathBuf {
        names::journal_file(&self.dir, disk)
    }
    /// `DISK.rdiff.merge`: the merged reverse diff of `disk` a prune writes.
    pub fn merge_path(&self, disk: &str) -> PathBuf {
        names::merge_file(&self.dir, disk)
    }
    /// `generation.toml`: what the run made.
    pub fn profile_path(&self) -> PathBuf {
        names::generation_profile(&self.dir)
    }
    /// `domain.xml`: the libvirt domain XML saved with the generation, if it has one.
    pub fn domain_xml_path(&self) -> PathBuf {
        self.dir.join(names::DOMAIN_XML)
    }
    /// `checkpoint.xml`: the libvirt checkpoint made with the generation, as libvirt
    /// described it (without its `<domain>`), if it has one.
    pub fn checkpoint_xml_path(&self) -> PathBuf {
        self.dir.join(names::CHECKPOINT_XML)
    }
}

/// Is `name` a generation folder name (a UUID)?
pub fn is_generation_name(name: &str) -> bool {
    GenerationId::is_valid(name)
}

/// A new generation id that sorts after `after` (UUIDv7: time first, then random).
pub fn new_generation_id(after: Option<&GenerationId>) -> GenerationId {
    GenerationId::new_after(after)
}

/// The 16 bytes of a generation id, as stored in file headers. Only a valid id has them:
/// there is no fallback for a string that is not one.
pub fn generation_bytes(id: &GenerationId) -> [u8; 16] {
    id.bytes()
}

impl VmArchive {
    /// Open the VM folder `dir` of VM `name`: a folder that is a symbolic link is refused, and
    /// its `vm.toml` must load, name `name` and hold a valid block size, else the archive is
    /// corrupt.
    pub fn open(dir: PathBuf, name: &str) -> Result<VmArchive> {
        fsutil::refuse_symlink(&dir)?;
        let path = names::vm_profile(&dir);
        let profile: VmProfile = profile::load(&path)?;
        if profile.name != name {
            return Err(Error::corrupt(
                &path,
                format!("profile names VM {:?}", profile.name),
            ));
        }
        format::check_block_size(&path, profile.block_size)?;
        Ok(VmArchive {
            dir,
            name: name.to_string(),
            profile,
        })
    }

    /// `vm.toml`: the VM profile.
    pub fn profile_path(&self) -> PathBuf {
        names::vm_profile(&self.dir)
    }

    /// Write [`profile`](Self::profile) back to `vm.toml` atomically (beside, fsync, rename,
    /// fsync the folder).
    pub fn save_profile(&self) -> Result<()> {
        profile::store(&self.profile_path(), "vmkeep VM profile", &self.profile)
    }

    /// Ids of the finished generations, oldest first (see [`VmArchive::generation_ids_in`]).
    pub fn generation_ids(&self) -> Result<Vec<GenerationId>> {
        Self::generation_ids_in(&self.dir)
    }

    /// Ids of the finished generations in the VM folder `dir`, oldest first (for readers
    /// that hold no archive). A generation folder that is a symbolic link (to another VM's
    /// generation, say) is refused: its files would be read as this VM's, and pruning or
    /// recovery would change them.
    pub fn generation_ids_in(dir: &Path) -> Result<Vec<GenerationId>> {
        fsutil::refuse_symlink(dir)?;
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir).at(dir)? {
            let entry = entry.at(dir)?;
            if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                // `DirEntry::file_type` does not follow a symbolic link.
                let ft = entry.file_type().at(entry.path())?;
                if ft.is_symlink() {
                    return Err(fsutil::symlink_refused(&entry.path()));
                }
                if ft.is_dir() {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Load generation `id`; a string that is not a generation id is refused before it
    /// becomes a path.
    pub fn generation(&self, id: &str) -> Result<Generation> {
        let id = GenerationId::parse(id)?;
        let dir = self.dir.join(&id);
        let path = names::generation_profile(&dir);
        let profile: GenerationProfile = profile::load(&path)?;
        if profile.id != id {
            return Err(Error::corrupt(
                &path,
                format!("profile names generation {}", profile.id),
            ));
        }
        check_generation(&path, &profile)?;
        Ok(Generation { id, dir, profile })
    }

    /// Every generation, oldest first.
    pub fn generations(&self) -> Result<Vec<Generation>> {
        self.generation_ids()?
            .iter()
            .map(|id| self.generation(id))
            .collect()
    }

    /// The generation `latest` points at, if any: only a symbolic link whose target is a
    /// single path component naming a generation folder of this VM counts. vmkeep never
    /// opens anything through `latest`; it is there for people and scripts (`dd`).
    pub fn latest_target(&self) -> Option<GenerationId> {
        let target = std::fs::read_link(self.dir.join(names::LATEST)).ok()?;
        let target: GenerationId = target.to_str()?.parse().ok()?;
        let ok = std::fs::symlink_metadata(self.dir.join(&target)).is_ok_and(|m| m.is_dir());
        ok.then_some(target)
    }

    /// Resolve a REV: a generation id or unique prefix, N (0 = newest), or `latest`.
    pub fn resolve(&self, rev: &str) -> Result<GenerationId> {
        let ids = self.generation_ids()?;
        resolve_rev(&ids, rev).map_err(|e| Error::usage(format!("VM {}: {e}", self.name)))
    }

    /// Generation REV and every newer one, oldest first (the chain a read of REV goes
    /// through), resolved against one listing (so a prune in between cannot make the id and
    /// the chain disagree). Older generations' profiles are not read: a damaged one costs
    /// only its own generation, never the newer ones.
    pub fn resolve_generation(&self, rev: &str) -> Result<Vec<Generation>> {
        let ids = self.generation_ids()?;
        let id =
            resolve_rev(&ids, rev).map_err(|e| Error::usage(format!("VM {}: {e}", self.name)))?;
        self.chain_from(&ids, &id)
    }

    /// The generations of `ids` from `id` to the newest, their profiles loaded.
    fn chain_from(&self, ids: &[GenerationId], id: &GenerationId) -> Result<Vec<Generation>> {
        let k = ids.iter().position(|i| i == id).ok_or_else(|| {
            Error::usage(format!(
                "generation {id} of VM {} was removed while it was being opened",
                self.name
            ))
        })?;
        ids[k..].iter().map(|i| self.generation(i)).collect()
    }

    /// Generation REV, resolved against the listing it indexes
    /// ([`VmArchive::resolve_generation`]), ready to open its disks.
    pub fn select(&self, rev: &str) -> Result<view::Selected<'_>> {
        Ok(view::Selected::new(self, self.resolve_generation(rev)?))
    }

    /// The generation `pin` holds, from a listing made after the pin was taken (so prune
    /// can no longer drop it): a generation gone before that is a usage error.
    pub fn select_pinned(&self, pin: &pin::Pin) -> Result<view::Selected<'_>> {
        let ids = self.generation_ids()?;
        Ok(view::Selected::new(
            self,
            self.chain_from(&ids, &pin.generation)?,
        ))
    }

    /// Disk `disk` of generation REV, its digests proven
    /// ([`view::DiskView::open`]); for several disks of one generation, [`VmArchive::select`]
    /// it once and open each from that.
    pub fn view(&self, rev: &str, disk: &str) -> Result<view::DiskView> {
        self.select(rev)?.view(disk)
    }
}

/// What a generation profile says must be possible: its disk names become file names and
/// its sizes drive every reader's arithmetic.
fn check_generation(path: &Path, p: &GenerationProfile) -> Result<()> {
    format::check_block_size(path, p.block_size)?;
    // vmkeep never writes a generation without a disk (a backup of none is refused): a
    // profile that lists none has lost its disks, and would hide their files from check.
    if p.disks.is_empty() {
        return Err(Error::corrupt(path, "lists no disks"));
    }
    let mut seen = std::collections::HashSet::new();
    for d in &p.disks {
        names::check_disk(&d.name).map_err(|e| Error::corrupt(path, e))?;
        if !seen.insert(d.name.as_str()) {
            return Err(Error::corrupt(
                path,
                format!("disk {} is listed twice", d.name),
            ));
        }
        if !format::valid_disk_size(d.size) {
            return Err(Error::corrupt(
                path,
                format!("disk {} has an impossible size", d.name),
            ));
        }
    }
    Ok(())
}

/// Resolve `rev` among `ids` (oldest first); the message says what is wrong.
pub fn resolve_rev(ids: &[GenerationId], rev: &str) -> std::result::Result<GenerationId, String> {
    if ids.is_empty() {
        return Err("has no generations".into());
    }
    if rev == "latest" {
        return Ok(ids[ids.len() - 1].clone());
    }
    if let Ok(n) = rev.parse::<usize>() {
        if rev.len() < 8 {
            return ids
                .len()
                .checked_sub(n + 1)
                .map(|i| ids[i].clone())
                .ok_or_else(|| {
                    format!(
                        "unknown generation {rev}: there are only {} generations",
                        ids.len()
                    )
                });
        }
    }
    let matches: Vec<&GenerationId> = ids.iter().filter(|id| id.starts_with(rev)).collect();
    match matches.len() {
        1 => Ok(matches[0].clone()),
        0 => Err(format!("unknown generation {rev:?}")),
        n => Err(format!(
            "generation prefix {rev:?} is ambiguous ({n} generations match)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revs_resolve() {
        let ids: Vec<GenerationId> = [
            "0193a000-0000-7000-8000-000000000001",
            "0193a000-0000-7000-8000-000000000002",
            "0193b000-0000-7000-8000-000000000003",
        ]
        .map(|s| s.parse().unwrap())
        .to_vec();
        assert_eq!(resolve_rev(&ids, "0").unwrap(), ids[2]);
        assert_eq!(resolve_rev(&ids, "latest").unwrap(), ids[2]);
        assert_eq!(resolve_rev(&ids, "2").unwrap(), ids[0]);
        assert!(resolve_rev(&ids, "3").unwrap_err().contains("only 3"));
        assert_eq!(resolve_rev(&ids, "0193b").unwrap(), ids[2]);
        assert!(resolve_rev(&ids, "0193a")
            .unwrap_err()
            .contains("ambiguous"));
        assert!(resolve_rev(&ids, "ffff").unwrap_err().contains("unknown"));
    }

    #[test]
    fn generation_ids_sort_by_time() {
        let a = new_generation_id(None);
        let b = new_generation_id(Some(&a));
        assert!(b > a);
        assert!(is_generation_name(&a));
        assert!(!is_generation_name("latest"));
    }
}
