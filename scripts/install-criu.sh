#!/usr/bin/env bash
# Install CRIU >= 4.2 into a private prefix with a `criu` wrapper on PATH.
#
# Debian 12's criu 3.17 fails on current kernels and 4.1 cannot dump sockets on
# kernels >= 6.16, so we take criu 4.2 and its libraries from Debian sid, unpack them
# (no system libc change) and run criu through sid's own dynamic loader. That works on
# Debian and Ubuntu (LTS 22.04 and 24.04: Debian's archive key comes from Ubuntu's
# debian-archive-keyring package), on x86_64 (amd64) and aarch64 (arm64). Elsewhere it
# says what to install instead and fails.
# Idempotent: does nothing when a working criu >= 4.2 is already installed.
# CRIU_FROM=DIR uses a prefix unpacked elsewhere (e.g. carried to a machine that
# reaches no package registry) instead of downloading one.
set -euo pipefail

NEEDS="cedana-ray needs CRIU >= 4.2 (criu.org; put it on PATH or set CEDANA_RAY_CRIU) and a kernel
with CONFIG_CHECKPOINT_RESTORE (\`cedana-ray check\` runs \`criu check\`)"

PREFIX=${CRIU_PREFIX:-/opt/cedana-ray/criu}
WRAPPER=${CRIU_WRAPPER:-/usr/local/bin/criu}
PKGS="criu libcompel1 libc6 libprotobuf-c1 libnl-3-200 libnet9 libgnutls30t64
libnftables1 libbsd0 libuuid1 libnettle8t64 libhogweed6t64 libp11-kit0 libunistring5
libtasn1-6 libidn2-0 libgmp10 libmnl0 libnftnl11 libjansson4 libxtables12 libmd0 libffi8
libedit2 libzstd1 liblz4-1 libcap2"

criu_ok() {
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p') || return 1
  [ -n "$v" ] && printf '%s\n4.2\n' "$v" | sort -V -C -r 2>/dev/null
}

# Debian's multiarch directory and dynamic loader of this machine's architecture
case "$(uname -m)" in
  x86_64) TRIPLET=x86_64-linux-gnu LOADER=ld-linux-x86-64.so.2 ;;
  aarch64) TRIPLET=aarch64-linux-gnu LOADER=ld-linux-aarch64.so.1 ;;
  *) TRIPLET="" LOADER="" ;;
esac

write_wrapper() {
  mkdir -p "$(dirname "$WRAPPER")"
  cat >"$WRAPPER" <<WRAP
#!/bin/sh
# criu from Debian sid, run through its own loader (installed by cedana-ray)
exec $1/usr/lib/$TRIPLET/$LOADER \\
  --library-path $1/usr/lib/$TRIPLET \\
  $1/usr/sbin/criu "\$@"
WRAP
  chmod +x "$WRAPPER"
  criu_ok "$WRAPPER" || { echo "install-criu: installed criu does not report >= 4.2" >&2; exit 1; }
  echo "criu: $("$WRAPPER" --version | head -1) installed from $1"
}

if [ -n "${CRIU_FROM:-}" ]; then
  write_wrapper "$(realpath "$CRIU_FROM")"
  exit 0
fi

# sort -V -C -r succeeds when the list is in descending order, i.e. v >= 4.2
if command -v criu >/dev/null && criu_ok "$(command -v criu)"; then
  echo "criu: $(criu --version | head -1) already installed"
  exit 0
fi

if [ -z "$TRIPLET" ]; then
  echo "install-criu: no Debian CRIU build for $(uname -m) here (x86_64 and aarch64 only). $NEEDS" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
  echo "install-criu: this installer needs Debian or Ubuntu (apt-get, dpkg). $NEEDS" >&2
  exit 1
fi
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [ ! -f "$KEYRING" ]; then  # Ubuntu: Debian's archive key is a package of its own (universe)
  apt-get update -qq && apt-get install -y -qq debian-archive-keyring >/dev/null || {
    echo "install-criu: cannot install debian-archive-keyring to verify Debian's packages. $NEEDS" >&2
    exit 1
  }
fi

SOURCES=/etc/apt/sources.list.d/cedana-ray-sid.sources
if [ ! -f "$SOURCES" ]; then
  cat >"$SOURCES" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat >/etc/apt/preferences.d/cedana-ray-sid <<'PIN'
Package: *
Pin: release n=sid
Pin-Priority: 1
PIN
fi
apt-get update -qq -o Dir::Etc::sourcelist="$SOURCES" -o Dir::Etc::sourceparts=- \
  -o APT::Get::List-Cleanup=0

work=$(mktemp -d)
chmod 755 "$work"  # apt downloads as the _apt user
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq $(for p in $PKGS; do echo "$p/sid"; done))
rm -rf "$PREFIX.new"
mkdir -p "$PREFIX.new"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$PREFIX.new"; done
rm -rf "$PREFIX"
mv "$PREFIX.new" "$PREFIX"

write_wrapper "$PREFIX"
