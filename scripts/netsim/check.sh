#!/usr/bin/env bash
# Measures the links netsim.sh builds, per profile (the numbers in docs/BENCHMARKS.md, "Network
# harness (issue 12)"), with curl from the compute hosts to the nginx in the registry namespace:
#   rtt       time_starttransfer of a 1-byte range, median of 5: on a fresh connection (the RTT of
#             the request plus the handshake's, so 2 RTT expected) and on a reused one (1 RTT)
#   1 host    one 50 MB download: seconds and Mbit/s (expected: size / rate)
#   8 hosts   a 10 MB download on each of 8 hosts at once: the slowest's seconds and the
#             aggregate Mbit/s (expected: the uplink's rate, shared)
#   cache     the 50 MB file through the rack's cache from h1 (a miss: the uplink carries it) and
#             then from h2 (a hit): seconds and the registry's egress during each; then another
#             10 MB file through the cache on 8 hosts at once: the registry's egress (one copy
#             expected: concurrent misses of a slice wait for one fetch)
# Usage: scripts/netsim/check.sh [WORKDIR] [PROFILE...]  (default: target/netsim-check, all four)
# Uses NETSIM_PREFIX (default here mcc) and NETSIM_NET; needs what netsim.sh needs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
W=${1:-$HERE/../../target/netsim-check}
shift || true
PROFILES=("$@")
[ ${#PROFILES[@]} -gt 0 ] || PROFILES=(unshaped 1g1ms 100m20ms 20m80ms)
export NETSIM_PREFIX=${NETSIM_PREFIX:-mcc}
mkdir -p "$W/www"; W=$(cd "$W" && pwd)
export NETSIM_STATE=$W/state
N=$HERE/netsim.sh
trap 'bash "$N" down' EXIT
[ -s "$W/www/f50.bin" ] || head -c 50000000 /dev/urandom >"$W/www/f50.bin"
[ -s "$W/www/f10.bin" ] || head -c 10000000 /dev/urandom >"$W/www/f10.bin"
[ -s "$W/www/g10.bin" ] || head -c 10000000 /dev/urandom >"$W/www/g10.bin"
chmod -R a+rX "$W/www"
median() { sort -n | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
mbit() { awk -v b="$1" -v s="$2" 'BEGIN{printf "%.1f", b*8/s/1e6}'; }

for prof in "${PROFILES[@]}"; do
  bash "$N" up "$prof" 8 --cache --www "$W/www" 2>/dev/null
  A=$(bash "$N" addr nginx); C=$(bash "$N" addr nginx --cache)
  fresh=$(for _ in 1 2 3 4 5; do bash "$N" exec h1 curl -sf -o /dev/null -r 0-0 -w '%{time_starttransfer}\n' "http://$A/f10.bin"; done | median)
  reused=$(for _ in 1 2 3 4 5; do bash "$N" exec h1 curl -sf -o /dev/null -o /dev/null -r 0-0 -w '%{time_starttransfer}\n' "http://$A/f10.bin" "http://$A/f10.bin" | tail -1; done | median)
  one=$(bash "$N" exec h1 curl -sf -o /dev/null -w '%{time_total}' "http://$A/f50.bin")
  t0=$(date +%s.%N)
  for i in $(seq 8); do bash "$N" exec "h$i" curl -sf -o /dev/null -w '%{time_total}\n' "http://$A/f10.bin" >"$W/par.$i" & done
  wait
  t1=$(date +%s.%N)
  slow=$(cat "$W"/par.* | sort -n | tail -1); fast=$(cat "$W"/par.* | sort -n | head -1)
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')
  e0=$(bash "$N" egress)
  miss=$(bash "$N" exec h1 curl -sf -o /dev/null -w '%{time_total}' "http://$C/f50.bin")
  e1=$(bash "$N" egress)
  hit=$(bash "$N" exec h2 curl -sf -o /dev/null -w '%{time_total}' "http://$C/f50.bin")
  e2=$(bash "$N" egress)
  for i in $(seq 8); do bash "$N" exec "h$i" curl -sf -o /dev/null "http://$C/g10.bin" & done
  wait
  e3=$(bash "$N" egress)
  printf '%-9s rtt fresh %.1f ms reused %.1f ms | 1 host 50 MB %.2f s %s Mbit/s | 8 hosts x 10 MB: %.2f-%.2f s, %s Mbit/s together | cache miss %.2f s egress %d B, hit %.2f s egress %d B; 8 hosts x 10 MB via cache: egress %d B\n' \
    "$prof" "$(awk -v x="$fresh" 'BEGIN{print x*1000}')" "$(awk -v x="$reused" 'BEGIN{print x*1000}')" \
    "$one" "$(mbit 50000000 "$one")" "$fast" "$slow" "$(mbit 80000000 "$wall")" \
    "$miss" $((e1 - e0)) "$hit" $((e2 - e1)) $((e3 - e2))
  bash "$N" down
done
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); machine: $(nproc) cores, $(uname -r)"
