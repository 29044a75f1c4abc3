//! Output helpers: the `--output` choice, human-readable sizes, JSON printing.

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
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).context("writing JSON")?;
    writeln!(out).context("writing output")?;
    Ok(())
}

/// Depth of a run's layer as `map` and `info` report it: 0 for the writable top, 1 for the
/// topmost sealed layer, ..., `depth` for the bottom layer, and `depth + 1` where no layer
/// holds the range.
pub fn depth_of(layer: Option<u32>, stack_depth: usize) -> u32 {
    let n = stack_depth as u32;
    match layer {
        Some(TOP) => 0,
        Some(i) => n - i,
        None => n + 1,
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
        assert_eq!(depth_of(None, 3), 4);
    }
}
