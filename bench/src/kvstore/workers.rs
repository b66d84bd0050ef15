//! The client tasks of stage 3 and the driver that times them.
//!
//! Every system is driven the same way: `clients` tasks, each with its own
//! connection, start together behind a barrier and issue one request at a
//! time (one key per call, no pipelining), timing each. Throughput is ops
//! over the wall time from the barrier to the last task's end; CPU is this
//! process's (clients, and for the store also its master and node) plus the
//! Redis server's when there is one.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use tandem_kvstore::checksum::BlockChecksum;
use tandem_kvstore::client::{PutOutcome, StoreClient};
use tandem_kvstore::transport::{ReadOp, Transport};
use tandem_kvstore::types::Location;
use tandem_proto::kvstore as pb;
use tandem_proto::BlockKey;
use tokio::sync::Barrier;
use tokio::task::JoinHandle;

use super::redis::RespConn;
use super::sys::{pid_cpu_secs, self_cpu_secs};

/// What one timed run of all clients measured.
#[derive(Debug)]
pub struct Measured {
    pub ops: u64,
    pub secs: f64,
    /// Per-op latencies, microseconds.
    pub lat_us: Vec<f64>,
    /// CPU of this process plus the server's, seconds.
    pub cpu_secs: f64,
}

/// A client task: gets its connection back when done, with its latencies.
pub type Task<C> = JoinHandle<anyhow::Result<(C, Vec<f64>)>>;

/// Runs one task per connection (made by `spawn`), all released together,
/// and times them. `server_pid`'s CPU is added to this process's.
pub async fn timed<C, F>(conns: Vec<C>, server_pid: Option<u32>, mut spawn: F) -> anyhow::Result<(Vec<C>, Measured)>
where
    C: Send + 'static,
    F: FnMut(usize, C, Arc<Barrier>) -> Task<C>,
{
    let n = conns.len();
    let barrier = Arc::new(Barrier::new(n + 1));
    let tasks: Vec<Task<C>> = conns.into_iter().enumerate().map(|(i, c)| spawn(i, c, barrier.clone())).collect();
    let cpu_before = self_cpu_secs() + server_pid.and_then(pid_cpu_secs).unwrap_or(0.0);
    barrier.wait().await;
    let start = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut lat_us = Vec::new();
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(Ok((c, lat))) => {
                conns.push(c);
                lat_us.extend(lat);
            }
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(anyhow::anyhow!("client task failed: {e}"))),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = self_cpu_secs() + server_pid.and_then(pid_cpu_secs).unwrap_or(0.0) - cpu_before;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((conns, Measured { ops: lat_us.len() as u64, secs, lat_us, cpu_secs }))
}

fn micros(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6
}

/// `client.put` of one fresh key per call; every put must store.
pub async fn store_put(
    client: Arc<StoreClient>,
    keys: Vec<BlockKey>,
    value: Arc<Vec<u8>>,
    barrier: Arc<Barrier>,
) -> anyhow::Result<(Arc<StoreClient>, Vec<f64>)> {
    barrier.wait().await;
    let mut lat = Vec::with_capacity(keys.len());
    for key in keys {
        let start = Instant::now();
        let outcome = client.put(&[(key, value.as_slice())]).await?;
        lat.push(micros(start));
        if outcome.first() != Some(&PutOutcome::Stored) {
            bail!("store put of a fresh key gave {outcome:?}");
        }
    }
    Ok((client, lat))
}

/// A reader: a connection (or client) and the buffer values land in.
#[derive(Debug)]
pub struct Reader<C> {
    pub conn: C,
    pub buf: Vec<u8>,
}

/// `client.get_into` of one key per call; every get must hit with `len` bytes.
pub async fn store_get(
    mut r: Reader<Arc<StoreClient>>,
    keys: Vec<BlockKey>,
    len: usize,
    barrier: Arc<Barrier>,
) -> anyhow::Result<(Reader<Arc<StoreClient>>, Vec<f64>)> {
    barrier.wait().await;
    let mut lat = Vec::with_capacity(keys.len());
    for key in keys {
        let start = Instant::now();
        let found = r.conn.get_into(&[key], &mut [&mut r.buf[..]]).await?;
        lat.push(micros(start));
        if found.first() != Some(&Some(len)) {
            bail!("store get of a stored key gave {found:?}");
        }
    }
    Ok((r, lat))
}

/// Where a stored block sits, resolved once through the master.
#[derive(Debug, Clone, Copy)]
pub struct Resolved {
    pub location: Location,
    pub checksum: u64,
}

/// The store's data path alone: a transport read plus the checksum check a
/// `get_into` does, with the block's location known in advance (no master).
pub async fn data_path_get(
    mut r: Reader<Arc<dyn Transport>>,
    blocks: Vec<Resolved>,
    len: usize,
    barrier: Arc<Barrier>,
) -> anyhow::Result<(Reader<Arc<dyn Transport>>, Vec<f64>)> {
    barrier.wait().await;
    let mut lat = Vec::with_capacity(blocks.len());
    for b in blocks {
        let start = Instant::now();
        let mut ops = [ReadOp::new(b.location, &mut r.buf[..len])];
        let result = r.conn.read(&mut ops).await.into_iter().next();
        // As the client does: a transport that hashed the bytes in flight saves a pass.
        let sum = ops[0].checksum;
        let ok =
            matches!(result, Some(Ok(()))) && sum.unwrap_or_else(|| BlockChecksum::of(&r.buf[..len]).0) == b.checksum;
        lat.push(micros(start));
        if !ok {
            bail!("data-path read failed or did not match its checksum: {result:?}");
        }
    }
    Ok((r, lat))
}

/// The store's control path alone for a get: `GetReplicas` and
/// `ReleaseLease`, the two master round trips of every `get_into`. Without
/// `release`, only `GetReplicas`, asking for a 1 ms lease that the master
/// expires by itself: what a client that did not wait for (or batched) its
/// lease releases would pay.
pub async fn control_path_get(
    client: Arc<StoreClient>,
    keys: Vec<BlockKey>,
    release: bool,
    barrier: Arc<Barrier>,
) -> anyhow::Result<(Arc<StoreClient>, Vec<f64>)> {
    barrier.wait().await;
    let mut master = client.master();
    let mut lat = Vec::with_capacity(keys.len());
    for key in keys {
        let start = Instant::now();
        let req = pb::GetReplicasRequest { keys: vec![key.0], lease_ms: if release { 0 } else { 1 } };
        let reply = master.get_replicas(req).await.context("GetReplicas")?.into_inner();
        if release {
            let req = pb::ReleaseLeaseRequest { lease_id: reply.lease_id };
            master.release_lease(req).await.context("ReleaseLease")?;
        }
        lat.push(micros(start));
        if !reply.entries.first().is_some_and(|e| e.found) {
            bail!("GetReplicas missed a stored key");
        }
    }
    Ok((client, lat))
}

/// The store's control path alone for a put: `PutStart` and `PutEnd`, the
/// two master round trips of every `put`, with no bytes written (the keys
/// are removed afterwards and never read).
pub async fn control_path_put(
    client: Arc<StoreClient>,
    keys: Vec<BlockKey>,
    len: usize,
    barrier: Arc<Barrier>,
) -> anyhow::Result<(Arc<StoreClient>, Vec<f64>)> {
    barrier.wait().await;
    let mut master = client.master();
    let mut lat = Vec::with_capacity(keys.len());
    for key in keys {
        let start = Instant::now();
        let req = pb::PutStartRequest {
            items: vec![pb::PutItem { key: key.0, len: len as u64 }],
            replicas: 0,
            prefer_node: String::new(),
        };
        let reply = master.put_start(req).await.context("PutStart")?.into_inner();
        let done = vec![pb::PutDone { key: key.0, checksum: 0 }];
        let end = master.put_end(pb::PutEndRequest { put_id: reply.put_id, items: done }).await.context("PutEnd")?;
        lat.push(micros(start));
        if end.into_inner().published != 1 {
            bail!("PutStart/PutEnd did not publish a fresh key");
        }
    }
    Ok((client, lat))
}

/// Redis `SET` of one fresh key per call.
pub async fn redis_set(
    mut conn: RespConn,
    keys: Vec<Vec<u8>>,
    value: Arc<Vec<u8>>,
    barrier: Arc<Barrier>,
) -> anyhow::Result<(RespConn, Vec<f64>)> {
    barrier.wait().await;
    let mut lat = Vec::with_capacity(keys.len());
    for key in keys {
        let start = Instant::now();
        conn.set(&key, &value).await?;
        lat.push(micros(start));
    }
    Ok((conn, lat))
}

/// Redis `GET` of one key per call into the reader's buffer; every get must
/// find `len` bytes.
pub async fn redis_get(
    mut r: Reader<RespConn>,
    keys: Vec<Vec<u8>>,
    len: usize,
    barrier: Arc<Barrier>,
) -> anyhow::Result<(Reader<RespConn>, Vec<f64>)> {
    barrier.wait().await;
    let mut lat = Vec::with_capacity(keys.len());
    for key in keys {
        let start = Instant::now();
        let found = r.conn.get_into(&key, &mut r.buf).await?;
        lat.push(micros(start));
        if found != Some(len) {
            bail!("redis GET of a stored key gave {found:?}");
        }
    }
    Ok((r, lat))
}
