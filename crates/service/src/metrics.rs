//! The service's metrics in the Prometheus text exposition format (version 0.0.4), served at
//! `GET /metrics` on the control socket. Owns the metric names, their help and types; the
//! numbers are the NBD server's per-export counters and latency histograms, the lazy disks'
//! fetch statistics and the engine's block reuse.
//!
//! Counters of an export count from when it was added (removing and adding it again starts
//! them at 0, which Prometheus reads as a counter reset).

use std::fmt::Write;

use mcow_nbd::LATENCY_BUCKETS;

use crate::service::Service;

/// Reads one counter of an export's status.
type Field = dyn Fn(&mcow_nbd::ExportStatus) -> u64;

/// A label value escaped as the format asks (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes one metric family: its help and type lines, then one sample per `(labels, value)`.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// The metrics of `service` now, as Prometheus text.
pub fn render(service: &Service) -> String {
    let statuses = service.server().exports();
    let infos = service.list();
    let mut out = String::new();
    family(
        &mut out,
        "mcow_exports",
        "gauge",
        "Exports served now.",
        &[(String::new(), statuses.len().to_string())],
    );
    let per = |f: &Field| -> Vec<(String, String)> {
        statuses.iter().map(|s| (format!("{{export=\"{}\"}}", escape(&s.name)), f(s).to_string())).collect()
    };
    family(
        &mut out,
        "mcow_export_clients",
        "gauge",
        "Clients connected to the export now.",
        &per(&|s| s.clients),
    );
    let counters: [(&str, &str, &Field); 5] = [
        ("mcow_export_connections_total", "Connections to the export since it was added.", &|s| {
            s.connections
        }),
        ("mcow_export_requests_total", "NBD requests received by the export.", &|s| s.requests),
        ("mcow_export_read_bytes_total", "Bytes read from the export by its clients.", &|s| s.bytes_read),
        ("mcow_export_written_bytes_total", "Bytes written to the export by its clients.", &|s| {
            s.bytes_written
        }),
        ("mcow_export_errors_total", "I/O errors returned to the export's clients.", &|s| s.io_errors),
    ];
    for (name, help, f) in counters {
        family(&mut out, name, "counter", help, &per(f));
    }

    let name = "mcow_export_request_duration_seconds";
    let _ = writeln!(out, "# HELP {name} Time from reading an NBD request to sending its reply.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for s in &statuses {
        let export = escape(&s.name);
        let mut cumulative = 0u64;
        for (i, count) in s.latency_counts.iter().enumerate() {
            cumulative += count;
            let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{export=\"{export}\",le=\"{le}\"}} {cumulative}");
        }
        let sum = s.latency_sum_nanos as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{export=\"{export}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{export=\"{export}\"}} {cumulative}");
    }

    let fetch = |f: &dyn Fn(&crate::ExportInfo) -> u64| -> Vec<(String, String)> {
        infos.iter().map(|i| (format!("{{export=\"{}\"}}", escape(&i.name)), f(i).to_string())).collect()
    };
    family(
        &mut out,
        "mcow_export_fetched_bytes_total",
        "counter",
        "Bytes the export's disk fetched from its origin since it was opened (shared by the exports of one disk).",
        &fetch(&|i| i.bytes_fetched),
    );
    family(
        &mut out,
        "mcow_export_fetch_requests_total",
        "counter",
        "Range requests the export's disk sent to its origin since it was opened.",
        &fetch(&|i| i.fetch_requests),
    );
    family(
        &mut out,
        "mcow_export_fetch_errors_total",
        "counter",
        "Fetches from the export's origin that failed after their retries (their reads got an I/O error; shared by the disks of one origin).",
        &fetch(&|i| i.fetch_errors),
    );
    family(
        &mut out,
        "mcow_export_fetch_retries_total",
        "counter",
        "Retries of requests to the export's origin after transient failures (shared by the disks of one origin).",
        &fetch(&|i| i.fetch_retries),
    );
    family(
        &mut out,
        "mcow_export_cache_hits_total",
        "counter",
        "Block reads of the export's lazily fetched layers that found the block local (shared by the exports of one disk).",
        &fetch(&|i| i.cache_hits),
    );
    family(
        &mut out,
        "mcow_export_cache_misses_total",
        "counter",
        "Block reads of the export's lazily fetched layers that fetched the block or waited for its fetch (shared by the exports of one disk).",
        &fetch(&|i| i.cache_misses),
    );
    let reused = service.reuse_stats();
    family(
        &mut out,
        "mcow_reused_blocks_total",
        "counter",
        "Blocks copied from other local layers with the same hash instead of fetched.",
        &[(String::new(), reused.blocks.to_string())],
    );
    family(
        &mut out,
        "mcow_reused_bytes_total",
        "counter",
        "Bytes copied from other local layers with the same hash instead of fetched.",
        &[(String::new(), reused.bytes.to_string())],
    );
    if let Some(c) = service.cache_stats() {
        let one = |v: u64| [(String::new(), v.to_string())];
        family(
            &mut out,
            "mcow_cache_limit_bytes",
            "gauge",
            "The bounded cache's limit (--cache-limit).",
            &one(c.limit),
        );
        family(
            &mut out,
            "mcow_cache_bytes",
            "gauge",
            "Bytes of fetched blocks the open partial layers hold now.",
            &one(c.bytes),
        );
        family(
            &mut out,
            "mcow_cache_dropped_blocks_total",
            "counter",
            "Fetched blocks dropped from the bounded cache (fetched again if read).",
            &one(c.dropped_blocks),
        );
        family(
            &mut out,
            "mcow_cache_dropped_bytes_total",
            "counter",
            "Bytes of fetched blocks dropped from the bounded cache.",
            &one(c.dropped_bytes),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }
}
