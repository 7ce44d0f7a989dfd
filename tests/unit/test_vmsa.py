"""VMSA layout against the kernel's documented offsets, and build_vmsa() against sev_es_sync_vmsa() rules.

No header installs struct sev_es_save_area, so the offsets below are the ones the
kernel asserts (arch/x86/include/asm/svm.h BUILD_BUG_RESERVED_OFFSET(sev_es_save_area,
...), EXPECTED_SEV_ES_SAVE_AREA_SIZE, the "rsp already available at 0x01d8" comment)
and AMD APM vol. 2 table B-4, typed in by hand.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import os

import pytest
from ioctl_opt import IOR, IOW

from vmmd.kvm import ioctls, uapi
from vmmd.sev import vmsa as V

# include/uapi/linux/kvm.h (struct kvm_xsave is __u32 region[1024]); not in vmmd/kvm/ioctls.py yet.
KVM_GET_XSAVE = IOR(uapi.KVMIO, 0xA4, ctypes.c_uint32 * 1024)  # KVM_CAP_XSAVE
KVM_SET_XSAVE = IOW(uapi.KVMIO, 0xA5, ctypes.c_uint32 * 1024)  # KVM_CAP_XSAVE

# AMD APM vol. 2 table B-4 "VMSA Layout, State Save Area for SEV-ES" / svm.h, hand-typed.
DOCUMENTED_OFFSETS = {
    "es": 0x000, "cs": 0x010, "ss": 0x020, "ds": 0x030, "fs": 0x040, "gs": 0x050,
    "gdtr": 0x060, "ldtr": 0x070, "idtr": 0x080, "tr": 0x090,
    "pl0_ssp": 0x0A0, "u_cet": 0x0C0, "vmpl": 0x0CA, "cpl": 0x0CB, "efer": 0x0D0,
    "xss": 0x140, "cr4": 0x148, "cr3": 0x150, "cr0": 0x158, "dr7": 0x160, "dr6": 0x168,
    "rflags": 0x170, "rip": 0x178, "dr0": 0x180, "dr3_addr_mask": 0x1B8,
    "rsp": 0x1D8, "rax": 0x1F8, "star": 0x200, "sysenter_eip": 0x238, "cr2": 0x240,
    "g_pat": 0x268, "dbgctl": 0x270, "last_excp_to": 0x290, "pkru": 0x2E8, "tsc_aux": 0x2EC,
    "rcx": 0x308, "rdx": 0x310, "rbx": 0x318, "rbp": 0x328, "rsi": 0x330, "rdi": 0x338,
    "r8": 0x340, "r15": 0x378, "guest_exit_info_1": 0x390, "sev_features": 0x3B0,
    "vintr_ctrl": 0x3B8, "event_inj": 0x3E0, "xcr0": 0x3E8,
    "x87_dp": 0x400, "mxcsr": 0x408, "x87_ftw": 0x40C, "x87_fsw": 0x40E, "x87_fcw": 0x410,
    "x87_fop": 0x412, "x87_ds": 0x414, "x87_cs": 0x416, "x87_rip": 0x418,
    "fpreg_x87": 0x420, "fpreg_xmm": 0x470, "fpreg_ymm": 0x570,
}
# BUILD_BUG_RESERVED_OFFSET(sev_es_save_area, X) lines of svm.h.
KERNEL_RESERVED = [0xC8, 0xCC, 0xD8, 0x1C0, 0x248, 0x298, 0x300, 0x320, 0x380, 0x3F0]


def test_sizes_match_kernel_constants() -> None:
    assert ctypes.sizeof(V.vmcb_seg) == 16
    assert ctypes.sizeof(V.sev_es_save_area) == 1648  # EXPECTED_SEV_ES_SAVE_AREA_SIZE
    assert ctypes.sizeof(V.sev_es_vmsa_page) == 4096


@pytest.mark.parametrize("field,offset", sorted(DOCUMENTED_OFFSETS.items()))
def test_documented_field_offsets(field: str, offset: int) -> None:
    assert V.vmsa_field_offsets()[field] == offset


@pytest.mark.parametrize("offset", KERNEL_RESERVED)
def test_kernel_reserved_offsets(offset: int) -> None:
    assert V.vmsa_field_offsets()[f"reserved_{offset:#x}"] == offset


def test_vmcb_seg_layout() -> None:
    assert [(n, getattr(V.vmcb_seg, n).offset) for n in ("selector", "attrib", "limit", "base")] == [
        ("selector", 0), ("attrib", 2), ("limit", 4), ("base", 8)]


def _u64(page: bytes, off: int) -> int:
    return int.from_bytes(page[off:off + 8], "little")


def test_reset_state_vmsa_applies_kvm_adjustments() -> None:
    state = V.x86_reset_state(0x00A00F11)
    page = bytes(V.build_vmsa(state, vmsa_features=0, init2=True))
    o = DOCUMENTED_OFFSETS
    assert _u64(page, o["cr0"]) == 0x10  # svm_set_cr0(): CD|NW cleared by KVM_X86_QUIRK_CD_NW_CLEARED
    assert _u64(page, o["efer"]) == 0x1000  # svm_set_efer(): EFER.SVME
    assert _u64(page, o["cr4"]) == 0x40  # svm_set_cr4(): host CR4.MCE
    assert _u64(page, o["rdx"]) == 0x00A00F11
    assert _u64(page, o["rip"]) == 0xFFF0
    assert page[o["cs"]:o["cs"] + 16] == bytes.fromhex("00f09b00ffff0000") + (0xFFFF0000).to_bytes(8, "little")
    assert _u64(page, o["dr7"]) == 0x400 and _u64(page, o["dr6"]) == 0xFFFF0FF0
    assert _u64(page, o["g_pat"]) == 0x0007040600070406
    assert _u64(page, o["xcr0"]) == 1
    assert int.from_bytes(page[o["x87_fcw"]:o["x87_fcw"] + 2], "little") == 0x37F
    assert int.from_bytes(page[o["mxcsr"]:o["mxcsr"] + 4], "little") == 0x1F80
    assert page[1648:] == bytes(4096 - 1648)


def test_quirk_and_mce_switches() -> None:
    state = V.x86_reset_state(0)
    page = bytes(V.build_vmsa(state, vmsa_features=0, init2=True, host_cr4_mce=False, cd_nw_cleared=False))
    assert _u64(page, DOCUMENTED_OFFSETS["cr0"]) == 0x60000010
    assert _u64(page, DOCUMENTED_OFFSETS["cr4"]) == 0


def test_legacy_init_leaves_fpu_area_zero_and_rest_equal() -> None:
    state = V.x86_reset_state(0x800F12)
    init2 = bytes(V.build_vmsa(state, vmsa_features=0, init2=True))
    legacy = bytes(V.build_vmsa(state, vmsa_features=0, init2=False))
    assert legacy[0x400:] == bytes(4096 - 0x400)
    assert legacy[:0x400] == init2[:0x400]
    assert init2[0x400:0x670] != bytes(0x270)


def test_legacy_init_allows_only_debug_swap() -> None:
    """ES_INIT sets DebugSwap on 6.5-6.9 when kvm_amd debug_swap=1, nothing else; INIT2 takes what KVM supports."""
    with pytest.raises(ValueError, match="INIT2"):
        V.build_vmsa(V.x86_reset_state(0), vmsa_features=V.SVM_SEV_FEAT_DEBUG_SWAP << 1, init2=False)
    legacy = bytes(V.build_vmsa(V.x86_reset_state(0), vmsa_features=V.SVM_SEV_FEAT_DEBUG_SWAP, init2=False))
    assert _u64(legacy, DOCUMENTED_OFFSETS["sev_features"]) == 0x20
    page = bytes(V.build_vmsa(V.x86_reset_state(0), vmsa_features=V.SVM_SEV_FEAT_DEBUG_SWAP, init2=True))
    assert _u64(page, DOCUMENTED_OFFSETS["sev_features"]) == 0x20


def test_dr7_breakpoints_rejected() -> None:
    state = dataclasses.replace(V.x86_reset_state(0), dr7=0x401)
    with pytest.raises(ValueError, match="DR7"):
        V.build_vmsa(state, vmsa_features=0, init2=True)


def test_x87_registers_split_as_kernel_does() -> None:
    st = bytes(range(128))  # register i occupies bytes 16*i .. 16*i+9 (10-byte value)
    fpu = V.FpuState(st=st, xmm=bytes(range(256)), ymm_hi=bytes(reversed(range(256))), fip=0x1234, fdp=0x5678)
    state = dataclasses.replace(V.x86_reset_state(0), fpu=fpu)
    page = bytes(V.build_vmsa(state, vmsa_features=0, init2=True))
    x87 = page[0x420:0x470]
    for i in range(8):
        assert x87[i * 8:i * 8 + 8] == st[i * 16:i * 16 + 8]
        assert x87[64 + 2 * i:66 + 2 * i] == st[i * 16 + 8:i * 16 + 10]
    assert page[0x470:0x570] == bytes(range(256))
    assert page[0x570:0x670] == bytes(reversed(range(256)))
    assert _u64(page, 0x418) == 0x1234 and _u64(page, 0x400) == 0x5678


def test_xsave_round_trip_in_memory() -> None:
    fpu = V.FpuState(fcw=0x27F, fsw=0x3800, ftw=0x81, fop=0x7FF, fip=0x1122334455, fdp=0x66778899AA,
                     mxcsr=0x1FA0, st=bytes(range(128)), xmm=bytes(range(256)), ymm_hi=bytes(range(255, -1, -1)))
    region = bytearray(4096)
    region[28:32] = (0xFFFF).to_bytes(4, "little")  # MXCSR_MASK as KVM reports it: kept
    V.fill_xsave(dataclasses.replace(V.x86_reset_state(0), fpu=fpu), region)
    assert V.FpuState.from_xsave(region) == fpu
    assert region[28:32] == (0xFFFF).to_bytes(4, "little")
    assert int.from_bytes(region[512:520], "little") == 0x7
    assert region[24:28] == (0x1FA0).to_bytes(4, "little") and region[576:578] == b"\xff\xfe"


def test_segment_from_kvm_packs_attrib_like_svm_set_segment() -> None:
    seg = uapi.kvm_segment(base=0x1000, limit=0xFFFFF, selector=0x10, type=0xB, present=1, dpl=3, db=0, s=1,
                           l=1, g=1, avl=1, unusable=0)
    got = V.Segment.from_kvm(seg)
    assert got == V.Segment(selector=0x10, base=0x1000, limit=0xFFFFF, attrib=0xB | 0x10 | 0x60 | 0x80 | 0x100
                            | 0x200 | 0x800)
    seg.unusable = 1
    assert not V.Segment.from_kvm(seg).attrib & 0x80


def test_cpl_follows_ss_dpl() -> None:
    state = dataclasses.replace(V.x86_reset_state(0), ss=V.Segment(selector=0x2B, base=0, limit=0xFFFFFFFF,
                                                                  attrib=0xCF3))
    page = bytes(V.build_vmsa(state, vmsa_features=0, init2=True))
    assert page[DOCUMENTED_OFFSETS["cpl"]] == 3


@pytest.fixture
def kvm_vcpu():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm absent")
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, ioctls.KVM_CREATE_VM, 0)
    vcpu = fcntl.ioctl(vm, ioctls.KVM_CREATE_VCPU, 0)
    yield vcpu
    for fd in (vcpu, vm, kvm):
        os.close(fd)


def _read_state(vcpu: int) -> V.VcpuState:
    regs, sregs, xsave = uapi.kvm_regs(), uapi.kvm_sregs(), bytearray(4096)
    fcntl.ioctl(vcpu, ioctls.KVM_GET_REGS, regs)
    fcntl.ioctl(vcpu, ioctls.KVM_GET_SREGS, sregs)
    fcntl.ioctl(vcpu, KVM_GET_XSAVE, xsave)
    return V.VcpuState.from_kvm(regs, sregs, fpu=V.FpuState.from_xsave(xsave))


def test_kvm_reset_state_matches_x86_reset_state(kvm_vcpu: int) -> None:
    """KVM's own vCPU reset equals our model except RDX, which QEMU sets to the CPUID signature."""
    got = _read_state(kvm_vcpu)
    assert dataclasses.replace(got, rdx=0x800F12) == V.x86_reset_state(0x800F12)


def test_state_round_trips_through_kvm(kvm_vcpu: int) -> None:
    """What fill_kvm_regs/sregs + fill_xsave program is what KVM hands back, so the VMSA sees it."""
    # No YMM here: KVM keeps AVX state only once KVM_SET_CPUID2 has enabled AVX for the guest.
    fpu = V.FpuState(fcw=0x27F, mxcsr=0x1F80 | 0x40, st=bytes(range(128)), xmm=bytes(range(256)))
    want = dataclasses.replace(V.x86_reset_state(0x00A10F11, cs_base=0x80B000 & 0xFFFF0000,
                                                 rip=0x80B004 & 0xFFFF), fpu=fpu, rax=7, r15=9)
    regs, sregs, xsave = uapi.kvm_regs(), uapi.kvm_sregs(), bytearray(4096)
    fcntl.ioctl(kvm_vcpu, ioctls.KVM_GET_SREGS, sregs)
    fcntl.ioctl(kvm_vcpu, KVM_GET_XSAVE, xsave)
    fcntl.ioctl(kvm_vcpu, ioctls.KVM_SET_REGS, V.fill_kvm_regs(want, regs))
    fcntl.ioctl(kvm_vcpu, ioctls.KVM_SET_SREGS, V.fill_kvm_sregs(want, sregs))
    fcntl.ioctl(kvm_vcpu, KVM_SET_XSAVE, V.fill_xsave(want, xsave))
    got = _read_state(kvm_vcpu)
    assert got == want
    assert bytes(V.build_vmsa(got, vmsa_features=0, init2=True)) == bytes(
        V.build_vmsa(want, vmsa_features=0, init2=True))


def test_kvm_set_fpu_drops_mxcsr(kvm_vcpu: int) -> None:
    """Why fill_xsave() exists: KVM_SET_FPU leaves MXCSR alone, so it cannot produce QEMU's VMSA."""
    before = _read_state(kvm_vcpu).fpu.mxcsr
    fpu = V.fill_kvm_fpu(V.x86_reset_state(0), uapi.kvm_fpu())
    fpu.mxcsr = before ^ 0x40
    fcntl.ioctl(kvm_vcpu, ioctls.KVM_SET_FPU, fpu)
    after = _read_state(kvm_vcpu).fpu
    assert after.fcw == 0x37F and after.mxcsr == before
