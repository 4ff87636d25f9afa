# edgefn developer entry points. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
# The system Python that creates the venv (pyenv shims are fine here: used once).
PYTHON ?= python3
# Debian packages the tests and the demo need (installed only when missing; needs root).
# patchelf and ccache: the Nuitka build of the agent binary; debootstrap: its clean-root install
# test; zlib1g-dev: the C++ test that links a library the manifest names; openssl: the bundle
# signature interop test; wrk: benchmarks only. Under CI=true a test that skips fails the run
# (tests/ci_skips.py), so what the suite needs is listed here. g++-aarch64-linux-gnu and
# qemu-user-static: arm64 C++ builds and the conformance suite against arm64 workers, run by
# invoking qemu-aarch64-static directly (binfmt handlers are never registered). postgresql: the
# platform's scale-out store tests (tests/postgres.py starts its own server; the packaged one is
# never used).
APT_PACKAGES := mosquitto util-linux patchelf ccache debootstrap zlib1g-dev openssl \
	g++-aarch64-linux-gnu qemu-user-static chromium chromium-driver postgresql

.PHONY: all install system-deps run test lint fmt bench binary deb clean

all: install

$(VENV)/.installed: pyproject.toml setup.py runtimes/cpp/_host.cpp runtimes/cpp/include/edgefn.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev,binary]'
	touch $@

install: $(VENV)/.installed

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "please install:$$missing (apt-get install -y$$missing)"; exit 1; fi; \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

run: install
	$(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: system-deps install lint
	$(VENV)/bin/pytest -q

bench: install
	@command -v wrk >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
	$(PY) bench/invoke.py
	$(PY) bench/cache.py
	$(PY) -m bench.sync

# The single-binary agent (Nuitka) and its .deb, in packaging/out/.
binary: system-deps install
	packaging/build_binary.sh --if-stale

deb: binary
	packaging/build_deb.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .demo packaging/out
