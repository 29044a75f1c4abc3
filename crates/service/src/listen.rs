//! Listening sockets for an NBD [`Server`]: binds a TCP address and/or a Unix socket and runs
//! one `serve_*` thread per listener. Owns the listeners' lifetime (a Unix socket file is
//! removed when its listener ends); stopping is the server's [`ShutdownHandle`] (installed by
//! the embedding program, which owns signals).
//!
//! [`ShutdownHandle`]: mcow_nbd::ShutdownHandle

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use mcow_nbd::{Server, ServerError};

use crate::error::ServiceError;

/// Where to listen: a TCP address, a Unix socket, or both.
#[derive(Debug, Clone, Default)]
pub struct ListenOn {
    /// A TCP address such as `127.0.0.1:10809` (port 0 picks a free one).
    pub tcp: Option<String>,
    /// A Unix socket path; a file already there (a stale socket) is replaced.
    pub socket: Option<PathBuf>,
}

/// A listening socket made by another process and handed to this one (systemd socket
/// activation, `LISTEN_FDS`): served as it is; a Unix socket's file is left in place at the end
/// (it belongs to whoever made it, and outlives this process so that a restarted server takes
/// it over without refusing a connection).
#[derive(Debug)]
pub enum Inherited {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix-socket listener.
    Unix(UnixListener),
}

/// Listeners being served: one thread each, until the server is stopped.
#[derive(Debug)]
pub struct Listening {
    addrs: Vec<String>,
    threads: Vec<JoinHandle<Result<(), ServerError>>>,
}

impl Listening {
    /// Binds what `on` names and starts serving `server` on it. Nothing is served if a bind
    /// fails (the listeners bound before it are closed).
    pub fn start(server: &Arc<Server>, on: &ListenOn) -> Result<Listening, ServiceError> {
        Listening::start_with(server, on, Vec::new())
    }

    /// [`Listening::start`], also serving the listeners `inherited` (which may be all there
    /// is).
    pub fn start_with(
        server: &Arc<Server>,
        on: &ListenOn,
        inherited: Vec<Inherited>,
    ) -> Result<Listening, ServiceError> {
        if on.tcp.is_none() && on.socket.is_none() && inherited.is_empty() {
            return Err(ServiceError::NothingToListenOn);
        }
        let tcp = match &on.tcp {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .map_err(|source| ServiceError::Bind { addr: addr.clone(), source })?;
                let local =
                    l.local_addr().map_err(|source| ServiceError::Bind { addr: addr.clone(), source })?;
                Some((l, format!("nbd://{local}")))
            }
            None => None,
        };
        let unix = match &on.socket {
            Some(path) => {
                let bind_err = |source| ServiceError::Bind { addr: path.display().to_string(), source };
                if path.exists() {
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                let l = UnixListener::bind(path).map_err(bind_err)?;
                Some((l, path.clone()))
            }
            None => None,
        };
        let mut addrs = Vec::new();
        let mut threads = Vec::new();
        if let Some((listener, addr)) = tcp {
            addrs.push(addr);
            let s = Arc::clone(server);
            threads.push(std::thread::spawn(move || s.serve_tcp_listener(listener)));
        }
        if let Some((listener, path)) = unix {
            addrs.push(format!("nbd+unix:///?socket={}", path.display()));
            let s = Arc::clone(server);
            threads.push(std::thread::spawn(move || {
                let r = s.serve_unix_listener(listener);
                let _ = std::fs::remove_file(&path);
                r
            }));
        }
        for listener in inherited {
            let s = Arc::clone(server);
            match listener {
                Inherited::Tcp(l) => {
                    let local = l.local_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
                    addrs.push(format!("nbd://{local}"));
                    threads.push(std::thread::spawn(move || s.serve_tcp_listener_shared(l)));
                }
                Inherited::Unix(l) => {
                    let path =
                        l.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
                    addrs.push(format!("nbd+unix:///?socket={}", path.unwrap_or_else(|| "?".into())));
                    threads.push(std::thread::spawn(move || s.serve_unix_listener_shared(l)));
                }
            }
        }
        Ok(Listening { addrs, threads })
    }

    /// The addresses served, as NBD URIs (`nbd://HOST:PORT`, `nbd+unix:///?socket=PATH`).
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Waits until every listener has stopped (after the server's stop: in-flight requests
    /// answered, exports flushed). The first error of a listener is returned.
    pub fn join(self) -> Result<(), ServiceError> {
        let mut result = Ok(());
        for t in self.threads {
            let r = match t.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => ServiceError::Server(e),
                Err(_) => ServiceError::Panicked("an NBD listener"),
            };
            if result.is_ok() {
                result = Err(r);
            }
        }
        result
    }
}
