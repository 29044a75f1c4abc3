#!/usr/bin/env bash
# Installs the real components the tests drive: qemu-img/qemu-io/qemu-nbd (qemu-utils) and
# libnbd's tools (nbdinfo, nbdcopy, nbdfuse, nbdsh) plus nbdkit. Idempotent; runs apt-get only
# for what is missing. Needs root (CI and the developers' machines run as root).
set -euo pipefail

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdkit >/dev/null || need+=(nbdkit)
[ -e /usr/lib/python3/dist-packages/nbd.py ] || need+=(python3-libnbd)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
for tool in qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdkit; do
  command -v "$tool" >/dev/null || { echo "missing $tool after install" >&2; exit 1; }
done
