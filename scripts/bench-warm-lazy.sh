#!/usr/bin/env bash
# Warm random 4 KiB reads of a lazily pulled disk (every block fetched already, the layer still
# partial): two mcow builds side by side, rounds alternating which goes first. Not part of
# `cargo test`; docs/BENCHMARKS.md ("A host service", cache hits) has a run.
#
#   scripts/bench-warm-lazy.sh OLD_MCOW NEW_MCOW BASE.raw     # BASE.raw: the disk's content
#
# Each build serves `img=file://…` from its own cache, read whole once by nbdcopy (round 0),
# then fio's random 4 KiB reads (iodepth 32) over the first 256 MiB for 10 s each round.
# Prints "build round IOPS" lines. Works in $BENCH_DIR (default /tmp/mcow-bench-warm, replaced).
set -euo pipefail
OLD=$(realpath "$1") NEW=$(realpath "$2") BASE=$(realpath "$3")
W=${BENCH_DIR:-/tmp/mcow-bench-warm}
rm -rf "$W" && mkdir -p "$W" && cd "$W"
trap 'rm -rf "$W"' EXIT
"$NEW" import -q "$BASE" base >/dev/null
"$NEW" push -q base "file://$W/img/base:v1" >/dev/null
run() { # name bin round
    local sock=$W/$1.sock
    "$2" serve -k "$sock" --cache "$W/cache-$1" -r "img=file://$W/img/base:v1" 2>>"log-$1" &
    local pid=$!
    for i in $(seq 500); do [[ -S $sock ]] && nbdinfo --size "nbd+unix:///img?socket=$sock" >/dev/null 2>&1 && break; sleep 0.02; done
    if [[ $3 == 0 ]]; then nbdcopy "nbd+unix:///img?socket=$sock" null:; fi
    fio --name=r --ioengine=nbd --uri="nbd+unix:///img?socket=$sock" --rw=randread --bs=4k --iodepth=32 \
        --size=256m --runtime=10 --time_based --norandommap --randrepeat=0 --output-format=json --output="$W/fio.json" >/dev/null
    echo "$1 $3 $(jq '.jobs[0].read.iops' "$W/fio.json")"
    kill $pid; wait $pid 2>/dev/null || true
}
for r in 0 1 2 3; do
    if (( r % 2 )); then run new "$NEW" $r; run old "$OLD" $r; else run old "$OLD" $r; run new "$NEW" $r; fi
done
