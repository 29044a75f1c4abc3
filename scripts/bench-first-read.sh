#!/usr/bin/env bash
# Time to first read of a large layer: what a lazy start fetches before and after index chunks
# (docs/FORMAT.md "Config"; docs/BENCHMARKS.md "Time to first read"). Not part of `cargo test`;
# run it by hand (it writes about 3 x SIZE_MIB of files under BENCH_DIR).
#
#   scripts/bench-first-read.sh                               # this build only
#   BEFORE_BIN=/path/to/old/mcow scripts/bench-first-read.sh  # and a build without index chunks
#
# Environment: SIZE_MIB (the layer's data, default 2048: a 2 GiB layer of 64 KiB blocks),
# MCOW_BIN (default: target/release/mcow, built), BEFORE_BIN (optional: a build that predates
# index chunks; it pushes the image its own way, the older config form), REPS (first-read
# rounds, default 3), BENCH_DIR (default target/bench-first-read; its contents are replaced).
#
# Steps: start Debian's docker-registry on 127.0.0.1 (access log on, to count requests); write
# SIZE_MIB of /dev/urandom, `mcow import` it (one layer, 64 KiB blocks), `mcow push` it (with
# BEFORE_BIN too, under another tag: the same layer blob, another config). Then per build and
# round: `mcow serve --no-prefetch --cache FRESH -k SOCK REF`, time from its start to the first
# successful 64 KiB read at offset SIZE/2 (libnbd, polling every 2 ms; that block's hash lies
# outside the extent index's chunk), wait 2 s (the background fetch of the rest of the hash
# table), stop it, and take from its exit line bytes_fetched (the lazy pull plus the source's
# fetches), blocks_bytes_fetched (the source's: blocks and hash chunks) and requests (the
# source's), and from the registry's access log the GET requests during the serve (those at
# start: the manifest, the config and the lazy pull's ranged request, are all GETs less the
# source's requests).
#
# Output: a markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SIZE_MIB=${SIZE_MIB:-2048}
REPS=${REPS:-3}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-first-read}
PY=/usr/bin/python3 # Debian's python3 has libnbd's bindings
for t in docker-registry curl; do
    command -v "$t" >/dev/null || { echo "bench-first-read: $t is required" >&2; exit 2; }
done
$PY -c 'import nbd' || { echo "bench-first-read: $PY lacks python3-libnbd" >&2; exit 2; }
[ -n "${MCOW_BIN:-}" ] || cargo build --quiet --release -p mcow
MCOW=${MCOW_BIN:-$ROOT/target/release/mcow}

mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
rm -rf run && mkdir run && cd run
RUN=$PWD
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir reg
cat >reg.yml <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: false}}
storage:
  filesystem: {rootdirectory: $RUN/reg}
  maintenance: {uploadpurging: {enabled: false}}
http: {addr: 127.0.0.1:$PORT, secret: bench-first-read}
EOF
docker-registry serve reg.yml >reg.log 2>&1 &
PIDS+=("$!")
for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/" && break; sleep 0.05; done
gets() { grep -c '"GET /v2/' reg.log || true; }

head -c "${SIZE_MIB}M" /dev/urandom >raw.img
"$MCOW" import raw.img disk >/dev/null
rm raw.img
"$MCOW" push disk "oci://127.0.0.1:$PORT/bench/big:after" >/dev/null
BUILDS="after"
if [ -n "${BEFORE_BIN:-}" ]; then
    "$BEFORE_BIN" push disk "oci://127.0.0.1:$PORT/bench/big:before" >/dev/null
    BUILDS="before after"
fi
BLOB=$(stat -c %s layers/blobs/sha256/* | head -1)
OFFSET=$((SIZE_MIB * 1024 * 1024 / 2))

echo "# $(date -u +%Y-%m-%dT%H:%MZ); nproc $(nproc); kernel $(uname -r); docker-registry $(docker-registry --version 2>&1 | awk '{print $3}')"
echo "# layer: $SIZE_MIB MiB of data in 64 KiB blocks, blob $BLOB bytes; read: 64 KiB at offset $OFFSET; rounds $REPS"
echo
echo "| build | round | start bytes (pull) | GETs at start | first read ms (loopback) | source bytes after 2 s | source requests | GETs in all |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for b in $BUILDS; do
    bin=$MCOW
    [ "$b" = before ] && bin=$BEFORE_BIN
    for r in $(seq "$REPS"); do
        rm -rf cache s.sock
        g0=$(gets)
        ms=$(RUST_LOG=info $PY - "$RUN/s.sock" "$OFFSET" "$bin" serve --no-prefetch --cache cache -k "$RUN/s.sock" \
            "big=oci://127.0.0.1:$PORT/bench/big:$b" 2>serve.log <<'PYEOF'
import os, subprocess, sys, time, nbd
sock, offset, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
start = time.monotonic()
proc = subprocess.Popen(cmd, stderr=sys.stderr)
while True:
    if proc.poll() is not None:
        sys.exit(f"the server exited ({proc.returncode})")
    try:
        h = nbd.NBD()
        h.set_export_name("big")
        h.connect_unix(sock)
        h.pread(65536, offset)
        break
    except nbd.Error:
        time.sleep(0.002)
print(f"{(time.monotonic() - start) * 1000:.1f}", flush=True)
h.shutdown()
time.sleep(2)
proc.terminate()
proc.wait()
PYEOF
)
        line=$(grep 'fetched from the origin' serve.log | head -1)
        val() { echo "$line" | grep -o " $1=[0-9]*" | cut -d= -f2; }
        total=$(val bytes_fetched)
        blocks=$(val blocks_bytes_fetched)
        all=$(($(gets) - g0))
        echo "| $b | $r | $((total - blocks)) | $((all - $(val requests))) | $ms | $blocks | $(val requests) | $all |"
    done
done
