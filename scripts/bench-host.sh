#!/usr/bin/env bash
# Host-service measurements (issue 15), docs/BENCHMARKS.md "A host service". Not part of
# `cargo test`; run it by hand.
#
#   scripts/bench-host.sh                  # every part
#   PARTS=exports scripts/bench-host.sh    # only the memory per export
#   PARTS=hits scripts/bench-host.sh       # only the cache-hit counters
#
# Parts (PARTS, default "exports snapshot restart"):
#   exports   RSS of one `mcow serve --control` holding N exports (N = EXPORTS, default 100), each
#             its own writable disk on one shared base (SIZE_MIB, default 1024, with DATA_MIB of
#             pseudo-random data, default 256, 64 KiB blocks), added one by one with `mcow ctl
#             add`; then every export read once by nbdinfo (a connection each, closed). Prints
#             RSS with no export, after the adds, after the reads, and per export.
#   snapshot  the engine example `snapshot_pause`: the snapshot call, the switch, the writer's
#             slowest write during the call against its p99 before, and the time until the
#             frozen top is sealed, for tops holding 1 MiB to 1 GiB.
#   hits      the cache-hit counters (mcow_export_cache_hits_total, _misses_total) and the
#             fetches of a disk pulled lazily from a file:// image of the same base (DATA_MIB of
#             data), scraped from `serve --metrics` after each of: a cold whole-disk copy
#             (`nbdcopy`, 4 connections, 64 requests in flight), the same copy again (warm), and,
#             on a fresh cache, 20 s of random 4 KiB reads (fio, iodepth 8) then 20 s more.
#             Prints block reads, hits, misses, hit ratio, fetch requests and MiB fetched per phase.
#   restart   a QEMU guest (TCG; scripts/vm-assets.sh, vmmode=writer) writing 16 KiB files, each
#             followed by sync, to an ext4 disk that `mcow serve --control --state` serves under
#             systemd-socket-activate (restarted by a shell loop, as systemd's Restart=always);
#             the server is killed (KILL) at 10 s and stopped (TERM) at 20 s. Prints the guest's
#             synced files per second before, the longest pause between two synced files at
#             each restart, and the rate after.
#
# Environment: MCOW (default: a release build of this checkout), BENCH_DIR (default
# target/bench-host; removed at the end, but for base.raw).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PARTS=${PARTS:-"exports snapshot hits restart"}
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
# base.raw: SIZE_MIB with DATA_MIB of pseudo-random data first (made once, kept).
make_base_raw() {
    if [[ ! -f base.raw || $(stat -c %s base.raw) -ne $((SIZE_MIB << 20)) ]]; then
        head -c "$((DATA_MIB << 20))" /dev/urandom >base.raw.tmp
        truncate -s "$((SIZE_MIB << 20))" base.raw.tmp
        mv base.raw.tmp base.raw
    fi
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); mcow $MCOW"

for part in $PARTS; do
    case $part in
    exports)
        rm -rf run && mkdir run
        make_base_raw
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
    hits)
        rm -rf run && mkdir run
        make_base_raw
        "$MCOW" import -q base.raw run/base >/dev/null
        "$MCOW" push -q run/base "file://$PWD/run/images/base:v1" >/dev/null
        echo
        echo "| phase | block reads | hits | misses | hit ratio | fetch requests | MiB fetched |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        scrape() { # -> "hits misses requests bytes" of export img
            curl -sS "$METRICS" | awk '
                /^mcow_export_cache_hits_total\{export="img"\}/ {h = $2}
                /^mcow_export_cache_misses_total\{export="img"\}/ {m = $2}
                /^mcow_export_fetch_requests_total\{export="img"\}/ {r = $2}
                /^mcow_export_fetched_bytes_total\{export="img"\}/ {b = $2}
                END {print h + 0, m + 0, r + 0, b + 0}'
        }
        row() { # phase "before" "after"
            awk -v p="$1" -v a="$2" -v b="$3" 'BEGIN { split(a, x, " "); split(b, y, " ")
                h = y[1] - x[1]; m = y[2] - x[2]; n = h + m
                printf "| %s | %d | %d | %d | %.3f | %d | %.1f |\n", p, n, h, m, (n ? h / n : 0), y[3] - x[3], (y[4] - x[4]) / 1048576 }'
        }
        start_lazy() {
            rm -rf run/cache run/log
            "$MCOW" serve -k "$PWD/run/nbd.sock" --cache "$PWD/run/cache" --metrics 127.0.0.1:0 \
                "img=file://$PWD/run/images/base:v1" -r 2>run/log &
            PID=$!
            for ((i = 0; i < 1000; i++)); do grep -q '^mcow: serving on' run/log 2>/dev/null && break; sleep 0.02; done
            METRICS=$(sed -n 's/^mcow: metrics on //p' run/log)
            URI="nbd+unix:///img?socket=$PWD/run/nbd.sock"
        }
        start_lazy
        s0=$(scrape)
        nbdcopy "$URI" null:
        s1=$(scrape); row "cold copy (nbdcopy)" "$s0" "$s1"
        nbdcopy "$URI" null:
        s2=$(scrape); row "warm copy" "$s1" "$s2"
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
        start_lazy
        fio_rand() { fio --name=r --ioengine=nbd --uri="$URI" --rw=randread --bs=4k --iodepth=8 \
            --runtime=20 --time_based --norandommap --randrepeat=0 --output=/dev/null; }
        s0=$(scrape)
        fio_rand
        s1=$(scrape); row "random 4 KiB, first 20 s" "$s0" "$s1"
        fio_rand
        s2=$(scrape); row "random 4 KiB, next 20 s" "$s1" "$s2"
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
        rm -rf run
        ;;
    restart)
        bash "$ROOT/scripts/vm-assets.sh" "$ROOT/target/vm-assets" >/dev/null
        rm -rf run && mkdir run
        head -c $((64 << 20)) /dev/zero >run/fs.raw
        mkfs.ext4 -q -F -b 4096 run/fs.raw
        "$MCOW" import -q run/fs.raw run/base >/dev/null
        "$MCOW" create -q --from run/base run/vm >/dev/null
        (cd run && exec timeout 300 systemd-socket-activate -l "$PWD/nbd.sock" -l "$PWD/ctl.sock" bash -c \
            "while [ ! -e stop ]; do (echo \$BASHPID > serve.pid; LISTEN_PID= exec $MCOW serve --control ctl.sock --state state.json 2>>serve.log); done") &
        SUP=$!
        for ((i = 0; i < 500; i++)); do [[ -S run/ctl.sock ]] && break; sleep 0.02; done
        "$MCOW" ctl -c run/ctl.sock add vm "$PWD/run/vm" >/dev/null
        A=$ROOT/target/vm-assets
        (timeout 300 qemu-system-x86_64 -accel tcg -m 256 -smp 1 -nographic -no-reboot -nodefaults \
            -serial stdio -kernel "$A/vmlinux" -initrd "$A/initrd.cpio.gz" \
            -append "console=ttyS0 panic=-1 quiet vmid=1 vmmode=writer vmwrites=100000" \
            -blockdev "driver=nbd,node-name=d0,server.type=unix,server.path=$PWD/run/nbd.sock,export=vm,reconnect-delay=30" \
            -device virtio-blk-pci,drive=d0 </dev/null 2>&1 | while IFS= read -r line; do
                printf '%s %s\n' "$(date +%s.%N)" "$line"
            done >run/console) &
        QEMU=$!
        for ((i = 0; i < 3000; i++)); do grep -q 'MCOW-VM-FLUSHED id=1 n=' run/console 2>/dev/null && break; sleep 0.01; done
        t0=$(date +%s.%N)
        sleep 10; tk=$(date +%s.%N); kill -KILL "$(cat run/serve.pid)"
        sleep 10; tt=$(date +%s.%N); kill -TERM "$(cat run/serve.pid)"
        sleep 10; t1=$(date +%s.%N)
        touch run/stop; kill -TERM "$(cat run/serve.pid)" 2>/dev/null || true
        pkill -f "vmid=1 vmmode=writer vmwrites=100000" || true
        wait "$QEMU" 2>/dev/null || true; wait "$SUP" 2>/dev/null || true
        echo
        echo "| phase | synced files/s | longest pause between two synced files |"
        echo "|---|---:|---:|"
        grep 'MCOW-VM-FLUSHED' run/console | awk -v t0="$t0" -v tk="$tk" -v tt="$tt" -v t1="$t1" '
            { t = $1; if (prev != "") { gap = t - prev
                  if (t > tk && prev < tk + 5 && gap > gk) gk = gap
                  if (t > tt && prev < tt + 5 && gap > gt) gt = gap
                  if (t <= tk && t >= t0 && gap > gb) gb = gap }
              prev = t
              if (t >= t0 && t < tk) nb++
              if (t >= tt + 5 && t < t1) na++ }
            END { printf "| before (%.0f s) | %.1f | %.3f s |\n", tk - t0, nb / (tk - t0), gb
                  printf "| kill -9, restart | | %.3f s |\n", gk
                  printf "| SIGTERM, restart | | %.3f s |\n", gt
                  printf "| after (%.0f s) | %.1f | |\n", t1 - tt - 5, na / (t1 - tt - 5) }'
        grep -c 'I/O error' run/console | awk '{ print "guest console lines with an I/O error: " $1 }'
        rm -rf run
        ;;
    *) echo "bench-host: unknown part $part" >&2; exit 2 ;;
    esac
done
