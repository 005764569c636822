#!/usr/bin/env bash
# Create .venv and install prepack: `setup.sh` for running, `setup.sh test` adds the test tools.
# Idempotent: skips when up to date. torch is installed first at 2.13.0 so no resolver step
# pulls a newer (CUDA) build here; on a GPU machine install your CUDA torch into .venv first
# and run with PREPACK_TORCH= (empty) to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${PREPACK_TORCH-torch==2.13.0}
EXTRA=${1:-}
stamp=.venv/.installed${EXTRA:+-$EXTRA}
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ] && [ "$stamp" -nt scripts/setup.sh ]; then exit 0; fi
# The tests compile decoder layers with inductor (model.compile), which needs a C++ compiler,
# build the C++ kernels with g++ and clang++ (tests/test_cpu_build.py), and check that the
# job's actors run on tcmalloc (actors.allocator: auto).
if [ "$EXTRA" = test ] && { ! command -v g++ >/dev/null || ! command -v clang++ >/dev/null \
    || ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing g++, clang and libtcmalloc-minimal4"
    apt-get update -qq && apt-get install -y -qq g++ clang libtcmalloc-minimal4 >/dev/null
  else
    echo "setup: the tests need g++, clang and libtcmalloc-minimal4 (apt-get install g++ clang libtcmalloc-minimal4)" >&2; exit 1
  fi
fi
[ -x .venv/bin/python ] || { echo "setup: creating .venv"; "$PY" -m venv .venv; }
if [ -n "$TORCH" ]; then echo "setup: installing $TORCH"; .venv/bin/python -m pip install --progress-bar off "$TORCH" | grep -v "^Requirement already satisfied" || true; fi
echo "setup: installing prepack${EXTRA:+ with [$EXTRA]} (first time: a few minutes)"
.venv/bin/python -m pip install --progress-bar off -c constraints.txt -e ".${EXTRA:+[$EXTRA]}" \
  | grep -E "^(Collecting|Successfully|ERROR)" || true
.venv/bin/python -c "import prepack_actor, torch, ray, transformers" || { echo "setup: install failed" >&2; exit 1; }
touch "$stamp"
echo "setup: done (.venv, torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
