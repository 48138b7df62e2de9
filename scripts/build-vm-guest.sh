#!/usr/bin/env bash
# Build the small test guest of the qemu plugin into DIR: DIR/vmlinuz (the Debian kernel
# scripts/install-qemu.sh unpacked) and DIR/initrd.cpio.gz, an initramfs of busybox-static
# whose /init counts on the serial console, once per ~0.2 s:
#   count=N sum=S boot=B
# (with fill=N on the kernel command line, after holding N MiB of random bytes in RAM)
# S is a running checksum (S = (S*31 + N) mod 1000000007, from 0), which only an unbroken
# run produces; B is a random id drawn at boot, so a rebooted guest shows a new one while a
# restored one keeps it. With a virtio disk (run qemu --disk) the guest loads its drivers
# (modules of the Debian kernel, kept beside it by install-qemu.sh), prints the disk's first
# line once as `disk: LINE`, and writes each count's line to the disk's sector N (fsynced)
# before printing it: a line on the console is on the disk. Nothing is downloaded here. The output is cached by the hash of
# its inputs (this script, busybox, the kernel): a rerun with the same inputs does nothing.
# Usage: scripts/build-vm-guest.sh DIR   (QEMU_KERNEL=FILE to use another kernel)
set -euo pipefail

fail() { echo "build-vm-guest: $*" >&2; exit 1; }
[ $# -eq 1 ] || fail "usage: build-vm-guest.sh DIR"
OUT=$1
KERNEL=${QEMU_KERNEL:-${QEMU_KERNEL_DIR:-/opt/cedana-ray/qemu-kernel}/vmlinuz}
MODULES=$(dirname "$KERNEL")/modules  # virtio disk drivers for that kernel, in modules/order
BUSYBOX=/bin/busybox
[ -r "$KERNEL" ] || fail "no guest kernel at $KERNEL: run scripts/install-qemu.sh (make setup)"
# busybox-static provides /bin/busybox; a dynamic busybox cannot run in a bare initramfs
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" ||
  fail "busybox-static is not installed: run scripts/install-qemu.sh"

[ -r "$MODULES/order" ] || echo "build-vm-guest: no $MODULES/order: the guest will see no disk (scripts/install-qemu.sh keeps the modules)" >&2
hash=$(cat "$0" "$BUSYBOX" "$KERNEL" "$MODULES"/* 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$OUT/hash" 2>/dev/null)" = "$hash" ] && [ -e "$OUT/vmlinuz" ] && [ -e "$OUT/initrd.cpio.gz" ]; then
  echo "vm guest: $OUT is up to date ($hash)"
  exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$BUSYBOX" "$root/bin/busybox"
if [ -r "$MODULES/order" ]; then
  while read -r m; do cp "$MODULES/$m.ko" "$root/lib/modules/"; done <"$MODULES/order"
  cp "$MODULES/order" "$root/lib/modules/order"
fi
ln -s busybox "$root/bin/sh"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# PID 1 of the test guest: count forever on the console (ttyS0 with console=ttyS0)
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
boot=$(cut -c1-8 /proc/sys/kernel/random/uuid)
# fill=N on the kernel command line: N MiB of random bytes held in RAM first (bench/vm.py)
# (in a tmpfs of its own: the initramfs' root is a tmpfs of half the RAM)
for arg in $(cat /proc/cmdline); do
  case $arg in fill=*)
    mkdir -p /fill && mount -t tmpfs -o size=95% fill /fill
    if dd if=/dev/urandom of=/fill/data bs=1M count="${arg#fill=}" 2>/dev/null; then
      echo "filled=${arg#fill=}"
    else
      echo "fill failed"
    fi ;;
  esac
done
# a virtio disk (vendor 0x1af4): its drivers loaded only then, so a diskless boot is as before
disk=
if grep -qs 0x1af4 /sys/bus/pci/devices/*/vendor && [ -r /lib/modules/order ]; then
  while read -r m; do insmod "/lib/modules/$m.ko"; done </lib/modules/order
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.2; done
  if [ -b /dev/vda ]; then
    disk=/dev/vda
    echo "disk: $(dd if=$disk bs=512 count=1 2>/dev/null | tr -d '\000' | head -n 1)"
  else
    echo "disk: none seen"
  fi
fi
count=0
sum=0
while :; do
  count=$((count + 1))
  sum=$(((sum * 31 + count) % 1000000007))
  line="count=$count sum=$sum boot=$boot"
  [ -z "$disk" ] || echo "$line" | dd of=$disk bs=512 seek=$count conv=sync,notrunc,fsync 2>/dev/null
  echo "$line"
  sleep 0.2
done
INIT
chmod 755 "$root/init"

mkdir -p "$OUT"
# cpio as root-owned entries whatever user builds it (-R 0:0); gzip -n: no timestamp, same bytes
(cd "$root" && find . | sort | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -n -9 >"$OUT/initrd.cpio.gz.tmp")
mv "$OUT/initrd.cpio.gz.tmp" "$OUT/initrd.cpio.gz"
cp "$KERNEL" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
echo "$hash" >"$OUT/hash"
echo "vm guest: built $OUT ($hash): vmlinuz, initrd.cpio.gz"
