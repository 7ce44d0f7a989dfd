"""The MC146818 CMOS real-time clock and NVRAM at ports 0x70 (index; bit 7 masks NMI) and 0x71 (data).

Enough for a kernel not to hang or guess: the time (the host's UTC, read at each access) in BCD with the
24-hour bit set in status B, status A with update-in-progress clear (Linux's mach_get_cmos_time() waits
while UIP is set, and an unmapped port reads 0xFF, which has it set), status D "valid RAM", and the memory
sizes a PC BIOS stores (offsets as QEMU hw/i386/pc.c pc_cmos_init(): 0x15/0x16 base memory, 0x17/0x18 and
0x30/0x31 extended memory in KiB, 0x34/0x35 memory above 16 MiB in 64 KiB units, 0x5B..0x5D memory above
4 GiB in 64 KiB units). Other bytes are NVRAM the guest may write; no alarm or periodic interrupt is raised.
"""

from __future__ import annotations

import time

CMOS_INDEX_PORT = 0x70  # 2 ports
RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK = 0x00, 0x02, 0x04, 0x06
RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR, RTC_CENTURY = 0x07, 0x08, 0x09, 0x32
RTC_REG_A, RTC_REG_B, RTC_REG_C, RTC_REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_A_DIVIDER_32KHZ = 0x26  # 32.768 kHz time base, 1024 Hz rate; bit 7 (UIP) clear
REG_B_24H = 0x02
REG_D_VALID_RAM = 0x80


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class Cmos:
    """Plug into a PortBus with `bus.insert(Cmos(memory_bytes), CMOS_INDEX_PORT, 2)`."""

    def __init__(self, ram_below_4g: int = 0, ram_above_4g: int = 0, clock=time.gmtime) -> None:
        self.clock = clock
        self.index = 0
        self.nvram = bytearray(128)
        self.nvram[RTC_REG_A] = REG_A_DIVIDER_32KHZ
        self.nvram[RTC_REG_B] = REG_B_24H
        self.nvram[RTC_REG_D] = REG_D_VALID_RAM
        self._store16(0x15, 640)
        extended_kib = min(max(ram_below_4g - (1 << 20), 0) >> 10, 0xFFFF)
        self._store16(0x17, extended_kib)
        self._store16(0x30, extended_kib)
        self._store16(0x34, min(max(ram_below_4g - (16 << 20), 0) >> 16, 0xFFFF))
        above = min(ram_above_4g >> 16, 0xFF_FFFF)
        self.nvram[0x5B:0x5E] = above.to_bytes(3, "little")

    def _store16(self, offset: int, value: int) -> None:
        self.nvram[offset:offset + 2] = value.to_bytes(2, "little")

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index register is write-only
        index = self.index
        if index in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR,
                     RTC_CENTURY):
            now = self.clock()
            value = {RTC_SECONDS: min(now.tm_sec, 59), RTC_MINUTES: now.tm_min, RTC_HOURS: now.tm_hour,
                     RTC_DAY_OF_WEEK: (now.tm_wday + 1) % 7 + 1, RTC_DAY_OF_MONTH: now.tm_mday,
                     RTC_MONTH: now.tm_mon, RTC_YEAR: now.tm_year % 100, RTC_CENTURY: now.tm_year // 100}[index]
            return value if self.nvram[RTC_REG_B] & 0x04 else _bcd(value)  # status B bit 2: binary mode
        if index == RTC_REG_C:
            return 0  # no interrupt flags: nothing is ever pending
        return self.nvram[index]

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F  # bit 7 is the NMI mask, not part of the index
        elif self.index not in (RTC_REG_C, RTC_REG_D):  # read-only status registers
            if self.index == RTC_REG_A:
                value &= 0x7F  # UIP is read-only
            self.nvram[self.index] = value & 0xFF
