# guided-diffusion-jittor: `make setup`, `make test`, `make demo`, `make bench`.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean-results

setup:
	@bash .ci/setup.sh

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/demo.py

bench: setup
	$(PY) bench/run_all.py

clean-results:
	rm -rf results
