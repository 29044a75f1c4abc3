//! Writing a sealed layer from a map of runs (what a seal, commit, flatten or the sealing of a
//! snapshot's frozen top produce): the one place that turns runs and the blocks read for them
//! into a layer file in the store. Owns the progress callback's type. Does not own: which runs
//! a layer gets (see `ops`, `disk`).

use mcow_format::{Digest, ExtentKind};

use crate::error::{Error, Result};
use crate::extent_map::{ExtentMap, Loc};
use crate::layer::LayerWriter;
use crate::store::LayerStore;

/// Progress callback: (done, total) in bytes.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Reads virtual block `vblock`, found at a location, into a whole-block buffer.
pub(crate) type BlockReader<'a> = dyn Fn(u64, Loc, &mut [u8]) -> Result<()> + 'a;

/// Writes the runs of `map` as a new sealed layer into `store`, reading data through `read`.
/// On an empty base, zero and discarded runs hide nothing and are left out; all-zero blocks are
/// never stored.
pub(crate) fn write_layer(
    store: &LayerStore,
    manifest: &mcow_format::DiskManifest,
    map: &ExtentMap,
    parent: Digest,
    empty_base: bool,
    read: &BlockReader,
    progress: Progress,
) -> Result<Digest> {
    let mut pending = store.begin_layer()?;
    let tmp = pending.path().to_path_buf();
    let werr = |e: std::io::Error| Error::io("write", &tmp)(e);
    let mut w = LayerWriter::new(pending.take_writer(), manifest.block_size, manifest.virtual_size, parent)
        .map_err(werr)?;
    let bs = u64::from(manifest.block_size);
    let total: u64 = map.iter().map(|e| (e.end - e.start) * bs).sum();
    let mut done = 0u64;
    let mut block = vec![0u8; bs as usize];
    for e in map.iter() {
        match e.loc.kind {
            ExtentKind::Data => {
                for b in e.start..e.end {
                    read(b, e.loc.advance(b - e.start), &mut block)?;
                    if is_zero(&block) {
                        if !empty_base {
                            w.push_marker(b, 1, ExtentKind::Zero).map_err(werr)?;
                        }
                    } else {
                        w.push_block(b, &block).map_err(werr)?;
                    }
                    done += bs;
                    progress(done, total);
                }
            }
            kind if !empty_base => w.push_marker(e.start, e.end - e.start, kind).map_err(werr)?,
            _ => {}
        }
    }
    let (out, digest, _) = w.finish().map_err(werr)?;
    pending.commit(store, out, &digest)?;
    Ok(digest)
}

/// True if every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0) && chunks.remainder().iter().all(|&b| b == 0)
}
