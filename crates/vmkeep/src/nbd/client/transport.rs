//! The byte stream under an NBD connection: TCP or a unix socket.
//!
//! TLS would be a third variant here, wrapping the socket after a successful
//! `NBD_OPT_STARTTLS`; everything above this module only sees `Read + Write`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::nbd::uri::NbdAddress;

pub(super) enum Transport {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Transport {
    /// Connect, giving up on each TCP address after `timeout`.
    pub fn connect(address: &NbdAddress, timeout: Duration) -> io::Result<Transport> {
        match address {
            NbdAddress::Unix(path) => Ok(Transport::Unix(UnixStream::connect(path)?)),
            NbdAddress::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            // The protocol document asks for it: replies are small messages.
                            s.set_nodelay(true)?;
                            return Ok(Transport::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    pub fn try_clone(&self) -> io::Result<Transport> {
        Ok(match self {
            Transport::Tcp(s) => Transport::Tcp(s.try_clone()?),
            Transport::Unix(s) => Transport::Unix(s.try_clone()?),
        })
    }

    /// Close both directions; a thread blocked reading this socket wakes up with EOF.
    pub fn shutdown(&self) {
        let _ = match self {
            Transport::Tcp(s) => s.shutdown(Shutdown::Both),
            Transport::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Socket timeouts; they belong to the socket, so every clone shares them.
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Transport::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Transport::Tcp(s) => s.as_raw_fd(),
            Transport::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(s) => s.read(buf),
            Transport::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    /// `send(MSG_NOSIGNAL)` rather than `write`: a server that hangs up must give us
    /// EPIPE, not a SIGPIPE that kills the process when the binary restored SIGPIPE's
    /// default action (as command-line tools do to exit quietly on a closed pipe).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes and the descriptor
        // is owned by `self` for the duration of the call.
        let n = unsafe {
            libc::send(
                self.fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
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
