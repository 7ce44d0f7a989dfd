"""Decode an SEV-ES guest's termination request from KVM_EXIT_SYSTEM_EVENT(KVM_SYSTEM_EVENT_SEV_TERM).

arch/x86/kvm/svm/sev.c reports both termination forms the same way: exit_reason
KVM_EXIT_SYSTEM_EVENT, system_event.type KVM_SYSTEM_EVENT_SEV_TERM, ndata 1 and
data[0] = control->ghcb_gpa, which holds
- for the MSR protocol (sev_handle_vmgexit_msr_protocol(), GHCB_MSR_TERM_REQ): the GHCB MSR
  value itself: GHCBInfo [11:0] = 0x100, reason set [15:12], reason code [23:16];
- for the NAE event SVM_VMGEXIT_TERM_REQUEST (0x8000FFFE, sev_handle_vmgexit()): the GHCB's
  GPA (page aligned, so [11:0] = 0). The guest put the reason in the shared GHCB page's
  SW_EXITINFO1: reason set [3:0], reason code [11:4] (GHCB spec 56421, "Termination Request"),
  but sev_handle_vmgexit() zeroes SW_EXITINFO1/2 in the GHCB (ghcb_set_sw_exit_info_1(ghcb, 0),
  svm_vmgexit_success() in later kernels) before it dispatches the event; only its kernel log
  line "SEV-ES guest requested termination" keeps them. A zero there is reported as unknown,
  never as reason 0/0; a non-zero value (a kernel that left it) is decoded.

`decode_sev_termination()` is a pure function of data[0] and guest memory; guest-controlled
values are only ever read through GuestMemory (bounds-checked) and never raise.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmd.errors import GuestMemoryError
from vmmd.memory import GuestMemory
from vmmd.sev import ghcb

# Reason sets and codes (arch/x86/include/asm/sev-common.h; GHCB spec 56421 "Termination Request").
SEV_TERM_SET_GEN = 0
SEV_TERM_SET_LINUX = 1
REASON_SET_NAMES = {SEV_TERM_SET_GEN: "general (GHCB spec)", SEV_TERM_SET_LINUX: "Linux guest"}
REASON_CODE_NAMES: dict[tuple[int, int], str] = {
    (SEV_TERM_SET_GEN, 0): "general termination request",  # GHCB_SEV_ES_GEN_REQ
    (SEV_TERM_SET_GEN, 1): "SEV-ES / GHCB protocol range not supported",  # GHCB_SEV_ES_PROT_UNSUPPORTED
    (SEV_TERM_SET_GEN, 2): "SEV-SNP features not supported",  # GHCB_SNP_UNSUPPORTED
    (SEV_TERM_SET_LINUX, 0): "GHCB GPA registration failure",  # GHCB_TERM_REGISTER
    (SEV_TERM_SET_LINUX, 1): "page state change failure",  # GHCB_TERM_PSC
    (SEV_TERM_SET_LINUX, 2): "PVALIDATE failure",  # GHCB_TERM_PVALIDATE
    (SEV_TERM_SET_LINUX, 3): "SNP guest is not running at VMPL0",  # GHCB_TERM_NOT_VMPL0
    (SEV_TERM_SET_LINUX, 4): "CPUID validation failure",  # GHCB_TERM_CPUID
    (SEV_TERM_SET_LINUX, 5): "CPUID failure during hypervisor fallback",  # GHCB_TERM_CPUID_HV
    (SEV_TERM_SET_LINUX, 6): "secrets page failure",  # GHCB_TERM_SECRETS_PAGE
    (SEV_TERM_SET_LINUX, 7): "SVSM not advertised in the secrets page",  # GHCB_TERM_NO_SVSM
    (SEV_TERM_SET_LINUX, 8): "SVSM present but has set VMPL to 0",  # GHCB_TERM_SVSM_VMPL0
    (SEV_TERM_SET_LINUX, 9): "SVSM present but CAA not page aligned",  # GHCB_TERM_SVSM_CAA
    (SEV_TERM_SET_LINUX, 10): "Secure TSC initialization failed",  # GHCB_TERM_SECURE_TSC
}

MSR_PROTOCOL = "msr-protocol"
GHCB_NAE = "ghcb-nae"
UNDECODABLE = "undecodable"


@dataclass(frozen=True)
class SevTermination:
    """A decoded termination request. reason_set / reason_code are None when they could not be read."""

    form: str  # MSR_PROTOCOL, GHCB_NAE or UNDECODABLE
    raw: int  # system_event.data[0]
    reason_set: int | None
    reason_code: int | None
    detail: str = ""  # why decoding stopped, or what else was seen

    @property
    def reason(self) -> str:
        if self.reason_set is None or self.reason_code is None:
            return "reason unknown"
        set_name = REASON_SET_NAMES.get(self.reason_set, "unknown set")
        code_name = REASON_CODE_NAMES.get((self.reason_set, self.reason_code), "unknown code")
        return f"reason set {self.reason_set} ({set_name}) code {self.reason_code:#x}: {code_name}"

    def __str__(self) -> str:
        how = {MSR_PROTOCOL: f"GHCB MSR protocol termination request (GHCB MSR {self.raw:#x})",
               GHCB_NAE: f"GHCB termination event (GHCB at GPA {self.raw:#x})",
               UNDECODABLE: f"SEV termination with undecodable data {self.raw:#x}"}[self.form]
        text = f"guest requested termination: {self.reason}; {how}"
        return f"{text}; {self.detail}" if self.detail else text


def decode_sev_termination(data0: int, memory: GuestMemory | None) -> SevTermination:
    """Decode system_event.data[0] of a KVM_SYSTEM_EVENT_SEV_TERM exit. Never raises."""
    data0 &= 0xFFFF_FFFF_FFFF_FFFF
    info = data0 & ghcb.GHCB_MSR_INFO_MASK
    if info == ghcb.GHCB_MSR_TERM_REQ:
        reason_set, reason_code = ghcb.termination_decode(data0)
        return SevTermination(MSR_PROTOCOL, data0, reason_set, reason_code)
    if info != 0:
        return SevTermination(UNDECODABLE, data0, None, None,
                              f"GHCB MSR request code {info:#x} is not a termination request")
    if memory is None:
        return SevTermination(GHCB_NAE, data0, None, None, "guest memory unavailable to read the GHCB")
    try:
        page = memory.view(data0, ghcb.GHCB_PAGE_SIZE)
    except GuestMemoryError:
        return SevTermination(GHCB_NAE, data0, None, None, "the GHCB GPA is not inside guest RAM")
    words = page.view("<u8")
    exit_code = int(words[ghcb.SW_EXIT_CODE // 8])
    exit_info_1 = int(words[ghcb.SW_EXIT_INFO_1 // 8])
    if exit_code != ghcb.SVM_VMGEXIT_TERM_REQUEST:
        return SevTermination(GHCB_NAE, data0, None, None,
                              f"GHCB sw_exit_code is {exit_code:#x}, "
                              f"not TERM_REQUEST {ghcb.SVM_VMGEXIT_TERM_REQUEST:#x}")
    if exit_info_1 == 0:
        return SevTermination(GHCB_NAE, data0, None, None,
                              "KVM clears the GHCB's sw_exit_info before handling the event; the host kernel "
                              "log has the reason (dmesg: 'SEV-ES guest requested termination')")
    reason_set, reason_code = ghcb.nae_termination_decode(exit_info_1)
    detail = f"sw_exit_info_1 {exit_info_1:#x} has bits above [11:0]" if exit_info_1 >> 12 else ""
    return SevTermination(GHCB_NAE, data0, reason_set, reason_code, detail)
