"""Protocol plug-ins: one module per protocol, each defining ``PROTOCOL``.

Adding a protocol: its module here, its kernel classifier bpf/l7/proto_<name>.h, and one line
in l7/registry.py PROTOCOLS (and one in L7_PROTOCOLS, bpf/l7.bpf.c); docs/ARCHITECTURE.md §5.
"""
