//! Library-level benchmark: reads versus stack depth.
//!
//! For each depth D (default 1, 16, 256 and 4,096) it builds a disk of `--size-mib` (default
//! 1 GiB, 64 KiB blocks) whose stack is D sealed layers written directly with `LayerWriter`
//! into a `LayerStore`. Every layer owns a slice of the blocks and no layer hides another, so
//! each depth's layers hold exactly the disk's 1 GiB. `--layout interleaved` (the default):
//! layer `i` stores the blocks `b` with `b % D == i`, so every 1 MiB range touches 16 layers
//! and the flattened map has one run per block; `--layout contiguous`: layer `i` stores the
//! `i`th of D equal runs, so the map has D runs. Either way uniform random reads hit every layer
//! alike. Block contents are non-zero pseudo-random words derived from (block, layer).
//!
//! All depths are built first (they fit in the page cache together). Phase 1, per round, each
//! depth in turn (order rotating): `Disk::open` time, then a first sequential 1 MiB pass on the
//! fresh open, in which every block is read whole and hashed once (the "cold verification"
//! rate). Phase 2: all depths open and verified at once; each round's work (sequential 1 MiB
//! passes, uniform random 4 KiB reads on one thread and on `--threads` threads) is cut into 8
//! slices and the depths take turns slice by slice, so load from other processes on a shared
//! machine falls on all depths alike. The layer files stay in the page cache throughout, so
//! this measures the engine and the kernel's cached-read path, not a device. Medians over
//! rounds are reported with their ratio to the shallowest depth, as a table and JSON lines.
//!
//! `--breakdown` also times, on the same random offsets: the engine's lookup alone, the same
//! `pread`s made straight on the layer files, the lookup followed by a `pread` on a plain vector
//! of descriptors, and `Disk::read` unchecked; and sequential reads made raw.
//!
//! Reads are checked against the expected bytes (a 4 KiB window of every sequential 1 MiB
//! read, every 16th random read whole, and on the first round every byte of the disk, untimed),
//! so a fast but wrong engine cannot pass.
//!
//! Run: `cargo run --release -p mcow-engine --example bench_depth -- [options]`, or
//! `scripts/bench-engine.sh`. `--help` lists the options.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mcow_engine::layer::LayerWriter;
use mcow_engine::stack::next_chain;
use mcow_engine::store::LayerStore;
use mcow_engine::{CreateOptions, Digest, Disk, Engine, OpenOptions};
use mcow_format::{HEADER_SIZE, chain_digest};

const BLOCK: u32 = 64 * 1024;
const SEQ_CHUNK: usize = 1 << 20;
const RAND_LEN: usize = 4096;

struct Args {
    depths: Vec<usize>,
    rounds: usize,
    size_mib: u64,
    random_reads: usize,
    seq_passes: usize,
    threads: usize,
    dir: PathBuf,
    keep: bool,
    contiguous: bool,
    breakdown: bool,
}

fn usage() -> ! {
    eprintln!(
        "bench_depth [--depths 1,16,256,4096] [--rounds 3] [--size-mib 1024] [--random-reads 200000]\n\
         \x20           [--seq-passes 2] [--threads 2] [--layout interleaved|contiguous] [--breakdown]\n\
         \x20           [--dir PATH] [--keep]\n\
         --dir defaults to $MCOW_BENCH_DIR, else target/bench-depth under the workspace;\n\
         it is removed at the end unless --keep."
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let default_dir = std::env::var_os("MCOW_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-depth"));
    let mut a = Args {
        depths: vec![1, 16, 256, 4096],
        rounds: 3,
        size_mib: 1024,
        random_reads: 200_000,
        seq_passes: 2,
        threads: 2,
        dir: default_dir,
        keep: false,
        contiguous: false,
        breakdown: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--depths" => {
                a.depths = val().split(',').map(|s| s.trim().parse().unwrap_or_else(|_| usage())).collect()
            }
            "--rounds" => a.rounds = val().parse().unwrap_or_else(|_| usage()),
            "--size-mib" => a.size_mib = val().parse().unwrap_or_else(|_| usage()),
            "--random-reads" => a.random_reads = val().parse().unwrap_or_else(|_| usage()),
            "--seq-passes" => a.seq_passes = val().parse().unwrap_or_else(|_| usage()),
            "--threads" => a.threads = val().parse().unwrap_or_else(|_| usage()),
            "--dir" => a.dir = PathBuf::from(val()),
            "--keep" => a.keep = true,
            "--breakdown" => a.breakdown = true,
            "--layout" => {
                a.contiguous = match val().as_str() {
                    "interleaved" => false,
                    "contiguous" => true,
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    let blocks = a.size_mib * (1 << 20) / u64::from(BLOCK);
    if a.depths.is_empty()
        || a.rounds == 0
        || a.size_mib == 0
        || a.depths.iter().any(|&d| d == 0 || d as u64 > blocks)
    {
        usage()
    }
    a
}

// ---- deterministic content -------------------------------------------------------------------

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Word `k` of virtual block `block` as stored by layer `layer`: random access, so any window
/// of any block can be regenerated. Never zero in practice (and a zero word would still be fine).
fn word(block: u64, layer: u64, k: u64) -> u64 {
    let seed = mix((block << 24) ^ layer ^ 0x6d63_6f77_0000_0000);
    mix(seed.wrapping_add((k + 1).wrapping_mul(GOLDEN)))
}

/// Which layer stores which block. Interleaved (the default): layer `i` owns the blocks with
/// `b % depth == i`. Contiguous: layer `i` owns the `i`th of `depth` equal runs of blocks.
#[derive(Clone, Copy)]
struct Layout {
    depth: u64,
    blocks: u64,
    contiguous: bool,
}

impl Layout {
    fn owner(&self, b: u64) -> u64 {
        if self.contiguous { b * self.depth / self.blocks } else { b % self.depth }
    }

    fn first_block(&self, layer: u64) -> u64 {
        if self.contiguous { (layer * self.blocks).div_ceil(self.depth) } else { layer }
    }

    /// Where block `b` sits inside its layer's file (its physical block number).
    fn pblock(&self, b: u64) -> u64 {
        if self.contiguous { b - self.first_block(self.owner(b)) } else { b / self.depth }
    }

    /// The blocks layer `layer` stores, ascending.
    fn blocks_of(&self, layer: u64) -> impl Iterator<Item = u64> + '_ {
        let step = if self.contiguous { 1 } else { self.depth as usize };
        (self.first_block(layer)..self.blocks).step_by(step).take_while(move |&b| self.owner(b) == layer)
    }

    /// Fills `out` with the expected bytes at disk offset `off` (8-byte aligned).
    fn expected(&self, off: u64, out: &mut [u8]) {
        let bs = u64::from(BLOCK);
        let mut pos = off;
        for chunk in out.chunks_exact_mut(8) {
            let (b, k) = (pos / bs, (pos % bs) / 8);
            chunk.copy_from_slice(&word(b, self.owner(b), k).to_le_bytes());
            pos += 8;
        }
    }

    fn check(&self, off: u64, got: &[u8], scratch: &mut Vec<u8>, what: &str) {
        scratch.resize(got.len(), 0);
        self.expected(off, scratch);
        if got != &scratch[..] {
            let first = got.iter().zip(scratch.iter()).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "depth {}: {what} read at offset {off} returned wrong bytes (first difference at +{first})",
                self.depth
            );
        }
    }
}

// ---- building ----------------------------------------------------------------------------------

struct Built {
    /// The engine every disk of the run is opened in (one pool within the open-file limit).
    engine: Engine,
    depth: usize,
    layout: Layout,
    disk_dir: PathBuf,
    build_s: f64,
    extents: usize,
}

fn build(engine: &Engine, root: &Path, depth: usize, size: u64, contiguous: bool) -> Built {
    let t = Instant::now();
    let dir = root.join(format!("depth-{depth}"));
    let _ = std::fs::remove_dir_all(&dir);
    let store_dir = dir.join("store");
    let store = LayerStore::in_engine(engine, &store_dir);
    let layout = Layout { depth: depth as u64, blocks: size / u64::from(BLOCK), contiguous };
    let mut buf = vec![0u8; BLOCK as usize];
    let mut chain = Digest::ZERO;
    let mut digests = Vec::with_capacity(depth);
    for layer in 0..depth as u64 {
        let mut pending = store.begin_layer().expect("begin layer");
        let mut w = LayerWriter::new(pending.take_writer(), BLOCK, size, chain).expect("layer writer");
        for b in layout.blocks_of(layer) {
            debug_assert_eq!(layout.pblock(b), w.stored_blocks());
            layout.expected(b * u64::from(BLOCK), &mut buf);
            w.push_block(b, &buf).expect("push block");
        }
        let (out, digest, _) = w.finish().expect("finish layer");
        pending.commit(&store, out, &digest).expect("commit layer");
        chain = next_chain(&chain, &digest);
        digests.push(digest);
    }
    assert_eq!(chain, chain_digest(&digests));
    let disk_dir = dir.join("disk");
    Disk::create(
        &disk_dir,
        &CreateOptions { virtual_size: size, block_size: BLOCK, store: store_dir, layers: digests },
    )
    .expect("create disk");
    let d = Disk::open_in(engine, &disk_dir, ro()).expect("open disk");
    assert_eq!(d.stack().depth(), depth);
    let extents = d.stack().extent_count();
    Built { engine: engine.clone(), depth, layout, disk_dir, build_s: t.elapsed().as_secs_f64(), extents }
}

fn ro() -> OpenOptions {
    OpenOptions { read_only: true, verify: true, force_share: false }
}

// ---- measuring -----------------------------------------------------------------------------------

/// One round's numbers for one depth.
#[derive(Clone, Copy, Default)]
struct Sample {
    open_ms: f64,
    cold_seq_gbs: f64,
    seq_gbs: f64,
    rand_iops: f64,
    rand_mt_iops: f64,
    // --breakdown only (ns per 4 KiB read, GB/s):
    resolve_ns: f64,
    raw_rand_ns: f64,
    lookup_raw_ns: f64,
    engine_ns: f64,
    raw_seq_gbs: f64,
}

/// Time and work accumulated over the slices of one round.
#[derive(Clone, Copy, Default)]
struct Acc {
    seq: (Duration, u64),
    rand: (Duration, u64),
    mt: (Duration, u64),
    resolve: (Duration, u64),
    raw: (Duration, u64),
    lookup_raw: (Duration, u64),
    engine: (Duration, u64),
    raw_seq: (Duration, u64),
}

fn add(a: &mut (Duration, u64), t: Duration, n: u64) {
    a.0 += t;
    a.1 += n;
}

fn per_s(a: (Duration, u64)) -> f64 {
    a.1 as f64 / a.0.as_secs_f64()
}

fn ns_per(a: (Duration, u64)) -> f64 {
    a.0.as_nanos() as f64 / a.1 as f64
}

fn gbs(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// 1 MiB reads of chunks `chunks` (chunk `j` is at `(j mod chunks per disk)` MiB); checks a
/// 4 KiB window of each read.
fn seq_reads(disk: &Disk, lay: &Layout, chunks: std::ops::Range<u64>, buf: &mut [u8]) -> Duration {
    let per_disk = disk.size().div_ceil(SEQ_CHUNK as u64);
    let mut scratch = Vec::new();
    let t = Instant::now();
    for j in chunks {
        let off = (j % per_disk) * SEQ_CHUNK as u64;
        let n = (SEQ_CHUNK as u64).min(disk.size() - off) as usize;
        disk.read(off, &mut buf[..n]).expect("sequential read");
        let w = ((mix(j) as usize) % (n / RAND_LEN)) * RAND_LEN;
        lay.check(off + w as u64, &buf[w..w + RAND_LEN], &mut scratch, "sequential");
    }
    t.elapsed()
}

/// Uniform random 4 KiB-aligned offsets drawn from `seed`.
fn rand_offsets(size: u64, seed: u64) -> impl Iterator<Item = u64> {
    let slots = size / RAND_LEN as u64;
    (1..).map(move |i: u64| (mix(seed.wrapping_add(i.wrapping_mul(GOLDEN))) % slots) * RAND_LEN as u64)
}

/// `n` random 4 KiB reads (offsets from `seed`); checks every 16th.
fn random_reads(disk: &Disk, lay: &Layout, n: usize, seed: u64) -> Duration {
    let mut buf = vec![0u8; RAND_LEN];
    let mut scratch = Vec::new();
    let t = Instant::now();
    for (i, off) in rand_offsets(disk.size(), seed).take(n).enumerate() {
        disk.read(off, &mut buf).expect("random read");
        if i % 16 == 0 {
            lay.check(off, &buf, &mut scratch, "random");
        }
    }
    t.elapsed()
}

/// An open disk under measurement, plus (for `--breakdown`) our own descriptors on its layer
/// files, in a plain vector indexed by layer.
struct Open<'a> {
    b: &'a Built,
    disk: Disk,
    files: Vec<std::fs::File>,
}

impl Open<'_> {
    fn pos(&self, off: u64) -> u64 {
        let bs = u64::from(BLOCK);
        HEADER_SIZE as u64 + self.b.layout.pblock(off / bs) * bs + off % bs
    }

    /// Breakdown of a random read, on the same offsets as the engine's: the engine's lookup
    /// alone; the same `pread`s straight on the layer files (positions from the layout, no
    /// engine); and the engine's lookup followed by a `pread` on our plain descriptor vector
    /// (what a read costs with the lookup but without the engine's per-layer objects); and
    /// `Disk::read` itself, unchecked like the others (the timed random loop checks every 16th
    /// read).
    fn breakdown(&self, n: usize, seed: u64, acc: &mut Acc, buf: &mut [u8]) {
        use std::os::unix::fs::FileExt;
        let (disk, lay) = (&self.disk, &self.b.layout);
        let bs = u64::from(BLOCK);
        let t = Instant::now();
        let mut sum = 0u64;
        for off in rand_offsets(disk.size(), seed).take(n) {
            let (loc, end) = disk.resolve(off / bs, off / bs + 1);
            sum = sum.wrapping_add(loc.map_or(0, |l| l.pblock)).wrapping_add(end);
        }
        add(&mut acc.resolve, t.elapsed(), n as u64);
        std::hint::black_box(sum);

        let t = Instant::now();
        for off in rand_offsets(disk.size(), seed).take(n) {
            let f = &self.files[lay.owner(off / bs) as usize];
            f.read_exact_at(&mut buf[..RAND_LEN], self.pos(off)).expect("raw read");
        }
        add(&mut acc.raw, t.elapsed(), n as u64);

        let t = Instant::now();
        for off in rand_offsets(disk.size(), seed).take(n) {
            let (loc, _) = disk.resolve(off / bs, off / bs + 1);
            let l = loc.expect("mapped");
            let at = HEADER_SIZE as u64 + l.pblock * bs + off % bs;
            self.files[l.layer as usize].read_exact_at(&mut buf[..RAND_LEN], at).expect("raw read");
        }
        add(&mut acc.lookup_raw, t.elapsed(), n as u64);

        let t = Instant::now();
        for off in rand_offsets(disk.size(), seed).take(n) {
            disk.read(off, &mut buf[..RAND_LEN]).expect("random read");
        }
        add(&mut acc.engine, t.elapsed(), n as u64);
    }

    /// Sequential 1 MiB reads the raw way: one `pread` per run of blocks that are consecutive
    /// in one layer file (the same split the engine makes).
    fn raw_seq(&self, chunks: std::ops::Range<u64>, buf: &mut [u8]) -> Duration {
        use std::os::unix::fs::FileExt;
        let (size, lay, bs) = (self.disk.size(), &self.b.layout, u64::from(BLOCK));
        let per_disk = size.div_ceil(SEQ_CHUNK as u64);
        let t = Instant::now();
        for j in chunks {
            let off = (j % per_disk) * SEQ_CHUNK as u64;
            let end = (off + SEQ_CHUNK as u64).min(size);
            let (mut b, mut done) = (off / bs, 0usize);
            while b * bs < end {
                let mut e = b + 1;
                while e * bs < end && lay.owner(e) == lay.owner(b) && lay.pblock(e) == lay.pblock(b) + (e - b)
                {
                    e += 1;
                }
                let len = ((e - b) * bs) as usize;
                let f = &self.files[lay.owner(b) as usize];
                f.read_exact_at(&mut buf[done..done + len], self.pos(b * bs)).expect("raw read");
                done += len;
                b = e;
            }
        }
        t.elapsed()
    }
}

fn open(b: &Built) -> Disk {
    Disk::open_in(&b.engine, &b.disk_dir, ro()).expect("open disk")
}

/// Phase 1, once per depth and round: open time, then the first sequential pass on the fresh
/// open (every block read whole and hashed once). On round 0 also checks every byte, untimed.
fn open_and_cold(b: &Built, round: usize, s: &mut Sample) {
    let t = Instant::now();
    let disk = open(b);
    s.open_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut buf = vec![0u8; SEQ_CHUNK];
    let chunks = disk.size().div_ceil(SEQ_CHUNK as u64);
    s.cold_seq_gbs = gbs(disk.size(), seq_reads(&disk, &b.layout, 0..chunks, &mut buf));
    if round == 0 {
        let mut scratch = Vec::new();
        for j in 0..chunks {
            let off = j * SEQ_CHUNK as u64;
            let n = (SEQ_CHUNK as u64).min(disk.size() - off) as usize;
            disk.read(off, &mut buf[..n]).expect("read");
            b.layout.check(off, &buf[..n], &mut scratch, "full-check");
        }
    }
}

/// Phase 2, one round: every depth's disk already open and verified; the work of the round is
/// cut into `SLICES` slices and the depths take turns slice by slice (order rotating), so
/// that load from other processes falls on all depths alike.
fn warm_round(opens: &[Open<'_>], a: &Args, round: usize, out: &mut [Vec<Sample>]) {
    const SLICES: usize = 8;
    let mut acc = vec![Acc::default(); opens.len()];
    let mut buf = vec![0u8; SEQ_CHUNK];
    let n = (a.random_reads / SLICES).max(1);
    for slice in 0..SLICES {
        let seed = mix(0xbe7c_0000 ^ ((round as u64) << 16) ^ slice as u64); // same for all depths
        for k in 0..opens.len() {
            let i = (k + slice + round) % opens.len();
            let (o, acc) = (&opens[i], &mut acc[i]);
            let lay = &o.b.layout;
            let total = o.disk.size().div_ceil(SEQ_CHUNK as u64) * a.seq_passes as u64;
            let chunks = total * slice as u64 / SLICES as u64..total * (slice as u64 + 1) / SLICES as u64;
            let bytes = (chunks.end - chunks.start) * SEQ_CHUNK as u64;
            add(&mut acc.seq, seq_reads(&o.disk, lay, chunks.clone(), &mut buf), bytes);
            add(&mut acc.rand, random_reads(&o.disk, lay, n, seed), n as u64);
            if a.threads > 1 {
                let per = n / a.threads;
                let t = Instant::now();
                std::thread::scope(|sc| {
                    for th in 0..a.threads {
                        let disk = &o.disk;
                        sc.spawn(move || random_reads(disk, lay, per, seed ^ ((th as u64 + 1) << 40)));
                    }
                });
                add(&mut acc.mt, t.elapsed(), (per * a.threads) as u64);
            }
            if a.breakdown {
                o.breakdown(n, seed, acc, &mut buf);
                add(&mut acc.raw_seq, o.raw_seq(chunks, &mut buf), bytes);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let s = &mut out[i][round];
        s.seq_gbs = per_s(acc.seq) / 1e9;
        s.rand_iops = per_s(acc.rand);
        s.rand_mt_iops = if a.threads > 1 { per_s(acc.mt) } else { 0.0 };
        if a.breakdown {
            s.resolve_ns = ns_per(acc.resolve);
            s.raw_rand_ns = ns_per(acc.raw);
            s.lookup_raw_ns = ns_per(acc.lookup_raw);
            s.engine_ns = ns_per(acc.engine);
            s.raw_seq_gbs = per_s(acc.raw_seq) / 1e9;
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn open_files_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join("/"))
        })
        .unwrap_or_else(|| "?".into())
}

fn layout_name(a: &Args) -> &'static str {
    if a.contiguous { "contiguous" } else { "interleaved" }
}

fn main() {
    let a = parse_args();
    let size = a.size_mib << 20;
    std::fs::create_dir_all(&a.dir).expect("create bench dir");
    let root = a.dir.canonicalize().expect("bench dir");
    println!(
        "# mcow engine: reads vs stack depth; disk {} MiB, block {} KiB, depths {:?}, {} rounds, \
         {} random reads and {} sequential passes per depth and round, {} threads, {} layout; dir {}",
        a.size_mib,
        BLOCK / 1024,
        a.depths,
        a.rounds,
        a.random_reads,
        a.seq_passes,
        a.threads,
        layout_name(&a),
        root.display()
    );

    // As the mcow binary does: the soft open-file limit up to the hard one, then one engine
    // whose file pool is sized from it.
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut lim = getrlimit(Resource::Nofile);
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
    let engine = Engine::default();
    let mut built = Vec::new();
    for &d in &a.depths {
        let b = build(&engine, &root, d, size, a.contiguous);
        println!("# built depth {:>5}: {:>6.1} s, {} runs in the flattened map", d, b.build_s, b.extents);
        built.push(b);
    }

    // Adding a layer on top of each stack: create a disk on it, write one block, seal.
    for b in &built {
        let m = mcow_engine::disk::read_manifest(&b.disk_dir).expect("manifest");
        let addon = b.disk_dir.with_file_name("addon");
        let _ = std::fs::remove_dir_all(&addon);
        let t = Instant::now();
        let store = mcow_engine::disk::resolve_store(&b.disk_dir, &m);
        let opts = CreateOptions { virtual_size: size, block_size: BLOCK, store, layers: m.layers.clone() };
        Disk::create(&addon, &opts).expect("create on the stack");
        let create_ms = t.elapsed().as_secs_f64() * 1e3;
        {
            let d = Disk::open_in(&b.engine, &addon, OpenOptions::default()).expect("open");
            d.write(0, &vec![0xa5; BLOCK as usize]).expect("write");
            d.flush().expect("flush");
        }
        let t = Instant::now();
        mcow_engine::ops::merge(&addon, 0, &mut |_, _| {}).expect("seal");
        let seal_ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "# adding a layer at depth {:>5}: create a disk on the stack {create_ms:.1} ms, seal a one-block top {seal_ms:.1} ms",
            b.depth
        );
        println!(
            "{{\"bench\":\"engine_depth\",\"kind\":\"add_layer\",\"depth\":{},\"create_ms\":{create_ms:.3},\"seal_ms\":{seal_ms:.3}}}",
            b.depth
        );
        let _ = std::fs::remove_dir_all(&addon);
    }

    let mut samples = vec![vec![Sample::default(); a.rounds]; built.len()];
    #[allow(clippy::needless_range_loop)] // `round` also picks the rotation and the full check
    for round in 0..a.rounds {
        for k in 0..built.len() {
            let i = (k + round) % built.len();
            open_and_cold(&built[i], round, &mut samples[i][round]);
        }
    }
    let opens: Vec<Open<'_>> = built
        .iter()
        .map(|b| {
            let disk = open(b);
            let mut buf = vec![0u8; SEQ_CHUNK];
            let _ = seq_reads(&disk, &b.layout, 0..disk.size().div_ceil(SEQ_CHUNK as u64), &mut buf); // verify all
            let files = if a.breakdown {
                {
                    let stack = disk.stack();
                    (0..b.depth)
                        .map(|l| std::fs::File::open(&stack.layers()[l].path).expect("open layer"))
                        .collect()
                }
            } else {
                Vec::new()
            };
            Open { b, disk, files }
        })
        .collect();
    println!(
        "# open-file limit (soft/hard, after raising it): {}; descriptors open: {}",
        open_files_limit(),
        std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
    );
    for round in 0..a.rounds {
        warm_round(&opens, &a, round, &mut samples);
    }
    drop(opens);

    for (i, b) in built.iter().enumerate() {
        for (round, s) in samples[i].iter().enumerate() {
            let extra = if a.breakdown {
                format!(
                    ",\"resolve_ns\":{:.1},\"raw_rand4k_ns\":{:.1},\"lookup_raw_rand4k_ns\":{:.1},\"engine_rand4k_ns\":{:.1},\
                     \"raw_seq_gbs\":{:.4}",
                    s.resolve_ns, s.raw_rand_ns, s.lookup_raw_ns, s.engine_ns, s.raw_seq_gbs
                )
            } else {
                String::new()
            };
            println!(
                "{{\"bench\":\"engine_depth\",\"kind\":\"sample\",\"layout\":\"{}\",\"round\":{round},\
                 \"depth\":{},\"open_ms\":{:.3},\"cold_seq_gbs\":{:.4},\"seq_gbs\":{:.4},\"rand4k_iops\":{:.0},\
                 \"rand4k_mt_iops\":{:.0}{extra}}}",
                layout_name(&a),
                b.depth,
                s.open_ms,
                s.cold_seq_gbs,
                s.seq_gbs,
                s.rand_iops,
                s.rand_mt_iops
            );
        }
    }

    let med = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    let fields: [fn(&Sample) -> f64; 5] =
        [|s| s.open_ms, |s| s.cold_seq_gbs, |s| s.seq_gbs, |s| s.rand_iops, |s| s.rand_mt_iops];
    println!();
    println!("median of {} rounds; (ratio) = value / value at depth {}", a.rounds, built[0].depth);
    println!(
        "| depth | map runs | open ms | cold-verify seq 1M GB/s | warm seq 1M GB/s | warm rand 4K reads/s, 1 thread | warm rand 4K reads/s, {} threads |",
        a.threads
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut json = Vec::new();
    for (i, b) in built.iter().enumerate() {
        let v: Vec<f64> = fields.iter().map(|f| med(i, *f)).collect();
        let r: Vec<f64> = fields.iter().enumerate().map(|(j, f)| v[j] / med(0, *f)).collect();
        println!(
            "| {} | {} | {:.1} | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.0} ({:.2}) | {:.0} ({:.2}) |",
            b.depth, b.extents, v[0], v[1], r[1], v[2], r[2], v[3], r[3], v[4], r[4]
        );
        json.push(format!(
            "{{\"bench\":\"engine_depth\",\"kind\":\"median\",\"layout\":\"{}\",\"rounds\":{},\"depth\":{},\
             \"map_runs\":{},\"open_ms\":{:.3},\"cold_seq_gbs\":{:.4},\"seq_gbs\":{:.4},\"rand4k_iops\":{:.0},\
             \"rand4k_mt_iops\":{:.0},\"ratio_cold_seq\":{:.4},\"ratio_seq\":{:.4},\"ratio_rand4k\":{:.4},\
             \"ratio_rand4k_mt\":{:.4}}}",
            layout_name(&a),
            a.rounds,
            b.depth,
            b.extents,
            v[0],
            v[1],
            v[2],
            v[3],
            v[4],
            r[1],
            r[2],
            r[3],
            r[4]
        ));
    }
    if a.breakdown {
        println!();
        println!(
            "breakdown of a warm random 4 KiB read in ns (median of {} rounds), and raw sequential:",
            a.rounds
        );
        println!(
            "| depth | Disk::read (unchecked) | engine lookup alone | raw pread alone | engine lookup + pread on a \
             plain fd vector | Disk::read minus that | raw seq 1M GB/s |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for (i, b) in built.iter().enumerate() {
            let eng = med(i, |s| s.engine_ns);
            let lr = med(i, |s| s.lookup_raw_ns);
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
                b.depth,
                eng,
                med(i, |s| s.resolve_ns),
                med(i, |s| s.raw_rand_ns),
                lr,
                eng - lr,
                med(i, |s| s.raw_seq_gbs)
            );
        }
    }
    println!();
    for j in &json {
        println!("{j}");
    }
    let last = built.len() - 1;
    let (rs, rr) = (med(last, fields[2]) / med(0, fields[2]), med(last, fields[3]) / med(0, fields[3]));
    println!(
        "\ndepth {} vs depth {}: warm seq {:.3}, warm random 4K {:.3} -> {}",
        built[last].depth,
        built[0].depth,
        rs,
        rr,
        if rs >= 0.9 && rr >= 0.9 { "meets the 0.9 target" } else { "BELOW the 0.9 target" }
    );

    if !a.keep {
        for b in &built {
            let _ = std::fs::remove_dir_all(b.disk_dir.parent().expect("depth dir"));
        }
        let _ = std::fs::remove_dir(&root);
    }
}
