"""vmmd.devices.uring: batches of reads and writes through a real io_uring, results per request (bytes, short
counts at the end of the file, -errno), and batches larger than the ring."""

from __future__ import annotations

import errno
import mmap
import os
import tempfile

import numpy as np
import pytest

from vmmd.devices.uring import Uring


@pytest.fixture
def ring(request):
    r = Uring.create(8)
    if r is None:  # the kernel's choice (CONFIG_IO_URING, kernel.io_uring_disabled, a seccomp filter)
        request.node.add_marker(pytest.mark.hw)
        pytest.skip("this kernel refuses io_uring (io_uring_setup failed)")
    yield r
    r.close()


def _addr(buf: mmap.mmap) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def test_reads_and_writes_in_one_batch_larger_than_the_ring(ring, tmp_path):
    path = tmp_path / "f"
    content = os.urandom(64 << 10)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDWR)
    buf = mmap.mmap(-1, 64 << 10)
    try:
        n = 20  # more than the 8 slots: three submissions
        write = np.zeros(n, dtype=bool)
        write[10:] = True
        buf[10 * 2048:20 * 2048] = b"W" * (10 * 2048)
        addrs = np.uint64(_addr(buf)) + np.arange(n, dtype=np.uint64) * np.uint64(2048)
        offsets = np.arange(n, dtype=np.int64)[::-1] * 2048  # reads from the end, writes at the start
        done = ring.run(write, fd, addrs, np.full(n, 2048, dtype=np.int64), offsets)
        assert done.tolist() == [2048] * n
        for i in range(10):
            assert buf[i * 2048:(i + 1) * 2048] == content[(19 - i) * 2048:(20 - i) * 2048]
        assert path.read_bytes()[:10 * 2048] == b"W" * (10 * 2048)
    finally:
        os.close(fd)
        buf.close()


def test_short_reads_and_errors_are_per_request(ring, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY)
    buf = mmap.mmap(-1, 8192)
    try:
        addrs = np.array([_addr(buf), _addr(buf) + 4096], dtype=np.uint64)
        done = ring.run(np.array([False, True]), fd, addrs, np.array([4096, 512]), np.array([0, 0]))
        assert done[0] == 1000  # the file ends there
        assert done[1] == -errno.EBADF  # a write on a read-only descriptor
    finally:
        os.close(fd)
        buf.close()


@pytest.mark.timeout(30)
def test_the_disk_works_without_io_uring():
    """Where the kernel has no io_uring the device uses one system call per request (the same results)."""
    from tests.unit.test_virtio_blk import Blk
    from vmmd.devices import virtio_blk as B
    from vmmd.memory import GuestMemory

    memory = GuestMemory.with_ram(8 << 20)
    with tempfile.TemporaryDirectory() as where:
        path = os.path.join(where, "img")
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * 4096)
        dev = Blk(memory, path)
        dev.device._uring = None  # as Uring.create() leaves it where io_uring_setup is refused
        try:
            for slot in range(4):
                dev.request(slot, B.VIRTIO_BLK_T_IN, 64 * slot, 512)
            dev.run(4)
            assert all(dev.status(s) == 0 for s in range(4))
            assert dev.data(3, 512) == bytes(range(256)) * 2
            assert dev.device.stats["uring_batches"] == 0 and dev.device.stats["batched"] == 4
        finally:
            dev.close()
            memory.close()
