"""Exit values decoded from kvm_run: what the vCPU stopped for, nothing more.

`Vcpu.run()` builds one of these per KVM_RUN; `vmmd.machine.runloop.handle_exit()`
dispatches on them. They carry plain ints so unit tests can build them directly.
Field meanings follow the kvm_run union members in include/uapi/linux/kvm.h.
"""

from __future__ import annotations


class Exit:
    __slots__ = ()
    name = "exit"


class IoExit(Exit):
    """KVM_EXIT_IO: `count` accesses of `size` bytes at `port`; data lives in kvm_run at `data_offset`."""

    __slots__ = ("is_write", "size", "port", "count", "data_offset")
    name = "io"

    def __init__(self, is_write: bool, size: int, port: int, count: int, data_offset: int) -> None:
        self.is_write = is_write
        self.size = size
        self.port = port
        self.count = count
        self.data_offset = data_offset


class MmioExit(Exit):
    """KVM_EXIT_MMIO: `length` bytes at `gpa`; `data` is the written value (writes only)."""

    __slots__ = ("gpa", "length", "is_write", "data")
    name = "mmio"

    def __init__(self, gpa: int, length: int, is_write: bool, data: int) -> None:
        self.gpa = gpa
        self.length = length
        self.is_write = is_write
        self.data = data


class MsrExit(Exit):
    """KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR (user-space MSR exits, KVM_CAP_X86_USER_SPACE_MSR)."""

    __slots__ = ("is_write", "index", "data", "reason")
    name = "msr"

    def __init__(self, is_write: bool, index: int, data: int, reason: int) -> None:
        self.is_write = is_write
        self.index = index
        self.data = data
        self.reason = reason


class HltExit(Exit):
    __slots__ = ()
    name = "hlt"


class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: triple fault (or an SEV-ES guest's shutdown intercept)."""

    __slots__ = ()
    name = "shutdown"


class FailEntryExit(Exit):
    __slots__ = ("hardware_entry_failure_reason", "cpu")
    name = "fail-entry"

    def __init__(self, hardware_entry_failure_reason: int, cpu: int) -> None:
        self.hardware_entry_failure_reason = hardware_entry_failure_reason
        self.cpu = cpu


class InternalErrorExit(Exit):
    __slots__ = ("suberror", "data")
    name = "internal-error"

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror = suberror
        self.data = data


class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT; type KVM_SYSTEM_EVENT_SEV_TERM carries the GHCB MSR or GHCB GPA in data[0]."""

    __slots__ = ("type", "data")
    name = "system-event"

    def __init__(self, type: int, data: tuple[int, ...]) -> None:  # noqa: A002 - the kernel's field name
        self.type = type
        self.data = data


class InterruptedExit(Exit):
    """KVM_RUN returned EINTR (a signal, or immediate_exit was set): the VMM asked for control back."""

    __slots__ = ()
    name = "interrupted"


class UnknownExit(Exit):
    __slots__ = ("exit_reason", "hardware_exit_reason")
    name = "unknown"

    def __init__(self, exit_reason: int, hardware_exit_reason: int = 0) -> None:
        self.exit_reason = exit_reason
        self.hardware_exit_reason = hardware_exit_reason


class RunFailedExit(Exit):
    """KVM_RUN itself failed with an errno other than EINTR (e.g. EINVAL for an SEV-ES guest's bad VMGEXIT)."""

    __slots__ = ("errno", "message")
    name = "run-failed"

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        self.message = message


INTERRUPTED = InterruptedExit()
HLT = HltExit()
SHUTDOWN = ShutdownExit()
