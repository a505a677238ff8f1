# `make test` is the one test command (README, CI): it installs what the tests need
# (the package with its test extras; Debian's chromium for the dashboard test and
# libnghttp2-dev for the load generator's tests; the tests fetch a real Triton server
# themselves).
PYTHON ?= python3
APT_GET := $(shell command -v apt-get 2>/dev/null)

.PHONY: install test bench browser nghttp2

install:
	$(PYTHON) -m pip install -q -e '.[test,tracing]'

# The dashboard test runs in a real headless Chromium; without one it is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ -n "$(APT_GET)" ] && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: no chromium; the dashboard browser test will be skipped"

# The load generator is C on libnghttp2 (Debian's libnghttp2-dev).
nghttp2:
	@[ -e /usr/include/nghttp2/nghttp2.h ] || { [ -n "$(APT_GET)" ] && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq libnghttp2-dev >/dev/null; } || \
		echo "note: no libnghttp2-dev; the load generator tests will be skipped"

test: install browser nghttp2
	$(PYTHON) -m pytest -q

bench: install nghttp2
	$(PYTHON) -m benchmarks.run
