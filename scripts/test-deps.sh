#!/usr/bin/env bash
# The system services the tests start for real: Prometheus (scrapes the coordinator), a
# single-node Slurm (slurmctld, slurmd, munge) and headless Chromium (renders `kiln report`).
# Installed from Debian when missing; needs root (or sudo). Safe to run again.
set -euo pipefail

packages=(prometheus slurmctld slurmd slurm-client munge chromium-headless-shell)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || {
    echo "error: the tests need these Debian packages: ${missing[*]}; install them as root" >&2
    exit 1
  }
  sudo=sudo
fi
echo "==> installing ${missing[*]} (Debian)"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
# The packages' own services stay down (tests start their own, on 127.0.0.1).
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
