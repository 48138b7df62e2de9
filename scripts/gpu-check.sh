#!/usr/bin/env bash
# The GPU check (docs/gpu.md): a PyTorch CUDA job dumped, killed and restored by
# cedana-ray in local mode, compared step by step with an uninterrupted run; first as a
# process job, then as a runc container. Run on a GPU machine after
# scripts/prepare-device.sh filled .device/ here. Writes gpu-check.log and
# gpu-check-{process,runc}.json to $OUT (default ./gpu-check-out).
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
if ! command -v runc >/dev/null; then  # runc brought from here (its init re-execs itself: no LD_LIBRARY_PATH)
  install -m 755 .device/runc/runc /usr/local/bin/runc
  ldconfig -p | grep -q libseccomp.so.2 || { cp .device/runc/libseccomp.so.2 /usr/local/lib/ && ldconfig; }
fi
cd /  # import the installed cedana_ray, not the source folder (its plugins/ maps elsewhere)
$PY -m cedana_ray.cli check
$PY -m cedana_ray.cli features --errors | grep -E "FEATURE|GPU|gpu:|process:|runc:"
$PY -m cedana_ray.cli query gpu
status=0
timeout 200 $PY "$REPO/scripts/gpu_check.py" --out "$OUT" "$@" || status=1
timeout 200 $PY "$REPO/scripts/gpu_check.py" --out "$OUT" --runtime runc "$@" || status=1
exit $status
