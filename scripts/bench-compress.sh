#!/usr/bin/env bash
# Compressed layer blobs and block reuse, measured (issue 13). All on loopback, one run.
#
# Usage: scripts/bench-compress.sh [WORKDIR] [ROUNDS]   (default target/bench-compress, 3)
#   DEB_IMG=DIR  use a Debian image already built by `scripts/debian-image.sh build DIR`
#                (default: build one into WORKDIR/deb, about 80 s)
#
# 1. ratio: each image (the VM demo's app2 disk, the Debian image's web disk: base + python3 +
#    nginx-light) pushed to an OCI layout, uncompressed and with --compress (zstd level 3):
#    layer bytes, blob bytes, ratio, and the push's wall and CPU seconds (user + sys, from
#    /usr/bin/time), CPU seconds per GiB of layer data.
# 2. seqread: cold full sequential read of the Debian image served lazily from nginx (the
#    compressed layout), `nbdcopy nbd+unix:///web?socket=S null:` from the start of `mcow serve`
#    with an empty cache, against `curl` of the same compressed blobs from the same nginx to
#    files (one after another, as one command); and the same for the uncompressed layout. ROUNDS
#    rounds, medians, ratio curl/mcow (target >= 0.8 for the compressed one). The serve's CPU
#    time is printed too (where the CPU goes: decoding, hashing, copying). Then the compressed
#    case again over shaped links of scripts/netsim (SEQ_PROFILES, default "1g1ms 100m20ms";
#    empty: none), 2 rounds each.
# 3. reuse: a "new version of the base": the Debian base disk with one more package installed
#    (apt-get install less in a chroot, as debian-image.sh installs its layers) and flattened into one new base layer. Served
#    lazily and read whole (nbdcopy) with an empty cache, then with a cache that holds the old
#    base (pulled in full before): bytes fetched for each. Also: how many blocks two independent
#    builds of the Debian base (two runs of debian-image.sh build) share, block for block.
# Needs: root, nginx, curl, nbdcopy (libnbd-bin), what debian-image.sh and demo-vm.sh need.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-$ROOT/target/bench-compress}
ROUNDS=${2:-3}
(cd "$ROOT" && cargo build --release -p mcow >/dev/null 2>&1)
export MCOW=$ROOT/target/release/mcow
mkdir -p "$W"; W=$(cd "$W" && pwd)
for t in nginx curl nbdcopy /usr/bin/time getconf; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }; done

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
freeport() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
median() { sort -n | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
wait_sock() { for _ in $(seq 1000); do [ -S "$1" ] && return 0; sleep 0.01; done; echo "no socket $1" >&2; exit 1; }

# --- images -------------------------------------------------------------------------------------
bash "$ROOT/scripts/demo-vm.sh" build "$W/demo" >/dev/null
DEB=${DEB_IMG:-$W/deb}
[ -e "$DEB/.debian-image" ] || bash "$ROOT/scripts/debian-image.sh" build "$DEB" >"$W/deb-build.log" 2>&1

# --- nginx serving WORKDIR/www --------------------------------------------------------------------
NP=$(freeport); mkdir -p "$W/www" "$W/ngx/logs" "$W/ngx/tmp"; chmod 755 "$W" "$W/www"
cat > "$W/ngx/nginx.conf" <<NGX
daemon off; master_process on; worker_processes 1;
pid $W/ngx/nginx.pid; error_log $W/ngx/logs/error.log warn;
events { worker_connections 256; }
http { log_format sent '\$body_bytes_sent'; access_log $W/ngx/logs/access.log sent;
  client_body_temp_path $W/ngx/tmp/body; proxy_temp_path $W/ngx/tmp/proxy;
  fastcgi_temp_path $W/ngx/tmp/fastcgi; uwsgi_temp_path $W/ngx/tmp/uwsgi; scgi_temp_path $W/ngx/tmp/scgi;
  default_type application/octet-stream; sendfile on;
  server { listen 127.0.0.1:$NP; root $W/www; location / { } } }
NGX
nginx -e "$W/ngx/logs/error.log" -c "$W/ngx/nginx.conf" -p "$W/ngx/" & pids+=($!)
for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$NP/" && break; sleep 0.05; done

# --- 1. ratio and push cost -----------------------------------------------------------------------
layer_bytes() { # DISK -> bytes of its sealed layers
  python3 - "$1" <<'PY'
import json, os, sys
d = sys.argv[1]; m = json.load(open(os.path.join(d, "disk.json")))
store = os.path.join(d, m["store"])
print(sum(os.path.getsize(os.path.join(store, "blobs/sha256", l.split(":")[1])) for l in m["layers"]))
PY
}
blob_bytes() { # LAYOUT TAG -> bytes of the image's layer blobs (the trace and documents aside)
  python3 - "$1" "$2" <<'PY'
import json, os, sys
lay, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(os.path.join(lay, "index.json")))
d = [m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag][-1]
man = json.load(open(os.path.join(lay, "blobs/sha256", d["digest"].split(":")[1])))
print(sum(l["size"] for l in man["layers"] if l["mediaType"].startswith("application/vnd.mcow.layer.")))
PY
}
echo "== ratio and push cost (zstd level 3, both cores) =="
printf '%-8s %-6s %12s %12s %7s %7s %7s %9s\n' image blob layer_bytes blob_bytes ratio wall_s cpu_s cpu_s/GiB
for img in demo:"$W/demo/app2" debian:"$DEB/web"; do
  name=${img%%:*} disk=${img#*:}
  lb=$(layer_bytes "$disk")
  for mode in plain zstd; do
    rm -rf "$W/www/$name-$mode"
    args=(); [ $mode = zstd ] && args=(--compress)
    /usr/bin/time -f '%e %U %S' -o "$W/time" "$MCOW" push -q "${args[@]}" "$disk" "file://$W/www/$name-$mode:v1" >/dev/null
    read -r wall u s < "$W/time"
    bb=$(blob_bytes "$W/www/$name-$mode" v1)
    awk -v n="$name" -v m="$mode" -v lb="$lb" -v bb="$bb" -v w="$wall" -v u="$u" -v s="$s" 'BEGIN{
      printf "%-8s %-6s %12d %12d %7.3f %7.2f %7.2f %9.2f\n", n, m, lb, bb, bb/lb, w, u+s, (u+s)/(lb/1073741824) }'
  done
done
chmod -R a+rX "$W/www"

# --- 2. cold sequential read against curl ---------------------------------------------------------
blob_paths() { # LAYOUT TAG -> URL paths of the layer blobs
  python3 - "$1" "$2" <<'PY'
import json, os, sys
lay, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(os.path.join(lay, "index.json")))
d = [m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag][-1]
man = json.load(open(os.path.join(lay, "blobs/sha256", d["digest"].split(":")[1])))
for l in man["layers"]:
    if l["mediaType"].startswith("application/vnd.mcow.layer."):
        print(os.path.basename(lay) + "/blobs/sha256/" + l["digest"].split(":")[1])
PY
}
seq_mcow() { # LAYOUT_NAME -> "secs cpu_s bytes"
  local s=$W/seq.sock c=$W/seq-cache t0 p; rm -rf "$s" "$c"
  t0=$(date +%s.%N)
  RUST_LOG=info "$MCOW" serve -k "$s" --cache "$c" "web=http://127.0.0.1:$NP/$1:v1" 2>"$W/serve.log" >/dev/null & p=$!
  wait_sock "$s"; nbdcopy "nbd+unix:///web?socket=$s" null:
  local t1 cpu; t1=$(date +%s.%N)
  # the server's CPU seconds (user + system, fields 14 and 15 of /proc/PID/stat, in clock ticks)
  cpu=$(awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$p/stat")
  kill -TERM $p; wait $p || true
  local b; b=$(grep 'served; fetched' "$W/serve.log" | grep -o ' bytes_fetched=[0-9]*' | head -1 | cut -d= -f2)
  awk -v a="$t0" -v b="$t1" -v c="$cpu" -v n="$b" 'BEGIN{printf "%.3f %.2f %s", b-a, c, n}'
}
seq_curl() { # LAYOUT_NAME -> secs
  local t0 t1 urls=(); rm -rf "$W/curl-out"; mkdir -p "$W/curl-out"
  for pth in $(blob_paths "$W/www/$1" v1); do urls+=("http://127.0.0.1:$NP/$pth" -o "$W/curl-out/$(basename "$pth")"); done
  t0=$(date +%s.%N); curl -sf "${urls[@]}"; t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}'
}
echo; echo "== cold full sequential read of the Debian image (nbdcopy), against curl of its blobs =="
: > "$W/seq-results"
for r in $(seq "$ROUNDS"); do
  for mode in zstd plain; do
    echo "$r mcow-$mode $(seq_mcow "debian-$mode")" >> "$W/seq-results"
    echo "$r curl-$mode $(seq_curl "debian-$mode")" >> "$W/seq-results"
  done
done
cat "$W/seq-results"
for mode in zstd plain; do
  m=$(awk -v c="mcow-$mode" '$2==c{print $3}' "$W/seq-results" | median)
  cpu=$(awk -v c="mcow-$mode" '$2==c{print $4}' "$W/seq-results" | median)
  b=$(awk -v c="mcow-$mode" '$2==c{print $5}' "$W/seq-results" | median)
  k=$(awk -v c="curl-$mode" '$2==c{print $3}' "$W/seq-results" | median)
  awk -v mode="$mode" -v m="$m" -v k="$k" -v cpu="$cpu" -v b="$b" 'BEGIN{
    printf "%s: mcow %.3f s (serve CPU %.2f s, %d bytes fetched), curl %.3f s: curl/mcow %.2f\n", mode, m, cpu, b, k, k/m }'
done

# --- 2b. the same over shaped links (scripts/netsim: nginx in its own namespace, the reader in
# a compute host behind the uplink), compressed layout only, rounds of 2 --------------------------
export NETSIM_PREFIX=${NETSIM_PREFIX:-mcz} NETSIM_NET=${NETSIM_NET:-10.232} NETSIM_STATE=$W/netsim
netsim() { bash "$ROOT/scripts/netsim/netsim.sh" "$@"; }
trap 'cleanup; netsim down >/dev/null 2>&1 || true' EXIT
for prof in ${SEQ_PROFILES-1g1ms 100m20ms}; do
  netsim up "$prof" 1 --www "$W/www" >/dev/null
  ngx=$(netsim addr nginx)
  for r in 1 2; do
    s=$W/seqn.sock c=$W/seqn-cache; rm -rf "$s" "$c"
    t0=$(date +%s.%N)
    netsim exec h1 env RUST_LOG=info "$MCOW" serve -k "$s" --cache "$c" "web=http://$ngx/debian-zstd:v1" 2>"$W/serve-n.log" >/dev/null & p=$!
    wait_sock "$s"; netsim exec h1 nbdcopy "nbd+unix:///web?socket=$s" null:; t1=$(date +%s.%N)
    kill -TERM $p; wait $p || true
    urls=(); rm -rf "$W/curl-out"; mkdir -p "$W/curl-out"
    for pth in $(blob_paths "$W/www/debian-zstd" v1); do urls+=("http://$ngx/$pth" -o "$W/curl-out/$(basename "$pth")"); done
    k0=$(date +%s.%N); netsim exec h1 curl -sf "${urls[@]}"; k1=$(date +%s.%N)
    awk -v p="$prof" -v r="$r" -v a="$t0" -v b="$t1" -v c="$k0" -v d="$k1" 'BEGIN{
      printf "%s round %s: mcow %.2f s, curl %.2f s: curl/mcow %.2f\n", p, r, b-a, d-c, (d-c)/(b-a) }'
  done
  netsim down >/dev/null
done

# --- 3. block reuse -------------------------------------------------------------------------------
echo; echo "== block reuse: a new version of the base on a host holding the old one =="
NEWB=$W/base-v2
if [ ! -e "$NEWB/.done" ]; then
  rm -rf "$NEWB" "$W/base-less"
  bash "$ROOT/scripts/layer-run.sh" "$DEB/base" "$W/base-less" bash "$ROOT/scripts/debian-image.sh" _apt-layer less >/dev/null
  "$MCOW" flatten -q "$W/base-less" >/dev/null
  mkdir -p "$NEWB"; touch "$NEWB/.done"
fi
rm -rf "$W/www/base-old" "$W/www/base-new"
"$MCOW" push -q --compress "$DEB/base" "file://$W/www/base-old:v1" >/dev/null
"$MCOW" push -q --compress "$W/base-less" "file://$W/www/base-new:v1" >/dev/null
chmod -R a+rX "$W/www"
reuse_read() { # CACHE LAYOUT -> bytes fetched reading the whole disk
  local s=$W/reuse.sock p; rm -f "$s"
  RUST_LOG=info "$MCOW" serve -k "$s" --cache "$1" "web=http://127.0.0.1:$NP/$2:v1" 2>"$W/reuse-serve.log" >/dev/null & p=$!
  wait_sock "$s"; nbdcopy "nbd+unix:///web?socket=$s" null:; kill -TERM $p; wait $p || true
  grep 'served; fetched' "$W/reuse-serve.log" | grep -o ' bytes_fetched=[0-9]*' | head -1 | cut -d= -f2
}
rm -rf "$W/reuse-cold" "$W/reuse-warm"
cold=$(reuse_read "$W/reuse-cold" base-new)
# the old base in full, in the cache's layer store
"$MCOW" pull -q --store "$W/reuse-warm/layers" "http://127.0.0.1:$NP/base-old:v1" "$W/reuse-warm/old" >/dev/null
warm=$(reuse_read "$W/reuse-warm" base-new)
grep -o 'reused[^ ]*=[0-9]*' "$W/reuse-serve.log" | head -3 || true
awk -v c="$cold" -v w="$warm" 'BEGIN{printf "new base read whole: cold %d bytes fetched, holding the old base %d bytes (%.3fx)\n", c, w, w/c}'
# Two independent builds of the base: blocks in common.
DEB2=$W/deb2
[ -e "$DEB2/.debian-image" ] || bash "$ROOT/scripts/debian-image.sh" build "$DEB2" >"$W/deb2-build.log" 2>&1
python3 - "$DEB/base" "$DEB2/base" <<'PY'
import json, os, struct, sys
def hashes(disk):
    m = json.load(open(os.path.join(disk, "disk.json")))
    p = os.path.join(disk, m["store"], "blobs/sha256", m["layers"][0].split(":")[1])
    with open(p, "rb") as f:
        f.seek(-128, 2); t = f.read(128)
        blocks, extents = struct.unpack_from("<QQ", t, 8)
        size = os.path.getsize(p)
        f.seek(size - 128 - 32 * blocks); h = f.read(32 * blocks)
    return {h[i:i + 32] for i in range(0, len(h), 32)}, blocks
a, na = hashes(sys.argv[1]); b, nb = hashes(sys.argv[2])
print(f"two builds of the base: {na} and {nb} stored blocks, {len(a & b)} in common ({len(a & b) / nb:.3f} of the second)")
PY
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); machine: $(nproc) cores; commit $(git -C "$ROOT" rev-parse --short HEAD)"
