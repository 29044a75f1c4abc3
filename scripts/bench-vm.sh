#!/usr/bin/env bash
# VM boot from a registry, measured: time from starting the NBD server to the guest's marker
# line (APP2-SHA256, printed by /opt/app2/bin/hello after it read its data file), and the
# bytes fetched over the network (HTTP bodies), for:
#   mcow-cold   mcow serve --cache EMPTY disk=oci://127.0.0.1:PORT/mcow/vm:v1   (docker-registry)
#   mcow-warm   the same with the cache of the cold boot (a second boot, new serve process)
#   mcow-trace  like mcow-cold, but the image was pushed with a trace of one boot (mcow trace),
#               which the serve prefetches in the background
#   mcow-http, mcow-http-trace  the same two images as an OCI layout on the nginx that serves
#               nbdkit-curl (mcow serve disk=http://127.0.0.1:PORT/images:TAG)
#   mcow-zstd, mcow-zstd-trace  like mcow-cold and mcow-trace, with the image pushed with
#               --compress (one zstd frame per block; the cache holds the layers uncompressed)
#   nbdkit-curl nbdkit --filter=stats curl url=http://127.0.0.1:PORT/disk.raw      (nginx)
#   local-raw   qemu-nbd --read-only on the same raw image as a local file
# The guest is the demo's (scripts/demo-vm.sh build), booted read-only (vmmode=ro) in every
# case so that the raw image and the nbdkit export serve identical reads. After one uncounted boot,
# 3 rounds (the cases in a new order each round); medians are printed.
# Usage: scripts/bench-vm.sh [WORKDIR] [ROUNDS]    (default: target/bench-vm, 3)
#        MCOW_SERVE_ARGS='--fetch-window 1' scripts/bench-vm.sh   (extra options for mcow serve)
#        MCOW_BLOCK_SIZE=16K scripts/bench-vm.sh   (block size of the image; default 64K)
# Needs what demo-vm.sh needs, plus nginx and nbdkit (nbdkit-plugin-curl).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-$ROOT/target/bench-vm}
ROUNDS=${2:-3}
(cd "$ROOT" && cargo build --release -p mcow >/dev/null 2>&1)
export MCOW=$ROOT/target/release/mcow
A=$ROOT/target/vm-assets
mkdir -p "$W"; W=$(cd "$W" && pwd)
bash "$ROOT/scripts/demo-vm.sh" build "$W/img" >/dev/null
"$MCOW" export "$W/img/app2" "$W/disk.raw" >/dev/null

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
freeport() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

RP=$(freeport); mkdir -p "$W/reg"
printf 'version: 0.1\nlog: {level: warn, accesslog: {disabled: true}}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s, secret: bench}\n' \
  "$W/reg/data" "$RP" > "$W/reg/config.yml"
docker-registry serve "$W/reg/config.yml" >"$W/reg/log" 2>&1 & pids+=($!)
NP=$(freeport); mkdir -p "$W/ngx/www" "$W/ngx/logs" "$W/ngx/tmp"
ln -f "$W/disk.raw" "$W/ngx/www/disk.raw"; chmod 755 "$W" "$W/ngx" "$W/ngx/www"; chmod 644 "$W/disk.raw"
cat > "$W/ngx/nginx.conf" <<NGX
daemon off; master_process on; worker_processes 1;
pid $W/ngx/nginx.pid; error_log $W/ngx/logs/error.log warn;
events { worker_connections 256; }
http { log_format sent '\$body_bytes_sent'; access_log $W/ngx/logs/access.log sent;
  client_body_temp_path $W/ngx/tmp/body; proxy_temp_path $W/ngx/tmp/proxy;
  fastcgi_temp_path $W/ngx/tmp/fastcgi; uwsgi_temp_path $W/ngx/tmp/uwsgi; scgi_temp_path $W/ngx/tmp/scgi;
  default_type application/octet-stream; sendfile on;
  server { listen 127.0.0.1:$NP; root $W/ngx/www; location / { } } }
NGX
nginx -e "$W/ngx/logs/error.log" -c "$W/ngx/nginx.conf" -p "$W/ngx/" & pids+=($!)
for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$RP/v2/" && curl -sfI -o /dev/null "http://127.0.0.1:$NP/disk.raw" && break; sleep 0.05; done
REF=oci://127.0.0.1:$RP/mcow/vm:v1
"$MCOW" push "$W/img/app2" "$REF" >/dev/null

# Boots the guest from nbd+unix:///disk?socket=SOCK; prints the seconds from T0 to the marker.
boot() { # SOCK T0 CONSOLE
  local m=$W/marker; rm -f "$m"
  timeout 180 qemu-system-x86_64 -accel tcg -m 256 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$A/vmlinux" -initrd "$A/initrd.cpio.gz" -append 'console=ttyS0 panic=-1 quiet vmid=0 vmmode=ro' \
    -drive "file=nbd+unix:///disk?socket=$1,format=raw,if=virtio,readonly=on" 2>&1 \
    | while IFS= read -r l; do case $l in *APP2-SHA256*) [ -e "$m" ] || date +%s.%N > "$m";; esac; printf '%s\n' "$l"; done > "$3"
  grep -aq "MCOW-VM-DONE id=0 ok" "$3" && [ -e "$m" ] || { echo "boot failed, console in $3" >&2; exit 1; }
  awk -v a="$2" -v b="$(cat "$m")" 'BEGIN{printf "%.3f", b-a}'
}
wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.01; done; echo "no socket $1" >&2; exit 1; }
stop() { kill -TERM "$1"; wait "$1" || true; }

# The same image pushed with a trace of one boot (`mcow trace` on the local disk), for the
# mcow-trace case: a cold boot that prefetches the traced blocks in the background.
TREF=oci://127.0.0.1:$RP/mcow/vm:traced
rm -f "$W/t.sock"
"$MCOW" trace -k "$W/t.sock" --out "$W/boot.trace" "disk=$W/img/app2" 2>"$W/trace.log" & tp=$!
wait_sock "$W/t.sock"; boot "$W/t.sock" "$(date +%s.%N)" "$W/console-trace.log" >/dev/null; stop $tp
"$MCOW" push "$W/img/app2" "$TREF" --trace "$W/boot.trace" >/dev/null
# Both again with compressed blobs, for the mcow-zstd cases.
ZREF=oci://127.0.0.1:$RP/mcow/vmz:v1
ZTREF=oci://127.0.0.1:$RP/mcow/vmz:traced
"$MCOW" push --compress "$W/img/app2" "$ZREF" >/dev/null
"$MCOW" push --compress "$W/img/app2" "$ZTREF" --trace "$W/boot.trace" >/dev/null
# The same two images as an OCI layout served by the same nginx as nbdkit-curl's raw file, for
# the mcow-http cases: the same server on both sides.
rm -rf "$W/ngx/www/images"
"$MCOW" push "$W/img/app2" "file://$W/ngx/www/images:v1" >/dev/null
"$MCOW" push "$W/img/app2" "file://$W/ngx/www/images:traced" --trace "$W/boot.trace" >/dev/null
chmod -R a+rX "$W/ngx/www/images"
HREF=http://127.0.0.1:$NP/images:v1
HTREF=http://127.0.0.1:$NP/images:traced

run_case() { # CASE ROUND -> "secs bytes wire" (wire: body bytes nginx sent, or - )
  local s=$W/s.sock t0 secs bytes wire=- p; rm -f "$s"
  case $1 in
    mcow-cold|mcow-warm|mcow-trace|mcow-http|mcow-http-trace|mcow-zstd|mcow-zstd-trace)
      local ref=$REF cache=$W/cache
      [ "$1" = mcow-trace ] && ref=$TREF cache=$W/cache-trace
      [ "$1" = mcow-zstd ] && ref=$ZREF cache=$W/cache-zstd
      [ "$1" = mcow-zstd-trace ] && ref=$ZTREF cache=$W/cache-zstd-trace
      [ "$1" = mcow-http ] && ref=$HREF cache=$W/cache-http
      [ "$1" = mcow-http-trace ] && ref=$HTREF cache=$W/cache-http-trace
      [ "$1" = mcow-warm ] || rm -rf "$cache"
      : > "$W/ngx/logs/access.log"; t0=$(date +%s.%N)
      RUST_LOG=info "$MCOW" serve -k "$s" --cache "$cache" ${MCOW_SERVE_ARGS:-} "disk=$ref" 2>"$W/serve.log" & p=$!
      wait_sock "$s"; secs=$(boot "$s" "$t0" "$W/console-$1-$2.log"); stop $p
      # all bytes from the registry: manifest, config, layer headers and indexes, and blocks
      bytes=$(grep 'served; fetched' "$W/serve.log" | grep -o ' bytes_fetched=[0-9]*' | head -1 | cut -d= -f2)
      # from nginx, also the body bytes it sent (so multipart framing counts too)
      case $1 in mcow-http*) sleep 0.2; wire=$(awk '{s+=$1} END{print s+0}' "$W/ngx/logs/access.log") ;; esac ;;
    nbdkit-curl)
      rm -f "$W/stats"; : > "$W/ngx/logs/access.log"; t0=$(date +%s.%N)
      nbdkit -f -r -U "$s" --filter=stats curl url="http://127.0.0.1:$NP/disk.raw" statsfile="$W/stats" & p=$!
      wait_sock "$s"; secs=$(boot "$s" "$t0" "$W/console-$1-$2.log"); stop $p
      # body bytes nginx sent (exact; the stats filter's summary is in MiB with 2 decimals)
      sleep 0.2; bytes=$(awk '{s+=$1} END{print s+0}' "$W/ngx/logs/access.log"); wire=$bytes ;;
    local-raw)
      t0=$(date +%s.%N)
      qemu-nbd -f raw -k "$s" -x disk --read-only -t "$W/disk.raw" & p=$!
      wait_sock "$s"; secs=$(boot "$s" "$t0" "$W/console-$1-$2.log"); stop $p
      bytes=0 ;;
  esac
  echo "$secs $bytes $wire"
}

cases=(mcow-cold mcow-warm mcow-trace mcow-http mcow-http-trace mcow-zstd mcow-zstd-trace nbdkit-curl local-raw)
: > "$W/results"
# One boot first, not counted: the first boot of a run is slower whatever serves it.
run_case local-raw 0 >/dev/null
for r in $(seq "$ROUNDS"); do
  # a new order each round (seeded by the round, so runs repeat it), so that no case always
  # follows the same other one; a warm boot always follows its cold boot
  read -ra order <<<"$(python3 -c "import random; r = random.Random($r); o = ['mcow', 'nbdkit-curl', 'local-raw', 'mcow-trace', 'mcow-http', 'mcow-http-trace', 'mcow-zstd', 'mcow-zstd-trace']; r.shuffle(o); print(*o)")"
  for c in "${order[@]}"; do
    if [ "$c" = mcow ]; then
      for m in mcow-cold mcow-warm; do v=$(run_case "$m" "$r"); echo "$r $m $v" | tee -a "$W/results"; done
    else
      v=$(run_case "$c" "$r"); echo "$r $c $v" | tee -a "$W/results"
    fi
  done
done
median() { sort -n | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
echo
printf '%-16s %9s %13s %13s\n' case "median s" "median bytes" "nginx bytes"
for c in "${cases[@]}"; do
  s=$(awk -v c="$c" '$2==c{print $3}' "$W/results" | median)
  b=$(awk -v c="$c" '$2==c{print $4}' "$W/results" | median)
  n=-; grep -q " $c [^ ]* [^ ]* [0-9]" "$W/results" && n=$(awk -v c="$c" '$2==c && $5!="-"{print $5}' "$W/results" | median)
  printf '%-16s %9s %13s %13s\n' "$c" "$s" "$b" "$n"
  eval "S_${c//-/_}=$s B_${c//-/_}=$b"
done
awk -v cs="$S_mcow_cold" -v ns="$S_nbdkit_curl" -v cb="$B_mcow_cold" -v nb="$B_nbdkit_curl" -v ws="$S_mcow_warm" -v ls="$S_local_raw" \
    -v ts="$S_mcow_trace" -v tb="$B_mcow_trace" -v hs="$S_mcow_http" -v hb="$B_mcow_http" \
    -v hts="$S_mcow_http_trace" -v htb="$B_mcow_http_trace" \
    -v zs="$S_mcow_zstd" -v zb="$B_mcow_zstd" -v zts="$S_mcow_zstd_trace" -v ztb="$B_mcow_zstd_trace" 'BEGIN{
  printf "cold/nbdkit-curl bytes %.2fx (target <= 1.2x), time %.2fx (target <= 1.0x)\n", cb/nb, cs/ns
  printf "cold with trace/nbdkit-curl bytes %.2fx, time %.2fx\n", tb/nb, ts/ns
  printf "cold from nginx/nbdkit-curl bytes %.2fx, time %.2fx\n", hb/nb, hs/ns
  printf "cold from nginx with trace/nbdkit-curl bytes %.2fx, time %.2fx\n", htb/nb, hts/ns
  printf "compressed cold/nbdkit-curl bytes %.2fx (target <= 0.6x); time/uncompressed cold %.2fx (target <= 1.0x)\n", zb/nb, zs/cs
  printf "compressed cold with trace/nbdkit-curl bytes %.2fx; time/uncompressed with trace %.2fx\n", ztb/nb, zts/ts
  printf "warm/local-raw time %.2fx (target <= 1.1x)\n", ws/ls }'
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(qemu-system-x86_64 --version | head -1)"
