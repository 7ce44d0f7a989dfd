"""vmmd-testdev: one 4 KiB MMIO scratch page that remembers what the guest wrote.

Mapped at vmmd.machine.layout.MMIO_TESTDEV_GPA (MMIO_TESTDEV_SIZE bytes). A read
of 1..8 bytes at any offset returns the bytes last written there, little-endian,
initially zero; overlapping and unaligned accesses see each other byte by byte,
like RAM. It exists so the GHCB self-test guest can check MMIO read/write events
(SVM_VMGEXIT_MMIO_READ / _WRITE) end to end, and `reads` / `writes` count what
arrived. The bus refuses accesses running past the page; anything else out of
range that still reaches the device (a bus bug) reads as all ones and is not
stored, and is counted in `refused`.
"""

from __future__ import annotations

from vmmd.machine.layout import MMIO_TESTDEV_SIZE

MAX_ACCESS = 8


class TestDev:
    """Plug into an MmioBus with `bus.insert(TestDev(), MMIO_TESTDEV_GPA, MMIO_TESTDEV_SIZE)`."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, size: int = MMIO_TESTDEV_SIZE) -> None:
        self.size = size
        self.mem = bytearray(size)
        self.reads = 0
        self.writes = 0
        self.refused = 0

    def _in_range(self, offset: int, size: int) -> bool:
        return 0 < size <= MAX_ACCESS and 0 <= offset and offset + size <= self.size

    def read(self, offset: int, size: int) -> int:
        if not self._in_range(offset, size):
            self.refused += 1
            return (1 << (8 * size)) - 1 if 0 < size <= MAX_ACCESS else 0
        self.reads += 1
        return int.from_bytes(self.mem[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if not self._in_range(offset, size):
            self.refused += 1
            return
        self.writes += 1
        self.mem[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
