"""The vhost-net datapath: the host kernel moves frames between a virtio-net device's queues and its tap, and
no frame passes through vmmd (drivers/vhost/net.c; Documentation in include/uapi/linux/vhost.h).

vmmd keeps the virtio-mmio transport (registers, feature negotiation, InterruptStatus) and hands the kernel
the rest when the driver sets DRIVER_OK, in the order QEMU's vhost_dev_start() / vhost_net_start() use:
VHOST_SET_OWNER (at open), VHOST_SET_FEATURES (the negotiated features vhost knows), VHOST_SET_MEM_TABLE,
then per queue VHOST_SET_VRING_NUM, _BASE (0), _ADDR (the rings' addresses in vmmd's address space), _KICK
(the queue's ioeventfd: the guest's QueueNotify wakes the kernel's worker directly) and _CALL (an eventfd vmmd
watches: it sets InterruptStatus and raises the interrupt), and last VHOST_NET_SET_BACKEND with the tap. A reset
detaches the tap (fd -1) and reads back the ring positions (VHOST_GET_VRING_BASE).

The memory table holds only the device's DMA windows (vmmd.devices.virtqueue.DmaWindows): all of RAM on
plain, the shared region on SEV platforms, so the kernel can reach exactly what the Python datapath could. The
tap is opened with IFF_VNET_HDR and a 12-byte header (struct virtio_net_hdr_v1), which vhost then passes
through unchanged (VHOST_NET_F_VIRTIO_NET_HDR is not set).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os

from vmmd.errors import VmmdError
from vmmd.net import vhost_uapi as vu

log = logging.getLogger("vmmd.net")

VHOST_MODES = ("auto", "on", "off")


def vhost_unavailable_reason(path: str = vu.VHOST_NET_DEVICE) -> str | None:
    """None when `path` can be opened read-write, else why not, in words."""
    if not os.path.exists(path):
        return f"{path} does not exist (the vhost_net module is not loaded: `modprobe vhost_net`)"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not read-write accessible to this user"
    return None


class VhostError(VmmdError):
    """A vhost ioctl failed."""


def _ioctl(fd: int, request: int, arg, what: str):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as err:
        raise VhostError(f"vhost-net: {what} failed: {err.strerror}") from None


class VhostNet:
    """One /dev/vhost-net instance serving one virtio-net device's queues."""

    def __init__(self, path: str = vu.VHOST_NET_DEVICE) -> None:
        reason = vhost_unavailable_reason(path)
        if reason is not None:
            raise VhostError(f"vhost-net is not available: {reason}")
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            _ioctl(self.fd, vu.VHOST_SET_OWNER, 0, "VHOST_SET_OWNER")
            features = ctypes.c_uint64(0)
            _ioctl(self.fd, vu.VHOST_GET_FEATURES, features, "VHOST_GET_FEATURES")
            self.features = features.value
        except BaseException:
            os.close(self.fd)
            raise
        self.started: list[int] = []

    def start(self, acked_features: int, regions: list[tuple[int, int, int]],
              queues: list[tuple[int, int, int, int, int, int, int]], tap_fd: int) -> None:
        """Hand the queues to the kernel. `regions`: (gpa, size, hva) the device may reach; `queues`: (index,
        size, desc hva, avail hva, used hva, kick eventfd, call eventfd)."""
        missing = acked_features & ~self.features
        if missing:
            raise VhostError(f"vhost-net: the kernel lacks negotiated features {missing:#x}")
        _ioctl(self.fd, vu.VHOST_SET_FEATURES, ctypes.c_uint64(acked_features), "VHOST_SET_FEATURES")
        _ioctl(self.fd, vu.VHOST_SET_MEM_TABLE, vu.memory_table(regions), "VHOST_SET_MEM_TABLE")
        for index, size, desc, avail, used, kick, call in queues:
            _ioctl(self.fd, vu.VHOST_SET_VRING_NUM, vu.vhost_vring_state(index=index, num=size),
                   f"VHOST_SET_VRING_NUM({index})")
            _ioctl(self.fd, vu.VHOST_SET_VRING_BASE, vu.vhost_vring_state(index=index, num=0),
                   f"VHOST_SET_VRING_BASE({index})")
            _ioctl(self.fd, vu.VHOST_SET_VRING_ADDR, vu.vhost_vring_addr(
                index=index, flags=0, desc_user_addr=desc, used_user_addr=used, avail_user_addr=avail),
                f"VHOST_SET_VRING_ADDR({index})")
            _ioctl(self.fd, vu.VHOST_SET_VRING_KICK, vu.vhost_vring_file(index=index, fd=kick),
                   f"VHOST_SET_VRING_KICK({index})")
            _ioctl(self.fd, vu.VHOST_SET_VRING_CALL, vu.vhost_vring_file(index=index, fd=call),
                   f"VHOST_SET_VRING_CALL({index})")
        for index, *_rest in queues:
            _ioctl(self.fd, vu.VHOST_NET_SET_BACKEND, vu.vhost_vring_file(index=index, fd=tap_fd),
                   f"VHOST_NET_SET_BACKEND({index})")
            self.started.append(index)

    def stop(self) -> None:
        """Detach the tap from every started queue (the rings stay the guest's)."""
        for index in self.started:
            try:
                _ioctl(self.fd, vu.VHOST_NET_SET_BACKEND,
                       vu.vhost_vring_file(index=index, fd=vu.VHOST_FILE_UNBIND), f"VHOST_NET_SET_BACKEND({index})")
                _ioctl(self.fd, vu.VHOST_GET_VRING_BASE, vu.vhost_vring_state(index=index),
                       f"VHOST_GET_VRING_BASE({index})")
            except VhostError as err:
                log.warning("%s", err)
        self.started = []

    def close(self) -> None:
        self.stop()
        os.close(self.fd)
        self.fd = -1


def vring_plan(memory, windows, queues) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int, int, int]]]:
    """What VHOST_SET_MEM_TABLE and VHOST_SET_VRING_ADDR are given for these DMA windows and enabled queues:
    (regions as (gpa, size, hva), rings as (index, size, desc hva, avail hva, used hva)). Every ring part lies
    in a window (the transport checked that when the driver enabled the queue)."""
    regions = [(start, end - start, memory.hva(start, end - start)) for start, end, _view, _mv in windows.windows]
    rings = [(q.index, q.size, memory.hva(q.desc_gpa, 16 * q.size), memory.hva(q.driver_gpa, 6 + 2 * q.size),
              memory.hva(q.device_gpa, 6 + 8 * q.size)) for q in queues if q is not None]
    return regions, rings
