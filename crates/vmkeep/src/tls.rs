//! TLS for NBD: x509 credentials in the file layout of libvirt and QEMU's
//! `tls-creds-x509` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem` for a server;
//! `ca-cert.pem`, `client-cert.pem`, `client-key.pem` for a client, which is also
//! libnbd's `tls-certificates` layout), mutual authentication, and a blocking TLS stream
//! that one thread reads while others write.
//!
//! The server asks every client for a certificate and refuses, in the TLS handshake, one
//! that sends none or one that does not chain to the configured CA (rustls' webpki
//! verifier). The client sends its certificate and verifies the server's against its CA
//! and the expected server name (webpki as well). TLS 1.2 and 1.3 only, with rustls' safe
//! defaults and the `ring` provider.
//!
//! [`TlsStream`] wraps a [`Socket`] (TCP or unix) and a rustls connection so that both
//! NBD sides keep their threading model: one reader thread decrypts (requests on the
//! server, replies on the client) while other threads encrypt. The rustls state sits
//! under a lock that is never held across a socket read; socket writes happen under a
//! separate output lock, so records leave in the order they were sealed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::error::{Error, Result};

/// The files of one side's x509 credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) the peer's certificate must chain to.
    pub ca: PathBuf,
    /// This side's certificate chain.
    pub cert: PathBuf,
    /// This side's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// A server's files in a libvirt/QEMU credentials folder.
    pub fn server_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca-cert.pem"),
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
        }
    }

    /// A client's files in a libvirt/QEMU (and libnbd `tls-certificates`) folder.
    pub fn client_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca-cert.pem"),
            cert: dir.join("client-cert.pem"),
            key: dir.join("client-key.pem"),
        }
    }
}

fn bad_file(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::usage(format!("TLS: {}: {why}", path.display()))
}

/// The certificates of PEM file `path` (at least one).
pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad_file(path, pem_error(e)))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad_file(path, pem_error(e)))?;
    if certs.is_empty() {
        return Err(bad_file(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        other => format!("not a valid PEM file ({other:?})"),
    }
}

/// The CA certificates of `path` as a root store.
fn roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in certificates(path)? {
        roots
            .add(c)
            .map_err(|e| bad_file(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The private key of `path`; certtool's padded ECDSA scalars are repaired
/// ([`sec1_unpadded`]).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let key = PrivateKeyDer::from_pem_file(path).map_err(|e| bad_file(path, pem_error(e)))?;
    Ok(match key {
        PrivateKeyDer::Sec1(k) => match sec1_unpadded(k.secret_sec1_der()) {
            Some(fixed) => PrivateKeyDer::Sec1(fixed.into()),
            None => PrivateKeyDer::Sec1(k),
        },
        other => other,
    })
}

fn key_mismatch(files: &TlsFiles, e: rustls::Error) -> Error {
    bad_file(
        &files.key,
        format!("does not fit {}: {e}", files.cert.display()),
    )
}

/// One side's credentials, loaded, with the crypto provider both sides use.
struct Credentials {
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Credentials {
    fn load(files: &TlsFiles) -> Result<Credentials> {
        Ok(Credentials {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            roots: roots(&files.ca)?,
            chain: certificates(&files.cert)?,
            key: private_key(&files.key)?,
        })
    }
}

fn no_versions(e: rustls::Error) -> Error {
    Error::usage(format!("TLS: {e}"))
}

/// The rustls configuration of a server that requires client certificates from `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let c = Credentials::load(files)?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(c.roots), c.provider.clone())
            .build()
            .map_err(|e| bad_file(&files.ca, format!("cannot verify clients with it: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(c.provider)
        .with_safe_default_protocol_versions()
        .map_err(no_versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(c.chain, c.key)
        .map_err(|e| key_mismatch(files, e))?;
    Ok(Arc::new(config))
}

/// The rustls configuration of a client that presents `files.cert` and trusts only servers
/// whose certificate chains to `files.ca` (and carries the name it connects to, checked
/// in [`TlsStream::connect`]).
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>> {
    let c = Credentials::load(files)?;
    let config = rustls::ClientConfig::builder_with_provider(c.provider)
        .with_safe_default_protocol_versions()
        .map_err(no_versions)?
        .with_root_certificates(c.roots)
        .with_client_auth_cert(c.chain, c.key)
        .map_err(|e| key_mismatch(files, e))?;
    Ok(Arc::new(config))
}

/// The name a server certificate must carry: a DNS name or an IP address.
pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string())
        .map_err(|_| Error::usage(format!("TLS: {name:?} is not a host name or IP address")))
}

/// DER length octets for `n`.
fn der_len(n: usize) -> Vec<u8> {
    match n {
        0..=0x7f => vec![n as u8],
        0x80..=0xff => vec![0x81, n as u8],
        _ => vec![0x82, (n >> 8) as u8, n as u8],
    }
}

/// Read one DER length at `d[*i..]`, moving `*i` past it (short and 1–2 byte long forms).
fn read_der_len(d: &[u8], i: &mut usize) -> Option<usize> {
    let first = *d.get(*i)?;
    *i += 1;
    match first {
        0..=0x7f => Some(first as usize),
        0x81 => {
            let n = *d.get(*i)? as usize;
            *i += 1;
            Some(n)
        }
        0x82 => {
            let n = ((*d.get(*i)? as usize) << 8) | *d.get(*i + 1)? as usize;
            *i += 2;
            Some(n)
        }
        _ => None,
    }
}

/// GnuTLS' certtool writes a SEC1 `ECPrivateKey` whose private scalar carries a leading
/// zero byte (33 bytes for P-256, 49 for P-384) whenever its top bit is set; SEC1 says
/// the octet string has exactly the curve's length, and `ring` refuses the padded form.
/// Returns the key re-encoded without the padding, or `None` when there is none to strip
/// (or the DER is not the plain shape expected; rustls then judges it as it is). The
/// scalar's value is unchanged, and rustls checks afterwards that the key fits the
/// certificate.
fn sec1_unpadded(der: &[u8]) -> Option<Vec<u8>> {
    let mut i = 0;
    if *der.get(i)? != 0x30 {
        return None;
    }
    i += 1;
    let total = read_der_len(der, &mut i)?;
    if i + total != der.len() || der.get(i..i + 3)? != [0x02, 0x01, 0x01] {
        return None;
    }
    let version_at = i;
    i += 3;
    if *der.get(i)? != 0x04 {
        return None;
    }
    i += 1;
    let n = read_der_len(der, &mut i)?;
    let scalar = der.get(i..i + n)?;
    if !matches!(n, 33 | 49 | 67) || scalar[0] != 0 || scalar[1] & 0x80 == 0 {
        return None;
    }
    let mut body = der[version_at..version_at + 3].to_vec();
    body.push(0x04);
    body.extend(der_len(n - 1));
    body.extend_from_slice(&scalar[1..]);
    body.extend_from_slice(&der[i + n..]);
    let mut out = vec![0x30];
    out.extend(der_len(body.len()));
    out.extend(body);
    Some(out)
}

/// A connected stream socket: TCP or unix.
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix socket connection.
    Unix(UnixStream),
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Socket {
        Socket::Tcp(s)
    }
}

impl From<UnixStream> for Socket {
    fn from(s: UnixStream) -> Socket {
        Socket::Unix(s)
    }
}

impl Socket {
    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    /// The read timeout; it belongs to the socket, so every clone shares it.
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// The write timeout; shared by every clone.
    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_write_timeout(t),
            Socket::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Shut the socket down; a thread blocked reading it wakes up with EOF.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        }
    }

    /// The peer for log lines: its TCP address, or "unix socket".
    pub fn peer(&self) -> String {
        match self {
            Socket::Unix(_) => "unix socket".to_string(),
            Socket::Tcp(s) => tcp_peer(s),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// A TCP peer's address for log lines ("tcp" when it is gone).
pub fn tcp_peer(s: &TcpStream) -> String {
    s.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "tcp".into())
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => {
                let n = (&*s).read(buf)?;
                quick_ack(s);
                Ok(n)
            }
            Socket::Unix(s) => (&*s).read(buf),
        }
    }
}

/// Acknowledge what arrived at once rather than after the delayed-ACK timer (Linux keeps
/// `TCP_QUICKACK` only until its next decision, so it is set again after every read). A
/// peer that sends one message as several small segments without `TCP_NODELAY` (QEMU
/// 7.2's NBD server over TLS sends each reply as two records) otherwise holds the second
/// segment back until our ACK comes: about 40 ms per reply. Only an optimisation: a
/// failure changes nothing but speed.
pub fn quick_ack(s: &TcpStream) {
    let _ = rustix::net::sockopt::set_tcp_quickack(s, true);
}

impl Write for &Socket {
    /// `send(MSG_NOSIGNAL)` rather than `write`: a peer that hangs up must give us
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

struct Shared {
    conn: Mutex<rustls::Connection>,
    /// Held from sealing records to writing them, so they leave in sequence.
    out: Mutex<()>,
    sock: Socket,
}

/// A TLS connection over a [`Socket`]; clones share it (one reads, any write).
pub struct TlsStream {
    shared: Arc<Shared>,
    /// Plaintext this handle decrypted and its reader has not taken yet.
    plain: Vec<u8>,
    pos: usize,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.shared.sock)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl TlsStream {
    /// Run the server side of the TLS handshake on `sock` before `deadline`. A client
    /// whose certificate is missing or does not chain to the CA fails here (it gets an
    /// alert), before any NBD byte is exchanged under TLS.
    pub fn accept(
        sock: impl Into<Socket>,
        config: Arc<rustls::ServerConfig>,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_error)?;
        TlsStream::start(sock.into(), conn.into(), deadline)
    }

    /// Run the client side of the TLS handshake on `sock` before `deadline`: the server's
    /// certificate must chain to the configured CA and carry `name`; ours goes with it.
    /// With TLS 1.3 a server that refuses our certificate says so only after this
    /// returns (its alert arrives with the first read).
    pub fn connect(
        sock: impl Into<Socket>,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        let conn = rustls::ClientConnection::new(config, name).map_err(tls_error)?;
        TlsStream::start(sock.into(), conn.into(), deadline)
    }

    fn start(sock: Socket, conn: rustls::Connection, deadline: Instant) -> io::Result<TlsStream> {
        let s = TlsStream {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                out: Mutex::new(()),
                sock,
            }),
            plain: Vec::new(),
            pos: 0,
        };
        s.handshake(deadline)?;
        Ok(s)
    }

    fn handshake(&self, deadline: Instant) -> io::Result<()> {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            self.flush_tls()?;
            if !lock(&self.shared.conn).is_handshaking() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ));
            }
            self.shared.sock.set_read_timeout(Some(left))?;
            let n = (&self.shared.sock).read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
            if let Err(e) = self.feed(&buf[..n], None) {
                let _ = self.flush_tls(); // the alert that tells the client why
                return Err(e);
            }
        }
    }

    /// Hand received TLS bytes to rustls; decrypted plaintext goes to `plain`.
    fn feed(&self, mut raw: &[u8], mut plain: Option<&mut Vec<u8>>) -> io::Result<()> {
        let mut c = lock(&self.shared.conn);
        while !raw.is_empty() {
            if c.read_tls(&mut raw)? == 0 {
                break; // close_notify received: nothing more is read
            }
            c.process_new_packets().map_err(tls_error)?;
            if let Some(p) = plain.as_deref_mut() {
                drain_plaintext(&mut c, p)?;
            }
        }
        Ok(())
    }

    /// Write whatever TLS records rustls has pending (handshake messages, alerts, data).
    fn flush_tls(&self) -> io::Result<()> {
        let _order = lock(&self.shared.out);
        self.flush_locked()
    }

    fn flush_locked(&self) -> io::Result<()> {
        let mut pending = Vec::new();
        {
            let mut c = lock(&self.shared.conn);
            while c.wants_write() {
                c.write_tls(&mut pending)?;
            }
        }
        (&self.shared.sock).write_all(&pending)
    }

    /// Another handle on the same connection, with nothing buffered.
    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            shared: self.shared.clone(),
            plain: Vec::new(),
            pos: 0,
        })
    }

    /// The underlying socket, for timeouts and shutdown; reading or writing it directly
    /// bypasses TLS and breaks the session.
    pub fn socket(&self) -> &Socket {
        &self.shared.sock
    }

    /// Send `close_notify` (best effort), then shut the socket down.
    pub fn close(&self) {
        {
            let _order = lock(&self.shared.out);
            lock(&self.shared.conn).send_close_notify();
            let _ = self.flush_locked();
        }
        let _ = self.shared.sock.shutdown(Shutdown::Both);
    }
}

fn drain_plaintext(c: &mut rustls::Connection, into: &mut Vec<u8>) -> io::Result<()> {
    let mut tmp = [0u8; 16 << 10];
    loop {
        match c.reader().read(&mut tmp) {
            Ok(0) => return Ok(()),
            Ok(n) => into.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.plain.len() {
                let n = buf.len().min(self.plain.len() - self.pos);
                buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
                self.pos += n;
                if self.pos == self.plain.len() {
                    self.plain.clear();
                    self.pos = 0;
                }
                return Ok(n);
            }
            // Plaintext that came with the last handshake flight (a client may send its
            // first option together with its Finished) is already inside rustls.
            drain_plaintext(&mut lock(&self.shared.conn), &mut self.plain)?;
            if !self.plain.is_empty() {
                continue;
            }
            let mut raw = vec![0u8; 16 << 10];
            let n = (&self.shared.sock).read(&mut raw)?;
            if n == 0 {
                return Ok(0);
            }
            let mut plain = std::mem::take(&mut self.plain);
            let fed = self.feed(&raw[..n], Some(&mut plain));
            self.plain = plain;
            fed?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _order = lock(&self.shared.out);
        // rustls seals at most its buffer limit (64 KiB) per call: memory stays bounded
        // however large the reply.
        let n = lock(&self.shared.conn).writer().write(buf)?;
        self.flush_locked()?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[path = "../tests/nbd_support/pki.rs"]
pub(crate) mod pki;

#[cfg(test)]
mod tests {
    use super::*;

    /// ECDSA keys as certtool makes them (about half with a padded scalar) are accepted
    /// on both sides: each one loads and fits its certificate.
    #[test]
    fn certtool_ecdsa_keys_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        super::pki::new_ca(d, "keys");
        let mut padded = 0;
        for _ in 0..8 {
            super::pki::issue(
                d,
                "server-key.pem",
                "server-cert.pem",
                "cn = localhost\ntls_www_server\nsigning_key\n",
                Some("ecdsa"),
            );
            let key = PrivateKeyDer::from_pem_file(d.join("server-key.pem")).unwrap();
            if let PrivateKeyDer::Sec1(k) = &key {
                padded += sec1_unpadded(k.secret_sec1_der()).is_some() as u32;
            }
            server_config(&TlsFiles::server_dir(d)).expect("a certtool ECDSA key loads");
            std::fs::copy(d.join("server-key.pem"), d.join("client-key.pem")).unwrap();
            std::fs::copy(d.join("server-cert.pem"), d.join("client-cert.pem")).unwrap();
            client_config(&TlsFiles::client_dir(d)).expect("a certtool ECDSA client key loads");
        }
        eprintln!("{padded} of 8 keys had a padded scalar");
    }

    /// A missing or unreadable credentials file is one line naming it.
    #[test]
    fn missing_client_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = client_config(&TlsFiles::client_dir(d)).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
        let text = e.to_string();
        assert!(
            text.contains(&format!("{}/ca-cert.pem", d.display())),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1, "{text}");
        super::pki::new_ca(d, "x");
        let e = client_config(&TlsFiles::client_dir(d))
            .unwrap_err()
            .to_string();
        assert!(e.contains("client-cert.pem"), "{e}");
        std::fs::write(d.join("client-cert.pem"), "not PEM").unwrap();
        let e = client_config(&TlsFiles::client_dir(d))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("client-cert.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        assert!(server_name("not a name!").is_err());
        assert!(server_name("::1").is_ok() && server_name("backup.example").is_ok());
    }

    #[test]
    fn unpadding_keeps_unpadded_keys_and_odd_der_alone() {
        // A well-formed 32-byte scalar: nothing to strip.
        let mut k = vec![0x30, 0x25, 0x02, 0x01, 0x01, 0x04, 0x20];
        k.extend([0x80; 32]);
        assert_eq!(sec1_unpadded(&k), None);
        // Padded: 33 bytes with a zero before a byte with its top bit set.
        let mut p = vec![0x30, 0x26, 0x02, 0x01, 0x01, 0x04, 0x21, 0x00];
        p.extend([0x80; 32]);
        assert_eq!(sec1_unpadded(&p), Some(k));
        // Truncated or foreign shapes are left to rustls.
        assert_eq!(sec1_unpadded(&p[..20]), None);
        assert_eq!(sec1_unpadded(&[0x31, 0x00]), None);
        assert_eq!(sec1_unpadded(&[]), None);
    }
}
