//! A read-only NBD server: synchronous, one thread per connection plus a small worker
//! pool per connection.
//!
//! Why threads and no async runtime: the work behind a request is a few `pread`s and a
//! hash, the clients are few (a restore, a `qemu-img convert`, a mount), and the archive
//! reader is blocking code. A reader thread per connection parses requests and hands the
//! expensive ones to that connection's workers through a bounded queue; replies are
//! written under a per-connection lock and may go out of order, as the protocol allows.
//!
//! Isolation is the design rule: each connection has its own threads, queue and timeouts,
//! so a client that sends garbage, never reads its replies or goes silent loses its own
//! connection and nothing else. Shared limits bound what all clients together can take:
//! a connection cap (past it a connection is accepted and closed at once) and a byte
//! budget for read buffers, with no single request above 32 MiB. Each connection also has
//! a budget of its own for replies in flight, so a client that stops reading its replies
//! stops being served long before it could hold the shared budget.
//!
//! Over TCP the server can require TLS with client certificates ([`ServerConfig::tls`],
//! [`crate::tls`]): loopback is no boundary between local users.
//!
//! What is spoken: fixed newstyle handshake only; `NBD_OPT_GO`/`INFO` (with block sizes:
//! minimum 1, preferred = the backend's block size, maximum 32 MiB), `EXPORT_NAME`,
//! `LIST`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT` for
//! `base:allocation`, `ABORT`, and `STARTTLS` when TLS is configured (then it is required:
//! the FORCEDTLS mode of the spec; without TLS it is refused by policy); anything else is
//! `NBD_REP_ERR_UNSUP`. In transmission: `READ` (structured replies with hole chunks when
//! negotiated), `BLOCK_STATUS`, `CACHE` and `FLUSH` (nothing to do), `DISC`; writes,
//! trims and write-zeroes fail with `EPERM`. See `docs/SERVE.md`.

mod handshake;
mod net;
mod transmission;

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use net::{resolve_listen, Listen};
use net::{Listener, Stream};

use crate::error::{Error, Result};
use crate::nbd::uri::{NbdTls, NbdUri};

/// One extent of a block-status answer: `len` bytes with `base:allocation` flags
/// ([`crate::nbd::proto::STATE_HOLE`], [`crate::nbd::proto::STATE_ZERO`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the extent in bytes.
    pub len: u64,
    /// `base:allocation` flags of the extent (`STATE_HOLE`, `STATE_ZERO`; 0 for allocated data).
    pub flags: u32,
}

/// What the server exports. Implementations are read from several threads at once.
pub trait Export: Send + Sync {
    /// The export name clients ask for.
    fn name(&self) -> &str;
    /// A line for humans (`NBD_OPT_LIST`, `NBD_INFO_DESCRIPTION`).
    fn description(&self) -> String {
        String::new()
    }
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The size at which reads are efficient (a power of two, at least 512).
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    /// Fill `buf` with the bytes at `offset` (the range lies within the export). An
    /// error fails the request with `EIO`; it must never be answered with wrong bytes.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Allocation of `[offset, offset + len)`: extents in order from `offset`, covering
    /// at least a non-empty prefix of the range (clients ask again for the rest).
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
}

/// Limits and timeouts; the defaults suit a server on a backup host.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Requests of one connection processed in parallel.
    pub workers_per_connection: usize,
    /// Requests of one connection queued for its workers before the reader waits.
    pub queue_per_connection: usize,
    /// Bytes of read buffers all connections may hold together.
    pub max_buffered_bytes: usize,
    /// Bytes of read replies one connection may have in flight (read, or waiting to be
    /// taken by the client); past it the connection's requests are not read until its
    /// client takes replies. This keeps a client that never reads from holding more
    /// than this of [`max_buffered_bytes`](Self::max_buffered_bytes).
    pub max_buffered_per_connection: usize,
    /// The whole handshake must finish within this.
    pub handshake_timeout: Duration,
    /// A connection with no request for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// A reply the client does not take within this closes its connection.
    pub write_timeout: Duration,
    /// At shutdown, how long requests in flight may take to finish.
    pub drain_timeout: Duration,
    /// A unix socket is made 0660 with this group instead of 0600: QEMU (another user)
    /// connects to it for instant recovery.
    pub socket_group: Option<u32>,
    /// Require TLS with this configuration (see [`crate::tls::server_config`]): every
    /// option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD` until the client has upgraded, and the TLS handshake
    /// refuses clients without a certificate from the configured CA. TCP only.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 512,
            workers_per_connection: 4,
            queue_per_connection: 16,
            max_buffered_bytes: 512 << 20,
            max_buffered_per_connection: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(15 * 60)),
            write_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
            socket_group: None,
            tls: None,
        }
    }
}

/// State shared by the accept loop and every connection.
pub(crate) struct Shared {
    pub(crate) exports: Vec<Arc<dyn Export>>,
    pub(crate) config: ServerConfig,
    stop: AtomicBool,
    /// Live connections, by id: the accept loop counts them and shuts them down.
    conns: Mutex<HashMap<u64, Stream>>,
    next_id: AtomicU64,
    pub(crate) budget: Budget,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Stream>> {
        // Only inserts and removals happen under this lock; a panic cannot leave it torn.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The export a client names; the empty name is the default export (the first).
    pub(crate) fn find(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports
            .iter()
            .position(|e| e.name().as_bytes() == name)
    }
}

/// Stops a running [`Server`] from another thread (a signal handler thread, a test).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Ask the server to stop; [`Server::run`] returns once connections have drained.
    pub fn shutdown(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listener: Listener,
    shared: Arc<Shared>,
}

/// How long the accept loop sleeps between looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

impl Server {
    /// Bind `listen` and prepare to serve `exports` (names must be unique).
    pub fn bind(
        listen: &Listen,
        exports: Vec<Arc<dyn Export>>,
        config: ServerConfig,
    ) -> Result<Server> {
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = exports.iter().find(|e| !seen.insert(e.name().to_string())) {
            return Err(Error::usage(format!(
                "export {:?} is given twice",
                dup.name()
            )));
        }
        if config.tls.is_some() && matches!(listen, Listen::Unix(_)) {
            return Err(Error::usage(
                "TLS is served over TCP only; a unix socket is protected by its mode",
            ));
        }
        let listener = Listener::bind(listen, config.socket_group)?;
        // The shared budget always holds the largest request.
        let budget = Budget::new(
            config
                .max_buffered_bytes
                .max(crate::nbd::proto::MAX_BLOCK_SIZE as usize),
        );
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                exports,
                config,
                stop: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                budget,
            }),
        })
    }

    /// A handle another thread (a signal handler, a test) can use to stop [`Server::run`]; it
    /// shares the server's state and stays valid after the server is gone.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// The TCP address actually bound (with the port picked when 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_tcp()
    }

    /// The NBD URI of export `name` on this server, as our client parses it: `nbds://`
    /// (or `nbds+unix://`) with TLS, naming no credentials folder (the client's own, or
    /// libnbd's default, is added by whoever connects).
    pub fn uri(&self, name: &str) -> String {
        let uri = match (self.listener.unix_path(), self.local_addr()) {
            (Some(p), _) => NbdUri::unix(p, name),
            (None, Some(a)) => NbdUri::tcp(&a.ip().to_string(), a.port(), name),
            (None, None) => NbdUri::tcp("localhost", crate::nbd::proto::DEFAULT_PORT, name),
        };
        match self.shared.config.tls {
            Some(_) => uri.with_tls(NbdTls::default()).to_string(),
            None => uri.to_string(),
        }
    }

    /// Path of the unix socket the server listens on; `None` when it listens on TCP.
    pub fn socket_path(&self) -> Option<&Path> {
        self.listener.unix_path()
    }

    /// Serve until [`ShutdownHandle::shutdown`]; then stop listening (removing the unix
    /// socket), let requests in flight finish, and close every connection.
    pub fn run(self) -> Result<()> {
        let result = self.accept_loop();
        self.listener.remove_socket();
        self.drain();
        result
    }

    fn accept_loop(&self) -> Result<()> {
        while !self.shared.stop.load(Ordering::SeqCst) {
            match net::wait_readable(self.listener.fd(), POLL) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return Err(Error::io_ctx("waiting for connections", e)),
            }
            match self.listener.accept() {
                Ok(stream) => self.admit(stream),
                Err(e) => self.accept_failed(e),
            }
        }
        Ok(())
    }

    fn accept_failed(&self, e: std::io::Error) {
        use std::io::ErrorKind::*;
        if matches!(e.kind(), WouldBlock | Interrupted | ConnectionAborted) {
            return;
        }
        // Out of descriptors or memory: back off instead of spinning; clients retry.
        tracing::warn!("accepting a connection failed: {e}");
        std::thread::sleep(POLL);
    }

    /// Start a thread for a new connection, or close it when the server is full.
    fn admit(&self, stream: Stream) {
        let shared = &self.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut conns = shared.conns();
            if conns.len() >= shared.config.max_connections {
                tracing::debug!("connection limit reached; closing a new connection");
                return;
            }
            match stream.try_clone() {
                Ok(c) => conns.insert(id, c),
                Err(e) => {
                    tracing::warn!("cannot track a new connection: {e}");
                    return;
                }
            };
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let _registered = Registration { shared: &s, id };
                connection(&s, stream);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start a thread for a new connection: {e}");
            shared.conns().remove(&id);
        }
    }

    /// Stop reading from every client, wait for their requests in flight, then close.
    fn drain(&self) {
        for s in self.shared.conns().values() {
            s.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + self.shared.config.drain_timeout;
        while !self.shared.conns().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for s in self.shared.conns().values() {
            s.shutdown(Shutdown::Both);
        }
    }
}

/// Removes a connection from the live set when its thread ends, however it ends.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
    }
}

/// The life of one connection: handshake, then transmission until either side ends it.
fn connection(shared: &Shared, mut stream: Stream) {
    let peer = stream.peer();
    let _ = stream.set_write_timeout(Some(shared.config.write_timeout));
    match handshake::negotiate(shared, &mut stream) {
        Ok(Some(session)) => {
            tracing::debug!("{peer}: serving export {}", session.export.name());
            return transmission::serve(shared, stream, session);
        }
        Ok(None) => {}
        // Refused TLS handshakes (no certificate, a foreign CA) are worth an operator's
        // eye: they name who tried.
        Err(e) if e.to_string().starts_with("TLS") => tracing::info!("{peer}: refused: {e}"),
        Err(e) => tracing::debug!("{peer}: handshake ended: {e}"),
    }
    // The live set keeps a clone of the socket; shut it down so the client sees the end now.
    stream.close();
}

/// A byte budget: a request waits until its buffer fits. The server has one for all read
/// buffers together, and each connection one of its own for its replies in flight.
pub(crate) struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    cap: usize,
}

impl Budget {
    pub(crate) fn new(cap: usize) -> Budget {
        Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            cap: cap.max(1),
        }
    }

    /// Take `n` bytes (at most the cap: a larger request takes all of it, so it runs
    /// alone), waiting while others hold too much.
    pub(crate) fn take(&self, n: usize) -> BudgetGuard<'_> {
        let n = n.min(self.cap);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + n > self.cap {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
        BudgetGuard { budget: self, n }
    }
}

pub(crate) struct BudgetGuard<'a> {
    budget: &'a Budget,
    n: usize,
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.n;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests;
