"""Error types shared by every layer, and the documented process exit codes.

`VmmdError` is what the host side raises for a problem a user can fix (missing
/dev/kvm, bad configuration, firmware too large ...). `VmStop` is raised from
inside exit handling (devices, the VMGEXIT service) to end the guest cleanly
with a reason; the run loop catches it. Neither is ever allowed to escape the
run loop as a traceback.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit status of `vmctl run` (documented in README.md)."""

    SUCCESS = 0  # guest wrote 0 to the debug-exit port
    GUEST_FAILURE = 1  # guest wrote a non-zero value to the debug-exit port
    USAGE = 2  # bad command line (click's own code)
    HOST_ERROR = 3  # host or configuration problem: nothing ran
    GUEST_CRASH = 4  # triple fault, internal error, failed entry, unknown exit, protocol violation
    GUEST_TERMINATED = 5  # guest sent a GHCB / SEV termination request
    TIMEOUT = 6  # --timeout reached, VM stopped
    GUEST_HALTED = 7  # guest executed HLT with nothing left to wake it
    VMM_ERROR = 8  # a bug in vmmd stopped the VM (the message says where); please report it
    GUEST_REBOOT = 9  # the guest reset itself (i8042 / 0xCF9 reset; a Linux guest's triple fault): not restarted
    INTERRUPTED = 130  # SIGINT / SIGTERM


class VmmdError(Exception):
    """A host-side error with a message that says what to do about it."""

    exit_code: ExitCode = ExitCode.HOST_ERROR

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class GuestMemoryError(VmmdError):
    """A guest-physical range that is not wholly inside one RAM slot."""


class VmStop(Exception):
    """Raised while handling an exit to end the VM with a reason.

    `kind` is a short machine-readable word (debug-exit, halt, shutdown,
    internal-error, fail-entry, unknown-exit, sev-term, ghcb-violation,
    timeout, interrupted); `status` is the guest-visible status where one exists
    (debug-exit: (value << 1) | 1, as QEMU's isa-debug-exit reports it).
    """

    def __init__(self, kind: str, reason: str, exit_code: ExitCode, status: int | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.exit_code = exit_code
        self.status = status
