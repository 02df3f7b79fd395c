//! NBD URIs, in the form of the NBD project's `doc/uri.md`: `nbd://HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`.
//!
//! Only what vmkeep connects to is accepted; anything else (TLS schemes, unknown query
//! parameters) is a usage error rather than something silently ignored, so that a typo
//! never connects to the wrong export.
//!
//! [`uri_escape`] is the one percent-encoder of NBD URIs: the client's, the server's
//! (`Server::uri`) and those of libvirt's backup exports are all written with it.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::nbd::proto::{DEFAULT_PORT, MAX_STRING_LEN};

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A TCP server (`nbd://`).
    Tcp {
        /// Host name or IP address, without the brackets of an IPv6 literal.
        host: String,
        /// TCP port ([`DEFAULT_PORT`], 10809, when the URI names none).
        port: u16,
    },
    /// A unix socket (`nbd+unix://`): the path from the URI's `socket=` parameter.
    Unix(PathBuf),
}

/// A parsed NBD URI: a server address and an export name (empty for the default export).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub address: NbdAddress,
    /// The export name, percent-decoded (at most 4096 bytes); empty means the server's default
    /// export.
    pub export: String,
}

impl NbdUri {
    /// Parse `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`.
    pub fn parse(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| Error::usage(format!("NBD URI {s:?}: {why}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
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
        let address = match scheme {
            "nbd" => {
                if let Some((k, _)) = params.first() {
                    return Err(bad(&format!("unknown parameter {k:?}")));
                }
                tcp_address(authority).ok_or_else(|| bad("expected HOST[:PORT]"))?
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad("a unix socket URI has no host (nbd+unix:///EXPORT)"));
                }
                unix_address(&params, bad)?
            }
            "nbds" | "nbds+unix" => return Err(bad("TLS (nbds) is not supported yet")),
            _ => return Err(bad("unknown scheme (nbd:// or nbd+unix://)")),
        };
        Ok(NbdUri { address, export })
    }

    /// The URI of `export` on the unix socket `socket`.
    pub fn unix(socket: impl Into<PathBuf>, export: &str) -> NbdUri {
        NbdUri {
            address: NbdAddress::Unix(socket.into()),
            export: export.to_string(),
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = uri_escape(&self.export, true);
        match &self.address {
            NbdAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddress::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddress::Unix(p) => {
                let socket = uri_escape(&p.to_string_lossy(), true);
                write!(f, "nbd+unix:///{export}?socket={socket}")
            }
        }
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

/// The socket of an `nbd+unix` URI's query; `bad` makes the usage error naming the URI.
fn unix_address(params: &[(String, String)], bad: impl Fn(&str) -> Error) -> Result<NbdAddress> {
    let mut socket = None;
    for (k, v) in params {
        match k.as_str() {
            "socket" if socket.is_none() && !v.is_empty() => socket = Some(PathBuf::from(v)),
            "socket" => return Err(bad("socket= given twice or empty")),
            _ => return Err(bad(&format!("unknown parameter {k:?}"))),
        }
    }
    socket
        .map(NbdAddress::Unix)
        .ok_or_else(|| bad("socket=PATH is missing"))
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
        NbdUri {
            address: NbdAddress::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
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
            "nbds://h/x",
            "nbds+unix:///x?socket=/s",
            "http://h/x",
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
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }
}
