#!/usr/bin/env bash
# Builds a layer by running a command on a mounted disk: creates NEW_DISK on BASE_DISK's sealed
# layers, mounts its ext4 filesystem, runs CMD with the mount point in $LAYER_MNT, unmounts and
# seals NEW_DISK. The new layer stores only the blocks CMD's changes wrote (file data plus the
# filesystem metadata they touched). scripts/build-layer.sh (copy a tree in) and
# scripts/debian-image.sh (apt-get install in a chroot) are built on it.
#
# Usage: scripts/layer-run.sh BASE_DISK NEW_DISK CMD [ARGS...]
#   BASE_DISK  a disk whose writable top is sealed (what is not sealed is NOT included)
#   NEW_DISK   the new disk directory (must not exist); it shares BASE_DISK's layer store
#   CMD ARGS   run with LAYER_MNT=<mount point> in its environment; a failure (or running past
#              LAYER_TIMEOUT seconds, default 600) fails the build: NEW_DISK is left unsealed
# Environment: MCOW (the mcow binary, default `mcow` on PATH), LAYER_TIMEOUT.
# Steps: mcow create --from BASE NEW; mcow serve -k SOCK NEW (background); nbdfuse + losetup +
# mount; CMD; sync; umount (anything CMD left mounted below the mount point too); losetup -d;
# umount the FUSE mount (once the loop device let go of it); SIGTERM the server; mcow seal NEW.
# Prints what mcow seal prints (the new layer's digest). Needs root (loop devices, mount),
# libnbd-bin (nbdfuse), util-linux.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 BASE_DISK NEW_DISK CMD [ARGS...]" >&2; exit 2; }
BASE=$1 NEW=$2
shift 2
MCOW=${MCOW:-mcow}
for t in nbdfuse losetup mount umount timeout; do
  command -v "$t" >/dev/null || { echo "layer-run: $t is missing (nbdfuse: apt-get install libnbd-bin)" >&2; exit 1; }
done

T=$(mktemp -d /tmp/mcow-layer.XXXXXX)   # short path: the socket must fit AF_UNIX's 108 bytes
SOCK=$T/nbd.sock
SERVE_PID= FUSE_PID= LOOP=
cleanup() {
  set +e
  mountpoint -q "$T/mnt" 2>/dev/null && { umount -R "$T/mnt" || umount -R -l "$T/mnt"; }
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
[ -S "$SOCK" ] || { echo "layer-run: mcow serve did not start:" >&2; cat "$T/serve.log" >&2; exit 1; }

nbdfuse "$T/fuse/disk.img" "nbd+unix:///layer?socket=$SOCK" & FUSE_PID=$!
for _ in $(seq 400); do [ -e "$T/fuse/disk.img" ] && break; sleep 0.05; done
[ -e "$T/fuse/disk.img" ] || { echo "layer-run: nbdfuse did not start" >&2; exit 1; }
LOOP=$(timeout 60 losetup -f --show "$T/fuse/disk.img")
timeout 60 mount -t ext4 "$LOOP" "$T/mnt"
LAYER_MNT=$T/mnt timeout "${LAYER_TIMEOUT:-600}" "$@" \
  || { echo "layer-run: the command failed (exit $?): $*" >&2; exit 1; }
timeout 300 sync
timeout 60 umount -R "$T/mnt"
timeout 60 losetup -d "$LOOP"; LOOP=
# The loop device lets go of the FUSE file asynchronously: until it has, the FUSE mount is busy.
for _ in $(seq 200); do [ -z "$(losetup -j "$T/fuse/disk.img")" ] && umount "$T/fuse" 2>/dev/null && break; sleep 0.05; done
mountpoint -q "$T/fuse" && { echo "layer-run: $T/fuse stays busy after losetup -d" >&2; exit 1; }
wait "$FUSE_PID" || true; FUSE_PID=
kill -TERM "$SERVE_PID"
wait "$SERVE_PID" || { echo "layer-run: mcow serve failed:" >&2; cat "$T/serve.log" >&2; exit 1; }
SERVE_PID=
timeout 120 "$MCOW" seal "$NEW"
