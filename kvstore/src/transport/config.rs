//! Configuration of the transfer engine (`[kvstore.transport]`).

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use tandem_proto::cluster_token::ClusterToken;

/// Which transport [`super::connect`] picks for a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportPreference {
    /// shm for a peer on this host, tcp otherwise. Peers do not advertise
    /// RDMA yet, so `auto` never picks it; ask for `rdma` explicitly.
    #[default]
    Auto,
    /// shm only; a peer on another host is an error.
    Shm,
    /// tcp for every peer, even one on this host.
    Tcp,
    /// RDMA for every peer; an error when not compiled in or no device.
    Rdma,
}

/// Transfer engine configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    pub prefer: TransportPreference,
    pub tcp: TcpConfig,
    pub shm: ShmConfig,
    pub rdma: RdmaConfig,
}

/// The tcp data plane: client ([`super::TcpTransport`]) and server
/// ([`super::DataServer`]) settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// Connections per peer; a batch is split across them by bytes.
    pub stripes: usize,
    /// Longest wait for a connection to be established.
    pub connect_timeout_ms: u64,
    /// Longest a client waits for progress on one frame (sending a request
    /// or receiving its reply) before the connection counts as dead.
    pub op_timeout_ms: u64,
    /// SO_SNDBUF/SO_RCVBUF of every data socket; 0 leaves the kernel's
    /// autotuning in charge.
    pub socket_buffer_bytes: ByteSize,
    /// Largest block one frame may carry (both directions).
    pub max_frame_bytes: ByteSize,
    /// Most ops one pipelined batch may hold; longer batches are sent as
    /// several.
    pub max_batch_ops: u32,
    /// Server: connections served at once; more are refused with `Busy`.
    pub max_connections: usize,
    /// Server: once a frame has started, longest wait for the rest of it
    /// (and for the client to take a reply).
    pub io_timeout_ms: u64,
    /// Server: a connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// The cluster token (never in the file: filled in at start from
    /// `[auth]`). A client sends it in the first frame of every
    /// connection; a server with one refuses connections that do not.
    #[serde(skip)]
    pub cluster_token: Option<ClusterToken>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            stripes: 4,
            connect_timeout_ms: 3_000,
            op_timeout_ms: 30_000,
            socket_buffer_bytes: ByteSize::mib(4),
            max_frame_bytes: ByteSize::mib(64),
            max_batch_ops: 16_384,
            max_connections: 1_024,
            io_timeout_ms: 30_000,
            idle_timeout_ms: 600_000,
            cluster_token: None,
        }
    }
}

/// Same-host copies ([`super::ShmTransport`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShmConfig {
    /// Threads one large batch is copied on (1 = the calling thread only;
    /// 0 = one per 8 cores, at most 4: on small, shared machines a second
    /// copy thread waits for a core more than it helps).
    pub copy_threads: usize,
    /// Batches smaller than this are copied on the calling thread.
    pub parallel_min_bytes: ByteSize,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig { copy_threads: 0, parallel_min_bytes: ByteSize::mib(8) }
    }
}

/// One-sided RDMA (feature `rdma`; ignored without it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RdmaConfig {
    /// Device name (e.g. `mlx5_0`, `rxe0`); the first device when unset.
    pub device: Option<String>,
    /// Port number on the device (1-based).
    pub port: u8,
    /// GID table index; RoCE v2 usually needs the IPv4-mapped entry (often 1 or 3).
    pub gid_index: u8,
    /// Work requests in flight per queue pair.
    pub max_outstanding: u32,
    /// Longest wait for a batch's completions.
    pub op_timeout_ms: u64,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig { device: None, port: 1, gid_index: 0, max_outstanding: 128, op_timeout_ms: 10_000 }
    }
}

impl TransportConfig {
    /// Rejects settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        self.tcp.validate()?;
        self.shm.validate()?;
        self.rdma.validate()
    }
}

fn check(ok: bool, msg: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("kvstore.transport.{msg}"))
    }
}

impl TcpConfig {
    /// Rejects settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        check((1..=64).contains(&self.stripes), "tcp.stripes must be in 1..=64")?;
        check(self.connect_timeout_ms > 0, "tcp.connect_timeout_ms must be positive")?;
        check(self.op_timeout_ms > 0, "tcp.op_timeout_ms must be positive")?;
        check(self.socket_buffer_bytes.as_u64() <= 1 << 30, "tcp.socket_buffer_bytes must be at most 1GiB")?;
        check((1..=1 << 32).contains(&self.max_frame_bytes.as_u64()), "tcp.max_frame_bytes must be in 1B..=4GiB")?;
        check((1..=1 << 20).contains(&self.max_batch_ops), "tcp.max_batch_ops must be in 1..=1048576")?;
        check(self.max_connections > 0, "tcp.max_connections must be positive")?;
        check(self.io_timeout_ms > 0, "tcp.io_timeout_ms must be positive")?;
        check(self.idle_timeout_ms > 0, "tcp.idle_timeout_ms must be positive")
    }

    pub(crate) fn max_frame(&self) -> u64 {
        self.max_frame_bytes.as_u64()
    }
}

impl ShmConfig {
    /// Rejects settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        check(self.copy_threads <= 64, "shm.copy_threads must be in 0..=64")
    }

    /// Copy threads to use: `copy_threads`, or the automatic choice for 0.
    pub fn effective_copy_threads(&self) -> usize {
        match self.copy_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 8).clamp(1, 4)),
            n => n,
        }
    }
}

impl RdmaConfig {
    /// Rejects settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        check(self.port >= 1, "rdma.port must be at least 1")?;
        check((1..=4096).contains(&self.max_outstanding), "rdma.max_outstanding must be in 1..=4096")?;
        check(self.op_timeout_ms > 0, "rdma.op_timeout_ms must be positive")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_an_empty_table_parses_to_them() {
        let cfg = TransportConfig::default();
        cfg.validate().unwrap();
        let parsed: TransportConfig = toml::from_str("").unwrap();
        assert_eq!(parsed, cfg);
        assert_eq!(cfg.tcp.stripes, 4);
        assert_eq!(cfg.tcp.max_frame_bytes, ByteSize::mib(64));
    }

    #[test]
    fn fields_parse_with_human_units_and_unknown_fields_are_refused() {
        let cfg: TransportConfig = toml::from_str(
            r#"
            prefer = "tcp"
            [tcp]
            stripes = 8
            max_frame_bytes = "16MiB"
            op_timeout_ms = 500
            "#,
        )
        .unwrap();
        assert_eq!(cfg.prefer, TransportPreference::Tcp);
        assert_eq!(cfg.tcp.stripes, 8);
        assert_eq!(cfg.tcp.max_frame_bytes, ByteSize::mib(16));
        assert_eq!(cfg.tcp.op_timeout_ms, 500);
        assert!(toml::from_str::<TransportConfig>("[tcp]\nstripez = 2").is_err());
        assert!(toml::from_str::<TransportConfig>("prefer = \"carrier-pigeon\"").is_err());
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut cfg = TransportConfig::default();
        cfg.tcp.stripes = 0;
        assert!(cfg.validate().unwrap_err().contains("tcp.stripes"));
        let mut cfg = TransportConfig::default();
        cfg.shm.copy_threads = 65;
        assert!(cfg.validate().unwrap_err().contains("shm.copy_threads"));
        assert!(ShmConfig::default().effective_copy_threads() >= 1);
    }
}
