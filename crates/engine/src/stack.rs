//! A stack: the ordered sealed layers of a disk, and the one flattened map that says, for every
//! virtual block, which layer holds it and where.
//!
//! Owns: opening the layers of a manifest, checking that each one was made on exactly the
//! stack below it, and building the flattened map (every layer's extents inserted bottom to
//! top, once) and its per-block table. A lookup is then three loads from that table, whatever the
//! depth and however fragmented the map. Does not own:
//! the writable top (see `top`) or the byte-level read path (see `disk`).

use mcow_format::{Digest, ExtentKind};

use crate::bitmap::AtomicBitmap;
use crate::error::{Error, Result};
use crate::extent_map::{BlockTable, Extent, ExtentMap, FrozenMap, Loc, MAX_TABLE_LAYERS};
use crate::layer::ReadTally;
use crate::store::{LayerStore, OpenLayer};

/// Sealed layers plus their flattened map. Immutable once built, so it is shared freely.
pub struct Stack {
    /// The disk's size in bytes.
    pub virtual_size: u64,
    /// The block size of every layer.
    pub block_size: u32,
    layers: Vec<OpenLayer>,
    map: FrozenMap,
    table: BlockTable,
    /// One bit per virtual block: its visible block has passed its hash check. Checked on the
    /// read path instead of the owning layer's own bitmap, so the hot path touches one small
    /// bitmap whatever the depth.
    verified: AtomicBitmap,
    /// Each layer's data region, mapped, in one dense vector (index = layer), so the read path
    /// touches no per-layer structure.
    maps: Vec<Option<memmap2::Mmap>>,
    verify: bool,
    /// Whether any layer is partial (else reads count nothing in a tally).
    any_partial: bool,
    chain: Digest,
}

impl Stack {
    /// Opens `digests` (bottom first) from `store`, checks sizes and parent chains, and builds
    /// the flattened map. Time is proportional to the total number of extents and stored blocks.
    pub fn open(
        store: &LayerStore,
        digests: &[Digest],
        virtual_size: u64,
        block_size: u32,
        verify: bool,
    ) -> Result<Stack> {
        let mut layers = Vec::with_capacity(digests.len());
        let mut map = ExtentMap::new();
        let mut chain = Digest::ZERO;
        if digests.len() > MAX_TABLE_LAYERS as usize {
            return Err(Error::Invalid(format!("a stack holds at most {MAX_TABLE_LAYERS} layers")));
        }
        for (i, digest) in digests.iter().enumerate() {
            let (layer, index) = store.open_layer_shared(digest, verify)?;
            if layer.header.parent != chain {
                return Err(Error::WrongParent {
                    path: layer.path.clone(),
                    recorded: layer.header.parent,
                    actual: chain,
                });
            }
            if layer.header.block_size != block_size {
                return Err(Error::Mismatch {
                    path: layer.path.clone(),
                    what: "block size",
                    found: layer.header.block_size.into(),
                    expected: block_size.into(),
                });
            }
            if layer.header.virtual_size != virtual_size {
                return Err(Error::Mismatch {
                    path: layer.path.clone(),
                    what: "virtual size",
                    found: layer.header.virtual_size,
                    expected: virtual_size,
                });
            }
            let idx = u32::try_from(i).map_err(|_| Error::Invalid("too many layers".into()))?;
            for e in index {
                map.insert(e.vblock, e.end(), Loc { layer: idx, kind: e.kind, pblock: e.pblock });
            }
            chain = next_chain(&chain, digest);
            layers.push(layer);
        }
        let map = map.freeze();
        // What this disk shows of each partial layer: reads fetch nothing else along with the
        // block they read.
        for e in map.iter() {
            if e.loc.kind == ExtentKind::Data
                && let Some(partial) = layers[e.loc.layer as usize].partial()
            {
                partial.mark_visible(e.loc.pblock, e.end - e.start);
            }
        }
        let blocks = virtual_size.div_ceil(u64::from(block_size));
        let table = BlockTable::new(&map, blocks);
        let verified = AtomicBitmap::new(blocks);
        // (Not a layer whose blocks may be dropped: a block read through the map could be a hole.)
        let maps = layers
            .iter()
            .map(|l| if l.partial().is_some_and(|p| p.drops_blocks()) { None } else { l.map_data() })
            .collect();
        let any_partial = layers.iter().any(OpenLayer::is_partial);
        Ok(Stack { virtual_size, block_size, layers, map, table, verified, maps, verify, any_partial, chain })
    }

    /// An empty stack (a disk with no sealed layers).
    pub fn empty(virtual_size: u64, block_size: u32) -> Stack {
        Stack {
            virtual_size,
            block_size,
            layers: Vec::new(),
            map: FrozenMap::default(),
            table: BlockTable::default(),
            verified: AtomicBitmap::default(),
            maps: Vec::new(),
            verify: true,
            any_partial: false,
            chain: Digest::ZERO,
        }
    }

    /// Chain digest of the whole stack: what a layer made on top of it records as its parent.
    pub fn chain(&self) -> Digest {
        self.chain
    }

    /// The layers, bottom first.
    pub fn layers(&self) -> &[OpenLayer] {
        &self.layers
    }

    /// The number of layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Number of runs in the flattened map.
    pub fn extent_count(&self) -> usize {
        self.map.len()
    }

    /// Where `block` lives in the stack (`None`: no layer holds it) and the end of that run
    /// (or gap), looking no further than `limit`.
    pub fn lookup(&self, block: u64, limit: u64) -> (Option<Loc>, u64) {
        self.table.lookup(block, limit)
    }

    /// Bytes held by the per-block table.
    pub fn table_memory(&self) -> usize {
        self.table.memory()
    }

    /// The runs of the flattened map, in block order.
    pub fn extents(&self) -> impl Iterator<Item = &Extent> {
        self.map.iter()
    }

    /// Whether the virtual blocks `blocks` (of the run at `loc`) can be read as they are in the
    /// layer file. Without verification complete layers can; a partial layer's blocks must
    /// still be made local (and so checked) first.
    /// A partial layer whose blocks may be dropped (a bounded cache) never is: its reads go
    /// through the layer, which knows what was dropped.
    fn checked(&self, loc: Loc, blocks: std::ops::RangeInclusive<u64>) -> bool {
        if self.layers[loc.layer as usize].partial().is_some_and(|p| p.drops_blocks()) {
            return false;
        }
        if !self.verify {
            return !self.layers[loc.layer as usize].is_partial();
        }
        blocks.into_iter().all(|b| self.verified.get(b))
    }

    /// Records that the virtual blocks `blocks` were checked.
    fn mark_checked(&self, blocks: std::ops::RangeInclusive<u64>) {
        self.verified.set_range(*blocks.start(), *blocks.end() + 1);
    }

    /// Reads `buf` from the data run that starts at virtual block `vblock` at `loc` (as returned
    /// by [`Stack::lookup`]), `offset` bytes in. Blocks not yet checked are checked against
    /// their hashes first. With `tally`, the blocks read from a partial layer are counted there
    /// (hits and misses: see [`ReadTally`]).
    pub fn read_run(
        &self,
        vblock: u64,
        loc: Loc,
        offset: u64,
        buf: &mut [u8],
        tally: Option<&ReadTally>,
    ) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let bs = u64::from(self.block_size);
        let blocks = vblock + offset / bs..=vblock + (offset + buf.len() as u64 - 1) / bs;
        if !self.checked(loc, blocks.clone()) {
            self.layers[loc.layer as usize].read_counted(loc.pblock, offset, buf, tally)?;
            self.mark_checked(blocks);
            return Ok(());
        }
        self.count_hits(loc, &blocks, tally);
        match &self.maps[loc.layer as usize] {
            Some(map) => {
                let start = (loc.pblock * bs + offset) as usize;
                buf.copy_from_slice(&map[start..start + buf.len()]);
                Ok(())
            }
            None => self.layers[loc.layer as usize].read_trusted(loc.pblock, offset, buf),
        }
    }

    /// The `len` bytes of the run at `loc` (virtual block `vblock`, `offset` bytes in) as a
    /// slice of the layer's map, after making them local and checked as [`Stack::read_run`]
    /// would; `None` when the layer is not mapped.
    pub fn mapped_run(
        &self,
        vblock: u64,
        loc: Loc,
        offset: u64,
        len: usize,
        tally: Option<&ReadTally>,
    ) -> Result<Option<&[u8]>> {
        let Some(map) = &self.maps[loc.layer as usize] else { return Ok(None) };
        if len == 0 {
            return Ok(Some(&[]));
        }
        self.ready_run(vblock, loc, offset, len as u64, tally)?;
        let start = (loc.pblock * u64::from(self.block_size) + offset) as usize;
        Ok(Some(&map[start..start + len]))
    }

    /// Whether the layer of `loc` is mapped ([`Stack::mapped_run`] gives slices of it).
    pub fn is_mapped(&self, loc: Loc) -> bool {
        self.maps[loc.layer as usize].is_some()
    }

    /// The virtual blocks under `len` (> 0) bytes from `offset` into virtual block `vblock`.
    fn blocks_of(&self, vblock: u64, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let bs = u64::from(self.block_size);
        vblock + offset / bs..=vblock + (offset + len - 1) / bs
    }

    /// Makes the run at `loc` (`len` bytes from `offset` into virtual block `vblock`) local and
    /// checked without reading it out, fetching what a partial layer lacks (and counting its
    /// blocks in `tally`, as [`Stack::read_run`] does).
    pub(crate) fn ready_run(
        &self,
        vblock: u64,
        loc: Loc,
        offset: u64,
        len: u64,
        tally: Option<&ReadTally>,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let blocks = self.blocks_of(vblock, offset, len);
        if !self.checked(loc, blocks.clone()) {
            self.layers[loc.layer as usize].make_ready(loc.pblock, offset, len, tally)?;
            self.mark_checked(blocks);
        } else {
            self.count_hits(loc, &blocks, tally);
        }
        Ok(())
    }

    /// Counts `blocks`, found checked, as hits if `loc` is in a partial layer.
    fn count_hits(&self, loc: Loc, blocks: &std::ops::RangeInclusive<u64>, tally: Option<&ReadTally>) {
        if let Some(t) = tally
            && self.any_partial
            && self.layers[loc.layer as usize].is_partial()
        {
            t.hit(blocks.end() - blocks.start() + 1);
        }
    }

    /// Whether reading the run at `loc` would fetch: its layer is partial and not all of its
    /// blocks there are checked yet (they may be local all the same; then nothing is fetched).
    pub(crate) fn may_fetch(&self, vblock: u64, loc: Loc, offset: u64, len: u64) -> bool {
        if let Some(p) = self.layers[loc.layer as usize].partial().filter(|p| p.drops_blocks()) {
            let bs = u64::from(self.block_size);
            return len > 0
                && !p.all_verified(loc.pblock + offset / bs, loc.pblock + (offset + len - 1) / bs);
        }
        len > 0
            && self.layers[loc.layer as usize].is_partial()
            && !self.checked(loc, self.blocks_of(vblock, offset, len))
    }

    /// Reads what the stack holds at virtual block `vblock`, `offset` bytes in, into `buf`
    /// (which must not run past the block). Unmapped, zero and discarded blocks read as zeros.
    pub fn read_block(&self, vblock: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.table.lookup(vblock, vblock + 1).0 {
            Some(loc) if loc.kind == mcow_format::ExtentKind::Data => {
                self.read_run(vblock, loc, offset, buf, None)
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

/// The chain digest of a stack one layer taller.
pub fn next_chain(chain: &Digest, layer: &Digest) -> Digest {
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(&chain.0);
    buf[32..].copy_from_slice(&layer.0);
    Digest::of(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcow_format::chain_digest;

    #[test]
    fn next_chain_agrees_with_chain_digest() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert_eq!(next_chain(&next_chain(&Digest::ZERO, &a), &b), chain_digest([&a, &b]));
    }
}
