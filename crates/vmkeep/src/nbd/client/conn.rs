//! One NBD connection in the transmission phase: many requests in flight, one reader.
//!
//! A caller registers its request under a fresh cookie, writes it under the writer lock
//! and blocks on its own channel until a deadline. The reader thread owns the receive
//! side: it matches each reply to the request it answers, checks it against that request
//! (type, range, lengths, overlap, completeness) and hands the result over. Buffers are
//! sized from the request, never from what the server claims.
//!
//! Failure model: a server error (an error chunk, a simple reply with an error) fails
//! that request only. A protocol violation, a closed socket or a caller's timeout kills
//! the connection: the socket is shut down, the reader stops, and every waiting caller
//! gets the same message at once; later calls fail immediately.
//!
//! Over TLS the reader and the writers hold clones of one [`crate::tls::TlsStream`]: the
//! reader decrypts while writers encrypt, and killing the connection shuts the socket
//! down under both.
//!
//! Extended headers (not negotiated; `docs/NBD-CLIENT.md` says why) would change the
//! request encoding in [`Conn::submit`] and the reply headers in [`Reader::next_message`]
//! (64-bit lengths, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`); nothing else here depends on the
//! header size.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::error::NbdError;
use super::transport::Transport;
use crate::nbd::proto::*;

/// Largest block status chunk accepted: 2^20 descriptors (8 MiB). Replies are bounded by
/// the request length anyway; this bounds the memory a hostile server can make us use.
const MAX_STATUS_DESCRIPTORS: u32 = 1 << 20;
/// Largest error chunk accepted: error, message length, a 4096-byte message, an offset,
/// and some room for fields a later protocol version may append.
const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING_LEN as u32 + 8 + 64;

/// Extents of one metadata context: (context id, [(length, flags)]).
pub(super) type Status = Vec<(u32, Vec<(u32, u32)>)>;

/// A successful reply.
pub(super) enum Reply {
    Done,
    Data(Vec<u8>),
    Status(Status),
}

type Outcome = Result<Reply, NbdError>;

/// A request waiting for its reply.
pub(super) struct Ticket {
    rx: Receiver<Outcome>,
    deadline: Instant,
    what: String,
}

pub(super) struct Conn {
    writer: Mutex<Transport>,
    /// A clone of the socket used only to shut it down (wakes the reader).
    control: Transport,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
    next_cookie: AtomicU64,
    timeout: Duration,
    /// Metadata contexts selected on this connection: (name, id). Ids are transient and
    /// may differ between connections.
    contexts: Vec<(String, u32)>,
}

struct Shared {
    state: Mutex<State>,
    structured: bool,
    /// Ids of the negotiated metadata contexts; a block status reply has one chunk each.
    contexts: Vec<u32>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Why the connection is unusable; set once by the reader as it stops.
    dead: Option<NbdError>,
    /// Why the connection was closed on purpose (timeout, disconnect); reported instead
    /// of the read error the shutdown causes.
    killed: Option<NbdError>,
}

struct Pending {
    kind: u16,
    offset: u64,
    length: u32,
    /// Reads: the request-sized buffer the chunks fill.
    data: Vec<u8>,
    /// Reads: byte ranges received so far, relative to `offset` (start -> end).
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    status: Status,
    error: Option<NbdError>,
    /// A structured chunk arrived for this request.
    chunked: bool,
    tx: Sender<Outcome>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    /// Enter the transmission phase on a negotiated socket: start the reader thread.
    pub fn start(
        t: Transport,
        structured: bool,
        contexts: Vec<(String, u32)>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        // Replies may be far apart (an idle client); callers keep their own deadlines.
        t.set_timeouts(None, Some(timeout))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            structured,
            contexts: contexts.iter().map(|(_, id)| *id).collect(),
        });
        // The reader gets the handle the handshake read with: over TLS it may hold
        // plaintext already decrypted.
        let (writer, control) = (t.try_clone()?, t.try_clone()?);
        let reader = Reader {
            t,
            shared: shared.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader.run())?;
        Ok(Conn {
            control,
            writer: Mutex::new(writer),
            shared,
            reader: Mutex::new(Some(handle)),
            next_cookie: AtomicU64::new(1),
            timeout,
            contexts,
        })
    }

    /// This connection's id for metadata context `name`.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    /// Send a request; `payload` follows the header (writes).
    pub fn submit(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Ticket, NbdError> {
        let data = if kind == CMD_READ {
            vec![0u8; length as usize]
        } else {
            Vec::new()
        };
        self.submit_with(kind, flags, offset, length, payload, data)
    }

    /// Send a read whose reply fills `buf` (exactly `length` bytes, any contents): the
    /// caller's buffer travels to the reader thread and back, so a read costs no
    /// allocation, zero fill or copy of its own.
    pub fn submit_read(&self, offset: u64, length: u32, buf: Vec<u8>) -> Result<Ticket, NbdError> {
        debug_assert_eq!(buf.len(), length as usize);
        self.submit_with(CMD_READ, 0, offset, length, None, buf)
    }

    fn submit_with(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        data: Vec<u8>,
    ) -> Result<Ticket, NbdError> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        {
            let mut st = lock(&self.shared.state);
            if let Some(why) = &st.dead {
                return Err(NbdError::FailedEarlier(Box::new(why.clone())));
            }
            st.pending.insert(
                cookie,
                Pending {
                    kind,
                    offset,
                    length,
                    data,
                    covered: BTreeMap::new(),
                    covered_bytes: 0,
                    status: Vec::new(),
                    error: None,
                    chunked: false,
                    tx,
                },
            );
        }
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        let sent = {
            let mut w = lock(&self.writer);
            w.write_all(&req.encode())
                .and_then(|()| w.write_all(payload.unwrap_or(&[])))
        };
        if let Err(e) = sent {
            let why = NbdError::Send {
                command: command_name(kind),
                error: e.into(),
            };
            self.kill(why.clone());
            return Err(why);
        }
        Ok(Ticket {
            rx,
            deadline: Instant::now() + self.timeout,
            what: format!("{} of {length} bytes at byte {offset}", command_name(kind)),
        })
    }

    /// Wait for a reply; a timeout kills the connection (its state is unknown after it).
    pub fn wait(&self, t: Ticket) -> Result<Reply, NbdError> {
        match t.rx.recv_deadline(t.deadline) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout) => {
                let why = NbdError::NoReply {
                    what: t.what,
                    within: self.timeout.as_secs_f32(),
                };
                self.kill(why.clone());
                Err(why)
            }
            Err(RecvTimeoutError::Disconnected) => Err(NbdError::ReaderStopped),
        }
    }

    /// Close the connection on purpose; waiting callers get `why`.
    pub fn kill(&self, why: NbdError) {
        lock(&self.shared.state).killed.get_or_insert(why);
        self.control.shutdown();
    }

    /// Soft disconnect: `NBD_CMD_DISC`, then close and wait for the reader.
    pub fn disconnect(&self) {
        let alive = {
            let mut st = lock(&self.shared.state);
            st.killed.get_or_insert(NbdError::Disconnected);
            st.dead.is_none()
        };
        if alive {
            let req = Request {
                flags: 0,
                kind: CMD_DISC,
                cookie: 0,
                offset: 0,
                length: 0,
            };
            let mut w = lock(&self.writer);
            if w.write_all(&req.encode()).is_ok() {
                w.close_notify();
            }
        }
        self.control.shutdown();
        if let Some(h) = lock(&self.reader).take() {
            let _ = h.join();
        }
    }

    pub fn is_dead(&self) -> bool {
        lock(&self.shared.state).dead.is_some()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl Shared {
    fn take(&self, cookie: u64) -> Result<Pending, NbdError> {
        lock(&self.state).pending.remove(&cookie).ok_or_else(|| {
            NbdError::protocol(format!(
                "reply for cookie {cookie:#x}, which is not in flight"
            ))
        })
    }

    fn put_back(&self, cookie: u64, p: Pending) {
        lock(&self.state).pending.insert(cookie, p);
    }

    /// The connection is gone: fail every waiting request with one message.
    fn fail_all(&self, err: NbdError) {
        let mut st = lock(&self.state);
        let why = st.killed.clone().unwrap_or(err);
        st.dead = Some(why.clone());
        for (_, p) in st.pending.drain() {
            let _ = p.tx.send(Err(why.clone()));
        }
    }
}

struct Reader {
    t: Transport,
    shared: Arc<Shared>,
}

impl Reader {
    fn run(mut self) {
        let err = loop {
            if let Err(e) = self.next_message() {
                break e;
            }
        };
        self.t.shutdown();
        self.shared.fail_all(err);
    }

    fn next_message(&mut self) -> Result<(), NbdError> {
        let magic = u32::from_be_bytes(self.read_array()?);
        match magic {
            SIMPLE_REPLY_MAGIC => self.simple(),
            STRUCTURED_REPLY_MAGIC if self.shared.structured => self.chunk(),
            STRUCTURED_REPLY_MAGIC => Err(NbdError::protocol(
                "structured reply although structured replies were not negotiated",
            )),
            m => Err(NbdError::protocol(format!("bad reply magic {m:#010x}"))),
        }
    }

    fn simple(&mut self) -> Result<(), NbdError> {
        let h: [u8; SIMPLE_REPLY_LEN - 4] = self.read_array()?;
        let (error, cookie) = (be32(&h[0..4]), be64(&h[4..12]));
        let mut p = self.shared.take(cookie)?;
        let violation = if p.chunked {
            Some("simple reply after structured chunks for the same request")
        } else if p.kind == CMD_READ && self.shared.structured {
            Some("simple reply to a read although structured replies were negotiated")
        } else if p.kind == CMD_BLOCK_STATUS && error == 0 {
            Some("simple reply to a block status request")
        } else {
            None
        };
        if let Some(v) = violation {
            self.shared.put_back(cookie, p);
            return Err(NbdError::protocol(v));
        }
        if error != 0 {
            let _ = p.tx.send(Err(NbdError::server(error, String::new())));
            return Ok(());
        }
        if p.kind == CMD_READ {
            if let Err(e) = read_exact(&mut self.t, &mut p.data) {
                self.shared.put_back(cookie, p);
                return Err(e);
            }
            let data = std::mem::take(&mut p.data);
            let _ = p.tx.send(Ok(Reply::Data(data)));
            return Ok(());
        }
        let _ = p.tx.send(Ok(Reply::Done));
        Ok(())
    }

    fn chunk(&mut self) -> Result<(), NbdError> {
        let h = ChunkHeader::decode_after_magic(&self.read_array()?);
        let mut p = self.shared.take(h.cookie)?;
        p.chunked = true;
        match self.payload(&mut p, &h) {
            Ok(()) if h.flags & REPLY_FLAG_DONE != 0 => {
                p.complete(&self.shared.contexts);
                Ok(())
            }
            Ok(()) => {
                self.shared.put_back(h.cookie, p);
                Ok(())
            }
            Err(e) => {
                self.shared.put_back(h.cookie, p);
                Err(e)
            }
        }
    }

    fn payload(&mut self, p: &mut Pending, h: &ChunkHeader) -> Result<(), NbdError> {
        match h.kind {
            REPLY_TYPE_NONE if h.length != 0 => Err(NbdError::protocol(format!(
                "NONE chunk with a {}-byte payload",
                h.length
            ))),
            REPLY_TYPE_NONE if h.flags & REPLY_FLAG_DONE == 0 => {
                Err(NbdError::protocol("NONE chunk without the DONE flag"))
            }
            REPLY_TYPE_NONE => Ok(()),
            REPLY_TYPE_OFFSET_DATA => self.data_chunk(p, h.length),
            REPLY_TYPE_OFFSET_HOLE => self.hole_chunk(p, h.length),
            REPLY_TYPE_BLOCK_STATUS => self.status_chunk(p, h.length),
            k if k & 0x8000 != 0 => self.error_chunk(p, k, h.length),
            k => Err(NbdError::protocol(format!("unknown reply chunk type {k}"))),
        }
    }

    fn data_chunk(&mut self, p: &mut Pending, len: u32) -> Result<(), NbdError> {
        p.expect(CMD_READ, "data")?;
        if len < 9 {
            return Err(NbdError::protocol(format!("data chunk of {len} bytes")));
        }
        let offset = u64::from_be_bytes(self.read_array()?);
        let n = u64::from(len - 8);
        let rel = p.claim(offset, n, "data")? as usize;
        read_exact(&mut self.t, &mut p.data[rel..rel + n as usize])
    }

    fn hole_chunk(&mut self, p: &mut Pending, len: u32) -> Result<(), NbdError> {
        p.expect(CMD_READ, "hole")?;
        if len != 12 {
            return Err(NbdError::protocol(format!("hole chunk of {len} bytes")));
        }
        let b: [u8; 12] = self.read_array()?;
        let (offset, n) = (be64(&b[0..8]), be32(&b[8..12]));
        if n == 0 {
            return Err(NbdError::protocol("hole chunk of length 0"));
        }
        // The buffer may be a reused one: the hole's bytes are set here.
        let rel = p.claim(offset, u64::from(n), "hole")? as usize;
        p.data[rel..rel + n as usize].fill(0);
        Ok(())
    }

    fn status_chunk(&mut self, p: &mut Pending, len: u32) -> Result<(), NbdError> {
        p.expect(CMD_BLOCK_STATUS, "block status")?;
        if len < 12 || (len - 4) % 8 != 0 {
            return Err(NbdError::protocol(format!(
                "block status chunk of {len} bytes"
            )));
        }
        let count = (len - 4) / 8;
        if count > MAX_STATUS_DESCRIPTORS {
            return Err(NbdError::protocol(format!(
                "block status chunk of {count} extents is too long"
            )));
        }
        let id = u32::from_be_bytes(self.read_array()?);
        if !self.shared.contexts.contains(&id) {
            return Err(NbdError::protocol(format!(
                "block status for unknown metadata context {id}"
            )));
        }
        if p.status.iter().any(|(i, _)| *i == id) {
            return Err(NbdError::protocol(format!(
                "two block status chunks for metadata context {id}"
            )));
        }
        let extents = self.descriptors(count, u64::from(p.length))?;
        p.status.push((id, extents));
        Ok(())
    }

    /// Read `count` extent descriptors, checking them against the request length: each
    /// is non-empty and only the last may reach past the requested range.
    fn descriptors(&mut self, count: u32, requested: u64) -> Result<Vec<(u32, u32)>, NbdError> {
        let mut out = Vec::with_capacity(count.min(4096) as usize);
        let mut sum = 0u64;
        let mut buf = [0u8; 8 * 512];
        let mut left = count as usize;
        while left > 0 {
            let n = left.min(512);
            read_exact(&mut self.t, &mut buf[..n * 8])?;
            for d in buf[..n * 8].chunks_exact(8) {
                let (len, flags) = (be32(&d[0..4]), be32(&d[4..8]));
                if len == 0 {
                    return Err(NbdError::protocol("block status extent of length 0"));
                }
                if sum >= requested {
                    return Err(NbdError::protocol(
                        "block status extents reach past the requested range",
                    ));
                }
                sum += u64::from(len);
                out.push((len, flags));
            }
            left -= n;
        }
        Ok(out)
    }

    fn error_chunk(&mut self, p: &mut Pending, kind: u16, len: u32) -> Result<(), NbdError> {
        if !(6..=MAX_ERROR_CHUNK).contains(&len) {
            return Err(NbdError::protocol(format!("error chunk of {len} bytes")));
        }
        let mut b = vec![0u8; len as usize];
        read_exact(&mut self.t, &mut b)?;
        let error = be32(&b[0..4]);
        let mlen = be16(&b[4..6]) as usize;
        let rest = b.len() - 6;
        if mlen > rest {
            return Err(NbdError::protocol(format!(
                "error message of {mlen} bytes in a {len}-byte chunk"
            )));
        }
        let msg = printable(&b[6..6 + mlen]);
        let (mut offset, mut chunk_type) = (None, None);
        match kind {
            REPLY_TYPE_ERROR => {}
            REPLY_TYPE_ERROR_OFFSET if rest - mlen == 8 => offset = Some(be64(&b[6 + mlen..])),
            REPLY_TYPE_ERROR_OFFSET => {
                return Err(NbdError::protocol(format!(
                    "error-offset chunk of {len} bytes"
                )));
            }
            k => chunk_type = Some(k),
        }
        p.error.get_or_insert(NbdError::Server {
            errno: error,
            message: msg,
            offset,
            chunk_type,
        });
        Ok(())
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N], NbdError> {
        let mut b = [0u8; N];
        read_exact(&mut self.t, &mut b)?;
        Ok(b)
    }
}

impl Pending {
    fn expect(&self, kind: u16, chunk: &str) -> Result<(), NbdError> {
        if self.kind != kind {
            return Err(NbdError::protocol(format!(
                "{chunk} chunk in the reply to a {} request",
                command_name(self.kind)
            )));
        }
        Ok(())
    }

    /// Record that `[offset, offset + n)` arrived; it must lie in the request and not
    /// overlap an earlier chunk. Returns the position relative to the request.
    fn claim(&mut self, offset: u64, n: u64, chunk: &str) -> Result<u64, NbdError> {
        let outside = || {
            NbdError::protocol(format!(
                "{chunk} chunk for bytes {offset}+{n} outside the request {}+{}",
                self.offset, self.length
            ))
        };
        let rel = offset.checked_sub(self.offset).ok_or_else(outside)?;
        let end = rel.checked_add(n).ok_or_else(outside)?;
        if end > u64::from(self.length) {
            return Err(outside());
        }
        let before = self.covered.range(..=rel).next_back();
        let after = self.covered.range(rel..).next();
        if before.is_some_and(|(_, &e)| e > rel) || after.is_some_and(|(&s, _)| s < end) {
            return Err(NbdError::protocol(format!(
                "{chunk} chunk for bytes {offset}+{n} overlaps an earlier one"
            )));
        }
        self.covered.insert(rel, end);
        self.covered_bytes += n;
        Ok(rel)
    }

    /// The DONE chunk arrived: hand the outcome to the caller.
    fn complete(mut self, contexts: &[u32]) {
        let outcome = match self.error.take() {
            Some(e) => Err(e),
            None => self.result(contexts),
        };
        let _ = self.tx.send(outcome);
    }

    fn result(&mut self, contexts: &[u32]) -> Outcome {
        match self.kind {
            CMD_READ if self.covered_bytes != u64::from(self.length) => {
                Err(NbdError::protocol(format!(
                    "the read reply covers {} of {} bytes",
                    self.covered_bytes, self.length
                )))
            }
            CMD_READ => Ok(Reply::Data(std::mem::take(&mut self.data))),
            CMD_BLOCK_STATUS => {
                match contexts
                    .iter()
                    .find(|id| !self.status.iter().any(|(i, _)| i == *id))
                {
                    Some(id) => Err(NbdError::protocol(format!(
                        "the block status reply lacks context {id}"
                    ))),
                    None => Ok(Reply::Status(std::mem::take(&mut self.status))),
                }
            }
            _ => Ok(Reply::Done),
        }
    }
}

fn read_exact(t: &mut Transport, b: &mut [u8]) -> Result<(), NbdError> {
    t.read_exact(b).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => NbdError::ServerClosed { handshake: false },
        _ => NbdError::io("connection error", e),
    })
}

/// Server-supplied text made safe for a terminal: no control characters (escape
/// sequences), invalid UTF-8 replaced.
pub(super) fn printable(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_cannot_drive_the_terminal() {
        assert_eq!(
            printable(b"disk \x1b[2Jgone\n\xff"),
            "disk ?[2Jgone?\u{fffd}"
        );
    }
}
