"""The SEV-ES VM save area (VMSA): its layout, and the page KVM builds from a vCPU's state.

Owns:
- `vmcb_seg`, `sev_es_save_area`: ctypes mirrors of Linux arch/x86/include/asm/svm.h
  (kernel field names, offsets checked against its BUILD_BUG_RESERVED_OFFSET list;
  AMD APM vol. 2 table B-4), and `sev_es_vmsa_page`, the 4 KiB page that
  LAUNCH_UPDATE_VMSA encrypts and measures (the save area, then zeros).
- `VcpuState`: the register state vmmd programs into a vCPU before LAUNCH_UPDATE_VMSA, in
  VMCB form; `program_vcpu()` issues KVM_SET_SREGS/REGS/XCRS/XSAVE/MSRS/DEBUGREGS for every
  field (`PROGRAMMED_BY`), `check_programmable()` refuses values KVM would not carry over.
- `build_vmsa()`: the page the kernel derives from that state, following
  arch/x86/kvm/svm/sev.c sev_es_sync_vmsa() and the svm.c setters it relies on.
- `x86_reset_state()`: the x86 power-on state as QEMU (target/i386/cpu.c
  x86_cpu_reset()) hands it to KVM.
"""

from __future__ import annotations

import ctypes
import dataclasses
import struct
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64
from typing import Any

VMSA_PAGE_SIZE = 4096
EXPECTED_SEV_ES_SAVE_AREA_SIZE = 1648  # arch/x86/include/asm/svm.h

# arch/x86/include/uapi/asm/processor-flags.h, msr-index.h, debugreg.h
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR4_MCE = 1 << 6
EFER_SVME = 1 << 12
DR6_ACTIVE_LOW = 0xFFFF0FF0
DR7_FIXED_1 = 0x400
MSR_IA32_CR_PAT_DEFAULT = 0x0007040600070406
XFEATURE_MASK_FP = 1 << 0
XFEATURE_MASK_SSE = 1 << 1
XFEATURE_MASK_YMM = 1 << 2
# struct xregs_state, standard format (what KVM_GET_XSAVE / KVM_SET_XSAVE exchange)
XSAVE_HEADER_OFFSET = 512
XSAVE_YMM_OFFSET = 576  # CPUID 0xD.2 EBX
FCW_DEFAULT = 0x37F  # arch/x86/kernel/fpu/core.c fpstate_init_fxstate()
MXCSR_DEFAULT = 0x1F80

# arch/x86/include/asm/svm.h SVM_SEV_FEAT_* (VMSA sev_features)
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5

# arch/x86/include/asm/svm.h SVM_SELECTOR_* (VMCB segment attrib)
SVM_SELECTOR_TYPE_MASK = 0xF
SVM_SELECTOR_S_SHIFT = 4
SVM_SELECTOR_DPL_SHIFT = 5
SVM_SELECTOR_P_SHIFT = 7
SVM_SELECTOR_AVL_SHIFT = 8
SVM_SELECTOR_L_SHIFT = 9
SVM_SELECTOR_DB_SHIFT = 10
SVM_SELECTOR_G_SHIFT = 11


class vmcb_seg(ctypes.LittleEndianStructure):
    """struct vmcb_seg (arch/x86/include/asm/svm.h)."""

    _pack_ = 1
    _fields_ = [("selector", u16), ("attrib", u16), ("limit", u32), ("base", u64)]


class sev_es_save_area(ctypes.LittleEndianStructure):
    """struct sev_es_save_area (arch/x86/include/asm/svm.h), 1648 bytes."""

    _pack_ = 1
    _fields_ = [
        ("es", vmcb_seg), ("cs", vmcb_seg), ("ss", vmcb_seg), ("ds", vmcb_seg), ("fs", vmcb_seg),
        ("gs", vmcb_seg), ("gdtr", vmcb_seg), ("ldtr", vmcb_seg), ("idtr", vmcb_seg), ("tr", vmcb_seg),
        ("pl0_ssp", u64), ("pl1_ssp", u64), ("pl2_ssp", u64), ("pl3_ssp", u64), ("u_cet", u64),
        ("reserved_0xc8", u8 * 2), ("vmpl", u8), ("cpl", u8), ("reserved_0xcc", u8 * 4),
        ("efer", u64),
        ("reserved_0xd8", u8 * 104),
        ("xss", u64), ("cr4", u64), ("cr3", u64), ("cr0", u64), ("dr7", u64), ("dr6", u64),
        ("rflags", u64), ("rip", u64),
        ("dr0", u64), ("dr1", u64), ("dr2", u64), ("dr3", u64),
        ("dr0_addr_mask", u64), ("dr1_addr_mask", u64), ("dr2_addr_mask", u64), ("dr3_addr_mask", u64),
        ("reserved_0x1c0", u8 * 24),
        ("rsp", u64), ("s_cet", u64), ("ssp", u64), ("isst_addr", u64), ("rax", u64),
        ("star", u64), ("lstar", u64), ("cstar", u64), ("sfmask", u64), ("kernel_gs_base", u64),
        ("sysenter_cs", u64), ("sysenter_esp", u64), ("sysenter_eip", u64), ("cr2", u64),
        ("reserved_0x248", u8 * 32),
        ("g_pat", u64), ("dbgctl", u64), ("br_from", u64), ("br_to", u64),
        ("last_excp_from", u64), ("last_excp_to", u64),
        ("reserved_0x298", u8 * 80),
        ("pkru", u32), ("tsc_aux", u32), ("tsc_scale", u64), ("tsc_offset", u64),
        ("reserved_0x300", u8 * 8),
        ("rcx", u64), ("rdx", u64), ("rbx", u64),
        ("reserved_0x320", u64),  # rsp already available at 0x01d8
        ("rbp", u64), ("rsi", u64), ("rdi", u64),
        ("r8", u64), ("r9", u64), ("r10", u64), ("r11", u64),
        ("r12", u64), ("r13", u64), ("r14", u64), ("r15", u64),
        ("reserved_0x380", u8 * 16),
        ("guest_exit_info_1", u64), ("guest_exit_info_2", u64), ("guest_exit_int_info", u64),
        ("guest_nrip", u64), ("sev_features", u64), ("vintr_ctrl", u64), ("guest_exit_code", u64),
        ("virtual_tom", u64), ("tlb_id", u64), ("pcpu_id", u64), ("event_inj", u64), ("xcr0", u64),
        ("reserved_0x3f0", u8 * 16),
        # Floating point area
        ("x87_dp", u64), ("mxcsr", u32), ("x87_ftw", u16), ("x87_fsw", u16), ("x87_fcw", u16),
        ("x87_fop", u16), ("x87_ds", u16), ("x87_cs", u16), ("x87_rip", u64),
        ("fpreg_x87", u8 * 80), ("fpreg_xmm", u8 * 256), ("fpreg_ymm", u8 * 256),
    ]


class sev_es_vmsa_page(ctypes.LittleEndianStructure):
    """The VMSA page: KVM allocates it zeroed (sev_es_vcpu_create()) and fills the save area."""

    _pack_ = 1
    _fields_ = [("save", sev_es_save_area),
                ("reserved_0x670", u8 * (VMSA_PAGE_SIZE - EXPECTED_SEV_ES_SAVE_AREA_SIZE))]


assert ctypes.sizeof(vmcb_seg) == 16
assert ctypes.sizeof(sev_es_save_area) == EXPECTED_SEV_ES_SAVE_AREA_SIZE
assert ctypes.sizeof(sev_es_vmsa_page) == VMSA_PAGE_SIZE


@dataclasses.dataclass(frozen=True)
class Segment:
    """A segment register in VMCB form (struct vmcb_seg: attrib packs the descriptor flags)."""

    selector: int
    base: int
    limit: int
    attrib: int

    @classmethod
    def from_kvm(cls, seg: Any) -> Segment:
        """From a struct kvm_segment, packing attrib as arch/x86/kvm/svm/svm.c svm_set_segment() does."""
        attrib = seg.type & SVM_SELECTOR_TYPE_MASK
        attrib |= (seg.s & 1) << SVM_SELECTOR_S_SHIFT
        attrib |= (seg.dpl & 3) << SVM_SELECTOR_DPL_SHIFT
        attrib |= int(bool(seg.present & 1) and not seg.unusable) << SVM_SELECTOR_P_SHIFT
        attrib |= (seg.avl & 1) << SVM_SELECTOR_AVL_SHIFT
        attrib |= (seg.l & 1) << SVM_SELECTOR_L_SHIFT
        attrib |= (seg.db & 1) << SVM_SELECTOR_DB_SHIFT
        attrib |= (seg.g & 1) << SVM_SELECTOR_G_SHIFT
        return cls(selector=seg.selector, base=seg.base, limit=seg.limit, attrib=attrib)

    @property
    def dpl(self) -> int:
        return (self.attrib >> SVM_SELECTOR_DPL_SHIFT) & 3


@dataclasses.dataclass(frozen=True)
class DescriptorTable:
    """GDTR / IDTR: svm_set_gdt()/svm_set_idt() copy only limit and base (selector, attrib stay 0)."""

    base: int
    limit: int


@dataclasses.dataclass(frozen=True)
class FpuState:
    """x87/SSE/AVX state in FXSAVE/XSAVE form (struct fxregs_state), defaults = fpstate_init_fxstate()."""

    fcw: int = FCW_DEFAULT
    fsw: int = 0
    ftw: int = 0  # abridged tag word as FXSAVE stores it (0 = all empty)
    fop: int = 0
    fip: int = 0
    fdp: int = 0
    mxcsr: int = MXCSR_DEFAULT
    st: bytes = bytes(128)  # 8 registers x 16 bytes (80-bit value + 6 bytes padding), FXSAVE st_space
    xmm: bytes = bytes(256)  # XMM0-15, FXSAVE xmm_space
    ymm_hi: bytes | None = None  # XSAVE YMM_Hi128 component, None when in init state

    def __post_init__(self) -> None:
        if len(self.st) != 128 or len(self.xmm) != 256 or (self.ymm_hi is not None and len(self.ymm_hi) != 256):
            raise ValueError("FpuState: st must be 128 bytes, xmm and ymm_hi 256 bytes")

    @classmethod
    def from_kvm_fpu(cls, fpu: Any, *, mxcsr: int = MXCSR_DEFAULT) -> FpuState:
        """From a struct kvm_fpu (KVM_GET_FPU). That ioctl carries neither MXCSR (arch/x86/kvm/x86.c
        kvm_arch_vcpu_ioctl_get_fpu() never fills kvm_fpu.mxcsr) nor YMM: pass `mxcsr`, or use from_xsave()."""
        return cls(fcw=fpu.fcw, fsw=fpu.fsw, ftw=fpu.ftwx, fop=fpu.last_opcode, fip=fpu.last_ip,
                   fdp=fpu.last_dp, mxcsr=mxcsr, st=bytes(fpu.fpr), xmm=bytes(fpu.xmm))

    @classmethod
    def from_xsave(cls, region: bytes | bytearray | memoryview) -> FpuState:
        """From a struct kvm_xsave region (KVM_GET_XSAVE, standard XSAVE format, >= 832 bytes)."""
        buf = bytes(region[:XSAVE_YMM_OFFSET + 256])
        if len(buf) < XSAVE_YMM_OFFSET + 256:
            raise ValueError("XSAVE region shorter than the YMM_Hi128 component")
        cwd, swd, twd, fop, rip, rdp, mxcsr = struct.unpack_from("<HHHHQQI", buf, 0)
        xstate_bv = int.from_bytes(buf[XSAVE_HEADER_OFFSET:XSAVE_HEADER_OFFSET + 8], "little")
        ymm = buf[XSAVE_YMM_OFFSET:XSAVE_YMM_OFFSET + 256] if xstate_bv & XFEATURE_MASK_YMM else None
        return cls(fcw=cwd, fsw=swd, ftw=twd & 0xFF, fop=fop, fip=rip, fdp=rdp, mxcsr=mxcsr,
                   st=buf[32:160], xmm=buf[160:416], ymm_hi=ymm)


GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VcpuState:
    """What vmmd sets on a vCPU before LAUNCH_UPDATE_VMSA (architectural values, before KVM's adjustments)."""

    es: Segment
    cs: Segment
    ss: Segment
    ds: Segment
    fs: Segment
    gs: Segment
    ldtr: Segment
    tr: Segment
    gdtr: DescriptorTable
    idtr: DescriptorTable
    rip: int
    rflags: int = 0x2
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    dr6: int = DR6_ACTIVE_LOW
    dr7: int = DR7_FIXED_1
    xcr0: int = XFEATURE_MASK_FP
    xss: int = 0
    pkru: int = 0
    g_pat: int = MSR_IA32_CR_PAT_DEFAULT
    star: int = 0
    lstar: int = 0
    cstar: int = 0
    sfmask: int = 0
    kernel_gs_base: int = 0
    sysenter_cs: int = 0
    sysenter_esp: int = 0
    sysenter_eip: int = 0
    fpu: FpuState = dataclasses.field(default_factory=FpuState)

    @classmethod
    def from_kvm(cls, regs: Any, sregs: Any, *, xcr0: int = XFEATURE_MASK_FP, xss: int = 0, pkru: int = 0,
                 g_pat: int = MSR_IA32_CR_PAT_DEFAULT, dr6: int = DR6_ACTIVE_LOW, dr7: int = DR7_FIXED_1,
                 fpu: FpuState | None = None) -> VcpuState:
        """From struct kvm_regs + kvm_sregs (+ the XCR0/MSR/debug values read separately)."""
        gprs = {name: getattr(regs, name) for name in GPR_NAMES}
        return cls(
            es=Segment.from_kvm(sregs.es), cs=Segment.from_kvm(sregs.cs), ss=Segment.from_kvm(sregs.ss),
            ds=Segment.from_kvm(sregs.ds), fs=Segment.from_kvm(sregs.fs), gs=Segment.from_kvm(sregs.gs),
            ldtr=Segment.from_kvm(sregs.ldt), tr=Segment.from_kvm(sregs.tr),
            gdtr=DescriptorTable(sregs.gdt.base, sregs.gdt.limit),
            idtr=DescriptorTable(sregs.idt.base, sregs.idt.limit),
            rip=regs.rip, rflags=regs.rflags, cr0=sregs.cr0, cr2=sregs.cr2, cr3=sregs.cr3, cr4=sregs.cr4,
            efer=sregs.efer, dr6=dr6, dr7=dr7, xcr0=xcr0, xss=xss, pkru=pkru, g_pat=g_pat,
            fpu=fpu if fpu is not None else FpuState(), **gprs,
        )


def fill_kvm_regs(state: VcpuState, regs: Any) -> Any:
    """Write the GPRs, RIP and RFLAGS of `state` into a struct kvm_regs (for KVM_SET_REGS); returns it."""
    for name in GPR_NAMES:
        setattr(regs, name, getattr(state, name))
    regs.rip, regs.rflags = state.rip, state.rflags
    return regs


def _fill_kvm_segment(seg: Segment, dst: Any) -> None:
    """Inverse of Segment.from_kvm(); `unusable` = not present, as QEMU target/i386/kvm/kvm.c set_seg()."""
    dst.selector, dst.base, dst.limit = seg.selector, seg.base, seg.limit
    dst.type = seg.attrib & SVM_SELECTOR_TYPE_MASK
    dst.s = (seg.attrib >> SVM_SELECTOR_S_SHIFT) & 1
    dst.dpl = (seg.attrib >> SVM_SELECTOR_DPL_SHIFT) & 3
    dst.present = (seg.attrib >> SVM_SELECTOR_P_SHIFT) & 1
    dst.avl = (seg.attrib >> SVM_SELECTOR_AVL_SHIFT) & 1
    dst.l = (seg.attrib >> SVM_SELECTOR_L_SHIFT) & 1
    dst.db = (seg.attrib >> SVM_SELECTOR_DB_SHIFT) & 1
    dst.g = (seg.attrib >> SVM_SELECTOR_G_SHIFT) & 1
    dst.unusable = 0 if dst.present else 1


def fill_kvm_sregs(state: VcpuState, sregs: Any) -> Any:
    """Write segments, descriptor tables, CR0/2/3/4 and EFER into a struct kvm_sregs (KVM_SET_SREGS).

    apic_base, cr8 and the interrupt bitmap are left as the caller read them (KVM_GET_SREGS first).
    """
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "tr"):
        _fill_kvm_segment(getattr(state, name), getattr(sregs, name))
    _fill_kvm_segment(state.ldtr, sregs.ldt)
    sregs.gdt.base, sregs.gdt.limit = state.gdtr.base, state.gdtr.limit
    sregs.idt.base, sregs.idt.limit = state.idtr.base, state.idtr.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4 = state.cr0, state.cr2, state.cr3, state.cr4
    sregs.efer = state.efer
    return sregs


def fill_xsave(state: VcpuState, region: bytearray | memoryview) -> bytearray | memoryview:
    """Write the x87/SSE/AVX state into a struct kvm_xsave region (KVM_SET_XSAVE), as QEMU does
    (target/i386/xsave_helper.c x86_cpu_xsave_all_areas()). Read the region with KVM_GET_XSAVE
    first: MXCSR_MASK and other components are kept. XSTATE_BV gains FP|SSE (and YMM when set)."""
    f = state.fpu
    struct.pack_into("<HHHHQQI", region, 0, f.fcw, f.fsw, f.ftw & 0xFF, f.fop, f.fip, f.fdp, f.mxcsr)
    region[32:160] = f.st
    region[160:416] = f.xmm
    bv = int.from_bytes(region[XSAVE_HEADER_OFFSET:XSAVE_HEADER_OFFSET + 8], "little")
    bv |= XFEATURE_MASK_FP | XFEATURE_MASK_SSE
    if f.ymm_hi is not None:
        region[XSAVE_YMM_OFFSET:XSAVE_YMM_OFFSET + 256] = f.ymm_hi
        bv |= XFEATURE_MASK_YMM
    region[XSAVE_HEADER_OFFSET:XSAVE_HEADER_OFFSET + 8] = bv.to_bytes(8, "little")
    return region


def fill_kvm_fpu(state: VcpuState, fpu: Any) -> Any:
    """Write the x87/SSE registers into a struct kvm_fpu (KVM_SET_FPU).

    KVM_SET_FPU ignores kvm_fpu.mxcsr (kvm_arch_vcpu_ioctl_set_fpu()), so a launch that must
    match QEMU's measurement (MXCSR 0x1f80 on the INIT2 path) uses fill_xsave() instead."""
    f = state.fpu
    fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode = f.fcw, f.fsw, f.ftw, f.fop
    fpu.last_ip, fpu.last_dp, fpu.mxcsr = f.fip, f.fdp, f.mxcsr
    ctypes.memmove(ctypes.addressof(fpu.fpr), f.st, 128)
    ctypes.memmove(ctypes.addressof(fpu.xmm), f.xmm, 256)
    return fpu


# The VcpuState fields KVM takes from MSRs into the VMSA (arch/x86/kvm/svm/svm.c svm_set_msr() writes them to
# vmcb01.save, which sev_es_sync_vmsa() copies; MSR_IA32_XSS goes to vcpu->arch.ia32_xss, synced explicitly).
# Indices: arch/x86/include/asm/msr-index.h.
VMSA_MSR_FIELDS: dict[str, int] = {
    "g_pat": 0x0000_0277,  # MSR_IA32_CR_PAT (kvm_set_msr_common() refuses invalid memory types)
    "star": 0xC000_0081,  # MSR_STAR
    "lstar": 0xC000_0082,  # MSR_LSTAR
    "cstar": 0xC000_0083,  # MSR_CSTAR
    "sfmask": 0xC000_0084,  # MSR_SYSCALL_MASK
    "kernel_gs_base": 0xC000_0102,  # MSR_KERNEL_GS_BASE
    "sysenter_cs": 0x0000_0174,  # MSR_IA32_SYSENTER_CS
    "sysenter_esp": 0x0000_0175,  # MSR_IA32_SYSENTER_ESP (the VMCB keeps the low 32 bits)
    "sysenter_eip": 0x0000_0176,  # MSR_IA32_SYSENTER_EIP (the VMCB keeps the low 32 bits)
    "xss": 0x0000_0DA0,  # MSR_IA32_XSS (only bits in kvm_caps.supported_xss)
}
# How every VcpuState field reaches KVM before LAUNCH_UPDATE_VMSA (program_vcpu()); a field not listed here
# (or refused by check_programmable()) would be measured as modelled but run as KVM's default.
PROGRAMMED_BY: dict[str, str] = {
    **{name: "KVM_SET_REGS" for name in (*GPR_NAMES, "rip", "rflags")},
    **{name: "KVM_SET_SREGS" for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr", "gdtr", "idtr",
                                          "cr0", "cr2", "cr3", "cr4", "efer")},
    **{name: "KVM_SET_MSRS" for name in VMSA_MSR_FIELDS},
    "xcr0": "KVM_SET_XCRS", "dr6": "KVM_SET_DEBUGREGS", "dr7": "KVM_SET_DEBUGREGS",
    "fpu": "KVM_SET_XSAVE", "pkru": "refused unless 0 (KVM's reset value)",
}


def check_programmable(state: VcpuState) -> None:
    """ValueError when `state` holds a value KVM would not carry into the VMSA as given, so the prediction and
    the launched vCPU could differ (arch/x86/kvm/svm/sev.c sev_es_sync_vmsa(), svm.c, regs.c)."""
    if state.cr2:
        raise ValueError(f"CR2 {state.cr2:#x}: KVM writes CR2 into the VMCB only at VMRUN (svm.c svm_vcpu_run()), "
                         "so the measured VMSA always holds CR2 = 0; launch with CR2 = 0")
    if state.pkru:
        raise ValueError(f"PKRU {state.pkru:#x}: vmmd programs PKRU only as KVM's reset value 0 (it travels in the "
                         "XSAVE PKRU component, which vmmd does not write)")
    for name in ("sysenter_esp", "sysenter_eip"):
        value = getattr(state, name)
        if value >> 32:
            raise ValueError(f"{name.upper()} {value:#x}: svm_set_msr() keeps only its low 32 bits in the VMCB")
    for name in ("dr6", "dr7"):
        value = getattr(state, name)
        if value >> 32:
            raise ValueError(f"{name.upper()} {value:#x}: bits 63:32 are reserved (regs.c kvm_{name}_valid())")
    if state.dr7 & ~DR7_FIXED_1:
        # sev_es_sync_vmsa(): "Check some debug related fields before encrypting the VMSA"
        raise ValueError(f"DR7 {state.dr7:#x} has breakpoints enabled: KVM refuses to encrypt such a VMSA")
    if not state.xcr0 & XFEATURE_MASK_FP:
        raise ValueError(f"XCR0 {state.xcr0:#x} lacks x87 (bit 0): KVM_SET_XCRS refuses it (x86.c __kvm_set_xcr())")


def program_vcpu(vcpu: Any, state: VcpuState) -> None:
    """Program every VcpuState field into a KVM vCPU (before LAUNCH_UPDATE_VMSA), so the VMSA KVM builds equals
    build_vmsa(state): KVM_SET_SREGS, KVM_SET_REGS, KVM_SET_XCRS, KVM_SET_XSAVE, KVM_SET_MSRS, KVM_SET_DEBUGREGS
    (PROGRAMMED_BY). Call after KVM_SET_CPUID2: XCR0 and XSS are checked against the guest's CPUID."""
    from vmmd.errors import VmmdError
    from vmmd.kvm import uapi as kvm_uapi

    check_programmable(state)
    vcpu.set_sregs(fill_kvm_sregs(state, vcpu.get_sregs()))
    vcpu.set_regs(fill_kvm_regs(state, kvm_uapi.kvm_regs()))
    vcpu.set_xcr0(state.xcr0)
    xsave_area = vcpu.get_xsave()
    fill_xsave(state, memoryview(xsave_area).cast("B"))
    vcpu.set_xsave(xsave_area)
    # XSS 0 is KVM's reset value (vcpu->arch.ia32_xss) and the only one possible where KVM supports no XSS bits;
    # such a KVM refuses the MSR altogether, even host-initiated writes of 0 (it does not advertise it).
    fields = [(name, index) for name, index in VMSA_MSR_FIELDS.items() if name != "xss" or state.xss]
    msrs = {index: getattr(state, name) for name, index in fields}
    accepted = vcpu.set_msrs(msrs)
    if accepted != len(msrs):
        name, index = fields[accepted]
        raise VmmdError(f"KVM_SET_MSRS refused {name} (MSR {index:#x}) = {msrs[index]:#x} on vCPU {vcpu.index}")
    vcpu.set_debugregs(state.dr6, state.dr7)


def read_vcpu_state(vcpu: Any) -> VcpuState:
    """The VcpuState a (not yet protected) KVM vCPU holds, read back through the ioctls program_vcpu() writes
    with (PKRU, which it only refuses, is left at 0)."""
    from vmmd.errors import VmmdError

    dbg = vcpu.get_debugregs()
    indices = [index for name, index in VMSA_MSR_FIELDS.items() if name != "xss"]
    msrs = vcpu.get_msrs(indices)
    if len(msrs) != len(indices):
        raise VmmdError(f"KVM_GET_MSRS returned {len(msrs)} of the {len(indices)} VMSA MSRs")
    xss = VMSA_MSR_FIELDS["xss"]
    msrs[xss] = vcpu.get_msr(xss) or 0  # None: a KVM without XSS support, where it can only be 0
    fpu = FpuState.from_xsave(memoryview(vcpu.get_xsave()).cast("B"))
    state = VcpuState.from_kvm(vcpu.get_regs(), vcpu.get_sregs(), xcr0=vcpu.get_xcr0(), dr6=dbg.dr6, dr7=dbg.dr7,
                               fpu=fpu)
    return dataclasses.replace(state, **{name: msrs[index] for name, index in VMSA_MSR_FIELDS.items()})


def x86_reset_state(cpu_sig: int, *, cs_base: int = 0xFFFF0000, rip: int = 0xFFF0) -> VcpuState:
    """The power-on/INIT state QEMU gives KVM (target/i386/cpu.c x86_cpu_reset()), RDX = CPUID 1 EAX.

    Code segment: selector 0xf000, DESC_P|DESC_S|DESC_CS|DESC_R|DESC_A (attrib 0x9b); data
    segments DESC_P|DESC_S|DESC_W|DESC_A (0x93); LDTR present type 2 (0x82); TR present
    busy-TSS type 11 (0x8b); every limit 0xffff. CR0 = 0x60000010 (CD|NW|ET).
    """
    data = Segment(selector=0, base=0, limit=0xFFFF, attrib=0x93)
    return VcpuState(
        es=data, ss=data, ds=data, fs=data, gs=data,
        cs=Segment(selector=0xF000, base=cs_base, limit=0xFFFF, attrib=0x9B),
        ldtr=Segment(selector=0, base=0, limit=0xFFFF, attrib=0x82),
        tr=Segment(selector=0, base=0, limit=0xFFFF, attrib=0x8B),
        gdtr=DescriptorTable(base=0, limit=0xFFFF), idtr=DescriptorTable(base=0, limit=0xFFFF),
        rip=rip, rdx=cpu_sig,
    )


def _set_seg(dst: vmcb_seg, seg: Segment) -> None:
    dst.selector, dst.attrib, dst.limit, dst.base = seg.selector, seg.attrib, seg.limit, seg.base


def build_vmsa(state: VcpuState, *, vmsa_features: int, init2: bool, host_cr4_mce: bool = True,
               cd_nw_cleared: bool = True) -> sev_es_vmsa_page:
    """The VMSA page KVM measures at LAUNCH_UPDATE_VMSA for a vCPU holding `state`.

    arch/x86/kvm/svm/sev.c sev_es_sync_vmsa(): the VMCB save area is copied, then GPRs,
    RIP, XCR0, PKRU, XSS, DR6 and sev_features = vmsa_features; x87/SSE/AVX only when the
    VM type is not KVM_X86_DEFAULT_VM, i.e. created for KVM_SEV_INIT2 (`init2`); the
    legacy KVM_SEV_ES_INIT path leaves the FPU area zero "to avoid breaking older
    measurements". VMCB values come from arch/x86/kvm/svm/svm.c: svm_set_efer() ORs
    EFER.SVME, svm_set_cr0() clears CR0.CD/NW under KVM_X86_QUIRK_CD_NW_CLEARED (on by
    default; `cd_nw_cleared`), svm_set_cr4() ORs the host's CR4.MCE (`host_cr4_mce`),
    svm_set_segment() puts SS.DPL in cpl.
    """
    check_programmable(state)
    if not init2 and vmsa_features & ~SVM_SEV_FEAT_DEBUG_SWAP:
        raise ValueError("legacy KVM_SEV_ES_INIT yields sev_features 0, or DebugSwap on Linux 6.5-6.9 with kvm_amd "
                         "debug_swap=1 (Documentation/virt/kvm/x86/amd-memory-encryption.rst); other VMSA features "
                         "need KVM_SEV_INIT2")
    page = sev_es_vmsa_page()
    s = page.save
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr"):
        _set_seg(getattr(s, name), getattr(state, name))
    s.gdtr.base, s.gdtr.limit = state.gdtr.base, state.gdtr.limit
    s.idtr.base, s.idtr.limit = state.idtr.base, state.idtr.limit
    s.cpl = state.ss.dpl
    s.efer = state.efer | EFER_SVME
    s.cr0 = state.cr0 & ~(X86_CR0_CD | X86_CR0_NW) if cd_nw_cleared else state.cr0
    s.cr2 = 0  # svm.c writes vmcb->save.cr2 only at VMRUN; check_programmable() refuses any other value
    s.cr3 = state.cr3
    s.cr4 = state.cr4 | (X86_CR4_MCE if host_cr4_mce else 0)
    s.dr7 = state.dr7
    s.rflags = state.rflags
    s.g_pat = state.g_pat
    for name in VMSA_MSR_FIELDS:
        if name not in ("g_pat", "xss"):
            setattr(s, name, getattr(state, name))
    for name in GPR_NAMES:
        setattr(s, name, getattr(state, name))
    s.rip = state.rip
    s.xcr0 = state.xcr0
    s.pkru = state.pkru
    s.xss = state.xss
    s.dr6 = state.dr6
    s.sev_features = vmsa_features
    if init2:
        _sync_fpu(s, state.fpu)
    return page


def _sync_fpu(s: sev_es_save_area, fpu: FpuState) -> None:
    """The INIT2-only block of sev_es_sync_vmsa(), from the guest's XSAVE area."""
    s.x87_dp = fpu.fdp
    s.mxcsr = fpu.mxcsr
    s.x87_ftw = fpu.ftw
    s.x87_fsw = fpu.fsw
    s.x87_fcw = fpu.fcw
    s.x87_fop = fpu.fop
    s.x87_ds = 0
    s.x87_cs = 0
    s.x87_rip = fpu.fip
    # "an 8*8 bytes area with bytes 0-7, and an 8*2 bytes area with bytes 8-9 of each register"
    x87 = bytearray(80)
    for i in range(8):
        reg = fpu.st[i * 16:i * 16 + 10]
        x87[i * 8:i * 8 + 8] = reg[:8]
        x87[64 + i * 2:64 + i * 2 + 2] = reg[8:10]
    s.fpreg_x87[:] = x87
    s.fpreg_xmm[:] = fpu.xmm
    s.fpreg_ymm[:] = fpu.ymm_hi if fpu.ymm_hi is not None else bytes(256)


def vmsa_field_offsets() -> dict[str, int]:
    """Every field of sev_es_save_area with its byte offset (for layout tests and --dump-vmsa readers)."""
    return {name: getattr(sev_es_save_area, name).offset for name, *_ in sev_es_save_area._fields_}
