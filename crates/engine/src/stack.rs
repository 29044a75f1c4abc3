//! A stack: the ordered sealed layers of a disk, and the one flattened map that says, for every
//! virtual block, which layer holds it and where.
//!
//! Owns: opening the layers of a manifest, checking that each one was made on exactly the
//! stack below it, and building the flattened map (every layer's extents inserted bottom to
//! top, once). A lookup is then one bisection of that map, whatever the depth. Does not own:
//! the writable top (see `top`) or the byte-level read path (see `disk`).

use std::sync::Arc;

use mcow_format::Digest;

use crate::error::{Error, Result};
use crate::extent_map::{Extent, ExtentMap, FrozenMap, Loc};
use crate::layer::SealedLayer;
use crate::store::LayerStore;

/// Sealed layers plus their flattened map. Immutable once built, so it is shared freely.
pub struct Stack {
    pub virtual_size: u64,
    pub block_size: u32,
    layers: Vec<Arc<SealedLayer>>,
    map: FrozenMap,
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
        for (i, digest) in digests.iter().enumerate() {
            let (layer, index) = store.open_layer(digest, verify)?;
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
            layers.push(Arc::new(layer));
        }
        Ok(Stack { virtual_size, block_size, layers, map: map.freeze(), chain })
    }

    /// An empty stack (a disk with no sealed layers).
    pub fn empty(virtual_size: u64, block_size: u32) -> Stack {
        Stack { virtual_size, block_size, layers: Vec::new(), map: FrozenMap::default(), chain: Digest::ZERO }
    }

    /// Chain digest of the whole stack: what a layer made on top of it records as its parent.
    pub fn chain(&self) -> Digest {
        self.chain
    }

    pub fn layers(&self) -> &[Arc<SealedLayer>] {
        &self.layers
    }

    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Number of runs in the flattened map.
    pub fn extent_count(&self) -> usize {
        self.map.len()
    }

    /// The run holding `block`, or else the first mapped block after it.
    pub fn lookup(&self, block: u64) -> Result<Extent, Option<u64>> {
        self.map.lookup(block)
    }

    pub fn extents(&self) -> impl Iterator<Item = &Extent> {
        self.map.iter()
    }

    /// Reads what the stack holds at virtual block `vblock`, `offset` bytes in, into `buf`
    /// (which must not run past the block). Unmapped, zero and discarded blocks read as zeros.
    pub fn read_block(&self, vblock: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.map.lookup(vblock) {
            Ok(e) if e.loc.kind == mcow_format::ExtentKind::Data => {
                self.layers[e.loc.layer as usize].read(e.loc.pblock, offset, buf)
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
