#!/usr/bin/env bash
# The GPU smoke test (issue 15): run this first on a machine with an NVIDIA GPU, from any directory.
#   bash bench/gpu_smoke.sh [--data DIR] [--rows N] [--out DIR] [--keep]      (--help: the options)
# Prints one line per check (ok / FAIL / info); exit 0 = all ok, 1 = a check failed, 2 = no CUDA device.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/gpu_smoke.py" "$@"
