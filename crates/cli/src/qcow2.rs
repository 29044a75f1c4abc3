//! Writing a qcow2 (version 3) image straight from a list of cluster runs, for `export --chain`:
//! one layer of a disk becomes one image holding exactly that layer's runs (data clusters and
//! zero clusters; every other cluster unallocated, so it reads through to the backing file).
//! `qemu-img convert` cannot make such an image: it never leaves a cluster unallocated over a
//! backing file when its source (a raw file) says the range is zeros.
//!
//! Owns: the layout (header cluster with the backing file name and format, L1 table, refcount
//! table and blocks, L2 tables, then the data clusters in virtual order, every cluster used
//! once) and writing it front to back. The cluster size is the disk's block size, so a block is
//! a cluster. Not owned: which runs a layer has (the engine's `ops::layer_content`).

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The qcow2 magic, "QFI\xfb".
const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 3 header written (no compression type field: zlib).
const HEADER_LENGTH: u32 = 104;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// L1/L2 entry flag: the cluster's refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// L2 entry flag (version 3): the cluster reads as zeros.
const ZERO: u64 = 1;
/// Refcounts are 16 bits wide (refcount_order 4), as qemu-img makes them by default.
const REFCOUNT_ORDER: u32 = 4;

/// What a run of clusters is in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Stored in the image.
    Data,
    /// Reads as zeros and hides the backing file (a zero cluster, nothing stored).
    Zero,
}

/// A run `[start, end)` of virtual clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterRun {
    pub start: u64,
    pub end: u64,
    pub kind: ClusterKind,
}

/// The image to write.
pub struct Image<'a> {
    pub virtual_size: u64,
    /// A power of two from 512 to 2 MiB.
    pub cluster_size: u32,
    /// The backing file's name as written in the image (relative names are relative to the
    /// image's directory); its format is always qcow2.
    pub backing: Option<&'a str>,
    /// In ascending order, not overlapping, within the virtual size.
    pub runs: &'a [ClusterRun],
}

/// Where each part of the image goes, in clusters.
struct Layout {
    l1_entries: u64,
    l1_clusters: u64,
    refcount_table: u64,
    refcount_table_clusters: u64,
    refcount_blocks: u64,
    /// Which L2 tables exist (the index of the L1 entry each serves), in order.
    l2_tables: Vec<u64>,
    l2_first: u64,
    data_first: u64,
    total: u64,
}

fn layout(img: &Image) -> Layout {
    let cs = u64::from(img.cluster_size);
    let clusters = img.virtual_size.div_ceil(cs);
    let per_l2 = cs / 8;
    let l1_entries = clusters.div_ceil(per_l2);
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let mut l2_tables: Vec<u64> = Vec::new();
    let mut data = 0u64;
    for r in img.runs {
        for t in r.start / per_l2..=(r.end - 1) / per_l2 {
            if l2_tables.last() != Some(&t) {
                l2_tables.push(t);
            }
        }
        if r.kind == ClusterKind::Data {
            data += r.end - r.start;
        }
    }
    let fixed = 1 + l1_clusters + l2_tables.len() as u64 + data;
    // The refcount blocks count every cluster, themselves and the refcount table included.
    let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = fixed + blocks + table;
        let b = total.div_ceil(per_block);
        let t = (b * 8).div_ceil(cs);
        if b == blocks && t == table {
            break;
        }
        (blocks, table) = (b, t);
    }
    let refcount_table = 1 + l1_clusters;
    let l2_first = refcount_table + table + blocks;
    let data_first = l2_first + l2_tables.len() as u64;
    Layout {
        l1_entries,
        l1_clusters,
        refcount_table,
        refcount_table_clusters: table,
        refcount_blocks: blocks,
        l2_tables,
        l2_first,
        data_first,
        total: data_first + data,
    }
}

/// Writes `img` to `out` (created or truncated), reading each data cluster with `read`
/// (virtual cluster, whole-cluster buffer). Calls `progress` with (data bytes written, all).
pub fn write(
    out: &Path,
    img: &Image,
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let cs = u64::from(img.cluster_size);
    if !img.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&img.cluster_size) {
        bail!("a qcow2 cluster size must be a power of two from 512 to 2 MiB, not {cs}");
    }
    let clusters = img.virtual_size.div_ceil(cs);
    let mut prev = 0;
    for r in img.runs {
        if r.start < prev || r.end <= r.start || r.end > clusters {
            bail!("cluster runs out of order or past the end ({}..{})", r.start, r.end);
        }
        prev = r.end;
    }
    let backing = img.backing.unwrap_or("");
    if backing.len() > 1023 {
        bail!("backing file name too long for qcow2: {backing}");
    }
    let l = layout(img);
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let werr = || format!("writing {}", out.display());

    // Cluster 0: header, header extensions, backing file name.
    let mut head = Vec::with_capacity(cs as usize);
    let ext_len = if img.backing.is_some() { 8 + 8 } else { 0 } + 8;
    let backing_offset = u64::from(HEADER_LENGTH) + ext_len;
    head.extend_from_slice(&MAGIC.to_be_bytes());
    head.extend_from_slice(&3u32.to_be_bytes());
    head.extend_from_slice(&(if img.backing.is_some() { backing_offset } else { 0 }).to_be_bytes());
    head.extend_from_slice(&(backing.len() as u32).to_be_bytes());
    head.extend_from_slice(&img.cluster_size.trailing_zeros().to_be_bytes());
    head.extend_from_slice(&img.virtual_size.to_be_bytes());
    head.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    head.extend_from_slice(&(l.l1_entries as u32).to_be_bytes());
    head.extend_from_slice(&cs.to_be_bytes()); // the L1 table is in cluster 1
    head.extend_from_slice(&(l.refcount_table * cs).to_be_bytes());
    head.extend_from_slice(&(l.refcount_table_clusters as u32).to_be_bytes());
    head.extend_from_slice(&0u32.to_be_bytes()); // no snapshots
    head.extend_from_slice(&0u64.to_be_bytes());
    head.extend_from_slice(&[0u8; 24]); // incompatible, compatible, autoclear features
    head.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    head.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
    debug_assert_eq!(head.len(), HEADER_LENGTH as usize);
    if img.backing.is_some() {
        head.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        head.extend_from_slice(&5u32.to_be_bytes());
        head.extend_from_slice(b"qcow2\0\0\0");
    }
    head.extend_from_slice(&[0u8; 8]); // end of the extensions
    debug_assert_eq!(head.len() as u64, backing_offset);
    head.extend_from_slice(backing.as_bytes());
    head.resize(cs as usize, 0);
    w.write_all(&head).with_context(werr)?;

    // The L1 table: each existing L2 table, refcount one.
    let mut l1 = vec![0u8; (l.l1_clusters * cs) as usize];
    for (k, &t) in l.l2_tables.iter().enumerate() {
        let entry = ((l.l2_first + k as u64) * cs) | COPIED;
        l1[t as usize * 8..t as usize * 8 + 8].copy_from_slice(&entry.to_be_bytes());
    }
    w.write_all(&l1).with_context(werr)?;

    // The refcount table and blocks: every cluster up to the end is used once.
    let mut table = vec![0u8; (l.refcount_table_clusters * cs) as usize];
    let first_block = l.refcount_table + l.refcount_table_clusters;
    for b in 0..l.refcount_blocks {
        let off = (first_block + b) * cs;
        table[b as usize * 8..b as usize * 8 + 8].copy_from_slice(&off.to_be_bytes());
    }
    w.write_all(&table).with_context(werr)?;
    let per_block = cs / 2;
    let mut block = vec![0u8; cs as usize];
    for b in 0..l.refcount_blocks {
        let used = l.total.saturating_sub(b * per_block).min(per_block);
        block.fill(0);
        for e in block.chunks_exact_mut(2).take(used as usize) {
            e.copy_from_slice(&1u16.to_be_bytes());
        }
        w.write_all(&block).with_context(werr)?;
    }

    // The L2 tables, data clusters numbered in virtual order.
    let per_l2 = cs / 8;
    let mut next_data = l.data_first;
    let mut runs = img.runs.iter().peekable();
    for &t in &l.l2_tables {
        let (first, last) = (t * per_l2, (t + 1) * per_l2);
        block.fill(0);
        while let Some(r) = runs.peek() {
            if r.start >= last {
                break;
            }
            for c in r.start.max(first)..r.end.min(last) {
                let entry = match r.kind {
                    ClusterKind::Data => {
                        next_data += 1;
                        ((next_data - 1) * cs) | COPIED
                    }
                    ClusterKind::Zero => ZERO,
                };
                let i = (c - first) as usize * 8;
                block[i..i + 8].copy_from_slice(&entry.to_be_bytes());
            }
            if r.end > last {
                break;
            }
            runs.next();
        }
        w.write_all(&block).with_context(werr)?;
    }
    debug_assert_eq!(next_data, l.total);

    // The data, in the same order.
    let total = (l.total - l.data_first) * cs;
    let mut done = 0;
    for r in img.runs.iter().filter(|r| r.kind == ClusterKind::Data) {
        for c in r.start..r.end {
            read(c, &mut block)?;
            w.write_all(&block).with_context(werr)?;
            done += cs;
            progress(done, total);
        }
    }
    let file = w.into_inner().map_err(|e| e.into_error()).with_context(werr)?;
    file.sync_all().with_context(|| format!("syncing {}", out.display()))?;
    Ok(())
}
