"""The hardware-reduced ACPI sleep control and status registers (ACPI 6.5, 4.8.3.7 and 4.8.3.8) that the FADT
of Linux guests points at (vmmd/machine/acpi.py): writing SLP_EN with SLP_TYP = 5 (\\_S5, soft off) is how the
guest powers off (ACPICA acpi_hw_extended_sleep()), and it ends the VM cleanly, exit code 0. Other sleep
states are not entered: the write changes nothing, as on a machine that cannot sleep."""

from __future__ import annotations

from vmmd.errors import ExitCode, VmStop
from vmmd.machine.layout import SLEEP_TYPE_S5

SLP_EN = 1 << 5
SLP_TYP_SHIFT, SLP_TYP_MASK = 2, 0x7


class AcpiSleep:
    """Two ports: `bus.insert(AcpiSleep(), SLEEP_CONTROL_PORT, 2)`; offset 0 control, offset 1 status."""

    def __init__(self) -> None:
        self.ignored_requests = 0

    def read(self, offset: int, size: int) -> int:
        return 0  # status: WAK_STS clear; control reads as 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or not value & SLP_EN:
            return
        if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLEEP_TYPE_S5:
            raise VmStop("poweroff", "the guest powered off (ACPI S5)", ExitCode.SUCCESS)
        self.ignored_requests += 1
