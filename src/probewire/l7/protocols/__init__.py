"""Protocol plug-ins: one module per protocol, each defining ``PROTOCOL``.

Adding a protocol: its module here, its kernel classifier bpf/l7/proto_<name>.h, and one line
in MODULES (and one dispatch slot on the kernel side).
"""

from __future__ import annotations

import importlib

from probewire.l7.protocol import Protocol

MODULES = ("postgresql", "mysql", "redis", "memcached", "dns")


def load() -> tuple[Protocol, ...]:
    """The registered protocols, in MODULES order."""
    out = []
    for name in MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        proto = module.PROTOCOL
        if not isinstance(proto, Protocol):
            raise TypeError(f"{module.__name__}.PROTOCOL is not a Protocol")
        out.append(proto)
    return tuple(out)
