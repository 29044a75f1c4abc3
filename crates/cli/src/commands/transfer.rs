//! `mcow push` and `mcow pull`: disk images in remote storage (`mcow-remote` does the moving;
//! this is argument parsing, progress and output).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use mcow_engine::{OpenOptions, disk};
use mcow_remote::Reference;
use serde::Serialize;

use crate::Global;
use crate::output::{OutputFormat, human_size, print_json};
use crate::paths::{Fetch, default_store, open_lazy};
use crate::progress::Progress;

/// What `push`, `pull` and `serve` accept as a reference, with the syntax in their help.
pub const REFERENCE_HELP: &str = "References: file://PATH[:TAG] (an OCI image layout in a local \
    directory), http(s)://HOST[:PORT]/PATH[:TAG] (the same layout on a web server, read-only), \
    oci://HOST[:PORT]/REPOSITORY[:TAG] (an OCI registry), s3://BUCKET[/PREFIX][:TAG] \
    (S3-compatible storage: MCOW_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY); \
    @sha256:<hex> after any of them pins the manifest. The tag defaults to `latest`. Which \
    backends are available depends on the build.";

/// Warns that `reference`'s image names a trace whose blob its remote lacks (`PullReport::
/// missing_trace`): the disk works, its blocks are just not prefetched.
pub fn warn_missing_trace(reference: &Reference, trace: &mcow_engine::Digest) {
    eprintln!(
        "mcow: warning: the trace of {reference} (blob {trace}) is missing there: \
         the disk works, but its blocks will not be prefetched"
    );
}

/// How long push and pull keep trying, in their help (through `concat!`): the defaults of
/// `mcow_remote::http_client::HttpConfig` (a test checks the numbers against them).
macro_rules! retry_help {
    () => {
        "\n\nOver HTTP (oci://, http(s)://, s3://; file:// is local), each request is retried after \
        transient failures (the remote down, 5xx and 429 answers, cut connections, short bodies, \
        bodies too slow) with jittered exponential backoff from 0.1 s doubling up to 2 s (longer if \
        a Retry-After asks), until 30 s after its first attempt plus the time its size takes at \
        256 KiB/s; only then does the verb fail. A response body must average 256 KiB/s after \
        its first 10 s, or it is abandoned and the rest asked for again; response headers that do \
        not come, or any one read or write that stalls, fail an attempt after 30 s, a connect \
        after 5 s. From the environment (milliseconds unless said): MCOW_RETRY_DEADLINE_MS \
        (30000), MCOW_HTTP_MIN_RATE (bytes/s, 262144; 0: no minimum), MCOW_HTTP_DEADLINE_MS \
        (10000), MCOW_HTTP_TIMEOUT_MS (30000), MCOW_HTTP_CONNECT_TIMEOUT_MS (5000)."
    };
}

fn parse_reference(text: &str) -> Result<Reference> {
    crate::paths::parse_reference(text)
}

/// Push a disk's sealed layers to remote storage as an image.
#[derive(Debug, clap::Args)]
#[command(long_about = concat!("Push DISK's sealed layers to REF as a disk image: each layer is uploaded unless \
    the remote already holds it (layers are named by content, so images sharing a base share its \
    blob), then the image config and manifest, tagged. Prints the manifest digest and what was \
    uploaded.\n\n\
    To an oci:// registry, a blob that another repository of the same registry holds is mounted \
    from there (a cross-repository mount: nothing is uploaded). Which repositories hold which \
    blobs is remembered in the layer store (blob-locations.json) by every push and pull through \
    a registry; a lazily pulled disk's origin is tried too.\n\n\
    DISK's writable top is NOT pushed: seal it first (`mcow seal DISK`) if its writes should be \
    part of the image; push warns when the top holds changes. Every layer must be complete \
    locally (a disk pulled with --lazy must be read in full, or pulled again without --lazy).\n\n\
    With --compress, each layer travels as a compressed blob (each stored block one zstd frame, \
    with a frame table, so lazy pulls still fetch single blocks); pulls rebuild the identical \
    layer. mcow versions before compressed blobs cannot pull such an image.\n\n\
    JSON output (--output json): an object with reference, manifest_digest, layers, uploaded, \
    mounted, bytes_uploaded, already_there, layer_bytes, blob_bytes (the image's layer blobs at the \
    remote: compressed with --compress) and compress (the level, or null).\n\n\
    Example:\n  mcow seal vm1 && mcow push vm1 file:///srv/images/vm:v1", retry_help!()))]
#[command(after_help = REFERENCE_HELP)]
pub struct PushArgs {
    /// The disk directory.
    pub disk: PathBuf,
    /// Where to push, e.g. file:///srv/images/vm:v1 or oci://registry:5000/mcow/vm:v1.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// A trace of first reads (written by `mcow trace`) to push with the image: lazy serving
    /// prefetches blocks in that order. The manifest lists it after the layers, so OCI tools
    /// (skopeo copies, registry garbage collection) keep it with the image.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Upload each layer as a compressed blob (one zstd frame per stored block) at zstd level
    /// LEVEL, 1 (fastest) to 19 (smallest); 3 if no level is given. Images pushed so cannot be
    /// pulled by mcow versions before compressed blobs.
    #[arg(
        long,
        value_name = "LEVEL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = DEFAULT_LEVEL_TEXT,
        value_parser = clap::value_parser!(i32).range(1..=19)
    )]
    pub compress: Option<i32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// `mcow_format::DEFAULT_LEVEL` as `--compress` takes it (a test checks that they agree).
const DEFAULT_LEVEL_TEXT: &str = "3";

#[derive(Debug, Serialize)]
struct PushJson {
    reference: String,
    manifest_digest: String,
    layers: usize,
    uploaded: usize,
    mounted: usize,
    bytes_uploaded: u64,
    already_there: usize,
    layer_bytes: u64,
    blob_bytes: u64,
    compress: Option<i32>,
}

pub fn run_push(a: PushArgs, g: Global) -> Result<ExitCode> {
    let reference = parse_reference(&a.reference)?;
    {
        let opts = OpenOptions { read_only: true, verify: true, force_share: true };
        let (d, _) = open_lazy(&mcow_engine::Engine::default(), &a.disk, opts, Fetch::Offline)?;
        let top = d.top().extents();
        let stored = d.top().stored_blocks();
        let marked: u64 =
            top.iter().filter(|e| e.loc.kind != mcow_format::ExtentKind::Data).map(|e| e.end - e.start).sum();
        let disk = a.disk.display();
        if stored > 0 {
            let markers = if marked > 0 {
                format!(" and zero or discard markers over {marked} blocks")
            } else {
                String::new()
            };
            eprintln!(
                "mcow: warning: the writable top of {disk} holds changes ({stored} stored blocks{markers}) \
                 that are not pushed; run `mcow seal {disk}` first to include them"
            );
        } else if marked > 0 {
            eprintln!(
                "mcow: warning: the writable top of {disk} holds no data but zero or discard markers over \
                 {marked} blocks (they make those blocks read as zeros over the sealed layers), which are \
                 not pushed; run `mcow seal {disk}` first to include them"
            );
        }
    }
    let mut progress = Progress::new(g, "pushing");
    let opts = mcow_remote::transfer::PushOptions { trace: a.trace.as_deref(), compress: a.compress };
    let report =
        mcow_remote::transfer::push_with(&a.disk, &reference, &opts, &mut |d, t| progress.update(d, t))
            .with_context(|| format!("pushing disk {} to {reference}", a.disk.display()))?;
    progress.finish();
    let already = report.layers - report.uploaded - report.mounted;
    match a.output {
        OutputFormat::Json => print_json(&PushJson {
            reference: reference.to_string(),
            manifest_digest: report.manifest_digest.to_string(),
            layers: report.layers,
            uploaded: report.uploaded,
            mounted: report.mounted,
            bytes_uploaded: report.bytes_uploaded,
            already_there: already,
            layer_bytes: report.layer_bytes,
            blob_bytes: report.blob_bytes,
            compress: report.compressed,
        })?,
        OutputFormat::Human => {
            println!("Pushed {} to {reference}", a.disk.display());
            println!("manifest: {}", report.manifest_digest);
            println!(
                "{} layer{}, {} uploaded ({}, {} bytes), {} already there{}",
                report.layers,
                if report.layers == 1 { "" } else { "s" },
                report.uploaded,
                human_size(report.bytes_uploaded),
                report.bytes_uploaded,
                already,
                if report.mounted > 0 {
                    format!(", {} mounted from other repositories of the registry", report.mounted)
                } else {
                    String::new()
                }
            );
            if let Some(level) = report.compressed {
                println!(
                    "compressed (zstd level {level}): layers {} as blobs of {} ({:.1}% of the size)",
                    human_size(report.layer_bytes),
                    human_size(report.blob_bytes),
                    100.0 * report.blob_bytes as f64 / report.layer_bytes.max(1) as f64
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// `--compress` without a level means the format's default level.
    #[test]
    fn the_default_compression_level_is_the_formats() {
        assert_eq!(super::DEFAULT_LEVEL_TEXT.parse::<i32>().unwrap(), mcow_format::DEFAULT_LEVEL);
        assert_eq!(*mcow_format::LEVELS.start(), 1);
        assert_eq!(*mcow_format::LEVELS.end(), 19);
    }

    /// The retry numbers push's and pull's help give are the HTTP backends' defaults.
    #[test]
    fn the_retry_help_says_the_real_numbers() {
        let c = mcow_remote::http_client::HttpConfig::default();
        let help = retry_help!();
        let secs = |d: std::time::Duration| format!("{} s", d.as_secs_f64());
        for want in [
            format!("from {} doubling up to {}", secs(c.retry.first_delay), secs(c.retry.max_delay)),
            format!("until {} after its first attempt", secs(c.retry.deadline)),
            format!("takes at {} KiB/s", c.pace.min_rate >> 10),
            format!("average {} KiB/s after its first {}", c.pace.min_rate >> 10, secs(c.pace.grace)),
            format!("fail an attempt after {}", secs(c.request_timeout)),
            format!("a connect after {}", secs(c.connect_timeout)),
            format!("MCOW_RETRY_DEADLINE_MS ({})", c.retry.deadline.as_millis()),
            format!("MCOW_HTTP_MIN_RATE (bytes/s, {};", c.pace.min_rate),
            format!("MCOW_HTTP_DEADLINE_MS ({})", c.pace.grace.as_millis()),
            format!("MCOW_HTTP_TIMEOUT_MS ({})", c.request_timeout.as_millis()),
            format!("MCOW_HTTP_CONNECT_TIMEOUT_MS ({})", c.connect_timeout.as_millis()),
        ] {
            let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
            let want = want.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(flat.contains(&want), "the retry help does not say {want:?}:\n{flat}");
        }
    }
}

/// Pull a disk image into a new disk.
#[derive(Debug, clap::Args)]
#[command(long_about = concat!("Create the disk directory DIR from the image at REF: its sealed layers go to the \
    layer store (--store, or `layers` beside DIR, like `mcow create`), and DIR gets an empty \
    writable top on them. Layers already in the store are not fetched again. Prints the manifest \
    digest and the bytes fetched.\n\n\
    In full (the default), every layer is downloaded and checked against its digest.\n\n\
    With --lazy, only each layer's header and index are fetched (checked against the manifest); \
    the disk records its origin in DIR/remote.json, and data blocks are fetched when first read \
    (by `mcow serve`, export, read, ...), each checked against its hash and kept in the local \
    partial copy (STORE/partial/sha256/<hex>). `mcow info` shows how much is local. For a layer \
    pushed with index chunks (one whose index is over 16 KiB), only the extent index is fetched \
    now and its block hash table later, chunk by chunk (each checked), as reads need it; the \
    chunk list is kept beside the partial copy (<hex>.chunks).\n\n\
    A layer pushed compressed (`mcow push --compress`) is downloaded as its compressed blob, \
    rebuilt into the layer and checked against the layer's digest (the blob is not kept); with \
    --lazy, the blob's frame table is fetched with the index, checked, and kept beside the \
    partial copy (<hex>.frames), and blocks are fetched as their frames.\n\n\
    JSON output (--output json): an object with reference, disk, store, manifest_digest, \
    layers, layers_local (already in the store), bytes_fetched and lazy.", retry_help!()))]
#[command(after_help = REFERENCE_HELP)]
pub struct PullArgs {
    /// The image, e.g. file:///srv/images/vm:v1.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Directory of the new disk (created; must not already hold a disk).
    pub dir: PathBuf,
    /// Fetch only layer headers and indexes now; data blocks on demand.
    #[arg(long)]
    pub lazy: bool,
    /// Layer store directory [default: DIR/../layers].
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Serialize)]
struct PullJson {
    reference: String,
    disk: String,
    store: String,
    manifest_digest: String,
    layers: usize,
    layers_local: usize,
    bytes_fetched: u64,
    lazy: bool,
}

pub fn run_pull(a: PullArgs, g: Global) -> Result<ExitCode> {
    let reference = parse_reference(&a.reference)?;
    if a.dir.join(disk::MANIFEST_FILE).exists() {
        bail!("pulling into {}: it already holds a disk", a.dir.display());
    }
    let store = match a.store {
        Some(s) => s,
        None => default_store(&a.dir)?,
    };
    let mut progress = Progress::new(g, "pulling");
    let report = mcow_remote::pull(&reference, &a.dir, &store, a.lazy, &mut |d, t| progress.update(d, t))
        .with_context(|| format!("pulling {reference} into {}", a.dir.display()))?;
    progress.finish();
    if let Some(t) = &report.missing_trace {
        warn_missing_trace(&reference, t);
    }
    match a.output {
        OutputFormat::Json => print_json(&PullJson {
            reference: reference.to_string(),
            disk: a.dir.display().to_string(),
            store: store.display().to_string(),
            manifest_digest: report.manifest_digest.to_string(),
            layers: report.layers,
            layers_local: report.layers_local,
            bytes_fetched: report.bytes_fetched,
            lazy: a.lazy,
        })?,
        OutputFormat::Human => {
            println!(
                "Pulled {reference} into {}{}",
                a.dir.display(),
                if a.lazy { " (lazily: data blocks are fetched when read)" } else { "" }
            );
            println!("manifest: {}", report.manifest_digest);
            println!(
                "{} layer{} ({} already local), {} fetched ({} bytes), store {}",
                report.layers,
                if report.layers == 1 { "" } else { "s" },
                report.layers_local,
                human_size(report.bytes_fetched),
                report.bytes_fetched,
                store.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
