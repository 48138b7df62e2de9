#!/usr/bin/env bash
# Build the small test guest of the qemu plugin into DIR: DIR/vmlinuz (the Debian kernel
# scripts/install-qemu.sh unpacked) and DIR/initrd.cpio.gz, an initramfs of busybox-static
# whose /init counts on the serial console, once per ~0.2 s:
#   count=N sum=S boot=B
# (with fill=N on the kernel command line, after holding N MiB of random bytes in RAM)
# S is a running checksum (S = (S*31 + N) mod 1000000007, from 0), which only an unbroken
# run produces; B is a random id drawn at boot, so a rebooted guest shows a new one while a
# restored one keeps it. Nothing is downloaded here. The output is cached by the hash of
# its inputs (this script, busybox, the kernel): a rerun with the same inputs does nothing.
# Usage: scripts/build-vm-guest.sh DIR   (QEMU_KERNEL=FILE to use another kernel)
set -euo pipefail

fail() { echo "build-vm-guest: $*" >&2; exit 1; }
[ $# -eq 1 ] || fail "usage: build-vm-guest.sh DIR"
OUT=$1
KERNEL=${QEMU_KERNEL:-${QEMU_KERNEL_DIR:-/opt/cedana-ray/qemu-kernel}/vmlinuz}
BUSYBOX=/bin/busybox
[ -r "$KERNEL" ] || fail "no guest kernel at $KERNEL: run scripts/install-qemu.sh (make setup)"
# busybox-static provides /bin/busybox; a dynamic busybox cannot run in a bare initramfs
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" ||
  fail "busybox-static is not installed: run scripts/install-qemu.sh"

hash=$(cat "$0" "$BUSYBOX" "$KERNEL" | sha256sum | cut -c1-16)
if [ "$(cat "$OUT/hash" 2>/dev/null)" = "$hash" ] && [ -e "$OUT/vmlinuz" ] && [ -e "$OUT/initrd.cpio.gz" ]; then
  echo "vm guest: $OUT is up to date ($hash)"
  exit 0
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp "$BUSYBOX" "$root/bin/busybox"
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
count=0
sum=0
while :; do
  count=$((count + 1))
  sum=$(((sum * 31 + count) % 1000000007))
  echo "count=$count sum=$sum boot=$boot"
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
