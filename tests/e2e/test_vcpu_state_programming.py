"""Every VcpuState field build_vmsa() models reaches a real KVM vCPU (issue 16, item 5).

sev_es_sync_vmsa() (arch/x86/kvm/svm/sev.c) builds the VMSA from what the vCPU holds, so a field vmmd models
but never programs is measured as modelled and run as KVM's default. program_vcpu() is run here on a plain KVM
vCPU with a state where every programmable field differs from the reset value, and read back through the
same ioctls; fields KVM would not carry into the VMSA are refused before anything is issued.
"""

from __future__ import annotations

import dataclasses

import pytest

from vmmd.kvm import Kvm
from vmmd.machine.cpuid import build_cpuid_table
from vmmd.sev import vmsa as V

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def vcpu():
    kvm = Kvm()
    vm = kvm.create_vm()
    cpu = vm.create_vcpu(0)
    cpu.set_cpuid2(build_cpuid_table(kvm.get_supported_cpuid(), 1, "plain").for_vcpu(0))
    yield cpu
    vm.close()
    kvm.close()


def _supported_xcr0(vcpu) -> int:
    """XCR0 bits the guest's CPUID allows (leaf 0xD.0 EDX:EAX), as __kvm_set_xcr() checks them."""
    kvm = vcpu.vm.kvm
    leaf = next((e for e in kvm.get_supported_cpuid() if e.function == 0xD and e.index == 0), None)
    return (leaf.edx << 32 | leaf.eax) if leaf else V.XFEATURE_MASK_FP


def _distinct_state(vcpu) -> V.VcpuState:
    """A 64-bit state in which every field program_vcpu() writes differs from KVM's reset value."""
    base = V.x86_reset_state(0x00A00F11, cs_base=0, rip=0x7000)
    xcr0 = V.XFEATURE_MASK_FP | (V.XFEATURE_MASK_SSE if _supported_xcr0(vcpu) & V.XFEATURE_MASK_SSE else 0)
    fpu = V.FpuState(fcw=0x27F, mxcsr=0x1F00, xmm=bytes(range(256)))
    return dataclasses.replace(
        base, rax=1, rbx=2, rcx=3, rdx=4, rsi=5, rdi=6, rsp=0x8000, rbp=8, r8=9, r15=15, rflags=0x202,
        cr3=0x5000, xcr0=xcr0, dr6=V.DR6_ACTIVE_LOW | 0x1, g_pat=0x0007_0406_0007_0406 ^ 0x0100,
        star=0x0023_0010_0000_0000, lstar=0xFFFF_FFFF_8100_0000, cstar=0xFFFF_FFFF_8100_1000, sfmask=0x4700,
        kernel_gs_base=0xFFFF_8880_0000_0000, sysenter_cs=0x10, sysenter_esp=0x9000, sysenter_eip=0x7100, fpu=fpu)


def test_every_modelled_field_has_a_way_into_kvm() -> None:
    fields = {f.name for f in dataclasses.fields(V.VcpuState)}
    assert fields == set(V.PROGRAMMED_BY), f"no programming path for {sorted(fields - set(V.PROGRAMMED_BY))}"


def test_program_vcpu_round_trips_every_field(vcpu) -> None:
    state = _distinct_state(vcpu)
    reset = V.read_vcpu_state(vcpu)
    changed = [f.name for f in dataclasses.fields(V.VcpuState)
               if f.name not in ("cr2", "pkru", "dr7", "xss") and getattr(state, f.name) != getattr(reset, f.name)]
    V.program_vcpu(vcpu, state)
    back = V.read_vcpu_state(vcpu)
    for name in changed:
        assert getattr(back, name) == getattr(state, name), f"{name} was not programmed into KVM"
    assert back == state
    assert {"g_pat", "star", "lstar", "cstar", "sfmask", "kernel_gs_base", "sysenter_cs", "sysenter_esp",
            "sysenter_eip", "dr6", "rflags", "cr3", "fpu"} <= set(changed)
    # the page KVM would build from what it now holds equals the prediction from the requested state
    assert bytes(V.build_vmsa(back, vmsa_features=0, init2=True)) == bytes(V.build_vmsa(state, vmsa_features=0,
                                                                                           init2=True))


@pytest.mark.hw  # needs a CPU (and KVM) with IA32_XSS state components; this host's has none
def test_nonzero_xss_is_programmed_where_kvm_supports_it(vcpu) -> None:
    kvm = vcpu.vm.kvm
    leaf = next((e for e in kvm.get_supported_cpuid() if e.function == 0xD and e.index == 1), None)
    supported_xss = (leaf.edx << 32 | leaf.ecx) if leaf else 0
    if not supported_xss:
        pytest.skip("this KVM supports no IA32_XSS bits (CPUID 0xD.1 ECX/EDX are 0): only XSS 0 is possible")
    state = dataclasses.replace(_distinct_state(vcpu), xss=supported_xss & -supported_xss)
    V.program_vcpu(vcpu, state)
    assert V.read_vcpu_state(vcpu).xss == state.xss


@pytest.mark.parametrize(("field", "value", "why"), [
    ("cr2", 0x1234, "only at VMRUN"),
    ("pkru", 0x55555554, "PKRU"),
    ("sysenter_eip", 1 << 32, "low 32 bits"),
    ("dr7", 0x401, "breakpoints"),
    ("dr6", 1 << 32, "reserved"),
])
def test_values_kvm_would_not_carry_into_the_vmsa_are_refused(vcpu, field: str, value: int, why: str) -> None:
    state = dataclasses.replace(_distinct_state(vcpu), **{field: value})
    before = V.read_vcpu_state(vcpu)
    with pytest.raises(ValueError, match=why):
        V.program_vcpu(vcpu, state)
    with pytest.raises(ValueError, match=why):
        V.build_vmsa(state, vmsa_features=0, init2=True)
    assert V.read_vcpu_state(vcpu) == before  # refused before any ioctl
