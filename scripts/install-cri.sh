#!/usr/bin/env bash
# Install what the crio (CRI) plugin's tests run against, into a private prefix: containerd
# 2.x from Debian sid (its CRI implements CheckpointContainer; bookworm's 1.6 answers
# UNIMPLEMENTED) and Debian's docker-registry (a CRI restore pulls the checkpoint's base
# image from a registry, and none is reachable from here but a local one). Both are static
# Go binaries, unpacked with dpkg -x: bookworm's own containerd 1.6, which the runc and
# containerd plugins' tests use, stays as it is.
# Idempotent: does nothing when the prefix already holds a containerd 2.x and the registry.
# Needs the sid source pinned to priority 1 that scripts/install-criu.sh adds.
set -euo pipefail

PREFIX=${CONTAINERD2_PREFIX:-/opt/cedana-ray/containerd2}
BIN=$PREFIX/bin

installed() {
  [ -x "$BIN/docker-registry" ] && [ -x "$BIN/containerd-shim-runc-v2" ] &&
    "$BIN/containerd" --version 2>/dev/null | grep ' 2\.[0-9]' >/dev/null
}

if installed; then
  echo "cri: $("$BIN/containerd" --version | awk '{print $3}') and docker-registry already in $PREFIX"
  exit 0
fi
if ! apt-cache policy containerd | grep ' sid/' >/dev/null; then  # not -q: pipefail and SIGPIPE
  echo "install-cri: no Debian sid source: run scripts/install-criu.sh first (it adds one, pinned to priority 1)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get update -qq -o DPkg::Lock::Timeout=300
# _apt cannot write into a root-only mktemp dir; root downloads it (apt warns, harmlessly)
apt-get download -qq containerd/sid docker-registry 2>/dev/null
for deb in ./*.deb; do dpkg -x "$deb" root; done
mkdir -p "$BIN"
install -m 755 root/usr/bin/containerd root/usr/bin/containerd-shim-runc-v2 root/usr/bin/ctr \
  root/usr/bin/docker-registry "$BIN/"
installed || { echo "install-cri: $BIN/containerd does not report version 2.x" >&2; exit 1; }
echo "cri: $("$BIN/containerd" --version | awk '{print $3}') and docker-registry installed in $PREFIX"
