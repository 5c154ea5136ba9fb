#!/usr/bin/env bash
# Installs everything probewire needs to build, run and test on Debian 12, idempotently:
# system packages, tracefs, the .venv with probewire installed editable plus dev tools.
# A stamp keyed by the package list and pyproject.toml makes a repeat run take well under a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.probewire-setup.stamp
APT_PACKAGES=(
    clang llvm libbpf-dev bpftool make        # BPF objects (bpf/Makefile)
    iproute2 nftables procps                  # ip/tc/ss/nstat, loss rules, ps
    nginx-light wrk curl tmux openssl         # e2e servers, load generator, demos, test certs
    nghttp2-client                            # h2load: HTTP/2 load with many streams a connection
    bpftrace bpfcc-tools                      # the peers `make bench` compares against
    linux-perf                                # `perf bench sched pipe`: bench/saturation.py
    linux-headers-amd64                       # bcc compiles against headers; our kernel ships
                                              # none, so bench/bcc.py points bcc at these
    python3 python3-venv                      # the venv (Debian's python3 needs python3-venv)
    chromium                                  # e2e web UI tests (driven by Playwright)
    prometheus                                # e2e Prometheus server + promtool (rules checks/tests)
    # L7 protocol tests (tests/e2e/test_l7_servers.py, tests/support/dbservers.py): real
    # servers and their stock clients; libpq5 is what pure-Python psycopg loads
    postgresql postgresql-client libpq5 mariadb-server mariadb-client redis-server redis-tools
    memcached dnsmasq-base bind9-dnsutils
    netcat-openbsd gcc                        # security tests: netcat by a service, a C build;
                                              # bench/security.py's exec loop
    podman runc                               # real containers: security tests (a package
                                              # manager in a container), identities (crun
                                              # refuses hybrid cgroups; tests pass --runtime runc)
    gcc systemtap-sdt-dev golang-go binutils  # custom probe tests: C with <sys/sdt.h>, Go, strip
)
# `kubectl kustomize` renders deploy/kubernetes in the tests. Debian's kubernetes-client
# unless a kubectl is installed already (another package owning /usr/bin/kubectl would
# make the install fail on a file conflict).
if ! command -v kubectl >/dev/null; then
    APT_PACKAGES+=(kubernetes-client)
fi

SUDO=()
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup.sh: run as root (or install sudo)" >&2; exit 3; }
    SUDO=(sudo)
fi

log() { echo "setup: $*" >&2; }

# tracefs does not survive a reboot, so it is checked on every run, not behind the stamp.
if [ -d /sys/kernel/tracing ] && ! mountpoint -q /sys/kernel/tracing; then
    log "mounting tracefs on /sys/kernel/tracing"
    "${SUDO[@]}" mount -t tracefs nodev /sys/kernel/tracing
fi

key=$( { printf '%s\n' "${APT_PACKAGES[@]}" "$PYTHON"; cat pyproject.toml setup.py; } | sha256sum | cut -d' ' -f1)
tools_present() {
    local t
    for t in clang llc bpftool make ip tc nft nstat ss nginx wrk curl h2load prometheus promtool chromium tmux npm podman runc kubectl psql mariadb redis-cli dig; do
        command -v "$t" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "$t" >/dev/null || return 1
    done
    [ -r /usr/include/bpf/bpf_helpers.h ]
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] && [ -x "$VENV/bin/probewire" ] && tools_present; then
    exit 0
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${APT_PACKAGES[@]}"
fi

# npm fetches the web UI's charting library at build time (scripts/vendor-ui.sh). Some nodejs
# builds bundle npm and conflict with Debian's npm package, so install it only when missing.
if ! command -v npm >/dev/null; then
    log "installing npm"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm
fi
scripts/vendor-ui.sh

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $($PYTHON -V 2>&1)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "setup.sh: probewire needs Python >= 3.11; set PYTHON=..." >&2; exit 3; }
    "$PYTHON" -m venv "$VENV"
fi
log "installing probewire (editable) with dev tools into $VENV"
# Playwright drives Debian's chromium (apt above); it must never download a browser of its own.
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 \
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'

echo "$key" > "$STAMP"
log "done"
