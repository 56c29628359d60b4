#!/usr/bin/env bash
# The main job: set up (.venv, once), then train, preempt, crash, resume, and compare bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1
exec .venv/bin/python examples/demo.py "$@"
