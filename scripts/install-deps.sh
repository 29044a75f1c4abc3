#!/usr/bin/env bash
# Installs the real components the tests drive: qemu-img/qemu-io/qemu-nbd (qemu-utils),
# libnbd's tools (nbdinfo, nbdcopy, nbdfuse, nbdsh), nbdkit, the OCI registry docker-registry,
# nginx, htpasswd (for the registry's basic auth), skopeo (copies images between registries and
# OCI layouts), iproute2 (ip, tc: the network harness scripts/netsim), man-db (man -l renders
# `mcow man`'s pages in crates/cli/tests/conventions.rs), mmdebstrap (Debian root
# filesystems for scripts/debian-image.sh), PostgreSQL (postgres, initdb, pgbench, pg_amcheck
# and the amcheck extension: crates/cli/tests/postgres.rs, scripts/bench-pgbench.sh), QEMU's
# http block driver (bench-net), curl (a client of `mcow serve --control`:
# crates/cli/tests/control.rs), promtool (Debian's prometheus package: checks the control API's
# metrics in the same test), systemd-socket-activate (socket activation and restarts:
# crates/cli/tests/host.rs) and the S3 server s3s-fs (built with cargo).
# Idempotent: installs only what is missing. Needs root (CI and developers' machines are root).
set -euo pipefail

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdkit >/dev/null || need+=(nbdkit)
[ -e /usr/lib/python3/dist-packages/nbd.py ] || need+=(python3-libnbd)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v nginx >/dev/null || need+=(nginx-light)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v skopeo >/dev/null || need+=(skopeo)
{ command -v ip && command -v tc; } >/dev/null || need+=(iproute2)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v man >/dev/null || need+=(man-db)
command -v curl >/dev/null || need+=(curl)
command -v promtool >/dev/null || need+=(prometheus)
pg_missing() { ! compgen -G '/usr/lib/postgresql/*/bin/pgbench' >/dev/null; }
if pg_missing; then
  need+=(postgresql)
  # The tests start their own servers: no "main" cluster (nor a server on port 5432) from the package.
  mkdir -p /etc/postgresql-common/createcluster.d
  echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/mcow-no-main-cluster.conf
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# qemu-system-x86 (the VM test and demo) and qemu-block-extra (QEMU's http block driver,
# block-curl.so, for scripts/bench-net.sh's qemu-http case) from bookworm-backports, beside
# qemu-utils 10: the bookworm package (7.2) would remove qemu-utils, and the modules must match
# the binary's version. The backports source reuses the existing entry.
backports=()
command -v qemu-system-x86_64 >/dev/null || backports+=(qemu-system-x86)
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ] || backports+=(qemu-block-extra)
if [ ${#backports[@]} -gt 0 ]; then
  echo "installing: ${backports[*]} (bookworm-backports)"
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e /etc/apt/sources.list.d/bookworm-backports.sources ]; then
    awk 'BEGIN{RS="";ORS="\n\n"} /Suites: bookworm bookworm-updates/' /etc/apt/sources.list.d/debian.sources \
      | sed 's/^Suites: .*/Suites: bookworm-backports/' > /etc/apt/sources.list.d/bookworm-backports.sources
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${backports[@]}" >/dev/null
fi
# The guest's kernel and busybox are not installed: scripts/vm-assets.sh downloads them
# (apt-get download) into target/vm-assets.
for tool in qemu-system-x86_64 qemu-img qemu-io qemu-nbd nbdinfo nbdcopy nbdkit docker-registry nginx htpasswd skopeo ip tc mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "missing $tool after install" >&2; exit 1; }
done
if pg_missing; then echo "missing PostgreSQL (/usr/lib/postgresql/*/bin/pgbench) after install" >&2; exit 1; fi
# s3s-fs: a real S3-compatible server (it checks SigV4) for crates/remote/tests/s3.rs.
command -v s3s-fs >/dev/null || cargo install --locked s3s-fs@0.14.1 --features binary
