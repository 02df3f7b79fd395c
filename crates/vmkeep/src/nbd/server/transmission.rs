//! The transmission phase of one connection.
//!
//! The reader thread (the connection's own) parses requests and answers the cheap ones
//! itself: refused writes, flush, unknown commands. Reads, block status and cache go to
//! the connection's workers through a bounded queue, so a client that pipelines many
//! requests gets them processed in parallel and a client that pipelines too many is
//! simply not read from until its queue drains. Every reply is written whole under the
//! connection's writer lock; a reply that cannot be written ends the connection.
//!
//! Requests are checked before anything is read: a range past the end or a length above
//! 32 MiB is `EINVAL` (the spec's error for both), so no request can make the server
//! allocate more than that. A bad request magic or a write payload above 32 MiB ends
//! the connection, since the stream can no longer be parsed.

use std::io::{self, BufWriter, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Receiver, Sender};

use super::handshake::{Session, BASE_ALLOCATION_ID};
use super::{Budget, BudgetGuard, Export, Extent, Shared, Stream};
use crate::bufpool::BufPool;
use crate::error::ErrorKind;
use crate::fsutil::is_zero;
use crate::nbd::proto::*;

/// Most descriptors in one block-status reply (512 KiB of payload).
const MAX_DESCRIPTORS: usize = 64 << 10;
/// Hole detection in read replies works in pieces of this size, aligned on the export.
const HOLE_GRAIN: u64 = 4096;

/// One connection in transmission.
struct Conn<'a> {
    shared: &'a Shared,
    export: Arc<dyn Export>,
    structured: bool,
    base_allocation: bool,
    out: Mutex<Stream>,
    broken: AtomicBool,
    /// Read buffers, reused: a fresh one per request (above malloc's mmap threshold) cost
    /// an mmap, a page fault per 4 KiB and an munmap every time.
    buffers: Arc<BufPool>,
    /// This connection's own budget for replies in flight: the reader takes a read's
    /// length from it before queueing the read, and the reply gives it back once sent,
    /// so a client that does not take its replies stops being read (and served) once
    /// it has this many bytes outstanding, and holds no more of the shared budget.
    own: Budget,
}

/// A queued request, with its share of the connection's own budget.
type Queued<'a> = (Request, Option<BudgetGuard<'a>>);

/// Serve requests until the client disconnects, breaks the protocol or goes idle.
pub(crate) fn serve(shared: &Shared, mut stream: Stream, session: Session) {
    let out = match stream.try_clone() {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("cannot clone a connection: {e}");
            return;
        }
    };
    let _ = stream.set_read_timeout(shared.config.idle_timeout);
    let conn = Conn {
        shared,
        export: session.export,
        structured: session.structured,
        base_allocation: session.base_allocation,
        out: Mutex::new(out),
        broken: AtomicBool::new(false),
        buffers: BufPool::new(shared.config.workers_per_connection.max(1)),
        own: Budget::new(shared.config.max_buffered_per_connection),
    };
    let (tx, rx) = bounded(shared.config.queue_per_connection.max(1));
    std::thread::scope(|scope| {
        let mut workers = 0;
        for i in 0..shared.config.workers_per_connection.max(1) {
            let rx = rx.clone();
            let conn = &conn;
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(scope, move || work(conn, rx));
            match spawned {
                Ok(_) => workers += 1,
                Err(e) => tracing::warn!("cannot start an NBD worker: {e}"),
            }
        }
        drop(rx);
        if workers > 0 {
            if let Err(e) = read_requests(&conn, &mut stream, &tx) {
                tracing::debug!("connection ended: {e}");
            }
        }
        drop(tx); // workers finish what is queued, then the scope ends
    });
    stream.close();
}

fn read_requests<'a>(conn: &'a Conn, s: &mut Stream, tx: &Sender<Queued<'a>>) -> io::Result<()> {
    loop {
        if conn.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut h = [0u8; REQUEST_LEN];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(req) = Request::decode(&h) else {
            tracing::warn!("bad request magic; closing the connection");
            return Ok(());
        };
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => refuse_write(conn, s, &req)?,
            CMD_TRIM | CMD_WRITE_ZEROES => conn.fail(&req, EPERM, "the export is read-only"),
            CMD_FLUSH => conn.done(&req),
            CMD_READ | CMD_BLOCK_STATUS | CMD_CACHE => {
                // Only reads hold a buffer; one above the limit is refused by its worker.
                let share = (req.kind == CMD_READ && req.length <= MAX_BLOCK_SIZE)
                    .then(|| conn.own.take(req.length as usize));
                if tx.send((req, share)).is_err() {
                    return Ok(()); // no worker left
                }
            }
            k => conn.fail(&req, EINVAL, &format!("unknown command {k}")),
        }
    }
}

/// A write's payload must be consumed to keep the stream in step; above the largest
/// request it is taken as an attack and the connection ends.
fn refuse_write(conn: &Conn, s: &mut Stream, req: &Request) -> io::Result<()> {
    if req.length > MAX_BLOCK_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("write of {} bytes", req.length),
        ));
    }
    let mut left = req.length as usize;
    let mut sink = [0u8; 64 << 10];
    while left > 0 {
        let n = left.min(sink.len());
        s.read_exact(&mut sink[..n])?;
        left -= n;
    }
    conn.fail(req, EPERM, "the export is read-only");
    Ok(())
}

fn work<'a>(conn: &'a Conn, rx: Receiver<Queued<'a>>) {
    for (req, _share) in rx {
        if conn.broken.load(Ordering::SeqCst) {
            continue; // drain the queue; nobody can receive the replies
        }
        match req.kind {
            CMD_READ => conn.read(&req),
            CMD_BLOCK_STATUS => conn.block_status(&req),
            _ => conn.cache(&req),
        }
    }
}

impl Conn<'_> {
    /// Write one whole reply; a failure marks the connection broken and shuts it down.
    fn send(&self, f: impl FnOnce(&mut dyn Write) -> io::Result<()>) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let mut guard = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = BufWriter::with_capacity(64 << 10, &mut *guard);
        let result = f(&mut w).and_then(|_| w.flush());
        // Dropping would flush again (another full write timeout) after a failure.
        let _ = w.into_parts();
        if let Err(e) = result {
            tracing::debug!("cannot send a reply: {e}");
            self.broken.store(true, Ordering::SeqCst);
            guard.shutdown(Shutdown::Both);
        }
    }

    /// Success without payload.
    fn done(&self, req: &Request) {
        if self.structured && req.kind == CMD_READ {
            self.send(|w| chunk(w, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[]));
        } else {
            self.send(|w| w.write_all(&simple_reply(0, req.cookie)));
        }
    }

    /// An error reply, with a message for humans when structured replies are on.
    fn fail(&self, req: &Request, errno: u32, msg: &str) {
        if self.structured {
            let m = &msg.as_bytes()[..msg.len().min(MAX_STRING_LEN)];
            let mut p = Vec::with_capacity(6 + m.len());
            p.extend_from_slice(&errno.to_be_bytes());
            p.extend_from_slice(&(m.len() as u16).to_be_bytes());
            p.extend_from_slice(m);
            self.send(|w| chunk(w, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, req.cookie, &[&p]));
        } else {
            self.send(|w| w.write_all(&simple_reply(errno, req.cookie)));
        }
    }

    /// Check a request's range against the export and the request-size limit.
    fn check_range(&self, req: &Request, limit: bool) -> Result<(), &'static str> {
        if limit && req.length > MAX_BLOCK_SIZE {
            return Err("request longer than the maximum block size (32 MiB)");
        }
        match req.offset.checked_add(req.length as u64) {
            Some(end) if end <= self.export.size() => Ok(()),
            _ => Err("request beyond the end of the export"),
        }
    }

    fn read(&self, req: &Request) {
        let allowed = CMD_FLAG_FUA | if self.structured { CMD_FLAG_DF } else { 0 };
        if req.flags & !allowed != 0 {
            return self.fail(req, EINVAL, "unsupported command flags");
        }
        if let Err(msg) = self.check_range(req, true) {
            return self.fail(req, EINVAL, msg);
        }
        if req.length == 0 {
            return self.done(req);
        }
        let _budget = self.shared.budget.take(req.length as usize);
        let mut buf = self.buffers.take(req.length as usize);
        match self.export.read(req.offset, &mut buf) {
            Ok(()) => self.send_data(req, &buf),
            Err(e) => {
                tracing::error!(
                    "export {}: read of bytes {}..{} failed: {e}",
                    self.export.name(),
                    req.offset,
                    req.offset + req.length as u64
                );
                let msg = if e.kind() == ErrorKind::Corrupt {
                    e.to_string()
                } else {
                    "read failed on the server (see its log)".to_string()
                };
                self.fail(req, EIO, &msg);
            }
        }
    }

    fn send_data(&self, req: &Request, buf: &[u8]) {
        if !self.structured {
            return self.send(|w| {
                w.write_all(&simple_reply(0, req.cookie))?;
                w.write_all(buf)
            });
        }
        let pieces = if req.flags & CMD_FLAG_DF != 0 {
            vec![(false, 0, buf.len())]
        } else {
            split_holes(req.offset, buf)
        };
        self.send(|w| {
            let last = pieces.len() - 1;
            for (i, &(hole, s, e)) in pieces.iter().enumerate() {
                let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                let off = (req.offset + s as u64).to_be_bytes();
                if hole {
                    let len = ((e - s) as u32).to_be_bytes();
                    chunk(w, flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, &[&off, &len])?;
                } else {
                    chunk(
                        w,
                        flags,
                        REPLY_TYPE_OFFSET_DATA,
                        req.cookie,
                        &[&off, &buf[s..e]],
                    )?;
                }
            }
            Ok(())
        });
    }

    fn block_status(&self, req: &Request) {
        if !self.base_allocation {
            return self.fail(req, EINVAL, "no metadata context was negotiated");
        }
        if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE) != 0 {
            return self.fail(req, EINVAL, "unsupported command flags");
        }
        if req.length == 0 {
            return self.fail(req, EINVAL, "empty block status request");
        }
        if let Err(msg) = self.check_range(req, false) {
            return self.fail(req, EINVAL, msg);
        }
        let extents = match self.export.extents(req.offset, req.length as u64) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("export {}: block status failed: {e}", self.export.name());
                return self.fail(req, EIO, "block status failed on the server (see its log)");
            }
        };
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let d = descriptors(&extents, req.length, one);
        if d.is_empty() {
            return self.fail(req, EIO, "no allocation information");
        }
        let mut p = Vec::with_capacity(4 + 8 * d.len());
        p.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (len, flags) in d {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        self.send(|w| {
            chunk(
                w,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                &[&p],
            )
        });
    }

    /// `NBD_CMD_CACHE`: a hint with nothing to warm; checked like a read.
    fn cache(&self, req: &Request) {
        if req.flags & !CMD_FLAG_FUA != 0 {
            return self.fail(req, EINVAL, "unsupported command flags");
        }
        match self.check_range(req, true) {
            Ok(()) => self.done(req),
            Err(msg) => self.fail(req, EINVAL, msg),
        }
    }
}

/// Write one structured reply chunk whose payload is `parts` back to back.
fn chunk(w: &mut dyn Write, flags: u16, kind: u16, cookie: u64, parts: &[&[u8]]) -> io::Result<()> {
    let length = parts.iter().map(|p| p.len()).sum::<usize>() as u32;
    let h = ChunkHeader {
        flags,
        kind,
        cookie,
        length,
    };
    w.write_all(&h.encode())?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Split a read buffer into data and hole pieces `(hole, start, end)`, judged in
/// [`HOLE_GRAIN`] pieces aligned on the export so that holes line up with blocks.
fn split_holes(offset: u64, buf: &[u8]) -> Vec<(bool, usize, usize)> {
    let mut out: Vec<(bool, usize, usize)> = Vec::new();
    let mut s = 0usize;
    while s < buf.len() {
        let abs = offset + s as u64;
        let e = ((abs / HOLE_GRAIN + 1) * HOLE_GRAIN - offset).min(buf.len() as u64) as usize;
        let hole = is_zero(&buf[s..e]);
        match out.last_mut() {
            Some(last) if last.0 == hole => last.2 = e,
            _ => out.push((hole, s, e)),
        }
        s = e;
    }
    out
}

/// Descriptors for a block-status reply: runs of equal flags merged, clipped to the
/// request, at most one with `REQ_ONE`, never more than [`MAX_DESCRIPTORS`].
fn descriptors(extents: &[Extent], want: u32, one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = want as u64;
    for x in extents {
        if left == 0 {
            break;
        }
        let len = x.len.min(left);
        if len == 0 {
            continue;
        }
        let full = out.len() == MAX_DESCRIPTORS;
        match out.last_mut() {
            Some(last) if last.1 == x.flags => last.0 += len as u32,
            _ if full => break,
            _ => out.push((len as u32, x.flags)),
        }
        left -= len;
    }
    if one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_split_on_the_grain() {
        let mut buf = vec![0u8; 3 * 4096];
        buf[4096 + 7] = 1;
        assert_eq!(
            split_holes(0, &buf),
            vec![(true, 0, 4096), (false, 4096, 8192), (true, 8192, 12288)]
        );
        // Unaligned start: the first piece ends at the next aligned boundary.
        assert_eq!(
            split_holes(100, &buf[..5000]),
            vec![(true, 0, 3996), (false, 3996, 5000)]
        );
        assert_eq!(split_holes(0, &[1u8; 10]), vec![(false, 0, 10)]);
    }

    #[test]
    fn descriptors_merge_clip_and_honour_req_one() {
        let x = |len, flags| Extent { len, flags };
        let ext = [x(100, 3), x(50, 3), x(10, 0), x(1000, 3)];
        assert_eq!(
            descriptors(&ext, 500, false),
            vec![(150, 3), (10, 0), (340, 3)]
        );
        assert_eq!(descriptors(&ext, 120, true), vec![(120, 3)]);
        assert_eq!(descriptors(&ext, 500, true), vec![(150, 3)]);
        assert!(descriptors(&[x(0, 0)], 10, false).is_empty());
    }
}
