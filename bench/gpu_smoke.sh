#!/usr/bin/env bash
# The GPU smoke test (issue 15): run this first on a machine with an NVIDIA GPU, from any directory.
#   bash bench/gpu_smoke.sh [--data DIR] [--rows N] [--out DIR] [--keep]      (--help: the options)
# Prints one line per check (ok / FAIL / info); exit 0 = all ok, 1 = a check failed, 2 = no CUDA device.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The project's venv (`make setup`) when there is one, else whatever python is on PATH; PYTHON= overrides both.
default_py="$here/../.venv/bin/python"
[ -x "$default_py" ] || default_py=python
exec "${PYTHON:-$default_py}" "$here/gpu_smoke.py" "$@"
