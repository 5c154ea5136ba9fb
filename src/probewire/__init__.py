"""probewire: zero-instrumentation eBPF observability agent."""

__version__ = "0.1.0"
