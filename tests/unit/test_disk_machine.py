"""Where guests find disks: the boot-info page for vmmd firmware, the ACPI DSDT and virtio_mmio.device= for
Linux (docs/disks.md)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

from vmmd.block.image import DiskSpec
from vmmd.machine import acpi
from vmmd.machine import bootinfo as bi
from vmmd.machine import layout as L
from vmmd.machine.config import MachineConfig
from vmmd.machine.loader import load_flat_firmware
from vmmd.machine.machine import disk_gpas, virtio_devices, virtio_kernel_args
from vmmd.memory import GuestMemory

CFG = MachineConfig(firmware=None, kernel="bzImage", net="tap", disks=(DiskSpec("a.img"), DiskSpec("b.img", True)))


def test_disks_follow_the_net_device_in_order():
    devices = virtio_devices(CFG)
    assert [(d.gpa, d.irq) for d in devices] == [(L.VIRTIO_NET_MMIO_GPA, L.VIRTIO_NET_IRQ), (0xFEB0_2000, 6),
                                                 (0xFEB0_3000, 7)]
    assert virtio_kernel_args(CFG) == ["virtio_mmio.device=4K@0xfeb01000:5", "virtio_mmio.device=4K@0xfeb02000:6",
                                       "virtio_mmio.device=4K@0xfeb03000:7"]
    assert disk_gpas(CFG) == (0xFEB0_2000, 0xFEB0_3000)


def test_dsdt_describes_each_disk(tmp_path: Path):
    iasl = shutil.which("iasl")
    assert iasl, "iasl (Debian's acpica-tools) is missing: make test installs it"
    path = tmp_path / "dsdt.dat"
    path.write_bytes(acpi.build_dsdt(virtio_devices(CFG)))
    run = subprocess.run([iasl, "-d", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    dsl = path.with_suffix(".dsl").read_text()
    assert dsl.count('Name (_HID, "LNRO0005")') == 3
    for gpa, irq in ((0xFEB0_2000, 6), (0xFEB0_3000, 7)):
        assert f"0x{gpa:08X}" in dsl and f"0x{irq:08X}" in dsl


def test_boot_info_lists_the_disks(tmp_path: Path):
    image = tmp_path / "fw.bin"
    image.write_bytes(b"\xf4" * 16)
    memory = GuestMemory.with_ram(4 << 20)
    try:
        load_flat_firmware(memory, image, "plain", 1, virtio_blk_gpas=(0xFEB0_2000, 0xFEB0_3000))
        info = bi.vmmd_bootinfo.from_buffer_copy(memory.read(L.BOOTINFO_GPA, ctypes.sizeof(bi.vmmd_bootinfo)))
    finally:
        memory.close()
    assert info.size == ctypes.sizeof(bi.vmmd_bootinfo)
    assert info.virtio_blk_count == 2
    assert list(info.virtio_blk_gpa) == [0xFEB0_2000, 0xFEB0_3000, 0, 0]
