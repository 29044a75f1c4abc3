#!/usr/bin/env bash
# NBD benchmark: `mcow serve` vs `qemu-nbd` (equivalent qcow2 backing chain) vs `nbdkit file`
# (the flat raw file: the transport ceiling). docs/BENCHMARKS.md, "NBD: mcow serve vs qemu-nbd
# (qcow2 chain) vs nbdkit (flat raw)". Not part of `cargo test`; run it by hand.
#
#   scripts/bench-nbd.sh                       # depths 1 16 256 1024, 1 GiB, 3 rounds
#   DEPTHS="1 16" REPS=1 RUNTIME=2 SIZE_MIB=256 scripts/bench-nbd.sh   # quick smoke run
#
# Environment: DEPTHS (default "1 16 256 1024"), REPS (rounds, default 3), RUNTIME (seconds of
# random reads per measurement, default 5), IODEPTH (fio iodepth, default 32), SIZE_MIB
# (default 1024), BENCH_DIR (default target/bench-nbd; its contents are replaced).
#
# Data: one flat raw file of pseudo-random bytes (/dev/urandom), built once. For each depth D,
# an mcow disk and a qcow2 chain (64 KiB clusters) of D layers where layer i holds exactly the
# 64 KiB blocks b with b % D == i (interleaved, so random reads hit every layer), both built
# by scripts/nbd-randread.py over NBD. One depth at a time is on disk (about 3x SIZE).
#
# Per depth: all three servers run side by side, read-only, on Unix sockets. Each is first
# read whole once with `nbdcopy URI - | sha256sum` and checked against the flat file (this also
# warms the page cache and mcow's per-block verification). Then REPS rounds, the server order
# rotating each round; per server: sequential = `nbdcopy URI null:` (timed), random = fio's nbd
# engine, 4 KiB uniform random reads, iodepth IODEPTH, RUNTIME seconds. The server's CPU time
# (utime+stime from /proc) over each measurement is recorded too. Medians over rounds; ratios
# to nbdkit; mcow's deepest/shallowest ratio. A server that fails (e.g. qemu-nbd on a very deep
# chain) is reported as "failed: <error>", not hidden.
#
# Output: markdown tables on stdout, raw rows in $BENCH_DIR/results.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEPTHS=${DEPTHS:-"1 16 256 1024"}
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-5}
IODEPTH=${IODEPTH:-32}
SIZE_MIB=${SIZE_MIB:-1024}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-nbd}
PY=/usr/bin/python3 # Debian's python3 has the libnbd bindings (`import nbd`); pyenv's does not
HELPER=$ROOT/scripts/nbd-randread.py

for t in nbdcopy nbdkit qemu-nbd qemu-img fio jq; do
    command -v "$t" >/dev/null || { echo "bench-nbd: $t is required" >&2; exit 2; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "bench-nbd: fio lacks the nbd engine" >&2; exit 2; }
$PY -c 'import nbd' || { echo "bench-nbd: $PY lacks libnbd's python bindings (python3-libnbd)" >&2; exit 2; }

cargo build --quiet --release -p mcow
MCOW=$ROOT/target/release/mcow
ulimit -n "$(ulimit -Hn)" # deep chains: one open file per layer (qemu-nbd, mcow)

mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
rm -rf run && mkdir run
RES=$BENCH_DIR/results.tsv
: >"$RES"
LOG=$BENCH_DIR/run/log
SIZE=$((SIZE_MIB << 20))

echo "# $(date -u +%Y-%m-%dT%H:%MZ); nproc $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); kernel $(uname -r)"
echo "# $(nbdkit --version | head -1); $(qemu-nbd --version | head -1); $(fio --version); libnbd $($PY -c 'import nbd; print(nbd.NBD().get_version())')"
echo "# size ${SIZE_MIB} MiB, depths ${DEPTHS}, rounds ${REPS}, random ${RUNTIME}s at iodepth ${IODEPTH}"

if [[ ! -f flat.raw || $(stat -c %s flat.raw) -ne $SIZE ]]; then
    head -c "$SIZE" /dev/urandom >flat.raw.tmp && mv flat.raw.tmp flat.raw
fi
FLAT_SHA=$(sha256sum flat.raw | cut -d' ' -f1)

now() { date +%s.%N; }

# The depth-1 mcow disk is kept for the whole run: at every other depth it is served alongside
# ("mcow-d1") so that mcow's depth-D / depth-1 ratio is measured side by side, not across time.
echo "## depth 1 mcow reference disk: building" >&2
mkdir -p run/mcow-d1
t0=$(now)
"$MCOW" create -s "$SIZE" run/mcow-d1/disk >/dev/null
$PY "$HELPER" build-mcow --mcow "$MCOW" --flat flat.raw --depth 1 --disk run/mcow-d1/disk
printf 'build\t1\tmcow\t%.1f\n' "$(echo "$(now) - $t0" | bc)" >>"$RES"

declare -A PID URI FAILED
ALL_SERVERS=(mcow mcow-d1 qemu-nbd nbdkit)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
TCK=$(getconf CLK_TCK)

wait_ready() { # name
    local s=$1 i
    for ((i = 0; i < 2000; i++)); do
        if [[ -S run/$s.sock ]] && nbdinfo --size "${URI[$s]}" >/dev/null 2>&1; then return 0; fi
        kill -0 "${PID[$s]}" 2>/dev/null || return 1
        sleep 0.01
    done
    return 1
}

start_servers() { # depth
    local d=$1 s top
    top=$(ls run/q/*.qcow2 | sort | tail -1)
    rm -f run/*.sock
    if ((d == 1)); then
        SERVERS=(mcow qemu-nbd nbdkit)
        "$MCOW" serve -r -k "$PWD/run/mcow.sock" "disk=$PWD/run/mcow-d1/disk" 2>>"$LOG.mcow" &
        PID[mcow]=$!
    else
        SERVERS=(mcow mcow-d1 qemu-nbd nbdkit)
        "$MCOW" serve -r -k "$PWD/run/mcow.sock" "disk=$PWD/run/mcow/disk" 2>>"$LOG.mcow" &
        PID[mcow]=$!
        "$MCOW" serve -r -k "$PWD/run/mcow-d1.sock" "disk=$PWD/run/mcow-d1/disk" 2>>"$LOG.mcow-d1" &
        PID[mcow-d1]=$!
    fi
    qemu-nbd -r -t -f qcow2 --shared=16 -k "$PWD/run/qemu-nbd.sock" -x disk "$top" 2>>"$LOG.qemu-nbd" &
    PID[qemu-nbd]=$!
    nbdkit -f -r -U "$PWD/run/nbdkit.sock" -e disk file "$PWD/flat.raw" 2>>"$LOG.nbdkit" &
    PID[nbdkit]=$!
    for s in "${SERVERS[@]}"; do
        URI[$s]="nbd+unix:///disk?socket=$PWD/run/$s.sock"
        FAILED[$s]=""
        if ! wait_ready "$s"; then
            FAILED[$s]="failed to start: $(tail -c 300 "$LOG.$s" | tr '\n\t' '  ')"
        fi
    done
}

stop_servers() {
    local s
    for s in "${SERVERS[@]}"; do
        kill "${PID[$s]}" 2>/dev/null || true
    done
    for s in "${SERVERS[@]}"; do
        wait "${PID[$s]}" 2>/dev/null || true
    done
}

for D in $DEPTHS; do
    echo "## depth $D: building" >&2
    rm -rf run/mcow run/q run/*.sock
    mkdir -p run/mcow
    t0=$(now)
    disk=run/mcow-d1/disk
    if ((D != 1)); then
        disk=run/mcow/disk
        "$MCOW" create -s "$SIZE" run/mcow/disk >/dev/null
        $PY "$HELPER" build-mcow --mcow "$MCOW" --flat flat.raw --depth "$D" --disk run/mcow/disk
        printf 'build\t%s\tmcow\t%.1f\n' "$D" "$(echo "$(now) - $t0" | bc)" >>"$RES"
    fi
    t1=$(now)
    $PY "$HELPER" build-qcow2 --flat flat.raw --depth "$D" --dir run/q >/dev/null
    t2=$(now)
    printf 'build\t%s\tqemu-nbd\t%.1f\n' "$D" "$(echo "$t2 - $t1" | bc)" >>"$RES"
    layers=$("$MCOW" info "$disk" | awk '/^sealed layers:/ {print $3}')
    [[ $layers == "$D" ]] || { echo "bench-nbd: mcow disk has $layers sealed layers, expected $D" >&2; exit 1; }

    start_servers "$D"
    # Warm-up and correctness: one full read of each export, checked against the flat file.
    for s in "${SERVERS[@]}"; do
        [[ -z ${FAILED[$s]} ]] || continue
        t0=$(now)
        if sha=$(set -o pipefail; nbdcopy "${URI[$s]}" - 2>>"$LOG.$s.client" | sha256sum | cut -d' ' -f1); then
            t1=$(now)
            printf 'warm\t%s\t%s\t%.3f\n' "$D" "$s" "$(echo "$t1 - $t0" | bc)" >>"$RES"
            if [[ $sha != "$FLAT_SHA" ]]; then
                FAILED[$s]="wrong data: sha256 $sha != flat $FLAT_SHA"
            fi
        else
            FAILED[$s]="failed: first full read: $(tail -c 300 "$LOG.$s.client" | tr '\n\t' '  ')"
        fi
        if [[ -n ${FAILED[$s]} ]]; then echo "bench-nbd: depth $D $s ${FAILED[$s]}" >&2; fi
    done

    echo "## depth $D: measuring" >&2
    for ((r = 0; r < REPS; r++)); do
        for ((k = 0; k < ${#SERVERS[@]}; k++)); do
            s=${SERVERS[$(((k + r) % ${#SERVERS[@]}))]}
            [[ -z ${FAILED[$s]} ]] || continue
            c0=$(cpu_ticks "${PID[$s]}")
            t0=$(now)
            if ! nbdcopy "${URI[$s]}" null: 2>>"$LOG.$s.client"; then
                FAILED[$s]="failed: nbdcopy: $(tail -c 300 "$LOG.$s.client" | tr '\n\t' '  ')"
                continue
            fi
            t1=$(now)
            c1=$(cpu_ticks "${PID[$s]}")
            if ! fio --name=randread --ioengine=nbd --uri="${URI[$s]}" --rw=randread --bs=4k \
                --iodepth="$IODEPTH" --runtime="$RUNTIME" --time_based --norandommap --randrepeat=0 \
                --output-format=json --output=run/fio.json >>"$LOG.$s.client" 2>&1; then
                FAILED[$s]="failed: fio: $(tail -c 300 "$LOG.$s.client" | tr '\n\t' '  ')"
                continue
            fi
            c2=$(cpu_ticks "${PID[$s]}")
            iops=$(jq '.jobs[0].read.iops' run/fio.json)
            ios=$(jq '.jobs[0].read.total_ios' run/fio.json)
            printf 'run\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n' "$D" "$s" "$r" \
                "$(echo "$t1 - $t0" | bc)" "$iops" "$ios" \
                "$(echo "($c1 - $c0) / $TCK" | bc -l)" "$(echo "($c2 - $c1) / $TCK" | bc -l)" >>"$RES"
        done
    done
    for s in "${SERVERS[@]}"; do
        if [[ -n ${FAILED[$s]} ]]; then printf 'failed\t%s\t%s\t%s\n' "$D" "$s" "${FAILED[$s]}" >>"$RES"; fi
    done
    stop_servers
    rm -rf run/mcow run/q
done
rm -rf run/mcow-d1

$PY - "$RES" "$SIZE" <<'EOF'
import statistics as st, sys
from collections import defaultdict
res, size = sys.argv[1], int(sys.argv[2])
runs, build, warm, failed = defaultdict(list), {}, {}, {}
depths = []
for line in open(res):
    f = line.rstrip("\n").split("\t")
    d = int(f[1])
    if d not in depths: depths.append(d)
    if f[0] == "run":
        runs[(d, f[2])].append((float(f[4]), float(f[5]), int(f[6]), float(f[7]), float(f[8])))
    elif f[0] == "build": build[(d, f[2])] = float(f[3])
    elif f[0] == "warm": warm[(d, f[2])] = float(f[3])
    elif f[0] == "failed": failed[(d, f[2])] = f[3]
med = {}
for k, v in runs.items():
    seq_s = st.median(x[0] for x in v)
    iops = st.median(x[1] for x in v)
    # server CPU microseconds per 4 KiB random read, and CPU seconds per GiB sequential
    us_per_read = st.median(1e6 * x[4] / x[2] for x in v)
    cpu_per_gib = st.median(x[3] / (size / 2**30) for x in v)
    med[k] = (iops, size / seq_s / 1e9, us_per_read, cpu_per_gib, len(v))
def fmt_ratio(a, b): return f"{a / b:.2f}" if b else "-"
for d in depths:
    print(f"\n### Depth {d}\n")
    print("| server | random 4K reads/s | ratio to nbdkit | sequential GB/s | ratio to nbdkit | server CPU µs / 4K read | server CPU s / GiB seq | first full read s | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = med.get((d, "nbdkit"))
    for s in ("mcow", "mcow-d1", "qemu-nbd", "nbdkit"):
        if d == 1 and s == "mcow-d1": continue
        b = build.get((d, s)); bs = f"{b:.1f}" if b is not None else "-"
        w = warm.get((d, s)); ws = f"{w:.2f}" if w is not None else "-"
        m = med.get((d, s))
        fail = failed.get((d, s))
        if m is None:
            print(f"| {s} | {fail or 'no data'} | | | | | | {ws} | {bs} |")
            continue
        note = f" ({m[4]} rounds; then {fail})" if fail else ""
        ri = fmt_ratio(m[0], base[0]) if base else "-"
        rs = fmt_ratio(m[1], base[1]) if base else "-"
        print(f"| {s}{note} | {m[0]:,.0f} | {ri} | {m[1]:.2f} | {rs} | {m[2]:.1f} | {m[3]:.2f} | {ws} | {bs} |")
print("\nmcow depth D / depth 1, measured side by side in the same rounds (mcow vs mcow-d1; target >= 0.9 at 1024): " + "; ".join(
    f"depth {d}: random {med[(d,'mcow')][0] / med[(d,'mcow-d1')][0]:.2f}, sequential {med[(d,'mcow')][1] / med[(d,'mcow-d1')][1]:.2f}"
    for d in depths if (d, "mcow") in med and (d, "mcow-d1") in med))
lo, hi = min(depths), max(depths)
a, b = med.get((lo, "mcow")), med.get((hi, "mcow"))
if a and b and lo != hi:
    print(f"mcow depth {hi} / depth {lo} across separate rounds (less reliable): random {b[0] / a[0]:.2f}, sequential {b[1] / a[1]:.2f}")
print("\nmcow / nbdkit per depth (target >= 0.9): " + "; ".join(
    f"depth {d}: random {med[(d,'mcow')][0] / med[(d,'nbdkit')][0]:.2f}, sequential {med[(d,'mcow')][1] / med[(d,'nbdkit')][1]:.2f}"
    for d in depths if (d, "mcow") in med and (d, "nbdkit") in med))
EOF
