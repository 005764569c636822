# Two commands on a fresh machine: `make run` (default job) and `make test` (every test).
PY := .venv/bin/python
# Local Ray on loopback needs no token; no model hub is reachable here.
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-fast
setup:
	bash scripts/setup.sh

run: setup
	$(PY) jobs/generate.py

test: setup
	$(PY) -m pytest -m "slow or not slow" tests

test-fast: setup
	$(PY) -m pytest tests
