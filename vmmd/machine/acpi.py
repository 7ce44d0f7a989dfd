"""ACPI tables for Linux guests: how a distribution kernel (which may lack MP-table parsing, as Debian's cloud
kernel does: CONFIG_X86_MPPARSE is off) learns its CPUs, its virtio-mmio devices and how to reset and power off.

Hardware-reduced ACPI (ACPI 6.5, 4.1 "Hardware-Reduced ACPI"), as Firecracker's and QEMU microvm's tables are:
- RSDP (5.2.5) at ACPI_GPA, also found by the kernel through boot_params.acpi_rsdp_addr;
- XSDT (5.2.8) listing the FADT and the MADT;
- FADT (5.2.9, revision 6): HW_REDUCED_ACPI, the DSDT, the reset register (port 0xCF9, value 6: Linux's
  default reboot path, BOOT_ACPI, lands on vmmd's reset control), sleep control/status registers at
  SLEEP_CONTROL_PORT (so `poweroff` reaches vmmd as an S5 request), "VGA not present", the i8042 present;
- MADT (5.2.12): one enabled local APIC per vCPU (APIC ID = vCPU index), the IOAPIC at 0xFEC00000 with GSI
  base 0 (KVM's default routing: GSI n = IOAPIC pin n), LINT1 as NMI;
- DSDT (5.2.11.1) in AML (ACPI 6.5, 20 "ACPI Machine Language Specification"): \\_S5 = {5, 5}, and per
  virtio-mmio device a Device with _HID "LNRO0005" (drivers/virtio/virtio_mmio.c virtio_mmio_acpi_match), its
  register page (Memory32Fixed) and interrupt (Extended Interrupt, edge, active high) in _CRS.
Every table carries a checksum that makes its bytes sum to 0 (5.2.6); the whole set is built here as bytes
and written at ACPI_GPA, in the BIOS area (0xE0000..0xFFFFF) that the e820 map leaves out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmmd.machine.layout import SLEEP_CONTROL_PORT, SLEEP_TYPE_S5  # FADT SLEEP_CONTROL_REG; STATUS next
from vmmd.machine.mptable import APIC_DEFAULT_PHYS_BASE, IO_APIC_DEFAULT_PHYS_BASE, checksum8

ACPI_GPA = 0xE0000
ACPI_MAX_BYTES = 0x20000  # up to 1 MiB
RESET_PORT, RESET_VALUE = 0xCF9, 0x06
OEM_ID, OEM_TABLE_ID = b"VMMD  ", b"VMMDVM  "
LAPIC_NMI_LINT = 1

FADT_WBINVD = 1 << 0
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
GAS_SYSTEM_IO = 1
GAS_BYTE_ACCESS = 1
MADT_PCAT_COMPAT = 1


@dataclass(frozen=True)
class MmioDevice:
    """A virtio-mmio register window the DSDT describes."""

    gpa: int
    size: int
    irq: int


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """An ACPI table: the 36-byte description header (5.2.6) before `body`, checksummed."""
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, b"VMMD", 1)
    data = bytearray(header + body)
    data[9] = checksum8(data)
    return bytes(data)


def _gas(address: int, width: int = 8) -> bytes:
    """A Generic Address Structure (5.2.3.2) for an I/O port."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width, 0, GAS_BYTE_ACCESS, address)


# --- AML (ACPI 6.5, 20.2) ---------------------------------------------------------------------------------------
def _pkg_length(content_length: int) -> bytes:
    """PkgLength encoding (20.2.4) of a package whose content (after the PkgLength) is `content_length` bytes;
    the encoded length counts the PkgLength bytes themselves."""
    for extra in range(4):
        total = content_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | total & 0xF]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError("AML package too large")


def _name_seg(name: str) -> bytes:
    seg = name.encode().ljust(4, b"_")
    if len(seg) != 4:
        raise ValueError(f"AML name {name!r} is longer than 4 characters")
    return seg


def _integer(value: int) -> bytes:
    if value in (0, 1):
        return bytes([value])  # ZeroOp, OneOp
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"AML integer {value} too large")


def _name(name: str, value: bytes) -> bytes:
    return b"\x08" + _name_seg(name) + value  # NameOp


def _string(text: str) -> bytes:
    return b"\x0D" + text.encode() + b"\x00"  # StringPrefix


def _buffer(data: bytes) -> bytes:
    content = _integer(len(data)) + data
    return b"\x11" + _pkg_length(len(content)) + content  # BufferOp


def _package(elements: list[bytes]) -> bytes:
    content = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + _pkg_length(len(content)) + content  # PackageOp


def _device(name: str, body: bytes) -> bytes:
    content = _name_seg(name) + body
    return b"\x5B\x82" + _pkg_length(len(content)) + content  # DeviceOp


def _scope(path: bytes, body: bytes) -> bytes:
    content = path + body
    return b"\x10" + _pkg_length(len(content)) + content  # ScopeOp


def _resource_template(descriptors: bytes) -> bytes:
    """A ResourceTemplate: the descriptors and an End Tag (6.4.2.9) whose checksum 0 means "none"."""
    return _buffer(descriptors + b"\x79\x00")


def _memory32_fixed(base: int, size: int) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, 1, base, size)  # 6.4.3.4, read-write


def _extended_interrupt(irq: int) -> bytes:
    return struct.pack("<BHBBI", 0x89, 6, 0x03, 1, irq)  # 6.4.3.6: consumer, edge, active high, exclusive


def build_dsdt(devices: list[MmioDevice]) -> bytes:
    body = b"".join(_device(f"V{i:03X}", _name("_HID", _string("LNRO0005")) + _name("_UID", _integer(i))
                            + _name("_CCA", _integer(1))
                            + _name("_CRS", _resource_template(_memory32_fixed(d.gpa, d.size)
                                                               + _extended_interrupt(d.irq))))
                    for i, d in enumerate(devices))
    aml = _name("_S5_", _package([_integer(SLEEP_TYPE_S5), _integer(SLEEP_TYPE_S5)]))
    if body:
        aml += _scope(b"\\_SB_", body)
    return _table(b"DSDT", 2, aml)


def build_madt(cpus: int) -> bytes:
    entries = [struct.pack("<BBBBI", 0, 8, cpu, cpu, 1) for cpu in range(cpus)]  # Processor Local APIC, enabled
    entries.append(struct.pack("<BBBBII", 1, 12, cpus, 0, IO_APIC_DEFAULT_PHYS_BASE, 0))  # I/O APIC, GSI base 0
    entries.append(struct.pack("<BBBHB", 4, 6, 0xFF, 0, LAPIC_NMI_LINT))  # Local APIC NMI, all processors
    return _table(b"APIC", 5, struct.pack("<II", APIC_DEFAULT_PHYS_BASE, MADT_PCAT_COMPAT) + b"".join(entries))


def build_fadt(dsdt_gpa: int) -> bytes:
    body = bytearray(276 - 36)
    struct.pack_into("<I", body, 40 - 36, dsdt_gpa)
    struct.pack_into("<H", body, 109 - 36, IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT)
    struct.pack_into("<I", body, 112 - 36, FADT_WBINVD | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI)
    body[116 - 36:128 - 36] = _gas(RESET_PORT)
    body[128 - 36] = RESET_VALUE
    body[131 - 36] = 5  # FADT minor version: ACPI 6.5
    struct.pack_into("<Q", body, 140 - 36, dsdt_gpa)  # X_DSDT
    body[244 - 36:256 - 36] = _gas(SLEEP_CONTROL_PORT)
    body[256 - 36:268 - 36] = _gas(SLEEP_CONTROL_PORT + 1)
    body[268 - 36:276 - 36] = b"VMMDVMMD"  # hypervisor vendor identity
    return _table(b"FACP", 6, bytes(body))


def _rsdp(xsdt_gpa: int) -> bytes:
    """RSDP revision 2 (5.2.5.3): checksum over the first 20 bytes, extended checksum over all 36."""
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_gpa, 0))
    data[8] = checksum8(data[:20])
    data[32] = checksum8(data)
    return bytes(data)


def build_acpi_tables(cpus: int, devices: list[MmioDevice], base: int = ACPI_GPA) -> bytes:
    """RSDP, XSDT, FADT, MADT and DSDT laid out from `base` (each 16-byte aligned), as one blob."""
    def align(n: int) -> int:
        return (n + 15) & ~15

    dsdt = build_dsdt(devices)
    madt = build_madt(cpus)
    rsdp_at = base
    xsdt_at = align(rsdp_at + 36)
    fadt_at = align(xsdt_at + 36 + 16)
    madt_at = align(fadt_at + 276)
    dsdt_at = align(madt_at + len(madt))
    xsdt = _table(b"XSDT", 1, struct.pack("<QQ", fadt_at, madt_at))
    blob = bytearray(align(dsdt_at + len(dsdt)) - base)
    for at, table in ((rsdp_at, _rsdp(xsdt_at)), (xsdt_at, xsdt), (fadt_at, build_fadt(dsdt_at)),
                      (madt_at, madt), (dsdt_at, dsdt)):
        blob[at - base:at - base + len(table)] = table
    if len(blob) > ACPI_MAX_BYTES:
        raise ValueError(f"ACPI tables of {len(blob)} bytes do not fit the BIOS area")
    return bytes(blob)
