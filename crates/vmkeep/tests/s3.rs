//! The S3 object store against a real Garage server (`support::garage`; skipped with a
//! message only when `VMKEEP_TEST_GARAGE` is unset), and the same conformance body run
//! against the folder store, so both stores behave alike.

#[path = "nbd_support/pki.rs"]
mod pki;
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::garage::Garage;
use vmkeep::offsite::s3::{S3Overrides, S3Settings, S3Store, S3Tuning};
use vmkeep::offsite::store::{DirStore, ObjectStore};
use vmkeep::ErrorKind;

/// Settings for `target` on server `g` (its key, region and endpoint given explicitly,
/// so the environment of the test process plays no part).
fn settings(g: &Garage, target: &str) -> S3Settings {
    g.settings(target)
}

fn store(g: &Garage, prefix: &str) -> S3Store {
    let target = if prefix.is_empty() {
        format!("s3://{}", g.bucket)
    } else {
        format!("s3://{}/{prefix}", g.bucket)
    };
    S3Store::open(&settings(g, &target)).unwrap()
}

/// Bytes that differ from position to position (a shifted range would not compare equal).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn keys(s: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    s.list(prefix).unwrap().into_iter().map(|o| o.key).collect()
}

/// What every [`ObjectStore`] must do, on an empty store.
fn conformance(s: &dyn ObjectStore) {
    assert_eq!(s.get("config").unwrap(), None, "{}: empty", s.describe());
    assert!(s.list("").unwrap().is_empty());

    let pack = pattern(3 * 1024 * 1024 + 17, 1);
    s.put("packs/ab/ab01", &pack).unwrap();
    s.put("config", b"format = 1\n").unwrap();
    s.put("index/empty-0", b"").unwrap();
    s.put("packs/ab/ab02", b"0123456789").unwrap();
    s.put("packs/cd/cd01", b"x").unwrap();

    assert_eq!(s.get("config").unwrap().unwrap(), b"format = 1\n");
    assert_eq!(s.get("packs/ab/ab01").unwrap().unwrap(), pack);
    assert_eq!(s.get("index/empty-0").unwrap().unwrap(), b"");
    assert_eq!(
        s.get("packs/ab/ab0").unwrap(),
        None,
        "a key's prefix is no key"
    );

    assert_eq!(s.get_range("packs/ab/ab02", 2, 3).unwrap(), b"234");
    assert_eq!(s.get_range("packs/ab/ab02", 0, 10).unwrap(), b"0123456789");
    assert_eq!(s.get_range("packs/ab/ab02", 9, 1).unwrap(), b"9");
    let mid = s.get_range("packs/ab/ab01", 1_000_003, 2_000_000).unwrap();
    assert_eq!(mid, &pack[1_000_003..3_000_003]);
    for (start, len) in [(8, 3), (10, 1), (11, 1), (1000, 5)] {
        let e = s.get_range("packs/ab/ab02", start, len).unwrap_err();
        eprintln!("{e}");
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{start}+{len}: {e}");
        assert!(e.to_string().contains("packs/ab/ab02"), "{e}");
    }
    assert!(
        s.get_range("packs/ab/nope", 0, 1).is_err(),
        "range of a missing object"
    );

    assert_eq!(
        keys(s, ""),
        [
            "config",
            "index/empty-0",
            "packs/ab/ab01",
            "packs/ab/ab02",
            "packs/cd/cd01"
        ]
    );
    assert_eq!(keys(s, "packs/ab/"), ["packs/ab/ab01", "packs/ab/ab02"]);
    assert_eq!(keys(s, "packs/ab/ab01"), ["packs/ab/ab01"]);
    assert!(keys(s, "manifests/").is_empty());
    let listed = s.list("packs/").unwrap();
    assert_eq!(
        listed.iter().map(|o| o.size).collect::<Vec<_>>(),
        [pack.len() as u64, 10, 1]
    );
    assert!(listed.iter().all(|o| o.modified.is_some()), "{listed:?}");

    for bad in ["", "/config", "../x", "a//b", "Config", "a b"] {
        let e = s.put(bad, b"x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{bad:?}: {e}");
        assert!(s.get(bad).is_err() && s.delete(bad).is_err(), "{bad:?}");
    }

    s.delete("packs/ab/ab01").unwrap();
    s.delete("packs/ab/ab01").unwrap();
    s.delete("never/written").unwrap();
    assert_eq!(s.get("packs/ab/ab01").unwrap(), None);
    assert_eq!(keys(s, "packs/"), ["packs/ab/ab02", "packs/cd/cd01"]);
}

#[test]
fn the_folder_store_passes_the_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    conformance(&DirStore::open(&dir.path().join("t")).unwrap());
}

#[test]
fn an_s3_bucket_passes_the_store_conformance() {
    let Some(g) = Garage::start() else { return };
    conformance(&store(&g, ""));
}

#[test]
fn an_s3_prefix_passes_the_store_conformance_and_confines_its_keys() {
    let Some(g) = Garage::start() else { return };
    let s = store(&g, "host1/vmkeep");
    assert_eq!(
        s.describe(),
        format!("s3://{}/host1/vmkeep at {}", g.bucket, g.endpoint)
    );
    conformance(&s);
    // The bucket holds them under the prefix, and a neighbour prefix sees none of them.
    let root = store(&g, "");
    assert_eq!(
        keys(&root, ""),
        [
            "host1/vmkeep/config",
            "host1/vmkeep/index/empty-0",
            "host1/vmkeep/packs/ab/ab02",
            "host1/vmkeep/packs/cd/cd01"
        ]
    );
    assert_eq!(
        root.get("host1/vmkeep/config").unwrap().unwrap(),
        b"format = 1\n"
    );
    let neighbour = store(&g, "host1/vmkeep2");
    neighbour.put("config", b"other").unwrap();
    assert_eq!(keys(&neighbour, ""), ["config"]);
    assert_eq!(
        keys(&s, "").len(),
        4,
        "host1/vmkeep2 is not inside host1/vmkeep"
    );
    assert_eq!(s.get("config").unwrap().unwrap(), b"format = 1\n");
    let parent = store(&g, "host1");
    assert_eq!(
        keys(&parent, "vmkeep/packs/"),
        ["vmkeep/packs/ab/ab02", "vmkeep/packs/cd/cd01"]
    );
}

#[test]
fn listings_follow_continuation_tokens_over_many_pages() {
    let Some(g) = Garage::start() else { return };
    let tuned = S3Tuning {
        page_size: Some(7),
        ..S3Tuning::default()
    };
    let s = S3Store::open_tuned(&settings(&g, &format!("s3://{}/p", g.bucket)), tuned).unwrap();
    let mut want: Vec<String> = (0..50)
        .map(|i| format!("packs/{:02x}/{i:04}", i % 5))
        .collect();
    for (i, k) in want.iter().enumerate() {
        s.put(k, &[i as u8]).unwrap();
    }
    s.put("config", b"c").unwrap();
    want.sort();
    assert_eq!(keys(&s, "packs/"), want, "50 keys over 8 pages");
    assert_eq!(keys(&s, "").len(), 51);
    let third: Vec<String> = want
        .iter()
        .filter(|k| k.starts_with("packs/02/"))
        .cloned()
        .collect();
    assert_eq!(third.len(), 10);
    assert_eq!(keys(&s, "packs/02/"), third, "a prefix over two pages");
}

#[test]
fn more_than_a_thousand_objects_written_by_many_threads_are_all_listed() {
    let Some(g) = Garage::start() else { return };
    let s = Arc::new(store(&g, "many"));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for i in (t..1100).step_by(8) {
                    s.put(&format!("index/{i:05}"), format!("{i}").as_bytes())
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let listed = s.list("index/").unwrap();
    assert_eq!(
        listed.len(),
        1100,
        "the server's 1000-key page and the next"
    );
    for (i, o) in listed.iter().enumerate() {
        assert_eq!(o.key, format!("index/{i:05}"));
        assert_eq!(o.size, format!("{i}").len() as u64);
    }
    assert_eq!(s.get("index/01099").unwrap().unwrap(), b"1099");
}

#[test]
fn objects_larger_than_the_http_clients_default_limit_come_back_whole() {
    let Some(g) = Garage::start() else { return };
    let s = store(&g, "big");
    let data = pattern(12 * 1024 * 1024 + 5, 7);
    s.put("packs/00/big", &data).unwrap();
    assert!(s.get("packs/00/big").unwrap().unwrap() == data);
    let tail = s.get_range("packs/00/big", 12 * 1024 * 1024, 5).unwrap();
    assert_eq!(tail, &data[12 * 1024 * 1024..]);
}

#[test]
fn a_wrong_secret_is_one_clear_error_that_shows_no_secret() {
    let Some(g) = Garage::start() else { return };
    let mut bad = settings(&g, &format!("s3://{}/p", g.bucket));
    bad.secret_access_key = "0".repeat(64);
    let s = S3Store::open(&bad).unwrap();
    for e in [
        s.put("packs/ab/ab01", b"x").unwrap_err(),
        s.get("config").unwrap_err(),
        s.list("").unwrap_err(),
    ] {
        let msg = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Source, "{msg}");
        assert!(
            msg.contains(&format!("s3://{}/p at {}", g.bucket, g.endpoint)),
            "{msg}"
        );
        assert!(msg.contains(": 403 "), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert!(
            !msg.contains(&"0".repeat(64)) && !msg.contains("X-Amz-Signature"),
            "{msg}"
        );
    }
    let e = s.put("packs/ab/ab01", b"x").unwrap_err().to_string();
    eprintln!("{e}");
    assert!(e.contains(": put packs/ab/ab01: 403 "), "{e}");
    assert!(
        store(&g, "p").list("").unwrap().is_empty(),
        "nothing was written"
    );
}

#[test]
fn a_missing_bucket_is_an_error_not_an_empty_target() {
    let Some(g) = Garage::start() else { return };
    let s = S3Store::open(&settings(&g, "s3://no-such-bucket/p")).unwrap();
    for e in [
        s.get("config").unwrap_err(),
        s.delete("config").unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::Source, "{e}");
        assert!(e.to_string().contains("404 NoSuchBucket"), "{e}");
    }
}

#[test]
fn a_closed_port_is_an_error_within_seconds() {
    let port = support::garage::free_ports(1)[0];
    let explicit = S3Overrides {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        access_key_id: Some("GKX".into()),
        secret_access_key: Some("s".into()),
        ..S3Overrides::default()
    };
    let s = S3Store::open(&S3Settings::from_target_with("s3://bkt", &explicit, |_| None).unwrap())
        .unwrap();
    let t = Instant::now();
    let e = s.get("config").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(e.kind(), ErrorKind::Source);
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains(&format!(
            "s3://bkt at http://127.0.0.1:{port}: get config: "
        )),
        "{msg}"
    );
    assert!(msg.contains("(after 4 attempts)"), "retried: {msg}");
}

#[test]
fn a_server_that_accepts_and_never_answers_is_an_error_after_the_timeout() {
    // The kernel completes the connection; nobody ever reads or answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let explicit = S3Overrides {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        access_key_id: Some("GKX".into()),
        secret_access_key: Some("s".into()),
        ..S3Overrides::default()
    };
    let tuned = S3Tuning {
        io_timeout: Duration::from_secs(1),
        attempts: 2,
        backoff: Duration::from_millis(100),
        ..S3Tuning::default()
    };
    let settings = S3Settings::from_target_with("s3://bkt", &explicit, |_| None).unwrap();
    let s = S3Store::open_tuned(&settings, tuned).unwrap();
    let t = Instant::now();
    let e = s.put("config", b"x").unwrap_err();
    let took = t.elapsed();
    eprintln!("{e} ({took:?})");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert!(
        e.to_string().contains("put config: no answer in time"),
        "{e}"
    );
    assert!(e.to_string().contains("(after 2 attempts)"), "{e}");
    drop(silent);
}

/// A TCP front for a real server that answers the first `fail` requests itself with
/// `503 SlowDown` and forwards the others, one request per connection; it counts them.
struct Flaky {
    port: u16,
    seen: Arc<AtomicUsize>,
}

impl Flaky {
    fn start(backend: &str, fail: usize) -> Flaky {
        let backend = backend.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let backend = backend.clone();
                std::thread::spawn(move || {
                    let _ = relay(conn, &backend, n < fail);
                });
            }
        });
        Flaky { port, seen }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

/// Read one request from `conn`; answer 503 SlowDown, or send it to `backend` (asking it
/// to close the connection afterwards) and pass its whole answer back.
fn relay<S: Read + Write>(conn: S, backend: &str, fail: bool) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    let mut head = Vec::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if !lower.starts_with("connection:") {
            head.extend_from_slice(line.as_bytes());
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let conn = reader.get_mut();
    if fail {
        let doc = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>\
                   <Message>Please reduce your request rate.</Message></Error>";
        write!(
            conn,
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{doc}",
            doc.len()
        )?;
        return Ok(());
    }
    let mut up = TcpStream::connect(backend)?;
    up.write_all(&head)?;
    up.write_all(b"Connection: close\r\n\r\n")?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    conn.write_all(&answer)?;
    conn.flush()
}

fn through(g: &Garage, front: &Flaky, attempts: u32) -> S3Store {
    let mut s = settings(g, &format!("s3://{}/f", g.bucket));
    s.endpoint = front.endpoint();
    let tuned = S3Tuning {
        attempts,
        backoff: Duration::from_millis(20),
        ..S3Tuning::default()
    };
    S3Store::open_tuned(&s, tuned).unwrap()
}

#[test]
fn slow_down_answers_are_retried_until_the_server_takes_the_request() {
    let Some(g) = Garage::start() else { return };
    let front = Flaky::start(&g.endpoint, 2);
    let s = through(&g, &front, 4);
    s.put("config", b"format = 1\n").unwrap();
    assert_eq!(front.seen(), 3, "two 503s, then the server's answer");
    assert_eq!(s.get("config").unwrap().unwrap(), b"format = 1\n");
    assert_eq!(front.seen(), 4);
    assert_eq!(
        store(&g, "f").get("config").unwrap().unwrap(),
        b"format = 1\n"
    );
}

#[test]
fn a_server_that_keeps_slowing_down_is_one_error_after_the_last_attempt() {
    let Some(g) = Garage::start() else { return };
    let front = Flaky::start(&g.endpoint, usize::MAX);
    let s = through(&g, &front, 3);
    let e = s.put("packs/ab/ab01", b"x").unwrap_err();
    eprintln!("{e}");
    assert_eq!(front.seen(), 3);
    assert_eq!(e.kind(), ErrorKind::Source);
    assert!(
        e.to_string()
            .ends_with(": put packs/ab/ab01: 503 SlowDown: Please reduce your request rate."),
        "{e}"
    );
}

#[test]
fn client_errors_are_not_retried() {
    let Some(g) = Garage::start() else { return };
    let front = Flaky::start(&g.endpoint, 0);
    let mut s = settings(&g, &format!("s3://{}/f", g.bucket));
    s.endpoint = front.endpoint();
    s.secret_access_key = "1".repeat(64);
    let s = S3Store::open(&s).unwrap();
    let e = s.get("config").unwrap_err();
    assert!(e.to_string().contains(": get config: 403 "), "{e}");
    assert_eq!(front.seen(), 1, "a 403 is final");
}

/// An HTTPS front for a real server (what a TLS-terminating proxy before Garage or MinIO
/// is): TLS with the server credentials of a certtool CA, one request per connection,
/// passed on in plain HTTP.
struct TlsFront {
    port: u16,
}

impl TlsFront {
    fn start(backend: &str, server_dir: &std::path::Path) -> TlsFront {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(server_dir.join("server-cert.pem"))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_file(server_dir.join("server-key.pem")).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
        );
        let backend = backend.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (config, backend) = (Arc::clone(&config), backend.clone());
                std::thread::spawn(move || {
                    let tls = rustls::ServerConnection::new(config).unwrap();
                    let mut stream = rustls::StreamOwned::new(tls, conn);
                    if relay(&mut stream, &backend, false).is_ok() {
                        stream.conn.send_close_notify();
                        let _ = stream.flush();
                    }
                });
            }
        });
        TlsFront { port }
    }
}

/// HTTPS to a server whose certificate chains to a private CA: with that CA as `ca_file`
/// every operation works (a 3 MiB object comes back whole, listings, deletes); without it
/// (Mozilla's roots) or with another CA's file, one error line naming the certificate
/// problem and no secret, and nothing is sent in plain.
#[test]
fn https_with_a_private_ca_works_and_a_certificate_of_another_ca_is_refused() {
    let Some(g) = Garage::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ours = pki::make_pki(dir.path(), "s3ca");
    let theirs = pki::make_pki(dir.path(), "otherca");
    let front = TlsFront::start(&g.endpoint, &ours.server);
    let with_ca = |host: &str, ca: Option<std::path::PathBuf>| {
        let mut s = settings(&g, &format!("s3://{}/tls", g.bucket));
        s.endpoint = format!("https://{host}:{}", front.port);
        s.ca_file = ca;
        S3Store::open(&s).unwrap()
    };
    for host in ["localhost", "127.0.0.1"] {
        let s = with_ca(host, Some(ours.server.join("ca-cert.pem")));
        let big = pattern(3 << 20, 9);
        s.put(&format!("{host}/big"), &big).unwrap();
        assert!(s.get(&format!("{host}/big")).unwrap().unwrap() == big);
        assert_eq!(
            s.get_range(&format!("{host}/big"), 1 << 20, 10).unwrap(),
            big[1 << 20..(1 << 20) + 10].to_vec()
        );
        assert_eq!(keys(&s, &format!("{host}/")), vec![format!("{host}/big")]);
        s.delete(&format!("{host}/big")).unwrap();
        assert!(s.get(&format!("{host}/big")).unwrap().is_none());
    }
    // The bytes went through the TLS front into the bucket: plain HTTP sees them.
    let plain = store(&g, "tls");
    plain.put("seen", b"via http").unwrap();
    assert_eq!(
        with_ca("localhost", Some(ours.server.join("ca-cert.pem")))
            .get("seen")
            .unwrap()
            .unwrap(),
        b"via http"
    );
    for ca in [None, Some(theirs.server.join("ca-cert.pem"))] {
        let e = with_ca("localhost", ca.clone())
            .put("refused", b"x")
            .unwrap_err();
        let e = e.to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            e.to_ascii_lowercase().contains("certificate") || e.contains("issuer"),
            "{ca:?}: {e}"
        );
        assert!(!e.contains(&g.secret_access_key), "{e}");
        assert!(
            e.starts_with("offsite target s3://"),
            "names the target: {e}"
        );
        assert!(
            !e.contains("attempts"),
            "a refused certificate is not retried: {e}"
        );
    }
    assert!(
        plain.get("refused").unwrap().is_none(),
        "nothing was stored"
    );
}
