# Entry points: make setup | build | run | test | bench | lint | constants | clean
SHELL  := /bin/bash
VENV   := .venv
BIN    := $(VENV)/bin
LISTEN ?= 127.0.0.1:9464
# Extra pytest arguments, e.g. make test PYTEST_ARGS='-k retrans -x'
PYTEST_ARGS ?=
# Extra bench arguments, e.g. make bench BENCH_ARGS=--quick
BENCH_ARGS ?=
# Loading BPF programs needs root; fall back to sudo for a non-root user.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all setup build run test bench lint clean distclean constants

all: build

setup:
	scripts/setup.sh

build:
	$(MAKE) -C bpf
	scripts/vendor-ui.sh

run: setup
	$(MAKE) build
	$(SUDO) $(BIN)/probewire run --listen $(LISTEN)

test: setup
	$(MAKE) build
	$(SUDO) $(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

bench: setup
	$(MAKE) build
	$(SUDO) $(BIN)/python -m bench $(BENCH_ARGS)

# Kernel/user constants: rewrite src/probewire/l7/constants.py from the l7 object's BTF.
constants: build
	$(BIN)/python scripts/gen_constants.py

lint:
	$(BIN)/ruff check src
	$(BIN)/mypy

clean:
	$(MAKE) -C bpf clean
	rm -rf build dist src/*.egg-info test-output .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
