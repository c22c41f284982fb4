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
//!
//! Slots are only for those who authenticate: a connection is *pending*
//! until a request on it presents valid credentials (an agent's token or
//! client certificate on gRPC, a reader's token on HTTP), which
//! [`ConnectionLimiter::mark_authenticated`] records by its peer address.
//! Pending connections may hold at most `max_unauthenticated_connections`
//! slots (and `max_unauthenticated_per_address` from one address), so the
//! rest of `max_connections` is kept for authenticated clients; a new
//! connection beyond those bounds evicts the oldest pending one of the
//! address holding the most (its own address first, when that one is over its
//! bound) instead of being refused, so a flood from fewer addresses than
//! `max_unauthenticated_connections` cannot keep an agent from getting in; and a
//! pending connection is closed after `auth_timeout`, whatever it sends
//! (HTTP/2 pings, slow headers).
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use crate::config::LimitsConfig;

const PENDING: u8 = 0;
const AUTHENTICATED: u8 = 1;
const EVICTED: u8 = 2;

/// Whether a connection has authenticated, or was evicted; the waker of
/// the task reading it, so an eviction closes it at once.
#[derive(Debug)]
struct ConnState {
    peer: SocketAddr,
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl ConnState {
    fn evict(&self) {
        self.state.store(EVICTED, Ordering::Relaxed);
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

/// The admission bookkeeping behind one lock.
#[derive(Debug, Default)]
struct Slots {
    per_address: HashMap<IpAddr, usize>,
    /// Pending connections, oldest first.
    pending: VecDeque<Arc<ConnState>>,
    pending_per_address: HashMap<IpAddr, usize>,
    by_peer: HashMap<SocketAddr, Arc<ConnState>>,
}

fn decrement(map: &mut HashMap<IpAddr, usize>, address: IpAddr) {
    if let Some(n) = map.get_mut(&address) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&address);
        }
    }
}

impl Slots {
    /// Takes a pending connection out of the pending counts.
    fn unpend(&mut self, conn: &Arc<ConnState>) {
        decrement(&mut self.pending_per_address, conn.peer.ip());
        self.pending.retain(|c| !Arc::ptr_eq(c, conn));
    }
}

/// Open connections of one listener and what was refused.
#[derive(Debug)]
pub struct ConnectionLimiter {
    /// Which listener ("grpc" or "http"), for metrics and logs.
    pub listener: &'static str,
    max_total: usize,
    max_per_address: usize,
    max_pending: usize,
    max_pending_per_address: usize,
    auth_timeout: Duration,
    total: AtomicUsize,
    slots: Mutex<Slots>,
    pub refused_total_limit: AtomicU64,
    pub refused_address_limit: AtomicU64,
    pub closed_idle: AtomicU64,
    /// Pending connections closed at `auth_timeout`.
    pub closed_unauthenticated: AtomicU64,
    /// Pending connections closed to make room for a new one.
    pub evicted_unauthenticated: AtomicU64,
    last_warning_s: AtomicU64,
}

/// An admitted connection's slot; given back on drop.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<ConnectionLimiter>,
    conn: Arc<ConnState>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut slots = self.limiter.slots();
        match self.conn.state.load(Ordering::Relaxed) {
            // Its slot was given back when it was evicted.
            EVICTED => {}
            state => {
                self.limiter.total.fetch_sub(1, Ordering::Relaxed);
                decrement(&mut slots.per_address, self.conn.peer.ip());
                if state == PENDING {
                    slots.unpend(&self.conn);
                }
            }
        }
        if slots
            .by_peer
            .get(&self.conn.peer)
            .is_some_and(|c| Arc::ptr_eq(c, &self.conn))
        {
            slots.by_peer.remove(&self.conn.peer);
        }
    }
}

impl ConnectionLimiter {
    pub fn new(listener: &'static str, limits: &LimitsConfig) -> Arc<ConnectionLimiter> {
        Arc::new(ConnectionLimiter {
            listener,
            max_total: limits.max_connections,
            max_per_address: limits.max_connections_per_address,
            max_pending: limits.max_unauthenticated_connections,
            max_pending_per_address: limits.max_unauthenticated_per_address,
            auth_timeout: limits.auth_timeout,
            total: AtomicUsize::new(0),
            slots: Mutex::new(Slots::default()),
            refused_total_limit: AtomicU64::new(0),
            refused_address_limit: AtomicU64::new(0),
            closed_idle: AtomicU64::new(0),
            closed_unauthenticated: AtomicU64::new(0),
            evicted_unauthenticated: AtomicU64::new(0),
            last_warning_s: AtomicU64::new(0),
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the connection from `peer` presented valid credentials:
    /// it no longer counts against the unauthenticated bounds and is not
    /// closed at `auth_timeout`.
    pub fn mark_authenticated(&self, peer: SocketAddr) {
        let mut slots = self.slots();
        let Some(conn) = slots.by_peer.get(&peer).cloned() else {
            return;
        };
        if conn
            .state
            .compare_exchange(PENDING, AUTHENTICATED, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            slots.unpend(&conn);
        }
    }

    /// Connections open now that have not authenticated.
    pub fn unauthenticated(&self) -> usize {
        self.slots().pending.len()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// A slot for a (pending) connection from `peer`, or the limit that
    /// refuses it. Beyond the unauthenticated bounds the oldest pending
    /// connection (of `peer`'s address, else of all) is evicted to make room.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Permit, &'static str> {
        let address = peer.ip();
        let mut slots = self.slots();
        let pending_from_address = slots
            .pending_per_address
            .get(&address)
            .copied()
            .unwrap_or(0);
        let evict_from_address = pending_from_address >= self.max_pending_per_address;
        let evict_any = slots.pending.len() >= self.max_pending;
        if evict_from_address || evict_any {
            // From this address when it is over its own bound; else from the
            // address holding the most pending connections, so a flood from a
            // few addresses never evicts a lone agent.
            let victim_address = if evict_from_address {
                Some(address)
            } else {
                slots
                    .pending_per_address
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(a, _)| *a)
            };
            let oldest = slots
                .pending
                .iter()
                .find(|c| Some(c.peer.ip()) == victim_address)
                .cloned();
            if let Some(oldest) = oldest {
                // Its slot is free at once: the connection closes as soon as
                // its task runs, and must not keep the newcomer out meanwhile.
                slots.unpend(&oldest);
                decrement(&mut slots.per_address, oldest.peer.ip());
                self.total.fetch_sub(1, Ordering::Relaxed);
                oldest.evict();
                self.evicted_unauthenticated.fetch_add(1, Ordering::Relaxed);
            }
        }
        let from_address = slots.per_address.get(&address).copied().unwrap_or(0);
        if from_address >= self.max_per_address {
            self.refused_address_limit.fetch_add(1, Ordering::Relaxed);
            return Err("max_connections_per_address");
        }
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            self.refused_total_limit.fetch_add(1, Ordering::Relaxed);
            return Err("max_connections");
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        *slots.per_address.entry(address).or_default() += 1;
        *slots.pending_per_address.entry(address).or_default() += 1;
        let conn = Arc::new(ConnState {
            peer,
            state: AtomicU8::new(PENDING),
            waker: Mutex::new(None),
        });
        slots.pending.push_back(Arc::clone(&conn));
        slots.by_peer.insert(peer, Arc::clone(&conn));
        Ok(Permit {
            limiter: Arc::clone(self),
            conn,
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
    permit: Permit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Closes the connection if it has not authenticated by then.
    auth_deadline: Pin<Box<Sleep>>,
    limiter: Arc<ConnectionLimiter>,
}

impl LimitedStream {
    fn touch(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }

    /// Why the connection must close now, if it must: evicted, pending past
    /// `auth_timeout`, or idle past `idle_timeout`. Registers the waker.
    fn must_close(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let conn = Arc::clone(&self.permit.conn);
        *conn.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        match conn.state.load(Ordering::Relaxed) {
            EVICTED => {
                return Some(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "unauthenticated connection evicted for a new one",
                ))
            }
            PENDING if self.auth_deadline.as_mut().poll(cx).is_ready() => {
                self.limiter
                    .closed_unauthenticated
                    .fetch_add(1, Ordering::Relaxed);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no valid credentials within auth_timeout",
                ));
            }
            _ => {}
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.limiter.closed_idle.fetch_add(1, Ordering::Relaxed);
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle past idle_timeout",
            ));
        }
        None
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.permit.conn.state.load(Ordering::Relaxed) == EVICTED {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "unauthenticated connection evicted for a new one",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.must_close(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
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
            let permit = match limiter.admit(peer) {
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
                permit,
                idle,
                deadline: Box::pin(tokio::time::sleep(idle)),
                auth_deadline: Box::pin(tokio::time::sleep(limiter.auth_timeout)),
                limiter: Arc::clone(&limiter),
            };
            if tx.send((limited, peer)).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The peer address of an HTTP request's connection (axum `ConnectInfo`).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, AdmittedListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, AdmittedListener>) -> Self {
        Peer(*stream.remote_addr())
    }
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

/// Descriptors the process needs beyond its connections: the store's
/// connections and files, the listeners, logs, and room for bursts.
pub const DESCRIPTOR_MARGIN: u64 = 256;

/// Makes sure the process may open `needed` descriptors: raises the soft
/// `RLIMIT_NOFILE` up to the hard limit when it is lower, and refuses, with
/// the figures, when even the hard limit is lower. Returns the soft limit
/// now in force.
pub fn ensure_descriptors(needed: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!(
            "reading the open-file limit: {}",
            io::Error::last_os_error()
        ));
    }
    if limit.rlim_cur >= needed {
        return Ok(limit.rlim_cur);
    }
    if limit.rlim_max < needed {
        return Err(format!(
            "the limits need {needed} file descriptors but the hard open-file limit is {} (soft {}): \
             raise it (systemd LimitNOFILE=, ulimit -Hn) or lower limits.max_connections",
            limit.rlim_max, limit.rlim_cur
        ));
    }
    let raised = libc::rlimit {
        rlim_cur: needed,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(format!(
            "raising the open-file limit from {} to {needed}: {}",
            limit.rlim_cur,
            io::Error::last_os_error()
        ));
    }
    tracing::info!(
        "open-file limit raised from {} to {needed} (what the connection limits need)",
        limit.rlim_cur
    );
    Ok(needed)
}
