"""ctypes mirrors of the SEV user ABI: KVM_MEMORY_ENCRYPT_OP sub-commands and /dev/sev commands.

Owns, under the kernel's own names:
- include/uapi/linux/kvm.h (6.1) / arch/x86/include/uapi/asm/kvm.h (6.10+): enum sev_cmd_id,
  struct kvm_sev_cmd, kvm_sev_init, kvm_sev_launch_*, kvm_sev_guest_status,
  kvm_sev_attestation_report, the x86 VM types and the KVM_X86_GRP_SEV device attributes;
- include/uapi/linux/psp-sev.h: the /dev/sev commands, sev_ret_code, struct sev_issue_cmd,
  sev_user_data_status (packed, 12 bytes), sev_user_data_pdh_cert_export, sev_user_data_get_id2,
  and SEV_ISSUE_CMD computed with ioctl-opt;
- names above the ABI from the AMD SEV API specification (pub. 55766): guest policy bits
  (`SevPolicy`), guest states (`SevGuestState`), platform states, firmware status meanings.

Padding: Linux 6.10 made the implicit alignment holes of the kvm_sev_* structs explicit
(pad0/pad1/pad2 fields, "KVM: SEV: make padding explicit"). The layout is unchanged, so these
mirrors leave the holes implicit as Debian 12's 6.1 headers do: ctypes aligns exactly like the
C compiler, and tests/test_layout.py proves every offset against the installed headers.
"""

from __future__ import annotations

import ctypes
import enum

from ioctl_opt import IOWR

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

# --- enum sev_cmd_id (KVM_MEMORY_ENCRYPT_OP sub-commands), kvm.h ---------------------------
KVM_SEV_INIT = 0
KVM_SEV_ES_INIT = 1
KVM_SEV_LAUNCH_START = 2
KVM_SEV_LAUNCH_UPDATE_DATA = 3
KVM_SEV_LAUNCH_UPDATE_VMSA = 4
KVM_SEV_LAUNCH_SECRET = 5
KVM_SEV_LAUNCH_MEASURE = 6
KVM_SEV_LAUNCH_FINISH = 7
KVM_SEV_SEND_START = 8
KVM_SEV_SEND_UPDATE_DATA = 9
KVM_SEV_SEND_UPDATE_VMSA = 10
KVM_SEV_SEND_FINISH = 11
KVM_SEV_RECEIVE_START = 12
KVM_SEV_RECEIVE_UPDATE_DATA = 13
KVM_SEV_RECEIVE_UPDATE_VMSA = 14
KVM_SEV_RECEIVE_FINISH = 15
KVM_SEV_GUEST_STATUS = 16
KVM_SEV_DBG_DECRYPT = 17
KVM_SEV_DBG_ENCRYPT = 18
KVM_SEV_CERT_EXPORT = 19
KVM_SEV_GET_ATTESTATION_REPORT = 20
KVM_SEV_SEND_CANCEL = 21
KVM_SEV_INIT2 = 22  # Linux 6.10: "Second time is the charm; improved versions of the above ioctls."

KVM_SEV_COMMAND_NAMES: dict[int, str] = {
    value: name for name, value in globals().items() if name.startswith("KVM_SEV_") and isinstance(value, int)
}

# --- x86 VM types (KVM_CREATE_VM argument; KVM_CAP_VM_TYPES bit n = type n), asm/kvm.h -------
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3

# --- system fd device attributes (KVM_GET_DEVICE_ATTR on /dev/kvm), asm/kvm.h ---------------
KVM_X86_GRP_SYSTEM = 0
KVM_X86_XCOMP_GUEST_SUPP = 0
KVM_X86_GRP_SEV = 1
KVM_X86_SEV_VMSA_FEATURES = 0  # u64: the VMSA SEV_FEATURES bits KVM_SEV_INIT2 accepts

# VMSA SEV_FEATURES bits (arch/x86/include/asm/svm.h SVM_SEV_FEAT_*; not uapi)
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5
VMSA_FEATURE_NAMES = {SVM_SEV_FEAT_SNP_ACTIVE: "SNP_ACTIVE", 1 << 1: "VTOM", 1 << 2: "REFLECT_VC",
                      1 << 3: "RESTRICTED_INJECTION", 1 << 4: "ALTERNATE_INJECTION",
                      SVM_SEV_FEAT_DEBUG_SWAP: "DEBUG_SWAP", 1 << 9: "SECURE_TSC"}

# GHCB protocol versions KVM speaks (arch/x86/kvm/svm/sev.c GHCB_VERSION_MAX / _MIN / _DEFAULT)
GHCB_VERSION_MIN = 1
GHCB_VERSION_MAX = 2
GHCB_VERSION_DEFAULT = 2


# --- KVM_MEMORY_ENCRYPT_OP argument and sub-command structs, kvm.h -------------------------
class kvm_sev_cmd(ctypes.Structure):
    """The KVM_MEMORY_ENCRYPT_OP argument: `data` points at the sub-command struct; `error` gets the SEV_RET_*."""

    _fields_ = [("id", u32), ("data", u64), ("error", u32), ("sev_fd", u32)]  # 4-byte hole after id (6.10: pad0)


class kvm_sev_init(ctypes.Structure):
    """KVM_SEV_INIT2 (Linux 6.10): vmsa_features must be a subset of KVM_X86_SEV_VMSA_FEATURES; flags 0."""

    _fields_ = [("vmsa_features", u64), ("flags", u32), ("ghcb_version", u16), ("pad1", u16), ("pad2", u32 * 8)]


class kvm_sev_launch_start(ctypes.Structure):
    _fields_ = [("handle", u32), ("policy", u32), ("dh_uaddr", u64), ("dh_len", u32),
                ("session_uaddr", u64), ("session_len", u32)]


class kvm_sev_launch_update_data(ctypes.Structure):
    """uaddr is a host virtual address; uaddr and len must be 16-byte aligned (the firmware's rule)."""

    _fields_ = [("uaddr", u64), ("len", u32)]


class kvm_sev_launch_secret(ctypes.Structure):
    _fields_ = [("hdr_uaddr", u64), ("hdr_len", u32), ("guest_uaddr", u64), ("guest_len", u32),
                ("trans_uaddr", u64), ("trans_len", u32)]


class kvm_sev_launch_measure(ctypes.Structure):
    """len 0 on entry: the kernel writes the blob size to len (the firmware answers SEV_RET_INVALID_LEN)."""

    _fields_ = [("uaddr", u64), ("len", u32)]


class kvm_sev_guest_status(ctypes.Structure):
    _fields_ = [("handle", u32), ("policy", u32), ("state", u32)]


class kvm_sev_attestation_report(ctypes.Structure):
    _fields_ = [("mnonce", u8 * 16), ("uaddr", u64), ("len", u32)]


# The launch measurement blob LAUNCH_MEASURE returns (SEV API 55766, LAUNCH_MEASURE: MEASURE 32 bytes,
# MNONCE 16 bytes).
SEV_MEASUREMENT_SIZE = 32
SEV_MNONCE_SIZE = 16
SEV_LAUNCH_MEASURE_BLOB_SIZE = SEV_MEASUREMENT_SIZE + SEV_MNONCE_SIZE

# --- /dev/sev, include/uapi/linux/psp-sev.h ------------------------------------------------
SEV_FACTORY_RESET = 0
SEV_PLATFORM_STATUS = 1
SEV_PEK_GEN = 2
SEV_PEK_CSR = 3
SEV_PDH_GEN = 4
SEV_PDH_CERT_EXPORT = 5
SEV_PEK_CERT_IMPORT = 6
SEV_GET_ID = 7  # deprecated, use SEV_GET_ID2
SEV_GET_ID2 = 8

SEV_PLATFORM_COMMAND_NAMES = {
    SEV_FACTORY_RESET: "SEV_FACTORY_RESET", SEV_PLATFORM_STATUS: "SEV_PLATFORM_STATUS", SEV_PEK_GEN: "SEV_PEK_GEN",
    SEV_PEK_CSR: "SEV_PEK_CSR", SEV_PDH_GEN: "SEV_PDH_GEN", SEV_PDH_CERT_EXPORT: "SEV_PDH_CERT_EXPORT",
    SEV_PEK_CERT_IMPORT: "SEV_PEK_CERT_IMPORT", SEV_GET_ID: "SEV_GET_ID", SEV_GET_ID2: "SEV_GET_ID2",
}

SEV_STATUS_FLAGS_CONFIG_ES = 0x0100  # sev_user_data_status.flags: SEV-ES is supported/configured
SEV_STATUS_FLAGS_OWNER = 0x0001  # SEV API 55766 PLATFORM_STATUS: 1 = externally owned


class SevReturnCode(enum.IntEnum):
    """sev_ret_code (psp-sev.h). Values 0x00-0x18 are in Linux 6.1; the SNP ones have these values in 6.12.y
    (backported from 6.13; earlier headers numbered them wrongly from 0x28)."""

    SEV_RET_NO_FW_CALL = -1  # Linux's own: the firmware was never called
    SEV_RET_SUCCESS = 0x00
    SEV_RET_INVALID_PLATFORM_STATE = 0x01
    SEV_RET_INVALID_GUEST_STATE = 0x02
    SEV_RET_INAVLID_CONFIG = 0x03  # sic: the header's spelling (6.12's adds SEV_RET_INVALID_CONFIG as an alias)
    SEV_RET_INVALID_LEN = 0x04
    SEV_RET_ALREADY_OWNED = 0x05
    SEV_RET_INVALID_CERTIFICATE = 0x06
    SEV_RET_POLICY_FAILURE = 0x07
    SEV_RET_INACTIVE = 0x08
    SEV_RET_INVALID_ADDRESS = 0x09
    SEV_RET_BAD_SIGNATURE = 0x0A
    SEV_RET_BAD_MEASUREMENT = 0x0B
    SEV_RET_ASID_OWNED = 0x0C
    SEV_RET_INVALID_ASID = 0x0D
    SEV_RET_WBINVD_REQUIRED = 0x0E
    SEV_RET_DFFLUSH_REQUIRED = 0x0F
    SEV_RET_INVALID_GUEST = 0x10
    SEV_RET_INVALID_COMMAND = 0x11
    SEV_RET_ACTIVE = 0x12
    SEV_RET_HWSEV_RET_PLATFORM = 0x13
    SEV_RET_HWSEV_RET_UNSAFE = 0x14
    SEV_RET_UNSUPPORTED = 0x15
    SEV_RET_INVALID_PARAM = 0x16
    SEV_RET_RESOURCE_LIMIT = 0x17
    SEV_RET_SECURE_DATA_INVALID = 0x18
    SEV_RET_INVALID_PAGE_SIZE = 0x19
    SEV_RET_INVALID_PAGE_STATE = 0x1A
    SEV_RET_INVALID_MDATA_ENTRY = 0x1B
    SEV_RET_INVALID_PAGE_OWNER = 0x1C
    SEV_RET_AEAD_OFLOW = 0x1D
    SEV_RET_RMP_INIT_REQUIRED = 0x20
    SEV_RET_INVALID_KEY = 0x27


# One-line meanings (SEV API 55766, "Status Codes" table).
SEV_RET_MEANINGS: dict[int, str] = {
    -1: "the firmware was not called (driver-side failure)",
    0x00: "success",
    0x01: "the platform is in the wrong state for this command",
    0x02: "the guest is in the wrong state for this command",
    0x03: "the platform configuration is invalid",
    0x04: "a buffer is too small or a length is invalid",
    0x05: "the platform is already owned",
    0x06: "a certificate is invalid",
    0x07: "the request is not allowed by the guest policy",
    0x08: "the guest is inactive",
    0x09: "an address is invalid (or not aligned as required)",
    0x0A: "a signature is invalid",
    0x0B: "the measurement does not match",
    0x0C: "the ASID is already owned",
    0x0D: "the ASID is invalid",
    0x0E: "WBINVD must be issued first",
    0x0F: "DF_FLUSH must be issued first",
    0x10: "the guest handle is invalid",
    0x11: "the command is invalid",
    0x12: "the guest is active",
    0x13: "a hardware error occurred (platform)",
    0x14: "the hardware is in an unsafe state",
    0x15: "the feature is not supported",
    0x16: "a parameter is invalid",
    0x17: "a resource limit was reached",
    0x18: "the secure data is invalid",
    0x19: "the page size is invalid",
    0x1A: "the page state is invalid",
    0x1B: "a metadata entry is invalid",
    0x1C: "the page owner is invalid",
    0x1D: "the AEAD counter overflowed",
    0x20: "the RMP must be initialised first",
    0x27: "the key is invalid",
}


def sev_ret_name(code: int) -> str:
    """'SEV_RET_INVALID_GUEST_STATE' for 2; 'SEV_RET_<0x..>' for codes this table does not know."""
    try:
        return SevReturnCode(code).name
    except ValueError:
        return f"SEV_RET_{code:#x}"


def sev_ret_meaning(code: int) -> str:
    return SEV_RET_MEANINGS.get(code, "unknown firmware status")


class sev_user_data_status(ctypes.Structure):
    """SEV_PLATFORM_STATUS output; __packed, 12 bytes."""

    _pack_ = 1
    _fields_ = [("api_major", u8), ("api_minor", u8), ("state", u8), ("flags", u32), ("build", u8),
                ("guest_count", u32)]


class sev_user_data_pdh_cert_export(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("pdh_cert_address", u64), ("pdh_cert_len", u32), ("cert_chain_address", u64),
                ("cert_chain_len", u32)]


class sev_user_data_get_id2(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("address", u64), ("length", u32)]


class sev_issue_cmd(ctypes.Structure):
    """SEV_ISSUE_CMD argument (__packed, 16 bytes): `data` points at the command struct."""

    _pack_ = 1
    _fields_ = [("cmd", u32), ("data", u64), ("error", u32)]


SEV_IOC_TYPE = ord("S")
SEV_ISSUE_CMD = IOWR(SEV_IOC_TYPE, 0x0, sev_issue_cmd)


# --- names above the ABI (AMD SEV API specification, pub. 55766) ---------------------------
class SevPolicy(enum.IntFlag):
    """Guest policy bits (SEV API 55766 "Guest Policy" table). API_MAJOR [23:16], API_MINOR [31:24]."""

    NODBG = 1 << 0  # debugging (DBG_DECRYPT/ENCRYPT) is disallowed
    NOKS = 1 << 1  # sharing keys with other guests is disallowed
    ES = 1 << 2  # SEV-ES is required
    NOSEND = 1 << 3  # sending the guest to another platform is disallowed
    DOMAIN = 1 << 4  # the guest must not be sent outside the domain
    SEV = 1 << 5  # the guest must not be sent to a non-SEV platform


SEV_POLICY_RESERVED_MASK = 0xFFC0  # bits 15:6 must be zero
SEV_POLICY_API_MAJOR_SHIFT = 16
SEV_POLICY_API_MINOR_SHIFT = 24


def make_policy(flags: SevPolicy | int = 0, api_major: int = 0, api_minor: int = 0) -> int:
    """A 32-bit policy word: flag bits plus the minimum firmware API version the guest accepts."""
    if not (0 <= api_major <= 0xFF and 0 <= api_minor <= 0xFF):
        raise ValueError(f"policy API version {api_major}.{api_minor} does not fit 8 bits each")
    return int(flags) | (api_major << SEV_POLICY_API_MAJOR_SHIFT) | (api_minor << SEV_POLICY_API_MINOR_SHIFT)


def policy_api_version(policy: int) -> tuple[int, int]:
    return (policy >> SEV_POLICY_API_MAJOR_SHIFT) & 0xFF, (policy >> SEV_POLICY_API_MINOR_SHIFT) & 0xFF


def describe_policy(policy: int) -> str:
    flags = [flag.name for flag in SevPolicy if policy & flag]
    major, minor = policy_api_version(policy)
    text = "|".join(flags) or "none"
    return f"{policy:#010x} ({text}, min API {major}.{minor})"


class SevGuestState(enum.IntEnum):
    """Guest state as GUEST_STATUS reports it (SEV API 55766 "Guest States")."""

    UNINIT = 0
    LUPDATE = 1  # launching: LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA accepted
    LSECRET = 2  # measured: LAUNCH_SECRET / LAUNCH_FINISH accepted
    RUNNING = 3
    SUPDATE = 4  # sending
    RUPDATE = 5  # receiving
    SENT = 6


class SevPlatformState(enum.IntEnum):
    """Platform state as PLATFORM_STATUS reports it (SEV API 55766 "Platform States")."""

    UNINIT = 0
    INIT = 1
    WORKING = 2


# --- layout test lists (tests/layout_check.py) ----------------------------------------------
LAYOUT_HEADERS = ["linux/kvm.h", "linux/psp-sev.h"]
LAYOUT_STRUCTS = [
    kvm_sev_cmd, kvm_sev_init, kvm_sev_launch_start, kvm_sev_launch_update_data, kvm_sev_launch_secret,
    kvm_sev_launch_measure, kvm_sev_guest_status, kvm_sev_attestation_report,
    sev_user_data_status, sev_user_data_pdh_cert_export, sev_user_data_get_id2, sev_issue_cmd,
]
globals().update({code.name: int(code) for code in SevReturnCode})  # SEV_RET_* as module constants too
# #define'd constants (checked with #ifdef by tests/layout_check.py).
LAYOUT_CONSTANTS = [
    "KVM_X86_DEFAULT_VM", "KVM_X86_SW_PROTECTED_VM", "KVM_X86_SEV_VM", "KVM_X86_SEV_ES_VM",
    "KVM_X86_GRP_SYSTEM", "KVM_X86_XCOMP_GUEST_SUPP", "KVM_X86_GRP_SEV", "KVM_X86_SEV_VMSA_FEATURES",
    "SEV_STATUS_FLAGS_CONFIG_ES", "SEV_IOC_TYPE", "SEV_ISSUE_CMD",
]
# Enumerators (enum sev_cmd_id, psp-sev.h's anonymous command enum, sev_ret_code): #ifdef cannot see
# them, so the probe must reference them directly (compile-testing the ADDED_IN ones first).
LAYOUT_ENUM_CONSTANTS = [
    *KVM_SEV_COMMAND_NAMES.values(),
    *SEV_PLATFORM_COMMAND_NAMES.values(),
    *(code.name for code in SevReturnCode),
]
# Not in Debian 12's linux-libc-dev 6.1: reported as not checkable there (value: the release adding them).
ADDED_IN: dict[str, str] = {
    "kvm_sev_init": "6.10",
    "KVM_SEV_INIT2": "6.10",
    "KVM_X86_DEFAULT_VM": "6.8",
    "KVM_X86_SW_PROTECTED_VM": "6.8",
    "KVM_X86_SEV_VM": "6.10",
    "KVM_X86_SEV_ES_VM": "6.10",
    "KVM_X86_GRP_SYSTEM": "6.10",
    "KVM_X86_GRP_SEV": "6.10",
    "KVM_X86_SEV_VMSA_FEATURES": "6.10",
    # SEV-SNP codes 0x19..0x27 with their specification values: mainline 6.13 ("crypto: ccp: Fix uapi definitions
    # of PSP errors", Cc: stable), backported to 6.12.y; Debian's 6.12 psp-sev.h has them (tests/test_layout.py).
    **{code.name: "6.12" for code in SevReturnCode if code > SevReturnCode.SEV_RET_SECURE_DATA_INVALID},
}
