#!/usr/bin/env bash
# Build .device/ (git-ignored) for scripts/gpu-check.sh on a GPU machine that reaches no
# package registry: cedana-ray as a wheel, the wheels its Python 3.12 image lacks, and
# the CRIU prefix that scripts/install-criu.sh installed here, and runc with its libseccomp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .device && mkdir -p .device/wheels
$PY -m pip wheel -q --no-deps -w .device/wheels .
# The device image has click, pluggy, rich, fsspec, psutil and nvidia-ml-py already.
$PY -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .device/wheels \
  pydantic zstandard lz4
cp -a "${CRIU_PREFIX:-/opt/cedana-ray/criu}" .device/criu
mkdir -p .device/runc
cp -L "$(command -v runc)" "$(ldd "$(command -v runc)" | awk '/libseccomp/ {print $3}')" .device/runc/
rm -rf build
du -sh .device
