//! Wire format of the tcp data plane ([`super::DataServer`] and
//! [`super::TcpTransport`]).
//!
//! Every message is a *frame*: a fixed 64-byte header, then `payload_len`
//! payload bytes, then — only when `payload_len > 0` — an 8-byte trailer
//! holding the xxh3-64 of the payload. The trailer comes after the payload so
//! both ends hash the bytes in cache-sized chunks while they stream them (no
//! second pass over a 4 MiB block). All integers are little-endian.
//!
//! | offset | size | field         | meaning                                                       |
//! |-------:|-----:|---------------|---------------------------------------------------------------|
//! |      0 |    4 | `magic`       | `b"TDKV"`; anything else is garbage and the peer is dropped   |
//! |      4 |    2 | `version`     | [`VERSION`]; a mismatch is answered with `VersionMismatch`    |
//! |      6 |    1 | `opcode`      | [`Opcode`]                                                    |
//! |      7 |    1 | `flags`       | [`FLAG_GRANT`] on a `WRITE`; otherwise 0                      |
//! |      8 |    8 | `request_id`  | echoed in the reply; 0 is reserved for connection errors      |
//! |     16 |    4 | `count`       | requests: ops of this batch still to come, this one included  |
//! |     20 |    4 | `segment`     | DRAM segment id (`READ`, `WRITE`)                             |
//! |     24 |    8 | `offset`      | byte offset in the segment; the block key for `READ_SSD`      |
//! |     32 |    8 | `len`         | block length in bytes                                         |
//! |     40 |    8 | `payload_len` | bytes after the header (the trailer not counted)              |
//! |     48 |    2 | `status`      | [`Status`] of an `ERROR` reply, 0 otherwise                   |
//! |     50 |    6 | reserved      | zero                                                          |
//! |     56 |    8 | `header_xxh3` | xxh3-64 of bytes 0..56                                        |
//!
//! Requests and their replies:
//!
//! | request (opcode)        | payload            | success reply                      | payload            |
//! |-------------------------|--------------------|------------------------------------|--------------------|
//! | `READ` (1)              | none               | `DATA` (0x81), `len` = block len   | the block          |
//! | `READ_SSD` (2)          | none               | `DATA` (0x81)                      | the block          |
//! | `WRITE` (3)             | the block (`len`)  | `WRITE_OK` (0x82)                  | none               |
//! | `WRITE` + [`FLAG_GRANT`]| grant, then block  | `WRITE_OK` (0x82)                  | none               |
//! | `RDMA_CONNECT` (4)      | client endpoint    | `RDMA_ACCEPT` (0x84)               | server endpoint    |
//! | `HELLO` (5)             | the cluster token  | `HELLO_OK` (0x85)                  | none               |
//!
//! Any request may instead be answered by `ERROR` (0xff) with a [`Status`]
//! and a short UTF-8 message as payload. Replies come back in request order
//! on each connection, so a client pipelines a whole batch: it sends every
//! request, then reads every reply (concurrently, so neither side's socket
//! buffer can deadlock the other).
//!
//! Checks, in order, on every received header: magic (garbage → drop the
//! connection), version (→ `VersionMismatch` error frame, then close), header
//! checksum (→ `Corrupt` error frame with request id 0, then close). A payload
//! whose trailer does not match is reported per op (`Corrupt` from the server,
//! [`TransferError::Protocol`] at the client) and the connection stays in
//! sync. `RDMA_CONNECT` is served only by servers built with feature `rdma`;
//! others answer `Unsupported`.
//!
//! **Handshake.** A server configured with the cluster token
//! (`TcpConfig::cluster_token`) requires `HELLO` as the first frame of a
//! connection, its payload the token (at most [`MAX_HELLO_PAYLOAD`] bytes,
//! compared in constant time). Anything else — another opcode first, a
//! wrong or oversized token, a bad trailer — is answered with `ERROR`
//! `Unauthenticated` and the connection is closed before any read or write
//! is served. A client with a token sends `HELLO` once per connection and
//! waits for `HELLO_OK`; a server without a token accepts any `HELLO`.
//!
//! A `WRITE` with [`FLAG_GRANT`] carries the writer's
//! [`crate::grant::WriteGrant`] ([`GRANT_LEN`] bytes) before the block, so
//! `payload_len = GRANT_LEN + len`; the trailer covers both. The server
//! checks the grant before a byte lands and refuses the write with `Denied`
//! when the grant is missing (a storage node requires one), forged, expired
//! or does not cover the range.

use std::hash::Hasher as _;
use twox_hash::XxHash3_64;

use super::TransferError;
pub use crate::grant::GRANT_LEN;

/// `flags` bit of a `WRITE` whose payload starts with a write grant.
pub const FLAG_GRANT: u8 = 0x01;
/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TDKV";
/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Size of the payload checksum that follows a non-empty payload.
pub const TRAILER_LEN: usize = 8;
/// Longest message an `ERROR` frame may carry.
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Largest `HELLO` payload (the longest cluster token).
pub const MAX_HELLO_PAYLOAD: usize = tandem_proto::cluster_token::MAX_TOKEN_BYTES;
/// Payloads are hashed and moved in pieces of this size so the bytes are
/// still in cache when the checksum reads them.
pub const IO_CHUNK: usize = 256 * 1024;

/// What a frame asks for or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Read `len` bytes of DRAM segment `segment` at `offset`.
    Read = 0x01,
    /// Read the SSD block whose key is `offset`, `len` bytes.
    ReadSsd = 0x02,
    /// Write the payload into DRAM segment `segment` at `offset`.
    Write = 0x03,
    /// Set up an RDMA queue pair (feature `rdma`).
    RdmaConnect = 0x04,
    /// Opens a connection: the payload is the cluster token.
    Hello = 0x05,
    /// A read's block.
    Data = 0x81,
    /// A write landed.
    WriteOk = 0x82,
    /// The server's RDMA endpoint.
    RdmaAccept = 0x84,
    /// The handshake passed.
    HelloOk = 0x85,
    /// The request failed; see `status`.
    Error = 0xff,
}

impl Opcode {
    /// The opcode for a raw byte, if it names one.
    pub fn from_u8(raw: u8) -> Option<Opcode> {
        Some(match raw {
            0x01 => Opcode::Read,
            0x02 => Opcode::ReadSsd,
            0x03 => Opcode::Write,
            0x04 => Opcode::RdmaConnect,
            0x05 => Opcode::Hello,
            0x81 => Opcode::Data,
            0x82 => Opcode::WriteOk,
            0x84 => Opcode::RdmaAccept,
            0x85 => Opcode::HelloOk,
            0xff => Opcode::Error,
            _ => return None,
        })
    }
}

/// Why the server refused or failed a request (`status` of an `ERROR` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Not an error (every non-`ERROR` frame).
    Ok = 0,
    /// Malformed request: unknown opcode, nonzero flags, inconsistent lengths.
    BadRequest = 1,
    /// The peer speaks another protocol version.
    VersionMismatch = 2,
    /// The block is larger than the server's frame limit.
    TooLarge = 3,
    /// The range is outside the segment.
    OutOfBounds = 4,
    /// No such segment on this node.
    UnknownSegment = 5,
    /// No such SSD block on this node.
    NotFound = 6,
    /// A checksum did not match.
    Corrupt = 7,
    /// The server is at its connection limit.
    Busy = 8,
    /// The batch has more ops than the server allows.
    TooManyOps = 9,
    /// The server failed to read its storage.
    Io = 10,
    /// The server does not implement the request (e.g. RDMA not compiled in).
    Unsupported = 11,
    /// The write is not covered by a valid grant (see [`FLAG_GRANT`]).
    Denied = 12,
    /// The connection did not open with the right cluster token.
    Unauthenticated = 13,
}

impl Status {
    /// The status for a raw value; unknown values read as `BadRequest`.
    pub fn from_u16(raw: u16) -> Status {
        match raw {
            0 => Status::Ok,
            2 => Status::VersionMismatch,
            3 => Status::TooLarge,
            4 => Status::OutOfBounds,
            5 => Status::UnknownSegment,
            6 => Status::NotFound,
            7 => Status::Corrupt,
            8 => Status::Busy,
            9 => Status::TooManyOps,
            10 => Status::Io,
            11 => Status::Unsupported,
            12 => Status::Denied,
            13 => Status::Unauthenticated,
            _ => Status::BadRequest,
        }
    }

    /// The client-side error for an `ERROR` frame with this status.
    pub fn into_error(self, message: &str) -> TransferError {
        match self {
            Status::NotFound => TransferError::NotFound,
            Status::Corrupt => TransferError::Protocol(format!("peer reports corruption: {message}")),
            Status::Io => TransferError::Io(format!("peer storage error: {message}")),
            Status::Busy => TransferError::Unreachable(format!("peer busy: {message}")),
            Status::Ok
            | Status::BadRequest
            | Status::VersionMismatch
            | Status::TooLarge
            | Status::OutOfBounds
            | Status::UnknownSegment
            | Status::TooManyOps
            | Status::Unsupported
            | Status::Denied
            | Status::Unauthenticated => TransferError::Rejected(format!("{self:?}: {message}")),
        }
    }
}

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    pub version: u16,
    /// Raw opcode, so that unknown opcodes decode and can be refused politely.
    pub opcode: u8,
    pub flags: u8,
    pub request_id: u64,
    pub count: u32,
    pub segment: u32,
    pub offset: u64,
    pub len: u64,
    pub payload_len: u64,
    pub status: u16,
}

/// Why a received header was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic: not a tandem data-plane frame")]
    BadMagic,
    #[error("peer speaks protocol version {theirs}, this build speaks {VERSION}")]
    VersionMismatch { theirs: u16 },
    #[error("header checksum mismatch")]
    BadChecksum,
}

impl FrameHeader {
    /// A header of this build's version with every other field zero.
    pub fn new(opcode: Opcode, request_id: u64) -> FrameHeader {
        FrameHeader {
            version: VERSION,
            opcode: opcode as u8,
            flags: 0,
            request_id,
            count: 0,
            segment: 0,
            offset: 0,
            len: 0,
            payload_len: 0,
            status: 0,
        }
    }

    /// The opcode, if the raw byte names one.
    pub fn op(&self) -> Option<Opcode> {
        Opcode::from_u8(self.opcode)
    }

    /// Serializes the header and seals it with its checksum.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6] = self.opcode;
        b[7] = self.flags;
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.count.to_le_bytes());
        b[20..24].copy_from_slice(&self.segment.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..48].copy_from_slice(&self.payload_len.to_le_bytes());
        b[48..50].copy_from_slice(&self.status.to_le_bytes());
        let sum = XxHash3_64::oneshot(&b[..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and verifies a header: magic, then version, then checksum
    /// (version before checksum so that a peer of another version, whose
    /// header may be laid out differently, gets the clear answer).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, HeaderError> {
        if b[0..4] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(HeaderError::VersionMismatch { theirs: version });
        }
        if XxHash3_64::oneshot(&b[..56]) != u64_at(b, 56) {
            return Err(HeaderError::BadChecksum);
        }
        Ok(FrameHeader {
            version,
            opcode: b[6],
            flags: b[7],
            request_id: u64_at(b, 8),
            count: u32_at(b, 16),
            segment: u32_at(b, 20),
            offset: u64_at(b, 24),
            len: u64_at(b, 32),
            payload_len: u64_at(b, 40),
            status: u16::from_le_bytes([b[48], b[49]]),
        })
    }
}

fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The trailer value for a payload (xxh3-64, the same as streaming it
/// through [`PayloadHasher`]).
pub fn payload_checksum(payload: &[u8]) -> u64 {
    XxHash3_64::oneshot(payload)
}

/// Streaming payload checksum, fed chunk by chunk as bytes move.
#[derive(Clone)]
pub struct PayloadHasher(Box<XxHash3_64>);

impl std::fmt::Debug for PayloadHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadHasher")
    }
}

impl Default for PayloadHasher {
    fn default() -> Self {
        PayloadHasher(Box::new(XxHash3_64::new()))
    }
}

impl PayloadHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }

    pub fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// A `HELLO` frame carrying `token`: header, token, trailer.
pub fn hello_frame(token: &[u8]) -> Vec<u8> {
    let mut h = FrameHeader::new(Opcode::Hello, 1);
    h.count = 1;
    h.payload_len = token.len() as u64;
    let mut out = Vec::with_capacity(HEADER_LEN + token.len() + TRAILER_LEN);
    out.extend_from_slice(&h.encode());
    if !token.is_empty() {
        out.extend_from_slice(token);
        out.extend_from_slice(&payload_checksum(token).to_le_bytes());
    }
    out
}

/// Builds an `ERROR` reply: header plus message payload plus trailer.
pub fn error_frame(request_id: u64, status: Status, message: &str) -> Vec<u8> {
    let mut msg = message.as_bytes();
    if msg.len() > MAX_ERROR_MESSAGE {
        let mut cut = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        msg = &msg[..cut];
    }
    let mut h = FrameHeader::new(Opcode::Error, request_id);
    h.status = status as u16;
    h.payload_len = msg.len() as u64;
    let mut out = Vec::with_capacity(HEADER_LEN + msg.len() + TRAILER_LEN);
    out.extend_from_slice(&h.encode());
    if !msg.is_empty() {
        out.extend_from_slice(msg);
        out.extend_from_slice(&payload_checksum(msg).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FrameHeader {
        let mut h = FrameHeader::new(Opcode::Write, 42);
        h.count = 3;
        h.segment = 7;
        h.offset = 1 << 40;
        h.len = 4096;
        h.payload_len = 4096;
        h
    }

    #[test]
    fn header_round_trips_and_detects_each_kind_of_damage() {
        let h = sample();
        let b = h.encode();
        assert_eq!(FrameHeader::decode(&b), Ok(h));

        for i in 8..56 {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert_eq!(FrameHeader::decode(&bad), Err(HeaderError::BadChecksum), "flip at byte {i}");
        }
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(FrameHeader::decode(&bad), Err(HeaderError::BadMagic));
        let mut v2 = h;
        v2.version = 2;
        assert_eq!(FrameHeader::decode(&v2.encode()), Err(HeaderError::VersionMismatch { theirs: 2 }));
    }

    #[test]
    fn streaming_checksum_equals_one_shot() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut s = PayloadHasher::default();
        for c in data.chunks(IO_CHUNK / 3) {
            s.update(c);
        }
        assert_eq!(s.finish(), payload_checksum(&data));
    }

    #[test]
    fn error_frames_truncate_long_messages_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let f = error_frame(9, Status::Busy, &long);
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(&f[..HEADER_LEN]);
        let h = FrameHeader::decode(&hb).unwrap();
        assert_eq!(h.op(), Some(Opcode::Error));
        assert_eq!(Status::from_u16(h.status), Status::Busy);
        assert!(h.payload_len as usize <= MAX_ERROR_MESSAGE);
        let msg = &f[HEADER_LEN..HEADER_LEN + h.payload_len as usize];
        assert!(std::str::from_utf8(msg).is_ok());
        assert_eq!(f.len(), HEADER_LEN + h.payload_len as usize + TRAILER_LEN);
    }

    #[test]
    fn every_opcode_and_status_round_trips() {
        for op in [
            Opcode::Read,
            Opcode::ReadSsd,
            Opcode::Write,
            Opcode::RdmaConnect,
            Opcode::Data,
            Opcode::WriteOk,
            Opcode::RdmaAccept,
            Opcode::Hello,
            Opcode::HelloOk,
            Opcode::Error,
        ] {
            assert_eq!(Opcode::from_u8(op as u8), Some(op));
        }
        assert_eq!(Opcode::from_u8(0x55), None);
        for raw in 0..14u16 {
            assert_eq!(Status::from_u16(raw) as u16, raw);
        }
        assert_eq!(Status::from_u16(999), Status::BadRequest);
    }
}
