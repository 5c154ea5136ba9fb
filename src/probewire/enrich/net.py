"""Socket addresses as the kernel records them (16 bytes, family-tagged) -> label strings."""

from __future__ import annotations

import ipaddress
import socket

import numpy as np


def format_address(family: int, raw: np.ndarray | bytes) -> str:
    """IPv4 from the first 4 bytes; IPv6 in full, shown as IPv4 when it is v4-mapped."""
    data = bytes(raw)
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(data[:4]))
    if family == socket.AF_INET6:
        addr = ipaddress.IPv6Address(data)
        return str(addr.ipv4_mapped or addr)
    return ""
