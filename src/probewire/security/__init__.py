"""Security monitoring: a process tree, exec and connection rules decided partly in the kernel,
alerts joined to the service that spawned them, optional SIGKILL at exec. See docs/security.md."""
