#!/usr/bin/env bash
# Install the container runtimes and image tools the runc/containerd plugins and their
# tests use: runc and containerd (bookworm: runc 1.1.5 checkpoints through our CRIU
# wrapper), umoci (OCI images built locally: no registry is reachable), busybox-static
# (test root filesystems) and debootstrap (the Python container's rootfs).
# Idempotent: installs only what is missing. Waits for the dpkg lock instead of failing,
# since other installs may run on the same machine.
set -euo pipefail

# binary -> package
declare -A NEED=([runc]=runc [containerd]=containerd [ctr]=containerd [umoci]=umoci
  [busybox]=busybox-static [debootstrap]=debootstrap)
missing=()
for bin in "${!NEED[@]}"; do
  if ! command -v "$bin" >/dev/null && [ ! -x "/bin/$bin" ]; then
    missing+=("${NEED[$bin]}")
  fi
done
# busybox (the dynamic one) is no use in a bare rootfs: the tests copy /bin/busybox
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || missing+=(busybox-static)

if [ ${#missing[@]} -eq 0 ]; then
  echo "containers: runc $(runc --version | sed -n 's/^runc version //p'), containerd, umoci, busybox-static already installed"
  exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq -o DPkg::Lock::Timeout=300
apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${pkgs[@]}" >/dev/null
echo "containers: installed ${pkgs[*]}"
