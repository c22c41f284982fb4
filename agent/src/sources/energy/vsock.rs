//! The vsock transport of a VM's published figures: the host agent serves
//! each VM's `sci-host.json` document (the same bytes the folder transport
//! writes: cumulative energy counter and its wrap range, idle part, host
//! windows, intensity and its source, PUE, embodied share) to the guest
//! agent over a socket.
//!
//! Where the host listens (`[vms] vsock`):
//! - `af_vsock`: an `AF_VSOCK` stream socket on `VMADDR_CID_ANY:vsock_port`
//!   (qemu/libvirt hosts with vhost-vsock). A guest is known by the CID the
//!   kernel gives for its connection; it gets the VM whose rule has that
//!   `vsock_cid`, nothing else.
//! - `firecracker`: per VM, a Unix socket at `<firecracker_uds>_<vsock_port>`,
//!   where Firecracker forwards the guest's connections to CID 2 port
//!   `vsock_port` (its host-side vsock convention); the socket serves that
//!   VM only.
//!
//! The guest connects to CID 2 (the host) port N over `AF_VSOCK`, or to a Unix
//! socket path (`energy.hypervisor_uds`: tests, or an agent that reaches the
//! host's `<uds_path>_<port>` directly); over either, the bytes are these.
//!
//! Protocol, version 1: request then response, repeated on one connection;
//! integers big-endian.
//! - request: `b"SCIV"`, version `u8` (1), name length `u8` (0..=64), the
//!   VM's name (UTF-8; empty: the VM this connection is for);
//! - response: `b"SCIV"`, version `u8` (1), status `u8`, body length `u32`
//!   (at most 64 KiB), body. Status 0: the body is the JSON document;
//!   1: nothing published yet (empty body); 2: not this peer's VM or no such
//!   VM; 3: bad request (wrong magic, version or length; the body says
//!   which, and the host closes the connection).
//!
//! Bounds: at most 16 connections at once (one more is closed at once,
//! counted `vms/vsock_busy`); a connection idle for 30 s is closed; every
//! reply is written within 5 s. Refusals are counted per host window in
//! `sci_energy_faults_total{source="vms"}` (`vsock_forbidden`,
//! `vsock_bad_request`, `vsock_busy`, `vsock_io`).
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::EnergyError;

pub const MAGIC: [u8; 4] = *b"SCIV";
pub const PROTOCOL_VERSION: u8 = 1;
pub const MAX_NAME_BYTES: usize = 64;
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const MAX_CONNECTIONS: usize = 16;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a listener looks at its stop flag.
const ACCEPT_POLL_MS: i32 = 200;
/// The host's CID as a guest sees it.
pub const HOST_CID: u32 = 2;

pub const STATUS_OK: u8 = 0;
pub const STATUS_UNPUBLISHED: u8 = 1;
pub const STATUS_FORBIDDEN: u8 = 2;
pub const STATUS_BAD_REQUEST: u8 = 3;

/// A request's bytes.
pub fn encode_request(vm: &str) -> Vec<u8> {
    let name = &vm.as_bytes()[..vm.len().min(MAX_NAME_BYTES)];
    let mut out = Vec::with_capacity(6 + name.len());
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out
}

fn encode_response(status: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + body.len());
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(status);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What a request could be read as.
enum Request {
    Vm(String),
    /// The peer closed or stayed idle: end quietly.
    End,
    Bad(String),
}

fn read_request(stream: &mut UnixStream) -> Request {
    let mut head = [0u8; 6];
    if stream.read_exact(&mut head).is_err() {
        return Request::End;
    }
    if head[..4] != MAGIC {
        return Request::Bad(format!("magic {:02x?} is not SCIV", &head[..4]));
    }
    if head[4] != PROTOCOL_VERSION {
        return Request::Bad(format!(
            "protocol version {} (this host speaks {PROTOCOL_VERSION})",
            head[4]
        ));
    }
    let len = usize::from(head[5]);
    if len > MAX_NAME_BYTES {
        return Request::Bad(format!("name of {len} bytes (at most {MAX_NAME_BYTES})"));
    }
    let mut name = vec![0u8; len];
    if stream.read_exact(&mut name).is_err() {
        return Request::End;
    }
    match String::from_utf8(name) {
        Ok(name) => Request::Vm(name),
        Err(_) => Request::Bad("the VM's name is not UTF-8".into()),
    }
}

/// Which VM a connection may read.
#[derive(Clone)]
enum Allowed {
    /// A per-VM socket (Firecracker).
    One(String),
    /// `AF_VSOCK`: the VM of the peer's CID.
    ByCid(Arc<BTreeMap<u32, String>>),
}

/// State shared by the publisher and the listener threads.
#[derive(Default)]
struct Shared {
    documents: Mutex<BTreeMap<String, Arc<Vec<u8>>>>,
    faults: Mutex<BTreeMap<String, u64>>,
    connections: AtomicUsize,
    /// Open connections, shut down when the server stops.
    open: Mutex<BTreeMap<u64, UnixStream>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn fault(&self, name: &str) {
        if let Ok(mut faults) = self.faults.lock() {
            *faults.entry(format!("vms/{name}")).or_default() += 1;
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Vsock(OwnedFd),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Vsock(fd) => fd.as_raw_fd(),
        }
    }

    /// A connection and the peer's CID (`AF_VSOCK` only).
    fn accept(&self) -> std::io::Result<(UnixStream, Option<u32>)> {
        match self {
            Listener::Unix(l) => {
                let (stream, _) = l.accept()?;
                stream.set_nonblocking(false)?;
                Ok((stream, None))
            }
            Listener::Vsock(fd) => {
                // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
                let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
                let mut len = SOCKADDR_VM_LEN;
                // SAFETY: addr and len are valid for the kernel to write.
                let conn = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        (&mut addr as *mut libc::sockaddr_vm).cast(),
                        &mut len,
                        libc::SOCK_CLOEXEC,
                    )
                };
                if conn < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let owned = unsafe { OwnedFd::from_raw_fd(conn) };
                // Only read/write and socket options are used on it: a vsock
                // stream behaves as any stream socket for those.
                Ok((UnixStream::from(owned), Some(addr.svm_cid)))
            }
        }
    }
}

fn last_error(what: &str, key: &str) -> EnergyError {
    let e = std::io::Error::last_os_error();
    EnergyError::Config(format!("{key}: {what}: {e}"))
}

/// A non-blocking `AF_VSOCK` stream socket and the address `cid:port`.
fn vsock_socket(cid: u32, port: u32) -> std::io::Result<(OwnedFd, libc::sockaddr_vm)> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    Ok((owned, addr))
}

const SOCKADDR_VM_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// Binds `AF_VSOCK` `VMADDR_CID_ANY:port`; the error names `key` and the errno.
fn listen_vsock(port: u32, key: &str) -> Result<OwnedFd, EnergyError> {
    let (owned, addr) = vsock_socket(libc::VMADDR_CID_ANY, port)
        .map_err(|e| EnergyError::Config(format!("{key}: AF_VSOCK socket: {e}")))?;
    // SAFETY: addr is a valid sockaddr_vm of the given length.
    let rc = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            SOCKADDR_VM_LEN,
        )
    };
    if rc < 0 {
        return Err(last_error(
            &format!("bind AF_VSOCK VMADDR_CID_ANY port {port}"),
            key,
        ));
    }
    // SAFETY: listen(2) on our socket.
    if unsafe { libc::listen(owned.as_raw_fd(), MAX_CONNECTIONS as i32) } < 0 {
        return Err(last_error(&format!("listen on AF_VSOCK port {port}"), key));
    }
    Ok(owned)
}

/// Binds a Unix socket at `path`, replacing a stale one (a socket file no
/// one accepts on: an earlier agent that did not remove it).
fn listen_unix(path: &Path, key: &str) -> Result<UnixListener, EnergyError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(EnergyError::Config(format!(
                "{key}: {} exists and is not a socket",
                path.display()
            )));
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(EnergyError::Config(format!(
                    "{key}: {} is in use by a running process",
                    path.display()
                )))
            }
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| EnergyError::Config(format!("{key}: bind {}: {e}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| EnergyError::Config(format!("{key}: {}: {e}", path.display())))?;
    Ok(listener)
}

/// One listener as configured: where, for which VM(s), and the config key
/// a bind error names.
pub enum Endpoint {
    /// `AF_VSOCK` port; guests by CID.
    Vsock {
        port: u32,
        vms_by_cid: BTreeMap<u32, String>,
        key: String,
    },
    /// A Unix socket for one VM (`<firecracker_uds>_<port>`).
    Unix {
        path: PathBuf,
        vm: String,
        key: String,
    },
}

/// The host's listeners (see the module note). Dropping it stops them and
/// removes its Unix sockets.
pub struct Server {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    unix_paths: Vec<PathBuf>,
}

impl Server {
    /// Binds every endpoint; an error names its key and the reason (errno).
    pub fn start(endpoints: Vec<Endpoint>) -> Result<Server, EnergyError> {
        let mut bound = Vec::new();
        let mut unix_paths = Vec::new();
        for endpoint in endpoints {
            match endpoint {
                Endpoint::Vsock {
                    port,
                    vms_by_cid,
                    key,
                } => bound.push((
                    Listener::Vsock(listen_vsock(port, &key)?),
                    Allowed::ByCid(Arc::new(vms_by_cid)),
                )),
                Endpoint::Unix { path, vm, key } => {
                    let listener = listen_unix(&path, &key)?;
                    unix_paths.push(path);
                    bound.push((Listener::Unix(listener), Allowed::One(vm)));
                }
            }
        }
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (listener, allowed) in bound {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop));
            let thread = std::thread::Builder::new()
                .name("sci-vms-vsock".into())
                .spawn(move || accept_loop(listener, allowed, shared, stop))
                .map_err(|e| EnergyError::Config(format!("vms.vsock: listener thread: {e}")))?;
            threads.push(thread);
        }
        Ok(Server {
            shared,
            stop,
            threads,
            unix_paths,
        })
    }

    /// The VM's document as it is now served.
    pub fn publish(&self, vm: &str, json: &str) {
        if let Ok(mut documents) = self.shared.documents.lock() {
            documents.insert(vm.to_string(), Arc::new(json.as_bytes().to_vec()));
        }
    }

    /// Refusals since the last call (`vms/vsock_*`).
    pub fn take_faults(&self) -> BTreeMap<String, u64> {
        self.shared
            .faults
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if let Ok(open) = self.shared.open.lock() {
            for stream in open.values() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
        for path in &self.unix_paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn accept_loop(listener: Listener, allowed: Allowed, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: listener.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) };
        if ready <= 0 {
            continue;
        }
        let (stream, peer_cid) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                // Out of descriptors or memory: counted, and no busy loop
                // while the pending connection stays unaccepted.
                shared.fault("vsock_io");
                std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS as u64));
                continue;
            }
        };
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            shared.fault("vsock_busy");
            continue;
        }
        let vm = match &allowed {
            Allowed::One(vm) => Some(vm.clone()),
            Allowed::ByCid(map) => peer_cid.and_then(|cid| map.get(&cid).cloned()),
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        if let (Ok(clone), Ok(mut open)) = (stream.try_clone(), shared.open.lock()) {
            open.insert(id, clone);
        }
        let spawned = std::thread::Builder::new()
            .name("sci-vms-vsock-conn".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    serve(stream, vm.as_deref(), &shared);
                    if let Ok(mut open) = shared.open.lock() {
                        open.remove(&id);
                    }
                    shared.connections.fetch_sub(1, Ordering::SeqCst);
                }
            });
        if spawned.is_err() {
            if let Ok(mut open) = shared.open.lock() {
                open.remove(&id);
            }
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            shared.fault("vsock_busy");
        }
    }
}

/// Answers requests on one connection until the peer closes, idles or errs.
fn serve(mut stream: UnixStream, vm: Option<&str>, shared: &Shared) {
    if stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        shared.fault("vsock_io");
        return;
    }
    loop {
        let (status, body, close) = match read_request(&mut stream) {
            Request::End => return,
            Request::Bad(reason) => {
                shared.fault("vsock_bad_request");
                (STATUS_BAD_REQUEST, Arc::new(reason.into_bytes()), true)
            }
            Request::Vm(name) => match vm.filter(|vm| name.is_empty() || name == *vm) {
                None => {
                    shared.fault("vsock_forbidden");
                    (STATUS_FORBIDDEN, Arc::new(Vec::new()), false)
                }
                Some(vm) => {
                    let document = shared
                        .documents
                        .lock()
                        .ok()
                        .and_then(|d| d.get(vm).cloned());
                    match document {
                        Some(doc) => (STATUS_OK, doc, false),
                        None => (STATUS_UNPUBLISHED, Arc::new(Vec::new()), false),
                    }
                }
            },
        };
        if stream.write_all(&encode_response(status, &body)).is_err() {
            shared.fault("vsock_io");
            return;
        }
        if close {
            return;
        }
    }
}

/// Where the guest's client connects.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Vsock { cid: u32, port: u32 },
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Target::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// The guest's side: one connection kept open, reopened after a failure.
pub struct Client {
    target: Target,
    vm: String,
    timeout: Duration,
    stream: Option<UnixStream>,
    /// A connection failed since the last successful read.
    broken: bool,
    reconnected: bool,
}

fn transport(target: &Target, fault: &'static str, reason: impl std::fmt::Display) -> EnergyError {
    EnergyError::Transport {
        endpoint: target.to_string(),
        fault,
        reason: reason.to_string(),
    }
}

fn io_fault(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timeout",
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => "refused",
        _ => "unreachable",
    }
}

/// Connects `AF_VSOCK` `cid:port` within `timeout`.
fn connect_vsock(cid: u32, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
    let (owned, addr) = vsock_socket(cid, port)?;
    // SAFETY: addr is a valid sockaddr_vm of the given length.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            SOCKADDR_VM_LEN,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd {
            fd: owned.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => return Err(std::io::ErrorKind::TimedOut.into()),
            n if n < 0 => return Err(std::io::Error::last_os_error()),
            _ => {}
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: err and len are valid for the kernel to write.
        let rc = unsafe {
            libc::getsockopt(
                owned.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err));
        }
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

impl Client {
    pub fn new(target: Target, vm: &str, timeout: Duration) -> Client {
        Client {
            target,
            vm: vm.to_string(),
            timeout,
            stream: None,
            broken: false,
            reconnected: false,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether the last successful read needed a new connection after a failed one.
    pub fn take_reconnected(&mut self) -> bool {
        std::mem::take(&mut self.reconnected)
    }

    fn connect(&self) -> Result<UnixStream, EnergyError> {
        let stream = match &self.target {
            Target::Vsock { cid, port } => connect_vsock(*cid, *port, self.timeout),
            Target::Unix(path) => UnixStream::connect(path),
        }
        .map_err(|e| transport(&self.target, io_fault(&e), format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| transport(&self.target, "unreachable", e))?;
        Ok(stream)
    }

    /// The host's document now. A connection that was open is tried once
    /// more on a fresh one (the host may have restarted since).
    pub fn fetch(&mut self) -> Result<Vec<u8>, EnergyError> {
        let had_stream = self.stream.is_some();
        match self.fetch_once() {
            Ok(body) => Ok(body),
            Err(EnergyError::Transport { fault, .. }) if had_stream && fault != "timeout" => {
                self.fetch_once()
            }
            Err(e) => Err(e),
        }
    }

    fn fetch_once(&mut self) -> Result<Vec<u8>, EnergyError> {
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => {
                let stream = self.connect().inspect_err(|_| self.broken = true)?;
                if std::mem::take(&mut self.broken) {
                    self.reconnected = true;
                }
                stream
            }
        };
        let result = exchange(&mut stream, &self.vm, &self.target);
        match &result {
            Ok(_) => self.stream = Some(stream),
            Err(_) => self.broken = true,
        }
        result
    }
}

fn exchange(stream: &mut UnixStream, vm: &str, target: &Target) -> Result<Vec<u8>, EnergyError> {
    let io = |e: std::io::Error| {
        let fault = match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "closed",
            _ => io_fault(&e),
        };
        transport(target, fault, e)
    };
    stream.write_all(&encode_request(vm)).map_err(io)?;
    let mut head = [0u8; 10];
    stream.read_exact(&mut head).map_err(io)?;
    if head[..4] != MAGIC || head[4] != PROTOCOL_VERSION {
        return Err(transport(
            target,
            "garbage",
            format!("not a version {PROTOCOL_VERSION} SCIV response: {head:02x?}"),
        ));
    }
    let len = u32::from_be_bytes([head[6], head[7], head[8], head[9]]) as usize;
    if len > MAX_BODY_BYTES {
        return Err(transport(
            target,
            "garbage",
            format!("a body of {len} bytes (at most {MAX_BODY_BYTES})"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(io)?;
    match head[5] {
        STATUS_OK => Ok(body),
        STATUS_UNPUBLISHED => Err(transport(
            target,
            "unpublished",
            "the host agent has published no window yet",
        )),
        STATUS_FORBIDDEN => Err(transport(
            target,
            "forbidden",
            format!(
                "the host serves no VM {} to this peer",
                if vm.is_empty() { "(any)" } else { vm }
            ),
        )),
        STATUS_BAD_REQUEST => Err(transport(
            target,
            "bad_request",
            String::from_utf8_lossy(&body),
        )),
        other => Err(transport(target, "garbage", format!("status {other}"))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_af_vsock_listener_that_cannot_bind_says_the_key_and_the_errno() {
        // Listening is local: bind VMADDR_CID_ANY on a port, then the same
        // port again, which the kernel refuses (EADDRINUSE). Where AF_VSOCK
        // cannot bind at all, the first bind's error is checked instead.
        let port = 52_000 + std::process::id() % 10_000;
        let endpoints = || {
            vec![Endpoint::Vsock {
                port,
                vms_by_cid: BTreeMap::new(),
                key: "vms.vsock_port".into(),
            }]
        };
        let (error, first) = match Server::start(endpoints()) {
            Ok(first) => (Server::start(endpoints()).err(), Some(first)),
            Err(e) => (Some(e), None),
        };
        let text = error.map(|e| e.to_string()).unwrap_or_default();
        println!(
            "first bind {}: {text}",
            if first.is_some() {
                "succeeded"
            } else {
                "failed"
            }
        );
        assert!(text.contains("vms.vsock_port"), "{text}");
        assert!(text.contains(&format!("port {port}")), "{text}");
        assert!(text.contains("(os error "), "{text}");
        if first.is_some() {
            assert!(
                text.contains("Address in use") || text.contains("in use"),
                "{text}"
            );
        }
    }

    fn start_unix(dir: &Path, vm: &str) -> (Server, PathBuf) {
        let path = dir.join("v.sock_5200");
        let server = Server::start(vec![Endpoint::Unix {
            path: path.clone(),
            vm: vm.into(),
            key: "vms.rules[0].firecracker_uds".into(),
        }])
        .unwrap();
        (server, path)
    }

    #[test]
    fn a_unix_socket_serves_its_vm_only_and_counts_what_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let (server, path) = start_unix(dir.path(), "vm1");
        let timeout = Duration::from_secs(2);
        let mut client = Client::new(Target::Unix(path.clone()), "", timeout);
        let e = client.fetch().unwrap_err();
        assert_eq!(super::super::fault_name(&e), "unpublished", "{e}");
        server.publish("vm1", "{\"energy_uj\": 7}");
        assert_eq!(client.fetch().unwrap(), b"{\"energy_uj\": 7}");
        let mut other = Client::new(Target::Unix(path.clone()), "vm2", timeout);
        let e = other.fetch().unwrap_err();
        assert_eq!(super::super::fault_name(&e), "forbidden", "{e}");
        // A request of another version: refused, named, the connection closed.
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"SCIV\x09\x00").unwrap();
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).unwrap();
        assert_eq!(reply[5], STATUS_BAD_REQUEST);
        assert!(String::from_utf8_lossy(&reply[10..]).contains("protocol version 9"));
        let faults = server.take_faults();
        assert_eq!(faults.get("vms/vsock_forbidden"), Some(&1), "{faults:?}");
        assert_eq!(faults.get("vms/vsock_bad_request"), Some(&1), "{faults:?}");
        // The host restarts: the client's open connection breaks, it reconnects within the same read.
        drop(server);
        assert!(
            !path.exists(),
            "the socket is removed when the server stops"
        );
        let e = client.fetch().unwrap_err();
        assert_eq!(super::super::fault_name(&e), "refused", "{e}");
        let (server, _) = start_unix(dir.path(), "vm1");
        server.publish("vm1", "{}");
        assert_eq!(client.fetch().unwrap(), b"{}");
        assert!(client.take_reconnected());
        assert!(!client.take_reconnected());
    }

    #[test]
    fn a_stale_socket_file_is_replaced_and_a_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock_5200");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (server, _) = start_unix(dir.path(), "vm1");
        let e = Server::start(vec![Endpoint::Unix {
            path: path.clone(),
            vm: "vm1".into(),
            key: "vms.rules[0].firecracker_uds".into(),
        }])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            e.contains("vms.rules[0].firecracker_uds") && e.contains("in use"),
            "{e}"
        );
        drop(server);
    }
}
