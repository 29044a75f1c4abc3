//! `mcow serve`: exports disks over NBD. This module is the glue between the engine's `Disk`
//! and the NBD server's `Export` trait; the protocol lives in `mcow-nbd`, the data path in
//! `mcow-engine`. It owns the choice of NBD semantics for our disks (block sizes, the
//! `mcow:allocation-depth` context, errno mapping) and the signal-driven shutdown.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mcow_engine::{Disk, Engine, FetchPolicy, OpenOptions, RunKind, TOP};
use mcow_remote::{Reference, Sources};

use crate::paths::{Fetch, open_lazy};
use mcow_nbd::proto::{NBD_STATE_HOLE, NBD_STATE_ZERO};
use mcow_nbd::{BlockSizes, Export, Parts, Server, ServerConfig, StatusExtent};

/// Our metadata context: which layer holds each extent, numbered like QEMU's
/// `qemu:allocation-depth`: 0 = no layer, 1 = the writable top, 2 = the topmost sealed layer,
/// and so on down to `depth + 1` for the bottom layer.
pub const DEPTH_CONTEXT: &str = "mcow:allocation-depth";

/// A disk seen as an NBD export. One instance is shared by every connection.
pub struct DiskExport {
    disk: Arc<Disk>,
    trace: Option<Arc<TraceRecorder>>,
}

impl DiskExport {
    pub fn new(disk: Arc<Disk>) -> DiskExport {
        DiskExport { disk, trace: None }
    }

    /// Records the order of first reads into `trace`.
    pub fn with_trace(mut self, trace: Arc<TraceRecorder>) -> DiskExport {
        self.trace = Some(trace);
        self
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua { self.disk.flush().map_err(io::Error::from) } else { Ok(()) }
    }
}

impl Export for DiskExport {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_only(&self) -> bool {
        self.disk.is_read_only()
    }

    /// Any alignment works; a whole block avoids a copy-up, so the block is preferred.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes { minimum: 1, preferred: self.disk.block_size().max(4096), maximum: 32 << 20 }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(t) = &self.trace {
            t.note(offset, buf.len() as u64);
        }
        Ok(self.disk.read(offset, buf)?)
    }

    /// Sealed layers are mapped: their bytes go to the client straight from the map.
    fn read_borrowed(&self, offset: u64, len: usize, send: &mut Parts<'_>) -> Option<io::Result<()>> {
        if let Some(t) = &self.trace {
            t.note(offset, len as u64);
        }
        match self.disk.read_mapped(offset, len, send) {
            Ok(false) => None,
            Ok(true) => Some(Ok(())),
            Err(e) => Some(Err(e.into())),
        }
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.disk.write(offset, data)?;
        self.sync_if(fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.disk.write_zeroes(offset, len, may_trim)?;
        self.sync_if(fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.disk.discard(offset, len)?;
        self.sync_if(fua)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(self.disk.flush()?)
    }

    fn extra_meta_contexts(&self) -> Vec<String> {
        vec![DEPTH_CONTEXT.to_string()]
    }

    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        // Bound the work per request; the client asks again for the rest.
        let len = len.min(1 << 30).min(self.disk.size().saturating_sub(offset));
        let runs = self.disk.block_status(offset, len)?;
        let layers = self.disk.stack().depth() as u32;
        let depth_of = |layer: Option<u32>| match layer {
            None => 0,
            Some(TOP) => 1,
            Some(i) => layers - i + 1,
        };
        let mut out: Vec<StatusExtent> = Vec::with_capacity(runs.len());
        for r in runs {
            let flags = if context == DEPTH_CONTEXT {
                depth_of(r.layer)
            } else {
                match r.kind {
                    RunKind::Data => 0,
                    RunKind::Zero => NBD_STATE_ZERO,
                    RunKind::Hole => NBD_STATE_HOLE | NBD_STATE_ZERO,
                }
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += r.length,
                _ => out.push(StatusExtent { length: r.length, flags }),
            }
        }
        Ok(out)
    }
}

/// Records which blocks are read first, in order: one bit per block says whether it was seen.
pub struct TraceRecorder {
    block_size: u32,
    seen: mcow_engine::AtomicBitmap,
    order: Mutex<Vec<u64>>,
}

impl TraceRecorder {
    pub fn new(disk: &Disk) -> TraceRecorder {
        let blocks = disk.size().div_ceil(u64::from(disk.block_size()));
        TraceRecorder {
            block_size: disk.block_size(),
            seen: mcow_engine::AtomicBitmap::new(blocks),
            order: Mutex::new(Vec::new()),
        }
    }

    fn note(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let bs = u64::from(self.block_size);
        for b in offset / bs..=((offset + len - 1) / bs).min(self.seen.len().saturating_sub(1)) {
            if !self.seen.set(b) {
                self.order.lock().unwrap_or_else(|p| p.into_inner()).push(b);
            }
        }
    }

    /// The trace so far.
    pub fn trace(&self) -> mcow_remote::image::Trace {
        let blocks = self.order.lock().unwrap_or_else(|p| p.into_inner()).clone();
        mcow_remote::image::Trace { block_size: self.block_size, blocks }
    }
}

/// Fetches in the background what a lazy disk will likely need: first the blocks of its
/// image's trace, in order; then, with `all`, every remaining block of its partial layers,
/// after which those layers are complete and move into the store. Stops early when `stop` is
/// set. Errors are logged (the blocks are fetched again on demand).
fn background_fetch(disk: Arc<Disk>, trace: Option<Vec<u64>>, all: bool, stop: Arc<AtomicBool>) {
    // The trace's blocks as runs of consecutive blocks, in the trace's order, asked for in
    // batches: each batch costs one request per layer where the origin allows several ranges
    // in one (registries, plain HTTP), so the first blocks come soon and requests stay few.
    const BATCH: usize = 64;
    let trace = trace.unwrap_or_default();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &vb in &trace {
        match runs.last_mut() {
            Some((start, n)) if *start + *n == vb => *n += 1,
            _ => runs.push((vb, 1)),
        }
    }
    let mut prefetched = 0u64;
    for batch in runs.chunks(BATCH) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match disk.prefetch_runs(batch) {
            Ok(()) => prefetched += batch.iter().map(|r| r.1).sum::<u64>(),
            Err(e) => tracing::warn!(runs = batch.len(), error = %e, "prefetch failed"),
        }
    }
    tracing::info!(disk = %disk.dir().display(), blocks = prefetched, "prefetched the trace");
    if !all {
        return;
    }
    let done = disk.fetch_rest(&stop);
    tracing::info!(disk = %disk.dir().display(), ?done, "background download ended");
}

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
    Examples:\n  mcow serve vm1\n  qemu-io -f raw nbd://127.0.0.1:10809/vm1\n  \
    mcow serve -k /tmp/nbd.sock os=base app=vm1\n  nbdinfo --map 'nbd+unix:///os?socket=/tmp/nbd.sock'\n  \
    mcow serve --cache /var/cache/mcow vm=oci://registry:5000/images/vm:v1")]
pub struct ServeArgs {
    /// Disks to export, as DIR (exported under the directory's name), REF (an image, pulled
    /// lazily into --cache) or NAME=DIR / NAME=REF.
    #[arg(required = true, value_name = "[NAME=]DISK|REF")]
    pub disks: Vec<String>,
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

/// A disk to serve: its export name, directory and, for images given as references, what the
/// lazy pull fetched.
struct Target {
    name: String,
    dir: PathBuf,
    pulled_bytes: u64,
}

/// The export name of an image: the last path component of its repository (the reference
/// without scheme, tag and digest), cleaned for names.
fn image_name(reference: &Reference) -> String {
    let text = reference.to_string();
    let text = text.split_once('@').map_or(text.as_str(), |(t, _)| t);
    let text = text.strip_suffix(&format!(":{}", reference.tag)).unwrap_or(text);
    let body = text.split_once("://").map_or(text, |(_, b)| b);
    let raw = body.rsplit('/').find(|s| !s.is_empty()).unwrap_or("image");
    let clean: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if clean.starts_with('.') { format!("image{clean}") } else { clean }
}

/// Makes the image at `reference` servable from `cache`: fetches its manifest, then reuses
/// `CACHE/disks/<name>-<short digest>` if an earlier serve made it, or pulls the image lazily
/// there (pinned to the manifest just fetched, so the disk and its name agree even if the tag
/// moves). Layers go to `CACHE/layers`, where blocks fetched before are kept. The remote opened
/// here becomes the disk's source in `sources` (its connections are open already).
fn prepare_image(reference: &Reference, cache: &Path, sources: &Sources) -> Result<(PathBuf, u64)> {
    let remote = mcow_remote::open_remote(reference).with_context(|| format!("opening {reference}"))?;
    let image = mcow_remote::transfer::fetch_image(remote.as_ref(), reference)
        .with_context(|| format!("fetching the manifest of {reference}"))?;
    let digest = image.manifest_digest;
    let dir = cache.join("disks").join(format!("{}-{}", image_name(reference), digest.short()));
    // The origin a lazy pull of this reference records (pinned to the manifest).
    let pinned_text =
        if reference.digest.is_some() { reference.to_string() } else { format!("{reference}@{digest}") };
    if dir.join(mcow_engine::disk::MANIFEST_FILE).exists() {
        tracing::info!(%reference, manifest = %digest, disk = %dir.display(), "reusing the cached disk");
        if crate::paths::read_origin(&dir)?.is_some_and(|o| o.reference == pinned_text) {
            sources.adopt(&pinned_text, remote);
        }
        return Ok((dir, 0));
    }
    if dir.exists() {
        // Debris of an interrupted pull (no manifest yet): nothing in it is worth keeping.
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the incomplete {}", dir.display()))?;
    }
    let pinned = crate::paths::parse_reference(&pinned_text).context("pinning the reference")?;
    let report = mcow_remote::transfer::pull_image(
        remote.as_ref(),
        &pinned,
        &image,
        &dir,
        &cache.join("layers"),
        true,
        &mut |_, _| {},
    )
    .with_context(|| format!("pulling {reference} into {}", dir.display()))?;
    if let Some(t) = &report.missing_trace {
        crate::commands::transfer::warn_missing_trace(reference, t);
    }
    tracing::info!(
        %reference, manifest = %digest, disk = %dir.display(), layers = report.layers,
        layers_local = report.layers_local, bytes_fetched = report.bytes_fetched,
        "pulled lazily into the cache"
    );
    sources.adopt(&pinned.to_string(), remote);
    Ok((dir, report.bytes_fetched))
}

fn dir_name(dir: &Path) -> String {
    let full = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    full.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Turns one `[NAME=]DISK|REF` argument into a disk directory to serve.
fn resolve_target(spec: &str, cache: &Path, sources: &Sources) -> Result<Target> {
    let (name, what) = if Reference::looks_like(spec) {
        (None, spec)
    } else {
        match spec.split_once('=') {
            Some((n, d)) => (Some(n.to_string()), d),
            None => (None, spec),
        }
    };
    if Reference::looks_like(what) {
        let reference = crate::paths::parse_reference(what)?;
        let (dir, pulled_bytes) = prepare_image(&reference, cache, sources)?;
        return Ok(Target { name: name.unwrap_or_else(|| image_name(&reference)), dir, pulled_bytes });
    }
    let dir = PathBuf::from(what);
    Ok(Target { name: name.unwrap_or_else(|| dir_name(&dir)), dir, pulled_bytes: 0 })
}

/// Opens the disks and serves them until SIGINT or SIGTERM.
pub fn run(args: &ServeArgs) -> Result<()> {
    run_traced(args, None)
}

/// [`run`], recording the first reads of the (single) disk into a trace written to `trace_out`
/// at exit.
pub fn run_traced(args: &ServeArgs, trace_out: Option<&Path>) -> Result<()> {
    if trace_out.is_some() && args.disks.len() != 1 {
        bail!("a trace records one disk: give exactly one");
    }
    let mut exports = Vec::new();
    let mut stats = Vec::new();
    let mut recorder = None;
    let stop = Arc::new(AtomicBool::new(false));
    let mut background = Vec::new();
    // One engine and one source per origin for every export: disks on the same layers share
    // them (a block is fetched once), and their read-ahead threads are stopped together at exit.
    let engine =
        Engine::new(mcow_engine::EngineConfig { cache_limit: args.cache_limit, ..Default::default() });
    let sources = crate::paths::new_sources();
    for spec in &args.disks {
        let t = resolve_target(spec, &args.cache, &sources)?;
        let opts = OpenOptions { read_only: args.read_only, verify: true, force_share: args.force_share };
        let (disk, source) = open_lazy(
            &engine,
            &t.dir,
            opts,
            Fetch::Remote(FetchPolicy { window: args.fetch_window, readahead: args.readahead }, &sources),
        )?;
        let disk = Arc::new(disk);
        let mut export = DiskExport::new(disk.clone());
        if trace_out.is_some() {
            let r = Arc::new(TraceRecorder::new(&disk));
            export = export.with_trace(r.clone());
            recorder = Some(r);
        }
        if source.is_some() {
            let trace_path = t.dir.join(mcow_remote::transfer::TRACE_FILE);
            let trace = match (args.no_prefetch, std::fs::read(&trace_path)) {
                (false, Ok(bytes)) => match mcow_remote::image::Trace::parse(&bytes) {
                    Ok(tr) => Some(tr.blocks),
                    Err(e) => {
                        tracing::warn!(file = %trace_path.display(), error = %e, "ignoring the trace");
                        None
                    }
                },
                _ => None,
            };
            if trace.is_some() || args.fetch_all {
                let (d, all, st) = (disk.clone(), args.fetch_all, stop.clone());
                background.push(std::thread::spawn(move || background_fetch(d, trace, all, st)));
            }
        }
        stats.push((t.name.clone(), t.dir.clone(), t.pulled_bytes, source));
        exports.push((t.name, Arc::new(export)));
    }
    let tcp = match (&args.tcp, &args.socket) {
        (None, Some(_)) => None,
        (t, _) => Some(t.clone().unwrap_or_else(|| DEFAULT_TCP.to_string())),
    };
    let sources: Vec<_> = stats.iter().filter_map(|s| s.3.clone()).collect();
    let cancel = {
        let sources = sources.clone();
        move || sources.iter().for_each(|s| s.cancel())
    };
    let result = serve_disks(
        exports,
        args.server_config(),
        tcp,
        args.socket.clone(),
        |addrs| {
            for a in addrs {
                eprintln!("mcow: serving on {a}");
            }
        },
        cancel,
    );
    // Background fetches (trace, --fetch-all) and read-ahead still running get FETCH_GRACE to
    // land what they fetch; then their origins are cancelled, so that they end at once.
    stop.store(true, Ordering::Relaxed);
    let until = Instant::now() + FETCH_GRACE;
    while background.iter().any(|b| !b.is_finished()) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let quiet = background.iter().all(|b| b.is_finished())
        && engine.stop_background(until.saturating_duration_since(Instant::now()));
    if !quiet {
        tracing::warn!("fetches still running at exit; cancelling them");
        sources.iter().for_each(|s| s.cancel());
    }
    for b in background {
        let _ = b.join();
    }
    if !engine.stop_background(FETCH_GRACE) {
        tracing::warn!("read-ahead fetches still running at exit");
    }
    if let (Some(path), Some(r)) = (trace_out, recorder) {
        let trace = r.trace();
        std::fs::write(path, trace.to_bytes())
            .with_context(|| format!("writing the trace {}", path.display()))?;
        eprintln!("mcow: wrote a trace of {} blocks to {}", trace.blocks.len(), path.display());
    }
    for (name, dir, pulled, source) in stats {
        let (fetched, requests) = source.map_or((0, 0), |s| s.stats());
        tracing::info!(
            export = %name,
            disk = %dir.display(),
            bytes_fetched = pulled + fetched,
            // (with the hash table chunks of layers pulled with index chunks)
            blocks_bytes_fetched = fetched,
            requests,
            "served; fetched from the origin"
        );
    }
    if let Some(c) = engine.cache_stats() {
        tracing::info!(
            limit = c.limit,
            bytes = c.bytes,
            dropped_blocks = c.dropped_blocks,
            dropped_bytes = c.dropped_bytes,
            "served; the bounded cache"
        );
    }
    let reused = engine.reuse_stats();
    tracing::info!(
        blocks_reused = reused.blocks,
        bytes_reused = reused.bytes,
        "served; copied from other local layers instead of fetched"
    );
    result
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
    let mut server = Server::with_config(config);
    for (name, export) in exports {
        let desc = format!("mcow disk {}", export.disk.dir().display());
        server.add_export(name.clone(), desc, export).with_context(|| format!("export {name}"))?;
    }
    let server = Arc::new(server);
    let mut addrs = Vec::new();
    let mut threads = Vec::new();
    if let Some(addr) = tcp {
        let listener = std::net::TcpListener::bind(&addr).with_context(|| format!("listening on {addr}"))?;
        addrs.push(format!("nbd://{}", listener.local_addr()?));
        let s = server.clone();
        threads.push(std::thread::spawn(move || s.serve_tcp_listener(listener)));
    }
    if let Some(path) = socket {
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        addrs.push(format!("nbd+unix:///?socket={}", path.display()));
        let s = server.clone();
        threads.push(std::thread::spawn(move || {
            let r = s.serve_unix_listener(listener);
            let _ = std::fs::remove_file(&path);
            r
        }));
    }
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
    ready(&addrs);
    let mut result = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(anyhow::Error::new(e).context("NBD server")),
            Err(_) => result = Err(anyhow::anyhow!("NBD server thread panicked")),
        }
    }
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

    #[test]
    fn image_names() {
        let name = |r: &str| image_name(&Reference::parse(r).unwrap());
        assert_eq!(name("file:///srv/images/vm:v1"), "vm");
        assert_eq!(name("file:///srv/images/vm/"), "vm");
        assert_eq!(name("oci://127.0.0.1:5000/mcow/demo:v1"), "demo");
        assert_eq!(name("s3://bucket"), "bucket");
        assert_eq!(name("http://127.0.0.1:8081/a b"), "a_b");
        let d = mcow_engine::Digest::of(b"m");
        assert_eq!(name(&format!("file://x/.hidden:t@{d}")), "image.hidden");
    }
}
