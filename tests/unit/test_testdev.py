"""vmmd-testdev: a 4 KiB MMIO scratch page that reads back what was written, little-endian."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmd.devices.bus import MmioBus
from vmmd.devices.testdev import TestDev
from vmmd.machine.layout import MMIO_TESTDEV_GPA, MMIO_TESTDEV_SIZE


@pytest.fixture
def dev() -> TestDev:
    return TestDev()


def test_initially_zero(dev: TestDev) -> None:
    assert dev.size == MMIO_TESTDEV_SIZE == 4096
    assert all(dev.read(offset, 8) == 0 for offset in range(0, 4096, 8))


@pytest.mark.parametrize("size", range(1, 9))
def test_round_trip_every_size(dev: TestDev, size: int) -> None:
    value = int.from_bytes(bytes(range(0xA1, 0xA1 + size)), "little")
    dev.write(0x123, size, value)
    assert dev.read(0x123, size) == value
    assert dev.mem[0x123] == 0xA1  # little-endian: lowest byte at the lowest offset


def test_partial_overlaps_see_bytes(dev: TestDev) -> None:
    dev.write(0x10, 8, 0x8877665544332211)
    assert dev.read(0x12, 2) == 0x4433
    dev.write(0x13, 1, 0xEE)
    assert dev.read(0x10, 4) == 0xEE332211
    assert dev.read(0x17, 2) == 0x0088  # last byte plus an untouched zero


def test_last_bytes_of_the_page(dev: TestDev) -> None:
    dev.write(0xFF8, 8, 0xDEADBEEFCAFEF00D)
    assert dev.read(0xFF8, 8) == 0xDEADBEEFCAFEF00D
    assert dev.read(0xFFF, 1) == 0xDE


def test_out_of_range_never_stored(dev: TestDev) -> None:
    dev.write(0xFFC, 8, 0xFFFFFFFFFFFFFFFF)
    dev.write(0x0, 9, 1)
    assert dev.read(0xFFF, 2) == 0xFFFF
    assert dev.read(0x0, 0) == 0
    assert dev.refused == 4
    assert bytes(dev.mem) == bytes(4096)


def test_on_the_mmio_bus() -> None:
    bus = MmioBus()
    dev = TestDev()
    bus.insert(dev, MMIO_TESTDEV_GPA, MMIO_TESTDEV_SIZE)
    bus.write(MMIO_TESTDEV_GPA + 0x800, 4, 0xC0FFEE)
    assert bus.read(MMIO_TESTDEV_GPA + 0x800, 4) == 0xC0FFEE
    assert dev.read(0x800, 4) == 0xC0FFEE
    assert (dev.reads, dev.writes) == (2, 1)
    assert bus.read(MMIO_TESTDEV_GPA + MMIO_TESTDEV_SIZE - 4, 8) == 0xFFFFFFFFFFFFFFFF  # refused by the bus
    assert bus.unmapped_reads == 1 and dev.refused == 0


@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 8), st.integers(0, (1 << 64) - 1)), max_size=40))
def test_matches_a_byte_model(ops) -> None:
    dev = TestDev()
    model = bytearray(4096)
    for offset, size, value in ops:
        if offset + size > 4096:
            continue
        dev.write(offset, size, value)
        model[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        assert dev.read(offset, size) == int.from_bytes(model[offset:offset + size], "little")
    assert dev.mem == model
