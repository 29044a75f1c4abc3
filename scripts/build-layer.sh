#!/usr/bin/env bash
# Builds a software layer: a new disk on BASE_DISK's sealed layers whose ext4 filesystem also
# holds the files of SRC_DIR (copied to the filesystem's root, so SRC_DIR/opt/app1/x becomes
# /opt/app1/x), then sealed. The new layer stores only the blocks the copy wrote: the files'
# data plus the filesystem metadata it touched (bitmaps, inodes, directories, journal).
#
# Usage: scripts/build-layer.sh BASE_DISK SRC_DIR NEW_DISK
#   BASE_DISK  a disk whose writable top is sealed (what is not sealed is NOT included)
#   SRC_DIR    a directory tree to add
#   NEW_DISK   the new disk directory (must not exist); it shares BASE_DISK's layer store
# Environment: MCOW (the mcow binary, default `mcow` on PATH).
# Steps: mcow create --from BASE NEW; mcow serve -k SOCK NEW (background); nbdfuse + losetup +
# mount; cp -a SRC/. ; sync; umount; losetup -d; umount the FUSE mount; SIGTERM the server;
# mcow seal NEW. Needs root (loop devices, mount), libnbd-bin (nbdfuse), util-linux.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 BASE_DISK SRC_DIR NEW_DISK" >&2; exit 2; }
BASE=$1 SRC=$2 NEW=$3
MCOW=${MCOW:-mcow}
for t in nbdfuse losetup mount umount timeout; do
  command -v "$t" >/dev/null || { echo "build-layer: $t is missing (nbdfuse: apt-get install libnbd-bin)" >&2; exit 1; }
done
[ -d "$SRC" ] || { echo "build-layer: $SRC is not a directory" >&2; exit 1; }

T=$(mktemp -d /tmp/mcow-layer.XXXXXX)   # short path: the socket must fit AF_UNIX's 108 bytes
SOCK=$T/nbd.sock
SERVE_PID= FUSE_PID= LOOP=
cleanup() {
  set +e
  mountpoint -q "$T/mnt" 2>/dev/null && { umount "$T/mnt" || umount -l "$T/mnt"; }
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
  mountpoint -q "$T/fuse" 2>/dev/null && { umount "$T/fuse" || umount -l "$T/fuse"; }
  [ -n "$FUSE_PID" ] && { kill -TERM "$FUSE_PID" 2>/dev/null; wait "$FUSE_PID" 2>/dev/null; }
  [ -n "$SERVE_PID" ] && { kill -TERM "$SERVE_PID" 2>/dev/null; wait "$SERVE_PID" 2>/dev/null; }
  rm -rf "$T"
}
trap cleanup EXIT

timeout 60 "$MCOW" create --from "$BASE" "$NEW" >/dev/null
mkdir -p "$T/fuse" "$T/mnt"
"$MCOW" serve -k "$SOCK" "layer=$NEW" 2>"$T/serve.log" & SERVE_PID=$!
for _ in $(seq 400); do [ -S "$SOCK" ] && break; kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 0.05; done
[ -S "$SOCK" ] || { echo "build-layer: mcow serve did not start:" >&2; cat "$T/serve.log" >&2; exit 1; }

nbdfuse "$T/fuse/disk.img" "nbd+unix:///layer?socket=$SOCK" & FUSE_PID=$!
for _ in $(seq 400); do [ -e "$T/fuse/disk.img" ] && break; sleep 0.05; done
[ -e "$T/fuse/disk.img" ] || { echo "build-layer: nbdfuse did not start" >&2; exit 1; }
LOOP=$(timeout 60 losetup -f --show "$T/fuse/disk.img")
timeout 60 mount -t ext4 "$LOOP" "$T/mnt"
timeout 300 cp -a "$SRC/." "$T/mnt/"
timeout 300 sync
timeout 60 umount "$T/mnt"
timeout 60 losetup -d "$LOOP"; LOOP=
timeout 60 umount "$T/fuse"
wait "$FUSE_PID" || true; FUSE_PID=
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" || { echo "build-layer: mcow serve failed:" >&2; cat "$T/serve.log" >&2; exit 1; }
SERVE_PID=
timeout 120 "$MCOW" seal "$NEW"
