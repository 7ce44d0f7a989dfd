"""CpuidTable.kvm_cpuid(): arch/x86/kvm/cpuid.c kvm_cpuid() on hand-built tables (the real-KVM comparison is
tests/e2e/test_cpuid_matches_kvm.py)."""

from __future__ import annotations

from vmmd.kvm import uapi
from vmmd.machine.cpuid import CpuidTable

INTEL = (0x756E_6547, 0x6C65_746E, 0x4965_6E69)  # EBX, ECX, EDX
AMD = (0x6874_7541, 0x444D_4163, 0x6974_6E65)
SIG = uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX


def _table(vendor, max_basic: int = 0xB, topology: bool = True) -> CpuidTable:
    entries = [(0, 0, 0, (max_basic, *vendor)), (1, 0, 0, (0xA10F11, 0x800, 0, 0)),
               (7, 0, SIG, (0, 0x11, 0x22, 0x33)), (0x8000_0000, 0, 0, (0x8000_0008, 0, 0, 0)),
               (0x8000_0008, 0, 0, (0x3030, 0, 0, 0)), (0x4000_0000, 0, 0, (0x4000_0001, 1, 2, 3))]
    if topology:
        entries += [(0xB, 0, SIG, (0, 1, 0x100, 0)), (0xB, 1, SIG, (2, 4, 0x201, 0))]
    return CpuidTable([uapi.kvm_cpuid_entry2(function=f, index=i, flags=fl, eax=r[0], ebx=r[1], ecx=r[2], edx=r[3])
                       for f, i, fl, r in entries])


def test_topology_subleaves_past_the_levels_pass_ecx_and_give_the_x2apic_id() -> None:
    table = _table(AMD)
    assert table.vcpu_lookup(3, 0xB, 1) == (2, 4, 0x201, 3)
    assert table.vcpu_lookup(3, 0xB, 9) == (0, 0, 9, 3)
    assert table.vcpu_lookup(3, 0xB, 0x1234) == (0, 0, 0x34, 3)  # ECX = sub-leaf & 0xFF


def test_a_table_without_the_topology_leaf_answers_zeros() -> None:
    table = _table(AMD, topology=False)
    assert table.vcpu_lookup(3, 0xB, 0) == (0, 0, 0, 0) == table.vcpu_lookup(3, 0x1F, 4)


def test_intel_out_of_range_leaves_answer_as_the_highest_basic_leaf() -> None:
    table = _table(INTEL, max_basic=7)
    assert table.kvm_cpuid(0, 0x20, 0) == ((0, 0x11, 0x22, 0x33), 7)
    assert table.vcpu_lookup(0, 0x8000_0009, 0) == (0, 0x11, 0x22, 0x33)  # above the extended maximum
    assert table.vcpu_lookup(0, 0x4000_0005, 0) == (0, 0x11, 0x22, 0x33)  # above 0x40000000's maximum
    assert table.vcpu_lookup(0, 0xC000_0000, 0) == (0, 0x11, 0x22, 0x33)  # a class the table lacks
    assert table.vcpu_lookup(0, 0x20, 1) == (0, 0, 0, 0)  # the original sub-leaf: 7.1 is not in the table
    assert table.vcpu_lookup(0, 6, 0) == (0, 0, 0, 0)  # in range but absent: zeros
    assert table.vcpu_lookup(0, 0x8000_0008, 0) == (0x3030, 0, 0, 0)


def test_intel_redirect_onto_the_topology_leaf_applies_its_rule() -> None:
    table = _table(INTEL, max_basic=0xB)
    assert table.vcpu_lookup(5, 0x30, 1) == (2, 4, 0x201, 5)
    assert table.vcpu_lookup(5, 0x30, 6) == (0, 0, 6, 5)


def test_amd_and_hygon_out_of_range_leaves_are_zeros() -> None:
    for vendor in (AMD, (0x6F67_7948, 0x656E_6975, 0x6E65_476E)):
        assert _table(vendor, max_basic=7).vcpu_lookup(0, 0x20, 0) == (0, 0, 0, 0)


def test_first_matching_entry_wins_as_in_cpuid_entry2_find() -> None:
    entries = [uapi.kvm_cpuid_entry2(function=5, index=0, flags=0, eax=1),
               uapi.kvm_cpuid_entry2(function=5, index=3, flags=SIG, eax=2)]
    assert CpuidTable(entries).lookup(5, 3) == (1, 0, 0, 0)
