"""PortBus / MmioBus: overlap-checked registration, offsets, unmapped and straddling accesses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmd.devices.bus import BusError, MmioBus, PortBus, all_ones
from vmmd.devices.testdev import TestDev


class Recorder:
    """A device that answers offset-derived values and records every access."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return 0x1122334455667788 + offset  # wider than any access: the bus must mask it

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))


@pytest.fixture(params=[PortBus, MmioBus])
def bus(request):
    return request.param()


def test_overlap_refused(bus) -> None:
    bus.insert(Recorder(), 0x100, 8)
    for base, length in [(0x100, 8), (0xFC, 5), (0x107, 1), (0x0FF, 0x20), (0x104, 2)]:
        with pytest.raises(BusError, match="overlaps"):
            bus.insert(Recorder(), base, length)
    bus.insert(Recorder(), 0xF8, 8)  # touching ranges are fine on both sides
    bus.insert(Recorder(), 0x108, 1)
    assert [(b, e) for b, e, _ in bus.devices()] == [(0xF8, 0x100), (0x100, 0x108), (0x108, 0x109)]


@pytest.mark.parametrize("base,length", [(0x10, 0), (0x10, -4), (-1, 4)])
def test_empty_or_negative_range_refused(bus, base, length) -> None:
    with pytest.raises(BusError):
        bus.insert(Recorder(), base, length)
    assert bus.devices() == []


def test_port_range_limit() -> None:
    bus = PortBus()
    with pytest.raises(BusError):
        bus.insert(Recorder(), 0xFFFC, 8)
    bus.insert(Recorder(), 0xFFF8, 8)


def test_offsets_handed_to_device(bus) -> None:
    dev = Recorder()
    bus.insert(dev, 0x3F8, 8)
    assert bus.read(0x3F8, 1) == 0x88
    assert bus.read(0x3FD, 2) == (0x1122334455667788 + 5) & 0xFFFF
    bus.write(0x3FF, 1, 0x1FF)  # value masked to the access size
    bus.write(0x3FA, 4, 0xAABBCCDD)
    assert dev.log == [("r", 0, 1), ("r", 5, 2), ("w", 7, 1, 0xFF), ("w", 2, 4, 0xAABBCCDD)]
    assert bus.unmapped_reads == bus.unmapped_writes == 0


@pytest.mark.parametrize("size", [1, 2, 4])
def test_unmapped_reads_all_ones_and_writes_counted(bus, size) -> None:
    dev = Recorder()
    bus.insert(dev, 0x500, 4)
    assert bus.read(0x80, size) == (1 << (8 * size)) - 1
    assert bus.read(0x504, size) == (1 << (8 * size)) - 1
    bus.write(0x4FF, 1, 0)
    bus.write(0x1000, size, 0x12)
    assert (bus.unmapped_reads, bus.unmapped_writes) == (2, 2)
    assert dev.log == []


def test_straddling_accesses_are_unmapped(bus) -> None:
    dev = Recorder()
    bus.insert(dev, 0x60, 4)
    bus.insert(Recorder(), 0x64, 4)
    assert bus.read(0x63, 2) == 0xFFFF  # runs into the neighbour
    assert bus.read(0x5F, 2) == 0xFFFF  # starts before the device
    bus.write(0x62, 4, 1)
    assert dev.log == []
    assert (bus.unmapped_reads, bus.unmapped_writes) == (2, 1)
    assert bus.read(0x60, 4) == (0x1122334455667788) & 0xFFFFFFFF  # exactly the range is fine


def test_straddling_two_ranges_of_one_device(bus) -> None:
    dev = Recorder()
    bus.insert(dev, 0x10, 4)
    bus.insert(dev, 0x14, 4)
    assert bus.read(0x13, 2) == 0xFFFF
    assert dev.log == []
    assert bus.read(0x14, 2) == 0x7788
    assert dev.log == [("r", 0, 2)]


@pytest.mark.parametrize("size", [0, -1, 9, 1 << 40])
def test_bad_sizes_never_reach_a_device(bus, size) -> None:
    dev = Recorder()
    bus.insert(dev, 0x0, 0x1000)
    assert bus.read(0x10, size) == 0
    bus.write(0x10, size, 5)
    assert dev.log == []
    assert (bus.unmapped_reads, bus.unmapped_writes) == (1, 1)


def test_all_ones() -> None:
    assert [all_ones(n) for n in (1, 2, 4, 8)] == [0xFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF]
    assert all_ones(-3) == all_ones(1 << 50) == 0


def test_mmio_high_addresses_and_testdev() -> None:
    bus = MmioBus()
    dev = TestDev()
    bus.insert(dev, 0xFEB0_0000, 0x1000)
    bus.write(0xFEB0_0FF8, 8, 0x0102030405060708)
    assert bus.read(0xFEB0_0FF8, 8) == 0x0102030405060708
    assert bus.read(0xFEB0_0FFC, 8) == all_ones(8)  # runs past the page: refused by the bus
    assert dev.refused == 0
    with pytest.raises(BusError):
        bus.insert(Recorder(), 1 << 52, 1)


@given(ranges=st.lists(st.tuples(st.integers(0, 0xFFF0), st.integers(1, 16)), max_size=12),
       probes=st.lists(st.tuples(st.integers(0, 0x10010), st.sampled_from([1, 2, 4])), max_size=20))
def test_lookup_matches_a_linear_scan(ranges, probes) -> None:
    for bus in (PortBus(), MmioBus()):
        accepted: list[tuple[int, int, Recorder]] = []
        for base, length in ranges:
            dev = Recorder()
            overlaps = any(base < e and b < base + length for b, e, _ in accepted)
            if overlaps:
                with pytest.raises(BusError):
                    bus.insert(dev, base, length)
            else:
                bus.insert(dev, base, length)
                accepted.append((base, base + length, dev))
        for address, size in probes:
            owner = [(b, d) for b, e, d in accepted if b <= address and address + size <= e]
            found = bus.lookup(address, size)
            if owner:
                assert found == (owner[0][1], address - owner[0][0])
            else:
                assert found is None


@given(port=st.integers(0, 0xFFFF), value=st.integers(0, 0xFF))
def test_resolved_byte_handlers_do_what_read_and_write_do(port: int, value: int) -> None:
    direct, resolved = PortBus(), PortBus()
    direct_dev, resolved_dev = Recorder(), Recorder()
    direct.insert(direct_dev, 0x3F8, 8)
    resolved.insert(resolved_dev, 0x3F8, 8)
    direct.write(port, 1, value)
    resolved.byte_writer(port)(value)
    assert (resolved.byte_reader(port)() & 0xFF) == direct.read(port, 1)
    assert resolved_dev.log == direct_dev.log
    assert (resolved.unmapped_writes, resolved.unmapped_reads) == (direct.unmapped_writes, direct.unmapped_reads)


def test_inserting_a_device_empties_resolved_tables() -> None:
    bus = PortBus()
    table = bus.handler_table()
    table[1] = bus.byte_writer(0x60)  # unmapped when resolved
    bus.insert(Recorder(), 0x60, 1)
    assert table == {}
