"""Build the initramfs the Linux guest tests boot: busybox and an /init that reaches userspace, says so on the
console, loads the virtio modules, lists the disks and powers off (ACPI S5, so vmctl exits 0).

The archive is a gzip-compressed "newc" cpio (Documentation/driver-api/early-userspace/buffer-format.rst) written
here rather than by cpio(1), with every timestamp, owner and inode number fixed: the same inputs give the same
bytes, so an SEV-ES launch digest of a direct boot with it is reproducible from the files alone.

usage: make_initramfs.py BUSYBOX MODULE_DIR OUT
"""

from __future__ import annotations

import gzip
import os
import sys

MARKER = "vmmd-linux-guest: userspace reached"  # tests/hw look for this line

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio virtio_ring virtio_mmio virtio_blk; do insmod /lib/modules/$m.ko; done
echo "{MARKER}: $(nproc) CPUs, $(sed -n 's/^MemTotal: *//p' /proc/meminfo) MemTotal"
echo "vmmd-linux-guest: block devices: $(ls /sys/block | tr '\\n' ' ')"
poweroff -f
"""


def _entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build(busybox: bytes, modules: dict[str, bytes]) -> bytes:
    entries = [("bin", 0o040755, b""), ("dev", 0o040755, b""), ("proc", 0o040755, b""), ("sys", 0o040755, b""),
               ("lib", 0o040755, b""), ("lib/modules", 0o040755, b""),
               ("bin/busybox", 0o100755, busybox), ("bin/sh", 0o120777, b"busybox"),
               ("init", 0o100755, INIT.encode())]
    entries += [(f"lib/modules/{name}", 0o100644, data) for name, data in sorted(modules.items())]
    archive = b"".join(_entry(name, mode, data, ino) for ino, (name, mode, data) in enumerate(entries, 1))
    archive += _entry("TRAILER!!!", 0, b"", 0)
    return gzip.compress(archive, compresslevel=9, mtime=0)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    busybox_path, module_dir, out = argv[1:]
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    modules = {}
    for name in sorted(os.listdir(module_dir)):
        if name.endswith(".ko"):
            with open(os.path.join(module_dir, name), "rb") as f:
                modules[name] = f.read()
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(build(busybox, modules))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
