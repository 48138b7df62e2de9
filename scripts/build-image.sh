#!/usr/bin/env bash
# Build the cedana-ray OCI image (Containerfile) with buildah: scripts/build-image.sh [TAG]
# (`--base` instead of TAG: only build the local base below and print its name).
#
# BASE=IMAGE builds on that image (e.g. docker.io/library/debian:bookworm-slim, pulled).
# Without BASE the base is a local Debian bookworm minbase that debootstrap makes from this
# machine's apt mirror (tests/containers.py builds and caches it; PYTHON, default
# .venv/bin/python, runs it), so that no container registry is needed.
# The image is tagged TAG (default localhost/cedana-ray:latest) and localhost/cedana-ray:KEY,
# KEY a hash of the build context (below), the base and EXTRAS: when an image
# with that KEY exists the build is skipped, and older KEY images are removed (with vfs
# storage each one is a full copy). The last line printed is the KEY tag.
# STORAGE_DRIVER (default vfs, which works everywhere, inside VMs and containers too) is
# buildah's storage driver; podman must use the same one to run the image.
# Installs Debian's buildah (and debootstrap) when missing, and podman to run the image.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=${1:-localhost/cedana-ray:latest}
REPO=localhost/cedana-ray
EXTRAS=${EXTRAS:-s3,gcs,cri,k8s}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BUILDAH=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")

install_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v podman >/dev/null || missing+=(podman)
  [ -n "${BASE:-}" ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq -o DPkg::Lock::Timeout=300
  apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null
  echo "build-image: installed ${missing[*]}" >&2
}

has_image() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# The local base reaches the network as this machine does. apt: the mirror with this
# machine's settings for it (a frozen snapshot's Release files are past their Valid-Until,
# and the machine then turns that check off). TLS: the CAs this machine trusts (a proxy's
# own CA, say), which the image's ca-certificates then adds to its bundle.
apt_settings() { apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date) ' || true; }
HOST_CAS=/etc/ssl/certs/ca-certificates.crt

# The debootstrap rootfs as an image of one layer, named after the rootfs's own cache key
# and the apt settings it gets.
local_base() {
  local rootfs ref ctr mnt
  rootfs=$(cd "$ROOT" && "$PYTHON" tests/containers.py)
  ref=localhost/cedana-ray-base:$(basename "$rootfs")-$( (apt_settings; cat "$HOST_CAS" 2>/dev/null) | sha256sum | cut -c1-8)
  if ! has_image "$ref"; then
    ctr=$("${BUILDAH[@]}" from scratch)
    mnt=$("${BUILDAH[@]}" mount "$ctr")
    cp -a "$rootfs/." "$mnt/"
    apt_settings >"$mnt/etc/apt/apt.conf.d/99cedana-ray-host"
    mkdir -p "$mnt/usr/local/share/ca-certificates"
    [ ! -f "$HOST_CAS" ] || cp "$HOST_CAS" "$mnt/usr/local/share/ca-certificates/cedana-ray-host.crt"
    "${BUILDAH[@]}" umount "$ctr" >/dev/null
    "${BUILDAH[@]}" config --cmd /bin/bash \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    "${BUILDAH[@]}" commit --rm -q "$ctr" "$ref" >/dev/null
    prune localhost/cedana-ray-base '.*' "$ref" >&2
  fi
  echo "$ref"
}

# The build context: what the package is built from (pyproject.toml's package dirs, the
# README it names), CRIU's installer and the Containerfile; of those, the checkout's files
# (git's tracked and untracked-but-not-ignored ones), never build output. Nothing else, so
# that an edit to the tests or the docs does not make a new image.
CONTEXT=(Containerfile pyproject.toml setup.py README.md cedana_ray plugins actors jobs scripts/install-criu.sh)
copy_context() {
  local dest=$1
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z -co --exclude-standard -- "${CONTEXT[@]}" |
      while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
      tar --null -T - -cf -) | tar -C "$dest" -xf -
  else
    tar -C "$ROOT" --exclude=__pycache__ --exclude='*.egg-info' --exclude=plugins/process/nsinit \
      -cf - "${CONTEXT[@]}" | tar -C "$dest" -xf -
  fi
}

# Same inputs, same key: file names and contents, the base and the extras.
input_key() {
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    printf '%s\n' "$2" "$EXTRAS") | sha256sum | cut -c1-12
}

# Our older images, REPO:TAG with TAG matching PATTERN, all but KEEP: on vfs each one
# is a full copy of its rootfs.
prune() {
  "${BUILDAH[@]}" images --format '{{.Name}}:{{.Tag}}' | grep -E "^$1:$2\$" | grep -vx "$3" |
    xargs -r "${BUILDAH[@]}" rmi -f >/dev/null 2>&1 || true
}

install_tools
if [ "${1:-}" = --base ]; then
  local_base
  exit 0
fi
base=${BASE:-$(local_base)}
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
copy_context "$context"
key=$(input_key "$context" "$base")
if ! has_image "$REPO:$key"; then
  "${BUILDAH[@]}" bud --isolation chroot --build-arg "BASE=$base" --build-arg "EXTRAS=$EXTRAS" \
    -f "$context/Containerfile" -t "$REPO:$key" "$context" >&2
fi
"${BUILDAH[@]}" tag "$REPO:$key" "$TAG"
prune "$REPO" '[0-9a-f]{12}' "$REPO:$key"
echo "$REPO:$key"
