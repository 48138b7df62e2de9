#!/usr/bin/env bash
# Install SLURM (Debian's slurm-wlm 22.05: slurmctld, slurmd, the client tools) and
# munge, for the slurm plugin and its tests. Only the packages are installed: no daemon
# is enabled or started here (the tests start their own with a config under a temp dir).
# Idempotent: installs only what is missing. Waits for the dpkg lock instead of failing,
# since other installs may run on the same machine.
set -euo pipefail

# binary -> package
declare -A NEED=([slurmctld]=slurmctld [slurmd]=slurmd [sbatch]=slurm-client [munged]=munge)
missing=()
for bin in "${!NEED[@]}"; do
  command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || missing+=("${NEED[$bin]}")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "slurm: $(dpkg-query -W -f='${Version}' slurmctld) and munge already installed"
  exit 0
fi
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq -o DPkg::Lock::Timeout=300
# policy-rc.d keeps the packages' postinst from starting system daemons we did not ask for
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
fi
trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${pkgs[@]}" >/dev/null
echo "slurm: installed ${pkgs[*]}"
