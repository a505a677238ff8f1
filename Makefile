# `make test` is the one test command (README, CI): it installs what the tests need
# (the package with its test extras; Debian's chromium for the dashboard test and
# libnghttp2-dev for the load generator's tests; libb64-0d for perf_analyzer; Debian's
# redis-server and nats-server for the pipeline tests; the tests
# fetch a real Triton server and perf_analyzer themselves).
PYTHON ?= python3
APT_GET := $(shell command -v apt-get 2>/dev/null)

.PHONY: install test bench browser nghttp2 libb64 brokers

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

# perf_analyzer (from the tritonclient 2.51 wheel, see tests/support/perf_analyzer.py)
# links Debian's libb64.
libb64:
	@[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || [ -e /usr/lib/aarch64-linux-gnu/libb64.so.0d ] || \
		{ [ -n "$(APT_GET)" ] && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; } || \
		echo "note: no libb64-0d; the perf_analyzer tests will fail"

# The pipeline tests start their own Redis and NATS (JetStream) servers.
brokers:
	@{ command -v redis-server && command -v nats-server; } >/dev/null 2>&1 || \
		{ [ -n "$(APT_GET)" ] && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq redis-server nats-server >/dev/null; } || \
		echo "note: no redis-server/nats-server; those pipeline tests will fail"

test: install browser nghttp2 libb64 brokers
	$(PYTHON) -m pytest -q

bench: install nghttp2
	$(PYTHON) -m benchmarks.run
