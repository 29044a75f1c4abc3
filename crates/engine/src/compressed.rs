//! Partial layers pulled from compressed blobs (docs/FORMAT.md, "Compressed layer blobs" and
//! "Partial layers"): their blocks are fetched as the blob's zstd frames, one per stored block.
//!
//! Owns: [`FramedSource`], the [`BlockSource`] that takes ranges of the layer (as the engine
//! asks for them) and asks its inner source for the ranges of the blob that hold them, all in
//! one request (the header as it is, data blocks as the run of their frames, the tail shifted
//! to the blob's end), decoding each frame into one block as its bytes arrive and streaming the
//! blocks on; and loading a partial layer's `.frames` file and checking it against the layer
//! (`load_frames`). Does not own: checking the decoded blocks against their hashes (the
//! engine does that for every source, see `fetch`), where the `.frames` file lives and when it
//! is written or removed (see `store`), or the table's encoding and rules (crate mcow-format).

use std::path::Path;
use std::sync::{Arc, Mutex};

use mcow_format::{BlobLayout, Digest, FrameDecoder, FrameTable, FramesFile, HEADER_SIZE};

use crate::error::{Error, Result};
use crate::fetch::BlockSource;
use crate::layer::SealedLayer;

/// Loads the `.frames` file at `path` of partial layer `layer`, if there is one, and checks it
/// against the layer: its table must hash to the digest it records and meet the table rules,
/// have the trailer's block count, and fit a blob of its recorded length that holds this
/// layer's header and tail. `None` if there is no such file (an ordinary partial layer); a file
/// that is unreadable or fails is [`Error::FramesFile`].
pub(crate) fn load_frames(path: &Path, layer: &SealedLayer) -> Result<Option<(FramesFile, BlobLayout)>> {
    let bad = |why: String| Error::FramesFile { path: path.to_path_buf(), why };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(format!("cannot read it: {e}"))),
    };
    let block_size = layer.header.block_size;
    let block_count = layer.trailer.block_count;
    // Its length follows from the layer; a file of another length is not read at all.
    let want = mcow_format::FRAMES_FILE_HEADER as u64 + FrameTable::encoded_len(block_count);
    if meta.len() != want {
        return Err(bad(format!("{} bytes, a frame table of {block_count} blocks takes {want}", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let frames = FramesFile::decode(&bytes, block_size).map_err(|e| bad(e.to_string()))?;
    let layer_len = layer.trailer.file_len(block_size);
    let tail_len = layer_len - layer.trailer.index_offset(block_size);
    let layout = BlobLayout::new(block_size, layer_len, tail_len, frames.blob_len)
        .and_then(|l| l.check_table(&frames.table).map(|()| l))
        .map_err(|e| bad(e.to_string()))?;
    if layout.block_count != block_count {
        return Err(bad(format!("{} frames, the layer has {block_count} blocks", layout.block_count)));
    }
    Ok(Some((frames, layout)))
}

/// The source of a partial layer pulled from a compressed blob: requests for ranges of the
/// layer become requests to `inner` for ranges of the blob (by the blob's digest), and the
/// frames that arrive are decoded, each into one block, before they are handed on. Blocks are
/// handed on as soon as their frame is in, so the engine checks and serves the first ones
/// before the rest arrive. A frame that does not decode into exactly one block fails the read
/// that needs it (an [`std::io::ErrorKind::InvalidData`] error naming the layer, the blob and
/// the block); nothing of it is handed on, so nothing of it is cached.
pub struct FramedSource {
    inner: Arc<dyn BlockSource>,
    /// The layer this source serves (the engine asks for it by this digest).
    layer: Digest,
    blob: Digest,
    layout: BlobLayout,
    table: FrameTable,
    /// Decoders of finished requests, for the next ones (one zstd context each).
    decoders: Mutex<Vec<FrameDecoder>>,
}

impl FramedSource {
    /// The source of layer `layer` fetching from the blob `frames` names through `inner`;
    /// `layout` must be the blob's (see `load_frames`), which `frames.table` must fit.
    pub fn new(
        inner: Arc<dyn BlockSource>,
        layer: Digest,
        frames: FramesFile,
        layout: BlobLayout,
    ) -> std::result::Result<FramedSource, mcow_format::FormatError> {
        layout.check_table(&frames.table)?;
        Ok(FramedSource {
            inner,
            layer,
            blob: frames.blob,
            layout,
            table: frames.table,
            decoders: Mutex::new(Vec::new()),
        })
    }

    /// The compressed blob the blocks come from.
    pub fn blob(&self) -> &Digest {
        &self.blob
    }

    /// Adds the blob ranges that hold layer range `(offset, len)` (the request's range `range`)
    /// to `segments`, in layer order.
    fn map_range(
        &self,
        range: usize,
        offset: u64,
        len: u64,
        segments: &mut Vec<Segment>,
    ) -> std::io::Result<()> {
        let l = &self.layout;
        let end = offset.checked_add(len).filter(|&e| e <= l.layer_len).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are past the end of layer {} ({} bytes)",
                    self.layer, l.layer_len
                ),
            )
        })?;
        let (header, tail) = (HEADER_SIZE as u64, l.layer_tail_offset());
        if offset < header.min(end) {
            segments.push(Segment { range, blob: (offset, end.min(header) - offset), frames: None });
        }
        let (start, stop) = (offset.max(header), end.min(tail));
        if start < stop {
            let bs = u64::from(l.block_size);
            let (rel_start, rel_stop) = (start - header, stop - header);
            let first = rel_start / bs;
            let count = rel_stop.div_ceil(bs) - first;
            segments.push(Segment {
                range,
                blob: self.table.span(first, count),
                frames: Some(Frames { first, skip: rel_start - first * bs, take: stop - start }),
            });
        }
        let start = offset.max(tail);
        if start < end {
            segments.push(Segment {
                range,
                blob: (start - tail + l.blob_tail_offset(), end - start),
                frames: None,
            });
        }
        Ok(())
    }

    fn take_decoder(&self) -> std::io::Result<FrameDecoder> {
        let spare = self.decoders.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match spare {
            Some(d) => Ok(d),
            None => FrameDecoder::new().map_err(std::io::Error::other),
        }
    }

    /// The error for a request to the inner source that failed, naming the layer and blob.
    fn inner_error(&self, e: std::io::Error) -> std::io::Error {
        std::io::Error::new(e.kind(), format!("layer {} from compressed blob {}: {e}", self.layer, self.blob))
    }
}

/// A range of the blob that holds part of one requested range of the layer.
struct Segment {
    /// The requested range it serves.
    range: usize,
    /// (offset, length) in the blob.
    blob: (u64, u64),
    /// `None`: the bytes as they are (header, tail); else the frames of a run of blocks.
    frames: Option<Frames>,
}

/// The frames of stored blocks `first .. first + count`, of whose decoded bytes the `take` from
/// `skip` on are wanted (a request that starts or ends inside a block gets just its part).
#[derive(Clone, Copy)]
struct Frames {
    first: u64,
    skip: u64,
    take: u64,
}

/// How far one segment has come.
#[derive(Default)]
struct Progress {
    /// Blob bytes received.
    got: u64,
    /// Frames decoded (frame segments).
    decoded: u64,
    /// The bytes of a frame split across pieces, gathered.
    frame: Vec<u8>,
    /// Bytes for the sink held back while an earlier segment of the same range is unfinished
    /// (the inner source may deliver ranges in any order; each range's bytes go out in order).
    held: Vec<u8>,
}

/// One request's segments and their progress, fed by the inner source.
struct Request<'a> {
    src: &'a FramedSource,
    segments: &'a [Segment],
    progress: Vec<Progress>,
    /// Per requested range: the segment whose bytes go to the sink now.
    current: Vec<usize>,
    /// Per requested range: why it failed (its later bytes are dropped).
    failed: Vec<Option<std::io::Error>>,
    /// Requested ranges that have not failed.
    alive: usize,
    /// The sink asked to stop.
    stopped: bool,
    decoder: FrameDecoder,
    block: Vec<u8>,
}

impl Request<'_> {
    /// Takes `piece`, the next bytes of segment `j`; false to end the request.
    fn feed(&mut self, j: usize, mut piece: &[u8], sink: &mut dyn FnMut(usize, &[u8]) -> bool) -> bool {
        let Some(seg) = self.segments.get(j) else { return true };
        let i = seg.range;
        if self.failed[i].is_some() {
            return self.alive > 0;
        }
        let p = &mut self.progress[j];
        if p.got + piece.len() as u64 > seg.blob.1 {
            let why =
                format!("the source sent more than the {} bytes asked for at {}", seg.blob.1, seg.blob.0);
            self.fail(i, std::io::ErrorKind::InvalidData, why);
            return self.alive > 0;
        }
        p.got += piece.len() as u64;
        match seg.frames {
            None => self.out(j, piece, sink),
            Some(f) => {
                let bs = self.block.len() as u64;
                while !piece.is_empty() && !self.stopped {
                    let p = &mut self.progress[j];
                    let pblock = f.first + p.decoded;
                    let (at, len) = self.src.table.span(pblock, 1);
                    let len = len as usize;
                    // A whole frame in the piece is decoded where it lies; one split across
                    // pieces is gathered first.
                    let frame: &[u8] = if p.frame.is_empty() && piece.len() >= len {
                        let (frame, rest) = piece.split_at(len);
                        piece = rest;
                        frame
                    } else {
                        let n = (len - p.frame.len()).min(piece.len());
                        p.frame.extend_from_slice(&piece[..n]);
                        piece = &piece[n..];
                        if p.frame.len() < len {
                            break;
                        }
                        &p.frame
                    };
                    if let Err(e) = self.decoder.decode(frame, &mut self.block) {
                        let (layer, blob) = (self.src.layer, self.src.blob);
                        tracing::warn!(%layer, %blob, pblock, frame_at = at, frame_len = len, error = %e,
                            "a frame of the compressed blob does not decode into its block: the read fails, nothing is cached");
                        let why = format!(
                            "block {pblock} of layer {layer}: its frame ({len} bytes at {at} of compressed blob {blob}) is bad: {e}"
                        );
                        self.fail(i, std::io::ErrorKind::InvalidData, why);
                        return self.alive > 0;
                    }
                    let p = &mut self.progress[j];
                    p.frame.clear();
                    // The part of the block the request wants.
                    let from = p.decoded * bs;
                    let lo = f.skip.saturating_sub(from).min(bs) as usize;
                    let hi = (f.skip + f.take - from).min(bs) as usize;
                    p.decoded += 1;
                    let block = std::mem::take(&mut self.block);
                    self.out(j, &block[lo..hi], sink);
                    self.block = block;
                }
            }
        }
        if self.progress[j].got == seg.blob.1 && self.current[i] == j {
            self.advance(i, sink);
        }
        !self.stopped
    }

    /// Hands `bytes` of segment `j` to the sink, or holds them if an earlier segment of its
    /// range is unfinished.
    fn out(&mut self, j: usize, bytes: &[u8], sink: &mut dyn FnMut(usize, &[u8]) -> bool) {
        let i = self.segments[j].range;
        if self.stopped {
            return;
        }
        if self.current[i] == j {
            if !bytes.is_empty() && !sink(i, bytes) {
                self.stopped = true;
            }
        } else {
            self.progress[j].held.extend_from_slice(bytes);
        }
    }

    /// Range `i`'s current segment is finished: moves on to its next ones, handing on what
    /// they hold.
    fn advance(&mut self, i: usize, sink: &mut dyn FnMut(usize, &[u8]) -> bool) {
        while !self.stopped {
            self.current[i] += 1;
            let k = self.current[i];
            if k >= self.segments.len() || self.segments[k].range != i {
                return;
            }
            let held = std::mem::take(&mut self.progress[k].held);
            if !held.is_empty() && !sink(i, &held) {
                self.stopped = true;
                return;
            }
            if self.progress[k].got < self.segments[k].blob.1 {
                return;
            }
        }
    }

    fn fail(&mut self, i: usize, kind: std::io::ErrorKind, why: String) {
        if self.failed[i].is_none() {
            self.failed[i] = Some(std::io::Error::new(kind, why));
            self.alive -= 1;
        }
    }
}

impl BlockSource for FramedSource {
    fn read_range(
        &self,
        layer: &Digest,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()> {
        self.read_ranges(layer, &[(offset, len)], &mut |_, piece: &[u8]| sink(piece))
    }

    /// All the blob ranges of all the requested ranges in one request to the inner source.
    fn read_ranges(
        &self,
        layer: &Digest,
        ranges: &[(u64, u64)],
        sink: &mut dyn FnMut(usize, &[u8]) -> bool,
    ) -> std::io::Result<()> {
        if *layer != self.layer {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("asked for layer {layer} from the source of layer {}", self.layer),
            ));
        }
        let mut segments = Vec::new();
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            self.map_range(i, offset, len, &mut segments)?;
        }
        if segments.is_empty() {
            return Ok(());
        }
        let blob_ranges: Vec<(u64, u64)> = segments.iter().map(|s| s.blob).collect();
        let mut current = vec![0; ranges.len()];
        for (j, s) in segments.iter().enumerate().rev() {
            current[s.range] = j;
        }
        // Ranges with bytes to fetch (an empty one has no segment).
        let mut alive = 0;
        for (j, s) in segments.iter().enumerate() {
            alive += usize::from(j == 0 || segments[j - 1].range != s.range);
        }
        let mut req = Request {
            src: self,
            segments: &segments,
            progress: segments.iter().map(|_| Progress::default()).collect(),
            current,
            failed: ranges.iter().map(|_| None).collect(),
            alive,
            stopped: false,
            decoder: self.take_decoder()?,
            block: vec![0u8; self.layout.block_size as usize],
        };
        let result =
            self.inner.read_ranges(&self.blob, &blob_ranges, &mut |j, piece: &[u8]| req.feed(j, piece, sink));
        let Request { decoder, failed, progress, stopped, .. } = req;
        self.decoders.lock().unwrap_or_else(|p| p.into_inner()).push(decoder);
        if stopped {
            return Ok(());
        }
        if let Some(e) = failed.into_iter().flatten().next() {
            return Err(e);
        }
        result.map_err(|e| self.inner_error(e))?;
        if let Some((s, p)) = segments.iter().zip(&progress).find(|(s, p)| p.got < s.blob.1) {
            let what = match s.frames {
                Some(f) => format!("block {} of layer {}: the frame", f.first + p.decoded, self.layer),
                None => format!("layer {}: the bytes", self.layer),
            };
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{what} at {} of compressed blob {} did not arrive (the source ended early)",
                    s.blob.0 + p.got,
                    self.blob
                ),
            ));
        }
        Ok(())
    }
}
