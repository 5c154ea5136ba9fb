"""Enumerators of the running kernel's anonymous enums, read from its BTF: the saturation
family reads ListenOverflows/ListenDrops at these positions of the per-CPU struct linux_mib,
which move between kernels (6.1: 19/20, 6.18: 23/24). /proc/net/netstat prints the TcpExt
counters in the kernel's snmp4_net_list order, which follows the enum: the two must agree."""

from __future__ import annotations

from pathlib import Path

from probewire.probes.saturation import listen_mib_positions
from probewire.runtime.features import kernel_enumerators


def test_listen_counters_positions_match_the_order_proc_net_netstat_prints() -> None:
    header = Path("/proc/net/netstat").read_text().splitlines()[0].split()
    assert header[0] == "TcpExt:"
    # LINUX_MIB_NUM (0) is not printed: the first name is enumerator 1.
    expected = {"mib_listen_overflows": header.index("ListenOverflows"),
                "mib_listen_drops": header.index("ListenDrops")}
    assert listen_mib_positions() == expected


def test_an_enumerator_the_kernel_lacks_is_left_out() -> None:
    found = kernel_enumerators(["LINUX_MIB_LISTENDROPS", "NO_SUCH_ENUMERATOR_PROBEWIRE"])
    assert set(found) == {"LINUX_MIB_LISTENDROPS"}
