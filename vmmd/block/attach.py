"""Plug a machine's disks in: open and lock each image, put a virtio-blk device for it on the MMIO bus.

Machine.build() calls `attach_disks(machine, cfg.disks)` once its VM exists; Machine.close() calls
`handle.close()`, which stops the I/O threads and closes the images (releasing their locks). Disk n sits at
layout.VIRTIO_BLK_MMIO_GPA + n * VIRTIO_MMIO_SIZE with ISA IRQ layout.VIRTIO_BLK_IRQS[n]; the boot-info page
lists the register pages for vmmd's firmware, the ACPI DSDT and virtio_mmio.device= for Linux.
"""

from __future__ import annotations

import logging

from vmmd.block.image import DiskImage, DiskSpec, check_disk_count, open_disk
from vmmd.devices.virtio_blk import VirtioBlk
from vmmd.devices.virtio_fastpath import attach_fast_path
from vmmd.devices.virtio_mmio import VirtioMmio
from vmmd.devices.virtqueue import DmaWindows
from vmmd.machine import layout as L

log = logging.getLogger("vmmd.blk")

SEV_PLATFORMS = ("sev-es", "sev-es-emu")


def disk_mmio_gpa(index: int) -> int:
    return L.VIRTIO_BLK_MMIO_GPA + index * L.VIRTIO_MMIO_SIZE


class Disk:
    def __init__(self, image: DiskImage, device: VirtioBlk, transport: VirtioMmio, gpa: int) -> None:
        self.image, self.device, self.transport, self.gpa = image, device, transport, gpa

    @property
    def io_path(self) -> str:
        return self.transport.io_path


class DisksHandle:
    """What attach_disks() made; close() undoes all of it and never raises."""

    def __init__(self) -> None:
        self.disks: list[Disk] = []

    def close(self) -> None:
        for disk in self.disks:
            for what, step in (("stop the notify thread", disk.transport.close_fast_path), ("stop the I/O thread",
                                                                                   disk.device.close),
                               ("close the image", disk.image.close)):
                try:
                    step()
                except Exception as err:  # noqa: BLE001 - close must finish
                    log.warning("disk close: could not %s (%s): %s", what, disk.image.spec.path, err)
        self.disks = []


def attach_disks(machine, specs: list[DiskSpec]) -> DisksHandle:
    """Open every image (VmmdError, exit 3, naming the first that cannot be used) and plug its device in.

    On SEV platforms a device may only reach the shared region (layout.SHARED_GPA) and insists on
    VIRTIO_F_ACCESS_PLATFORM, as virtio-net does."""
    check_disk_count(specs)
    sev = getattr(machine.platform, "name", "plain") in SEV_PLATFORMS
    handle = DisksHandle()
    try:
        for index, spec in enumerate(specs):
            image = open_disk(spec)
            device = transport = None
            try:
                windows = DmaWindows(machine.memory, [(L.SHARED_GPA, L.SHARED_SIZE)] if sev else None)
                device = VirtioBlk(image.fd, image.size, name=f"virtio-blk {spec.path}", read_only=spec.read_only,
                                   direct=image.direct, serial=spec.serial, discard=not image.block_device,
                                   require_access_platform=sev)
                transport = VirtioMmio(device, windows, irq=_irq_line(machine, L.VIRTIO_BLK_IRQS[index]))
                machine.mmio_bus.insert(transport, disk_mmio_gpa(index), L.VIRTIO_MMIO_SIZE)
                attach_fast_path(machine, transport, disk_mmio_gpa(index), L.VIRTIO_BLK_IRQS[index], device.name)
            except BaseException:
                if transport is not None:
                    transport.close_fast_path()
                if device is not None:
                    device.close()
                image.close()
                raise
            handle.disks.append(Disk(image, device, transport, disk_mmio_gpa(index)))
            log.info("guest %s: virtio-blk at %#x: %s, %d sectors, %s", machine.config.name,
                     disk_mmio_gpa(index), spec.describe(), image.sectors, handle.disks[-1].io_path)
    except BaseException:
        handle.close()
        raise
    return handle


def _irq_line(machine, irq: int):
    """A level-triggered line through KVM_IRQ_LINE when the VM has an in-kernel irqchip, else None (guests poll)."""
    vm = machine.vm
    irq_line = getattr(vm, "irq_line", None)
    if irq_line is None or not getattr(vm, "has_irqchip", False):
        return None
    return lambda level: irq_line(irq, 1 if level else 0)
