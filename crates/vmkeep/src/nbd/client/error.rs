//! The client's own error type: what went wrong on one connection, before the client
//! names the server in it. [`NbdClient`](super::NbdClient) turns every one into a
//! [`crate::Error::Source`] at its public methods (`NbdClient::err`), with the text
//! [`NbdError`]'s `Display` gives; nothing outside `nbd::client` sees this type.

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::nbd::proto::error_name;

/// Why a handshake, a request or a whole connection failed.
///
/// `Clone`: a connection that dies hands the same reason to every request waiting on it
/// and keeps it for the requests that come later.
#[derive(Debug, Clone)]
pub(super) enum NbdError {
    /// The server broke the protocol (a bad magic, a reply that does not fit its
    /// request, an invalid length, …); the text says how.
    Protocol(String),
    /// The server answered a request with an error (an error chunk, or a simple reply
    /// with an error).
    Server {
        /// The NBD error number (`EIO`, …).
        errno: u32,
        /// The server's message, made printable (may be empty).
        message: String,
        /// Where the error is (`NBD_REPLY_TYPE_ERROR_OFFSET`).
        offset: Option<u64>,
        /// An error chunk type this client does not know.
        chunk_type: Option<u16>,
    },
    /// The socket failed while `doing` it ("cannot connect", "connection error", …).
    Io {
        doing: &'static str,
        error: Arc<io::Error>,
    },
    /// Writing a request failed.
    Send {
        command: &'static str,
        error: Arc<io::Error>,
    },
    /// The server closed the connection (`handshake`: before the handshake was done).
    ServerClosed { handshake: bool },
    /// No reply to `what` within the reply deadline.
    NoReply { what: String, within: f32 },
    /// The handshake did not finish within its deadline.
    HandshakeTimeout,
    /// The server requires TLS (`NBD_REP_ERR_TLS_REQD`) and the URI is a plain one.
    TlsRequired,
    /// TLS was asked for and the server does not offer it: `reason` says how it answered.
    NoTls { reason: String },
    /// TLS failed: the handshake (a certificate refused either way) or the session
    /// (an alert); the text is rustls' (it starts with `TLS`).
    Tls(String),
    /// The server ended the TLS session at its start (an alert, or a hang-up right after
    /// the handshake): it refused our certificate, most likely.
    TlsRefused(String),
    /// The server does not know the export (`NBD_REP_ERR_UNKNOWN`); `message` is the
    /// server's, with its `": "` prefix, or empty.
    NoExport { export: String, message: String },
    /// The server refused the export for another reason: the reply's error name and the
    /// server's message.
    Refused { export: String, reason: String },
    /// `NBD_OPT_EXPORT_NAME` got no answer: the server refused the export (it closes
    /// the connection to say so) or failed otherwise.
    RefusedOrClosed {
        export: String,
        cause: Box<NbdError>,
    },
    /// The connection had failed before this request was sent.
    FailedEarlier(Box<NbdError>),
    /// The connection's reader thread is gone.
    ReaderStopped,
    /// The client closed the connection ([`NbdClient::disconnect`](super::NbdClient)).
    Disconnected,
}

impl NbdError {
    /// A protocol violation described by `text`.
    pub(super) fn protocol(text: impl Into<String>) -> NbdError {
        NbdError::Protocol(text.into())
    }

    /// An I/O failure while `doing` something.
    pub(super) fn io(doing: &'static str, error: io::Error) -> NbdError {
        NbdError::Io {
            doing,
            error: Arc::new(error),
        }
    }

    /// The server's error `errno` with its `message` (may be empty).
    pub(super) fn server(errno: u32, message: String) -> NbdError {
        NbdError::Server {
            errno,
            message,
            offset: None,
            chunk_type: None,
        }
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdError::Protocol(text) => f.write_str(text),
            NbdError::Server {
                errno,
                message,
                offset,
                chunk_type,
            } => {
                write!(f, "server error {errno} {}", error_name(*errno))?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                if let Some(at) = offset {
                    write!(f, " (at byte {at})")?;
                }
                if let Some(k) = chunk_type {
                    write!(f, " (unknown error chunk type {k:#06x})")?;
                }
                Ok(())
            }
            NbdError::Io { doing, error } => write!(f, "{doing}: {error}"),
            NbdError::Send { command, error } => {
                write!(f, "sending a {command} request failed: {error}")
            }
            NbdError::ServerClosed { handshake: false } => {
                f.write_str("the server closed the connection")
            }
            NbdError::ServerClosed { handshake: true } => {
                f.write_str("the server closed the connection during the handshake")
            }
            NbdError::NoReply { what, within } => {
                write!(f, "no reply to the {what} within {within} s")
            }
            NbdError::HandshakeTimeout => f.write_str("the handshake timed out"),
            NbdError::TlsRequired => f.write_str(
                "the server requires TLS: connect with an nbds:// (or nbds+unix://) URI \
                 and client credentials (tls-certificates=DIR)",
            ),
            NbdError::NoTls { reason } => write!(
                f,
                "the server does not offer TLS ({reason}); vmkeep does not fall back to plain NBD"
            ),
            NbdError::Tls(detail) => f.write_str(detail),
            NbdError::TlsRefused(detail) => write!(
                f,
                "{detail}: the server refused the TLS session (does it trust the CA that \
                 signed this client certificate?)"
            ),
            NbdError::NoExport { export, message } => {
                write!(f, "export {export:?} does not exist{message}")
            }
            NbdError::Refused { export, reason } => {
                write!(f, "the server refused export {export:?}: {reason}")
            }
            NbdError::RefusedOrClosed { export, cause } => write!(
                f,
                "the server refused export {export:?} or closed the connection ({cause})"
            ),
            NbdError::FailedEarlier(why) => write!(f, "the connection failed earlier: {why}"),
            NbdError::ReaderStopped => f.write_str("the connection's reader stopped"),
            NbdError::Disconnected => f.write_str("the client disconnected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::EIO;

    #[test]
    fn texts_are_the_messages_callers_see() {
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        for (e, text) in [
            (
                NbdError::server(EIO, String::new()),
                format!("server error {EIO} {}", error_name(EIO)),
            ),
            (
                NbdError::Server {
                    errno: EIO,
                    message: "gone".into(),
                    offset: Some(7),
                    chunk_type: None,
                },
                format!("server error {EIO} {}: gone (at byte 7)", error_name(EIO)),
            ),
            (
                NbdError::FailedEarlier(Box::new(NbdError::ServerClosed { handshake: false })),
                "the connection failed earlier: the server closed the connection".into(),
            ),
            (
                NbdError::RefusedOrClosed {
                    export: "vda".into(),
                    cause: Box::new(NbdError::ServerClosed { handshake: true }),
                },
                "the server refused export \"vda\" or closed the connection (the server closed the connection during the handshake)".into(),
            ),
            (
                NbdError::NoReply {
                    what: "read of 512 bytes at byte 0".into(),
                    within: 1.5,
                },
                "no reply to the read of 512 bytes at byte 0 within 1.5 s".into(),
            ),
            (
                NbdError::io("handshake failed", eof),
                format!(
                    "handshake failed: {}",
                    io::Error::from(io::ErrorKind::UnexpectedEof)
                ),
            ),
        ] {
            assert_eq!(e.to_string(), text);
        }
    }
}
