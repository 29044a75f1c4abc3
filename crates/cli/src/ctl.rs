//! `mcow ctl`: the client of `mcow serve --control`'s control API (docs/CONTROL.md). Owns the
//! verbs' arguments, their output, and a minimal HTTP/1.1 client over a Unix socket.
//!
//! The client is written by hand: one request per connection (`Connection: close`), the
//! answer read to its end and split at the blank line. Neither `ureq` (already a dependency,
//! but it connects over TCP only unless given a custom transport) nor the remote crate's
//! client speak HTTP over a Unix socket without more code than these few lines, and the server
//! is ours: it always sends `Content-Length` bodies of JSON, never chunks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::output::{OutputFormat, human_size, print_json};

/// The control socket `mcow ctl` talks to unless told otherwise.
pub const DEFAULT_CONTROL: &str = "mcow-control.sock";

/// Talk to a running `mcow serve --control`: list, add, remove and snapshot exports.
#[derive(Debug, clap::Args)]
#[command(long_about = "Talk to a running `mcow serve --control SOCKET`: list its exports with their \
    clients and counters, add one (a disk directory, or an image reference pulled lazily into the \
    server's --cache), remove one (its in-flight requests finish, its clients are disconnected, its \
    disk is flushed; the verb returns when that is done), snapshot one (its top frozen and a new one \
    started at once, the frozen top then sealed into a layer).\n\n\
    The API is HTTP with JSON bodies on the Unix socket, so curl is a client too: \
    `curl --unix-socket SOCKET http://x/exports` (docs/CONTROL.md).\n\n\
    Examples:\n  mcow serve -k /tmp/nbd.sock --control /tmp/mcow.ctl &\n  \
    mcow ctl -c /tmp/mcow.ctl add vm ./vm\n  \
    mcow ctl -c /tmp/mcow.ctl add base oci://127.0.0.1:5000/mcow/vm:v1 --read-only\n  \
    mcow ctl -c /tmp/mcow.ctl list\n  mcow ctl -c /tmp/mcow.ctl snapshot vm --wait\n  \
    mcow ctl -c /tmp/mcow.ctl remove vm")]
pub struct CtlArgs {
    /// The server's control socket (its --control).
    #[arg(short = 'c', long, value_name = "SOCKET", default_value = DEFAULT_CONTROL, global = true)]
    pub control: PathBuf,
    #[command(subcommand)]
    pub verb: CtlVerb,
}

/// What `mcow ctl` does.
#[derive(Debug, clap::Subcommand)]
pub enum CtlVerb {
    /// List the exports: name, disk, size, read-only, clients connected, counters.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Add an export of a disk directory or an image reference (pulled lazily into the
    /// server's --cache), selectable by clients at once.
    Add {
        /// The export name.
        name: String,
        /// A disk directory (as the server sees it: relative to its working directory) or an
        /// image reference (file://, http(s)://, oci://, s3://).
        #[arg(value_name = "DISK|REF")]
        disk: String,
        /// Serve it read-only (required for a disk another export already serves).
        #[arg(short = 'r', long)]
        read_only: bool,
        /// For a lazily pulled disk: its fetch window, in blocks, instead of the server's
        /// (see `mcow serve --help`). Fetch options apply when this export opens the disk; an
        /// export of a disk already served must ask for none or the same.
        #[arg(long, value_name = "BLOCKS", value_parser = clap::value_parser!(u64).range(1..=4096))]
        fetch_window: Option<u64>,
        /// For a lazily pulled disk: its read-ahead limit (say, 64M; 0: none) instead of the
        /// server's.
        #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
        readahead: Option<u64>,
        /// For a lazily pulled disk: do not prefetch its trace's blocks.
        #[arg(long)]
        no_prefetch: bool,
        /// For a lazily pulled disk: download every remaining block in the background (not
        /// with a server --cache-limit).
        #[arg(long)]
        fetch_all: bool,
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Remove an export: its in-flight requests finish, its clients are disconnected, its
    /// disk is flushed; returns when that is done.
    Remove {
        /// The export name.
        name: String,
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Snapshot an export's disk while it is in use: its writable top is frozen and a new
    /// empty top started at once (writes are not paused while anything is copied), then the
    /// frozen top is sealed into a new layer in the background (with --wait: before this
    /// returns, printing the layer's digest). The new layer can then be pushed.
    Snapshot {
        /// The export name (the export that writes the disk).
        name: String,
        /// Wait until the new layer is sealed, and print its digest.
        #[arg(long)]
        wait: bool,
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// Runs a `mcow ctl` verb.
pub fn run(args: CtlArgs) -> Result<ExitCode> {
    let sock = &args.control;
    match args.verb {
        CtlVerb::List { output } => {
            let v = request(sock, "GET", "/exports", None)?;
            match output {
                OutputFormat::Json => print_json(&v)?,
                OutputFormat::Human => print_list(&v),
            }
        }
        CtlVerb::Add { name, disk, read_only, fetch_window, readahead, no_prefetch, fetch_all, output } => {
            let mut fetch = serde_json::Map::new();
            if let Some(w) = fetch_window {
                fetch.insert("window".into(), w.into());
            }
            if let Some(r) = readahead {
                fetch.insert("readahead".into(), r.into());
            }
            if no_prefetch {
                fetch.insert("prefetch".into(), false.into());
            }
            if fetch_all {
                fetch.insert("all".into(), true.into());
            }
            let body =
                serde_json::json!({ "name": name, "disk": disk, "read_only": read_only, "fetch": fetch });
            let v = request(sock, "POST", "/exports", Some(&body))?;
            match output {
                OutputFormat::Json => print_json(&v)?,
                OutputFormat::Human => println!("added {}", describe(&v)),
            }
        }
        CtlVerb::Remove { name, output } => {
            let v = request(sock, "DELETE", &format!("/exports/{}", percent_encode(&name)), None)?;
            match output {
                OutputFormat::Json => print_json(&v)?,
                OutputFormat::Human => println!("removed {}", describe(&v)),
            }
        }
        CtlVerb::Snapshot { name, wait, output } => {
            let path = format!(
                "/exports/{}/snapshot{}",
                percent_encode(&name),
                if wait { "?wait=true" } else { "" }
            );
            let v = request(sock, "POST", &path, None)?;
            match output {
                OutputFormat::Json => print_json(&v)?,
                OutputFormat::Human => {
                    println!(
                        "snapshot of {}: top {} frozen in {} µs (writes held up at most {} µs), new top {}",
                        v["export"].as_str().unwrap_or("?"),
                        v["frozen"].as_str().unwrap_or("?"),
                        v["took_us"].as_u64().unwrap_or(0),
                        v["switch_us"].as_u64().unwrap_or(0),
                        v["top"].as_str().unwrap_or("?"),
                    );
                    match v["layer"].as_str() {
                        Some(layer) => println!("{layer}"),
                        None => {
                            println!("sealing it in the background (mcow info lists the layer when ready)")
                        }
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `NAME: DISK (SIZE, read-only)`.
fn describe(e: &Value) -> String {
    let ro = if e["read_only"].as_bool() == Some(true) { ", read-only" } else { "" };
    format!(
        "{}: {} ({}{ro})",
        e["name"].as_str().unwrap_or("?"),
        e["reference"].as_str().or(e["disk"].as_str()).unwrap_or("?"),
        human_size(e["size"].as_u64().unwrap_or(0)),
    )
}

fn print_list(v: &Value) {
    let exports = v["exports"].as_array().cloned().unwrap_or_default();
    if exports.is_empty() {
        println!("no exports");
        return;
    }
    println!(
        "{:<16} {:>9} {:>3} {:>7} {:>9} {:>10} {:>10} {:>6}  disk",
        "name", "size", "ro", "clients", "requests", "read", "written", "errors"
    );
    for e in &exports {
        let n = |k: &str| e[k].as_u64().unwrap_or(0);
        println!(
            "{:<16} {:>9} {:>3} {:>7} {:>9} {:>10} {:>10} {:>6}  {}",
            e["name"].as_str().unwrap_or("?"),
            human_size(n("size")),
            if e["read_only"].as_bool() == Some(true) { "yes" } else { "no" },
            n("clients"),
            n("requests"),
            human_size(n("bytes_read")),
            human_size(n("bytes_written")),
            n("errors"),
            e["reference"].as_str().or(e["disk"].as_str()).unwrap_or("?"),
        );
    }
}

/// Percent-encodes what a path segment cannot hold as it is.
fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One request to the control API; the JSON answer, or its `error` as the error.
fn request(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let mut stream = UnixStream::connect(sock).with_context(|| {
        format!("connecting to the control socket {} (is `mcow serve --control` running?)", sock.display())
    })?;
    // Removing an export waits for its clients' requests (10 s at most, then they are cut),
    // and adding an image waits for its manifest and indexes: be patient, not for ever.
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: mcow\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .context("sending the request")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).context("reading the answer")?;
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("a truncated answer from the control API")
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {:?}", head.lines().next().unwrap_or("")))?;
    let v: Value =
        serde_json::from_str(body).with_context(|| format!("HTTP {status} with a body not JSON"))?;
    if !(200..300).contains(&status) {
        let msg = v["error"].as_str().unwrap_or("(no message)");
        bail!("{msg} (HTTP {status})");
    }
    Ok(v)
}
