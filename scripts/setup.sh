#!/usr/bin/env bash
# Creates .venv (once) and installs autockpt with every extra. Re-runs are fast: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating the virtual environment .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi
stamp=.venv/.autockpt-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing torch 2.13.0 (CPU), then autockpt with its extras: keras, lightning, transformers (with peft," \
         "accelerate), s3fs," \
         "tensorflow-cpu (Keras' default backend, for its tests)," \
         "and the test tools (pytest, pytest-xdist, hypothesis, moto[server], ruff, mypy, import-linter); a few minutes the first time"
    # torch==2.13.0 is pinned: the CPU build lies on this machine's disk; an unpinned torch pulls CUDA.
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[torch,keras,lightning,transformers,s3,dev]" 2>&1 \
        | grep -v "^WARNING: Location" || true
    KERAS_BACKEND=torch .venv/bin/python -c "import autockpt, torch, keras, lightning, transformers, peft, s3fs, moto" >/dev/null
    # tensorflow-cpu comes with the dev extra (Linux x86_64); check it imports beside torch where it was installed
    if .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is None)"; then
        TF_CPP_MIN_LOG_LEVEL=3 KERAS_BACKEND=tensorflow .venv/bin/python -c "import tensorflow, keras, torch" >/dev/null 2>&1
    fi
    echo "$want" > "$stamp"
    echo "setup: done"
fi
