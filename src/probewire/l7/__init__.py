"""The L7 capture layer's user-space half: connection streams in, exchanges out.

The kernel (bpf/l7/) classifies each connection's protocol from its first bytes and hands its
data to that protocol's kernel parser; what crosses to user space is either a finished exchange
(HTTP/1.x, counted in the kernel where it can be) or the connection's bytes, which a protocol
plug-in (l7/protocols/<name>.py) parses into exchanges. See docs/ARCHITECTURE.md.
"""
