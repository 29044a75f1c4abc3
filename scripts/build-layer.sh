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
# Steps (scripts/layer-run.sh): mcow create --from BASE NEW; mcow serve -k SOCK NEW
# (background); nbdfuse + losetup + mount; cp -a SRC/. ; sync; umount; losetup -d; umount the
# FUSE mount; SIGTERM the server; mcow seal NEW (its digest is printed). Needs root (loop
# devices, mount), libnbd-bin (nbdfuse), util-linux.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 BASE_DISK SRC_DIR NEW_DISK" >&2; exit 2; }
BASE=$1 SRC=$2 NEW=$3
[ -d "$SRC" ] || { echo "build-layer: $SRC is not a directory" >&2; exit 1; }
LAYER_TIMEOUT=${LAYER_TIMEOUT:-300} exec bash "$(dirname "$0")/layer-run.sh" "$BASE" "$NEW" \
  sh -c 'cp -a "$1/." "$LAYER_MNT/"' sh "$SRC"
