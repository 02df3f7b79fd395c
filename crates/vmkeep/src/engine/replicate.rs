//! `sync --to PATH`: a VM's finished generations appended, oldest first, to another vmkeep
//! repository (a second disk, an NFS or CephFS mount), which stays an ordinary repository:
//! its newest image is a plain raw image, and `restore`, `check`, `status` and `prune`
//! work on it with `--repo PATH` alone.
//!
//! Each missing generation is made in the replica by the backup engine, whose source is
//! the local generation read through its proven view ([`ArchivedDisk`]): the same id, time,
//! domain XML and firmware state; the blocks whose digests differ from the replica's
//! newest generation are read (an incremental run; the first copy reads every allocated
//! block), and the run commits only when every disk ends with the source generation's
//! digest root. The local repository is only read (each generation pinned while it is
//! copied); an interrupted sync leaves the replica as the backup engine leaves any
//! interrupted run, and the next sync goes on from the generations it has.

use std::path::Path;

use crate::archive::pin::Pin;
use crate::archive::{GenerationId, Repository};
use crate::engine::backup::{BackupOptions, BackupRun, DiskInput};
use crate::engine::Mode;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::source::archived::{changed_blocks, ArchivedDisk};
use crate::source::SourceIdentity;

/// What [`replicate_vm`] did.
#[derive(Debug, Clone, Default)]
pub struct ReplicaReport {
    /// The VM.
    pub vm: String,
    /// The generations copied, oldest first.
    pub copied: Vec<GenerationId>,
    /// Generations the replica had already.
    pub present: usize,
    /// Generations not copied, and why (older than the replica's newest, which it lacks).
    pub skipped: Vec<(GenerationId, String)>,
    /// Bytes read from the local generations.
    pub read_bytes: u64,
    /// Bytes the replica grew by.
    pub stored_bytes: u64,
}

/// Whether `a` and `b` are one folder (by device and inode).
fn same_folder(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Open (or make) the replica repository at `path` for `src`.
pub fn open_replica(src: &Repository, path: &Path) -> Result<Repository> {
    let dst = Repository::init(path)?;
    if same_folder(src.root(), dst.root()) {
        return Err(Error::usage(format!(
            "{} is the repository itself; sync to another folder",
            path.display()
        )));
    }
    Ok(dst)
}

/// Append every finished generation of `vm` in `src` that `dst` lacks and that sorts after
/// `dst`'s newest, oldest first.
pub fn replicate_vm(
    src: &Repository,
    dst: &Repository,
    vm: &str,
    progress: &dyn Progress,
) -> Result<ReplicaReport> {
    let archive = src.vm(vm)?;
    let mut report = ReplicaReport {
        vm: vm.to_string(),
        ..ReplicaReport::default()
    };
    for id in archive.generation_ids()? {
        // A VM folder without a profile is a first copy that did not commit.
        let has_profile = crate::archive::names::vm_profile(&dst.vm_dir(vm)?).exists();
        let newest_there = match has_profile {
            true => dst.vm(vm)?.generation_ids()?.last().cloned(),
            false => None,
        };
        match &newest_there {
            Some(n) if *n == id => {
                report.present += 1;
                continue;
            }
            Some(n) if *n > id => {
                let has = dst.vm(vm)?.generation_ids()?.contains(&id);
                if has {
                    report.present += 1;
                } else {
                    report.skipped.push((
                        id.clone(),
                        format!("older than the replica's newest generation {n}"),
                    ));
                }
                continue;
            }
            _ => {}
        }
        let (read, stored) = copy_generation(&archive, dst, vm, &id, src, progress)?;
        report.read_bytes += read;
        report.stored_bytes += stored;
        report.copied.push(id);
    }
    Ok(report)
}

/// Copy generation `id` of `archive` (repository `src`) into `dst` as its new newest
/// generation: (bytes read, bytes stored).
fn copy_generation(
    archive: &crate::archive::VmArchive,
    dst: &Repository,
    vm: &str,
    id: &GenerationId,
    src: &Repository,
    progress: &dyn Progress,
) -> Result<(u64, u64)> {
    // Pinned: a prune of the local repository keeps it until it is copied.
    let pin = Pin::acquire(&archive.dir, id, "sync")?;
    let chosen = archive.select_pinned(&pin)?;
    let gen = chosen.generation();
    let run = BackupRun::begin_as(dst, vm, id, &gen.profile.time)?;
    let prev = run.previous().cloned();
    let replica = match &prev {
        Some(_) => Some(dst.vm(vm)?),
        None => None,
    };
    let mut inputs = Vec::new();
    let mut roots = Vec::new();
    for d in &gen.profile.disks {
        let view = chosen.view(&d.name)?;
        let label = format!(
            "generation {id} of VM {vm} in {} (disk {})",
            src.root().display(),
            d.name
        );
        // The replica's newest generation of this disk, proven: only blocks whose digests
        // differ are read.
        let changed = match (&replica, &prev) {
            (Some(r), Some(p)) if p.profile.disk(&d.name).is_some() => {
                let there = r.view(p.id.as_str(), &d.name)?;
                (there.block_size == view.block_size)
                    .then(|| changed_blocks(&there, &view))
                    .transpose()?
            }
            _ => None,
        };
        let mut input = DiskInput::new(&d.name, Box::new(ArchivedDisk::new(view, label)));
        input.identity = Some(SourceIdentity::named(&format!(
            "vmkeep:{}/{vm}/{}",
            src.profile.id, d.name
        )));
        input.user_list = true;
        input.changed = changed;
        inputs.push(input);
        roots.push((d.name.clone(), d.digest_root.clone()));
    }
    let read_text = |path: &Path| -> Result<Option<String>> {
        match crate::fsutil::open_ro(path) {
            Ok(f) => {
                use std::io::Read;
                let mut s = String::new();
                f.take(crate::archive::profile::MAX_PROFILE_LEN)
                    .read_to_string(&mut s)
                    .map_err(|e| Error::io(path, e))?;
                Ok(Some(s))
            }
            Err(_) if !path.exists() => Ok(None),
            Err(e) => Err(e),
        }
    };
    let opts = BackupOptions {
        mode: Mode::Auto,
        block_size: Some(gen.profile.block_size),
        kind: gen.profile.kind,
        domain_xml: read_text(&gen.domain_xml_path())?,
        checkpoint_xml: None,
        checkpoint: None,
        consistency: gen.profile.consistency,
        state: crate::archive::state::read_all_verified(&gen.dir, &gen.profile.state)?,
        expect_roots: roots,
        ..BackupOptions::default()
    };
    let report = run.execute(inputs, &opts, progress)?;
    drop(pin);
    Ok((report.read_bytes(), report.stored_bytes()))
}
