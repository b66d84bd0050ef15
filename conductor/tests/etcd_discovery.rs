//! etcd discovery against a real etcd: `/usr/bin/etcd` from Debian's
//! `etcd-server` (installed by `./scripts/setup.sh`), one child process per
//! test on free loopback ports. Covers the watch's snapshot and events,
//! revocation, lease expiry, malformed entries, an etcd that restarts empty,
//! and the error when no etcd answers.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_conductor::discovery::{self, DiscoveryConfig, Member, MembershipEvent};
use tokio::sync::mpsc::Receiver;

const ETCD: &str = "/usr/bin/etcd";
/// Bound on anything a test waits for; generous, so never the reason a
/// correct implementation fails.
const PATIENCE: Duration = Duration::from_secs(30);

/// An etcd child process, SIGKILLed when dropped.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// Data directories used so far (a restart with a fresh one loses everything).
    generation: u32,
}

impl Etcd {
    async fn start() -> Etcd {
        init_logs();
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} not found: run ./scripts/setup.sh (it installs the Debian package etcd-server)"
        );
        // Both listeners open at once, so the two ports differ.
        let (client, peer) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
        let (client_port, peer_port) = (client.local_addr().unwrap().port(), peer.local_addr().unwrap().port());
        drop((client, peer));
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = Etcd { child: None, dir, client_port, peer_port, generation: 0 };
        etcd.spawn_fresh().await;
        etcd
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn config(&self, lease_ttl_s: u64) -> DiscoveryConfig {
        DiscoveryConfig { etcd: vec![self.url()], lease_ttl_s, ..Default::default() }
    }

    /// Starts etcd on a new, empty data directory and waits until it answers.
    async fn spawn_fresh(&mut self) {
        self.generation += 1;
        let log = self.dir.path().join("etcd.log");
        let log = File::options().create(true).append(true).open(log).unwrap();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(ETCD)
            .args(["--name", "default"])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("data-{}", self.generation)))
            .args(["--listen-client-urls", &self.url(), "--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD}: {e}"));
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("etcd exited ({status}) before answering:\n{}", self.log());
            }
            if self.answers().await {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not answer within {PATIENCE:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers(&self) -> bool {
        let options = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
        let probe = async {
            let mut client = etcd_client::Client::connect([self.url()], Some(options)).await?;
            client.get("probe", None).await
        };
        matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Ok(_)))
    }

    /// A raw client, for what a member would never write.
    async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], None).await.unwrap()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Discovery's logs, shown with a failing test's output.
fn init_logs() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_max_level(tracing::Level::INFO).try_init();
}

fn member(name: &str, role: &str, port: u16) -> Member {
    Member { name: name.into(), role: role.into(), addr: SocketAddr::from(([127, 0, 0, 1], port)) }
}

async fn next_event(rx: &mut Receiver<MembershipEvent>) -> MembershipEvent {
    match tokio::time::timeout(PATIENCE, rx.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("the watch ended"),
        Err(_) => panic!("no membership event within {PATIENCE:?}"),
    }
}

fn view_of(members: Vec<Member>) -> BTreeMap<String, Member> {
    members.into_iter().map(|m| (m.name.clone(), m)).collect()
}

/// Applies events to `view` until it holds exactly `want`.
async fn converge(rx: &mut Receiver<MembershipEvent>, view: &mut BTreeMap<String, Member>, want: &[&Member]) {
    let want: BTreeMap<String, Member> = want.iter().map(|m| (m.name.clone(), (*m).clone())).collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while *view != want {
        let event = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("view {:?} did not converge to {:?}", view.keys(), want.keys()),
        };
        match event {
            MembershipEvent::Joined(m) => view.insert(m.name.clone(), m),
            MembershipEvent::Left { name } => view.remove(&name),
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_joined_and_left_events() {
    let etcd = Etcd::start().await;
    let cfg = etcd.config(5);
    let (prefill, decode0, decode1) =
        (member("prefill-0", "prefill", 9000), member("decode-0", "decode", 9100), member("decode-1", "decode", 9101));
    let prefill_reg = discovery::register(&cfg, &prefill).await.unwrap();
    let _decode0_reg = discovery::register(&cfg, &decode0).await.unwrap();

    let (snapshot, mut rx) = discovery::watch(&cfg).await.unwrap();
    assert_eq!(snapshot, vec![decode0.clone(), prefill.clone()]);

    let _decode1_reg = discovery::register(&cfg, &decode1).await.unwrap();
    assert_eq!(next_event(&mut rx).await, MembershipEvent::Joined(decode1));

    prefill_reg.revoke().await.unwrap();
    assert_eq!(next_event(&mut rx).await, MembershipEvent::Left { name: "prefill-0".into() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_lease_is_kept_and_dropped_one_expires() {
    let etcd = Etcd::start().await;
    let cfg = etcd.config(2);
    let decode = member("decode-0", "decode", 9100);
    let registration = discovery::register(&cfg, &decode).await.unwrap();
    let (snapshot, mut rx) = discovery::watch(&cfg).await.unwrap();
    assert_eq!(snapshot, vec![decode]);

    // Kept alive well past its TTL while registered.
    let quiet = tokio::time::timeout(Duration::from_secs(3 * cfg.lease_ttl_s), rx.recv()).await;
    assert!(quiet.is_err(), "a live registration changed: {quiet:?}");

    // Dropped without revoking: gone once the lease runs out.
    drop(registration);
    assert_eq!(next_event(&mut rx).await, MembershipEvent::Left { name: "decode-0".into() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_skipped() {
    let etcd = Etcd::start().await;
    let cfg = etcd.config(5);
    let members = "/tandem/members/";
    let stranger = serde_json::to_string(&member("other", "decode", 1)).unwrap();
    let mut raw = etcd.client().await;
    raw.put(format!("{members}garbage"), "{not json", None).await.unwrap();
    raw.put(format!("{members}wrong-name"), stranger.as_str(), None).await.unwrap();
    raw.put(format!("{members}bad name!"), "{}", None).await.unwrap();
    raw.put(format!("{members}{}", "x".repeat(4096)), stranger.as_str(), None).await.unwrap();
    raw.put(format!("{members}huge"), "x".repeat(100_000), None).await.unwrap();

    let good = member("decode-0", "decode", 9100);
    let _good_reg = discovery::register(&cfg, &good).await.unwrap();
    let (snapshot, mut rx) = discovery::watch(&cfg).await.unwrap();
    assert_eq!(snapshot, vec![good.clone()]);

    // Malformed puts seen by the watch are skipped too; the watch lives on.
    raw.put(format!("{members}late"), "[1, 2", None).await.unwrap();
    let late = member("decode-1", "decode", 9101);
    let _late_reg = discovery::register(&cfg, &late).await.unwrap();
    assert_eq!(next_event(&mut rx).await, MembershipEvent::Joined(late));

    // A member whose entry becomes unreadable has left, as a re-list would say.
    raw.put(format!("{members}decode-0"), "garbage", None).await.unwrap();
    assert_eq!(next_event(&mut rx).await, MembershipEvent::Left { name: "decode-0".into() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_converge_after_etcd_restarts_empty() {
    let mut etcd = Etcd::start().await;
    let cfg = etcd.config(2);
    let (kept, dropped, late) =
        (member("decode-0", "decode", 9100), member("decode-1", "decode", 9101), member("prefill-0", "prefill", 9000));
    let _kept_reg = discovery::register(&cfg, &kept).await.unwrap();
    let dropped_reg = discovery::register(&cfg, &dropped).await.unwrap();
    let (snapshot, mut rx) = discovery::watch(&cfg).await.unwrap();
    let mut view = view_of(snapshot);
    assert_eq!(view.len(), 2);

    // etcd loses everything; `kept` must re-grant and re-put, the watch must
    // re-list, and `dropped` (which can no longer renew) must not come back.
    etcd.kill();
    drop(dropped_reg);
    etcd.spawn_fresh().await;
    converge(&mut rx, &mut view, &[&kept]).await;

    // The watch is live again.
    let _late_reg = discovery::register(&cfg, &late).await.unwrap();
    converge(&mut rx, &mut view, &[&kept, &late]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_without_etcd_fails_fast_and_names_the_endpoint() {
    init_logs();
    // A port with nothing listening.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = DiscoveryConfig { etcd: vec![format!("http://127.0.0.1:{port}")], ..Default::default() };

    let started = Instant::now();
    let err = discovery::register(&cfg, &member("decode-0", "decode", 9100)).await.unwrap_err();
    let elapsed = started.elapsed();
    let message = format!("{err:#}");
    assert!(message.contains(&cfg.etcd[0]), "{message}");
    assert!(message.to_lowercase().contains("connection refused"), "{message}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}: {message}");

    let err = discovery::watch(&cfg).await.unwrap_err();
    assert!(format!("{err:#}").contains(&cfg.etcd[0]), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_against_a_silent_endpoint_times_out() {
    init_logs();
    // Accepts TCP connections (the kernel's backlog does) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = DiscoveryConfig { etcd: vec![format!("http://{}", silent.local_addr().unwrap())], ..Default::default() };

    let started = Instant::now();
    let err = discovery::register(&cfg, &member("decode-0", "decode", 9100)).await.unwrap_err();
    let elapsed = started.elapsed();
    let message = format!("{err:#}");
    assert!(message.contains(&cfg.etcd[0]) && message.contains("no answer"), "{message}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}: {message}");
}

mod common;

/// The whole path: workers of a cluster file with `[discovery]` register in
/// a real etcd, the conductor (with no static worker list) finds them
/// there and serves requests through them; `tandem ctl nodes` shows them as
/// discovered.
#[test]
fn workers_found_through_etcd_serve_requests() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(Etcd::start());
    let dir = tempfile::tempdir().unwrap();
    let discovery = format!("\n[discovery]\netcd = [\"{}\"]\nlease_ttl_s = 2\n", etcd.url());
    let cfg = common::http::cluster_file(dir.path(), 1, 1, &discovery);
    let up = common::http::Up::start(&cfg, &dir.path().join("logs"));
    let body = serde_json::json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    let r = common::http::post(up.http, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("ctl")
        .arg("--config")
        .arg(&cfg)
        .args(["nodes", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{v}");
    assert!(nodes.iter().all(|n| n["discovered"] == true), "{v}");
    // The registrations are in etcd under the prefix.
    let members = rt.block_on(async { discovery::watch(&etcd.config(2)).await.unwrap().0 });
    let mut names: Vec<String> = members.into_iter().map(|m| m.name).collect();
    names.sort();
    assert_eq!(names, ["decode-0", "prefill-0"]);
}
