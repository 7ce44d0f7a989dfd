#!/usr/bin/env python3
"""virtio-blk request path throughput and IOPS next to the host's own pread/pwrite loop on the same file, same run.

vmmd side: QUEUE requests (header / data / status chains) already queued in a real GuestMemory, the device set up
through its virtio-mmio registers, then per round ONE QueueNotify and the device's I/O thread serving the whole
ring against the image; timed from the notify to the used-ring interrupt. Host side: scripts/bench/c/pio.c, a C
loop of pread() / pwrite() of the same sizes at the same offsets on the same file, into / from QUEUE buffers in
turn as the device's requests are.
Both with the file in the page cache (cache=writeback) and with O_DIRECT (cache=none); 4 KiB and 128 KiB
requests; sequential offsets (the device merges adjacent requests of a batch into one preadv()/pwritev(), as
QEMU's virtio-blk does; the C loop issues them one by one) and pseudo-random ones (nothing to merge: one call
per request on both sides). 4 KiB random reads from the page cache are the request rate (IOPS). Rounds are
interleaved, best of --repeat.
Goals: >= 0.8x the host's throughput at 128 KiB (read and write, sequential and random, both cache modes),
>= 0.5x its 4 KiB random-read IOPS.
The last line of output is one JSON object with the figures (scripts/bench/common.py finish()).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EXIT_NOT_RUN, REPO, BenchError, build_c_program, finish  # noqa: E402

sys.path.insert(0, str(REPO))
from vmmd.block.image import DiskSpec, open_disk  # noqa: E402
from vmmd.devices import virtio_blk as B  # noqa: E402
from vmmd.devices.virtio_mmio import VirtioMmio  # noqa: E402
from vmmd.devices.virtqueue import DESC_DTYPE, DmaWindows  # noqa: E402
from vmmd.memory import GuestMemory  # noqa: E402

QUEUE = 256  # requests per notification
RING = 1024  # queue size: three descriptors per request
RING_GPA = 0x100000
HDR_GPA = 0x200000
STATUS_GPA = 0x210000
DATA_GPA = 0x1000000
SPAN = 64 << 20  # bytes of the image the requests cover
F_NEXT, F_WRITE = 1, 2


def offsets(start: int, count: int, size: int, random: bool) -> np.ndarray:
    """pio.c offset_of() for requests start .. start+count."""
    i = np.arange(start, start + count, dtype=np.uint64)
    slots = np.uint64(SPAN // size)
    if random:
        return ((i * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(17)) % slots * np.uint64(size)
    return i % slots * np.uint64(size)


class Device:
    """A VirtioBlk behind its transport, programmed through the registers as a driver would."""

    def __init__(self, memory: GuestMemory, path: Path, direct: bool) -> None:
        self.image = open_disk(DiskSpec(str(path), cache="none" if direct else "writeback"))
        self.device = B.VirtioBlk(self.image.fd, self.image.size, direct=direct, queue_num_max=RING)
        self.done = threading.Event()
        self.t = VirtioMmio(self.device, DmaWindows(memory), irq=lambda level: level and self.done.set())
        self.memory = memory
        w = self.t.write
        features = (1 << 32) | (1 << B.VIRTIO_BLK_F_FLUSH)
        for value in (0, 1, 3):
            w(0x70, 4, value)
        w(0x24, 4, 0)
        w(0x20, 4, features & 0xFFFF_FFFF)
        w(0x24, 4, 1)
        w(0x20, 4, features >> 32)
        w(0x70, 4, 11)
        self.avail = RING_GPA + 16 * RING
        self.used = (self.avail + 6 + 2 * RING + 4095) & ~4095
        memory.view(RING_GPA, self.used + 8 * RING + 8 - RING_GPA)[:] = 0
        w(0x30, 4, 0)
        w(0x38, 4, RING)
        for reg, gpa in ((0x80, RING_GPA), (0x90, self.avail), (0xA0, self.used)):
            w(reg, 4, gpa)
            w(reg + 4, 4, 0)
        w(0x44, 4, 1)
        w(0x70, 4, 15)
        self.idx = 0
        self.requests = 0

    def queue(self, read: bool, size: int, offs: np.ndarray) -> None:
        """Fill the ring with QUEUE requests (untimed): descriptors 3j, 3j+1, 3j+2 for request j."""
        n = len(offs)
        desc = np.zeros(RING, dtype=DESC_DTYPE)
        j = np.arange(n)
        desc["addr"][3 * j] = HDR_GPA + 16 * j
        desc["len"][3 * j] = 16
        desc["flags"][3 * j] = F_NEXT
        desc["next"][3 * j] = 3 * j + 1
        desc["addr"][3 * j + 1] = DATA_GPA + size * j
        desc["len"][3 * j + 1] = size
        desc["flags"][3 * j + 1] = F_NEXT | (F_WRITE if read else 0)
        desc["next"][3 * j + 1] = 3 * j + 2
        desc["addr"][3 * j + 2] = STATUS_GPA + j
        desc["len"][3 * j + 2] = 1
        desc["flags"][3 * j + 2] = F_WRITE
        self.memory.view(RING_GPA, desc.nbytes)[:] = desc.view(np.uint8)
        hdr = np.zeros(n, dtype=B.OUTHDR)
        hdr["type"] = B.VIRTIO_BLK_T_IN if read else B.VIRTIO_BLK_T_OUT
        hdr["sector"] = offs // np.uint64(512)
        self.memory.view(HDR_GPA, hdr.nbytes)[:] = hdr.view(np.uint8)
        ring = self.memory.view(self.avail + 4, 2 * RING).view("<u2")
        ring[(self.idx + j) % RING] = 3 * j
        self.idx = (self.idx + n) & 0xFFFF
        self.pending = n

    def serve(self) -> float:
        """Make the queued requests available, notify once, wait for the interrupt: seconds."""
        self.done.clear()
        used = self.memory.view(self.used + 2, 2).view("<u2")
        t0 = time.perf_counter()
        self.memory.view(self.avail + 2, 2).view("<u2")[0] = self.idx
        self.t.write(0x50, 4, 0)
        while used[0] != self.idx:
            self.done.wait(5)
            self.done.clear()
            if time.perf_counter() - t0 > 30:
                raise BenchError(f"the device served {int(used[0])} of {self.idx} requests in 30 s")
        elapsed = time.perf_counter() - t0
        self.t.write(0x64, 4, 1)
        status = self.memory.view(STATUS_GPA, self.pending)
        if status.any():
            raise BenchError(f"{int(np.count_nonzero(status))} requests did not complete with VIRTIO_BLK_S_OK")
        return elapsed

    def close(self) -> None:
        self.device.close()
        self.image.close()


def device_seconds(dev: Device, read: bool, size: int, count: int, random: bool) -> float:
    total = 0.0
    for start in range(0, count, QUEUE):
        dev.queue(read, size, offsets(start, min(QUEUE, count - start), size, random))
        total += dev.serve()
    return total


def host_seconds(pio: Path, path: Path, read: bool, size: int, count: int, random: bool, direct: bool) -> float:
    out = subprocess.run([str(pio), str(path), "r" if read else "w", str(size), str(count), str(SPAN),
                          str(int(random)), str(int(direct)), str(QUEUE)], capture_output=True, text=True)
    if out.returncode:
        raise BenchError(f"pio failed: {out.stderr.strip()}")
    return int(out.stdout) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the image file goes (default: the system's temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-disk-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        pio = build_c_program(tmp, "pio.c", "pio")
        path = tmp / "disk.img"
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * (SPAN >> 20))
        os.fsync(os.open(path, os.O_RDONLY))
        path.read_bytes()  # into the page cache
        memory = GuestMemory.with_ram(128 << 20)
        figures: dict = {"bench": "disk", "queue": QUEUE, "span_mib": SPAN >> 20}
        goals: dict[str, bool | None] = {}
        try:
            for direct in (False, True):
                mode = "direct" if direct else "cache"
                dev = Device(memory, path, direct)
                try:
                    for size in (4096, 128 << 10):
                        count = (8192 if size == 4096 else 2048) // (4 if direct else 1)
                        for random in (False, True):
                            for read in (True, False):
                                key = f"{mode}_{'rand' if random else 'seq'}_{'read' if read else 'write'}_" \
                                      f"{size >> 10}k"
                                best_dev = best_host = float("inf")
                                for _ in range(args.repeat):
                                    best_dev = min(best_dev, device_seconds(dev, read, size, count, random))
                                    best_host = min(best_host, host_seconds(pio, path, read, size, count, random,
                                                                            direct))
                                figures[f"{key}_vmmd_mb_s"] = round(count * size / best_dev / 1e6, 1)
                                figures[f"{key}_host_mb_s"] = round(count * size / best_host / 1e6, 1)
                                figures[f"{key}_ratio"] = round(best_host / best_dev, 3)
                                if size == 4096 and random and read and not direct:
                                    figures["cache_rand_read_4k_vmmd_iops"] = round(count / best_dev)
                                    figures["cache_rand_read_4k_host_iops"] = round(count / best_host)
                                    goals["cache_rand_read_4k_iops_ratio >= 0.5"] = best_host / best_dev >= 0.5
                                if size == 128 << 10:
                                    goals[f"{key}_ratio >= 0.8"] = best_host / best_dev >= 0.8
                finally:
                    figures["merged_calls"] = figures.get("merged_calls", 0) + dev.device.stats["merged_calls"]
                    dev.close()
        finally:
            memory.close()
    return finish(figures, goals)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"disk benchmark: {err}", file=sys.stderr)
        sys.exit(EXIT_NOT_RUN)
