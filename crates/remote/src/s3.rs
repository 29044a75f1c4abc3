//! S3-compatible object storage as the object store under an OCI layout (`s3://BUCKET[/PREFIX]`):
//! the layout's files become the objects `PREFIX/oci-layout`, `PREFIX/index.json` and
//! `PREFIX/blobs/sha256/<hex>` of the bucket.
//!
//! This module owns the S3 side only: where the server is and who we are (`S3Config`, from the
//! environment by default), signing (AWS SigV4 presigned URLs made by `rusty-s3`, with an
//! unsigned payload so bodies stream), and the S3 exchanges: HEAD, whole GET, ranged GET,
//! streamed GET to a file, PUT from memory and streamed PUT from a file. They go through the
//! same [`HttpClient`] as the other HTTP backends, so the same timeouts, pace of bodies, retry
//! policy and cancel apply (tuned by the `MCOW_HTTP_*` and `MCOW_RETRY_*` variables, see
//! `http_client::client`); every attempt is signed afresh. Keys and tags belong to `layout`; digests are
//! checked by `transfer` and the engine, not here.
//!
//! Configuration (see [`S3Config::from_env`]):
//! - `MCOW_S3_ENDPOINT`: base URL of an S3-compatible server (`http://127.0.0.1:5004`),
//!   addressed path-style (`ENDPOINT/BUCKET/KEY`). Unset: AWS,
//!   `https://s3.REGION.amazonaws.com`, addressed virtual-host style (`BUCKET.s3…/KEY`);
//! - `AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1`;
//! - `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN` if set). With
//!   neither key set, requests go unsigned (public buckets).
//!
//! Uploads are single PUTs, which S3 accepts up to 5 GiB per object; a larger layer is refused
//! with a clear error (multipart upload is a later step).

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use ureq::http::Response;
use ureq::{Body, SendBody};

use crate::error::{RemoteError, Result};
use crate::http_client::{
    HttpClient, HttpConfig, ProgressReader, body_to_file, error_body, read_body, retry_after, stream_range,
    stream_range_body,
};
use crate::layout::ObjectStore;
use crate::range::{RangeRead, Sink};

/// The largest object a single PUT may create.
pub const MAX_SINGLE_PUT: u64 = 5 << 30;

/// The largest object [`ObjectStore::get`] reads into memory (manifests, configs, index.json).
const MAX_SMALL_OBJECT: u64 = 64 << 20;

/// How long a presigned URL is valid: it is used at once, so this only covers clock skew and a
/// slow start of a large upload.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// Where the S3 server is and how to sign for it.
#[derive(Clone)]
pub struct S3Config {
    /// Base URL of an S3-compatible server, addressed path-style; `None` for AWS itself,
    /// addressed virtual-host style.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Timeouts, pace and retries, as for every HTTP backend.
    pub http: HttpConfig,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl S3Config {
    /// The configuration the environment gives (`MCOW_S3_ENDPOINT`, `AWS_REGION` /
    /// `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// and the `MCOW_HTTP_*`/`MCOW_RETRY_*` tuning of `HttpConfig::from_env`).
    pub fn from_env() -> S3Config {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        S3Config {
            endpoint: var("MCOW_S3_ENDPOINT"),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            http: HttpConfig::from_env(),
        }
    }
}

/// One bucket (and key prefix) of an S3-compatible server.
pub struct S3Store {
    bucket: Bucket,
    credentials: Option<Credentials>,
    prefix: String,
    client: HttpClient,
}

/// A request's method, for signing and messages.
#[derive(Clone, Copy)]
enum Verb {
    Head,
    Get,
    Put,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Head => "HEAD",
            Verb::Get => "GET",
            Verb::Put => "PUT",
        }
    }
}

impl S3Store {
    /// The store for `bucket` and `prefix` as the environment configures it (what `open_remote`
    /// uses for `s3://` references).
    pub fn from_env(bucket: &str, prefix: &str) -> Result<S3Store> {
        S3Store::new(S3Config::from_env(), bucket, prefix)
    }

    pub fn new(config: S3Config, bucket: &str, prefix: &str) -> Result<S3Store> {
        let invalid = |reason: String| RemoteError::Invalid(format!("s3://{bucket}: {reason}"));
        let (endpoint, style) = match &config.endpoint {
            Some(e) => (e.trim_end_matches('/').to_string(), UrlStyle::Path),
            None => (format!("https://s3.{}.amazonaws.com", config.region), UrlStyle::VirtualHost),
        };
        let url = endpoint.parse().map_err(|e| invalid(format!("bad endpoint {endpoint:?}: {e}")))?;
        let bucket = Bucket::new(url, style, bucket.to_string(), config.region.clone())
            .map_err(|e| invalid(format!("bad endpoint {endpoint:?}: {e}")))?;
        let credentials = match (config.access_key_id, config.secret_access_key) {
            (Some(key), Some(secret)) => Some(match config.session_token {
                Some(token) => Credentials::new_with_token(key, secret, token),
                None => Credentials::new(key, secret),
            }),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither".into(),
                ));
            }
        };
        Ok(S3Store {
            bucket,
            credentials,
            prefix: prefix.trim_matches('/').to_string(),
            client: HttpClient::new(&config.http),
        })
    }

    /// Creates the bucket (succeeds if we already own it). Needs credentials. Sends no location
    /// constraint, so on AWS it suits `us-east-1` only (for tests and local servers).
    pub fn create_bucket(&self) -> Result<()> {
        let creds = self.credentials.as_ref().ok_or_else(|| {
            RemoteError::Invalid(format!("{}: creating a bucket needs credentials", self.describe()))
        })?;
        let display = self.bucket.base_url().to_string();
        self.client.run("create bucket", || {
            let url = self.bucket.create_bucket(creds).sign(SIGNATURE_LIFETIME);
            let mut resp =
                self.client.agent.put(url.as_str()).send_empty().map_err(transport(Verb::Put, &display))?;
            match resp.status().as_u16() {
                200 => Ok(()),
                // It exists: fine if it is ours (servers differ on the code, so ask).
                409 => {
                    let e = self.status_error(Verb::Put, &display, &mut resp);
                    let head = self.bucket.head_bucket(Some(creds)).sign(SIGNATURE_LIFETIME);
                    match self.client.agent.head(head.as_str()).call() {
                        Ok(r) if r.status().as_u16() == 200 => Ok(()),
                        _ => Err(e),
                    }
                }
                _ => Err(self.status_error(Verb::Put, &display, &mut resp)),
            }
        })
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) }
    }

    /// The signed URL for `verb` on object `key` (full key, prefix included).
    fn signed(&self, verb: Verb, key: &str) -> String {
        let c = self.credentials.as_ref();
        match verb {
            Verb::Head => self.bucket.head_object(c, key).sign(SIGNATURE_LIFETIME),
            Verb::Get => self.bucket.get_object(c, key).sign(SIGNATURE_LIFETIME),
            Verb::Put => self.bucket.put_object(c, key).sign(SIGNATURE_LIFETIME),
        }
        .to_string()
    }

    /// The unsigned URL of object `key`, for messages (never the signature).
    /// Sends one signed GET of `key` (signed afresh, so a retry never reuses an old
    /// signature), with a `Range` header when given.
    fn send_get(&self, key: &str, display: &str, range: Option<&str>) -> Result<Response<Body>> {
        let mut req = self.client.agent.get(&self.signed(Verb::Get, key));
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        req.call().map_err(transport(Verb::Get, display))
    }

    fn display_url(&self, key: &str) -> String {
        self.bucket.object_url(key).map_or_else(|_| key.to_string(), |u| u.to_string())
    }

    fn not_found(&self, key: &str) -> RemoteError {
        RemoteError::NotFound { what: key.to_string(), location: self.describe() }
    }

    /// The error for an unexpected status, with S3's error code and message when it sent one.
    fn status_error(&self, verb: Verb, url: &str, resp: &mut Response<Body>) -> RemoteError {
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp);
        let mut body = summarize_s3_error(&error_body(resp, 64 << 10));
        if status == 403 {
            let hint = if self.credentials.is_some() {
                "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            } else {
                "access denied: no credentials set (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
            };
            body = if body.is_empty() { hint.to_string() } else { format!("{body} ({hint})") };
        }
        RemoteError::Http { method: verb.name(), url: url.to_string(), status, body, retry_after }
    }
}

/// `Code: Message` from an S3 XML error body, or a short prefix of any other body.
fn summarize_s3_error(text: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{name}>"))? + start;
        Some(text[start..end].trim().to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) if !m.is_empty() => format!("{c}: {m}"),
        (Some(c), _) => c,
        _ => text.trim().chars().take(200).collect(),
    }
}

fn transport(verb: Verb, url: &str) -> impl FnOnce(ureq::Error) -> RemoteError {
    let url = url.to_string();
    move |e| RemoteError::Transport { method: verb.name(), url, reason: e.to_string() }
}

impl RangeRead<str> for S3Store {
    fn stream_range(&self, key: &str, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<()> {
        let key = self.key(key);
        let display = self.display_url(&key);
        let what = format!("GET {display} bytes={offset}-{}", (offset + len).saturating_sub(1));
        stream_range(&self.client, &what, offset, len, sink, |offset, len, sink| {
            let range = format!("bytes={}-{}", offset, offset + len - 1);
            let mut resp = self.send_get(&key, &display, Some(&range))?;
            match resp.status().as_u16() {
                206 => stream_range_body(&self.client, "GET", &display, resp, offset, len, sink),
                200 => Err(RemoteError::Invalid(format!(
                    "GET {display}: the server ignored the Range header ({range}) and sent the whole object"
                ))),
                404 => Err(self.not_found(&key)),
                _ => Err(self.status_error(Verb::Get, &display, &mut resp)),
            }
        })
    }
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket.name())
        } else {
            format!("s3://{}/{}", self.bucket.name(), self.prefix)
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let key = self.key(key);
        let display = self.display_url(&key);
        self.client.run(&format!("HEAD {display}"), || {
            let mut resp = self
                .client
                .agent
                .head(&self.signed(Verb::Head, &key))
                .call()
                .map_err(transport(Verb::Head, &display))?;
            match resp.status().as_u16() {
                200 => Ok(true),
                404 => Ok(false),
                _ => Err(self.status_error(Verb::Head, &display, &mut resp)),
            }
        })
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(key);
        let display = self.display_url(&key);
        self.client.run(&format!("GET {display}"), || {
            let mut resp = self.send_get(&key, &display, None)?;
            match resp.status().as_u16() {
                200 => {}
                404 => {
                    return match self.status_error(Verb::Get, &display, &mut resp) {
                        RemoteError::Http { body, .. } if body.starts_with("NoSuchBucket") => {
                            Err(RemoteError::NotFound {
                                what: format!("bucket {}", self.bucket.name()),
                                location: self.bucket.base_url().to_string(),
                            })
                        }
                        _ => Ok(None),
                    };
                }
                _ => return Err(self.status_error(Verb::Get, &display, &mut resp)),
            }
            read_body(&self.client, "GET", &display, resp, MAX_SMALL_OBJECT).map(Some)
        })
    }

    fn get_to(&self, key: &str, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let key = self.key(key);
        let display = self.display_url(&key);
        self.client.run(&format!("GET {display}"), || {
            let mut resp = self.send_get(&key, &display, None)?;
            match resp.status().as_u16() {
                200 => {}
                404 => return Err(self.not_found(&key)),
                _ => return Err(self.status_error(Verb::Get, &display, &mut resp)),
            }
            body_to_file(&self.client, "GET", &display, resp, dest, progress)?;
            File::open(dest).and_then(|f| f.sync_all()).map_err(RemoteError::io("sync", dest))
        })
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let key = self.key(key);
        let display = self.display_url(&key);
        self.client.run(&format!("PUT {display}"), || {
            let mut resp = self
                .client
                .agent
                .put(&self.signed(Verb::Put, &key))
                .header("Content-Type", "application/octet-stream")
                .send(bytes)
                .map_err(transport(Verb::Put, &display))?;
            match resp.status().as_u16() {
                200 | 201 | 204 => Ok(()),
                _ => Err(self.status_error(Verb::Put, &display, &mut resp)),
            }
        })
    }

    fn put_file(&self, key: &str, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let size = std::fs::metadata(path).map_err(RemoteError::io("stat", path))?.len();
        if size > MAX_SINGLE_PUT {
            return Err(RemoteError::Invalid(format!(
                "{}: {size} bytes is more than a single S3 PUT takes (5 GiB); multipart upload is not \
                 implemented yet",
                path.display()
            )));
        }
        let key = self.key(key);
        let display = self.display_url(&key);
        self.client.run(&format!("PUT {display}"), || {
            let file = File::open(path).map_err(RemoteError::io("open", path))?;
            let mut reader = ProgressReader { inner: file, done: 0, progress: &mut *progress };
            let mut resp = self
                .client
                .agent
                .put(&self.signed(Verb::Put, &key))
                .header("Content-Type", "application/octet-stream")
                .header("Content-Length", size.to_string())
                .send(SendBody::from_reader(&mut reader))
                .map_err(transport(Verb::Put, &display))?;
            match resp.status().as_u16() {
                200 | 201 | 204 => Ok(()),
                _ => Err(self.status_error(Verb::Put, &display, &mut resp)),
            }
        })
    }

    fn cancel(&self) {
        self.client.cancel()
    }

    fn retries(&self) -> u64 {
        self.client.retries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> S3Config {
        S3Config {
            endpoint: Some("http://127.0.0.1:9/".into()),
            region: "us-east-1".into(),
            access_key_id: Some("AKID".into()),
            secret_access_key: Some("SECRET".into()),
            session_token: None,
            http: HttpConfig::default(),
        }
    }

    #[test]
    fn keys_urls_and_signatures() {
        let s = S3Store::new(config(), "bkt", "/a/b/").unwrap();
        assert_eq!(s.describe(), "s3://bkt/a/b");
        assert_eq!(s.key("index.json"), "a/b/index.json");
        assert_eq!(s.display_url(&s.key("index.json")), "http://127.0.0.1:9/bkt/a/b/index.json");
        let signed = s.signed(Verb::Get, "a/b/index.json");
        assert!(signed.starts_with("http://127.0.0.1:9/bkt/a/b/index.json?"), "{signed}");
        assert!(signed.contains("X-Amz-Signature=") && !signed.contains("SECRET"), "{signed}");
        let s = S3Store::new(config(), "bkt", "").unwrap();
        assert_eq!((s.describe().as_str(), s.key("oci-layout").as_str()), ("s3://bkt", "oci-layout"));
        assert!(!format!("{:?}", config()).contains("SECRET"));
    }

    #[test]
    fn rejects_half_credentials_and_bad_endpoints() {
        let half = S3Config { secret_access_key: None, ..config() };
        assert!(S3Store::new(half, "bkt", "").is_err());
        let bad = S3Config { endpoint: Some("ftp://x".into()), ..config() };
        assert!(S3Store::new(bad, "bkt", "").is_err());
    }

    #[test]
    fn summarizes_s3_error_bodies() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
                   <Message>The request signature we calculated does not match</Message></Error>";
        assert_eq!(
            summarize_s3_error(xml),
            "SignatureDoesNotMatch: The request signature we calculated does not match"
        );
        assert_eq!(summarize_s3_error("<Error><Code>NoSuchKey</Code></Error>"), "NoSuchKey");
        assert_eq!(summarize_s3_error(" plain "), "plain");
    }
}
