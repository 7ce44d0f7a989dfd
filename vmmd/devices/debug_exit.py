"""QEMU-compatible isa-debug-exit: a guest write ends the VM with a status derived from the value.

Mirrors QEMU hw/misc/debugexit.c: default iobase 0x501, iosize 2; any write of
value v (1..4 bytes starting in the range; bytes past its end are cut off, as QEMU's
memory core does) ends the VM with status
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
# Ports the bus hands to the device: the range plus 3, so that any 1..4-byte access starting in the range reaches
# it. QEMU's memory core cuts an access that runs past a region's end down to the part inside (flatview_translate,
# memory_access_size with valid.max_access_size 4): `outl 0x501, v` ends the VM with the low 2 bytes of v. The
# device keeps only the bytes inside its iosize, the same cut.
DEBUG_EXIT_DECODE = DEBUG_EXIT_IOSIZE + 3


def debug_exit_status(value: int) -> int:
    """The status QEMU reports for a write of `value`: (value << 1) | 1."""
    return (value << 1) | 1


class DebugExit:
    """Plug into a PortBus with `bus.insert(DebugExit(), DEBUG_EXIT_PORT, DEBUG_EXIT_DECODE)`."""

    def __init__(self, iosize: int = DEBUG_EXIT_IOSIZE) -> None:
        self.iosize = iosize

    def read(self, offset: int, size: int) -> int:
        return 0  # QEMU debug_exit_read

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= self.iosize:
            return  # past the device's ports: nothing there
        value &= (1 << (8 * min(size, self.iosize - offset))) - 1  # the part of the access inside the range
        status = debug_exit_status(value)
        exit_code = ExitCode.SUCCESS if value == 0 else ExitCode.GUEST_FAILURE
        meaning = "success" if value == 0 else f"the guest reports a failure (QEMU would exit with status {status})"
        raise VmStop("debug-exit", f"guest wrote {value:#x} to the debug-exit port: {meaning}", exit_code,
                     status=status)
