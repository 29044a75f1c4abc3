#!/usr/bin/env bash
# End-to-end demo: build a layered VM image, push it to an OCI registry, boot QEMU guests from it
# lazily on a "fresh host", boot 4 VMs at once on one shared cache, and boot from the image
# pushed with a trace of one boot (prefetched in the background).
#
# Usage: scripts/demo-vm.sh [WORKDIR]          the whole demo (default WORKDIR: ./mcow-vm-demo)
#        scripts/demo-vm.sh build WORKDIR      only build the disks WORKDIR/{base,app1,app2}
# Environment: MCOW (the mcow binary; default target/release/mcow, built if missing).
# Needs root and: qemu-system-x86 (bookworm-backports), qemu-utils, libnbd-bin, docker-registry,
# e2fsprogs, and the guest assets of scripts/vm-assets.sh (downloaded on first use).
# What it prints is explained in README.md, "Deploying to a VM (end to end)".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=demo
if [ "${1:-}" = build ]; then MODE=build; shift; fi
W=${1:-$PWD/mcow-vm-demo}
if [ -z "${MCOW:-}" ]; then
  MCOW=$ROOT/target/release/mcow
  [ -x "$MCOW" ] || (cd "$ROOT" && cargo build --release -p mcow)
fi
export MCOW
ASSETS=${MCOW_VM_ASSETS:-$ROOT/target/vm-assets}
say() { printf '\n== %s\n' "$*"; }

# --- the image: base (ext4 + busybox), app1, app2 --------------------------------------------
build_images() {
  rm -rf "$W" && mkdir -p "$W"
  bash "$ROOT/scripts/vm-assets.sh" "$ASSETS" >/dev/null
  local r=$W/src/base
  mkdir -p "$r"/{bin,etc,dev,proc,sys,tmp,usr/share/filler}
  cp "$ASSETS/busybox" "$r/bin/busybox"
  for a in $("$r/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$r/bin/$a"; done
  echo mcow-guest > "$r/etc/hostname"
  # Files the guest never reads: they stay in the registry (the point of lazy fetching).
  head -c $((24 << 20)) /dev/urandom > "$r/usr/share/filler/unused.bin"
  mkfs.ext4 -q -F -b 4096 -L mcow-root -d "$r" "$W/base.ext4" 256M >/dev/null
  "$MCOW" import -b "${MCOW_BLOCK_SIZE:-64K}" "$W/base.ext4" "$W/base" >/dev/null
  rm -f "$W/base.ext4"

  local a1=$W/src/app1
  mkdir -p "$a1/opt/app1/lib"
  echo "app1 1.0" > "$a1/opt/app1/VERSION"
  head -c $((3 << 20)) /dev/urandom > "$a1/opt/app1/lib/app1.dat"
  bash "$ROOT/scripts/build-layer.sh" "$W/base" "$a1" "$W/app1"

  local a2=$W/src/app2
  mkdir -p "$a2/opt/app2/bin" "$a2/opt/app2/share"
  head -c $((2 << 20)) /dev/urandom > "$a2/opt/app2/share/data.bin"
  cat > "$a2/opt/app2/bin/hello" <<'HELLO'
#!/bin/sh
echo "APP2-HELLO host=$(cat /etc/hostname) app1=$(cat /opt/app1/VERSION)"
echo "APP2-SHA256 $(sha256sum /opt/app2/share/data.bin | cut -d' ' -f1)"
HELLO
  chmod +x "$a2/opt/app2/bin/hello"
  bash "$ROOT/scripts/build-layer.sh" "$W/app1" "$a2" "$W/app2"
}

if [ "$MODE" = build ]; then build_images; exit 0; fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Boots one guest from an NBD export; the console goes to LOG.
boot() { # SOCK EXPORT ID MODE LOG
  timeout 180 qemu-system-x86_64 -accel tcg -m 256 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel "$ASSETS/vmlinux" -initrd "$ASSETS/initrd.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet vmid=$3 vmmode=$4" \
    -drive "file=nbd+unix:///$2?socket=$1,format=raw,if=virtio,cache=writeback" >"$5" 2>&1 || true
}
fetched() { grep -o 'blocks_bytes_fetched=[0-9]*' "$1" | head -1 | cut -d= -f2; }
wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
mib() { awk -v b="$1" 'BEGIN{printf "%.2f MiB", b/1048576}'; }

say "1. build: base layer (ext4 + busybox, imported), app1 and app2 added with scripts/build-layer.sh"
build_images
"$MCOW" info "$W/app2"
for d in app1 app2; do
  b=$("$MCOW" info "$W/$d" --output json | python3 -c 'import json,sys;v=json.load(sys.stdin);l=v["layers"][-1];print(l["stored_blocks"]*v["block_size"])')
  echo "layer $d stores $(mib "$b") (of a 256 MiB disk)"
done

say "2. push to a registry (docker-registry on 127.0.0.1)"
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mkdir -p "$W/registry"
cat > "$W/registry/config.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $W/registry/data}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$PORT, secret: demo-secret}
YML
docker-registry serve "$W/registry/config.yml" >"$W/registry/log" 2>&1 & pids+=($!)
for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/v2/" && break; sleep 0.05; done
REF=oci://127.0.0.1:$PORT/mcow/vm:v1
"$MCOW" push "$W/app2" "$REF"
manifest() { curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://127.0.0.1:$PORT/v2/mcow/vm/manifests/v1" | sha256sum | cut -d' ' -f1; }
M0=$(manifest)

say "3. fresh host: serve the image from an empty cache, boot one VM (it writes /vm-wrote.txt)"
C=$W/host1-cache
start=$(date +%s.%N)
RUST_LOG=info "$MCOW" serve -k "$W/host1.sock" --cache "$C" "vm=$REF" 2>"$W/host1-serve.log" & S=$!; pids+=($S)
wait_sock "$W/host1.sock"
boot "$W/host1.sock" vm 1 rw "$W/vm1-console.log"
end=$(date +%s.%N)
kill -TERM "$S"; wait "$S" || true
grep -a -E '^(MCOW-VM|APP2)' "$W/vm1-console.log"
echo "expected APP2-SHA256 $(sha256sum "$W/src/app2/opt/app2/share/data.bin" | cut -d' ' -f1)"
F1=$(fetched "$W/host1-serve.log")
echo "boot took $(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}') s; fetched $(mib "$F1") of blocks from the registry"
CD=$(ls -d "$C"/disks/vm-*)
"$MCOW" info "$CD"
echo "the guest's write, read back from the cache disk's top:"
"$MCOW" export "$CD" "$W/vm1.raw" && debugfs -R 'cat /vm-wrote.txt' "$W/vm1.raw" 2>/dev/null; rm -f "$W/vm1.raw"
[ "$(manifest)" = "$M0" ] && echo "registry manifest unchanged: sha256:$M0"

say "4. four VMs at once, one serve process, one cache: each block is fetched once"
C4=$W/host2-cache
RUST_LOG=info "$MCOW" serve -k "$W/prep.sock" --cache "$C4" "vm=$REF" 2>/dev/null & S=$!
wait_sock "$W/prep.sock"; kill -TERM "$S"; wait "$S" || true   # pulls headers and indexes only
CD4=$(ls -d "$C4"/disks/vm-*)
args=()
for i in 1 2 3 4; do "$MCOW" create --from "$CD4" "$C4/vms/vm$i" >/dev/null; args+=("vm$i=$C4/vms/vm$i"); done
RUST_LOG=info "$MCOW" serve -k "$W/host2.sock" "${args[@]}" 2>"$W/host2-serve.log" & S=$!; pids+=($S)
wait_sock "$W/host2.sock"
start=$(date +%s.%N)
bp=()
for i in 1 2 3 4; do boot "$W/host2.sock" "vm$i" "$i" rw "$W/vm$i-of-4-console.log" & bp+=($!); done
for p in "${bp[@]}"; do wait "$p" || true; done
end=$(date +%s.%N)
kill -TERM "$S"; wait "$S" || true
for i in 1 2 3 4; do grep -a -E '^(MCOW-VM-DONE|APP2-SHA256)' "$W/vm$i-of-4-console.log" | tr '\n' ' '; echo; done
F4=$(fetched "$W/host2-serve.log")
echo "4 boots took $(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}') s; fetched $(mib "$F4") from the registry (1 VM alone: $(mib "$F1"))"
for i in 1 2 3 4; do
  echo "vm$i top: $("$MCOW" info "$C4/vms/vm$i" --output json | python3 -c 'import json,sys;v=json.load(sys.stdin);print(v["top"])' 2>/dev/null || true)"
done

say "5. a boot trace: record one boot, push the image with it, boot a fresh host from it"
"$MCOW" create --from "$W/app2" "$W/traced" >/dev/null
"$MCOW" trace -k "$W/trace.sock" --out "$W/boot.trace" "vm=$W/traced" 2>"$W/trace.log" & S=$!; pids+=($S)
wait_sock "$W/trace.sock"
boot "$W/trace.sock" vm 5 rw "$W/vm5-console.log"
kill -TERM "$S"; wait "$S" || true
grep -a -E '^MCOW-VM-DONE' "$W/vm5-console.log"
echo "trace: $(python3 -c 'import json,sys;print(len(json.load(open(sys.argv[1]))["blocks"]))' "$W/boot.trace") blocks, in the order the boot first read them"
TREF=oci://127.0.0.1:$PORT/mcow/vm:traced
"$MCOW" push "$W/app2" "$TREF" --trace "$W/boot.trace"
start=$(date +%s.%N)
RUST_LOG=info "$MCOW" serve -k "$W/host3.sock" --cache "$W/host3-cache" "vm=$TREF" 2>"$W/host3-serve.log" & S=$!; pids+=($S)
wait_sock "$W/host3.sock"
boot "$W/host3.sock" vm 6 rw "$W/vm6-console.log"
end=$(date +%s.%N)
kill -TERM "$S"; wait "$S" || true
grep -a -E '^(MCOW-VM-DONE|APP2-SHA256)' "$W/vm6-console.log" | tr '\n' ' '; echo
grep -o 'prefetched the trace.*' "$W/host3-serve.log" | sed 's/ disk=[^ ]*//'
F6=$(fetched "$W/host3-serve.log")
echo "boot took $(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}') s; fetched $(mib "$F6") (without the trace: $(mib "$F1"))"
