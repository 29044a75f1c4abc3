//! The OCI distribution API (`oci://HOST[:PORT]/REPOSITORY`): a `Remote` on a registry such as
//! Debian's `docker-registry`, spoken over plain HTTP for loopback hosts and HTTPS otherwise.
//!
//! Endpoints used: `GET /v2/` (ping), `HEAD`/`GET /v2/<repo>/blobs/<digest>` (with `Range` for
//! block fetches), `POST /v2/<repo>/blobs/uploads/` then `PUT <Location>&digest=<digest>` with
//! the whole blob (monolithic upload, streamed from the file), and `PUT`/`GET
//! /v2/<repo>/manifests/<tag|digest>` with the OCI image manifest media type.
//!
//! **Cross-repository mounts.** A blob another repository of the same registry is said to
//! hold is first asked for with `POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<other>`:
//! `201 Created` means the registry linked it, nothing is sent; `202 Accepted` opens an
//! ordinary upload session, which the blob is then sent to (or, when another repository is
//! left to try, which is ended with `DELETE <Location>`); a mount request refused outright (a
//! 4xx, such as no right to read the other repository) leaves a plain upload.
//!
//! **Authentication.** On a `401` the client answers the registry's `WWW-Authenticate`
//! challenge and repeats the request once:
//! - `Bearer realm=…,service=…,scope=…`: a token is fetched from the realm (with the basic
//!   credentials below, if set, else anonymously) and sent as `Authorization: Bearer`;
//! - `Basic`: the credentials are sent as `Authorization: Basic`.
//!
//! Credentials come from the environment: `MCOW_REGISTRY_USER` and `MCOW_REGISTRY_PASSWORD`.
//! They are only sent after a challenge asks for them, and never to a redirect's target.
//!
//! Every request is retried under the backend's `RetryPolicy` (transport errors, 5xx, 429 and
//! short or too slow bodies are transient); timeouts, the pace of bodies and retries can be
//! tuned from the environment (see `http_client::client`). A 404 is `RemoteError::NotFound`.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use mcow_format::Digest;
use ureq::SendBody;
use ureq::http::{Request, Response, StatusCode};

use crate::error::{RemoteError, Result};
use crate::http_client::{
    HttpClient, HttpConfig, ProgressReader, basic_authorization, bearer_authorization, body_to_file, header,
    parse_www_authenticate, query_escape, read_body, status_error, stream_multi_range_body, stream_range,
    stream_range_body, stream_ranges, transport_error,
};
use crate::image::MANIFEST_MEDIA_TYPE;
use crate::range::{MultiSink, RangeRead, Sink};
use crate::remote::Remote;

/// Environment variable holding the registry user name.
pub const USER_ENV: &str = "MCOW_REGISTRY_USER";
/// Environment variable holding the registry password (or token).
pub const PASSWORD_ENV: &str = "MCOW_REGISTRY_PASSWORD";

/// Largest manifest accepted.
const MANIFEST_LIMIT: u64 = 4 << 20;
/// Largest blob `get_blob` reads into memory.
const SMALL_BLOB_LIMIT: u64 = 64 << 20;

/// User name and password for a registry.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ user: {:?}, password: <hidden> }}", self.user)
    }
}

impl Credentials {
    /// `MCOW_REGISTRY_USER` and `MCOW_REGISTRY_PASSWORD`, if the user is set.
    pub fn from_env() -> Option<Credentials> {
        let user = std::env::var(USER_ENV).ok().filter(|u| !u.is_empty())?;
        let password = std::env::var(PASSWORD_ENV).unwrap_or_default();
        Some(Credentials { user, password })
    }

    fn basic(&self) -> String {
        basic_authorization(&self.user, &self.password)
    }
}

/// What a request sends.
enum Payload<'a> {
    None,
    Bytes(&'a [u8]),
    /// A file of the given length, streamed.
    File(&'a Path, u64),
}

/// A repository in an OCI registry.
pub struct Registry {
    base: String,
    repository: String,
    client: HttpClient,
    credentials: Option<Credentials>,
    /// The `Authorization` value that last satisfied a challenge.
    auth: Mutex<Option<String>>,
}

impl Registry {
    /// A client for `repository` at `base` (`http(s)://host[:port]`), configured from the
    /// environment (credentials, timeouts, retries).
    pub fn new(base: &str, repository: &str) -> Registry {
        Registry::with_config(base, repository, HttpConfig::from_env(), Credentials::from_env())
    }

    pub fn with_config(
        base: &str,
        repository: &str,
        config: HttpConfig,
        credentials: Option<Credentials>,
    ) -> Registry {
        Registry {
            base: base.trim_end_matches('/').to_string(),
            repository: repository.trim_matches('/').to_string(),
            client: HttpClient::new(&config),
            credentials,
            auth: Mutex::new(None),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.base, self.repository)
    }

    fn blob_url(&self, d: &Digest) -> String {
        self.url(&format!("blobs/{d}"))
    }

    /// Checks that the server speaks the distribution API (and that we may talk to it).
    pub fn ping(&self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        self.client.run("registry ping", || {
            let resp = self.send("GET", &url, &[], Payload::None, &mut |_| {})?;
            if resp.status() == StatusCode::OK {
                Ok(())
            } else {
                Err(status_error("GET", &url, "the registry API (/v2/)", resp))
            }
        })
    }

    /// Sends one request, answering one authentication challenge if the registry asks.
    fn send(
        &self,
        method: &'static str,
        url: &str,
        headers: &[(&str, &str)],
        payload: Payload<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Response<ureq::Body>> {
        let mut answered = false;
        loop {
            let auth = self.auth.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut b = Request::builder().method(method).uri(url);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            if let Some(a) = &auth {
                b = b.header("authorization", a.as_str());
            }
            let result = match payload {
                Payload::None => self.client.agent.run(b.body(()).map_err(|e| invalid(method, url, e))?),
                Payload::Bytes(bytes) => {
                    self.client.agent.run(b.body(bytes).map_err(|e| invalid(method, url, e))?)
                }
                Payload::File(path, len) => {
                    let f = File::open(path).map_err(RemoteError::io("open", path))?;
                    let mut reader = ProgressReader { inner: f, done: 0, progress: &mut *progress };
                    let req = b
                        .header("content-length", len.to_string())
                        .body(SendBody::from_reader(&mut reader))
                        .map_err(|e| invalid(method, url, e))?;
                    self.client.agent.run(req)
                }
            };
            let resp = result.map_err(|e| transport_error(method, url, e))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if answered {
                return Err(self.refused(method, url, resp));
            }
            self.answer_challenge(method, url, resp, auth.as_deref())?;
            answered = true;
        }
    }

    /// The final 401, with a hint about the credentials.
    fn refused(&self, method: &'static str, url: &str, resp: Response<ureq::Body>) -> RemoteError {
        let detail = match status_error(method, url, "", resp) {
            RemoteError::Http { body, .. } if !body.is_empty() => format!(" ({body})"),
            _ => String::new(),
        };
        let who = match &self.credentials {
            Some(c) => {
                format!("the credentials of user {:?} ({USER_ENV}/{PASSWORD_ENV}) were refused", c.user)
            }
            None => format!("the registry wants credentials: set {USER_ENV} and {PASSWORD_ENV}"),
        };
        RemoteError::Http {
            method,
            url: url.to_string(),
            status: 401,
            body: format!("{who}{detail}"),
            retry_after: None,
        }
    }

    /// Works out the `Authorization` value a 401's challenge asks for and remembers it.
    fn answer_challenge(
        &self,
        method: &'static str,
        url: &str,
        resp: Response<ureq::Body>,
        sent: Option<&str>,
    ) -> Result<()> {
        let challenges: Vec<_> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_www_authenticate)
            .collect();
        let value = if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = c.param("realm").ok_or_else(|| {
                RemoteError::Invalid(format!("{method} {url}: Bearer challenge without a realm"))
            })?;
            bearer_authorization(&self.fetch_token(realm, c.param("service"), c.param("scope"))?)
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            match &self.credentials {
                Some(c) if sent != Some(c.basic().as_str()) => c.basic(),
                _ => return Err(self.refused(method, url, resp)),
            }
        } else {
            return Err(RemoteError::Http {
                method,
                url: url.to_string(),
                status: 401,
                body: format!(
                    "unsupported authentication challenge {:?}",
                    header(&resp, "www-authenticate").unwrap_or_default()
                ),
                retry_after: None,
            });
        };
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    /// Fetches a bearer token from a token server (docker token protocol).
    fn fetch_token(&self, realm: &str, service: Option<&str>, scope: Option<&str>) -> Result<String> {
        let mut url = realm.to_string();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (k, v) in [("service", service), ("scope", scope)] {
            if let Some(v) = v {
                url.push(sep);
                url.push_str(&format!("{k}={}", query_escape(v)));
                sep = '&';
            }
        }
        let mut b = Request::builder().method("GET").uri(&url);
        if let Some(c) = &self.credentials {
            b = b.header("authorization", c.basic());
        }
        let req = b.body(()).map_err(|e| invalid("GET", &url, e))?;
        let resp = self.client.agent.run(req).map_err(|e| transport_error("GET", &url, e))?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            let status = resp.status().as_u16();
            let who = match &self.credentials {
                Some(c) => format!("the token server refused user {:?} ({USER_ENV}/{PASSWORD_ENV})", c.user),
                None => format!("the token server wants credentials: set {USER_ENV} and {PASSWORD_ENV}"),
            };
            return Err(RemoteError::Http { method: "GET", url, status, body: who, retry_after: None });
        }
        if resp.status() != StatusCode::OK {
            return Err(status_error("GET", &url, "token", resp));
        }
        let body = read_body(&self.client, "GET", &url, resp, 1 << 20)?;
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| RemoteError::Invalid(format!("GET {url}: bad token answer: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RemoteError::Invalid(format!("GET {url}: the token answer holds no token")))
    }

    /// Starts an upload of blob `digest`: a plain `POST`, or with `mount` a request to mount
    /// it from that repository of the registry (a cross-repository mount).
    fn start_upload(&self, digest: &Digest, mount: Option<&str>) -> Result<Started> {
        let mut url = self.url("blobs/uploads/");
        if let Some(from) = mount {
            url.push_str(&format!(
                "?mount={}&from={}",
                query_escape(&digest.to_string()),
                query_escape(from)
            ));
        }
        let resp = self.send("POST", &url, &[], Payload::Bytes(&[]), &mut |_| {})?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => return Ok(Started::Mounted),
            StatusCode::ACCEPTED => {}
            _ => return Err(status_error("POST", &url, &format!("upload of {digest}"), resp)),
        }
        let loc = header(&resp, "location")
            .ok_or_else(|| RemoteError::Invalid(format!("POST {url}: the upload answer has no Location")))?;
        Ok(Started::Session(session_url(&self.base, &url, &loc)))
    }

    /// Ends an upload session we will not use (a refused mount's, when another repository is
    /// to be tried). Best effort: the registry purges abandoned sessions anyway.
    fn cancel_upload(&self, session: &str) {
        match self.send("DELETE", session, &[], Payload::None, &mut |_| {}) {
            Ok(resp) if resp.status().is_success() => {}
            Ok(resp) => {
                tracing::debug!(session, status = resp.status().as_u16(), "upload session not cancelled")
            }
            Err(e) => tracing::debug!(session, error = %e, "upload session not cancelled"),
        }
    }

    /// One upload attempt: blob `digest` mounted from the first repository of `from` that the
    /// registry mounts it from, or else sent whole by `PUT` in an upload session (the one the
    /// last refused mount opened, or a new one). Returns the repository mounted from, if any.
    fn upload(
        &self,
        digest: &Digest,
        payload: Payload<'_>,
        from: &[String],
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<String>> {
        let mut session = None;
        for (i, repo) in from.iter().enumerate() {
            match self.start_upload(digest, Some(repo)) {
                Ok(Started::Mounted) => {
                    tracing::info!(blob = %digest, from = %repo, "mounted in {}", self.describe());
                    return Ok(Some(repo.clone()));
                }
                Ok(Started::Session(url)) if i + 1 == from.len() => session = Some(url),
                Ok(Started::Session(url)) => self.cancel_upload(&url),
                // A registry that refuses the request itself (say, no right to read `repo`)
                // still takes the blob by a plain upload.
                Err(
                    e @ (RemoteError::Http { .. } | RemoteError::NotFound { .. } | RemoteError::Invalid(_)),
                ) if !e.is_transient() => {
                    tracing::info!(blob = %digest, from = %repo, error = %e, "mount refused");
                }
                Err(e) => return Err(e),
            }
        }
        let session = match session {
            Some(url) => url,
            None => match self.start_upload(digest, None)? {
                Started::Session(url) => url,
                Started::Mounted => unreachable!("a plain upload is never a mount"),
            },
        };
        let put = with_digest(session, digest);
        let resp =
            self.send("PUT", &put, &[("content-type", "application/octet-stream")], payload, progress)?;
        if resp.status() != StatusCode::CREATED {
            return Err(status_error("PUT", &put, &format!("upload of {digest}"), resp));
        }
        Ok(None)
    }
}

/// What starting an upload gave.
enum Started {
    /// The registry mounted the blob from the other repository: nothing to send.
    Mounted,
    /// An upload session: the URL to send the blob to (without the digest).
    Session(String),
}

fn invalid(method: &'static str, url: &str, e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Invalid(format!("{method} {url}: {e}"))
}

/// The URL of an upload session from the `Location` the registry gave: absolute,
/// absolute-path (`/v2/…`) or relative to the request, with or without a query already.
fn session_url(base: &str, request_url: &str, location: &str) -> String {
    let loc = location.trim();
    if loc.starts_with("http://") || loc.starts_with("https://") {
        loc.to_string()
    } else if loc.starts_with('/') {
        // base is scheme://host[:port]
        format!("{base}{loc}")
    } else {
        let dir = request_url.rsplit_once('/').map_or(request_url, |(d, _)| d);
        format!("{dir}/{loc}")
    }
}

/// The `PUT` URL that completes an upload session with blob `digest`.
fn with_digest(mut url: String, digest: &Digest) -> String {
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str("digest=");
    url.push_str(&query_escape(&digest.to_string()));
    url
}

impl RangeRead<Digest> for Registry {
    fn stream_range(&self, digest: &Digest, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<()> {
        let url = self.blob_url(digest);
        stream_range(&self.client, "registry ranged GET", offset, len, sink, |offset, len, sink| {
            let range = format!("bytes={offset}-{}", offset + len - 1);
            let resp = self.send("GET", &url, &[("range", &range)], Payload::None, &mut |_| {})?;
            match resp.status() {
                StatusCode::PARTIAL_CONTENT | StatusCode::OK => {
                    stream_range_body(&self.client, "GET", &url, resp, offset, len, sink)
                }
                _ => Err(status_error("GET", &url, &format!("blob {digest}"), resp)),
            }
        })
    }

    fn stream_ranges(&self, digest: &Digest, ranges: &[(u64, u64)], sink: &mut MultiSink<'_>) -> Result<u64> {
        let url = self.blob_url(digest);
        stream_ranges(
            ranges,
            sink,
            |header, done, sink| {
                let resp = self.send("GET", &url, &[("range", header)], Payload::None, &mut |_| {})?;
                match resp.status() {
                    StatusCode::PARTIAL_CONTENT | StatusCode::OK => {
                        stream_multi_range_body(&self.client, "GET", &url, resp, ranges, done, sink)
                    }
                    _ => Err(status_error("GET", &url, &format!("blob {digest}"), resp)),
                }
            },
            |offset, len, sink| self.stream_range(digest, offset, len, sink),
        )
    }
}

impl Remote for Registry {
    fn describe(&self) -> String {
        format!("registry {}/{}", self.base, self.repository)
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool> {
        let url = self.blob_url(digest);
        self.client.run("registry HEAD blob", || {
            let resp = self.send("HEAD", &url, &[], Payload::None, &mut |_| {})?;
            match resp.status() {
                StatusCode::OK => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => Err(status_error("HEAD", &url, &format!("blob {digest}"), resp)),
            }
        })
    }

    fn put_blob(&self, digest: &Digest, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        self.mount_or_put_blob(digest, path, &[], progress).map(|_| ())
    }

    fn put_blob_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        self.mount_or_put_blob_bytes(digest, bytes, &[]).map(|_| ())
    }

    fn mount_or_put_blob(
        &self,
        digest: &Digest,
        path: &Path,
        from: &[String],
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<String>> {
        let len = std::fs::metadata(path).map_err(RemoteError::io("stat", path))?.len();
        self.client
            .run("registry blob upload", || self.upload(digest, Payload::File(path, len), from, progress))
    }

    fn mount_or_put_blob_bytes(
        &self,
        digest: &Digest,
        bytes: &[u8],
        from: &[String],
    ) -> Result<Option<String>> {
        self.client
            .run("registry blob upload", || self.upload(digest, Payload::Bytes(bytes), from, &mut |_| {}))
    }

    fn get_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let url = self.blob_url(digest);
        self.client.run("registry GET blob", || {
            let resp = self.send("GET", &url, &[], Payload::None, &mut |_| {})?;
            if resp.status() != StatusCode::OK {
                return Err(status_error("GET", &url, &format!("blob {digest}"), resp));
            }
            read_body(&self.client, "GET", &url, resp, SMALL_BLOB_LIMIT)
        })
    }

    fn get_blob_to(&self, digest: &Digest, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let url = self.blob_url(digest);
        self.client.run("registry GET blob", || {
            let resp = self.send("GET", &url, &[], Payload::None, &mut |_| {})?;
            if resp.status() != StatusCode::OK {
                return Err(status_error("GET", &url, &format!("blob {digest}"), resp));
            }
            body_to_file(&self.client, "GET", &url, resp, dest, progress).map(|_| ())
        })
    }

    fn put_manifest(&self, tag: &str, bytes: &[u8]) -> Result<()> {
        let url = self.url(&format!("manifests/{tag}"));
        self.client.run("registry PUT manifest", || {
            let resp = self.send(
                "PUT",
                &url,
                &[("content-type", MANIFEST_MEDIA_TYPE)],
                Payload::Bytes(bytes),
                &mut |_| {},
            )?;
            if resp.status() != StatusCode::CREATED && resp.status() != StatusCode::OK {
                return Err(status_error("PUT", &url, &format!("manifest {tag}"), resp));
            }
            Ok(())
        })
    }

    fn get_manifest(&self, tag: &str, digest: Option<&Digest>) -> Result<Vec<u8>> {
        let what = digest.map_or_else(|| tag.to_string(), Digest::to_string);
        let url = self.url(&format!("manifests/{what}"));
        self.client.run("registry GET manifest", || {
            let resp =
                self.send("GET", &url, &[("accept", MANIFEST_MEDIA_TYPE)], Payload::None, &mut |_| {})?;
            if resp.status() != StatusCode::OK {
                return Err(status_error("GET", &url, &format!("manifest {what}"), resp));
            }
            read_body(&self.client, "GET", &url, resp, MANIFEST_LIMIT)
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

    #[test]
    fn upload_urls_from_every_kind_of_location() {
        let d = Digest::of(b"x");
        let enc = query_escape(&d.to_string());
        let base = "http://127.0.0.1:5000";
        let req = "http://127.0.0.1:5000/v2/a/b/blobs/uploads/";
        let upload_url = |base, req, loc, d| with_digest(session_url(base, req, loc), d);
        assert_eq!(
            upload_url(base, req, "http://127.0.0.1:5000/v2/a/b/blobs/uploads/u1?_state=s", &d),
            format!("http://127.0.0.1:5000/v2/a/b/blobs/uploads/u1?_state=s&digest={enc}")
        );
        assert_eq!(
            upload_url(base, req, "/v2/a/b/blobs/uploads/u1", &d),
            format!("http://127.0.0.1:5000/v2/a/b/blobs/uploads/u1?digest={enc}")
        );
        assert_eq!(
            upload_url(base, req, "u1?x=1", &d),
            format!("http://127.0.0.1:5000/v2/a/b/blobs/uploads/u1?x=1&digest={enc}")
        );
    }
}
