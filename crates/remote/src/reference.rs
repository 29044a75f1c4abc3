//! References to disk images in remote storage, one syntax for every backend:
//!
//! - `file://PATH[:TAG]` — an OCI image layout in a local directory (the embedded default);
//! - `http://HOST[:PORT]/PATH[:TAG]` (or `https://`) — the same layout served read-only by any
//!   web server that answers range requests;
//! - `oci://HOST[:PORT]/REPOSITORY[:TAG]` — an OCI distribution registry (plain HTTP for
//!   loopback hosts and for hosts the caller lists in [`InsecureRegistries`], HTTPS otherwise);
//! - `s3://BUCKET[/PREFIX][:TAG]` — the layout in S3-compatible object storage (endpoint from
//!   `MCOW_S3_ENDPOINT`, credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`).
//!
//! `@sha256:<hex>` after any of them pins the manifest by digest. The tag defaults to `latest`.

use std::fmt;
use std::path::PathBuf;

use mcow_format::Digest;

use crate::error::{RemoteError, Result};

/// Where the images are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    /// Base URL without a trailing slash.
    Http(String),
    /// Registry base URL (scheme, host, port) and repository name.
    Registry {
        base: String,
        repository: String,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
}

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub location: Location,
    pub tag: String,
    pub digest: Option<Digest>,
    text: String,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `host` without a trailing `:PORT`.
fn host_name(host: &str) -> &str {
    host.rsplit_once(':')
        .map_or(host, |(h, p)| if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) { h } else { host })
}

fn is_loopback(host: &str) -> bool {
    let h = host_name(host);
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

/// Registries that `oci://` reaches over plain HTTP although they are not on loopback, as
/// container runtimes' "insecure registries": an explicit choice of the user (the CLI's
/// `--insecure-registry HOST[:PORT]` and `MCOW_INSECURE_REGISTRIES`), for registries inside a
/// private network that serve no TLS. An entry with a port matches that port only; an entry
/// without one matches the host on any port. Names compare without case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsecureRegistries {
    hosts: Vec<String>,
}

impl InsecureRegistries {
    /// Adds one `HOST[:PORT]` entry (no scheme, no path).
    pub fn add(&mut self, entry: &str) -> Result<()> {
        let entry = entry.trim();
        let bad = |reason: &str| RemoteError::Reference {
            reference: entry.to_string(),
            reason: format!("an insecure registry is HOST[:PORT]: {reason}"),
        };
        if entry.is_empty() {
            return Err(bad("empty"));
        }
        if entry.contains("://") || entry.contains('/') || entry.contains('@') {
            return Err(bad("no scheme, path or digest"));
        }
        if entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("no spaces"));
        }
        self.hosts.push(entry.to_ascii_lowercase());
        Ok(())
    }

    /// Adds the entries of a comma-separated list (empty items are skipped).
    pub fn add_list(&mut self, list: &str) -> Result<()> {
        list.split(',').filter(|e| !e.trim().is_empty()).try_for_each(|e| self.add(e))
    }

    /// True if `host` (`HOST[:PORT]` as written in an `oci://` reference) is listed.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let name = host_name(&host);
        self.hosts.iter().any(|e| *e == host || (host_name(e) == e.as_str() && e == name))
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

impl Reference {
    /// Parses `text`; `oci://` uses plain HTTP for loopback hosts only.
    pub fn parse(text: &str) -> Result<Reference> {
        Reference::parse_with(text, &InsecureRegistries::default())
    }

    /// Parses `text`; `oci://` uses plain HTTP for loopback hosts and for those `insecure` lists.
    pub fn parse_with(text: &str, insecure: &InsecureRegistries) -> Result<Reference> {
        let err =
            |reason: &str| RemoteError::Reference { reference: text.to_string(), reason: reason.to_string() };
        let (rest, digest) = match text.rsplit_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|e| err(&e.to_string()))?)),
            None => (text, None),
        };
        let (scheme, body) = rest.split_once("://").ok_or_else(|| err(&no_scheme_hint(text)))?;
        if scheme == "docker" {
            return Err(err(&docker_hint(text)));
        }
        // A tag follows the last ':' when what follows has no '/'.
        let (body, tag) = match body.rsplit_once(':') {
            Some((b, t))
                if !t.contains('/')
                    && !t.is_empty()
                    && (scheme == "file" || scheme == "s3" || b.contains('/')) =>
            {
                (b, t.to_string())
            }
            _ => (body, "latest".to_string()),
        };
        if !tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) || tag.len() > 128 {
            return Err(err("a tag is up to 128 of [A-Za-z0-9._-]"));
        }
        let location = match scheme {
            "file" => {
                if body.is_empty() {
                    return Err(err("file:// needs a path"));
                }
                Location::File(PathBuf::from(body))
            }
            "http" | "https" => Location::Http(format!("{scheme}://{}", body.trim_end_matches('/'))),
            "oci" => {
                let (host, repo) =
                    body.split_once('/').ok_or_else(|| err("expected oci://HOST/REPOSITORY"))?;
                if repo.is_empty() || host.is_empty() {
                    return Err(err("expected oci://HOST/REPOSITORY"));
                }
                let scheme = if is_loopback(host) || insecure.allows(host) { "http" } else { "https" };
                Location::Registry {
                    base: format!("{scheme}://{host}"),
                    repository: repo.trim_end_matches('/').to_string(),
                }
            }
            "s3" => {
                let (bucket, prefix) = body.split_once('/').unwrap_or((body, ""));
                if bucket.is_empty() {
                    return Err(err("expected s3://BUCKET[/PREFIX]"));
                }
                Location::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() }
            }
            _ => return Err(err("unknown scheme: use file://, http://, https://, oci:// or s3://")),
        };
        Ok(Reference { location, tag, digest, text: text.to_string() })
    }

    /// True if `text` looks like a reference rather than a local path (`docker://` too, so that
    /// parsing it says what to write instead).
    pub fn looks_like(text: &str) -> bool {
        ["file://", "http://", "https://", "oci://", "s3://", "docker://"].iter().any(|s| text.starts_with(s))
    }
}

/// The reason for a reference with `docker://` (skopeo's and containers' registry transport).
fn docker_hint(text: &str) -> String {
    let body = &text["docker://".len()..];
    let first = body.split('/').next().unwrap_or_default();
    // As container tools read it: a first component with a dot or a port, or localhost, is a
    // registry host; otherwise the name is Docker Hub's.
    if body.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost") {
        format!("docker:// is skopeo's name for a registry; here it is oci://: oci://{body}")
    } else {
        "docker:// is skopeo's name for a registry; here it is oci://HOST[:PORT]/REPOSITORY[:TAG], \
         with the registry's host named"
            .to_string()
    }
}

/// The reason for a reference without `SCHEME://`, with a hint for forms other tools use.
fn no_scheme_hint(text: &str) -> String {
    let mut reason = "expected SCHEME://… (file://, http://, https://, oci:// or s3://)".to_string();
    if let Some(path) = text.strip_prefix("oci:") {
        // skopeo's `oci:PATH[:TAG]` is an image layout in a directory.
        reason
            .push_str(&format!("; skopeo's oci:PATH (an image layout in a directory) is file://{path} here"));
    } else if let Some((host, _)) = text.split_once('/')
        && (host.contains('.') || host.contains(':') || host == "localhost")
    {
        reason.push_str(&format!("; for a registry: oci://{text}"));
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_backend() {
        let r = Reference::parse("oci://127.0.0.1:5000/mcow/demo:v1").unwrap();
        assert_eq!(
            r.location,
            Location::Registry { base: "http://127.0.0.1:5000".into(), repository: "mcow/demo".into() }
        );
        assert_eq!(r.tag, "v1");
        let r = Reference::parse("oci://registry.example/a/b").unwrap();
        assert_eq!(r.tag, "latest");
        assert!(
            matches!(r.location, Location::Registry { ref base, .. } if base == "https://registry.example")
        );
        let r = Reference::parse("file:///tmp/repo:base").unwrap();
        assert_eq!((r.location, r.tag.as_str()), (Location::File("/tmp/repo".into()), "base"));
        let r = Reference::parse("http://127.0.0.1:8081/images").unwrap();
        assert_eq!(
            (r.location, r.tag.as_str()),
            (Location::Http("http://127.0.0.1:8081/images".into()), "latest")
        );
        let r = Reference::parse("s3://bucket:t").unwrap();
        assert_eq!(
            (r.location, r.tag.as_str()),
            (Location::S3 { bucket: "bucket".into(), prefix: String::new() }, "t")
        );
        let r = Reference::parse("s3://bucket/some/prefix:t").unwrap();
        assert_eq!(r.location, Location::S3 { bucket: "bucket".into(), prefix: "some/prefix".into() });
        let d = Digest::of(b"m");
        let r = Reference::parse(&format!("file://x:t@{d}")).unwrap();
        assert_eq!(r.digest, Some(d));
    }

    #[test]
    fn insecure_registries_get_plain_http() {
        let base = |r: Reference| match r.location {
            Location::Registry { base, .. } => base,
            other => panic!("{other:?}"),
        };
        let mut insecure = InsecureRegistries::default();
        insecure.add_list("10.0.0.1:5000, Registry.LAN").unwrap();
        let parse = |t: &str| base(Reference::parse_with(t, &insecure).unwrap());
        assert_eq!(parse("oci://10.0.0.1:5000/a/b:v1"), "http://10.0.0.1:5000");
        // The entry names a port: another port of that host keeps TLS.
        assert_eq!(parse("oci://10.0.0.1:5001/a/b"), "https://10.0.0.1:5001");
        assert_eq!(parse("oci://10.0.0.1/a/b"), "https://10.0.0.1");
        // An entry without a port matches every port; names compare without case.
        assert_eq!(parse("oci://registry.lan:443/a"), "http://registry.lan:443");
        assert_eq!(parse("oci://REGISTRY.lan/a"), "http://REGISTRY.lan");
        assert_eq!(parse("oci://other.lan/a"), "https://other.lan");
        // Without the list, nothing changes.
        assert_eq!(base(Reference::parse("oci://10.0.0.1:5000/a/b").unwrap()), "https://10.0.0.1:5000");
        for bad in ["http://10.0.0.1:5000", "10.0.0.1/x", "", " ", "a b"] {
            assert!(InsecureRegistries::default().add(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "nope", "ftp://x", "oci://host", "file://", "file://x:bad tag", "oci://h/r@sha256:12"]
        {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    /// Tried: the forms skopeo and docker users type. Must hold: each is refused with the
    /// reference this syntax wants instead (or what to name, for a Docker Hub short name).
    #[test]
    fn other_tools_forms_get_a_hint() {
        let reason = |t: &str| Reference::parse(t).unwrap_err().to_string();
        let r = reason("docker://127.0.0.1:5000/mcow/vm:v1");
        assert!(r.contains("here it is oci://: oci://127.0.0.1:5000/mcow/vm:v1"), "{r}");
        let r = reason("docker://ubuntu:24.04");
        assert!(r.contains("oci://HOST[:PORT]/REPOSITORY[:TAG]"), "{r}");
        assert!(Reference::looks_like("docker://x/y"));
        let r = reason("registry.lan:5000/mcow/vm:v1");
        assert!(r.contains("for a registry: oci://registry.lan:5000/mcow/vm:v1"), "{r}");
        let r = reason("oci:/srv/layout:v1");
        assert!(r.contains("is file:///srv/layout:v1 here"), "{r}");
        assert!(!reason("just-a-name").contains("for a registry"));
    }
}
