//! Connection admission, shared by the gRPC and the HTTP listener.
//!
//! Each listener accepts in its own task and decides at once, before any
//! byte is read: a connection beyond `max_connections` in total, or beyond
//! `max_connections_per_address` from one source address, is closed
//! immediately (counted, one log line per second at most). An admitted
//! connection is closed when it has sent and received nothing for
//! `idle_timeout`; the TLS handshake has its own `handshake_timeout`
//! (tonic's). So idle or half-open connections cannot pile up until the
//! process runs out of file descriptors, and one address cannot take every
//! slot from the agents.
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::config::LimitsConfig;

/// Open connections of one listener and what was refused.
#[derive(Debug)]
pub struct ConnectionLimiter {
    /// Which listener ("grpc" or "http"), for metrics and logs.
    pub listener: &'static str,
    max_total: usize,
    max_per_address: usize,
    total: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    pub refused_total_limit: AtomicU64,
    pub refused_address_limit: AtomicU64,
    pub closed_idle: AtomicU64,
    last_warning_s: AtomicU64,
}

/// An admitted connection's slot; given back on drop.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<ConnectionLimiter>,
    address: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.total.fetch_sub(1, Ordering::Relaxed);
        let mut map = self
            .limiter
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.address);
            }
        }
    }
}

impl ConnectionLimiter {
    pub fn new(listener: &'static str, limits: &LimitsConfig) -> Arc<ConnectionLimiter> {
        Arc::new(ConnectionLimiter {
            listener,
            max_total: limits.max_connections,
            max_per_address: limits.max_connections_per_address,
            total: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
            refused_total_limit: AtomicU64::new(0),
            refused_address_limit: AtomicU64::new(0),
            closed_idle: AtomicU64::new(0),
            last_warning_s: AtomicU64::new(0),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// A slot for a connection from `address`, or the limit that refuses it.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<Permit, &'static str> {
        let mut map = self.per_address.lock().unwrap_or_else(|p| p.into_inner());
        let from_address = map.get(&address).copied().unwrap_or(0);
        if from_address >= self.max_per_address {
            self.refused_address_limit.fetch_add(1, Ordering::Relaxed);
            return Err("max_connections_per_address");
        }
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            self.refused_total_limit.fetch_add(1, Ordering::Relaxed);
            return Err("max_connections");
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        *map.entry(address).or_default() += 1;
        Ok(Permit {
            limiter: Arc::clone(self),
            address,
        })
    }

    fn warn_refused(&self, limit: &str, peer: SocketAddr) {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.last_warning_s.swap(now_s, Ordering::Relaxed) != now_s {
            tracing::warn!(
                "{} listener: connection from {peer} closed ({limit} reached; {} open)",
                self.listener,
                self.open()
            );
        }
    }
}

/// An admitted TCP connection: holds its slot, and fails with `TimedOut`
/// once nothing has moved in either direction for the idle timeout.
pub struct LimitedStream {
    inner: TcpStream,
    _permit: Permit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    limiter: Arc<ConnectionLimiter>,
}

impl LimitedStream {
    fn touch(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.limiter.closed_idle.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle past idle_timeout")
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.idle_expired(cx) {
                    Poll::Ready(Err(idle_error()))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            if n > 0 {
                self.touch();
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            if n > 0 {
                self.touch();
            }
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for LimitedStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts on `listener` in a task of its own and hands over the admitted
/// connections, each with its peer address.
pub fn admit_connections(
    listener: TcpListener,
    limiter: Arc<ConnectionLimiter>,
    idle: Duration,
) -> mpsc::Receiver<(LimitedStream, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    tracing::warn!("{} listener: accept: {e}", limiter.listener);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = match limiter.admit(peer.ip()) {
                Ok(permit) => permit,
                Err(limit) => {
                    limiter.warn_refused(limit, peer);
                    drop(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let limited = LimitedStream {
                inner: stream,
                _permit: permit,
                idle,
                deadline: Box::pin(tokio::time::sleep(idle)),
                limiter: Arc::clone(&limiter),
            };
            if tx.send((limited, peer)).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The HTTP side's listener: admitted connections for `axum::serve`.
pub struct AdmittedListener {
    pub connections: mpsc::Receiver<(LimitedStream, SocketAddr)>,
    pub local: SocketAddr,
}

impl axum::serve::Listener for AdmittedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept task ended (the runtime is shutting down).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
