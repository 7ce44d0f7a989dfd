"""isa-debug-exit compatibility: status (v << 1) | 1 and the vmctl exit code mapping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmd.devices.bus import PortBus
from vmmd.devices.debug_exit import DEBUG_EXIT_DECODE, DebugExit, debug_exit_status
from vmmd.errors import ExitCode, VmStop
from vmmd.machine.layout import DEBUG_EXIT_PORT


@pytest.fixture
def bus() -> PortBus:
    bus = PortBus()
    bus.insert(DebugExit(), DEBUG_EXIT_PORT, DEBUG_EXIT_DECODE)
    return bus


def test_zero_is_success(bus: PortBus) -> None:
    with pytest.raises(VmStop) as stop:
        bus.write(DEBUG_EXIT_PORT, 1, 0)
    assert stop.value.kind == "debug-exit"
    assert stop.value.exit_code == ExitCode.SUCCESS
    assert stop.value.status == 1
    assert stop.value.reason == "guest wrote 0x0 to the debug-exit port: success"


@pytest.mark.parametrize("port,size,value,status", [
    (DEBUG_EXIT_PORT, 1, 0x01, 0x03),
    (DEBUG_EXIT_PORT, 1, 0x31, 0x63),
    (DEBUG_EXIT_PORT, 2, 0x1234, 0x2469),
    (DEBUG_EXIT_PORT + 1, 1, 0x7F, 0xFF),  # either port of the pair
])
def test_nonzero_is_failure(bus: PortBus, port: int, size: int, value: int, status: int) -> None:
    with pytest.raises(VmStop) as stop:
        bus.write(port, size, value)
    assert stop.value.exit_code == ExitCode.GUEST_FAILURE
    assert stop.value.status == status
    assert f"{value:#x}" in stop.value.reason and f"status {status})" in stop.value.reason


def test_reads_return_zero_like_qemu(bus: PortBus) -> None:
    assert bus.read(DEBUG_EXIT_PORT, 1) == 0
    assert bus.read(DEBUG_EXIT_PORT, 2) == 0
    assert bus.unmapped_reads == 0


@pytest.mark.parametrize("port,size,value,kept", [
    (DEBUG_EXIT_PORT, 4, 0x0001_0000, 0x0000),  # outl 0x501: QEMU keeps the 2 bytes inside the range
    (DEBUG_EXIT_PORT, 4, 0xABCD_1234, 0x1234),
    (DEBUG_EXIT_PORT + 1, 2, 0x5678, 0x78),  # outw 0x502: one byte inside
    (DEBUG_EXIT_PORT + 1, 4, 0x0000_0100, 0x00),
])
def test_accesses_running_past_the_range_are_cut_as_qemu_cuts_them(bus: PortBus, port: int, size: int, value: int,
                                                                    kept: int) -> None:
    with pytest.raises(VmStop) as stop:
        bus.write(port, size, value)
    assert stop.value.status == debug_exit_status(kept)
    assert stop.value.exit_code == (ExitCode.SUCCESS if kept == 0 else ExitCode.GUEST_FAILURE)


def test_ports_after_the_range_do_nothing(bus: PortBus) -> None:
    bus.write(DEBUG_EXIT_PORT + 2, 1, 1)  # 0x503: beyond iosize 2, no exit
    assert bus.read(DEBUG_EXIT_PORT + 3, 1) == 0


@given(st.integers(0, 0xFFFFFFFF))
def test_status_is_odd_and_recovers_value(value: int) -> None:
    status = debug_exit_status(value)
    assert status & 1 == 1 and status >> 1 == value
