//! A read-only object store over plain HTTP(S) (`http://HOST[:PORT]/PATH`): an OCI image
//! layout written elsewhere (for instance by a push to `file://`) and served by any web server
//! that answers `Range` requests (nginx, a CDN). Objects are `GET base/<key>`; existence is a
//! `HEAD`; writes fail with `RemoteError::ReadOnly`.
//!
//! Requests are retried under the backend's `RetryPolicy`, bodies held to its pace; timeouts,
//! pace and retries can be tuned from the environment (see `http_client::client`). A 404 is a missing
//! object.

use std::path::Path;

use ureq::http::{Request, Response, StatusCode};

use crate::error::{RemoteError, Result};
use crate::http_client::{
    HttpClient, HttpConfig, body_to_file, read_body, status_error, stream_multi_range_body, stream_range,
    stream_range_body, stream_ranges, transport_error,
};
use crate::layout::ObjectStore;
use crate::range::{MultiSink, RangeRead, Sink};

/// Largest object `get` reads into memory (index.json, manifests, configs).
const SMALL_OBJECT_LIMIT: u64 = 64 << 20;

/// A web server's directory holding an OCI layout.
pub struct HttpStore {
    base: String,
    client: HttpClient,
}

impl HttpStore {
    /// A store at `base` (`http(s)://host[:port][/path]`), configured from the environment.
    pub fn new(base: &str) -> HttpStore {
        HttpStore::with_config(base, HttpConfig::from_env())
    }

    pub fn with_config(base: &str, config: HttpConfig) -> HttpStore {
        HttpStore { base: base.trim_end_matches('/').to_string(), client: HttpClient::new(&config) }
    }

    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.base)
    }

    fn call(&self, method: &'static str, url: &str, range: Option<&str>) -> Result<Response<ureq::Body>> {
        let mut b = Request::builder().method(method).uri(url);
        if let Some(r) = range {
            b = b.header("range", r);
        }
        let req = b.body(()).map_err(|e| RemoteError::Invalid(format!("{method} {url}: {e}")))?;
        self.client.agent.run(req).map_err(|e| transport_error(method, url, e))
    }

    fn read_only(&self) -> RemoteError {
        RemoteError::ReadOnly(format!("{} (plain HTTP)", self.base))
    }
}

impl RangeRead<str> for HttpStore {
    fn stream_range(&self, key: &str, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<()> {
        let url = self.url(key);
        stream_range(&self.client, "HTTP ranged GET", offset, len, sink, |offset, len, sink| {
            let range = format!("bytes={offset}-{}", offset + len - 1);
            let resp = self.call("GET", &url, Some(&range))?;
            match resp.status() {
                StatusCode::PARTIAL_CONTENT | StatusCode::OK => {
                    stream_range_body(&self.client, "GET", &url, resp, offset, len, sink)
                }
                _ => Err(status_error("GET", &url, key, resp)),
            }
        })
    }

    fn stream_ranges(&self, key: &str, ranges: &[(u64, u64)], sink: &mut MultiSink<'_>) -> Result<u64> {
        let url = self.url(key);
        stream_ranges(
            ranges,
            sink,
            |header, done, sink| {
                let resp = self.call("GET", &url, Some(header))?;
                match resp.status() {
                    StatusCode::PARTIAL_CONTENT | StatusCode::OK => {
                        stream_multi_range_body(&self.client, "GET", &url, resp, ranges, done, sink)
                    }
                    _ => Err(status_error("GET", &url, key, resp)),
                }
            },
            |offset, len, sink| self.stream_range(key, offset, len, sink),
        )
    }
}

impl ObjectStore for HttpStore {
    fn describe(&self) -> String {
        self.base.clone()
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let url = self.url(key);
        self.client.run("HTTP HEAD", || {
            let resp = self.call("HEAD", &url, None)?;
            match resp.status() {
                StatusCode::OK => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => Err(status_error("HEAD", &url, key, resp)),
            }
        })
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let url = self.url(key);
        self.client.run("HTTP GET", || {
            let resp = self.call("GET", &url, None)?;
            match resp.status() {
                StatusCode::OK => read_body(&self.client, "GET", &url, resp, SMALL_OBJECT_LIMIT).map(Some),
                StatusCode::NOT_FOUND => Ok(None),
                _ => Err(status_error("GET", &url, key, resp)),
            }
        })
    }

    fn get_to(&self, key: &str, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let url = self.url(key);
        self.client.run("HTTP GET", || {
            let resp = self.call("GET", &url, None)?;
            if resp.status() != StatusCode::OK {
                return Err(status_error("GET", &url, key, resp));
            }
            body_to_file(&self.client, "GET", &url, resp, dest, progress).map(|_| ())
        })
    }

    fn put_bytes(&self, _key: &str, _bytes: &[u8]) -> Result<()> {
        Err(self.read_only())
    }

    fn put_file(&self, _key: &str, _path: &Path, _progress: &mut dyn FnMut(u64)) -> Result<()> {
        Err(self.read_only())
    }

    fn cancel(&self) {
        self.client.cancel()
    }

    fn retries(&self) -> u64 {
        self.client.retries()
    }
}
