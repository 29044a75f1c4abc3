//! An interval map from virtual block ranges to locations, where a later insert hides what it
//! covers. This is the heart of depth-independent addressing: the extents of every layer are
//! inserted bottom to top once, at open, and a read then needs one lookup whatever the depth.
//!
//! Owns: the map structure (a `BTreeMap` keyed by first block; each entry holds its end and
//! value) and the frozen, sorted-vector form used for the read-only stack. Does not own: what a
//! location means (see `Loc`).

use std::collections::BTreeMap;

use mcow_format::ExtentKind;

/// Marks a location in the writable top rather than in a sealed layer.
pub const TOP: u32 = u32::MAX;

/// Where a run of virtual blocks lives: a layer (index from the bottom, or [`TOP`]), what the
/// layer says about it, and for data the first physical block in that layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// The layer: its index from the bottom of the stack, or [`TOP`].
    pub layer: u32,
    /// What the layer says about the run: data, zeros or discarded.
    pub kind: ExtentKind,
    /// For data, the physical block in the layer that holds the run's first block.
    pub pblock: u64,
}

impl Loc {
    /// The location `by` blocks further into the same run.
    pub fn advance(self, by: u64) -> Loc {
        match self.kind {
            ExtentKind::Data => Loc { pblock: self.pblock + by, ..self },
            _ => self,
        }
    }
}

/// One run of blocks `[start, end)` at `loc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The first virtual block.
    pub start: u64,
    /// The virtual block after the last.
    pub end: u64,
    /// Where the first block is (the others follow it).
    pub loc: Loc,
}

/// A mutable interval map (used while building a stack's map, and for the writable top).
#[derive(Debug, Default, Clone)]
pub struct ExtentMap {
    map: BTreeMap<u64, (u64, Loc)>,
}

impl ExtentMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of runs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if no block is mapped.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Maps `[start, end)` to `loc`, hiding whatever was there. Adjacent runs that continue each
    /// other are merged so sequential writes keep the map small.
    pub fn insert(&mut self, start: u64, end: u64, loc: Loc) {
        debug_assert!(start < end);
        self.remove(start, end);
        let (mut start, mut loc, mut end) = (start, loc, end);
        if let Some((&ps, &(pe, pl))) = self.map.range(..start).next_back()
            && pe == start
            && pl.advance(start - ps) == loc
        {
            self.map.remove(&ps);
            start = ps;
            loc = pl;
        }
        if let Some(&(ne, nl)) = self.map.get(&end)
            && loc.advance(end - start) == nl
        {
            self.map.remove(&end);
            end = ne;
        }
        self.map.insert(start, (end, loc));
    }

    /// Unmaps `[start, end)`, trimming runs that stick out on either side.
    pub fn remove(&mut self, start: u64, end: u64) {
        // A run that starts before `start` and reaches into the range.
        if let Some((&ps, &(pe, pl))) = self.map.range(..start).next_back()
            && pe > start
        {
            self.map.insert(ps, (start, pl));
            if pe > end {
                self.map.insert(end, (pe, pl.advance(end - ps)));
                return;
            }
        }
        // Runs that start inside the range.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let (e, l) = self.map.remove(&s).expect("key just listed");
            if e > end {
                self.map.insert(end, (e, l.advance(end - s)));
            }
        }
    }

    /// The run holding `block`, starting at `block`, or `None` if unmapped.
    pub fn get(&self, block: u64) -> Option<Extent> {
        let (&s, &(e, l)) = self.map.range(..=block).next_back()?;
        (e > block).then(|| Extent { start: block, end: e, loc: l.advance(block - s) })
    }

    /// The first block at or after `block` that is mapped.
    pub fn next_mapped(&self, block: u64) -> Option<u64> {
        if self.get(block).is_some() {
            return Some(block);
        }
        self.map.range(block..).next().map(|(&s, _)| s)
    }

    /// Whether any run overlaps `[start, end)`: [`ExtentMap::overlapping`] not empty, in one
    /// lookup (the last run starting before `end` is the only one that can reach `start`).
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start < end && self.map.range(..end).next_back().is_some_and(|(_, &(e, _))| e > start)
    }

    /// The runs overlapping `[start, end)`, clipped to it.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        if let Some((&s, &(e, l))) = self.map.range(..start).next_back()
            && e > start
        {
            out.push(Extent { start, end: e.min(end), loc: l.advance(start - s) });
        }
        for (&s, &(e, l)) in self.map.range(start..end) {
            out.push(Extent { start: s, end: e.min(end), loc: l });
        }
        out
    }

    /// All runs in order.
    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        self.map.iter().map(|(&start, &(end, loc))| Extent { start, end, loc })
    }

    /// Freezes the map into a sorted vector for lock-free lookups.
    pub fn freeze(&self) -> FrozenMap {
        FrozenMap { runs: self.iter().collect() }
    }
}

/// The read-only form: a sorted vector of runs, searched by bisection.
#[derive(Debug, Default, Clone)]
pub struct FrozenMap {
    runs: Vec<Extent>,
}

impl FrozenMap {
    /// The number of runs.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// True if no block is mapped.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The run holding `block` (starting at `block`), or else the first mapped block after it.
    pub fn lookup(&self, block: u64) -> Result<Extent, Option<u64>> {
        let i = self.runs.partition_point(|r| r.start <= block);
        if i > 0 {
            let r = self.runs[i - 1];
            if r.end > block {
                return Ok(Extent { start: block, end: r.end, loc: r.loc.advance(block - r.start) });
            }
        }
        Err(self.runs.get(i).map(|r| r.start))
    }

    /// The runs, in block order.
    pub fn iter(&self) -> impl Iterator<Item = &Extent> {
        self.runs.iter()
    }
}

/// Blocks per leaf of a [`BlockTable`] (32 KiB of entries).
const LEAF_SHIFT: u32 = 12;
const LEAF: usize = 1 << LEAF_SHIFT;
/// Leaves per directory node of a [`BlockTable`] (32 KiB of pointers, 2^24 blocks).
const DIR_SHIFT: u32 = 12;
const DIR: usize = 1 << DIR_SHIFT;
const PBLOCK_BITS: u32 = 42;
const KIND_SHIFT: u32 = PBLOCK_BITS;
const LAYER_SHIFT: u32 = 44;
/// Most layers a table can address (20 bits, less the "unmapped" value).
pub const MAX_TABLE_LAYERS: u32 = (1 << (64 - LAYER_SHIFT)) - 2;

type Leaf = Box<[u64]>;
type DirNode = Box<[Option<Leaf>]>;

/// The per-block form of a frozen map: one 8-byte entry per virtual block (layer + 1, kind and
/// physical block packed; 0 = unmapped), in leaves of 4,096 blocks allocated only where some
/// layer maps a block, found through directory nodes of 4,096 leaves allocated the same way.
/// A lookup is three dependent loads (the directory is small and stays cached), the same at
/// any depth and for any number of runs; reading on through a run is a scan of neighbouring
/// entries. An empty table costs one pointer per 2^24 blocks (2 KiB for 256 TiB of 64 KiB
/// blocks), so memory follows what is mapped, not the virtual size.
#[derive(Debug, Default)]
pub struct BlockTable {
    dirs: Vec<Option<DirNode>>,
}

fn encode(loc: Loc) -> u64 {
    ((u64::from(loc.layer) + 1) << LAYER_SHIFT) | ((loc.kind as u64) << KIND_SHIFT) | loc.pblock
}

fn decode(v: u64) -> Option<Loc> {
    if v == 0 {
        return None;
    }
    let kind = match (v >> KIND_SHIFT) & 3 {
        1 => ExtentKind::Data,
        2 => ExtentKind::Zero,
        _ => ExtentKind::Discarded,
    };
    Some(Loc { layer: ((v >> LAYER_SHIFT) - 1) as u32, kind, pblock: v & ((1 << PBLOCK_BITS) - 1) })
}

impl BlockTable {
    /// Builds the table of `map` for a disk of `blocks` blocks. Layers must be below
    /// [`MAX_TABLE_LAYERS`] and physical blocks below 2^42 (the format caps them at 2^40).
    pub fn new(map: &FrozenMap, blocks: u64) -> BlockTable {
        let mut dirs: Vec<Option<DirNode>> = Vec::new();
        dirs.resize_with(blocks.div_ceil((LEAF * DIR) as u64) as usize, || None);
        for run in map.iter() {
            debug_assert!(run.loc.layer <= MAX_TABLE_LAYERS && run.loc.pblock < 1 << PBLOCK_BITS);
            let mut v = encode(run.loc);
            for b in run.start..run.end.min(blocks) {
                let dir = dirs[(b >> (LEAF_SHIFT + DIR_SHIFT)) as usize].get_or_insert_with(|| {
                    let mut d = Vec::new();
                    d.resize_with(DIR, || None);
                    d.into_boxed_slice()
                });
                let leaf = dir[((b >> LEAF_SHIFT) as usize) & (DIR - 1)]
                    .get_or_insert_with(|| vec![0u64; LEAF].into_boxed_slice());
                leaf[(b as usize) & (LEAF - 1)] = v;
                if run.loc.kind == ExtentKind::Data {
                    v += 1;
                }
            }
        }
        BlockTable { dirs }
    }

    fn leaf(&self, block: u64) -> Option<&Leaf> {
        let dir = self.dirs.get((block >> (LEAF_SHIFT + DIR_SHIFT)) as usize)?.as_ref()?;
        dir[((block >> LEAF_SHIFT) as usize) & (DIR - 1)].as_ref()
    }

    fn entry(&self, block: u64) -> u64 {
        self.leaf(block).map_or(0, |leaf| leaf[(block as usize) & (LEAF - 1)])
    }

    /// Where `block` lives, and the end of that run (or of the unmapped gap), looking no
    /// further than `limit`.
    pub fn lookup(&self, block: u64, limit: u64) -> (Option<Loc>, u64) {
        let first = self.entry(block);
        let step = u64::from(decode(first).is_some_and(|l| l.kind == ExtentKind::Data));
        let (mut end, mut want) = (block + 1, first + step);
        while end < limit {
            // A whole unmapped leaf is skipped at once.
            if first == 0 && (end as usize) & (LEAF - 1) == 0 && self.entry_leaf_empty(end) {
                end = (end + LEAF as u64).min(limit);
                continue;
            }
            if self.entry(end) != want {
                break;
            }
            end += 1;
            want += step;
        }
        (decode(first), end)
    }

    fn entry_leaf_empty(&self, block: u64) -> bool {
        self.leaf(block).is_none()
    }

    /// Bytes of entries and pointers held.
    pub fn memory(&self) -> usize {
        let nodes = self.dirs.iter().flatten();
        let leaves: usize = nodes.clone().map(|d| d.iter().flatten().count()).sum();
        leaves * LEAF * 8 + nodes.count() * DIR * 8 + self.dirs.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(layer: u32, pblock: u64) -> Loc {
        Loc { layer, kind: ExtentKind::Data, pblock }
    }

    /// A per-block reference model.
    fn model_of(m: &ExtentMap, n: u64) -> Vec<Option<Loc>> {
        (0..n).map(|b| m.get(b).map(|e| e.loc)).collect()
    }

    #[test]
    fn later_inserts_hide_earlier_ones() {
        let mut m = ExtentMap::new();
        m.insert(0, 10, data(0, 100));
        m.insert(3, 5, data(1, 0));
        assert_eq!(m.get(2).unwrap().loc, data(0, 102));
        assert_eq!(m.get(3).unwrap(), Extent { start: 3, end: 5, loc: data(1, 0) });
        assert_eq!(m.get(5).unwrap().loc, data(0, 105));
        assert_eq!(m.len(), 3);
        m.remove(0, 10);
        assert!(m.is_empty());
    }

    #[test]
    fn contiguous_runs_merge() {
        let mut m = ExtentMap::new();
        for b in 0..100 {
            m.insert(b, b + 1, data(TOP, b + 7));
        }
        assert_eq!(m.len(), 1);
        m.insert(50, 51, Loc { layer: TOP, kind: ExtentKind::Zero, pblock: 0 });
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn matches_a_per_block_model() {
        // A deterministic pseudo-random sequence of inserts and removes.
        let mut m = ExtentMap::new();
        let mut model = vec![None; 64];
        let mut x = 12345u64;
        for i in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let a = (x >> 33) % 64;
            let b = a + 1 + (x >> 45) % (64 - a);
            if i % 5 == 4 {
                m.remove(a, b);
                model[a as usize..b as usize].iter_mut().for_each(|v| *v = None);
            } else {
                let loc = data((x & 3) as u32, (x >> 20) % 1000);
                m.insert(a, b, loc);
                for (k, v) in model[a as usize..b as usize].iter_mut().enumerate() {
                    *v = Some(loc.advance(k as u64));
                }
            }
            assert_eq!(model_of(&m, 64), model, "after op {i}");
            let (s, e) = ((x >> 7) % 64, (x >> 7) % 64 + 1 + (x >> 13) % 5);
            assert_eq!(m.overlaps(s, e), model[s as usize..e.min(64) as usize].iter().any(Option::is_some));
            assert_eq!(m.overlaps(s, e), !m.overlapping(s, e).is_empty(), "[{s}, {e}) after op {i}");
        }
        let frozen = m.freeze();
        for b in 0..64 {
            match frozen.lookup(b) {
                Ok(e) => assert_eq!(Some(e.loc), model[b as usize]),
                Err(next) => {
                    assert_eq!(model[b as usize], None);
                    assert_eq!(next, m.next_mapped(b));
                }
            }
        }
    }

    #[test]
    fn block_table_agrees_with_the_runs() {
        let mut m = ExtentMap::new();
        m.insert(3, 9000, data(1, 50));
        m.insert(100, 105, Loc { layer: 0, kind: ExtentKind::Zero, pblock: 0 });
        m.insert(20000, 20002, data(7, 1 << 39));
        let frozen = m.freeze();
        let t = BlockTable::new(&frozen, 20003);
        let limit = 20003;
        let mut b = 0;
        while b < limit {
            let (loc, end) = t.lookup(b, limit);
            assert!(end > b && end <= limit);
            for k in b..end {
                assert_eq!(m.get(k).map(|e| e.loc), loc.map(|l| l.advance(k - b)), "block {k}");
            }
            if end < limit {
                let next = m.get(end).map(|e| e.loc);
                assert_ne!(next, loc.map(|l| l.advance(end - b)), "run should not end at {end}");
            }
            b = end;
        }
        assert_eq!(t.lookup(5, 7), (Some(data(1, 52)), 7), "the limit bounds the scan");
    }
}
