//! A hostile NBD server for the fuzz test. Driven by a seed, it mixes correct protocol
//! with garbage: wrong magic, random and truncated option replies, invalid block sizes,
//! replies with foreign cookies, chunks outside the request or overlapping, oversized
//! lengths, missing DONE flags, silence and hang-ups. It parses what the client sends, so
//! its replies can name real cookies and reach the client's deepest checks.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tempfile::TempDir;
use vmkeep::nbd::proto::*;

use super::Rng;

pub struct Fake {
    pub sock: PathBuf,
    _dir: TempDir,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Fake {
    pub fn start(seed: u64) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fake");
        let listener = UnixListener::bind(&sock).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let acceptor = std::thread::spawn(move || {
            for (i, s) in listener.incoming().enumerate() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(s) = s else { break };
                let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(i as u64) | 1);
                std::thread::spawn(move || {
                    let _ = Session::new(s, &mut rng).run();
                });
            }
        });
        Fake {
            sock,
            _dir: dir,
            stop,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.sock);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

type Io<T> = std::io::Result<T>;

struct Session<'a> {
    s: UnixStream,
    rng: &'a mut Rng,
    structured: bool,
    contexts: Vec<u32>,
}

impl<'a> Session<'a> {
    fn new(s: UnixStream, rng: &'a mut Rng) -> Session<'a> {
        // A session never outlives a silent client by much.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Session {
            s,
            rng,
            structured: false,
            contexts: Vec::new(),
        }
    }

    fn run(mut self) -> Io<()> {
        if self.rng.chance(8) {
            let n = self.rng.below(64) as usize;
            let junk = self.rng.bytes(n);
            self.s.write_all(&junk)?;
            return self.maybe_hang();
        }
        let started = self.greeting()? || self.options()?;
        if started {
            self.transmission()?;
        }
        Ok(())
    }

    /// Send the greeting; true when the client went straight to transmission.
    fn greeting(&mut self) -> Io<bool> {
        let mut g = NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        let flags = match self.rng.below(10) {
            0 => 0,
            1 => self.rng.next() as u16,
            2 => FLAG_FIXED_NEWSTYLE,
            _ => FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        g.extend_from_slice(&flags.to_be_bytes());
        self.mutate(&mut g, 5);
        self.s.write_all(&g)?;
        let mut cflags = [0u8; 4];
        self.s.read_exact(&mut cflags)?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            // Non-fixed newstyle: the client goes straight to NBD_OPT_EXPORT_NAME.
            let (_, _) = self.read_option()?;
            self.send_export_name_reply(flags & FLAG_NO_ZEROES != 0)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Answer options until the client enters transmission; false if it never does.
    fn options(&mut self) -> Io<bool> {
        for _ in 0..16 {
            let (opt, data) = self.read_option()?;
            if self.rng.chance(4) {
                let n = self.rng.below(40) as usize;
                let junk = self.rng.bytes(n);
                self.s.write_all(&junk)?;
                return self.maybe_hang().map(|_| false);
            }
            match opt {
                OPT_STRUCTURED_REPLY => self.structured_reply()?,
                OPT_SET_META_CONTEXT => self.meta_context(&data)?,
                OPT_GO => {
                    if self.go(opt)? {
                        return Ok(true);
                    }
                }
                OPT_EXPORT_NAME => {
                    let no_zeroes = self.rng.chance(50);
                    self.send_export_name_reply(no_zeroes)?;
                    return Ok(true);
                }
                _ => self.opt_reply(opt, REP_ERR_UNSUP, &[])?,
            }
        }
        Ok(false)
    }

    fn structured_reply(&mut self) -> Io<()> {
        if self.rng.chance(80) {
            self.structured = true;
            self.opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])
        } else {
            self.opt_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, b"no")
        }
    }

    fn meta_context(&mut self, data: &[u8]) -> Io<()> {
        let queries = parse_queries(data);
        for q in queries {
            if self.rng.chance(20) {
                continue;
            }
            let id = self.rng.below(4) as u32;
            self.contexts.push(id);
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(q.as_bytes());
            let len = self.odd_length(d.len() as u32);
            self.opt_reply_len(OPT_SET_META_CONTEXT, REP_META_CONTEXT, len, &d)?;
        }
        self.opt_reply(OPT_SET_META_CONTEXT, REP_ACK, &[])
    }

    /// Answer NBD_OPT_GO; true when it ended with ACK (transmission starts).
    fn go(&mut self, opt: u32) -> Io<bool> {
        if self.rng.chance(10) {
            let i = self.rng.below(4) as usize;
            let kind = [
                REP_ERR_UNSUP,
                REP_ERR_UNKNOWN,
                REP_ERR_TLS_REQD,
                REP_ERR_POLICY,
            ][i];
            self.opt_reply(opt, kind, b"go away")?;
            return Ok(kind == REP_ERR_UNSUP && self.fallback_export_name()?);
        }
        let size = match self.rng.below(6) {
            0 => 0,
            1 => u64::MAX,
            2 => self.rng.next(),
            _ => 1 << (12 + self.rng.below(12)),
        };
        let mut flags = TFLAG_HAS_FLAGS | self.rng.next() as u16;
        if self.rng.chance(50) {
            flags &= !TFLAG_READ_ONLY;
        }
        if !self.rng.chance(20) {
            let mut d = INFO_EXPORT.to_be_bytes().to_vec();
            d.extend_from_slice(&size.to_be_bytes());
            d.extend_from_slice(&flags.to_be_bytes());
            self.mutate(&mut d, 5);
            self.opt_reply(opt, REP_INFO, &d)?;
        }
        if self.rng.chance(60) {
            let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            let (min, pref, max) = if self.rng.chance(70) {
                let min = 1u32 << self.rng.below(13);
                (min, min.max(4096), min << (4 + self.rng.below(8)))
            } else {
                (
                    self.rng.next() as u32,
                    self.rng.next() as u32,
                    self.rng.next() as u32,
                )
            };
            for v in [min, pref, max] {
                d.extend_from_slice(&v.to_be_bytes());
            }
            self.opt_reply(opt, REP_INFO, &d)?;
        }
        self.opt_reply(opt, REP_ACK, &[])?;
        Ok(true)
    }

    fn fallback_export_name(&mut self) -> Io<bool> {
        let (opt, _) = self.read_option()?;
        if opt != OPT_EXPORT_NAME {
            return Ok(false);
        }
        self.send_export_name_reply(false)?;
        Ok(true)
    }

    fn send_export_name_reply(&mut self, no_zeroes: bool) -> Io<()> {
        let mut d = (1u64 << 20).to_be_bytes().to_vec();
        d.extend_from_slice(&(TFLAG_HAS_FLAGS | self.rng.next() as u16).to_be_bytes());
        if !no_zeroes {
            d.extend_from_slice(&[0u8; 124]);
        }
        self.mutate(&mut d, 5);
        self.s.write_all(&d)
    }

    fn transmission(&mut self) -> Io<()> {
        loop {
            let mut h = [0u8; REQUEST_LEN];
            self.s.read_exact(&mut h)?;
            let Some(req) = Request::decode(&h) else {
                return Ok(());
            };
            if req.kind == CMD_DISC {
                return Ok(());
            }
            if req.kind == CMD_WRITE {
                let mut payload = vec![0u8; (req.length as usize).min(64 << 20)];
                self.s.read_exact(&mut payload)?;
            }
            match self.rng.below(100) {
                0..=3 => return self.maybe_hang(),
                4..=7 => return Ok(()),
                8..=11 => {
                    let n = self.rng.below(100) as usize;
                    let junk = self.rng.bytes(n);
                    self.s.write_all(&junk)?;
                }
                12..=49 => self.hostile_reply(&req)?,
                _ => self.good_reply(&req)?,
            }
        }
    }

    fn good_reply(&mut self, req: &Request) -> Io<()> {
        if !self.structured {
            self.s.write_all(&simple_reply(0, req.cookie))?;
            if req.kind == CMD_READ {
                let data = self.rng.bytes(req.length as usize);
                self.s.write_all(&data)?;
            }
            return Ok(());
        }
        match req.kind {
            CMD_READ => self.read_chunks(req),
            CMD_BLOCK_STATUS => {
                let ids = self.contexts.clone();
                for id in ids {
                    let mut d = id.to_be_bytes().to_vec();
                    let n = 1 + self.rng.below(3) as u32;
                    for _ in 0..n {
                        let len = (req.length / n).max(1);
                        d.extend_from_slice(&len.to_be_bytes());
                        d.extend_from_slice(&(self.rng.below(4) as u32).to_be_bytes());
                    }
                    self.chunk(0, REPLY_TYPE_BLOCK_STATUS, req.cookie, &d)?;
                }
                self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[])
            }
            _ => self.s.write_all(&simple_reply(0, req.cookie)),
        }
    }

    fn read_chunks(&mut self, req: &Request) -> Io<()> {
        let mut at = 0u64;
        let len = u64::from(req.length);
        while at < len {
            let n = (1 + self.rng.below(len)).min(len - at);
            let off = req.offset + at;
            if self.rng.chance(30) {
                let mut d = off.to_be_bytes().to_vec();
                d.extend_from_slice(&(n as u32).to_be_bytes());
                self.chunk(0, REPLY_TYPE_OFFSET_HOLE, req.cookie, &d)?;
            } else {
                let mut d = off.to_be_bytes().to_vec();
                d.extend_from_slice(&self.rng.bytes(n as usize));
                self.chunk(0, REPLY_TYPE_OFFSET_DATA, req.cookie, &d)?;
            }
            at += n;
        }
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[])
    }

    /// One to three messages that break a rule (or happen not to).
    fn hostile_reply(&mut self, req: &Request) -> Io<()> {
        for _ in 0..1 + self.rng.below(3) {
            let cookie = if self.rng.chance(80) {
                req.cookie
            } else {
                self.rng.next()
            };
            if self.rng.chance(20) {
                let err = [0, EIO, EINVAL, self.rng.next() as u32][self.rng.below(4) as usize];
                self.s.write_all(&simple_reply(err, cookie))?;
                continue;
            }
            let kind = [
                REPLY_TYPE_NONE,
                REPLY_TYPE_OFFSET_DATA,
                REPLY_TYPE_OFFSET_HOLE,
                REPLY_TYPE_BLOCK_STATUS,
                REPLY_TYPE_ERROR,
                REPLY_TYPE_ERROR_OFFSET,
                self.rng.next() as u16,
            ][self.rng.below(7) as usize];
            let flags = if self.rng.chance(50) {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let payload = self.hostile_payload(kind, req);
            let len = self.odd_length(payload.len() as u32);
            let mut h = ChunkHeader {
                flags,
                kind,
                cookie,
                length: len,
            }
            .encode()
            .to_vec();
            h.extend_from_slice(&payload);
            self.mutate(&mut h, 3);
            self.s.write_all(&h)?;
        }
        Ok(())
    }

    fn hostile_payload(&mut self, kind: u16, req: &Request) -> Vec<u8> {
        let near = |rng: &mut Rng| match rng.below(4) {
            0 => req.offset,
            1 => req
                .offset
                .wrapping_add(rng.below(u64::from(req.length) + 2)),
            2 => rng.next(),
            _ => req.offset.wrapping_sub(rng.below(4096)),
        };
        let mut d = Vec::new();
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                d.extend_from_slice(&near(self.rng).to_be_bytes());
                let n = self.rng.below(u64::from(req.length) + 16) as usize;
                d.extend_from_slice(&self.rng.bytes(n.min(1 << 20)));
            }
            REPLY_TYPE_OFFSET_HOLE => {
                d.extend_from_slice(&near(self.rng).to_be_bytes());
                d.extend_from_slice(&(self.rng.next() as u32 >> self.rng.below(32)).to_be_bytes());
            }
            REPLY_TYPE_BLOCK_STATUS => {
                d.extend_from_slice(&(self.rng.below(5) as u32).to_be_bytes());
                for _ in 0..self.rng.below(6) {
                    d.extend_from_slice(
                        &(self.rng.next() as u32 >> self.rng.below(32)).to_be_bytes(),
                    );
                    d.extend_from_slice(&(self.rng.next() as u32).to_be_bytes());
                }
            }
            REPLY_TYPE_NONE => {}
            _ => {
                d.extend_from_slice(&(self.rng.next() as u32).to_be_bytes());
                let mlen = self.rng.below(40) as u16;
                d.extend_from_slice(&mlen.to_be_bytes());
                let n = self.rng.below(40) as usize;
                let msg = self.rng.bytes(n);
                d.extend_from_slice(&msg);
                if self.rng.chance(50) {
                    d.extend_from_slice(&near(self.rng).to_be_bytes());
                }
            }
        }
        d
    }

    /// Usually the true length; sometimes one that lies (short, long or huge).
    fn odd_length(&mut self, len: u32) -> u32 {
        match self.rng.below(20) {
            0 => u32::MAX,
            1 => len.wrapping_add(1 + self.rng.below(16) as u32),
            2 => len.saturating_sub(1 + self.rng.below(16) as u32),
            3 => self.rng.next() as u32,
            _ => len,
        }
    }

    /// Flip a byte now and then.
    fn mutate(&mut self, b: &mut [u8], percent: u64) {
        if !b.is_empty() && self.rng.chance(percent) {
            let i = self.rng.below(b.len() as u64) as usize;
            b[i] ^= 1 << self.rng.below(8);
        }
    }

    /// Stop answering but keep reading, until the client gives up or a while passes.
    fn maybe_hang(&mut self) -> Io<()> {
        if self.rng.chance(50) {
            return Ok(());
        }
        let mut sink = [0u8; 4096];
        while self.s.read(&mut sink)? > 0 {}
        Ok(())
    }

    fn read_option(&mut self) -> Io<(u32, Vec<u8>)> {
        let mut h = [0u8; OPTION_HEADER_LEN];
        self.s.read_exact(&mut h)?;
        let (opt, len) = (be32(&h[8..12]), be32(&h[12..16]));
        let mut data = vec![0u8; len.min(1 << 20) as usize];
        self.s.read_exact(&mut data)?;
        Ok((opt, data))
    }

    fn opt_reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> Io<()> {
        self.opt_reply_len(opt, kind, data.len() as u32, data)
    }

    fn opt_reply_len(&mut self, opt: u32, kind: u32, len: u32, data: &[u8]) -> Io<()> {
        let r = OptionReply {
            option: opt,
            kind,
            length: len,
        };
        let mut b = r.encode().to_vec();
        b.extend_from_slice(data);
        self.mutate(&mut b, 3);
        self.s.write_all(&b)
    }

    fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, data: &[u8]) -> Io<()> {
        let mut b = ChunkHeader {
            flags,
            kind,
            cookie,
            length: data.len() as u32,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }
}

/// The query strings of an NBD_OPT_SET_META_CONTEXT request.
fn parse_queries(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(name_len) = data.get(0..4).map(be32) else {
        return out;
    };
    let mut at = 4 + name_len as usize;
    let Some(n) = data.get(at..at + 4).map(be32) else {
        return out;
    };
    at += 4;
    for _ in 0..n {
        let Some(l) = data.get(at..at + 4).map(be32) else {
            break;
        };
        at += 4;
        let Some(q) = data.get(at..at + l as usize) else {
            break;
        };
        out.push(String::from_utf8_lossy(q).into_owned());
        at += l as usize;
    }
    out
}

/// A well-behaved scripted server whose connection `i` (0, 1, …) numbers the metadata
/// context `ctx` as `100 + i` and reports every block status range with flags `i`.
/// Context ids are per connection; a client must not reuse one connection's id on another.
pub fn per_connection_context_ids(ctx: &'static str) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ids");
    let listener = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for (i, s) in listener.incoming().enumerate() {
            let Ok(s) = s else { break };
            std::thread::spawn(move || {
                let _ = scripted(s, ctx, i as u32);
            });
        }
    });
    (dir, sock)
}

fn scripted(mut s: UnixStream, ctx: &str, i: u32) -> Io<()> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g)?;
    s.read_exact(&mut [0u8; 4])?;
    let reply = |s: &mut UnixStream, option, kind, data: &[u8]| {
        let r = OptionReply {
            option,
            kind,
            length: data.len() as u32,
        };
        s.write_all(&r.encode())?;
        s.write_all(data)
    };
    loop {
        let mut h = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut h)?;
        let opt = be32(&h[8..12]);
        s.read_exact(&mut vec![0u8; be32(&h[12..16]) as usize])?;
        match opt {
            OPT_SET_META_CONTEXT => {
                let mut d = (100 + i).to_be_bytes().to_vec();
                d.extend_from_slice(ctx.as_bytes());
                reply(&mut s, opt, REP_META_CONTEXT, &d)?;
                reply(&mut s, opt, REP_ACK, &[])?;
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&(1u64 << 20).to_be_bytes());
                let flags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN;
                d.extend_from_slice(&flags.to_be_bytes());
                reply(&mut s, opt, REP_INFO, &d)?;
                reply(&mut s, opt, REP_ACK, &[])?;
                break;
            }
            _ => reply(&mut s, opt, REP_ACK, &[])?,
        }
    }
    loop {
        let mut h = [0u8; REQUEST_LEN];
        s.read_exact(&mut h)?;
        let req = Request::decode(&h).unwrap();
        if req.kind != CMD_BLOCK_STATUS {
            return Ok(());
        }
        let mut d = (100 + i).to_be_bytes().to_vec();
        d.extend_from_slice(&req.length.to_be_bytes());
        d.extend_from_slice(&i.to_be_bytes());
        let c = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_BLOCK_STATUS,
            cookie: req.cookie,
            length: d.len() as u32,
        };
        s.write_all(&c.encode())?;
        s.write_all(&d)?;
    }
}
