#!/usr/bin/env bash
# PostgreSQL benchmark (issue 14): pgbench TPS with the database on ext4 on a disk served by
# `mcow serve` (a fresh writable top on a 1-layer base holding the empty filesystem) vs `qemu-nbd`
# (a fresh qcow2 overlay on the raw base, writeback cache) vs `nbdkit file` (a fresh copy of the
# raw base: the ceiling), each seen through nbdfuse + a loop device. docs/BENCHMARKS.md, "Writes
# and flushes (issue 14)", "PostgreSQL". Not part of `cargo test`; run it by hand, as root.
#
#   scripts/bench-pgbench.sh                             # 3 rounds, 20 s per measurement
#   REPS=1 RUNTIME=5 SCALE=2 scripts/bench-pgbench.sh    # quick smoke run
#   MCOW=/path/to/other/mcow scripts/bench-pgbench.sh    # measure another build (no cargo build)
#
# Environment: REPS (rounds, default 3), RUNTIME (seconds of `pgbench -T`, default 20), SCALE
# (`pgbench -i -s`, default 10: 1 million accounts, about 160 MB), CLIENTS (-c, default 4), JOBS
# (-j, default 2), SIZE_MIB (virtual size, default 1024), SERVERS (default "mcow qemu-nbd nbdkit"),
# MCOW (the binary; default: a release build of this checkout), BENCH_DIR (default
# target/bench-pgbench; its run/ is replaced, and removed at the end).
#
# Data: base.raw, SIZE_MIB holding an empty ext4 filesystem (built once and kept); `mcow import`
# makes it the one sealed layer of a base disk (64 KiB blocks, as qcow2's default clusters).
#
# Each measurement: a fresh target and server (as scripts/bench-write.sh: mcow `create --from`,
# a new qcow2 overlay, a sparse copy of base.raw), `nbdfuse` (its default: 4 connections if the
# server offers multi-conn), `losetup`, `mount`, `initdb` (as user postgres), postgres on a Unix
# socket only (default settings: fsync on, synchronous_commit on), `pgbench -i -s SCALE`, then
# `pgbench -T RUNTIME -c CLIENTS -j JOBS` (the built-in TPC-B script): TPS without the initial
# connection time. Whether the server offers multi-conn (nbdinfo --can multi-conn), the init's
# time and the server's CPU time (utime+stime from /proc) over the run are recorded too. The server order rotates each round. Medians over rounds; ratios to
# nbdkit and to qemu-nbd.
#
# Output: markdown table on stdout, raw rows in $BENCH_DIR/results.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REPS=${REPS:-3}
RUNTIME=${RUNTIME:-20}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-4}
JOBS=${JOBS:-2}
SIZE_MIB=${SIZE_MIB:-1024}
# shellcheck disable=SC2206 # word splitting of the list is intended
SERVERS=(${SERVERS:-mcow qemu-nbd nbdkit})
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-pgbench}

[[ $(id -u) -eq 0 ]] || { echo "bench-pgbench: needs root (loop devices, mounts)" >&2; exit 2; }
PGBIN=$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -1 || true)
[[ -n $PGBIN && -x $PGBIN/pgbench ]] || { echo "bench-pgbench: PostgreSQL is required (scripts/install-deps.sh)" >&2; exit 2; }
for t in nbdkit qemu-nbd qemu-img nbdinfo nbdfuse losetup mkfs.ext4 setpriv python3; do
    command -v "$t" >/dev/null || { echo "bench-pgbench: $t is required (scripts/install-deps.sh)" >&2; exit 2; }
done
if [[ -z ${MCOW:-} ]]; then
    cargo build --quiet --release -p mcow
    MCOW=$ROOT/target/release/mcow
fi

mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
RUN=$BENCH_DIR/run
RES=$BENCH_DIR/results.tsv
LOG=$RUN/log
SIZE=$((SIZE_MIB << 20))
PID="" FUSE_PID="" LOOP="" PG_PID=""

cleanup() {
    set +e
    [[ -n $PG_PID ]] && { kill -INT "$PG_PID"; wait "$PG_PID"; }
    PG_PID=""
    mountpoint -q "$RUN/mnt" 2>/dev/null && { umount "$RUN/mnt" || umount -l "$RUN/mnt"; }
    [[ -n $LOOP ]] && losetup -d "$LOOP"
    LOOP=""
    # The loop device lets go of the FUSE file asynchronously: until it has, the mount is busy.
    for _ in $(seq 200); do [[ -z $(losetup -j "$RUN/fuse/disk.img" 2>/dev/null) ]] && break; sleep 0.05; done
    mountpoint -q "$RUN/fuse" 2>/dev/null && { umount "$RUN/fuse" || umount -l "$RUN/fuse"; }
    [[ -n $FUSE_PID ]] && wait "$FUSE_PID" 2>/dev/null
    FUSE_PID=""
    [[ -n $PID ]] && { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; }
    PID=""
    rm -rf "$RUN/target" "$RUN"/target.* "$RUN/sock" "$RUN/pgsock"/.s.PGSQL*
    set -e
}
trap 'cleanup; rm -rf "$RUN"' EXIT

rm -rf "$RUN" && mkdir -p "$RUN"/{fuse,mnt,pgsock}
chmod 755 "$RUN"
chown postgres: "$RUN/pgsock"
: >"$RES"

echo "# $(date -u +%Y-%m-%dT%H:%MZ); nproc $(nproc); kernel $(uname -r); fs $(df -T . | awk 'NR==2 {print $2}')"
echo "# $(nbdkit --version | head -1); $(qemu-nbd --version | head -1); $("$PGBIN/postgres" --version); nbdfuse $(nbdfuse --version | head -1 | awk '{print $2}'); mcow $MCOW"
echo "# size ${SIZE_MIB} MiB ext4, rounds ${REPS}, pgbench -i -s ${SCALE}, pgbench -T ${RUNTIME} -c ${CLIENTS} -j ${JOBS}"

if [[ ! -f base.raw || $(stat -c %s base.raw) -ne $SIZE ]]; then
    rm -f base.raw.tmp
    truncate -s "$SIZE" base.raw.tmp
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 base.raw.tmp
    mv base.raw.tmp base.raw
fi
"$MCOW" import -q base.raw "$RUN/base" >/dev/null

TCK=$(getconf CLK_TCK)
# shellcheck source=lib/write-servers.sh
source "$ROOT/scripts/lib/write-servers.sh"

start_server() { # server -> sets PID, URI
    start_write_server "$1" "$RUN" base.raw "$LOG.$1"
}

mount_and_start_postgres() {
    local i
    nbdfuse "$RUN/fuse/disk.img" "$URI" 2>>"$LOG.nbdfuse" & FUSE_PID=$!
    for ((i = 0; i < 400; i++)); do [[ -e $RUN/fuse/disk.img ]] && break; sleep 0.05; done
    [[ -e $RUN/fuse/disk.img ]] || { echo "bench-pgbench: nbdfuse did not start" >&2; exit 1; }
    LOOP=$(losetup -f --show "$RUN/fuse/disk.img")
    mount -t ext4 "$LOOP" "$RUN/mnt"
    install -d -o postgres -g postgres -m 700 "$RUN/mnt/pgdata"
    setpriv --reuid=postgres --regid=postgres --init-groups \
        "$PGBIN/initdb" -D "$RUN/mnt/pgdata" -U postgres --auth=trust -E UTF8 --locale=C >>"$LOG.initdb" 2>&1
    setpriv --reuid=postgres --regid=postgres --init-groups \
        "$PGBIN/postgres" -D "$RUN/mnt/pgdata" -k "$RUN/pgsock" -c listen_addresses= >>"$LOG.postgres" 2>&1 &
    PG_PID=$!
    for ((i = 0; i < 600; i++)); do
        "$PGBIN/pg_isready" -q -h "$RUN/pgsock" -U postgres -d postgres && return 0
        kill -0 "$PG_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench-pgbench: postgres did not start: $(tail -c 500 "$LOG.postgres")" >&2
    exit 1
}

for ((r = 0; r < REPS; r++)); do
    for ((k = 0; k < ${#SERVERS[@]}; k++)); do
        s=${SERVERS[$(((k + r) % ${#SERVERS[@]}))]}
        start_server "$s"
        mc=no
        if nbdinfo --can multi-conn "$URI"; then mc=yes; fi
        mount_and_start_postgres
        t0=$(date +%s.%N)
        "$PGBIN/pgbench" -h "$RUN/pgsock" -U postgres -i -q -s "$SCALE" postgres >>"$LOG.$s.client" 2>&1
        t1=$(date +%s.%N)
        c0=$(cpu_ticks "$PID")
        if ! "$PGBIN/pgbench" -h "$RUN/pgsock" -U postgres -T "$RUNTIME" -c "$CLIENTS" -j "$JOBS" postgres \
            >"$RUN/pgbench.out" 2>&1; then
            echo "bench-pgbench: pgbench failed on $s: $(tail -c 500 "$RUN/pgbench.out")" >&2
            exit 1
        fi
        c1=$(cpu_ticks "$PID")
        cat "$RUN/pgbench.out" >>"$LOG.$s.client"
        tps=$(awk '/^tps = / {print $3}' "$RUN/pgbench.out")
        lat=$(awk '/^latency average = / {print $4}' "$RUN/pgbench.out")
        cleanup
        printf 'run\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n' "$s" "$r" "$tps" "$lat" "$(echo "$t1 - $t0" | bc -l)" \
            "$(echo "($c1 - $c0) / $TCK" | bc -l)" "$mc" >>"$RES"
    done
done

python3 - "$RES" <<'EOF'
import statistics as st, sys
from collections import defaultdict
runs = defaultdict(list)
multi = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    if f[0] == "run":
        runs[f[1]].append((float(f[3]), float(f[4]), float(f[5]), float(f[6])))
        multi[f[1]] = f[7]
med = {s: [st.median(x[i] for x in v) for i in range(4)] + [len(v)] for s, v in runs.items()}
print("\n| server | multi-conn | TPS | latency ms | init s | server CPU s | vs nbdkit | vs qemu-nbd | rounds (TPS each) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|")
for s in ("mcow", "qemu-nbd", "nbdkit"):
    m = med.get(s)
    if not m: continue
    rn = f"{m[0] / med['nbdkit'][0]:.2f}" if "nbdkit" in med else "-"
    rq = f"{m[0] / med['qemu-nbd'][0]:.2f}" if "qemu-nbd" in med else "-"
    each = ", ".join(f"{x[0]:.0f}" for x in runs[s])
    print(f"| {s} | {multi[s]} | {m[0]:,.0f} | {m[1]:.2f} | {m[2]:.1f} | {m[3]:.1f} | {rn} | {rq} | {m[4]} ({each}) |")
EOF
