#!/usr/bin/env bash
# Write benchmark (issue 14): `mcow serve` (a fresh writable top on a 1-layer base) vs `qemu-nbd`
# (a fresh qcow2 overlay on the raw base, writeback cache) vs `nbdkit file` (a fresh copy of the
# raw base: the ceiling). docs/BENCHMARKS.md, "Writes and flushes (issue 14)". Not part of
# `cargo test`; run it by hand.
#
#   scripts/bench-write.sh                               # 3 rounds, 10 s per measurement
#   REPS=1 RUNTIME=2 scripts/bench-write.sh              # quick smoke run
#   MCOW=/path/to/other/mcow scripts/bench-write.sh      # measure another build (no cargo build)
#   MCOW_BEFORE=/tmp/mcow-old scripts/bench-write.sh     # also serve with an older build
#                                                          ("mcow-before"), in the same rounds
#
# Environment: REPS (rounds, default 3), RUNTIME (seconds per measurement, default 10), IODEPTH
# (fio iodepth, default 32), SIZE_MIB (virtual size, default 1024), DATA_MIB (how much of the base
# holds pseudo-random data, the rest is a hole; default 256), CASES (default all four, see below),
# MCOW (the binary; default: a release build of this checkout), MCOW_BEFORE (a second mcow
# binary measured as the server "mcow-before", e.g. a build of the commit before), BENCH_DIR (default
# target/bench-write; its run/ is replaced, and removed at the end).
#
# Data: base.raw, SIZE_MIB with its first DATA_MIB of /dev/urandom bytes (built once and kept).
# `mcow import` makes it the one sealed layer of a base disk (default 64 KiB blocks, as qcow2's
# default clusters).
#
# Cases (fio's nbd engine, one job, iodepth IODEPTH, RUNTIME seconds, --time_based):
#   randwrite-fsync32  random 4 KiB writes, a flush after every 32 writes (--fsync=32)
#   randwrite-fsync1   random 4 KiB writes, a flush after every write (--fsync=1)
#   randwrite          random 4 KiB writes, no flushes
#   seqwrite-1m        sequential 1 MiB writes, no flushes
# Each measurement gets a fresh target and a fresh server: mcow `create --from` the base disk (an
# empty top), qemu-nbd a new `qemu-img create -b base.raw` overlay, nbdkit a sparse copy of
# base.raw. The server order rotates each round. The server's CPU time (utime+stime from /proc)
# over the measurement is recorded. Medians over rounds; ratios to nbdkit and to qemu-nbd.
#
# Output: markdown table on stdout, raw rows in $BENCH_DIR/results.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-10}
IODEPTH=${IODEPTH:-32}
SIZE_MIB=${SIZE_MIB:-1024}
DATA_MIB=${DATA_MIB:-256}
CASES=${CASES:-"randwrite-fsync32 randwrite-fsync1 randwrite seqwrite-1m"}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-write}

for t in nbdkit qemu-nbd qemu-img nbdinfo fio jq python3; do
    command -v "$t" >/dev/null || { echo "bench-write: $t is required (scripts/install-deps.sh)" >&2; exit 2; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "bench-write: fio lacks the nbd engine" >&2; exit 2; }
if [[ -z ${MCOW:-} ]]; then
    cargo build --quiet --release -p mcow
    MCOW=$ROOT/target/release/mcow
fi

mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
rm -rf run && mkdir run
RES=$BENCH_DIR/results.tsv
: >"$RES"
LOG=$BENCH_DIR/run/log
SIZE=$((SIZE_MIB << 20))

echo "# $(date -u +%Y-%m-%dT%H:%MZ); nproc $(nproc); kernel $(uname -r); fs $(df -T . | awk 'NR==2 {print $2}')"
echo "# $(nbdkit --version | head -1); $(qemu-nbd --version | head -1); $(fio --version); mcow $MCOW"
echo "# size ${SIZE_MIB} MiB (${DATA_MIB} MiB data), rounds ${REPS}, ${RUNTIME}s per case at iodepth ${IODEPTH}"

if [[ ! -f base.raw || $(stat -c %s base.raw) -ne $SIZE ]]; then
    head -c "$((DATA_MIB << 20))" /dev/urandom >base.raw.tmp
    truncate -s "$SIZE" base.raw.tmp
    mv base.raw.tmp base.raw
fi
"$MCOW" import -q base.raw run/base >/dev/null

SERVERS=(mcow qemu-nbd nbdkit)
if [[ -n ${MCOW_BEFORE:-} ]]; then SERVERS+=(mcow-before); fi
TCK=$(getconf CLK_TCK)
PID=""
# shellcheck source=lib/write-servers.sh
source "$ROOT/scripts/lib/write-servers.sh"

start_server() { # server -> sets PID, URI
    case $1 in
        mcow-before) start_write_server mcow "$PWD/run" base.raw "$LOG.$1" "$MCOW_BEFORE" ;;
        *) start_write_server "$1" "$PWD/run" base.raw "$LOG.$1" ;;
    esac
}

stop_server() {
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    rm -rf run/target run/target.* run/sock
}

fio_args() { # case
    local common=(--name=w --ioengine=nbd --uri="$URI" --iodepth="$IODEPTH" --runtime="$RUNTIME"
        --time_based --norandommap --randrepeat=0 --output-format=json --output=run/fio.json)
    case $1 in
        randwrite-fsync32) echo "${common[@]}" --rw=randwrite --bs=4k --fsync=32 ;;
        randwrite-fsync1) echo "${common[@]}" --rw=randwrite --bs=4k --fsync=1 ;;
        randwrite) echo "${common[@]}" --rw=randwrite --bs=4k ;;
        seqwrite-1m) echo "${common[@]}" --rw=write --bs=1m ;;
        *) echo "bench-write: unknown case $1" >&2; exit 2 ;;
    esac
}

for ((r = 0; r < REPS; r++)); do
    for c in $CASES; do
        for ((k = 0; k < ${#SERVERS[@]}; k++)); do
            s=${SERVERS[$(((k + r) % ${#SERVERS[@]}))]}
            start_server "$s"
            c0=$(cpu_ticks "$PID")
            # shellcheck disable=SC2046 # word splitting of the argument list is intended
            if ! fio $(fio_args "$c") >>"$LOG.$s.client" 2>&1; then
                echo "bench-write: fio failed on $s $c: $(tail -c 300 "$LOG.$s.client")" >&2
                exit 1
            fi
            c1=$(cpu_ticks "$PID")
            stop_server
            printf 'run\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n' "$c" "$s" "$r" \
                "$(jq '.jobs[0].write.iops' run/fio.json)" "$(jq '.jobs[0].write.bw_bytes' run/fio.json)" \
                "$(jq '.jobs[0].sync.total_ios // 0' run/fio.json)" "$(echo "($c1 - $c0) / $TCK" | bc -l)" >>"$RES"
        done
    done
done
rm -rf run

python3 - "$RES" "$RUNTIME" <<'EOF'
import statistics as st, sys
from collections import defaultdict
res, runtime = sys.argv[1], float(sys.argv[2])
runs = defaultdict(list)
cases = []
for line in open(res):
    f = line.rstrip("\n").split("\t")
    if f[0] != "run": continue
    if f[1] not in cases: cases.append(f[1])
    runs[(f[1], f[2])].append((float(f[4]), float(f[5]), float(f[6]), float(f[7])))
print("\n| case | server | writes/s | MB/s | flushes/s | server CPU s | vs nbdkit | vs qemu-nbd | rounds |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
med = {k: (st.median(x[0] for x in v), st.median(x[1] for x in v) / 1e6,
           st.median(x[2] for x in v) / runtime, st.median(x[3] for x in v), len(v)) for k, v in runs.items()}
for c in cases:
    for s in ("mcow", "mcow-before", "qemu-nbd", "nbdkit"):
        m = med.get((c, s))
        if not m: continue
        nk, q = med.get((c, "nbdkit")), med.get((c, "qemu-nbd"))
        rn = f"{m[0] / nk[0]:.2f}" if nk else "-"
        rq = f"{m[0] / q[0]:.2f}" if q else "-"
        print(f"| {c} | {s} | {m[0]:,.0f} | {m[1]:,.0f} | {m[2]:,.0f} | {m[3]:.1f} | {rn} | {rq} | {m[4]} |")
if any(k[1] == "mcow-before" for k in med):
    print("\nmcow / mcow-before: " + "; ".join(f"{c} {med[(c, 'mcow')][0] / med[(c, 'mcow-before')][0]:.2f}"
        for c in cases if (c, "mcow") in med and (c, "mcow-before") in med))
EOF
