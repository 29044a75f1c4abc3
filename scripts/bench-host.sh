#!/usr/bin/env bash
# Host-service measurements (issue 15), docs/BENCHMARKS.md "A host service". Not part of
# `cargo test`; run it by hand.
#
#   scripts/bench-host.sh                  # both parts
#   PARTS=exports scripts/bench-host.sh    # only the memory per export
#
# Parts (PARTS, default "exports snapshot"):
#   exports   RSS of one `mcow serve --control` holding N exports (N = EXPORTS, default 100), each
#             its own writable disk on one shared base (SIZE_MIB, default 1024, with DATA_MIB of
#             pseudo-random data, default 256, 64 KiB blocks), added one by one with `mcow ctl
#             add`; then every export read once by nbdinfo (a connection each, closed). Prints
#             RSS with no export, after the adds, after the reads, and per export.
#   snapshot  the engine example `snapshot_pause`: the snapshot call, the switch, the writer's
#             slowest write during the call against its p99 before, and the time until the
#             frozen top is sealed, for tops holding 1 MiB to 1 GiB.
#
# Environment: MCOW (default: a release build of this checkout), BENCH_DIR (default
# target/bench-host; removed at the end, but for base.raw).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PARTS=${PARTS:-"exports snapshot"}
EXPORTS=${EXPORTS:-100}
SIZE_MIB=${SIZE_MIB:-1024}
DATA_MIB=${DATA_MIB:-256}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-host}
if [[ -z ${MCOW:-} ]]; then
    cargo build --release -q -p mcow
    MCOW=$ROOT/target/release/mcow
fi
mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
PID=""
cleanup() {
    if [[ -n $PID ]]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf run
}
trap cleanup EXIT
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); mcow $MCOW"

for part in $PARTS; do
    case $part in
    exports)
        rm -rf run && mkdir run
        if [[ ! -f base.raw || $(stat -c %s base.raw) -ne $((SIZE_MIB << 20)) ]]; then
            head -c "$((DATA_MIB << 20))" /dev/urandom >base.raw.tmp
            truncate -s "$((SIZE_MIB << 20))" base.raw.tmp
            mv base.raw.tmp base.raw
        fi
        "$MCOW" import -q base.raw run/base >/dev/null
        for ((i = 0; i < EXPORTS; i++)); do "$MCOW" create -q --from run/base "run/vm$i" >/dev/null; done
        "$MCOW" serve -k "$PWD/run/nbd.sock" --control "$PWD/run/ctl.sock" 2>run/log &
        PID=$!
        for ((i = 0; i < 500; i++)); do [[ -S run/ctl.sock ]] && break; sleep 0.02; done
        r0=$(rss_kib "$PID")
        for ((i = 0; i < EXPORTS; i++)); do
            "$MCOW" ctl -c run/ctl.sock add "vm$i" "$PWD/run/vm$i" >/dev/null
        done
        r1=$(rss_kib "$PID")
        for ((i = 0; i < EXPORTS; i++)); do
            nbdinfo --size "nbd+unix:///vm$i?socket=$PWD/run/nbd.sock" >/dev/null
        done
        r2=$(rss_kib "$PID")
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
        echo
        echo "| exports | RSS, none | RSS, added | RSS, each read once | per export (added) | per export (read) |"
        echo "|---:|---:|---:|---:|---:|---:|"
        awk -v n="$EXPORTS" -v a="$r0" -v b="$r1" -v c="$r2" 'BEGIN {
            printf "| %d | %.1f MiB | %.1f MiB | %.1f MiB | %.0f KiB | %.0f KiB |\n",
                n, a / 1024, b / 1024, c / 1024, (b - a) / n, (c - a) / n }'
        rm -rf run
        ;;
    snapshot)
        (cd "$ROOT" && cargo build --release -q -p mcow-engine --example snapshot_pause)
        mkdir -p run
        echo
        "$ROOT/target/release/examples/snapshot_pause" "$PWD/run" 1024
        rm -rf run
        ;;
    *) echo "bench-host: unknown part $part" >&2; exit 2 ;;
    esac
done
