"""virtio-mmio transport (spec 4.2): registers, feature negotiation, queue set-up, reset, driven through a real
MmioBus over a real GuestMemory."""

from __future__ import annotations

import pytest

from tests.unit.virtio_driver import ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, Driver, Ring, net_device
from vmmd.devices.virtio_mmio import VirtioMmio
from vmmd.devices.virtio_net import VirtioNet
from vmmd.devices.virtqueue import DmaWindows
from vmmd.memory import GuestMemory

V1 = 1 << 32
ACCESS_PLATFORM = 1 << 33
MAC = 1 << 5


@pytest.fixture
def memory():
    mem = GuestMemory.with_ram(4 << 20)
    yield mem
    mem.close()


@pytest.fixture
def dev(memory):
    device, transport, driver, host = net_device(memory)
    yield device, transport, driver, host
    device.close()
    host.close()


@pytest.mark.timeout(60)
def test_identification(dev):
    _, _, d, _ = dev
    assert d.r("magic") == 0x74726976
    assert d.r("version") == 2
    assert d.r("device_id") == 1
    assert d.r("status") == 0


@pytest.mark.timeout(60)
def test_offered_features(dev):
    _, _, d, _ = dev
    f = d.features()
    assert f & V1 and f & ACCESS_PLATFORM and f & MAC
    d.w("dev_features_sel", 2)
    assert d.r("dev_features") == 0


@pytest.mark.timeout(60)
def test_features_ok_needs_version_1(dev):
    _, _, d, _ = dev
    assert not d.negotiate(MAC) & FEATURES_OK
    assert d.negotiate(V1 | MAC) & FEATURES_OK


@pytest.mark.timeout(60)
def test_features_ok_refused_for_unoffered_bits(dev):
    _, _, d, _ = dev
    assert not d.negotiate(V1 | (1 << 6)) & FEATURES_OK  # VIRTIO_NET_F_GSO: not offered


@pytest.mark.timeout(60)
def test_access_platform_required_on_sev(memory):
    device = VirtioNet(-1, b"\x02\0\0\0\0\1", require_access_platform=True)
    d = Driver(memory, VirtioMmio(device, DmaWindows(memory)))
    try:
        assert not d.negotiate(V1 | MAC) & FEATURES_OK
        assert d.negotiate(V1 | MAC | ACCESS_PLATFORM) & FEATURES_OK
    finally:
        device.close()


@pytest.mark.timeout(60)
def test_config_space_mac_and_link(dev):
    _, _, d, _ = dev
    mac = bytes(d.bus.read(0xFEB0_1100 + i, 1) for i in range(6))
    assert mac == b"\x02\x11\x22\x33\x44\x55"
    assert d.bus.read(0xFEB0_1106, 2) == 1  # VIRTIO_NET_S_LINK_UP
    assert d.bus.read(0xFEB0_1100, 4) == int.from_bytes(mac[:4], "little")


@pytest.mark.timeout(60)
def test_queue_registers_read_back(dev, memory):
    _, t, d, _ = dev
    d.negotiate(V1)
    assert d.r("queue_num_max") == 1024
    ring = Ring(memory, 0x100000, 8)
    d.setup_queue(1, ring)
    d.w("queue_sel", 1)
    assert d.r("queue_ready") == 1 and d.r("queue_num") == 8
    assert d.r("desc_lo") == ring.desc and d.r("avail_lo") == ring.avail and d.r("used_lo") == ring.used
    d.w("queue_num", 16)  # ignored while ready
    assert d.r("queue_num") == 8
    d.w("queue_sel", 7)
    assert d.r("queue_num_max") == 0  # no such queue


@pytest.mark.timeout(60)
def test_reset_on_status_zero(dev, memory):
    _, t, d, _ = dev
    d.negotiate(V1)
    d.setup_queue(0, Ring(memory, 0x100000, 8))
    d.driver_ok()
    assert d.r("status") == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    d.w("status", 0)
    assert d.r("status") == 0
    d.w("queue_sel", 0)
    assert d.r("queue_ready") == 0
    assert t.queues == [None, None]


@pytest.mark.timeout(60)
def test_odd_width_register_access_is_ignored(dev):
    _, t, d, _ = dev
    assert d.bus.read(0xFEB0_1000, 2) == 0
    d.bus.write(0xFEB0_1070, 1, 0xFF)
    assert d.r("status") == 0
    assert t.odd_accesses == 2


@pytest.mark.timeout(60)
def test_no_shared_memory_regions(dev):
    _, _, d, _ = dev
    assert d.bus.read(0xFEB0_10B0, 4) == 0xFFFF_FFFF


@pytest.mark.timeout(60)
def test_ring_outside_ram_needs_reset(dev, caplog):
    _, t, d, _ = dev
    d.negotiate(V1)
    d.setup_queue(0, Ring(GuestMemory(), 0x7_0000_0000, 8))
    assert d.r("status") & NEEDS_RESET
    assert d.r("int_status") & 2
    assert "outside the memory the device may access" in caplog.text
    d.w("queue_sel", 0)
    assert d.r("queue_ready") == 0


@pytest.mark.timeout(60)
def test_queue_size_not_power_of_two_needs_reset(dev, memory):
    _, t, d, _ = dev
    d.negotiate(V1)
    d.setup_queue(0, Ring(memory, 0x100000, 6))
    assert d.r("status") & NEEDS_RESET
    d.w("status", 0)
    assert d.r("status") == 0  # reset clears NEEDS_RESET
