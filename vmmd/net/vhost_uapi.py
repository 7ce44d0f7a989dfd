"""ctypes mirrors of include/uapi/linux/vhost_types.h and the ioctl numbers of include/uapi/linux/vhost.h that
the vhost-net backend (vmmd.net.vhost) uses; proven by tests/test_layout.py against the installed headers."""

from __future__ import annotations

import ctypes

from ioctl_opt import IO, IOR, IOW, IOWR

u32, u64 = ctypes.c_uint32, ctypes.c_uint64

VHOST_VIRTIO = 0xAF
VHOST_FILE_UNBIND = -1
VHOST_VRING_F_LOG = 0
VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27  # vhost adds/strips the virtio-net header itself (not set: the tap does)
VHOST_NET_DEVICE = "/dev/vhost-net"


class vhost_vring_state(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint), ("num", ctypes.c_uint)]


class vhost_vring_file(ctypes.Structure):
    """`fd` -1 (VHOST_FILE_UNBIND) detaches."""

    _fields_ = [("index", ctypes.c_uint), ("fd", ctypes.c_int)]


class vhost_vring_addr(ctypes.Structure):
    """The ring's three parts as addresses in the VMM's own address space (not guest-physical)."""

    _fields_ = [("index", ctypes.c_uint), ("flags", ctypes.c_uint), ("desc_user_addr", u64),
                ("used_user_addr", u64), ("avail_user_addr", u64), ("log_guest_addr", u64)]


class vhost_memory_region(ctypes.Structure):
    _fields_ = [("guest_phys_addr", u64), ("memory_size", u64), ("userspace_addr", u64), ("flags_padding", u64)]


class vhost_memory(ctypes.Structure):
    """The header of VHOST_SET_MEM_TABLE's argument; `nregions` vhost_memory_region follow it
    (`regions[]` in the header)."""

    _fields_ = [("nregions", u32), ("padding", u32)]


VHOST_GET_FEATURES = IOR(VHOST_VIRTIO, 0x00, u64)
VHOST_SET_FEATURES = IOW(VHOST_VIRTIO, 0x00, u64)
VHOST_SET_OWNER = IO(VHOST_VIRTIO, 0x01)
VHOST_RESET_OWNER = IO(VHOST_VIRTIO, 0x02)
VHOST_SET_MEM_TABLE = IOW(VHOST_VIRTIO, 0x03, vhost_memory)
VHOST_SET_VRING_NUM = IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
VHOST_SET_VRING_ADDR = IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
VHOST_SET_VRING_BASE = IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_GET_VRING_BASE = IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)
VHOST_SET_VRING_KICK = IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
VHOST_SET_VRING_CALL = IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
VHOST_SET_VRING_ERR = IOW(VHOST_VIRTIO, 0x22, vhost_vring_file)
VHOST_NET_SET_BACKEND = IOW(VHOST_VIRTIO, 0x30, vhost_vring_file)


def memory_table(regions: list[tuple[int, int, int]]) -> ctypes.Array:
    """VHOST_SET_MEM_TABLE's argument for (guest_phys_addr, size, userspace_addr) regions, as one buffer."""

    class vhost_memory_n(ctypes.Structure):
        _fields_ = [("nregions", u32), ("padding", u32), ("regions", vhost_memory_region * len(regions))]

    table = vhost_memory_n(nregions=len(regions))
    for i, (gpa, size, hva) in enumerate(regions):
        table.regions[i] = vhost_memory_region(guest_phys_addr=gpa, memory_size=size, userspace_addr=hva)
    return table


LAYOUT_HEADERS = ["linux/vhost.h"]
LAYOUT_STRUCTS = [vhost_vring_state, vhost_vring_file, vhost_vring_addr, vhost_memory_region, vhost_memory]
LAYOUT_CONSTANTS = [name for name in dir() if name.startswith("VHOST_") and name.isupper()
                    and name != "VHOST_NET_DEVICE"]
