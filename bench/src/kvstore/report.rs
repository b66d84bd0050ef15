//! The bench's report: one ratio per line item (with its target where there
//! is one), the raw numbers behind them, the machine and the settings — as
//! a printed table and as JSON.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};
use tandem_kvstore::policy::PolicyKind;
use tandem_kvstore::transport::ShmConfig;

use super::eviction::{EvictionResult, SSD_FACTOR};
use super::sys::{size_tag, thp_settings};
use super::tcp::TcpResult;
use super::versus::{Op, System, VersusResult};
use super::{KvBenchConfig, Outcome, Settings};
use crate::stats;

/// shm transport vs memcpy, reads and writes.
const SHM_TARGET: f64 = 0.7;
/// tcp transport reads vs raw tcp.
const TCP_TARGET: f64 = 0.8;
/// Store gets vs Redis gets over shm.
const GET_SHM_TARGET: f64 = 3.0;
/// Store gets vs Redis gets over tcp.
const GET_TCP_TARGET: f64 = 1.0;

/// One line of the ratio table.
#[derive(Debug, Clone)]
struct Item {
    key: String,
    value: f64,
    target: Option<f64>,
    /// Context printed beside the value (e.g. the stripes used).
    detail: String,
}

impl Item {
    fn met(&self) -> Option<bool> {
        self.target.map(|t| self.value >= t)
    }
}

pub use crate::stats::Report;

/// The report of a finished run.
pub(crate) fn build(cfg: &KvBenchConfig, settings: &Settings, out: Outcome) -> Report {
    let mut items = Vec::new();
    if let Some(points) = &out.shm {
        shm_items(points, &mut items);
    }
    if let Some(tcp) = &out.tcp {
        tcp_items(tcp, settings, &mut items);
    }
    if let Some(v) = &out.versus {
        versus_items(v, settings, &mut items);
    }
    let checks = out.eviction.as_ref().map(|e| {
        vec![
            ("lru_reproduces_readme", e.lru_reproduces_readme),
            ("belady_reproduces_readme", e.belady_reproduces_readme),
            ("ideal_reproduces_readme", e.ideal_reproduces_readme),
        ]
    });
    let targeted: Vec<&Item> = items.iter().filter(|i| i.target.is_some()).collect();
    let targets_met = targeted.iter().filter(|i| i.met() == Some(true)).count()
        + checks.iter().flatten().filter(|(_, ok)| *ok).count();
    let targets_total = targeted.len() + checks.as_ref().map_or(0, Vec::len);

    let mut notes = out.notes.clone();
    notes.extend(standard_notes(&out));
    let table = render(cfg, &out, &items, checks.as_deref(), targets_met, targets_total);
    let json = to_json(cfg, settings, &out, &items, checks.as_deref(), (targets_met, targets_total), notes);
    Report {
        json,
        table,
        failed_stages: out.errors.iter().map(|(s, _)| s.to_string()).collect(),
        targets_met,
        targets_total,
        file_name: "kvstore.json",
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

fn shm_items(points: &[super::shm::ShmPoint], items: &mut Vec<Item>) {
    for p in points {
        let t = size_tag(p.block_bytes);
        let base = p.memcpy_gbps;
        let detail = |gbps: f64| format!("{gbps:.2} vs {base:.2} GB/s");
        items.extend([
            Item {
                key: format!("shm_read_vs_memcpy_{t}"),
                value: ratio(p.read_gbps, base),
                target: Some(SHM_TARGET),
                detail: detail(p.read_gbps),
            },
            Item {
                key: format!("shm_write_vs_memcpy_{t}"),
                value: ratio(p.write_gbps, base),
                target: Some(SHM_TARGET),
                detail: detail(p.write_gbps),
            },
            Item {
                key: format!("shm_read_default_config_vs_memcpy_{t}"),
                value: ratio(p.read_default_config_gbps, base),
                target: None,
                detail: detail(p.read_default_config_gbps),
            },
            Item {
                key: format!("shm_write_default_config_vs_memcpy_{t}"),
                value: ratio(p.write_default_config_gbps, base),
                target: None,
                detail: detail(p.write_default_config_gbps),
            },
            Item {
                key: format!("shm_read_into_malloc_offset_buffer_vs_memcpy_{t}"),
                value: ratio(p.read_malloc_offset_gbps, base),
                target: None,
                detail: format!(
                    "{:.2} vs {base:.2} GB/s; memcpy at that offset {:.2}",
                    p.read_malloc_offset_gbps, p.memcpy_malloc_offset_gbps
                ),
            },
        ]);
    }
}

fn tcp_items(tcp: &TcpResult, settings: &Settings, items: &mut Vec<Item>) {
    let (recv, send) = (tcp.raw_recv_gbps, tcp.raw_send_gbps);
    let default_buffers = settings.tcp.socket_buffers.first().copied().unwrap_or(0);
    for &block in &settings.tcp.block_sizes {
        let t = size_tag(block);
        if let Some(best) = tcp.best_read(block, default_buffers) {
            items.push(Item {
                key: format!("tcp_read_vs_raw_tcp_{t}"),
                value: ratio(best.read_gbps, recv),
                target: Some(TCP_TARGET),
                detail: format!("{:.2} vs {recv:.2} GB/s, best of stripes: {}", best.read_gbps, best.stripes),
            });
        }
        if let Some(best) = tcp.best_write(block, default_buffers) {
            items.push(Item {
                key: format!("tcp_write_vs_raw_tcp_{t}"),
                value: ratio(best.write_gbps, send),
                target: None,
                detail: format!("{:.2} vs {send:.2} GB/s, best of stripes: {}", best.write_gbps, best.stripes),
            });
        }
        for &buffers in &settings.tcp.socket_buffers {
            let suffix = if buffers == default_buffers { String::new() } else { buffer_tag(buffers) };
            if buffers != default_buffers {
                if let Some(best) = tcp.best_read(block, buffers) {
                    items.push(Item {
                        key: format!("tcp_read_vs_raw_tcp_{t}{suffix}"),
                        value: ratio(best.read_gbps, recv),
                        target: None,
                        detail: format!("{:.2} GB/s, best of stripes: {}", best.read_gbps, best.stripes),
                    });
                }
            }
            for run in tcp.runs_of(block, buffers) {
                items.push(Item {
                    key: format!("tcp_read_vs_raw_tcp_{t}_stripes_{}{suffix}", run.stripes),
                    value: ratio(run.read_gbps, recv),
                    target: None,
                    detail: format!("{:.2} GB/s; write {:.2} GB/s", run.read_gbps, run.write_gbps),
                });
            }
        }
    }
}

/// Key suffix of a non-default socket buffer setting.
fn buffer_tag(bytes: u64) -> String {
    if bytes == 0 {
        "_autotuned_buffers".to_owned()
    } else {
        format!("_buffers_{}", size_tag(bytes as usize))
    }
}

fn versus_items(v: &VersusResult, settings: &Settings, items: &mut Vec<Item>) {
    for &size in &settings.versus.value_sizes {
        let t = size_tag(size);
        for op in [Op::Get, Op::Put] {
            for (system, tname) in [(System::StoreShm, "shm"), (System::StoreTcp, "tcp")] {
                // Against the faster Redis variant (puts: overwriting or fresh keys).
                let redis = [System::Redis, System::RedisFreshKeys]
                    .iter()
                    .filter_map(|&r| v.find(r, op, size))
                    .max_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
                let (Some(store), Some(redis)) = (v.find(system, op, size), redis) else {
                    continue;
                };
                let target = match (op, system) {
                    (Op::Get, System::StoreShm) => Some(GET_SHM_TARGET),
                    (Op::Get, _) => Some(GET_TCP_TARGET),
                    _ => None,
                };
                items.push(Item {
                    key: format!("{}_vs_redis_{tname}_{t}", op.name()),
                    value: ratio(store.ops_per_s, redis.ops_per_s),
                    target,
                    detail: format!(
                        "{:.0} vs {:.0} op/s ({}); p50 {:.0} vs {:.0} us, p99 {:.0} vs {:.0} us",
                        store.ops_per_s,
                        redis.ops_per_s,
                        redis.system,
                        store.p50_us,
                        redis.p50_us,
                        store.p99_us,
                        redis.p99_us
                    ),
                });
            }
        }
        for (system, tname) in [(System::StoreShmLeased, "shm"), (System::StoreTcpLeased, "tcp")] {
            if let (Some(store), Some(redis)) = (v.find(system, Op::Get, size), v.find(System::Redis, Op::Get, size)) {
                items.push(Item {
                    key: format!("get_leased_vs_redis_{tname}_{t}"),
                    value: ratio(store.ops_per_s, redis.ops_per_s),
                    target: None,
                    detail: format!(
                        "{:.0} vs {:.0} op/s: first reads (no known location: GetReplicas under a lease each time)",
                        store.ops_per_s, redis.ops_per_s
                    ),
                });
            }
        }
        if let (Some(c), Some(r)) = (v.find(System::ControlPath, Op::Get, size), v.find(System::Redis, Op::Get, size)) {
            items.push(Item {
                key: format!("store_control_path_only_get_vs_redis_{t}"),
                value: ratio(c.ops_per_s, r.ops_per_s),
                target: None,
                detail: format!(
                    "{:.0} vs {:.0} op/s: the master round trips alone, no bytes",
                    c.ops_per_s, r.ops_per_s
                ),
            });
        }
        for (system, data, tname) in
            [(System::StoreShm, System::DataPathShm, "shm"), (System::StoreTcp, System::DataPathTcp, "tcp")]
        {
            if let (Some(full), Some(data)) = (v.find(system, Op::Get, size), v.find(data, Op::Get, size)) {
                items.push(Item {
                    key: format!("store_get_vs_data_path_only_{tname}_{t}"),
                    value: ratio(full.ops_per_s, data.ops_per_s),
                    target: None,
                    detail: format!("{:.0} vs {:.0} op/s", full.ops_per_s, data.ops_per_s),
                });
            }
        }
    }
}

fn standard_notes(out: &Outcome) -> Vec<String> {
    let mut notes = vec![
        "Every ratio divides a median over repetitions by a baseline median measured in the same run; \
         each repetition of a system runs right after its baseline's."
            .to_owned(),
        "shm: headline ratios use copy_threads = 1, like for like with the single-threaded memcpy loop; \
         *_default_config_* use the store's default ShmConfig (see settings.shm_default_config). Segment \
         offsets and buffers are page-aligned on both sides; *_into_malloc_offset_buffer_* reads into a buffer \
         16 bytes into a page (where glibc malloc puts large allocations), where glibc's memcpy itself can be \
         several times slower ((dst - src) mod 4096 in 1..64 defeats rep movsb on some AMD CPUs)."
            .to_owned(),
        "tcp: the raw baseline is the faster of a blocking-socket pair on two threads and a tokio pair, \
         one connection, 4 MiB writes, read_exact into a buffer; the data server runs in this process."
            .to_owned(),
    ];
    if out.versus.is_some() {
        notes.push(
            "store vs redis: the store's master, storage node and clients all run in this process (one tokio \
             runtime); redis-server is a separate process. Redis is driven by this bench's own RESP client \
             (one outstanding request per connection, no pipelining), the same task shape as the store clients; \
             redis-benchmark figures are a cross-check only. CPU per op counts this process plus redis-server. \
             Store puts write fresh keys into DRAM the node has already touched; `redis` puts overwrite keys \
             (memory Redis already has), `redis_fresh_keys` puts new keys; put ratios use the faster of the two."
                .to_owned(),
        );
        notes.push(
            "store gets: store_shm/store_tcp are the client as shipped; it remembers the locations of blocks \
             it has read or written (bounded, ClientConfig::location_cache_blocks) and reads them again without \
             the master, validating the bytes by the block's checksum (a stale location falls back to a leased \
             read). Each of these clients read the whole get set once before the timed runs (untimed). \
             store_*_leased clients have the cache off: every get is GetReplicas under a lease + the transfer \
             (+ ReleaseLease off the caller's path), the cost of a block's first read by a client."
                .to_owned(),
        );
        notes.push(
            "store_*_data_path_only = transport read + checksum with locations resolved beforehand (no master); \
             store_control_path_only = the two master round trips of each call (GetReplicas+ReleaseLease, \
             PutStart+PutEnd, both awaited) without moving bytes; store_get_replicas_only = GetReplicas alone. \
             The breakdown times each phase with one client; ReleaseLease is timed as its own round trip even \
             where the client sends it off the caller's path."
                .to_owned(),
        );
    }
    let stalled: Vec<String> = out
        .versus
        .iter()
        .flat_map(|v| &v.workloads)
        .filter(|w| w.system.starts_with("store") && w.delayed_ack_stall_share > 0.25)
        .map(|w| format!("{} {} {}", w.system, w.op, size_tag(w.value_bytes)))
        .collect();
    if !stalled.is_empty() {
        notes.push(format!(
            "Most operations of {} took 38-48 ms: stalls on the 40 ms delayed-ACK timer, the signature of \
             Nagle's algorithm on a socket without TCP_NODELAY. The master's gRPC server accepts through \
             serve_with_incoming_shutdown(TcpListenerStream), for which tonic ignores tcp_nodelay.",
            stalled.join(", ")
        ));
    }
    notes
}

fn round(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1e4).round() / 1e4)
    } else {
        Value::Null
    }
}

fn to_json(
    cfg: &KvBenchConfig,
    settings: &Settings,
    out: &Outcome,
    items: &[Item],
    checks: Option<&[(&str, bool)]>,
    (met, total): (usize, usize),
    notes: Vec<String>,
) -> Value {
    let mut ratios = Map::new();
    let mut targets = Map::new();
    for i in items {
        ratios.insert(i.key.clone(), round(i.value));
        if let (Some(t), Some(ok)) = (i.target, i.met()) {
            targets.insert(i.key.clone(), json!({ "target": t, "value": round(i.value), "met": ok }));
        }
    }
    let mut check_map = Map::new();
    for (k, ok) in checks.unwrap_or_default() {
        check_map.insert((*k).to_owned(), json!(ok));
    }
    let mut machine = stats::machine();
    if let Value::Object(m) = &mut machine {
        m.insert("transparent_hugepages".into(), thp_settings());
        m.insert("load_average_before".into(), json!(out.load_before));
        m.insert("load_average_after".into(), json!(out.load_after));
        m.insert("machine_busy_cpu_secs".into(), json!(out.machine_busy_cpu_secs.map(round)));
        m.insert("bench_cpu_secs_with_children".into(), round(out.bench_cpu_secs));
        m.insert("redis_server_cpu_secs".into(), json!(out.versus.as_ref().and_then(|v| v.redis_cpu_secs).map(round)));
        m.insert("other_processes_cpu_secs".into(), json!(out.other_cpu_secs.map(round)));
    }
    let errors: Map<String, Value> = out.errors.iter().map(|(s, e)| ((*s).to_owned(), json!(e))).collect();
    json!({
        "bench": "kvstore",
        "mode": if cfg.quick { "quick" } else { "full" },
        "ratios": ratios,
        "targets": targets,
        "checks": check_map,
        "targets_met": met,
        "targets_total": total,
        "errors": errors,
        "shm": out.shm.as_ref().map(|p| json!({
            "settings": settings.shm,
            "shm_default_config": ShmConfig::default(),
            "points": p,
        })),
        "tcp": out.tcp.as_ref().map(|t| json!({ "settings": settings.tcp, "result": t })),
        "store_vs_redis": out.versus.as_ref().map(|v| json!({
            "settings": settings.versus,
            "redis_client": "own RESP client, one outstanding request per connection, no pipelining",
            "store_processes": "in-process: master, one storage node and clients share this process",
            "result": v,
        })),
        "eviction": out.eviction.as_ref().map(|e| json!(e)),
        "machine": machine,
        "settings": {
            "quick": cfg.quick,
            "clients": settings.versus.clients,
            "shm_dir": out.shm_dir.display().to_string(),
            "trace": stats::repo_relative(&cfg.trace),
            "tokio_worker_threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "seconds": round(out.secs),
        },
        "notes": notes,
    })
}

fn render(
    cfg: &KvBenchConfig,
    out: &Outcome,
    items: &[Item],
    checks: Option<&[(&str, bool)]>,
    met: usize,
    total: usize,
) -> String {
    let mut s = String::new();
    let load = |l: Option<[f64; 3]>| l.map_or("?".to_owned(), |l| format!("{:.2}", l[0]));
    let other = out.other_cpu_secs.map_or("?".to_owned(), |o| format!("{o:.1}"));
    let _ = writeln!(
        s,
        "kvstore bench ({}), {:.0} s, load {} -> {} (1 min), other processes' CPU {} s, segments in {}",
        if cfg.quick { "quick" } else { "full" },
        out.secs,
        load(out.load_before),
        load(out.load_after),
        other,
        out.shm_dir.display()
    );
    let _ = writeln!(s, "\n{:<44} {:>7}  {:>7}  {:<4} details", "ratio", "value", "target", "met");
    for i in items {
        let target = i.target.map_or(String::new(), |t| format!(">= {t}"));
        let met = match i.met() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        let _ = writeln!(s, "{:<44} {:>7.3}  {:>7}  {:<4} {}", i.key, i.value, target, met, i.detail);
    }
    if let Some(tcp) = &out.tcp {
        let _ = writeln!(
            s,
            "\nraw tcp on loopback, batch-sized buffers: receive {:.2} GB/s (std {:.2}, tokio {:.2}), send {:.2} GB/s \
             (std {:.2}, tokio {:.2}); receive into one cache-resident 4 MiB buffer: {:.2} GB/s",
            tcp.raw_recv_gbps,
            tcp.raw_std_recv_gbps,
            tcp.raw_tokio_recv_gbps,
            tcp.raw_send_gbps,
            tcp.raw_std_send_gbps,
            tcp.raw_tokio_send_gbps,
            tcp.raw_std_recv_cache_resident_gbps
        );
    }
    if let Some(v) = &out.versus {
        render_versus(&mut s, v);
    }
    if let Some(e) = &out.eviction {
        render_eviction(&mut s, e);
    }
    for (k, ok) in checks.unwrap_or_default() {
        let _ = writeln!(s, "{k:<44} {}", if *ok { "yes" } else { "NO" });
    }
    for (stage, e) in &out.errors {
        let _ = writeln!(s, "stage {stage} FAILED: {e}");
    }
    let _ = writeln!(s, "\ntargets met: {met} of {total}");
    s
}

fn render_versus(s: &mut String, v: &VersusResult) {
    if let Some(why) = &v.redis_unavailable {
        let _ = writeln!(s, "\nredis unavailable: {why}");
    }
    let _ = writeln!(
        s,
        "\n{:<26} {:<4} {:>5} {:>9} {:>7} {:>8} {:>8} {:>9}",
        "system", "op", "value", "op/s", "GB/s", "p50 us", "p99 us", "cpu us/op"
    );
    for w in &v.workloads {
        let _ = writeln!(
            s,
            "{:<26} {:<4} {:>5} {:>9.0} {:>7.2} {:>8.0} {:>8.0} {:>9.0}",
            w.system,
            w.op,
            size_tag(w.value_bytes),
            w.ops_per_s,
            w.gbps,
            w.p50_us,
            w.p99_us,
            w.cpu_us_per_op
        );
    }
    let _ = writeln!(s, "\none client, median us per phase:");
    for b in &v.breakdown {
        let redis = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.0}"));
        let _ = writeln!(
            s,
            "  {} {:>4}: get = GetReplicas {:.0} + transfer {:.0} + checksum {:.0} + ReleaseLease {:.0} \
             (master {:.0}%; client {:.0}, redis {}); null rpc {:.0}, tcp ping {:.0}, redis ping {}",
            b.transport,
            size_tag(b.value_bytes),
            b.get.get_replicas_us,
            b.get.transfer_us,
            b.get.checksum_us,
            b.get.release_lease_us,
            b.get.master_share * 100.0,
            b.get.client_get_into_us,
            redis(b.get.redis_get_us),
            b.null_rpc_us,
            b.tcp_ping_us,
            redis(b.redis_ping_us)
        );
        let _ = writeln!(
            s,
            "  {} {:>4}: put = PutStart {:.0} + transfer {:.0} + checksum {:.0} + PutEnd {:.0} \
             (master {:.0}%; client {:.0}, redis {})",
            b.transport,
            size_tag(b.value_bytes),
            b.put.put_start_us,
            b.put.transfer_us,
            b.put.checksum_us,
            b.put.put_end_us,
            b.put.master_share * 100.0,
            b.put.client_put_us,
            redis(b.put.redis_set_us)
        );
    }
    for (size, lines) in &v.redis_benchmark {
        for l in lines {
            let _ = writeln!(
                s,
                "redis-benchmark {} {:>4}: {:.0} op/s ({:.2} GB/s), p50 {:.0} us, p99 {:.0} us",
                l.test,
                size_tag(*size),
                l.ops_per_s,
                l.gbps,
                l.p50_us,
                l.p99_us
            );
        }
    }
}

fn render_eviction(s: &mut String, e: &EvictionResult) {
    let _ = writeln!(
        s,
        "\neviction hit ratios ({} requests, {} refs, {} unique blocks); ideal {:.3} (README {:.3})",
        e.requests, e.block_refs, e.unique_blocks, e.ideal, e.readme_ideal
    );
    let _ = writeln!(s, "{:<10} {:>8} {:>9} {:>15}", "policy", "blocks", "DRAM", format!("+SSD {SSD_FACTOR}x"));
    for c in &e.ceilings {
        for &kind in PolicyKind::ALL {
            let get = |tiered| e.point(kind, c.dram_blocks, tiered).map_or(f64::NAN, |p| p.hit_ratio);
            let _ = writeln!(s, "{:<10} {:>8} {:>9.3} {:>15.3}", kind.name(), c.dram_blocks, get(false), get(true));
        }
        let _ = writeln!(s, "{:<10} {:>8} {:>9.3} {:>15.3}", "belady", c.dram_blocks, c.belady, c.belady_tiered);
        let _ = writeln!(
            s,
            "{:<10} {:>8} {:>9} {:>15}   (lru here - README: {:+.4})",
            "README",
            c.dram_blocks,
            format!("lru {:.3}", c.readme_lru),
            format!("belady {:.3}", c.readme_belady),
            c.lru_minus_readme
        );
    }
}
