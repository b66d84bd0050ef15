//! Conversions between the generated gRPC messages (`tandem_proto::kvstore`)
//! and the store's domain types, validating everything that arrives.

use std::net::SocketAddr;
use std::path::PathBuf;

use tandem_proto::kvstore as pb;
use tandem_proto::BlockKey;
use tonic::Status;

use crate::types::{Location, PeerInfo, Replica, SegmentDesc, Tier};

/// Longest node name, host id or path accepted.
pub const MAX_NAME: usize = 256;
pub const MAX_PATH: usize = 4096;
/// Most segments one node may contribute.
pub const MAX_SEGMENTS: usize = 1024;

fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!("{field} is {} bytes, limit {max}", value.len())));
    }
    Ok(())
}

pub fn tier_to_pb(t: Tier) -> pb::Tier {
    match t {
        Tier::Dram => pb::Tier::Dram,
        Tier::Ssd => pb::Tier::Ssd,
    }
}

pub fn tier_from_pb(t: i32) -> Result<Tier, Status> {
    match pb::Tier::try_from(t) {
        Ok(pb::Tier::Dram) => Ok(Tier::Dram),
        Ok(pb::Tier::Ssd) => Ok(Tier::Ssd),
        _ => Err(Status::invalid_argument(format!("unknown tier {t}"))),
    }
}

pub fn peer_to_pb(p: &PeerInfo, control_addr: &str) -> pb::NodeEndpoint {
    pb::NodeEndpoint {
        name: p.name.clone(),
        incarnation: p.incarnation,
        control_addr: control_addr.to_owned(),
        data_addr: p.data_addr.to_string(),
        host_id: p.host_id.clone(),
        segments: p
            .segments
            .iter()
            .map(|s| pb::SegmentInfo { id: s.id, bytes: s.bytes, path: s.path.to_string_lossy().into_owned() })
            .collect(),
        ssd_dir: p.ssd_dir.as_ref().map(|d| d.to_string_lossy().into_owned()).unwrap_or_default(),
    }
}

/// A node description from the wire, validated; also returns its control address.
pub fn peer_from_pb(e: pb::NodeEndpoint) -> Result<(PeerInfo, String), Status> {
    if e.name.is_empty() {
        return Err(Status::invalid_argument("node name is empty"));
    }
    bounded("node name", &e.name, MAX_NAME)?;
    bounded("host id", &e.host_id, MAX_NAME)?;
    bounded("control address", &e.control_addr, MAX_NAME)?;
    bounded("ssd dir", &e.ssd_dir, MAX_PATH)?;
    let data_addr: SocketAddr = e
        .data_addr
        .parse()
        .map_err(|_| Status::invalid_argument(format!("data address {:?} is not host:port", e.data_addr)))?;
    if e.segments.len() > MAX_SEGMENTS {
        return Err(Status::invalid_argument(format!("{} segments, limit {MAX_SEGMENTS}", e.segments.len())));
    }
    let mut segments = Vec::with_capacity(e.segments.len());
    for s in e.segments {
        bounded("segment path", &s.path, MAX_PATH)?;
        if s.bytes == 0 {
            return Err(Status::invalid_argument(format!("segment {} has no bytes", s.id)));
        }
        if segments.iter().any(|x: &SegmentDesc| x.id == s.id) {
            return Err(Status::invalid_argument(format!("segment id {} repeated", s.id)));
        }
        segments.push(SegmentDesc { id: s.id, bytes: s.bytes, path: PathBuf::from(s.path) });
    }
    let ssd_dir = (!e.ssd_dir.is_empty()).then(|| PathBuf::from(e.ssd_dir));
    let peer = PeerInfo { name: e.name, incarnation: e.incarnation, data_addr, host_id: e.host_id, segments, ssd_dir };
    Ok((peer, e.control_addr))
}

pub fn replica_to_pb(r: &Replica) -> pb::Replica {
    let (segment, offset) = match r.location {
        Location::Dram { segment, offset } => (segment, offset),
        Location::Ssd { .. } => (0, 0),
    };
    pb::Replica {
        node: r.node.clone(),
        incarnation: r.incarnation,
        tier: tier_to_pb(r.tier()) as i32,
        segment,
        offset,
        len: r.len,
        write_grant: Vec::new(),
    }
}

/// A replica of `key` from the wire, validated.
pub fn replica_from_pb(key: BlockKey, r: pb::Replica) -> Result<Replica, Status> {
    bounded("node name", &r.node, MAX_NAME)?;
    let location = match tier_from_pb(r.tier)? {
        Tier::Dram => Location::Dram { segment: r.segment, offset: r.offset },
        Tier::Ssd => Location::Ssd { key },
    };
    Ok(Replica { node: r.node, incarnation: r.incarnation, location, len: r.len })
}

/// Checks a request's key count against the limit.
pub fn check_batch(what: &str, n: usize, max: usize) -> Result<(), Status> {
    if n > max {
        return Err(Status::invalid_argument(format!("{n} {what} in one request, limit {max}")));
    }
    Ok(())
}
