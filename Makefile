# Entry points: make setup | build | run | test | test-kernels | bench | lint | constants | clean
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

.PHONY: all setup build run test test-kernels test-kernels-ci bench lint clean distclean constants

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
	$(MAKE) test-kernels-ci

# The kernel matrix (scripts/kernels/): each Debian kernel boots in an emulated guest (QEMU TCG)
# that runs the kernel-facing tests on this checkout's .venv and BPF objects, then one table of
# kernel x pass/fail/skip and the hook types chosen (test-output/kernels/summary.md).
# make test-kernels KERNELS=bullseye KERNEL_TESTS='tests/bpf/test_tcp.py' for a part of it.
# KERNEL_JOBS=3 boots the guests side by side (each has 2 vCPUs; faster on a busy machine).
KERNELS      ?= bullseye,bookworm,trixie
KERNEL_TESTS ?=
KERNEL_JOBS  ?= 1
test-kernels: setup
	$(MAKE) build
	$(SUDO) $(BIN)/python scripts/kernels/matrix.py --suites $(KERNELS) --jobs $(KERNEL_JOBS) \
		-- $(KERNEL_TESTS)

# The part of the matrix `make test` (and so CI) runs: Debian 5.10, the kernel with the most
# fallbacks to take (no bpf_loop, no task storage, no bpf_rdonly_cast; fentry and kprobes
# there), and the tests that prove hook choice, the fallbacks, and the families running their
# bounded-loop variants (saturation's listen counters, l7's exact HTTP counts).
KERNELS_CI_TESTS := tests/bpf/test_fallback_hooks.py tests/bpf/test_kernel_features.py \
	tests/bpf/test_process.py::test_n_execs_give_n_exec_and_exit_events_with_filename_and_codes \
	tests/bpf/test_tcp.py::test_connect_to_closed_port_counts_reset_and_failure \
	'tests/bpf/test_saturation.py::test_listen_overflows_match_the_namespace_counters[tp_btf]' \
	tests/bpf/test_http.py::test_nginx_and_upstream_counted_exactly_per_route_and_status_on_both_sides \
	tests/e2e/test_cli.py::test_doctor_reports_hook_types_this_kernel_offers \
	tests/e2e/test_cli.py::test_probes_shows_the_preferred_hook_chosen_and_attached_for_every_hook
test-kernels-ci: setup
	$(MAKE) build
	$(SUDO) env GUEST_CLI_REPORTS=0 $(BIN)/python scripts/kernels/matrix.py --suites bullseye \
		--out test-output/kernels-ci --timeout-min 30 -- $(KERNELS_CI_TESTS)

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
