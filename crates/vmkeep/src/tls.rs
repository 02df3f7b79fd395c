//! TLS for NBD: x509 credentials in the file layout of libvirt and QEMU's
//! `tls-creds-x509` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`), mutual
//! authentication, and a blocking TLS stream that one thread reads while others write.
//!
//! The server asks every client for a certificate and refuses, in the TLS handshake, one
//! that sends none or one that does not chain to the configured CA (rustls' webpki
//! verifier). TLS 1.2 and 1.3 only, with rustls' safe defaults and the `ring` provider.
//!
//! [`TlsStream`] wraps a TCP socket and a rustls connection so that the NBD server keeps
//! its threading model: the connection's reader thread decrypts requests while workers
//! encrypt replies. The rustls state sits under a lock that is never held across a
//! socket read; socket writes happen under a separate output lock, so records leave in
//! the order they were sealed. Written to be shared with the NBD client later (it holds
//! a [`rustls::Connection`], client or server).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
}

fn bad_file(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::usage(format!("TLS: {}: {why}", path.display()))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
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

/// The rustls configuration of a server that requires client certificates from `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in certificates(&files.ca)? {
        roots
            .add(c)
            .map_err(|e| bad_file(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let chain = certificates(&files.cert)?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad_file(&files.key, pem_error(e)))?;
    let key = match key {
        PrivateKeyDer::Sec1(k) => match sec1_unpadded(k.secret_sec1_der()) {
            Some(fixed) => PrivateKeyDer::Sec1(fixed.into()),
            None => PrivateKeyDer::Sec1(k),
        },
        other => other,
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad_file(&files.ca, format!("cannot verify clients with it: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::usage(format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            bad_file(
                &files.key,
                format!("does not fit {}: {e}", files.cert.display()),
            )
        })?;
    Ok(Arc::new(config))
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

struct Shared {
    conn: Mutex<rustls::Connection>,
    /// Held from sealing records to writing them, so they leave in sequence.
    out: Mutex<()>,
    sock: TcpStream,
}

/// A TLS connection over TCP; clones share it (one reads, any write).
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
        sock: TcpStream,
        config: Arc<rustls::ServerConfig>,
        deadline: Instant,
    ) -> io::Result<TlsStream> {
        let conn = rustls::ServerConnection::new(config).map_err(tls_error)?;
        let s = TlsStream {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn.into()),
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
                return Err(io::ErrorKind::UnexpectedEof.into());
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

    /// The underlying TCP socket, for timeouts and shutdown; reading or writing it directly
    /// bypasses TLS and breaks the session.
    pub fn socket(&self) -> &TcpStream {
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
mod tests {
    use super::*;

    fn certtool(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("certtool")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("certtool is installed (scripts/test.sh installs gnutls-bin)");
        assert!(out.status.success(), "certtool {args:?}: {out:?}");
    }

    /// ECDSA keys as certtool makes them (about half with a padded scalar) are accepted:
    /// each one loads and fits its certificate.
    #[test]
    fn certtool_ecdsa_keys_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("ca.info"), "cn = CA\nca\ncert_signing_key\n").unwrap();
        std::fs::write(
            d.join("s.info"),
            "cn = localhost\ntls_www_server\nsigning_key\n",
        )
        .unwrap();
        certtool(d, &["--generate-privkey", "--outfile=ca-key.pem"]);
        certtool(
            d,
            &[
                "--generate-self-signed",
                "--load-privkey=ca-key.pem",
                "--template=ca.info",
                "--outfile=ca-cert.pem",
            ],
        );
        let mut padded = 0;
        for _ in 0..8 {
            certtool(
                d,
                &[
                    "--generate-privkey",
                    "--key-type=ecdsa",
                    "--outfile=server-key.pem",
                ],
            );
            certtool(
                d,
                &[
                    "--generate-certificate",
                    "--load-privkey=server-key.pem",
                    "--load-ca-certificate=ca-cert.pem",
                    "--load-ca-privkey=ca-key.pem",
                    "--template=s.info",
                    "--outfile=server-cert.pem",
                ],
            );
            let key = PrivateKeyDer::from_pem_file(d.join("server-key.pem")).unwrap();
            if let PrivateKeyDer::Sec1(k) = &key {
                padded += sec1_unpadded(k.secret_sec1_der()).is_some() as u32;
            }
            server_config(&TlsFiles::server_dir(d)).expect("a certtool ECDSA key loads");
        }
        eprintln!("{padded} of 8 keys had a padded scalar");
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
