"""Shared test helpers (import as `support`, e.g. `from support.netns import two_hosts`)."""
