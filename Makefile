# Two commands on a fresh machine: `make run` (default job) and `make test` (every test).
PY := .venv/bin/python
# Local Ray on loopback needs no token; no model hub is reachable here.
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-test run test test-fast
setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh test

run: setup
	$(PY) jobs/generate.py

test: setup-test
	$(PY) -m pytest -m "slow or not slow" tests

test-fast: setup-test
	$(PY) -m pytest tests
