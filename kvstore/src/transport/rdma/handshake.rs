//! The `RDMA_CONNECT`/`RDMA_ACCEPT` payloads (little-endian):
//!
//! | payload        | layout                                                                        |
//! |----------------|-------------------------------------------------------------------------------|
//! | `RDMA_CONNECT` | endpoint, then `u32 n` and `n` × `u32` segment id                             |
//! | `RDMA_ACCEPT`  | endpoint, then `u32 n` and `n` × (`u32` id, `u32` rkey, `u64` addr, `u64` len) |
//!
//! where an endpoint is `u32 qp_num, u16 lid, u8 port, u8 gid_index,
//! [u8; 16] gid, u32 psn, u32 mtu` (port and GID index are the client's and
//! zero in the reply). Decoding never panics: short, long or absurd payloads
//! decode to `None`.

/// Most segments one handshake may name.
pub(super) const MAX_HANDSHAKE_SEGMENTS: usize = 4096;

/// One side's queue-pair endpoint, as exchanged in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Endpoint {
    pub(super) qp_num: u32,
    pub(super) lid: u16,
    pub(super) gid: [u8; 16],
    pub(super) psn: u32,
    /// `enum ibv_mtu` of the port.
    pub(super) mtu: u32,
}

/// A remote segment as the server registered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RemoteSegment {
    pub(super) id: u32,
    pub(super) rkey: u32,
    pub(super) addr: u64,
    pub(super) len: u64,
}

/// Handshake request: the client's endpoint, its port and GID index (the
/// server uses the same ones), and the segments it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    pub(super) endpoint: Endpoint,
    pub(super) port: u8,
    pub(super) gid_index: u8,
    pub(super) segments: Vec<u32>,
}

/// Little-endian reader over a handshake payload; `None` when it runs out.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn count(&mut self) -> Option<usize> {
        self.u32().map(|n| n as usize).filter(|&n| n <= MAX_HANDSHAKE_SEGMENTS)
    }
}

fn put_endpoint(out: &mut Vec<u8>, e: &Endpoint, port: u8, gid_index: u8) {
    out.extend_from_slice(&e.qp_num.to_le_bytes());
    out.extend_from_slice(&e.lid.to_le_bytes());
    out.push(port);
    out.push(gid_index);
    out.extend_from_slice(&e.gid);
    out.extend_from_slice(&e.psn.to_le_bytes());
    out.extend_from_slice(&e.mtu.to_le_bytes());
}

fn get_endpoint(c: &mut Cursor<'_>) -> Option<(Endpoint, u8, u8)> {
    let qp_num = c.u32()?;
    let lid = c.u16()?;
    let port = c.u8()?;
    let gid_index = c.u8()?;
    let gid = c.take::<16>()?;
    let psn = c.u32()?;
    let mtu = c.u32()?;
    Some((Endpoint { qp_num, lid, gid, psn, mtu }, port, gid_index))
}

impl Request {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + 4 * self.segments.len());
        put_endpoint(&mut out, &self.endpoint, self.port, self.gid_index);
        out.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for id in &self.segments {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Request> {
        let mut c = Cursor(bytes);
        let (endpoint, port, gid_index) = get_endpoint(&mut c)?;
        let n = c.count()?;
        let segments = (0..n).map(|_| c.u32()).collect::<Option<Vec<u32>>>()?;
        c.0.is_empty().then_some(Request { endpoint, port, gid_index, segments })
    }
}

pub(super) fn encode_reply(endpoint: &Endpoint, segments: &[RemoteSegment]) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + 24 * segments.len());
    put_endpoint(&mut out, endpoint, 0, 0);
    out.extend_from_slice(&(segments.len() as u32).to_le_bytes());
    for s in segments {
        out.extend_from_slice(&s.id.to_le_bytes());
        out.extend_from_slice(&s.rkey.to_le_bytes());
        out.extend_from_slice(&s.addr.to_le_bytes());
        out.extend_from_slice(&s.len.to_le_bytes());
    }
    out
}

pub(super) fn decode_reply(bytes: &[u8]) -> Option<(Endpoint, Vec<RemoteSegment>)> {
    let mut c = Cursor(bytes);
    let (endpoint, _, _) = get_endpoint(&mut c)?;
    let n = c.count()?;
    let segments = (0..n)
        .map(|_| Some(RemoteSegment { id: c.u32()?, rkey: c.u32()?, addr: c.u64()?, len: c.u64()? }))
        .collect::<Option<Vec<_>>>()?;
    c.0.is_empty().then_some((endpoint, segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint { qp_num: 0x1234, lid: 7, gid: [9; 16], psn: 0xabcdef, mtu: 5 }
    }

    #[test]
    fn handshake_payloads_round_trip_and_reject_damage() {
        let req = Request { endpoint: endpoint(), port: 1, gid_index: 3, segments: vec![0, 1, 7] };
        let bytes = req.encode();
        assert_eq!(Request::decode(&bytes), Some(req));
        assert_eq!(Request::decode(&bytes[..bytes.len() - 1]), None, "truncated");
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Request::decode(&longer), None, "trailing bytes");
        let mut huge = bytes[..34].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Request::decode(&huge), None, "absurd segment count");

        let segs = vec![RemoteSegment { id: 3, rkey: 99, addr: 1 << 40, len: 1 << 30 }];
        let reply = encode_reply(&endpoint(), &segs);
        assert_eq!(decode_reply(&reply), Some((endpoint(), segs)));
        assert_eq!(decode_reply(&reply[..10]), None);
    }
}
