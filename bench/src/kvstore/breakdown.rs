//! Where one store operation's time goes: a single client (no contention)
//! replays what `get_into` and `put` do, phase by phase — master round
//! trips, the transfer, the checksum — next to the real client calls, a
//! null master RPC and the same Redis commands.

use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;
use tandem_kvstore::checksum::BlockChecksum;
use tandem_kvstore::client::PutOutcome;
use tandem_kvstore::grant::WriteGrant;
use tandem_kvstore::transport::{connect, local_host_id, ReadOp, TransportConfig, TransportPreference, WriteOp};
use tandem_kvstore::wire::replica_from_pb;
use tandem_proto::kvstore as pb;
use tandem_proto::BlockKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::cluster::Cluster;
use super::redis::RespConn;
use super::shm::check;
use super::sys::{filled, SplitMix64};
use crate::stats::median;

/// Median microseconds of each phase of a `get_into`.
#[derive(Debug, Clone, Serialize)]
pub struct GetPhases {
    /// `GetReplicas` round trip to the master (takes a read lease).
    pub get_replicas_us: f64,
    /// The transport read of the block into the caller's buffer.
    pub transfer_us: f64,
    /// xxh3 of the block, checked against the writer's checksum.
    pub checksum_us: f64,
    /// `ReleaseLease` round trip to the master (a client may send it off
    /// the caller's path; its cost to the master remains).
    pub release_lease_us: f64,
    pub phases_sum_us: f64,
    /// The real `StoreClient::get_into`, measured in the same loop.
    pub client_get_into_us: f64,
    /// Share of the phases spent in master round trips.
    pub master_share: f64,
    /// A Redis `GET` of the same size, when Redis runs.
    pub redis_get_us: Option<f64>,
}

/// Median microseconds of each phase of a `put`.
#[derive(Debug, Clone, Serialize)]
pub struct PutPhases {
    /// `PutStart` round trip (reserves space).
    pub put_start_us: f64,
    /// The transport write of the block.
    pub transfer_us: f64,
    /// xxh3 of the block (published with it).
    pub checksum_us: f64,
    /// `PutEnd` round trip (publishes).
    pub put_end_us: f64,
    pub phases_sum_us: f64,
    /// The real `StoreClient::put`, measured in the same loop.
    pub client_put_us: f64,
    /// Share of the phases spent in master round trips.
    pub master_share: f64,
    /// A Redis `SET` of the same size (overwriting one of a few keys),
    /// when Redis runs.
    pub redis_set_us: Option<f64>,
}

/// One value size over one transport.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    pub value_bytes: usize,
    pub transport: &'static str,
    /// Operations timed (medians are over these).
    pub ops: usize,
    /// A `Lookup` of one key: the floor of any master round trip.
    pub null_rpc_us: f64,
    /// A one-byte ping-pong on a loopback tcp connection in this runtime:
    /// the floor of any round trip here.
    pub tcp_ping_us: f64,
    /// A Redis `PING`, when Redis runs.
    pub redis_ping_us: Option<f64>,
    pub get: GetPhases,
    pub put: PutPhases,
}

/// Samples of every phase, microseconds.
#[derive(Debug, Default)]
struct Samples {
    null_rpc: Vec<f64>,
    tcp_ping: Vec<f64>,
    redis_ping: Vec<f64>,
    get: [Vec<f64>; 4],
    get_client: Vec<f64>,
    redis_get: Vec<f64>,
    put: [Vec<f64>; 4],
    put_client: Vec<f64>,
    redis_set: Vec<f64>,
}

/// Inputs of [`measure`].
#[derive(Debug)]
pub struct BreakdownInput<'a> {
    pub cluster: &'a Cluster,
    pub prefer: TransportPreference,
    /// Stored keys of `value_bytes` each (gets read these).
    pub keys: &'a [BlockKey],
    /// The same values' Redis keys, when Redis runs.
    pub redis_keys: Option<&'a [Vec<u8>]>,
    pub value_bytes: usize,
    pub ops: usize,
    pub seed: u64,
}

/// Times `ops` operations of each kind (after a few untimed ones).
pub async fn measure(input: BreakdownInput<'_>, mut redis: Option<&mut RespConn>) -> anyhow::Result<Breakdown> {
    let size = input.value_bytes;
    let client = input.cluster.client(input.prefer)?;
    let cfg = TransportConfig { prefer: input.prefer, ..TransportConfig::default() };
    let transport = connect(input.cluster.peer(), &local_host_id(), &cfg)?;
    let mut master = client.master();
    let mut buf = filled(size, 31);
    let value = filled(size, 32);
    let mut rng = SplitMix64::new(input.seed);
    let mut s = Samples::default();
    let mut fresh: Vec<BlockKey> = Vec::new();
    let mut fresh_redis: Vec<Vec<u8>> = Vec::new();
    let mut echo = Echo::start().await.context("starting a loopback echo")?;
    let warmup = 3;
    for i in 0..input.ops + warmup {
        let keep = i >= warmup;
        let pick = rng.below(input.keys.len());
        let key = input.keys[pick];

        let start = Instant::now();
        master.lookup(pb::LookupRequest { keys: vec![key.0] }).await.context("Lookup")?;
        push(&mut s.null_rpc, keep, start);
        let start = Instant::now();
        echo.ping().await?;
        push(&mut s.tcp_ping, keep, start);
        if let Some(conn) = redis.as_deref_mut() {
            let start = Instant::now();
            conn.ping().await?;
            push(&mut s.redis_ping, keep, start);
        }

        // get_into, phase by phase.
        let start = Instant::now();
        let reply = master.get_replicas(pb::GetReplicasRequest { keys: vec![key.0], lease_ms: 0 }).await?.into_inner();
        let t1 = Instant::now();
        let Some(entry) = reply.entries.into_iter().next().filter(|e| e.found && e.len as usize == size) else {
            bail!("GetReplicas missed a stored key");
        };
        let replica = replica_from_pb(key, entry.replicas.into_iter().next().context("no replica")?)?;
        let mut ops = [ReadOp::new(replica.location, &mut buf[..])];
        check(transport.read(&mut ops).await)?;
        let t2 = Instant::now();
        let ok = BlockChecksum::of(&buf).0 == entry.checksum;
        let t3 = Instant::now();
        master.release_lease(pb::ReleaseLeaseRequest { lease_id: reply.lease_id }).await?;
        let t4 = Instant::now();
        if !ok {
            bail!("a block read in the breakdown failed its checksum");
        }
        if keep {
            for (v, (a, b)) in s.get.iter_mut().zip([(start, t1), (t1, t2), (t2, t3), (t3, t4)]) {
                v.push((b - a).as_secs_f64() * 1e6);
            }
        }
        let start = Instant::now();
        let found = client.get_into(&[key], &mut [&mut buf[..]]).await?;
        push(&mut s.get_client, keep, start);
        if found.first() != Some(&Some(size)) {
            bail!("store get of a stored key gave {found:?}");
        }
        if let (Some(conn), Some(keys)) = (redis.as_deref_mut(), input.redis_keys) {
            let start = Instant::now();
            let found = conn.get_into(&keys[pick], &mut buf).await?;
            push(&mut s.redis_get, keep, start);
            if found != Some(size) {
                bail!("redis GET of a stored key gave {found:?}");
            }
        }

        // put, phase by phase, of a fresh key.
        let key = BlockKey(rng.next_u64());
        fresh.push(key);
        let start = Instant::now();
        let req = pb::PutStartRequest {
            items: vec![pb::PutItem { key: key.0, len: size as u64 }],
            replicas: 0,
            prefer_node: String::new(),
        };
        let reply = master.put_start(req).await?.into_inner();
        let t1 = Instant::now();
        let placement = reply.slots.into_iter().next().and_then(|s| s.placements.into_iter().next());
        let placement = placement.context("PutStart reserved nothing for a fresh key")?;
        let grant = WriteGrant::decode(&placement.write_grant).ok();
        let replica = replica_from_pb(key, placement)?;
        check(transport.write(&[WriteOp { dst: replica.location, src: &value, grant }]).await)?;
        let t2 = Instant::now();
        let checksum = BlockChecksum::of(&value).0;
        let t3 = Instant::now();
        let done = vec![pb::PutDone { key: key.0, checksum }];
        master.put_end(pb::PutEndRequest { put_id: reply.put_id, items: done }).await?;
        let t4 = Instant::now();
        if keep {
            for (v, (a, b)) in s.put.iter_mut().zip([(start, t1), (t1, t2), (t2, t3), (t3, t4)]) {
                v.push((b - a).as_secs_f64() * 1e6);
            }
        }
        let key = BlockKey(rng.next_u64());
        fresh.push(key);
        let start = Instant::now();
        let outcome = client.put(&[(key, value.as_slice())]).await?;
        push(&mut s.put_client, keep, start);
        if outcome.first() != Some(&PutOutcome::Stored) {
            bail!("store put of a fresh key gave {outcome:?}");
        }
        if let Some(conn) = redis.as_deref_mut() {
            // Overwrites a few keys, so Redis writes into memory it has (as
            // the store does); see the module docs of `versus`.
            let name = format!("b:{}", i % 8).into_bytes();
            let start = Instant::now();
            conn.set(&name, &value).await?;
            push(&mut s.redis_set, keep, start);
            if i < 8 {
                fresh_redis.push(name);
            }
        }
    }
    client.remove(&fresh).await?;
    if let Some(conn) = redis {
        for chunk in fresh_redis.chunks(256) {
            conn.del(chunk).await?;
        }
    }
    Ok(summarize(&input, s))
}

/// A one-byte echo over loopback tcp, server task in this runtime.
struct Echo {
    conn: TcpStream,
}

impl Echo {
    async fn start() -> std::io::Result<Echo> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let _ = conn.set_nodelay(true);
            let mut b = [0u8; 1];
            // Ends when the client drops its end.
            while conn.read_exact(&mut b).await.is_ok() && conn.write_all(&b).await.is_ok() {}
        });
        let conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        Ok(Echo { conn })
    }

    async fn ping(&mut self) -> std::io::Result<()> {
        let mut b = [7u8; 1];
        self.conn.write_all(&b).await?;
        self.conn.read_exact(&mut b).await?;
        Ok(())
    }
}

fn push(v: &mut Vec<f64>, keep: bool, start: Instant) {
    if keep {
        v.push(start.elapsed().as_secs_f64() * 1e6);
    }
}

fn summarize(input: &BreakdownInput<'_>, s: Samples) -> Breakdown {
    let med = |v: &[f64]| if v.is_empty() { 0.0 } else { median(v) };
    let opt = |v: &[f64]| (!v.is_empty()).then(|| median(v));
    let g: Vec<f64> = s.get.iter().map(|v| med(v)).collect();
    let p: Vec<f64> = s.put.iter().map(|v| med(v)).collect();
    let (g_sum, p_sum): (f64, f64) = (g.iter().sum(), p.iter().sum());
    let share = |a: f64, b: f64, sum: f64| if sum > 0.0 { (a + b) / sum } else { 0.0 };
    Breakdown {
        value_bytes: input.value_bytes,
        transport: match input.prefer {
            TransportPreference::Shm => "shm",
            TransportPreference::Tcp => "tcp",
            TransportPreference::Rdma => "rdma",
            TransportPreference::Auto => "auto",
        },
        ops: input.ops,
        null_rpc_us: med(&s.null_rpc),
        tcp_ping_us: med(&s.tcp_ping),
        redis_ping_us: opt(&s.redis_ping),
        get: GetPhases {
            get_replicas_us: g[0],
            transfer_us: g[1],
            checksum_us: g[2],
            release_lease_us: g[3],
            phases_sum_us: g_sum,
            client_get_into_us: med(&s.get_client),
            master_share: share(g[0], g[3], g_sum),
            redis_get_us: opt(&s.redis_get),
        },
        put: PutPhases {
            put_start_us: p[0],
            transfer_us: p[1],
            checksum_us: p[2],
            put_end_us: p[3],
            phases_sum_us: p_sum,
            client_put_us: med(&s.put_client),
            master_share: share(p[0], p[3], p_sum),
            redis_set_us: opt(&s.redis_set),
        },
    }
}
