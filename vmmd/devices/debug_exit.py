"""QEMU-compatible isa-debug-exit: a guest write ends the VM with a status derived from the value.

Mirrors QEMU hw/misc/debugexit.c: default iobase 0x501, iosize 2; any write of
value v (1..4 bytes, at any offset in the range) ends the VM with status
(v << 1) | 1 (debug_exit_write -> qemu_system_shutdown_request_with_code), so a
guest can never produce status 0; reads return 0 (debug_exit_read).

vmmd raises VmStop("debug-exit", ...) carrying that status; the process exit code
is ExitCode.SUCCESS when v == 0 and ExitCode.GUEST_FAILURE otherwise (README
"exit status"), so `vmctl run` tells pass from fail without the shift arithmetic
test scripts need under QEMU. The status itself is kept whole (QEMU's process
status keeps only its low 8 bits).
"""

from __future__ import annotations

from vmmd.errors import ExitCode, VmStop

DEBUG_EXIT_IOSIZE = 2  # QEMU debug_exit_properties: iosize default 0x02


def debug_exit_status(value: int) -> int:
    """The status QEMU reports for a write of `value`: (value << 1) | 1."""
    return (value << 1) | 1


class DebugExit:
    """Plug into a PortBus with `bus.insert(DebugExit(), DEBUG_EXIT_PORT, DEBUG_EXIT_IOSIZE)`."""

    def read(self, offset: int, size: int) -> int:
        return 0  # QEMU debug_exit_read

    def write(self, offset: int, size: int, value: int) -> None:
        status = debug_exit_status(value)
        exit_code = ExitCode.SUCCESS if value == 0 else ExitCode.GUEST_FAILURE
        raise VmStop("debug-exit", f"guest wrote {value:#x} to the debug-exit port (status {status})",
                     exit_code, status=status)
