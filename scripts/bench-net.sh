#!/usr/bin/env bash
# Deployment over shaped networks (issue 12): the Debian image of scripts/debian-image.sh booted
# under TCG on a compute host that reaches the registry (docker-registry) and a web server
# (nginx) through one shaped link of scripts/netsim/netsim.sh, against what users would
# otherwise do, all on the same link in one run. Time is from the start of the case (before
# any server, pull or download starts) to the guest's DEB-APPS-DONE marker; bytes are what the
# registry side sent on the link (tx_bytes of its veth: HTTP bodies, headers and TCP/IP).
#
# Usage: scripts/bench-net.sh boot [WORKDIR] [PROFILES] [ROUNDS]
#          the single-host cases, PROFILES comma-separated (default 100m20ms), ROUNDS each
#          (default 3; the cases in a new random order each round); prints medians and ratios
#        scripts/bench-net.sh many [WORKDIR] [PROFILE] [ROUNDS]
#          8 hosts at once through one uplink (default 100m20ms), cold (and traced) mcow, without
#          and with a caching proxy in the rack; real guests and replayed reads (nbd-replay.py)
#        scripts/bench-net.sh ttfr [WORKDIR] [PROFILE] [ROUNDS]
#          time to first read of an image whose one layer stores 2 GiB (64 KiB blocks): from
#          starting `mcow serve` on an empty cache to the first 4 KiB read returned
# Cases of `boot` (BENCH_NET_CASES selects some):
#   mcow-cold    mcow serve --cache EMPTY vm=oci://REG/mcow/deb:v1 (lazy, no trace)
#   mcow-trace   the same image pushed with a boot trace (prefetched in the background)
#   mcow-zstd, mcow-zstd-trace  mcow-cold and mcow-trace with the image pushed with --compress
#                (compressed blobs, zstd level 3; the cache holds the layers uncompressed)
#   mcow-warm    mcow serve with the cache of an earlier cold boot (the manifest is fetched again)
#   mcow-pull    mcow pull (whole layers), then mcow serve of the local disk
#   curl-raw     curl of the flat raw image (2 GiB, zeros included), then boot from the file
#   curl-qcow2   curl of a qcow2 of the flat image, then boot from the file
#   nbdkit-curl  nbdkit curl url=http://NGINX/disk.raw (lazy, no layers, no cache)
#   qemu-http    QEMU's http block driver (qemu-block-extra) on a qcow2 backing chain
#                web.qcow2 -> py.qcow2 -> base.qcow2 of the same three layers, served by nginx
# Results: WORKDIR/results-*.tsv (one line per boot) and the summary printed at the end.
# Needs root, what scripts/debian-image.sh and scripts/netsim/netsim.sh need, nbdkit with its
# curl plugin, curl, qemu-block-extra (bookworm-backports) and python3-libnbd.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=${1:?usage: bench-net.sh boot|many|ttfr [WORKDIR] [PROFILE(S)] [ROUNDS]}
W=${2:-$ROOT/target/bench-net}
mkdir -p "$W"; W=$(cd "$W" && pwd)
PY=/usr/bin/python3
(cd "$ROOT" && cargo build --release -p mcow >/dev/null 2>&1)
export MCOW=$ROOT/target/release/mcow
export NETSIM_PREFIX=${NETSIM_PREFIX:-mcb} NETSIM_NET=${NETSIM_NET:-10.231} NETSIM_STATE=$W/netsim
NS=$ROOT/scripts/netsim/netsim.sh
DEB=$ROOT/scripts/debian-image.sh
netsim() { bash "$NS" "$@"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }

pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  netsim down >/dev/null 2>&1
}
trap cleanup EXIT
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
wait_sock() { for _ in $(seq 1200); do [ -S "$1" ] && return 0; sleep 0.01; done; echo "no socket $1" >&2; return 1; }

# --- what every mode shares: the image, its other forms, the registry's data ----------------
prepare() {
  local P=$W/prep
  mkdir -p "$P"
  if [ ! -e "$P/done" ]; then
    rm -rf "$W/img" "$W/www" "$W/reg-data"
    bash "$DEB" build "$W/img"
    mkdir -p "$W/www" "$W/reg-data"
    "$MCOW" export "$W/img/web" "$W/www/disk.raw" >/dev/null
    qemu-img convert -O qcow2 "$W/www/disk.raw" "$W/www/disk.qcow2"
    chmod -R a+rX "$W/www"
    # A boot's reads (for the guest's byte count and for replays), and its trace.
    local T; T=$(mktemp -d /tmp/mcow-bn.XXXXXX)
    nbdkit -f -r -U "$T/k.sock" --filter=log file "$W/www/disk.raw" logfile="$P/boot-reads.log" & local k=$!
    wait_sock "$T/k.sock"
    bash "$DEB" boot "nbd+unix:///?socket=$T/k.sock" "$P/console-reads.log" >/dev/null
    stop $k
    "$MCOW" trace -r -k "$T/t.sock" --out "$P/boot.trace" "vm=$W/img/web" 2>"$P/trace.log" & local t=$!
    wait_sock "$T/t.sock"
    bash "$DEB" boot "nbd+unix:///vm?socket=$T/t.sock" "$P/console-trace.log" >/dev/null
    stop $t
    rm -rf "$T"
    # The registry's data: both tags pushed from inside the registry's namespace (loopback).
    netsim up unshaped 1 --reg-data "$W/reg-data" --www "$W/www" >/dev/null
    netsim exec reg "$MCOW" -q push "$W/img/web" oci://127.0.0.1:5000/mcow/deb:v1 >/dev/null
    netsim exec reg "$MCOW" -q push "$W/img/web" oci://127.0.0.1:5000/mcow/deb:traced --trace "$P/boot.trace" >/dev/null
    netsim down >/dev/null
    touch "$P/done"
  fi
  [ -e "$P/chain-done" ] || { qcow2_chain; touch "$P/chain-done"; }
  if [ ! -e "$P/zstd-done" ]; then
    # The same image with compressed blobs (deb:zstd, deb:zstd-traced).
    netsim up unshaped 1 --reg-data "$W/reg-data" --www "$W/www" >/dev/null
    netsim exec reg "$MCOW" -q push --compress "$W/img/web" oci://127.0.0.1:5000/mcow/deb:zstd >/dev/null
    netsim exec reg "$MCOW" -q push --compress "$W/img/web" oci://127.0.0.1:5000/mcow/deb:zstd-traced --trace "$P/boot.trace" >/dev/null
    netsim down >/dev/null
    touch "$P/zstd-done"
  fi
  GUEST_BYTES=$($PY - "$P/boot-reads.log" <<'PY'
import re, sys
rs = sorted((int(o, 16), int(o, 16) + int(c, 16)) for o, c in
            re.findall(r"\bRead id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ", open(sys.argv[1]).read()))
total, end = 0, -1
for a, b in rs:
    if b > end:
        total += b - max(a, end)
        end = b
print(total)
PY
)
  echo "image: $(du -h --apparent-size "$W/www/disk.raw" | cut -f1) raw, qcow2 $(du -h "$W/www/disk.qcow2" | cut -f1); chain: $(cd "$W/www" && du -h base.qcow2 py.qcow2 web.qcow2 | tr '\n\t' '  ')"
  echo "the guest reads $GUEST_BYTES distinct bytes (nbdkit log of one boot)"
}

# The qcow2 backing chain web.qcow2 -> py.qcow2 -> base.qcow2 in WORKDIR/www: base a qcow2 of
# the base layer's disk; each overlay holds exactly the blocks its mcow layer holds (the extents
# `mcow map` gives that layer), written through qemu-nbd, zeros where the layer has zero or
# discarded runs. (qemu-img convert -B writes every allocated cluster of a raw source, so it
# would not make a layered chain.)
qcow2_chain() {
  local T prev=base layer disk
  T=$(mktemp -d /tmp/mcow-bn.XXXXXX)
  "$MCOW" export "$W/img/base" "$T/base.raw" >/dev/null
  (cd "$W/www" && rm -f base.qcow2 py.qcow2 web.qcow2 && qemu-img convert -O qcow2 "$T/base.raw" base.qcow2)
  rm -f "$T/base.raw"
  for disk in py web; do
    "$MCOW" export "$W/img/$disk" "$T/$disk.raw" >/dev/null
    layer=$("$MCOW" info "$W/img/$disk" --output json | $PY -c 'import json,sys; print(json.load(sys.stdin)["layers"][-1]["digest"])')
    "$MCOW" map "$W/img/$disk" --output json > "$T/$disk.map"
    (cd "$W/www" && qemu-img create -q -f qcow2 -b "$prev.qcow2" -F qcow2 "$disk.qcow2")
    qemu-nbd -f qcow2 -k "$T/q.sock" "$W/www/$disk.qcow2" & local q=$!
    wait_sock "$T/q.sock"
    $PY - "$T/$disk.raw" "$T/$disk.map" "$layer" "nbd+unix:///?socket=$T/q.sock" <<'PY'
import json, sys
import nbd
raw, mp, layer, uri = sys.argv[1:]
h = nbd.NBD(); h.connect_uri(uri)
with open(raw, "rb") as f:
    for e in json.load(open(mp)):
        if e.get("layer") != layer:
            continue
        off, n = e["start"], e["length"]
        if e["data"]:
            while n:
                k = min(n, 4 << 20); f.seek(off); h.pwrite(f.read(k), off); off += k; n -= k
        else:
            h.zero(n, off)
h.flush(); h.shutdown()
PY
    wait $q || true
    rm -f "$T/$disk.raw"
    prev=$disk
  done
  rm -rf "$T"
  chmod -R a+rX "$W/www"
  qemu-img compare -f raw -F qcow2 "$W/www/disk.raw" "$W/www/web.qcow2" >/dev/null \
    || { echo "the qcow2 chain differs from the image" >&2; exit 1; }
}

# boot_drive NODE DRIVE FORMAT CONSOLE: boots the guest in NODE's namespace; sets END (epoch of
# DEB-APPS-DONE).
boot_drive() {
  local m=$W/marker.$1
  rm -f "$m"
  DEB_MARKER_FILE=$m DEB_FORMAT=$3 DEB_WRAP="ip netns exec $(netsim ns "$1")" \
    bash "$DEB" boot "$2" "$4" >/dev/null
  END=$(cat "$m")
}

# serve_boot NODE CACHE REGADDR TAG CONSOLE: mcow serve oci://REGADDR/mcow/deb:TAG lazily in
# NODE, boot from it.
serve_boot() {
  local node=$1 cache=$2 reg=$3 tag=$4 con=$5 sock=$W/$1.sock p
  rm -f "$sock"
  netsim exec "$node" "$MCOW" --insecure-registry "$reg" serve -r --cache "$cache" -k "$sock" "vm=oci://$reg/mcow/deb:$tag" \
    2>"$W/serve-$node.log" & p=$!
  wait_sock "$sock"
  boot_drive "$node" "nbd+unix:///vm?socket=$sock" raw "$con"
  stop $p
}

# run_case CASE NODE REG NGX: one boot of CASE on NODE; sets SECS.
run_case() {
  local c=$1 node=$2 reg=$3 ngx=$4 h=$W/$2 t0 con sock p
  mkdir -p "$h"; con=$h/console-$c.log
  case $c in
    mcow-cold) rm -rf "$h/cache" ;;
    mcow-trace) rm -rf "$h/cache-t" ;;
    mcow-zstd) rm -rf "$h/cache-z" ;;
    mcow-zstd-trace) rm -rf "$h/cache-zt" ;;
    mcow-pull) rm -rf "$h/pulled" "$h/layers" ;;
    curl-raw | curl-qcow2) rm -f "$h/disk.raw" "$h/disk.qcow2" ;;
  esac
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now)
  case $c in
    mcow-cold) serve_boot "$node" "$h/cache" "$reg" v1 "$con" ;;
    mcow-trace) serve_boot "$node" "$h/cache-t" "$reg" traced "$con" ;;
    mcow-zstd) serve_boot "$node" "$h/cache-z" "$reg" zstd "$con" ;;
    mcow-zstd-trace) serve_boot "$node" "$h/cache-zt" "$reg" zstd-traced "$con" ;;
    mcow-warm) serve_boot "$node" "$W/warm-cache" "$reg" v1 "$con" ;;
    mcow-pull)
      netsim exec "$node" "$MCOW" -q --insecure-registry "$reg" pull "oci://$reg/mcow/deb:v1" "$h/pulled" >/dev/null
      sock=$h/p.sock; rm -f "$sock"
      "$MCOW" serve -r -k "$sock" "vm=$h/pulled" 2>"$W/serve-$node.log" & p=$!
      wait_sock "$sock"
      boot_drive "$node" "nbd+unix:///vm?socket=$sock" raw "$con"
      stop $p ;;
    curl-raw)
      netsim exec "$node" curl -sSf -o "$h/disk.raw" "http://$ngx/disk.raw"
      boot_drive "$node" "$h/disk.raw" raw "$con" ;;
    curl-qcow2)
      netsim exec "$node" curl -sSf -o "$h/disk.qcow2" "http://$ngx/disk.qcow2"
      boot_drive "$node" "$h/disk.qcow2" qcow2 "$con" ;;
    nbdkit-curl)
      sock=$h/k.sock; rm -f "$sock"
      netsim exec "$node" nbdkit -f -r -U "$sock" curl "url=http://$ngx/disk.raw" 2>"$W/nbdkit-$node.log" & p=$!
      wait_sock "$sock"
      boot_drive "$node" "nbd+unix:///?socket=$sock" raw "$con"
      stop $p ;;
    qemu-http) boot_drive "$node" "http://$ngx/web.qcow2" qcow2 "$con" ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
  SECS=$(secs "$t0" "$END")
}

summary() { # TSV: profile, case, round, seconds, bytes
  $PY - "$1" "$GUEST_BYTES" <<'PY'
import statistics as st, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()[1:]]
guest = int(sys.argv[2])
for prof in dict.fromkeys(r[0] for r in rows):
    m = {}
    for c in dict.fromkeys(r[1] for r in rows if r[0] == prof):
        rs = [r for r in rows if r[0] == prof and r[1] == c]
        m[c] = (st.median(float(r[3]) for r in rs), st.median(int(r[4]) for r in rs), len(rs))
    print(f"\n{prof}: median of each case (n boots); bytes = registry side's link tx")
    print(f"  {'case':12} {'seconds':>8} {'MB sent':>9} {'x guest':>8}")
    for c, (s, b, n) in m.items():
        print(f"  {c:12} {s:8.2f} {b / 1e6:9.1f} {b / guest:8.2f}   (n={n})")
    def ratio(a, b):
        return f"{m[a][0] / m[b][0]:.2f}" if a in m and b in m else "-"
    for z, u in (("mcow-zstd", "mcow-cold"), ("mcow-zstd-trace", "mcow-trace")):
        if z in m and u in m:
            print(f"  {z}: time /{u} {ratio(z, u)}  bytes /{u} {m[z][1] / m[u][1]:.2f}"
                  + (f"  bytes /nbdkit-curl {m[z][1] / m['nbdkit-curl'][1]:.2f}" if "nbdkit-curl" in m else ""))
    for cold in ("mcow-cold", "mcow-trace"):
        print(f"  {cold}: /warm {ratio(cold, 'mcow-warm')}  /pull {ratio(cold, 'mcow-pull')}  "
              f"/curl-raw {ratio(cold, 'curl-raw')}  /curl-qcow2 {ratio(cold, 'curl-qcow2')}  "
              f"/nbdkit-curl {ratio(cold, 'nbdkit-curl')}  /qemu-http {ratio(cold, 'qemu-http')}")
PY
}

mode_boot() {
  local profiles=${1:-100m20ms} rounds=${2:-3} prof r c reg ngx e0
  local cases=${BENCH_NET_CASES:-mcow-cold mcow-trace mcow-warm mcow-pull curl-raw curl-qcow2 nbdkit-curl qemu-http}
  local out=$W/results-boot-$(date +%Y%m%d-%H%M%S).tsv
  printf 'profile\tcase\tround\tseconds\tbytes\n' > "$out"
  for prof in ${profiles//,/ }; do
    netsim up "$prof" 1 --reg-data "$W/reg-data" --www "$W/www" >/dev/null
    reg=$(netsim addr reg); ngx=$(netsim addr nginx)
    # The warm cache, by one uncounted cold boot (also a warm-up of everything else).
    rm -rf "$W/warm-cache"
    serve_boot h1 "$W/warm-cache" "$reg" v1 "$W/console-warmup.log"
    for r in $(seq "$rounds"); do
      for c in $(printf '%s\n' $cases | shuf); do
        e0=$(netsim egress)
        run_case "$c" h1 "$reg" "$ngx"
        printf '%s\t%s\t%s\t%s\t%s\n' "$prof" "$c" "$r" "$SECS" "$(($(netsim egress) - e0))" | tee -a "$out"
      done
    done
    netsim down >/dev/null
  done
  summary "$out"
}

# many_once N KIND ADDR TAG: N hosts start KIND (qemu|replay) from oci://ADDR/mcow/deb:TAG at
# the same moment, each on an empty cache; prints one "seconds" line per host, then "egress B".
many_once() {
  local n=$1 kind=$2 addr=$3 tag=$4 i e0 t0 ps=()
  e0=$(netsim egress)
  sync; echo 3 > /proc/sys/vm/drop_caches
  t0=$(now)
  for i in $(seq "$n"); do
    (
      h=$W/h$i; mkdir -p "$h"; rm -rf "$h/mcache"; sock=$h/m.sock; rm -f "$sock"
      netsim exec "h$i" "$MCOW" --insecure-registry "$addr" serve -r --cache "$h/mcache" -k "$sock" \
        "vm=oci://$addr/mcow/deb:$tag" 2>"$h/serve-many.log" & p=$!
      wait_sock "$sock"
      if [ "$kind" = qemu ]; then
        boot_drive "h$i" "nbd+unix:///vm?socket=$sock" raw "$h/console-many.log"
        e=$END
      else
        netsim exec "h$i" $PY "$ROOT/scripts/nbd-replay.py" "$W/prep/boot-reads.log" "nbd+unix:///vm?socket=$sock" >"$h/replay.log"
        e=$(now)
      fi
      stop $p
      secs "$t0" "$e"; echo
    ) & ps+=($!)
  done
  for p in "${ps[@]}"; do wait "$p"; done
  echo "egress $(($(netsim egress) - e0))"
}

mode_many() {
  local prof=${1:-100m20ms} rounds=${2:-3} cache kind tag addr r n out
  out=$W/results-many-$(date +%Y%m%d-%H%M%S).tsv
  printf 'profile\tcache\tkind\ttag\thosts\tround\tseconds\tegress\n' > "$out"
  for cache in no yes; do
    netsim up "$prof" 8 --reg-data "$W/reg-data" --www "$W/www" $([ $cache = yes ] && echo --cache) >/dev/null
    addr=$(netsim addr reg $([ $cache = yes ] && echo --cache))
    for kind in replay qemu; do
      for tag in v1 traced; do
        for r in $(seq "$rounds"); do
          # One host alone (the baseline) without the cache only; behind it, 8 at once on a rack
          # cache that starts empty every time (what the run measures).
          for n in $([ $cache = no ] && echo 1) 8; do
            if [ $cache = yes ]; then
              netsim down >/dev/null; netsim up "$prof" 8 --reg-data "$W/reg-data" --www "$W/www" --cache >/dev/null
            fi
            many_once "$n" "$kind" "$addr" "$tag" > "$W/many.out"
            eg=$(awk '/^egress/{print $2}' "$W/many.out")
            grep -v '^egress' "$W/many.out" | while read -r s; do
              printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$prof" "$cache" "$kind" "$tag" "$n" "$r" "$s" "$eg"
            done | tee -a "$out"
          done
        done
      done
    done
    netsim down >/dev/null
  done
  $PY - "$out" <<'PY'
import statistics as st, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()[1:]]
def q(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
keys = dict.fromkeys((r[1], r[2], r[3]) for r in rows)
print("\nalone = one host without the rack cache; egress = what the registry side sent on the uplink")
print("cache kind   tag     alone p50  8x p50  8x p95  p95/alone  egress alone MB  egress 8x MB  8x/alone")
for cache, kind, tag in keys:
    sel = lambda c, n: [r for r in rows if (r[1], r[2], r[3], r[4]) == (c, kind, tag, n)]
    one, eight = sel("no", "1"), sel(cache, "8")
    if not one or not eight:
        continue
    a = st.median(float(r[6]) for r in one); s8 = [float(r[6]) for r in eight]
    ea = st.median(int(r[7]) for r in one)
    e8 = st.median(int(r[7]) for r in {(r[5]): r for r in eight}.values())
    print(f"{cache:5} {kind:6} {tag:7} {a:9.2f} {q(s8, .5):7.2f} {q(s8, .95):7.2f} {q(s8, .95) / a:10.2f}"
          f" {ea / 1e6:16.1f} {e8 / 1e6:13.1f} {e8 / ea:9.2f}")
PY
}

mode_ttfr() {
  local prof=${1:-100m20ms} rounds=${2:-5} r reg T
  local P=$W/prep-ttfr
  if [ ! -e "$P/done" ]; then
    rm -rf "$P"; mkdir -p "$P"
    head -c $((2 << 30)) /dev/urandom > "$P/big.raw"
    "$MCOW" -q import -b 64K "$P/big.raw" "$P/big" >/dev/null
    rm -f "$P/big.raw"
    mkdir -p "$W/reg-data" "$W/www"
    netsim up unshaped 1 --reg-data "$W/reg-data" --www "$W/www" >/dev/null
    netsim exec reg "$MCOW" -q push "$P/big" oci://127.0.0.1:5000/mcow/big:v1 >/dev/null
    netsim down >/dev/null
    touch "$P/done"
  fi
  netsim up "$prof" 1 --reg-data "$W/reg-data" --www "$W/www" >/dev/null
  reg=$(netsim addr reg)
  T=$(mktemp -d /tmp/mcow-bn.XXXXXX)
  for r in $(seq "$rounds"); do
    rm -rf "$W/h1/tcache"; mkdir -p "$W/h1"
    local e0; e0=$(netsim egress)
    netsim exec h1 $PY - "$MCOW" "$reg" "$W/h1/tcache" "$T/f.sock" <<'PY'
import os, subprocess, sys, time
import nbd
mcow, reg, cache, sock = sys.argv[1:]
t0 = time.monotonic()
p = subprocess.Popen([mcow, "--insecure-registry", reg, "serve", "-r", "--cache", cache, "-k", sock,
                      f"vm=oci://{reg}/mcow/big:v1"], stderr=subprocess.DEVNULL)
try:
    while not os.path.exists(sock):
        if p.poll() is not None or time.monotonic() - t0 > 60:
            sys.exit("mcow serve did not start")
        time.sleep(0.001)
    h = nbd.NBD(); h.connect_uri(f"nbd+unix:///vm?socket={sock}")
    assert len(h.pread(4096, 0)) == 4096
    print(f"first read after {1000 * (time.monotonic() - t0):.0f} ms", end=" ")
    h.shutdown()
finally:
    p.terminate(); p.wait()
PY
    echo "(registry side sent $(($(netsim egress) - e0)) bytes)"
  done
  rm -rf "$T"
  netsim down >/dev/null
}

case $MODE in
  boot) prepare; mode_boot "${3:-}" "${4:-}" ;;
  many) prepare; mode_many "${3:-}" "${4:-}" ;;
  ttfr) mode_ttfr "${3:-}" "${4:-}" ;;
  *) echo "usage: bench-net.sh boot|many|ttfr [WORKDIR] [PROFILE(S)] [ROUNDS]" >&2; exit 2 ;;
esac
