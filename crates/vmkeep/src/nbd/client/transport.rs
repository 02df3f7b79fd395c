//! The byte stream under an NBD connection: a TCP or unix socket, in clear or, after a
//! successful `NBD_OPT_STARTTLS`, inside TLS ([`crate::tls::TlsStream`]). Everything
//! above this module only sees `Read + Write`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use crate::nbd::uri::NbdAddress;
use crate::tls::{Socket, TlsStream};

pub(super) enum Transport {
    Plain(Socket),
    Tls(TlsStream),
}

/// What a connection needs to start TLS: the client configuration (credentials loaded
/// once for every connection) and the name the server certificate must carry.
#[derive(Clone)]
pub(super) struct TlsClient {
    pub config: Arc<rustls::ClientConfig>,
    pub name: ServerName<'static>,
    /// What the server's certificate is checked for, for the message when it fails.
    pub expect: String,
}

impl Transport {
    /// Connect, giving up on each TCP address after `timeout`.
    pub fn connect(address: &NbdAddress, timeout: Duration) -> io::Result<Transport> {
        match address {
            NbdAddress::Unix(path) => Ok(Transport::Plain(UnixStream::connect(path)?.into())),
            NbdAddress::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            // The protocol document asks for it: replies are small messages.
                            s.set_nodelay(true)?;
                            return Ok(Transport::Plain(s.into()));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// Run the TLS handshake (before `deadline`) on a connection in clear whose server
    /// acknowledged `NBD_OPT_STARTTLS`.
    pub fn start_tls(self, tls: &TlsClient, deadline: Instant) -> io::Result<Transport> {
        match self {
            Transport::Plain(s) => Ok(Transport::Tls(TlsStream::connect(
                s,
                tls.config.clone(),
                tls.name.clone(),
                deadline,
            )?)),
            Transport::Tls(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is already running",
            )),
        }
    }

    pub fn try_clone(&self) -> io::Result<Transport> {
        Ok(match self {
            Transport::Plain(s) => Transport::Plain(s.try_clone()?),
            Transport::Tls(s) => Transport::Tls(s.try_clone()?),
        })
    }

    fn socket(&self) -> &Socket {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(s) => s.socket(),
        }
    }

    /// Close both directions; a thread blocked reading this socket wakes up with EOF.
    /// Never blocks (no TLS alert is written: a writer may be stuck holding the session).
    pub fn shutdown(&self) {
        let _ = self.socket().shutdown(Shutdown::Both);
    }

    /// End a TLS session with `close_notify` (best effort, after `NBD_CMD_DISC`), so the
    /// server sees a clean end rather than a truncated session; nothing for a plain one.
    pub fn close_notify(&self) {
        if let Transport::Tls(s) = self {
            s.close();
        }
    }

    /// Socket timeouts; they belong to the socket, so every clone shares them.
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(read)?;
        self.socket().set_write_timeout(write)
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => (&*s).read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => (&*s).write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stream with one deadline for a whole exchange (the handshake): every read and
/// write gets only the time that is left, so a server that trickles bytes cannot stretch
/// the handshake past the deadline.
pub(super) struct Deadline<'a> {
    pub inner: &'a mut Transport,
    pub deadline: Instant,
}

impl Deadline<'_> {
    fn arm(&mut self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ));
        }
        self.inner.set_timeouts(Some(left), Some(left))
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.inner.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
