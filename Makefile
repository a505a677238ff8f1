# `make test` is the one test command (README, CI): it installs what the tests need
# (the package with its test extras; the tests fetch a real Triton server themselves).
PYTHON ?= python3

.PHONY: install test bench
install:
	$(PYTHON) -m pip install -q -e '.[test]'

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m benchmarks.run
