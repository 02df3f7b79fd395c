//! The handshake: fixed newstyle negotiation up to `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`.
//!
//! The whole handshake runs against one deadline, so a client that trickles bytes cannot
//! hold a connection longer than a silent one. Option payloads above 64 KiB end the
//! connection (the spec lets a server treat them as denial of service); every other
//! malformed option gets an error reply and negotiation goes on.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use super::{Export, Shared};
use crate::nbd::proto::*;

/// What a successful handshake agreed on.
pub(crate) struct Session {
    pub(crate) export: Arc<dyn Export>,
    pub(crate) structured: bool,
    /// `base:allocation` was selected for this export.
    pub(crate) base_allocation: bool,
}

/// The context id the server gives `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// Negotiation state between options.
struct State {
    no_zeroes: bool,
    structured: bool,
    /// Export for which `base:allocation` is selected.
    meta: Option<usize>,
}

enum Next {
    Continue,
    Go(Session),
    Close,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake follows.
    StartTls,
}

/// Run the handshake. `Ok(None)`: the client left politely (`NBD_OPT_ABORT`).
pub(crate) fn negotiate(shared: &Shared, s: &mut super::Stream) -> io::Result<Option<Session>> {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    read_by(s, &mut cf, deadline)?;
    let flags = u32::from_be_bytes(cf);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {flags:#x}")));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(violation("the client does not speak fixed newstyle".into()));
    }
    let mut st = State {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };
    loop {
        let (opt, data) = read_option(s, deadline)?;
        let next = match &shared.config.tls {
            Some(_) if !s.is_tls() => before_tls(s, opt, &data)?,
            _ => option(shared, s, &mut st, opt, &data)?,
        };
        match next {
            Next::Continue => {}
            Next::Go(session) => return Ok(Some(session)),
            Next::Close => return Ok(None),
            Next::StartTls => {
                let config = shared.config.tls.clone().expect("TLS is configured");
                s.start_tls(config, deadline)?;
                // Nothing negotiated in clear text carries over (nothing can be: every
                // other option was refused).
                st.structured = false;
                st.meta = None;
            }
        }
    }
}

/// A server that requires TLS, before the client has started it (the spec's FORCEDTLS
/// mode): `STARTTLS` is acknowledged, `ABORT` honoured, `EXPORT_NAME` (which cannot be
/// refused with a reply) ends the session, and every other option gets
/// `NBD_REP_ERR_TLS_REQD`. No export name, size or list leaves the server in clear text.
fn before_tls<S: Write>(s: &mut S, opt: u32, data: &[u8]) -> io::Result<Next> {
    match opt {
        OPT_STARTTLS if !data.is_empty() => {
            refuse(s, opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        }
        OPT_STARTTLS => {
            reply(s, opt, REP_ACK, &[])?;
            Ok(Next::StartTls)
        }
        OPT_ABORT => {
            let _ = reply(s, opt, REP_ACK, &[]);
            Ok(Next::Close)
        }
        OPT_EXPORT_NAME => Err(violation(
            "NBD_OPT_EXPORT_NAME without TLS on a server that requires TLS".into(),
        )),
        _ => refuse(
            s,
            opt,
            REP_ERR_TLS_REQD,
            "this server requires TLS (NBD_OPT_STARTTLS) with a client certificate",
        ),
    }
}

/// Streams whose read timeout can be set (the deadline is enforced per read).
pub(crate) trait Timed {
    fn set_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()>;
}

impl Timed for super::Stream {
    fn set_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

fn violation(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Fill `buf` before `deadline`.
fn read_by<S: Read + Timed>(s: &mut S, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ));
        }
        s.set_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn read_option<S: Read + Timed>(s: &mut S, deadline: Instant) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; OPTION_HEADER_LEN];
    read_by(s, &mut h, deadline)?;
    if be64(&h[0..8]) != IHAVEOPT {
        return Err(violation("bad option magic".into()));
    }
    let (opt, len) = (be32(&h[8..12]), be32(&h[12..16]));
    if len > MAX_OPTION_LEN {
        return Err(violation(format!("option {opt} carries {len} bytes")));
    }
    let mut data = vec![0u8; len as usize];
    read_by(s, &mut data, deadline)?;
    Ok((opt, data))
}

fn reply<W: Write>(s: &mut W, opt: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(OPTION_REPLY_LEN + payload.len());
    b.extend_from_slice(&option_reply(opt, kind, payload.len() as u32));
    b.extend_from_slice(payload);
    s.write_all(&b)
}

fn ack<W: Write>(s: &mut W, opt: u32) -> io::Result<Next> {
    reply(s, opt, REP_ACK, &[])?;
    Ok(Next::Continue)
}

fn refuse<W: Write>(s: &mut W, opt: u32, kind: u32, msg: &str) -> io::Result<Next> {
    reply(s, opt, kind, msg.as_bytes())?;
    Ok(Next::Continue)
}

fn option<S: Write>(
    shared: &Shared,
    s: &mut S,
    st: &mut State,
    opt: u32,
    data: &[u8],
) -> io::Result<Next> {
    match opt {
        OPT_EXPORT_NAME => export_name(shared, s, st, data),
        OPT_ABORT => {
            let _ = reply(s, opt, REP_ACK, &[]); // the client may already be gone
            Ok(Next::Close)
        }
        OPT_LIST if !data.is_empty() => {
            refuse(s, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        }
        OPT_LIST => list(shared, s),
        OPT_STARTTLS if shared.config.tls.is_some() => {
            refuse(s, opt, REP_ERR_INVALID, "TLS is already running")
        }
        OPT_STARTTLS if !data.is_empty() => {
            refuse(s, opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        }
        OPT_STARTTLS => refuse(
            s,
            opt,
            REP_ERR_POLICY,
            "TLS is not supported by vmkeep serve; connect over its unix socket or loopback",
        ),
        OPT_INFO | OPT_GO => info(shared, s, st, opt, data),
        OPT_STRUCTURED_REPLY if !data.is_empty() => refuse(
            s,
            opt,
            REP_ERR_INVALID,
            "NBD_OPT_STRUCTURED_REPLY takes no data",
        ),
        OPT_STRUCTURED_REPLY => {
            st.structured = true;
            ack(s, opt)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(shared, s, st, opt, data),
        _ => refuse(
            s,
            opt,
            REP_ERR_UNSUP,
            &format!("option {opt} is not supported"),
        ),
    }
}

/// Transmission flags: read-only; flush is accepted (there is nothing to flush); any
/// number of connections see the same bytes; `DF` once structured replies are on.
pub(crate) fn transmission_flags(structured: bool) -> u16 {
    let df = if structured { TFLAG_SEND_DF } else { 0 };
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN | df
}

/// `NBD_OPT_EXPORT_NAME` cannot fail with a reply: an unknown name ends the session.
fn export_name<S: Write>(shared: &Shared, s: &mut S, st: &State, name: &[u8]) -> io::Result<Next> {
    let Some(i) = shared.find(name) else {
        return Err(violation(format!(
            "unknown export {:?}",
            String::from_utf8_lossy(name)
        )));
    };
    let e = &shared.exports[i];
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&e.size().to_be_bytes());
    b.extend_from_slice(&transmission_flags(st.structured).to_be_bytes());
    if !st.no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    s.write_all(&b)?;
    Ok(Next::Go(session(shared, st, i)))
}

fn session(shared: &Shared, st: &State, i: usize) -> Session {
    Session {
        export: shared.exports[i].clone(),
        structured: st.structured,
        base_allocation: st.structured && st.meta == Some(i),
    }
}

fn list<S: Write>(shared: &Shared, s: &mut S) -> io::Result<Next> {
    for e in &shared.exports {
        let name = e.name().as_bytes();
        let mut p = Vec::with_capacity(4 + name.len());
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name);
        p.extend_from_slice(e.description().as_bytes());
        reply(s, OPT_LIST, REP_SERVER, &p)?;
    }
    ack(s, OPT_LIST)
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: name, then the information items asked for.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut p = Parser(data);
    let n = p.u32()? as usize;
    let name = p.take(n)?;
    let count = p.u16()? as usize;
    let items = (0..count).map(|_| p.u16()).collect::<Option<Vec<u16>>>()?;
    p.0.is_empty().then_some((name, items))
}

fn info<S: Write>(
    shared: &Shared,
    s: &mut S,
    st: &State,
    opt: u32,
    data: &[u8],
) -> io::Result<Next> {
    let Some((name, items)) = parse_info(data) else {
        return refuse(s, opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO");
    };
    if name.len() > MAX_STRING_LEN {
        return refuse(s, opt, REP_ERR_INVALID, "export name too long");
    }
    let Some(i) = shared.find(name) else {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
        return refuse(s, opt, REP_ERR_UNKNOWN, &msg);
    };
    let e = &shared.exports[i];
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    p.extend_from_slice(&e.size().to_be_bytes());
    p.extend_from_slice(&transmission_flags(st.structured).to_be_bytes());
    reply(s, opt, REP_INFO, &p)?;
    // Sent unasked too: the values are the protocol defaults' superset, so a client that
    // ignores them is still right.
    let mut p = Vec::with_capacity(14);
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes());
    p.extend_from_slice(&preferred(e.as_ref()).to_be_bytes());
    p.extend_from_slice(&MAX_BLOCK_SIZE.to_be_bytes());
    reply(s, opt, REP_INFO, &p)?;
    if items.contains(&INFO_NAME) {
        info_string(s, opt, INFO_NAME, e.name())?;
    }
    let description = e.description();
    if items.contains(&INFO_DESCRIPTION) && !description.is_empty() {
        info_string(s, opt, INFO_DESCRIPTION, &description)?;
    }
    reply(s, opt, REP_ACK, &[])?;
    Ok(if opt == OPT_GO {
        Next::Go(session(shared, st, i))
    } else {
        Next::Continue
    })
}

/// The preferred block size, forced into what the spec allows (a power of two from 512
/// up to the maximum).
fn preferred(e: &dyn Export) -> u32 {
    e.preferred_block_size()
        .clamp(512, MAX_BLOCK_SIZE)
        .next_power_of_two()
        .min(MAX_BLOCK_SIZE)
}

fn info_string<S: Write>(s: &mut S, opt: u32, kind: u16, text: &str) -> io::Result<()> {
    let mut p = Vec::with_capacity(2 + text.len());
    p.extend_from_slice(&kind.to_be_bytes());
    p.extend_from_slice(&text.as_bytes()[..text.len().min(MAX_STRING_LEN)]);
    reply(s, opt, REP_INFO, &p)
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: export name and queries.
fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut p = Parser(data);
    let n = p.u32()? as usize;
    let name = p.take(n)?;
    let count = p.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = p.u32()? as usize;
        queries.push(p.take(len)?);
    }
    p.0.is_empty().then_some((name, queries))
}

fn meta_context<S: Write>(
    shared: &Shared,
    s: &mut S,
    st: &mut State,
    opt: u32,
    data: &[u8],
) -> io::Result<Next> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set {
        st.meta = None; // a SET replaces the selection even when it fails
    }
    if !st.structured {
        return refuse(
            s,
            opt,
            REP_ERR_INVALID,
            "negotiate structured replies first",
        );
    }
    let Some((name, queries)) = parse_meta(data) else {
        return refuse(
            s,
            opt,
            REP_ERR_INVALID,
            "malformed metadata context request",
        );
    };
    if name.len() > MAX_STRING_LEN || queries.iter().any(|q| q.len() > MAX_STRING_LEN) {
        return refuse(s, opt, REP_ERR_INVALID, "string too long");
    }
    let Some(i) = shared.find(name) else {
        let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
        return refuse(s, opt, REP_ERR_UNKNOWN, &msg);
    };
    let base = META_BASE_ALLOCATION.as_bytes();
    let hit = if set {
        queries.contains(&base)
    } else {
        queries.is_empty() || queries.iter().any(|q| *q == base || *q == b"base:")
    };
    if hit {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut p = Vec::with_capacity(4 + base.len());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(base);
        reply(s, opt, REP_META_CONTEXT, &p)?;
        if set {
            st.meta = Some(i);
        }
    }
    ack(s, opt)
}

/// Reads big-endian fields off a byte slice; `None` when the slice runs out.
struct Parser<'a>(&'a [u8]);

impl<'a> Parser<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }
}
