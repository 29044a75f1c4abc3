#!/usr/bin/env bash
# The whole test run, as CI runs it: install the real clients, then formatting, lints, and every
# test (unit, property, crash, corruption, and end-to-end tests with qemu-img and libnbd tools).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
