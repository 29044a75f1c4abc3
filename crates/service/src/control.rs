//! The control API of a [`Service`]: HTTP/1.1 with JSON bodies on a Unix socket, so that
//! `curl --unix-socket SOCKET http://x/exports` is a client. Owns the routes, the JSON shapes
//! and the mapping of [`ServiceError`] to status codes; what each route does is the service's.
//!
//! Routes (docs/CONTROL.md is the reference):
//! - `GET /exports`: `{"exports": [ExportInfo…]}`.
//! - `GET /exports/NAME`: one `ExportInfo`, or 404.
//! - `POST /exports` with `{"name": NAME?, "disk": DIR|REF, "read_only": BOOL?, "fetch":
//!   {"window": BLOCKS?, "readahead": BYTES?, "prefetch": BOOL?, "all": BOOL?}?}`: adds it;
//!   201 with its `ExportInfo`.
//! - `DELETE /exports/NAME`: removes it (in-flight requests finish, clients are disconnected,
//!   the disk is flushed) and answers once that is done: 200 with its last `ExportInfo`.
//! - `GET /metrics`: Prometheus text ([`crate::metrics`]); also served alone on a TCP address
//!   ([`Control::start_metrics`]).
//!
//! Every error is `{"error": "…"}` with a status: 400 bad JSON or a bad request, 404 unknown
//! export or route, 405 a method a route does not take, 409 a name or disk already served
//! (or served with other fetch options),
//! 502 an image's origin failing, 500 anything else. A request that fails changes nothing.
//! Each request runs on a thread of its own (adds and removes still run one at a time in the
//! service), so a list is answered while a slow pull or removal goes on.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use tiny_http::{Header, Method, Request, Response, StatusCode};

use crate::error::ServiceError;
use crate::fetch_options::FetchOptions;
use crate::service::{AddExport, ExportInfo, Service};

/// Largest request body read (a JSON object naming a disk is far smaller).
const MAX_BODY: u64 = 64 << 10;

/// The body of `POST /exports`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    name: Option<String>,
    disk: String,
    read_only: Option<bool>,
    #[serde(default)]
    fetch: FetchOptions,
}

#[derive(Serialize)]
struct ListBody {
    exports: Vec<ExportInfo>,
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// The control API being served on a Unix socket (or the metrics alone on a TCP address).
pub struct Control {
    http: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    place: Place,
}

/// Where a [`Control`] listens.
enum Place {
    /// A Unix socket; `owned`: this process made it (and removes its file at the end).
    Socket { path: PathBuf, owned: bool },
    /// A TCP address (the metrics alone).
    Tcp(std::net::SocketAddr),
}

/// What a [`Control`] answers.
#[derive(Debug, Clone, Copy)]
enum Routes {
    /// Every route; `read_only` is the default of `POST /exports`.
    All { read_only: bool },
    /// `GET /metrics` only.
    Metrics,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("address", &self.address()).finish()
    }
}

impl Control {
    /// Listens on a Unix socket at `path` (a stale socket file there is replaced) and serves
    /// the control API of `service` on a thread until [`Control::stop`]. `read_only` is the
    /// default of `POST /exports` when the body says nothing.
    pub fn start(service: Arc<Service>, path: &Path, read_only: bool) -> Result<Control, ServiceError> {
        let bind_err = |source| ServiceError::Bind { addr: path.display().to_string(), source };
        if path.exists() {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let http =
            tiny_http::Server::http_unix(path).map_err(|e| bind_err(std::io::Error::other(e.to_string())))?;
        let place = Place::Socket { path: path.to_path_buf(), owned: true };
        Control::serve(service, http, place, Routes::All { read_only })
    }

    /// [`Control::start`] on a listening socket another process made and handed over
    /// (systemd socket activation); its file is left in place at [`Control::stop`].
    pub fn start_inherited(
        service: Arc<Service>,
        listener: std::os::unix::net::UnixListener,
        read_only: bool,
    ) -> Result<Control, ServiceError> {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_default();
        let http = tiny_http::Server::from_listener(listener, None).map_err(|e| ServiceError::Bind {
            addr: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Control::serve(service, http, Place::Socket { path, owned: false }, Routes::All { read_only })
    }

    /// Serves `GET /metrics` of `service`, and nothing else (no route that lists or changes
    /// exports), on the TCP address `addr` (port 0: one the system picks; see
    /// [`Control::address`]), for a Prometheus server to scrape.
    pub fn start_metrics(service: Arc<Service>, addr: &str) -> Result<Control, ServiceError> {
        let bind_err = |source| ServiceError::Bind { addr: addr.to_string(), source };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let http = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| bind_err(std::io::Error::other(e.to_string())))?;
        Control::serve(service, http, Place::Tcp(local), Routes::Metrics)
    }

    fn serve(
        service: Arc<Service>,
        http: tiny_http::Server,
        place: Place,
        routes: Routes,
    ) -> Result<Control, ServiceError> {
        let http = Arc::new(http);
        let h = Arc::clone(&http);
        let thread = std::thread::Builder::new()
            .name("mcow-control".into())
            .spawn(move || {
                for req in h.incoming_requests() {
                    let service = Arc::clone(&service);
                    let spawned = std::thread::Builder::new()
                        .name("mcow-control-req".into())
                        .spawn(move || handle(&service, req, routes));
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start a thread for a control request");
                    }
                }
            })
            .map_err(|source| ServiceError::Io { what: "starting the control thread".into(), source })?;
        let control = Control { http, thread: Some(thread), place };
        match &control.place {
            Place::Socket { path, owned } => {
                tracing::info!(path = %path.display(), inherited = !owned, "control API listening")
            }
            Place::Tcp(addr) => tracing::info!(%addr, "metrics listening"),
        }
        Ok(control)
    }

    /// Where it listens: the socket's path, or `http://ADDR/metrics` for the metrics alone.
    pub fn address(&self) -> String {
        match &self.place {
            Place::Socket { path, .. } => path.display().to_string(),
            Place::Tcp(addr) => format!("http://{addr}/metrics"),
        }
    }

    /// Stops taking requests (those running finish on their own threads) and removes the
    /// socket file (one this process made).
    pub fn stop(mut self) {
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match &self.place {
            Place::Socket { path, owned: true } => {
                let _ = std::fs::remove_file(path);
            }
            Place::Socket { owned: false, .. } => {
                // tiny_http's server removes its Unix socket's file when dropped, but an
                // inherited socket's file belongs to the process that made it (systemd), and
                // the server started after this one takes the same socket over: so this one
                // is never dropped (the process is about to exit; its listening socket stays
                // with systemd).
                std::mem::forget(Arc::clone(&self.http));
            }
            Place::Tcp(_) => {}
        }
    }
}

/// The status code an error is answered with.
fn status_of(e: &ServiceError) -> u16 {
    use mcow_remote::RemoteError as R;
    match e {
        ServiceError::UnknownExport(_) => 404,
        ServiceError::DuplicateExport(_) | ServiceError::DiskInUse { .. } => 409,
        ServiceError::FetchOptionsDiffer { .. } => 409,
        ServiceError::InvalidOptions(_) => 400,
        ServiceError::Snapshot { source: mcow_engine::Error::ReadOnly, .. } => 409,
        ServiceError::Server(mcow_nbd::ServerError::InvalidExportName { .. }) => 400,
        ServiceError::Open { .. } => 400,
        ServiceError::Remote { source, .. } => match **source {
            R::Reference { .. } | R::Invalid(_) => 400,
            R::NotFound { .. } => 404,
            _ => 502,
        },
        _ => 500,
    }
}

/// `GET /metrics`: the Prometheus text of `service` now.
fn metrics(service: &Service) -> Response<std::io::Cursor<Vec<u8>>> {
    let header = Header::from_bytes("Content-Type", "text/plain; version=0.0.4").expect("a valid header");
    Response::from_data(crate::metrics::render(service).into_bytes()).with_header(header)
}

fn json<T: Serialize>(status: u16, body: &T) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let header = Header::from_bytes("Content-Type", "application/json").expect("a valid header");
    Response::from_data(text).with_status_code(StatusCode(status)).with_header(header)
}

fn error(status: u16, message: impl Into<String>) -> Response<std::io::Cursor<Vec<u8>>> {
    json(status, &ErrorBody { error: message.into() })
}

/// `%XX` escapes of a path segment decoded; `None` if that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex = |b: &u8| (*b as char).to_digit(16);
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn handle(service: &Service, mut req: Request, routes: Routes) {
    let method = req.method().clone();
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("");
    let response = match routes {
        Routes::All { read_only } => route(service, &method, path, &mut req, read_only),
        Routes::Metrics => match (&method, path.trim_matches('/')) {
            (Method::Get, "metrics") => metrics(service),
            (_, "metrics") => error(405, format!("{method} is not allowed on /metrics (GET)")),
            _ => error(404, format!("no such endpoint: {path} (only GET /metrics is served here)")),
        },
    };
    tracing::debug!(%method, url = %url, status = response.status_code().0, "control request");
    if let Err(e) = req.respond(response) {
        tracing::debug!(error = %e, "cannot answer a control request");
    }
}

fn route(
    service: &Service,
    method: &Method,
    path: &str,
    req: &mut Request,
    read_only: bool,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (Method::Get, ["exports"]) => json(200, &ListBody { exports: service.list() }),
        (Method::Get, ["metrics"]) => metrics(service),
        (Method::Post, ["exports"]) => {
            let mut body = Vec::new();
            if let Err(e) = req.as_reader().take(MAX_BODY + 1).read_to_end(&mut body) {
                return error(400, format!("reading the request body: {e}"));
            }
            if body.len() as u64 > MAX_BODY {
                return error(400, format!("the request body is larger than {MAX_BODY} bytes"));
            }
            let add: AddBody = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => {
                    return error(
                        400,
                        format!(
                            "invalid JSON body ({e}); expected {{\"name\": NAME, \"disk\": DIR|REF, \"read_only\": BOOL, \"fetch\": {{\"window\": BLOCKS, \"readahead\": BYTES, \"prefetch\": BOOL, \"all\": BOOL}}}} (all but disk optional)"
                        ),
                    );
                }
            };
            let req = AddExport {
                name: add.name,
                disk: add.disk,
                read_only: add.read_only.unwrap_or(read_only),
                trace: false,
                persist: true,
                fetch: add.fetch,
            };
            match service.add(&req) {
                Ok(added) => {
                    if let Some(t) = &added.missing_trace {
                        tracing::warn!(
                            export = %added.info.name, trace = %t,
                            "the image's trace is missing at its origin: the disk works, but nothing is prefetched"
                        );
                    }
                    json(201, &added.info)
                }
                Err(e) => error(status_of(&e), e.to_string()),
            }
        }
        (_, ["exports"]) => error(405, format!("{method} is not allowed on /exports (GET, POST)")),
        (method, ["exports", name]) => {
            let Some(name) = percent_decode(name) else { return error(400, "the export name is not UTF-8") };
            match method {
                Method::Get => match service.info(&name) {
                    Some(info) => json(200, &info),
                    None => error(404, ServiceError::UnknownExport(name).to_string()),
                },
                Method::Delete => match service.remove(&name) {
                    Ok(info) => json(200, &info),
                    Err(e) => error(status_of(&e), e.to_string()),
                },
                _ => error(405, format!("{method} is not allowed on /exports/NAME (GET, DELETE)")),
            }
        }
        (method, ["exports", name, "snapshot"]) => {
            let Some(name) = percent_decode(name) else { return error(400, "the export name is not UTF-8") };
            if *method != Method::Post {
                return error(405, format!("{method} is not allowed on /exports/NAME/snapshot (POST)"));
            }
            let query = req.url().split_once('?').map_or("", |(_, q)| q).to_string();
            let wait = query.split('&').any(|kv| kv == "wait" || kv == "wait=true" || kv == "wait=1");
            match service.snapshot(&name, wait) {
                Ok(info) => json(201, &info),
                Err(e) => error(status_of(&e), e.to_string()),
            }
        }
        _ => error(404, format!("no such endpoint: {path} (see GET /exports)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(percent_decode("vm").as_deref(), Some("vm"));
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("100%").as_deref(), Some("100%"));
        assert_eq!(percent_decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(percent_decode("%ff"), None);
    }
}
