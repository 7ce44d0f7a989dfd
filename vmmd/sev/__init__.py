"""SEV / SEV-ES: GHCB protocol codec (ghcb), the userspace VMGEXIT service (vmgexit), launch and measurement."""
