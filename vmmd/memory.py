"""Guest RAM: one anonymous mmap per KVM memory slot, seen from Python as numpy views.

Owns the guest-physical address map. Every gpa -> host translation goes through
`GuestMemory.view()`, which refuses any range that is not wholly inside one
slot: a guest-supplied address can never make the VMM touch host memory
outside the guest's own mappings.

Layout follows QEMU's pc machine: RAM below the 32-bit PCI hole (which starts at
3 GiB), the rest from 4 GiB up.

numpy is imported on the first `view()` (or `MemorySlot.array`), not with this module:
`read`, `write`, `read_u64` and `write_u64` go through the mmap itself, and `buffer()` hands
out the same bounds-checked, zero-copy window as a plain memoryview, so code on the start
path of every `vmctl run` (the loader, the GHCB service, the emulated launch) never pays
numpy's ~30-90 ms import (docs/benchmarks.md, scripts/bench/startup.py).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmmd.errors import GuestMemoryError

if TYPE_CHECKING:
    import numpy as np

PAGE_SIZE = 4096
PCI_HOLE_START_GPA = 0xC000_0000  # 3 GiB, as QEMU pc's below_4g_mem_size limit
FOUR_GIB_GPA = 0x1_0000_0000
MIN_MEMORY_BYTES = 2 * 1024 * 1024  # room for page tables, boot info, stacks and firmware


@dataclass
class MemorySlot:
    """One KVM memory slot backed by its own anonymous mapping."""

    slot: int
    gpa: int
    size: int
    mapping: mmap.mmap
    hva: int  # host virtual address of the mapping's first byte
    read_only: bool = False
    _array: np.ndarray | None = field(default=None, repr=False)
    _bytes: memoryview | None = field(default=None, repr=False)

    @property
    def bytes_view(self) -> memoryview:
        """Writable unsigned-byte memoryview of `mapping`, zero-copy (no numpy)."""
        if self._bytes is None:
            self._bytes = memoryview(self.mapping)
        return self._bytes

    @property
    def array(self) -> np.ndarray:
        """uint8 view of `mapping`, zero-copy; built (and numpy imported) on first use."""
        if self._array is None:
            import numpy

            self._array = numpy.frombuffer(self.mapping, dtype=numpy.uint8)
        return self._array

    @property
    def end_gpa(self) -> int:
        return self.gpa + self.size


def ram_layout(memory_bytes: int) -> list[tuple[int, int]]:
    """(gpa, size) ranges of guest RAM: below the PCI hole, then above 4 GiB."""
    below = min(memory_bytes, PCI_HOLE_START_GPA)
    ranges = [(0, below)]
    if memory_bytes > below:
        ranges.append((FOUR_GIB_GPA, memory_bytes - below))
    return ranges


class GuestMemory:
    """The guest-physical address space: RAM slots (and ROM slots) with bounds-checked access."""

    def __init__(self) -> None:
        self.slots: list[MemorySlot] = []
        self._starts: list[int] = []

    @classmethod
    def with_ram(cls, memory_bytes: int) -> GuestMemory:
        if memory_bytes % PAGE_SIZE:
            raise GuestMemoryError(f"memory size {memory_bytes} is not a multiple of 4 KiB")
        if memory_bytes < MIN_MEMORY_BYTES:
            raise GuestMemoryError(f"memory size {memory_bytes} is below the minimum of {MIN_MEMORY_BYTES >> 20} MiB")
        memory = cls()
        for gpa, size in ram_layout(memory_bytes):
            memory.add_slot(gpa, size)
        return memory

    def add_slot(self, gpa: int, size: int, read_only: bool = False) -> MemorySlot:
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise GuestMemoryError(f"slot at {gpa:#x} size {size:#x} is empty or not page aligned")
        for other in self.slots:
            if gpa < other.end_gpa and other.gpa < gpa + size:
                raise GuestMemoryError(f"slot at {gpa:#x} size {size:#x} overlaps slot {other.slot} at {other.gpa:#x}")
        try:
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError) as err:
            why = getattr(err, "strerror", None) or str(err)
            raise GuestMemoryError(f"cannot reserve {size >> 20} MiB of guest memory at {gpa:#x}: {why} (give the "
                                   "guest less memory, or check ulimit -v and vm.overcommit_memory)") from None
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:  # first-touch loads ~4.6x faster with THP (measured on these hosts)
                mapping.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        hva = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        slot = MemorySlot(len(self.slots), gpa, size, mapping, hva, read_only)
        index = bisect.bisect(self._starts, gpa)
        self._starts.insert(index, gpa)
        self.slots.insert(index, slot)
        return slot

    @property
    def ram_bytes(self) -> int:
        return sum(s.size for s in self.slots if not s.read_only)

    def ranges(self) -> list[tuple[int, int]]:
        return [(s.gpa, s.size) for s in self.slots]

    def _slot_for(self, gpa: int, size: int) -> MemorySlot:
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index >= 0 and size >= 0:
            slot = self.slots[index]
            if gpa >= slot.gpa and gpa + size <= slot.end_gpa:
                return slot
        raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is not inside guest RAM")

    def contains(self, gpa: int, size: int) -> bool:
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index < 0 or size < 0:
            return False
        slot = self.slots[index]
        return gpa >= slot.gpa and gpa + size <= slot.end_gpa

    def hva(self, gpa: int, size: int) -> int:
        """The host virtual address of guest range [gpa, gpa+size) (for kernel interfaces that take one, such as
        vhost); GuestMemoryError unless inside one slot."""
        slot = self._slot_for(gpa, size)
        return slot.hva + (gpa - slot.gpa)

    def view(self, gpa: int, size: int) -> np.ndarray:
        """A writable uint8 view of [gpa, gpa+size); GuestMemoryError unless inside one slot."""
        slot = self._slot_for(gpa, size)
        offset = gpa - slot.gpa
        return slot.array[offset:offset + size]

    def buffer(self, gpa: int, size: int) -> memoryview:
        """The same window as `view()` as a writable memoryview of unsigned bytes (format "B"), without numpy;
        GuestMemoryError unless [gpa, gpa+size) is inside one slot."""
        slot = self._slot_for(gpa, size)
        offset = gpa - slot.gpa
        return slot.bytes_view[offset:offset + size]

    def read(self, gpa: int, size: int) -> bytes:
        slot = self._slot_for(gpa, size)
        offset = gpa - slot.gpa
        return slot.mapping[offset:offset + size]

    def write(self, gpa: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        payload = memoryview(data)
        if not payload.c_contiguous:  # e.g. a strided numpy view: let numpy gather it
            import numpy

            payload = memoryview(numpy.ascontiguousarray(data))
        payload = payload.cast("B")
        slot = self._slot_for(gpa, payload.nbytes)
        offset = gpa - slot.gpa
        slot.mapping[offset:offset + payload.nbytes] = payload

    def read_u64(self, gpa: int) -> int:
        slot = self._slot_for(gpa, 8)
        offset = gpa - slot.gpa
        return int.from_bytes(slot.mapping[offset:offset + 8], "little")

    def write_u64(self, gpa: int, value: int) -> None:
        slot = self._slot_for(gpa, 8)
        offset = gpa - slot.gpa
        slot.mapping[offset:offset + 8] = (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")

    def close(self) -> None:
        for slot in self.slots:
            slot._array = None
            if slot._bytes is not None:
                slot._bytes.release()  # views sliced from it keep the mapping until they go, as numpy views do
                slot._bytes = None
        for slot in self.slots:
            try:
                slot.mapping.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes when it does
        self.slots.clear()
        self._starts.clear()
