# mqtt-kafka-bridge: `make dev` runs the bridge on a local stack, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
BENCH ?=  # options for bench/suite.py, e.g. make bench BENCH="--only latency"

.PHONY: help dev test unit check bench bench-quick bench-files bench-formats clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@missing=""; \
	for c in /usr/sbin/mosquitto:mosquitto mosquitto_sub:mosquitto-clients openssl:openssl; do \
		command -v $${c%%:*} >/dev/null 2>&1 || missing="$$missing $${c##*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps 'pysparkplug==0.6.1'  # see pyproject.toml
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

dev: $(STAMP)  ## run the bridge on a local Mosquitto, Tansu (Kafka) and S3, with a simulated fleet
	$(BIN)/mqtt-kafka-bridge dev

test: $(STAMP)  ## run every test (unit and integration, on real local servers)
	$(BIN)/python -m pytest -q

unit: $(STAMP)  ## run the tests that need no servers
	$(BIN)/python -m pytest -q -m 'not integration'

check: $(STAMP)  ## lint and type-check
	$(BIN)/python -m ruff check bridge tests bench
	$(BIN)/python -m mypy bridge

bench: $(BENCH_STAMP)  ## the benchmark suite (13-25 min): one table, results/latest.json, charts
	$(BIN)/python bench/suite.py $(BENCH)

bench-quick: $(BENCH_STAMP)  ## the suite's smoke run: one run of each, small sizes (~2 min)
	$(BIN)/python bench/suite.py --quick $(BENCH)

bench-files: $(STAMP)  ## large-file benchmark: a 200 MiB file transfer, MiB/s and peak RSS
	$(BIN)/python bench/large_files.py

bench-formats: $(STAMP)  ## payload-check benchmark: per message, MB/s, memory, loop lag
	$(BIN)/python bench/formats.py

clean:  ## remove the virtual environment and local state
	rm -rf $(VENV) .dev *.egg-info
