"""The two ways a PC guest resets itself: the i8042 keyboard controller's pulse-reset command and the reset
control register at port 0xCF9. vmmd does not restart guests: a reset ends the VM as "the guest rebooted"
(ExitCode.GUEST_REBOOT), which is what Linux's `reboot=k` (and its default reboot path) and `reboot=p`/`=e`
end in.

i8042 (ports 0x60 data, 0x64 status/command), the controller only, with no keyboard or mouse behind it, as
Firecracker's devices/legacy/i8042.rs and QEMU hw/input/pckbd.c model it: the controller command byte (0x20
read / 0x60 write), self-test 0xAA -> 0x55, interface tests 0xAB/0xA9 -> 0x00, the output port (0xD0
read / 0xD1 write, bit 0 clear = reset), and the pulse commands 0xF0..0xFE with bit 0 clear, which pulse the
reset line (Linux's native_machine_emergency_restart() writes 0xFE for BOOT_KBD). Bytes for the keyboard
itself are dropped: no device answers, as on a PC without one.

Port 0xCF9 (Intel PIIX/ICH reset control register, QEMU hw/isa/piix.c rcr_write): a write with bit 2 (RST_CPU)
set resets; Linux writes 0x02 then 0x06 for BOOT_CF9_FORCE.
"""

from __future__ import annotations

from vmmd.errors import ExitCode, VmStop

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # 0x60..0x64: the bus maps 5 ports and the device ignores 0x61..0x63
RESET_CONTROL_PORT = 0xCF9

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM_FLAG = 0x04  # set once the self-test passed (it has, at power-on, on every PC)
STATUS_LAST_WAS_COMMAND = 0x08
STATUS_UNLOCKED = 0x10

CMD_READ_CTR, CMD_WRITE_CTR = 0x20, 0x60
CMD_AUX_TEST, CMD_SELF_TEST, CMD_KBD_TEST = 0xA9, 0xAA, 0xAB
CMD_READ_OUTPUT_PORT, CMD_WRITE_OUTPUT_PORT = 0xD0, 0xD1
SELF_TEST_OK = 0x55
OUTPUT_PORT_RESET_DEASSERTED = 0x01  # bit 0 of the output port: 0 holds the CPU in reset
RCR_RST_CPU = 0x04


def _reboot(how: str) -> VmStop:
    return VmStop("reboot", f"the guest rebooted ({how}); vmmd does not restart guests", ExitCode.GUEST_REBOOT)


class I8042:
    """Plug into a PortBus with `bus.insert(I8042(), I8042_DATA_PORT, 5)`; offsets 0 (data) and 4 (command)."""

    def __init__(self) -> None:
        self.command_byte = 0x45  # keyboard interrupt on, system flag, scancode translation (QEMU's reset value)
        self.output_port = OUTPUT_PORT_RESET_DEASSERTED | 0x02  # A20 on
        self.output: int | None = None
        self.pending: int | None = None  # a command waiting for its data byte
        self.status_flags = STATUS_SYSTEM_FLAG | STATUS_UNLOCKED
        self.dropped_device_bytes = 0

    def read(self, offset: int, size: int) -> int:
        if offset == 4:
            return self.status_flags | (STATUS_OUTPUT_FULL if self.output is not None else 0)
        if offset == 0:
            value, self.output = self.output, None
            return 0 if value is None else value
        return 0xFF  # 0x61..0x63 are not the controller's (0x61 is the PIT's, in the kernel when it has one)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 4:
            self.status_flags |= STATUS_LAST_WAS_COMMAND
            self._command(value)
        elif offset == 0:
            self.status_flags &= ~STATUS_LAST_WAS_COMMAND
            command, self.pending = self.pending, None
            if command == CMD_WRITE_CTR:
                self.command_byte = value
            elif command == CMD_WRITE_OUTPUT_PORT:
                self.output_port = value
                if not value & OUTPUT_PORT_RESET_DEASSERTED:
                    raise _reboot("i8042 output port reset line")
            else:
                self.dropped_device_bytes += 1  # for the keyboard, which is not there

    def _command(self, command: int) -> None:
        self.pending = None
        if command == CMD_READ_CTR:
            self.output = self.command_byte
        elif command in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT):
            self.pending = command
        elif command == CMD_SELF_TEST:
            self.output = SELF_TEST_OK
        elif command in (CMD_KBD_TEST, CMD_AUX_TEST):
            self.output = 0x00
        elif command == CMD_READ_OUTPUT_PORT:
            self.output = self.output_port
        elif command >= 0xF0 and not command & 1:  # pulse output lines low; bit 0 is the reset line (0xFE)
            raise _reboot("i8042 reset command, reboot=k")
        # other commands (enable/disable a port, ...) change nothing a guest without devices could see


class ResetControl:
    """Port 0xCF9 (1 byte): `bus.insert(ResetControl(), RESET_CONTROL_PORT, 1)`."""

    def __init__(self) -> None:
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.value = value & 0x0E
        if value & RCR_RST_CPU:
            raise _reboot("reset control register 0xCF9, reboot=p")
