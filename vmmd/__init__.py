"""vmmd: a userspace virtual machine monitor on Linux KVM for AMD SEV-ES guests."""

__version__ = "0.1.0"
