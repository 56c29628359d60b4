#!/usr/bin/env bash
# The benchmarks: set-up (.venv, matplotlib for the chart), then benchmarks/run.py; arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/python -m pip install -q matplotlib 2>&1 | grep -v "^WARNING: Location" || true
export PYTHONUNBUFFERED=1
exec .venv/bin/python benchmarks/run.py "$@"
