#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, lint, type check, tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1
.venv/bin/ruff check src tests examples benchmarks
.venv/bin/mypy
.venv/bin/lint-imports
# Two workers: most tests wait on subprocesses, fsync and sockets, so two at a time fit two cores.
# AUTOCKPT_TEST_WORKERS=0 runs them in one process.
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${AUTOCKPT_TEST_WORKERS:-2}" "$@"
