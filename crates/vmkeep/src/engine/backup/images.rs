//! The backup of a VM whose disks are SOURCE specs (files, devices, images, NBD URIs):
//! every step `vmkeep backup --disk` takes after its settings are known, so that a library
//! user can do all of it with one call, [`backup_images`].

use std::collections::HashMap;
use std::path::PathBuf;

use super::{BackupOptions, BackupReport, BackupRun, DiskInput};
use crate::archive::{names, Repository};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::source::bitmap;
use crate::source::changed;
use crate::source::open::{open_disk_source, Opened};
use crate::source::tracked::{BitmapRun, Newest, TrackedImage};

/// What to back up of an image VM, besides the run's [`BackupOptions`].
#[derive(Debug, Clone, Default)]
pub struct ImageBackup {
    /// The disks in order: name and SOURCE (a raw file or device, an image for qemu-nbd,
    /// `PATH?bitmap=PREFIX` for a qcow2 image with persistent bitmaps, or an NBD URI).
    pub disks: Vec<(String, String)>,
    /// Changed-block lists the user vouches for (`--changed-blocks NAME=FILE`): the disk
    /// and the file ("OFFSET LENGTH" lines, or vSphere changedArea JSON).
    pub changed_blocks: Vec<(String, PathBuf)>,
    /// Bytes per bit for new persistent bitmaps; `None`: the qcow2 cluster size.
    pub granularity: Option<u64>,
}

/// A disk source opened before the VM lock is taken, or one whose bitmap waits for it.
enum Pending {
    Ready(DiskInput),
    Bitmap { name: String, image: TrackedImage },
}

/// Back up VM `vm` from `job`'s disks: read the changed-block lists, open every source
/// (the backing-file refusal included), then under the VM lock add each qcow2 image's
/// bitmap of this run, read everything into a new generation, and commit the bitmaps
/// (or abandon them when the run fails) before the lock is released.
pub fn backup_images(
    repo: &Repository,
    vm: &str,
    job: &ImageBackup,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    names::check_vm(vm)?;
    let mut changed_lists = read_changed_lists(job)?;
    // Before the lock: every source that needs no bitmap is opened, bitmap sources are
    // checked. The bitmaps themselves are decided on and added under the lock.
    let mut pending = Vec::new();
    for (name, spec) in &job.disks {
        names::check_disk(name)?;
        pending.push(match open_disk_source(spec)? {
            Opened::Ready(source, identity) => {
                let mut input = DiskInput::new(name, source);
                input.identity = Some(identity);
                Pending::Ready(input)
            }
            Opened::Tracked(image) => Pending::Bitmap {
                name: name.clone(),
                image,
            },
        });
    }
    if let Some(g) = job.granularity {
        bitmap::check_granularity(g)?;
    }
    let run = BackupRun::begin(repo, vm)?;
    let mut bitmaps = BitmapRun::new();
    let mut disks = Vec::new();
    let opened = (|| -> Result<()> {
        for p in pending {
            let mut input = match p {
                Pending::Ready(input) => input,
                Pending::Bitmap { name, image } => {
                    open_tracked(repo, &run, &name, &image, job.granularity, &mut bitmaps)?
                }
            };
            if let Some(list) = changed_lists.remove(&input.name) {
                input.changed = Some(list);
                input.user_list = true;
            }
            disks.push(input);
        }
        Ok(())
    })();
    if let Err(e) = opened {
        // The images' qemu-nbd servers (shared locks) stop first: removing a bitmap needs
        // the image's write lock.
        drop(disks);
        bitmaps.abandon();
        return Err(e);
    }
    run.execute_then(disks, opts, progress, &mut |result| match result {
        Ok(_) => bitmaps.commit(repo, vm, progress),
        Err(_) => bitmaps.abandon(),
    })
}

/// Read and parse every changed-block list of `job`, by disk name.
fn read_changed_lists(job: &ImageBackup) -> Result<HashMap<String, Vec<(u64, u64)>>> {
    let mut lists = HashMap::new();
    for (name, path) in &job.changed_blocks {
        if !job.disks.iter().any(|(n, _)| n == name) {
            return Err(Error::usage(format!(
                "--changed-blocks names disk {name:?}, which is not backed up"
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::usage(format!("changed-block list {}: {e}", path.display())))?;
        lists.insert(name.clone(), changed::parse(path, &text)?);
    }
    Ok(lists)
}

/// Under the VM lock: open a tracked image with this run's bitmap (see
/// [`BitmapRun::open`]) as the disk `name`.
fn open_tracked(
    repo: &Repository,
    run: &BackupRun,
    name: &str,
    image: &TrackedImage,
    granularity: Option<u64>,
    bitmaps: &mut BitmapRun,
) -> Result<DiskInput> {
    let newest = run.previous().and_then(|g| {
        let d = g.profile.disk(name)?;
        Some(Newest {
            id: &g.id,
            recorded: d.bitmap.as_deref(),
        })
    });
    let t = bitmaps.open(
        image,
        &repo.profile.id,
        newest,
        run.generation_id(),
        granularity,
    )?;
    let mut input = DiskInput::new(name, t.source);
    input.bitmap = Some(t.bitmap);
    input.identity = Some(t.identity);
    input.expects_tracking = true;
    input.changed = t.changed;
    input.untracked_reason = t.untracked_reason;
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::profile::GenerationMode;
    use crate::progress::NoProgress;
    use std::path::Path;
    use std::process::Command;

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }

    fn qemu_io(img: &Path, op: &str) {
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", op])
            .arg(img));
    }

    /// The image's guest-visible bytes.
    fn raw_bytes(img: &Path, out: &Path) -> Vec<u8> {
        run(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(img)
            .arg(out));
        std::fs::read(out).unwrap()
    }

    #[test]
    fn a_bitmap_image_backed_up_twice_through_the_library_is_incremental_and_exact() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo")).unwrap();
        let img = dir.path().join("d.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("16M"));
        qemu_io(&img, "write -P 0x5 0 3M");
        let job = ImageBackup {
            disks: vec![("vda".into(), format!("{}?bitmap=lib", img.display()))],
            ..ImageBackup::default()
        };
        let opts = BackupOptions::default();
        let first = backup_images(&repo, "vm", &job, &opts, &NoProgress).unwrap();
        assert_eq!(first.generation.disks[0].mode, GenerationMode::Full);
        qemu_io(&img, "write -P 0x7 8M 4k");
        let second = backup_images(&repo, "vm", &job, &opts, &NoProgress).unwrap();
        let d = &second.generation.disks[0];
        assert_eq!(d.mode, GenerationMode::Incr, "{:?}", second.warnings);
        // One 64 KiB bit of the default granularity, one 64 KiB block.
        assert_eq!(d.read_bytes, 65536);
        // Only this run's bitmap is left in the image.
        let names: Vec<String> = bitmap::list(&img)
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, vec![d.bitmap.clone().unwrap()]);
        let g = repo
            .vm("vm")
            .unwrap()
            .generation(&second.generation.id)
            .unwrap();
        let stored = std::fs::read(g.image_path("vda")).unwrap();
        assert!(stored == raw_bytes(&img, &dir.path().join("now.raw")));
    }

    #[test]
    fn a_changed_block_list_for_a_disk_not_backed_up_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo")).unwrap();
        let disk = dir.path().join("d.raw");
        std::fs::write(&disk, vec![1u8; 65536]).unwrap();
        let job = ImageBackup {
            disks: vec![("vda".into(), disk.display().to_string())],
            changed_blocks: vec![("vdb".into(), dir.path().join("list"))],
            granularity: None,
        };
        let e = backup_images(&repo, "vm", &job, &BackupOptions::default(), &NoProgress)
            .err()
            .unwrap();
        assert!(e.to_string().contains("which is not backed up"), "{e}");
    }
}
