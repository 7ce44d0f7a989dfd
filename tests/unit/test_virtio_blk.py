"""virtio-blk device: requests on hand-built split rings in a real GuestMemory against a real image file, and
hostile chains (loops, addresses outside RAM, the status byte in a device-readable buffer, lengths that are
not whole sectors), which must leave the VMM running with DEVICE_NEEDS_RESET and one log line."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct

import pytest

from tests.unit.virtio_driver import F_NEXT, F_WRITE, NEEDS_RESET, Driver, Ring, wait_for
from vmmd.block.image import DiskSpec, open_disk
from vmmd.devices import virtio_blk as B
from vmmd.devices.virtio_mmio import VirtioMmio
from vmmd.devices.virtqueue import DmaWindows
from vmmd.memory import GuestMemory

V1 = 1 << 32
FEATURES = V1 | (1 << B.VIRTIO_BLK_F_FLUSH) | (1 << B.VIRTIO_BLK_F_BLK_SIZE)
RING = 0x100000
HDRS = 0x110000  # 16-byte headers, one per slot
STATUS = 0x118000  # status bytes, one per slot
DATA = 0x120000  # 128 KiB per slot
IMAGE_BYTES = 1 << 20


@pytest.fixture
def memory():
    mem = GuestMemory.with_ram(8 << 20)
    yield mem
    mem.close()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (IMAGE_BYTES // 256))
    return path


class Blk:
    """A VirtioBlk on a VirtioMmio with one ring, driven like a guest driver would."""

    def __init__(self, memory, path, ro=False, cache="writeback", features=FEATURES, serial="vmmd-test", size=16,
                 windows=None, **kwargs):
        self.image = open_disk(DiskSpec(str(path), ro, cache, serial))
        self.device = B.VirtioBlk(self.image.fd, self.image.size, read_only=ro, direct=self.image.direct,
                                  serial=serial, discard=True, **kwargs)
        self.transport = VirtioMmio(self.device, DmaWindows(memory, windows))
        self.d = Driver(memory, self.transport)
        self.memory = memory
        memory.view(RING, 0x8000)[:] = 0
        self.d.negotiate(features)
        self.ring = Ring(memory, RING, size)
        self.d.setup_queue(0, self.ring)
        self.d.driver_ok()

    def request(self, slot, type_, sector, length=0, data_flags=None, status=None):
        """A 3-descriptor request (header, data, status) in descriptors 3*slot..3*slot+2, made available."""
        self.memory.write(HDRS + 16 * slot, struct.pack("<IIQ", type_, 0, sector))
        self.memory.write(STATUS + slot, b"\xee")
        base = 3 * slot
        if data_flags is None:
            data_flags = F_WRITE if type_ in (B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_GET_ID) else 0
        if length:
            self.ring.set_desc(base, HDRS + 16 * slot, 16, F_NEXT, base + 1)
            self.ring.set_desc(base + 1, DATA + (128 << 10) * slot, length, data_flags | F_NEXT, base + 2)
        else:
            self.ring.set_desc(base, HDRS + 16 * slot, 16, F_NEXT, base + 2)
        self.ring.set_desc(base + 2, STATUS + slot, 1, F_WRITE if status is None else status)
        self.ring.offer(base)

    def run(self, expect_used):
        self.d.notify(0)
        assert wait_for(lambda: self.ring.used_idx() == expect_used), \
            f"used idx {self.ring.used_idx()}, status {self.d.r('status'):#x}"

    def status(self, slot):
        return self.memory.read(STATUS + slot, 1)[0]

    def data(self, slot, length):
        return self.memory.read(DATA + (128 << 10) * slot, length)

    def close(self):
        self.device.close()
        self.image.close()


@pytest.fixture
def blk(memory, image):
    dev = Blk(memory, image)
    yield dev
    dev.close()


def test_config_layout_is_the_kernels():
    """struct virtio_blk_config up to the secure-erase fields (include/uapi/linux/virtio_blk.h, packed)."""
    c = B.virtio_blk_config
    offsets = {name: getattr(c, name).offset for name, *_ in c._fields_}
    assert offsets == {"capacity": 0, "size_max": 8, "seg_max": 12, "geometry": 16, "blk_size": 20,
                       "physical_block_exp": 24, "alignment_offset": 25, "min_io_size": 26, "opt_io_size": 28,
                       "wce": 32, "unused": 33, "num_queues": 34, "max_discard_sectors": 36, "max_discard_seg": 40,
                       "discard_sector_alignment": 44, "max_write_zeroes_sectors": 48, "max_write_zeroes_seg": 52,
                       "write_zeroes_may_unmap": 56, "unused1": 57, "max_secure_erase_sectors": 60,
                       "max_secure_erase_seg": 64, "secure_erase_sector_alignment": 68}
    assert ctypes.sizeof(c) == 72


def test_config_space_and_features(blk):
    cfg = B.virtio_blk_config.from_buffer_copy(blk.device.config_space())
    assert cfg.capacity == IMAGE_BYTES // 512
    assert (cfg.size_max, cfg.seg_max, cfg.blk_size) == (B.SIZE_MAX, B.SEG_MAX, 512)
    feats = blk.d.features()
    for bit in (B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_BLK_SIZE, B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_SIZE_MAX, 32, 33):
        assert feats >> bit & 1, bit
    assert not feats >> B.VIRTIO_BLK_F_RO & 1
    assert blk.d.bus.read(0xFEB0_1000 + 0x100, 8) == IMAGE_BYTES // 512  # capacity through the register page


@pytest.mark.timeout(30)
def test_write_then_read_back_reaches_the_file(blk, memory, image):
    pattern = bytes((i * 7) & 0xFF for i in range(8192))
    memory.write(DATA, pattern)
    blk.request(0, B.VIRTIO_BLK_T_OUT, 8, 8192)
    blk.run(1)
    assert blk.status(0) == B.VIRTIO_BLK_S_OK
    assert blk.ring.used_entry(0) == (0, 1)
    with open(image, "rb") as f:  # reached the file: another descriptor sees it at once
        f.seek(8 * 512)
        assert f.read(8192) == pattern
    blk.request(1, B.VIRTIO_BLK_T_IN, 8, 8192)
    blk.request(2, B.VIRTIO_BLK_T_IN, 0, 512)
    blk.run(3)
    assert blk.status(1) == blk.status(2) == B.VIRTIO_BLK_S_OK
    assert blk.data(1, 8192) == pattern
    assert blk.data(2, 512) == bytes(range(256)) * 2
    assert blk.ring.used_entry(1) == (3, 8193)  # data + status byte written
    assert blk.d.r("int_status") & 1


@pytest.mark.timeout(30)
def test_past_the_end_is_ioerr_and_nothing_is_read(blk, memory):
    memory.write(DATA, b"\x55" * 1024)
    blk.request(0, B.VIRTIO_BLK_T_IN, IMAGE_BYTES // 512 - 1, 1024)  # last sector plus one past the end
    blk.request(1, B.VIRTIO_BLK_T_OUT, 1 << 60, 512)  # offset overflows 64 bits
    blk.request(2, B.VIRTIO_BLK_T_IN, IMAGE_BYTES // 512 - 1, 512)  # the last sector itself is fine
    blk.run(3)
    assert [blk.status(i) for i in range(3)] == [B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_OK]
    assert blk.data(0, 1024) == b"\x55" * 1024
    assert not blk.d.r("status") & NEEDS_RESET


@pytest.mark.timeout(30)
def test_read_only_disk_refuses_writes(memory, image):
    before = image.read_bytes()
    dev = Blk(memory, image, ro=True)
    try:
        assert dev.d.features() >> B.VIRTIO_BLK_F_RO & 1
        memory.write(DATA, b"\xaa" * 4096)
        dev.request(0, B.VIRTIO_BLK_T_OUT, 0, 4096)
        dev.request(1, B.VIRTIO_BLK_T_IN, 0, 4096)
        dev.run(2)
        assert dev.status(0) == B.VIRTIO_BLK_S_IOERR
        assert dev.status(1) == B.VIRTIO_BLK_S_OK
        assert image.read_bytes() == before
        assert fcntl.fcntl(dev.image.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        dev.close()


@pytest.mark.timeout(30)
def test_flush_get_id_and_unknown_types(blk, memory):
    blk.request(0, B.VIRTIO_BLK_T_FLUSH, 0)
    blk.request(1, B.VIRTIO_BLK_T_GET_ID, 0, 20)
    blk.request(2, 99, 0)
    blk.run(3)
    assert blk.status(0) == B.VIRTIO_BLK_S_OK
    assert blk.device.stats["flushes"] == 1
    assert blk.status(1) == B.VIRTIO_BLK_S_OK
    assert blk.data(1, 20) == b"vmmd-test".ljust(20, b"\0")
    assert blk.ring.used_entry(1)[1] == 21
    assert blk.status(2) == B.VIRTIO_BLK_S_UNSUPP


@pytest.mark.timeout(30)
def test_any_framing_header_and_data_split(blk, memory, image):
    """Spec 2.6.4: the header split 10 + 6, the data in three descriptors, the status inside the last one."""
    memory.write(HDRS, struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 2))
    memory.write(DATA, b"A" * 512 + b"B" * 1024 + b"C" * 512)
    r = blk.ring
    r.set_desc(0, HDRS, 10, F_NEXT, 1)
    r.set_desc(1, HDRS + 10, 6, F_NEXT, 2)
    r.set_desc(2, DATA, 512, F_NEXT, 3)
    r.set_desc(3, DATA + 512, 1024, F_NEXT, 4)
    r.set_desc(4, DATA + 1536, 512, F_NEXT, 5)
    r.set_desc(5, STATUS, 4, F_WRITE)  # status is the last byte of a 4-byte writable buffer
    r.offer(0)
    blk.run(1)
    assert memory.read(STATUS + 3, 1)[0] == B.VIRTIO_BLK_S_OK
    assert image.read_bytes()[1024:1024 + 2048] == b"A" * 512 + b"B" * 1024 + b"C" * 512
    assert blk.device.stats["batched"] == 0  # the per-descriptor walk served it


def _hostile(blk, build, caplog, what):
    with caplog.at_level(logging.WARNING, logger="vmmd.virtio"):
        build(blk.ring)
        blk.ring.offer(0)
        blk.d.notify(0)
        assert wait_for(lambda: blk.d.r("status") & NEEDS_RESET), what
    lines = [r for r in caplog.records if "DEVICE_NEEDS_RESET" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert blk.ring.used_idx() == 0
    return lines[0].getMessage()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["loop", "outside-ram", "status-readable", "ragged-length", "readable-after-writable",
                                  "short-header", "next-past-queue", "huge-status", "wrapping-address"])
def test_hostile_chains_need_reset_and_the_vmm_goes_on(blk, memory, image, caplog, case):
    before = image.read_bytes()
    memory.write(HDRS, struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 0))

    def build(r):
        if case == "loop":
            r.set_desc(0, HDRS, 16, F_NEXT, 1)
            r.set_desc(1, DATA, 512, F_NEXT, 0)
        elif case == "outside-ram":
            r.set_desc(0, HDRS, 16, F_NEXT, 1)
            r.set_desc(1, 0xFFFF_FFFF_0000, 4096, F_NEXT, 2)
            r.set_desc(2, STATUS, 1, F_WRITE)
        elif case == "status-readable":
            r.set_desc(0, HDRS, 16, F_NEXT, 1)
            r.set_desc(1, DATA, 512, F_NEXT, 2)
            r.set_desc(2, STATUS, 1, 0)
        elif case == "ragged-length":
            r.set_desc(0, HDRS, 16, F_NEXT, 1)
            r.set_desc(1, DATA, 1000, F_NEXT, 2)
            r.set_desc(2, STATUS, 1, F_WRITE)
        elif case == "readable-after-writable":
            r.set_desc(0, HDRS, 16, F_NEXT, 1)
            r.set_desc(1, STATUS, 1, F_WRITE | F_NEXT, 2)
            r.set_desc(2, DATA, 512, 0)
        elif case == "short-header":
            r.set_desc(0, HDRS, 8, F_NEXT, 2)
            r.set_desc(2, STATUS, 1, F_WRITE)
        elif case == "next-past-queue":
            r.set_desc(0, HDRS, 16, F_NEXT, 999)
        elif case == "huge-status":  # a status buffer running from inside RAM far past its end
            r.set_desc(0, HDRS, 16, F_NEXT, 1)
            r.set_desc(1, DATA, 512, F_NEXT, 2)
            r.set_desc(2, STATUS, 0xFFFF_FFFF, F_WRITE)
        elif case == "wrapping-address":  # addr + len wraps around 2**64 back into RAM
            r.set_desc(0, HDRS, 16, F_NEXT, 1)
            r.set_desc(1, 2**64 - 256, 512, F_NEXT, 2)
            r.set_desc(2, STATUS, 1, F_WRITE)

    message = _hostile(blk, build, caplog, case)
    assert "the VM keeps running" in message
    assert image.read_bytes() == before
    # the driver resets the device and it works again
    blk.d.negotiate(FEATURES)
    blk.ring = Ring(memory, RING, 16)
    memory.view(RING, 0x8000)[:] = 0
    blk.d.setup_queue(0, blk.ring)
    blk.d.driver_ok()
    blk.request(0, B.VIRTIO_BLK_T_IN, 0, 512)
    blk.run(1)
    assert blk.status(0) == B.VIRTIO_BLK_S_OK


@pytest.mark.timeout(30)
def test_sev_windows_refuse_private_memory_and_want_access_platform(memory, image):
    dev = Blk(memory, image, windows=[(RING, 0x40000)], features=FEATURES, require_access_platform=True)
    try:
        assert not dev.d.r("status") & 8  # FEATURES_OK refused without VIRTIO_F_ACCESS_PLATFORM
    finally:
        dev.close()
    dev = Blk(memory, image, windows=[(RING, 0x40000)], features=FEATURES | (1 << 33), require_access_platform=True)
    try:
        dev.request(0, B.VIRTIO_BLK_T_IN, 0, 512)
        dev.run(1)
        assert dev.status(0) == B.VIRTIO_BLK_S_OK
        assert dev.device.stats["batched"] == 1
        memory.write(HDRS + 16, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 0))
        dev.ring.set_desc(3, HDRS + 16, 16, F_NEXT, 4)
        dev.ring.set_desc(4, 0x400000, 512, F_WRITE | F_NEXT, 5)  # private RAM: outside the shared window
        dev.ring.set_desc(5, STATUS + 1, 1, F_WRITE)
        dev.ring.offer(3)
        dev.d.notify(0)
        assert wait_for(lambda: dev.d.r("status") & NEEDS_RESET)
    finally:
        dev.close()


@pytest.mark.timeout(30)
def test_discard_and_write_zeroes(blk, memory, image):
    memory.write(DATA, struct.pack("<QII", 0, 8, 0))  # sectors 0..7
    memory.write(DATA + (128 << 10), struct.pack("<QII", 16, 8, 0) + struct.pack("<QII", 32, 8, 1))
    blk.request(0, B.VIRTIO_BLK_T_DISCARD, 0, 0)
    blk.ring.set_desc(0, HDRS, 16, F_NEXT, 1)
    blk.ring.set_desc(1, DATA, 16, F_NEXT, 2)
    blk.memory.write(HDRS + 16, struct.pack("<IIQ", B.VIRTIO_BLK_T_WRITE_ZEROES, 0, 0))
    blk.ring.set_desc(3, HDRS + 16, 16, F_NEXT, 4)
    blk.ring.set_desc(4, DATA + (128 << 10), 32, F_NEXT, 5)
    blk.ring.set_desc(5, STATUS + 1, 1, F_WRITE)
    blk.memory.write(STATUS + 1, b"\xee")
    blk.ring.offer(3)
    blk.run(2)
    assert blk.status(0) == B.VIRTIO_BLK_S_OK
    assert blk.status(1) == B.VIRTIO_BLK_S_OK
    data = image.read_bytes()
    assert data[:4096] == bytes(4096)
    assert data[16 * 512:24 * 512] == bytes(4096)
    assert data[32 * 512:40 * 512] == bytes(4096)
    assert data[8 * 512:16 * 512] == (bytes(range(256)) * 16)
    assert len(data) == IMAGE_BYTES  # KEEP_SIZE: nothing truncated or grown


@pytest.mark.timeout(30)
def test_cache_none_direct_and_bounced(memory, image):
    dev = Blk(memory, image, cache="none")
    try:
        assert dev.image.direct
        pattern = os.urandom(8192)
        memory.write(DATA, pattern)
        dev.request(0, B.VIRTIO_BLK_T_OUT, 8, 8192)  # aligned: straight from guest memory
        dev.request(1, B.VIRTIO_BLK_T_OUT, 3, 1024)  # unaligned offset: read-modify-write through a bounce buffer
        memory.write(DATA + (128 << 10), b"Z" * 1024)
        dev.run(2)
        assert dev.status(0) == dev.status(1) == B.VIRTIO_BLK_S_OK
        data = image.read_bytes()
        assert data[4096:4096 + 8192] == pattern
        assert data[1536:2560] == b"Z" * 1024
        assert data[:1536] == (bytes(range(256)) * 6)
        dev.request(2, B.VIRTIO_BLK_T_IN, 3, 1024)
        dev.run(3)
        assert dev.data(2, 1024) == b"Z" * 1024
    finally:
        dev.close()


@pytest.mark.timeout(30)
def test_batch_of_many_requests(blk, memory, image):
    """A full queue of reads and writes in one notification (the batched path), mixed with past-the-end ones."""
    for slot in range(5):
        memory.write(DATA + (128 << 10) * slot, bytes([slot + 1]) * 4096)
        blk.request(slot, B.VIRTIO_BLK_T_OUT, 64 + 8 * slot, 4096)
    blk.run(5)
    assert all(blk.status(s) == 0 for s in range(5))
    assert blk.device.stats["batched"] == 5
    data = image.read_bytes()
    for slot in range(5):
        assert data[(64 + 8 * slot) * 512:][:4096] == bytes([slot + 1]) * 4096
    for slot in range(5):  # reads of sectors that are not adjacent: one io_uring batch (where the kernel has it)
        blk.request(slot, B.VIRTIO_BLK_T_IN, 64 + 16 * slot, 4096)
    blk.run(10)
    assert all(blk.status(s) == 0 for s in range(5))
    for slot in range(5):
        assert blk.data(slot, 4096) == data[(64 + 16 * slot) * 512:][:4096]
    assert blk.device.stats["uring_batches"] == (1 if blk.device._uring else 0)


@pytest.mark.timeout(30)
def test_adjacent_requests_are_merged_and_land_right(blk, memory, image):
    """Five writes covering sectors 64..103 out of order, then five reads of them: one call per direction."""
    order = [3, 0, 4, 1, 2]
    for slot, k in enumerate(order):
        memory.write(DATA + (128 << 10) * slot, bytes([k + 1]) * 4096)
        blk.request(slot, B.VIRTIO_BLK_T_OUT, 64 + 8 * k, 4096)
    blk.run(5)
    assert blk.device.stats["merged_calls"] == 1
    data = image.read_bytes()
    assert data[64 * 512:104 * 512] == b"".join(bytes([k + 1]) * 4096 for k in range(5))
    for slot, k in enumerate(order):
        memory.write(DATA + (128 << 10) * slot, bytes(4096))
        blk.request(slot, B.VIRTIO_BLK_T_IN, 64 + 8 * k, 4096)
    blk.run(10)
    assert blk.device.stats["merged_calls"] == 2
    for slot, k in enumerate(order):
        assert blk.status(slot) == B.VIRTIO_BLK_S_OK
        assert blk.data(slot, 4096) == bytes([k + 1]) * 4096
