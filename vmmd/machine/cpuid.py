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
    """The leaves that name the asking vCPU: its APIC ID (leaf 1), x2APIC ID (0xB, 0x1F) and, on AMD, its
    extended APIC ID and core ID (0x8000001E)."""
    eax, ebx, ecx, edx = regs
    if function == 1:
        ebx = (ebx & 0x00FF_FFFF) | ((vcpu_index & 0xFF) << 24)
    elif function in (0xB, 0x1F):
        edx = vcpu_index
    elif function == 0x8000_001E:
        eax, ebx = vcpu_index, (ebx & ~0xFF) | (vcpu_index & 0xFF)
    return eax, ebx, ecx, edx


# The topology vmmd presents: one package of `vcpus` cores, one thread each, APIC ID = vCPU index (as QEMU's
# -smp N with its defaults on one socket). Leaf encodings: Intel SDM vol. 2A CPUID leaves 01H, 04H, 0BH, 1FH;
# AMD APM vol. 3 E.4.7 (8000_0008h ECX) and E.4.15 (8000_001Eh); QEMU target/i386/cpu.c cpu_x86_cpuid().
CPUID_1_EDX_HTT = 1 << 28
CPUID_1_EDX_APIC = 1 << 9
CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
TOPOLOGY_LEAVES = (0xB, 0x1F)
LEVEL_SMT, LEVEL_CORE = 1, 2  # leaf 0BH ECX[15:8] level types


def _topology_leaves(function: int, vcpus: int) -> list[uapi.kvm_cpuid_entry2]:
    """Leaf 0BH / 1FH subleaves: SMT (1 thread per core), core (`vcpus` cores), then the invalid level."""
    core_bits = (vcpus - 1).bit_length()
    flag = uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [_entry(function, 0, eax=0, ebx=1, ecx=0 | LEVEL_SMT << 8, flags=flag),
            _entry(function, 1, eax=core_bits, ebx=vcpus, ecx=1 | LEVEL_CORE << 8, flags=flag),
            _entry(function, 2, eax=0, ebx=0, ecx=2, flags=flag)]


def _apply_topology(c: uapi.kvm_cpuid_entry2, vcpus: int, amd: bool) -> None:
    """Rewrite one supported entry (in place) for the presented topology; the host's own is meaningless here."""
    core_bits = (vcpus - 1).bit_length()
    if c.function == 1:
        c.ebx = (c.ebx & 0xFF00_FFFF) | ((min(vcpus, 255) & 0xFF) << 16)
        c.edx = c.edx | CPUID_1_EDX_HTT if vcpus > 1 else c.edx & ~CPUID_1_EDX_HTT
    elif c.function == 4 and c.eax & 0x1F:  # a cache descriptor: cores per package, sharing per level
        level = (c.eax >> 5) & 0x7
        sharing = (1 << core_bits) - 1 if level >= 3 else 0
        c.eax = (c.eax & 0x0000_3FFF) | (sharing << 14) | (((1 << core_bits) - 1) << 26)
    elif c.function == 0x8000_0008 and amd:
        c.ecx = (c.ecx & ~0xF0FF) | (core_bits << 12) | ((vcpus - 1) & 0xFF)
    elif c.function == 0x8000_001E:
        c.ebx &= ~0xFF00  # one thread per core
        c.ecx = 0  # node 0, one node per processor


BRAND_LEAVES = (0x8000_0002, 0x8000_0003, 0x8000_0004)


def build_cpuid_table(supported: list[uapi.kvm_cpuid_entry2], vcpu_count: int, platform: str,
                      doorbell_port: int = 0, host_cpuid=None, lapic: bool | None = None) -> CpuidTable:
    """Filter KVM's supported CPUID for this machine.

    - leaf 1: hypervisor bit set; topology (leaves 1, 4, 0xB, 0x1F, 0x80000008, 0x8000001E): one package of
      vcpu_count single-thread cores, APIC ID = vCPU index (per-vCPU values: CpuidTable.for_vcpu);
    - brand string (0x80000002..4): the host's, as QEMU's -cpu host does, where KVM reports it empty
      and `host_cpuid(leaf)` is given;
    - leaf 0x8000001F (AMD memory encryption) only on sev-es, as the hardware reports it;
    - APIC, x2APIC and TSC-deadline bits only where the VM has an in-kernel irqchip (`lapic`; default: on
      sev-es, the platform that always creates one; Linux guests get one on every platform);
    - the emulator's signature leaves only on sev-es-emu.
    """
    if lapic is None:
        lapic = platform == "sev-es"
    entries = []
    amd = any(e.function == 0 and e.ebx == 0x6874_7541 for e in supported)  # "Auth"enticAMD
    topology_done: set[int] = set()
    for e in supported:
        c = uapi.kvm_cpuid_entry2.from_buffer_copy(e)
        if c.function in TOPOLOGY_LEAVES:
            if c.function not in topology_done:  # KVM gives a template; the subleaves are ours
                topology_done.add(c.function)
                entries.extend(_topology_leaves(c.function, vcpu_count))
            continue
        _apply_topology(c, vcpu_count, amd)
        if c.function == 1:
            c.ecx |= CPUID_1_ECX_HYPERVISOR
            if not lapic:  # no in-kernel irqchip, so no local APIC to advertise (QEMU -cpu ...,-apic)
                c.ecx &= ~(CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE)
                c.edx &= ~CPUID_1_EDX_APIC
        if c.function == 0x8000_0001 and not lapic:
            c.edx &= ~CPUID_1_EDX_APIC  # AMD mirrors the APIC bit here
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
