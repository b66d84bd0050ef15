//! [`DataServer`]: a storage node's tcp data port.
//!
//! One tokio task per connection, serving [`super::frame`] requests in order
//! against a [`DataTarget`]. Reads are sent straight from the segment mapping
//! and writes received straight into it (after the range is checked), so a
//! block crosses user space without an intermediate buffer; SSD blocks are
//! read on the blocking pool into a buffer of exactly the block's size.
//!
//! Everything is bounded: frame payloads (`max_frame_bytes`), ops per batch,
//! connections, and the time a connection may idle between frames or stall
//! within one. A peer that sends garbage is disconnected, after an `ERROR`
//! frame when its header still parsed; nothing it sends can make the server
//! panic or touch bytes outside the segment range it named.
//!
//! With a cluster token configured, a connection must open with a `HELLO`
//! frame carrying it (see [`super::frame`]); until it has, nothing else is
//! served, and a connection that fails the check gets an `Unauthenticated`
//! error frame and is closed.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::BlockKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

use super::frame::{
    error_frame, FrameHeader, HeaderError, Opcode, PayloadHasher, Status, FLAG_GRANT, GRANT_LEN, HEADER_LEN, IO_CHUNK,
    MAX_HELLO_PAYLOAD, TRAILER_LEN,
};
use super::{DataTarget, TcpConfig, TransferError};

/// Buffer for request headers; payloads larger than this bypass it.
const READ_BUFFER: usize = 64 * 1024;
/// Buffer coalescing small replies; larger payloads bypass it.
const WRITE_BUFFER: usize = 64 * 1024;
/// How long a closing connection waits for the client to take its last
/// reply and stop sending.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
/// Most unread input drained while closing.
const LINGER_MAX_BYTES: usize = 64 << 20;

/// A running tcp data port. Dropping it (or [`DataServer::shutdown`]) stops
/// accepting at once; each connection closes at its next frame boundary.
#[derive(Debug)]
pub struct DataServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// Yields `None` once the accept loop and every connection have ended:
    /// each holds a sender.
    alive: mpsc::Receiver<()>,
}

impl DataServer {
    /// Binds `addr` (port 0 picks one) and starts serving `target`. Must be
    /// called within a tokio runtime.
    pub async fn bind(addr: SocketAddr, target: Arc<dyn DataTarget>, cfg: TcpConfig) -> io::Result<DataServer> {
        cfg.validate().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        // Accepted sockets inherit the listener's buffer sizes.
        set_buffers(&socket, &cfg)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        let local_addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (alive_tx, alive) = mpsc::channel(1);
        let shared = Arc::new(Shared { slots: Arc::new(Semaphore::new(cfg.max_connections)), target, cfg });
        let span = tracing::info_span!("data_server", %local_addr);
        tokio::spawn(accept_loop(listener, shared, shutdown_rx, alive_tx).instrument(span));
        Ok(DataServer { local_addr, shutdown, alive })
    }

    /// The bound address (with the port chosen when binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets every connection finish the frame it is in
    /// (bounded by `io_timeout_ms`) and close, and waits until they have.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.alive.recv().await.is_some() {}
    }
}

impl Drop for DataServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn set_buffers(socket: &TcpSocket, cfg: &TcpConfig) -> io::Result<()> {
    let bytes = cfg.socket_buffer_bytes.as_u64();
    if bytes > 0 {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        socket.set_send_buffer_size(bytes)?;
        socket.set_recv_buffer_size(bytes)?;
    }
    Ok(())
}

#[derive(Debug)]
struct Shared {
    target: Arc<dyn DataTarget>,
    cfg: TcpConfig,
    slots: Arc<Semaphore>,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE/ENFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = shared.cfg.max_connections, "refusing connection: at the limit");
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let (shared, shutdown, alive) = (shared.clone(), shutdown.clone(), alive.clone());
        let span = tracing::debug_span!("data_conn", %peer);
        tokio::spawn(
            async move {
                serve_connection(stream, shared, shutdown).await;
                drop((slot, alive));
            }
            .instrument(span),
        );
    }
    tracing::debug!("data server stopped accepting");
}

async fn refuse_busy(mut stream: TcpStream) {
    let frame = error_frame(0, Status::Busy, "server at its connection limit");
    if let Ok(Ok(())) = tokio::time::timeout(LINGER_TIMEOUT, stream.write_all(&frame)).await {
        let (r, w) = stream.into_split();
        linger_close(r, w, LINGER_TIMEOUT).await;
    }
}

/// Whether a connection goes on after a frame.
enum Next {
    Continue,
    Close,
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    let (r, w) = stream.into_split();
    let mut conn = Connection {
        reader: BufReader::with_capacity(READ_BUFFER, r),
        writer: BufWriter::with_capacity(WRITE_BUFFER, w),
        io_timeout: Duration::from_millis(shared.cfg.io_timeout_ms),
        shared,
        #[cfg(feature = "rdma")]
        shutdown: shutdown.clone(),
    };
    let idle = Duration::from_millis(conn.shared.cfg.idle_timeout_ms);
    if conn.shared.cfg.cluster_token.is_some() {
        let handshake = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return,
            h = conn.handshake() => h,
        };
        match handshake {
            Ok(Next::Continue) => {}
            Ok(Next::Close) => return conn.close_after_reply().await,
            Err(e) => {
                tracing::debug!(error = %e, "connection failed in the handshake");
                return;
            }
        }
    }
    loop {
        // Replies are coalesced while more pipelined requests are already
        // buffered, and flushed before waiting for the client.
        if conn.reader.buffer().is_empty() && conn.flush().await.is_err() {
            return;
        }
        let mut raw = [0u8; HEADER_LEN];
        let got = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            got = tokio::time::timeout(idle, conn.reader.read_exact(&mut raw)) => got,
        };
        match got {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "client gone");
                // A client that half-closed after a partial header still
                // gets the replies to the requests before it (found by
                // fuzzing: they sat in the write buffer and were dropped).
                let _ = conn.flush().await;
                return;
            }
            Err(_) => {
                tracing::debug!("closing idle connection");
                break;
            }
        }
        let next = match FrameHeader::decode(&raw) {
            Ok(header) => conn.handle(header).await,
            Err(HeaderError::BadMagic) => {
                tracing::warn!("garbage on the data port: disconnecting");
                // Requests before the garbage were valid: their replies go out.
                let _ = conn.flush().await;
                return;
            }
            Err(e @ HeaderError::VersionMismatch { .. }) => {
                tracing::warn!(error = %e, "client speaks another protocol version");
                conn.reply_error(0, Status::VersionMismatch, &e.to_string()).await.map(|()| Next::Close)
            }
            Err(HeaderError::BadChecksum) => {
                tracing::warn!("corrupt request header: disconnecting");
                conn.reply_error(0, Status::Corrupt, "header checksum mismatch").await.map(|()| Next::Close)
            }
        };
        match next {
            Ok(Next::Continue) => {}
            Ok(Next::Close) => return conn.close_after_reply().await,
            Err(e) => {
                tracing::debug!(error = %e, "connection failed mid-frame");
                // Replies to the requests before this frame still go out
                // (best effort, bounded by `io_timeout_ms`).
                let _ = conn.flush().await;
                return;
            }
        }
    }
    // Shutdown or idle: replies so far go out, then the connection closes.
    let _ = conn.flush().await;
    let _ = tokio::time::timeout(conn.io_timeout, conn.writer.shutdown()).await;
}

/// Closes a connection so the client can read the last reply: FIN first,
/// then unread input (e.g. the payload of a refused write) is drained for a
/// bounded time and amount. Closing with unread input would send a RST,
/// which may destroy the reply in the client's receive buffer.
async fn linger_close(mut reader: impl AsyncRead + Unpin, mut writer: impl AsyncWrite + Unpin, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, writer.shutdown()).await;
    let drain = async {
        let mut scratch = vec![0u8; 64 * 1024];
        let mut left = LINGER_MAX_BYTES;
        while left > 0 {
            match reader.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(timeout, drain).await;
}

/// One client connection's state.
struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    io_timeout: Duration,
    shared: Arc<Shared>,
    /// RDMA sessions outlive their frame and end on shutdown.
    #[cfg(feature = "rdma")]
    shutdown: watch::Receiver<bool>,
}

/// Bytes of grant a request's payload starts with.
fn grant_len(h: &FrameHeader) -> u64 {
    if h.flags & FLAG_GRANT != 0 {
        GRANT_LEN as u64
    } else {
        0
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "data connection stalled")
}

impl Connection {
    async fn flush(&mut self) -> io::Result<()> {
        tokio::time::timeout(self.io_timeout, self.writer.flush()).await.map_err(|_| timed_out())?
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        tokio::time::timeout(self.io_timeout, self.writer.write_all(bytes)).await.map_err(|_| timed_out())?
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        tokio::time::timeout(self.io_timeout, self.reader.read_exact(buf)).await.map_err(|_| timed_out())?.map(drop)
    }

    async fn reply_error(&mut self, request_id: u64, status: Status, message: &str) -> io::Result<()> {
        self.write_all(&error_frame(request_id, status, message)).await
    }

    /// Reads and discards a payload of `len` bytes and its trailer.
    async fn discard_payload(&mut self, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.discard(len + TRAILER_LEN as u64).await
    }

    /// Reads and discards `len` bytes.
    async fn discard(&mut self, len: u64) -> io::Result<()> {
        let mut scratch = vec![0u8; IO_CHUNK.min(usize::try_from(len).unwrap_or(usize::MAX))];
        let mut left = len;
        while left > 0 {
            let n = scratch.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            self.read_exact(&mut scratch[..n]).await?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Receives a payload into `dst` and checks its trailer.
    async fn receive_payload(&mut self, dst: &mut [u8]) -> io::Result<bool> {
        if dst.is_empty() {
            return Ok(true);
        }
        self.receive_rest(PayloadHasher::default(), dst).await
    }

    /// Receives the rest of a payload (what `hasher` has not seen yet) into
    /// `dst`, then its trailer, and checks it.
    async fn receive_rest(&mut self, mut hasher: PayloadHasher, dst: &mut [u8]) -> io::Result<bool> {
        for chunk in dst.chunks_mut(IO_CHUNK) {
            self.read_exact(chunk).await?;
            hasher.update(chunk);
        }
        let mut trailer = [0u8; TRAILER_LEN];
        self.read_exact(&mut trailer).await?;
        Ok(u64::from_le_bytes(trailer) == hasher.finish())
    }

    /// Sends a `DATA` reply carrying `block`.
    pub(super) async fn send_data(&mut self, request_id: u64, block: &[u8]) -> io::Result<()> {
        let mut h = FrameHeader::new(Opcode::Data, request_id);
        h.len = block.len() as u64;
        h.payload_len = block.len() as u64;
        self.write_all(&h.encode()).await?;
        if block.is_empty() {
            return Ok(());
        }
        let mut hasher = PayloadHasher::default();
        for chunk in block.chunks(IO_CHUNK) {
            hasher.update(chunk);
            self.write_all(chunk).await?;
        }
        self.write_all(&hasher.finish().to_le_bytes()).await
    }

    /// Flushes the error reply and closes. The client may still be sending
    /// (say, a refused payload): lingering makes sure it gets to read why it
    /// is being dropped.
    async fn close_after_reply(mut self) {
        let _ = self.flush().await;
        linger_close(self.reader, self.writer, self.io_timeout.min(LINGER_TIMEOUT)).await;
    }

    /// Reads the connection's first frame, which must be a `HELLO` with the
    /// cluster token; `Close` (after an `Unauthenticated` reply) otherwise.
    async fn handshake(&mut self) -> io::Result<Next> {
        let mut raw = [0u8; HEADER_LEN];
        self.read_exact(&mut raw).await?;
        let refuse = match FrameHeader::decode(&raw) {
            Ok(h) if h.op() == Some(Opcode::Hello) => return self.serve_hello(h).await,
            Ok(h) => format!("opcode {:#04x} before the handshake", h.opcode),
            Err(e) => format!("{e} in the first frame"),
        };
        tracing::warn!("refusing a data connection: {refuse}");
        let msg = format!("this data port requires the cluster token: the first frame must be HELLO ({refuse})");
        self.reply_error(0, Status::Unauthenticated, &msg).await.map(|()| Next::Close)
    }

    /// Checks a `HELLO`'s token (any token passes when none is configured)
    /// and answers `HELLO_OK`, or `Unauthenticated` and `Close`.
    async fn serve_hello(&mut self, h: FrameHeader) -> io::Result<Next> {
        let id = h.request_id;
        if h.payload_len > MAX_HELLO_PAYLOAD as u64 {
            // Not read: the connection is closed anyway.
            tracing::warn!(bytes = h.payload_len, "refusing an oversized handshake");
            let msg = format!("handshake of {} bytes; a token is at most {MAX_HELLO_PAYLOAD}", h.payload_len);
            return self.reply_error(id, Status::Unauthenticated, &msg).await.map(|()| Next::Close);
        }
        let mut presented = vec![0u8; h.payload_len as usize];
        if !self.receive_payload(&mut presented).await? {
            let msg = "handshake payload checksum mismatch";
            return self.reply_error(id, Status::Unauthenticated, msg).await.map(|()| Next::Close);
        }
        if let Some(token) = &self.shared.cfg.cluster_token {
            if !token.matches(&presented) {
                tracing::warn!("refusing a data connection: wrong cluster token");
                let msg = if presented.is_empty() { "no cluster token presented" } else { "wrong cluster token" };
                return self.reply_error(id, Status::Unauthenticated, msg).await.map(|()| Next::Close);
            }
        }
        self.write_all(&FrameHeader::new(Opcode::HelloOk, id).encode()).await.map(|()| Next::Continue)
    }

    /// Serves one request whose header has been read and verified.
    async fn handle(&mut self, h: FrameHeader) -> io::Result<Next> {
        let cfg = &self.shared.cfg;
        let (max_frame, max_ops) = (cfg.max_frame(), cfg.max_batch_ops);
        let Some(op) = h.op() else {
            let msg = format!("unknown opcode {:#04x}", h.opcode);
            return self.reply_error(h.request_id, Status::BadRequest, &msg).await.map(|()| Next::Close);
        };
        let flags_ok = h.flags == 0 || (op == Opcode::Write && h.flags == FLAG_GRANT);
        if !flags_ok || h.request_id == 0 {
            let msg = "unknown flags or request id 0 in a request";
            return self.reply_error(h.request_id, Status::BadRequest, msg).await.map(|()| Next::Close);
        }
        match op {
            Opcode::Hello => return self.serve_hello(h).await,
            Opcode::Read | Opcode::ReadSsd | Opcode::Write | Opcode::RdmaConnect => {}
            Opcode::Data | Opcode::WriteOk | Opcode::RdmaAccept | Opcode::HelloOk | Opcode::Error => {
                let msg = format!("reply opcode {op:?} sent as a request");
                return self.reply_error(h.request_id, Status::BadRequest, &msg).await.map(|()| Next::Close);
            }
        }
        if h.payload_len > max_frame {
            // Too large to skip cheaply: the stream is abandoned.
            let msg = format!("payload of {} bytes exceeds the limit of {max_frame}", h.payload_len);
            return self.reply_error(h.request_id, Status::TooLarge, &msg).await.map(|()| Next::Close);
        }
        if h.count == 0 || h.count > max_ops {
            self.discard_payload(h.payload_len).await?;
            let msg = format!("batch of {} ops; the limit is {max_ops}", h.count);
            return self.reply_error(h.request_id, Status::TooManyOps, &msg).await.map(|()| Next::Continue);
        }
        match op {
            Opcode::Read | Opcode::ReadSsd if h.payload_len != 0 => {
                let msg = "read request with a payload";
                self.reply_error(h.request_id, Status::BadRequest, msg).await.map(|()| Next::Close)
            }
            Opcode::Read | Opcode::ReadSsd if h.len > max_frame => {
                let msg = format!("block of {} bytes exceeds the frame limit of {max_frame}", h.len);
                self.reply_error(h.request_id, Status::TooLarge, &msg).await.map(|()| Next::Continue)
            }
            Opcode::Read => self.serve_read(h).await.map(|()| Next::Continue),
            Opcode::ReadSsd => self.serve_read_ssd(h).await.map(|()| Next::Continue),
            Opcode::Write if h.len.checked_add(grant_len(&h)) != Some(h.payload_len) || h.payload_len > max_frame => {
                let msg = format!("write of len {} with a payload of {} bytes", h.len, h.payload_len);
                self.reply_error(h.request_id, Status::BadRequest, &msg).await.map(|()| Next::Close)
            }
            Opcode::Write => self.serve_write(h).await.map(|()| Next::Continue),
            _ => self.serve_rdma_connect(h).await,
        }
    }

    async fn serve_read(&mut self, h: FrameHeader) -> io::Result<()> {
        let Some(segment) = self.shared.target.segment(h.segment) else {
            let msg = format!("no segment {}", h.segment);
            return self.reply_error(h.request_id, Status::UnknownSegment, &msg).await;
        };
        // `len` <= max_frame (checked), so it fits a usize.
        match segment.slice(h.offset, h.len as usize) {
            Ok(block) => self.send_data(h.request_id, block).await,
            Err(e) => self.reply_error(h.request_id, Status::OutOfBounds, &e.to_string()).await,
        }
    }

    async fn serve_read_ssd(&mut self, h: FrameHeader) -> io::Result<()> {
        // The read may take a while: let the client have the replies so far.
        self.flush().await?;
        let target = self.shared.target.clone();
        let (key, len) = (BlockKey(h.offset), h.len as usize);
        if !self.shared.target.ssd_block_fits(key, h.len) {
            let msg = format!("no SSD block {:016x} of {} bytes", key.0, h.len);
            return self.reply_error(h.request_id, Status::NotFound, &msg).await;
        }
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            target.read_ssd(key, &mut buf).map(|()| buf)
        })
        .await;
        match read {
            Ok(Ok(block)) => self.send_data(h.request_id, &block).await,
            Ok(Err(TransferError::NotFound)) => {
                self.reply_error(h.request_id, Status::NotFound, &format!("no SSD block {:016x}", key.0)).await
            }
            Ok(Err(e)) => self.reply_error(h.request_id, Status::Io, &e.to_string()).await,
            Err(e) => self.reply_error(h.request_id, Status::Io, &format!("SSD read task failed: {e}")).await,
        }
    }

    async fn serve_write(&mut self, h: FrameHeader) -> io::Result<()> {
        let Some(segment) = self.shared.target.segment(h.segment) else {
            self.discard_payload(h.payload_len).await?;
            let msg = format!("no segment {}", h.segment);
            return self.reply_error(h.request_id, Status::UnknownSegment, &msg).await;
        };
        let dst = match segment.slice_mut(h.offset, h.len as usize) {
            Ok(dst) => dst,
            Err(e) => {
                self.discard_payload(h.payload_len).await?;
                return self.reply_error(h.request_id, Status::OutOfBounds, &e.to_string()).await;
            }
        };
        let mut hasher = PayloadHasher::default();
        let mut grant = [0u8; GRANT_LEN];
        let granted = h.flags & FLAG_GRANT != 0;
        if granted {
            self.read_exact(&mut grant).await?;
            hasher.update(&grant);
        }
        let target = self.shared.target.clone();
        if let Err(why) = target.authorize_write(h.segment, h.offset, h.len, granted.then_some(&grant[..])) {
            tracing::warn!(segment = h.segment, offset = h.offset, len = h.len, "refusing a write: {why}");
            // What is left of the payload: the block (`handle` checked the
            // lengths) and the trailer.
            if h.payload_len > 0 {
                self.discard(h.len + TRAILER_LEN as u64).await?;
            }
            return self.reply_error(h.request_id, Status::Denied, &why).await;
        }
        // The grant says the range is this writer's, so landing the bytes
        // before the trailer is checked is fine: a mismatch fails the write
        // and the writer never publishes the block.
        let received = if granted { self.receive_rest(hasher, dst).await? } else { self.receive_payload(dst).await? };
        if received {
            self.write_all(&FrameHeader::new(Opcode::WriteOk, h.request_id).encode()).await
        } else {
            self.reply_error(h.request_id, Status::Corrupt, "write payload checksum mismatch").await
        }
    }

    #[cfg(not(feature = "rdma"))]
    async fn serve_rdma_connect(&mut self, h: FrameHeader) -> io::Result<Next> {
        self.discard_payload(h.payload_len).await?;
        let msg = "this server was built without feature `rdma`";
        self.reply_error(h.request_id, Status::Unsupported, msg).await.map(|()| Next::Continue)
    }

    #[cfg(feature = "rdma")]
    async fn serve_rdma_connect(&mut self, h: FrameHeader) -> io::Result<Next> {
        let mut request = vec![0u8; h.payload_len as usize];
        if !self.receive_payload(&mut request).await? {
            let msg = "rdma handshake checksum mismatch";
            return self.reply_error(h.request_id, Status::Corrupt, msg).await.map(|()| Next::Continue);
        }
        let target = self.shared.target.clone();
        // Registering segments pins their pages: it may take a while.
        match super::run_blocking(|| super::rdma::server_accept(&target, &request)) {
            Ok((reply, session)) => {
                let mut rh = FrameHeader::new(Opcode::RdmaAccept, h.request_id);
                rh.payload_len = reply.len() as u64;
                self.write_all(&rh.encode()).await?;
                self.write_all(&reply).await?;
                self.write_all(&super::frame::payload_checksum(&reply).to_le_bytes()).await?;
                self.flush().await?;
                // The queue pair lives as long as this connection: the client
                // keeps it open and closing it tears the session down.
                self.hold_rdma_session(session).await;
                Ok(Next::Close)
            }
            Err(e) => {
                let msg = e.to_string();
                self.reply_error(h.request_id, Status::Unsupported, &msg).await.map(|()| Next::Continue)
            }
        }
    }

    /// Keeps an RDMA session (queue pair and registered segments) alive
    /// until the client closes the handshake connection.
    #[cfg(feature = "rdma")]
    async fn hold_rdma_session(&mut self, session: super::rdma::ServerSession) {
        let mut byte = [0u8; 1];
        loop {
            tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => break,
                read = self.reader.read(&mut byte) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                },
            }
        }
        drop(session);
    }
}
