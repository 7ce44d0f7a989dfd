"""GHCB page layout, valid bitmap, MSR-protocol codec and NAE exit codes. Pure: no I/O.

Owns every constant and bit layout of the SEV-ES Guest-Hypervisor Communication
Block protocol (AMD pub. 56421) that vmmd uses, each mirrored from the Linux
header it comes from:

- arch/x86/include/asm/svm.h: struct ghcb_save_area / struct ghcb (offsets below),
  GHCB_BITMAP_IDX(field) = offsetof(struct ghcb_save_area, field) / sizeof(u64).
- arch/x86/include/asm/sev-common.h: GHCB MSR protocol (GHCB_MSR_*), termination
  reason sets, GHCB_ERR_* codes.
- arch/x86/include/uapi/asm/svm.h: SVM_EXIT_* and SVM_VMGEXIT_* exit codes,
  SVM_IOIO_* intercept-info bits, SVM_EVTINJ_* event encoding.

`GhcbPage` wraps a 4096-byte window of guest memory (it never maps anything
itself): a memoryview from `GuestMemory.buffer()` in the VMGEXIT service, or any
other unsigned-byte buffer such as a numpy uint8 view. It reads/writes fields
through a cached u64 memoryview, the cheapest access path measured in CPython
here, and needs no numpy (whose import would cost every sev-es-emu run ~30-90 ms).
"""

from __future__ import annotations

from typing import NamedTuple

GHCB_PAGE_SIZE = 4096

# --- struct ghcb_save_area (arch/x86/include/asm/svm.h), byte offsets -----------------------------------------
CPL = 0x0CB  # u8
XSS = 0x140
DR7 = 0x160
RIP = 0x178
RSP = 0x1D8
RAX = 0x1F8
RCX = 0x308
RDX = 0x310
RBX = 0x318
RBP = 0x328
RSI = 0x330
RDI = 0x338
R8 = 0x340
R9 = 0x348
R10 = 0x350
R11 = 0x358
R12 = 0x360
R13 = 0x368
R14 = 0x370
R15 = 0x378
SW_EXIT_CODE = 0x390
SW_EXIT_INFO_1 = 0x398
SW_EXIT_INFO_2 = 0x3A0
SW_SCRATCH = 0x3A8
XCR0 = 0x3E8
VALID_BITMAP = 0x3F0  # u8 valid_bitmap[16]
VALID_BITMAP_SIZE = 16
X87_STATE_GPA = 0x400  # past the bitmap's reach (bit 128): never marked valid
GHCB_SAVE_AREA_SIZE = 0x408  # EXPECTED_GHCB_SAVE_AREA_SIZE 1032

# --- struct ghcb ---------------------------------------------------------------------------------------------
SHARED_BUFFER = 0x800  # u8 shared_buffer[GHCB_SHARED_BUF_SIZE]
GHCB_SHARED_BUF_SIZE = 2032
SHARED_BUFFER_END = SHARED_BUFFER + GHCB_SHARED_BUF_SIZE  # 0xFF0 = offsetof(struct ghcb, reserved_0xff0)
PROTOCOL_VERSION = 0xFFA  # u16, negotiated SEV-ES/GHCB protocol version
GHCB_USAGE = 0xFFC  # u32, 0 = standard GHCB (the only usage KVM accepts)

# Every u64 field the valid bitmap tracks (name -> offset); CPL is the only u8 one.
FIELDS: dict[str, int] = {
    "cpl": CPL, "xss": XSS, "dr7": DR7, "rip": RIP, "rsp": RSP, "rax": RAX, "rcx": RCX, "rdx": RDX, "rbx": RBX,
    "rbp": RBP, "rsi": RSI, "rdi": RDI, "r8": R8, "r9": R9, "r10": R10, "r11": R11, "r12": R12, "r13": R13,
    "r14": R14, "r15": R15, "sw_exit_code": SW_EXIT_CODE, "sw_exit_info_1": SW_EXIT_INFO_1,
    "sw_exit_info_2": SW_EXIT_INFO_2, "sw_scratch": SW_SCRATCH, "xcr0": XCR0,
}

# --- GHCB protocol versions (arch/x86/kvm/svm/sev.c) ---------------------------------------------------------
GHCB_VERSION_MIN = 1
GHCB_VERSION_MAX = 2
GHCB_VERSION_DEFAULT = 2  # what KVM_SEV_INIT2 uses when ghcb_version = 0; legacy KVM_SEV_ES_INIT uses 1

# --- MSR protocol (arch/x86/include/asm/sev-common.h) -------------------------------------------------------
MSR_AMD64_SEV_ES_GHCB = 0xC0010130
MSR_AMD64_SEV_STATUS = 0xC0010131
GHCB_MSR_INFO_MASK = 0xFFF  # GHCBInfo: GHCBData[11:0]
GHCB_MSR_SEV_INFO_RESP = 0x001
GHCB_MSR_SEV_INFO_REQ = 0x002
GHCB_MSR_CPUID_REQ = 0x004
GHCB_MSR_CPUID_RESP = 0x005
GHCB_MSR_AP_RESET_HOLD_REQ = 0x006
GHCB_MSR_AP_RESET_HOLD_RESP = 0x007
GHCB_MSR_PREF_GPA_REQ = 0x010  # SNP only
GHCB_MSR_PREF_GPA_RESP = 0x011
GHCB_MSR_REG_GPA_REQ = 0x012  # SNP only
GHCB_MSR_REG_GPA_RESP = 0x013
GHCB_MSR_PSC_REQ = 0x014  # SNP only
GHCB_MSR_PSC_RESP = 0x015
GHCB_MSR_HV_FT_REQ = 0x080
GHCB_MSR_HV_FT_RESP = 0x081
GHCB_MSR_TERM_REQ = 0x100
SNP_ONLY_MSR_REQUESTS = frozenset({GHCB_MSR_PREF_GPA_REQ, GHCB_MSR_REG_GPA_REQ, GHCB_MSR_PSC_REQ})

GHCB_CPUID_REQ_EAX = 0
GHCB_CPUID_REQ_EBX = 1
GHCB_CPUID_REQ_ECX = 2
GHCB_CPUID_REQ_EDX = 3

# GHCB_HV_FT_* feature bits (returned in GHCBData[63:12] / SW_EXITINFO2)
GHCB_HV_FT_SNP = 1 << 0
GHCB_HV_FT_SNP_AP_CREATION = 1 << 1
KVM_GHCB_HV_FT_SUPPORTED = GHCB_HV_FT_SNP | GHCB_HV_FT_SNP_AP_CREATION  # what KVM answers, even to SEV-ES guests

# Termination reason sets and codes
SEV_TERM_SET_GEN = 0
GHCB_SEV_ES_GEN_REQ = 0
GHCB_SEV_ES_PROT_UNSUPPORTED = 1
GHCB_SNP_UNSUPPORTED = 2
SEV_TERM_SET_LINUX = 1
GHCB_TERM_REGISTER = 0
GHCB_TERM_PSC = 1
GHCB_TERM_PVALIDATE = 2
GHCB_TERM_NOT_VMPL0 = 3

_TERM_REASONS = {
    (SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ): "general termination request",
    (SEV_TERM_SET_GEN, GHCB_SEV_ES_PROT_UNSUPPORTED): "SEV-ES / GHCB protocol range not supported",
    (SEV_TERM_SET_GEN, GHCB_SNP_UNSUPPORTED): "SEV-SNP features not supported",
    (SEV_TERM_SET_LINUX, GHCB_TERM_REGISTER): "Linux: GHCB GPA registration failure",
    (SEV_TERM_SET_LINUX, GHCB_TERM_PSC): "Linux: page state change failure",
    (SEV_TERM_SET_LINUX, GHCB_TERM_PVALIDATE): "Linux: PVALIDATE failure",
    (SEV_TERM_SET_LINUX, GHCB_TERM_NOT_VMPL0): "Linux: SNP guest not running at VMPL0",
}

# --- GHCB_ERR_*: SW_EXITINFO2 when SW_EXITINFO1[31:0] = 2 (sev-common.h) -----------------------------------
GHCB_ERR_NOT_REGISTERED = 1
GHCB_ERR_INVALID_USAGE = 2
GHCB_ERR_INVALID_SCRATCH_AREA = 3
GHCB_ERR_MISSING_INPUT = 4
GHCB_ERR_INVALID_INPUT = 5
GHCB_ERR_INVALID_EVENT = 6

# SW_EXITINFO1 responses (GHCB_HV_RESP_* in arch/x86/kvm/svm/svm.h)
GHCB_HV_RESP_NO_ACTION = 0
GHCB_HV_RESP_ISSUE_EXCEPTION = 1
GHCB_HV_RESP_MALFORMED_INPUT = 2

# --- Event injection encoding (arch/x86/include/asm/svm.h SVM_EVTINJ_*) ------------------------------------
SVM_EVTINJ_TYPE_EXEPT = 3 << 8
SVM_EVTINJ_VALID = 1 << 31
X86_TRAP_UD = 6
X86_TRAP_GP = 13


def exception_event(vector: int) -> int:
    """SW_EXITINFO2 for 'issue this exception' as KVM encodes it (svm_vmgexit_inject_exception(): no error code)."""
    return (vector & 0xFF) | SVM_EVTINJ_TYPE_EXEPT | SVM_EVTINJ_VALID


GP_EVENT = exception_event(X86_TRAP_GP)  # 0x8000030D
UD_EVENT = exception_event(X86_TRAP_UD)

# --- NAE exit codes (arch/x86/include/uapi/asm/svm.h) -------------------------------------------------------
SVM_EXIT_READ_DR7 = 0x027
SVM_EXIT_WRITE_DR7 = 0x037
SVM_EXIT_RDTSC = 0x06E
SVM_EXIT_RDPMC = 0x06F
SVM_EXIT_CPUID = 0x072
SVM_EXIT_INVD = 0x076
SVM_EXIT_IOIO = 0x07B
SVM_EXIT_MSR = 0x07C
SVM_EXIT_VMMCALL = 0x081
SVM_EXIT_RDTSCP = 0x087
SVM_EXIT_WBINVD = 0x089
SVM_EXIT_MONITOR = 0x08A
SVM_EXIT_MWAIT = 0x08B
SVM_VMGEXIT_MMIO_READ = 0x8000_0001
SVM_VMGEXIT_MMIO_WRITE = 0x8000_0002
SVM_VMGEXIT_NMI_COMPLETE = 0x8000_0003
SVM_VMGEXIT_AP_HLT_LOOP = 0x8000_0004
SVM_VMGEXIT_AP_JUMP_TABLE = 0x8000_0005
SVM_VMGEXIT_SET_AP_JUMP_TABLE = 0
SVM_VMGEXIT_GET_AP_JUMP_TABLE = 1
SVM_VMGEXIT_PSC = 0x8000_0010  # SNP only
SVM_VMGEXIT_GUEST_REQUEST = 0x8000_0011  # SNP only
SVM_VMGEXIT_EXT_GUEST_REQUEST = 0x8000_0012  # SNP only
SVM_VMGEXIT_AP_CREATION = 0x8000_0013  # SNP only
SVM_VMGEXIT_HV_FEATURES = 0x8000_FFFD
SVM_VMGEXIT_TERM_REQUEST = 0x8000_FFFE
SVM_VMGEXIT_UNSUPPORTED_EVENT = 0x8000_FFFF
SNP_ONLY_NAE_EVENTS = frozenset({SVM_VMGEXIT_PSC, SVM_VMGEXIT_GUEST_REQUEST, SVM_VMGEXIT_EXT_GUEST_REQUEST,
                                 SVM_VMGEXIT_AP_CREATION})

NAE_EVENT_NAMES: dict[int, str] = {
    SVM_EXIT_READ_DR7: "READ_DR7", SVM_EXIT_WRITE_DR7: "WRITE_DR7", SVM_EXIT_RDTSC: "RDTSC",
    SVM_EXIT_RDPMC: "RDPMC", SVM_EXIT_CPUID: "CPUID", SVM_EXIT_INVD: "INVD", SVM_EXIT_IOIO: "IOIO",
    SVM_EXIT_MSR: "MSR", SVM_EXIT_VMMCALL: "VMMCALL", SVM_EXIT_RDTSCP: "RDTSCP", SVM_EXIT_WBINVD: "WBINVD",
    SVM_EXIT_MONITOR: "MONITOR", SVM_EXIT_MWAIT: "MWAIT", SVM_VMGEXIT_MMIO_READ: "MMIO_READ",
    SVM_VMGEXIT_MMIO_WRITE: "MMIO_WRITE", SVM_VMGEXIT_NMI_COMPLETE: "NMI_COMPLETE",
    SVM_VMGEXIT_AP_HLT_LOOP: "AP_HLT_LOOP", SVM_VMGEXIT_AP_JUMP_TABLE: "AP_JUMP_TABLE", SVM_VMGEXIT_PSC: "PSC",
    SVM_VMGEXIT_GUEST_REQUEST: "GUEST_REQUEST", SVM_VMGEXIT_EXT_GUEST_REQUEST: "EXT_GUEST_REQUEST",
    SVM_VMGEXIT_AP_CREATION: "AP_CREATION", SVM_VMGEXIT_HV_FEATURES: "HV_FEATURES",
    SVM_VMGEXIT_TERM_REQUEST: "TERM_REQUEST", SVM_VMGEXIT_UNSUPPORTED_EVENT: "UNSUPPORTED_EVENT",
}

# --- IOIO intercept information, SW_EXITINFO1 of NAE 0x7B (uapi asm/svm.h SVM_IOIO_*) -----------------------
SVM_IOIO_TYPE_MASK = 1 << 0  # 1 = IN
SVM_IOIO_STR_MASK = 1 << 2
SVM_IOIO_REP_MASK = 1 << 3
SVM_IOIO_SIZE_SHIFT = 4
SVM_IOIO_SIZE_MASK = 7 << SVM_IOIO_SIZE_SHIFT  # SZ8 bit 4, SZ16 bit 5, SZ32 bit 6
SVM_IOIO_ASIZE_SHIFT = 7
SVM_IOIO_ASIZE_MASK = 7 << SVM_IOIO_ASIZE_SHIFT  # A16 bit 7, A32 bit 8, A64 bit 9
SVM_IOIO_PORT_SHIFT = 16


class IoioInfo(NamedTuple):
    port: int
    size: int  # bytes, as KVM decodes it: (info & SVM_IOIO_SIZE_MASK) >> SVM_IOIO_SIZE_SHIFT
    is_in: bool
    string: bool
    rep: bool
    address_size: int  # bits: 16, 32, 64 (0 if no/invalid A-bit)


def decode_ioio(exit_info_1: int) -> IoioInfo:
    """Decode SVM IOIO intercept info (KVM io_interception() truncates it to u32 first)."""
    info = exit_info_1 & 0xFFFF_FFFF
    asize = {1: 16, 2: 32, 4: 64}.get((info & SVM_IOIO_ASIZE_MASK) >> SVM_IOIO_ASIZE_SHIFT, 0)
    return IoioInfo(port=info >> SVM_IOIO_PORT_SHIFT, size=(info & SVM_IOIO_SIZE_MASK) >> SVM_IOIO_SIZE_SHIFT,
                    is_in=bool(info & SVM_IOIO_TYPE_MASK), string=bool(info & SVM_IOIO_STR_MASK),
                    rep=bool(info & SVM_IOIO_REP_MASK), address_size=asize)


def encode_ioio(port: int, size: int, is_in: bool, string: bool = False, rep: bool = False,
                address_size: int = 64) -> int:
    """Build SW_EXITINFO1 for an IOIO NAE event, as the guest's #VC handler does."""
    asize = {16: 1, 32: 2, 64: 4}[address_size]
    return ((port & 0xFFFF) << SVM_IOIO_PORT_SHIFT | asize << SVM_IOIO_ASIZE_SHIFT
            | (size & 7) << SVM_IOIO_SIZE_SHIFT | (SVM_IOIO_REP_MASK if rep else 0)
            | (SVM_IOIO_STR_MASK if string else 0) | (SVM_IOIO_TYPE_MASK if is_in else 0))


# --- Valid bitmap helpers -----------------------------------------------------------------------------------
def valid_bit(field_offset: int) -> int:
    """GHCB_BITMAP_IDX: the valid-bitmap bit of the save-area field at `field_offset`."""
    return field_offset // 8


def valid_mask(*field_offsets: int) -> int:
    """A 128-bit integer with the valid bits of the given fields set."""
    mask = 0
    for offset in field_offsets:
        mask |= 1 << valid_bit(offset)
    return mask


# --- MSR protocol encoders / decoders -----------------------------------------------------------------------
def msr_info(value: int) -> int:
    """GHCBInfo: GHCBData[11:0]."""
    return value & GHCB_MSR_INFO_MASK


def sev_info_response(max_version: int, min_version: int, c_bit: int) -> int:
    """GHCB_MSR_SEV_INFO: max [63:48], min [47:32], C-bit position [31:24], 0x001 [11:0]."""
    return ((max_version & 0xFFFF) << 48 | (min_version & 0xFFFF) << 32 | (c_bit & 0xFF) << 24
            | GHCB_MSR_SEV_INFO_RESP)


def sev_info_decode(value: int) -> tuple[int, int, int]:
    """(max version, min version, C-bit) from a SEV_INFO response."""
    return (value >> 48) & 0xFFFF, (value >> 32) & 0xFFFF, (value >> 24) & 0xFF


def sev_info_request() -> int:
    return GHCB_MSR_SEV_INFO_REQ


def cpuid_request(function: int, register: int) -> int:
    """GHCB_CPUID_REQ: function [63:32], register [31:30] (0 EAX .. 3 EDX), 0x004 [11:0]."""
    return (function & 0xFFFF_FFFF) << 32 | (register & 3) << 30 | GHCB_MSR_CPUID_REQ


def cpuid_request_decode(value: int) -> tuple[int, int]:
    """(function, register) of a CPUID request."""
    return (value >> 32) & 0xFFFF_FFFF, (value >> 30) & 3


def cpuid_response(request: int, register_value: int) -> int:
    """KVM keeps GHCBData[31:12] of the request and sets value [63:32] and 0x005 [11:0]."""
    return (register_value & 0xFFFF_FFFF) << 32 | (request & 0xFFFF_F000) | GHCB_MSR_CPUID_RESP


def ap_reset_hold_request() -> int:
    return GHCB_MSR_AP_RESET_HOLD_REQ


def ap_reset_hold_response(result: int) -> int:
    """Result [63:12] (0 = no SIPI yet, non-zero = woken by SIPI), 0x007 [11:0]."""
    return (result & ((1 << 52) - 1)) << 12 | GHCB_MSR_AP_RESET_HOLD_RESP


def hv_features_request() -> int:
    return GHCB_MSR_HV_FT_REQ


def hv_features_response(features: int) -> int:
    """GHCB_HV_FT_* bits [63:12], 0x081 [11:0]."""
    return (features & ((1 << 52) - 1)) << 12 | GHCB_MSR_HV_FT_RESP


def hv_features_decode(value: int) -> int:
    return value >> 12


def preferred_gpa_request() -> int:
    """SNP only: GHCB_MSR_PREF_GPA_REQ."""
    return GHCB_MSR_PREF_GPA_REQ


def register_gpa_request(gfn: int) -> int:
    """SNP only: GHCB_MSR_REG_GPA_REQ_VAL: GFN [63:12] (GENMASK 51:0), 0x012 [11:0]."""
    return (gfn & ((1 << 52) - 1)) << 12 | GHCB_MSR_REG_GPA_REQ


def page_state_change_request(gfn: int, operation: int) -> int:
    """SNP only: GHCB_MSR_PSC_REQ_GFN: operation [55:52], GFN [51:12], 0x014 [11:0]."""
    return (operation & 0xF) << 52 | (gfn & ((1 << 40) - 1)) << 12 | GHCB_MSR_PSC_REQ


def termination_request(reason_set: int, reason_code: int) -> int:
    """GHCB_SEV_TERM_REASON: reason set [15:12], reason code [23:16], 0x100 [11:0]."""
    return (reason_code & 0xFF) << 16 | (reason_set & 0xF) << 12 | GHCB_MSR_TERM_REQ


def termination_decode(value: int) -> tuple[int, int]:
    """(reason set, reason code) of an MSR-protocol termination request."""
    return (value >> 12) & 0xF, (value >> 16) & 0xFF


def nae_termination_info(reason_set: int, reason_code: int) -> int:
    """SVM_VMGEXIT_TERM_REASON: SW_EXITINFO1 reason set [3:0], reason code [11:4]."""
    return (reason_code & 0xFF) << 4 | (reason_set & 0xF)


def nae_termination_decode(exit_info_1: int) -> tuple[int, int]:
    return exit_info_1 & 0xF, (exit_info_1 >> 4) & 0xFF


def describe_termination(reason_set: int, reason_code: int) -> str:
    """Human-readable reason, e.g. 'reason set 0 code 0x1: SEV-ES / GHCB protocol range not supported'."""
    text = _TERM_REASONS.get((reason_set, reason_code), "unknown reason")
    return f"reason set {reason_set} code {reason_code:#x}: {text}"


# --- The page accessor --------------------------------------------------------------------------------------
_VALID_Q = VALID_BITMAP // 8


class GhcbPage:
    """Field access over one 4096-byte GHCB page held in guest memory: a one-dimensional unsigned-byte buffer
    (a memoryview of format "B", a numpy uint8 view, a bytearray).

    `u8` is that buffer as given, `q` a u64 memoryview of it (index = offset // 8) for hot-path readers;
    the methods below are the readable API.
    """

    __slots__ = ("q", "u8")

    def __init__(self, page) -> None:
        try:
            view = memoryview(page)
        except TypeError:
            raise ValueError("a GHCB page is a 4096-byte uint8 view") from None
        if view.format != "B" or view.ndim != 1 or view.nbytes != GHCB_PAGE_SIZE or not view.c_contiguous:
            raise ValueError("a GHCB page is a 4096-byte uint8 view")
        self.u8 = page
        self.q = view.cast("Q")

    def get(self, offset: int) -> int:
        if offset == CPL:
            return int(self.u8[CPL])
        return self.q[offset >> 3]

    def set(self, offset: int, value: int, mark_valid: bool = True) -> None:
        if offset == CPL:
            self.u8[CPL] = value & 0xFF
        else:
            self.q[offset >> 3] = value & 0xFFFF_FFFF_FFFF_FFFF
        if mark_valid:
            self.mark_valid(offset)

    @property
    def valid_bitmap(self) -> int:
        return self.q[_VALID_Q] | self.q[_VALID_Q + 1] << 64

    @valid_bitmap.setter
    def valid_bitmap(self, value: int) -> None:
        self.q[_VALID_Q] = value & 0xFFFF_FFFF_FFFF_FFFF
        self.q[_VALID_Q + 1] = (value >> 64) & 0xFFFF_FFFF_FFFF_FFFF

    def is_valid(self, offset: int) -> bool:
        return bool(self.valid_bitmap >> valid_bit(offset) & 1)

    def mark_valid(self, offset: int) -> None:
        bit = valid_bit(offset)
        self.q[_VALID_Q + (bit >> 6)] |= 1 << (bit & 63)

    def clear_valid(self) -> None:
        self.q[_VALID_Q] = 0
        self.q[_VALID_Q + 1] = 0

    @property
    def protocol_version(self) -> int:
        return int(self.u8[PROTOCOL_VERSION]) | int(self.u8[PROTOCOL_VERSION + 1]) << 8

    @protocol_version.setter
    def protocol_version(self, value: int) -> None:
        self.u8[PROTOCOL_VERSION] = value & 0xFF
        self.u8[PROTOCOL_VERSION + 1] = (value >> 8) & 0xFF

    @property
    def usage(self) -> int:
        return self.q[GHCB_USAGE >> 3] >> 32

    @usage.setter
    def usage(self, value: int) -> None:
        word = GHCB_USAGE >> 3
        self.q[word] = (self.q[word] & 0xFFFF_FFFF) | (value & 0xFFFF_FFFF) << 32

    def shared_buffer(self):
        """The shared buffer, sliced from `u8` (the same kind of buffer)."""
        return self.u8[SHARED_BUFFER:SHARED_BUFFER_END]
