//! The engine's [`Disk`] seen as an NBD [`Export`]: the choice of NBD semantics for our disks
//! (block sizes, FUA as a flush, the `mcow:allocation-depth` metadata context, errors mapped
//! through `io::Error`). Owns no sockets (that is `mcow-nbd`) and no storage (that is the
//! engine).

use std::io;
use std::sync::Arc;

use mcow_engine::{Disk, RunKind, TOP};
use mcow_nbd::proto::{NBD_STATE_HOLE, NBD_STATE_ZERO};
use mcow_nbd::{BlockSizes, Export, Parts, StatusExtent};

use crate::trace::TraceRecorder;

/// Our metadata context: which layer holds each extent, numbered like QEMU's
/// `qemu:allocation-depth`: 0 = no layer, 1 = the writable top, 2 = the topmost sealed layer,
/// and so on down to `depth + 1` for the bottom layer.
pub const DEPTH_CONTEXT: &str = "mcow:allocation-depth";

/// A disk seen as an NBD export. One instance is shared by every connection.
pub struct DiskExport {
    disk: Arc<Disk>,
    trace: Option<Arc<TraceRecorder>>,
    read_only: bool,
}

impl DiskExport {
    /// Serves `disk` (read-only if the disk was opened read-only).
    pub fn new(disk: Arc<Disk>) -> DiskExport {
        DiskExport { read_only: disk.is_read_only(), disk, trace: None }
    }

    /// Serves `disk` read-only even if it was opened writable (a second export of a disk
    /// that another export writes: it reads what that one wrote).
    pub fn into_read_only(mut self) -> DiskExport {
        self.read_only = true;
        self
    }

    /// Records the order of first reads into `trace`.
    pub fn with_trace(mut self, trace: Arc<TraceRecorder>) -> DiskExport {
        self.trace = Some(trace);
        self
    }

    /// The disk served.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua { self.disk.flush().map_err(io::Error::from) } else { Ok(()) }
    }
}

impl Export for DiskExport {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// Any alignment works; a whole block avoids a copy-up, so the block is preferred.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes { minimum: 1, preferred: self.disk.block_size().max(4096), maximum: 32 << 20 }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if let Some(t) = &self.trace {
            t.note(offset, buf.len() as u64);
        }
        Ok(self.disk.read(offset, buf)?)
    }

    /// Sealed layers are mapped: their bytes go to the client straight from the map.
    fn read_borrowed(&self, offset: u64, len: usize, send: &mut Parts<'_>) -> Option<io::Result<()>> {
        if let Some(t) = &self.trace {
            t.note(offset, len as u64);
        }
        match self.disk.read_mapped(offset, len, send) {
            Ok(false) => None,
            Ok(true) => Some(Ok(())),
            Err(e) => Some(Err(e.into())),
        }
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.disk.write(offset, data)?;
        self.sync_if(fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.disk.write_zeroes(offset, len, may_trim)?;
        self.sync_if(fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.disk.discard(offset, len)?;
        self.sync_if(fua)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(self.disk.flush()?)
    }

    fn extra_meta_contexts(&self) -> Vec<String> {
        vec![DEPTH_CONTEXT.to_string()]
    }

    fn block_status(&self, context: &str, offset: u64, len: u64) -> io::Result<Vec<StatusExtent>> {
        // Bound the work per request; the client asks again for the rest.
        let len = len.min(1 << 30).min(self.disk.size().saturating_sub(offset));
        let runs = self.disk.block_status(offset, len)?;
        let layers = self.disk.stack().depth() as u32;
        let depth_of = |layer: Option<u32>| match layer {
            None => 0,
            Some(TOP) => 1,
            Some(i) => layers - i + 1,
        };
        let mut out: Vec<StatusExtent> = Vec::with_capacity(runs.len());
        for r in runs {
            let flags = if context == DEPTH_CONTEXT {
                depth_of(r.layer)
            } else {
                match r.kind {
                    RunKind::Data => 0,
                    RunKind::Zero => NBD_STATE_ZERO,
                    RunKind::Hole => NBD_STATE_HOLE | NBD_STATE_ZERO,
                }
            };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += r.length,
                _ => out.push(StatusExtent { length: r.length, flags }),
            }
        }
        Ok(out)
    }
}
