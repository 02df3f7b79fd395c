//! Sockets of the NBD server: one stream type over unix and TCP connections, the
//! listener, and the rules for where the server may listen.
//!
//! The unix socket is made private without touching the process umask: it is bound inside
//! a fresh 0700 folder, set to 0600, and only then renamed to its public path, so no other
//! user can ever connect to it. Over TCP, loopback is not a boundary between users (any
//! local user can connect), so the command line serves TCP only with TLS client
//! certificates (see `crate::tls`) unless told `--insecure-tcp`; addresses beyond
//! loopback need `--allow-remote` as well.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::nbd::proto::DEFAULT_PORT;
use crate::tls::TlsStream;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket at this path (created 0600, removed when the server ends).
    Unix(PathBuf),
    /// TCP on the first of these addresses that can be bound.
    Tcp(Vec<SocketAddr>),
}

/// Parse and resolve `--listen ADDR` (`HOST:PORT`, `HOST`, `[V6]:PORT`; the port defaults
/// to 10809, 0 picks a free one). Unless `allow_remote`, every address must be loopback:
/// a disk must not be offered beyond this machine unless the operator says so (and the
/// command line allows that only with TLS).
pub fn resolve_listen(spec: &str, allow_remote: bool) -> Result<Listen> {
    let addrs = resolve(spec)?;
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        if !allow_remote {
            return Err(Error::usage(format!(
                "--listen {spec}: {} is not a loopback address; serving beyond this \
                 machine needs --allow-remote (with TLS)",
                bad.ip()
            )));
        }
    }
    Ok(Listen::Tcp(addrs))
}

fn resolve(spec: &str) -> Result<Vec<SocketAddr>> {
    let bad = |why: String| Error::usage(format!("--listen {spec}: {why}"));
    let with_port = if spec.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) {
        format!("[{spec}]:{DEFAULT_PORT}")
    } else if spec.starts_with('[') && spec.ends_with(']') || !spec.contains(':') {
        format!("{spec}:{DEFAULT_PORT}")
    } else {
        spec.to_string()
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(bad("the name resolves to no address".into()));
    }
    Ok(addrs)
}

/// One accepted connection.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// TCP after `NBD_OPT_STARTTLS` and a TLS handshake that authenticated the client.
    Tls(TlsStream),
}

impl Stream {
    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }

    /// Upgrade a TCP connection to TLS (the server side of the handshake, which must end
    /// before `deadline`). A failed handshake leaves the stream unusable: the caller
    /// closes the connection.
    pub(crate) fn start_tls(
        &mut self,
        config: Arc<rustls::ServerConfig>,
        deadline: Instant,
    ) -> io::Result<()> {
        let Stream::Tcp(tcp) = self else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is served over TCP only",
            ));
        };
        let tls = TlsStream::accept(tcp.try_clone()?, config, deadline)?;
        *self = Stream::Tls(tls);
        Ok(())
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.socket().set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.socket().set_write_timeout(t),
        }
    }

    /// Shut the socket down; errors (already closed) do not matter to any caller.
    pub(crate) fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Tls(s) => s.socket().shutdown(how),
        };
    }

    /// End the connection: a TLS one says `close_notify` first (best effort; the socket
    /// may already be shut down), then the socket is shut down.
    pub(crate) fn close(&self) {
        match self {
            Stream::Tls(s) => s.close(),
            _ => self.shutdown(Shutdown::Both),
        }
    }

    pub(crate) fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix socket".to_string(),
            Stream::Tcp(s) => crate::tls::tcp_peer(s),
            Stream::Tls(s) => s.socket().peer(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A bound listening socket.
pub(crate) enum Listener {
    Unix {
        inner: UnixListener,
        path: PathBuf,
        /// Device and inode of the socket file, so that only our own file is removed.
        id: (u64, u64),
    },
    Tcp(TcpListener),
}

impl Listener {
    pub(crate) fn bind(listen: &Listen, group: Option<u32>) -> Result<Listener> {
        let l = match listen {
            Listen::Unix(path) => bind_unix(path, group)?,
            Listen::Tcp(addrs) => {
                let l = TcpListener::bind(&addrs[..])
                    .map_err(|e| Error::io_ctx(format!("listen on {}", addrs[0]), e))?;
                Listener::Tcp(l)
            }
        };
        // Accepting never blocks: the accept loop polls so that it can notice a shutdown.
        let nb = match &l {
            Listener::Unix { inner, .. } => inner.set_nonblocking(true),
            Listener::Tcp(t) => t.set_nonblocking(true),
        };
        nb.map_err(|e| Error::io_ctx("listening socket", e))?;
        Ok(l)
    }

    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Listener::Unix { inner, .. } => inner.as_raw_fd(),
            Listener::Tcp(t) => t.as_raw_fd(),
        }
    }

    pub(crate) fn accept(&self) -> io::Result<Stream> {
        let s = match self {
            Listener::Unix { inner, .. } => Stream::Unix(inner.accept()?.0),
            Listener::Tcp(t) => {
                let s = t.accept()?.0;
                // Reply headers are small separate writes; Nagle would delay each by 40 ms.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        match &s {
            Stream::Unix(u) => u.set_nonblocking(false)?,
            Stream::Tcp(t) => t.set_nonblocking(false)?,
            Stream::Tls(_) => unreachable!("accepted connections start in clear"),
        }
        Ok(s)
    }

    pub(crate) fn local_tcp(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(t) => t.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    pub(crate) fn unix_path(&self) -> Option<&Path> {
        match self {
            Listener::Unix { path, .. } => Some(path),
            Listener::Tcp(_) => None,
        }
    }

    /// Remove the socket file if it is still ours (not replaced by a newer server).
    pub(crate) fn remove_socket(&self) {
        if let Listener::Unix { path, id, .. } = self {
            let ours = std::fs::symlink_metadata(path)
                .map(|m| (m.dev(), m.ino()) == *id)
                .unwrap_or(false);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Longest path a unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

fn bind_unix(path: &Path, group: Option<u32>) -> Result<Listener> {
    clear_stale_socket(path)?;
    let dir = fsutil::parent(path);
    let private = dir.join(format!(".vmkeep-serve-{}", std::process::id()));
    let tmp = private.join("s");
    if tmp.as_os_str().len() > MAX_SOCKET_PATH || path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::usage(format!(
            "socket path {} is too long for a unix socket; use a shorter one",
            path.display()
        )));
    }
    let _ = std::fs::remove_dir_all(&private);
    fsutil::private_dir_beside(&private)?;
    let result = bind_private(&tmp, path, group);
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    result
}

/// Bind at `tmp` (inside a private folder), make it 0600 (or 0660 for `group`), move it
/// to `path`.
fn bind_private(tmp: &Path, path: &Path, group: Option<u32>) -> Result<Listener> {
    let inner = UnixListener::bind(tmp).at(tmp)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(tmp, None, Some(gid)).at(tmp)?;
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode)).at(tmp)?;
    std::fs::rename(tmp, path).at(path)?;
    let m = std::fs::symlink_metadata(path).at(path)?;
    Ok(Listener::Unix {
        inner,
        path: path.to_path_buf(),
        id: (m.dev(), m.ino()),
    })
}

/// A socket file left by a server that died may be replaced; anything else may not.
fn clear_stale_socket(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(Error::usage(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::usage(format!(
            "{} is in use by a running server",
            path.display()
        ))),
        Err(_) => fsutil::remove_file(path),
    }
}

/// Wait until `fd` is readable or `timeout` passes; `Ok(false)` on timeout or signal.
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one valid pollfd on our stack and we pass a count of 1.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(rc > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_listen_addresses_resolve() {
        let Listen::Tcp(a) = resolve_listen("127.0.0.1:0", false).unwrap() else {
            panic!("tcp expected")
        };
        assert_eq!(a[0].port(), 0);
        let Listen::Tcp(a) = resolve_listen("::1", false).unwrap() else {
            panic!("tcp expected")
        };
        assert_eq!(a[0].port(), DEFAULT_PORT);
        assert!(resolve_listen("[::1]:99", false).is_ok());
        assert!(resolve_listen("localhost:10809", false).is_ok());
        assert!(resolve_listen("127.1.2.3", false).is_ok());
    }

    #[test]
    fn non_loopback_listen_addresses_are_refused() {
        for spec in ["0.0.0.0:10809", "192.0.2.1", "[::]:10809"] {
            let e = resolve_listen(spec, false).unwrap_err();
            assert!(e.to_string().contains("--allow-remote"), "{spec}: {e}");
            assert!(resolve_listen(spec, true).is_ok(), "{spec}");
        }
    }

    #[test]
    fn unix_socket_is_private_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let l = Listener::bind(&Listen::Unix(path.clone()), None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(UnixStream::connect(&path).is_ok());
        // A second server on the same path is refused while the first one lives.
        assert!(Listener::bind(&Listen::Unix(path.clone()), None).is_err());
        l.remove_socket();
        assert!(!path.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "private bind folder left behind");
    }

    #[test]
    fn stale_socket_is_replaced_but_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        drop(UnixListener::bind(&path).unwrap()); // a dead server's leftover
        let l = Listener::bind(&Listen::Unix(path.clone()), None).unwrap();
        l.remove_socket();
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(Listener::bind(&Listen::Unix(path.clone()), None).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}
