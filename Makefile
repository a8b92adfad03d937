# Two commands do all the set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   -> venv + server extra, then the Boston demo (on mosquitto if installed, else the embedded amqtt broker)
#   make test   -> mosquitto and the arm64 emulation tools (apt) + venv + dev extra, then the whole test suite
#   make arm64-root -> build (or check) the cached arm64 Debian 12 root the emulation test runs in
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
DEVICES ?= 2
ROUNDS  ?= 100

# Debian packages for the emulated Raspberry Pi test (tests/arm64_root.py, tests/test_arm64_emulated.py).
ARM64_PACKAGES := qemu-user-static binfmt-support mmdebstrap zstd

.PHONY: demo test bench mosquitto arm64-tools arm64-root clean

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

# Debian's mosquitto is the real broker the integration tests also run against; Debian's
# prometheus scrapes a real aggregator in tests/test_metrics.py.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q mosquitto; }
	@command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends prometheus; }

# The apt packages an arm64 Debian root needs on this x86_64 machine (the root itself is built
# by tests/arm64_root.py on first use and cached under /var/cache/fleetlearn).
arm64-tools:
	@missing=$$(for p in $(ARM64_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; fi

arm64-root: arm64-tools $(VENV)/.dev-installed
	$(PY) -m tests.arm64_root check

test: mosquitto arm64-tools $(VENV)/.dev-installed
	$(PY) -m pytest -q

bench: $(VENV)/.dev-installed mosquitto
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
