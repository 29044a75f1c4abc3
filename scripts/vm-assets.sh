#!/usr/bin/env bash
# Guest assets for the VM demo, test and benchmark: a stock Debian cloud kernel (as an ELF
# vmlinux, which QEMU boots directly through its PVH note) and a busybox initramfs whose /init
# mounts /dev/vda, runs /opt/app2/bin/hello from it, writes /vm-wrote.txt and powers off; and a
# second initramfs for the Debian image of scripts/debian-image.sh (described at its end).
#
# Usage: scripts/vm-assets.sh [DIR]        (default: target/vm-assets)
# Leaves in DIR: vmlinux, initrd.cpio.gz, initrd-debian.cpio.gz, busybox (static, for the guest's
# root filesystem).
# The .debs (linux-image-<cloud version>, busybox-static) are fetched with `apt-get download`
# into DIR/debs once and never installed. Needs: apt-get, dpkg, lz4, python3, gzip.
#
# The guest's /init reads two kernel parameters (the kernel hands unknown key=value parameters
# to init as environment variables):
#   vmid=N        printed in every marker line and written to /vm-wrote.txt
#   vmmode=rw|ro|writer  rw (default): mount read-write and write /vm-wrote.txt; ro: mount
#                 read-only; writer: mount read-write and, instead of running the app, write
#                 files /w/1 .. /w/N (N = vmwrites, default 100), 16 KiB each of the line
#                 "vm ID file K", each followed by `sync` and the marker MCOW-VM-FLUSHED id=ID n=K
# Console marker lines (judge a boot by these, not by qemu's exit code):
#   MCOW-VM-BOOTED id=N            init started, virtio disk present
#   MCOW-VM-MOUNTED id=N           /dev/vda mounted
#   APP2-... lines                 printed by /opt/app2/bin/hello (run in a chroot of the disk)
#   MCOW-VM-WROTE id=N             /vm-wrote.txt written and synced (rw), or every file (writer)
#   MCOW-VM-DONE id=N ok           unmounted cleanly, powering off ("fail" otherwise)
set -euo pipefail
DIR=${1:-$(cd "$(dirname "$0")/.." && pwd)/target/vm-assets}
mkdir -p "$DIR/debs"
DIR=$(cd "$DIR" && pwd)
cd "$DIR"

if [ ! -s vmlinux ] || [ ! -s busybox ] || [ ! -d kpkg ]; then
  KVER=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}' | sed 's/^linux-image-//')
  [ -n "$KVER" ] || { echo "vm-assets: no linux-image-cloud-amd64 in apt's lists (run apt-get update)" >&2; exit 1; }
  (cd debs && { ls linux-image-"$KVER"_*.deb >/dev/null 2>&1 || timeout 300 apt-get download "linux-image-$KVER"; } \
           && { ls busybox-static_*.deb >/dev/null 2>&1 || timeout 300 apt-get download busybox-static; }) >/dev/null 2>&1 \
    || { echo "vm-assets: apt-get download linux-image-$KVER busybox-static failed" >&2; exit 1; }
  rm -rf kpkg bb
  dpkg -x debs/linux-image-"$KVER"_*.deb kpkg
  dpkg -x debs/busybox-static_*.deb bb
  cp bb/bin/busybox busybox
  rm -rf bb
  # The stock bzImage is LZ4-compressed: extract the ELF vmlinux (PVH-bootable, no decompressor).
  python3 - "kpkg/boot/vmlinuz-$KVER" <<'PY'
import sys; d=open(sys.argv[1],'rb').read(); o=d.find(b'\x02!L\x18'); open('payload.lz4','wb').write(d[o:])
PY
  lz4 -dc payload.lz4 > vmlinux.tmp 2>/dev/null || true   # lz4 complains about trailing bytes
  rm -f payload.lz4
  [ "$(head -c 4 vmlinux.tmp | od -An -c | tr -d ' ')" = '177ELF' ] || { echo "vm-assets: no ELF vmlinux" >&2; exit 1; }
  mv vmlinux.tmp vmlinux
  echo "$KVER" > kver
fi
KVER=$(cat kver)

M=kpkg/lib/modules/$KVER/kernel/drivers
# initrd_skeleton DIR...: a fresh initrd/ with busybox, the virtio modules and the directories
# named; pack_initrd NAME: initrd/init made executable, initrd/ packed into NAME, then removed.
initrd_skeleton() {
  rm -rf initrd && mkdir -p initrd/lib/modules
  for d in "$@"; do mkdir -p "initrd/$d"; done
  cp busybox initrd/bin/
  for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev virtio/virtio_pci block/virtio_blk; do
    cp "$M/$m.ko" initrd/lib/modules/
  done
}
pack_initrd() {
  chmod +x initrd/init
  (cd initrd && find . | ../busybox cpio -o -H newc 2>/dev/null | gzip -1 > "../$1.tmp")
  mv "$1.tmp" "$1"
  rm -rf initrd
}

initrd_skeleton bin dev proc sys mnt
cat > initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do insmod /lib/modules/$m.ko; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
id=${vmid:-0}; mode=${vmmode:-rw}
echo "MCOW-VM-BOOTED id=$id"
ok=fail
if [ "$mode" = writer ]; then mopt=rw; else mopt=$mode; fi
if mount -t ext4 -o "$mopt" /dev/vda /mnt; then
  echo "MCOW-VM-MOUNTED id=$id"
  if [ "$mode" = writer ]; then
    # Files w/1 .. w/N, each 16 KiB of a line naming it, each made durable (sync: a flush of
    # the disk) before its marker line.
    mkdir -p /mnt/w
    n=1; werr=0
    while [ $n -le "${vmwrites:-100}" ]; do
      yes "vm $id file $n" | head -c 16384 > /mnt/w/$n && sync || { werr=1; break; }
      echo "MCOW-VM-FLUSHED id=$id n=$n"
      n=$((n+1))
    done
    [ $werr = 0 ] && echo "MCOW-VM-WROTE id=$id"
  else
    chroot /mnt /bin/sh /opt/app2/bin/hello
  fi
  if [ "$mode" = rw ]; then
    echo "written by vm $id" > /mnt/vm-wrote.txt && sync && echo "MCOW-VM-WROTE id=$id"
  fi
  umount /mnt && ok=ok
else
  echo "MCOW-VM-MOUNT-FAILED id=$id"
fi
echo "MCOW-VM-DONE id=$id $ok"
poweroff -f
INIT
pack_initrd initrd.cpio.gz

# initrd-debian.cpio.gz: boots a Debian root filesystem (scripts/debian-image.sh). Its /init
# loads the same virtio modules (ext4 and what it needs, jbd2, mbcache, crc16 and crc32c, are
# built into this kernel), mounts /dev/vda, mounts proc, sys and dev inside it, runs
# /opt/mcow/run.sh in a chroot of it and powers off. Kernel parameters:
#   vmid=N        printed in every marker line
#   vmmode=ro|rw  ro (default): /dev/vda mounted read-only, under an overlay whose upper layer
#                 is a tmpfs (the guest's writes, e.g. nginx's logs, stay in RAM; the disk gets
#                 none); rw: /dev/vda mounted read-write
# Console marker lines: MCOW-VM-BOOTED id=N, MCOW-VM-MOUNTED id=N, then what run.sh prints, then
# MCOW-VM-RUN id=N rc=RC (run.sh's exit status) and MCOW-VM-DONE id=N ok|fail (ok: run.sh
# exited 0 and everything unmounted cleanly).
initrd_skeleton bin dev proc sys mnt ro rw
cp kpkg/lib/modules/"$KVER"/kernel/fs/overlayfs/overlay.ko initrd/lib/modules/
cat > initrd/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk overlay; do insmod /lib/modules/$m.ko; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
id=${vmid:-0}; mode=${vmmode:-ro}
echo "MCOW-VM-BOOTED id=$id"
ok=fail mounted=0
if [ "$mode" = rw ]; then
  mount -t ext4 -o rw /dev/vda /mnt && mounted=1
else
  mount -t ext4 -o ro /dev/vda /ro && mount -t tmpfs -o mode=755 tmpfs /rw && mkdir /rw/up /rw/work \
    && mount -t overlay -o lowerdir=/ro,upperdir=/rw/up,workdir=/rw/work overlay /mnt && mounted=1
fi
if [ $mounted = 1 ]; then
  echo "MCOW-VM-MOUNTED id=$id"
  mount -t proc proc /mnt/proc; mount -t sysfs sys /mnt/sys; mount -o bind /dev /mnt/dev
  chroot /mnt /bin/sh /opt/mcow/run.sh
  rc=$?
  echo "MCOW-VM-RUN id=$id rc=$rc"
  umount /mnt/dev; umount /mnt/sys; umount /mnt/proc
  if umount /mnt && [ $rc -eq 0 ]; then ok=ok; fi
  if [ "$mode" != rw ]; then umount /rw && umount /ro || ok=fail; fi
else
  echo "MCOW-VM-MOUNT-FAILED id=$id"
fi
echo "MCOW-VM-DONE id=$id $ok"
poweroff -f
INIT
pack_initrd initrd-debian.cpio.gz
echo "vm-assets: $DIR/vmlinux ($KVER), $DIR/initrd.cpio.gz, $DIR/initrd-debian.cpio.gz, $DIR/busybox"
