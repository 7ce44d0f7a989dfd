"""The MP table (Intel MultiProcessor Specification 1.4) that tells a Linux guest how many CPUs it has.

Layout as Firecracker's src/vmm/src/arch/x86_64/mptable.rs and Linux arch/x86/include/asm/mpspec_def.h: the
MP floating pointer structure in the last KiB of base memory (where Linux's find_smp_config() ->
smp_scan_config(639 * 0x400, 0x400) looks), pointing at a configuration table with one processor entry per
vCPU (APIC ID = vCPU index, vCPU 0 the BSP), the ISA bus, the IOAPIC at 0xFEC00000, one I/O interrupt
entry per ISA IRQ wired to the same IOAPIC pin (KVM's default GSI routing, arch/x86/kvm/irq_comm.c
kvm_setup_default_irq_routing()), ExtINT on LINT0 and NMI on LINT1. Structure sizes are the spec's
(floating pointer 16 bytes, header 44, processor 20, the others 8), checked by tests/unit/test_linux_boot.py.
"""

from __future__ import annotations

import struct

from vmmd.machine.layout import MAX_VCPUS

MPTABLE_GPA = 0x9C000  # the configuration table; reserved in the e820 map up to 640 KiB
MP_FLOATING_POINTER_GPA = 0x9FC00  # the last KiB of base memory
MPTABLE_END = 0xA0000
APIC_DEFAULT_PHYS_BASE = 0xFEE0_0000  # arch/x86/include/asm/apicdef.h
IO_APIC_DEFAULT_PHYS_BASE = 0xFEC0_0000
APIC_VERSION = 0x14  # an integrated xAPIC (what KVM's in-kernel LAPIC reports in its version register)
ISA_IRQS = 16
# entry types and flags (mpspec_def.h)
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
CPU_ENABLED, CPU_BOOTPROCESSOR = 1, 2
MPC_APIC_USABLE = 1
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
MP_IRQPOL_DEFAULT = 0  # conforms to the bus: ISA is edge-triggered, active high
CPU_SIGNATURE_STEPPING = 0x600
CPU_FEATURE_FPU, CPU_FEATURE_APIC = 1 << 0, 1 << 9
MAX_CPUS = MAX_VCPUS  # xAPIC IDs are 8 bits, 0xFF is the broadcast ID and the IOAPIC takes one


def checksum8(data: bytes) -> int:
    """The byte that makes the sum of `data` plus it 0 mod 256 (the MP and ACPI tables' checksum rule)."""
    return -sum(data) & 0xFF


def build_mptable(cpus: int) -> tuple[bytes, bytes]:
    """(configuration table for MPTABLE_GPA, floating pointer for MP_FLOATING_POINTER_GPA) for `cpus` vCPUs."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"an MP table describes 1..{MAX_CPUS} CPUs, not {cpus}")
    ioapic_id = cpus  # the first APIC ID after the CPUs'
    entries = [struct.pack("<BBBBII8x", MP_PROCESSOR, cpu, APIC_VERSION,
                           CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0), CPU_SIGNATURE_STEPPING,
                           CPU_FEATURE_FPU | CPU_FEATURE_APIC) for cpu in range(cpus)]
    entries.append(struct.pack("<BB6s", MP_BUS, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, APIC_VERSION, MPC_APIC_USABLE,
                               IO_APIC_DEFAULT_PHYS_BASE))
    entries += [struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, MP_IRQPOL_DEFAULT, 0, irq, ioapic_id, irq)
                for irq in range(ISA_IRQS)]
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, MP_IRQPOL_DEFAULT, 0, 0, 0, 0))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, MP_IRQPOL_DEFAULT, 0, 0, 0xFF, 1))
    body = b"".join(entries)
    length = 44 + len(body)
    if MPTABLE_GPA + length > MP_FLOATING_POINTER_GPA:
        raise ValueError(f"an MP table of {length} bytes does not fit below the floating pointer")

    def header(checksum: int) -> bytes:
        return struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", length, 4, checksum, b"VMMD    ", b"vmmd        ", 0, 0,
                           len(entries), APIC_DEFAULT_PHYS_BASE, 0, 0, 0)

    table = header(checksum8(header(0) + body)) + body

    def pointer(checksum: int) -> bytes:
        return struct.pack("<4sIBBB5x", b"_MP_", MPTABLE_GPA, 1, 4, checksum)

    return table, pointer(checksum8(pointer(0)))
