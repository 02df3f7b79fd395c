//! `restore --as-vm` through the library ([`vmkeep::engine::recover::restore_as_vm`])
//! against a real libvirtd: a generation backed up with a saved definition comes back as a
//! new, defined VM whose disk holds the generation's bytes. Needs root and
//! libvirt-daemon-system.
#![cfg(feature = "libvirt")]

mod support;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use support::libvirt::{ensure_libvirtd, virsh, virsh_quiet, Undefine, URI};
use vmkeep::archive::Repository;
use vmkeep::engine::backup::{BackupOptions, BackupRun, DiskInput};
use vmkeep::engine::recover::{restore_as_vm, AsVmEvent, AsVmOptions};
use vmkeep::progress::NoProgress;
use vmkeep::source::file::FileSource;
use vmkeep::ErrorKind;

const SAVED: &str = "<domain type='qemu'><name>orig</name><memory unit='MiB'>64</memory>\
     <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\
     <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
     <source file='/nonexistent/vda.raw'/><target dev='vda' bus='virtio'/></disk>\
     </devices></domain>";

#[test]
fn restore_as_vm_writes_every_disk_and_defines_the_copy() {
    ensure_libvirtd();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repository::init(&tmp.path().join("repo")).unwrap();
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let img = tmp.path().join("vda.raw");
    std::fs::write(&img, &data).unwrap();
    let run = BackupRun::begin(&repo, "orig").unwrap();
    let disk = DiskInput::new("vda", Box::new(FileSource::open(&img).unwrap()));
    let opts = BackupOptions {
        domain_xml: Some(SAVED.to_string()),
        ..BackupOptions::default()
    };
    let backed = run.execute(vec![disk], &opts, &NoProgress).unwrap();

    let new = format!("vmkeep-test-recover-{}", std::process::id());
    let _guard = Undefine(new.clone());
    let mut opts = AsVmOptions::new("orig", "latest", &new);
    opts.disk_dir = tmp.path().join("disks");
    opts.format = vmkeep::target::ImageFormat::Raw;
    opts.connect = URI.into();

    // A folder libvirt's XML cannot name is refused before anything is done.
    let mut bad = opts.clone();
    bad.disk_dir = tmp.path().join(OsStr::from_bytes(b"d\xff"));
    let e = restore_as_vm(&repo, &bad, &NoProgress, &mut |_| {}).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    assert!(!bad.disk_dir.exists(), "nothing created");

    let mut events = Vec::new();
    let report = restore_as_vm(&repo, &opts, &NoProgress, &mut |e| {
        events.push(match e {
            AsVmEvent::DiskRestored { disk, path, .. } => format!("{disk} {}", path.display()),
            AsVmEvent::Defined { generation, .. } => format!("defined {generation}"),
            AsVmEvent::StateRestored { what, .. } => what.to_string(),
            AsVmEvent::Started => "started".into(),
        })
    })
    .unwrap();
    let path = opts.disk_dir.join(format!("{new}-vda.raw"));
    assert_eq!(report.generation, backed.generation.id);
    assert_eq!(report.disks, ["vda"]);
    assert!(!report.damaged && report.server.is_none());
    assert_eq!(
        events,
        [
            format!("vda {}", path.display()),
            format!("defined {}", backed.generation.id)
        ]
    );
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the generation's bytes"
    );
    let xml = virsh(&["dumpxml", &new]);
    assert!(xml.contains(path.to_str().unwrap()), "{xml}");

    // The name is taken now: refused, and the disk is left as it is.
    let e = restore_as_vm(&repo, &opts, &NoProgress, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    drop(_guard);
    assert!(!virsh_quiet(&["dominfo", &new]));
}
