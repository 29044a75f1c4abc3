//! A writable top on simulated storage, a per-block model of it, and the rule a crash image must
//! satisfy.
//!
//! The top is driven the way `Disk` drives it (byte ranges split into per-block writes and
//! whole-block markers) over a fixed pseudo-random "lower layer". Both storages are wrapped so
//! that just before every `sync` of either one, crash images of *both* devices are taken: the
//! data file and the journal are separate devices, and any prefix of each one's unsynced writes
//! may survive, the last one torn. The top also has its two pending logs (never synced): a
//! power-loss image keeps any prefix of each one's writes ever made (all dropped, all kept, or a
//! random tear, so also an older state of a log), and every capture also takes a **process
//! kill** image, which keeps every write of every device (what the page cache holds).
//!
//! The crash rule (checked per block against the model):
//! - a block not written, zeroed or discarded since the last successful flush must read exactly
//!   as it did at that flush;
//! - a block touched since then must read as one of the values it has held since that flush
//!   (`hist[b]`, starting with the flushed value), or as a torn mix of two consecutive values
//!   `v[k]` and `v[k+1]`: a prefix of `v[k+1]` followed by the rest of `v[k]` (an in-place write
//!   cut short).

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use mcow_engine::sim::{CrashMode, SimStorage};
use mcow_engine::storage::Storage;
use mcow_engine::top::TopLayer;
use mcow_engine::{Digest, Result};
use mcow_format::{ExtentKind, HEADER_SIZE};

use super::{Rng, pattern};

pub const BS: usize = 4096;
pub const TOP_PATH: &str = "/sim/top-1.mcow";

/// What the layer below the top holds at `vblock`: fixed pseudo-random bytes.
pub fn below_block(vblock: u64) -> Vec<u8> {
    pattern(0xB000_0000 + vblock, BS)
}

pub fn below(vblock: u64, buf: &mut [u8]) -> Result<()> {
    buf.copy_from_slice(&below_block(vblock));
    Ok(())
}

/// What block `vb` reads as through the top (top first, then the lower layer).
pub fn read_block(top: &TopLayer, vb: u64) -> Result<Vec<u8>> {
    match top.lookup(vb) {
        Ok(e) if e.loc.kind == ExtentKind::Data => {
            let mut buf = vec![0u8; BS];
            assert!(top.read_data(vb, 0, &mut buf)?, "block {vb} is mapped but read_data refused it");
            Ok(buf)
        }
        Ok(_) => Ok(vec![0u8; BS]),
        Err(_) => Ok(below_block(vb)),
    }
}

pub fn read_blocks(top: &TopLayer, n: u64) -> Result<Vec<Vec<u8>>> {
    (0..n).map(|vb| read_block(top, vb)).collect()
}

/// Crash images of the devices (the pending logs if the top had them), and how they were made.
pub struct Image {
    pub data: SimStorage,
    pub journal: SimStorage,
    pub logs: Option<[SimStorage; 2]>,
    /// A process kill image: every write of every device kept.
    pub kill: bool,
    pub label: String,
}

impl Image {
    pub fn open(&self, read_only: bool) -> Result<TopLayer> {
        let (data, journal) = (Box::new(self.data.clone()), Box::new(self.journal.clone()));
        match &self.logs {
            Some([a, b]) => TopLayer::open_logged(
                data,
                journal,
                [Box::new(a.clone()), Box::new(b.clone())],
                Path::new(TOP_PATH),
                read_only,
            ),
            None => TopLayer::open(data, journal, Path::new(TOP_PATH), read_only),
        }
    }

    /// What a crash in `mode` of every device of this image would leave.
    pub fn crashed(&self, mode: CrashMode) -> Image {
        Image {
            data: self.data.crashed(mode),
            journal: self.journal.crashed(mode),
            logs: self.logs.as_ref().map(|[a, b]| [a.crashed(mode), b.crashed(mode)]),
            kill: false,
            label: String::new(),
        }
    }
}

/// The crash modes to try for one device with these unsynced writes: all lost, all kept, and
/// tears at a few (pseudo-random and fixed) places.
fn modes(pending: &[usize], rng: &mut Rng, tears: usize) -> Vec<(CrashMode, String)> {
    let mut out = vec![(CrashMode::DropUnsynced, "drop".to_string())];
    if pending.is_empty() {
        return out;
    }
    let last = pending.len() - 1;
    out.push((CrashMode::TearAt { n: last, cut: usize::MAX }, format!("keep all {}", pending.len())));
    out.push((
        CrashMode::TearAt { n: last, cut: pending[last] / 2 },
        format!("tear last at half of {}", pending[last]),
    ));
    for _ in 0..tears {
        let n = rng.below(pending.len() as u64) as usize;
        let cut = rng.range(0, pending[n] as u64) as usize;
        out.push((CrashMode::TearAt { n, cut }, format!("keep {n} of {}, tear at {cut}", pending.len())));
    }
    out
}

/// Takes crash images of both devices whenever asked (and, through [`Hooked`], before every
/// sync).
pub struct Hook {
    pub data: SimStorage,
    pub journal: SimStorage,
    pub logs: [SimStorage; 2],
    pub images: Mutex<Vec<Image>>,
    rng: Mutex<Rng>,
    /// Random tears tried per device and moment.
    pub tears: usize,
    pub enabled: std::sync::atomic::AtomicBool,
    /// If set, a sync (of either device; the first after `skip` more) stops after its crash
    /// images are taken, until the test lets it go: how a test acts while a flush is inside
    /// its sync.
    pub gate: Mutex<Option<Gate>>,
}

/// A one-shot pause inside a sync: the syncing thread sends the device's name on `paused`,
/// then waits for `go`.
pub struct Gate {
    pub skip: usize,
    pub paused: std::sync::mpsc::Sender<&'static str>,
    pub go: std::sync::mpsc::Receiver<()>,
}

impl Hook {
    pub fn capture(&self, moment: &str) {
        if !self.enabled.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut rng = self.rng.lock().unwrap();
        let dm = modes(&self.data.pending_lens(), &mut rng, self.tears);
        let jm = modes(&self.journal.pending_lens(), &mut rng, self.tears.min(2));
        let lm: Vec<Vec<(CrashMode, String)>> =
            self.logs.iter().map(|l| modes(&l.pending_lens(), &mut rng, 2)).collect();
        let mut images = self.images.lock().unwrap();
        for (d, dl) in &dm {
            for (j, jl) in &jm {
                // One pseudo-random mode per log for each pair.
                let (l0, l1) = (
                    &lm[0][rng.below(lm[0].len() as u64) as usize],
                    &lm[1][rng.below(lm[1].len() as u64) as usize],
                );
                images.push(Image {
                    data: self.data.crashed(*d),
                    journal: self.journal.crashed(*j),
                    logs: Some([self.logs[0].crashed(l0.0), self.logs[1].crashed(l1.0)]),
                    kill: false,
                    label: format!("{moment}: data {dl}, journal {jl}, logs {} / {}", l0.1, l1.1),
                });
            }
        }
        images.push(Image {
            data: self.data.crashed(CrashMode::KeepAll),
            journal: self.journal.crashed(CrashMode::KeepAll),
            logs: Some([self.logs[0].crashed(CrashMode::KeepAll), self.logs[1].crashed(CrashMode::KeepAll)]),
            kill: true,
            label: format!("{moment}: process kill"),
        });
    }

    pub fn take(&self) -> Vec<Image> {
        std::mem::take(&mut *self.images.lock().unwrap())
    }
}

/// A simulated device that lets the hook take crash images just before each sync.
pub struct Hooked {
    pub dev: SimStorage,
    pub name: &'static str,
    pub hook: Arc<Hook>,
}

impl Storage for Hooked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.dev.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.dev.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.dev.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dev.punch_hole(offset, len)
    }
    fn sync(&self) -> io::Result<()> {
        let thread = std::thread::current();
        self.hook.capture(&format!("before {} sync (thread {})", self.name, thread.name().unwrap_or("-")));
        let gate = {
            let mut g = self.hook.gate.lock().unwrap();
            match &mut *g {
                Some(Gate { skip, .. }) if *skip > 0 => {
                    *skip -= 1;
                    None
                }
                g => g.take(),
            }
        };
        if let Some(g) = gate {
            g.paused.send(self.name).unwrap();
            g.go.recv().unwrap();
        }
        self.dev.sync()
    }
}

/// One step the driver performs on the top, mirroring `Disk`: a write within one block, or a
/// whole-block marker run.
#[derive(Debug, Clone)]
pub enum Step {
    Write { vb: u64, within: usize, data: Vec<u8> },
    Marker { start: u64, end: u64, kind: ExtentKind },
}

/// A byte-range write as one step (the top splits it over the blocks it touches).
pub fn write_steps(off: u64, data: &[u8]) -> Vec<Step> {
    let (vb, within) = (off / BS as u64, (off % BS as u64) as usize);
    vec![Step::Write { vb, within, data: data.to_vec() }]
}

/// Splits zeroing `[off, off+len)` of a disk of `size` bytes into steps, as `Disk::write_zeroes`.
pub fn zero_steps(off: u64, len: u64, size: u64, may_trim: bool) -> Vec<Step> {
    let bs = BS as u64;
    let end = off + len;
    let first_whole = off.div_ceil(bs);
    let last_whole = if end == size { size.div_ceil(bs) } else { end / bs };
    if first_whole >= last_whole {
        return write_steps(off, &vec![0; len as usize]);
    }
    let head_end = first_whole * bs;
    let tail_start = (last_whole * bs).min(size);
    let mut out = write_steps(off, &vec![0; (head_end - off) as usize]);
    let kind = if may_trim { ExtentKind::Discarded } else { ExtentKind::Zero };
    out.push(Step::Marker { start: first_whole, end: last_whole, kind });
    out.extend(write_steps(tail_start, &vec![0; (end.max(tail_start) - tail_start) as usize]));
    out
}

/// The per-block model: current content, content at the last flush, and every value each block
/// has held since.
#[derive(Clone)]
pub struct Model {
    pub cur: Vec<Vec<u8>>,
    pub flushed: Vec<Vec<u8>>,
    pub hist: Vec<Vec<Vec<u8>>>,
    /// A mapping change (copy-up or marker) happened since the last flush, so a flush will
    /// write a journal batch.
    pub map_dirty: bool,
    /// A write happened since the last flush, so a flush will sync the data file.
    pub data_dirty: bool,
}

impl Model {
    pub fn new(blocks: u64) -> Model {
        let cur: Vec<Vec<u8>> = (0..blocks).map(below_block).collect();
        Model {
            flushed: cur.clone(),
            hist: cur.iter().map(|b| vec![b.clone()]).collect(),
            cur,
            map_dirty: false,
            data_dirty: false,
        }
    }

    /// A model whose flushed baseline is `blocks`.
    pub fn at(blocks: Vec<Vec<u8>>) -> Model {
        Model {
            flushed: blocks.clone(),
            hist: blocks.iter().map(|b| vec![b.clone()]).collect(),
            cur: blocks,
            map_dirty: false,
            data_dirty: false,
        }
    }

    /// Where each block's history stands now (for [`Model::flushed_since`]).
    pub fn mark(&self) -> Vec<usize> {
        self.hist.iter().map(Vec::len).collect()
    }

    /// A flush called at `mark` succeeded while steps went on: each block's value at the mark
    /// is the durable baseline, and the values it took since are still only possible.
    pub fn flushed_since(&mut self, mark: &[usize]) {
        for (b, h) in self.hist.iter_mut().enumerate() {
            h.drain(..mark[b] - 1);
            self.flushed[b] = h[0].clone();
        }
        // Conservative: the steps since the mark may or may not have been covered.
        self.map_dirty = true;
        self.data_dirty = true;
    }

    pub fn blocks(&self) -> u64 {
        self.cur.len() as u64
    }

    /// Applies `step` to the top and, if it succeeds, to the model.
    pub fn apply(&mut self, top: &TopLayer, step: &Step) -> Result<()> {
        match step {
            Step::Write { vb, within, data } => {
                // The blocks the write touches, and the piece of `data` for each.
                let mut pieces = Vec::new();
                let (mut at, mut done) = (*within, 0usize);
                while done < data.len() {
                    let n = (BS - at).min(data.len() - done);
                    pieces.push((*vb + pieces.len() as u64, at, &data[done..done + n]));
                    (at, done) = (0, done + n);
                }
                let all_in_top = pieces
                    .iter()
                    .all(|&(b, _, _)| matches!(top.lookup(b), Ok(e) if e.loc.kind == ExtentKind::Data));
                let written = top.write(*vb, *within, data, &below);
                self.map_dirty |= !all_in_top;
                self.data_dirty = true;
                for (b, at, piece) in pieces {
                    let mut new = self.cur[b as usize].clone();
                    new[at..at + piece.len()].copy_from_slice(piece);
                    if written.is_err() {
                        // A failed write leaves each block it touches as it was or as written
                        // (never a mix of blocks, never another block's data); which one is
                        // what the model follows from here.
                        let live = read_block(top, b).expect("read after a failed write");
                        assert!(
                            live == self.cur[b as usize] || live == new,
                            "block {b} after a failed write is neither its old nor its new content"
                        );
                        if live == self.cur[b as usize] {
                            continue;
                        }
                    }
                    self.cur[b as usize] = new.clone();
                    self.hist[b as usize].push(new);
                }
                written?;
            }
            Step::Marker { start, end, kind } => {
                top.set_marker(*start, *end, *kind)?;
                self.map_dirty = true;
                for vb in *start..*end {
                    self.cur[vb as usize] = vec![0; BS];
                    self.hist[vb as usize].push(vec![0; BS]);
                }
            }
        }
        Ok(())
    }

    /// A flush succeeded: the current content is now the durable baseline.
    pub fn flushed(&mut self) {
        self.flushed = self.cur.clone();
        self.hist = self.cur.iter().map(|b| vec![b.clone()]).collect();
        self.map_dirty = false;
        self.data_dirty = false;
    }

    /// Checks recovered content against the crash rule (see the module comment).
    pub fn check_crash(&self, got: &[Vec<u8>]) -> std::result::Result<(), String> {
        for (b, g) in got.iter().enumerate() {
            let h = &self.hist[b];
            if h.len() == 1 {
                if *g != self.flushed[b] {
                    return Err(format!("block {b} was not touched since the last flush but changed"));
                }
                continue;
            }
            let ok = h.iter().any(|v| v == g)
                || h.windows(2).any(|w| {
                    let p = g.iter().zip(&w[1]).take_while(|(x, y)| x == y).count();
                    g[p..] == w[0][p..]
                });
            if !ok {
                return Err(format!(
                    "block {b} reads as none of its {} values since the last flush (nor a torn mix)",
                    h.len()
                ));
            }
        }
        Ok(())
    }
}

/// A top on two hooked simulated devices.
pub struct SimTop {
    pub hook: Arc<Hook>,
    pub top: TopLayer,
}

impl SimTop {
    pub fn create(virtual_size: u64, seed: u64, tears: usize) -> SimTop {
        let (data, journal) = (SimStorage::new(), SimStorage::new());
        let logs = [SimStorage::new(), SimStorage::new()];
        let hook = Arc::new(Hook {
            data: data.clone(),
            journal: journal.clone(),
            logs: logs.clone(),
            images: Mutex::new(Vec::new()),
            rng: Mutex::new(Rng::new(seed)),
            tears,
            enabled: false.into(),
            gate: Mutex::new(None),
        });
        let top = TopLayer::create_logged(
            Box::new(Hooked { dev: data, name: "data", hook: hook.clone() }),
            Box::new(Hooked { dev: journal, name: "journal", hook: hook.clone() }),
            Some(logs.map(|l| Box::new(l) as Box<dyn Storage>)),
            Path::new(TOP_PATH),
            BS as u32,
            virtual_size,
            Digest::ZERO,
        )
        .unwrap();
        hook.enabled.store(true, std::sync::atomic::Ordering::Relaxed);
        SimTop { hook, top }
    }
}

/// A random workload step list for a disk of `size` bytes: writes of any offset and length
/// (sub-block to three blocks), zeroes (trim or not), discards, and flushes (`None`).
pub fn random_op(rng: &mut Rng, size: u64) -> Option<Vec<Step>> {
    let bs = BS as u64;
    let off = match rng.below(3) {
        0 => rng.below(size / bs) * bs,
        _ => rng.below(size),
    };
    let max_len = match rng.below(3) {
        0 => 64,
        1 => bs,
        _ => 3 * bs,
    };
    let len = rng.range(1, max_len).min(size - off);
    match rng.below(10) {
        0..=5 => Some(write_steps(off, &pattern(rng.next_u64(), len as usize))),
        6 => Some(zero_steps(off, len, size, false)),
        7 => Some(zero_steps(off, len, size, true)),
        _ => None,
    }
}

/// Checks what a second open sees after a writable open trimmed the debris: no journal tail,
/// and no data blocks past the highest mapped one (free blocks below it are not debris).
pub fn assert_no_debris_after_trim(top: &TopLayer, data_len: u64) {
    let d = top.debris();
    assert_eq!(d, Default::default(), "the writable open left debris");
    let next = top
        .extents()
        .iter()
        .filter(|e| e.loc.kind == ExtentKind::Data)
        .map(|e| e.loc.pblock + (e.end - e.start))
        .max()
        .unwrap_or(0);
    assert_eq!(data_len, HEADER_SIZE as u64 + next * BS as u64, "data file ends at the highest mapped block");
}

/// Opens a crash image read-only and writable, checks the content against the crash rule and
/// returns it.
pub fn check_image(img: &Image, model: &Model) -> Vec<Vec<u8>> {
    let label = &img.label;
    let ro = img.open(true).unwrap_or_else(|e| panic!("{label}: read-only open failed: {e}"));
    let got = read_blocks(&ro, model.blocks()).unwrap_or_else(|e| panic!("{label}: read failed: {e}"));
    if let Err(why) = model.check_crash(&got) {
        panic!("{label}: {why}");
    }
    drop(ro);
    let rw = img.open(false).unwrap_or_else(|e| panic!("{label}: writable open failed: {e}"));
    assert!(read_blocks(&rw, model.blocks()).unwrap() == got, "{label}: writable open reads differently");
    got
}

/// Crash images of both devices with every unsynced write lost.
pub fn drop_unsynced(data: &SimStorage, journal: &SimStorage, label: &str) -> Image {
    Image {
        data: data.crashed(CrashMode::DropUnsynced),
        journal: journal.crashed(CrashMode::DropUnsynced),
        logs: None,
        kill: false,
        label: label.to_string(),
    }
}
