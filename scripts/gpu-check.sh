#!/usr/bin/env bash
# The GPU check (docs/gpu.md): a PyTorch CUDA job dumped, killed and restored by
# cedana-ray in local mode, compared step by step with an uninterrupted run; as a
# process job, then as a runc container, then as a containerd one. Run on a GPU machine
# after scripts/prepare-device.sh filled .device/ here. Writes gpu-check.log and
# gpu-check-{process,runc,containerd}.json to $OUT (default ./gpu-check-out).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

echo "== machine: $(date -u +%FT%TZ) kernel $(uname -r); $(command -v nsenter unshare | tr '\n' ' ')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || exit 1
$PY -m pip install -q --no-index --no-deps .device/wheels/*.whl || exit 1
CRIU_FROM=.device/criu bash scripts/install-criu.sh || exit 1
criu check || { echo "criu check failed: this machine cannot checkpoint processes"; exit 1; }
# the container runtimes the machine lacks, brought from here (runc's init re-execs itself:
# its libseccomp goes where the loader looks, not in LD_LIBRARY_PATH)
BIN=$(mktemp -d)
$PY -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .device/bin.tar.xz "$BIN" || exit 1
for b in runc containerd containerd-shim-runc-v2 ctr; do
  command -v "$b" >/dev/null || install -m 755 "$BIN/$b" /usr/local/bin/ || exit 1
done
ldconfig -p | grep -q libseccomp.so.2 || { cp "$BIN/libseccomp.so.2" /usr/local/lib/ && ldconfig; }
cd /  # import the installed cedana_ray, not the source folder (its plugins/ maps elsewhere)
$PY -m cedana_ray.cli check
$PY -m cedana_ray.cli features --errors | grep -E "FEATURE|GPU|gpu:|process:|runc:|containerd:"
$PY -m cedana_ray.cli query gpu
timeout 400 $PY "$REPO/scripts/gpu_check.py" --out "$OUT" --runtime process runc containerd "$@"
