#!/usr/bin/env bash
# Install what the qemu plugin and its tests use: QEMU (Debian's qemu-system-x86, 7.2 on
# bookworm, without recommends, and qemu-utils' qemu-img), busybox-static (the test guest's
# userland) and a Debian kernel for guests. The kernel package is only downloaded and unpacked into
# $QEMU_KERNEL_DIR (default /opt/cedana-ray/qemu-kernel), never installed: installing it
# would make it a boot candidate of this host and run its postinst (initramfs, bootloader).
# Its vmlinuz is kept, and the modules a guest needs to see a virtio disk (run qemu --disk):
# Debian builds virtio and virtio_blk as modules, so the test guest's initramfs carries them.
# Idempotent: installs only what is missing. Waits for the dpkg lock instead of failing,
# since other installs may run on the same machine.
set -euo pipefail

KERNEL_DIR=${QEMU_KERNEL_DIR:-/opt/cedana-ray/qemu-kernel}
fail() { echo "install-qemu: $*" >&2; exit 1; }

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null || missing+=(qemu-utils) # the tests make qcow2 disks with it
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || missing+=(busybox-static)
# the virtio disk's modules, in the order they load (each after what it depends on)
MODULES="virtio/virtio_ring virtio/virtio virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev virtio/virtio_pci block/virtio_blk"
have_kernel() { [ -e "$KERNEL_DIR/vmlinuz" ] && [ -e "$KERNEL_DIR/modules/virtio_blk.ko" ]; }

if [ ${#missing[@]} -eq 0 ] && have_kernel; then
  echo "qemu: $(qemu-system-x86_64 --version | head -1), qemu-img, busybox-static, kernel $(cat "$KERNEL_DIR/version") already installed"
  exit 0
fi
command -v apt-get >/dev/null || fail "needs apt-get (Debian/Ubuntu): install qemu-system-x86_64, busybox (static) and a guest kernel yourself"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq -o DPkg::Lock::Timeout=300 || fail "apt-get update failed"
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null ||
    fail "apt-get install ${missing[*]} failed"
  echo "qemu: installed ${missing[*]}"
fi

if ! have_kernel; then
  # linux-image-amd64 is a metapackage: its one dependency is the versioned image package
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)
  [ -n "$pkg" ] || fail "no linux-image package found behind linux-image-amd64 (apt sources?)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chown _apt "$tmp" 2>/dev/null || true # apt downloads as _apt where it can write
  (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null) || fail "apt-get download $pkg failed"
  dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/root" || fail "cannot unpack $pkg"
  vmlinuz=$(ls "$tmp"/root/boot/vmlinuz-* 2>/dev/null | head -1)
  [ -n "$vmlinuz" ] || fail "$pkg holds no /boot/vmlinuz-*"
  version=$(basename "$vmlinuz" | sed 's/^vmlinuz-//')
  mkdir -p "$KERNEL_DIR/modules"
  for m in $MODULES; do
    ko="$tmp/root/lib/modules/$version/kernel/drivers/$m.ko"
    [ -e "$ko" ] || fail "$pkg has no $m.ko"
    cp "$ko" "$KERNEL_DIR/modules/"
  done
  echo "$MODULES" | tr ' ' '\n' | sed 's,.*/,,' >"$KERNEL_DIR/modules/order"
  cp "$vmlinuz" "$KERNEL_DIR/vmlinuz.tmp" && mv "$KERNEL_DIR/vmlinuz.tmp" "$KERNEL_DIR/vmlinuz"
  echo "$version" >"$KERNEL_DIR/version"
  echo "qemu: guest kernel $(cat "$KERNEL_DIR/version") in $KERNEL_DIR (from $pkg, not installed on the host)"
fi
