"""The vhost-net backend's inputs (vmmd.net.vhost): the memory table is exactly the device's DMA windows and the
ring addresses point at the guest's rings in vmmd's address space. /dev/vhost-net itself is absent on this host;
its ioctl numbers and structs are proven by tests/test_layout.py against linux/vhost.h, and the datapath tests
skip with vhost_unavailable_reason()."""

from __future__ import annotations

import ctypes
import struct

import pytest

from vmmd.devices.virtqueue import DmaWindows, Virtqueue
from vmmd.machine import layout as L
from vmmd.memory import GuestMemory
from vmmd.net import vhost_uapi as vu
from vmmd.net.vhost import VhostError, VhostNet, vhost_unavailable_reason, vring_plan

MIB = 1 << 20


@pytest.fixture
def memory():
    m = GuestMemory.with_ram(8 * MIB)
    yield m
    m.close()


def test_ring_addresses_are_the_guests_rings_in_our_address_space(memory) -> None:
    windows = DmaWindows(memory)
    queue = Virtqueue(1, 256, 0x40000, 0x41000, 0x42000, windows, 65536)
    regions, rings = vring_plan(memory, windows, [None, queue])
    assert regions == [(0, 8 * MIB, memory.hva(0, 8 * MIB))]
    (index, size, desc, avail, used), = rings
    assert (index, size) == (1, 256)
    for hva, gpa in ((desc, 0x40000), (avail, 0x41000), (used, 0x42000)):
        ctypes.memmove(hva, struct.pack("<I", gpa ^ 0x5A5A5A5A), 4)  # what the kernel would write there
        assert memory.read(gpa, 4) == struct.pack("<I", gpa ^ 0x5A5A5A5A)


def test_on_sev_platforms_the_kernel_gets_only_the_shared_region(memory) -> None:
    windows = DmaWindows(memory, [(L.SHARED_GPA, L.SHARED_SIZE)])
    regions, _rings = vring_plan(memory, windows, [])
    assert regions == [(L.SHARED_GPA, L.SHARED_SIZE, memory.hva(L.SHARED_GPA, L.SHARED_SIZE))]


def test_memory_table_buffer_has_the_headers_layout() -> None:
    table = vu.memory_table([(0, 4096, 0x7F00_0000_0000), (0x1_0000_0000, 8192, 0x7F00_1000_0000)])
    raw = bytes(table)
    assert len(raw) == ctypes.sizeof(vu.vhost_memory) + 2 * ctypes.sizeof(vu.vhost_memory_region)
    assert struct.unpack_from("<II", raw) == (2, 0)
    assert struct.unpack_from("<QQQQ", raw, 8 + 32) == (0x1_0000_0000, 8192, 0x7F00_1000_0000, 0)


def test_without_the_device_vhost_is_refused_with_the_reason(tmp_path) -> None:
    missing = tmp_path / "vhost-net"
    assert "does not exist" in vhost_unavailable_reason(str(missing))
    with pytest.raises(VhostError, match="modprobe vhost_net"):
        VhostNet(str(missing))
