#!/usr/bin/env bash
# Install what the crio (CRI) plugin's tests run against, into a private prefix: containerd
# 2.x from Debian sid (its CRI implements CheckpointContainer; bookworm's 1.6 answers
# UNIMPLEMENTED) and Debian's docker-registry (a CRI restore pulls the checkpoint's base
# image from a registry, and none is reachable from here but a local one). Both are static
# Go binaries, unpacked with dpkg -x: bookworm's own containerd 1.6, which the runc and
# containerd plugins' tests use, stays as it is.
# And checkpointctl (sid's 1.3, which reads CRI checkpoint archives): it needs glibc 2.38, so
# $BIN/checkpointctl runs it through the loader of the CRIU prefix, as the `criu` wrapper does.
# Idempotent: does nothing when the prefix already holds a containerd 2.x, the registry and
# a checkpointctl that runs.
# Needs the sid source pinned to priority 1 that scripts/install-criu.sh adds.
set -euo pipefail

PREFIX=${CONTAINERD2_PREFIX:-/opt/cedana-ray/containerd2}
BIN=$PREFIX/bin
CRIU_PREFIX=${CRIU_PREFIX:-/opt/cedana-ray/criu}

checkpointctl_ok() {
  "$BIN/checkpointctl" --help 2>/dev/null | grep -q 'inspect'
}

# checkpointctl from sid, unpacked into $PREFIX/libexec, and its wrapper
install_checkpointctl() {
  if checkpointctl_ok; then
    echo "cri: checkpointctl already in $BIN"
    return
  fi
  local loader=$CRIU_PREFIX/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
  [ -x "$loader" ] || { echo "install-cri: no glibc 2.38 loader in $CRIU_PREFIX: run scripts/install-criu.sh first" >&2; exit 1; }
  local work
  work=$(mktemp -d)
  (cd "$work" && apt-get download -qq checkpointctl/sid 2>/dev/null && dpkg -x ./checkpointctl_*.deb root)
  mkdir -p "$PREFIX/libexec" "$BIN"
  install -m 755 "$work/root/usr/bin/checkpointctl" "$PREFIX/libexec/checkpointctl"
  rm -rf "$work"
  cat >"$BIN/checkpointctl" <<WRAP
#!/bin/sh
# checkpointctl from Debian sid, run through the CRIU prefix's loader (installed by cedana-ray)
exec $loader --library-path $CRIU_PREFIX/usr/lib/x86_64-linux-gnu $PREFIX/libexec/checkpointctl "\$@"
WRAP
  chmod +x "$BIN/checkpointctl"
  checkpointctl_ok || { echo "install-cri: $BIN/checkpointctl does not run" >&2; exit 1; }
  echo "cri: checkpointctl installed in $BIN"
}

installed() {
  [ -x "$BIN/docker-registry" ] && [ -x "$BIN/containerd-shim-runc-v2" ] &&
    "$BIN/containerd" --version 2>/dev/null | grep ' 2\.[0-9]' >/dev/null
}

if installed; then
  echo "cri: $("$BIN/containerd" --version | awk '{print $3}') and docker-registry already in $PREFIX"
  install_checkpointctl
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
install_checkpointctl
