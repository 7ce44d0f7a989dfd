"""A tiny virtio-mmio driver in Python for the tests: programs a device through its registers on a real MmioBus
and builds split rings by hand in a real GuestMemory (virtio 1.x spec 3.1.1 / 2.7)."""

from __future__ import annotations

import socket
import struct
import time

from vmmd.devices.bus import MmioBus
from vmmd.devices.virtio_mmio import VirtioMmio
from vmmd.devices.virtio_net import VirtioNet
from vmmd.devices.virtqueue import DmaWindows
from vmmd.memory import GuestMemory

BASE = 0xFEB0_1000
R = {"magic": 0x0, "version": 0x4, "device_id": 0x8, "dev_features": 0x10, "dev_features_sel": 0x14,
     "drv_features": 0x20, "drv_features_sel": 0x24, "queue_sel": 0x30, "queue_num_max": 0x34, "queue_num": 0x38,
     "queue_ready": 0x44, "queue_notify": 0x50, "int_status": 0x60, "int_ack": 0x64, "status": 0x70,
     "desc_lo": 0x80, "desc_hi": 0x84, "avail_lo": 0x90, "avail_hi": 0x94, "used_lo": 0xA0, "used_hi": 0xA4,
     "config_gen": 0xFC}
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40
F_NEXT, F_WRITE = 1, 2


class Ring:
    """Driver-side view of one split queue placed at `gpa` (desc | avail | used, each page aligned)."""

    def __init__(self, memory: GuestMemory, gpa: int, size: int) -> None:
        self.memory, self.size = memory, size
        self.desc = gpa
        self.avail = gpa + 16 * size
        self.used = (self.avail + 6 + 2 * size + 4095) & ~4095
        self.avail_idx = 0
        self.seen_used = 0

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.memory.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head: int) -> None:
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]

    def used_entry(self, n: int) -> tuple[int, int]:
        return struct.unpack("<II", self.memory.read(self.used + 4 + 8 * (n % self.size), 8))


class Driver:
    def __init__(self, memory: GuestMemory, transport: VirtioMmio) -> None:
        self.memory = memory
        self.bus = MmioBus()
        self.bus.insert(transport, BASE, 0x1000)
        self.transport = transport

    def r(self, name: str) -> int:
        return self.bus.read(BASE + R[name], 4)

    def w(self, name: str, value: int) -> None:
        self.bus.write(BASE + R[name], 4, value)

    def features(self) -> int:
        self.w("dev_features_sel", 0)
        low = self.r("dev_features")
        self.w("dev_features_sel", 1)
        return low | self.r("dev_features") << 32

    def negotiate(self, features: int) -> int:
        self.w("status", 0)
        self.w("status", ACK)
        self.w("status", ACK | DRIVER)
        self.w("drv_features_sel", 0)
        self.w("drv_features", features & 0xFFFF_FFFF)
        self.w("drv_features_sel", 1)
        self.w("drv_features", features >> 32)
        self.w("status", ACK | DRIVER | FEATURES_OK)
        return self.r("status")

    def setup_queue(self, index: int, ring: Ring) -> None:
        self.w("queue_sel", index)
        self.w("queue_num", ring.size)
        for name, gpa in (("desc", ring.desc), ("avail", ring.avail), ("used", ring.used)):
            self.w(f"{name}_lo", gpa & 0xFFFF_FFFF)
            self.w(f"{name}_hi", gpa >> 32)
        self.w("queue_ready", 1)

    def driver_ok(self) -> None:
        self.w("status", self.r("status") | DRIVER_OK)

    def notify(self, index: int) -> None:
        self.w("queue_notify", index)


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def net_device(memory: GuestMemory, windows: list[tuple[int, int]] | None = None, **kwargs):
    """(device, transport, driver, host_socket): a VirtioNet whose 'tap' is one end of a datagram socketpair."""
    host, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev_end.setblocking(False)
    device = VirtioNet(dev_end.fileno(), b"\x02\x11\x22\x33\x44\x55", name="virtio-net test", **kwargs)
    device._keep = dev_end  # the socket object owns the fd
    transport = VirtioMmio(device, DmaWindows(memory, windows))
    return device, transport, Driver(memory, transport), host
