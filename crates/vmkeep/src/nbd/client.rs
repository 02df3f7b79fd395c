//! vmkeep's NBD client: synchronous, thread-based, pipelined.
//!
//! No maintained Rust crate speaks structured replies and block status, and the engine is
//! built on threads, so the client is our own and needs no async runtime: every
//! connection has one reader thread that matches replies to cookies (`client/conn.rs`),
//! callers block on their own reply with a deadline, and many requests share a socket.
//! When the server sets `NBD_FLAG_CAN_MULTI_CONN`, up to [`NbdOptions::connections`]
//! connections are opened and requests are spread over them.
//!
//! Every answer from the server is checked; a misbehaving server produces an
//! [`Error::Source`] naming it, never a panic or a hang (every wait has a deadline).
//! Inside the client a failure is a typed `NbdError` (`client/error.rs`); it becomes an
//! [`Error::Source`] with the same text at the public methods.
//! Large requests are split to the server's maximum block size (32 MiB when it gives
//! none) and unaligned reads are widened to its minimum block size.
//!
//! TLS (`nbds://`, `nbds+unix://`, or [`NbdUri::tls`] set by a caller): every connection
//! starts with `NBD_OPT_STARTTLS` and the rustls handshake ([`crate::tls`]) before any
//! other option, and a server that does not offer TLS is refused, never read in clear.
//! Extended headers are not negotiated (`docs/NBD-CLIENT.md` says why).

mod conn;
mod error;
mod handshake;
mod transport;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use crate::nbd::uri::{NbdAddress, NbdTls, NbdUri};
use conn::{Conn, Reply, Ticket};
use error::NbdError;
use transport::{Deadline, TlsClient, Transport};

use crate::error::{Error, Result};
use crate::nbd::proto::*;

/// Default cap on one read or write payload (the protocol's portable maximum).
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;
/// Default deadline for connecting, the handshake and each reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default number of connections when the server allows several.
pub const DEFAULT_CONNECTIONS: usize = 4;

/// Longest block status query: the compact header's 32-bit length, kept well inside it.
const MAX_STATUS_QUERY: u64 = 1 << 31;
/// Longest trim or write-zeroes request when the server advertises no maximum.
const MAX_ZERO_REQUEST: u64 = 1 << 30;
/// Requests of one call in flight at once (bounds the memory of a huge read).
const WINDOW: usize = 8;
/// Round trips one `block_status` call makes before it returns what it has.
const MAX_STATUS_ROUNDS: usize = 64;
/// Handshake deadline of the optional extra connections: a server with all its client
/// slots taken (qemu-nbd `--shared=N`) accepts the socket but stays silent, and that
/// must not hold up the backup for a whole reply timeout.
const EXTRA_HANDSHAKE: Duration = Duration::from_secs(2);

/// How to connect.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Metadata contexts to select (`base:allocation`, `qemu:dirty-bitmap:NAME`, …).
    pub contexts: Vec<String>,
    /// Most connections to open when the server sets `CAN_MULTI_CONN` (at least 1).
    pub connections: usize,
    /// Deadline for connecting, the whole handshake, and each reply.
    pub timeout: Duration,
    /// Cap on one read or write payload, below the server's maximum.
    pub max_request: u32,
    /// How messages name the server (default: the URI).
    pub name: Option<String>,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            contexts: vec![META_BASE_ALLOCATION.to_string()],
            connections: DEFAULT_CONNECTIONS,
            timeout: DEFAULT_TIMEOUT,
            max_request: DEFAULT_MAX_REQUEST,
            name: None,
        }
    }
}

/// The server's block size constraints (protocol defaults when it advertised none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Alignment of every offset and length (a power of two, at most 64 KiB).
    pub minimum: u32,
    /// Size at which requests are efficient.
    pub preferred: u32,
    /// Largest request (`u32::MAX`: no limit of the server's own).
    pub maximum: u32,
}

impl BlockSizes {
    const DEFAULT: BlockSizes = BlockSizes {
        minimum: 1,
        preferred: 4096,
        maximum: u32::MAX,
    };

    fn validated(self) -> std::result::Result<BlockSizes, NbdError> {
        let ok = self.minimum.is_power_of_two()
            && self.minimum <= 1 << 16
            && self.preferred.is_power_of_two()
            && self.preferred >= self.minimum
            && (self.maximum == u32::MAX
                || (self.maximum >= self.minimum && self.maximum % self.minimum == 0));
        if ok {
            Ok(self)
        } else {
            Err(NbdError::protocol(format!(
                "the server advertised invalid block sizes {self:?}"
            )))
        }
    }
}

/// A write sent and not yet answered ([`NbdClient::start_write`]).
pub struct PendingWrite {
    conn: usize,
    ticket: Ticket,
}

/// A connected NBD export. `Send + Sync`: call it from many threads at once.
pub struct NbdClient {
    name: String,
    size: u64,
    flags: u16,
    structured: bool,
    /// Names of the selected metadata contexts (ids are per connection).
    contexts: Vec<String>,
    block_sizes: BlockSizes,
    max_payload: u32,
    conns: Vec<Conn>,
    next: AtomicUsize,
    closed: AtomicBool,
}

impl NbdClient {
    /// Connect to `uri`, negotiate, and open extra connections when the server allows.
    pub fn connect(uri: &NbdUri, opts: &NbdOptions) -> Result<NbdClient> {
        Self::connect_when_ready(uri, opts, Instant::now(), &mut || Ok(()))
    }

    /// Like [`connect`](Self::connect), but while the socket does not exist or refuses
    /// connections, retry until `ready_by`, calling `alive` before each attempt (a server
    /// process that is still starting; `alive` reports that it died).
    pub(crate) fn connect_when_ready(
        uri: &NbdUri,
        opts: &NbdOptions,
        ready_by: Instant,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<NbdClient> {
        let name = opts.name.clone().unwrap_or_else(|| uri.to_string());
        check_options(&name, uri, opts)?;
        let tls = tls_client(uri)?;
        let first = loop {
            alive()?;
            match Transport::connect(&uri.address, opts.timeout) {
                Ok(t) => break t,
                Err(e) if retryable(&e) && Instant::now() < ready_by => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(Error::source(&name, NbdError::io("cannot connect", e))),
            }
        };
        let (n, conn) = open(first, uri, opts, tls.as_ref(), opts.timeout)
            .map_err(|e| Error::source(&name, e))?;
        let mut client = NbdClient::new(name, n, conn, opts);
        if client.can_multi_conn() {
            client.add_connections(uri, opts, tls.as_ref());
        }
        tracing::debug!(
            "{}: {} bytes, flags {:#06x}, structured {}, contexts {:?}, {:?}, {} connection(s), TLS {}",
            client.name,
            client.size,
            client.flags,
            client.structured,
            client.contexts,
            client.block_sizes,
            client.conns.len(),
            tls.is_some()
        );
        Ok(client)
    }

    fn new(name: String, n: handshake::Negotiated, conn: Conn, opts: &NbdOptions) -> NbdClient {
        let block_sizes = n.block_sizes.unwrap_or(BlockSizes::DEFAULT);
        let min = block_sizes.minimum;
        let max_payload = (block_sizes.maximum.min(opts.max_request) / min * min).max(min);
        NbdClient {
            name,
            size: n.size,
            flags: n.flags,
            structured: n.structured,
            contexts: context_names(&n.contexts),
            block_sizes,
            max_payload,
            conns: vec![conn],
            next: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Open up to `opts.connections - 1` more connections (each with its own STARTTLS
    /// when `tls`), all at once: their handshakes (TLS's above all, and a remote host's
    /// round trips) overlap instead of adding up. A failure only means fewer.
    fn add_connections(&mut self, uri: &NbdUri, opts: &NbdOptions, tls: Option<&TlsClient>) {
        let deadline = opts.timeout.min(EXTRA_HANDSHAKE);
        let wanted = opts.connections.saturating_sub(self.conns.len());
        let opened: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..wanted)
                .map(|_| {
                    s.spawn(|| {
                        Transport::connect(&uri.address, deadline)
                            .map_err(|e| NbdError::io("cannot connect", e))
                            .and_then(|t| open(t, uri, opts, tls, deadline))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(NbdError::io(
                            "cannot connect",
                            std::io::Error::other("handshake thread panicked"),
                        ))
                    })
                })
                .collect()
        });
        for extra in opened {
            match extra {
                Ok((n, conn))
                    if n.size == self.size && context_names(&n.contexts) == self.contexts =>
                {
                    self.conns.push(conn)
                }
                Ok(_) => {
                    tracing::warn!(
                        "{}: another connection saw another export; not using it",
                        self.name
                    );
                }
                Err(e) => {
                    tracing::warn!("{}: extra connection failed ({e})", self.name);
                }
            }
        }
        tracing::debug!("{}: {} connection(s)", self.name, self.conns.len());
    }

    /// How messages name the server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags the server sent.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether the server set `NBD_FLAG_READ_ONLY`: writes, trims and write-zeroes will fail with
    /// `EPERM`.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// Whether the server set `NBD_FLAG_CAN_MULTI_CONN`, so that several connections to the export
    /// are consistent and may be used in parallel.
    pub fn can_multi_conn(&self) -> bool {
        self.flags & TFLAG_CAN_MULTI_CONN != 0
    }

    /// Whether the server accepts `NBD_CMD_TRIM` (`NBD_FLAG_SEND_TRIM`).
    pub fn can_trim(&self) -> bool {
        self.flags & TFLAG_SEND_TRIM != 0
    }

    /// Whether the server accepts `NBD_CMD_WRITE_ZEROES` (`NBD_FLAG_SEND_WRITE_ZEROES`); without it
    /// zeros have to be written as data.
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & TFLAG_SEND_WRITE_ZEROES != 0
    }

    /// Whether the server accepts `NBD_CMD_FLUSH` (`NBD_FLAG_SEND_FLUSH`); without it writes cannot
    /// be made durable through NBD.
    pub fn can_flush(&self) -> bool {
        self.flags & TFLAG_SEND_FLUSH != 0
    }

    /// Whether structured replies were negotiated (block status needs them).
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Whether the server selected metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|n| n == name)
    }

    /// The selected metadata contexts.
    pub fn contexts(&self) -> impl Iterator<Item = &str> {
        self.contexts.iter().map(|n| n.as_str())
    }

    /// The server's block size constraints in bytes (the protocol defaults when it sent no
    /// `NBD_INFO_BLOCK_SIZE`).
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    /// Largest read or write payload sent in one request.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Connections in use.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (start, end) = self.widen(offset, buf.len() as u64);
        if start == offset && end - start == buf.len() as u64 {
            return self.read_aligned(offset, buf);
        }
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_aligned(start, &mut tmp)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` into `buf` and hand it back. A read that fits
    /// one request travels in `buf` itself (no copy); others go through [`read`](Self::read).
    pub fn read_vec(&self, offset: u64, mut buf: Vec<u8>) -> Result<Vec<u8>> {
        self.check_range("read", offset, buf.len() as u64)?;
        let len = buf.len() as u64;
        let (start, end) = self.widen(offset, len);
        if buf.is_empty()
            || start != offset
            || end - start != len
            || len > u64::from(self.max_payload)
        {
            self.read(offset, &mut buf)?;
            return Ok(buf);
        }
        let conn = self.pick();
        let t = conn
            .submit_read(offset, len as u32, buf)
            .map_err(|e| self.err(e))?;
        match conn.wait(t).map_err(|e| self.err(e))? {
            Reply::Data(d) if d.len() as u64 == len => Ok(d),
            _ => Err(self.err("a read got a reply without data")),
        }
    }

    fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let pieces = split(offset, buf.len() as u64, u64::from(self.max_payload));
        self.pipeline(
            pieces,
            |conn, off, len| conn.submit(CMD_READ, 0, off, len as u32, None),
            |off, reply| match reply {
                Reply::Data(d) => {
                    let at = (off - offset) as usize;
                    buf[at..at + d.len()].copy_from_slice(&d);
                    Ok(())
                }
                _ => Err(NbdError::protocol("a read got a reply without data")),
            },
        )
    }

    /// Extents of metadata context `context` from `offset`: (length, flags) in order,
    /// covering at least the start of `[offset, offset + length)` and nothing past it
    /// (or past the end of the export). Short answers are followed up, up to a bound;
    /// callers ask again for whatever is left.
    pub fn block_status(&self, context: &str, offset: u64, length: u64) -> Result<Vec<(u64, u32)>> {
        if !self.has_context(context) {
            return Err(self.err(format!(
                "the server did not select metadata context {context}"
            )));
        }
        let end = offset.saturating_add(length).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        for _ in 0..MAX_STATUS_ROUNDS {
            if pos >= end {
                break;
            }
            pos = self.status_round(context, pos, end, &mut out)?;
        }
        Ok(out)
    }

    /// One block status request from `pos`; appends to `out`, returns the new position.
    fn status_round(
        &self,
        context: &str,
        pos: u64,
        end: u64,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<u64> {
        let (start, stop) = self.widen(pos, (end - pos).min(MAX_STATUS_QUERY));
        let conn = self.pick();
        // Context ids are per connection.
        let id = conn
            .context_id(context)
            .ok_or_else(|| self.err(format!("a connection lacks metadata context {context}")))?;
        let ticket = conn
            .submit(CMD_BLOCK_STATUS, 0, start, (stop - start) as u32, None)
            .map_err(|e| self.err(e))?;
        let status = match conn.wait(ticket).map_err(|e| self.err(e))? {
            Reply::Status(s) => s,
            _ => return Err(self.err("a block status request got a reply without status")),
        };
        let extents = status
            .into_iter()
            .find(|(i, _)| *i == id)
            .map(|(_, e)| e)
            .unwrap_or_default();
        let mut at = start;
        for (len, flags) in extents {
            let next = at.saturating_add(u64::from(len));
            let (s, e) = (at.max(pos), next.min(end));
            if e > s {
                push_extent(out, e - s, flags);
            }
            at = next;
            if at >= end {
                break;
            }
        }
        if at <= pos {
            return Err(self.err(format!("block status at byte {pos} made no progress")));
        }
        Ok(at.min(end))
    }

    /// Write `data` at `offset` (aligned to the minimum block size).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range("write", offset, data.len() as u64)?;
        self.check_aligned("write", offset, data.len() as u64)?;
        let pieces = split(offset, data.len() as u64, u64::from(self.max_payload));
        self.pipeline(
            pieces,
            |conn, off, len| {
                let at = (off - offset) as usize;
                conn.submit(
                    CMD_WRITE,
                    0,
                    off,
                    len as u32,
                    Some(&data[at..at + len as usize]),
                )
            },
            |_, _| Ok(()),
        )
    }

    /// Send a write of `data` (at most [`max_payload`](Self::max_payload) bytes, aligned)
    /// without waiting for its reply; [`finish_write`](Self::finish_write) waits. Lets a
    /// caller keep many writes in flight instead of one round trip each.
    pub fn start_write(&self, offset: u64, data: &[u8]) -> Result<PendingWrite> {
        self.check_writable()?;
        self.check_range("write", offset, data.len() as u64)?;
        self.check_aligned("write", offset, data.len() as u64)?;
        if data.len() as u64 > u64::from(self.max_payload) {
            return Err(Error::usage(format!(
                "{}: a write of {} bytes is longer than the {} allowed in one request",
                self.name,
                data.len(),
                self.max_payload
            )));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.conns.len();
        let conn = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| !self.conns[i].is_dead())
            .unwrap_or(start % n);
        let ticket = self.conns[conn]
            .submit(CMD_WRITE, 0, offset, data.len() as u32, Some(data))
            .map_err(|e| self.err(e))?;
        Ok(PendingWrite { conn, ticket })
    }

    /// Wait for the reply to a write sent with [`start_write`](Self::start_write).
    pub fn finish_write(&self, w: PendingWrite) -> Result<()> {
        self.conns[w.conn]
            .wait(w.ticket)
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Make `[offset, offset + len)` read as zeros; `no_hole` asks the server to keep it
    /// allocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<()> {
        self.check_writable()?;
        if !self.can_write_zeroes() {
            return Err(self.err("the server does not support write-zeroes"));
        }
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len)
    }

    /// Tell the server `[offset, offset + len)` is no longer needed.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if !self.can_trim() {
            return Err(self.err("the server does not support trim"));
        }
        self.ranged(CMD_TRIM, 0, offset, len)
    }

    /// Make every write that has been answered durable. With multi-conn, one flush covers
    /// every connection (that is what the server promises by setting the flag).
    pub fn flush(&self) -> Result<()> {
        if !self.can_flush() {
            return Err(self.err("the server does not support flush"));
        }
        let conn = self.pick();
        let t = conn
            .submit(CMD_FLUSH, 0, 0, 0, None)
            .map_err(|e| self.err(e))?;
        conn.wait(t).map(|_| ()).map_err(|e| self.err(e))
    }

    /// Say goodbye (`NBD_CMD_DISC`) on every connection and stop their readers. Later
    /// calls fail. Also done on drop.
    pub fn disconnect(&self) -> Result<()> {
        if !self.closed.swap(true, Ordering::SeqCst) {
            for c in &self.conns {
                c.disconnect();
            }
        }
        Ok(())
    }

    /// Trim and write-zeroes: no payload, split to the server's maximum.
    fn ranged(&self, kind: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let what = command_name(kind);
        self.check_range(what, offset, len)?;
        self.check_aligned(what, offset, len)?;
        let min = u64::from(self.block_sizes.minimum);
        let limit = u64::from(self.block_sizes.maximum).min(MAX_ZERO_REQUEST) / min * min;
        let pieces = split(offset, len, limit);
        self.pipeline(
            pieces,
            |conn, off, l| conn.submit(kind, flags, off, l as u32, None),
            |_, _| Ok(()),
        )
    }

    /// Keep up to [`WINDOW`] of `pieces` in flight, spread over the connections, and
    /// hand each reply to `done` (in order).
    fn pipeline(
        &self,
        pieces: impl Iterator<Item = (u64, u64)>,
        mut send: impl FnMut(&Conn, u64, u64) -> std::result::Result<Ticket, NbdError>,
        mut done: impl FnMut(u64, Reply) -> std::result::Result<(), NbdError>,
    ) -> Result<()> {
        let mut in_flight: VecDeque<(&Conn, u64, Ticket)> = VecDeque::new();
        for (off, len) in pieces {
            if in_flight.len() == WINDOW {
                let (c, o, t) = in_flight.pop_front().expect("window is full");
                done(o, c.wait(t).map_err(|e| self.err(e))?).map_err(|e| self.err(e))?;
            }
            let conn = self.pick();
            in_flight.push_back((conn, off, send(conn, off, len).map_err(|e| self.err(e))?));
        }
        while let Some((c, o, t)) = in_flight.pop_front() {
            done(o, c.wait(t).map_err(|e| self.err(e))?).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The next connection, round robin, skipping dead ones while a live one remains.
    fn pick(&self) -> &Conn {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.conns[(start + i) % n])
            .find(|c| !c.is_dead())
            .unwrap_or(&self.conns[start % n])
    }

    /// `[offset, offset + len)` widened to the minimum block size, within the export.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let min = u64::from(self.block_sizes.minimum);
        let start = offset / min * min;
        let end = (offset + len).div_ceil(min) * min;
        (start, end.min(self.size))
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.err("the client is disconnected"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::usage(format!(
                "{}: {what} of {len} bytes at byte {offset} is past the end ({} bytes)",
                self.name, self.size
            ))),
        }
    }

    fn check_aligned(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        let min = u64::from(self.block_sizes.minimum);
        let end = offset + len;
        if offset % min != 0 || (end % min != 0 && end != self.size) {
            return Err(Error::usage(format!(
                "{}: {what} at byte {offset}+{len} is not aligned to the server's {min}-byte blocks",
                self.name
            )));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only() {
            return Err(self.err("the export is read-only"));
        }
        Ok(())
    }

    /// A failure of this client (an [`NbdError`] or a text) as the library's error: a
    /// source error naming the server.
    fn err(&self, detail: impl std::fmt::Display) -> Error {
        Error::source(&self.name, detail)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}

/// Negotiate on a fresh socket (within `handshake_timeout`; with `tls`, STARTTLS and the
/// TLS handshake first) and start its connection.
fn open(
    mut t: Transport,
    uri: &NbdUri,
    opts: &NbdOptions,
    tls: Option<&TlsClient>,
    handshake_timeout: Duration,
) -> std::result::Result<(handshake::Negotiated, Conn), NbdError> {
    let deadline = Instant::now() + handshake_timeout;
    let greeting = handshake::greet(&mut Deadline {
        inner: &mut t,
        deadline,
    })?;
    if let Some(tls) = tls {
        handshake::start_tls(
            &mut Deadline {
                inner: &mut t,
                deadline,
            },
            &greeting,
        )?;
        t = t
            .start_tls(tls, deadline)
            .map_err(|e| tls_failure(handshake::io_error(e), tls))?;
    }
    let n = handshake::options(
        &mut Deadline {
            inner: &mut t,
            deadline,
        },
        &greeting,
        &uri.export,
        &opts.contexts,
    )
    .map_err(|e| match tls {
        Some(tls) => tls_failure(e, tls),
        None => e,
    })?;
    let conn = Conn::start(t, n.structured, n.contexts.clone(), opts.timeout)
        .map_err(|e| NbdError::io("cannot start the connection", e))?;
    Ok((n, conn))
}

/// A handshake failure once TLS started, said plainly: a certificate we refused names
/// what was expected; an alert or a hang-up right after the TLS handshake is the server
/// refusing us (with TLS 1.3 a client learns that its certificate was refused only then).
fn tls_failure(e: NbdError, tls: &TlsClient) -> NbdError {
    match e {
        NbdError::Tls(why) if why.contains("alert") => NbdError::TlsRefused(why),
        NbdError::Tls(why) => NbdError::Tls(format!("{why} ({})", tls.expect)),
        NbdError::ServerClosed { handshake: true } => {
            NbdError::TlsRefused("TLS: the server closed the connection".into())
        }
        other => other,
    }
}

/// The TLS client of `uri` (`None` for a plain one): its credentials loaded once for
/// every connection; a missing or bad file is a usage error naming it.
fn tls_client(uri: &NbdUri) -> Result<Option<TlsClient>> {
    let Some(t) = &uri.tls else {
        return Ok(None);
    };
    let dir = t.certificates_dir();
    let files = crate::tls::TlsFiles::client_dir(&dir);
    let config = crate::tls::client_config(&files)?;
    let server = t.server_name(&uri.address);
    Ok(Some(TlsClient {
        config,
        name: crate::tls::server_name(server)?,
        expect: format!(
            "the server certificate must be for {server:?} and signed by the CA in {}",
            files.ca.display()
        ),
    }))
}

fn check_options(name: &str, uri: &NbdUri, opts: &NbdOptions) -> Result<()> {
    let bad = |why: String| Err(Error::usage(format!("{name}: {why}")));
    if opts.connections == 0 || opts.timeout.is_zero() || opts.max_request == 0 {
        return bad("connections, timeout and max_request must be positive".into());
    }
    if uri.export.len() > MAX_STRING_LEN {
        return bad("export name longer than 4096 bytes".into());
    }
    if let Some(c) = opts
        .contexts
        .iter()
        .find(|c| c.len() > MAX_STRING_LEN || c.is_empty())
    {
        return bad(format!("bad metadata context name {c:?}"));
    }
    Ok(())
}

/// Context names, sorted: what must agree between connections (their ids need not).
fn context_names(contexts: &[(String, u32)]) -> Vec<String> {
    let mut v: Vec<String> = contexts.iter().map(|(n, _)| n.clone()).collect();
    v.sort();
    v.dedup();
    v
}

/// Whether a connect error means "the server is not listening yet".
fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// `[offset, offset + len)` in pieces of at most `max` bytes (lazily: a trim of a whole
/// huge export must not allocate a list of pieces).
fn split(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u64)> {
    let max = max.max(1);
    let end = offset + len;
    (0..len.div_ceil(max)).map(move |i| {
        let at = offset + i * max;
        (at, (end - at).min(max))
    })
}

/// Append an extent, merging it into the last one when the flags are equal.
fn push_extent(out: &mut Vec<(u64, u32)>, len: u64, flags: u32) {
    match out.last_mut() {
        Some(last) if last.1 == flags => last.0 += len,
        _ => out.push((len, flags)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_range() {
        let v = |it: &mut dyn Iterator<Item = (u64, u64)>| it.collect::<Vec<_>>();
        assert_eq!(v(&mut split(10, 25, 10)), vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(v(&mut split(0, 0, 10)), vec![]);
        assert_eq!(v(&mut split(0, 4, 0)), vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(split(0, u64::MAX, 1 << 30).size_hint().0, 1 << 34);
    }

    #[test]
    fn block_sizes_are_validated() {
        let ok = BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20,
        };
        assert!(ok.validated().is_ok());
        assert!(BlockSizes::DEFAULT.validated().is_ok());
        for bad in [
            BlockSizes { minimum: 3, ..ok },
            BlockSizes {
                minimum: 1 << 17,
                preferred: 1 << 17,
                ..ok
            },
            BlockSizes {
                preferred: 256,
                ..ok
            },
            BlockSizes {
                maximum: 1000,
                ..ok
            },
            BlockSizes { maximum: 256, ..ok },
        ] {
            assert!(bad.validated().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn extents_merge() {
        let mut v = Vec::new();
        push_extent(&mut v, 5, 3);
        push_extent(&mut v, 5, 3);
        push_extent(&mut v, 1, 0);
        assert_eq!(v, vec![(10, 3), (1, 0)]);
    }
}
