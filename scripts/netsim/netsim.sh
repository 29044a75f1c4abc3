#!/usr/bin/env bash
# netsim: a registry, a rack and N compute hosts in network namespaces, joined by shaped links,
# for the network tests and benchmarks of issue 12 ("Hosts and links", "Many hosts at once").
#
#   PREFIX-reg ==uplink== PREFIX-rack --- PREFIX-h1 .. PREFIX-hN
#   (servers)   (shaped)  (router, cache) (one /30 link each, unshaped)
#
# Usage (run it, or `source` it to get a `netsim CMD ARGS...` function that runs it):
#   netsim.sh up PROFILE NHOSTS [--cache] [--reg-data DIR] [--www DIR]
#                [--fail-first N --fail-match REGEX]
#       Creates the namespaces and links, shapes the uplink and starts the servers; returns when
#       they answer. Fails (and cleans up) if PREFIX-* namespaces exist already.
#       PROFILE (the uplink between the registry and the rack):
#         unshaped   no tbf, no delay (the proxies still run, with 0 ms)
#         1g1ms      1 Gbit/s each way, 1 ms RTT
#         100m20ms   100 Mbit/s, 20 ms RTT
#         20m80ms    20 Mbit/s, 80 ms RTT
#       Servers in PREFIX-reg, on its own loopback (so `netsim.sh exec reg mcow push ...
#       oci://127.0.0.1:5000/...` pushes without crossing the link):
#         docker-registry on 127.0.0.1:5000, data in --reg-data DIR (default STATE/reg-data)
#         nginx on 127.0.0.1:8080 serving --www DIR (default STATE/www), ranges supported
#       and each exposed as REGADDR:5000 / REGADDR:8080 through a delay proxy
#       (delay-proxy.py beside this script) that adds the profile's RTT.
#       --fail-first N --fail-match REGEX: the registry's delay proxy answers the first N requests
#         whose request line matches REGEX with 429 (Retry-After: 1) and closes the connection.
#       --cache: a caching nginx in PREFIX-rack on CACHEADDR:5000 (registry) and CACHEADDR:8080
#         (files), behind the shaped uplink. Registry blobs (/v2/NAME/blobs/sha256:...) and files
#         are cached (keyed by exact range, or in 1 MiB slices: NETSIM_CACHE_MODE, see
#         blob_cache below; one origin fetch per key even when many hosts ask at once:
#         proxy_cache_lock); everything else (/v2/, manifests, uploads) passes through uncached.
#   netsim.sh down             Stops every process started by `up` (and anything else still
#                              running inside the PREFIX-* namespaces), deletes the namespaces
#                              (which removes the links and the tc qdiscs) and the cache. Safe
#                              to run twice, or after a failed `up`.
#   netsim.sh addr reg|nginx [--cache]   HOST:PORT a compute host must use: REGADDR:5000 /
#                              REGADDR:8080, or with --cache the rack's cache CACHEADDR:5000/:8080.
#   netsim.sh exec NODE CMD... Runs CMD in a namespace (NODE: reg, rack, h1..hN) = ip netns exec.
#                              It execs, so `netsim.sh exec h1 SERVER & pid=$!` is the server's pid.
#   netsim.sh ns NODE          The namespace's name (PREFIX-NODE).
#   netsim.sh egress           Bytes PREFIX-reg has sent on the uplink so far (its tx_bytes:
#                              every byte the registry side sent, headers and TCP/IP included).
#   netsim.sh stats reg|nginx  The JSON summary of that delay proxy (connections, bytes each way,
#                              injected answers).
#   netsim.sh log NAME         Prints STATE/NAME.log (registry, nginx, reg-proxy, nginx-proxy, cache).
#   netsim.sh status           The profile, host count and addresses of the running set-up.
# Environment:
#   NETSIM_PREFIX  namespace prefix (default mcb); use a unique one to run beside others.
#   NETSIM_NET     the first two octets of the addresses (default 10.231).
#   NETSIM_STATE   state directory: pid files, logs, configs, cache (default /tmp/netsim-PREFIX).
#   NETSIM_CACHE_MAX  max_size of the rack's cache (default 50g).
#   NETSIM_CACHE_MODE range (default) or slice: how the rack's cache keys blobs (blob_cache).
# Addresses (NET = NETSIM_NET), only inside the namespaces, no default route anywhere:
#   uplink      PREFIX-reg up0 NET.0.1/30 (REGADDR)  <->  PREFIX-rack up0 NET.0.2/30
#   host I      PREFIX-rack hI NET.I.1/30            <->  PREFIX-hI eth0 NET.I.2/30   (I <= 250)
#   cache       CACHEADDR = NET.255.1/32 on PREFIX-rack's lo, routed from each host via its link
#   Routes: each host to REGADDR's /30 and to CACHEADDR via the rack; the registry to each host's
#   /30 via the rack; the rack forwards (net.ipv4.ip_forward=1 in its namespace only).
# The namespaces separate the network only: every host sees the same filesystem, so give each
# host its own cache and layer-store directories (and each server its own Unix socket path).
# The registry's traffic to the hosts crosses the uplink: tbf shapes it on PREFIX-reg's up0
# (registry egress) and on PREFIX-rack's up0 (the other way). Needs root, iproute2 (ip, tc),
# docker-registry, nginx (nginx-light has the slice module), curl and /usr/bin/python3.

P=${NETSIM_PREFIX:-mcb}
NET=${NETSIM_NET:-10.231}
STATE=${NETSIM_STATE:-/tmp/netsim-$P}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=/usr/bin/python3
REGADDR=$NET.0.1
RACKUP=$NET.0.2
CACHEADDR=$NET.255.1

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  # Sourced: a function that runs this script (so its `set -e` stays its own).
  NETSIM_SCRIPT=$HERE/netsim.sh
  netsim() { bash "$NETSIM_SCRIPT" "$@"; }
  return 0
fi
set -euo pipefail

die() { echo "netsim: $*" >&2; exit 1; }
ns() { echo "$P-$1"; }
need() { for t in "$@"; do command -v "$t" >/dev/null || die "$t is required but not installed"; done; }
our_namespaces() { ip netns list | awk '{print $1}' | grep -E "^$P-(reg|rack|h[0-9]+)$" || true; }

# The profile's tbf rate, burst and queue latency, and the one-way delay (ms) for the proxies.
# burst: at least one 64 KiB GSO packet (so tbf need not split them) and about 4 ms of the rate
# at 1 Gbit/s, so that the token bucket's timer resolution does not cap the rate. latency: the
# queue tbf keeps before it drops (rate x latency bytes): deep enough that several connections
# share the link without loss, short enough that a small request is not stuck behind a long
# queue for more than a fraction of the RTT at the slower profiles.
profile() {
  case $1 in
    unshaped) RATE= BURST= LAT= DELAY=0 ;;
    1g1ms) RATE=1gbit BURST=512kb LAT=10ms DELAY=0.5 ;;
    100m20ms) RATE=100mbit BURST=64kb LAT=50ms DELAY=10 ;;
    20m80ms) RATE=20mbit BURST=64kb LAT=100ms DELAY=40 ;;
    *) die "unknown profile $1 (unshaped, 1g1ms, 100m20ms, 20m80ms)" ;;
  esac
}

# start NAME NODE CMD...: CMD in the namespace, in the background, its pid in STATE/pids.
# `ip netns exec` execs CMD, so $! is the server itself.
start() {
  local name=$1 node=$2; shift 2
  ip netns exec "$(ns "$node")" "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name.pid"
}

# wait_http NODE URL SERVER: until URL answers (any HTTP status) from NODE, 10 s at most; fails
# at once if SERVER (a name given to `start`) has exited.
wait_http() {
  local node=$1 url=$2 server=$3
  for _ in $(seq 200); do
    ip netns exec "$(ns "$node")" curl -s -o /dev/null --max-time 2 "$url" && return 0
    [ -e "/proc/$(cat "$STATE/pids/$server.pid")" ] || die "$server exited; its log ($STATE/$server.log):
$(cat "$STATE/$server.log")"
    sleep 0.05
  done
  die "$url does not answer from $(ns "$node")"
}

nginx_common() { # DIR: the lines every nginx here shares
  cat <<EOF
user root; daemon off; master_process on; worker_processes 2;
pid $1/nginx.pid; error_log $1/error.log warn;
events { worker_connections 1024; }
EOF
}
nginx_temps() { # DIR
  echo "client_body_temp_path $1/tmp/body; proxy_temp_path $1/tmp/proxy; fastcgi_temp_path $1/tmp/fastcgi;"
  echo "uwsgi_temp_path $1/tmp/uwsgi; scgi_temp_path $1/tmp/scgi;"
}

# How the rack's cache keys what it stores (NETSIM_CACHE_MODE):
#   range (default)  each answer is cached under its URI and exact Range header (single or
#                    several ranges, or none), and fetched from the origin with that same Range:
#                    hosts running the same image ask the same ranges (same reads, same
#                    windows, same trace batches), so the origin sends each once; a range that
#                    differs in any byte is a miss of its own.
#   slice            1 MiB slices (nginx's slice module): any single range is served from the
#                    slices it touches, fetched whole; requests with several ranges pass through
#                    uncached (the slice module serves one range only).
# Either way, concurrent misses of one key wait for the first (proxy_cache_lock).
blob_cache() { # UPSTREAM: the location body that caches blobs or files from it
  local mode=${NETSIM_CACHE_MODE:-range}
  case $mode in
    range) cat <<EOF
      proxy_cache netsim;
      proxy_cache_key \$uri|\$http_range;
      proxy_cache_valid 200 206 7d;
      proxy_cache_lock on; proxy_cache_lock_timeout 600s; proxy_cache_lock_age 600s;
      proxy_set_header Range \$http_range;
      proxy_set_header Host \$http_host; proxy_set_header Connection "";
      proxy_pass http://$1;
EOF
    ;;
    slice) cat <<EOF
      if (\$multirange) { rewrite ^ /.pass\$uri last; }
      slice 1m;
      proxy_cache netsim;
      proxy_cache_key \$uri\$slice_range;
      proxy_cache_valid 200 206 7d;
      proxy_cache_lock on; proxy_cache_lock_timeout 600s; proxy_cache_lock_age 600s;
      proxy_set_header Range \$slice_range;
      proxy_set_header Host \$http_host; proxy_set_header Connection "";
      proxy_pass http://$1;
EOF
    ;;
    *) die "NETSIM_CACHE_MODE is range or slice, not $mode" ;;
  esac
}

# The rack's cache: one server per origin (see blob_cache for how blobs are kept).
cache_conf() {
  local d=$STATE/cache
  nginx_common "$d"
  cat <<EOF
http {
  log_format c '\$remote_addr "\$request" \$status \$body_bytes_sent \$upstream_cache_status';
  access_log $d/access.log c;
  $(nginx_temps "$d")
  proxy_cache_path $d/store levels=1:2 keys_zone=netsim:32m max_size=${NETSIM_CACHE_MAX:-50g} inactive=7d use_temp_path=off;
  upstream reg { server $REGADDR:5000; keepalive 64; }
  upstream www { server $REGADDR:8080; keepalive 64; }
  map \$http_range \$multirange { "~," 1; default 0; }
  proxy_http_version 1.1;
  proxy_read_timeout 600s;
  client_max_body_size 0;
  server {
    listen $CACHEADDR:5000;
    location ~ ^/v2/.+/blobs/sha256:[0-9a-f]+\$ {
$(blob_cache reg)
    }
    location ^~ /.pass/ {
      internal;
      rewrite ^/.pass(.*)\$ \$1 break;
      proxy_set_header Host \$http_host; proxy_set_header Connection "";
      proxy_buffering off;
      proxy_pass http://reg;
    }
    location / {
      proxy_set_header Host \$http_host; proxy_set_header Connection "";
      proxy_buffering off; proxy_request_buffering off;
      proxy_pass http://reg;
    }
  }
  server {
    listen $CACHEADDR:8080;
    location / {
$(blob_cache www)
    }
    location ^~ /.pass/ {
      internal;
      rewrite ^/.pass(.*)\$ \$1 break;
      proxy_set_header Host \$http_host; proxy_set_header Connection "";
      proxy_buffering off;
      proxy_pass http://www;
    }
  }
}
EOF
}

cmd_up() {
  [ $# -ge 2 ] || die "usage: netsim.sh up PROFILE NHOSTS [--cache] [--reg-data DIR] [--www DIR] [--fail-first N --fail-match REGEX]"
  local prof=$1 n=$2 cache=0 regdata= www= failn=0 failre=; shift 2
  profile "$prof"
  [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 250 ] || die "NHOSTS must be 1..250, not $n"
  while [ $# -gt 0 ]; do
    case $1 in
      --cache) cache=1 ;;
      --reg-data) regdata=$2; shift ;;
      --www) www=$2; shift ;;
      --fail-first) failn=$2; shift ;;
      --fail-match) failre=$2; shift ;;
      *) die "unknown option $1" ;;
    esac
    shift
  done
  [[ $failn =~ ^[0-9]+$ ]] || die "--fail-first needs a count, not $failn"
  [ "$failn" = 0 ] || [ -n "$failre" ] || die "--fail-first needs --fail-match REGEX"
  need ip tc curl docker-registry nginx "$PY"
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
  [ -z "$(our_namespaces)" ] || die "namespaces $(our_namespaces | tr '\n' ' ')exist already: netsim.sh down first (NETSIM_PREFIX=$P)"
  # From here on, any failure (or a signal) undoes everything.
  UP_OK=0
  trap '[ "$UP_OK" = 1 ] || { echo "netsim: up failed, cleaning up" >&2; cmd_down >&2; }' EXIT
  trap 'exit 1' INT TERM HUP
  mkdir -p "$STATE/pids"
  regdata=${regdata:-$STATE/reg-data}; www=${www:-$STATE/www}
  mkdir -p "$regdata" "$www"
  regdata=$(cd "$regdata" && pwd); www=$(cd "$www" && pwd)
  printf 'PROFILE=%s\nNHOSTS=%s\nCACHE=%s\n' "$prof" "$n" "$cache" >"$STATE/env"

  local nodes=(reg rack) i
  for i in $(seq "$n"); do nodes+=("h$i"); done
  for i in "${nodes[@]}"; do
    ip netns add "$(ns "$i")"
    ip -n "$(ns "$i")" link set lo up
  done
  local R; R=$(ns reg); local K; K=$(ns rack)
  # the uplink
  ip -n "$R" link add up0 type veth peer name up0 netns "$K"
  ip -n "$R" addr add "$REGADDR/30" dev up0
  ip -n "$K" addr add "$RACKUP/30" dev up0
  ip -n "$R" link set up0 up
  ip -n "$K" link set up0 up
  ip netns exec "$K" sysctl -qw net.ipv4.ip_forward=1
  ip -n "$K" addr add "$CACHEADDR/32" dev lo
  # the hosts
  for i in $(seq "$n"); do
    local H; H=$(ns "h$i")
    ip -n "$K" link add "h$i" type veth peer name eth0 netns "$H"
    ip -n "$K" addr add "$NET.$i.1/30" dev "h$i"
    ip -n "$H" addr add "$NET.$i.2/30" dev eth0
    ip -n "$K" link set "h$i" up
    ip -n "$H" link set eth0 up
    ip -n "$H" route add "$NET.0.0/30" via "$NET.$i.1"
    ip -n "$H" route add "$CACHEADDR/32" via "$NET.$i.1"
    ip -n "$R" route add "$NET.$i.0/30" via "$RACKUP"
  done
  # the shaping, both ways
  if [ -n "$RATE" ]; then
    for i in "$R" "$K"; do
      ip netns exec "$i" tc qdisc add dev up0 root tbf rate "$RATE" burst "$BURST" latency "$LAT"
    done
  fi

  # the servers, on the registry's loopback
  mkdir -p "$STATE/registry" "$STATE/nginx/tmp"
  printf 'version: 0.1\nlog: {level: warn, accesslog: {disabled: true}}\nstorage:\n  filesystem: {rootdirectory: %s}\n  delete: {enabled: true}\n  maintenance: {uploadpurging: {enabled: false}}\nhttp: {addr: 127.0.0.1:5000, secret: netsim}\n' \
    "$regdata" >"$STATE/registry/config.yml"
  start registry reg docker-registry serve "$STATE/registry/config.yml"
  {
    nginx_common "$STATE/nginx"
    echo "http { access_log off; $(nginx_temps "$STATE/nginx")"
    echo "  default_type application/octet-stream; sendfile on;"
    echo "  server { listen 127.0.0.1:8080; root $www; location / { } } }"
  } >"$STATE/nginx/nginx.conf"
  start nginx reg nginx -e "$STATE/nginx/error.log" -c "$STATE/nginx/nginx.conf" -p "$STATE/nginx/"
  local fail=()
  [ "$failn" -gt 0 ] && fail=(--fail-first "$failn" --fail-match "$failre")
  start reg-proxy reg "$PY" "$HERE/delay-proxy.py" --listen "$REGADDR:5000" --upstream 127.0.0.1:5000 \
    --delay-ms "$DELAY" --stats "$STATE/reg-proxy.json" "${fail[@]}"
  start nginx-proxy reg "$PY" "$HERE/delay-proxy.py" --listen "$REGADDR:8080" --upstream 127.0.0.1:8080 \
    --delay-ms "$DELAY" --stats "$STATE/nginx-proxy.json"
  wait_http reg http://127.0.0.1:5000/v2/ registry
  wait_http reg http://127.0.0.1:8080/ nginx
  # Through the proxies from the rack (not from a host: no request is spent on the registry
  # proxy's injected failures, whose regex should not match /v2/).
  wait_http rack "http://$REGADDR:5000/v2/" reg-proxy
  wait_http rack "http://$REGADDR:8080/" nginx-proxy
  if [ "$cache" = 1 ]; then
    mkdir -p "$STATE/cache/tmp" "$STATE/cache/store"
    cache_conf >"$STATE/cache/nginx.conf"
    start cache rack nginx -e "$STATE/cache/error.log" -c "$STATE/cache/nginx.conf" -p "$STATE/cache/"
    wait_http h1 "http://$CACHEADDR:5000/v2/" cache
  fi
  UP_OK=1
  echo "netsim: up $prof, $n hosts$([ "$cache" = 1 ] && echo ", cache at $CACHEADDR") (prefix $P, state $STATE)" >&2
}

# Sends SIGTERM to PIDS that run in one of our namespaces, waits up to 5 s, then SIGKILL.
stop_pids() {
  local mine=() p
  for p in "$@"; do
    case $(ip netns identify "$p" 2>/dev/null) in "$P"-*) mine+=("$p") ;; esac
  done
  [ ${#mine[@]} -gt 0 ] || return 0
  kill -TERM "${mine[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    local alive=0
    for p in "${mine[@]}"; do [ -e "/proc/$p" ] && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.05
  done
  kill -KILL "${mine[@]}" 2>/dev/null || true
}

cmd_down() {
  local pids=() f n
  for f in "$STATE"/pids/*.pid; do
    [ -e "$f" ] && pids+=("$(cat "$f")")
  done
  [ ${#pids[@]} -gt 0 ] && stop_pids "${pids[@]}"
  rm -f "$STATE"/pids/*.pid
  for n in $(our_namespaces); do
    # anything else started into the namespace (a host's mcow serve, a curl)
    mapfile -t pids < <(ip netns pids "$n" 2>/dev/null)
    [ ${#pids[@]} -gt 0 ] && stop_pids "${pids[@]}"
    ip netns del "$n"
  done
  rm -rf "$STATE/cache/store"
  return 0
}

cmd_addr() {
  local port
  case ${1:-} in reg) port=5000 ;; nginx) port=8080 ;; *) die "usage: netsim.sh addr reg|nginx [--cache]" ;; esac
  if [ "${2:-}" = --cache ]; then echo "$CACHEADDR:$port"; else echo "$REGADDR:$port"; fi
}

cmd_egress() {
  ip netns exec "$(ns reg)" cat /sys/class/net/up0/statistics/tx_bytes
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  addr) shift; cmd_addr "$@" ;;
  exec) [ $# -ge 3 ] || die "usage: netsim.sh exec NODE CMD..."; node=$2; shift 2; exec ip netns exec "$(ns "$node")" "$@" ;;
  ns) ns "${2:?usage: netsim.sh ns NODE}" ;;
  egress) cmd_egress ;;
  stats) cat "$STATE/${2:?usage: netsim.sh stats reg|nginx}-proxy.json" ;;
  log) cat "$STATE/${2:?usage: netsim.sh log NAME}.log" ;;
  status)
    [ -e "$STATE/env" ] || die "not up (no $STATE/env)"
    cat "$STATE/env"; echo "REGADDR=$REGADDR"; echo "CACHEADDR=$CACHEADDR"; echo "NAMESPACES=$(our_namespaces | tr '\n' ' ')" ;;
  *) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
