//! Output helpers: the `--output` choice, human-readable sizes, JSON printing, and stdout as
//! the verbs write it (a reader that went away, as `| head -1` does, is told apart from other
//! failures so that `main` can end quietly).

use std::io::Write;

use anyhow::{Context, Result};
use mcow_engine::{Digest, TOP};

/// `--output human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text for people; its layout may change between versions.
    #[default]
    Human,
    /// JSON with stable snake_case keys, for scripts.
    Json,
}

/// `1.5 MiB`, `64 KiB`, `512 B`: binary units, like `qemu-img info`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    // Three significant digits, like qemu-img: 1.13 MiB, 68.2 KiB, 516 KiB.
    let digits = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    let mut s = format!("{v:.digits$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {}", UNITS[unit])
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(value).context("encoding JSON")?;
    text.push(b'\n');
    let mut out = stdout();
    out.write_all(&text).context("writing output")?;
    out.flush().context("writing output")?;
    Ok(())
}

/// What a write to stdout fails with when its reader has gone (EPIPE): see [`stdout`].
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed by its reader")
    }
}

impl std::error::Error for StdoutClosed {}

/// Stdout, locked, whose writes fail with an `io::Error` carrying [`StdoutClosed`] when the
/// reader has gone, so that [`closed_stdout`] can tell that from any other broken pipe (a
/// remote's connection, a child's stdin), which stays an error.
pub fn stdout() -> Stdout {
    Stdout(std::io::stdout().lock())
}

/// See [`stdout`].
pub struct Stdout(std::io::StdoutLock<'static>);

fn mark_closed(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(mark_closed)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(mark_closed)
    }
}

/// True if `e` is (or was caused by) a write to [`stdout`] after its reader went away: the
/// reader wanted no more (`mcow map d | head -1`), so `main` exits 0 without a message, as
/// `cat` and `ls` end quietly there.
pub fn closed_stdout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<StdoutClosed>()
            || c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|i| i.is::<StdoutClosed>())
    })
}

/// Depth of a run's layer as `map` and `info` report it, as `qemu-img map` counts a backing
/// chain: 0 for the writable top, 1 for the topmost sealed layer, ..., `stack_depth` for the
/// bottom layer; a range no layer holds gets the bottom's depth too (qemu-img 10 reports an
/// unallocated range at the depth of the last image of the chain), told apart by
/// `present: false`.
pub fn depth_of(layer: Option<u32>, stack_depth: usize) -> u32 {
    let n = stack_depth as u32;
    match layer {
        Some(TOP) => 0,
        Some(i) => n - i,
        None => n,
    }
}

/// The name of a run's layer: its digest, `"top"`, or `None`.
pub fn layer_name(layer: Option<u32>, digests: &[Digest], short: bool) -> Option<String> {
    match layer {
        Some(TOP) => Some("top".into()),
        Some(i) => {
            let d = &digests[i as usize];
            Some(if short { d.short() } else { d.to_string() })
        }
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(528_800), "516 KiB");
        assert_eq!(human_size(69_856), "68.2 KiB");
    }

    #[test]
    fn depths() {
        assert_eq!(depth_of(Some(TOP), 3), 0);
        assert_eq!(depth_of(Some(2), 3), 1);
        assert_eq!(depth_of(Some(0), 3), 3);
        assert_eq!(depth_of(None, 3), 3, "unallocated: the bottom's depth, as qemu-img");
        assert_eq!(depth_of(None, 0), 0, "a disk with no sealed layer is a chain of one image");
    }

    /// A closed stdout is recognised through the context the verbs add, and only it: another
    /// broken pipe is an error like any other.
    #[test]
    fn a_closed_stdout_is_told_apart() {
        let closed =
            anyhow::Error::new(mark_closed(std::io::ErrorKind::BrokenPipe.into())).context("writing output");
        assert!(closed_stdout(&closed));
        let other =
            anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("pushing");
        assert!(!closed_stdout(&other));
    }
}
