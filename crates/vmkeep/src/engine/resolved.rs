//! One generation of one VM, picked out of the listing it indexes: where restore, merge,
//! verify and serve open their disk views. `DiskView::open` takes the listing and an index
//! into it; this is the one place that finds them (REV → listing → index), so that the
//! shape can be swapped for `VmArchive::view` in one place.

use crate::archive::{Generation, Repository, VmArchive};
use crate::engine::reader::DiskView;
use crate::error::{Error, Result};

/// A generation resolved against the listing it indexes (so a prune in between cannot make
/// the id and the index disagree).
#[derive(Debug, Clone)]
pub struct ResolvedGeneration {
    /// The VM's folder.
    pub archive: VmArchive,
    /// Every generation of the VM, oldest first, as listed once.
    pub gens: Vec<Generation>,
    /// The index of the chosen generation in `gens`.
    pub k: usize,
}

impl ResolvedGeneration {
    /// Generation `rev` (an id or unique prefix, N, or `latest`) of VM `vm`.
    pub fn resolve(repo: &Repository, vm: &str, rev: &str) -> Result<ResolvedGeneration> {
        let archive = repo.vm(vm)?;
        let (gens, k) = archive.resolve_generation(rev)?;
        Ok(ResolvedGeneration { archive, gens, k })
    }

    /// The generation whose id is `id`, listed now (after a pin was taken on it, say).
    pub fn by_id(archive: VmArchive, id: &str) -> Result<ResolvedGeneration> {
        let gens = archive.generations()?;
        let k = gens.iter().position(|g| g.id == id).ok_or_else(|| {
            Error::usage(format!(
                "generation {id} of VM {} was removed while it was being opened",
                archive.name
            ))
        })?;
        Ok(ResolvedGeneration { archive, gens, k })
    }

    /// The chosen generation.
    pub fn generation(&self) -> &Generation {
        &self.gens[self.k]
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.generation().id
    }

    /// The names of its disks, in the profile's order.
    pub fn disk_names(&self) -> Vec<&str> {
        self.generation()
            .profile
            .disks
            .iter()
            .map(|d| d.name.as_str())
            .collect()
    }

    /// Disk `disk` of the generation, its digests proven (see [`DiskView::open`]).
    pub fn view(&self, disk: &str) -> Result<DiskView> {
        DiskView::open(&self.archive, &self.gens, self.k, disk)
    }

    /// [`Self::view`], and with `ignore_damage` a failed proof comes back beside a view
    /// that trusts no zero digest instead of failing (see
    /// [`DiskView::open_ignoring_damage`]).
    pub fn view_checked(
        &self,
        disk: &str,
        ignore_damage: bool,
    ) -> Result<(DiskView, Option<Error>)> {
        if ignore_damage {
            DiskView::open_ignoring_damage(&self.archive, &self.gens, self.k, disk)
        } else {
            Ok((self.view(disk)?, None))
        }
    }
}
