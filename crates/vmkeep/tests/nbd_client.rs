//! The NBD client and the NBD / QEMU-image sources against real servers (qemu-nbd, nbdkit)
//! that the tests start and stop, compared with libnbd's tools (nbdcopy, nbdinfo) and
//! QEMU's (qemu-img, qemu-io); and against a hostile fake server.

mod nbd_support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_support::pki::{make_pki, make_pki_for, qemu_tls_args, Pki};
use nbd_support::{
    nbdcopy_hash, nbdinfo_map, nbdkit, process_exists, process_running, qemu_nbd, qemu_nbd_tcp,
    run, Rng,
};
use proptest::prelude::*;
use vmkeep::error::{Error, ErrorKind};
use vmkeep::nbd::client::{NbdClient, NbdOptions, NbdTls, NbdUri};
use vmkeep::nbd::proto::{META_BASE_ALLOCATION, STATE_ZERO};
use vmkeep::source::nbd::NbdSource;
use vmkeep::source::qemu::{open_image, QemuImage, QemuOptions};
use vmkeep::source::{BlockSource, ExtentKind};

const MIB: u64 = 1 << 20;

fn connect(uri: &NbdUri) -> NbdClient {
    NbdClient::connect(uri, &NbdOptions::default()).unwrap()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 40 MiB raw image: random data in a few places, zeros elsewhere (some written out).
/// The test image of [`make_raw`] as `DIR/a.FORMAT`, converted by qemu-img; and its bytes.
fn converted(dir: &Path, format: &str) -> (std::path::PathBuf, Vec<u8>) {
    let raw = dir.join("a.raw");
    let out = dir.join(format!("a.{format}"));
    let img = make_raw(&raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            format,
            path_str(&raw),
            path_str(&out),
        ],
    );
    (out, img)
}

fn make_raw(path: &Path) -> Vec<u8> {
    let mut img = vec![0u8; 40 * MIB as usize];
    let mut rng = Rng(0x5eed);
    for (off, len) in [
        (0, MIB),
        (5 * MIB, 4 * MIB + 123),
        (20 * MIB, 64 << 10),
        (39 * MIB, MIB),
    ] {
        rng.fill(&mut img[off as usize..(off + len) as usize]);
    }
    std::fs::write(path, &img).unwrap();
    img
}

/// Read the whole export from several threads in odd-sized pieces; BLAKE3 of it.
fn read_all_parallel(client: &Arc<NbdClient>, threads: u64) -> blake3::Hash {
    let size = client.size();
    let piece = 3 * MIB + 4097;
    let n = size.div_ceil(piece);
    let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let c = client.clone();
                s.spawn(move || {
                    (0..n)
                        .filter(|i| i % threads == t)
                        .map(|i| {
                            let off = i * piece;
                            let mut b = vec![0u8; piece.min(size - off) as usize];
                            c.read(off, &mut b).unwrap();
                            (i, b)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(u64, Vec<u8>)> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, b)| b).collect()
    });
    blake3::hash(&parts.concat())
}

#[test]
fn qcow2_reads_over_multi_conn_match_nbdcopy() {
    let tmp = tempfile::tempdir().unwrap();
    let (qcow2, img) = converted(tmp.path(), "qcow2");
    let server = qemu_nbd(&["--read-only", "--shared=4", "--format=qcow2"], &qcow2);
    let client = Arc::new(connect(&server.uri()));
    assert!(client.can_multi_conn() && client.read_only() && client.structured_replies());
    assert_eq!(client.connections(), 4);
    assert!(client.has_context(META_BASE_ALLOCATION));
    assert_eq!(client.size(), img.len() as u64);
    let ours = read_all_parallel(&client, 4);
    assert_eq!(ours, blake3::hash(&img));
    // qemu-nbd serves --shared clients at once: make room for nbdcopy.
    client.disconnect().unwrap();
    assert_eq!(ours, nbdcopy_hash(&server.uri_string(), tmp.path()));
}

#[test]
fn raw_reads_match_nbdcopy_and_split_at_the_maximum() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("a.raw");
    let img = make_raw(&raw);
    let server = qemu_nbd(&["--read-only", "--format=raw"], &raw);
    let client = connect(&server.uri());
    assert_eq!(client.max_payload(), 32 << 20);
    // One call bigger than the server's maximum: split into two requests.
    let mut all = vec![0u8; img.len()];
    client.read(0, &mut all).unwrap();
    assert!(all == img);
    // Unaligned small reads.
    let mut b = vec![0u8; 777];
    client.read(5 * MIB - 3, &mut b).unwrap();
    assert_eq!(b, img[(5 * MIB - 3) as usize..][..777]);
    // qemu-nbd serves one client at a time without --shared: make room for nbdcopy.
    drop(client);
    assert_eq!(
        blake3::hash(&all),
        nbdcopy_hash(&server.uri_string(), tmp.path())
    );
}

#[test]
fn nbdkit_memory_write_zero_trim_flush_read_back() {
    let server = nbdkit(&["memory", "size=16M"]);
    let client = connect(&server.uri());
    assert!(
        !client.read_only() && client.can_trim() && client.can_write_zeroes() && client.can_flush()
    );
    let mut rng = Rng(7);
    let data = rng.bytes(3 * MIB as usize);
    client.write(MIB, &data).unwrap();
    client.write_zeroes(MIB + 4096, 8192, false).unwrap();
    client.write_zeroes(2 * MIB, 4096, true).unwrap();
    client.trim(10 * MIB, MIB).unwrap();
    client.flush().unwrap();
    let mut expect = data.clone();
    expect[4096..4096 + 8192].fill(0);
    expect[MIB as usize..MIB as usize + 4096].fill(0);
    let mut back = vec![0u8; data.len()];
    client.read(MIB, &mut back).unwrap();
    assert!(back == expect);
    // nbdkit's memory plugin reports what it never wrote as a zero hole.
    let st = client
        .block_status(META_BASE_ALLOCATION, 12 * MIB, 4 * MIB)
        .unwrap();
    assert_eq!(st, vec![(4 * MIB, 3)]);
}

#[test]
fn nbdkit_pattern_and_random_read_correctly() {
    let pattern = nbdkit(&["pattern", "size=1G"]);
    let client = connect(&pattern.uri());
    let (off, len) = (777 * MIB + 13, 100_003usize);
    let mut b = vec![0u8; len];
    client.read(off, &mut b).unwrap();
    for (i, byte) in b.iter().enumerate() {
        let pos = off + i as u64;
        // Every 8-byte word holds its own offset, big-endian.
        assert_eq!(
            *byte,
            (pos & !7).to_be_bytes()[(pos % 8) as usize],
            "byte {pos}"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let random = nbdkit(&["random", "size=24M", "seed=11"]);
    let client = Arc::new(connect(&random.uri()));
    assert_eq!(
        read_all_parallel(&client, 3),
        nbdcopy_hash(&random.uri_string(), tmp.path())
    );
}

#[test]
fn nbdkit_sparse_random_map_and_data_match_nbdinfo_and_nbdcopy() {
    let tmp = tempfile::tempdir().unwrap();
    let server = nbdkit(&["sparse-random", "size=64M", "seed=3", "percent=20"]);
    let uri = server.uri_string();
    let source = NbdSource::open(&uri, None).unwrap();
    let client = source.client();
    let ours: Vec<(u64, u64, u32)> = {
        let mut at = 0;
        let mut v = Vec::new();
        while at < client.size() {
            for (len, flags) in client
                .block_status(META_BASE_ALLOCATION, at, client.size() - at)
                .unwrap()
            {
                v.push((at, len, flags));
                at += len;
            }
        }
        v
    };
    assert_eq!(ours, nbdinfo_map(&uri, META_BASE_ALLOCATION));
    assert!(ours.iter().any(|e| e.2 & STATE_ZERO != 0) && ours.iter().any(|e| e.2 == 0));

    // The source's extents: zero exactly where the server said ZERO, and those read as 0.
    let extents = source.extents(0, source.size()).unwrap();
    let mut at = 0;
    let mut image = vec![0u8; source.size() as usize];
    for e in &extents {
        assert_eq!(e.offset, at);
        let buf = &mut image[e.offset as usize..(e.offset + e.length) as usize];
        source.read_at(buf, e.offset).unwrap();
        if e.kind == ExtentKind::Zero {
            assert!(buf.iter().all(|&b| b == 0));
        }
        at += e.length;
    }
    assert_eq!(at, source.size());
    assert_eq!(blake3::hash(&image), nbdcopy_hash(&uri, tmp.path()));
}

#[test]
fn sparse_qcow2_block_status_matches_nbdinfo_map() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("s.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&img), "32M"],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 1M 1M",
            "-c",
            "write -P 0x22 8M 64k",
            "-c",
            "write -P 0x33 16M 2M",
            "-c",
            "write -z 17M 512k",
            path_str(&img),
        ],
    );
    // Shared: nbdinfo and a second client connect while the first is still open.
    let server = qemu_nbd(&["--read-only", "--format=qcow2", "--shared=8"], &img);
    let uri = server.uri_string();
    let client = connect(&server.uri());
    let ours = client
        .block_status(META_BASE_ALLOCATION, 0, client.size())
        .unwrap();
    let mut at = 0;
    let ours: Vec<(u64, u64, u32)> = ours
        .into_iter()
        .map(|(l, f)| {
            at += l;
            (at - l, l, f)
        })
        .collect();
    assert_eq!(at, 32 * MIB);
    assert_eq!(ours, nbdinfo_map(&uri, META_BASE_ALLOCATION));
    // The written ranges are data; 17M..17.5M was zeroed inside a data run.
    let source = NbdSource::open(&uri, None).unwrap();
    let data: Vec<(u64, u64)> = source
        .extents(0, source.size())
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(
        data,
        vec![
            (MIB, MIB),
            (8 * MIB, 64 << 10),
            (16 * MIB, MIB),
            (17 * MIB + 512 * 1024, 512 * 1024)
        ]
    );
    // A window in the middle: clipped to what was asked, starting where asked.
    let part = client
        .block_status(META_BASE_ALLOCATION, MIB + 100, 4096)
        .unwrap();
    assert_eq!(part, vec![(4096, 0)]);
}

#[test]
fn dirty_bitmap_changed_extents_cover_exactly_the_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("b.qcow2");
    let p = path_str(&img);
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    run("qemu-io", &["-c", "write -P 1 0 4M", p]);
    run(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "64K", p, "since-last"],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -P 3 10M 100k",
            "-c",
            "write -z 30M 4k",
            "-c",
            "write -P 4 63M 1M",
            p,
        ],
    );
    let image = QemuImage::open(&img, "qcow2", Some("since-last")).unwrap();
    let changed = image.changed_extents().unwrap().unwrap();
    let k64 = 64 << 10;
    assert_eq!(
        changed,
        vec![
            (MIB, k64),
            (10 * MIB, 2 * k64),
            (30 * MIB, k64),
            (63 * MIB, MIB)
        ]
    );
    assert_eq!(image.describe(), img.display().to_string());
    // Without a bitmap there is no change tracking.
    let plain = QemuImage::open(&img, "qcow2", None).unwrap();
    assert!(plain.changed_extents().unwrap().is_none());
    // A bitmap the image lacks: qemu-nbd's own message comes through.
    let e = QemuImage::open(&img, "qcow2", Some("nope")).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Source);
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn write_path_against_writable_qemu_nbd_matches_expected_image() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("w.raw");
    let expected_path = tmp.path().join("expected.raw");
    let size = 8 * MIB as usize;
    std::fs::File::create(&img)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    // Two client slots for our four connections: the silent third must not stall us.
    let mut server = qemu_nbd(&["--format=raw", "--shared=2"], &img);
    let t = Instant::now();
    let client = connect(&server.uri());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(client.connections(), 2);
    assert!(!client.read_only() && client.can_write_zeroes() && client.can_flush());
    let mut rng = Rng(99);
    let mut expected = vec![0u8; size];
    let a = rng.bytes(2 * MIB as usize);
    client.write(0, &a).unwrap();
    expected[..a.len()].copy_from_slice(&a);
    // Pipelined writes: all sent before any reply is waited for.
    let b = rng.bytes(MIB as usize + 512);
    let pending: Vec<_> = b
        .chunks(256 << 10)
        .enumerate()
        .map(|(i, c)| {
            client
                .start_write(3 * MIB + (i as u64) * (256 << 10), c)
                .unwrap()
        })
        .collect();
    for w in pending {
        client.finish_write(w).unwrap();
    }
    expected[3 * MIB as usize..][..b.len()].copy_from_slice(&b);
    client.write_zeroes(512 << 10, 256 << 10, false).unwrap();
    expected[512 << 10..768 << 10].fill(0);
    client.write_zeroes(3 * MIB + 4096, 8192, true).unwrap();
    expected[(3 * MIB + 4096) as usize..][..8192].fill(0);
    if client.can_trim() {
        // Never written: reads as zeros whatever the server does with the hint.
        client.trim(6 * MIB, MIB).unwrap();
    }
    client.flush().unwrap();
    let mut back = vec![0u8; size];
    client.read(0, &mut back).unwrap();
    assert!(back == expected);
    // A reused buffer full of old bytes: holes in the reply must come back as zeros.
    for (off, len) in [(0, 4 * MIB), (4 * MIB, 4 * MIB), (MIB + 7, 1000)] {
        let back = client.read_vec(off, vec![0xaa; len as usize]).unwrap();
        assert!(
            back[..] == expected[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
    }
    client.disconnect().unwrap();
    assert!(client.flush().is_err());
    server.kill();
    std::fs::write(&expected_path, &expected).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            path_str(&img),
            path_str(&expected_path),
        ],
    );
}

#[test]
fn error_filter_gives_a_typed_error_naming_the_server() {
    let server = nbdkit(&[
        "--filter=error",
        "memory",
        "size=16M",
        "error-pread=EIO",
        "error-pread-rate=100%",
    ]);
    let uri = server.uri_string();
    let client = connect(&server.uri());
    let mut b = vec![0u8; 65536];
    let e = client.read(4096, &mut b).unwrap_err();
    match &e {
        Error::Source {
            source_name,
            detail,
        } => {
            assert_eq!(source_name, &uri);
            assert!(detail.contains("EIO"), "{detail}");
        }
        other => panic!("expected a source error, got {other:?}"),
    }
    // A server error fails that request only: the connection still works.
    client.write(0, &[1u8; 4096]).unwrap();
    assert!(client.block_status(META_BASE_ALLOCATION, 0, MIB).is_ok());
    // And the source says the same through BlockSource.
    let source = NbdSource::open(&uri, None).unwrap();
    assert_eq!(
        source.read_at(&mut b, 0).unwrap_err().kind(),
        ErrorKind::Source
    );
}

#[test]
fn server_killed_mid_read_fails_every_waiter_promptly() {
    let mut server = nbdkit(&["--filter=delay", "memory", "size=16M", "delay-read=30"]);
    let client = Arc::new(connect(&server.uri()));
    let started = Instant::now();
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let c = client.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                c.read(i * 4096, &mut b)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    server.kill();
    for r in readers {
        let e = r.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Source);
        assert!(e.to_string().contains("closed"), "{e}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Later calls fail at once.
    let t = Instant::now();
    assert!(client.read(0, &mut [0u8; 512]).is_err());
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[test]
fn a_silent_server_times_out() {
    let server = nbdkit(&["--filter=delay", "memory", "size=1M", "delay-read=20"]);
    let opts = NbdOptions {
        timeout: Duration::from_millis(400),
        ..NbdOptions::default()
    };
    let client = NbdClient::connect(&server.uri(), &opts).unwrap();
    let t = Instant::now();
    let e = client.read(0, &mut [0u8; 512]).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(e.to_string().contains("no reply"), "{e}");
}

#[test]
fn no_structured_replies_means_everything_is_data() {
    let server = nbdkit(&["--no-sr", "memory", "size=4M"]);
    let source = NbdSource::open(&server.uri_string(), None).unwrap();
    let client = source.client();
    assert!(!client.structured_replies() && !client.has_context(META_BASE_ALLOCATION));
    let extents = source.extents(MIB, 10 * MIB).unwrap();
    assert_eq!(extents.len(), 1);
    assert_eq!(
        (extents[0].offset, extents[0].length, extents[0].kind),
        (MIB, 3 * MIB, ExtentKind::Data)
    );
    client.write(4096, &[7u8; 8192]).unwrap();
    let mut b = vec![0u8; 8192 + 2];
    client.read(4095, &mut b).unwrap();
    assert_eq!((b[0], b[1], b[8192], b[8193]), (0, 7, 7, 0));
    assert!(client.block_status(META_BASE_ALLOCATION, 0, 4096).is_err());
}

#[test]
fn block_size_constraints_are_honoured() {
    let server = nbdkit(&[
        "--filter=blocksize-policy",
        "memory",
        "size=16M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ]);
    let client = connect(&server.uri());
    let bs = client.block_sizes();
    assert_eq!((bs.minimum, bs.preferred, bs.maximum), (4096, 65536, 65536));
    assert_eq!(client.max_payload(), 65536);
    let data = Rng(5).bytes(MIB as usize);
    client.write(0, &data).unwrap();
    // Unaligned reads are widened to the minimum block size; the server errors otherwise.
    let mut b = vec![0u8; 300_001];
    client.read(100, &mut b).unwrap();
    assert!(b[..] == data[100..300_101]);
    let e = client.write(100, &[0u8; 4096]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Usage);
    client.write_zeroes(4096, 3 * 65536, false).unwrap();
    let source = NbdSource::from_client(client, None);
    assert_eq!(source.max_read(), 65536);
}

#[test]
fn qemu_source_reads_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (vdi, img) = converted(tmp.path(), "vdi");
    let raw = tmp.path().join("a.raw");
    let source = QemuImage::open(&vdi, "vdi", None).unwrap();
    let (pid, dir) = (source.pid(), source.private_dir().to_path_buf());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    assert!(source.parallelism() >= 8 && source.nbd().client().connections() == 4);
    let mut b = vec![0u8; 2 * MIB as usize];
    source.read_at(&mut b, 4 * MIB).unwrap();
    assert!(b[..] == img[4 * MIB as usize..6 * MIB as usize]);
    drop(source);
    assert!(!process_exists(pid) && !dir.exists());

    let boxed = open_image(&raw, "raw", None).unwrap();
    assert_eq!(boxed.size(), img.len() as u64);
}

#[test]
fn qemu_source_killed_mid_read_errors_and_leaves_no_child() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("a.raw");
    make_raw(&raw);
    let source = Arc::new(QemuImage::open(&raw, "raw", None).unwrap());
    let (pid, dir) = (source.pid(), source.private_dir().to_path_buf());
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let s = source.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4 * MIB as usize];
                let t = Instant::now();
                loop {
                    if let Err(e) = s.read_at(&mut b, 0) {
                        return (e, t.elapsed());
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling the test's own qemu-nbd child, which is running.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    for r in readers {
        let (e, took) = r.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::Source);
        assert!(e.to_string().contains("qemu-nbd"), "{e}");
        assert!(took < Duration::from_secs(5));
    }
    drop(Arc::into_inner(source).unwrap());
    assert!(!process_exists(pid) && !dir.exists());
}

#[test]
fn missing_qemu_nbd_says_what_to_install() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("a.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    let opts = QemuOptions {
        program: "/nonexistent/qemu-nbd".into(),
        ..QemuOptions::default()
    };
    let e = QemuImage::open_with(&raw, "raw", None, &opts)
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Source);
    assert!(e.to_string().contains("qemu-utils"), "{e}");
}

#[test]
fn connect_errors_name_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let uri = NbdUri::unix(tmp.path().join("nobody"), "");
    let e = NbdClient::connect(&uri, &NbdOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Source);
    assert!(e.to_string().contains("nobody"), "{e}");
    // A wrong export name on a real server.
    let server = nbdkit(&[
        "--filter=exportname",
        "memory",
        "size=1M",
        "exportname-strict=true",
        "exportname=good",
    ]);
    let bad = NbdUri::unix(&server.sock, "bad");
    let e = NbdClient::connect(&bad, &NbdOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("bad"), "{e}");
    assert!(
        NbdClient::connect(&NbdUri::unix(&server.sock, "good"), &NbdOptions::default()).is_ok()
    );
}

#[test]
fn metadata_context_ids_are_per_connection() {
    let (_dir, sock) = nbd_support::fake::per_connection_context_ids(META_BASE_ALLOCATION);
    let opts = NbdOptions {
        connections: 2,
        ..NbdOptions::default()
    };
    let client = NbdClient::connect(&NbdUri::unix(&sock, ""), &opts).unwrap();
    assert_eq!(client.connections(), 2);
    // Round robin: both connections answer, each with its own id and flags.
    let mut seen: Vec<u32> = (0..4)
        .map(|_| client.block_status(META_BASE_ALLOCATION, 0, 4096).unwrap())
        .map(|st| {
            assert_eq!(st.len(), 1);
            assert_eq!(st[0].0, 4096);
            st[0].1
        })
        .collect();
    seen.sort();
    assert_eq!(seen, vec![0, 0, 1, 1]);
}

/// Run one client session against a hostile fake server; every call must return.
fn fuzz_session(seed: u64) {
    let fake = nbd_support::fake::Fake::start(seed);
    let uri = NbdUri::unix(&fake.sock, "");
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let opts = NbdOptions {
            contexts: vec![META_BASE_ALLOCATION.into(), "qemu:dirty-bitmap:b".into()],
            connections: 2,
            timeout: Duration::from_millis(250),
            ..NbdOptions::default()
        };
        if let Ok(c) = NbdClient::connect(&uri, &opts) {
            let mut rng = Rng(seed | 1);
            let size = c.size();
            for _ in 0..6 {
                let off = if size > 0 { rng.below(size) } else { 0 };
                let len = rng.below(70_000).min(size - off);
                let mut b = vec![0u8; len as usize];
                let _ = c.read(off, &mut b);
                let _ = c.block_status(META_BASE_ALLOCATION, off, len.max(1));
                let _ = c.write(off, &b);
                let _ = c.write_zeroes(off, len, rng.chance(50));
                let _ = c.flush();
            }
            let _ = c.disconnect();
        }
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => worker.join().expect("the client panicked"),
        Err(_) => {
            // The worker is either hung or has panicked (dropping its sender).
            if worker.is_finished() {
                worker.join().expect("the client panicked");
            }
            panic!("seed {seed:#x}: the client hung");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_server_never_panics_or_hangs_the_client(seed in any::<u64>()) {
        fuzz_session(seed);
    }
}

/// Child mode of `a_signal_stops_qemu_nbd_and_fails_the_run`: open an image, report the
/// helper's pid and folder, and wait to be signalled.
#[test]
#[ignore = "run by a_signal_stops_qemu_nbd_and_fails_the_run in a child process"]
fn signal_child() {
    let Some(image) = std::env::var_os("VMKEEP_TEST_SIGNAL_IMAGE") else {
        return;
    };
    let source = QemuImage::open(Path::new(&image), "raw", None).unwrap();
    println!("READY {} {}", source.pid(), source.private_dir().display());
    std::thread::sleep(Duration::from_secs(30));
    panic!("no signal came");
}

#[test]
fn a_signal_stops_qemu_nbd_and_fails_the_run() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("a.raw");
    std::fs::write(&raw, vec![0u8; MIB as usize]).unwrap();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "signal_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VMKEEP_TEST_SIGNAL_IMAGE", &raw)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // libtest prints "test signal_child ... " before it, on the same line.
        let ready = lines
            .find_map(|l| {
                l.ok()
                    .and_then(|l| l.find("READY ").map(|i| l[i..].to_string()))
            })
            .expect("the child opened the image");
        let mut f = ready.split(' ').skip(1);
        let pid: u32 = f.next().unwrap().parse().unwrap();
        let dir = std::path::PathBuf::from(f.next().unwrap());
        assert!(process_exists(pid) && dir.exists());
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(child.id() as libc::pid_t, sig);
        }
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(1), "signal {sig}");
        let deadline = Instant::now() + Duration::from_secs(5);
        // qemu-nbd was the child's child: once killed, reaping it is init's business.
        while process_running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!process_running(pid), "qemu-nbd outlived the run");
        assert!(!dir.exists(), "the private folder was left behind");
    }
}

// ---------------------------------------------------------------- TLS

/// `base:allocation` of the whole export as (offset, length, flags) rows.
fn map_of(client: &NbdClient) -> Vec<(u64, u64, u32)> {
    let mut at = 0;
    client
        .block_status(META_BASE_ALLOCATION, 0, client.size())
        .unwrap()
        .into_iter()
        .map(|(l, f)| {
            at += l;
            (at - l, l, f)
        })
        .collect()
}

/// A qemu-nbd that requires TLS with a certificate from `pki`'s CA, on TCP.
fn tls_qemu_nbd(pki: &Pki, args: &[&str], image: &Path) -> nbd_support::Server {
    let mut all = qemu_tls_args(&pki.server);
    all.extend(args.iter().map(|a| a.to_string()));
    qemu_nbd_tcp(&all.iter().map(String::as_str).collect::<Vec<_>>(), image)
}

fn tls_error(uri: &NbdUri) -> Error {
    let opts = NbdOptions {
        timeout: Duration::from_secs(10),
        ..NbdOptions::default()
    };
    match NbdClient::connect(uri, &opts) {
        Ok(_) => panic!("{uri} was admitted"),
        Err(e) => e,
    }
}

/// vmkeep's client reads a qemu-nbd export that requires TLS and a client certificate,
/// over several connections (each with its own STARTTLS): bytes equal the image, and
/// block status equals nbdinfo's over the same TLS.
#[test]
fn tls_reads_of_qemu_nbd_match_the_image_and_nbdinfo_map() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path(), "ca");
    let (qcow2, img) = converted(tmp.path(), "qcow2");
    let server = tls_qemu_nbd(
        &pki,
        &["--read-only", "--shared=4", "--format=qcow2"],
        &qcow2,
    );
    let uri = server
        .tcp_uri()
        .with_tls(NbdTls::with_certificates(&pki.client));
    assert!(uri.to_string().starts_with("nbds://127.0.0.1:"), "{uri}");
    let client = Arc::new(connect(&uri));
    assert!(client.can_multi_conn() && client.structured_replies());
    assert_eq!(
        client.connections(),
        4,
        "every extra connection ran STARTTLS"
    );
    assert_eq!(client.size(), img.len() as u64);
    assert_eq!(read_all_parallel(&client, 4), blake3::hash(&img));
    let ours = map_of(&client);
    client.disconnect().unwrap();
    assert_eq!(ours, nbdinfo_map(&uri.to_string(), META_BASE_ALLOCATION));
    assert_eq!(
        blake3::hash(&img),
        nbdcopy_hash(&uri.to_string(), tmp.path())
    );
    // The parsed URI string connects the same way, through the source.
    let source = NbdSource::open(&uri.to_string(), None).unwrap();
    let mut head = vec![0u8; MIB as usize];
    source.read_at(&mut head, 0).unwrap();
    assert!(head[..] == img[..MIB as usize]);
}

/// nbds+unix:// against qemu-nbd on a unix socket with TLS: the server certificate is
/// checked for `localhost` by default, or for `tls-hostname=`.
#[test]
fn tls_over_a_unix_socket_checks_localhost_or_tls_hostname() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path(), "ca");
    let raw = tmp.path().join("a.raw");
    let img = make_raw(&raw);
    let mut args = qemu_tls_args(&pki.server);
    args.extend([
        "--read-only".into(),
        "--format=raw".into(),
        "--shared=2".into(),
    ]);
    let server = qemu_nbd(&args.iter().map(String::as_str).collect::<Vec<_>>(), &raw);
    let uri = server
        .uri()
        .with_tls(NbdTls::with_certificates(&pki.client));
    assert!(
        uri.to_string().starts_with("nbds+unix:///?socket="),
        "{uri}"
    );
    let parsed = NbdUri::parse(&uri.to_string()).unwrap();
    assert_eq!(parsed, uri);
    let client = connect(&parsed);
    let mut all = vec![0u8; img.len()];
    client.read(0, &mut all).unwrap();
    assert!(all == img);
    drop(client);
    // A name the certificate does not carry is refused.
    let wrong = NbdUri::parse(&format!("{uri}&tls-hostname=elsewhere.example")).unwrap();
    let e = tls_error(&wrong).to_string();
    assert!(
        e.contains("elsewhere.example") && e.contains("certificate"),
        "{e}"
    );
}

/// Every refusal is a clear error, and none falls back to plain NBD.
#[test]
fn tls_refusals_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = make_pki(tmp.path(), "ours");
    let theirs = make_pki(tmp.path(), "theirs");
    let raw = tmp.path().join("a.raw");
    make_raw(&raw);
    let tls = tls_qemu_nbd(&ours, &["--read-only", "--format=raw", "--shared=8"], &raw);
    let with = |dir: &Path| tls.tcp_uri().with_tls(NbdTls::with_certificates(dir));

    // A client certificate from another CA (its CA file trusts the server): the server
    // refuses it in the TLS handshake.
    let mixed = tmp.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(ours.client.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(theirs.client.join(f), mixed.join(f)).unwrap();
    }
    let e = tls_error(&with(&mixed));
    assert_eq!(e.kind(), ErrorKind::Source, "{e}");
    assert!(e.to_string().contains("refused the TLS session"), "{e}");
    // Credentials of another CA altogether: our side refuses the server's certificate.
    let e = tls_error(&with(&theirs.client)).to_string();
    assert!(
        e.contains("invalid peer certificate") && e.contains("signed by the CA"),
        "{e}"
    );

    // A plain client meets the TLS-only server: told to use TLS.
    let e = tls_error(&tls.tcp_uri()).to_string();
    assert!(e.contains("requires TLS") && e.contains("nbds://"), "{e}");

    // A TLS client meets a plain server: refused, not read in clear.
    let plain = qemu_nbd_tcp(&["--read-only", "--format=raw"], &raw);
    let uri = plain
        .tcp_uri()
        .with_tls(NbdTls::with_certificates(&ours.client));
    let e = tls_error(&uri).to_string();
    assert!(e.contains("does not offer TLS"), "{e}");

    // A missing folder or file: one line naming the file, before any connection.
    for (dir, file) in [
        (tmp.path().join("nowhere"), "ca-cert.pem"),
        (ours.server.clone(), "client-cert.pem"),
    ] {
        let e = tls_error(&with(&dir));
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("{}/{file}", dir.display())),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1, "{text}");
    }
}

/// A server certificate for another host name is refused; naming that host with
/// `tls-hostname=` is how to accept it.
#[test]
fn tls_server_certificate_for_another_name() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki_for(tmp.path(), "ca", "dns_name = backup.example\n");
    let raw = tmp.path().join("a.raw");
    let img = make_raw(&raw);
    let server = tls_qemu_nbd(&pki, &["--read-only", "--format=raw", "--shared=2"], &raw);
    let uri = server
        .tcp_uri()
        .with_tls(NbdTls::with_certificates(&pki.client));
    let e = tls_error(&uri).to_string();
    assert!(
        e.contains("not valid for name") && e.contains("\"127.0.0.1\""),
        "{e}"
    );
    let named = uri.with_tls(NbdTls {
        certificates: Some(pki.client.clone()),
        hostname: Some("backup.example".into()),
    });
    let client = connect(&named);
    let mut b = vec![0u8; 4096];
    client.read(5 * MIB, &mut b).unwrap();
    assert!(b[..] == img[5 * MIB as usize..][..4096]);
}

/// A server that acknowledges STARTTLS and then stalls in the TLS handshake is a
/// timeout, not a hang.
#[test]
fn a_server_stalling_mid_tls_handshake_times_out() {
    use std::io::{Read, Write};
    use vmkeep::nbd::proto::*;
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path(), "ca");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let stall = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&g).unwrap();
        let mut flags_and_option = [0u8; 4 + OPTION_HEADER_LEN];
        s.read_exact(&mut flags_and_option).unwrap();
        let r = OptionReply {
            option: OPT_STARTTLS,
            kind: REP_ACK,
            length: 0,
        };
        s.write_all(&r.encode()).unwrap();
        // Take the ClientHello and say nothing until the client gives up.
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let uri = NbdUri::tcp("127.0.0.1", port, "").with_tls(NbdTls::with_certificates(&pki.client));
    let opts = NbdOptions {
        timeout: Duration::from_millis(700),
        ..NbdOptions::default()
    };
    let t = Instant::now();
    let e = NbdClient::connect(&uri, &opts)
        .err()
        .expect("a stalled server");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(e.to_string().contains("timed out"), "{e}");
    stall.join().unwrap();
}
