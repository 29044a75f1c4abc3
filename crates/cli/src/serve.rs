//! `mcow serve` and `mcow trace`: their arguments, resolving each `[NAME=]DISK|REF` to a disk,
//! and the signal-driven shutdown. Serving a disk over NBD (the export, prefetch, listeners) is
//! the library `mcow-service`; the protocol is `mcow-nbd`, the data path `mcow-engine`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mcow_engine::FetchPolicy;
use mcow_nbd::{Server, ServerConfig};
pub use mcow_service::DiskExport;
use mcow_service::image::split_name;
use mcow_service::{AddExport, Control, ListenOn, Listening, Service, ServiceConfig};

/// How long fetches from the origin may go on once the server is told to stop (requests in
/// flight waiting for them, read-ahead landing its blocks); then the origins are cancelled, so
/// that a stalled or trickling origin cannot hold up the exit.
const FETCH_GRACE: Duration = Duration::from_secs(2);

/// `--readahead`'s default as the help shows it: `FetchPolicy::DEFAULT_READAHEAD`.
const DEFAULT_READAHEAD: &str = "16M";

/// Serve disks over NBD (to QEMU, qemu-img, libnbd tools, nbdfuse).
#[derive(Debug, clap::Args)]
#[command(long_about = "Serve one or more disks over the Network Block Device protocol until SIGINT or \
    SIGTERM; then in-flight requests finish, every disk is flushed, and mcow exits 0.\n\n\
    Listens on TCP 127.0.0.1:10809 unless --socket is given (give both --tcp and --socket for both). \
    Offers structured replies, block status with base:allocation and mcow:allocation-depth \
    (0 = no layer, 1 = the writable top, 2 = the topmost sealed layer, ..., like \
    qemu:allocation-depth), FUA, flush, trim, write-zeroes (fast) and multi-conn.\n\n\
    A disk pulled with `mcow pull --lazy` fetches the blocks it does not hold yet from its \
    origin as they are read (see --fetch-window and --readahead), checks each against its hash \
    and keeps it. A block that another layer of its store already holds (same hash: an image \
    rebuilt on a new base, a new version of a base layer) is copied from there, checked the same \
    way, instead of fetched.\n\n\
    Instead of a disk directory, a reference to an image (file://, http(s)://, oci://, s3://; \
    see `mcow pull --help`) serves that image on demand: it is pulled lazily into the cache \
    (--cache: the disk in CACHE/disks/<name>-<manifest short digest>, layers in CACHE/layers) and \
    served; only what is read is fetched. A later serve of the same image from the same cache \
    reuses that disk, its writable top and every block fetched before. The export is named \
    after the image's repository (the last path component), unless NAME= is given.\n\n\
    Fetches from an origin are retried after transient failures (the origin down, 5xx and 429 \
    answers, cut connections, short bodies, bodies too slow) with jittered backoff (or as long as \
    a Retry-After asks) for up to \
    MCOW_RETRY_DEADLINE_MS (default 30000), plus the time the fetch's size takes at \
    MCOW_HTTP_MIN_RATE (the last attempt starts then, bounded like the others by the limits below); \
    then the read fails with an I/O error. A response body must average at \
    least MCOW_HTTP_MIN_RATE bytes/s (default 262144; 0: no minimum) after its first \
    MCOW_HTTP_DEADLINE_MS (default 10000), so N bytes take at most DEADLINE + N / MIN_RATE: \
    one that falls behind is abandoned and the rest asked for again. MCOW_HTTP_TIMEOUT_MS \
    (default 30000) bounds getting the response headers and any single stalled read; \
    MCOW_HTTP_CONNECT_TIMEOUT_MS (default 5000) a connect. Readers waiting for a block of a \
    fetch that failed get its error. At SIGINT/SIGTERM, fetches still running 2 s later are \
    cancelled (their reads fail), so mcow exits within a few seconds whatever the origin does.\n\n\
    At exit, the bytes fetched for each disk, and the blocks copied from other local layers \
    instead, are logged (RUST_LOG=info).\n\n\
    With --control SOCKET, exports can be listed, added and removed while serving, over HTTP \
    with JSON bodies on that Unix socket (`mcow ctl`, or `curl --unix-socket SOCKET \
    http://x/exports`): GET /exports lists them with their clients and counters; POST /exports \
    {\"name\": NAME, \"disk\": DIR|REF, \"read_only\": BOOL} adds one (resolved like an \
    argument); DELETE /exports/NAME removes one: its in-flight requests finish, its clients are \
    disconnected, its disk is flushed, then it answers; POST /exports/NAME/snapshot[?wait=true] \
    snapshots the disk NAME writes while it is in use (its top frozen and a new one started at \
    once, the frozen top then sealed into a layer); GET /metrics gives per-export requests, \
    bytes, errors, latency histograms, bytes fetched, fetch errors and retries, cache hits and \
    misses in Prometheus \
    text format. Errors are \
    {\"error\": \"...\"} with \
    400 (bad JSON), 404 (unknown name), 409 (name or disk already served). See docs/CONTROL.md. \
    With --control, no disk need be given at start.\n\n\
    Under systemd socket activation (LISTEN_FDS; contrib/systemd), the listening sockets passed \
    are served instead of the default TCP address (the Unix socket at --control's path as the \
    control API) and left open at exit, so a restarted server takes them over and no client is \
    refused meanwhile; with --state, exports added through the API are added again.\n\n\
    One disk (a directory; two names for one image, or a tag and its pinned digest, are one \
    cached disk) can be served under several names, but only one of them at a time may write: \
    while one does, further exports of it must be read-only (-r, or \"read_only\": true), and \
    read what it writes.\n\n\
    Examples:\n  mcow serve vm1\n  qemu-io -f raw nbd://127.0.0.1:10809/vm1\n  \
    mcow serve -k /tmp/nbd.sock os=base app=vm1\n  nbdinfo --map 'nbd+unix:///os?socket=/tmp/nbd.sock'\n  \
    mcow serve --cache /var/cache/mcow vm=oci://registry:5000/images/vm:v1\n  \
    mcow serve -k /tmp/nbd.sock --control /tmp/mcow.ctl\n  \
    mcow ctl --control /tmp/mcow.ctl add vm2 ./vm2")]
pub struct ServeArgs {
    /// Disks to export, as DIR (exported under the directory's name), REF (an image, pulled
    /// lazily into --cache) or NAME=DIR / NAME=REF.
    #[arg(required_unless_present = "control", value_name = "[NAME=]DISK|REF")]
    pub disks: Vec<String>,
    /// Serve the control API on this Unix socket: HTTP with JSON bodies to list, add and
    /// remove exports while serving (`mcow ctl`; docs/CONTROL.md).
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    /// With --control: list the exports the control API adds in FILE (JSON, rewritten
    /// atomically at each add and remove), and at start add again those FILE lists, after the
    /// disks given as arguments: a restarted server (a crash, an upgrade, systemd's
    /// Restart=always) serves what it served before, and VMs reconnect to their exports.
    #[arg(long, value_name = "FILE", requires = "control")]
    pub state: Option<PathBuf>,
    /// Also serve the metrics (GET /metrics, Prometheus text: see --control) on this TCP
    /// address, for a Prometheus server to scrape, say 127.0.0.1:9101 (port 0: any free port;
    /// the address is printed). Only the metrics: exports cannot be listed or changed there.
    /// Reachable by whoever reaches the address: keep it on loopback unless the metrics may be
    /// read from elsewhere.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// TCP address to listen on (loopback by default). Used unless only --socket is given.
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<String>,
    /// Unix socket to listen on (instead of TCP, unless --tcp is also given).
    #[arg(short = 'k', long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Export read-only: writes are refused with EPERM.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// With --read-only, open disks even while another process writes them (like qemu-nbd -U).
    /// Each block then reads as a value it has held: at least what the writer's last completed
    /// flush made of it, maybe a newer write, never another block's data (each read applies
    /// what the writer has flushed since, and is redone if the writer's journal moved under it).
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// Where images given as REF are pulled lazily: CACHE/disks and CACHE/layers.
    #[arg(long, value_name = "DIR", default_value = "mcow-cache")]
    pub cache: PathBuf,
    /// For lazily pulled disks: the fetch window of sequential reads. A read that follows no
    /// other fetches just the missing blocks it covers; one that continues a run of reads
    /// fetches up to the next multiple of BLOCKS blocks, until --readahead takes over. The
    /// default, 4 (256 KiB with 64 KiB blocks), makes a run of small reads cost one request per
    /// 4 blocks and fetch at most 3 blocks past its end; `--fetch-window 1 --readahead 0` fetches
    /// exactly the blocks read. Blocks already local end a fetch early.
    #[arg(long, value_name = "BLOCKS", default_value_t = FetchPolicy::DEFAULT_WINDOW,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub fetch_window: u64,
    /// For lazily pulled disks: the most one fetch asks for during a long sequential read.
    /// Once a run of sequential reads has fetched 4 MiB, each further fetch asks for one window
    /// plus half of what the run fetched past those 4 MiB, up to SIZE: a long read (a big
    /// file, a whole-disk copy) costs few requests, shorter runs fetch what fixed windows would.
    /// A client with many sequential reads in flight (nbdcopy, say) gets there sooner: its
    /// fetches grow 64-fold (up to SIZE) and each starts the next when a quarter of it is in.
    /// 0 turns read-ahead off; 64M suits whole-disk copies (fewer requests, but more fetched
    /// and unused if such a client stops early).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_READAHEAD, value_parser = crate::size::parse_size)]
    pub readahead: u64,
    /// For lazily pulled disks whose image carries a trace (see `mcow trace`): do not prefetch
    /// its blocks in the background.
    #[arg(long)]
    pub no_prefetch: bool,
    /// For lazily pulled disks: download every remaining block in the background (after the
    /// trace), so the disk no longer needs its origin; complete layers move into the store.
    #[arg(long, conflicts_with = "cache_limit")]
    pub fetch_all: bool,
    /// For lazily pulled disks: the most bytes of fetched blocks their partial layers may hold
    /// in each layer store (say, 10G). Past it, the least recently read fetched blocks (an
    /// approximate LRU: a clock with a referenced bit per block) are dropped, their space given
    /// back (holes punched), and fetched again if read. Blocks of complete layers and writable
    /// tops never count and are never dropped; partial layers stay partial. Blocks of a layer
    /// another process has open too are not dropped (a warning says so).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    pub cache_limit: Option<u64>,
    /// Most NBD connections served at once, over every listener, negotiating or not (a VM with
    /// multi-conn may open several). A connection beyond it is closed at once, with a warning.
    /// Each connection holds one thread (up to 4 while requests keep it busy, and one more for
    /// each flush waiting for its sync, up to 32 more) and 3 open
    /// files; mcow warns at start if its open-file limit is too low for N.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Most connections still negotiating (before NBD_OPT_GO) at once: a smaller budget, so
    /// clients that connect and never finish negotiating cannot fill --max-connections. A new
    /// connection beyond it cuts the one negotiating longest.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HANDSHAKES,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_handshakes: u32,
    /// Seconds a client has to finish negotiating before it is cut (decimals allowed).
    #[arg(long, value_name = "SECONDS", default_value = DEFAULT_HANDSHAKE_TIMEOUT, value_parser = parse_seconds)]
    pub handshake_timeout: Duration,
}

/// Worker threads per connection running requests other than flushes (the NBD server's
/// default). More threads only contend for the 2 cores of a small host (random 4 KiB writes
/// without flushes: 0.79x nbdkit with 32, about 1.0x with 4 to 16; docs/BENCHMARKS.md). A
/// worker in a flush does not count (the server's `flush_workers_per_connection`, 32), so a
/// client with a deep queue keeps writing while flushes wait for their sync round, and
/// flushes in flight together share one round (group commit in the writable top).
const WORKERS_PER_CONNECTION: usize = 4;

/// `--max-connections`, `--max-handshakes` and `--handshake-timeout` defaults as the help
/// shows them: the NBD server's own defaults (a unit test checks they agree).
const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
const DEFAULT_MAX_HANDSHAKES: u32 = 64;
const DEFAULT_HANDSHAKE_TIMEOUT: &str = "10";

/// A duration given in seconds, such as `10` or `0.5`.
fn parse_seconds(s: &str) -> std::result::Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

impl ServeArgs {
    /// The NBD server's limits as given.
    fn server_config(&self) -> ServerConfig {
        ServerConfig {
            max_connections: self.max_connections as usize,
            max_handshakes: self.max_handshakes as usize,
            handshake_timeout: self.handshake_timeout,
            workers_per_connection: WORKERS_PER_CONNECTION,
            ..ServerConfig::default()
        }
    }
}

/// Serve one disk and record the order in which its blocks are first read.
#[derive(Debug, clap::Args)]
#[command(long_about = "Serve one disk over NBD, exactly like `mcow serve`, and record the order in which \
    its blocks are first read (for example during a VM boot). At exit (SIGINT/SIGTERM) the trace \
    is written to --out as JSON ({\"block_size\": N, \"blocks\": [first-read block numbers]}). \
    Push it with the image (`mcow push DISK REF --trace FILE`): serving the image lazily then \
    fetches those blocks in the background, in that order, before they are asked for.\n\n\
    Example:\n  mcow trace vm --out boot.trace -k /tmp/nbd.sock &\n  \
    (boot a VM from nbd+unix:///vm?socket=/tmp/nbd.sock, then stop mcow)\n  \
    mcow push vm oci://127.0.0.1:5000/mcow/vm:v1 --trace boot.trace")]
pub struct TraceArgs {
    /// Where to write the trace.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The default NBD address: the protocol's port, on loopback only.
pub const DEFAULT_TCP: &str = "127.0.0.1:10809";

/// Opens the disks and serves them until SIGINT or SIGTERM.
pub fn run(args: &ServeArgs) -> Result<()> {
    run_traced(args, None)
}

impl ServeArgs {
    /// The service's options as given.
    fn service_config(&self) -> ServiceConfig {
        ServiceConfig {
            cache: self.cache.clone(),
            fetch: FetchPolicy { window: self.fetch_window, readahead: self.readahead },
            prefetch: !self.no_prefetch,
            fetch_all: self.fetch_all,
            force_share: self.force_share,
            insecure: crate::paths::insecure_registries().clone(),
            fetch_grace: FETCH_GRACE,
            cache_limit: self.cache_limit,
            state: self.state.clone(),
            ..ServiceConfig::default()
        }
    }
}

/// [`run`], recording the first reads of the (single) disk into a trace written to `trace_out`
/// at exit.
pub fn run_traced(args: &ServeArgs, trace_out: Option<&Path>) -> Result<()> {
    if trace_out.is_some() && args.disks.len() != 1 {
        bail!("a trace records one disk: give exactly one");
    }
    // One engine and one source per origin for every export: disks on the same layers share
    // them (a block is fetched once), and their read-ahead threads are stopped together at exit.
    let service = Arc::new(Service::new(args.server_config(), args.service_config()));
    let mut recorder = None;
    for spec in &args.disks {
        let (name, what) = split_name(spec);
        let req = AddExport {
            name: name.map(str::to_string),
            disk: what.to_string(),
            read_only: args.read_only,
            trace: trace_out.is_some(),
            persist: false,
            fetch: mcow_service::FetchOptions::default(),
        };
        let added = service.add(&req).with_context(|| format!("serving {spec}"))?;
        if let (Some(t), Ok(r)) = (&added.missing_trace, crate::paths::parse_reference(what)) {
            crate::commands::transfer::warn_missing_trace(&r, t);
        }
        recorder = recorder.or(added.trace);
    }
    if let Some(path) = &args.state {
        // What the control API had added before a restart: each added again (a disk that
        // cannot be served any more is logged and left out, and so drops out of the file).
        let saved = mcow_service::load_state(path).context("reading --state")?;
        for e in saved {
            let req = AddExport {
                name: Some(e.name.clone()),
                disk: e.disk.clone(),
                read_only: e.read_only,
                trace: false,
                persist: true,
                fetch: e.fetch,
            };
            match service.add(&req) {
                Ok(_) => {
                    tracing::info!(export = %e.name, disk = %e.disk, "export added again from the state file")
                }
                Err(err) => {
                    tracing::error!(export = %e.name, disk = %e.disk, error = %err, "cannot add an export of the state file again")
                }
            }
        }
    }
    let (inherited, inherited_control) = inherited_sockets(args.control.as_deref())?;
    let tcp = match (&args.tcp, &args.socket) {
        (None, Some(_)) => None,
        // Sockets handed over by systemd replace the default address.
        (None, None) if !inherited.is_empty() => None,
        (t, _) => Some(t.clone().unwrap_or_else(|| DEFAULT_TCP.to_string())),
    };
    check_open_file_limit(args.max_connections as usize);
    let listening =
        Listening::start_with(service.server(), &ListenOn { tcp, socket: args.socket.clone() }, inherited)?;
    let control = match (&args.control, inherited_control) {
        (Some(_), Some(l)) => Some(
            Control::start_inherited(service.clone(), l, args.read_only)
                .context("starting the control API on the socket systemd passed")?,
        ),
        (Some(path), None) => Some(
            Control::start(service.clone(), path, args.read_only)
                .with_context(|| format!("starting the control API on {}", path.display()))?,
        ),
        (None, _) => None,
    };
    let metrics = match &args.metrics {
        Some(addr) => Some(
            Control::start_metrics(service.clone(), addr)
                .with_context(|| format!("serving the metrics on {addr}"))?,
        ),
        None => None,
    };
    let s = service.clone();
    let ready = |addrs: &[String]| {
        if let Some(m) = &metrics {
            eprintln!("mcow: metrics on {}", m.address());
        }
        if let Some(c) = &control {
            eprintln!("mcow: control API on {} (see `mcow ctl --help`)", c.address());
        }
        for a in addrs {
            eprintln!("mcow: serving on {a}");
        }
    };
    let result = stop_on_signal(service.server(), listening, ready, move || s.cancel_fetches());
    for c in [control, metrics].into_iter().flatten() {
        c.stop();
    }
    // Background fetches (trace, --fetch-all) and read-ahead still running get FETCH_GRACE to
    // land what they fetch; then their origins are cancelled, so that they end at once.
    service.finish();
    if let (Some(path), Some(r)) = (trace_out, recorder) {
        let trace = r.trace();
        std::fs::write(path, trace.to_bytes())
            .with_context(|| format!("writing the trace {}", path.display()))?;
        eprintln!("mcow: wrote a trace of {} blocks to {}", trace.blocks.len(), path.display());
    }
    result
}

/// The listening sockets systemd handed over (socket activation: `LISTEN_FDS` sockets from fd
/// 3 on, for this process if `LISTEN_PID` says so), as NBD listeners, but for the Unix socket
/// whose path is `control` (the control API's). None without socket activation.
fn inherited_sockets(
    control: Option<&Path>,
) -> Result<(Vec<mcow_service::Inherited>, Option<std::os::unix::net::UnixListener>)> {
    let mut fds = listenfd::ListenFd::from_env();
    let control = control.map(std::path::absolute).transpose().context("resolving --control")?;
    let (mut nbd, mut ctl) = (Vec::new(), None);
    for i in 0..fds.len() {
        // A socket of the other kind is an error that leaves the fd in place.
        if let Ok(Some(l)) = fds.take_unix_listener(i) {
            let path = l.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf));
            if control.is_some() && path == control {
                ctl = Some(l);
            } else {
                nbd.push(mcow_service::Inherited::Unix(l));
            }
            continue;
        }
        match fds.take_tcp_listener(i) {
            Ok(Some(l)) => nbd.push(mcow_service::Inherited::Tcp(l)),
            Ok(None) => {}
            Err(e) => {
                bail!("socket activation: fd {} is neither a TCP nor a Unix listening socket: {e}", i + 3)
            }
        }
    }
    if !nbd.is_empty() || ctl.is_some() {
        tracing::info!(nbd = nbd.len(), control = ctl.is_some(), "listening on sockets passed by systemd");
    }
    Ok((nbd, ctl))
}

/// Warns if the open-file limit leaves no room for `connections` connections (3 files each,
/// and some for the disks' layer files). `main` raised the soft limit to the hard limit at
/// start.
fn check_open_file_limit(connections: usize) {
    let want = (connections as u64).saturating_mul(3).saturating_add(1024);
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
    if limit < want {
        tracing::warn!(
            limit,
            connections,
            "the open-file limit is lower than --max-connections needs (3 files per connection)"
        );
    }
}

/// Serves `exports` on the given TCP address and/or Unix socket with the limits of `config`
/// until SIGINT or SIGTERM, then finishes in-flight requests, flushes every disk and returns.
/// `ready` is called with the listening addresses once both listeners are bound;
/// `cancel_fetches` if requests are still running `FETCH_GRACE` after the signal (it should
/// make the fetches they wait for fail).
pub fn serve_disks(
    exports: Vec<(String, Arc<DiskExport>)>,
    config: ServerConfig,
    tcp: Option<String>,
    socket: Option<PathBuf>,
    ready: impl FnOnce(&[String]),
    cancel_fetches: impl FnOnce() + Send + 'static,
) -> Result<()> {
    if tcp.is_none() && socket.is_none() {
        bail!("nothing to listen on: give --tcp or --socket");
    }
    check_open_file_limit(config.max_connections);
    let server = Server::with_config(config);
    for (name, export) in exports {
        let desc = format!("mcow disk {}", export.disk().dir().display());
        server.add_export(name.clone(), desc, export).with_context(|| format!("export {name}"))?;
    }
    let server = Arc::new(server);
    let listening = Listening::start(&server, &ListenOn { tcp, socket })?;
    stop_on_signal(&server, listening, ready, cancel_fetches)
}

/// Serves until SIGINT or SIGTERM, then stops `server` (in-flight requests finish, exports
/// are flushed) and waits for `listening` to end. `ready` is called with the listening
/// addresses once the signal handlers are installed (so a signal sent as soon as a client sees
/// them is handled); `cancel_fetches` runs if requests are still running `FETCH_GRACE` after
/// the signal (it should make the fetches they wait for fail).
fn stop_on_signal(
    server: &Arc<Server>,
    listening: Listening,
    ready: impl FnOnce(&[String]),
    cancel_fetches: impl FnOnce() + Send + 'static,
) -> Result<()> {
    let stop = server.shutdown_handle();
    let mut signals =
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
            .context("installing signal handlers")?;
    let sig_handle = signals.handle();
    let (stopped_tx, stopped_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "stopping: finishing in-flight requests");
            stop.stop();
            if stopped_rx.recv_timeout(FETCH_GRACE) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                tracing::warn!("requests still running; cancelling the fetches they wait for");
                cancel_fetches();
            }
        }
    });
    ready(listening.addrs());
    let result = listening.join().map_err(anyhow::Error::new);
    drop(stopped_tx);
    sig_handle.close();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readahead_default_is_the_engines() {
        assert_eq!(crate::size::parse_size(DEFAULT_READAHEAD), Ok(FetchPolicy::DEFAULT_READAHEAD));
    }

    #[test]
    fn the_connection_defaults_are_the_servers() {
        let d = ServerConfig::default();
        assert_eq!(DEFAULT_MAX_CONNECTIONS as usize, d.max_connections);
        assert_eq!(DEFAULT_MAX_HANDSHAKES as usize, d.max_handshakes);
        assert_eq!(parse_seconds(DEFAULT_HANDSHAKE_TIMEOUT), Ok(d.handshake_timeout));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_seconds("0").is_err() && parse_seconds("-1").is_err() && parse_seconds("x").is_err());
    }
}
