//! NBD protocol constants and wire structures shared by vmkeep's client and server.
//!
//! Source: the NBD protocol document (NetworkBlockDevice/nbd `doc/proto.md`) and QEMU's
//! `docs/interop/nbd.rst` for the `qemu:` metadata contexts. All integers are big-endian.
//! Extended headers (64-bit lengths) are not spoken yet; the request and reply types keep
//! room for them (`length` is u64 in memory, checked against the negotiated limits).

/// First 8 bytes the server sends in every handshake, oldstyle or newstyle (`"NBDMAGIC"`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
/// Second server magic of the newstyle handshake, and the first 8 bytes of every option request the
/// client sends (`"IHAVEOPT"`).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
/// Second magic of the oldstyle handshake (no options, no export names).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic that starts every option reply the server sends during negotiation.
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: starts every transmission-phase request header (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: starts a simple reply (error + cookie, then read data on success).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: starts each structured reply chunk; only sent after
/// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// TCP port an `nbd://` URI without a port means (10809, assigned by IANA).
pub const DEFAULT_PORT: u16 = 10809;

// Handshake flags (server) and client flags.
/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE` (server, u16 bit 0): the server answers unknown options
/// with an error reply instead of closing.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES` (server, u16 bit 1): the server can omit the 124 zero bytes
/// after the `NBD_OPT_EXPORT_NAME` reply.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE` (u32 bit 0): the client speaks fixed newstyle
/// negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES` (u32 bit 1): the client asks the server to omit the 124 zero
/// bytes; only valid if the server offered `NBD_FLAG_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
/// `NBD_OPT_EXPORT_NAME` (1): selects an export and enters transmission at once; the server cannot
/// answer with an error, only close the connection.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT` (2): the client ends negotiation; the server acknowledges and closes.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST` (3): asks for the exports; one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS` (5): upgrades the connection to TLS before any other option.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO` (6): asks for an export's details (`NBD_INFO_*`) like `NBD_OPT_GO` but stays in
/// negotiation.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO` (7): selects an export, ends option haggling and enters transmission; unlike
/// `NBD_OPT_EXPORT_NAME` it can fail with an error reply.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY` (8): asks the server to answer reads and block-status requests with
/// structured reply chunks.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT` (9): asks which metadata contexts (e.g. `base:allocation`) an export
/// offers, without selecting them.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT` (10): selects the metadata contexts `NBD_CMD_BLOCK_STATUS` reports
/// on; the server answers with their ids.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS` (11): 64-bit request and reply headers; vmkeep neither asks for nor
/// grants it.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
/// `NBD_REP_ACK` (1): the option succeeded (and ends a list of replies).
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER` (2): one export name (u32 length, name) in answer to `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO` (3): one `NBD_INFO_*` item (u16 type, then its data) in answer to `NBD_OPT_INFO`
/// / `NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT` (4): one metadata context (u32 id, name) in answer to a list or set meta
/// context option.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 of an option reply type: the reply is an error (`NBD_REP_ERR_*`); its data, if any, is a
/// message for humans.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: the server does not know or implement the option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: the server understands the option but its configuration forbids it.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: the option's data is malformed or not allowed in this state.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`: the option is not supported on the server's platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`: the server requires `NBD_OPT_STARTTLS` before this option.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: the requested export does not exist or is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down and takes no more options.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the server only serves clients that request `NBD_INFO_BLOCK_SIZE`
/// and honour it.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`: the option request or its reply would be too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types (NBD_OPT_INFO / NBD_OPT_GO).
/// `NBD_INFO_EXPORT` (0): the export size in bytes (u64) and its transmission flags (u16); always
/// sent before a successful `NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME` (1): the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION` (2): a human-readable description of the export.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE` (3): minimum, preferred and maximum block size in bytes (three u32).
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
/// Transmission flag `NBD_FLAG_HAS_FLAGS` (bit 0): always set; the other bits are meaningful.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag `NBD_FLAG_READ_ONLY` (bit 1): the export refuses writes, trims and
/// write-zeroes (`EPERM`).
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag `NBD_FLAG_SEND_FLUSH` (bit 2): the server accepts `NBD_CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag `NBD_FLAG_SEND_FUA` (bit 3): the server honours `NBD_CMD_FLAG_FUA`.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag `NBD_FLAG_ROTATIONAL` (bit 4): a hint that the export behaves like a spinning
/// disk.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag `NBD_FLAG_SEND_TRIM` (bit 5): the server accepts `NBD_CMD_TRIM`.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES` (bit 6): the server accepts
/// `NBD_CMD_WRITE_ZEROES`.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag `NBD_FLAG_SEND_DF` (bit 7): the server honours `NBD_CMD_FLAG_DF` on structured
/// reads.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag `NBD_FLAG_CAN_MULTI_CONN` (bit 8): several connections to the export see each
/// other's writes after a flush.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag `NBD_FLAG_SEND_RESIZE` (bit 9): the server accepts the experimental
/// `NBD_CMD_RESIZE`.
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag `NBD_FLAG_SEND_CACHE` (bit 10): the server accepts `NBD_CMD_CACHE`.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag `NBD_FLAG_SEND_FAST_ZERO` (bit 11): the server honours
/// `NBD_CMD_FLAG_FAST_ZERO`.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
/// `NBD_CMD_READ` (0): read `length` bytes at `offset`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE` (1): write the `length` bytes that follow the header at `offset`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC` (2): the client disconnects; the server sends no reply.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH` (3): make every completed write durable (offset and length are 0).
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM` (4): the client no longer needs the range; later reads of it may return anything.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE` (5): a hint to prefetch the range; no data is returned.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES` (6): make the range read as zeros without sending the zeros.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS` (7): report the status of the range in each selected metadata context
/// (structured replies only).
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
/// Command flag `NBD_CMD_FLAG_FUA` (bit 0): the write is durable before the reply is sent.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE` (bit 1): `NBD_CMD_WRITE_ZEROES` must allocate the range
/// rather than punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF` (bit 2): answer a structured read in one data chunk (don't
/// fragment); `EOVERFLOW` if the read is too long for that.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag `NBD_CMD_FLAG_REQ_ONE` (bit 3): `NBD_CMD_BLOCK_STATUS` returns one extent per
/// context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag `NBD_CMD_FLAG_FAST_ZERO` (bit 4): `NBD_CMD_WRITE_ZEROES` fails with `ENOTSUP`
/// instead of being slower than a write.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
/// Structured reply flag `NBD_REPLY_FLAG_DONE` (bit 0): this chunk is the last of the reply to its
/// cookie.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type `NBD_REPLY_TYPE_NONE` (0): no payload; only valid with `NBD_REPLY_FLAG_DONE` to end a
/// reply.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type `NBD_REPLY_TYPE_OFFSET_DATA` (1): a u64 offset, then the data read there (the rest of
/// the chunk length).
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type `NBD_REPLY_TYPE_OFFSET_HOLE` (2): a u64 offset and a u32 length in bytes that read as
/// zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type `NBD_REPLY_TYPE_BLOCK_STATUS` (5): a u32 context id, then (u32 length in bytes, u32
/// flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type `NBD_REPLY_TYPE_ERROR`: a u32 NBD error value and a u16-length message; the whole
/// request failed.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk type `NBD_REPLY_TYPE_ERROR_OFFSET`: like `NBD_REPLY_TYPE_ERROR` plus the u64 offset where
/// a read failed.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// `base:allocation` status flags.
/// `base:allocation` flag `NBD_STATE_HOLE` (bit 0): the extent is not allocated on the server.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag `NBD_STATE_ZERO` (bit 1): the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
// `qemu:dirty-bitmap:NAME` status flag.
/// `qemu:dirty-bitmap:NAME` flag (bit 0): the extent was written since the bitmap started recording
/// (QEMU `docs/interop/nbd.rst`).
pub const STATE_DIRTY: u32 = 1 << 0;

/// Name of the standard allocation metadata context (holes and zeros).
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of QEMU's dirty-bitmap metadata contexts; the bitmap name follows it.
pub const META_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

// Error values.
/// NBD error `EPERM` (1): the operation is not permitted (e.g. a write to a read-only export).
pub const EPERM: u32 = 1;
/// NBD error `EIO` (5): the server failed to read or write its backing storage.
pub const EIO: u32 = 5;
/// NBD error `ENOMEM` (12): the server ran out of memory for the request.
pub const ENOMEM: u32 = 12;
/// NBD error `EINVAL` (22): the request is malformed (bad flags, range past the end, misaligned).
pub const EINVAL: u32 = 22;
/// NBD error `ENOSPC` (28): the server ran out of space for a write.
pub const ENOSPC: u32 = 28;
/// NBD error `EOVERFLOW` (75): the request is too large, e.g. a `NBD_CMD_FLAG_DF` read that does
/// not fit one chunk.
pub const EOVERFLOW: u32 = 75;
/// NBD error `ENOTSUP` (95): the request is not supported, e.g. a `NBD_CMD_FLAG_FAST_ZERO`
/// write-zeroes that would be slow.
pub const ENOTSUP: u32 = 95;
/// NBD error `ESHUTDOWN` (108): the server is shutting down; the client should disconnect.
pub const ESHUTDOWN: u32 = 108;

/// Size of a request header (compact headers).
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Longest option payload either side accepts (names, contexts).
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest string (export name, context name) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Size of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, reply type, length).
pub const OPTION_REPLY_LEN: usize = 20;
/// Largest READ/WRITE payload: the spec says no length below 2^25 may be treated as a
/// denial of service, and no common client sends more.
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;

/// Encode an option reply header.
pub fn option_reply(option: u32, kind: u32, length: u32) -> [u8; OPTION_REPLY_LEN] {
    let mut b = [0u8; OPTION_REPLY_LEN];
    b[0..8].copy_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A transmission-phase request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits of this request.
    pub flags: u16,
    /// The command (`CMD_*`).
    pub kind: u16,
    /// Opaque handle the client chooses; the server echoes it in every reply to this request.
    pub cookie: u64,
    /// Byte offset into the export where the command applies.
    pub offset: u64,
    /// Length of the range in bytes (for a write, also the payload length that follows).
    pub length: u32,
}

impl Request {
    /// Encode the 28-byte request header (magic first, big-endian); a write's payload is sent after
    /// it.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Parse a request header; `None` when the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }
}

/// The header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*` bits (`REPLY_FLAG_DONE` on the last chunk).
    pub flags: u16,
    /// The chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// Cookie of the request this chunk answers.
    pub cookie: u64,
    /// Length in bytes of the payload that follows this header.
    pub length: u32,
}

impl ChunkHeader {
    /// Encode the 20-byte chunk header (magic first, big-endian); the payload is sent after it.
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

impl ChunkHeader {
    /// Parse the 16 bytes that follow the structured reply magic.
    pub fn decode_after_magic(b: &[u8; STRUCTURED_REPLY_LEN - 4]) -> ChunkHeader {
        ChunkHeader {
            flags: be16(&b[0..2]),
            kind: be16(&b[2..4]),
            cookie: be64(&b[4..12]),
            length: be32(&b[12..16]),
        }
    }
}

/// Encode an option request header (the option's data follows it).
pub fn option_header(option: u32, length: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&length.to_be_bytes());
    b
}

/// The header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// The option (`OPT_*`) this reply answers.
    pub option: u32,
    /// The reply type (`REP_*`, or `REP_ERR_*` when `REP_FLAG_ERROR` is set).
    pub kind: u32,
    /// Length in bytes of the reply data that follows this header.
    pub length: u32,
}

impl OptionReply {
    /// Parse an option reply header; `None` when the magic is wrong.
    pub fn decode(b: &[u8; OPTION_REPLY_LEN]) -> Option<OptionReply> {
        if be64(&b[0..8]) != REPLY_MAGIC_OPT {
            return None;
        }
        Some(OptionReply {
            option: be32(&b[8..12]),
            kind: be32(&b[12..16]),
            length: be32(&b[16..20]),
        })
    }

    /// Encode the 20-byte option reply header (magic first, big-endian).
    pub fn encode(&self) -> [u8; OPTION_REPLY_LEN] {
        let mut b = [0u8; OPTION_REPLY_LEN];
        b[0..8].copy_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.kind.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Name of an option reply error, for messages.
pub fn rep_error_name(kind: u32) -> &'static str {
    match kind {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_PLATFORM => "not supported on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "request too big",
        _ => "error",
    }
}

/// Name of a command, for messages.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        _ => "unknown command",
    }
}

/// Encode a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Read a big-endian u16 from the first 2 bytes of `b`; panics if `b` is shorter.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}
/// Read a big-endian u32 from the first 4 bytes of `b`; panics if `b` is shorter.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
/// Read a big-endian u64 from the first 8 bytes of `b`; panics if `b` is shorter.
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Name of an NBD error value, for messages.
pub fn error_name(e: u32) -> &'static str {
    match e {
        EPERM => "EPERM (operation not permitted)",
        EIO => "EIO (input/output error)",
        ENOMEM => "ENOMEM (out of memory)",
        EINVAL => "EINVAL (invalid argument)",
        ENOSPC => "ENOSPC (no space left)",
        EOVERFLOW => "EOVERFLOW (value too large)",
        ENOTSUP => "ENOTSUP (not supported)",
        ESHUTDOWN => "ESHUTDOWN (server is shutting down)",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_REQ_ONE,
            kind: CMD_BLOCK_STATUS,
            cookie: 7,
            offset: 1 << 40,
            length: 65536,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn chunk_and_option_headers_round_trip() {
        let c = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: 9,
            length: 4104,
        };
        let b = c.encode();
        assert_eq!(be32(&b[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(
            ChunkHeader::decode_after_magic(b[4..].try_into().unwrap()),
            c
        );
        let o = OptionReply {
            option: OPT_GO,
            kind: REP_INFO,
            length: 12,
        };
        assert_eq!(OptionReply::decode(&o.encode()), Some(o));
        let mut bad = o.encode();
        bad[3] ^= 1;
        assert_eq!(OptionReply::decode(&bad), None);
        assert_eq!(be64(&option_header(OPT_GO, 6)[0..8]), IHAVEOPT);
    }
}
