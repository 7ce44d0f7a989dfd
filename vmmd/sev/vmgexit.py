"""The userspace VMGEXIT service of the sev-es-emu platform: the GHCB protocol, as strict as KVM.

Owns what arch/x86/kvm/svm/sev.c does in the kernel for a real SEV-ES guest, done
here in Python for a guest that rings the doorbell port instead of executing
VMGEXIT (the approach of OpenBSD vmm(4) svm_handle_vmgexit(), in userspace):

- the per-vCPU GHCB MSR (0xC0010130), preloaded with the SEV_INFO response as
  sev_es_vcpu_reset() does, and the MSR protocol (sev_handle_vmgexit_msr_protocol());
- NAE events through the GHCB page: sev_es_sync_from_ghcb() (copy inputs, clear the
  valid bitmap), sev_es_validate_vmgexit() (usage, required inputs per exit code),
  dispatch, setup_vmgexit_scratch() rules, and sev_es_sync_to_ghcb() (RAX, RBX,
  RCX, RDX and SW_EXITINFO1/2 written back and marked valid).

Every guest-controlled value is untrusted. In-band errors are answered as KVM
answers them (SW_EXITINFO1 = 2, SW_EXITINFO2 = GHCB_ERR_*, or SW_EXITINFO1 = 1
with an exception event); where KVM makes KVM_RUN fail or exits to userspace
with KVM_SYSTEM_EVENT_SEV_TERM, the VM is stopped with `VmStop`. Nothing else
ever escapes `vmgexit()`. Guest memory is only reached through
`GuestMemory.buffer()` (bounds-checked memoryviews: no numpy on the start path of
a sev-es-emu run). docs/ghcb-events.md lists every event and decision.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from vmmd.devices.bus import MmioBus, PortBus
from vmmd.errors import ExitCode, GuestMemoryError, VmStop
from vmmd.memory import GuestMemory
from vmmd.sev import ghcb as g

M32 = 0xFFFF_FFFF
M64 = 0xFFFF_FFFF_FFFF_FFFF
INT_MAX = 0x7FFF_FFFF
GHCB_SCRATCH_AREA_LIMIT = 16 * 4096  # sev.c: scratch outside the GHCB is bounced through a kernel buffer this big
KVM_ENOSYS = 1000  # include/uapi/linux/kvm_para.h
KVM_EPERM = 1
KVM_HC_VAPIC_POLL_IRQ = 1
XFEATURE_MASK_EXTEND = ~0x3 & M64  # arch/x86/kvm/cpuid.c: all but FP and SSE
XSAVE_LEGACY_AND_HEADER = 512 + 64  # XSAVE_HDR_OFFSET + XSAVE_HDR_SIZE
CPUID_D1_EAX_XSAVEC = 1 << 1
CPUID_D1_EAX_XSAVES = 1 << 3

# u64 indices into the GHCB page
_Q_RAX = g.RAX >> 3
_Q_RBX = g.RBX >> 3
_Q_RCX = g.RCX >> 3
_Q_RDX = g.RDX >> 3
_Q_XSS = g.XSS >> 3
_Q_XCR0 = g.XCR0 >> 3
_Q_EXIT_CODE = g.SW_EXIT_CODE >> 3
_Q_INFO_1 = g.SW_EXIT_INFO_1 >> 3
_Q_INFO_2 = g.SW_EXIT_INFO_2 >> 3
_Q_SCRATCH = g.SW_SCRATCH >> 3
_Q_BITMAP = g.VALID_BITMAP >> 3
_Q_USAGE = g.GHCB_USAGE >> 3  # u32 usage in the upper half of this word

# valid-bitmap bits (GHCB_BITMAP_IDX)
_V_CPL = g.valid_mask(g.CPL)
_V_XSS = g.valid_mask(g.XSS)
_V_RAX = g.valid_mask(g.RAX)
_V_RBX = g.valid_mask(g.RBX)
_V_RCX = g.valid_mask(g.RCX)
_V_RDX = g.valid_mask(g.RDX)
_V_XCR0 = g.valid_mask(g.XCR0)
_V_SCRATCH = g.valid_mask(g.SW_SCRATCH)
_V_EXIT = g.valid_mask(g.SW_EXIT_CODE, g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2)  # required for every NAE event
# sev_es_sync_to_ghcb() + svm_vmgexit_*(): what KVM hands back, always
_V_OUT = g.valid_mask(g.RAX, g.RBX, g.RCX, g.RDX, g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2)
_V_OUT_LO = _V_OUT & M64
_V_OUT_HI = _V_OUT >> 64
_V_GPR = g.valid_mask(g.RAX, g.RBX, g.RCX, g.RDX)
_V_GPR_LO, _V_GPR_HI = _V_GPR & M64, _V_GPR >> 64
_V_INFO = g.valid_mask(g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2)
_V_INFO_LO, _V_INFO_HI = _V_INFO & M64, _V_INFO >> 64


def _piece_starts(views: list) -> list[int]:
    """Offsets at which each view of a span starts (one per memory slot it touches)."""
    starts, offset = [], 0
    for view in views:
        starts.append(offset)
        offset += len(view)
    return starts


class VmgexitAction(enum.Enum):
    """What the run loop does with the vCPU after `vmgexit()` returns."""

    RESUME = "resume"  # re-enter the guest
    HALT = "halt"  # AP reset hold (NAE AP_HLT_LOOP or MSR 0x006): wait like HLT until complete_ap_reset_hold()


class MsrAccess(Protocol):
    """The vCPU side the MSR and RDPMC events need (vmmd.kvm.Vcpu provides it)."""

    def get_msr(self, index: int) -> int | None: ...

    def set_msr(self, index: int, value: int) -> bool: ...

    def get_sregs(self) -> Any: ...

    def inject_exception(self, vector: int, error_code: int | None = None) -> None: ...


# RDPMC (arch/x86/kvm/pmu.c kvm_pmu_rdpmc(), svm/pmu.c, vmx/pmu_intel.c; MSRs from asm/msr-index.h)
X86_TRAP_GP = 13
X86_CR0_PE = 1 << 0
X86_CR4_PCE = 1 << 8
MSR_K7_PERFCTR0 = 0xC001_0004  # AMD legacy counters 0-3
MSR_F15H_PERF_CTR = 0xC001_0201  # AMD PERFCTR_CORE counters 0-5, every other MSR
MSR_IA32_PERFCTR0 = 0x0000_00C1  # Intel general-purpose counters
MSR_CORE_PERF_FIXED_CTR0 = 0x0000_0309  # Intel fixed counters
INTEL_RDPMC_FIXED = 1 << 30  # pmu_intel.c INTEL_RDPMC_FIXED (INTEL_PMC_FIXED_RDPMC_BASE); GENMASK(31, 16) = type
AMD64_NUM_COUNTERS, AMD64_NUM_COUNTERS_CORE = 4, 6
KVM_ENABLE_PMU_PARAM = "/sys/module/kvm/parameters/enable_pmu"


CpuidLookup = Callable[[int, int], "tuple[int, int, int, int]"]

# The MSR event is forwarded to KVM only for these MSRs. KVM_GET_MSRS / KVM_SET_MSRS are host-initiated
# accesses (arch/x86/kvm/x86.c do_get_msr()/do_set_msr() set host_initiated), which skip what a guest's
# RDMSR/WRMSR goes through in msr_interception(): CPUID gating, read-only and reserved-bit checks, TSC writes
# resynchronising the clock, the VMM's own KVM_X86_SET_MSR_FILTER. Forwarding any index would let a guest
# write MSRs it cannot write itself. Listed: MSRs whose KVM handling does not depend on host_initiated for
# the access allowed (kvm_get_msr_common()/kvm_set_msr_common(), kvm_mtrr_get_msr(), svm_set_msr()).
# Everything else is #GP, as KVM answers an MSR it does not emulate.
MSR_IA32_TSC, MSR_IA32_APICBASE, MSR_MTRRCAP, MSR_IA32_CR_PAT, MSR_MTRRDEFTYPE = 0x10, 0x1B, 0xFE, 0x277, 0x2FF
MSR_TSC_AUX = 0xC000_0103
GUEST_MSR_READS = frozenset({MSR_IA32_TSC, MSR_IA32_APICBASE, MSR_MTRRCAP, MSR_IA32_CR_PAT, MSR_MTRRDEFTYPE,
                             MSR_TSC_AUX})
GUEST_MSR_WRITES = frozenset({MSR_IA32_CR_PAT, MSR_TSC_AUX})

_Result = tuple[int, int, VmgexitAction]
_OK: _Result = (g.GHCB_HV_RESP_NO_ACTION, 0, VmgexitAction.RESUME)
_MISSING: _Result = (g.GHCB_HV_RESP_MALFORMED_INPUT, g.GHCB_ERR_MISSING_INPUT, VmgexitAction.RESUME)
_INVALID_INPUT: _Result = (g.GHCB_HV_RESP_MALFORMED_INPUT, g.GHCB_ERR_INVALID_INPUT, VmgexitAction.RESUME)
_INVALID_SCRATCH: _Result = (g.GHCB_HV_RESP_MALFORMED_INPUT, g.GHCB_ERR_INVALID_SCRATCH_AREA, VmgexitAction.RESUME)
_INVALID_EVENT: _Result = (g.GHCB_HV_RESP_MALFORMED_INPUT, g.GHCB_ERR_INVALID_EVENT, VmgexitAction.RESUME)
_INVALID_USAGE: _Result = (g.GHCB_HV_RESP_MALFORMED_INPUT, g.GHCB_ERR_INVALID_USAGE, VmgexitAction.RESUME)
_GP: _Result = (g.GHCB_HV_RESP_ISSUE_EXCEPTION, g.GP_EVENT, VmgexitAction.RESUME)
_UD: _Result = (g.GHCB_HV_RESP_ISSUE_EXCEPTION, g.UD_EVENT, VmgexitAction.RESUME)


# CPUID 0 EBX, ECX, EDX of the vendors whose KVM module is kvm_amd: "AuthenticAMD", "HygonGenuine"
_AMD_LIKE_VENDORS = frozenset({(0x6874_7541, 0x444D_4163, 0x6974_6E65), (0x6F67_7948, 0x656E_6975, 0x6E65_476E)})


def _kvm_pmu_enabled() -> bool:
    """kvm.ko's enable_pmu; kernels before 5.17 have no such parameter and always offer the vPMU."""
    try:
        with open(KVM_ENABLE_PMU_PARAM) as f:
            return f.read().strip().upper() in ("Y", "1")
    except OSError:
        return True


def _violation(reason: str) -> VmStop:
    return VmStop("ghcb-violation", reason, ExitCode.GUEST_CRASH)


class VmgexitService:
    """Services doorbell VMGEXITs for every vCPU of one VM.

    Platform wiring (sev-es-emu):
      - RDMSR 0xC0010130 exit -> `read_ghcb_msr(i)`; WRMSR 0xC0010130 -> `write_ghcb_msr(i, value)`.
      - OUT to the doorbell port -> `vmgexit(i, vcpu)`; RESUME: re-enter; HALT: park the vCPU until
        `complete_ap_reset_hold(i)` (or treat as HLT with nothing to wake it).
      - `VmStop` raised from `vmgexit()` ends the VM (kind sev-term / ghcb-violation / internal-error).
    """

    def __init__(self, memory: GuestMemory, port_bus: PortBus, mmio_bus: MmioBus, cpuid_lookup: CpuidLookup,
                 c_bit: int = 0, vcpu_count: int = 1, ghcb_version: int = g.GHCB_VERSION_DEFAULT,
                 hv_features: int = 0, kvm_cpuid: Callable[[int, int, int], tuple] | None = None,
                 pmu_enabled: bool | None = None) -> None:
        if not g.GHCB_VERSION_MIN <= ghcb_version <= g.GHCB_VERSION_MAX:
            raise ValueError(f"GHCB version {ghcb_version} outside {g.GHCB_VERSION_MIN}..{g.GHCB_VERSION_MAX}")
        self.memory = memory
        self.port_bus = port_bus
        self.mmio_bus = mmio_bus
        self.cpuid_lookup = cpuid_lookup  # (function, index) -> the table's entry (component sizes, features)
        # (vcpu index, function, index) -> (regs, leaf answered from): kvm_cpuid() over that vCPU's own table
        # (vmmd.machine.cpuid.CpuidTable.kvm_cpuid); without it the table entry is answered as it is
        self.kvm_cpuid = kvm_cpuid
        # KVM's enable_pmu (kvm.ko parameter; pmu.c kvm_pmu_refresh() leaves version 0 without it); None: read it
        self.pmu_enabled = _kvm_pmu_enabled() if pmu_enabled is None else pmu_enabled
        self.c_bit = c_bit
        self.ghcb_version = ghcb_version
        self.hv_features = hv_features  # KVM answers SNP|AP_CREATION even to SEV-ES guests; we answer the truth (0)
        self.sev_info = g.sev_info_response(ghcb_version, g.GHCB_VERSION_MIN, c_bit)
        self.ghcb_msr: list[int] = [self.sev_info] * vcpu_count  # sev_es_vcpu_reset() preloads SEV_INFO
        self.ap_jump_table = 0  # per VM, as sev->ap_jump_table
        # (exit code, GHCB_ERR_*) of each vCPU's last refused event
        self.last_error: list[tuple[int, int] | None] = [None] * vcpu_count
        self._xcr0 = [1] * vcpu_count  # vcpu->arch.xcr0 starts at XFEATURE_MASK_FP
        self._xss = [0] * vcpu_count
        self._hold: list[int | None] = [None] * vcpu_count  # AP reset hold: GHCB GPA (NAE) or -1 (MSR protocol)
        self._pages: list[tuple[int, g.GhcbPage] | None] = [None] * vcpu_count  # last GHCB page per vCPU
        self._xsave_sizes: dict[tuple[int, bool], int] = {}
        # per vCPU (each runs on its own thread): the serviced event's SW_SCRATCH and CPL as sync_from_ghcb took
        # them, and the scratch bounce buffer to write back after it
        self._event: list[tuple[int, int]] = [(0, 0)] * vcpu_count
        self._bounce: list[tuple[int, memoryview] | None] = [None] * vcpu_count
        self._handlers: dict[int, tuple[Callable[..., _Result], int]] = {
            g.SVM_EXIT_READ_DR7: (self._nop, 0),
            g.SVM_EXIT_WRITE_DR7: (self._nop, _V_RAX),
            g.SVM_EXIT_RDTSC: (self._rdtsc, 0),
            g.SVM_EXIT_RDPMC: (self._rdpmc, _V_RCX),
            g.SVM_EXIT_CPUID: (self._cpuid, _V_RAX | _V_RCX),
            g.SVM_EXIT_INVD: (self._nop, 0),
            g.SVM_EXIT_IOIO: (self._ioio, 0),
            g.SVM_EXIT_MSR: (self._msr, _V_RCX),
            g.SVM_EXIT_VMMCALL: (self._vmmcall, _V_RAX | _V_CPL),
            g.SVM_EXIT_RDTSCP: (lambda *a: _UD, 0),
            g.SVM_EXIT_WBINVD: (self._nop, 0),
            g.SVM_EXIT_MONITOR: (self._nop, _V_RAX | _V_RCX | _V_RDX),
            g.SVM_EXIT_MWAIT: (self._nop, _V_RAX | _V_RCX),
            g.SVM_VMGEXIT_MMIO_READ: (self._mmio_read, _V_SCRATCH),
            g.SVM_VMGEXIT_MMIO_WRITE: (self._mmio_write, _V_SCRATCH),
            g.SVM_VMGEXIT_NMI_COMPLETE: (self._nop, 0),
            g.SVM_VMGEXIT_AP_HLT_LOOP: (self._ap_hlt_loop, 0),
            g.SVM_VMGEXIT_AP_JUMP_TABLE: (self._ap_jump_table, 0),
            g.SVM_VMGEXIT_HV_FEATURES: (lambda *a: (0, self.hv_features, VmgexitAction.RESUME), 0),
            g.SVM_VMGEXIT_TERM_REQUEST: (self._term_request, 0),
            g.SVM_VMGEXIT_UNSUPPORTED_EVENT: (self._unsupported_event, 0),
        }

    # --- the GHCB MSR -----------------------------------------------------------------------------------------
    def read_ghcb_msr(self, vcpu_index: int) -> int:
        return self.ghcb_msr[vcpu_index]

    def write_ghcb_msr(self, vcpu_index: int, value: int) -> None:
        self.ghcb_msr[vcpu_index] = value & M64

    # --- the doorbell -----------------------------------------------------------------------------------------
    def vmgexit(self, vcpu_index: int, vcpu: MsrAccess | None) -> VmgexitAction:
        """Service one VMGEXIT of vCPU `vcpu_index` (sev.c sev_handle_vmgexit()). Raises only VmStop."""
        try:
            value = self.ghcb_msr[vcpu_index]
            if value & g.GHCB_MSR_INFO_MASK:
                return self._msr_protocol(vcpu_index, value)
            return self._nae(vcpu_index, vcpu, value)
        except VmStop:
            raise
        except Exception as exc:  # a device or host failure: never let it escape as a traceback
            raise VmStop("internal-error", f"VMGEXIT service failed on vCPU {vcpu_index}: "
                         f"{type(exc).__name__}: {exc}", ExitCode.VMM_ERROR) from exc

    def close(self) -> None:
        """Drop the cached GHCB page views so GuestMemory.close() can unmap guest RAM."""
        for cached in self._pages:
            if cached is not None:
                cached[1].q.release()
                if isinstance(cached[1].u8, memoryview):
                    cached[1].u8.release()
        self._pages = [None] * len(self._pages)

    def ap_reset_hold_pending(self, vcpu_index: int) -> bool:
        return self._hold[vcpu_index] is not None

    def complete_ap_reset_hold(self, vcpu_index: int) -> bool:
        """Wake a vCPU parked in AP reset hold, as a SIPI does (sev.c sev_vcpu_deliver_sipi_vector()).

        NAE hold: SW_EXITINFO2 = 1 in its GHCB; MSR hold: GHCB MSR = AP reset hold response with result 1.
        Returns False when the vCPU was not held. Raises only VmStop.
        """
        hold = self._hold[vcpu_index]
        if hold is None:
            return False
        self._hold[vcpu_index] = None
        if hold < 0:
            self.ghcb_msr[vcpu_index] = g.ap_reset_hold_response(1)
        else:
            q = self._page(vcpu_index, hold).q
            q[_Q_INFO_1] = 0
            q[_Q_INFO_2] = 1
            q[_Q_BITMAP + 1] |= _V_OUT_HI
        return True

    # --- MSR protocol (sev_handle_vmgexit_msr_protocol()) -------------------------------------------------------
    def _msr_protocol(self, i: int, value: int) -> VmgexitAction:
        info = value & g.GHCB_MSR_INFO_MASK
        if info == g.GHCB_MSR_CPUID_REQ:
            function, register = g.cpuid_request_decode(value)
            regs = self._cpuid_values(i, function, 0)  # KVM sets RAX = function, RCX = 0
            self.ghcb_msr[i] = g.cpuid_response(value, regs[register])
        elif info == g.GHCB_MSR_SEV_INFO_REQ:
            self.ghcb_msr[i] = self.sev_info
        elif info == g.GHCB_MSR_AP_RESET_HOLD_REQ:
            self.ghcb_msr[i] = g.ap_reset_hold_response(0)  # preset "no SIPI yet"
            self._hold[i] = -1
            return VmgexitAction.HALT
        elif info == g.GHCB_MSR_HV_FT_REQ:
            self.ghcb_msr[i] = g.hv_features_response(self.hv_features)
        elif info == g.GHCB_MSR_TERM_REQ:
            reason_set, reason_code = g.termination_decode(value)
            raise VmStop("sev-term", f"guest requested termination through the GHCB MSR protocol (vCPU {i}, "
                         f"GHCB MSR {value:#x}): {g.describe_termination(reason_set, reason_code)}",
                         ExitCode.GUEST_TERMINATED, status=reason_set << 8 | reason_code)
        elif info in g.SNP_ONLY_MSR_REQUESTS:
            raise _violation(f"vCPU {i} sent the SEV-SNP-only GHCB MSR request {info:#05x} (GHCB MSR {value:#x}) "
                             "to an SEV-ES VM; KVM terminates such a guest (KVM_SYSTEM_EVENT_SEV_TERM)")
        # any other request code: KVM keeps the GHCB MSR value as-is and resumes
        return VmgexitAction.RESUME

    # --- NAE events ---------------------------------------------------------------------------------------------
    def _page(self, i: int, gpa: int) -> g.GhcbPage:
        cached = self._pages[i]
        if cached is not None and cached[0] == gpa:
            return cached[1]
        if gpa == 0:
            raise _violation(f"vCPU {i} rang the VMGEXIT doorbell with no GHCB registered (GHCB MSR = 0)")
        try:
            view = self.memory.buffer(gpa, g.GHCB_PAGE_SIZE)
        except GuestMemoryError:
            raise _violation(f"vCPU {i}: GHCB GPA {gpa:#x} is not inside guest RAM") from None
        if self._read_only(gpa):
            raise _violation(f"vCPU {i}: GHCB GPA {gpa:#x} is in a read-only (ROM) slot")
        page = g.GhcbPage(view)
        self._pages[i] = (gpa, page)
        return page

    def _read_only(self, gpa: int) -> bool:
        return any(s.read_only and s.gpa <= gpa < s.end_gpa for s in self.memory.slots)

    def _nae(self, i: int, vcpu: MsrAccess | None, gpa: int) -> VmgexitAction:
        """sev_handle_vmgexit() on a mapped GHCB, with its writes to the page in KVM's order (the guest can see the
        order when a scratch area outside the GHCB page overlaps it):

        1. sev_es_sync_from_ghcb(): snapshot the inputs, clear the valid bitmap;
        2. sev_es_validate_vmgexit(): an error sets SW_EXITINFO1/2 (valid) and skips to 5;
        3. svm_vmgexit_success(svm, 0): SW_EXITINFO1 = SW_EXITINFO2 = 0, marked valid;
        4. the handler; a scratch area outside the GHCB page is read into a bounce buffer first
           (setup_vmgexit_scratch(): kvm_read_guest()) and the handler sets its SW_EXITINFO1/2;
        5. sev_es_unmap_ghcb(): the bounce buffer is written back (kvm_write_guest()) when the event wrote it,
           then sev_es_sync_to_ghcb() sets RAX, RBX, RCX, RDX and their valid bits.
        """
        page = self._page(i, gpa)
        q = page.q
        bitmap = q[_Q_BITMAP] | q[_Q_BITMAP + 1] << 64
        q[_Q_BITMAP] = 0
        q[_Q_BITMAP + 1] = 0
        exit_code = q[_Q_EXIT_CODE]
        info1 = q[_Q_INFO_1]
        info2 = q[_Q_INFO_2]
        regs = [q[_Q_RAX] if bitmap & _V_RAX else 0, q[_Q_RBX] if bitmap & _V_RBX else 0,
                q[_Q_RCX] if bitmap & _V_RCX else 0, q[_Q_RDX] if bitmap & _V_RDX else 0]
        scratch_gpa = q[_Q_SCRATCH] if bitmap & _V_SCRATCH else 0
        cpl = int(page.u8[g.CPL]) if bitmap & _V_CPL else 0
        if bitmap & _V_XCR0:
            self._xcr0[i] = q[_Q_XCR0]
        if bitmap & _V_XSS:
            self._xss[i] = q[_Q_XSS]
        self._bounce[i] = None
        if q[_Q_USAGE] >> 32:
            result = _INVALID_USAGE
        elif bitmap & _V_EXIT != _V_EXIT:
            result = _MISSING
        else:
            entry = self._handlers.get(exit_code)
            if entry is None:  # KVM answers MISSING_INPUT to SNP-only events from a non-SNP guest
                result = _MISSING if exit_code in g.SNP_ONLY_NAE_EVENTS else _INVALID_EVENT
            elif bitmap & entry[1] != entry[1]:
                result = _MISSING
            else:
                # svm_vmgexit_success(svm, 0); the bitmap was just cleared, so assigning is setting the two bits
                q[_Q_INFO_1] = 0
                q[_Q_INFO_2] = 0
                q[_Q_BITMAP] = _V_INFO_LO
                q[_Q_BITMAP + 1] = _V_INFO_HI
                self._event[i] = (scratch_gpa, cpl)
                result = entry[0](i, vcpu, page, gpa, bitmap, info1, info2, regs)
        if result[0]:
            self.last_error[i] = (exit_code, result[1])
        q[_Q_INFO_1] = result[0]
        q[_Q_INFO_2] = result[1]
        q[_Q_RAX] = regs[0]
        q[_Q_RBX] = regs[1]
        q[_Q_RCX] = regs[2]
        q[_Q_RDX] = regs[3]
        bounce = self._bounce[i]
        if bounce is None:  # nothing but the event wrote the bitmap: exactly SW_EXITINFO1/2 and the GPRs are valid
            q[_Q_BITMAP] = _V_OUT_LO
            q[_Q_BITMAP + 1] = _V_OUT_HI
            return result[2]
        # sev_es_unmap_ghcb(): kvm_write_guest() of the scratch area after the event's SW_EXITINFO1/2, before
        # sev_es_sync_to_ghcb() sets the GPRs and ORs in their valid bits
        self._bounce[i] = None
        q[_Q_BITMAP] |= _V_INFO_LO
        q[_Q_BITMAP + 1] |= _V_INFO_HI
        self._write_span(bounce[0], bounce[1])
        q[_Q_RAX] = regs[0]
        q[_Q_RBX] = regs[1]
        q[_Q_RCX] = regs[2]
        q[_Q_RDX] = regs[3]
        q[_Q_BITMAP] |= _V_GPR_LO
        q[_Q_BITMAP + 1] |= _V_GPR_HI
        return result[2]

    def _span(self, gpa: int, length: int) -> list[memoryview] | None:
        """Views of [gpa, gpa+length) across memory slots that follow each other without a gap, as kvm_read_guest()
        and kvm_write_guest() walk guest pages slot by slot; None when any byte is outside every slot."""
        views = []
        pos, end = gpa, gpa + length
        while pos < end:
            slot = next((s for s in self.memory.slots if s.gpa <= pos < s.end_gpa), None)
            if slot is None:
                return None
            size = min(end, slot.end_gpa) - pos
            views.append(self.memory.buffer(pos, size))
            pos += size
        return views

    def _write_span(self, gpa: int, data: memoryview) -> None:
        offset = 0
        for view in self._span(gpa, len(data)) or ():
            view[:] = data[offset:offset + len(view)]
            offset += len(view)

    def _scratch(self, i: int, page: g.GhcbPage, gpa: int, length: int, sync: bool) -> memoryview | None:
        """setup_vmgexit_scratch(): the scratch area as a writable byte memoryview, or None for
        GHCB_ERR_INVALID_SCRATCH_AREA.

        Inside the GHCB page it must lie wholly in the shared buffer and is used in place. Outside, it may be at
        most 16 pages; it is copied into a bounce buffer (kvm_read_guest(): across adjacent memory slots, never
        outside them; where it fails KVM_RUN returns EFAULT, so the VM stops), and written back after the event
        when `sync` (the event wrote it), as sev_es_unmap_ghcb() does.
        """
        begin = self._event[i][0]
        if not begin:
            return None
        end = begin + length
        if end > M64:
            return None
        if begin & ~0xFFF == gpa:
            if begin < gpa + g.SHARED_BUFFER or end > gpa + g.SHARED_BUFFER_END:
                return None
            offset = begin - gpa
            return memoryview(page.u8)[offset:offset + length]
        if length > GHCB_SCRATCH_AREA_LIMIT:
            return None
        if not length:
            return memoryview(bytearray())
        views = self._span(begin, length)
        if views is None:
            raise _violation(f"scratch area {begin:#x}+{length:#x} is outside guest RAM "
                             "(KVM: kvm_read_guest() fails, KVM_RUN returns EFAULT)")
        if sync and any(self._read_only(begin + off) for off in _piece_starts(views)):
            raise _violation(f"scratch area {begin:#x}+{length:#x} to be written is in a read-only slot")
        bounce = memoryview(bytearray(views[0]) if len(views) == 1 else bytearray(b"".join(views)))
        if sync:
            self._bounce[i] = (begin, bounce)
        return bounce

    def _nop(self, *args: object) -> _Result:
        return _OK

    def _rdtsc(self, i: int, *args: object) -> _Result:
        raise _violation(f"vCPU {i} sent NAE RDTSC (0x6e): KVM has no SVM exit handler for it and stops the VM "
                         "(KVM_EXIT_INTERNAL_ERROR, unexpected exit reason)")

    def _cpuid(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, bitmap: int, info1: int, info2: int,
               regs: list[int]) -> _Result:
        if regs[0] == 0xD and not bitmap & _V_XCR0:
            return _MISSING
        regs[:] = self._cpuid_values(i, regs[0] & M32, regs[2] & M32)
        return _OK

    def _cpuid_values(self, i: int, function: int, index: int) -> list[int]:
        """kvm_cpuid() over the KVM_SET_CPUID2 table, with leaf 0xD EBX sized for the guest's XCR0 (and XSS)."""
        if self.kvm_cpuid is not None:
            (eax, ebx, ecx, edx), leaf = self.kvm_cpuid(i, function, index)
        else:
            (eax, ebx, ecx, edx), leaf = self.cpuid_lookup(function, index), function
        if leaf == 0xD and index <= 1 and (eax | ebx | ecx | edx):  # also after an out-of-range redirect to 0xD
            if index == 0:  # kvm_update_cpuid_runtime(): xstate_required_size(xcr0, false)
                ebx = self._xsave_size(self._xcr0[i], False)
            elif eax & (CPUID_D1_EAX_XSAVEC | CPUID_D1_EAX_XSAVES):
                ebx = self._xsave_size(self._xcr0[i] | self._xss[i], True)
        return [eax & M32, ebx & M32, ecx & M32, edx & M32]

    def _xsave_size(self, xstate_bv: int, compacted: bool) -> int:
        """arch/x86/kvm/cpuid.c xstate_required_size(), reading component sizes from the CPUID table."""
        key = (xstate_bv, compacted)
        size = self._xsave_sizes.get(key)
        if size is not None:
            return size
        size = XSAVE_LEGACY_AND_HEADER
        bits = xstate_bv & XFEATURE_MASK_EXTEND
        while bits:
            feature = (bits & -bits).bit_length() - 1
            bits &= bits - 1
            eax, ebx, ecx, _ = self.cpuid_lookup(0xD, feature)
            if compacted:
                offset = (size + 63) & ~63 if ecx & 2 else size
            else:
                offset = ebx
            size = max(size, (offset & M32) + (eax & M32))
        if len(self._xsave_sizes) > 256:  # guest-controlled keys: keep the cache bounded
            self._xsave_sizes.clear()
        self._xsave_sizes[key] = size
        return size

    def _ioio(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, bitmap: int, info1: int, info2: int,
              regs: list[int]) -> _Result:
        io = info1 & M32  # io_interception(): u32 io_info
        if io & g.SVM_IOIO_STR_MASK:
            if not bitmap & _V_SCRATCH:
                return _MISSING
        elif not io & g.SVM_IOIO_TYPE_MASK and not bitmap & _V_RAX:
            return _MISSING
        size = (io & g.SVM_IOIO_SIZE_MASK) >> g.SVM_IOIO_SIZE_SHIFT
        if size != 1 and size != 2 and size != 4:  # stricter than KVM, which would pass size 0/3/5.. on
            return _INVALID_INPUT
        port = io >> g.SVM_IOIO_PORT_SHIFT
        if io & g.SVM_IOIO_STR_MASK:
            return self._string_io(i, page, gpa, bitmap, port, size, bool(io & g.SVM_IOIO_TYPE_MASK), info2)
        if io & g.SVM_IOIO_TYPE_MASK:
            value = self.port_bus.read(port, size)
            # complete_fast_pio_in(): sizes < 4 merge into RAX, size 4 zero-extends
            regs[0] = (regs[0] & ~((1 << (8 * size)) - 1) | value) if size < 4 else value
        else:
            self.port_bus.write(port, size, regs[0] & ((1 << (8 * size)) - 1))
        return _OK

    def _string_io(self, i: int, page: g.GhcbPage, gpa: int, bitmap: int, port: int, size: int, is_in: bool,
                   count: int) -> _Result:
        """sev_es_string_io(): count = SW_EXITINFO2 elements through the scratch buffer."""
        if count > INT_MAX or count * size > INT_MAX:
            raise _violation(f"vCPU {i}: string I/O count {count:#x} x {size} overflows "
                             "(KVM: sev_es_string_io() returns -EINVAL, KVM_RUN fails)")
        nbytes = count * size
        buffer = self._scratch(i, page, gpa, nbytes, is_in)
        if buffer is None:
            return _INVALID_SCRATCH
        if is_in:
            read = self.port_bus.read
            buffer[:] = b"".join(read(port, size).to_bytes(size, "little") for _ in range(count))
        else:
            data = buffer.tobytes()
            write = self.port_bus.write
            for offset in range(0, nbytes, size):
                write(port, size, int.from_bytes(data[offset:offset + size], "little"))
        return _OK

    def _msr(self, i: int, vcpu: MsrAccess | None, page: g.GhcbPage, gpa: int, bitmap: int, info1: int,
             info2: int, regs: list[int]) -> _Result:
        if info1 and bitmap & (_V_RAX | _V_RDX) != _V_RAX | _V_RDX:
            return _MISSING
        index = regs[2] & M32
        if vcpu is None or index not in (GUEST_MSR_WRITES if info1 else GUEST_MSR_READS):
            return _GP
        if index == MSR_TSC_AUX and not self._has_rdtscp_or_rdpid():
            return _GP  # kvm_set_msr_common()/kvm_get_msr_common(): a guest without RDTSCP/RDPID gets #GP
        if info1:  # kvm_emulate_wrmsr(): EDX:EAX
            if not vcpu.set_msr(index, (regs[3] & M32) << 32 | regs[0] & M32):
                return _GP  # svm_complete_emulated_msr(): #GP through the GHCB
        else:
            value = vcpu.get_msr(index)
            if value is None:
                return _GP
            regs[0] = value & M32
            regs[3] = (value >> 32) & M32
        return _OK

    def _rdpmc(self, i: int, vcpu: MsrAccess | None, page: g.GhcbPage, gpa: int, bitmap: int, info1: int,
               info2: int, regs: list[int]) -> _Result:
        """x86.c kvm_emulate_rdpmc(): the counter into EDX:EAX, or #GP that KVM injects itself (kvm_inject_gp(),
        SW_EXITINFO1 stays 0). vmmd injects it the same way, with KVM_SET_VCPU_EVENTS; only without a vCPU
        (unit tests of other events) is it answered through the GHCB instead."""
        counter = self._pmc(regs[2] & M32)
        if counter is not None and vcpu is not None and self._rdpmc_allowed(i, vcpu):
            value = vcpu.get_msr(counter[0])  # host-initiated read: pmc_read_counter()
            if value is not None:
                value &= counter[1]
                regs[0] = value & M32  # kvm_rax_write(vcpu, (u32)data)
                regs[3] = value >> 32
                return _OK
        inject = getattr(vcpu, "inject_exception", None)
        if inject is None:
            return _GP
        inject(X86_TRAP_GP, 0)
        return _OK

    def _rdpmc_allowed(self, i: int, vcpu: MsrAccess) -> bool:
        """kvm_pmu_rdpmc(): refused when CR4.PCE is clear, CPL > 0 (the GHCB's CPL, as sev_es_sync_from_ghcb()
        puts it in the VMCB) and CR0.PE is set."""
        sregs = vcpu.get_sregs()
        return bool(sregs.cr4 & X86_CR4_PCE or not self._event[i][1] or not sregs.cr0 & X86_CR0_PE)

    def _pmc(self, ecx: int) -> tuple[int, int] | None:
        """(counter MSR, value mask) of the PMC that RDPMC's ECX names, or None where KVM finds none
        (amd_rdpmc_ecx_to_pmc() / intel_rdpmc_ecx_to_pmc() over the vPMU kvm_pmu_refresh() built from the guest's
        CPUID). The host's vendor picks the rules, as KVM's kvm_amd / kvm_intel module does."""
        if not self.pmu_enabled:
            return None
        vendor = self.cpuid_lookup(0, 0)[1:]
        if vendor in _AMD_LIKE_VENDORS:
            if self.cpuid_lookup(0x8000_0022, 0)[0] & 1:  # PERFMON_V2: 0x80000022 EBX[3:0] counters
                count = min(self.cpuid_lookup(0x8000_0022, 0)[1] & 0xF, AMD64_NUM_COUNTERS_CORE)
            elif self.cpuid_lookup(0x8000_0001, 0)[2] & (1 << 23):  # PERFCTR_CORE
                count = AMD64_NUM_COUNTERS_CORE
            else:
                count = AMD64_NUM_COUNTERS
            if ecx >= count:  # amd_pmu_get_pmc(): the whole ECX is the index
                return None
            core = count > AMD64_NUM_COUNTERS or bool(self.cpuid_lookup(0x8000_0001, 0)[2] & (1 << 23))
            return (MSR_F15H_PERF_CTR + 2 * ecx if core else MSR_K7_PERFCTR0 + ecx), M64
        eax, _, _, edx = self.cpuid_lookup(0xA, 0)
        version = eax & 0xFF
        if not version:
            return None
        kind, index = ecx & 0xFFFF_0000, ecx & 0xFFFF
        if kind == 0:
            count, width, base = (eax >> 8) & 0xFF, (eax >> 16) & 0xFF, MSR_IA32_PERFCTR0
        elif kind == INTEL_RDPMC_FIXED:
            count = edx & 0x1F if version > 1 else 0
            width, base = (edx >> 5) & 0xFF, MSR_CORE_PERF_FIXED_CTR0
        else:
            return None
        if index >= count:
            return None
        return base + index, (1 << width) - 1

    def _has_rdtscp_or_rdpid(self) -> bool:
        """The guest's CPUID: RDTSCP (0x80000001 EDX[27]) or RDPID (7.0 ECX[22])."""
        return bool(self.cpuid_lookup(0x8000_0001, 0)[3] & (1 << 27) or self.cpuid_lookup(7, 0)[2] & (1 << 22))

    def _vmmcall(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, bitmap: int, info1: int, info2: int,
                 regs: list[int]) -> _Result:
        """kvm_emulate_hypercall() with no PV features: CPL > 0 -> -KVM_EPERM, VAPIC_POLL_IRQ -> 0, else -KVM_ENOSYS."""
        if self._event[i][1]:  # the CPL sev_es_sync_from_ghcb() took (0 when not valid)
            regs[0] = -KVM_EPERM & M64
        elif regs[0] == KVM_HC_VAPIC_POLL_IRQ:
            regs[0] = 0
        else:
            regs[0] = -KVM_ENOSYS & M64
        return _OK

    def _mmio_read(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, bitmap: int, info1: int, info2: int,
                   regs: list[int]) -> _Result:
        buffer = self._scratch(i, page, gpa, info2, True)
        if buffer is None:
            return _INVALID_SCRATCH
        read = self.mmio_bus.read
        data = bytearray()
        for offset in range(0, info2, 8):  # KVM_EXIT_MMIO fragments of at most 8 bytes
            size = min(8, info2 - offset)
            data += read(info1 + offset, size).to_bytes(size, "little")
        buffer[:] = data
        return _OK

    def _mmio_write(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, bitmap: int, info1: int, info2: int,
                    regs: list[int]) -> _Result:
        buffer = self._scratch(i, page, gpa, info2, False)
        if buffer is None:
            return _INVALID_SCRATCH
        data = buffer.tobytes()
        write = self.mmio_bus.write
        for offset in range(0, info2, 8):
            size = min(8, info2 - offset)
            write(info1 + offset, size, int.from_bytes(data[offset:offset + size], "little"))
        return _OK

    def _ap_hlt_loop(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, *args: object) -> _Result:
        self._hold[i] = gpa  # kvm_emulate_ap_reset_hold(); SW_EXITINFO2 stays 0 until a SIPI
        return (0, 0, VmgexitAction.HALT)

    def _ap_jump_table(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, bitmap: int, info1: int,
                       info2: int, regs: list[int]) -> _Result:
        if info1 == g.SVM_VMGEXIT_SET_AP_JUMP_TABLE:
            self.ap_jump_table = info2
            return _OK
        if info1 == g.SVM_VMGEXIT_GET_AP_JUMP_TABLE:
            return (0, self.ap_jump_table, VmgexitAction.RESUME)
        return _INVALID_INPUT

    def _term_request(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, bitmap: int, info1: int,
                      info2: int, regs: list[int]) -> _Result:
        reason_set, reason_code = g.nae_termination_decode(info1)
        raise VmStop("sev-term", f"guest requested termination through the GHCB (vCPU {i}, GHCB {gpa:#x}, "
                     f"SW_EXITINFO2 {info2:#x}): {g.describe_termination(reason_set, reason_code)}",
                     ExitCode.GUEST_TERMINATED, status=reason_set << 8 | reason_code)

    def _unsupported_event(self, i: int, vcpu: object, page: g.GhcbPage, gpa: int, bitmap: int, info1: int,
                           info2: int, regs: list[int]) -> _Result:
        raise _violation(f"vCPU {i} reported an unsupported event (NAE 0x8000ffff): SW_EXITINFO1 {info1:#x} "
                         f"SW_EXITINFO2 {info2:#x} (KVM: KVM_RUN fails with EINVAL)")
