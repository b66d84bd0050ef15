//! Stage 3: the store against Redis, one key per call at the same
//! concurrency, for each value size.
//!
//! Both sides run the same client tasks ([`super::workers`]): store puts
//! write fresh keys (the store does not rewrite a key it has) into DRAM it
//! has already touched (removed after each repetition, reused by the next);
//! Redis puts overwrite the previous repetition's keys, which likewise
//! reuses memory Redis already has (fresh Redis keys, which make Redis
//! allocate and fault in new memory, run as `redis_fresh_keys`). Gets read
//! a pre-populated set in a seeded random order that is the same for every
//! system. The store runs in this process (master, one
//! storage node, clients); Redis is a separate `redis-server` process.
//!
//! Besides the real clients over shm and tcp, two partial systems show
//! where the store's time goes under load: the data path alone (transport
//! read + checksum, locations resolved beforehand) and the control path
//! alone (the two master round trips of each call, no bytes moved; for
//! gets also `GetReplicas` alone).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytesize::ByteSize;
use serde::Serialize;
use tandem_kvstore::client::StoreClient;
use tandem_kvstore::transport::{connect, local_host_id, Transport, TransportConfig, TransportPreference};
use tandem_kvstore::wire::replica_from_pb;
use tandem_proto::kvstore as pb;
use tandem_proto::BlockKey;

use super::breakdown::{self, Breakdown, BreakdownInput};
use super::cluster::Cluster;
use super::redis::{redis_benchmark, RedisBenchmarkLine, RedisServer, RespConn};
use super::sys::{filled, gbps, percentile, size_tag, SplitMix64};
use super::workers::{self, Measured, Reader, Resolved};
use crate::stats::median;

/// Keys per store call when populating or removing.
const ADMIN_BATCH: usize = 256;

/// What stage 3 measures.
#[derive(Debug, Clone, Serialize)]
pub struct VersusSettings {
    pub value_sizes: Vec<usize>,
    /// Concurrent clients (connections), one outstanding request each.
    pub clients: usize,
    /// Bytes moved per timed repetition; ops per client = this / size / clients.
    pub rep_bytes: usize,
    /// Bytes of the pre-populated set gets read from.
    pub get_set_bytes: usize,
    /// Timed repetitions (the median is reported), after one warm-up.
    pub reps: usize,
    /// DRAM of the in-process storage node (holds the get set and one
    /// repetition's puts; puts are removed after each repetition).
    pub dram: ByteSize,
    /// Operations per kind in the single-client breakdown.
    pub breakdown_ops: usize,
    /// Also run `redis-benchmark` as a cross-check of the RESP client.
    pub redis_benchmark: bool,
    /// Bytes per test of the `redis-benchmark` cross-check (requests =
    /// this / value size).
    pub redis_benchmark_bytes: usize,
}

impl VersusSettings {
    fn ops_per_client(&self, size: usize) -> usize {
        (self.rep_bytes / size / self.clients.max(1)).max(4)
    }

    fn get_set_len(&self, size: usize) -> usize {
        (self.get_set_bytes / size).max(self.clients)
    }
}

/// The systems driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Redis; puts overwrite keys of the previous repetition, so that
    /// Redis writes into memory it already has (as the store does).
    Redis,
    /// Redis puts of fresh keys (new allocations every time).
    RedisFreshKeys,
    /// The store's client as shipped: blocks it has read before come
    /// straight from their known location (checksum-validated, no master).
    StoreShm,
    StoreTcp,
    /// The client with its location cache off: every get asks the master
    /// for replicas under a lease (a block's first read by a client).
    StoreShmLeased,
    StoreTcpLeased,
    /// Transport read + checksum, no master (gets only).
    DataPathShm,
    DataPathTcp,
    /// Master round trips only, no bytes.
    ControlPath,
    /// `GetReplicas` only (no `ReleaseLease`), no bytes (gets only).
    GetReplicasOnly,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Redis => "redis",
            System::RedisFreshKeys => "redis_fresh_keys",
            System::StoreShm => "store_shm",
            System::StoreTcp => "store_tcp",
            System::StoreShmLeased => "store_shm_leased",
            System::StoreTcpLeased => "store_tcp_leased",
            System::DataPathShm => "store_shm_data_path_only",
            System::DataPathTcp => "store_tcp_data_path_only",
            System::ControlPath => "store_control_path_only",
            System::GetReplicasOnly => "store_get_replicas_only",
        }
    }
}

/// Put (Redis `SET`) or get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
        }
    }
}

/// Each repetition runs these, in this order.
const PLAN: &[(System, Op)] = &[
    (System::Redis, Op::Put),
    (System::RedisFreshKeys, Op::Put),
    (System::Redis, Op::Get),
    (System::StoreShm, Op::Put),
    (System::StoreShm, Op::Get),
    (System::StoreTcp, Op::Put),
    (System::StoreTcp, Op::Get),
    (System::StoreShmLeased, Op::Get),
    (System::StoreTcpLeased, Op::Get),
    (System::DataPathShm, Op::Get),
    (System::DataPathTcp, Op::Get),
    (System::ControlPath, Op::Get),
    (System::GetReplicasOnly, Op::Get),
    (System::ControlPath, Op::Put),
];

/// One system, op and value size (medians over repetitions).
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    pub system: &'static str,
    pub op: &'static str,
    pub value_bytes: usize,
    pub clients: usize,
    pub ops_per_rep: u64,
    pub ops_per_s: f64,
    pub gbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU (this process, plus redis-server for Redis) per operation.
    pub cpu_us_per_op: f64,
    /// Share of operations (all repetitions) that took 38-48 ms: the
    /// signature of a stall on Linux's 40 ms delayed-ACK timer (Nagle's
    /// algorithm on a socket without TCP_NODELAY).
    pub delayed_ack_stall_share: f64,
    pub runs_ops_per_s: Vec<f64>,
    pub runs_p50_us: Vec<f64>,
    pub runs_p99_us: Vec<f64>,
    pub runs_cpu_us_per_op: Vec<f64>,
}

/// Stage 3's results.
#[derive(Debug, Clone, Serialize)]
pub struct VersusResult {
    /// `redis-server --version`, when Redis ran.
    pub redis_version: Option<String>,
    /// Why Redis numbers are missing, when they are.
    pub redis_unavailable: Option<String>,
    pub workloads: Vec<WorkloadResult>,
    pub breakdown: Vec<Breakdown>,
    /// `redis-benchmark` lines per value size, when run.
    pub redis_benchmark: Vec<(usize, Vec<RedisBenchmarkLine>)>,
    /// CPU seconds redis-server used in all (it is not this process).
    pub redis_cpu_secs: Option<f64>,
}

impl VersusResult {
    pub fn find(&self, system: System, op: Op, size: usize) -> Option<&WorkloadResult> {
        self.workloads.iter().find(|w| w.system == system.name() && w.op == op.name() && w.value_bytes == size)
    }
}

/// Runs stage 3: segment files in `shm_dir`, Redis's directory in `work_dir`.
pub async fn run(settings: &VersusSettings, shm_dir: &Path, work_dir: &Path) -> anyhow::Result<VersusResult> {
    let (redis, redis_unavailable) = match RedisServer::start(work_dir).await {
        Ok(r) => (Some(r), None),
        Err(e) => {
            eprintln!("[kvstore bench]   redis unavailable, store numbers only: {e:#}");
            (None, Some(format!("{e:#}")))
        }
    };
    let cluster = Cluster::start(shm_dir, settings.dram).await?;
    let mut bench = Bench::new(settings, &cluster, redis.as_ref());
    let outcome = bench.run_all().await;
    let mut result = VersusResult {
        redis_version: redis.as_ref().map(|r| r.version.clone()),
        redis_unavailable,
        workloads: std::mem::take(&mut bench.results),
        breakdown: std::mem::take(&mut bench.breakdowns),
        redis_benchmark: std::mem::take(&mut bench.redis_benchmark),
        redis_cpu_secs: redis.as_ref().and_then(RedisServer::cpu_secs),
    };
    if let Some(e) = bench.redis_failure.take() {
        result.redis_unavailable = Some(e);
    }
    drop(bench);
    cluster.shutdown().await;
    drop(redis);
    outcome.map(|()| result)
}

/// The get set of one value size.
struct GetSet {
    value_bytes: usize,
    keys: Vec<BlockKey>,
    redis_keys: Vec<Vec<u8>>,
    resolved: Vec<Resolved>,
}

struct Bench<'a> {
    settings: &'a VersusSettings,
    cluster: &'a Cluster,
    redis: Option<&'a RedisServer>,
    /// Set when Redis failed mid-run; Redis is skipped from then on.
    redis_failure: Option<String>,
    admin: Option<Arc<StoreClient>>,
    shm: Vec<Arc<StoreClient>>,
    tcp: Vec<Arc<StoreClient>>,
    shm_leased: Vec<Arc<StoreClient>>,
    tcp_leased: Vec<Arc<StoreClient>>,
    shm_transports: Vec<Arc<dyn Transport>>,
    tcp_transports: Vec<Arc<dyn Transport>>,
    redis_conns: Option<Vec<RespConn>>,
    /// One read buffer per client, as large as the largest value.
    bufs: Vec<Vec<u8>>,
    results: Vec<WorkloadResult>,
    breakdowns: Vec<Breakdown>,
    redis_benchmark: Vec<(usize, Vec<RedisBenchmarkLine>)>,
}

impl<'a> Bench<'a> {
    fn new(settings: &'a VersusSettings, cluster: &'a Cluster, redis: Option<&'a RedisServer>) -> Bench<'a> {
        let largest = settings.value_sizes.iter().copied().max().unwrap_or(0);
        Bench {
            settings,
            cluster,
            redis,
            redis_failure: None,
            admin: None,
            shm: Vec::new(),
            tcp: Vec::new(),
            shm_leased: Vec::new(),
            tcp_leased: Vec::new(),
            shm_transports: Vec::new(),
            tcp_transports: Vec::new(),
            redis_conns: None,
            bufs: (0..settings.clients).map(|i| filled(largest, 40 + i as u64)).collect(),
            results: Vec::new(),
            breakdowns: Vec::new(),
            redis_benchmark: Vec::new(),
        }
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let n = self.settings.clients;
        self.admin = Some(self.cluster.client(TransportPreference::Auto)?);
        for prefer in [TransportPreference::Shm, TransportPreference::Tcp] {
            let cfg = TransportConfig { prefer, ..TransportConfig::default() };
            let clients = (0..n).map(|_| self.cluster.client(prefer)).collect::<anyhow::Result<Vec<_>>>()?;
            let leased = (0..n).map(|_| self.cluster.client_with(prefer, 0)).collect::<anyhow::Result<Vec<_>>>()?;
            let transports = (0..n)
                .map(|_| connect(self.cluster.peer(), &local_host_id(), &cfg))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("connecting a {prefer:?} transport"))?;
            match prefer {
                TransportPreference::Shm => {
                    (self.shm, self.shm_leased, self.shm_transports) = (clients, leased, transports)
                }
                _ => (self.tcp, self.tcp_leased, self.tcp_transports) = (clients, leased, transports),
            }
        }
        if let Some(server) = self.redis {
            let mut conns = Vec::with_capacity(n);
            for _ in 0..n {
                conns.push(RespConn::connect(server.port).await?);
            }
            self.redis_conns = Some(conns);
        }
        Ok(())
    }

    fn admin(&self) -> anyhow::Result<&StoreClient> {
        self.admin.as_deref().context("not connected")
    }

    async fn run_all(&mut self) -> anyhow::Result<()> {
        self.connect().await?;
        let sizes = self.settings.value_sizes.clone();
        for size in sizes {
            eprintln!("[kvstore bench]   store vs redis: {} values", tag(size));
            let set = self.populate(size).await?;
            let mut samples: Vec<Vec<Measured>> = PLAN.iter().map(|_| Vec::new()).collect();
            for rep in 0..=self.settings.reps {
                for (k, &(system, op)) in PLAN.iter().enumerate() {
                    if let Some(m) = self.one(system, op, size, rep, &set).await? {
                        if rep > 0 {
                            samples[k].push(m);
                        }
                    }
                }
            }
            for (&(system, op), runs) in PLAN.iter().zip(samples) {
                if !runs.is_empty() {
                    self.results.push(summarize(system, op, size, self.settings.clients, &runs));
                }
            }
            self.breakdown(size, &set).await?;
            if self.settings.redis_benchmark && self.redis_failure.is_none() {
                self.cross_check(size).await;
            }
            self.depopulate(&set).await?;
        }
        Ok(())
    }

    /// Stores the get set in the store and in Redis and resolves where the
    /// store put each block.
    async fn populate(&mut self, size: usize) -> anyhow::Result<GetSet> {
        let n = self.settings.get_set_len(size);
        let mut rng = SplitMix64::new(0x6e7 ^ size as u64);
        let keys: Vec<BlockKey> = (0..n).map(|_| BlockKey(rng.next_u64())).collect();
        let redis_keys: Vec<Vec<u8>> = keys.iter().map(|k| format!("g:{:016x}", k.0).into_bytes()).collect();
        let values: Vec<Vec<u8>> = (0..4).map(|i| filled(size, 50 + i)).collect();
        let admin = self.admin()?;
        for (c, chunk) in keys.chunks(ADMIN_BATCH.min((256 << 20) / size).max(1)).enumerate() {
            let items: Vec<(BlockKey, &[u8])> =
                chunk.iter().enumerate().map(|(i, k)| (*k, values[(c + i) % values.len()].as_slice())).collect();
            let outcomes = admin.put(&items).await?;
            if let Some(bad) = outcomes.iter().find(|o| **o != tandem_kvstore::client::PutOutcome::Stored) {
                bail!("populating the store: {bad:?}");
            }
        }
        let mut resolved = Vec::with_capacity(n);
        let mut master = admin.master();
        for chunk in keys.chunks(ADMIN_BATCH) {
            let req = pb::GetReplicasRequest { keys: chunk.iter().map(|k| k.0).collect(), lease_ms: 0 };
            let reply = master.get_replicas(req).await?.into_inner();
            for (key, e) in chunk.iter().zip(reply.entries) {
                let r = e.replicas.into_iter().next().filter(|_| e.found).context("a populated key is missing")?;
                resolved.push(Resolved { location: replica_from_pb(*key, r)?.location, checksum: e.checksum });
            }
            // Nothing moves these blocks (no eviction, tiering or replication
            // here), so the locations stay valid without the lease.
            master.release_lease(pb::ReleaseLeaseRequest { lease_id: reply.lease_id }).await?;
        }
        // The shipped clients have each read the whole set once (not timed):
        // the steady state of a client re-reading blocks, e.g. a prefill
        // node reusing a hot prefix. The leased clients measure first reads.
        for c in self.shm.iter().chain(&self.tcp) {
            for chunk in keys.chunks(((64 << 20) / size).max(1)) {
                let got = c.get(chunk, size).await?;
                if got.iter().any(Option::is_none) {
                    bail!("a populated key is missing");
                }
            }
        }
        if let Some(conn) = self.redis_conns.as_mut().and_then(|c| c.first_mut()) {
            for (i, k) in redis_keys.iter().enumerate() {
                conn.set(k, &values[i % values.len()]).await.context("populating redis")?;
            }
        }
        Ok(GetSet { value_bytes: size, keys, redis_keys, resolved })
    }

    async fn depopulate(&mut self, set: &GetSet) -> anyhow::Result<()> {
        for chunk in set.keys.chunks(ADMIN_BATCH) {
            self.admin()?.remove(chunk).await?;
        }
        let overwritten: Vec<Vec<u8>> = self.overwrite_keys(set.value_bytes).into_iter().flatten().collect();
        if let Some(conn) = self.redis_conns.as_mut().and_then(|c| c.first_mut()) {
            for chunk in set.redis_keys.chunks(ADMIN_BATCH).chain(overwritten.chunks(ADMIN_BATCH)) {
                conn.del(chunk).await?;
            }
        }
        Ok(())
    }

    /// The keys Redis puts overwrite, one list per client: the same in
    /// every repetition (the warm-up creates them).
    fn overwrite_keys(&self, size: usize) -> Vec<Vec<Vec<u8>>> {
        let per = self.settings.ops_per_client(size);
        (0..self.settings.clients)
            .map(|c| (0..per).map(|i| format!("o:{size}:{c}:{i}").into_bytes()).collect())
            .collect()
    }

    /// Fresh put keys, one list per client.
    fn put_keys(&self, size: usize, rep: usize, system: System) -> Vec<Vec<BlockKey>> {
        let per = self.settings.ops_per_client(size);
        let mut rng = SplitMix64::new((size as u64) << 20 ^ (rep as u64) << 8 ^ system as u64 ^ 0x9c7);
        (0..self.settings.clients).map(|_| (0..per).map(|_| BlockKey(rng.next_u64())).collect()).collect()
    }

    /// Indices into the get set, one list per client; the same lists for
    /// every system in a repetition.
    fn get_picks(&self, size: usize, rep: usize, set_len: usize) -> Vec<Vec<usize>> {
        let per = self.settings.ops_per_client(size);
        let mut rng = SplitMix64::new((size as u64) << 20 ^ (rep as u64) ^ 0x5e7);
        (0..self.settings.clients).map(|_| (0..per).map(|_| rng.below(set_len)).collect()).collect()
    }

    fn values(&self, size: usize) -> Vec<Arc<Vec<u8>>> {
        (0..self.settings.clients).map(|i| Arc::new(filled(size, 60 + i as u64))).collect()
    }

    /// One timed run of `system` doing `op`; `None` when the system is
    /// unavailable (Redis missing or failed).
    async fn one(
        &mut self,
        system: System,
        op: Op,
        size: usize,
        rep: usize,
        set: &GetSet,
    ) -> anyhow::Result<Option<Measured>> {
        if matches!(system, System::Redis | System::RedisFreshKeys) {
            if self.redis_failure.is_some() || self.redis_conns.is_none() {
                return Ok(None);
            }
            return match self.redis_one(system, op, size, rep, set).await {
                Ok(m) => Ok(Some(m)),
                Err(e) => {
                    eprintln!("[kvstore bench]   redis failed, continuing without it: {e:#}");
                    self.redis_failure = Some(format!("redis failed mid-run: {e:#}"));
                    self.redis_conns = None;
                    Ok(None)
                }
            };
        }
        let m = match (system, op) {
            (System::StoreShm | System::StoreTcp, Op::Put) => {
                let clients = if system == System::StoreShm { &self.shm } else { &self.tcp };
                let mut keys = self.put_keys(size, rep, system);
                let all: Vec<BlockKey> = keys.iter().flatten().copied().collect();
                let values = self.values(size);
                let (_, m) = workers::timed(clients.clone(), None, |i, c, b| {
                    tokio::spawn(workers::store_put(c, std::mem::take(&mut keys[i]), values[i].clone(), b))
                })
                .await?;
                self.remove(&all).await?;
                m
            }
            (System::StoreShm | System::StoreTcp | System::StoreShmLeased | System::StoreTcpLeased, Op::Get) => {
                let clients = match system {
                    System::StoreShm => &self.shm,
                    System::StoreTcp => &self.tcp,
                    System::StoreShmLeased => &self.shm_leased,
                    _ => &self.tcp_leased,
                };
                let picks = self.get_picks(size, rep, set.keys.len());
                let readers = self.readers(clients.clone());
                let (readers, m) = workers::timed(readers, None, |i, r, b| {
                    let keys = picks[i].iter().map(|&p| set.keys[p]).collect();
                    tokio::spawn(workers::store_get(r, keys, size, b))
                })
                .await?;
                self.bufs = readers.into_iter().map(|r| r.buf).collect();
                m
            }
            (System::DataPathShm | System::DataPathTcp, Op::Get) => {
                let ts = if system == System::DataPathShm { &self.shm_transports } else { &self.tcp_transports };
                let picks = self.get_picks(size, rep, set.keys.len());
                let readers = self.readers(ts.clone());
                let (readers, m) = workers::timed(readers, None, |i, r, b| {
                    let blocks = picks[i].iter().map(|&p| set.resolved[p]).collect();
                    tokio::spawn(workers::data_path_get(r, blocks, size, b))
                })
                .await?;
                self.bufs = readers.into_iter().map(|r| r.buf).collect();
                m
            }
            (System::ControlPath | System::GetReplicasOnly, Op::Get) => {
                let picks = self.get_picks(size, rep, set.keys.len());
                let release = system == System::ControlPath;
                let (_, m) = workers::timed(self.shm.clone(), None, |i, c, b| {
                    let keys = picks[i].iter().map(|&p| set.keys[p]).collect();
                    tokio::spawn(workers::control_path_get(c, keys, release, b))
                })
                .await?;
                m
            }
            (System::ControlPath, Op::Put) => {
                let mut keys = self.put_keys(size, rep, system);
                let all: Vec<BlockKey> = keys.iter().flatten().copied().collect();
                let (_, m) = workers::timed(self.shm.clone(), None, |i, c, b| {
                    tokio::spawn(workers::control_path_put(c, std::mem::take(&mut keys[i]), size, b))
                })
                .await?;
                self.remove(&all).await?;
                m
            }
            (
                System::DataPathShm
                | System::DataPathTcp
                | System::GetReplicasOnly
                | System::StoreShmLeased
                | System::StoreTcpLeased,
                Op::Put,
            )
            | (System::Redis | System::RedisFreshKeys, _) => {
                bail!("no {} {} workload", system.name(), op.name())
            }
        };
        Ok(Some(m))
    }

    async fn redis_one(
        &mut self,
        system: System,
        op: Op,
        size: usize,
        rep: usize,
        set: &GetSet,
    ) -> anyhow::Result<Measured> {
        let pid = self.redis.map(RedisServer::pid);
        let conns = self.redis_conns.take().context("redis connections lost")?;
        match op {
            Op::Put => {
                let fresh = system == System::RedisFreshKeys;
                let mut keys: Vec<Vec<Vec<u8>>> = if fresh {
                    let keys = self.put_keys(size, rep, system).into_iter();
                    keys.map(|ks| ks.iter().map(|k| format!("p:{:016x}", k.0).into_bytes()).collect()).collect()
                } else {
                    self.overwrite_keys(size)
                };
                let values = self.values(size);
                let (mut conns, m) = workers::timed(conns, pid, |i, c, b| {
                    let keys = if fresh { std::mem::take(&mut keys[i]) } else { keys[i].clone() };
                    tokio::spawn(workers::redis_set(c, keys, values[i].clone(), b))
                })
                .await?;
                if fresh {
                    for chunk in keys.iter().flatten().cloned().collect::<Vec<_>>().chunks(ADMIN_BATCH) {
                        conns[0].del(chunk).await?;
                    }
                }
                self.redis_conns = Some(conns);
                Ok(m)
            }
            Op::Get => {
                let picks = self.get_picks(size, rep, set.keys.len());
                let readers = self.readers(conns);
                let (readers, m) = workers::timed(readers, pid, |i, r, b| {
                    let keys = picks[i].iter().map(|&p| set.redis_keys[p].clone()).collect();
                    tokio::spawn(workers::redis_get(r, keys, size, b))
                })
                .await?;
                let (conns, bufs) = readers.into_iter().map(|r| (r.conn, r.buf)).unzip();
                (self.redis_conns, self.bufs) = (Some(conns), bufs);
                Ok(m)
            }
        }
    }

    /// Pairs each connection with a client's read buffer.
    fn readers<C>(&mut self, conns: Vec<C>) -> Vec<Reader<C>> {
        conns.into_iter().zip(std::mem::take(&mut self.bufs)).map(|(conn, buf)| Reader { conn, buf }).collect()
    }

    async fn remove(&self, keys: &[BlockKey]) -> anyhow::Result<()> {
        for chunk in keys.chunks(ADMIN_BATCH) {
            self.admin()?.remove(chunk).await?;
        }
        Ok(())
    }

    async fn breakdown(&mut self, size: usize, set: &GetSet) -> anyhow::Result<()> {
        for prefer in [TransportPreference::Shm, TransportPreference::Tcp] {
            eprintln!("[kvstore bench]   breakdown: {} values over {prefer:?}", tag(size));
            let input = BreakdownInput {
                cluster: self.cluster,
                prefer,
                keys: &set.keys,
                redis_keys: self.redis_conns.is_some().then_some(set.redis_keys.as_slice()),
                value_bytes: size,
                ops: self.settings.breakdown_ops,
                seed: size as u64 ^ 0xb7,
            };
            let conn = self.redis_conns.as_mut().and_then(|c| c.first_mut());
            self.breakdowns.push(breakdown::measure(input, conn).await?);
        }
        Ok(())
    }

    /// `redis-benchmark` with the same clients and value size; a failure is
    /// reported on stderr and leaves the cross-check out.
    async fn cross_check(&mut self, size: usize) {
        let Some(server) = self.redis else { return };
        let (port, clients) = (server.port, self.settings.clients);
        let requests = (self.settings.redis_benchmark_bytes / size).max(clients * 4);
        let result = tokio::task::spawn_blocking(move || redis_benchmark(port, clients, requests, size))
            .await
            .map_err(Into::into);
        match result.and_then(|r| r) {
            Ok(lines) => self.redis_benchmark.push((size, lines)),
            Err(e) => eprintln!("[kvstore bench]   redis-benchmark cross-check skipped: {e:#}"),
        }
    }
}

fn tag(size: usize) -> String {
    size_tag(size).to_uppercase()
}

fn summarize(system: System, op: Op, size: usize, clients: usize, runs: &[Measured]) -> WorkloadResult {
    let ops_per_s: Vec<f64> = runs.iter().map(|m| m.ops as f64 / m.secs.max(1e-9)).collect();
    let p50: Vec<f64> = runs.iter().map(|m| percentile(&m.lat_us, 0.5)).collect();
    let p99: Vec<f64> = runs.iter().map(|m| percentile(&m.lat_us, 0.99)).collect();
    let cpu: Vec<f64> = runs.iter().map(|m| m.cpu_secs * 1e6 / m.ops.max(1) as f64).collect();
    let ops = median(&ops_per_s);
    let all: usize = runs.iter().map(|m| m.lat_us.len()).sum();
    let stalled = runs.iter().flat_map(|m| &m.lat_us).filter(|&&l| (38_000.0..48_000.0).contains(&l)).count();
    WorkloadResult {
        system: system.name(),
        op: op.name(),
        value_bytes: size,
        clients,
        ops_per_rep: runs.first().map_or(0, |m| m.ops),
        ops_per_s: ops,
        gbps: gbps((ops * size as f64) as u64, 1.0),
        p50_us: median(&p50),
        p99_us: median(&p99),
        cpu_us_per_op: median(&cpu),
        delayed_ack_stall_share: stalled as f64 / all.max(1) as f64,
        runs_ops_per_s: ops_per_s,
        runs_p50_us: p50,
        runs_p99_us: p99,
        runs_cpu_us_per_op: cpu,
    }
}
