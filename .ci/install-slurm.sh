#!/usr/bin/env bash
# Install a single-machine SLURM (controller, node daemon, client tools, munge) from Debian's
# packages, for tests/test_slurm.py. Idempotent: does nothing when the binaries are there already.
# The test starts and stops the daemons itself (no systemd needed); this only installs them.
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-slurm.sh: not root and no sudo: SLURM not installed (tests/test_slurm.py will be skipped)" >&2
    exit 0
  fi
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
# --no-install-recommends keeps it small (about 13 MB); the lock timeout waits for another apt run
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
