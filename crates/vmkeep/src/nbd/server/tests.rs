//! Protocol tests against an in-memory export, with a minimal client written from the
//! spec. The end-to-end tests with qemu and libnbd tools live in the CLI crate.

use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::nbd::proto::*;

const SIZE: usize = 1 << 20;

struct MemExport {
    name: String,
    data: Vec<u8>,
    bad: Range<u64>,
}

impl Export for MemExport {
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> String {
        format!("memory {}", self.name)
    }
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(Error::corrupt("mem", "bytes fail their digest"));
        }
        buf.copy_from_slice(&self.data[offset as usize..end as usize]);
        Ok(())
    }
    fn extents(&self, offset: u64, len: u64) -> crate::Result<Vec<Extent>> {
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let e = ((pos / 4096 + 1) * 4096).min(offset + len);
            let zero = crate::fsutil::is_zero(&self.data[pos as usize..e as usize]);
            let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
            out.push(Extent {
                len: e - pos,
                flags,
            });
            pos = e;
        }
        Ok(out)
    }
}

/// 1 MiB: data in the first 64 KiB and at 512 KiB, zeros elsewhere; bytes 256..512 KiB
/// fail as damaged.
fn mem(name: &str) -> Arc<dyn Export> {
    let mut data = vec![0u8; SIZE];
    for (i, b) in data[..64 << 10].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    data[512 << 10..(512 << 10) + 4096].fill(0xab);
    Arc::new(MemExport {
        name: name.into(),
        data,
        bad: (256 << 10)..(512 << 10),
    })
}

struct Running {
    handle: ShutdownHandle,
    thread: Option<JoinHandle<crate::Result<()>>>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn stop(mut self) {
        self.handle.shutdown();
        self.thread.take().unwrap().join().unwrap().unwrap();
        assert!(!self.path.exists(), "socket left behind");
    }
}

fn start(config: ServerConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let server = Server::bind(
        &Listen::Unix(path.clone()),
        vec![mem("vda"), mem("vdb")],
        config,
    )
    .unwrap();
    let handle = server.shutdown_handle();
    let thread = Some(std::thread::spawn(move || server.run()));
    Running {
        handle,
        thread,
        path,
        _dir: dir,
    }
}

struct Client {
    s: UnixStream,
}

impl Client {
    fn connect(r: &Running) -> Client {
        let s = UnixStream::connect(&r.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client { s }
    }

    /// Read the greeting and answer with `cflags`; returns the handshake flags.
    fn hello(&mut self, cflags: u32) -> u16 {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).unwrap();
        assert_eq!(be64(&g[0..8]), NBDMAGIC);
        assert_eq!(be64(&g[8..16]), IHAVEOPT);
        self.s.write_all(&cflags.to_be_bytes()).unwrap();
        be16(&g[16..18])
    }

    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h[0..8]), REPLY_MAGIC_OPT);
        let mut p = vec![0u8; be32(&h[16..20]) as usize];
        self.s.read_exact(&mut p).unwrap();
        (be32(&h[8..12]), be32(&h[12..16]), p)
    }

    /// Replies up to and including the final one (ACK or an error).
    fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (_, kind, p) = self.reply();
            out.push((kind, p));
            if kind == REP_ACK || kind & REP_FLAG_ERROR != 0 {
                return out;
            }
        }
    }

    fn meta(&mut self, opt: u32, name: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.opt(opt, &d);
        self.replies()
    }

    fn go_data(name: &str, items: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Full handshake to transmission; returns (size, transmission flags).
    fn open(r: &Running, name: &str, structured: bool) -> (Client, u64, u16) {
        let mut c = Client::connect(r);
        c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        if structured {
            c.opt(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.reply().1, REP_ACK);
            let got = c.meta(OPT_SET_META_CONTEXT, name, &[META_BASE_ALLOCATION]);
            assert_eq!(got.len(), 2, "one context then ACK");
        }
        c.opt(OPT_GO, &Client::go_data(name, &[INFO_BLOCK_SIZE]));
        let mut export = None;
        for (kind, p) in c.replies() {
            assert_ne!(kind & REP_FLAG_ERROR, REP_FLAG_ERROR, "GO failed");
            if kind == REP_INFO && be16(&p) == INFO_EXPORT {
                export = Some((be64(&p[2..10]), be16(&p[10..12])));
            }
        }
        let (size, flags) = export.expect("NBD_INFO_EXPORT");
        (c, size, flags)
    }

    fn req(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
    }

    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC);
        (be32(&h[4..8]), be64(&h[8..16]))
    }

    /// One structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
        let mut p = vec![0u8; be32(&h[16..20]) as usize];
        self.s.read_exact(&mut p).unwrap();
        (be16(&h[4..6]), be16(&h[6..8]), be64(&h[8..16]), p)
    }

    /// A structured read: the bytes, or the error value; also how many hole chunks.
    fn read(&mut self, offset: u64, len: u32) -> (Result<Vec<u8>, u32>, usize) {
        self.req(CMD_READ, 0, 77, offset, len);
        let mut buf = vec![0x55u8; len as usize];
        let (mut holes, mut err) = (0, None);
        loop {
            let (flags, kind, cookie, p) = self.chunk();
            assert_eq!(cookie, 77);
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = (be64(&p) - offset) as usize;
                    buf[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let at = (be64(&p) - offset) as usize;
                    buf[at..at + be32(&p[8..]) as usize].fill(0);
                    holes += 1;
                }
                REPLY_TYPE_ERROR => err = Some(be32(&p)),
                REPLY_TYPE_NONE => {}
                k => panic!("unexpected chunk type {k}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return (err.map_or(Ok(buf), Err), holes);
            }
        }
    }

    /// Whether the server ends the connection (whatever it still sends first).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        for _ in 0..256 {
            match self.s.read(&mut b) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
        false
    }
}

fn expected() -> Vec<u8> {
    let e = mem("x");
    let mut v = vec![0u8; SIZE];
    e.read(0, &mut v[..256 << 10]).unwrap();
    e.read(512 << 10, &mut v[512 << 10..]).unwrap();
    v
}

#[test]
fn structured_reads_send_data_and_holes() {
    let r = start(ServerConfig::default());
    let (mut c, size, flags) = Client::open(&r, "vdb", true);
    assert_eq!(size, SIZE as u64);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    let want = expected();
    let (got, holes) = c.read(0, 256 << 10);
    assert_eq!(got.unwrap(), want[..256 << 10]);
    assert!(holes >= 1, "the zero tail is sent as a hole");
    let (got, _) = c.read((512 << 10) + 100, 8192);
    assert_eq!(got.unwrap(), want[(512 << 10) + 100..(512 << 10) + 8292]);
    // Zero-length read: success, no data.
    assert_eq!(c.read(0, 0).0.unwrap(), Vec::<u8>::new());
    r.stop();
}

#[test]
fn simple_reads_and_refused_writes() {
    let r = start(ServerConfig::default());
    let (mut c, _, flags) = Client::open(&r, "vda", false);
    assert_eq!(flags & TFLAG_SEND_DF, 0, "DF needs structured replies");
    c.req(CMD_READ, 0, 1, 4096, 8192);
    assert_eq!(c.simple(), (0, 1));
    let mut data = vec![0u8; 8192];
    c.s.read_exact(&mut data).unwrap();
    assert_eq!(data, expected()[4096..12288]);
    // A write's payload is consumed and refused; the stream stays in step.
    c.req(CMD_WRITE, 0, 2, 0, 4096);
    c.s.write_all(&[1u8; 4096]).unwrap();
    assert_eq!(c.simple(), (EPERM, 2));
    for (kind, cookie) in [(CMD_TRIM, 3), (CMD_WRITE_ZEROES, 4)] {
        c.req(kind, 0, cookie, 0, 4096);
        assert_eq!(c.simple(), (EPERM, cookie));
    }
    c.req(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(c.simple(), (0, 5));
    c.req(99, 0, 6, 0, 0);
    assert_eq!(c.simple(), (EINVAL, 6));
    // Past the end, above 32 MiB, and a block status nobody negotiated.
    c.req(CMD_READ, 0, 7, SIZE as u64 - 10, 20);
    assert_eq!(c.simple(), (EINVAL, 7));
    c.req(CMD_READ, 0, 8, u64::MAX - 5, 10);
    assert_eq!(c.simple(), (EINVAL, 8));
    c.req(CMD_READ, 0, 9, 0, MAX_BLOCK_SIZE + 1);
    assert_eq!(c.simple(), (EINVAL, 9));
    c.req(CMD_BLOCK_STATUS, 0, 10, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 10));
    c.req(CMD_DISC, 0, 11, 0, 0);
    assert!(c.closed());
    r.stop();
}

#[test]
fn damaged_reads_fail_with_eio_and_the_connection_goes_on() {
    let r = start(ServerConfig::default());
    let (mut c, _, _) = Client::open(&r, "vda", true);
    assert_eq!(c.read(300 << 10, 4096).0, Err(EIO));
    assert_eq!(c.read(0, 4096).0.unwrap(), expected()[..4096]);
    let (mut s, _, _) = Client::open(&r, "vda", false);
    s.req(CMD_READ, 0, 1, 256 << 10, 4096);
    assert_eq!(s.simple(), (EIO, 1));
    s.req(CMD_READ, 0, 2, 0, 16);
    assert_eq!(s.simple(), (0, 2));
    r.stop();
}

#[test]
fn block_status_reports_holes_and_honours_req_one() {
    let r = start(ServerConfig::default());
    let (mut c, _, _) = Client::open(&r, "vda", true);
    c.req(CMD_BLOCK_STATUS, 0, 1, 0, SIZE as u32);
    let (flags, kind, _, p) = c.chunk();
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(be32(&p), BASE_ALLOC_ID);
    let d: Vec<(u32, u32)> = p[4..].chunks(8).map(|x| (be32(x), be32(&x[4..]))).collect();
    let zero = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        d,
        vec![
            (64 << 10, 0),
            (448 << 10, zero),
            (4096, 0),
            ((512 << 10) - 4096, zero)
        ]
    );
    c.req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, 1000, 100_000);
    let (_, _, _, p) = c.chunk();
    assert_eq!(p.len(), 12);
    assert_eq!((be32(&p[4..]), be32(&p[8..])), ((64 << 10) - 1000, 0));
    c.req(CMD_BLOCK_STATUS, 0, 3, SIZE as u64, 1);
    let (_, kind, _, p) = c.chunk();
    assert_eq!((kind, be32(&p)), (REPLY_TYPE_ERROR, EINVAL));
    r.stop();
}

const BASE_ALLOC_ID: u32 = super::handshake::BASE_ALLOCATION_ID;

#[test]
fn options_list_info_and_refusals() {
    let r = start(ServerConfig::default());
    let mut c = Client::connect(&r);
    let hs = c.hello(FLAG_C_FIXED_NEWSTYLE);
    assert_eq!(hs, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    c.opt(OPT_LIST, &[]);
    let names: Vec<String> = c
        .replies()
        .into_iter()
        .filter(|(k, _)| *k == REP_SERVER)
        .map(|(_, p)| String::from_utf8(p[4..4 + be32(&p) as usize].to_vec()).unwrap())
        .collect();
    assert_eq!(names, ["vda", "vdb"]);
    c.opt(OPT_LIST, b"x");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    c.opt(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().1, REP_ERR_POLICY);
    c.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.reply().1, REP_ERR_UNSUP);
    c.opt(4242, b"whatever");
    assert_eq!(c.reply().1, REP_ERR_UNSUP);
    c.opt(OPT_INFO, &Client::go_data("nope", &[]));
    assert_eq!(c.replies().last().unwrap().0, REP_ERR_UNKNOWN);
    c.opt(OPT_INFO, b"\0\0\0\x09vda");
    assert_eq!(c.reply().1, REP_ERR_INVALID);
    // Meta contexts need structured replies first.
    assert_eq!(
        c.meta(OPT_SET_META_CONTEXT, "vda", &["base:allocation"])[0].0,
        REP_ERR_INVALID
    );
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    let listed = c.meta(OPT_LIST_META_CONTEXT, "vda", &[]);
    assert_eq!(listed[0].0, REP_META_CONTEXT);
    assert_eq!(&listed[0].1[4..], b"base:allocation");
    let none = c.meta(
        OPT_SET_META_CONTEXT,
        "vda",
        &["qemu:dirty-bitmap:x", "base:"],
    );
    assert_eq!(none.len(), 1, "nothing selected: only the ACK");
    // INFO with name and description, then GO on the default export.
    c.opt(
        OPT_INFO,
        &Client::go_data("vdb", &[INFO_NAME, INFO_DESCRIPTION]),
    );
    let infos = c.replies();
    let kinds: Vec<u16> = infos
        .iter()
        .filter(|(k, _)| *k == REP_INFO)
        .map(|(_, p)| be16(p))
        .collect();
    assert_eq!(
        kinds,
        [INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]
    );
    let bs = &infos[1].1;
    assert_eq!(
        (be32(&bs[2..]), be32(&bs[6..]), be32(&bs[10..])),
        (1, 4096, MAX_BLOCK_SIZE)
    );
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    assert!(c.closed());
    r.stop();
}

#[test]
fn export_name_enters_transmission_or_closes() {
    let r = start(ServerConfig::default());
    let mut c = Client::connect(&r);
    c.hello(FLAG_C_FIXED_NEWSTYLE); // zeroes wanted
    c.opt(OPT_EXPORT_NAME, b"vdb");
    let mut b = [0u8; 8 + 2 + 124];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(be64(&b), SIZE as u64);
    assert!(b[10..].iter().all(|&x| x == 0));
    c.req(CMD_READ, 0, 1, 0, 4);
    assert_eq!(c.simple(), (0, 1));
    let mut c = Client::connect(&r);
    c.hello(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.opt(OPT_EXPORT_NAME, b"missing");
    assert!(
        c.closed(),
        "an unknown name cannot be refused any other way"
    );
    r.stop();
}

#[test]
fn protocol_violations_close_only_their_connection() {
    let r = start(ServerConfig::default());
    let (mut good, _, _) = Client::open(&r, "vda", true);
    // Non-fixed newstyle, unknown client flags, garbage, a bad request magic, an
    // oversized write payload, an oversized option.
    let mut c = Client::connect(&r);
    c.hello(0);
    assert!(c.closed());
    let mut c = Client::connect(&r);
    c.hello(1 << 7);
    assert!(c.closed());
    let mut c = Client::connect(&r);
    c.s.write_all(&[0xffu8; 4096]).unwrap();
    assert!(c.closed());
    let (mut c, _, _) = Client::open(&r, "vda", false);
    c.s.write_all(&[0u8; REQUEST_LEN]).unwrap();
    assert!(c.closed());
    let (mut c, _, _) = Client::open(&r, "vda", false);
    c.req(CMD_WRITE, 0, 1, 0, u32::MAX);
    assert!(c.closed());
    let mut c = Client::connect(&r);
    c.hello(FLAG_C_FIXED_NEWSTYLE);
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_LIST.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).unwrap();
    assert!(c.closed());
    assert_eq!(good.read(0, 4096).0.unwrap(), expected()[..4096]);
    r.stop();
}

#[test]
fn pipelined_requests_all_get_their_replies() {
    let r = start(ServerConfig::default());
    let (mut c, _, _) = Client::open(&r, "vda", true);
    let n = 200u64;
    for i in 0..n {
        c.req(CMD_READ, 0, i, (i % 64) * 1024, 1024);
    }
    let want = expected();
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (flags, kind, cookie, p) = c.chunk();
        assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
        assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
        let off = ((cookie % 64) * 1024) as usize;
        assert_eq!(be64(&p) as usize, off);
        assert_eq!(&p[8..], &want[off..off + 1024]);
        seen[cookie as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    r.stop();
}

#[test]
fn connection_cap_and_handshake_timeout() {
    let r = start(ServerConfig {
        max_connections: 2,
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let (mut a, _, _) = Client::open(&r, "vda", true);
    let mut b = Client::connect(&r);
    b.hello(FLAG_C_FIXED_NEWSTYLE); // then silence
    std::thread::sleep(Duration::from_millis(100));
    let mut over = Client::connect(&r);
    assert!(over.closed(), "a third connection is closed at once");
    let t = Instant::now();
    assert!(b.closed());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "silent handshake is cut off"
    );
    std::thread::sleep(Duration::from_millis(100));
    let (mut c, _, _) = Client::open(&r, "vdb", true);
    assert!(c.read(0, 10).0.is_ok());
    assert!(a.read(0, 10).0.is_ok());
    r.stop();
}

#[test]
fn shutdown_lets_requests_finish_and_removes_the_socket() {
    let r = start(ServerConfig::default());
    let (mut c, _, _) = Client::open(&r, "vda", true);
    c.req(CMD_READ, 0, 1, 0, 64 << 10);
    r.stop();
    let (flags, kind, _, _) = c.chunk();
    assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
    assert_ne!(kind, REPLY_TYPE_ERROR);
    assert!(c.closed());
}

/// An export of `size` bytes of a pattern, without damage.
fn pattern(name: &str, size: usize) -> Arc<dyn Export> {
    let data = (0..size).map(|i| (i / 4096 * 7 + i) as u8 | 1).collect();
    Arc::new(MemExport {
        name: name.into(),
        data,
        bad: 0..0,
    })
}

/// Clients that pipeline reads and never take the replies hold their own connection's
/// budget and no more: a normal client still reads the whole export, and the slow ones
/// keep their connections and get every reply, right, once they read.
#[test]
fn slow_readers_do_not_starve_other_clients() {
    const EXPORT: usize = 16 << 20;
    const READ: u32 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let config = ServerConfig {
        max_buffered_bytes: 32 << 20,
        max_buffered_per_connection: 4 << 20,
        // Nothing is cut off by a timeout: the slow clients hold on for as long as they
        // like, so only the per-connection limit can keep the budget free.
        write_timeout: Duration::from_secs(3600),
        idle_timeout: None,
        ..Default::default()
    };
    let server = Server::bind(
        &Listen::Unix(path.clone()),
        vec![pattern("big", EXPORT)],
        config,
    )
    .unwrap();
    let handle = server.shutdown_handle();
    let thread = Some(std::thread::spawn(move || server.run()));
    let r = Running {
        handle,
        thread,
        path,
        _dir: dir,
    };
    let mut want = vec![0u8; EXPORT];
    pattern("x", EXPORT).read(0, &mut want).unwrap();

    // Four clients send eight 4 MiB reads each and read nothing: together they ask for
    // 128 MiB of replies, four times the shared budget.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let (mut c, _, _) = Client::open(&r, "big", true);
        for i in 0..8u64 {
            c.req(CMD_READ, CMD_FLAG_DF, i, (i % 4) * READ as u64, READ);
        }
        slow.push(c);
    }
    // Let the server take up their requests (the reads fill the socket buffers and stall).
    std::thread::sleep(Duration::from_millis(500));

    let (tx, rx) = std::sync::mpsc::channel();
    let (mut normal, _, _) = Client::open(&r, "big", true);
    std::thread::spawn(move || {
        let mut got = Vec::with_capacity(EXPORT);
        for off in (0..EXPORT as u64).step_by(1 << 20) {
            got.extend(normal.read(off, 1 << 20).0.expect("a normal read"));
        }
        let _ = tx.send(got);
    });
    // A bound for a hang, not a speed goal: the read takes well under a second.
    let got = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the normal client was starved by clients that do not read their replies");
    assert!(got == want, "the normal client read wrong bytes");

    for c in &mut slow {
        let mut seen = [false; 8];
        for _ in 0..8 {
            let (flags, kind, cookie, p) = c.chunk();
            assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
            assert_eq!(kind, REPLY_TYPE_OFFSET_DATA, "slow client: a data chunk");
            let off = ((cookie % 4) * READ as u64) as usize;
            assert_eq!(be64(&p) as usize, off);
            assert!(
                p[8..] == want[off..off + READ as usize],
                "slow client: wrong bytes"
            );
            seen[cookie as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
    r.stop();
}

/// A CA and a server certificate made with certtool, in QEMU's server layout.
fn server_pki(dir: &std::path::Path) -> crate::tls::TlsFiles {
    let pki = crate::tls::pki::make_pki(dir, "test");
    crate::tls::TlsFiles::server_dir(&pki.server)
}

/// FORCEDTLS as the spec describes it: before `NBD_OPT_STARTTLS`, every option but
/// `ABORT` gets `NBD_REP_ERR_TLS_REQD` and no export information, and `EXPORT_NAME` ends
/// the session; `STARTTLS` is acknowledged and a client that then speaks no TLS is closed.
#[test]
fn a_tls_server_refuses_every_option_before_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let tls = crate::tls::server_config(&server_pki(dir.path())).unwrap();
    let config = ServerConfig {
        tls: Some(tls),
        ..Default::default()
    };
    let listen = resolve_listen("127.0.0.1:0", false).unwrap();
    let server = Server::bind(&listen, vec![mem("vda")], config).unwrap();
    let addr = server.local_addr().unwrap();
    assert!(server.uri("vda").starts_with("nbds://127.0.0.1:"));
    // What the server prints is what the client parses: TLS, this address, this export.
    let printed = crate::nbd::uri::NbdUri::parse(&server.uri("vda")).unwrap();
    assert_eq!(
        printed,
        crate::nbd::uri::NbdUri::tcp("127.0.0.1", addr.port(), "vda")
            .with_tls(crate::nbd::uri::NbdTls::default())
    );
    let handle = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.run());
    let connect = || {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        (&s).read_exact(&mut g).unwrap();
        (&s).write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
            .unwrap();
        s
    };
    let opt = |s: &std::net::TcpStream, opt: u32, data: &[u8]| {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        let mut s = s;
        s.write_all(&b).unwrap();
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let mut p = vec![0u8; be32(&h[16..20]) as usize];
        s.read_exact(&mut p).unwrap();
        (be32(&h[8..12]), be32(&h[12..16]), p)
    };
    let s = connect();
    let go = Client::go_data("vda", &[INFO_NAME]);
    for (o, data) in [
        (OPT_LIST, &[][..]),
        (OPT_GO, &go[..]),
        (OPT_INFO, &go[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (99, &[][..]),
    ] {
        let (echo, kind, p) = opt(&s, o, data);
        assert_eq!((echo, kind), (o, REP_ERR_TLS_REQD), "option {o}");
        let msg = String::from_utf8_lossy(&p);
        assert!(!msg.contains("vda") && !msg.contains("memory"), "{msg}");
    }
    assert_eq!(opt(&s, OPT_STARTTLS, b"x").1, REP_ERR_INVALID);
    assert_eq!(opt(&s, OPT_ABORT, &[]).1, REP_ACK);

    // EXPORT_NAME cannot be refused with a reply: the session ends, with nothing sent.
    let mut s = connect();
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    b.extend_from_slice(&3u32.to_be_bytes());
    b.extend_from_slice(b"vda");
    s.write_all(&b).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "sent {} bytes after EXPORT_NAME",
        rest.len()
    );

    // STARTTLS is acknowledged; garbage instead of a TLS ClientHello closes.
    let mut s = connect();
    assert_eq!(opt(&s, OPT_STARTTLS, &[]).1, REP_ACK);
    s.write_all(&[0x55; 512]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        !rest.windows(3).any(|w| w == b"vda"),
        "export named after a failed TLS"
    );

    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// Our client against our server, both over TLS: several connections (each with its own
/// STARTTLS) read what the export holds, pipelined from several threads; a plain client
/// is refused with a message that names TLS.
#[test]
fn our_tls_client_reads_our_tls_server() {
    use crate::nbd::client::{NbdClient, NbdOptions};
    use crate::nbd::uri::{NbdTls, NbdUri};
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::tls::pki::make_pki(dir.path(), "both");
    let tls = crate::tls::server_config(&crate::tls::TlsFiles::server_dir(&pki.server)).unwrap();
    let listen = resolve_listen("127.0.0.1:0", false).unwrap();
    let config = ServerConfig {
        tls: Some(tls),
        ..Default::default()
    };
    let server = Server::bind(&listen, vec![mem("vda")], config).unwrap();
    let port = server.local_addr().unwrap().port();
    let handle = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.run());
    let uri =
        NbdUri::tcp("127.0.0.1", port, "vda").with_tls(NbdTls::with_certificates(&pki.client));
    let client = Arc::new(NbdClient::connect(&uri, &NbdOptions::default()).unwrap());
    assert_eq!(client.size(), SIZE as u64);
    assert!(
        client.connections() > 1,
        "{} connection(s)",
        client.connections()
    );
    let want = {
        let mut d = vec![0u8; 64 << 10];
        for (i, b) in d.iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        d
    };
    std::thread::scope(|s| {
        for _ in 0..4 {
            let (c, want) = (client.clone(), &want);
            s.spawn(move || {
                for _ in 0..20 {
                    let mut b = vec![0u8; 64 << 10];
                    c.read(0, &mut b).unwrap();
                    assert!(b == *want);
                    let mut z = vec![1u8; 4096];
                    c.read(512 << 10, &mut z).unwrap();
                    assert!(z.iter().all(|&x| x == 0xab));
                }
            });
        }
    });
    // A block that fails on the server is that request's error; the session goes on.
    assert!(client.read(256 << 10, &mut [0u8; 512]).is_err());
    let mut b = vec![0u8; 512];
    client.read(0, &mut b).unwrap();
    assert!(b[..] == want[..512]);
    drop(client);
    let plain = NbdUri::tcp("127.0.0.1", port, "vda");
    let e = NbdClient::connect(&plain, &NbdOptions::default())
        .err()
        .expect("a plain client is refused");
    assert!(e.to_string().contains("requires TLS"), "{e}");
    handle.shutdown();
    thread.join().unwrap().unwrap();
}
