//! The mcow engine: layered copy-on-write disks whose reads cost one lookup at any depth.
//!
//! Modules, bottom up:
//! - `storage` / `sim`: the byte-storage trait every layer goes through, and a simulated device
//!   for crash and fault tests; `mapped`: a file written through a shared memory mapping (the
//!   writable top's pending logs);
//! - `context`: the engine context ([`Engine`]) disks are opened in: file pool, open layers,
//!   background fetch threads (`background`), instead of process-wide state;
//! - `bitmap`: the one atomic, sparse, bounds-checked bitmap for per-block flags;
//! - `extent_map`: the interval map behind depth-independent addressing;
//! - `pool` / `lock`: the bounded pool of open layer files, and byte-range (OFD) locks between
//!   processes;
//! - `chunks`: a layer's index cut into chunks with a digest each, so that a partial layer's
//!   hash table is fetched and checked piece by piece;
//! - `layer` / `store` / `temp`: sealed layers (read with verification, written canonically),
//!   the content-addressed directory that holds them, and the locked temporaries new files are
//!   written to;
//! - `blob`: a local layer encoded as the compressed blob a push uploads, and a layer rebuilt
//!   from a downloaded one;
//! - `readahead`: the pure policy that sizes a partial layer's fetches from the reads before;
//! - `fetch`: partial (lazily fetched) layers, a sealed layer plus its fetch state: where
//!   missing blocks come from and how they are fetched, checked and landed;
//! - `compressed`: the source of a partial layer pulled from a compressed blob, which fetches
//!   its blocks as the blob's zstd frames and decodes them;
//! - `cache`: one store's bounded cache of fetched blocks (`--cache-limit`): which fetched
//!   blocks of partial layers to drop, least recently used first;
//! - `reuse`: one store's index of local blocks by hash, so that a partial layer copies a block
//!   another layer holds instead of fetching it;
//! - `gc`: what of a store nothing references (`mcow gc`), the store's `gc.lock` and its
//!   registry of the layers running processes use;
//! - `stack`: sealed layers bottom to top, flattened into one map at open;
//! - `top`: the writable, crash-consistent top layer;
//! - `disk`: a stack plus its top, the byte-level read/write path front ends use;
//! - `users`: a store's `gc.lock` and registry of layers in use; `gc`: collecting what nothing
//!   uses;
//! - `build`: a sealed layer written from a map of runs (seal, commit, flatten, a snapshot);
//! - `ops`: whole-disk operations (seal, commit, flatten, import, export, check).
//!
//! It does not own the byte layouts (crate `mcow-format`) nor any front end (CLI, NBD).
//!
//! # Example
//!
//! A disk with one sealed layer, and a second disk on that layer with a top of its own:
//!
//! ```
//! use mcow_engine::{CreateOptions, Disk, OpenOptions, ops};
//!
//! # fn main() -> mcow_engine::Result<()> {
//! let dir = tempfile::tempdir().expect("a temporary directory");
//! let (base, store) = (dir.path().join("base"), dir.path().join("layers"));
//!
//! // A 16 MiB disk (64 KiB blocks) whose sealed layers go to the store `layers`.
//! Disk::create(&base, &CreateOptions::new(16 << 20, &store))?;
//! let disk = Disk::open(&base, OpenOptions::default())?;
//! disk.write(1 << 20, b"hello, layers")?;
//! disk.flush()?; // durable from here on
//! drop(disk); // sealing takes the disk's lock
//!
//! // Freeze the writable top into a sealed layer, named by its content.
//! let layer = ops::seal(&base, &mut |_done, _total| {})?;
//!
//! // Another disk on that layer: opening it flattens its stack into one map.
//! let vm = dir.path().join("vm");
//! Disk::create(&vm, &CreateOptions { layers: vec![layer], ..CreateOptions::new(16 << 20, &store) })?;
//! let disk = Disk::open(&vm, OpenOptions::default())?;
//! assert_eq!(disk.stack().depth(), 1);
//! let mut buf = [0u8; 13];
//! disk.read(1 << 20, &mut buf)?;
//! assert_eq!(&buf, b"hello, layers");
//!
//! // Its writes go to its own top; the sealed layer, shared by both disks, stays as it was.
//! disk.write(1 << 20, b"HELLO")?;
//! disk.read(1 << 20, &mut buf)?;
//! assert_eq!(&buf, b"HELLO, layers");
//! let base = Disk::open(&base, OpenOptions { read_only: true, ..OpenOptions::default() })?;
//! base.read(1 << 20, &mut buf)?;
//! assert_eq!(&buf, b"hello, layers");
//! # Ok(())
//! # }
//! ```
//!
//! Disks opened with [`Disk::open`] each get an [`Engine`] of their own; open them with
//! [`Disk::open_in`] in one engine to share open layer files and fetch threads.

#![warn(missing_docs)]

mod background;
pub mod bitmap;
pub mod blob;
mod build;
pub mod cache;
pub mod chunks;
pub mod compressed;
pub mod context;
pub mod disk;
pub mod error;
pub mod extent_map;
pub mod fetch;
pub mod gc;
pub mod layer;
pub mod lock;
pub mod mapped;
pub mod ops;
pub mod pool;
pub mod readahead;
pub mod reuse;
pub mod sim;
pub mod stack;
pub mod storage;
pub mod store;
pub mod temp;
pub mod top;
mod users;

pub use bitmap::AtomicBitmap;
pub use blob::CompressedBlob;
pub use cache::CacheStats;
pub use context::{Engine, EngineConfig};
pub use disk::{
    CreateOptions, DEFAULT_BLOCK_SIZE, Disk, FetchRest, Holder, OpenOptions, Run, RunKind, Segment, Segments,
};
pub use error::{Error, Result};
pub use extent_map::TOP;
pub use fetch::{BlockSource, FetchPolicy, Offline, PartialLayer};
pub use layer::{CacheReads, ReadTally};
pub use mcow_format::Digest;
pub use reuse::ReuseStats;
pub use store::OpenLayer;
