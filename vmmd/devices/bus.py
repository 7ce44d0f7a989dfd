"""Address buses for port I/O and MMIO that refuse overlapping ranges.

Modelled on Firecracker's vstate/bus.rs and kvmtool's mmio.c: `insert(device,
base, length)` rejects empty or overlapping ranges; a device is handed the
offset into its own range, never the absolute address. Reads of unmapped
addresses return all ones, as an ISA bus with nothing driving it does; writes
there are dropped and counted. So are accesses that straddle a range's end and
accesses whose size is outside 1..8 (a guest-given GHCB length never reaches a
device unchecked).

Both buses serve KVM_EXIT_IO / KVM_EXIT_MMIO and the GHCB IOIO / MMIO events, so
a device behaves the same whichever way the guest reached it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from functools import partial
from typing import Protocol

from vmmd.errors import VmmdError


class Device(Protocol):
    """What a bus calls. `size` is 1, 2, 4 (ports) or 1..8 (MMIO); values are little-endian ints."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(VmmdError):
    """A device registration that would overlap another or is empty."""


MAX_ACCESS = 8  # widest access a bus passes on (MMIO up to 8 bytes; GHCB v2 MMIO length <= 8)
_ONES = tuple((1 << (8 * n)) - 1 for n in range(MAX_ACCESS + 1))


def all_ones(size: int) -> int:
    """All ones in `size` bytes; 0 for a size outside 0..8 (never build a huge int from a guest-given size)."""
    return _ONES[size] if 0 <= size <= MAX_ACCESS else 0


class Bus:
    """Ranges [base, base+length) mapped to devices; lookups by bisection."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit  # one past the highest address (0x10000 for ports)
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, Device]] = []  # (base, end, device), sorted by base
        self.unmapped_reads = 0
        self.unmapped_writes = 0

    def insert(self, device: Device, base: int, length: int) -> None:
        end = base + length
        if length <= 0 or base < 0 or end > self.limit:
            raise BusError(f"{self.name} bus: range {base:#x}+{length:#x} is empty or outside 0..{self.limit:#x}")
        for other_base, other_end, other in self._entries:
            if base < other_end and other_base < end:
                raise BusError(f"{self.name} bus: {type(device).__name__} at {base:#x}+{length:#x} overlaps "
                               f"{type(other).__name__} at {other_base:#x}..{other_end:#x}")
        index = bisect.bisect(self._bases, base)
        self._bases.insert(index, base)
        self._entries.insert(index, (base, end, device))

    def lookup(self, address: int, size: int) -> tuple[Device, int] | None:
        """(device, offset) owning the whole access [address, address+size), else None."""
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            base, end, device = self._entries[index]
            if address + size <= end:
                return device, address - base
        return None

    def read(self, address: int, size: int) -> int:
        found = self.lookup(address, size) if 0 < size <= MAX_ACCESS else None
        if found is None:
            self.unmapped_reads += 1
            return all_ones(size)
        device, offset = found
        return device.read(offset, size) & all_ones(size)

    def write(self, address: int, size: int, value: int) -> None:
        found = self.lookup(address, size) if 0 < size <= MAX_ACCESS else None
        if found is None:
            self.unmapped_writes += 1
            return
        device, offset = found
        device.write(offset, size, value & all_ones(size))

    def devices(self) -> list[tuple[int, int, Device]]:
        return list(self._entries)


class PortBus(Bus):
    """The 64 KiB x86 I/O port space, with a per-port table for the exit hot path."""

    def __init__(self) -> None:
        super().__init__("port I/O", 0x10000)
        self.by_port: dict[int, tuple[Device, int]] = {}
        self._handler_tables: list[dict] = []  # handed out by handler_table(); emptied when the map changes

    def insert(self, device: Device, base: int, length: int) -> None:
        super().insert(device, base, length)
        for port in range(base, base + length):
            self.by_port[port] = (device, base)
        for table in self._handler_tables:  # a resolved handler may now be the wrong device
            table.clear()

    # --- resolved one-byte handlers (the run loop's table for Vcpu.make_run) --------------------------
    def handler_table(self) -> dict:
        """An empty dict for a vCPU's resolved one-byte handlers; the bus empties it whenever a device is
        inserted, so nothing in it outlives the port map it was resolved from."""
        table: dict = {}
        self._handler_tables.append(table)
        return table

    def byte_writer(self, port: int) -> Callable[[int], None]:
        """What a one-byte OUT to `port` does, resolved once: handler(byte) == write(port, 1, byte)."""
        entry = self.by_port.get(port)
        if entry is None:
            return self._drop_byte
        device, base = entry
        return partial(device.write, port - base, 1)

    def byte_reader(self, port: int) -> Callable[[], int]:
        """What a one-byte IN from `port` returns, resolved once: handler() & 0xFF == read(port, 1)."""
        entry = self.by_port.get(port)
        if entry is None:
            return self._float_byte
        device, base = entry
        return partial(device.read, port - base, 1)

    def _drop_byte(self, value: int) -> None:
        self.unmapped_writes += 1

    def _float_byte(self) -> int:
        self.unmapped_reads += 1
        return 0xFF

    def write(self, address: int, size: int, value: int) -> None:
        # The port-I/O exit hot path (vmmd.machine.runloop.run_vcpu): Bus.write with the lookup inlined.
        entry = self.by_port.get(address)
        if entry is None:
            self.unmapped_writes += 1
            return
        if size == 1:
            device, base = entry
            device.write(address - base, 1, value & 0xFF)
            return
        Bus.write(self, address, size, value)

    def read(self, address: int, size: int) -> int:
        entry = self.by_port.get(address)
        if entry is None:
            self.unmapped_reads += 1
            return all_ones(size)
        if size == 1:
            device, base = entry
            return device.read(address - base, 1) & 0xFF
        return Bus.read(self, address, size)

    def lookup(self, address: int, size: int) -> tuple[Device, int] | None:
        entry = self.by_port.get(address)
        if entry is None:
            return None
        device, base = entry
        last = self.by_port.get(address + size - 1)
        if last is None or last[0] is not device or last[1] != base:
            return None  # access straddles the end of this range (even into another range of the same device)
        return device, address - base


class MmioBus(Bus):
    """The guest-physical MMIO space (addresses not backed by RAM)."""

    def __init__(self) -> None:
        super().__init__("MMIO", 1 << 52)
