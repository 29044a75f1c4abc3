//! The NBD transport: listeners, one thread per connection (more while it has requests in
//! flight), admission of new connections, and orderly shutdown.
//!
//! This module owns sockets, threads, timeouts, limits and the policy of what the server
//! offers (which transmission flags, which metadata contexts, which export a name maps
//! to). It does not own byte layouts (that is [`crate::proto`]) nor storage (that is the
//! [`Export`] behind each name). It installs no signal handlers: the embedding program
//! calls [`ShutdownHandle::stop`] from its own handler.
//!
//! Life of a server: [`Server::new`], then one or more `serve_*` calls (each blocks,
//! possibly on different threads sharing `&Server`) until [`ShutdownHandle::stop`]. On stop
//! the listeners stop accepting, every live connection's read side is shut so no new request
//! is taken, requests already read are finished and answered, then each export is flushed and
//! `serve_*` returns `Ok(())`. A stopped server stays stopped.
//!
//! The export table is the server's own (one lock, `Shared::exports`) and changes while it
//! serves: [`Server::add_export`] makes a name selectable by the next negotiation;
//! [`Server::remove_export`] makes it unselectable at once (a new client asking for it gets
//! `NBD_REP_ERR_UNKNOWN`), shuts the read side of the connections using it (no new request is
//! read; those already read are finished and answered, then the server closes the connection),
//! and hands back a [`RemovedExport`] that tells when they are all gone.
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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
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
    /// No export has that name.
    #[error("no export named {0:?}")]
    UnknownExport(String),
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
pub(crate) struct ExportEntry {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) export: Arc<dyn Export>,
    /// `base:allocation` first, then the export's extra contexts; id = index + 1.
    pub(crate) contexts: Vec<String>,
    /// What its connections did, over its life.
    pub(crate) counters: ExportCounters,
    /// Set (under the connection registry's lock) when it is removed: a connection that
    /// negotiated it before then cannot enter transmission after.
    removed: AtomicBool,
}

/// Counters of one export, summed over its connections.
#[derive(Debug, Default)]
pub(crate) struct ExportCounters {
    /// Connections in transmission with it now.
    clients: AtomicU64,
    /// Connections that entered transmission with it, ever.
    pub(crate) connections: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    /// Export errors returned to clients.
    pub(crate) io_errors: AtomicU64,
    /// How long requests took, from read to reply sent.
    pub(crate) latency: Latency,
}

/// Upper bounds (seconds) of the request latency histogram's buckets ([`ExportStatus`]);
/// a last bucket, unbounded, follows.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A histogram of request latencies: one counter per bucket of [`LATENCY_BUCKETS`] and one
/// for longer ones, and the sum.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Latency {
    pub(crate) fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let at = LATENCY_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(LATENCY_BUCKETS.len());
        self.counts[at].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// A snapshot of one export of a [`Server`] and its counters ([`Server::exports`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportStatus {
    /// Its name.
    pub name: String,
    /// Its description (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it refuses writes.
    pub read_only: bool,
    /// Connections in transmission with it now.
    pub clients: u64,
    /// Connections that entered transmission with it since it was added.
    pub connections: u64,
    /// Requests received on its connections.
    pub requests: u64,
    /// Bytes read by its clients.
    pub bytes_read: u64,
    /// Bytes written by its clients.
    pub bytes_written: u64,
    /// Errors of the export returned to its clients.
    pub io_errors: u64,
    /// Requests run (read to reply sent) whose time fell in each bucket of
    /// [`LATENCY_BUCKETS`], then those longer than the last bound (not cumulative).
    pub latency_counts: Vec<u64>,
    /// The time of all of them, in nanoseconds.
    pub latency_sum_nanos: u64,
}

impl ExportEntry {
    fn status(&self) -> ExportStatus {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStatus {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.export.size(),
            read_only: self.export.read_only(),
            clients: get(&c.clients),
            connections: get(&c.connections),
            requests: get(&c.requests),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            io_errors: get(&c.io_errors),
            latency_counts: c.latency.counts.iter().map(get).collect(),
            latency_sum_nanos: get(&c.latency.sum_nanos),
        }
    }
}

/// What every connection thread shares.
pub(crate) struct Ctx {
    pub(crate) config: ServerConfig,
    pub(crate) shared: Arc<Shared>,
}

impl Ctx {
    /// The export named `name`; the empty name picks the first export unless one is
    /// literally named "".
    pub(crate) fn find(&self, name: &str) -> Option<Arc<ExportEntry>> {
        let table = read(&self.shared.exports);
        table
            .iter()
            .find(|e| e.name == name)
            .or_else(|| if name.is_empty() { table.first() } else { None })
            .cloned()
    }

    /// The exports now, in the order they were added.
    pub(crate) fn exports(&self) -> Vec<Arc<ExportEntry>> {
        read(&self.shared.exports).clone()
    }
}

/// State shared between a server, its handles and its connections.
#[derive(Default)]
pub(crate) struct Shared {
    stopping: AtomicBool,
    wakers: Mutex<Vec<(u64, Waker)>>,
    next_waker: AtomicU64,
    /// The export table, in the order exports were added.
    exports: RwLock<Vec<Arc<ExportEntry>>>,
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

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
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
    /// The export it transmits with, once in transmission.
    export: Option<Arc<ExportEntry>>,
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
        c.map.insert(
            id,
            ConnEntry { peer: peer.to_string(), shut, negotiating_since: Some(Instant::now()), export: None },
        );
        c.negotiating += 1;
        match evicted {
            Some((peer, negotiating_for)) => Admission::Evicted { id, peer, negotiating_for },
            None => Admission::Admitted(id),
        }
    }

    /// Moves a connection from negotiating to transmission with `export`; false if it was
    /// cut meanwhile, or the export was removed since the connection selected it.
    fn enter_transmission(&self, id: u64, export: &Arc<ExportEntry>) -> bool {
        let mut c = lock(&self.conns);
        if export.removed.load(Ordering::SeqCst) {
            return false;
        }
        let Some(e) = c.map.get_mut(&id) else { return false };
        if e.negotiating_since.take().is_none() {
            return false;
        }
        e.export = Some(Arc::clone(export));
        c.negotiating -= 1;
        export.counters.clients.fetch_add(1, Ordering::SeqCst);
        export.counters.connections.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn remove(&self, id: u64) {
        let mut c = lock(&self.conns);
        if let Some(e) = c.map.remove(&id) {
            if e.negotiating_since.is_some() {
                c.negotiating -= 1;
            }
            if let Some(x) = e.export {
                x.counters.clients.fetch_sub(1, Ordering::SeqCst);
                // Someone may wait for the connections of this export to end.
                self.emptied.notify_all();
            }
        }
        if c.map.is_empty() {
            self.emptied.notify_all();
        }
    }

    /// Shuts (`how`) every connection transmitting with `export`.
    fn shutdown_export(&self, export: &Arc<ExportEntry>, how: Shutdown) {
        for e in lock(&self.conns).map.values() {
            if e.export.as_ref().is_some_and(|x| Arc::ptr_eq(x, export)) {
                e.shut.shut(how);
            }
        }
    }

    /// Waits until no connection transmits with `export`, or `timeout` passed; true if none.
    fn wait_export_closed(&self, export: &Arc<ExportEntry>, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut c = lock(&self.conns);
        while c.map.values().any(|e| e.export.as_ref().is_some_and(|x| Arc::ptr_eq(x, export))) {
            c = match deadline {
                None => self.emptied.wait(c).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.emptied.wait_timeout(c, left).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
        true
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

/// An export taken out of a [`Server`] by [`Server::remove_export`]: its connections are
/// finishing the requests they had read; this tells when they are gone.
pub struct RemovedExport {
    shared: Arc<Shared>,
    entry: Arc<ExportEntry>,
}

impl std::fmt::Debug for RemovedExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemovedExport").field("name", &self.entry.name).finish()
    }
}

impl RemovedExport {
    /// The name it had.
    pub fn name(&self) -> &str {
        &self.entry.name
    }

    /// The export itself (to flush it once its connections are gone).
    pub fn export(&self) -> &Arc<dyn Export> {
        &self.entry.export
    }

    /// Its counters as they stand.
    pub fn status(&self) -> ExportStatus {
        self.entry.status()
    }

    /// Waits until every connection that used it has ended (each after answering the
    /// requests it had read), for ever or up to `timeout`; true if they all have.
    pub fn wait_closed(&self, timeout: Option<Duration>) -> bool {
        self.shared.conns.wait_export_closed(&self.entry, timeout)
    }

    /// Cuts the connections still using it (both directions): for clients that do not let
    /// their requests finish within the caller's patience.
    pub fn cut(&self) {
        self.shared.conns.shutdown_export(&self.entry, Shutdown::Both);
    }
}

/// An NBD server: a set of named exports served over TCP and/or Unix sockets.
pub struct Server {
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
            .field("exports", &read(&self.shared.exports).iter().map(|e| e.name.clone()).collect::<Vec<_>>())
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
        Self { config, shared: Arc::new(Shared::default()) }
    }

    /// The limits in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Adds an export, before or while serving: the next negotiation can select it. The
    /// first export of the table (the oldest still there) is also served under the empty
    /// name "", which clients use when they give no name (`nbd://host`). The export's
    /// metadata contexts are read once, here.
    pub fn add_export(
        &self,
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
        let mut table = write(&self.shared.exports);
        if table.iter().any(|e| e.name == name) {
            return Err(ServerError::DuplicateExport(name));
        }
        let counters = ExportCounters::default();
        table.push(Arc::new(ExportEntry {
            name,
            description,
            export,
            contexts,
            counters,
            removed: false.into(),
        }));
        Ok(())
    }

    /// Removes the export `name` while serving: a new client asking for it from now on gets
    /// `NBD_REP_ERR_UNKNOWN`; the connections using it read no new request, finish and answer
    /// the ones they had read, then are closed by the server. The returned handle tells when
    /// they are gone ([`RemovedExport::wait_closed`]); the export is not flushed here.
    pub fn remove_export(&self, name: &str) -> Result<RemovedExport, ServerError> {
        let entry = {
            let mut table = write(&self.shared.exports);
            let at = table.iter().position(|e| e.name == name);
            let Some(at) = at else { return Err(ServerError::UnknownExport(name.to_string())) };
            table.remove(at)
        };
        {
            // Under the registry's lock: a connection either entered transmission before (and
            // is shut here) or will see `removed` and not enter.
            let c = lock(&self.shared.conns.conns);
            entry.removed.store(true, Ordering::SeqCst);
            for e in c.map.values() {
                if e.export.as_ref().is_some_and(|x| Arc::ptr_eq(x, &entry)) {
                    e.shut.shut(Shutdown::Read);
                }
            }
        }
        tracing::info!(export = %name, "NBD export removed; its connections finish their requests");
        Ok(RemovedExport { shared: Arc::clone(&self.shared), entry })
    }

    /// The exports now, in the order they were added, with their counters.
    pub fn exports(&self) -> Vec<ExportStatus> {
        read(&self.shared.exports).iter().map(|e| e.status()).collect()
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
        self.serve_tcp_on(listener, false)
    }

    /// [`Server::serve_tcp_listener`] on a listening socket that other processes hold too (one
    /// handed over by systemd socket activation): stopping leaves the socket itself as it is,
    /// so that the next server given it accepts on it (see [`Server::serve_unix_listener_shared`]).
    pub fn serve_tcp_listener_shared(&self, listener: TcpListener) -> Result<(), ServerError> {
        self.serve_tcp_on(listener, true)
    }

    fn serve_tcp_on(&self, listener: TcpListener, shared: bool) -> Result<(), ServerError> {
        let addr = listener.local_addr().map_err(ServerError::Listener)?;
        tracing::info!(%addr, shared, "NBD server listening on TCP");
        let waker = Waker::new(&listener, WakeAddr::Tcp(addr), shared).map_err(ServerError::Listener)?;
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
        self.serve_unix_on(listener, false)
    }

    /// [`Server::serve_unix_listener`] on a listening socket that other processes hold too
    /// (one handed over by systemd socket activation, which keeps it across restarts of the
    /// server). Stopping wakes the accepting thread by connecting to the socket rather than by
    /// shutting it down, which would shut it for every process that holds it: the next server
    /// given the socket could not accept on it.
    pub fn serve_unix_listener_shared(&self, listener: UnixListener) -> Result<(), ServerError> {
        self.serve_unix_on(listener, true)
    }

    fn serve_unix_on(&self, listener: UnixListener, shared: bool) -> Result<(), ServerError> {
        let path: PathBuf = listener
            .local_addr()
            .map_err(ServerError::Listener)?
            .as_pathname()
            .map(Path::to_path_buf)
            .ok_or_else(|| ServerError::Listener(io::Error::other("unnamed Unix socket cannot be woken")))?;
        tracing::info!(path = %path.display(), shared, "NBD server listening on Unix socket");
        let waker = Waker::new(&listener, WakeAddr::Unix(path), shared).map_err(ServerError::Listener)?;
        self.serve_loop(listener, waker)
    }

    /// Runs one connection over an arbitrary stream on the calling thread (fuzzing).
    pub(crate) fn run_session<S: Transport>(&self, stream: S) {
        let ctx = self.ctx();
        handshake::run_connection(&ctx, stream, "in-memory", &|_| true);
    }

    fn ctx(&self) -> Ctx {
        Ctx { config: self.config.clone(), shared: Arc::clone(&self.shared) }
    }

    fn serve_loop<L: Listener>(&self, listener: L, waker: Waker) -> Result<(), ServerError> {
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
                handshake::run_connection(&ctx, stream, &peer, &|e| shared.conns.enter_transmission(id, e));
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
        for e in &ctx.exports() {
            if let Err(err) = e.export.flush() {
                tracing::error!(export = %e.name, error = %err, "flush at shutdown failed");
            }
        }
        tracing::info!("NBD listener stopped");
        result
    }
}
