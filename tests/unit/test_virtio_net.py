"""virtio-net device: frames between hand-built split rings in a real GuestMemory and the device's fd, and hostile
driver behaviour (descriptor loops, addresses outside RAM, length overflow), which must leave the VMM running with
DEVICE_NEEDS_RESET and one clear log line.

The 'tap' here is one end of an AF_UNIX datagram socketpair: it keeps frame boundaries as a tap does, so the
device is tested without CAP_NET_ADMIN (tests/unit/test_tap.py covers real taps)."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.virtio_driver import F_NEXT, F_WRITE, NEEDS_RESET, Ring, net_device, wait_for
from vmmd.memory import GuestMemory

V1_MAC = (1 << 32) | (1 << 5)
HDR = 12
RX_RING, TX_RING = 0x100000, 0x110000
BUFS = 0x120000


@pytest.fixture(autouse=True, params=["per-chain", "vectorised"])
def tx_path(request, monkeypatch):
    """Every test runs on both TX paths: small batches walk chain by chain, larger ones go through numpy
    (vmmd.devices.virtqueue.SMALL_BATCH); SMALL_BATCH 0 sends every batch through numpy."""
    if request.param == "vectorised":
        from vmmd.devices import virtqueue

        monkeypatch.setattr(virtqueue, "SMALL_BATCH", 0)
    return request.param


@pytest.fixture
def memory():
    mem = GuestMemory.with_ram(4 << 20)
    yield mem
    mem.close()


def bring_up(memory, size=8, windows=None, **kwargs):
    memory.view(RX_RING, 0x40000)[:] = 0  # fresh rings (hypothesis reuses the memory fixture)
    device, transport, d, host = net_device(memory, windows, **kwargs)
    host.settimeout(2)
    d.negotiate(V1_MAC)
    rx, tx = Ring(memory, RX_RING, size), Ring(memory, TX_RING, size)
    d.setup_queue(0, rx)
    d.setup_queue(1, tx)
    d.driver_ok()
    return device, transport, d, host, rx, tx


@pytest.fixture
def net(memory):
    parts = bring_up(memory)
    yield parts
    parts[0].close()
    parts[3].close()


def frame(n: int, size: int = 60) -> bytes:
    return b"\xff" * 6 + b"\x02\x11\x22\x33\x44\x55" + b"\x88\xb5" + bytes([n]) * (size - 14)


@pytest.mark.timeout(60)
def test_tx_single_descriptor_frames(net, memory):
    device, t, d, host, rx, tx = net
    for i in range(3):
        memory.write(BUFS + 2048 * i, bytes(HDR) + frame(i))
        tx.set_desc(i, BUFS + 2048 * i, HDR + 60)
        tx.offer(i)
    d.notify(1)
    got = [host.recv(4096) for _ in range(3)]
    assert got == [frame(i) for i in range(3)]
    assert wait_for(lambda: tx.used_idx() == 3)
    assert [tx.used_entry(i)[0] for i in range(3)] == [0, 1, 2]
    assert d.r("int_status") & 1
    d.w("int_ack", 1)
    assert d.r("int_status") == 0


@pytest.mark.timeout(60)
def test_a_polling_driver_gets_no_interrupt(net, memory):
    """VIRTQ_AVAIL_F_NO_INTERRUPT on the TX ring (a driver polling it): the frames go and the used ring moves, but
    InterruptStatus stays clear (spec 2.7.7.2); once the driver clears the flag the next frame interrupts again."""
    device, t, d, host, rx, tx = net
    memory.write(tx.avail, struct.pack("<H", 1))  # avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT
    for i in range(2):
        memory.write(BUFS + 2048 * i, bytes(HDR) + frame(i))
        tx.set_desc(i, BUFS + 2048 * i, HDR + 60)
    tx.offer(0)
    d.notify(1)
    assert host.recv(4096) == frame(0)
    assert wait_for(lambda: tx.used_idx() == 1)
    time.sleep(0.05)  # the pass ends after the used index is written
    assert d.r("int_status") == 0
    memory.write(tx.avail, struct.pack("<H", 0))
    tx.offer(1)
    d.notify(1)
    assert host.recv(4096) == frame(1)
    assert wait_for(lambda: d.r("int_status") & 1)


@pytest.mark.timeout(60)
def test_tx_header_in_its_own_descriptor(net, memory):
    device, t, d, host, rx, tx = net
    memory.write(BUFS, bytes(HDR))
    memory.write(BUFS + 4096, frame(7, 100))
    tx.set_desc(3, BUFS, HDR, F_NEXT, 5)
    tx.set_desc(5, BUFS + 4096, 100)
    tx.offer(3)
    d.notify(1)
    assert host.recv(4096) == frame(7, 100)
    assert wait_for(lambda: tx.used_idx() == 1) and tx.used_entry(0)[0] == 3


@pytest.mark.timeout(60)
def test_tx_ring_wraps(net, memory):
    device, t, d, host, rx, tx = net
    memory.write(BUFS, bytes(HDR) + frame(1))
    tx.set_desc(0, BUFS, HDR + 60)
    for round_ in range(5):  # 5 x 5 entries through an 8-entry ring
        for _ in range(5):
            tx.offer(0)
        d.notify(1)
        for _ in range(5):
            assert host.recv(4096) == frame(1)
        assert wait_for(lambda r=round_: tx.used_idx() == 5 * (r + 1))
    assert device.stats["tx_frames"] == 25


@pytest.mark.timeout(60)
def test_rx_frame_lands_with_header(net, memory):
    device, t, d, host, rx, tx = net
    for i in range(2):
        rx.set_desc(i, BUFS + 2048 * i, 2048, F_WRITE)
        rx.offer(i)
    d.notify(0)
    host.send(frame(9, 90))
    assert wait_for(lambda: rx.used_idx() == 1)
    head, length = rx.used_entry(0)
    assert (head, length) == (0, HDR + 90)
    data = memory.read(BUFS, HDR + 90)
    assert data[:10] == bytes(10) and struct.unpack("<H", data[10:12])[0] == 1  # num_buffers = 1
    assert data[HDR:] == frame(9, 90)
    host.send(frame(10, 64))
    assert wait_for(lambda: rx.used_idx() == 2)
    assert memory.read(BUFS + 2048 + HDR, 64) == frame(10, 64)


@pytest.mark.timeout(60)
def test_rx_waits_for_buffers(net, memory):
    device, t, d, host, rx, tx = net
    host.send(frame(3))
    assert not wait_for(lambda: rx.used_idx() != 0, 0.2)
    rx.set_desc(0, BUFS, 2048, F_WRITE)
    rx.offer(0)
    d.notify(0)
    assert wait_for(lambda: rx.used_idx() == 1)
    assert memory.read(BUFS + HDR, 60) == frame(3)


def assert_needs_reset(d, caplog, device, words):
    assert wait_for(lambda: d.r("status") & NEEDS_RESET), "device did not enter DEVICE_NEEDS_RESET"
    assert d.r("int_status") & 2  # configuration change interrupt
    assert "DEVICE_NEEDS_RESET" in caplog.text and words in caplog.text
    assert device._thread is not None and device._thread.is_alive()  # the VMM side keeps running


def recover(d, memory, host, device):
    """After a reset the same device works again."""
    d.w("status", 0)
    assert d.r("status") == 0
    d.negotiate(V1_MAC)
    rx, tx = Ring(memory, RX_RING + 0x20000, 8), Ring(memory, TX_RING + 0x20000, 8)
    d.setup_queue(0, rx)
    d.setup_queue(1, tx)
    d.driver_ok()
    memory.write(BUFS, bytes(HDR) + frame(42))
    tx.set_desc(0, BUFS, HDR + 60)
    tx.offer(0)
    d.notify(1)
    assert host.recv(4096) == frame(42)


@pytest.mark.timeout(60)
def test_descriptor_loop(net, memory, caplog):
    device, t, d, host, rx, tx = net
    tx.set_desc(0, BUFS, 16, F_NEXT, 1)
    tx.set_desc(1, BUFS, 16, F_NEXT, 0)
    tx.offer(0)
    d.notify(1)
    assert_needs_reset(d, caplog, device, "loops")
    host.setblocking(False)
    with pytest.raises(BlockingIOError):
        host.recv(4096)
    host.settimeout(2)
    recover(d, memory, host, device)


@pytest.mark.timeout(60)
def test_address_outside_ram(net, memory, caplog):
    device, t, d, host, rx, tx = net
    tx.set_desc(0, 0xDEAD_0000_0000, 64)
    tx.offer(0)
    d.notify(1)
    assert_needs_reset(d, caplog, device, "outside the memory")
    recover(d, memory, host, device)


@pytest.mark.timeout(60)
def test_address_straddling_the_end_of_ram(net, memory, caplog):
    device, t, d, host, rx, tx = net
    tx.set_desc(0, (4 << 20) - 32, 64)
    tx.offer(0)
    d.notify(1)
    assert_needs_reset(d, caplog, device, "outside the memory")


@pytest.mark.timeout(60)
def test_address_wrapping_u64(net, memory, caplog):
    device, t, d, host, rx, tx = net
    tx.set_desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0x100)
    tx.offer(0)
    d.notify(1)
    assert_needs_reset(d, caplog, device, "outside the memory")


@pytest.mark.timeout(60)
def test_length_overflow(net, memory, caplog):
    device, t, d, host, rx, tx = net
    tx.set_desc(0, BUFS, 0xFFFF_FFFF)
    tx.offer(0)
    d.notify(1)
    assert_needs_reset(d, caplog, device, "over the limit")
    recover(d, memory, host, device)


@pytest.mark.timeout(60)
def test_chain_lengths_summing_past_the_limit(net, memory, caplog):
    device, t, d, host, rx, tx = net
    for i in range(4):  # four 0x7fffffff descriptors: a u32 sum would wrap
        tx.set_desc(i, BUFS, 0x7FFF_FFFF, F_NEXT if i < 3 else 0, i + 1)
    tx.offer(0)
    d.notify(1)
    assert_needs_reset(d, caplog, device, "over the limit")


@pytest.mark.timeout(60)
def test_next_past_queue_size(net, memory, caplog):
    device, t, d, host, rx, tx = net
    tx.set_desc(0, BUFS, 16, F_NEXT, 200)
    tx.offer(0)
    d.notify(1)
    assert_needs_reset(d, caplog, device, "past the queue size")


@pytest.mark.timeout(60)
def test_avail_index_running_ahead(net, memory, caplog):
    device, t, d, host, rx, tx = net
    memory.write(tx.avail + 2, struct.pack("<H", 500))
    d.notify(1)
    assert_needs_reset(d, caplog, device, "more than the queue size")


@pytest.mark.timeout(60)
def test_readable_descriptor_in_receive_chain(net, memory, caplog):
    device, t, d, host, rx, tx = net
    rx.set_desc(0, BUFS, 2048)  # no F_WRITE
    rx.offer(0)
    d.notify(0)
    assert_needs_reset(d, caplog, device, "device-readable")


@pytest.mark.timeout(60)
def test_dma_outside_the_shared_window(memory, caplog):
    shared = (0x20000, 0x40000)
    device, t, d, host = net_device(memory, [shared], require_access_platform=False)
    try:
        d.negotiate(V1_MAC)
        tx = Ring(memory, 0x30000, 8)  # rings in the shared window
        d.setup_queue(1, tx)
        d.driver_ok()
        tx.set_desc(0, BUFS, 72)  # buffer in private RAM: not reachable on SEV
        tx.offer(0)
        d.notify(1)
        assert_needs_reset(d, caplog, device, "outside the memory")
    finally:
        device.close()
        host.close()


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(st.tuples(st.integers(0, 2**64 - 1) | st.integers(BUFS, BUFS + 8192), st.integers(0, 2**32 - 1)
                                | st.integers(0, 128), st.integers(0, 7), st.integers(0, 0xFFFF) | st.integers(0, 8)),
                      min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 0xFFFF) | st.integers(0, 7), min_size=1, max_size=8),
       queue=st.sampled_from([0, 1]))
def test_garbage_rings_never_hurt_the_host(memory, descs, heads, queue):
    device, t, d, host, rx, tx = bring_up(memory)
    host.setblocking(False)
    try:
        ring = rx if queue == 0 else tx
        for i, (addr, length, flags, nxt) in enumerate(descs):
            ring.set_desc(i, addr, length, flags, nxt)
        for head in heads:
            ring.offer(head)
        if queue == 0:
            host.send(frame(1))
        d.notify(queue)
        assert wait_for(lambda: ring.used_idx() == len(heads) or d.r("status") & NEEDS_RESET or
                        (queue == 0 and ring.used_idx() == 1))
        assert device._thread.is_alive()
        for _ in range(len(heads)):
            try:
                got = host.recv(70000)
            except BlockingIOError:
                break
            assert len(got) <= 0x10000 + 18
    finally:
        device.close()
        host.close()


@pytest.mark.timeout(60)
def test_tx_batch_of_mixed_lengths_and_gathered_batches_keep_order(net, memory):
    device, t, d, host, rx, tx = net
    sizes = [60, 61, 1514, 60, 200, 60, 60, 99]  # mixed lengths: memoryview path
    for i, size in enumerate(sizes):
        memory.write(BUFS + 2048 * i, bytes(HDR) + frame(i, size))
        tx.set_desc(i, BUFS + 2048 * i, HDR + size)
        tx.offer(i)
    d.notify(1)
    assert [host.recv(4096) for _ in sizes] == [frame(i, s) for i, s in enumerate(sizes)]
    for i in (5, 2, 7, 0):  # equal lengths at uneven addresses: the numpy gather path
        memory.write(BUFS + 2048 * i, bytes(HDR) + frame(40 + i, 80))
        tx.set_desc(i, BUFS + 2048 * i, HDR + 80)
        tx.offer(i)
    d.notify(1)
    assert [host.recv(4096) for _ in range(4)] == [frame(40 + i, 80) for i in (5, 2, 7, 0)]
    assert wait_for(lambda: tx.used_idx() == 12)
    assert [tx.used_entry(8 + k)[0] for k in range(4)] == [5, 2, 7, 0]


@pytest.mark.timeout(60)
def test_vnet_hdr_receive_sets_num_buffers(memory):
    device, t, d, host, rx, tx = bring_up(memory, vnet_hdr=True)
    try:
        rx.set_desc(0, BUFS, 2048, F_WRITE)
        rx.offer(0)
        d.notify(0)
        host.send(bytes(HDR) + frame(5))  # as the kernel writes it with IFF_VNET_HDR: header, num_buffers 0
        assert wait_for(lambda: rx.used_idx() == 1)
        assert rx.used_entry(0) == (0, HDR + 60)
        assert struct.unpack("<H", memory.read(BUFS + 10, 2))[0] == 1
        memory.write(BUFS + 4096, bytes(HDR) + frame(6))
        tx.set_desc(0, BUFS + 4096, HDR + 60)
        tx.offer(0)
        d.notify(1)
        assert host.recv(4096) == bytes(HDR) + frame(6)  # the header passes through to the tap
    finally:
        device.close()
        host.close()


@pytest.mark.timeout(60)
def test_header_only_tx_frames_are_dropped_not_a_device_error(net, memory):
    device, t, d, host, rx, tx = net
    tx.set_desc(0, BUFS, HDR)  # nothing after the virtio_net_hdr
    tx.set_desc(1, BUFS + 2048, 0)
    tx.offer(0)
    tx.offer(1)
    d.notify(1)
    assert wait_for(lambda: tx.used_idx() == 2)
    assert not d.r("status") & NEEDS_RESET and device.stats["tx_dropped"] == 2


def test_one_pass_walks_a_bounded_number_of_descriptors(memory):
    """Every avail entry naming the same queue-long chain: a pass stops at DESCRIPTOR_BUDGET descriptors and
    leaves the rest available, instead of queue size squared steps under the transport lock."""
    import os
    import time

    from vmmd.devices.virtqueue import DESCRIPTOR_BUDGET, DmaWindows, Virtqueue

    size = 1024
    q = Virtqueue(1, size, 0x100000, 0x200000, 0x210000, DmaWindows(memory), HDR + 65536)
    for i in range(size):
        memory.write(0x100000 + 16 * i, struct.pack("<QIHH", 0x300000, 64, F_NEXT if i < size - 1 else 0, i + 1))
    memory.write(0x200004, bytes(2 * size))  # every entry: head 0
    memory.write(0x200002, struct.pack("<H", size))
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        start = time.perf_counter()
        taken, _ = q.drain_to_fd(fd, HDR)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    assert taken == DESCRIPTOR_BUDGET // size and q.available() == size - taken
    assert q.visited == DESCRIPTOR_BUDGET
    assert seconds < 0.5  # ~4096 descriptor steps; 1024 x 1024 took over a second


@pytest.mark.timeout(60)
def test_a_disabled_queue_is_not_used_and_a_re_enabled_one_is(net, memory):
    device, t, d, host, rx, tx = net
    d.w("queue_sel", 1)
    d.w("queue_ready", 0)  # the driver takes the TX queue away after DRIVER_OK
    memory.write(BUFS, bytes(HDR) + frame(1))
    tx.set_desc(0, BUFS, HDR + 60)
    tx.offer(0)
    d.notify(1)
    assert not wait_for(lambda: tx.used_idx() == 1, 0.3)  # the old ring is left alone
    moved = Ring(memory, 0x130000, 8)
    d.setup_queue(1, moved)
    memory.write(BUFS + 2048, bytes(HDR) + frame(2))
    moved.set_desc(0, BUFS + 2048, HDR + 60)
    moved.offer(0)
    d.notify(1)
    assert host.recv(4096) == frame(2)
    assert wait_for(lambda: moved.used_idx() == 1)


def test_driver_cannot_clear_status_bits_or_set_needs_reset(net, memory):
    device, t, d, host, rx, tx = net
    assert d.r("status") == 0xF
    d.w("status", 0x7)  # clearing DRIVER_OK/FEATURES_OK is not the driver's to do (spec 2.1.2)
    assert d.r("status") == 0xF
    d.w("status", 0xF | NEEDS_RESET)
    assert d.r("status") == 0xF
