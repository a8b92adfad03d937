# Two commands do all the set-up on a fresh Debian/Ubuntu machine with Python 3.11:
#   make demo   -> venv + server extra, then the Boston demo on the embedded broker
#   make test   -> mosquitto (apt) + venv + dev extra, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
DEVICES ?= 2
ROUNDS  ?= 100

.PHONY: demo test bench mosquitto clean

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

test: mosquitto $(VENV)/.dev-installed
	$(PY) -m pytest -q

bench: $(VENV)/.dev-installed mosquitto
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
