//! The libvirt layer against a real libvirtd and QEMU (TCG, no guest OS). The daemons are
//! started when none runs; every test defines its own uniquely named VM and removes it,
//! also on failure. Needs root, libvirt-daemon-system, qemu-system-x86, qemu-utils and
//! libnbd-bin.
#![cfg(feature = "libvirt")]

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use support::libvirt::{map_ranges, read_all, run, virsh, TestVm, URI};
use vmkeep::libvirt::{
    BackupJobState, BackupPlan, CheckpointDelete, CopySpec, DiskDevice, DiskSource, DomainState,
    Hypervisor, NewDisk,
};
use vmkeep::ErrorKind;

const MIB: u64 = 1 << 20;

fn hypervisor() -> Hypervisor {
    support::libvirt::ensure_libvirtd();
    Hypervisor::connect(Some(URI)).unwrap()
}

fn plan<'a>(socket: &'a std::path::Path, disks: &'a [&'a str]) -> BackupPlan<'a> {
    // A test's plan lives as long as the test: leaking the small server value is fine.
    let server: &'static vmkeep::libvirt::xml::NbdServer = Box::leak(Box::new(
        vmkeep::libvirt::xml::NbdServer::Unix(socket.to_path_buf()),
    ));
    BackupPlan {
        disks,
        server,
        export_prefix: None,
        scratch_dir: socket.parent().unwrap(),
        checkpoint: None,
        incremental_from: None,
        around_begin: None,
        checkpoint_description: None,
    }
}

#[test]
fn list_domains_shows_disks_with_format_path_and_size() {
    let vm = TestVm::start("list", &[("vda", "qcow2", 64), ("vdb", "raw", 32)]);
    let hv = hypervisor();
    let check = |state: DomainState| {
        let all = hv.list_domains().unwrap();
        let info = all
            .iter()
            .find(|d| d.name == vm.name)
            .expect("test VM listed");
        assert_eq!(info.state, state);
        assert_eq!(info.uuid, virsh(&["domuuid", &vm.name]).trim());
        let targets: Vec<_> = info.disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(targets, ["vda", "vdb"]);
        for (disk, want) in info.disks.iter().zip(&vm.disks) {
            assert_eq!(disk.device, DiskDevice::Disk);
            assert_eq!(disk.format.as_deref(), Some(want.format));
            assert_eq!(disk.source, DiskSource::File(want.path.clone()));
            assert_eq!(disk.size, Some(want.size_mib * MIB), "{}", disk.target);
        }
    };
    check(DomainState::Running);
    virsh(&["destroy", &vm.name]);
    check(DomainState::ShutOff);

    let err = hv.domain("vmkeep-test-no-such-vm").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(
        err.to_string()
            .contains("unknown VM vmkeep-test-no-such-vm"),
        "{err}"
    );
}

#[test]
fn full_pull_backup_exports_the_point_in_time_and_cleans_up() {
    let vm = TestVm::define("full", &[("vda", "qcow2", 64), ("vdb", "qcow2", 16)], "");
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 2M",
            "-c",
            "write -P 0x12 40M 64k",
        ])
        .arg(&vm.disk("vda").path));
    virsh(&["start", &vm.name]);
    let hv = hypervisor();
    let dom = hv.domain(&vm.name).unwrap();
    let socket = vm.path("run/nbd.sock");
    let backup = dom
        .begin_backup(&BackupPlan {
            checkpoint: Some("g1"),
            ..plan(&socket, &["vda"])
        })
        .unwrap();

    // The socket folder is created closed to everyone but QEMU's group.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o770);
    let live = vmkeep::libvirt::xml::parse_domain(&dom.live_xml().unwrap()).unwrap();
    assert_eq!(Some(meta.gid()), live.qemu_ids.map(|(_, gid)| gid));

    assert_eq!(backup.checkpoint(), Some("g1"));
    assert_eq!(backup.disks().len(), 1, "vdb has backup='no'");
    let disk = backup.disk("vda").unwrap();
    assert_eq!(disk.export_name, "vda");
    assert_eq!(disk.dirty_bitmap_context, None, "full backup");
    assert!(disk.in_checkpoint);
    assert!(
        disk.scratch.as_ref().unwrap().exists(),
        "scratch file while running"
    );
    assert_eq!(backup.state().unwrap(), BackupJobState::Running);
    let uri = backup.nbd_uri(disk, None);
    assert_eq!(uri, format!("nbd+unix:///vda?socket={}", socket.display()));

    let before = read_all(
        vm.disk("vda").path.to_str().unwrap(),
        "qcow2",
        &vm.path("disk.raw"),
    );
    vm.guest_write(0, 0x33, "0", "1M");
    let exported = read_all(&uri, "raw", &vm.path("export.raw"));
    assert!(
        exported == before,
        "the export is the disk as it was when the backup began"
    );
    assert_eq!(exported[0], 0x11);
    assert_eq!(exported[40 << 20], 0x12);
    let now = read_all(
        vm.disk("vda").path.to_str().unwrap(),
        "qcow2",
        &vm.path("disk.raw"),
    );
    assert_eq!(now[0], 0x33, "the guest write reached the disk");
    let exports = run(Command::new("nbdinfo").arg("--list").arg(&uri));
    assert!(!exports.contains("export=\"vdb\""), "{exports}");

    let scratch = disk.scratch.clone().unwrap();
    backup.end().unwrap();
    assert!(virsh(&["domjobinfo", &vm.name]).contains("None"));
    assert!(!socket.exists(), "socket removed");
    assert!(!scratch.exists(), "scratch removed");
    assert!(dom.checkpoint_exists("g1").unwrap());
}

#[test]
fn incremental_pull_backup_maps_exactly_the_written_range() {
    let vm = TestVm::start("incr", &[("vda", "qcow2", 64)]);
    let hv = hypervisor();
    let dom = hv.domain(&vm.name).unwrap();
    let socket = vm.path("run/nbd.sock");
    let full = dom
        .begin_backup(&BackupPlan {
            checkpoint: Some("c1"),
            ..plan(&socket, &[])
        })
        .unwrap();
    full.end().unwrap();

    vm.guest_write(0, 0x22, "8M", "1M");
    let incr = dom
        .begin_backup(&BackupPlan {
            checkpoint: Some("c2"),
            incremental_from: Some("c1"),
            around_begin: None,
            checkpoint_description: None,
            ..plan(&socket, &[])
        })
        .unwrap();
    let disk = incr.disk("vda").unwrap();
    let context = disk.dirty_bitmap_context.clone().unwrap();
    assert_eq!(context, "qemu:dirty-bitmap:backup-vda");
    let uri = incr.nbd_uri(disk, None);
    assert_eq!(map_ranges(&uri, &context), [(8 * MIB, MIB)]);
    let data = read_all(&uri, "raw", &vm.path("export.raw"));
    assert!(data[8 << 20..9 << 20].iter().all(|&b| b == 0x22));
    incr.end().unwrap();

    let cps = dom.list_checkpoints().unwrap();
    let names: Vec<_> = cps.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["c1", "c2"]);
    assert_eq!(cps[0].parent, None);
    assert_eq!(cps[1].parent.as_deref(), Some("c1"));
    assert!(cps[1].creation_time.unwrap() >= cps[0].creation_time.unwrap());
    assert_eq!(cps[1].disks, [("vda".to_string(), "c2".to_string())]);
}

#[test]
fn checkpoints_are_listed_deleted_and_a_missing_one_is_reported() {
    let vm = TestVm::start("ckpt", &[("vda", "qcow2", 32), ("vdb", "raw", 16)]);
    let hv = hypervisor();
    let dom = hv.domain(&vm.name).unwrap();
    let a = dom.create_checkpoint("a", &[]).unwrap();
    assert_eq!(
        a.disks,
        [("vda".to_string(), "a".to_string())],
        "raw vdb is not tracked"
    );
    dom.create_checkpoint("b", &[]).unwrap();
    dom.create_checkpoint("c", &[]).unwrap();
    assert!(dom.checkpoint_exists("b").unwrap());

    dom.delete_checkpoint("a", CheckpointDelete::default())
        .unwrap();
    assert!(!dom.checkpoint_exists("a").unwrap());
    let names: Vec<_> = dom
        .list_checkpoints()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["b", "c"]);

    let err = dom
        .delete_checkpoint("nope", CheckpointDelete::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Source);
    assert!(
        err.to_string().contains("no checkpoint named 'nope'"),
        "{err}"
    );
    let socket = vm.path("run/nbd.sock");
    let err = dom
        .begin_backup(&BackupPlan {
            incremental_from: Some("gone"),
            around_begin: None,
            checkpoint_description: None,
            ..plan(&socket, &[])
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("no checkpoint named 'gone'"),
        "{err}"
    );

    // Metadata only: libvirt forgets it, the bitmap stays in the image.
    dom.delete_checkpoint(
        "b",
        CheckpointDelete {
            metadata_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let image = vm.disk("vda").path.to_str().unwrap().to_string();
    let bitmaps = || run(Command::new("qemu-img").args(["info", "-U", &image]));
    // QEMU writes persistent bitmaps into the image when it stops.
    dom.destroy().unwrap();
    assert!(bitmaps().contains("name: b"), "{}", bitmaps());
    assert!(bitmaps().contains("name: c"), "{}", bitmaps());
    // Shut off: libvirt 9.0 refuses, vmkeep removes the bitmap itself.
    dom.delete_checkpoint("c", CheckpointDelete::default())
        .unwrap();
    assert!(!dom.checkpoint_exists("c").unwrap());
    assert!(!bitmaps().contains("name: c"), "{}", bitmaps());
}

#[test]
fn backup_aborted_from_outside_is_failed() {
    let vm = TestVm::start("abort", &[("vda", "qcow2", 32)]);
    let hv = hypervisor();
    let dom = hv.domain(&vm.name).unwrap();
    let socket = vm.path("run/nbd.sock");
    let backup = dom.begin_backup(&plan(&socket, &[])).unwrap();
    assert_eq!(backup.state().unwrap(), BackupJobState::Running);
    virsh(&["domjobabort", &vm.name]);
    // The abort is asynchronous: libvirt may report the job running a moment longer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut state = backup.state().unwrap();
    while state == BackupJobState::Running && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        state = backup.state().unwrap();
    }
    match state {
        BackupJobState::Failed(why) => assert!(why.contains("ended before"), "{why}"),
        other => panic!("abort from outside seen as {other:?}"),
    }
    let err = backup.end().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Source);
    assert!(!socket.exists());
}

#[test]
fn vm_destroyed_mid_backup_is_failed_and_leaves_no_files() {
    let vm = TestVm::start("destroy", &[("vda", "qcow2", 32)]);
    let hv = hypervisor();
    let dom = hv.domain(&vm.name).unwrap();
    let socket = vm.path("run/nbd.sock");
    let backup = dom.begin_backup(&plan(&socket, &[])).unwrap();
    let scratch = backup.disks()[0].scratch.clone().unwrap();
    dom.destroy().unwrap();
    match backup.state().unwrap() {
        BackupJobState::Failed(why) => assert!(why.contains("VM stopped"), "{why}"),
        other => panic!("destroyed VM seen as {other:?}"),
    }
    let err = backup.end().unwrap_err();
    assert!(err.to_string().contains("backup failed"), "{err}");
    assert!(!socket.exists(), "QEMU's stale socket removed");
    assert!(!scratch.exists());

    // A pull backup needs a running VM.
    let err = dom.begin_backup(&plan(&socket, &[])).unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
}

#[test]
fn stale_backup_job_of_a_dead_run_is_ended_and_unknown_disk_refused() {
    let vm = TestVm::start("stale", &[("vda", "qcow2", 32)]);
    let hv = hypervisor();
    let dom = hv.domain(&vm.name).unwrap();
    let socket = vm.path("run/nbd.sock");
    let first = dom.begin_backup(&plan(&socket, &[])).unwrap();
    // A vmkeep killed mid-backup never ends its job.
    std::mem::forget(first);
    let second = dom.begin_backup(&plan(&socket, &[])).unwrap();
    assert_eq!(second.state().unwrap(), BackupJobState::Running);
    let other = vm.path("other/nbd.sock");
    let err = dom.begin_backup(&plan(&other, &[])).unwrap_err();
    assert!(
        err.to_string().contains("another backup job is running"),
        "{err}"
    );
    second.end().unwrap();

    let err = dom.begin_backup(&plan(&socket, &["vdz"])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.to_string().contains("has no disk vdz"), "{err}");
}

#[test]
fn define_copy_makes_a_new_startable_vm() {
    let iface = "<interface type='user'><mac address='52:54:00:01:02:03'/><model type='virtio'/></interface>";
    let vm = TestVm::define("copy", &[("vda", "qcow2", 32)], iface);
    let hv = hypervisor();
    let dom = hv.domain(&vm.name).unwrap();
    dom.start().unwrap();
    let socket = vm.path("run/nbd.sock");
    dom.begin_backup(&BackupPlan {
        checkpoint: Some("k1"),
        ..plan(&socket, &[])
    })
    .unwrap()
    .end()
    .unwrap();
    let saved = dom.xml().unwrap();

    let restored = vm.path("restored vda.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(&vm.disk("vda").path)
        .arg(&restored));
    let new_name = format!("{}-copy", vm.name);
    let mut disks = BTreeMap::new();
    disks.insert(
        "vda".to_string(),
        NewDisk {
            path: restored.clone(),
            format: "raw".into(),
            block: false,
            backing: None,
        },
    );
    let spec = CopySpec {
        new_name: new_name.clone(),
        disks,
        ..CopySpec::default()
    };
    let _cleanup = support::libvirt::Undefine(new_name.clone());
    let copy = hv.define_copy(&saved, &spec).unwrap();
    assert_eq!(copy.name(), new_name);
    assert_ne!(copy.uuid().unwrap(), dom.uuid().unwrap());
    let info = copy.info().unwrap();
    assert_eq!(info.disks[0].source, DiskSource::File(restored.clone()));
    assert_eq!(info.disks[0].format.as_deref(), Some("raw"));
    let copy_xml = copy.xml().unwrap();
    let mac = copy_xml.split("mac address='").nth(1).unwrap()[..17].to_string();
    assert!(
        mac.starts_with("52:54:00:") && mac != "52:54:00:01:02:03",
        "{mac}"
    );
    assert!(
        !copy.checkpoint_exists("k1").unwrap(),
        "checkpoints are not copied"
    );
    copy.start().unwrap();
    assert_eq!(copy.state().unwrap(), DomainState::Running);

    let err = hv.define_copy(&saved, &spec).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.to_string().contains("already exists"), "{err}");
    let replace = CopySpec {
        replace: true,
        ..spec.clone()
    };
    let err = hv.define_copy(&saved, &replace).unwrap_err();
    assert!(
        err.to_string().contains("never replaces a running VM"),
        "{err}"
    );
    copy.destroy().unwrap();
    let again = hv.define_copy(&saved, &replace).unwrap();
    assert_ne!(again.uuid().unwrap(), info.uuid);

    let on_network = saved.replace(
        "<interface type='user'>",
        "<interface type='network'><source network='vmkeep-no-such-net'/>",
    );
    let err = hv.define_copy(&on_network, &replace).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(
        err.to_string().contains("network 'vmkeep-no-such-net'"),
        "{err}"
    );
}

#[test]
fn socket_folder_closed_to_qemu_is_reported_with_a_hint() {
    let vm = TestVm::start("perm", &[("vda", "qcow2", 16)]);
    let hv = hypervisor();
    let dom = hv.domain(&vm.name).unwrap();
    let closed = vm.path("closed");
    std::fs::create_dir(&closed).unwrap();
    support::libvirt::set_mode(&closed, 0o700);
    let socket = closed.join("nbd.sock");
    let err = dom.begin_backup(&plan(&socket, &[])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Source);
    assert!(
        err.to_string()
            .contains("must be able to create the NBD socket"),
        "{err}"
    );
    assert!(
        virsh(&["domjobinfo", &vm.name]).contains("None"),
        "no job left behind"
    );
}

/// A file uploaded into a storage volume arrives byte for byte: data, holes (sent as
/// zeros) and the tail, for sizes around the stream's message size.
#[test]
fn a_file_uploaded_into_a_volume_arrives_byte_for_byte() {
    let hv = hypervisor();
    let dir = tempfile::Builder::new()
        .prefix("vmkeep-pool-")
        .tempdir()
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pool = format!("vmkeep-test-upload-{}", std::process::id());
    virsh(&[
        "pool-create-as",
        &pool,
        "dir",
        "--target",
        dir.path().to_str().unwrap(),
    ]);
    struct Destroy(String);
    impl Drop for Destroy {
        fn drop(&mut self) {
            support::libvirt::virsh_quiet(&["pool-destroy", &self.0]);
        }
    }
    let _pool = Destroy(pool.clone());
    let src = tempfile::tempdir().unwrap();
    for (i, len) in [2490368usize, 262144, 1 << 20, 3 * (1 << 20) + 12345]
        .into_iter()
        .enumerate()
    {
        let path = src.path().join(format!("f{i}"));
        let mut data: Vec<u8> = (0..len).map(|k| (k * 7 + i) as u8 | 1).collect();
        // A real hole in the middle (punched: the file system reports it as a hole), and
        // one at the end.
        let hole = (len / 3) & !4095..((len / 3 + len / 4) & !4095);
        data[hole.clone()].fill(0);
        let tail = len - ((len / 8) & !4095)..len;
        data[tail.clone()].fill(0);
        std::fs::write(&path, &data[..tail.start]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len as u64).unwrap();
        // SAFETY: fallocate on an open file of this test.
        let rc = unsafe {
            libc::fallocate(
                std::os::unix::io::AsRawFd::as_raw_fd(&f),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                hole.start as i64,
                (hole.end - hole.start) as i64,
            )
        };
        assert_eq!(rc, 0);
        drop(f);
        for format in ["raw", "qcow2"] {
            let name = format!("v{i}.{format}");
            let vol = hv
                .create_volume(&pool, &name, format, len as u64, false)
                .unwrap();
            let sent = vol.upload_file(&hv, &path, len as u64);
            if format == "raw" {
                let sent = sent.unwrap();
                assert!(
                    sent < len as u64,
                    "{name}: holes are not sent as data ({sent} of {len} bytes)"
                );
            }
            let got = std::fs::read(dir.path().join(&name)).unwrap();
            assert_eq!(got.len(), len, "size of {name}");
            let first = got.iter().zip(&data).position(|(a, b)| a != b);
            assert_eq!(first, None, "{name}: first differing byte");
        }
    }
}
