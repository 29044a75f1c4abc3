//! What a `[NAME=]DISK|REF` names: a disk directory, or an image reference made servable by a
//! lazy pull into a cache (reused by later serves). Owns export names given by default (a
//! directory's name, an image's repository) and the cache's layout: the disk of an image in
//! `CACHE/disks/<name>-<manifest short digest>`, its layers in `CACHE/layers`.

use std::path::{Path, PathBuf};

use mcow_remote::transfer::{LazyOrigin, ORIGIN_FILE, Sources};
use mcow_remote::{InsecureRegistries, Reference};

use crate::error::ServiceError;

/// A disk to serve: as given, and the name it is exported under unless one is given.
#[derive(Debug, Clone)]
pub enum Target {
    /// A disk directory.
    Dir(PathBuf),
    /// An image, pulled lazily into the cache.
    Image(Reference),
}

impl Target {
    /// Parses `DISK|REF` (no `NAME=`): a reference if it looks like one (`file://`, `oci://`,
    /// `http(s)://`, `s3://`), else a directory.
    pub fn parse(text: &str, insecure: &InsecureRegistries) -> Result<Target, ServiceError> {
        if Reference::looks_like(text) {
            let r = Reference::parse_with(text, insecure).map_err(|e| ServiceError::Remote {
                what: format!("parsing {text:?}"),
                source: Box::new(e),
            })?;
            Ok(Target::Image(r))
        } else {
            Ok(Target::Dir(PathBuf::from(text)))
        }
    }

    /// The export name used when none is given: the directory's name, or the last path
    /// component of the image's repository.
    pub fn default_name(&self) -> String {
        match self {
            Target::Dir(d) => dir_name(d),
            Target::Image(r) => image_name(r),
        }
    }
}

/// Splits `[NAME=]DISK|REF` into the name given (if any) and the disk or reference. A
/// reference is never split at its own `=` (an S3 prefix may hold one).
pub fn split_name(spec: &str) -> (Option<&str>, &str) {
    if Reference::looks_like(spec) {
        return (None, spec);
    }
    match spec.split_once('=') {
        Some((n, d)) => (Some(n), d),
        None => (None, spec),
    }
}

fn dir_name(dir: &Path) -> String {
    let full = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    full.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The export name of an image: the last path component of its repository (the reference
/// without scheme, tag and digest), cleaned for names.
pub fn image_name(reference: &Reference) -> String {
    let text = reference.to_string();
    let text = text.split_once('@').map_or(text.as_str(), |(t, _)| t);
    let text = text.strip_suffix(&format!(":{}", reference.tag)).unwrap_or(text);
    let body = text.split_once("://").map_or(text, |(_, b)| b);
    let raw = body.rsplit('/').find(|s| !s.is_empty()).unwrap_or("image");
    let clean: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if clean.starts_with('.') { format!("image{clean}") } else { clean }
}

/// A disk directory ready to open, and what making it cost.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The disk directory.
    pub dir: PathBuf,
    /// Bytes the lazy pull fetched (manifest, config, layer headers and indexes); 0 for a
    /// directory or a disk the cache already held.
    pub pulled_bytes: u64,
    /// The trace blob the image's manifest lists but its origin lacks (the disk works, but
    /// nothing is prefetched): for the caller to warn about.
    pub missing_trace: Option<mcow_engine::Digest>,
}

/// Makes `target` servable: a directory as it is; an image from `cache` (see [`prepare_image`]).
pub fn prepare(
    target: &Target,
    cache: &Path,
    sources: &Sources,
    insecure: &InsecureRegistries,
) -> Result<Prepared, ServiceError> {
    match target {
        Target::Dir(d) => Ok(Prepared { dir: d.clone(), pulled_bytes: 0, missing_trace: None }),
        Target::Image(r) => prepare_image(r, cache, sources, insecure),
    }
}

/// Makes the image at `reference` servable from `cache`: fetches its manifest, then reuses
/// `CACHE/disks/<name>-<short digest>` if an earlier serve made it, or pulls the image lazily
/// there (pinned to the manifest just fetched, so the disk and its name agree even if the tag
/// moves). Layers go to `CACHE/layers`, where blocks fetched before are kept. The remote opened
/// here becomes the disk's source in `sources` (its connections are open already). A tag and
/// its pinned digest name the same disk.
/// `insecure` parses the pinned reference as `reference` was parsed.
pub fn prepare_image(
    reference: &Reference,
    cache: &Path,
    sources: &Sources,
    insecure: &InsecureRegistries,
) -> Result<Prepared, ServiceError> {
    let remote_err = |what: String| move |e| ServiceError::Remote { what, source: Box::new(e) };
    let remote = mcow_remote::open_remote(reference).map_err(remote_err(format!("opening {reference}")))?;
    let image = mcow_remote::transfer::fetch_image(remote.as_ref(), reference)
        .map_err(remote_err(format!("fetching the manifest of {reference}")))?;
    let digest = image.manifest_digest;
    let dir = cache.join("disks").join(format!("{}-{}", image_name(reference), digest.short()));
    // The origin a lazy pull of this reference records (pinned to the manifest).
    let pinned_text =
        if reference.digest.is_some() { reference.to_string() } else { format!("{reference}@{digest}") };
    if dir.join(mcow_engine::disk::MANIFEST_FILE).exists() {
        tracing::info!(%reference, manifest = %digest, disk = %dir.display(), "reusing the cached disk");
        if read_origin(&dir)?.is_some_and(|o| o.reference == pinned_text) {
            sources.adopt(&pinned_text, remote);
        }
        return Ok(Prepared { dir, pulled_bytes: 0, missing_trace: None });
    }
    if dir.exists() {
        // Debris of an interrupted pull (no manifest yet): nothing in it is worth keeping.
        std::fs::remove_dir_all(&dir).map_err(|source| ServiceError::Io {
            what: format!("removing the incomplete {}", dir.display()),
            source,
        })?;
    }
    let pinned = Reference::parse_with(&pinned_text, insecure)
        .map_err(remote_err("pinning the reference".to_string()))?;
    let report = mcow_remote::transfer::pull_image(
        remote.as_ref(),
        &pinned,
        &image,
        &dir,
        &cache.join("layers"),
        true,
        &mut |_, _| {},
    )
    .map_err(remote_err(format!("pulling {reference} into {}", dir.display())))?;
    tracing::info!(
        %reference, manifest = %digest, disk = %dir.display(), layers = report.layers,
        layers_local = report.layers_local, bytes_fetched = report.bytes_fetched,
        "pulled lazily into the cache"
    );
    sources.adopt(&pinned.to_string(), remote);
    Ok(Prepared { dir, pulled_bytes: report.bytes_fetched, missing_trace: report.missing_trace })
}

/// The origin of a disk pulled lazily (its `remote.json`), or `None` for any other disk.
pub fn read_origin(dir: &Path) -> Result<Option<LazyOrigin>, ServiceError> {
    let path = dir.join(ORIGIN_FILE);
    let io_err = |source| ServiceError::Io { what: format!("reading {}", path.display()), source };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let origin = serde_json::from_slice(&text)
        .map_err(|e| io_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    Ok(Some(origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_split_off_disks_but_not_references() {
        assert_eq!(split_name("vm"), (None, "vm"));
        assert_eq!(split_name("a=vm"), (Some("a"), "vm"));
        assert_eq!(split_name("a=s3://b/p=q:t"), (Some("a"), "s3://b/p=q:t"));
        assert_eq!(split_name("s3://b/p=q:t"), (None, "s3://b/p=q:t"));
    }

    #[test]
    fn image_names() {
        let name = |r: &str| image_name(&Reference::parse(r).unwrap());
        assert_eq!(name("file:///srv/images/vm:v1"), "vm");
        assert_eq!(name("file:///srv/images/vm/"), "vm");
        assert_eq!(name("oci://127.0.0.1:5000/mcow/demo:v1"), "demo");
        assert_eq!(name("s3://bucket"), "bucket");
        assert_eq!(name("http://127.0.0.1:8081/a b"), "a_b");
        let d = mcow_engine::Digest::of(b"m");
        assert_eq!(name(&format!("file://x/.hidden:t@{d}")), "image.hidden");
    }
}
