#!/usr/bin/env bash
# Create .venv and install prepack with its test tools. Idempotent: skips when up to date.
# torch is installed first at 2.13.0 so no resolver step pulls a newer (CUDA) build here;
# on a GPU machine install your CUDA torch first and set PREPACK_TORCH= (empty) to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${PREPACK_TORCH-torch==2.13.0}
stamp=.venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
[ -z "$TORCH" ] || .venv/bin/python -m pip install -q "$TORCH"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
touch "$stamp"
