"""Python mirror of firmware/include/bootinfo.h (the one definition of the boot-info page).

tests/test_layout.py compiles that header and compares every offset and constant
here with it, so the VMM and the firmware cannot disagree.
"""

from __future__ import annotations

import ctypes
import os

u16, u32, u64 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

VMMD_BOOTINFO_MAGIC = 0x4F464E49444D4D56  # "VMMDINFO"
VMMD_BOOTINFO_VERSION = 1
VMMD_PLATFORM_PLAIN = 0
VMMD_PLATFORM_SEV_ES = 1
VMMD_PLATFORM_SEV_ES_EMU = 2
VMMD_MEM_RAM = 1
VMMD_MEM_RESERVED = 2
VMMD_MEM_SHARED = 3
VMMD_MAX_MEM_RANGES = 16
VMMD_MAX_DISKS = 4

PLATFORM_CODES = {"plain": VMMD_PLATFORM_PLAIN, "sev-es": VMMD_PLATFORM_SEV_ES,
                  "sev-es-emu": VMMD_PLATFORM_SEV_ES_EMU}


class vmmd_mem_range(ctypes.Structure):
    _fields_ = [("gpa", u64), ("size", u64), ("type", u32), ("reserved", u32)]


class vmmd_bootinfo(ctypes.Structure):
    _fields_ = [("magic", u64), ("version", u32), ("size", u32), ("platform", u32), ("cpu_count", u32),
                ("console_port", u16), ("debug_exit_port", u16), ("doorbell_port", u16), ("reserved0", u16),
                ("ghcb_gpa", u64), ("shared_gpa", u64), ("shared_size", u64), ("c_bit", u32),
                ("mem_range_count", u32), ("mem_ranges", vmmd_mem_range * VMMD_MAX_MEM_RANGES),
                ("guest_arg", u64), ("mmio_testdev_gpa", u64), ("virtio_net_gpa", u64),
                ("secret_gpa", u64), ("secret_size", u64),
                ("virtio_blk_count", u32), ("reserved1", u32), ("virtio_blk_gpa", u64 * VMMD_MAX_DISKS)]


LAYOUT_HEADERS = ["bootinfo.h"]
LAYOUT_INCLUDE_DIRS = [os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   "firmware", "include")]
LAYOUT_STRUCTS = [vmmd_mem_range, vmmd_bootinfo]
LAYOUT_CONSTANTS = [name for name in dir() if name.startswith("VMMD_") and name.isupper()]
