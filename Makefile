# Two commands do all the set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   -> venv + server extra, then the Boston demo (on mosquitto if installed, else the embedded amqtt broker)
#   make test   -> mosquitto, prometheus, the arm64 emulation tools (apt) + venv + dev extra, ruff + mypy, then the whole test suite
#   make arm64-root -> build (or check) the cached arm64 Debian 12 root the emulation test runs in
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
DEVICES ?= 2
ROUNDS  ?= 100

# Debian packages the tests run for real: mosquitto (the broker the integration tests use),
# prometheus (scrapes a real aggregator, tests/test_metrics.py) and the arm64 emulation tools
# (tests/arm64_root.py builds an arm64 Debian 12 root with them and caches it under
# /var/cache/fleetlearn). One apt-get for whatever is missing.
SYSTEM_PACKAGES := mosquitto prometheus qemu-user-static binfmt-support mmdebstrap zstd

.PHONY: demo test lint bench system-packages arm64-root clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.server-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e '.[server]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e '.[dev]'
	touch $@ $(VENV)/.server-installed

demo: $(VENV)/.server-installed
	$(VENV)/bin/fleetlearn demo --devices $(DEVICES) --rounds $(ROUNDS)

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; fi

arm64-root: system-packages $(VENV)/.dev-installed
	$(PY) -m tests.arm64_root check

# ruff (lint + format) and mypy over the package (configured in pyproject.toml), before the suite.
lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) .ci/typecheck.py

test: system-packages lint
	$(PY) -m pytest -q

bench: $(VENV)/.dev-installed system-packages
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
