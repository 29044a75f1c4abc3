//! A host service: one NBD [`Server`] whose exports are engine disks, added and removed while
//! it serves. Owns the table of what each export serves (its disk directory, what was asked
//! for, the disk opened for it), the disks opened (shared by the exports of one directory), the
//! background fetches of lazy disks, and the order of removal: stop taking requests, finish
//! those in flight, close the connections, flush the disk, then close it.
//!
//! One engine and one source per origin serve every export: disks on the same layers share
//! them (a block is fetched once). Adds and removes run one at a time; listing never waits for
//! them.
//!
//! The same disk (one directory: two names for one image reference, or a tag and its pinned
//! digest, which name the same cached disk) may be served under several names, but only one
//! of them writable at a time: its writable top has one writer. Further exports of a disk
//! already served are views of the one opened disk: read-only ones read what the writer wrote;
//! a writable one is refused with [`ServiceError::DiskInUse`] while another export writes the
//! disk (or it was opened read-only), and nothing else changes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mcow_engine::{Disk, Engine, FetchPolicy, OpenOptions};
use mcow_nbd::{Server, ServerConfig, ServerError};
use mcow_remote::InsecureRegistries;
use mcow_remote::transfer::{FetchStats, Sources, TRACE_FILE};
use serde::Serialize;

use crate::error::ServiceError;
use crate::export::DiskExport;
use crate::fetch_options::{FetchOptions, FetchSettings};
use crate::image::{self, Target};
use crate::prefetch::background_fetch;
use crate::trace::TraceRecorder;

/// How a [`Service`] opens and fetches its disks.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Where images given as references are pulled lazily: `CACHE/disks`, `CACHE/layers`.
    pub cache: PathBuf,
    /// Fetch window and read-ahead of lazy disks.
    pub fetch: FetchPolicy,
    /// Prefetch the blocks of an image's trace in the background.
    pub prefetch: bool,
    /// Download every remaining block of a lazy disk in the background (after the trace).
    pub fetch_all: bool,
    /// Open read-only disks even while another process writes them (`-U`).
    pub force_share: bool,
    /// How `oci://` references reach registries over plain HTTP.
    pub insecure: InsecureRegistries,
    /// How long a removed export's connections get to finish their requests before they are
    /// cut.
    pub removal_grace: Duration,
    /// How long fetches may go on once the service stops (or a disk is closed) before the
    /// origins are cancelled.
    pub fetch_grace: Duration,
    /// The most bytes of fetched blocks the partial layers of each layer store may hold
    /// (`--cache-limit`); `None`: no limit.
    pub cache_limit: Option<u64>,
    /// Where the exports added with [`AddExport::persist`] are listed (rewritten atomically at
    /// each such add and remove), so that a restarted service adds them again
    /// ([`load_state`]); `None`: nowhere.
    pub state: Option<PathBuf>,
}

impl ServiceConfig {
    /// How disks fetch when an export asks nothing else.
    fn fetch_defaults(&self) -> FetchSettings {
        FetchSettings {
            window: self.fetch.window,
            readahead: self.fetch.readahead,
            prefetch: self.prefetch,
            all: self.fetch_all,
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            cache: PathBuf::from("mcow-cache"),
            fetch: FetchPolicy::default(),
            prefetch: true,
            fetch_all: false,
            force_share: false,
            insecure: InsecureRegistries::default(),
            removal_grace: Duration::from_secs(10),
            fetch_grace: Duration::from_secs(2),
            cache_limit: None,
            state: None,
        }
    }
}

/// What to add: [`Service::add`].
#[derive(Debug, Clone, Default)]
pub struct AddExport {
    /// The export name; by default the directory's name or the image's repository's.
    pub name: Option<String>,
    /// A disk directory or an image reference (pulled lazily into the cache).
    pub disk: String,
    /// Serve it read-only.
    pub read_only: bool,
    /// Record the order of first reads ([`Added::trace`]).
    pub trace: bool,
    /// List it in the state file ([`ServiceConfig::state`]) while it is served.
    pub persist: bool,
    /// How its disk fetches, where not as the service's defaults (applied when this export
    /// opens the disk; a disk already served keeps how it was opened).
    pub fetch: FetchOptions,
}

/// One export as the state file lists it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedExport {
    /// The export name.
    pub name: String,
    /// The disk directory or image reference, as it was asked for.
    pub disk: String,
    /// Served read-only.
    pub read_only: bool,
    /// Its fetch options, if it was given any.
    #[serde(default, skip_serializing_if = "FetchOptions::is_empty")]
    pub fetch: FetchOptions,
}

#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedState {
    exports: Vec<SavedExport>,
}

/// The exports a state file lists (see [`ServiceConfig::state`]), in the order they were
/// added; none if the file does not exist.
pub fn load_state(path: &Path) -> Result<Vec<SavedExport>, ServiceError> {
    let io = |what: &str, source| ServiceError::Io { what: format!("{what} {}", path.display()), source };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("reading", e)),
    };
    let state: SavedState = serde_json::from_slice(&bytes)
        .map_err(|e| io("parsing", std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    Ok(state.exports)
}

/// What [`Service::add`] did.
#[derive(Clone)]
pub struct Added {
    /// The export as listed.
    pub info: ExportInfo,
    /// The recorder of first reads, if asked for.
    pub trace: Option<Arc<TraceRecorder>>,
    /// The trace blob the image lists but its origin lacks, found when it was pulled (the
    /// disk works; nothing is prefetched): for the caller to warn about.
    pub missing_trace: Option<mcow_engine::Digest>,
}

/// One export as [`Service::list`] shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name.
    pub name: String,
    /// The disk directory served.
    pub disk: PathBuf,
    /// The image reference it was given as, if it was.
    pub reference: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Clients connected (in transmission) now.
    pub clients: u64,
    /// Connections since it was added.
    pub connections: u64,
    /// Requests received.
    pub requests: u64,
    /// Bytes read by clients.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
    /// I/O errors returned to clients.
    pub errors: u64,
    /// Bytes fetched from the origin for this disk since it was opened (0 for a local disk);
    /// the disk's exports share it.
    pub bytes_fetched: u64,
    /// Range requests sent to the origin for this disk since it was opened.
    pub fetch_requests: u64,
    /// Fetches from the disk's origin that failed after their retries (shared by the disks of
    /// one origin), since the process opened it.
    pub fetch_errors: u64,
    /// Retries of requests to the disk's origin (after transient failures; shared by the disks
    /// of one origin), since the process opened it.
    pub fetch_retries: u64,
    /// How the disk fetches, if it has an origin.
    pub fetch: Option<FetchSettings>,
    /// Block reads of the disk's lazily fetched layers that found the block local (cache
    /// hits), since the disk was opened; the disk's exports share it.
    pub cache_hits: u64,
    /// Block reads of those layers that fetched the block or waited for its fetch (misses).
    pub cache_misses: u64,
}

/// What [`Service::snapshot`] did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The export.
    pub export: String,
    /// Its disk directory.
    pub disk: PathBuf,
    /// The frozen top (a file in the disk directory) that becomes the new layer.
    pub frozen: String,
    /// The new writable top.
    pub top: String,
    /// How long the snapshot took, in microseconds (writes went on meanwhile).
    pub took_us: u64,
    /// How long the switch to the new top held the disk's view locked, in microseconds (the
    /// most a write waited).
    pub switch_us: u64,
    /// The new sealed layer, if the call waited for it (`wait`); else it is sealed in the
    /// background and listed by `mcow info` once ready.
    pub layer: Option<String>,
    /// How long sealing it took, in milliseconds, if waited for.
    pub seal_ms: Option<u64>,
}

/// A disk the service opened, shared by the exports of its directory.
struct OpenDisk {
    disk: Arc<Disk>,
    source: Option<FetchStats>,
    /// Bytes the lazy pull fetched before the disk was opened.
    pulled_bytes: u64,
    /// Stops this disk's background fetch.
    stop: Arc<AtomicBool>,
    background: Option<JoinHandle<()>>,
    /// The exports serving it, in the order they were added.
    exports: Vec<String>,
    /// The export that may write it, if one does.
    writer: Option<String>,
    /// Seals the disk's frozen tops in the background after a snapshot (or found at open).
    sealer: Option<JoinHandle<()>>,
    /// How it fetches (as the export that opened it asked).
    settings: FetchSettings,
}

/// What an export serves.
struct Entry {
    /// Key of its disk in `State::disks`.
    key: PathBuf,
    reference: Option<String>,
    /// How it is listed in the state file, if it is.
    saved: Option<SavedExport>,
    /// When it was added (the state file's order).
    added: u64,
}

#[derive(Default)]
struct State {
    exports: BTreeMap<String, Entry>,
    /// Adds so far (for `Entry::added`).
    adds: u64,
    disks: HashMap<PathBuf, OpenDisk>,
}

/// An NBD server of engine disks whose exports change while it serves. See the module doc.
pub struct Service {
    server: Arc<Server>,
    engine: Engine,
    sources: Sources,
    config: ServiceConfig,
    /// Adds and removes, one at a time (held across pulls and waits).
    ops: Mutex<()>,
    /// The tables (held briefly).
    state: Mutex<State>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("server", &self.server).field("config", &self.config).finish()
    }
}

/// Seals `disk`'s frozen tops, oldest first, on a thread of its own; a failure is logged and
/// leaves the top frozen (reads and writes go on; the next open seals it).
fn spawn_sealer(disk: Arc<Disk>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let started = Instant::now();
        loop {
            match disk.seal_frozen(&mut |_, _| {}) {
                Ok(Some(layer)) => tracing::info!(
                    disk = %disk.dir().display(), %layer, ms = started.elapsed().as_millis() as u64,
                    "snapshot sealed: the new layer is ready to push"
                ),
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(disk = %disk.dir().display(), error = %e, "sealing a snapshot failed");
                    return;
                }
            }
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Service {
    /// A service with no export yet, its NBD server limited by `server`.
    pub fn new(server: ServerConfig, config: ServiceConfig) -> Service {
        Service {
            server: Arc::new(Server::with_config(server)),
            engine: Engine::new(mcow_engine::EngineConfig {
                cache_limit: config.cache_limit,
                ..Default::default()
            }),
            sources: Sources::with_insecure(config.insecure.clone()),
            config,
            ops: Mutex::new(()),
            state: Mutex::new(State::default()),
        }
    }

    /// The NBD server, to serve on listeners ([`crate::Listening`]) and to stop.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// Adds an export of `req.disk` (a directory, or an image pulled lazily into the cache),
    /// selectable by the next client at once. On any error nothing changed (a disk pulled into
    /// the cache stays there, for the next try).
    pub fn add(&self, req: &AddExport) -> Result<Added, ServiceError> {
        let _op = lock(&self.ops);
        let target = Target::parse(&req.disk, &self.config.insecure)?;
        let name = req.name.clone().unwrap_or_else(|| target.default_name());
        if lock(&self.state).exports.contains_key(&name) {
            return Err(ServiceError::DuplicateExport(name));
        }
        let prepared = image::prepare(&target, &self.config.cache, &self.sources, &self.config.insecure)?;
        let key = mcow_engine::disk::absolute_clean(&prepared.dir).unwrap_or_else(|_| prepared.dir.clone());
        let key = key.canonicalize().unwrap_or(key);
        let reference = match &target {
            Target::Image(r) => Some(r.to_string()),
            Target::Dir(_) => None,
        };

        let settings = req
            .fetch
            .apply(self.config.fetch_defaults(), self.config.cache_limit.is_some())
            .map_err(ServiceError::InvalidOptions)?;
        let shared = lock(&self.state).disks.get(&key).map(|d| {
            let other = d.writer.clone().unwrap_or_else(|| d.exports[0].clone());
            (d.disk.clone(), other, d.writer.is_some(), d.settings)
        });
        let (disk, opened) = match shared {
            Some((disk, other, has_writer, opened_with)) => {
                // The disk fetches as it was opened: options asking otherwise are refused.
                if !req.fetch.is_empty() && settings != opened_with {
                    return Err(ServiceError::FetchOptionsDiffer {
                        dir: key,
                        export: other,
                        settings: opened_with,
                    });
                }
                // One writer per disk: a writable export of a disk already served needs the
                // disk opened writable and no other export writing it.
                if !req.read_only && (has_writer || disk.is_read_only()) {
                    return Err(ServiceError::DiskInUse {
                        dir: key,
                        export: other,
                        read_only: disk.is_read_only(),
                    });
                }
                (disk, None)
            }
            None => {
                let o = self.open(&prepared.dir, req.read_only, settings)?;
                (o.disk.clone(), Some((o, prepared.pulled_bytes)))
            }
        };
        let mut export = DiskExport::new(disk.clone());
        if req.read_only {
            export = export.into_read_only();
        }
        let trace = req.trace.then(|| Arc::new(TraceRecorder::new(&disk)));
        if let Some(t) = &trace {
            export = export.with_trace(t.clone());
        }
        let desc = format!("mcow disk {}", disk.dir().display());
        if let Err(e) = self.server.add_export(name.clone(), desc, Arc::new(export)) {
            if let Some((o, _)) = opened {
                self.close(o, &[]);
            }
            return Err(match e {
                ServerError::DuplicateExport(n) => ServiceError::DuplicateExport(n),
                e => ServiceError::Server(e),
            });
        }
        {
            let mut st = lock(&self.state);
            if let Some((mut o, pulled)) = opened {
                o.pulled_bytes = pulled;
                st.disks.insert(key.clone(), o);
            }
            if let Some(d) = st.disks.get_mut(&key) {
                d.exports.push(name.clone());
                if !req.read_only {
                    d.writer = Some(name.clone());
                }
            }
            st.adds += 1;
            let saved = req.persist.then(|| SavedExport {
                name: name.clone(),
                disk: req.disk.clone(),
                read_only: req.read_only,
                fetch: req.fetch,
            });
            let added = st.adds;
            st.exports.insert(name.clone(), Entry { key, reference, saved, added });
        }
        if req.persist {
            self.save_state();
        }
        tracing::info!(export = %name, disk = %disk.dir().display(), read_only = req.read_only, "export added");
        let info = self.info(&name).ok_or_else(|| ServiceError::UnknownExport(name.clone()))?;
        Ok(Added { info, trace, missing_trace: prepared.missing_trace })
    }

    /// Opens the disk at `dir` and starts its background fetch (a lazy disk with a trace, or
    /// `fetch_all`).
    fn open(&self, dir: &Path, read_only: bool, settings: FetchSettings) -> Result<OpenDisk, ServiceError> {
        let opts = OpenOptions { read_only, verify: true, force_share: self.config.force_share };
        let (disk, source) =
            self.sources.open_lazy_disk(&self.engine, dir, opts, settings.policy()).map_err(|e| {
                let locked = matches!(e, mcow_remote::RemoteError::Engine(mcow_engine::Error::Locked { .. }));
                let hint = match (locked, read_only) {
                    (true, true) => " (another process has it open for writing; force-share reads it anyway)",
                    (true, false) => " (another process has it open)",
                    _ => "",
                };
                ServiceError::Open { dir: dir.to_path_buf(), hint, source: Box::new(e) }
            })?;
        let disk = Arc::new(disk);
        let stop = Arc::new(AtomicBool::new(false));
        let mut background = None;
        if source.is_some() {
            let trace_path = dir.join(TRACE_FILE);
            let trace = match (settings.prefetch, std::fs::read(&trace_path)) {
                (true, Ok(bytes)) => match mcow_remote::image::Trace::parse(&bytes) {
                    Ok(tr) => Some(tr.blocks),
                    Err(e) => {
                        tracing::warn!(file = %trace_path.display(), error = %e, "ignoring the trace");
                        None
                    }
                },
                _ => None,
            };
            if trace.is_some() || settings.all {
                let (d, all, st) = (disk.clone(), settings.all, stop.clone());
                background = Some(std::thread::spawn(move || background_fetch(d, trace, all, st)));
            }
        }
        let mut opened = OpenDisk {
            disk,
            source,
            pulled_bytes: 0,
            stop,
            background,
            exports: Vec::new(),
            writer: None,
            sealer: None,
            settings,
        };
        if !read_only && opened.disk.frozen_tops() > 0 {
            // A snapshot taken before a restart was not sealed yet: seal it now.
            opened.sealer = Some(spawn_sealer(opened.disk.clone()));
        }
        Ok(opened)
    }

    /// Stops a disk's background fetch (cancelling its origin if it does not end within the
    /// fetch grace) and logs what it fetched, once for each of `exports` (the names it was
    /// served under); the disk closes when its last user drops it.
    fn close(&self, mut o: OpenDisk, exports: &[String]) {
        o.stop.store(true, Ordering::Relaxed);
        if let Some(s) = o.sealer.take() {
            // A frozen top being sealed is finished first (or stays frozen if it fails: the
            // next open seals it).
            let _ = s.join();
        }
        if let Some(b) = o.background.take() {
            let until = Instant::now() + self.config.fetch_grace;
            while !b.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !b.is_finished() {
                tracing::warn!(disk = %o.disk.dir().display(), "background fetch still running; cancelling it");
                if let Some(s) = &o.source {
                    s.cancel();
                }
            }
            let _ = b.join();
        }
        let (fetched, requests) = o.source.as_ref().map_or((0, 0), |s| s.stats());
        for name in exports {
            tracing::info!(
                export = %name,
                disk = %o.disk.dir().display(),
                bytes_fetched = o.pulled_bytes + fetched,
                // (with the hash table chunks of layers pulled with index chunks)
                blocks_bytes_fetched = fetched,
                requests,
                "served; fetched from the origin"
            );
        }
    }

    /// Removes the export `name`: new clients cannot select it; its clients' requests in
    /// flight finish and are answered, then their connections are closed (cut if they take
    /// longer than the removal grace); then the disk is flushed and, if no other export serves
    /// it, closed. Returns the export as it was at the end.
    pub fn remove(&self, name: &str) -> Result<ExportInfo, ServiceError> {
        let _op = lock(&self.ops);
        let mut last = self.info(name).ok_or_else(|| ServiceError::UnknownExport(name.to_string()))?;
        let removed = self.server.remove_export(name).map_err(|e| match e {
            ServerError::UnknownExport(n) => ServiceError::UnknownExport(n),
            e => ServiceError::Server(e),
        })?;
        if !removed.wait_closed(Some(self.config.removal_grace)) {
            tracing::warn!(export = %name, "clients did not finish within the removal grace; cutting them");
            removed.cut();
            removed.wait_closed(Some(Duration::from_secs(5)));
        }
        let flushed = removed.export().flush();
        let status = removed.status();
        (last.clients, last.connections, last.requests) =
            (status.clients, status.connections, status.requests);
        (last.bytes_read, last.bytes_written, last.errors) =
            (status.bytes_read, status.bytes_written, status.io_errors);
        drop(removed);
        let mut save_after = false;
        let closing = {
            let mut st = lock(&self.state);
            let entry = st.exports.remove(name);
            if entry.as_ref().is_some_and(|e| e.saved.is_some()) {
                save_after = true;
            }
            match entry.and_then(|e| st.disks.get_mut(&e.key).map(|d| (e.key, d))) {
                Some((key, d)) => {
                    d.exports.retain(|n| n != name);
                    if d.writer.as_deref() == Some(name) {
                        d.writer = None;
                    }
                    if d.exports.is_empty() { st.disks.remove(&key) } else { None }
                }
                None => None,
            }
        };
        if save_after {
            self.save_state();
        }
        if let Some(o) = closing {
            self.close(o, &[name.to_string()]);
        }
        tracing::info!(export = %name, "export removed");
        flushed.map_err(|source| ServiceError::Flush { name: name.to_string(), source })?;
        Ok(last)
    }

    /// Snapshots the disk of export `name` while it is in use: its writable top is frozen
    /// and a new empty one started at once (the pause does not grow with the top's size), then
    /// the frozen top is sealed into a new layer, in the background unless `wait`. The export
    /// must be its disk's writer. See FORMAT.md, "Snapshots of a running disk".
    pub fn snapshot(&self, name: &str, wait: bool) -> Result<SnapshotInfo, ServiceError> {
        let disk = {
            let st = lock(&self.state);
            let entry = st.exports.get(name).ok_or_else(|| ServiceError::UnknownExport(name.to_string()))?;
            let d = st.disks.get(&entry.key).ok_or_else(|| ServiceError::UnknownExport(name.to_string()))?;
            if d.writer.as_deref() != Some(name) {
                return Err(ServiceError::Snapshot {
                    name: name.to_string(),
                    source: mcow_engine::Error::ReadOnly,
                });
            }
            d.disk.clone()
        };
        let snap =
            disk.snapshot().map_err(|source| ServiceError::Snapshot { name: name.to_string(), source })?;
        let mut info = SnapshotInfo {
            export: name.to_string(),
            disk: disk.dir().to_path_buf(),
            frozen: snap.frozen,
            top: snap.top,
            took_us: snap.took.as_micros() as u64,
            switch_us: snap.switch.as_micros() as u64,
            layer: None,
            seal_ms: None,
        };
        if wait {
            let started = Instant::now();
            let mut last = None;
            while let Some(d) = disk
                .seal_frozen(&mut |_, _| {})
                .map_err(|source| ServiceError::Snapshot { name: name.to_string(), source })?
            {
                last = Some(d);
            }
            info.layer = last.map(|d| d.to_string());
            info.seal_ms = Some(started.elapsed().as_millis() as u64);
        } else {
            let mut st = lock(&self.state);
            if let Some(d) = st.exports.get(name).map(|e| e.key.clone()).and_then(|k| st.disks.get_mut(&k)) {
                // One sealer per disk: a running one seals this frozen top too, after its own.
                if d.sealer.as_ref().is_none_or(|s| s.is_finished()) {
                    d.sealer = Some(spawn_sealer(disk.clone()));
                }
            }
        }
        tracing::info!(export = %name, frozen = %info.frozen, top = %info.top, took_us = info.took_us, "snapshot taken");
        Ok(info)
    }

    /// Rewrites the state file (if there is one) with the persisted exports: beside it, synced,
    /// renamed over it, the directory synced. A failure is logged (the exports are served all
    /// the same; a restart would not add them again).
    fn save_state(&self) {
        let Some(path) = &self.config.state else { return };
        let mut saved: Vec<(u64, SavedExport)> = lock(&self.state)
            .exports
            .values()
            .filter_map(|e| e.saved.clone().map(|s| (e.added, s)))
            .collect();
        saved.sort_by_key(|(added, _)| *added);
        let state = SavedState { exports: saved.into_iter().map(|(_, s)| s).collect() };
        let mut text = serde_json::to_vec_pretty(&state).unwrap_or_default();
        text.push(b'\n');
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            std::fs::File::open(dir)?.sync_all()
        };
        if let Err(e) = write() {
            tracing::error!(file = %path.display(), error = %e, "cannot write the state file: a restart will not add the exports again");
        }
    }

    /// The export `name` as listed, if there is one.
    pub fn info(&self, name: &str) -> Option<ExportInfo> {
        self.list().into_iter().find(|e| e.name == name)
    }

    /// Every export, in the order they were added, with its counters.
    pub fn list(&self) -> Vec<ExportInfo> {
        let statuses = self.server.exports();
        let st = lock(&self.state);
        statuses
            .into_iter()
            .filter_map(|s| {
                let entry = st.exports.get(&s.name)?;
                let disk = st.disks.get(&entry.key)?;
                let (fetched, fetch_requests) = disk.source.as_ref().map_or((0, 0), |f| f.stats());
                let reads = disk.disk.cache_reads();
                Some(ExportInfo {
                    disk: entry.key.clone(),
                    reference: entry.reference.clone(),
                    size: s.size,
                    read_only: s.read_only,
                    clients: s.clients,
                    connections: s.connections,
                    requests: s.requests,
                    bytes_read: s.bytes_read,
                    bytes_written: s.bytes_written,
                    errors: s.io_errors,
                    bytes_fetched: disk.pulled_bytes + fetched,
                    fetch_requests,
                    fetch_errors: disk.source.as_ref().map_or(0, |f| f.errors()),
                    fetch_retries: disk.source.as_ref().map_or(0, |f| f.retries()),
                    fetch: disk.source.as_ref().map(|_| disk.settings),
                    cache_hits: reads.hits,
                    cache_misses: reads.misses,
                    name: s.name,
                })
            })
            .collect()
    }

    /// The bounded cache's state (`cache_limit`), if there is a limit.
    pub fn cache_stats(&self) -> Option<mcow_engine::CacheStats> {
        self.engine.cache_stats()
    }

    /// Blocks (and bytes) copied from other local layers instead of fetched, so far.
    pub fn reuse_stats(&self) -> mcow_engine::ReuseStats {
        self.engine.reuse_stats()
    }

    /// Cancels every origin's fetches (reads waiting for them fail): for a stop that must not
    /// wait for a stalled origin.
    pub fn cancel_fetches(&self) {
        for d in lock(&self.state).disks.values() {
            if let Some(s) = &d.source {
                s.cancel();
            }
        }
    }

    /// Ends the service once its server has stopped (every listener returned, so requests are
    /// answered and exports flushed): background fetches and read-ahead get the fetch grace to
    /// land what they fetch, then their origins are cancelled; what each disk fetched is
    /// logged.
    pub fn finish(&self) {
        let disks: Vec<OpenDisk> = {
            let mut st = lock(&self.state);
            st.exports.clear();
            st.disks.drain().map(|(_, d)| d).collect()
        };
        for d in &disks {
            d.stop.store(true, Ordering::Relaxed);
        }
        let until = Instant::now() + self.config.fetch_grace;
        let running = || disks.iter().any(|d| d.background.as_ref().is_some_and(|b| !b.is_finished()));
        while running() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let quiet =
            !running() && self.engine.stop_background(until.saturating_duration_since(Instant::now()));
        if !quiet {
            tracing::warn!("fetches still running at exit; cancelling them");
            disks.iter().filter_map(|d| d.source.as_ref()).for_each(|s| s.cancel());
        }
        for d in disks {
            let names = d.exports.clone();
            self.close(d, &names);
        }
        if !self.engine.stop_background(self.config.fetch_grace) {
            tracing::warn!("read-ahead fetches still running at exit");
        }
        if let Some(c) = self.engine.cache_stats() {
            tracing::info!(
                limit = c.limit,
                bytes = c.bytes,
                dropped_blocks = c.dropped_blocks,
                dropped_bytes = c.dropped_bytes,
                "served; the bounded cache"
            );
        }
        let reused = self.engine.reuse_stats();
        tracing::info!(
            blocks_reused = reused.blocks,
            bytes_reused = reused.bytes,
            "served; copied from other local layers instead of fetched"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tried: no options, each option, a window out of range, fetching everything with a
    // cache limit. Must hold: the service's defaults fill what is not given; the bad ones are
    // refused naming the problem.
    #[test]
    fn fetch_options_fill_in_the_defaults_and_refuse_what_cannot_be() {
        let config = ServiceConfig::default();
        let d = FetchOptions::default().apply(config.fetch_defaults(), false).unwrap();
        assert_eq!(
            d,
            FetchSettings {
                window: FetchPolicy::DEFAULT_WINDOW,
                readahead: FetchPolicy::DEFAULT_READAHEAD,
                prefetch: true,
                all: false
            }
        );
        let o = FetchOptions { window: Some(16), readahead: Some(0), prefetch: Some(false), all: Some(true) };
        assert_eq!(
            o.apply(config.fetch_defaults(), false).unwrap(),
            FetchSettings { window: 16, readahead: 0, prefetch: false, all: true }
        );
        for w in [0, 4097] {
            let e = FetchOptions { window: Some(w), ..Default::default() }
                .apply(config.fetch_defaults(), false)
                .unwrap_err();
            assert!(e.contains(&format!("fetch window {w}")), "{e}");
        }
        let limited = ServiceConfig { cache_limit: Some(1 << 30), ..ServiceConfig::default() };
        let e = FetchOptions { all: Some(true), ..Default::default() }
            .apply(limited.fetch_defaults(), limited.cache_limit.is_some())
            .unwrap_err();
        assert!(e.contains("cache limit"), "{e}");
    }

    // Tried: a state file with an export given fetch options and one without, written as the
    // service writes it and read back by `load_state`. Must hold: the options come back as
    // given, and an export without them is written without a `fetch` key (as before them).
    #[test]
    fn the_state_file_keeps_fetch_options() {
        let with = SavedExport {
            name: "a".into(),
            disk: "oci://r/x:1".into(),
            read_only: true,
            fetch: FetchOptions { window: Some(1), prefetch: Some(false), ..Default::default() },
        };
        let without = SavedExport {
            name: "b".into(),
            disk: "d".into(),
            read_only: false,
            fetch: FetchOptions::default(),
        };
        let state = SavedState { exports: vec![with.clone(), without.clone()] };
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(text.matches("\"fetch\"").count(), 1, "{text}");
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("state.json");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(load_state(&path).unwrap(), vec![with, without]);
    }
}
