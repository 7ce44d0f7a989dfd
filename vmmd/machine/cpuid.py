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


# Vendors for which KVM answers out-of-range leaves with zeros (arch/x86/kvm/kvm_emulate.h is_guest_vendor_amd(),
# is_guest_vendor_hygon(); CPUID 0 EBX, ECX, EDX): "AuthenticAMD", "AMDisbetter!", "HygonGenuine".
ZERO_OUT_OF_RANGE_VENDORS = frozenset({(0x6874_7541, 0x444D_4163, 0x6974_6E65), (0x6944_4D41, 0x2172_6574, 0x7465_6273),
                                       (0x6F67_7948, 0x656E_6975, 0x6E65_476E)})
Regs = tuple[int, int, int, int]


class CpuidTable:
    """An ordered list of kvm_cpuid_entry2 with KVM's lookup rules (arch/x86/kvm/cpuid.c)."""

    def __init__(self, entries: list[uapi.kvm_cpuid_entry2]) -> None:
        self.entries = entries
        # function -> [(index, index significant, regs)] in table order (cpuid_entry2_find() walks it in order)
        self._by_function: dict[int, list[tuple[int, bool, Regs]]] = {}
        for e in entries:
            significant = bool(e.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
            self._by_function.setdefault(e.function, []).append((e.index, significant, (e.eax, e.ebx, e.ecx, e.edx)))

    def find(self, function: int, index: int | None = None) -> Regs | None:
        """kvm_find_cpuid_entry_index(): the first entry for `function` whose index is not significant or equals
        `index`; index None is KVM_CPUID_INDEX_NOT_SIGNIFICANT (kvm_find_cpuid_entry(): the first entry)."""
        for entry_index, significant, regs in self._by_function.get(function, ()):
            if index is None or not significant or entry_index == index:
                return regs
        return None

    def lookup(self, function: int, index: int = 0) -> Regs:
        """(eax, ebx, ecx, edx) of the leaf as the table holds it; zeros when the table has no such leaf. This is
        what KVM's guest_cpuid_has() and friends read; a guest's CPUID gets kvm_cpuid() (vcpu_lookup)."""
        regs = self.find(function, index)
        return regs if regs is not None else (0, 0, 0, 0)

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

    def _vcpu_find(self, vcpu_index: int, function: int, index: int | None) -> Regs | None:
        regs = self.find(function, index)
        return None if regs is None else _per_vcpu(function, regs, vcpu_index)

    def kvm_cpuid(self, vcpu_index: int, function: int, index: int) -> tuple[Regs, int]:
        """What CPUID(function, index) answers on vCPU `vcpu_index` under KVM, whose table is for_vcpu(vcpu_index),
        and the leaf the answer came from: arch/x86/kvm/cpuid.c kvm_cpuid() with exact_only false.

        - the exact entry (kvm_find_cpuid_entry_index());
        - else, unless the vendor is AMD or Hygon, the out-of-range rule of get_out_of_range_cpuid_entry(): a
          leaf above its class's maximum (or of a class the table lacks) answers as the highest basic leaf
          (CPUID 0 EAX) with the original sub-leaf;
        - else zeros, except that for leaf 0xB / 0x1F (also when the redirect landed there), when the table has
          its sub-leaf 1, ECX = sub-leaf & 0xFF and EDX = that entry's EDX (the x2APIC ID).
        Not modelled: the MSR_IA32_TSX_CTRL and Hyper-V invariant-TSC adjustments of leaves 7 and 0x80000007 (the
        guest cannot write TSX_CTRL here, so KVM would not clear anything either; vmmd has no Hyper-V)."""
        regs = self._vcpu_find(vcpu_index, function, index)
        if regs is not None:
            return regs, function
        regs, function = self._out_of_range(vcpu_index, function, index)
        if regs is not None:
            return regs, function
        if function in TOPOLOGY_LEAVES:
            one = self._vcpu_find(vcpu_index, function, 1)
            if one is not None:
                return (0, 0, index & 0xFF, one[3]), function
        return (0, 0, 0, 0), function

    def _out_of_range(self, vcpu_index: int, function: int, index: int) -> tuple[Regs | None, int]:
        basic = self.find(0)
        if basic is None or basic[1:] in ZERO_OUT_OF_RANGE_VENDORS:
            return None, function
        if 0x4000_0000 <= function <= 0x4FFF_FFFF:
            cls = self.find(function & 0xFFFF_FF00)
        elif function >= 0xC000_0000:
            cls = self.find(0xC000_0000)
        else:
            cls = self.find(function & 0x8000_0000)
        if cls is not None and function <= cls[0]:
            return None, function
        return self._vcpu_find(vcpu_index, basic[0], index), basic[0]

    def vcpu_lookup(self, vcpu_index: int, function: int, index: int = 0) -> Regs:
        """CPUID as vCPU `vcpu_index` sees it from KVM (kvm_cpuid()): what the GHCB service answers, so a guest gets
        the same values whether the CPUID instruction or a GHCB CPUID request asks."""
        return self.kvm_cpuid(vcpu_index, function, index)[0]


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
