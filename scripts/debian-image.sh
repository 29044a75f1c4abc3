#!/usr/bin/env bash
# A real Debian image as mcow layers (issue 12), and a guest that boots it.
#
# Usage: scripts/debian-image.sh build OUT          build the disks OUT/{base,py,web}
#        scripts/debian-image.sh boot NBD_URI CONSOLE_FILE   boot the guest from an NBD export
#        scripts/debian-image.sh demo OUT           build, then serve OUT/web and boot it: timings,
#                                                   and the bytes the boot reads
# build (OUT is removed first; an OUT that is not empty and was not made by this script is refused):
#   base  `mmdebstrap --variant=minbase bookworm` (Debian's packages, from the machine's apt
#         sources), `mkfs.ext4 -d` into a 2 GiB image, `mcow import` (block size MCOW_BLOCK_SIZE,
#         default 64K)
#   py    a disk on base (scripts/layer-run.sh: mounted with nbdfuse + loop, then sealed) where
#         `chroot MNT apt-get install --no-install-recommends python3` ran
#   web   the same on py with nginx-light, plus the guest program /opt/mcow/run.sh (below)
#   The chroot gets /proc, /sys and /dev bind-mounted, apt's lists and caches on a tmpfs (so no
#   layer stores them), the host's apt sources and resolv.conf and a policy-rc.d that starts no
#   service; those files are removed (the image's own put back) before sealing. Prints the build
#   time, each layer's stored blocks and bytes (mcow info) and the total; OUT/expected-py-sha256
#   holds the checksum the guest must print (check.py run in the chroot at build time).
# boot: qemu-system-x86_64 -accel tcg, the cloud kernel and initrd-debian.cpio.gz of
#   scripts/vm-assets.sh (vmmode=ro: the disk is read-only under a tmpfs overlay), the drive
#   read-only. Exits 0 only if the console shows DEB-PY-SHA256 (equal to DEB_EXPECT_PY if that is
#   set), DEB-NGINX-OK and MCOW-VM-DONE id=0 ok; prints the marker lines and the seconds from
#   starting qemu to DEB-APPS-DONE. NBD_URI may be any QEMU drive file name (a local image, an
#   http:// URL); DEB_FORMAT is its format (default raw), DEB_WRAP a command prefix for qemu
#   (e.g. `ip netns exec NS`), and DEB_MARKER_FILE receives the time of DEB-APPS-DONE (epoch
#   seconds) after a good boot.
# The guest program /opt/mcow/run.sh (run by the initramfs in a chroot of the disk) prints:
#   DEB-PY-SHA256 <hex>   python3 importing json, hashlib, sqlite3, email, zlib, decimal, csv:
#                         sha256 of a deterministic computation with each
#   DEB-NGINX-OK          `nginx -t` passed (DEB-NGINX-FAIL and its output otherwise)
#   DEB-APPS-DONE         then exits 1 if either failed (the initramfs then says MCOW-VM-DONE fail)
# Environment: MCOW (the mcow binary; default target/release/mcow, built if missing),
# MCOW_BLOCK_SIZE, MCOW_VM_ASSETS (default target/vm-assets).
# Needs root, network through apt's sources, and: mmdebstrap, e2fsprogs, libnbd-bin (nbdfuse),
# qemu-system-x86 (scripts/install-deps.sh); demo also nbdkit (the stats filter counts the reads).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELF=$ROOT/scripts/debian-image.sh
ASSETS=${MCOW_VM_ASSETS:-$ROOT/target/vm-assets}
mcow_bin() {
  if [ -z "${MCOW:-}" ]; then
    MCOW=$ROOT/target/release/mcow
    [ -x "$MCOW" ] || (cd "$ROOT" && cargo build --release -p mcow)
  fi
  export MCOW
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }

# --- the guest program (installed into the web layer) ----------------------------------------
write_guest_program() { # DIR
  mkdir -p "$1"
  cat > "$1/check.py" <<'PY'
# Deterministic work with several stdlib modules; prints their combined sha256.
import csv, decimal, email.message, hashlib, io, json, sqlite3, zlib
h = hashlib.sha256()
db = sqlite3.connect(":memory:")
db.execute("create table t (k integer primary key, v text)")
db.executemany("insert into t values (?, ?)", [(i, hashlib.md5(str(i).encode()).hexdigest()) for i in range(2000)])
rows = db.execute("select k, v from t where v like 'a%' order by v").fetchall()
h.update(json.dumps({"rows": rows, "n": len(rows)}, sort_keys=True).encode())
m = email.message.EmailMessage()
m["Subject"], m["From"], m["To"] = "mcow", "guest@example.org", "host@example.org"
m.set_content("a real Debian guest on mcow layers\n" * 50)
h.update(m.as_bytes())
h.update(zlib.compress(b"mcow " * 10000, 9))
decimal.getcontext().prec = 60
h.update(str(decimal.Decimal(1) / decimal.Decimal(7)).encode())
out = io.StringIO()
csv.writer(out).writerows(rows[:20])
h.update(out.getvalue().encode())
print("DEB-PY-SHA256", h.hexdigest())
PY
  cat > "$1/run.sh" <<'SH'
#!/bin/sh
# The guest program of scripts/debian-image.sh: python3 and nginx from their Debian packages.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8
rc=0
python3 /opt/mcow/check.py || { echo "DEB-PY-FAIL rc=$?"; rc=1; }
if out=$(nginx -t 2>&1); then echo DEB-NGINX-OK; else echo "DEB-NGINX-FAIL"; echo "$out"; rc=1; fi
echo DEB-APPS-DONE
exit $rc
SH
  chmod 755 "$1/run.sh"
}

# --- inside scripts/layer-run.sh: apt-get install in a chroot of LAYER_MNT --------------------
# Usage: debian-image.sh _apt-layer PKG...  (DEB_GUEST=1 also installs and checks the guest
# program; DEB_EXPECT_FILE receives its checksum)
apt_layer() {
  local m=$LAYER_MNT f
  [ -x "$m/usr/bin/apt-get" ] || { echo "debian-image: $m is not a Debian root" >&2; exit 1; }
  binds=() moved=() added=()   # global: undo runs at exit
  undo() {
    set +e
    local i
    for ((i=${#binds[@]}-1; i>=0; i--)); do umount "${binds[i]}" || umount -l "${binds[i]}"; done
    for f in "${added[@]}"; do rm -f "$f"; done
    for f in "${moved[@]}"; do mv -f "$f.mcow-orig" "$f"; done
  }
  trap undo EXIT
  for d in proc sys dev; do mount --bind "/$d" "$m/$d"; binds+=("$m/$d"); done
  # apt's lists and downloaded .debs go to RAM: the layer never stores them
  for d in var/lib/apt/lists var/cache/apt; do mount -t tmpfs -o mode=755 tmpfs "$m/$d"; binds+=("$m/$d"); done
  mkdir -p "$m/var/lib/apt/lists/partial" "$m/var/cache/apt/archives/partial"
  # apt sources: the host's instead of the image's own (put back afterwards)
  for f in "$m/etc/apt/sources.list" "$m/etc/resolv.conf"; do
    if [ -e "$f" ] || [ -L "$f" ]; then mv "$f" "$f.mcow-orig"; moved+=("$f"); fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    local to=$m/etc/apt/sources.list.d/mcow-host-$(basename "$f")
    [ "$f" = /etc/apt/sources.list ] && to=$m/etc/apt/sources.list
    cp "$f" "$to"; added+=("$to")
  done
  cp -L /etc/resolv.conf "$m/etc/resolv.conf"; added+=("$m/etc/resolv.conf")
  printf '#!/bin/sh\nexit 101\n' > "$m/usr/sbin/policy-rc.d"; chmod 755 "$m/usr/sbin/policy-rc.d"
  added+=("$m/usr/sbin/policy-rc.d")
  local in=(chroot "$m" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive)
  "${in[@]}" chown _apt:root /var/lib/apt/lists/partial /var/cache/apt/archives/partial
  local log; log=$(mktemp /tmp/mcow-deb-apt.XXXXXX)
  { timeout 300 "${in[@]}" apt-get update -qq \
    && timeout 900 "${in[@]}" apt-get install -y -qq --no-install-recommends \
         -o Dpkg::Options::=--force-unsafe-io -o Dpkg::Use-Pty=0 "$@"; } >"$log" 2>&1 \
    || { cat "$log" >&2; rm -f "$log"; echo "debian-image: apt-get install $* failed" >&2; exit 1; }
  rm -f "$log"
  if [ "${DEB_GUEST:-}" = 1 ]; then
    write_guest_program "$m/opt/mcow"
    # the checks the guest will run, here in the chroot: they must pass now
    timeout 60 "${in[@]}" nginx -t 2>/dev/null || { echo "debian-image: nginx -t fails in the chroot" >&2; exit 1; }
    timeout 60 "${in[@]}" python3 /opt/mcow/check.py | awk '/^DEB-PY-SHA256 /{print $2}' > "$DEB_EXPECT_FILE"
    [ -s "$DEB_EXPECT_FILE" ] || { echo "debian-image: check.py fails in the chroot" >&2; exit 1; }
    rm -rf "$m/opt/mcow/__pycache__"
  fi
}

# --- build -------------------------------------------------------------------------------------
layer_line() { # DISK NAME: the disk's top sealed layer
  python3 - "$2" "$("$MCOW" info "$1" --output json)" <<'PY'
import json, sys
v = json.loads(sys.argv[2]); l = v["layers"][-1]; bs = v["block_size"]
print("{:<5} {:>6} blocks  {:8.1f} MiB stored  {:8.1f} MiB layer file  {}".format(
    sys.argv[1], l["stored_blocks"], l["stored_blocks"] * bs / 1048576, l["file_bytes"] / 1048576, l["digest"][:19]))
PY
}
build() { # OUT
  local out=$1
  mcow_bin
  command -v mmdebstrap >/dev/null || { echo "debian-image: mmdebstrap is missing (scripts/install-deps.sh)" >&2; exit 1; }
  if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -e "$out/.debian-image" ]; then
    echo "debian-image: $out is not empty and not a previous build: not removing it" >&2; exit 1
  fi
  rm -rf "$out" && mkdir -p "$out" && touch "$out/.debian-image"
  out=$(cd "$out" && pwd)
  local t0 t1 t2 t3 t4
  t0=$(now)
  timeout 900 mmdebstrap --quiet --variant=minbase bookworm "$out/root"
  echo mcow-debian > "$out/root/etc/hostname"
  : > "$out/root/etc/resolv.conf"   # the guest has no network; mmdebstrap copied the host's
  t1=$(now)
  timeout 300 mkfs.ext4 -q -F -b 4096 -L deb-root -d "$out/root" "$out/base.ext4" 2G >/dev/null
  rm -rf "$out/root"
  timeout 300 "$MCOW" import -q -b "${MCOW_BLOCK_SIZE:-64K}" "$out/base.ext4" "$out/base" >/dev/null
  rm -f "$out/base.ext4"
  t2=$(now)
  bash "$ROOT/scripts/layer-run.sh" "$out/base" "$out/py" bash "$SELF" _apt-layer python3 >/dev/null
  t3=$(now)
  DEB_GUEST=1 DEB_EXPECT_FILE=$out/expected-py-sha256 \
    bash "$ROOT/scripts/layer-run.sh" "$out/py" "$out/web" bash "$SELF" _apt-layer nginx-light >/dev/null
  t4=$(now)
  echo "build: mmdebstrap $(secs "$t0" "$t1") s, mkfs + import $(secs "$t1" "$t2") s," \
    "py layer $(secs "$t2" "$t3") s, web layer $(secs "$t3" "$t4") s; total $(secs "$t0" "$t4") s"
  layer_line "$out/base" base; layer_line "$out/py" py; layer_line "$out/web" web
  python3 - "$("$MCOW" info "$out/web" --output json)" <<'PY'
import json, sys
v = json.loads(sys.argv[1]); bs = v["block_size"]
b = sum(l["stored_blocks"] for l in v["layers"])
print("total {:>6} blocks  {:8.1f} MiB stored of {:.1f} GiB virtual; block size {} KiB, {} layers".format(
    b, b * bs / 1048576, v["virtual_size"] / 1073741824, bs // 1024, v["layer_count"]))
PY
  echo "expected DEB-PY-SHA256 $(cat "$out/expected-py-sha256")"
}

# --- boot --------------------------------------------------------------------------------------
BOOT_SECS= BOOT_DONE_AT=   # set by boot: seconds from qemu start, and the time, of DEB-APPS-DONE
boot() { # NBD_URI CONSOLE_FILE
  local uri=$1 con=$2 m t0
  [ -s "$ASSETS/initrd-debian.cpio.gz" ] || bash "$ROOT/scripts/vm-assets.sh" "$ASSETS" >/dev/null
  m=$(mktemp /tmp/mcow-deb-marker.XXXXXX); rm -f "$m"
  t0=$(now)
  # shellcheck disable=SC2086 # DEB_WRAP is a command prefix: split on purpose
  ${DEB_WRAP:-} timeout 300 qemu-system-x86_64 -accel tcg -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$ASSETS/vmlinux" -initrd "$ASSETS/initrd-debian.cpio.gz" \
    -append 'console=ttyS0 panic=-1 quiet vmid=0 vmmode=ro' \
    -drive "file=$uri,format=${DEB_FORMAT:-raw},if=virtio,readonly=on" 2>&1 \
    | while IFS= read -r l; do case $l in *DEB-APPS-DONE*) [ -e "$m" ] || now > "$m";; esac; printf '%s\n' "$l"; done > "$con" || true
  tr -d '\r' < "$con" | grep -a -o -E '(MCOW-VM|DEB-).*' || true
  local sha ok=1
  sha=$(grep -a -o 'DEB-PY-SHA256 [0-9a-f]*' "$con" | head -1 | cut -d' ' -f2) || true
  [ -n "$sha" ] || { echo "boot: no DEB-PY-SHA256 line" >&2; ok=0; }
  [ -z "${DEB_EXPECT_PY:-}" ] || [ "$sha" = "$DEB_EXPECT_PY" ] || { echo "boot: DEB-PY-SHA256 $sha, expected $DEB_EXPECT_PY" >&2; ok=0; }
  grep -aq DEB-NGINX-OK "$con" || { echo "boot: no DEB-NGINX-OK line" >&2; ok=0; }
  grep -aq 'MCOW-VM-DONE id=0 ok' "$con" || { echo "boot: no 'MCOW-VM-DONE id=0 ok' line" >&2; ok=0; }
  [ -e "$m" ] || { echo "boot: no DEB-APPS-DONE line" >&2; ok=0; }
  [ "$ok" = 1 ] || { rm -f "$m"; echo "boot failed; console in $con" >&2; return 1; }
  BOOT_DONE_AT=$(cat "$m")
  [ -z "${DEB_MARKER_FILE:-}" ] || echo "$BOOT_DONE_AT" > "$DEB_MARKER_FILE"
  BOOT_SECS=$(awk -v a="$t0" -v b="$BOOT_DONE_AT" 'BEGIN{printf "%.2f", b-a}')
  rm -f "$m"
  echo "boot: all markers; DEB-APPS-DONE $BOOT_SECS s after starting qemu"
}

# --- demo --------------------------------------------------------------------------------------
demo() { # OUT
  local out=$1
  pids=()   # global, like T: stop_all runs at exit
  build "$out"
  out=$(cd "$out" && pwd)
  export DEB_EXPECT_PY
  DEB_EXPECT_PY=$(cat "$out/expected-py-sha256")
  T=$(mktemp -d /tmp/mcow-deb.XXXXXX)
  stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$T"; }
  trap stop_all EXIT
  wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.02; done; echo "no socket $1" >&2; exit 1; }

  echo; echo "== boot from a local mcow serve -r (web = base + py + web)"
  local t0 p
  t0=$(now)
  "$MCOW" serve -r -k "$T/serve.sock" "web=$out/web" 2>"$out/serve.log" & p=$!; pids+=("$p")
  wait_sock "$T/serve.sock"
  boot "nbd+unix:///web?socket=$T/serve.sock" "$out/console-serve.log"
  echo "from starting mcow serve to DEB-APPS-DONE: $(secs "$t0" "$BOOT_DONE_AT") s"
  kill -TERM "$p"; wait "$p"

  echo; echo "== what the boot reads: mcow trace (distinct blocks) behind nbdkit's stats filter (bytes asked)"
  "$MCOW" trace -r -k "$T/trace.sock" --out "$out/boot.trace" "web=$out/web" 2>"$out/trace.log" & p=$!; pids+=("$p")
  wait_sock "$T/trace.sock"
  nbdkit -f -r -U "$T/stats.sock" --filter=stats nbd socket="$T/trace.sock" export=web statsfile="$out/nbdkit-stats" & local n=$!; pids+=("$n")
  wait_sock "$T/stats.sock"
  boot "nbd+unix:///?socket=$T/stats.sock" "$out/console-trace.log" >/dev/null
  kill -TERM "$n"; wait "$n" || true
  kill -TERM "$p"; wait "$p"
  python3 - "$out/boot.trace" <<'PY'
import json, sys
t = json.load(open(sys.argv[1])); n = len(t["blocks"]); bs = t["block_size"]
print(f"trace: {n} distinct blocks of {bs // 1024} KiB read = {n * bs / 1048576:.1f} MiB (block granularity)")
PY
  grep -E '^(read:|total:)' "$out/nbdkit-stats" | sed 's/^/nbdkit stats: /' || true
}

case ${1:-} in
  build) [ $# -eq 2 ] || { echo "usage: $0 build OUT" >&2; exit 2; }; build "$2" ;;
  boot) [ $# -eq 3 ] || { echo "usage: $0 boot NBD_URI CONSOLE_FILE" >&2; exit 2; }; boot "$2" "$3" ;;
  demo) [ $# -eq 2 ] || { echo "usage: $0 demo OUT" >&2; exit 2; }; mcow_bin; demo "$2" ;;
  _apt-layer) shift; apt_layer "$@" ;;
  *) echo "usage: $0 build OUT | boot NBD_URI CONSOLE_FILE | demo OUT" >&2; exit 2 ;;
esac
