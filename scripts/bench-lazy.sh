#!/usr/bin/env bash
# Lazy deployment benchmark: an ext4 disk pushed to a local OCI registry (Debian's
# docker-registry) and served lazily with `mcow serve REF`. docs/BENCHMARKS.md, "Lazy
# deployment: bytes fetched and cold reads". Not part of `cargo test`; run it by hand.
#
#   scripts/bench-lazy.sh                            # 3 rounds, settings "4/16M 1/0 4/0 4/64M"
#   REPS=1 SETTINGS="4/16M 4/0" scripts/bench-lazy.sh  # quick run
#
# Environment: REPS (rounds, default 3), SETTINGS (serve settings W/RA, meaning --fetch-window W
# --readahead RA; default "4/16M 1/0 4/0 4/64M", the first being mcow's default),
# FIRST_REPS (time-to-first-read repeats, default 5), BENCH_DIR (default target/bench-lazy; its
# contents are replaced).
#
# Data: an ext4 filesystem (mkfs.ext4 -b 4096 -d, 256 MiB) holding 300 small files of 1-16 KB
# (etc/) and 7 larger ones of 1.5-9 MB (usr/), all /dev/urandom, about 41 MiB in all; imported
# with `mcow import` (64 KiB blocks, one layer) and pushed to oci://127.0.0.1:PORT/bench/fs:v1.
#
# 1. Fetch ratio. Fresh cache each run: `mcow serve --cache C --no-prefetch --fetch-window W
#    --readahead RA`.
#    Two clients: "nbd" reads the files' extents (from debugfs) straight over NBD, one
#    connection, nothing else (no filesystem metadata, no readahead); "fuse" mounts the export
#    (nbdfuse + losetup -r + mount -o ro) and `cat`s the files. Two file sets: "few" (2 libraries,
#    1.5 and 3 MB, plus 8 small files) and "small" (the 8 small files). Reported: (a) bytes the
#    NBD client read (the server's per-connection bytes_read), (b) bytes of file content,
#    (c) bytes fetched from the registry (the serve's exit line: bytes_fetched = header and index
#    of the lazy pull + blocks_bytes_fetched), and range requests.
# 2. Time to first read: from starting `mcow serve REF` on an empty cache to the first 512-byte
#    read at offset 0 that succeeds over NBD (libnbd in-process, polling every 2 ms).
# 3. Cold full sequential read: empty cache, `nbdcopy URI null:` timed (nbdcopy's defaults:
#    4 connections, 64 requests in flight, skips holes, so it reads the disk's data blocks), vs
#    `curl -s -o /dev/null` of every layer blob, one after another (this image has one layer),
#    and the same with `curl -o FILE` (the download kept, as a pull keeps it).
#
# Output: markdown tables on stdout, raw rows in $BENCH_DIR/results.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
REPS=${REPS:-3}
SETTINGS=${SETTINGS:-"4/16M 1/0 4/0 4/64M"}
FIRST_REPS=${FIRST_REPS:-5}
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-lazy}
PY=/usr/bin/python3 # Debian's python3 has libnbd's bindings; pyenv's does not
HELPER=$ROOT/scripts/bench-lazy.py

if ! command -v docker-registry >/dev/null; then
    apt-get install -y docker-registry >/dev/null
fi
for t in docker-registry nbdcopy nbdfuse curl debugfs mkfs.ext4 losetup jq; do
    command -v "$t" >/dev/null || { echo "bench-lazy: $t is required" >&2; exit 2; }
done
$PY -c 'import nbd' || { echo "bench-lazy: $PY lacks libnbd's python bindings (python3-libnbd)" >&2; exit 2; }

[ -n "${MCOW_BIN:-}" ] || cargo build --quiet --release -p mcow
MCOW=${MCOW_BIN:-$ROOT/target/release/mcow} # MCOW_BIN: another build to compare

mkdir -p "$BENCH_DIR"
cd "$BENCH_DIR"
rm -rf run && mkdir run && cd run
RUN=$PWD
RES=$BENCH_DIR/results.tsv
: >"$RES"

PIDS=()
MOUNTS=()
cleanup() {
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# --- registry ------------------------------------------------------------------------------
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir reg
cat >reg.yml <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $RUN/reg}
  maintenance: {uploadpurging: {enabled: false}}
http: {addr: 127.0.0.1:$PORT, secret: bench-lazy}
EOF
docker-registry serve reg.yml >reg.log 2>&1 &
RP=$!
PIDS+=("$RP")
for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/" && break; sleep 0.05; done
REF=oci://127.0.0.1:$PORT/bench/fs:v1

# --- the filesystem image ------------------------------------------------------------------
mkdir -p fsroot/etc fsroot/usr/lib fsroot/usr/bin
RANDOM=42
for i in $(seq 300); do head -c $(((RANDOM % 16 + 1) * 1000)) /dev/urandom >fsroot/etc/f$i.conf; done
for i in 1 2 3 4 5 6; do head -c $((i * 1500000)) /dev/urandom >fsroot/usr/lib/lib$i.so; done
head -c 8000000 /dev/urandom >fsroot/usr/bin/big
mkfs.ext4 -q -F -b 4096 -d fsroot fs.img 256M
"$MCOW" import fs.img disk >/dev/null
"$MCOW" push disk "$REF" >/dev/null
LAYERS=$(curl -s -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$PORT/v2/bench/fs/manifests/v1" | jq -r '.layers[].digest')
BLOB_BYTES=$(curl -s -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$PORT/v2/bench/fs/manifests/v1" | jq '[.layers[].size] | add')
DATA_BYTES=$("$MCOW" info disk --output json | jq '[.layers[].data_bytes] | add')

SMALL="/etc/f10.conf /etc/f50.conf /etc/f90.conf /etc/f130.conf /etc/f170.conf /etc/f210.conf /etc/f250.conf /etc/f290.conf"
FEW="/usr/lib/lib1.so /usr/lib/lib2.so $SMALL"
$PY "$HELPER" extents fs.img $FEW >few.ext
$PY "$HELPER" extents fs.img $SMALL >small.ext
content() { # bytes of file content of a set
    local n=0 f
    for f in $1; do n=$((n + $(stat -c %s "fsroot$f"))); done
    echo $n
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ); nproc $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); kernel $(uname -r)"
echo "# docker-registry $(docker-registry --version 2>&1 | awk '{print $3}'); $(curl --version | head -1 | cut -d' ' -f1-2); libnbd $($PY -c 'import nbd; print(nbd.NBD().get_version())')"
echo "# image: ext4 256 MiB, $(find fsroot -type f | wc -l) files, $(du -sb fsroot | cut -f1) bytes of files; layer data $DATA_BYTES bytes, blob(s) $BLOB_BYTES bytes; rounds $REPS"

# serve_start W/RA [extra args]: a fresh cache, mcow serve on $RUN/s.sock; sets SP, SLOG
serve_start() {
    local w=$1
    shift
    rm -rf cache s.sock
    SLOG=$RUN/serve.log
    RUST_LOG=info "$MCOW" serve --cache cache --fetch-window "${w%/*}" --readahead "${w#*/}" -k "$RUN/s.sock" "$@" fs="$REF" 2>"$SLOG" &
    SP=$!
    for _ in $(seq 500); do [ -S s.sock ] && return 0; sleep 0.01; done
    echo "bench-lazy: serve did not start" >&2
    cat "$SLOG" >&2
    exit 1
}
serve_stop() {
    kill -TERM "$SP"
    wait "$SP" || true
}
logval() { # KEY: the value of KEY= on the serve's exit line
    grep 'fetched from the origin' "$SLOG" | grep -o "$1=[0-9]*" | head -1 | cut -d= -f2
}
client_read() { # sum of bytes_read over the NBD connections
    grep 'NBD connection closed' "$SLOG" | grep -o 'bytes_read=[0-9]*' | cut -d= -f2 | awk '{s+=$1} END {print s+0}'
}
URI="nbd+unix:///fs?socket=$RUN/s.sock"

# --- 1. fetch ratio ------------------------------------------------------------------------
mkdir -p fuse mnt
for rep in $(seq "$REPS"); do
    for set in few small; do
        files=$([ $set = few ] && echo "$FEW" || echo "$SMALL")
        for w in $SETTINGS; do
            # nbd: the files' extents, read directly
            serve_start "$w" --no-prefetch
            $PY "$HELPER" read-extents "$URI" $set.ext >/dev/null
            serve_stop
            printf 'ratio\tnbd\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$set" "$w" "$rep" "$(client_read)" \
                "$(content "$files")" "$(logval bytes_fetched)" "$(logval blocks_bytes_fetched)" \
                "$(logval requests)" >>"$RES"
            # fuse: nbdfuse + loop + mount, cat the files
            serve_start "$w" --no-prefetch
            nbdfuse -r fuse/disk.img "$URI" &
            FP=$!
            for _ in $(seq 500); do [ -e fuse/disk.img ] && break; sleep 0.01; done
            MOUNTS=("$RUN/mnt" "$RUN/fuse")
            LD=$(losetup -f --show -r fuse/disk.img)
            mount -o ro "$LD" mnt
            for f in $files; do cat "mnt$f" >/dev/null; done
            umount mnt
            losetup -d "$LD"
            umount fuse
            wait "$FP" || true
            MOUNTS=()
            serve_stop
            printf 'ratio\tfuse\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$set" "$w" "$rep" "$(client_read)" \
                "$(content "$files")" "$(logval bytes_fetched)" "$(logval blocks_bytes_fetched)" \
                "$(logval requests)" >>"$RES"
        done
    done
done

# --- 2. time to first read -----------------------------------------------------------------
for rep in $(seq "$FIRST_REPS"); do
    rm -rf cache s.sock
    read -r secs pid < <(EXPORT=fs LOG=$RUN/first.log $PY "$HELPER" first-read "$RUN/s.sock" -- \
        "$MCOW" serve --cache cache --no-prefetch -k "$RUN/s.sock" fs="$REF")
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
    printf 'first\t%s\t%s\n' "$rep" "$secs" >>"$RES"
done

# --- 3. cold full sequential read vs curl ---------------------------------------------------
now() { date +%s.%N; }
for rep in $(seq "$REPS"); do
    for w in $SETTINGS; do
        serve_start "$w" --no-prefetch
        t0=$(now)
        nbdcopy "$URI" null:
        t1=$(now)
        serve_stop
        printf 'seq\tmcow\t%s\t%s\t%s\t%s\t%s\n' "$w" "$rep" "$(echo "$t1 - $t0" | bc -l)" \
            "$(logval blocks_bytes_fetched)" "$(logval requests)" >>"$RES"
    done
    t0=$(now)
    for d in $LAYERS; do curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/bench/fs/blobs/$d"; done
    t1=$(now)
    printf 'seq\tcurl\t-\t%s\t%s\t%s\t%s\n' "$rep" "$(echo "$t1 - $t0" | bc -l)" "$BLOB_BYTES" "$(echo "$LAYERS" | wc -w)" >>"$RES"
    # The same download kept: each blob written to a new file (as a pull would).
    rm -rf dl && mkdir dl
    t0=$(now)
    for d in $LAYERS; do curl -sf -o "dl/${d#sha256:}" "http://127.0.0.1:$PORT/v2/bench/fs/blobs/$d"; done
    t1=$(now)
    printf 'seq\tcurlfile\t-\t%s\t%s\t%s\t%s\n' "$rep" "$(echo "$t1 - $t0" | bc -l)" "$BLOB_BYTES" "$(echo "$LAYERS" | wc -w)" >>"$RES"
done

# --- report --------------------------------------------------------------------------------
median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
echo
echo "## fetch ratio (medians of $REPS rounds; (a) client read, (b) file content, (c) fetched)"
echo
echo "| client | files | window/readahead | (a) read | (b) content | (c) fetched | blocks fetched | requests | (c)/(a) | (c)/(b) |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for client in nbd fuse; do
    for set in few small; do
        for w in $SETTINGS; do
            rows=$(awk -F'\t' -v c=$client -v s=$set -v w=$w '$1=="ratio" && $2==c && $3==s && $4==w' "$RES")
            a=$(cut -f6 <<<"$rows" | median)
            b=$(cut -f7 <<<"$rows" | median)
            c=$(cut -f8 <<<"$rows" | median)
            bl=$(cut -f9 <<<"$rows" | median)
            rq=$(cut -f10 <<<"$rows" | median)
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %.2f | %.2f |\n' $client $set $w $a $b $c $bl $rq \
                "$(echo "$c / $a" | bc -l)" "$(echo "$c / $b" | bc -l)"
        done
    done
done
echo
f=$(awk -F'\t' '$1=="first" {print $3}' "$RES")
echo "## time to first read: median $(median <<<"$f") s of $FIRST_REPS (all: $(tr '\n' ' ' <<<"$f"))"
echo
echo "## cold full sequential read (medians of $REPS rounds; GB/s over the blob bytes, $BLOB_BYTES)"
echo
ct=$(awk -F'\t' '$1=="seq" && $2=="curl" {print $5}' "$RES" | median)
echo "| reader | window/readahead | seconds | GB/s | requests | curl_time/mcow_time | curl_to_file_time/mcow_time | per round: curl/mcow, curl_to_file/mcow |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
cf=$(awk -F'\t' '$1=="seq" && $2=="curlfile" {print $5}' "$RES" | median)
printf '| curl, blobs one after another, to /dev/null | - | %.4f | %.2f | %s | 1 | - | - |\n' "$ct" "$(echo "$BLOB_BYTES / $ct / 1000000000" | bc -l)" "$(echo "$LAYERS" | wc -w)"
printf '| curl, blobs one after another, to files | - | %.4f | %.2f | %s | - | 1 | - |\n' "$cf" "$(echo "$BLOB_BYTES / $cf / 1000000000" | bc -l)" "$(echo "$LAYERS" | wc -w)"
# The medians of each round's own ratios (curl and mcow ran in the same round, so load that
# comes and goes on this shared machine weighs on both alike).
per_round() { # SETTING CURL_KIND
    awk -F'\t' -v w="$1" -v k="$2" '$1=="seq" && $2=="mcow" && $3==w {m[$4]=$5} $1=="seq" && $2==k {c[$4]=$5}
        END {for (r in m) if (r in c) print c[r] / m[r]}' "$RES" | median
}
for w in $SETTINGS; do
    rows=$(awk -F'\t' -v w=$w '$1=="seq" && $2=="mcow" && $3==w' "$RES")
    t=$(cut -f5 <<<"$rows" | median)
    rq=$(cut -f7 <<<"$rows" | median)
    printf '| mcow serve + nbdcopy | %s | %.4f | %.2f | %s | %.2f | %.2f | %.2f, %.2f |\n' "$w" "$t" \
        "$(echo "$BLOB_BYTES / $t / 1000000000" | bc -l)" "$rq" "$(echo "$ct / $t" | bc -l)" "$(echo "$cf / $t" | bc -l)" \
        "$(per_round "$w" curl)" "$(per_round "$w" curlfile)"
done
