#!/usr/bin/env bash
# Downloads and unpacks the Debian kernels of the test matrix into the kernel cache.
#
#   scripts/kernels/fetch.sh [--refresh] [SUITE...]      (default: every suite in kernels.list)
#
# Each suite has its own apt sources list, package lists and archive cache under the cache dir
# (apt's -o Dir::Etc::SourceList/-o Dir::State::Lists): the system's sources and lists are never
# read or changed. The kernel is the one Debian's `linux-image-amd64` of that suite depends on
# today; it is unpacked (dpkg-deb -x) to <cache>/<suite>/root/{boot,lib/modules} and its
# modules.dep generated with depmod, so scripts/kernels/matrix.py can boot it. A suite already
# unpacked is reused unless --refresh is given: the matrix runs offline once fetched.
# Prints one line per suite: "<suite> <kernel release> <vmlinuz path>".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

CACHE=${PROBEWIRE_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/probewire/kernels}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org}

refresh=0
suites=()
for arg in "$@"; do
    case $arg in
        --refresh) refresh=1 ;;
        -*) echo "fetch.sh: unknown option $arg" >&2; exit 2 ;;
        *) suites+=("$arg") ;;
    esac
done
if [ ${#suites[@]} -eq 0 ]; then
    mapfile -t suites < <(awk '!/^#/ && NF {print $1}' kernels.list)
fi

log() { echo "fetch: $*" >&2; }

fetch_suite() {
    local suite=$1 dir=$CACHE/$1
    local root=$dir/root
    if [ $refresh = 0 ] && [ -f "$dir/release" ] && [ -f "$root/boot/vmlinuz-$(cat "$dir/release")" ]; then
        echo "$suite $(cat "$dir/release") $root/boot/vmlinuz-$(cat "$dir/release")"
        return
    fi
    grep -q "^$suite[[:space:]]" kernels.list \
        || { echo "fetch.sh: suite $suite is not in scripts/kernels/kernels.list" >&2; exit 2; }
    mkdir -p "$dir/lists/partial" "$dir/archives/partial"
    # The suite and its security updates: a point release may lag the newest kernel.
    {
        echo "deb [signed-by=$KEYRING] $MIRROR/debian $suite main"
        echo "deb [signed-by=$KEYRING] $MIRROR/debian-security $suite-security main"
    } > "$dir/sources.list"
    local apt=(-q -o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
               -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
               -o "Dir::Cache::archives=$dir/archives" -o APT::Sandbox::User=root)
    log "$suite: updating its package lists"
    apt-get "${apt[@]}" update >&2
    # linux-image-amd64 (the meta package) depends on exactly one versioned kernel package.
    local pkg
    pkg=$(apt-cache "${apt[@]}" depends linux-image-amd64 \
          | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "fetch.sh: no kernel package found for $suite" >&2; exit 1; }
    log "$suite: downloading $pkg"
    rm -f "$dir"/*.deb
    (cd "$dir" && apt-get "${apt[@]}" download "$pkg" >&2)
    local deb
    deb=$(ls "$dir"/*.deb)
    log "$suite: unpacking $(basename "$deb")"
    rm -rf "$root"
    mkdir -p "$root"
    dpkg-deb -x "$deb" "$root"
    # trixie's packages are merged-/usr (/usr/lib/modules); depmod and the boot look in /lib.
    if [ ! -e "$root/lib" ] && [ -d "$root/usr/lib" ]; then
        ln -s usr/lib "$root/lib"
    fi
    local release
    release=$(basename "$(ls -d "$root"/lib/modules/*/)")
    # The package's postinst would run depmod; modprobe (also the kernel's own request_module)
    # needs modules.dep to load the modules tests pull in (veth, nf_tables, sch_htb, ...).
    depmod -b "$root" "$release"
    rm -f "$deb"
    echo "$release" > "$dir/release"
    echo "$suite $release $root/boot/vmlinuz-$release"
}

for suite in "${suites[@]}"; do
    fetch_suite "$suite"
done
