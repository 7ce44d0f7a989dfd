"""Machine configuration: a validated dataclass, and parsing of human sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from os import PathLike

from vmmd.errors import ExitCode, VmmdError
from vmmd.machine import layout as L
from vmmd.memory import MIN_MEMORY_BYTES, PAGE_SIZE

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
DEFAULT_MEMORY = "64M"


def parse_size(text: str | int) -> int:
    """'64M', '2G', '4096', '512K', '1GiB' -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise VmmdError(f"memory size {text!r} is not a size: use a number of bytes or a suffix K, M, G, T (e.g. "
                        "64M)", ExitCode.USAGE)
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


MAX_MEMORY_BYTES = 1 << 46  # 64 TiB: far above any host here, far below what overflows an mmap length
MAX_TIMEOUT_SECONDS = 365 * 86400
MAX_STOP_TIMEOUT_SECONDS = 600.0  # how long `vmctl stop --timeout` may give a guest before SIGKILL


def check_seconds(value: float | None, what: str, maximum: float = MAX_TIMEOUT_SECONDS) -> float | None:
    """The one rule for every timeout a user gives (run -t, stop --timeout, definitions): a number of seconds
    above 0 and at most `maximum`, or None for no limit. VmmdError (exit 3) naming `what` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= maximum:  # NaN fails too
        raise VmmdError(f"{what} must be a number of seconds above 0 and at most {maximum:g} (leave it out for "
                        f"the default), got {value!r}")
    return float(value)


@dataclass
class MachineConfig:
    firmware: str | PathLike | None  # a flat or reset-vector image; None for a direct kernel boot
    memory_bytes: int = 64 << 20
    cpus: int = 1
    platform: str = "auto"
    timeout: float | None = None  # seconds; None = no limit
    guest_arg: int = 0
    name: str = "guest"
    firmware_type: str = "auto"  # auto | flat | reset-vector (vmmd.machine.loader.FIRMWARE_TYPES)
    net: str | None = None  # "tap[:BRIDGE]": a virtio-net device backed by a tap (vmmd.net)
    kernel: str | PathLike | None = None  # direct Linux boot (vmmd.machine.linux): bzImage or ELF vmlinux
    initrd: str | PathLike | None = None
    append: str | None = None  # the kernel command line; None: vmmd.machine.linux.DEFAULT_APPEND
    disks: tuple = ()  # vmmd.block.image.DiskSpec each: a virtio-blk device per image (vmmd.block)
    eventfds: bool = True  # virtio notify and interrupt through KVM_IOEVENTFD / KVM_IRQFD where KVM has them

    def validate(self) -> MachineConfig:
        if (self.firmware is None) == (self.kernel is None):
            raise VmmdError("give either a firmware image or --kernel (a Linux kernel), not both and not neither",
                            ExitCode.USAGE)
        if self.kernel is None and (self.initrd is not None or self.append is not None):
            raise VmmdError("--initrd and --append go with --kernel", ExitCode.USAGE)
        if self.memory_bytes % PAGE_SIZE:
            raise VmmdError(f"memory size {self.memory_bytes} bytes is not a multiple of 4 KiB")
        if self.memory_bytes < MIN_MEMORY_BYTES:
            raise VmmdError(f"memory size {self.memory_bytes} bytes is too small: at least {MIN_MEMORY_BYTES >> 20} "
                            "MiB are needed")
        if self.memory_bytes > MAX_MEMORY_BYTES:
            raise VmmdError(f"memory size {self.memory_bytes} bytes is more than vmmd maps for a guest "
                            f"({MAX_MEMORY_BYTES >> 40} TiB)")
        if not 1 <= self.cpus <= L.MAX_VCPUS:
            raise VmmdError(f"cpus must be 1..{L.MAX_VCPUS}, got {self.cpus}")
        check_seconds(self.timeout, "timeout")
        if self.disks:
            from vmmd.block.image import check_disk_count

            check_disk_count(list(self.disks))
        if not 0 <= self.guest_arg < 1 << 64:
            raise VmmdError(f"guest_arg must fit 64 bits unsigned, got {self.guest_arg}")
        return self
