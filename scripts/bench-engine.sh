#!/usr/bin/env bash
# Library-level benchmark of the mcow engine: reads versus stack depth (docs/BENCHMARKS.md,
# "Engine: reads vs stack depth"). Not part of `cargo test`; run it by hand.
#
#   scripts/bench-engine.sh                 # depths 1,16,256,4096, 1 GiB disk, 3 rounds
#   scripts/bench-engine.sh --breakdown     # plus a per-read cost breakdown
#   scripts/bench-engine.sh --help          # all options (layout, sizes, rounds, directory)
#
# Needs about 4.2 GiB free where the layers are written: $MCOW_BENCH_DIR if set, else
# target/bench-depth (removed at the end unless --keep). Results go to stdout: a markdown
# table plus JSON lines ({"bench":"engine_depth",...}).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release -p mcow-engine --example bench_depth
echo "# $(date -u +%Y-%m-%dT%H:%MZ); nproc $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); kernel $(uname -r)"
exec target/release/examples/bench_depth "$@"
