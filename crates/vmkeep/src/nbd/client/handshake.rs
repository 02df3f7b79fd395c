//! The fixed newstyle handshake, from the client's side.
//!
//! Order of options: with TLS, `NBD_OPT_STARTTLS` first ([`start_tls`]; the caller then
//! runs the TLS handshake and everything after it is encrypted); then structured replies
//! (block status needs them), the metadata contexts, and `NBD_OPT_GO` asking for the
//! block size constraints ([`options`]). Each later step degrades gracefully: no
//! structured replies means no block status (everything is data); no `NBD_OPT_GO` falls
//! back to `NBD_OPT_EXPORT_NAME`; a server that is not fixed newstyle gets
//! `NBD_OPT_EXPORT_NAME` straight away. TLS never degrades: a server that does not
//! acknowledge `STARTTLS` is refused, and one that requires TLS from a plain client
//! (`NBD_REP_ERR_TLS_REQD`) is refused with a message that says so. Every length the
//! server sends is checked against a small bound before anything is allocated for it.
//!
//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`) are never asked for; see
//! `docs/NBD-CLIENT.md`.

use std::io::{self, Read, Write};

use super::conn::printable;
use super::error::NbdError;
use super::BlockSizes;
use crate::nbd::proto::*;

/// Upper bound on the replies to one option, so a server cannot keep us looping.
const MAX_REPLIES: usize = 1024;

/// What the handshake agreed on.
#[derive(Debug, Clone)]
pub(super) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// Metadata contexts the server selected: (name, id).
    pub contexts: Vec<(String, u32)>,
    /// Block size constraints, when the server advertised them.
    pub block_sizes: Option<BlockSizes>,
}

/// The server's greeting, answered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Greeting {
    fixed: bool,
    no_zeroes: bool,
}

/// Run the whole handshake in clear for `export`, asking for the metadata contexts `want`.
#[cfg(test)]
pub(super) fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &str,
    want: &[String],
) -> Result<Negotiated, NbdError> {
    let g = greet(s)?;
    options(s, &g, export, want)
}

/// Read the server's greeting and send our flags.
pub(super) fn greet<S: Read + Write>(s: &mut S) -> Result<Greeting, NbdError> {
    let greeting: [u8; 18] = read_array(s)?;
    if be64(&greeting[0..8]) != NBDMAGIC {
        return Err(NbdError::protocol("not an NBD server (bad greeting magic)"));
    }
    match be64(&greeting[8..16]) {
        IHAVEOPT => {}
        CLISERV_MAGIC => {
            return Err(NbdError::protocol(
                "the server speaks the oldstyle handshake, which vmkeep does not",
            ))
        }
        m => return Err(NbdError::protocol(format!("bad handshake magic {m:#018x}"))),
    }
    let hflags = be16(&greeting[16..18]);
    let g = Greeting {
        fixed: hflags & FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: hflags & FLAG_NO_ZEROES != 0,
    };
    let mut cflags = 0u32;
    if g.fixed {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if g.no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    write_all(s, &cflags.to_be_bytes())?;
    Ok(g)
}

/// `NBD_OPT_STARTTLS`: `Ok` when the server acknowledged it (the TLS handshake comes
/// next); a server that refuses it, or cannot be asked (not fixed newstyle), is an error:
/// the client never goes on in clear.
pub(super) fn start_tls<S: Read + Write>(s: &mut S, g: &Greeting) -> Result<(), NbdError> {
    if !g.fixed {
        return Err(NbdError::NoTls {
            reason: "it does not speak the fixed newstyle handshake".into(),
        });
    }
    send_option(s, OPT_STARTTLS, &[])?;
    let (kind, data) = read_reply(s, OPT_STARTTLS)?;
    match kind {
        REP_ACK if data.is_empty() => Ok(()),
        REP_ACK => Err(NbdError::protocol(format!(
            "STARTTLS acknowledged with {} bytes of data",
            data.len()
        ))),
        k if k & REP_FLAG_ERROR != 0 => Err(NbdError::NoTls {
            reason: format!(
                "it answered STARTTLS with {}{}",
                rep_error_name(k),
                message(&data)
            ),
        }),
        k => Err(NbdError::protocol(format!(
            "unexpected reply type {k} to STARTTLS"
        ))),
    }
}

/// The options after the greeting (and after TLS, when it runs): structured replies,
/// metadata contexts, the export.
pub(super) fn options<S: Read + Write>(
    s: &mut S,
    g: &Greeting,
    export: &str,
    want: &[String],
) -> Result<Negotiated, NbdError> {
    if !g.fixed {
        return export_name(s, export, g.no_zeroes);
    }
    let structured = structured_replies(s)?;
    let contexts = if structured && !want.is_empty() {
        set_meta_context(s, export, want)?
    } else {
        Vec::new()
    };
    match go(s, export)? {
        Some((size, flags, block_sizes)) => Ok(Negotiated {
            size,
            flags,
            structured,
            contexts,
            block_sizes,
        }),
        None => {
            let n = export_name(s, export, g.no_zeroes)?;
            Ok(Negotiated {
                structured,
                contexts,
                ..n
            })
        }
    }
}

fn structured_replies<S: Read + Write>(s: &mut S) -> Result<bool, NbdError> {
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, _) = read_reply(s, OPT_STRUCTURED_REPLY)?;
    match kind {
        REP_ACK => Ok(true),
        REP_ERR_TLS_REQD => Err(NbdError::TlsRequired),
        k if k & REP_FLAG_ERROR != 0 => Ok(false),
        k => Err(NbdError::protocol(format!(
            "unexpected reply type {k} to the structured-reply option"
        ))),
    }
}

fn set_meta_context<S: Read + Write>(
    s: &mut S,
    export: &str,
    want: &[String],
) -> Result<Vec<(String, u32)>, NbdError> {
    let mut d = Vec::new();
    put_str32(&mut d, export);
    d.extend_from_slice(&(want.len() as u32).to_be_bytes());
    for q in want {
        put_str32(&mut d, q);
    }
    send_option(s, OPT_SET_META_CONTEXT, &d)?;
    let mut out = Vec::new();
    for _ in 0..MAX_REPLIES {
        let (kind, data) = read_reply(s, OPT_SET_META_CONTEXT)?;
        match kind {
            REP_META_CONTEXT => {
                if data.len() < 4 || data.len() > 4 + MAX_STRING_LEN {
                    return Err(NbdError::protocol(format!(
                        "metadata context reply of {} bytes",
                        data.len()
                    )));
                }
                let name = printable(&data[4..]);
                out.push((name, be32(&data[0..4])));
            }
            REP_ACK => return Ok(out),
            REP_ERR_TLS_REQD => return Err(NbdError::TlsRequired),
            // The spec says to disregard the contexts of a failed request.
            k if k & REP_FLAG_ERROR != 0 => {
                tracing::debug!("server refused metadata contexts: {}", rep_error_name(k));
                return Ok(Vec::new());
            }
            k => {
                return Err(NbdError::protocol(format!(
                    "unexpected reply type {k} to set-meta-context"
                )))
            }
        }
    }
    Err(NbdError::protocol("too many replies to set-meta-context"))
}

type ExportInfo = (u64, u16, Option<BlockSizes>);

/// `NBD_OPT_GO`; `None` when the server does not know the option.
fn go<S: Read + Write>(s: &mut S, export: &str) -> Result<Option<ExportInfo>, NbdError> {
    let mut d = Vec::new();
    put_str32(&mut d, export);
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &d)?;
    let mut export_info = None;
    let mut block_sizes = None;
    for _ in 0..MAX_REPLIES {
        let (kind, data) = read_reply(s, OPT_GO)?;
        match kind {
            REP_INFO => info(&data, &mut export_info, &mut block_sizes)?,
            REP_ACK => {
                let (size, flags) = export_info.ok_or_else(|| {
                    NbdError::protocol("the server accepted the export without describing it")
                })?;
                return Ok(Some((size, flags, block_sizes)));
            }
            REP_ERR_UNSUP => return Ok(None),
            REP_ERR_UNKNOWN => {
                return Err(NbdError::NoExport {
                    export: export.to_string(),
                    message: message(&data),
                })
            }
            REP_ERR_TLS_REQD => return Err(NbdError::TlsRequired),
            k if k & REP_FLAG_ERROR != 0 => {
                return Err(NbdError::Refused {
                    export: export.to_string(),
                    reason: format!("{}{}", rep_error_name(k), message(&data)),
                })
            }
            k => {
                return Err(NbdError::protocol(format!(
                    "unexpected reply type {k} to go"
                )))
            }
        }
    }
    Err(NbdError::protocol("too many replies to go"))
}

fn info(
    data: &[u8],
    export_info: &mut Option<(u64, u16)>,
    block_sizes: &mut Option<BlockSizes>,
) -> Result<(), NbdError> {
    if data.len() < 2 {
        return Err(NbdError::protocol(format!(
            "info reply of {} bytes",
            data.len()
        )));
    }
    match be16(&data[0..2]) {
        INFO_EXPORT if data.len() == 12 => {
            *export_info = Some((be64(&data[2..10]), be16(&data[10..12])));
        }
        INFO_BLOCK_SIZE if data.len() == 14 => {
            let b = BlockSizes {
                minimum: be32(&data[2..6]),
                preferred: be32(&data[6..10]),
                maximum: be32(&data[10..14]),
            };
            *block_sizes = Some(b.validated()?);
        }
        t @ (INFO_EXPORT | INFO_BLOCK_SIZE) => {
            return Err(NbdError::protocol(format!(
                "info reply type {t} of {} bytes",
                data.len()
            )))
        }
        _ => {}
    }
    Ok(())
}

fn export_name<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<Negotiated, NbdError> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let b: [u8; 10] = read_array(s).map_err(|e| NbdError::RefusedOrClosed {
        export: export.to_string(),
        cause: Box::new(e),
    })?;
    if !no_zeroes {
        let _: [u8; 124] = read_array(s)?;
    }
    Ok(Negotiated {
        size: be64(&b[0..8]),
        flags: be16(&b[8..10]),
        structured: false,
        contexts: Vec::new(),
        block_sizes: None,
    })
}

fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut msg = option_header(option, data.len() as u32).to_vec();
    msg.extend_from_slice(data);
    write_all(s, &msg)
}

/// Read one option reply to `option`: (reply type, payload).
fn read_reply<S: Read>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
    let h: [u8; OPTION_REPLY_LEN] = read_array(s)?;
    let r = OptionReply::decode(&h).ok_or_else(|| NbdError::protocol("bad option reply magic"))?;
    if r.option != option {
        return Err(NbdError::protocol(format!(
            "reply to option {} while waiting for option {option}",
            r.option
        )));
    }
    if r.length > MAX_OPTION_LEN {
        return Err(NbdError::protocol(format!(
            "option reply of {} bytes is too long",
            r.length
        )));
    }
    let mut data = vec![0u8; r.length as usize];
    s.read_exact(&mut data).map_err(io_error)?;
    Ok((r.kind, data))
}

fn put_str32(d: &mut Vec<u8>, s: &str) {
    d.extend_from_slice(&(s.len() as u32).to_be_bytes());
    d.extend_from_slice(s.as_bytes());
}

fn message(data: &[u8]) -> String {
    if data.is_empty() {
        return String::new();
    }
    format!(": {}", printable(&data[..data.len().min(MAX_STRING_LEN)]))
}

fn read_array<S: Read, const N: usize>(s: &mut S) -> Result<[u8; N], NbdError> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).map_err(io_error)?;
    Ok(b)
}

fn write_all<S: Write>(s: &mut S, b: &[u8]) -> Result<(), NbdError> {
    s.write_all(b).map_err(io_error)
}

/// A socket error of the handshake; TLS ones (a failed TLS handshake, an alert from the
/// server) keep rustls' words.
pub(super) fn io_error(e: io::Error) -> NbdError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => NbdError::ServerClosed { handshake: true },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NbdError::HandshakeTimeout,
        io::ErrorKind::InvalidData if e.to_string().starts_with("TLS") => {
            NbdError::Tls(e.to_string())
        }
        _ => NbdError::io("handshake failed", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: what it sends, and what the client wrote.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn reply(v: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
        let r = OptionReply {
            option,
            kind,
            length: data.len() as u32,
        };
        v.extend_from_slice(&r.encode());
        v.extend_from_slice(data);
    }

    fn run(input: Vec<u8>, want: &[&str]) -> Result<Negotiated, String> {
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
        negotiate(&mut s, "vda", &want).map_err(|e| e.to_string())
    }

    #[test]
    fn full_negotiation() {
        let mut v = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        reply(&mut v, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut ctx = 7u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        reply(&mut v, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
        reply(&mut v, OPT_SET_META_CONTEXT, REP_ACK, &[]);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        reply(&mut v, OPT_GO, REP_INFO, &info);
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for x in [512u32, 4096, 1 << 20] {
            bs.extend_from_slice(&x.to_be_bytes());
        }
        reply(&mut v, OPT_GO, REP_INFO, &bs);
        reply(&mut v, OPT_GO, REP_ACK, &[]);
        let n = run(v, &["base:allocation"]).unwrap();
        assert_eq!(n.size, 1 << 30);
        assert!(n.structured);
        assert_eq!(n.contexts, vec![("base:allocation".to_string(), 7)]);
        assert_eq!(n.block_sizes.unwrap().maximum, 1 << 20);
    }

    #[test]
    fn falls_back_to_export_name() {
        let mut v = greeting(FLAG_FIXED_NEWSTYLE);
        reply(&mut v, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]);
        reply(&mut v, OPT_GO, REP_ERR_UNSUP, &[]);
        v.extend_from_slice(&4096u64.to_be_bytes());
        v.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
        v.extend_from_slice(&[0u8; 124]);
        let n = run(v, &["base:allocation"]).unwrap();
        assert_eq!((n.size, n.structured), (4096, false));
        assert!(n.contexts.is_empty());
    }

    #[test]
    fn rejects_bad_servers() {
        let mut unknown = greeting(FLAG_FIXED_NEWSTYLE);
        reply(&mut unknown, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        reply(&mut unknown, OPT_GO, REP_ERR_UNKNOWN, b"no such export");
        assert!(run(unknown, &[]).unwrap_err().contains("does not exist"));

        let mut oldstyle = NBDMAGIC.to_be_bytes().to_vec();
        oldstyle.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
        oldstyle.extend_from_slice(&[0u8; 2]);
        assert!(run(oldstyle, &[]).unwrap_err().contains("oldstyle"));

        let mut huge = greeting(FLAG_FIXED_NEWSTYLE);
        let r = OptionReply {
            option: OPT_STRUCTURED_REPLY,
            kind: REP_ACK,
            length: u32::MAX,
        };
        huge.extend_from_slice(&r.encode());
        assert!(run(huge, &[]).unwrap_err().contains("too long"));

        assert!(run(b"HTTP/1.1 400".to_vec(), &[]).is_err());
    }

    /// A plain client meets a server that requires TLS: refused, saying so, whichever
    /// option hears it first.
    #[test]
    fn tls_required_is_named() {
        let mut v = greeting(FLAG_FIXED_NEWSTYLE);
        reply(&mut v, OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD, &[]);
        let e = run(v, &[]).unwrap_err();
        assert!(e.contains("requires TLS") && e.contains("nbds://"), "{e}");
        let mut v = greeting(FLAG_FIXED_NEWSTYLE);
        reply(&mut v, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        reply(&mut v, OPT_SET_META_CONTEXT, REP_ERR_TLS_REQD, &[]);
        assert!(run(v, &["base:allocation"])
            .unwrap_err()
            .contains("requires TLS"));
    }

    /// A TLS client never goes on in clear: a refused STARTTLS, or a server that cannot
    /// be asked, is an error, and nothing but STARTTLS was sent.
    #[test]
    fn starttls_refused_is_an_error() {
        for (flags, answer) in [
            (FLAG_FIXED_NEWSTYLE, Some(REP_ERR_UNSUP)),
            (FLAG_FIXED_NEWSTYLE, Some(REP_ERR_POLICY)),
            (0, None),
        ] {
            let mut v = greeting(flags);
            if let Some(k) = answer {
                reply(&mut v, OPT_STARTTLS, k, b"no TLS here");
            }
            let mut s = Script {
                input: io::Cursor::new(v),
                output: Vec::new(),
            };
            let g = greet(&mut s).unwrap();
            let e = start_tls(&mut s, &g).unwrap_err().to_string();
            assert!(e.contains("does not offer TLS"), "{e}");
            let mut sent = 4u32.to_be_bytes().to_vec(); // the client flags
            if answer.is_some() {
                sent.extend_from_slice(&option_header(OPT_STARTTLS, 0));
            }
            assert_eq!(s.output[4..], sent[4..], "only STARTTLS was sent");
        }
    }
}
