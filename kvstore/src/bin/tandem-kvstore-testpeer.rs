//! A throwaway storage-node data port for transport tests that need a peer
//! in another process (to kill it with SIGKILL mid-batch).
//!
//! Usage: `tandem-kvstore-testpeer <dir> [segment_bytes]`. Creates one DRAM
//! segment (id 0) in `<dir>`, serves it on `127.0.0.1:0`, prints
//! `READY <addr> <segment path>` on stdout and serves until stdin closes.
//! Reading SSD block [`STALL_KEY`] prints `STALLED` and never returns, so a
//! test knows a batch is in flight when it kills the process.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use tandem_kvstore::segment::Segment;
use tandem_kvstore::transport::{DataServer, DataTarget, TcpConfig, TransferError};
use tandem_proto::BlockKey;

/// The SSD key whose read stalls forever.
const STALL_KEY: u64 = 0xdead;

struct Target {
    segment: Arc<Segment>,
}

impl DataTarget for Target {
    fn segment(&self, id: u32) -> Option<Arc<Segment>> {
        (id == 0).then(|| self.segment.clone())
    }

    fn read_ssd(&self, key: BlockKey, _dst: &mut [u8]) -> Result<(), TransferError> {
        if key.0 != STALL_KEY {
            return Err(TransferError::NotFound);
        }
        println!("STALLED");
        let _ = std::io::stdout().flush();
        loop {
            std::thread::park();
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: tandem-kvstore-testpeer <dir> [segment_bytes]")?);
    let bytes: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64 << 20);
    let path = dir.join("testpeer-0.seg");
    let segment = Arc::new(Segment::create(&path, bytes, false)?);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let target = Arc::new(Target { segment });
        let server = DataServer::bind("127.0.0.1:0".parse()?, target, TcpConfig::default()).await?;
        println!("READY {} {}", server.local_addr(), path.display());
        std::io::stdout().flush()?;
        // Serve until the parent goes away (stdin closes) or kills us.
        tokio::task::spawn_blocking(|| for _ in std::io::stdin().lock().lines().map_while(Result::ok) {}).await?;
        server.shutdown().await;
        Ok(())
    })
}
