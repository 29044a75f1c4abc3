//! The OCI distribution client against a real registry (Debian's `docker-registry`): push and
//! pull, lazy pull with verified on-demand blocks, tampering, outages, basic auth, the
//! bearer-token flow (through a small token-checking proxy in front of the registry), and
//! cross-repository mounts (accepted, declined, refused).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use mcow_engine::{CreateOptions, Disk, FetchPolicy, OpenOptions};
use mcow_format::{Digest, HEADER_FIELDS_LEN, HEADER_SIZE, TRAILER_SIZE};
use mcow_remote::http_client::HttpConfig;
use mcow_remote::registry::{Credentials, Registry};
use mcow_remote::retry::RetryPolicy;
use mcow_remote::transfer::{self, RemoteSource};
use mcow_remote::{RangeRead, Reference, Remote, RemoteError};

fn reference(text: &str) -> Reference {
    Reference::parse(text).unwrap()
}

fn ro() -> OpenOptions {
    OpenOptions { read_only: true, verify: true, force_share: true }
}

fn pull(r: &Reference, dir: &Path, lazy: bool) -> transfer::PullReport {
    transfer::pull(r, &dir.join("disk"), &dir.join("layers"), lazy, &mut |_, _| {}).unwrap()
}

#[test]
fn push_pull_roundtrip_and_dedup() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/disk:v1", reg.host()));

    let mut last = 0;
    let rep = transfer::push(&disk, &r, &mut |done, _| last = done).unwrap();
    assert_eq!((rep.layers, rep.uploaded), (3, 3));
    let total: u64 = layers(&disk).iter().map(|l| l.1).sum();
    assert_eq!((rep.bytes_uploaded, last), (total, total));

    let again = transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    assert_eq!(again.uploaded, 0);
    assert_eq!(again.manifest_digest, rep.manifest_digest);

    let rep2 = pull(&r, &t.path().join("b"), false);
    assert_eq!((rep2.layers, rep2.bytes_fetched, rep2.manifest_digest), (3, total, rep.manifest_digest));
    let got = read_all(&Disk::open(&t.path().join("b/disk"), ro()).unwrap());
    assert!(got == bytes, "pulled disk differs");

    // By digest too.
    let pinned = reference(&format!("oci://{}/mcow/disk@{}", reg.host(), rep.manifest_digest));
    pull(&pinned, &t.path().join("c"), false);
    assert!(read_all(&Disk::open(&t.path().join("c/disk"), ro()).unwrap()) == bytes);

    // A second image on the same base: only its new layer goes up.
    let base = layers(&disk)[0].0;
    let disk2 = t.path().join("a/disk2");
    Disk::create(
        &disk2,
        &CreateOptions {
            virtual_size: SIZE,
            block_size: BS as u32,
            store: t.path().join("a/layers"),
            layers: vec![base],
        },
    )
    .unwrap();
    add_layer(&disk2, 7);
    let r2 = reference(&format!("oci://{}/mcow/disk:v2", reg.host()));
    let rep3 = transfer::push(&disk2, &r2, &mut |_, _| {}).unwrap();
    assert_eq!((rep3.layers, rep3.uploaded), (2, 1));
    let want = read_all(&Disk::open(&disk2, ro()).unwrap());
    pull(&r2, &t.path().join("d"), false);
    assert!(read_all(&Disk::open(&t.path().join("d/disk"), ro()).unwrap()) == want);

    // Missing things are NotFound.
    let missing = reference(&format!("oci://{}/mcow/disk:nope", reg.host()));
    let e =
        transfer::pull(&missing, &t.path().join("e/disk"), &t.path().join("e/layers"), false, &mut |_, _| {})
            .unwrap_err();
    assert!(matches!(e, RemoteError::NotFound { .. }), "{e}");
    let remote = Registry::new(&reg.base_url(), "mcow/disk");
    remote.ping().unwrap();
    assert!(!remote.has_blob(&Digest::of(b"nothing")).unwrap());
    assert!(matches!(remote.get_blob(&Digest::of(b"nothing")), Err(RemoteError::NotFound { .. })));
    // Small blobs and ranges through the trait.
    let d = Digest::of(b"hello registry");
    remote.put_blob_bytes(&d, b"hello registry").unwrap();
    assert_eq!(remote.get_blob(&d).unwrap(), b"hello registry");
    assert_eq!(remote.get_range(&d, 6, 8).unwrap(), b"registry");
    assert!(remote.get_range(&d, 20, 4).is_err());
    // Several ranges in one request (the registry answers multipart/byteranges).
    let ranges = [(0, 5), (6, 3), (11, 3)];
    let mut got = vec![Vec::new(); 3];
    let requests = remote.stream_ranges(&d, &ranges, &mut |i, p| {
        got[i].extend_from_slice(p);
        true
    });
    assert_eq!(requests.unwrap(), 1, "one request for three ranges");
    assert_eq!(got, [b"hello".to_vec(), b"reg".to_vec(), b"try".to_vec()]);
}

fn compressed() -> transfer::PushOptions<'static> {
    transfer::PushOptions { trace: None, compress: Some(mcow_format::DEFAULT_LEVEL) }
}

/// Tried: a 3-layer disk (half text, half noise) pushed compressed to docker-registry, pushed
/// again, pulled in full into a fresh store and again into that store, and the pulled disk
/// pushed uncompressed beside the source pushed uncompressed. Must hold: the push uploads
/// every layer as a `+zstd` blob, fewer bytes than the layers, and reports the layers' and the
/// blobs' sizes; the second push uploads nothing (the blobs are found: the encoding is
/// deterministic) and gives the same manifest; the pull fetches the blobs' bytes, makes the
/// source's layers (same digests, lengths, bytes) and keeps nothing else (no blob, no
/// temporary); a second pull fetches nothing; and a disk made from compressed blobs pushes
/// as its layers, giving the source's uncompressed image.
#[test]
fn compressed_push_pull_roundtrip_and_dedup() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_compressible_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/z:v1", reg.host()));
    let total: u64 = layers(&disk).iter().map(|l| l.1).sum();

    let mut last = 0;
    let rep = transfer::push_with(&disk, &r, &compressed(), &mut |done, _| last = done).unwrap();
    assert_eq!((rep.layers, rep.uploaded, rep.compressed), (3, 3, Some(mcow_format::DEFAULT_LEVEL)));
    assert_eq!((rep.layer_bytes, last), (total, total));
    assert_eq!(rep.bytes_uploaded, rep.blob_bytes);
    assert!(rep.bytes_uploaded < total * 3 / 4, "uploaded {} for layers of {total}", rep.bytes_uploaded);
    let remote = Registry::new(&reg.base_url(), "mcow/z");
    check_compressed_image(&remote, &r, &disk);

    let again = transfer::push_with(&disk, &r, &compressed(), &mut |_, _| {}).unwrap();
    assert_eq!((again.uploaded, again.bytes_uploaded), (0, 0));
    assert_eq!(again.manifest_digest, rep.manifest_digest);

    let full = pull(&r, &t.path().join("b"), false);
    assert_eq!((full.layers, full.bytes_fetched, full.layers_local), (3, rep.blob_bytes, 0));
    assert_eq!(layers(&t.path().join("b/disk")), layers(&disk));
    assert!(read_all(&Disk::open(&t.path().join("b/disk"), ro()).unwrap()) == bytes, "pulled disk differs");
    let mut want: Vec<String> = layers(&disk).iter().map(|l| l.0.hex()).collect();
    want.sort();
    assert_eq!(store_contents(&t.path().join("b/layers")), (want, true));
    let twice =
        transfer::pull(&r, &t.path().join("b/disk2"), &t.path().join("b/layers"), false, &mut |_, _| {})
            .unwrap();
    assert_eq!((twice.layers_local, twice.bytes_fetched), (3, 0));

    let src =
        transfer::push(&disk, &reference(&format!("oci://{}/mcow/z:plain", reg.host())), &mut |_, _| {})
            .unwrap();
    let pulled = reference(&format!("oci://{}/mcow/z:again", reg.host()));
    let rep2 = transfer::push(&t.path().join("b/disk"), &pulled, &mut |_, _| {}).unwrap();
    assert_eq!((rep2.manifest_digest, rep2.uploaded), (src.manifest_digest, 0));
}

/// A hostile registry's versions of a compressed image, each republished consistently (blob
/// under its new digest, config and manifest naming it): a config whose frame table digest for
/// the bottom layer is not its blob's table's, and a bottom layer blob with one byte of a zstd
/// frame flipped. Must hold: each full pull fails with an error that names the layer and what
/// failed (the frame table; the frame of a block, or the rebuilt layer's digest), makes no
/// disk, and leaves the store without layers and without temporaries. Lazily, the first fails
/// the pull with no partial copy or frame table left; with the second, the read of the flipped
/// block fails (an I/O error, or its checksum) and another block of that layer reads right.
#[test]
fn hostile_compressed_blobs_fail_the_full_pull_and_leave_nothing() {
    use mcow_format::{BlobLayout, FrameTable};
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_compressible_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/h:v1", reg.host()));
    transfer::push_with(&disk, &r, &compressed(), &mut |_, _| {}).unwrap();
    let remote = Registry::new(&reg.base_url(), "mcow/h");
    let image = transfer::fetch_image(&remote, &r).unwrap();
    let republish = |tag: &str, config: &mcow_remote::image::DiskConfig| {
        let bytes = config.to_bytes();
        let mut m = image.manifest.clone();
        (m.config.digest, m.config.size) = (Digest::of(&bytes), bytes.len() as u64);
        remote.put_blob_bytes(&m.config.digest, &bytes).unwrap();
        for (d, rec) in m.layers.iter_mut().zip(&config.layers) {
            (d.digest, d.size) = (rec.digest, rec.size);
        }
        remote.put_manifest(tag, &m.to_bytes()).unwrap();
        reference(&format!("oci://{}/mcow/h:{tag}", reg.host()))
    };
    let bottom = image.config.layers[0].clone();
    let c = bottom.compressed().unwrap();

    let mut other_table = image.config.clone();
    other_table.layers[0].frame_table_digest = Some(Digest::of(b"another table"));

    let blob = remote.get_blob(&bottom.digest).unwrap();
    let layout = BlobLayout::new(BS as u32, c.diff_size, c.tail_len, bottom.size).unwrap();
    let table_bytes = &blob[layout.table_offset() as usize..layout.blob_tail_offset() as usize];
    let table = FrameTable::decode(table_bytes, layout.block_count, BS as u32).unwrap();
    let p = (0..layout.block_count).find(|&p| table.span(p, 1).1 < BS).expect("a zstd frame");
    let (at, len) = table.span(p, 1);
    let mut bad = blob.clone();
    bad[(at + len / 2) as usize] ^= 0x21;
    let bad_digest = Digest::of(&bad);
    remote.put_blob_bytes(&bad_digest, &bad).unwrap();
    let mut flipped = image.config.clone();
    flipped.layers[0].digest = bad_digest;

    for (n, (config, says)) in [
        (other_table, &["frame table hashes to"][..]),
        (flipped, &["frame of block", "rebuilt from it hashes"][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let r = republish(&format!("bad{n}"), &config);
        let dir = t.path().join(format!("p{n}"));
        let e =
            transfer::pull(&r, &dir.join("disk"), &dir.join("layers"), false, &mut |_, _| {}).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&c.diff_id.to_string()), "case {n}: {msg}");
        assert!(says.iter().any(|s| msg.contains(s)), "case {n}: {msg}");
        assert!(!dir.join("disk/disk.json").exists(), "case {n}: a disk was made");
        assert_eq!(store_contents(&dir.join("layers")), (vec![], true), "case {n}: the store kept something");
    }

    // Lazily: the other frame table fails the pull and leaves no partial copy; the flipped
    // frame is found only when its block is read (that read fails, the others do not).
    let lazy = t.path().join("lazy0");
    let r0 = reference(&format!("oci://{}/mcow/h:bad0", reg.host()));
    let e = transfer::pull(&r0, &lazy.join("disk"), &lazy.join("layers"), true, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("frame table"), "{e}");
    let store = mcow_engine::store::LayerStore::new(lazy.join("layers"));
    assert!(!store.partial_path(&c.diff_id).exists() && !store.frames_path(&c.diff_id).exists());
    assert!(!lazy.join("disk/disk.json").exists());
    let lazy = t.path().join("lazy1");
    pull(&reference(&format!("oci://{}/mcow/h:bad1", reg.host())), &lazy, true);
    let (d, _) = transfer::Sources::new()
        .open_lazy_disk(&mcow_engine::Engine::default(), &lazy.join("disk"), ro(), EXACT)
        .unwrap();
    let blocks = data_blocks_of(&d, 0);
    let (vb, _) = *blocks.iter().find(|b| b.1 == p).expect("the flipped block is the bottom layer's");
    let mut buf = vec![0u8; BS as usize];
    let e = d.read(vb * BS, &mut buf).unwrap_err();
    // A frame that no longer decodes fails the fetch (an I/O error); one that decodes to other
    // bytes fails the block's hash.
    let named = matches!(e, mcow_engine::Error::BlockChecksum { pblock, .. } if pblock == p);
    assert!(named || matches!(e, mcow_engine::Error::Io { .. }), "{e:?}");
    let (other, _) = *blocks.iter().find(|b| b.1 != p).unwrap();
    d.read(other * BS, &mut buf).unwrap();
    assert!(buf == bytes[(other * BS) as usize..][..BS as usize]);
}

/// Tried: the compressed image of `compressed_push_pull_roundtrip_and_dedup` pulled lazily.
/// Must hold: the pull fetches per layer the header's fields, the frame table and the tail
/// only; each partial copy is named by the layer's digest, has the layer's length, and keeps
/// the blob's frame table (`<hex>.frames`) beside it: the blob's digest and length and the
/// table that the blob holds.
#[test]
fn compressed_lazy_pull_keeps_each_blobs_frame_table() {
    use mcow_format::{BlobLayout, FramesFile};
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, _) = build_compressible_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/zl:v1", reg.host()));
    transfer::push_with(&disk, &r, &compressed(), &mut |_, _| {}).unwrap();
    let rep = pull(&r, &t.path().join("b"), true);
    let remote = Registry::new(&reg.base_url(), "mcow/zl");
    let image = transfer::fetch_image(&remote, &r).unwrap();
    let store = mcow_engine::store::LayerStore::new(t.path().join("b/layers"));
    let mut want_fetched = 0;
    for rec in &image.config.layers {
        let c = rec.compressed().unwrap();
        let layout = BlobLayout::new(BS as u32, c.diff_size, c.tail_len, rec.size).unwrap();
        want_fetched += HEADER_FIELDS_LEN as u64 + (rec.size - layout.table_offset());
        let partial = store.partial_path(&c.diff_id);
        assert_eq!(std::fs::metadata(&partial).unwrap().len(), c.diff_size);
        let frames =
            FramesFile::decode(&std::fs::read(store.frames_path(&c.diff_id)).unwrap(), BS as u32).unwrap();
        let blob = remote.get_blob(&rec.digest).unwrap();
        assert_eq!((frames.blob, frames.blob_len), (rec.digest, rec.size));
        assert_eq!(
            frames.table.encode(),
            blob[layout.table_offset() as usize..layout.blob_tail_offset() as usize]
        );
    }
    assert_eq!(rep.bytes_fetched, want_fetched);
}

/// Tried: the compressed image pulled lazily; one block of each layer read with a window of
/// one block, then everything read through the lazy source, twice. Must hold: a block costs
/// its frame (a text block's frame is a small part of the block), every byte equals the source
/// disk's, and the second open fetches nothing.
#[test]
fn compressed_lazy_pull_reads_every_byte() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_compressible_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/zr:v1", reg.host()));
    transfer::push_with(&disk, &r, &compressed(), &mut |_, _| {}).unwrap();
    pull(&r, &t.path().join("b"), true);
    let dir = t.path().join("b/disk");
    {
        // Blocks written with text (the first write of each layer, at its start).
        let (d, src) = transfer::Sources::new()
            .open_lazy_disk(&mcow_engine::Engine::default(), &dir, ro(), EXACT)
            .unwrap();
        let src = src.unwrap();
        for layer in 0..3u32 {
            let (vb, _) = data_blocks_of(&d, layer)[0];
            let before = src.stats();
            let mut buf = vec![0u8; BS as usize];
            d.read(vb * BS, &mut buf).unwrap();
            assert!(buf == bytes[(vb * BS) as usize..][..BS as usize], "layer {layer} block {vb} differs");
            let (fetched, requests) = (src.stats().0 - before.0, src.stats().1 - before.1);
            assert!(fetched > 0 && fetched < BS / 8, "layer {layer}: {fetched} bytes for a text block");
            assert_eq!(requests, 1);
        }
    }
    for round in 0..2 {
        let (d, src) = transfer::Sources::new()
            .open_lazy_disk(&mcow_engine::Engine::default(), &dir, ro(), FetchPolicy::default())
            .unwrap();
        assert!(read_all(&d) == bytes, "round {round}: the lazy disk differs");
        let (fetched, _) = src.unwrap().stats();
        if round == 1 {
            assert_eq!(fetched, 0, "everything was kept");
        }
    }
}

#[test]
fn lazy_pull_fetches_only_what_is_read_and_never_twice() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/lazy:v1", reg.host()));
    transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    let total: u64 = layers(&disk).iter().map(|l| l.1).sum();

    let rep = pull(&r, &t.path().join("b"), true);
    assert!(
        rep.bytes_fetched > 0 && rep.bytes_fetched * 20 < total,
        "lazy pull fetched {} of {total}",
        rep.bytes_fetched
    );

    let dir = t.path().join("b/disk");
    {
        // Window 1: a read of a missing block fetches that block only.
        let (d, src) = transfer::Sources::new()
            .open_lazy_disk(&mcow_engine::Engine::default(), &dir, ro(), EXACT)
            .unwrap();
        let src = src.expect("a lazy disk has a source");
        let mut blocks = Vec::new();
        for layer in 0..3 {
            blocks.extend(data_blocks_of(&d, layer).into_iter().take(2));
        }
        for &(vb, _) in &blocks {
            let mut buf = vec![0u8; 4096];
            d.read(vb * BS + 100, &mut buf).unwrap();
            assert_eq!(buf, bytes[(vb * BS + 100) as usize..][..4096]);
        }
        let (fetched, requests) = src.stats();
        assert_eq!(fetched, blocks.len() as u64 * BS, "fetched {fetched} for {} blocks", blocks.len());
        assert_eq!(requests, blocks.len() as u64);
    }
    {
        let (d, src) = transfer::Sources::new()
            .open_lazy_disk(&mcow_engine::Engine::default(), &dir, ro(), FetchPolicy::default())
            .unwrap();
        assert!(read_all(&d) == bytes, "lazy disk differs");
        let (fetched, _) = src.unwrap().stats();
        assert!(fetched > 0 && fetched <= total, "{fetched}");
    }
    let (d, src) = transfer::Sources::new()
        .open_lazy_disk(&mcow_engine::Engine::default(), &dir, ro(), FetchPolicy::default())
        .unwrap();
    assert!(read_all(&d) == bytes);
    assert_eq!(src.unwrap().stats(), (0, 0), "everything was cached");
}

#[test]
fn tampered_blocks_and_manifests_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/t:v1", reg.host()));
    let rep = transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    pull(&r, &t.path().join("b"), true);

    let (d, _src) = transfer::Sources::new()
        .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("b/disk"), ro(), EXACT)
        .unwrap();
    let top = layers(&disk)[2].0;
    let blocks = data_blocks_of(&d, 2);
    let (vb, pblock) = blocks[0];
    let blob = reg.blob_file(&top);
    let at = HEADER_SIZE as u64 + pblock * BS + 1234;
    let mut data = std::fs::read(&blob).unwrap();
    data[at as usize] ^= 0x55;
    std::fs::write(&blob, &data).unwrap();

    let mut buf = vec![0u8; 4096];
    let e = d.read(vb * BS, &mut buf).unwrap_err();
    assert!(e.to_string().contains("checksum") || e.to_string().contains("hash"), "{e}");
    // Other blocks still read fine.
    let (other, _) = blocks[blocks.len() - 1];
    d.read(other * BS, &mut buf).unwrap();
    assert_eq!(buf, bytes[(other * BS) as usize..][..4096]);
    // Nothing bad was cached: with the byte restored, the block reads right.
    data[at as usize] ^= 0x55;
    std::fs::write(&blob, &data).unwrap();
    d.read(vb * BS, &mut buf).unwrap();
    assert_eq!(buf, bytes[(vb * BS) as usize..][..4096]);

    // A manifest changed in storage is refused when pinned by digest.
    let mfile = reg.blob_file(&rep.manifest_digest);
    let text = std::fs::read_to_string(&mfile).unwrap();
    // Still a valid manifest to the registry, but other bytes: one hex digit of an annotation.
    let key = "index-digest\":\"sha256:";
    let at = text.find(key).unwrap() + key.len();
    let flipped = if &text[at..at + 1] == "0" { "1" } else { "0" };
    let bad = format!("{}{flipped}{}", &text[..at], &text[at + 1..]);
    assert_ne!(text, bad);
    std::fs::write(&mfile, bad).unwrap();
    let pinned = reference(&format!("oci://{}/mcow/t@{}", reg.host(), rep.manifest_digest));
    let e =
        transfer::pull(&pinned, &t.path().join("c/disk"), &t.path().join("c/layers"), true, &mut |_, _| {})
            .unwrap_err();
    assert!(matches!(e, RemoteError::DigestMismatch { .. }), "unexpected error for a tampered manifest: {e}");
    assert!(!t.path().join("c/disk/disk.json").exists());
}

/// A lazy pull fetches only the header's fields (the rest of a valid header is zero) and
/// rebuilds the header, checked against its digest in the config. Tried: a byte of a field
/// changed in the registry's copy of the base layer, then (restored) a byte of the zero padding.
/// Must hold: the first pull is refused with a digest mismatch and leaves no disk; the second
/// succeeds (the padding is never fetched), the partial layer's header is byte for byte the
/// original's, and the disk reads right.
#[test]
fn lazy_pull_rebuilds_the_header_from_its_fields() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/h:v1", reg.host()));
    transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    let (base, _) = layers(&disk)[0];
    let original = std::fs::read(reg.blob_file(&base)).unwrap();
    let blob = reg.blob_file(&base);

    let mut bad = original.clone();
    bad[40] ^= 1; // the virtual size field
    std::fs::write(&blob, &bad).unwrap();
    let e = transfer::pull(&r, &t.path().join("b/disk"), &t.path().join("b/layers"), true, &mut |_, _| {})
        .unwrap_err();
    assert!(matches!(&e, RemoteError::DigestMismatch { what, .. } if what.contains("header")), "{e}");
    assert!(!t.path().join("b/disk/disk.json").exists());

    let mut padded = original.clone();
    padded[2000] = 0xff; // zero padding: never fetched
    std::fs::write(&blob, &padded).unwrap();
    let rep = pull(&r, &t.path().join("c"), true);
    let partial = mcow_engine::store::LayerStore::new(t.path().join("c/layers")).partial_path(&base);
    assert!(std::fs::read(&partial).unwrap()[..HEADER_SIZE] == original[..HEADER_SIZE]);
    let (d, _) = transfer::Sources::new()
        .open_lazy_disk(&mcow_engine::Engine::default(), &t.path().join("c/disk"), ro(), EXACT)
        .unwrap();
    assert!(read_all(&d) == bytes, "lazy disk differs");
    // Per layer: the header's fields and the tail (extent index, hash table, trailer).
    let d = Disk::open(&disk, OpenOptions { read_only: true, verify: false, force_share: true }).unwrap();
    let tails: u64 = d.stack().layers().iter().map(|l| l.trailer.index_len() + TRAILER_SIZE as u64).sum();
    assert_eq!(rep.bytes_fetched, 3 * HEADER_FIELDS_LEN as u64 + tails);
}

#[test]
fn outage_fails_reads_after_bounded_retries_then_recovers() {
    let t = tempfile::tempdir().unwrap();
    let mut reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let r = reference(&format!("oci://{}/mcow/f:v1", reg.host()));
    transfer::push(&disk, &r, &mut |_, _| {}).unwrap();
    pull(&r, &t.path().join("b"), true);

    let config = HttpConfig {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        pace: HttpConfig::default().pace,
        retry: RetryPolicy {
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            deadline: Duration::from_millis(300),
        },
    };
    let remote = Arc::new(Registry::with_config(&reg.base_url(), "mcow/f", config, None));
    let src = Arc::new(RemoteSource::new(remote));
    let d = Disk::open_with_source(&t.path().join("b/disk"), ro(), src.clone(), EXACT).unwrap();
    let blocks: Vec<u64> =
        (0..3).flat_map(|l| data_blocks_of(&d, l).into_iter().take(2)).map(|b| b.0).collect();
    // One read while it is up, so the agent has a pooled connection to lose.
    let mut buf = vec![0u8; 4096];
    d.read(blocks[0] * BS, &mut buf).unwrap();

    reg.stop();
    for &vb in &blocks[1..] {
        let start = Instant::now();
        let e = d.read(vb * BS, &mut buf).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "bounded retries took {:?}", start.elapsed());
        assert!(matches!(e, mcow_engine::Error::Io { .. }), "expected an I/O error, got {e:?}");
    }

    reg.restart();
    for &vb in &blocks {
        d.read(vb * BS, &mut buf).unwrap();
        assert_eq!(buf, bytes[(vb * BS) as usize..][..4096]);
    }
    assert!(read_all(&d) == bytes);
}

fn htpasswd(dir: &Path, user: &str, password: &str) -> std::path::PathBuf {
    require("htpasswd", "apache2-utils");
    let out = {
        let _g = fork_lock();
        std::process::Command::new("htpasswd").args(["-Bbn", user, password]).output().unwrap()
    };
    assert!(out.status.success(), "htpasswd: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("htpasswd");
    std::fs::write(&p, out.stdout).unwrap();
    p
}

/// Runs this test binary's test `name` in a child process with `envs` (environment variables
/// cannot be set safely in a multi-threaded test process).
fn run_child(name: &str, envs: &[(&str, &str)]) {
    let child = {
        let _g = fork_lock();
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env("MCOW_TEST_CHILD", "1")
            .envs(envs.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "child {name} failed:\n{text}");
}

#[test]
fn basic_auth() {
    let t = tempfile::tempdir().unwrap();
    let pw = htpasswd(&t.path().join("auth"), "alice", "s3cret pass");
    let reg = RegistryServer::start(&t.path().join("reg"), Some(&pw));
    let (disk, bytes) = build_disk(&t.path().join("a"));

    // Credentials from MCOW_REGISTRY_USER / MCOW_REGISTRY_PASSWORD (in a child process).
    let disk_s = disk.to_str().unwrap().to_string();
    let work = t.path().join("child");
    let work_s = work.to_str().unwrap().to_string();
    let url = format!("oci://{}/mcow/auth:v1", reg.host());
    run_child(
        "auth_child",
        &[
            ("MCOW_REGISTRY_USER", "alice"),
            ("MCOW_REGISTRY_PASSWORD", "s3cret pass"),
            ("T_DISK", &disk_s),
            ("T_WORK", &work_s),
            ("T_REF", &url),
        ],
    );
    assert!(read_all(&Disk::open(&work.join("full/disk"), ro()).unwrap()) == bytes);
    // The child read the lazy disk whole: every block is local now, no credentials needed.
    let (lazy, src) = transfer::Sources::new()
        .open_lazy_disk(
            &mcow_engine::Engine::default(),
            &work.join("lazy/disk"),
            ro(),
            FetchPolicy::default(),
        )
        .unwrap();
    assert!(read_all(&lazy) == bytes);
    assert_eq!(src.unwrap().stats(), (0, 0));

    // Without or with wrong credentials: a clear 401.
    let d = layers(&disk)[0].0;
    for creds in [None, Some(Credentials { user: "alice".into(), password: "wrong".into() })] {
        let bad = Registry::with_config(&reg.base_url(), "mcow/auth", HttpConfig::default(), creds.clone());
        let e = bad.has_blob(&d).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, RemoteError::Http { status: 401, .. }), "{msg}");
        assert!(msg.contains("MCOW_REGISTRY_USER"), "{msg}");
        assert!(creds.is_none() || msg.contains("alice"), "{msg}");
    }
    let good = Registry::with_config(
        &reg.base_url(),
        "mcow/auth",
        HttpConfig::default(),
        Some(Credentials { user: "alice".into(), password: "s3cret pass".into() }),
    );
    assert!(good.has_blob(&d).unwrap());
}

/// The child half of `basic_auth` and `bearer_token_flow_through_a_token_proxy`: push, pull and lazy pull with credentials from the
/// environment only. Does nothing unless started by `run_child`.
#[test]
fn auth_child() {
    if std::env::var("MCOW_TEST_CHILD").is_err() {
        return;
    }
    let var = |k: &str| std::env::var(k).unwrap();
    let r = reference(&var("T_REF"));
    let disk = std::path::PathBuf::from(var("T_DISK"));
    let work = std::path::PathBuf::from(var("T_WORK"));
    assert_eq!(transfer::push(&disk, &r, &mut |_, _| {}).unwrap().uploaded, 3);
    pull(&r, &work.join("full"), false);
    pull(&r, &work.join("lazy"), true);
    let (d, _) = transfer::Sources::new()
        .open_lazy_disk(
            &mcow_engine::Engine::default(),
            &work.join("lazy/disk"),
            ro(),
            FetchPolicy::default(),
        )
        .unwrap();
    read_all(&d);
}

/// A token-auth front for a registry: answers `/token` (checking basic credentials) with a
/// bearer token, refuses other requests without that token (401 + a Bearer challenge), and
/// forwards the rest to the registry, one request per connection.
struct TokenProxy {
    port: u16,
    tokens_issued: Arc<AtomicUsize>,
    challenges: Arc<AtomicUsize>,
    /// When set, mount requests (`POST …/blobs/uploads/?mount=…`) are refused with 403, as a
    /// registry refuses a token without the right to read the other repository.
    deny_mounts: Arc<AtomicBool>,
}

const TOKEN: &str = "tok-4f9a";

impl TokenProxy {
    fn start(upstream: u16, user: &'static str, password: &'static str) -> TokenProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let tokens_issued = Arc::new(AtomicUsize::new(0));
        let challenges = Arc::new(AtomicUsize::new(0));
        let deny_mounts = Arc::new(AtomicBool::new(false));
        let (ti, ch, dm) = (tokens_issued.clone(), challenges.clone(), deny_mounts.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (ti, ch, dm) = (ti.clone(), ch.clone(), dm.clone());
                std::thread::spawn(move || {
                    let _ = proxy_one(conn, upstream, port, (user, password), &ti, &ch, &dm);
                });
            }
        });
        TokenProxy { port, tokens_issued, challenges, deny_mounts }
    }
}

fn respond(mut c: &TcpStream, status: &str, extra: &str, body: &str) -> std::io::Result<()> {
    write!(c, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}", body.len())
}

fn proxy_one(
    client: TcpStream,
    upstream: u16,
    port: u16,
    (user, password): (&str, &str),
    tokens: &AtomicUsize,
    challenges: &AtomicUsize,
    deny_mounts: &AtomicBool,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(client.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = Vec::new();
    let (mut auth, mut len) = (String::new(), 0usize);
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end().to_string();
        if h.is_empty() {
            break;
        }
        let (k, v) = h
            .split_once(':')
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .unwrap_or_default();
        match k.as_str() {
            "authorization" => auth = v,
            "content-length" => len = v.parse().unwrap_or(0),
            "connection" => {}
            _ => headers.push(h),
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    if target.starts_with("/token") {
        let want = format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{user}:{password}"))
        );
        if auth != want || !target.contains("scope=repository%3Amcow%2Fbearer%3A") {
            return respond(&client, "401 Unauthorized", "", "{\"details\":\"bad credentials\"}");
        }
        tokens.fetch_add(1, Ordering::Relaxed);
        return respond(
            &client,
            "200 OK",
            "Content-Type: application/json\r\n",
            &format!("{{\"token\":\"{TOKEN}\"}}"),
        );
    }
    if auth != format!("Bearer {TOKEN}") {
        challenges.fetch_add(1, Ordering::Relaxed);
        let scope = if line.starts_with("GET") || line.starts_with("HEAD") { "pull" } else { "pull,push" };
        let challenge = format!(
            "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:mcow/bearer:{scope}\"\r\n"
        );
        return respond(&client, "401 Unauthorized", &challenge, "");
    }
    if deny_mounts.load(Ordering::Relaxed) && line.starts_with("POST") && target.contains("mount=") {
        return respond(&client, "403 Forbidden", "", "{\"errors\":[{\"code\":\"DENIED\"}]}");
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut head = line;
    for h in headers {
        head.push_str(&h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {len}\r\nConnection: close\r\n\r\n"));
    up.write_all(head.as_bytes())?;
    up.write_all(&body)?;
    let mut c = client;
    std::io::copy(&mut up, &mut c)?;
    c.flush()
}

#[test]
fn bearer_token_flow_through_a_token_proxy() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let proxy = TokenProxy::start(reg.port, "bob", "hunter2");
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let base = format!("http://127.0.0.1:{}", proxy.port);

    // The whole push / pull / lazy pull, credentials from the environment (child process).
    let work = t.path().join("child");
    run_child(
        "auth_child",
        &[
            ("MCOW_REGISTRY_USER", "bob"),
            ("MCOW_REGISTRY_PASSWORD", "hunter2"),
            ("T_DISK", disk.to_str().unwrap()),
            ("T_WORK", work.to_str().unwrap()),
            ("T_REF", &format!("oci://127.0.0.1:{}/mcow/bearer:v1", proxy.port)),
        ],
    );
    assert!(read_all(&Disk::open(&work.join("full/disk"), ro()).unwrap()) == bytes);
    let after_child = proxy.tokens_issued.load(Ordering::Relaxed);
    assert!(after_child >= 1 && proxy.challenges.load(Ordering::Relaxed) >= 1);

    // The blob calls one by one, with one client: one token serves them all.
    let creds = Some(Credentials { user: "bob".into(), password: "hunter2".into() });
    let remote = Registry::with_config(&base, "mcow/bearer", HttpConfig::default(), creds);
    remote.ping().unwrap();
    let opened = Disk::open(&disk, ro()).unwrap();
    for layer in opened.stack().layers() {
        let (d, f) = (layer.digest, layer.path.clone());
        remote.put_blob(&d, &f, &mut |_| {}).unwrap();
        assert!(remote.has_blob(&d).unwrap());
        let whole = std::fs::read(&f).unwrap();
        assert_eq!(remote.get_range(&d, 4096, 65536).unwrap(), whole[4096..4096 + 65536]);
        let out = t.path().join("dl");
        remote.get_blob_to(&d, &out, &mut |_| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == whole);
    }
    let issued = proxy.tokens_issued.load(Ordering::Relaxed) - after_child;
    assert!((1..=2).contains(&issued), "tokens fetched: {issued}");

    // Wrong credentials: the token server refuses them, clearly.
    let bad = Registry::with_config(
        &base,
        "mcow/bearer",
        HttpConfig::default(),
        Some(Credentials { user: "bob".into(), password: "nope".into() }),
    );
    let e = bad.has_blob(&layers(&disk)[0].0).unwrap_err();
    assert!(matches!(e, RemoteError::Http { status: 401, .. }) && e.to_string().contains("bob"), "{e}");
}

/// Tried: blobs put into repository mcow/x directly, then asked for as mounts from mcow/x into
/// mcow/bearer through the token-auth front, which first refuses mount requests (403) and then
/// forwards them; then a mount from a repository that lacks the blob, and one from two
/// repositories of which only the second has it. Must hold: a refused mount request still gets
/// the blob uploaded (`None`) and the registry has it; a forwarded one is mounted from mcow/x
/// (the registry links it: `Some`); a mount the registry declines (202) uploads the blob in the
/// session it opened; with two candidates the first's session is given up and the second
/// mounts; every blob reads back as put.
#[test]
fn mounts_through_token_auth_and_refused_mounts_upload() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let proxy = TokenProxy::start(reg.port, "bob", "hunter2");
    let direct = Registry::new(&reg.base_url(), "mcow/x");
    let creds = Some(Credentials { user: "bob".into(), password: "hunter2".into() });
    let via = Registry::with_config(
        &format!("http://127.0.0.1:{}", proxy.port),
        "mcow/bearer",
        HttpConfig::default(),
        creds,
    );
    let blob = |n: u8| (0..100_000u32).map(|i| (i as u8) ^ n).collect::<Vec<u8>>();
    let from = ["mcow/x".to_string()];

    proxy.deny_mounts.store(true, Ordering::Relaxed);
    let b1 = blob(1);
    let d1 = Digest::of(&b1);
    direct.put_blob_bytes(&d1, &b1).unwrap();
    assert_eq!(via.mount_or_put_blob_bytes(&d1, &b1, &from).unwrap(), None, "a refused mount uploads");
    assert_eq!(via.get_blob(&d1).unwrap(), b1);

    proxy.deny_mounts.store(false, Ordering::Relaxed);
    let b2 = blob(2);
    let d2 = Digest::of(&b2);
    direct.put_blob_bytes(&d2, &b2).unwrap();
    assert_eq!(via.mount_or_put_blob_bytes(&d2, &b2, &from).unwrap().as_deref(), Some("mcow/x"));
    assert_eq!(via.get_blob(&d2).unwrap(), b2);

    // Declined (mcow/y does not have it): uploaded in the mount's session.
    let b3 = blob(3);
    let d3 = Digest::of(&b3);
    assert_eq!(via.mount_or_put_blob_bytes(&d3, &b3, &["mcow/y".to_string()]).unwrap(), None);
    assert_eq!(via.get_blob(&d3).unwrap(), b3);
    // Two candidates: the first declines, the second mounts.
    let b4 = blob(4);
    let d4 = Digest::of(&b4);
    direct.put_blob_bytes(&d4, &b4).unwrap();
    let two = ["mcow/y".to_string(), "mcow/x".to_string()];
    assert_eq!(via.mount_or_put_blob_bytes(&d4, &b4, &two).unwrap().as_deref(), Some("mcow/x"));
    assert_eq!(via.get_blob(&d4).unwrap(), b4);
}

/// Tried: push a disk with a trace to the registry, then (1) change one byte of the trace blob
/// in the registry's storage and pull, (2) delete the trace blob (as a garbage collection or a
/// copy made without it would leave the image) and pull lazily and in full.
/// Must hold: the manifest lists the trace as its last `layers` entry (its own media type) after
/// the disk layers, and the config names the same one; a tampered trace is refused as a digest
/// mismatch before any disk is made; a missing one is no error: each pull makes the disk (whose bytes are the pushed
/// ones), reports the trace's digest as missing and writes no trace.json.
#[test]
fn the_trace_is_listed_in_the_manifest_and_a_missing_one_is_not_an_error() {
    let t = tempfile::tempdir().unwrap();
    let reg = RegistryServer::start(&t.path().join("reg"), None);
    let (disk, bytes) = build_disk(&t.path().join("a"));
    let trace = t.path().join("boot.trace");
    std::fs::write(&trace, br#"{"block_size":65536,"blocks":[3,40,10]}"#).unwrap();
    let trace_digest = Digest::of(&std::fs::read(&trace).unwrap());
    let r = reference(&format!("oci://{}/mcow/traced:v1", reg.host()));
    transfer::push_with_trace(&disk, &r, Some(&trace), &mut |_, _| {}).unwrap();

    let remote = mcow_remote::open_remote(&r).unwrap();
    let image = transfer::fetch_image(remote.as_ref(), &r).unwrap();
    let entries = &image.manifest.layers;
    assert_eq!(entries.len(), 4, "three disk layers and the trace");
    assert_eq!(entries[3].media_type, mcow_remote::image::TRACE_MEDIA_TYPE);
    assert_eq!(entries[3].digest, trace_digest);
    assert_eq!(image.manifest.disk_layers().len(), 3);
    assert_eq!(image.config.trace.as_ref(), image.manifest.trace());

    let blob = reg.blob_file(&trace_digest);
    let good = std::fs::read(&blob).unwrap();
    let mut bad = good.clone();
    bad[5] ^= 1;
    std::fs::write(&blob, &bad).unwrap();
    let e = transfer::pull(&r, &t.path().join("t/disk"), &t.path().join("t/layers"), true, &mut |_, _| {})
        .expect_err("a tampered trace is refused");
    assert!(matches!(e, RemoteError::DigestMismatch { .. }), "{e}");
    assert!(!t.path().join("t/disk").exists(), "a refused pull leaves no disk behind");

    std::fs::remove_file(&blob).unwrap();
    for (name, lazy) in [("full", false), ("lazy", true)] {
        let dir = t.path().join(name);
        let rep = pull(&r, &dir, lazy);
        assert_eq!(rep.missing_trace, Some(trace_digest), "{name}");
        assert!(!dir.join("disk").join(transfer::TRACE_FILE).exists(), "{name}");
        let (d, _) = transfer::Sources::new()
            .open_lazy_disk(&mcow_engine::Engine::default(), &dir.join("disk"), ro(), EXACT)
            .unwrap();
        assert!(read_all(&d) == bytes, "{name}: the disk's bytes differ");
    }
}
