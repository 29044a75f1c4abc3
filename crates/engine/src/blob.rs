//! Compressed layer blobs as a whole, on the layer store's side (docs/FORMAT.md, "Compressed
//! layer blobs"): encoding a complete local layer as the blob a push uploads, and rebuilding a
//! layer from a downloaded blob before it is adopted under its own digest.
//!
//! Owns: the two conversions, their use of threads and their memory bound (a few MiB in
//! flight, whatever the layer's size). Does not own: the blob's layout, the frame table's rules
//! and the zstd frames (`mcow_format::frames`), nor moving blobs (`mcow-remote`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use mcow_format::{
    BlobLayout, Digest, FrameDecoder, FrameEncoder, FrameTable, HEADER_SIZE, LayerHeader, Sha256Stream,
    TRAILER_SIZE, Trailer,
};

use crate::error::{Error, Result};
use crate::store::LayerStore;
use crate::temp::TempFile;

/// Bytes of layer data (or of frames) a worker handles at once.
const BATCH_BYTES: u64 = 1 << 20;
/// Threads that compress: the machines this runs on have two cores to share.
const WORKERS: u64 = 2;

/// A compressed blob of a layer, made by [`LayerStore::compress_layer`].
#[derive(Debug)]
pub struct CompressedBlob {
    /// The blob, a locked temporary in the store's `tmp/` (removed when dropped).
    pub file: TempFile,
    /// SHA-256 of the blob (its name at a remote).
    pub digest: Digest,
    /// Bytes of the blob.
    pub len: u64,
    /// SHA-256 of the blob's frame table.
    pub frame_table_digest: Digest,
}

/// Writes through a buffer and hashes what it writes, in order.
struct HashingWriter {
    out: BufWriter<File>,
    hash: Sha256Stream,
    len: u64,
    path: PathBuf,
}

impl HashingWriter {
    fn new(temp: &TempFile) -> Result<HashingWriter> {
        let file = temp.file().try_clone().map_err(Error::io("open", temp.path()))?;
        Ok(HashingWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256Stream::new(),
            len: 0,
            path: temp.path().to_path_buf(),
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(Error::io("write", &self.path))?;
        self.hash.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Copies `len` bytes of `from` at `offset`, in steps of at most [`BATCH_BYTES`].
    fn copy(&mut self, from: &File, from_path: &Path, offset: u64, len: u64) -> Result<()> {
        let mut buf = vec![0u8; len.min(BATCH_BYTES) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(BATCH_BYTES) as usize;
            from.read_exact_at(&mut buf[..n], offset + done).map_err(Error::io("read", from_path))?;
            self.put(&buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes the file durable; returns the digest and length of what was written.
    fn finish(self) -> Result<(Digest, u64)> {
        let file = self.out.into_inner().map_err(|e| Error::io("write", &self.path)(e.into_error()))?;
        file.sync_all().map_err(Error::io("sync", &self.path))?;
        Ok((self.hash.finish(), self.len))
    }
}

/// One batch of compressed blocks: their frames, back to back, and each frame's length.
type Batch = Result<(Vec<u8>, Vec<u64>)>;

impl LayerStore {
    /// Encodes the complete local layer `digest` as a compressed blob at zstd level `level`
    /// (see `mcow_format::LEVELS`), in a locked temporary of the store's `tmp/`: header, one
    /// frame per stored block, frame table, tail. Two threads compress alternate batches of
    /// blocks (about 1 MiB each, each thread with its own encoder) while this one writes the
    /// frames in order, so at most a few batches are in memory. The same layer and level give
    /// the same bytes.
    pub fn compress_layer(&self, digest: &Digest, level: i32) -> Result<CompressedBlob> {
        let path = self.layer_path(digest);
        let layer = File::open(&path).map_err(Error::io("open", &path))?;
        let len = layer.metadata().map_err(Error::io("stat", &path))?.len();
        if len < (HEADER_SIZE + TRAILER_SIZE) as u64 {
            return Err(Error::Invalid(format!("{}: too short for a sealed layer", path.display())));
        }
        let mut header = vec![0u8; HEADER_SIZE];
        layer.read_exact_at(&mut header, 0).map_err(Error::io("read", &path))?;
        let h = LayerHeader::decode(&header).map_err(Error::format(&path))?;
        let mut tb = [0u8; TRAILER_SIZE];
        layer.read_exact_at(&mut tb, len - TRAILER_SIZE as u64).map_err(Error::io("read", &path))?;
        let t = Trailer::decode(&tb).map_err(Error::format(&path))?;
        if t.file_len(h.block_size) != len {
            return Err(Error::Invalid(format!(
                "{}: its trailer implies {} bytes, the file has {len}",
                path.display(),
                t.file_len(h.block_size)
            )));
        }
        let bs = u64::from(h.block_size);
        // The level is checked once here, so that the workers' encoders cannot fail.
        FrameEncoder::new(level, h.block_size).map_err(|e| Error::Invalid(e.to_string()))?;
        let count = t.block_count;
        let per_batch = (BATCH_BYTES / bs).max(1);
        let batches = count.div_ceil(per_batch);

        let file = self.temp_file(&format!("zstd-{}", digest.short()))?;
        let mut out = HashingWriter::new(&file)?;
        out.put(&header)?;
        let mut lengths = Vec::with_capacity(count as usize);
        std::thread::scope(|scope| -> Result<()> {
            // One channel per worker, holding one batch: worker `w` compresses batches `w`,
            // `w + WORKERS`, ... and this thread takes them in turn, so the frames are written
            // in block order and no worker runs more than two batches ahead.
            let mut inbox = Vec::new();
            for w in 0..WORKERS {
                let (tx, rx) = mpsc::sync_channel::<Batch>(1);
                inbox.push(rx);
                let (layer, path) = (&layer, &path);
                scope.spawn(move || {
                    let mut enc = FrameEncoder::new(level, h.block_size).expect("level checked above");
                    let mut data = vec![0u8; (per_batch.min(count) * bs) as usize];
                    for b in (w..batches).step_by(WORKERS as usize) {
                        let first = b * per_batch;
                        let n = per_batch.min(count - first);
                        let data = &mut data[..(n * bs) as usize];
                        let batch = layer
                            .read_exact_at(data, HEADER_SIZE as u64 + first * bs)
                            .map_err(Error::io("read", path))
                            .map(|()| {
                                let (mut frames, mut lens) = (Vec::new(), Vec::with_capacity(n as usize));
                                for block in data.chunks(bs as usize) {
                                    let frame = enc.encode(block);
                                    lens.push(frame.len() as u64);
                                    frames.extend_from_slice(frame);
                                }
                                (frames, lens)
                            });
                        let failed = batch.is_err();
                        // A closed channel: the writer gave up (its error is the one reported).
                        if tx.send(batch).is_err() || failed {
                            return;
                        }
                    }
                });
            }
            for b in 0..batches {
                let (frames, lens) = inbox[(b % WORKERS) as usize]
                    .recv()
                    .map_err(|_| Error::Invalid("a compression thread panicked".into()))??;
                out.put(&frames)?;
                lengths.extend(lens);
            }
            Ok(())
        })?;
        let table = FrameTable::from_lengths(lengths).encode();
        let frame_table_digest = Digest::of(&table);
        out.put(&table)?;
        let tail_at = t.index_offset(h.block_size);
        out.copy(&layer, &path, tail_at, len - tail_at)?;
        let (blob_digest, blob_len) = out.finish()?;
        Ok(CompressedBlob { file, digest: blob_digest, len: blob_len, frame_table_digest })
    }

    /// Rebuilds layer `layer_digest` (`layer_len` bytes, blocks of `block_size`, a tail of
    /// `tail_len` bytes) from the compressed blob downloaded to `blob_tmp`, and adopts it into
    /// the store under that digest. Checked, in order: the lengths fit a blob (see
    /// [`BlobLayout::new`]); the frame table hashes to `frame_table_digest` and meets the rules
    /// (entries, bounds, frame lengths); every frame decodes into exactly its block; the rebuilt
    /// layer (header, blocks, tail, copied from the blob) hashes to `layer_digest`. Any failure
    /// leaves nothing in the store (the rebuilt temporary is removed); the blob is the caller's.
    pub fn adopt_compressed(
        &self,
        blob_tmp: &Path,
        layer_digest: &Digest,
        layer_len: u64,
        block_size: u32,
        tail_len: u64,
        frame_table_digest: &Digest,
    ) -> Result<PathBuf> {
        let bad = |why: String| Error::CompressedBlob { layer: *layer_digest, why };
        let blob = File::open(blob_tmp).map_err(Error::io("open", blob_tmp))?;
        let blob_len = blob.metadata().map_err(Error::io("stat", blob_tmp))?.len();
        let layout =
            BlobLayout::new(block_size, layer_len, tail_len, blob_len).map_err(|e| bad(e.to_string()))?;
        // The table's length follows from the block count, which BlobLayout bounds by the blob's
        // length: the buffer is never larger than the blob.
        let mut table_bytes = vec![0u8; FrameTable::encoded_len(layout.block_count) as usize];
        blob.read_exact_at(&mut table_bytes, layout.table_offset()).map_err(Error::io("read", blob_tmp))?;
        let actual = Digest::of(&table_bytes);
        if actual != *frame_table_digest {
            return Err(bad(format!(
                "its frame table hashes to {actual}, the image names {frame_table_digest}"
            )));
        }
        let table = FrameTable::decode(&table_bytes, layout.block_count, block_size)
            .and_then(|t| layout.check_table(&t).map(|()| t))
            .map_err(|e| bad(e.to_string()))?;
        drop(table_bytes);

        let mut temp = self.temp_file(&format!("unzstd-{}", layer_digest.short()))?;
        let mut out = HashingWriter::new(&temp)?;
        out.copy(&blob, blob_tmp, 0, HEADER_SIZE as u64)?;
        let mut dec = FrameDecoder::new().map_err(|e| Error::Invalid(e.to_string()))?;
        let mut block = vec![0u8; block_size as usize];
        let mut run = Vec::new();
        let mut p = 0;
        while p < layout.block_count {
            // The frames of as many blocks as fit in a batch (at least one), read at once.
            let mut n = 1;
            while p + n < layout.block_count && table.span(p, n + 1).1 <= BATCH_BYTES {
                n += 1;
            }
            let (start, span) = table.span(p, n);
            run.resize(span as usize, 0);
            blob.read_exact_at(&mut run, start).map_err(Error::io("read", blob_tmp))?;
            for i in p..p + n {
                let (at, frame_len) = table.span(i, 1);
                let frame = &run[(at - start) as usize..][..frame_len as usize];
                dec.decode(frame, &mut block).map_err(|e| Error::CompressedFrame {
                    layer: *layer_digest,
                    pblock: i,
                    why: e.to_string(),
                })?;
                out.put(&block)?;
            }
            p += n;
        }
        out.copy(&blob, blob_tmp, layout.blob_tail_offset(), tail_len)?;
        let (actual, _) = out.finish()?;
        if actual != *layer_digest {
            return Err(bad(format!("the layer rebuilt from it hashes to {actual}")));
        }
        let dest = self.move_in(temp.path(), layer_digest)?;
        temp.persisted();
        Ok(dest)
    }
}
