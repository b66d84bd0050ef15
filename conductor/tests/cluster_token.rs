//! The cluster token (`[auth] cluster_token_file` / `cluster_token_env`) on
//! a real loopback cluster (`tandem up --config`): the cluster answers a
//! prompt with every internal call carrying the token; a tonic client
//! without it, or with a wrong one, calling the store master, the storage
//! node, the prefill or the decode worker directly gets `UNAUTHENTICATED`;
//! a storage node started with a wrong token is refused by the master and
//! says so; and a named variable that is unset or a short token stops the
//! process at start.

use serde_json::json;
use std::path::Path;
use tandem_conductor::cli::cluster::ClusterConfig;
use tandem_proto::cluster_token::{authed, AuthChannel, ClusterToken};
use tandem_proto::kvstore as kv;
use tandem_proto::kvstore::master_client::MasterClient;
use tandem_proto::kvstore::storage_node_client::StorageNodeClient;
use tandem_proto::worker as pb;
use tandem_proto::worker::decode_client::DecodeClient;
use tandem_proto::worker::prefill_client::PrefillClient;

mod common;
use common::http::{cluster_file, free_ports, post, Up};
use common::procs::block_on;
use common::{spawn_until, tandem};

const TOKEN: &str = "test-cluster-token-0123456789";
const WRONG: &str = "test-cluster-token-012345678X";

fn check_config(cfg: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.args(["check-config", "--config"]).arg(cfg).env_remove("TANDEM_TEST_CLUSTER_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn channel(addr: std::net::SocketAddr, token: Option<&str>) -> AuthChannel {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    authed(ch, token.map(|t| ClusterToken::new(t).unwrap()).as_ref())
}

/// The code each internal service answers a cheap call with.
async fn codes(cfg: &ClusterConfig, token: Option<&str>) -> Vec<(&'static str, tonic::Code)> {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(tonic::Code::Ok, |e| e.code());
    let master =
        MasterClient::new(channel(cfg.kvstore.master.listen, token)).stats(kv::StatsRequest {}).await.map(drop);
    let node = StorageNodeClient::new(channel(cfg.kvstore.storage[0].listen, token))
        .node_stats(kv::NodeStatsRequest {})
        .await
        .map(drop);
    let prefill =
        PrefillClient::new(channel(cfg.prefill[0].listen, token)).status(pb::StatusRequest {}).await.map(drop);
    let decode = DecodeClient::new(channel(cfg.decode[0].listen, token)).status(pb::StatusRequest {}).await.map(drop);
    vec![("master", code(master)), ("storage", code(node)), ("prefill", code(prefill)), ("decode", code(decode))]
}

#[test]
fn a_cluster_with_a_token_serves_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cluster_file(dir.path(), 1, 1, "");
    let base = std::fs::read_to_string(&cfg).unwrap();

    // A named variable that is unset, or a short token: a clear error at start.
    std::fs::write(&cfg, format!("{base}[auth]\ncluster_token_env = \"TANDEM_TEST_CLUSTER_TOKEN\"\n")).unwrap();
    let unset = check_config(&cfg, &[]);
    let err = String::from_utf8_lossy(&unset.stderr).into_owned();
    assert!(!unset.status.success() && err.contains("TANDEM_TEST_CLUSTER_TOKEN, which is not set"), "{err}");
    let short = check_config(&cfg, &[("TANDEM_TEST_CLUSTER_TOKEN", "short")]);
    let err = String::from_utf8_lossy(&short.stderr).into_owned();
    assert!(!short.status.success() && err.contains("16 to 1024"), "{err}");
    let ok = check_config(&cfg, &[("TANDEM_TEST_CLUSTER_TOKEN", TOKEN)]);
    let out = String::from_utf8_lossy(&ok.stdout).into_owned();
    assert!(out.contains("token on (from $TANDEM_TEST_CLUSTER_TOKEN)"), "{out}");

    // The cluster runs with the token in a file next to the cluster file.
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(&cfg, format!("{base}[auth]\ncluster_token_file = \"token\"\n")).unwrap();
    let out = String::from_utf8_lossy(&check_config(&cfg, &[]).stdout).into_owned();
    assert!(out.contains("cluster   token on (from token)"), "{out}");
    let up = Up::start(&cfg, &dir.path().join("logs"));
    let r = post(
        up.http,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let text = r.json()["choices"][0]["text"].as_str().unwrap_or_default().to_owned();
    assert!(!text.is_empty(), "a real completion through prefill, the store and decode: {}", r.body);

    // Direct calls: refused without the token and with a wrong one.
    let loaded = ClusterConfig::load(&cfg).unwrap();
    block_on(async {
        for token in [None, Some(WRONG)] {
            for (service, code) in codes(&loaded, token).await {
                assert_eq!(code, tonic::Code::Unauthenticated, "{service} with token {token:?}");
            }
        }
        for (service, code) in codes(&loaded, Some(TOKEN)).await {
            assert_eq!(code, tonic::Code::Ok, "{service} with the token");
        }
    });

    // A storage node holding a wrong token cannot register.
    let ports = free_ports(2);
    std::fs::write(dir.path().join("wrong"), WRONG).unwrap();
    let other = dir.path().join("wrong.toml");
    let extra = format!(
        "[[kvstore.storage]]\nname = \"store-x\"\nlisten = \"127.0.0.1:{}\"\ndata_listen = \"127.0.0.1:{}\"\ndram = \"64MiB\"\nsegment_size = \"64MiB\"\nshm_dir = \"{}\"\n\n[auth]\ncluster_token_file = \"wrong\"\n",
        ports[0],
        ports[1],
        dir.path().display()
    );
    std::fs::write(&other, format!("{base}{extra}")).unwrap();
    let mut cmd = tandem();
    cmd.args(["kvstore", "storage", "--config"]).arg(&other).args(["--node", "store-x"]);
    let (_node, line) = spawn_until(cmd, "store-x", "refused this node's cluster token");
    assert!(line.contains("not registered"), "{line}");
    let nodes = block_on(async {
        let mut m = MasterClient::new(channel(loaded.kvstore.master.listen, Some(TOKEN)));
        m.list_nodes(kv::ListNodesRequest {}).await.unwrap().into_inner().nodes
    });
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["store-0"], "only the node with the right token is a member");
}
