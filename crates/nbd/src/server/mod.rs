//! The NBD transport: listeners, one thread per connection (more while it has requests in
//! flight), admission of new connections, and orderly shutdown.
//!
//! This module owns sockets, threads, timeouts, limits and the policy of what the server
//! offers (which transmission flags, which metadata contexts, which export a name maps
//! to). It does not own byte layouts (that is [`crate::proto`]) nor storage (that is the
//! [`Export`] behind each name). It installs no signal handlers: the embedding program
//! calls [`ShutdownHandle::stop`] from its own handler.
//!
//! Life of a server: [`Server::new`], [`Server::add_export`] one or more times, then one
//! or more `serve_*` calls (each blocks, possibly on different threads sharing `&Server`)
//! until [`ShutdownHandle::stop`]. On stop the listeners stop accepting, every live
//! connection's read side is shut so no new request is taken, requests already read are
//! finished and answered, then each export is flushed and `serve_*` returns `Ok(())`.
//! A stopped server stays stopped.
//!
//! Admission: [`ServerConfig::max_connections`] bounds the connections of the whole server
//! (every listener), and [`ServerConfig::max_handshakes`], a smaller budget, those still
//! negotiating, so clients that never finish negotiating (each cut after
//! [`ServerConfig::handshake_timeout`]) cannot take the room of clients that do. A new
//! connection when the handshake budget is full cuts the one negotiating longest; a new
//! connection when the server is full is closed at once. Both are logged at warn, a few
//! lines a second at most.

mod handshake;
mod ratelimit;
mod transmission;
pub(crate) mod transport;

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::export::Export;
use crate::proto::{BASE_ALLOCATION, MAX_STRING_LEN};
use ratelimit::RateLimit;
use transport::{Listener, Shut, Transport, WakeAddr, Waker};

/// Why a connection ended early (logged, never returned to the server).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Decode(#[from] crate::proto::DecodeError),
    #[error("negotiation took longer than the handshake timeout")]
    HandshakeTimeout,
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("{0}")]
    BadExportName(crate::proto::OptionError),
    #[error("cut by the server during negotiation to make room for a new connection")]
    Evicted,
}

/// Limits and timeouts of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest read or write payload accepted (and advertised as maximum block size,
    /// lowered further if an export asks). Default 32 MiB.
    pub max_payload: u32,
    /// Largest option payload accepted during negotiation; larger ones are skipped and
    /// answered with `NBD_REP_ERR_TOO_BIG`. Default 64 KiB.
    pub max_option_len: u32,
    /// Most worker threads per connection running requests in parallel; each holds at most
    /// one request, so this also bounds what a connection holds in flight. A connection starts
    /// with one (its own thread) and starts more only while requests keep them busy. Default 4.
    pub workers_per_connection: usize,
    /// Workers running a flush do not count against `workers_per_connection`, up to this many
    /// of them: a connection may then run that many more threads, each waiting for a flush,
    /// while the others go on with the requests behind the flushes. Default 32.
    pub flush_workers_per_connection: usize,
    /// How long a worker other than a connection's first waits for a request before it ends
    /// (so an idle connection holds one thread). Default 1 s.
    pub worker_linger: Duration,
    /// Connections served at once by the whole server (all listeners), negotiating or not;
    /// more are closed on accept. Default 1024.
    pub max_connections: usize,
    /// Connections still negotiating at once, at most (capped to `max_connections`). When
    /// a new connection would exceed it, the connection negotiating longest is cut. Default 64.
    pub max_handshakes: usize,
    /// Time a client has to finish negotiation (every read and write of it included).
    /// Default 10 s.
    pub handshake_timeout: Duration,
    /// Time a reply write may make no progress because the client does not read; the
    /// connection is dropped after it. `None` waits forever. Default 60 s.
    pub write_timeout: Option<Duration>,
    /// Time given to live connections to finish after stop before they are cut. Default 10 s.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload: 32 << 20,
            max_option_len: 64 << 10,
            workers_per_connection: 4,
            flush_workers_per_connection: 32,
            worker_linger: Duration::from_secs(1),
            max_connections: 1024,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Some(Duration::from_secs(60)),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Errors of [`Server`] set-up and listening. Per-connection problems are logged, never
/// returned: one client cannot stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// `serve_*` was called before any export was added.
    #[error("no export was added to the server")]
    NoExports,
    /// Two exports with one name.
    #[error("export name {0:?} is already used")]
    DuplicateExport(String),
    /// The name cannot be sent in the protocol.
    #[error("export name {name:?} is invalid: {reason}")]
    InvalidExportName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address or path.
        addr: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The listening socket failed in a way that cannot be retried.
    #[error("listener failed: {0}")]
    Listener(#[source] io::Error),
}

/// One named export and what was computed about it once.
#[derive(Clone)]
pub(crate) struct ExportEntry {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) export: Arc<dyn Export>,
    /// `base:allocation` first, then the export's extra contexts; id = index + 1.
    pub(crate) contexts: Vec<String>,
}

/// What every connection thread shares.
pub(crate) struct Ctx {
    pub(crate) exports: Vec<ExportEntry>,
    pub(crate) config: ServerConfig,
    pub(crate) shared: Arc<Shared>,
}

impl Ctx {
    /// Export index for `name`; the empty name picks the first export unless one is
    /// literally named "".
    pub(crate) fn find(&self, name: &str) -> Option<usize> {
        self.exports
            .iter()
            .position(|e| e.name == name)
            .or_else(|| (name.is_empty() && !self.exports.is_empty()).then_some(0))
    }
}

/// State shared between a server, its handles and its connections.
#[derive(Default)]
pub(crate) struct Shared {
    stopping: AtomicBool,
    wakers: Mutex<Vec<(u64, Waker)>>,
    next_waker: AtomicU64,
    /// Live connections of every `serve_*` call.
    conns: ConnRegistry,
    /// Log lines for I/O errors returned to clients.
    pub(crate) io_errors: RateLimit,
    /// Log lines for connections refused or cut by admission.
    refusals: RateLimit,
}

impl Shared {
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
    fn register(&self, w: Waker) -> u64 {
        let id = self.next_waker.fetch_add(1, Ordering::SeqCst);
        lock(&self.wakers).push((id, w));
        id
    }
    fn unregister(&self, id: u64) {
        lock(&self.wakers).retain(|(i, _)| *i != id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cloneable handle that stops a [`Server`] from any thread (for example a signal
/// handler thread in the CLI).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").field("stopped", &self.is_stopped()).finish()
    }
}

impl ShutdownHandle {
    /// Asks every `serve_*` call of the server to stop; returns at once. The `serve_*`
    /// calls return after in-flight requests finished and exports were flushed.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let wakers: Vec<Waker> = lock(&self.shared.wakers).iter().map(|(_, w)| w.clone()).collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Whether [`ShutdownHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.shared.is_stopping()
    }
}

/// Live connections of a server, so admission can count them and shutdown reach them.
#[derive(Default)]
struct ConnRegistry {
    conns: Mutex<Conns>,
    emptied: Condvar,
}

#[derive(Default)]
struct Conns {
    map: HashMap<u64, ConnEntry>,
    /// Entries still negotiating.
    negotiating: usize,
    next_id: u64,
}

struct ConnEntry {
    peer: String,
    shut: Box<dyn Shut>,
    /// When negotiation started; `None` once in transmission.
    negotiating_since: Option<Instant>,
}

/// What admission decided for a new connection.
enum Admission {
    /// Admitted under this id.
    Admitted(u64),
    /// Admitted under this id after cutting the connection negotiating longest.
    Evicted { id: u64, peer: String, negotiating_for: Duration },
    /// The server is full.
    Refused { open: usize },
}

impl ConnRegistry {
    /// Admits a new connection (as negotiating) if the limits allow, see [`Admission`].
    fn admit(&self, peer: &str, shut: Box<dyn Shut>, config: &ServerConfig) -> Admission {
        let mut c = lock(&self.conns);
        if c.map.len() >= config.max_connections {
            return Admission::Refused { open: c.map.len() };
        }
        let mut evicted = None;
        if c.negotiating >= config.max_handshakes {
            let oldest = c
                .map
                .iter()
                .filter_map(|(id, e)| e.negotiating_since.map(|since| (since, *id)))
                .min()
                .map(|(_, id)| id);
            if let Some(victim) = oldest.and_then(|id| c.map.remove(&id)) {
                c.negotiating -= 1;
                victim.shut.shut(Shutdown::Both);
                let since = victim.negotiating_since.unwrap_or_else(Instant::now);
                evicted = Some((victim.peer, since.elapsed()));
            }
        }
        let id = c.next_id;
        c.next_id += 1;
        c.map.insert(id, ConnEntry { peer: peer.to_string(), shut, negotiating_since: Some(Instant::now()) });
        c.negotiating += 1;
        match evicted {
            Some((peer, negotiating_for)) => Admission::Evicted { id, peer, negotiating_for },
            None => Admission::Admitted(id),
        }
    }

    /// Moves a connection from negotiating to transmission; false if it was cut meanwhile.
    fn enter_transmission(&self, id: u64) -> bool {
        let mut c = lock(&self.conns);
        let was_negotiating = c.map.get_mut(&id).and_then(|e| e.negotiating_since.take()).is_some();
        if was_negotiating {
            c.negotiating -= 1;
        }
        was_negotiating
    }

    fn remove(&self, id: u64) {
        let mut c = lock(&self.conns);
        if let Some(e) = c.map.remove(&id)
            && e.negotiating_since.is_some()
        {
            c.negotiating -= 1;
        }
        if c.map.is_empty() {
            self.emptied.notify_all();
        }
    }

    fn shutdown_all(&self, how: Shutdown) {
        for e in lock(&self.conns).map.values() {
            e.shut.shut(how);
        }
    }

    /// Waits until no connection is left or `timeout` passed; true if empty.
    fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.conns);
        while !c.map.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = self.emptied.wait_timeout(c, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }
}

/// Removes a connection from the registry when its thread ends, however it ends.
struct Registered {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.shared.conns.remove(self.id);
    }
}

/// An NBD server: a set of named exports served over TCP and/or Unix sockets.
pub struct Server {
    exports: Vec<ExportEntry>,
    config: ServerConfig,
    shared: Arc<Shared>,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.exports.iter().map(|e| &e.name).collect::<Vec<_>>())
            .field("config", &self.config)
            .finish()
    }
}

impl Server {
    /// A server with no exports and default limits.
    pub fn new() -> Self {
        Self::with_config(ServerConfig::default())
    }

    /// A server with no exports and the given limits.
    pub fn with_config(mut config: ServerConfig) -> Self {
        config.max_payload = config.max_payload.max(512);
        config.workers_per_connection = config.workers_per_connection.max(1);
        config.max_connections = config.max_connections.max(1);
        config.max_handshakes = config.max_handshakes.clamp(1, config.max_connections);
        Self { exports: Vec::new(), config, shared: Arc::new(Shared::default()) }
    }

    /// The limits in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Adds an export. The first export added is also served under the empty name "",
    /// which clients use when they give no name (`nbd://host`). The export's metadata
    /// contexts are read once, here.
    pub fn add_export(
        &mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        export: Arc<dyn Export>,
    ) -> Result<(), ServerError> {
        let name = name.into();
        let invalid = |reason| ServerError::InvalidExportName { name: name.clone(), reason };
        if name.len() > MAX_STRING_LEN {
            return Err(invalid("longer than 4096 bytes"));
        }
        if name.contains('\0') {
            return Err(invalid("contains NUL"));
        }
        if self.exports.iter().any(|e| e.name == name) {
            return Err(ServerError::DuplicateExport(name));
        }
        let mut contexts = vec![BASE_ALLOCATION.to_string()];
        for c in export.extra_meta_contexts() {
            if c.contains(':') && !c.contains('\0') && c.len() <= MAX_STRING_LEN && !contexts.contains(&c) {
                contexts.push(c);
            } else {
                tracing::warn!(export = %name, context = %c, "ignoring invalid or duplicate metadata context name");
            }
        }
        let mut description = description.into();
        description.retain(|c| c != '\0');
        self.exports.push(ExportEntry { name, description, export, contexts });
        Ok(())
    }

    /// A handle that stops this server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { shared: Arc::clone(&self.shared) }
    }

    /// Binds `addr` and serves on it until stopped.
    pub fn serve_tcp(&self, addr: impl ToSocketAddrs + std::fmt::Debug) -> Result<(), ServerError> {
        let listener = TcpListener::bind(&addr)
            .map_err(|source| ServerError::Bind { addr: format!("{addr:?}"), source })?;
        self.serve_tcp_listener(listener)
    }

    /// Serves on an already bound TCP listener until stopped (useful to bind port 0 and
    /// learn the port first).
    pub fn serve_tcp_listener(&self, listener: TcpListener) -> Result<(), ServerError> {
        let addr = listener.local_addr().map_err(ServerError::Listener)?;
        tracing::info!(%addr, "NBD server listening on TCP");
        let waker = Waker::new(&listener, WakeAddr::Tcp(addr)).map_err(ServerError::Listener)?;
        self.serve_loop(listener, waker)
    }

    /// Binds a Unix socket at `path` (which must not exist) and serves on it until
    /// stopped; the socket file is removed on return.
    pub fn serve_unix(&self, path: impl AsRef<Path>) -> Result<(), ServerError> {
        let path = path.as_ref();
        let listener = UnixListener::bind(path)
            .map_err(|source| ServerError::Bind { addr: path.display().to_string(), source })?;
        let result = self.serve_unix_listener(listener);
        let _ = std::fs::remove_file(path);
        result
    }

    /// Serves on an already bound Unix listener until stopped (the socket file is left).
    pub fn serve_unix_listener(&self, listener: UnixListener) -> Result<(), ServerError> {
        let path: PathBuf = listener
            .local_addr()
            .map_err(ServerError::Listener)?
            .as_pathname()
            .map(Path::to_path_buf)
            .ok_or_else(|| ServerError::Listener(io::Error::other("unnamed Unix socket cannot be woken")))?;
        tracing::info!(path = %path.display(), "NBD server listening on Unix socket");
        let waker = Waker::new(&listener, WakeAddr::Unix(path)).map_err(ServerError::Listener)?;
        self.serve_loop(listener, waker)
    }

    /// Runs one connection over an arbitrary stream on the calling thread (fuzzing).
    pub(crate) fn run_session<S: Transport>(&self, stream: S) {
        let ctx = self.ctx();
        handshake::run_connection(&ctx, stream, "in-memory", &|| true);
    }

    fn ctx(&self) -> Ctx {
        Ctx { exports: self.exports.clone(), config: self.config.clone(), shared: Arc::clone(&self.shared) }
    }

    fn serve_loop<L: Listener>(&self, listener: L, waker: Waker) -> Result<(), ServerError> {
        if self.exports.is_empty() {
            return Err(ServerError::NoExports);
        }
        let ctx = Arc::new(self.ctx());
        let registry = &self.shared.conns;
        let waker_id = self.shared.register(waker);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut result = Ok(());

        while !self.shared.is_stopping() {
            let (stream, peer) = match listener.accept_conn() {
                Ok(x) => x,
                Err(e) if self.shared.is_stopping() => {
                    tracing::debug!(error = %e, "accept failed while stopping");
                    break;
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::WouldBlock => continue,
                    io::ErrorKind::InvalidInput | io::ErrorKind::NotConnected => {
                        result = Err(ServerError::Listener(e));
                        break;
                    }
                    _ => {
                        // Typically out of file descriptors: back off instead of spinning.
                        if let Some(suppressed) = self.shared.refusals.admit() {
                            tracing::warn!(error = %e, suppressed, "accept failed; retrying");
                        }
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                },
            };
            if self.shared.is_stopping() {
                break;
            }
            threads.retain(|t| !t.is_finished());
            let shut = match stream.try_clone_stream() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot clone connection socket; closing it");
                    continue;
                }
            };
            let id = match self.shared.conns.admit(&peer, Box::new(shut), &ctx.config) {
                Admission::Admitted(id) => id,
                Admission::Evicted { id, peer: cut, negotiating_for } => {
                    if let Some(suppressed) = self.shared.refusals.admit() {
                        tracing::warn!(
                            %peer, cut = %cut, negotiating_ms = negotiating_for.as_millis(),
                            limit = ctx.config.max_handshakes, suppressed,
                            "too many NBD connections negotiating at once; cut the one negotiating longest"
                        );
                    }
                    id
                }
                Admission::Refused { open } => {
                    if let Some(suppressed) = self.shared.refusals.admit() {
                        tracing::warn!(
                            %peer, open, limit = ctx.config.max_connections, suppressed,
                            "too many NBD connections; refusing a new one"
                        );
                    }
                    continue;
                }
            };
            let guard = Registered { shared: Arc::clone(&self.shared), id };
            let ctx = Arc::clone(&ctx);
            let spawned = thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || {
                let shared = Arc::clone(&guard.shared);
                handshake::run_connection(&ctx, stream, &peer, &|| shared.conns.enter_transmission(id));
                drop(guard);
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => tracing::warn!(error = %e, "cannot start a connection thread"),
            }
        }

        self.shared.unregister(waker_id);
        drop(listener);
        // No new request is read from now on; what was read is finished and answered.
        registry.shutdown_all(Shutdown::Read);
        if !registry.wait_empty(ctx.config.shutdown_grace) {
            tracing::warn!("connections did not finish within the grace period; cutting them");
            registry.shutdown_all(Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
        transmission::report_suppressed_io_errors(&ctx);
        for e in &ctx.exports {
            if let Err(err) = e.export.flush() {
                tracing::error!(export = %e.name, error = %err, "flush at shutdown failed");
            }
        }
        tracing::info!("NBD listener stopped");
        result
    }
}
