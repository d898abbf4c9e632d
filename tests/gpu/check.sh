#!/usr/bin/env bash
# On a host with NVIDIA GPUs and their driver: install hotplug-monitor into a fresh venv, run the
# daemon for 30 s, compare what it serves with nvidia-smi and check that it reads the kernel log
# (tests/gpu/check.py). Run as root from the repository root: sudo tests/gpu/check.sh. Takes
# about a minute; at most 3.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d /tmp/hotplug-monitor-gpu-check.XXXXXX)
trap 'rm -rf "$work"' EXIT

command -v nvidia-smi >/dev/null || { echo "check: nvidia-smi not found: no NVIDIA driver" >&2; exit 2; }
nvidia-smi --query-gpu=uuid,name,memory.total,pci.bus_id,driver_version,mig.mode.current --format=csv
nvidia-smi -L  # with the MIG devices of GPUs in MIG mode, which the check finds in the fingerprint

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q .
exec timeout 170 "$work/venv/bin/python" tests/gpu/check.py "$work"
