//! The writable top layer: where a disk's writes go, crash consistent.
//!
//! A top is two files. The data file is a layer header followed by blocks, allocated as they
//! are first written; a block already in the top is overwritten in place. The journal is a
//! header followed by batches of mapping changes (block N now lives at physical block P, or
//! reads as zero, or is discarded). A flush makes data durable first, then appends one batch
//! and makes it durable; a batch is the commit point. Flushes are grouped into rounds that
//! hold no lock while they sync, so writes go on meanwhile, and every flush that arrives while
//! a round runs is served by the next one (see [`TopLayer::flush`]). After a crash, replaying every whole
//! batch gives a map whose blocks were all durable before the batch was written, so every
//! flushed write reads back; a torn last batch is ignored. A damaged batch with a whole one
//! behind it is corruption: a writable open refuses it rather than cut committed batches away. A physical block freed by a zero or
//! discard is reused only after the batch that frees it is durable, so a crash can never leave
//! an old mapping pointing at reused data.
//!
//! # Force-share readers
//!
//! A read-only force-share open ([`TopLayer::open_shared`], `-U`) may sit beside a writer in
//! another process, which keeps reusing freed physical blocks. Its guarantee: every block it
//! returns holds data that block has held (stale or newer, possibly a mix of two of its own
//! writes if one was in progress), or zeros / what lies below where its map says so; never
//! another block's data. It never shows less than the last flush completed before the read
//! began. It does so by following the journal: before each read of the top's data it applies
//! the whole batches appended since it last looked (the journal is append-only while a writer
//! runs: a fstat, and nothing more if the length is unchanged), and after the read it checks
//! that the journal has not changed (same length, same bytes after the last applied batch);
//! if it has, it resolves and reads again. Why that suffices: the writer puts another block's
//! data into physical block P only once P is free, and P becomes free only when a batch
//! unmapping it is durable in the journal (freed by a zero or discard: after its batch is
//! written and synced; free at the writer's open: the writer's map, replayed from the same
//! whole batches, lacks it, so a batch after ours unmapped it). So if the data read saw any
//! byte of such a reuse, that batch was already in the journal before the read ended, and the
//! check after the read sees a journal that moved. If the check sees none, every batch that
//! could free a block our map points to is one we applied before reading, and the map we read
//! through was still right. A writer's open that cuts a torn tail only removes bytes after the
//! last whole batch (the reader compares them, so a cut and a regrowth to the same length is
//! seen); committed batches are never rewritten; a journal that shrank below what was applied
//! is replayed from scratch anyway; a journal whose header changed is refused. This relies on one host's page cache ordering the
//! writer's journal write before its data write for other processes (true of local
//! filesystems, not promised by network ones). Other opens pay nothing: no writer can run
//! beside them.
//!
//! # Compaction
//!
//! The journal would grow with every mapping change for the life of the top. When it holds much
//! more than the live map (see [`TopLayer::set_compaction`]), a flush round, once its batch is
//! durable, writes a fresh journal beside it (same header, then the durable map as batches from
//! sequence 1), syncs it, renames it over the journal and syncs the directory: a crash finds
//! the old journal or the new one, both whole. A force-share reader notices the rename (the
//! journal's path leads to another file) and replays the new file from its start; the check
//! after its read includes that, and the writer reuses a block only after the rename. A
//! leftover temporary journal is debris that a writable open removes.
//!
//! # Pending logs
//!
//! A process kill (the host keeps running) keeps the page cache, so the data of every
//! acknowledged write, but not the mapping changes waiting in memory for the next round. So a
//! writer opened with pending logs ([`TopLayer::open_logged`]) also records each mapping change
//! as it makes it (a write that maps new blocks, before it returns; a marker; an in-place write
//! to a block only a log maps yet, with its new CRC) in the current one of two logs, never
//! synced (the disk writes them through a shared mapping, `mapped`, so a record is a store, not
//! a system call). A round that takes the pending changes as batch `s` switches to the
//! other log, started afresh to follow batch `s`; the log it leaves holds exactly that batch's
//! changes. An open applies, after the journal, the log that follows the journal's last batch
//! and then the one started after that log, each data record only if the blocks it maps read
//! with its CRCs (after a power loss they may not have reached the disk); a writable open makes
//! what it applied durable as one batch before anything else. So a kill loses no acknowledged
//! write, and a power loss keeps the rules above: a record is applied only where its data is
//! verifiably there, and freed blocks still wait for a durable batch. A compaction marks the
//! current log as following the compacted journal too, before its rename. The layout and rules
//! are in docs/FORMAT.md ("Pending logs").
//!
//! # Space
//!
//! Blocks freed by a zero or discard also get their space punched out of the data file, once
//! the batch that frees them is durable and before they can be reused, so trimming a disk
//! shrinks its top's allocated size.
//!
//! Owns: allocation, copy-up of a partly written block, the journal, the pending logs and
//! recovery. Does not own:
//! what lies below the top (the caller passes a function that reads it), nor file opening.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use mcow_format::{
    BlockHashKind, Digest, ExtentKind, HEADER_SIZE, IndexEntry, JOURNAL_HEADER_SIZE, JournalBatch,
    JournalHeader, LayerHeader, LayerKind, MAX_RECORD_BLOCKS, NO_ALT, PENDING_HEADER_SIZE, PENDING_PIECE,
    PendingHeader, decode_batch, decode_record, encode_batch, encode_record_into, find_whole_batch,
};

use crate::error::{Error, Result};
use crate::extent_map::{Extent, ExtentMap, Loc, TOP};
use crate::storage::Storage;

/// Locks that in-place writes to blocks only a pending log maps take, by block number.
const IN_PLACE_STRIPES: usize = 64;

/// Entries per batch in a compacted journal (the format allows up to 2^20).
const SNAPSHOT_BATCH_ENTRIES: usize = 1 << 16;

/// Default compaction thresholds: the journal is rewritten once it is past this many bytes and
/// more than [`COMPACT_RATIO`] times the size of a compacted one.
pub const COMPACT_MIN_BYTES: u64 = 1 << 20;
/// See [`COMPACT_MIN_BYTES`].
pub const COMPACT_RATIO: u64 = 4;

/// The directory operations around a top's journal: a writer replaces its journal with a
/// compacted one through them, and a force-share reader notices that it was replaced. The
/// journal is `<top>.journal` and the temporary one beside it `<top>.journal.tmp`
/// ([`journal_temp_path`]) for host files.
pub trait JournalFiles: Send + Sync {
    /// Creates the temporary journal, empty (replacing a leftover one).
    fn create_temp(&self) -> io::Result<Box<dyn Storage>>;
    /// Renames the temporary journal over the journal (atomic, not yet durable).
    fn rename_temp(&self) -> io::Result<()>;
    /// Makes the directory's entries (the rename) durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Removes a leftover temporary journal; fine if there is none.
    fn remove_temp(&self) -> io::Result<()>;
    /// [`Storage::file_id`] of the file the journal's name leads to now.
    fn current_id(&self) -> io::Result<u64>;
    /// Opens, read-only, the file the journal's name leads to now.
    fn open_current(&self) -> io::Result<Box<dyn Storage>>;
}

/// A top's two pending logs (see "Pending logs" in the module doc): `<top>.pending.0` and
/// `<top>.pending.1` for host files ([`pending_log_path`]).
pub type PendingLogs = [Box<dyn Storage>; 2];

/// What opening a top found beyond its last good batch: debris of writes that never reached a
/// durable flush. Harmless; a writable open removes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Debris {
    /// Bytes after the last whole journal batch.
    pub journal_tail_bytes: u64,
    /// Physical blocks at the end of the data file, past the last one any mapping uses. (Unused
    /// blocks below it are not debris: they are free and get reused.)
    pub unused_blocks: u64,
}

/// What an open applied from the pending logs (see "Pending logs" in the module doc): changes
/// acknowledged but not flushed before the writer stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records read from the logs that follow the journal.
    pub records: u64,
    /// Blocks their changes mapped or marked.
    pub blocks: u64,
    /// Blocks of data records skipped because they did not read with the recorded CRC (their
    /// data never reached the disk, or a later in-place write changed them) or lie past the
    /// data file.
    pub skipped_blocks: u64,
}

/// Where a journal was found damaged in the middle (see [`Error::JournalCorrupt`]): only a
/// read-only open gets this far, and it shows the disk as of the last good batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct JournalDamage {
    offset: u64,
    good_batches: u64,
    next_whole: u64,
}

struct Alloc {
    next_pblock: u64,
    /// Physical blocks free for reuse now.
    free: Vec<u64>,
    /// Blocks freed by changes not yet durable in the journal.
    freed_pending: Vec<u64>,
    /// Mapping changes not yet taken by a flush round, in order.
    pending: Vec<IndexEntry>,
    /// Virtual blocks `[start, end)` that writes have allocated and are filling, not yet
    /// mapped: other writes and markers on them wait (on `TopLayer::filled`).
    filling: Vec<(u64, u64)>,
}

/// Flush rounds (group commit). One round at a time makes the data file durable and appends
/// and syncs one batch; a flush is done once a round that started after it was called has
/// succeeded, so flushes arriving while a round runs share the next one.
struct Rounds {
    /// Rounds started, and the number of the last one that succeeded.
    started: u64,
    done: u64,
    running: bool,
    /// The journal as the rounds know it; the running round has it out.
    state: Option<RoundState>,
}

/// A writer's pending logs: where it records each mapping change as it makes it (see "Pending
/// logs" in the module doc). Locked after the allocator and the map, never before them.
struct Recorder {
    logs: PendingLogs,
    /// The log records go to, its header, and where its next record goes.
    cur: usize,
    header: PendingHeader,
    len: u64,
    /// Virtual blocks that records of the current log and of the one before it map (runs at
    /// [`LOGGED`]): an in-place write to them records its block's new CRC.
    logged: ExtentMap,
    logged_prev: ExtentMap,
    /// A round failed after it switched logs (its changes are pending again): the next round
    /// keeps the current log and only updates its header.
    retry: bool,
    /// The CRC field of the version of batch `header.base` that a failed round wrote to the
    /// journal (its sync failed): a kill may leave that version, so the retry keeps the log
    /// following it too (as its alt).
    written_crc: Option<u32>,
    /// The bytes of the records being appended, kept between appends for its capacity.
    buf: Vec<u8>,
}

/// The location of every run of [`Recorder::logged`], which only says which blocks a log maps:
/// a location that each neighbour continues (a marker's does not advance), so that neighbouring
/// runs merge and lookups stay cheap however scattered the writes were.
const LOGGED: Loc = Loc { layer: TOP, kind: ExtentKind::Zero, pblock: 0 };

/// What only the running round changes.
struct RoundState {
    /// Where the next batch goes and its sequence number less one.
    journal_len: u64,
    sequence: u64,
    /// The map as the durable journal holds it (what a compaction writes).
    committed: ExtentMap,
    /// A compaction renamed the journal but could not sync the directory: the next round does
    /// that before it appends anything.
    dir_unsynced: bool,
}

/// What a force-share reader has applied of a journal that a writer may be appending to.
struct Follow {
    /// The journal header as read at open; another header means another journal.
    header: Vec<u8>,
    /// End of the last batch applied to the map, and its sequence number.
    pos: u64,
    sequence: u64,
    /// The bytes after `pos` when the journal was last read: a batch being appended, debris of
    /// a crash, or damage. Empty in the common case.
    tail: Vec<u8>,
    /// [`Storage::file_id`] of the journal file this reader has open.
    journal_id: u64,
    /// Counts changes of `pos` and `tail`, so a read can tell that its map moved under it.
    generation: u64,
}

/// The journal state a force-share read started from (see [`TopLayer::read_data`]).
#[derive(Clone, Copy)]
struct Seen {
    generation: u64,
    len: u64,
}

/// A writable top layer over two storages (data and journal).
pub struct TopLayer {
    data: Box<dyn Storage>,
    /// Replaced by a compaction (writer) or when a reader sees that it was (force-share).
    journal: RwLock<Box<dyn Storage>>,
    /// Set by [`TopLayer::attach_journal_files`]; without it the journal is never compacted.
    files: Option<Box<dyn JournalFiles>>,
    compact_min: AtomicU64,
    compact_ratio: AtomicU64,
    compactions: AtomicU64,
    path: PathBuf,
    /// The data file's header (its parent is the chain digest of the stack below).
    pub header: LayerHeader,
    bs: u64,
    read_only: bool,
    /// Set for a force-share open only: the journal as this reader last saw it.
    follow: Option<Mutex<Follow>>,
    map: RwLock<ExtentMap>,
    alloc: Mutex<Alloc>,
    /// Signalled when a write's reserved blocks are mapped (or given back).
    filled: Condvar,
    rounds: Mutex<Rounds>,
    round_ended: Condvar,
    /// Set after every write to the data file, cleared by a round just before it syncs the data
    /// file: a round with nothing written since the last data sync skips that sync.
    data_dirty: AtomicBool,
    debris: Debris,
    damage: Option<JournalDamage>,
    /// A writer's pending logs, if it was opened with them.
    recorder: Option<Mutex<Recorder>>,
    /// Serialize in-place writes to the same block (by block number, [`IN_PLACE_STRIPES`]
    /// locks) while the block's mapping is only in a pending log, so that the records of such
    /// writes are in the order their data was written.
    in_place_locks: Vec<Mutex<()>>,
    recovered: Recovered,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TopLayer {
    /// Writes a new, empty top on `parent` and makes it durable. `path` names it in errors.
    pub fn create(
        data: Box<dyn Storage>,
        journal: Box<dyn Storage>,
        path: &Path,
        block_size: u32,
        virtual_size: u64,
        parent: Digest,
    ) -> Result<TopLayer> {
        Self::create_logged(data, journal, None, path, block_size, virtual_size, parent)
    }

    /// [`TopLayer::create`] with pending logs (emptied here), so that acknowledged writes
    /// survive a process kill.
    pub fn create_logged(
        data: Box<dyn Storage>,
        journal: Box<dyn Storage>,
        logs: Option<PendingLogs>,
        path: &Path,
        block_size: u32,
        virtual_size: u64,
        parent: Digest,
    ) -> Result<TopLayer> {
        let header = LayerHeader {
            kind: LayerKind::Writable,
            block_size,
            virtual_size,
            parent,
            instance: new_instance_id(),
            compat_features: 0,
            // A top has no hash table; this only sets the version it is written with.
            block_hash: BlockHashKind::Blake3,
        };
        let jpath = journal_path(path);
        data.set_len(0).map_err(Error::io("truncate", path))?;
        data.write_at(&header.encode(), 0).map_err(Error::io("write", path))?;
        data.sync().map_err(Error::io("sync", path))?;
        journal.set_len(0).map_err(Error::io("truncate", &jpath))?;
        let jh = JournalHeader { instance: header.instance, block_size };
        journal.write_at(&jh.encode(), 0).map_err(Error::io("write", &jpath))?;
        journal.sync().map_err(Error::io("sync", &jpath))?;
        if let Some(logs) = &logs {
            for (i, log) in logs.iter().enumerate() {
                log.set_len(0).map_err(Error::io("truncate", &pending_log_path(path, i)))?;
            }
        }
        Self::open_inner(data, journal, logs, path, false, false)
    }

    /// Opens a top, replaying its journal. A writable open also trims debris left by a crash.
    ///
    /// A journal damaged in the middle (a whole batch after the first one that is not) is
    /// corruption: a writable open fails with [`Error::JournalCorrupt`] and changes nothing; a
    /// read-only open logs the error, shows the good batches, and reports the damage through
    /// [`TopLayer::corruption`].
    pub fn open(
        data: Box<dyn Storage>,
        journal: Box<dyn Storage>,
        path: &Path,
        read_only: bool,
    ) -> Result<TopLayer> {
        Self::open_inner(data, journal, None, path, read_only, false)
    }

    /// [`TopLayer::open`] with pending logs: their records that follow the journal are applied
    /// (see "Pending logs" in the module doc), and a writable open makes them durable at once
    /// and then records its own changes in them.
    pub fn open_logged(
        data: Box<dyn Storage>,
        journal: Box<dyn Storage>,
        logs: PendingLogs,
        path: &Path,
        read_only: bool,
    ) -> Result<TopLayer> {
        Self::open_inner(data, journal, Some(logs), path, read_only, false)
    }

    /// Opens a top read-only beside a writer that may be running (a force-share open): like
    /// [`TopLayer::open`] with `read_only`, and the top then follows the journal the writer
    /// appends to, so that a read never returns another block's data (see "Force-share
    /// readers" in the module doc).
    pub fn open_shared(data: Box<dyn Storage>, journal: Box<dyn Storage>, path: &Path) -> Result<TopLayer> {
        Self::open_inner(data, journal, None, path, true, true)
    }

    fn open_inner(
        data: Box<dyn Storage>,
        journal: Box<dyn Storage>,
        logs: Option<PendingLogs>,
        path: &Path,
        read_only: bool,
        follow: bool,
    ) -> Result<TopLayer> {
        let jpath = journal_path(path);
        let data_len = data.len().map_err(Error::io("stat", path))?;
        let mut hb = vec![0u8; HEADER_SIZE];
        if data_len < HEADER_SIZE as u64 {
            return Err(Error::format(path)(mcow_format::FormatError::Truncated {
                what: "top layer",
                got: data_len as usize,
                need: HEADER_SIZE,
            }));
        }
        data.read_at(&mut hb, 0).map_err(Error::io("read", path))?;
        let header = LayerHeader::decode(&hb).map_err(Error::format(path))?;
        if header.kind != LayerKind::Writable {
            return Err(Error::WrongKind {
                path: path.to_path_buf(),
                expected: "writable top",
                found: "sealed layer",
            });
        }
        let bs = u64::from(header.block_size);
        let jlen = journal.len().map_err(Error::io("stat", &jpath))?;
        let mut jbuf =
            vec![0u8; usize::try_from(jlen).map_err(|_| Error::Invalid("journal too large".into()))?];
        journal.read_at(&mut jbuf, 0).map_err(Error::io("read", &jpath))?;
        let jh = JournalHeader::decode(&jbuf).map_err(Error::format(&jpath))?;
        if jh.instance != header.instance || jh.block_size != header.block_size {
            return Err(Error::ForeignJournal { path: jpath.clone() });
        }

        // Replay every whole batch in sequence.
        let vblocks = header.block_count();
        let data_blocks = (data_len - HEADER_SIZE as u64) / bs;
        let mut map = ExtentMap::new();
        let (used, mut sequence) = replay(&mut map, &jbuf[JOURNAL_HEADER_SIZE..], 0, vblocks, &jpath)?;
        let tail_at = JOURNAL_HEADER_SIZE + used;
        let mut pos = tail_at;

        // A whole batch in what is left means a damaged batch in the middle, not a torn tail.
        let damage = find_whole_batch(&jbuf[tail_at..]).map(|(at, _)| JournalDamage {
            offset: pos as u64,
            good_batches: sequence,
            next_whole: (pos + at) as u64,
        });
        if let Some(d) = damage {
            let err = d.error(&jpath);
            if !read_only {
                return Err(err);
            }
            tracing::error!("{err}");
        }

        // The changes the pending logs hold after the last batch (not behind damage, not for a
        // force-share reader); a writable open makes them durable at once, before it computes
        // free blocks and debris, so that blocks only they map are neither trimmed nor reused.
        let mut last_crc = batch_crc(&jbuf[..pos], sequence);
        let mut recovered = Recovered::default();
        if let Some(logs) = logs.as_ref().filter(|_| damage.is_none() && !follow) {
            let geometry = (bs, data_blocks, vblocks);
            let journal_map = map.clone();
            let mut found;
            (found, recovered) = replay_pending(
                &mut map,
                logs,
                &header.instance,
                sequence,
                last_crc,
                data.as_ref(),
                geometry,
                path,
            )?;
            if !found.is_empty() && !maps_each_block_once(&map) {
                // Only a log that does not belong to this journal (which its checks should
                // have told) can do this: keep the journal's map rather than refuse the top.
                tracing::warn!(top = %path.display(), "the pending logs map a physical block twice; ignoring them");
                map = journal_map;
                found.clear();
                recovered = Recovered::default();
            }
            if !read_only && !found.is_empty() {
                tracing::info!(top = %path.display(), changes = found.len(), "recovered unflushed mapping changes from the pending logs");
                data.sync().map_err(Error::io("sync", path))?;
                let bytes = encode_batch(&JournalBatch { sequence: sequence + 1, entries: found });
                journal.write_at(&bytes, pos as u64).map_err(Error::io("write", &jpath))?;
                journal.set_len((pos + bytes.len()) as u64).map_err(Error::io("truncate", &jpath))?;
                journal.sync().map_err(Error::io("sync", &jpath))?;
                pos += bytes.len();
                sequence += 1;
                last_crc = batch_crc(&bytes, sequence);
            }
        }

        // Rebuild the allocator from the map.
        let mut used = vec![0u64; (data_blocks as usize).div_ceil(64)];
        let mut next_pblock = 0u64;
        for ext in map.iter().filter(|e| e.loc.kind == ExtentKind::Data) {
            if ext.loc.pblock + (ext.end - ext.start) > data_blocks {
                return Err(Error::format(&jpath)(mcow_format::FormatError::Invalid {
                    field: "journal",
                    reason: format!(
                        "blocks {}+{} are mapped to physical blocks past the {data_blocks} in {}",
                        ext.start,
                        ext.end - ext.start,
                        path.display()
                    ),
                }));
            }
            for p in ext.loc.pblock..ext.loc.pblock + (ext.end - ext.start) {
                let (w, b) = ((p / 64) as usize, p % 64);
                if used[w] & (1 << b) != 0 {
                    return Err(Error::format(&jpath)(mcow_format::FormatError::Invalid {
                        field: "journal",
                        reason: format!("physical block {p} is mapped twice"),
                    }));
                }
                used[w] |= 1 << b;
                next_pblock = next_pblock.max(p + 1);
            }
        }
        let free: Vec<u64> =
            (0..next_pblock).rev().filter(|p| used[(p / 64) as usize] & (1 << (p % 64)) == 0).collect();
        // Behind damage nothing is debris: the tail holds committed batches and the data file
        // the blocks they map.
        let debris = match damage {
            Some(_) => Debris::default(),
            None => {
                Debris { journal_tail_bytes: jlen - tail_at as u64, unused_blocks: data_blocks - next_pblock }
            }
        };
        if !read_only {
            debug_assert!(damage.is_none());
            if jlen > pos as u64 {
                tracing::info!(journal = %jpath.display(), bytes = debris.journal_tail_bytes, "dropping torn journal tail");
                journal.set_len(pos as u64).map_err(Error::io("truncate", &jpath))?;
            }
            let keep = HEADER_SIZE as u64 + next_pblock * bs;
            if data_len > keep {
                data.set_len(keep).map_err(Error::io("truncate", path))?;
            }
            // Free blocks whose punch a crash cut off (or that a punch never reached): give
            // their space back too. Nothing maps them.
            punch_blocks(data.as_ref(), bs, path, &free);
        }
        // A writer starts recording afresh: log 0 after the last batch, log 1 empty.
        let recorder = match logs {
            Some(logs) if !read_only => {
                Some(Mutex::new(Recorder::start(logs, header.instance, sequence, last_crc, path)?))
            }
            _ => None,
        };
        let follow = follow.then(|| {
            Mutex::new(Follow {
                header: jbuf[..JOURNAL_HEADER_SIZE].to_vec(),
                pos: pos as u64,
                sequence,
                tail: jbuf[pos..].to_vec(),
                journal_id: 0,
                generation: 0,
            })
        });
        let committed = if read_only { ExtentMap::new() } else { map.clone() };
        Ok(TopLayer {
            data,
            journal: RwLock::new(journal),
            files: None,
            compact_min: AtomicU64::new(COMPACT_MIN_BYTES),
            compact_ratio: AtomicU64::new(COMPACT_RATIO),
            compactions: AtomicU64::new(0),
            path: path.to_path_buf(),
            header,
            bs,
            read_only,
            follow,
            map: RwLock::new(map),
            alloc: Mutex::new(Alloc {
                next_pblock,
                free,
                freed_pending: Vec::new(),
                pending: Vec::new(),
                filling: Vec::new(),
            }),
            filled: Condvar::new(),
            rounds: Mutex::new(Rounds {
                started: 0,
                done: 0,
                running: false,
                state: Some(RoundState { journal_len: pos as u64, sequence, committed, dir_unsynced: false }),
            }),
            round_ended: Condvar::new(),
            data_dirty: AtomicBool::new(false),
            debris,
            damage,
            recorder,
            in_place_locks: (0..IN_PLACE_STRIPES).map(|_| Mutex::new(())).collect(),
            recovered,
        })
    }

    /// Gives the top the directory operations around its journal: a writer then compacts its
    /// journal (and here removes a leftover temporary one), a force-share reader follows a
    /// journal that a writer replaced.
    pub fn attach_journal_files(mut self, files: Box<dyn JournalFiles>) -> Result<TopLayer> {
        let jpath = journal_path(&self.path);
        if !self.read_only {
            files.remove_temp().map_err(Error::io("remove", &journal_temp_path(&self.path)))?;
        }
        if let Some(f) = &self.follow {
            lock(f).journal_id = self.journal_read().file_id().map_err(Error::io("stat", &jpath))?;
        }
        self.files = Some(files);
        Ok(self)
    }

    /// Sets when a flush compacts the journal: once it is at least `min_bytes` long and more
    /// than `ratio` times as long as a compacted journal of the same map would be.
    pub fn set_compaction(&self, min_bytes: u64, ratio: u64) {
        self.compact_min.store(min_bytes, Ordering::Relaxed);
        self.compact_ratio.store(ratio, Ordering::Relaxed);
    }

    /// Compactions this open has made.
    pub fn compactions(&self) -> u64 {
        self.compactions.load(Ordering::Relaxed)
    }

    /// The data file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn journal_read(&self) -> RwLockReadGuard<'_, Box<dyn Storage>> {
        self.journal.read().unwrap_or_else(|p| p.into_inner())
    }

    /// What the open found beyond the last durable state.
    pub fn debris(&self) -> Debris {
        self.debris
    }

    /// What the open applied from the pending logs.
    pub fn recovered(&self) -> Recovered {
        self.recovered
    }

    /// The corruption a read-only open found in the journal, if any (a writable open refuses).
    pub fn corruption(&self) -> Option<Error> {
        self.damage.map(|d| d.error(&journal_path(&self.path)))
    }

    fn map_read(&self) -> RwLockReadGuard<'_, ExtentMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn map_write(&self) -> RwLockWriteGuard<'_, ExtentMap> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The top's run holding `block`, or else the first block after it the top maps.
    pub fn lookup(&self, block: u64) -> Result<Extent, Option<u64>> {
        let map = self.map_read();
        map.get(block).ok_or_else(|| map.next_mapped(block))
    }

    /// A copy of the top's map (for operations that walk it).
    pub fn extents(&self) -> Vec<Extent> {
        self.map_read().iter().collect()
    }

    /// Number of data blocks the top stores.
    pub fn stored_blocks(&self) -> u64 {
        self.map_read().iter().filter(|e| e.loc.kind == ExtentKind::Data).map(|e| e.end - e.start).sum()
    }

    /// Reads `buf` from `offset` bytes into the top's data run starting at virtual block
    /// `vblock`. Returns false (reading nothing useful) if the top no longer stores that whole
    /// range as one run; the caller resolves again. The map lock is held during the read so the
    /// blocks cannot be freed and reused under it by this process's writes.
    ///
    /// A force-share reader first applies the batches the writer has appended since, and after
    /// the read checks that the journal did not move meanwhile; if it did, the bytes read may
    /// belong to a block the writer has since moved there, and it returns false to resolve
    /// again (see "Force-share readers" in the module doc).
    pub fn read_data(&self, vblock: u64, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let Some(follow) = &self.follow else { return self.read_run(vblock, offset, buf) };
        let seen = self.catch_up(follow)?;
        let read = self.read_run(vblock, offset, buf);
        if !self.journal_unmoved(follow, seen)? {
            return Ok(false);
        }
        read
    }

    fn read_run(&self, vblock: u64, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let map = self.map_read();
        let Some(e) = map.get(vblock) else { return Ok(false) };
        if e.loc.kind != ExtentKind::Data || (e.end - e.start) * self.bs < offset + buf.len() as u64 {
            return Ok(false);
        }
        let pos = HEADER_SIZE as u64 + e.loc.pblock * self.bs + offset;
        self.data.read_at(buf, pos).map_err(Error::io("read", &self.path))?;
        Ok(true)
    }

    /// For a force-share open, applies the batches a writer has appended to the journal since
    /// this reader last looked, so that the map shows every flush completed before this call.
    /// Nothing (and no system call) for other opens.
    pub fn refresh(&self) -> Result<()> {
        match &self.follow {
            Some(follow) => self.catch_up(follow).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Brings the map up to the journal's current whole batches; returns the journal state the
    /// map then reflects.
    fn catch_up(&self, follow: &Mutex<Follow>) -> Result<Seen> {
        let jpath = journal_path(&self.path);
        let mut f = lock(follow);
        loop {
            if let Some(files) = &self.files {
                let now = files.current_id().map_err(Error::io("stat", &jpath))?;
                if now != f.journal_id {
                    // A writer compacted the journal: replay the new one from its start.
                    let journal = files.open_current().map_err(Error::io("open", &jpath))?;
                    let mut header = vec![0u8; JOURNAL_HEADER_SIZE];
                    if journal.read_at(&mut header, 0).is_err() || header != f.header {
                        return Err(Error::Invalid(format!(
                            "{}: the journal was replaced by another one while a force-share reader had it open; open the disk again",
                            jpath.display()
                        )));
                    }
                    f.journal_id = journal.file_id().map_err(Error::io("stat", &jpath))?;
                    *self.journal.write().unwrap_or_else(|p| p.into_inner()) = journal;
                    *self.map_write() = ExtentMap::new();
                    (f.pos, f.sequence) = (JOURNAL_HEADER_SIZE as u64, 0);
                    f.tail.clear();
                    f.generation += 1;
                    continue;
                }
            }
            let len = self.journal_read().len().map_err(Error::io("stat", &jpath))?;
            let seen_end = f.pos + f.tail.len() as u64;
            if len == seen_end && self.tail_unchanged(&f, &jpath)? {
                return Ok(Seen { generation: f.generation, len });
            }
            let mut header = vec![0u8; JOURNAL_HEADER_SIZE];
            let header_read = match self.journal_read().read_at(&mut header, 0) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
                r => r.map(|()| true).map_err(Error::io("read", &jpath))?,
            };
            if !header_read || header != f.header {
                return Err(Error::Invalid(format!(
                    "{}: the journal was replaced while a force-share reader had it open; open the disk again",
                    jpath.display()
                )));
            }
            if len < f.pos {
                // Committed batches were cut away (no writer of ours does this): start over.
                tracing::warn!(journal = %jpath.display(), "journal shrank under a force-share reader; replaying it");
                *self.map_write() = ExtentMap::new();
                (f.pos, f.sequence) = (JOURNAL_HEADER_SIZE as u64, 0);
                f.tail.clear();
                f.generation += 1;
            }
            let mut bytes = vec![0u8; (len.max(f.pos) - f.pos) as usize];
            let read = self.journal_read().read_at(&mut bytes, f.pos);
            match read {
                // It shrank since the length was read: look again.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => continue,
                r => r.map_err(Error::io("read", &jpath))?,
            }
            let (used, sequence) =
                replay(&mut self.map_write(), &bytes, f.sequence, self.header.block_count(), &jpath)?;
            f.pos += used as u64;
            f.sequence = sequence;
            f.tail = bytes.split_off(used);
            f.generation += 1;
        }
    }

    /// Whether the journal's bytes after the last applied batch are still those last seen.
    fn tail_unchanged(&self, f: &Follow, jpath: &Path) -> Result<bool> {
        if f.tail.is_empty() {
            return Ok(true);
        }
        let mut now = vec![0u8; f.tail.len()];
        let read = self.journal_read().read_at(&mut now, f.pos);
        match read {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            r => r.map(|()| now == f.tail).map_err(Error::io("read", jpath)),
        }
    }

    /// Whether the journal is as `seen` found it: no batch applied or appended since.
    fn journal_unmoved(&self, follow: &Mutex<Follow>, seen: Seen) -> Result<bool> {
        let jpath = journal_path(&self.path);
        let f = lock(follow);
        if f.generation != seen.generation {
            return Ok(false);
        }
        if let Some(files) = &self.files
            && files.current_id().map_err(Error::io("stat", &jpath))? != f.journal_id
        {
            return Ok(false);
        }
        let len = self.journal_read().len().map_err(Error::io("stat", &jpath))?;
        Ok(len == seen.len && self.tail_unchanged(&f, &jpath)?)
    }

    /// Writes `data` at `offset` bytes into virtual block `vblock`; it may run on over the
    /// following blocks. Blocks the top already stores are written in place, consecutive ones
    /// that lie consecutively in the data file with one write. The others are allocated, as
    /// one contiguous run of physical blocks where the free list does not offer blocks, and
    /// filled: a block the data covers whole straight from `data` (consecutive ones with one
    /// write, no copy), a partly covered one from `below` (what the block reads as under the
    /// top) with `data` laid over it. The allocator lock is held only to pick the blocks and,
    /// after they are written, to map them: the copy-up and the data writes run without it,
    /// the blocks reserved meanwhile so that another write or marker on them waits.
    pub fn write(
        &self,
        vblock: u64,
        offset: usize,
        data: &[u8],
        below: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if data.is_empty() {
            return Ok(());
        }
        let w = Span { first: vblock, offset, data, bs: self.bs as usize };
        let last = w.last();
        let mut b = vblock;
        while b <= last {
            b += match self.write_in_place(&w, b, last)? {
                0 => self.write_new(&w, b, last, below)?,
                n => n,
            };
        }
        Ok(())
    }

    /// Writes the blocks from `b` on (up to `last`) that the top stores, as long as they lie
    /// consecutively in the data file, in one write. Returns how many; 0 if it does not store
    /// `b`. The map lock is held during the write, so the blocks cannot be freed under it.
    /// 4 KiB pieces in a block (what a pending log's CRCs cover).
    fn pieces_per_block(&self) -> usize {
        self.bs as usize / PENDING_PIECE
    }

    fn write_in_place(&self, w: &Span, b: u64, last: u64) -> Result<u64> {
        let map = self.map_read();
        let Some(e) = map.get(b).filter(|e| e.loc.kind == ExtentKind::Data) else { return Ok(0) };
        let end = e.end.min(last + 1);
        let (bytes, within) = w.bytes(b, end);
        let pos = HEADER_SIZE as u64 + e.loc.pblock * self.bs + within as u64;
        // A block whose mapping only a pending log holds: its write gets a partial record with
        // the CRCs of the pieces it writes as they will read after it, written *before* the
        // data, so that a kill between the two leaves a piece that reads as its previous
        // record says and one after them a piece that reads as this one says (recovery takes
        // either; FORMAT.md, "Pending logs"). Writes to one such block take its stripe lock
        // across the record and the data write, so records come in the order of the data.
        // (Only a flush round can make a block stop being log-only, never start: that needs a
        // new mapping, so the map lock held here.)
        let held = self.recorder.as_ref().is_some_and(|r| lock(r).holds(b, end));
        // The stripes of blocks b..end, in ascending order (so that two writes never take them
        // in opposite orders): all of them, or a range that may wrap around. One block (the
        // common case) takes one, without a Vec.
        let (mut _stripe, mut _stripes): (Option<MutexGuard<'_, ()>>, Vec<MutexGuard<'_, ()>>) =
            (None, Vec::new());
        if held {
            let n = IN_PLACE_STRIPES as u64;
            let (first, count) = ((b % n) as usize, (end - b).min(n) as usize);
            if count == 1 {
                _stripe = Some(lock(&self.in_place_locks[first]));
            } else {
                let wrapped = (first + count).saturating_sub(IN_PLACE_STRIPES);
                let ids = (0..wrapped).chain(first..(first + count).min(IN_PLACE_STRIPES));
                _stripes = ids.map(|i| lock(&self.in_place_locks[i])).collect();
            }
        }
        if let (true, Some(rec)) = (held, &self.recorder) {
            // Pieces written whole: the CRC of the data; one written in part (at most one at
            // each end): read, the data laid over it, its CRC. Up to a block's worth of CRCs
            // (16 for 64 KiB blocks) on the stack.
            let (lo, hi) = (within / PENDING_PIECE, (within + bytes.len()).div_ceil(PENDING_PIECE));
            let run_at = HEADER_SIZE as u64 + e.loc.pblock * self.bs;
            let mut piece = Vec::new();
            let (mut small, mut large) = ([0u32; 16], Vec::new());
            let crcs: &mut [u32] = if hi - lo <= small.len() {
                &mut small[..hi - lo]
            } else {
                large.resize(hi - lo, 0);
                &mut large
            };
            for (crc, i) in crcs.iter_mut().zip(lo..hi) {
                let (start, stop) = (i * PENDING_PIECE, (i + 1) * PENDING_PIECE);
                let (from, to) = (start.max(within), stop.min(within + bytes.len()));
                if from == start && to == stop {
                    *crc = crc32c::crc32c(&bytes[start - within..stop - within]);
                } else {
                    piece.resize(PENDING_PIECE, 0);
                    self.data
                        .read_at(&mut piece, run_at + start as u64)
                        .map_err(Error::io("read", &self.path))?;
                    piece[from - start..to - start].copy_from_slice(&bytes[from - within..to - within]);
                    *crc = crc32c::crc32c(&piece);
                }
            }
            let entry =
                IndexEntry { vblock: b, count: end - b, kind: ExtentKind::Data, pblock: e.loc.pblock };
            lock(rec).append(&[(entry, lo as u32, crcs)], true, self.pieces_per_block(), &self.path)?;
        }
        self.data.write_at(bytes, pos).map_err(Error::io("write", &self.path))?;
        self.data_dirty.store(true, Ordering::SeqCst);
        Ok(end - b)
    }

    /// Allocates and fills the blocks from `b` on (up to `last`) that the top does not store.
    /// Returns how many it wrote: 0 if `b` turned out to be stored by then (the caller writes
    /// it in place).
    fn write_new(
        &self,
        w: &Span,
        b: u64,
        last: u64,
        below: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<u64> {
        let mut a = lock(&self.alloc);
        // Wait for other writes filling these blocks: the first of them decides which physical
        // block holds each.
        while a.filling.iter().any(|&(s, e)| s <= last && b < e) {
            a = self.filled.wait(a).unwrap_or_else(|p| p.into_inner());
        }
        // Which of the blocks are still not stored, and which the top hides (zero or
        // discarded there: no copy-up from below).
        let (end, hidden) = {
            let map = self.map_read();
            let mut hidden = Vec::new();
            let mut v = b;
            while v <= last {
                match map.get(v) {
                    Some(e) if e.loc.kind == ExtentKind::Data => break,
                    Some(e) => {
                        let to = e.end.min(last + 1);
                        hidden.push((v, to));
                        v = to;
                    }
                    None => v = map.next_mapped(v).map_or(last + 1, |n| n.min(last + 1)),
                }
            }
            (v, hidden)
        };
        if end == b {
            return Ok(0);
        }
        let n = end - b;
        // Free blocks first (ascending, so that runs freed together come back contiguous),
        // then a contiguous run at the end of the data file.
        let mut pblocks: Vec<u64> = Vec::with_capacity(n as usize);
        while (pblocks.len() as u64) < n
            && let Some(p) = a.free.pop()
        {
            pblocks.push(p);
        }
        pblocks.sort_unstable();
        let fresh = n - pblocks.len() as u64;
        pblocks.extend(a.next_pblock..a.next_pblock + fresh);
        a.next_pblock += fresh;
        a.filling.push((b, end));
        drop(a);

        let result = self.fill(w, b, &pblocks, &hidden, below);
        let mut a = lock(&self.alloc);
        a.filling.retain(|&r| r != (b, end));
        self.filled.notify_all();
        let crcs = match result {
            Ok(crcs) => crcs,
            Err(e) => {
                // The blocks are unreferenced: give them back. The map is unchanged.
                a.free.extend(pblocks);
                return Err(e);
            }
        };
        // Before the entries are pending: a round that takes them also syncs their data.
        self.data_dirty.store(true, Ordering::SeqCst);
        // The record first, under the allocator lock only (in the order of `pending`, which the
        // same lock orders): readers of the map do not wait for its write.
        if let Some(rec) = &self.recorder {
            let ppb = self.pieces_per_block();
            let changes: Vec<(IndexEntry, u32, &[u32])> = runs(b, &pblocks)
                .into_iter()
                .map(|(v, p, count)| {
                    let i = (v - b) as usize * ppb;
                    (
                        IndexEntry { vblock: v, count, kind: ExtentKind::Data, pblock: p },
                        0,
                        &crcs[i..i + count as usize * ppb],
                    )
                })
                .collect();
            // If the record cannot be written the write fails, and its blocks stay unused (not
            // freed: a record naming them may have reached the log) until the next open.
            lock(rec).append(&changes, false, ppb, &self.path)?;
        }
        let mut map = self.map_write();
        for (v, p, count) in runs(b, &pblocks) {
            map.insert(v, v + count, Loc { layer: TOP, kind: ExtentKind::Data, pblock: p });
            push_entry(&mut a.pending, IndexEntry { vblock: v, count, kind: ExtentKind::Data, pblock: p });
        }
        Ok(n)
    }

    /// Writes new blocks `b..` into the physical blocks `pblocks` (one each): whole ones
    /// straight from the span's data, each run that is consecutive in the file in one write;
    /// a partly covered one (only the span's first or last can be) copied up first.
    fn fill(
        &self,
        w: &Span,
        b: u64,
        pblocks: &[u64],
        hidden: &[(u64, u64)],
        below: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let pos = |v: u64| HEADER_SIZE as u64 + pblocks[(v - b) as usize] * self.bs;
        // The CRC32C of each 4 KiB piece of each block as written, for the pending log's record.
        let logging = self.recorder.is_some();
        let ppb = self.pieces_per_block();
        let mut crcs = vec![0u32; if logging { pblocks.len() * ppb } else { 0 }];
        let mut copy_up = |v: u64| -> Result<()> {
            let mut block = vec![0u8; self.bs as usize];
            if !hidden.iter().any(|&(s, e)| s <= v && v < e) {
                below(v, &mut block)?;
            }
            let (bytes, within) = w.bytes(v, v + 1);
            block[within..within + bytes.len()].copy_from_slice(bytes);
            if logging {
                for (k, piece) in block.chunks(PENDING_PIECE).enumerate() {
                    crcs[(v - b) as usize * ppb + k] = crc32c::crc32c(piece);
                }
            }
            self.data.write_at(&block, pos(v)).map_err(Error::io("write", &self.path))
        };
        let (mut whole_start, mut whole_end) = (b, b + pblocks.len() as u64);
        if !w.covers(whole_start) {
            copy_up(whole_start)?;
            whole_start += 1;
        }
        if whole_end > whole_start && !w.covers(whole_end - 1) {
            copy_up(whole_end - 1)?;
            whole_end -= 1;
        }
        for (v, _, count) in runs(b, pblocks) {
            let (s, e) = (v.max(whole_start), (v + count).min(whole_end));
            if s < e {
                let (bytes, _) = w.bytes(s, e);
                self.data.write_at(bytes, pos(s)).map_err(Error::io("write", &self.path))?;
                if logging {
                    for (k, piece) in bytes.chunks(PENDING_PIECE).enumerate() {
                        crcs[(s - b) as usize * ppb + k] = crc32c::crc32c(piece);
                    }
                }
            }
        }
        Ok(crcs)
    }

    /// Marks whole blocks `[start, end)` as zero or discarded; blocks they held are freed.
    pub fn set_marker(&self, start: u64, end: u64, kind: ExtentKind) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        debug_assert_ne!(kind, ExtentKind::Data);
        let mut a = lock(&self.alloc);
        // A write filling some of these blocks goes first, as if it had completed before.
        while a.filling.iter().any(|&(s, e)| s < end && start < e) {
            a = self.filled.wait(a).unwrap_or_else(|p| p.into_inner());
        }
        let mut map = self.map_write();
        let entry = IndexEntry { vblock: start, count: end - start, kind, pblock: 0 };
        if let Some(rec) = &self.recorder {
            lock(rec).append(&[(entry, 0, &[])], false, self.pieces_per_block(), &self.path)?;
        }
        for e in map.overlapping(start, end) {
            if e.loc.kind == ExtentKind::Data {
                a.freed_pending.extend(e.loc.pblock..e.loc.pblock + (e.end - e.start));
            }
        }
        map.insert(start, end, Loc { layer: TOP, kind, pblock: 0 });
        push_entry(&mut a.pending, entry);
        Ok(())
    }

    /// Makes every write and marker completed before the call durable.
    ///
    /// Flushes are grouped: at most one round runs at a time, and a flush called while one runs
    /// waits for the next, which covers it (and every other flush that arrived meanwhile). A
    /// round takes the pending mapping changes (under the allocator lock, briefly), then without
    /// any lock makes the data file durable (skipped if nothing was written to it since the
    /// last data sync), appends the changes as one batch and makes the journal durable (skipped
    /// if there are none). Writes go on meanwhile; their changes wait for the next round. Blocks
    /// freed by the round's changes become reusable once its batch is durable.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut r = lock(&self.rounds);
        // The first round started from now on covers this call.
        let needed = r.started + 1;
        // Done as soon as such a round succeeded, even if the next one already runs.
        while r.running && r.done < needed {
            r = self.round_ended.wait(r).unwrap_or_else(|p| p.into_inner());
        }
        if r.done >= needed {
            return Ok(());
        }
        // No round runs, and none that covers this call succeeded: run one. (Waiters whose
        // round failed come here too and try again themselves.)
        r.started += 1;
        r.running = true;
        let mut state = r.state.take().expect("only the running round has the state out");
        drop(r);
        let result = self.round(&mut state);
        let mut r = lock(&self.rounds);
        r.state = Some(state);
        r.running = false;
        if result.is_ok() {
            r.done = r.started;
        }
        drop(r);
        self.round_ended.notify_all();
        result
    }

    /// One flush round (see [`TopLayer::flush`]) appending to the journal as `st` has it, then
    /// punching out the blocks it freed and compacting the journal if it is due. On failure the
    /// changes it took are pending again, so a later flush writes them.
    fn round(&self, st: &mut RoundState) -> Result<()> {
        if st.dir_unsynced
            && let Some(files) = &self.files
        {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            files.sync_dir().map_err(Error::io("sync", dir))?;
            st.dir_unsynced = false;
        }
        let (batch, freed, bytes) = {
            let mut a = lock(&self.alloc);
            let batch = JournalBatch { sequence: st.sequence + 1, entries: std::mem::take(&mut a.pending) };
            // Encoded here so that the pending log started now can name the batch's CRC.
            let bytes = (!batch.entries.is_empty()).then(|| encode_batch(&batch));
            if let (Some(rec), Some(bytes)) = (&self.recorder, &bytes) {
                // Record from now on in the other log, which follows this batch.
                let crc = batch_crc(bytes, batch.sequence);
                if let Err(e) = lock(rec).switch(batch.sequence, crc, &self.path) {
                    a.pending = batch.entries;
                    return Err(e);
                }
            }
            (batch, std::mem::take(&mut a.freed_pending), bytes)
        };
        // Every taken entry's data write set the flag before the entry became pending, so
        // either this sync covers it or an earlier one did.
        let wrote_data = self.data_dirty.swap(false, Ordering::SeqCst);
        // If this round fails after it switched logs, the next one retries its batch.
        let switched = bytes.is_some();
        let give_back = |entries: Vec<IndexEntry>, freed: Vec<u64>| {
            let mut a = lock(&self.alloc);
            if let Some(rec) = self.recorder.as_ref().filter(|_| switched) {
                lock(rec).retry = true;
            }
            let later = std::mem::replace(&mut a.pending, entries);
            for e in later {
                push_entry(&mut a.pending, e);
            }
            let later = std::mem::replace(&mut a.freed_pending, freed);
            a.freed_pending.extend(later);
        };
        if wrote_data && let Err(e) = self.data.sync() {
            self.data_dirty.store(true, Ordering::SeqCst);
            give_back(batch.entries, freed);
            return Err(Error::io("sync", &self.path)(e));
        }
        let Some(bytes) = bytes else {
            debug_assert!(freed.is_empty());
            return Ok(());
        };
        let jpath = journal_path(&self.path);
        let written = {
            let journal = self.journal_read();
            match journal.write_at(&bytes, st.journal_len) {
                Ok(()) => journal.sync().map_err(|e| {
                    // The batch is in the journal file, unsynced: a kill may leave it there.
                    if let Some(rec) = &self.recorder {
                        lock(rec).written_crc = Some(batch_crc(&bytes, batch.sequence));
                    }
                    Error::io("sync", &jpath)(e)
                }),
                Err(e) => Err(Error::io("write", &jpath)(e)),
            }
        };
        if let Err(e) = written {
            give_back(batch.entries, freed);
            return Err(e);
        }
        st.journal_len += bytes.len() as u64;
        st.sequence += 1;
        for e in &batch.entries {
            st.committed.insert(e.vblock, e.end(), Loc { layer: TOP, kind: e.kind, pblock: e.pblock });
        }
        // The flush is done. Before the freed blocks can be reused: give their space back.
        self.punch(&freed);
        if let Err(e) = self.compact(st) {
            tracing::warn!(journal = %jpath.display(), error = %e, "journal compaction failed; keeping the journal");
        }
        lock(&self.alloc).free.extend(freed);
        Ok(())
    }

    /// Punches the space of freed physical blocks out of the data file (a hint: errors are
    /// logged). Their unmapping is durable, so no replayed map points at them.
    fn punch(&self, freed: &[u64]) {
        punch_blocks(self.data.as_ref(), self.bs, &self.path, freed);
    }

    /// Rewrites the journal as its durable map if it has grown past the thresholds (see
    /// "Compaction" in the module doc): temporary journal written and synced, renamed over the
    /// journal, directory synced.
    fn compact(&self, st: &mut RoundState) -> Result<()> {
        let Some(files) = &self.files else { return Ok(()) };
        let entries = st.committed.len();
        let snapshot = JOURNAL_HEADER_SIZE as u64
            + entries as u64 * 32
            + entries.div_ceil(SNAPSHOT_BATCH_ENTRIES) as u64 * 20;
        let ratio = self.compact_ratio.load(Ordering::Relaxed);
        if st.journal_len < self.compact_min.load(Ordering::Relaxed)
            || st.journal_len <= ratio.saturating_mul(snapshot)
        {
            return Ok(());
        }
        let tpath = journal_temp_path(&self.path);
        let entries: Vec<IndexEntry> = st
            .committed
            .iter()
            .map(|e| IndexEntry {
                vblock: e.start,
                count: e.end - e.start,
                kind: e.loc.kind,
                pblock: e.loc.pblock,
            })
            .collect();
        let jh = JournalHeader { instance: self.header.instance, block_size: self.header.block_size };
        let mut bytes = jh.encode().to_vec();
        let mut sequence = 0;
        for chunk in entries.chunks(SNAPSHOT_BATCH_ENTRIES) {
            sequence += 1;
            bytes.extend(encode_batch(&JournalBatch { sequence, entries: chunk.to_vec() }));
        }
        let temp = files.create_temp().map_err(Error::io("create", &tpath))?;
        let written = temp.write_at(&bytes, 0).and_then(|()| temp.sync());
        if let Err(e) = written {
            let _ = files.remove_temp();
            return Err(Error::io("write", &tpath)(e));
        }
        // The current pending log follows the old journal's last batch; from here on it follows
        // the new journal's too, so that it applies after whichever one a crash leaves.
        if let Some(rec) = &self.recorder
            && let Err(e) = lock(rec).set_alt(sequence, batch_crc(&bytes, sequence), &self.path)
        {
            let _ = files.remove_temp();
            return Err(e);
        }
        if let Err(e) = files.rename_temp() {
            let _ = files.remove_temp();
            return Err(Error::io("rename", &tpath)(e));
        }
        // The name leads to the new journal now: append there from here on.
        *self.journal.write().unwrap_or_else(|p| p.into_inner()) = temp;
        st.journal_len = bytes.len() as u64;
        st.sequence = sequence;
        self.compactions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(journal = %self.path.display(), bytes = bytes.len(), "journal compacted");
        if let Err(e) = files.sync_dir() {
            st.dir_unsynced = true;
            return Err(Error::io("sync", self.path.parent().unwrap_or(Path::new(".")))(e));
        }
        Ok(())
    }

    /// Bytes of the data file and journal.
    pub fn file_sizes(&self) -> (u64, u64) {
        (self.data.len().unwrap_or(0), self.journal_read().len().unwrap_or(0))
    }

    /// Bytes of space the data file and journal take on their device (see
    /// [`Storage::allocated`]).
    pub fn allocated_sizes(&self) -> (u64, u64) {
        (self.data.allocated().unwrap_or(0), self.journal_read().allocated().unwrap_or(0))
    }
}

impl JournalDamage {
    fn error(&self, jpath: &Path) -> Error {
        Error::JournalCorrupt {
            path: jpath.to_path_buf(),
            offset: self.offset,
            good_batches: self.good_batches,
            next_whole: self.next_whole,
        }
    }
}

/// Applies to `map` the whole batches at the start of `bytes` that continue `sequence`, checking
/// each entry against the layer's `vblocks`. Returns the bytes they take and the last sequence
/// number applied; what follows is a tail (a torn batch, debris or damage) or nothing.
fn replay(
    map: &mut ExtentMap,
    bytes: &[u8],
    mut sequence: u64,
    vblocks: u64,
    jpath: &Path,
) -> Result<(usize, u64)> {
    let mut pos = 0;
    while let Some((batch, n)) = decode_batch(&bytes[pos..]).map_err(Error::format(jpath))? {
        if batch.sequence != sequence + 1 {
            break;
        }
        // A bad entry fails the whole batch before any of it is applied (a force-share reader
        // keeps its map as it was).
        for e in &batch.entries {
            // Physical blocks are checked against the data file only in the final map (see
            // `TopLayer::open`): a writable open truncates the data file after the highest block
            // still mapped, so an older entry may rightly name a block that is gone.
            let bad = e.vblock.checked_add(e.count).is_none_or(|end| end > vblocks)
                || (e.kind == ExtentKind::Data && e.pblock.checked_add(e.count).is_none());
            if bad {
                return Err(Error::format(jpath)(mcow_format::FormatError::Invalid {
                    field: "journal entry",
                    reason: format!(
                        "batch {} maps blocks {}+{} outside the layer",
                        batch.sequence, e.vblock, e.count
                    ),
                }));
            }
        }
        for e in &batch.entries {
            map.insert(e.vblock, e.end(), Loc { layer: TOP, kind: e.kind, pblock: e.pblock });
        }
        pos += n;
        sequence = batch.sequence;
    }
    Ok((pos, sequence))
}

/// Punches physical `blocks` (any order) out of `data`, one call per run of consecutive ones; a
/// hint, so the first error (e.g. a filesystem without hole punching) is logged and ends it.
fn punch_blocks(data: &dyn Storage, bs: u64, path: &Path, blocks: &[u64]) {
    let mut blocks = blocks.to_vec();
    blocks.sort_unstable();
    let mut i = 0;
    while i < blocks.len() {
        let mut n = 1;
        while i + n < blocks.len() && blocks[i + n] == blocks[i] + n as u64 {
            n += 1;
        }
        let at = HEADER_SIZE as u64 + blocks[i] * bs;
        if let Err(e) = data.punch_hole(at, n as u64 * bs) {
            tracing::debug!(path = %path.display(), error = %e, "cannot punch freed blocks");
            return;
        }
        i += n;
    }
}

/// Appends a mapping change, merging it into the previous one where they continue each other.
/// A write's data laid over the virtual blocks it touches: it starts `offset` bytes into
/// block `first`.
struct Span<'a> {
    first: u64,
    offset: usize,
    data: &'a [u8],
    bs: usize,
}

impl Span<'_> {
    /// The last block the (non-empty) data touches.
    fn last(&self) -> u64 {
        self.first + ((self.offset + self.data.len() - 1) / self.bs) as u64
    }

    /// The data that falls in blocks `[from, to)`, and where in block `from` it starts.
    fn bytes(&self, from: u64, to: u64) -> (&[u8], usize) {
        let (lo, hi) = ((from - self.first) as usize * self.bs, (to - self.first) as usize * self.bs);
        let start = lo.max(self.offset);
        let end = hi.min(self.offset + self.data.len());
        (&self.data[start - self.offset..end - self.offset], start - lo)
    }

    /// Whether the data covers block `v` whole.
    fn covers(&self, v: u64) -> bool {
        let lo = (v - self.first) as usize * self.bs;
        lo >= self.offset && lo + self.bs <= self.offset + self.data.len()
    }
}

/// Virtual blocks `b..` placed in `pblocks` (one each) as runs: (first virtual block, first
/// physical block, count), each consecutive in both.
fn runs(b: u64, pblocks: &[u64]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (i, &p) in pblocks.iter().enumerate() {
        match out.last_mut() {
            Some((_, p0, n)) if *p0 + *n == p => *n += 1,
            _ => out.push((b + i as u64, p, 1)),
        }
    }
    out
}

fn push_entry(list: &mut Vec<IndexEntry>, e: IndexEntry) {
    if let Some(last) = list.last_mut()
        && last.kind == e.kind
        && last.end() == e.vblock
        && (e.kind != ExtentKind::Data || last.pblock + last.count == e.pblock)
    {
        last.count += e.count;
        return;
    }
    list.push(e);
}

/// The CRC field (last 4 bytes) of batch `sequence`, which `bytes` ends with; 0 for sequence 0
/// (no batch).
fn batch_crc(bytes: &[u8], sequence: u64) -> u32 {
    if sequence == 0 || bytes.len() < 4 {
        return 0;
    }
    u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes"))
}

impl Recorder {
    /// Starts recording after batch `base` (CRC field `base_crc`): log 0 holds only a header,
    /// log 1 is emptied.
    fn start(
        logs: PendingLogs,
        instance: [u8; 16],
        base: u64,
        base_crc: u32,
        path: &Path,
    ) -> Result<Recorder> {
        let mut header = PendingHeader { instance, base, base_crc, alt: NO_ALT, alt_crc: 0, prev: 0, tag: 0 };
        // Mixed with a fresh random number: an open after another one at the same journal
        // state must not take that one's leftover records for its own.
        header.tag =
            header.new_tag() ^ u32::from_le_bytes(new_instance_id()[..4].try_into().expect("4 bytes"));
        for (i, log) in logs.iter().enumerate().rev() {
            log.set_len(0).map_err(Error::io("truncate", &pending_log_path(path, i)))?;
        }
        logs[0].write_at(&header.encode(), 0).map_err(Error::io("write", &pending_log_path(path, 0)))?;
        Ok(Recorder {
            logs,
            cur: 0,
            header,
            len: PENDING_HEADER_SIZE as u64,
            logged: ExtentMap::new(),
            logged_prev: ExtentMap::new(),
            retry: false,
            written_crc: None,
            buf: Vec::new(),
        })
    }

    /// Whether records of the current or the previous log map any of blocks `[start, end)`.
    fn holds(&self, start: u64, end: u64) -> bool {
        self.logged.overlaps(start, end) || self.logged_prev.overlaps(start, end)
    }

    /// Appends records of `changes` (each with its first piece and the CRCs of its pieces from
    /// there, `ppb` pieces a block; none for a marker) to the current log, with one write.
    /// `in_place`: the records of an in-place write, written before its data.
    fn append(
        &mut self,
        changes: &[(IndexEntry, u32, &[u32])],
        in_place: bool,
        ppb: usize,
        path: &Path,
    ) -> Result<()> {
        let mut bytes = std::mem::take(&mut self.buf);
        bytes.clear();
        let tag = self.header.tag;
        for &(e, first, crcs) in changes {
            if e.kind != ExtentKind::Data {
                encode_record_into(tag, &e, 0, false, &[], &mut bytes);
                continue;
            }
            // At most MAX_RECORD_BLOCKS blocks a record: each takes the CRCs of its pieces.
            let (lo, hi) = (first as u64, first as u64 + crcs.len() as u64);
            let ppb = ppb as u64;
            let mut i = 0;
            while i < e.count {
                let n = (e.count - i).min(MAX_RECORD_BLOCKS);
                let (start, stop) = (lo.max(i * ppb), hi.min((i + n) * ppb));
                if start < stop {
                    let entry =
                        IndexEntry { vblock: e.vblock + i, count: n, kind: e.kind, pblock: e.pblock + i };
                    let crcs = &crcs[(start - lo) as usize..(stop - lo) as usize];
                    let first = (start - i * ppb) as u32;
                    encode_record_into(tag, &entry, first, in_place, crcs, &mut bytes);
                }
                i += n;
            }
            // An in-place write to blocks the current log already maps changes nothing here.
            if !(in_place && self.logged.get(e.vblock).is_some_and(|x| x.end >= e.end())) {
                self.logged.insert(e.vblock, e.end(), LOGGED);
            }
        }
        let written = self.logs[self.cur].write_at(&bytes, self.len);
        let n = bytes.len() as u64;
        // Kept for the next append, unless a large change made it large.
        if bytes.capacity() <= 1 << 16 {
            self.buf = bytes;
        }
        written.map_err(|e| Error::io("write", pending_log_path(path, self.cur))(e))?;
        self.len += n;
        Ok(())
    }

    /// A round took the pending changes as batch `base` (CRC field `base_crc`): record from
    /// now on in the other log, started afresh to follow it. After a failed round the current
    /// log is kept instead (it follows the batch being retried), its header naming the new CRC.
    fn switch(&mut self, base: u64, base_crc: u32, path: &Path) -> Result<()> {
        if std::mem::take(&mut self.retry) {
            debug_assert_eq!(self.header.base, base);
            let mut header = self.header.clone();
            header.base_crc = base_crc;
            if let Some(crc) = self.written_crc {
                (header.alt, header.alt_crc) = (base, crc);
            }
            if let Err(e) = self.write_header(&header, path) {
                self.retry = true;
                return Err(e);
            }
            return Ok(());
        }
        let next = 1 - self.cur;
        let mut header =
            PendingHeader { base, base_crc, alt: NO_ALT, alt_crc: 0, prev: self.header.tag, ..self.header };
        header.tag = header.new_tag();
        let lpath = pending_log_path(path, next);
        // Not truncated (a truncate is a metadata change of its own, on every flush round):
        // what the file held after the header belongs to its earlier use, whose records carry
        // another tag and so end the log.
        self.logs[next].write_at(&header.encode(), 0).map_err(Error::io("write", &lpath))?;
        self.cur = next;
        self.header = header;
        self.len = PENDING_HEADER_SIZE as u64;
        self.written_crc = None;
        self.logged_prev = std::mem::replace(&mut self.logged, ExtentMap::new());
        Ok(())
    }

    /// A compaction is about to rename a journal ending at batch `alt` (CRC field `alt_crc`)
    /// over the journal: the current log follows that one too.
    fn set_alt(&mut self, alt: u64, alt_crc: u32, path: &Path) -> Result<()> {
        let header = PendingHeader { alt, alt_crc, ..self.header.clone() };
        self.write_header(&header, path)
    }

    fn write_header(&mut self, header: &PendingHeader, path: &Path) -> Result<()> {
        let lpath = pending_log_path(path, self.cur);
        self.logs[self.cur].write_at(&header.encode(), 0).map_err(Error::io("write", &lpath))?;
        self.header = header.clone();
        Ok(())
    }
}

/// Applies to `map` the pending log records that follow the journal's last batch (`sequence`,
/// CRC field `crc`): the log that follows it, then the one that follows that log (see "Pending
/// logs" in docs/FORMAT.md). A data record applies block by block, each only if it is in the
/// data file and reads with the recorded CRC. Returns the changes applied, in order. `geometry` is
/// (block size, physical blocks in the data file, virtual blocks).
#[allow(clippy::too_many_arguments)]
fn replay_pending(
    map: &mut ExtentMap,
    logs: &PendingLogs,
    instance: &[u8; 16],
    sequence: u64,
    crc: u32,
    data: &dyn Storage,
    (bs, data_blocks, vblocks): (u64, u64, u64),
    path: &Path,
) -> Result<(Vec<IndexEntry>, Recovered)> {
    let mut bufs = Vec::with_capacity(2);
    for (i, log) in logs.iter().enumerate() {
        let lpath = pending_log_path(path, i);
        let len = log.len().map_err(Error::io("stat", &lpath))?;
        let mut buf =
            vec![0u8; usize::try_from(len).map_err(|_| Error::Invalid("pending log too large".into()))?];
        log.read_at(&mut buf, 0).map_err(Error::io("read", &lpath))?;
        bufs.push(buf);
    }
    let headers: Vec<Option<PendingHeader>> =
        bufs.iter().map(|b| PendingHeader::decode(b).ok().filter(|h| h.instance == *instance)).collect();
    let follows = |h: &PendingHeader| {
        (h.base == sequence && h.base_crc == crc)
            || (h.alt != NO_ALT && h.alt == sequence && h.alt_crc == crc)
    };
    let Some(first) = (0..2).find(|&i| headers[i].as_ref().is_some_and(follows)) else {
        return Ok((Vec::new(), Recovered::default()));
    };
    let first_tag = headers[first].as_ref().expect("found").tag;
    let mut order = vec![first];
    if headers[1 - first].as_ref().is_some_and(|h| h.base == sequence + 1 && h.prev == first_tag) {
        order.push(1 - first);
    }
    let mut out = Vec::new();
    let mut seen = Recovered::default();
    let ppb = (bs as usize / PENDING_PIECE) as u64;
    // Each virtual block's expectation: its physical block and, for each piece, the CRC of
    // its latest record and of the one before (a partial record is written before its data, so
    // a kill between them leaves the piece as the record before says).
    type Piece = (u32, Option<u32>);
    let mut expect: std::collections::BTreeMap<u64, (u64, Vec<Piece>)> = std::collections::BTreeMap::new();
    for i in order {
        let tag = headers[i].as_ref().expect("found").tag;
        let mut at = PENDING_HEADER_SIZE;
        while let Some((r, n)) = decode_record(tag, &bufs[i][at..]) {
            at += n;
            let e = r.entry;
            if e.vblock.checked_add(e.count).is_none_or(|end| end > vblocks) {
                continue;
            }
            seen.records += 1;
            if e.kind != ExtentKind::Data {
                for v in e.vblock..e.end() {
                    expect.remove(&v);
                }
                map.insert(e.vblock, e.end(), Loc { layer: TOP, kind: e.kind, pblock: 0 });
                push_entry(&mut out, e);
                seen.blocks += e.count;
                continue;
            }
            let (first, last) = (u64::from(r.first), u64::from(r.first) + r.crcs.len() as u64);
            if e.pblock.checked_add(e.count).is_none_or(|end| end > data_blocks) || last > e.count * ppb {
                seen.skipped_blocks += e.count;
                continue;
            }
            for k in first / ppb..last.div_ceil(ppb) {
                let (v, p) = (e.vblock + k, e.pblock + k);
                let (lo, hi) = (first.max(k * ppb), last.min((k + 1) * ppb));
                let crcs = &r.crcs[(lo - first) as usize..(hi - first) as usize];
                if !r.in_place {
                    // A full record (written after its data): the block's expectation anew.
                    expect.insert(v, (p, crcs.iter().map(|&c| (c, None)).collect()));
                } else if let Some((q, want)) = expect.get_mut(&v)
                    && *q == p
                {
                    let at = (lo - k * ppb) as usize;
                    for (w, &c) in want[at..at + crcs.len()].iter_mut().zip(crcs) {
                        *w = (c, Some(w.0));
                    }
                }
            }
        }
    }
    // Each block whose every piece reads with its latest recorded CRC is mapped; the others
    // (after a power loss, data that never reached the disk) are not.
    let mut block = vec![0u8; bs as usize];
    for (v, (p, want)) in expect {
        let there = data.read_at(&mut block, HEADER_SIZE as u64 + p * bs).is_ok()
            && block.chunks(PENDING_PIECE).zip(&want).all(|(piece, &(cur, prev))| {
                let c = crc32c::crc32c(piece);
                c == cur || Some(c) == prev
            });
        if there {
            map.insert(v, v + 1, Loc { layer: TOP, kind: ExtentKind::Data, pblock: p });
            push_entry(&mut out, IndexEntry { vblock: v, count: 1, kind: ExtentKind::Data, pblock: p });
            seen.blocks += 1;
        } else {
            seen.skipped_blocks += 1;
        }
    }
    Ok((out, seen))
}

/// Whether no physical block is mapped by two virtual blocks.
fn maps_each_block_once(map: &ExtentMap) -> bool {
    let mut runs: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.loc.kind == ExtentKind::Data)
        .map(|e| (e.loc.pblock, e.loc.pblock + (e.end - e.start)))
        .collect();
    runs.sort_unstable();
    runs.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// Pending log `i` (0 or 1) of a top at `path`: `<top>.pending.<i>`.
pub fn pending_log_path(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".pending.{i}"));
    PathBuf::from(s)
}

/// The journal's path for a top at `path`.
pub fn journal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".journal");
    PathBuf::from(s)
}

/// Where a compaction writes the new journal before renaming it over the journal.
pub fn journal_temp_path(path: &Path) -> PathBuf {
    let mut s = journal_path(path).into_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

/// A fresh random-enough identity binding a top to its journal (time, pid and 64 random bits
/// from std's randomly keyed hasher, which is keyed afresh on every call; hashed: uniqueness,
/// not secrecy, is what matters).
fn new_instance_id() -> [u8; 16] {
    use std::hash::BuildHasher;
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let random = std::collections::hash_map::RandomState::new().hash_one(t.as_nanos());
    let seed = format!("{}:{}:{random}", t.as_nanos(), std::process::id());
    Digest::of(seed.as_bytes()).0[..16].try_into().expect("16 bytes")
}
