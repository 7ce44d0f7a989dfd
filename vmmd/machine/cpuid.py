"""The guest's CPUID table: KVM_GET_SUPPORTED_CPUID filtered into what KVM_SET_CPUID2 gets.

The same table answers GHCB CPUID events on sev-es-emu (vmmd.sev.vmgexit), so a
guest sees identical values whichever way it asks.
"""

from __future__ import annotations

from vmmd.kvm import uapi

HYPERVISOR_SIGNATURE = b"VmmdGhcbEmu\0"  # CPUID 0x40000100 EBX, ECX, EDX on sev-es-emu
EMU_LEAF_BASE = 0x40000100
CPUID_1_ECX_HYPERVISOR = 1 << 31


def _entry(function: int, index: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0,
           flags: int = 0) -> uapi.kvm_cpuid_entry2:
    return uapi.kvm_cpuid_entry2(function=function, index=index, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx)


def emulator_leaves(doorbell_port: int) -> list[uapi.kvm_cpuid_entry2]:
    """CPUID 0x40000100 (max leaf + "VmmdGhcbEmu\\0") and 0x40000101 (EAX = doorbell port)."""
    ebx, ecx, edx = (int.from_bytes(HYPERVISOR_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))
    return [_entry(EMU_LEAF_BASE, eax=EMU_LEAF_BASE + 1, ebx=ebx, ecx=ecx, edx=edx),
            _entry(EMU_LEAF_BASE + 1, eax=doorbell_port)]


CPUID_1_ECX_XSAVE = 1 << 26


class CpuidTable:
    """An ordered list of kvm_cpuid_entry2 with KVM's lookup rule (arch/x86/kvm/cpuid.c kvm_find_cpuid_entry)."""

    def __init__(self, entries: list[uapi.kvm_cpuid_entry2]) -> None:
        self.entries = entries
        self._index: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self._any_index: dict[int, tuple[int, int, int, int]] = {}
        for e in entries:
            regs = (e.eax, e.ebx, e.ecx, e.edx)
            if e.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX:
                self._index[(e.function, e.index)] = regs
            else:
                self._any_index.setdefault(e.function, regs)

    def lookup(self, function: int, index: int = 0) -> tuple[int, int, int, int]:
        """(eax, ebx, ecx, edx) for the leaf; zeros when the table has no such leaf."""
        regs = self._index.get((function, index))
        if regs is None:
            regs = self._any_index.get(function, (0, 0, 0, 0))
        return regs

    @property
    def has_xsave(self) -> bool:
        """CPUID 1 ECX.XSAVE: whether the entry state may set CR4.OSXSAVE."""
        return bool(self.lookup(1)[2] & CPUID_1_ECX_XSAVE)

    def for_vcpu(self, vcpu_index: int) -> list[uapi.kvm_cpuid_entry2]:
        """Copies with this vCPU's APIC ID in leaf 1 EBX[31:24] and the x2APIC ID in leaves 0xB/0x1F EDX."""
        out = []
        for e in self.entries:
            c = uapi.kvm_cpuid_entry2.from_buffer_copy(e)
            c.eax, c.ebx, c.ecx, c.edx = _per_vcpu(c.function, (c.eax, c.ebx, c.ecx, c.edx), vcpu_index)
            out.append(c)
        return out

    def vcpu_lookup(self, vcpu_index: int, function: int, index: int = 0) -> tuple[int, int, int, int]:
        """lookup() as vCPU `vcpu_index` sees it: the same values KVM answers from that vCPU's for_vcpu() table,
        for CPUID answered by vmmd itself (the GHCB service)."""
        return _per_vcpu(function, self.lookup(function, index), vcpu_index)


def _per_vcpu(function: int, regs: tuple[int, int, int, int], vcpu_index: int) -> tuple[int, int, int, int]:
    eax, ebx, ecx, edx = regs
    if function == 1:
        ebx = (ebx & 0x00FF_FFFF) | ((vcpu_index & 0xFF) << 24)
    elif function in (0xB, 0x1F):
        edx = vcpu_index
    return eax, ebx, ecx, edx


BRAND_LEAVES = (0x8000_0002, 0x8000_0003, 0x8000_0004)


def build_cpuid_table(supported: list[uapi.kvm_cpuid_entry2], vcpu_count: int, platform: str,
                      doorbell_port: int = 0, host_cpuid=None) -> CpuidTable:
    """Filter KVM's supported CPUID for this machine.

    - leaf 1: hypervisor bit set, logical processor count = vcpu_count;
    - brand string (0x80000002..4): the host's, as QEMU's -cpu host does, where KVM reports it empty
      and `host_cpuid(leaf)` is given;
    - leaf 0x8000001F (AMD memory encryption) only on sev-es, as the hardware reports it;
    - the emulator's signature leaves only on sev-es-emu.
    """
    entries = []
    for e in supported:
        c = uapi.kvm_cpuid_entry2.from_buffer_copy(e)
        if c.function == 1:
            c.ecx |= CPUID_1_ECX_HYPERVISOR
            c.ebx = (c.ebx & 0xFF00_FFFF) | ((min(vcpu_count, 255) & 0xFF) << 16)
        if c.function == 0x8000001F and platform != "sev-es":
            continue
        if EMU_LEAF_BASE <= c.function < EMU_LEAF_BASE + 0x100:
            continue
        if c.function in BRAND_LEAVES and host_cpuid is not None and not (c.eax | c.ebx | c.ecx | c.edx):
            try:
                c.eax, c.ebx, c.ecx, c.edx = host_cpuid(c.function)
            except OSError:
                pass
        entries.append(c)
    if platform == "sev-es-emu":
        entries.extend(emulator_leaves(doorbell_port))
    return CpuidTable(entries)
