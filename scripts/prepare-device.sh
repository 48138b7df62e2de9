#!/usr/bin/env bash
# Build .device/ (git-ignored) for scripts/gpu-check.sh on a GPU machine that reaches no
# package registry: cedana-ray as a wheel, the wheels its Python 3.12 image lacks, the
# CRIU prefix that scripts/install-criu.sh installed here, and the container runtimes
# (runc with its libseccomp, containerd, its runc shim and ctr), xz-compressed: everything
# must fit the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .device && mkdir -p .device/wheels
$PY -m pip wheel -q --no-deps -w .device/wheels .
# The device image has click, pluggy, rich, fsspec, psutil and nvidia-ml-py already;
# protobuf is for the containerd plugin (its checkpoint archives).
$PY -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .device/wheels \
  pydantic zstandard lz4 "$(grep -o '"protobuf[^"]*"' pyproject.toml | tr -d '"')"
cp -a "${CRIU_PREFIX:-/opt/cedana-ray/criu}" .device/criu
bins=(runc containerd containerd-shim-runc-v2 ctr)
paths=()
for b in "${bins[@]}"; do paths+=("$(command -v "$b")"); done
seccomp=$(ldd "$(command -v runc)" | awk '/libseccomp/ {print $3}')
tar -cJf .device/bin.tar.xz --dereference --transform 's|.*/||' "${paths[@]}" "$seccomp"
rm -rf build
du -sh .device
