#!/usr/bin/env bash
# The whole test run, as CI runs it: install the real clients, then formatting, lints, and every
# test (unit, property, crash, corruption, and end-to-end tests with qemu-img, libnbd tools, a
# registry, nginx, an S3 server and QEMU guests), and a build of the fuzz targets. Ends with one
# line totalling the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets (fuzz/, a workspace of its own, on nightly) must keep compiling; they are
# built, not run (scripts/fuzz.sh runs them). A plain nightly build needs no cargo-fuzz.
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo +nightly build --manifest-path fuzz/Cargo.toml --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
