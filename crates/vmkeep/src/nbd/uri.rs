//! NBD URIs, in the form of the NBD project's `doc/uri.md` (with libnbd's names for the
//! TLS parameters): `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, and
//! with TLS `nbds://HOST[:PORT]/EXPORT` and `nbds+unix:///EXPORT?socket=PATH`, which take
//! `tls-certificates=DIR` (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`) and
//! `tls-hostname=NAME` (the name the server certificate must carry).
//!
//! Only what vmkeep connects to is accepted; anything else (unknown schemes or query
//! parameters, TLS parameters on a plain URI) is a usage error rather than something
//! silently ignored, so that a typo never connects to the wrong export or in clear text.
//!
//! [`uri_escape`] is the one percent-encoder of NBD URIs: the client's, the server's
//! (`Server::uri`) and those of libvirt's backup exports are all written with it.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::nbd::proto::{DEFAULT_PORT, MAX_STRING_LEN};

/// The URI schemes of NBD: plain TCP, plain unix socket, and both with TLS.
const SCHEMES: [&str; 4] = ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"];

/// Whether `s` is written as an NBD URI (one of the four schemes), as opposed to a path.
pub fn is_nbd_uri(s: &str) -> bool {
    SCHEMES.iter().any(|scheme| s.starts_with(scheme))
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A TCP server (`nbd://`, `nbds://`).
    Tcp {
        /// Host name or IP address, without the brackets of an IPv6 literal.
        host: String,
        /// TCP port ([`DEFAULT_PORT`], 10809, when the URI names none).
        port: u16,
    },
    /// A unix socket (`nbd+unix://`, `nbds+unix://`): the path from the URI's `socket=`
    /// parameter.
    Unix(PathBuf),
}

/// TLS settings of a connection (`nbds://`, `nbds+unix://`): the client always sends a
/// certificate and verifies the server's, and never falls back to plain NBD.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NbdTls {
    /// `tls-certificates=DIR`: the folder with `ca-cert.pem`, `client-cert.pem` and
    /// `client-key.pem`; `None`: libnbd's default folder ([`NbdTls::certificates_dir`]).
    pub certificates: Option<PathBuf>,
    /// `tls-hostname=NAME`: the name the server certificate must carry; `None`: the
    /// URI's host, `localhost` for a unix socket.
    pub hostname: Option<String>,
}

impl NbdTls {
    /// TLS with the credentials in `dir`, the server certificate checked for the URI's host.
    pub fn with_certificates(dir: impl Into<PathBuf>) -> NbdTls {
        NbdTls {
            certificates: Some(dir.into()),
            hostname: None,
        }
    }

    /// The credentials folder: `tls-certificates=`, else libnbd's default —
    /// `/etc/pki/libnbd` for root, otherwise the first of `$HOME/.pki/libnbd` and
    /// `$HOME/.config/pki/libnbd` that exists (the first when neither does).
    pub fn certificates_dir(&self) -> PathBuf {
        if let Some(d) = &self.certificates {
            return d.clone();
        }
        let home = std::env::var_os("HOME").map(PathBuf::from);
        match home {
            Some(home) if !rustix::process::geteuid().is_root() => {
                let first = home.join(".pki/libnbd");
                let second = home.join(".config/pki/libnbd");
                if !first.is_dir() && second.is_dir() {
                    second
                } else {
                    first
                }
            }
            _ => PathBuf::from("/etc/pki/libnbd"),
        }
    }

    /// The name the server certificate must carry when connecting to `address`.
    pub fn server_name<'a>(&'a self, address: &'a NbdAddress) -> &'a str {
        match (&self.hostname, address) {
            (Some(h), _) => h,
            (None, NbdAddress::Tcp { host, .. }) => host,
            (None, NbdAddress::Unix(_)) => "localhost",
        }
    }
}

/// A parsed NBD URI: a server address, an export name (empty for the default export), and
/// TLS settings for the `nbds` schemes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: NbdAddress,
    /// The export name, percent-decoded (at most 4096 bytes); empty means the server's default
    /// export.
    pub export: String,
    /// `Some` for `nbds://` and `nbds+unix://`: TLS is required.
    pub tls: Option<NbdTls>,
}

impl NbdUri {
    /// Parse `nbd[s]://host[:port]/export` or `nbd[s]+unix:///export?socket=PATH`, with
    /// `tls-certificates=` and `tls-hostname=` for the `nbds` schemes.
    pub fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::usage(format!("NBD URI {s:?}: {why}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            bad("expected nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        if export.len() > MAX_STRING_LEN {
            return Err(bad("export name longer than 4096 bytes"));
        }
        let params = parse_query(query).ok_or_else(|| bad("bad query string"))?;
        let (unix, tls) = match scheme {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            _ => {
                return Err(bad(
                    "unknown scheme (nbd://, nbd+unix://, nbds://, nbds+unix://)",
                ))
            }
        };
        let q = Query::of(&params, unix, tls, bad)?;
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad("a unix socket URI has no host (nbd+unix:///EXPORT)"));
            }
            NbdAddress::Unix(q.socket.ok_or_else(|| bad("socket=PATH is missing"))?)
        } else {
            tcp_address(authority).ok_or_else(|| bad("expected HOST[:PORT]"))?
        };
        Ok(NbdUri {
            address,
            export,
            tls: tls.then_some(q.tls),
        })
    }

    /// The URI of `export` on the unix socket `socket` (plain: add TLS with
    /// [`with_tls`](Self::with_tls)).
    pub fn unix(socket: impl Into<PathBuf>, export: &str) -> NbdUri {
        NbdUri {
            address: NbdAddress::Unix(socket.into()),
            export: export.to_string(),
            tls: None,
        }
    }

    /// The URI of `export` on TCP `host:port` (plain: add TLS with
    /// [`with_tls`](Self::with_tls)).
    pub fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            address: NbdAddress::Tcp {
                host: host.to_string(),
                port,
            },
            export: export.to_string(),
            tls: None,
        }
    }

    /// This URI with TLS required (`nbds://`, `nbds+unix://`).
    pub fn with_tls(self, tls: NbdTls) -> NbdUri {
        NbdUri {
            tls: Some(tls),
            ..self
        }
    }
}

/// The query parameters of one URI, checked against its scheme.
struct Query {
    socket: Option<PathBuf>,
    tls: NbdTls,
}

impl Query {
    fn of(
        params: &[(String, String)],
        unix: bool,
        tls: bool,
        bad: impl Fn(&str) -> Error,
    ) -> Result<Query> {
        let mut q = Query {
            socket: None,
            tls: NbdTls::default(),
        };
        for (k, v) in params {
            let twice = match k.as_str() {
                "socket" if unix => q.socket.replace(PathBuf::from(v)).is_some(),
                "tls-certificates" if tls => q.tls.certificates.replace(v.into()).is_some(),
                "tls-hostname" if tls => q.tls.hostname.replace(v.clone()).is_some(),
                "tls-certificates" | "tls-hostname" => {
                    return Err(bad(&format!("{k}= needs TLS: use nbds:// or nbds+unix://")))
                }
                _ => return Err(bad(&format!("unknown parameter {k:?}"))),
            };
            if twice || v.is_empty() {
                return Err(bad(&format!("{k}= given twice or empty")));
            }
        }
        Ok(q)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls.is_some() { "s" } else { "" };
        let export = uri_escape(&self.export, true);
        let mut query = Vec::new();
        match &self.address {
            NbdAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{export}")?
            }
            NbdAddress::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{export}")?,
            NbdAddress::Unix(p) => {
                write!(f, "nbd{s}+unix:///{export}")?;
                query.push(format!("socket={}", uri_escape(&p.to_string_lossy(), true)));
            }
        }
        if let Some(tls) = &self.tls {
            if let Some(d) = &tls.certificates {
                query.push(format!(
                    "tls-certificates={}",
                    uri_escape(&d.to_string_lossy(), true)
                ));
            }
            if let Some(h) = &tls.hostname {
                query.push(format!("tls-hostname={}", uri_escape(h, false)));
            }
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

fn tcp_address(authority: &str) -> Option<NbdAddress> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains('@') {
        return None;
    }
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|&p| p != 0)?,
        None => DEFAULT_PORT,
    };
    Some(NbdAddress::Tcp {
        host: host.to_string(),
        port,
    })
}

fn parse_query(query: Option<&str>) -> Option<Vec<(String, String)>> {
    let Some(q) = query else {
        return Some(Vec::new());
    };
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode `s` for an NBD URI component (export name, socket path); `/` is kept
/// when `keep_slash`.
pub fn uri_escape(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/');
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri::tcp(host, port, export)
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(NbdUri::parse("nbd://h").unwrap(), tcp("h", 10809, ""));
        assert_eq!(NbdUri::parse("nbd://h/").unwrap(), tcp("h", 10809, ""));
        assert_eq!(
            NbdUri::parse("nbd://h:1234/vda").unwrap(),
            tcp("h", 1234, "vda")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/a%20b/c").unwrap(),
            tcp("::1", 99, "a b/c")
        );
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1]").unwrap(),
            tcp("fe80::1", 10809, "")
        );
    }

    #[test]
    fn unix_forms() {
        assert_eq!(
            NbdUri::parse("nbd+unix:///?socket=/run/x.sock").unwrap(),
            NbdUri::unix("/run/x.sock", "")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///vda?socket=/a%20b").unwrap(),
            NbdUri::unix("/a b", "vda")
        );
        assert_eq!(
            NbdUri::parse("nbd+unix://?socket=/s").unwrap(),
            NbdUri::unix("/s", "")
        );
    }

    #[test]
    fn bad_uris_are_usage_errors() {
        for s in [
            "",
            "/dev/sda",
            "nbd://",
            "nbd://:10809/x",
            "nbd://h:0/x",
            "nbd://h:99999/x",
            "nbd://h:port/x",
            "nbd://h/x?socket=/s",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?socket=/s&tls=1",
            "nbd+unix:///x?socket=/s&socket=/t",
            "http://h/x",
            "nbd://h/x?tls-certificates=/d",
            "nbd+unix:///x?socket=/s&tls-certificates=/d",
            "nbd://h/x?tls-hostname=h",
            "nbds://h/x?tls-certificates=",
            "nbds://h/x?tls-certificates=/a&tls-certificates=/b",
            "nbds://h/x?tls-hostname=a&tls-hostname=b",
            "nbds://h/x?tls=1",
            "nbds://h/x?socket=/s",
            "nbds+unix:///x",
            "nbds+unix://h/x?socket=/s",
            "nbds+unix:///x?socket=/s&tls-verify-peer=false",
            "nbd://h/%zz",
            "nbd://[::1/x",
        ] {
            let e = NbdUri::parse(s).expect_err(s);
            assert_eq!(e.kind(), ErrorKind::Usage, "{s}");
        }
    }

    #[test]
    fn uri_components_are_escaped() {
        assert_eq!(uri_escape("vda", false), "vda");
        assert_eq!(uri_escape("disk 1?#", false), "disk%201%3F%23");
        assert_eq!(uri_escape("/tmp/a b.sock", true), "/tmp/a%20b.sock");
    }

    #[test]
    fn nbd_uri_escapes_socket_path() {
        assert_eq!(
            uri_escape("/run/vm keep/a&b.sock", true),
            "/run/vm%20keep/a%26b.sock"
        );
        assert_eq!(uri_escape("vda", true), "vda");
        assert_eq!(
            NbdUri::unix("/run/vm keep/a&b.sock", "vda").to_string(),
            "nbd+unix:///vda?socket=/run/vm%20keep/a%26b.sock"
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://h:10809/vda",
            "nbd://[::1]:99/a%20b/c",
            "nbd+unix:///vda?socket=/run/a%20b.sock",
            "nbd+unix:///?socket=/s",
            "nbds://h:10809/vda",
            "nbds://[::1]:99/vda?tls-certificates=/etc/pki/a%20b",
            "nbds://h:1/?tls-certificates=/d&tls-hostname=backup.example",
            "nbds+unix:///vda?socket=/s",
            "nbds+unix:///vda?socket=/s&tls-certificates=/d&tls-hostname=h",
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }

    #[test]
    fn tls_forms() {
        let u = NbdUri::parse("nbds://h/vda?tls-hostname=n&tls-certificates=/d%20x").unwrap();
        assert_eq!(
            u,
            tcp("h", 10809, "vda").with_tls(NbdTls {
                certificates: Some("/d x".into()),
                hostname: Some("n".into()),
            })
        );
        assert_eq!(u.tls.as_ref().unwrap().server_name(&u.address), "n");
        assert_eq!(
            u.tls.as_ref().unwrap().certificates_dir(),
            PathBuf::from("/d x")
        );
        // Parameters in any order; printed in one.
        assert_eq!(
            u.to_string(),
            "nbds://h:10809/vda?tls-certificates=/d%20x&tls-hostname=n"
        );
        let plain = NbdUri::parse("nbds://[::1]/").unwrap();
        assert_eq!(plain, tcp("::1", 10809, "").with_tls(NbdTls::default()));
        assert_eq!(
            plain.tls.as_ref().unwrap().server_name(&plain.address),
            "::1"
        );
        let unix = NbdUri::parse("nbds+unix:///vda?tls-certificates=/d&socket=/s").unwrap();
        assert_eq!(
            unix,
            NbdUri::unix("/s", "vda").with_tls(NbdTls::with_certificates("/d"))
        );
        assert_eq!(
            unix.tls.as_ref().unwrap().server_name(&unix.address),
            "localhost"
        );
        assert!(is_nbd_uri("nbds+unix:///x?socket=/s"));
        assert!(!is_nbd_uri("/var/nbd://x"));
    }

    /// Without `tls-certificates=`, libnbd's default folder: root's, or under `$HOME`.
    #[test]
    fn default_certificates_folder_is_libnbds() {
        let d = NbdTls::default().certificates_dir();
        if rustix::process::geteuid().is_root() || std::env::var_os("HOME").is_none() {
            assert_eq!(d, PathBuf::from("/etc/pki/libnbd"));
        } else {
            let home = PathBuf::from(std::env::var_os("HOME").unwrap());
            assert!(d == home.join(".pki/libnbd") || d == home.join(".config/pki/libnbd"));
        }
    }
}
