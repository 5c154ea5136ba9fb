#!/bin/bash
# Runs inside a matrix guest (scripts/kernels/matrix.py boots it with virtme-ng): the host's root,
# read-only over 9p with tmpfs overlays, so the project's own .venv and built objects are used.
#   PW_REPO=<checkout> [PW_IMAGES="/dev/vdX=/path ..."] guest.sh OUT_DIR [PYTEST ARGS...]
# Writes to OUT_DIR (shared read-write with the host): uname, report.json
# (scripts/kernels/report.py: features, hook choices, the verifier's word for a family switched
# off), doctor.txt and probes.txt (unless GUEST_CLI_REPORTS=0), junit.xml and pytest.log, then
# rc (pytest's exit code).
set -uo pipefail
out=$1
shift
cd "$PW_REPO"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin COLUMNS=200 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The repo is read-only in the guest; hypothesis keeps its example database in the cwd.
export HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hypothesis
step() { echo "guest $(uname -r) $(date +%T): $*" >&2; }

# Python reads thousands of files at every start: over 9p that is minutes per process under
# TCG, from the squashfs images matrix.py attaches (PW_IMAGES: "/dev/vdX=/path ...") seconds.
# The checkout's image goes over the checkout, so test-output/ (written through to the host)
# is moved aside and back on top.
if [ -n "${PW_IMAGES:-}" ]; then
    modprobe virtio_blk && modprobe squashfs
    mkdir -p /run/pw/test-output
    mount --rbind "$PW_REPO/test-output" /run/pw/test-output
    i=0
    for spec in $PW_IMAGES; do
        mkdir -p "/run/pw/img$i"
        mount -t squashfs -o ro "${spec%%=*}" "/run/pw/img$i"
        mount --bind "/run/pw/img$i" "${spec#*=}"
        i=$((i + 1))
    done
    mount --rbind /run/pw/test-output "$PW_REPO/test-output"
    cd "$PW_REPO"
fi
# Tests write test-output/<test>/ (agent logs): each guest gets its own, inside OUT_DIR, so
# guests booted side by side (matrix.py --jobs) do not share one.
mkdir -p /run/pw/out "$out/test-output"
mount --bind "$out" /run/pw/out
mount --bind "$out/test-output" "$PW_REPO/test-output"
out=/run/pw/out

uname -r > "$out/uname"
# With a gdb stub (matrix.py, GUEST_GDB_PORT) the kernel's symbols, to name a hung CPU's
# addresses (Debian ships System.map only in the -dbg package).
[ -n "${GUEST_GDB_PORT:-}" ] && cat /proc/kallsyms > "$out/kallsyms"
# bpffs for tests that pin; tracefs, debugfs and cgroup2 are mounted by virtme-ng's init.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
ip link set lo up
# No udev here: modules that tests open as devices are loaded up front (the delay link of
# tests/support/netns.py forwards through /dev/net/tun).
modprobe tun 2>/dev/null
# The saturation tests' loop device, and a memory controller for their OOM cgroup (no systemd
# here to enable it in the root's subtree).
modprobe loop 2>/dev/null
echo +memory > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null

# A hang must be diagnosable from the host: every 60 s from here on the guest's processes, with the kernel
# function each waits in and the kernel stacks of the ones stuck in D state, go to watch.log.
watch() {
    while sleep 60; do
        {
            date +%T
            ps -eo pid,ppid,stat,etimes,wchan:32,args --sort=pid
            for task in /proc/[0-9]*; do
                state=$(awk '/^State:/ {print $2}' "$task/status" 2>/dev/null)
                if [ "$state" = D ]; then
                    echo "== ${task#/proc/} $(tr '\0' ' ' < "$task/cmdline")"
                    cat "$task/stack" 2>/dev/null
                fi
            done
            dmesg 2>/dev/null | tail -n 30
        } > "$out/watch.log.new" 2>&1
        mv "$out/watch.log.new" "$out/watch.log"
    done
}
watch &
watcher=$!

step report
timeout 1200 .venv/bin/python scripts/kernels/report.py "$out/report.json" > "$out/report.log" 2>&1
if [ "${GUEST_CLI_REPORTS:-1}" = 1 ]; then
    step doctor
    timeout 900 .venv/bin/probewire doctor > "$out/doctor.txt" 2>&1
    echo "doctor exit $?" >> "$out/doctor.txt"
    step probes
    timeout 900 .venv/bin/probewire probes > "$out/probes.txt" 2>&1
    echo "probes exit $?" >> "$out/probes.txt"
fi
step "pytest $*"
# The CPU is emulated (~14x slower): a test gets 15 min, not the suite's 5. The repo is
# read-only here (no cache provider); test-output/ is shared read-write. --tb=native: pytest's
# own traceback formatting parses source with ast, and CPython 3.11 raised "AST constructor
# recursion depth mismatch" there, an INTERNALERROR that ended a 6.12 run after 44 tests.
timeout "${GUEST_PYTEST_TIMEOUT_S:-7200}" .venv/bin/pytest -p no:cacheprovider -rA -v \
    -o timeout=900 --tb=native --junitxml="$out/junit.xml" "$@" > "$out/pytest.log" 2>&1
rc=$?
step "pytest exit $rc: $(tail -n 1 "$out/pytest.log")"
kill "$watcher" 2>/dev/null
echo "$rc" > "$out/rc"
