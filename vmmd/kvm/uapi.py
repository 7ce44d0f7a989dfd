"""ctypes mirrors of the KVM userspace ABI, under the kernel's own names.

Mirrors include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h (installed
as linux/kvm.h and asm/kvm.h by linux-libc-dev). Field names are the header's,
so grep finds both sides. tests/test_layout.py compiles a C program against the
installed headers and compares every size, offset and constant listed in
LAYOUT_STRUCTS / LAYOUT_CONSTANTS below.
"""

from __future__ import annotations

import ctypes

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

KVMIO = 0xAE
KVM_API_VERSION = 12

# --- asm/kvm.h -------------------------------------------------------------
KVM_NR_INTERRUPTS = 256
KVM_MAX_XCRS = 16
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
                ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
                ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(ctypes.Structure):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
                ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only: `entries` is a flexible array (see msrs_buffer())."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    """Header only: `entries` is a flexible array (see cpuid2_buffer())."""

    _fields_ = [("nent", u32), ("padding", u32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic, the header's spelling


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0


class kvm_msr_filter_range(ctypes.Structure):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", ctypes.POINTER(u8))]


class kvm_msr_filter(ctypes.Structure):
    _fields_ = [("flags", u32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


class kvm_xsave(ctypes.Structure):
    """The 4 KiB legacy form (KVM_GET_XSAVE); larger with KVM_CAP_XSAVE2."""

    _fields_ = [("region", u32 * 1024)]


class kvm_debugregs(ctypes.Structure):
    """KVM_GET/SET_DEBUGREGS (KVM_CAP_DEBUGREGS): DR0-3, DR6, DR7; flags must be 0 (arch/x86/kvm/x86.c)."""

    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


# The header's anonymous member structs of kvm_vcpu_events, checked through its field offsets.
class kvm_vcpu_events_exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class kvm_vcpu_events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class kvm_vcpu_events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class kvm_vcpu_events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(ctypes.Structure):
    """KVM_GET/SET_VCPU_EVENTS (KVM_CAP_VCPU_EVENTS): pending and injected exceptions, interrupts, NMI, SMI."""

    _fields_ = [("exception", kvm_vcpu_events_exception), ("interrupt", kvm_vcpu_events_interrupt),
                ("nmi", kvm_vcpu_events_nmi), ("sipi_vector", u32), ("flags", u32),
                ("smi", kvm_vcpu_events_smi), ("triple_fault", kvm_vcpu_events_triple_fault),
                ("reserved", u8 * 26), ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


# --- linux/kvm.h -----------------------------------------------------------

class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_irq_level(ctypes.Structure):
    """`irq` is a union with `status` in the header (status is what KVM_IRQ_LINE_STATUS returns)."""

    _fields_ = [("irq", u32), ("level", u32)]


class kvm_ioeventfd(ctypes.Structure):
    """KVM_IOEVENTFD (Documentation/virt/kvm/api.rst 4.59): KVM signals `fd` when the guest writes `len` bytes
    (0, 1, 2, 4 or 8; 0 = any) at `addr`, matching `datamatch` when KVM_IOEVENTFD_FLAG_DATAMATCH is set; the
    write is complete at once, without an exit to userspace."""

    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32), ("flags", u32),
                ("pad", u8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0  # kvm_ioeventfd_flag_nr_datamatch
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_irqfd(ctypes.Structure):
    """KVM_IRQFD (api.rst 4.75): writing to `fd` raises GSI `gsi` of the in-kernel irqchip. With
    KVM_IRQFD_FLAG_RESAMPLE the GSI is level-triggered: KVM asserts it on `fd` and signals `resamplefd` when the
    guest acknowledges it, so the device can re-assert it while its condition still holds."""

    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_mp_state(ctypes.Structure):
    """KVM_GET/SET_MP_STATE: KVM_MP_STATE_RUNNABLE or, for APs under an in-kernel irqchip, UNINITIALIZED
    (waiting for INIT/SIPI, arch/x86/kvm/x86.c kvm_arch_vcpu_create())."""

    _fields_ = [("mp_state", u32)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_device_attr(ctypes.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


class kvm_enc_region(ctypes.Structure):
    _fields_ = [("addr", u64), ("size", u64)]


# kvm_run and the exit-union members vmmd decodes.
class kvm_run_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_hypercall_mode(ctypes.Union):
    """The anonymous union ending kvm_run.hypercall: `longmode` (userspace's name, as in Linux 6.1's
    `__u32 longmode; __u32 pad;`) overlaid by `flags` (KVM_EXIT_HYPERCALL_LONG_MODE, ...): Linux 6.4 made the
    same 8 bytes `union { __u32 longmode; __u64 flags; }` (include/uapi/linux/kvm.h as of 6.4-rc1 and 6.12)."""

    _fields_ = [("longmode", u32), ("flags", u64)]


class kvm_run_hypercall(ctypes.Structure):
    _anonymous_ = ("mode",)
    _fields_ = [("nr", u64), ("args", u64 * 6), ("ret", u64), ("mode", kvm_run_hypercall_mode)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_msr(ctypes.Structure):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class kvm_run_notify(ctypes.Structure):
    _fields_ = [("flags", u32)]


class kvm_run_exit_union(ctypes.Union):
    _fields_ = [("hw", kvm_run_hw), ("fail_entry", kvm_run_fail_entry), ("ex", kvm_run_ex),
                ("io", kvm_run_io), ("mmio", kvm_run_mmio), ("hypercall", kvm_run_hypercall),
                ("internal", kvm_run_internal), ("system_event", kvm_run_system_event),
                ("msr", kvm_run_msr), ("notify", kvm_run_notify), ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64),
                ("u", kvm_run_exit_union),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", ctypes.c_char * 2048)]


KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
# arch/x86/include/uapi/asm/kvm.h: port-I/O data sits in the vCPU mapping's page 1, i.e. kvm_run.io.data_offset
# is KVM_PIO_PAGE_OFFSET * PAGE_SIZE on x86 (arch/x86/kvm/x86.c, emulator_pio_in_out / complete_fast_pio_*)
KVM_PIO_PAGE_OFFSET = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_AP_RESET_HOLD = 9

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_SEV_TERM = 6

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

# Capabilities vmmd checks (KVM_CHECK_EXTENSION).
KVM_PIT_SPEAKER_DUMMY = 1  # kvm_pit_config.flags: KVM emulates port 0x61 (speaker / PIT channel 2 gate)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_DEVICE_CTRL = 89
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_VM_TYPES = 235  # since Linux 6.10: not in Debian 12's headers

LAYOUT_HEADERS = ["linux/kvm.h", "asm/kvm.h"]
LAYOUT_STRUCTS = [
    kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_fpu, kvm_msr_entry, kvm_msrs, kvm_cpuid_entry2,
    kvm_cpuid2, kvm_xcr, kvm_xcrs, kvm_xsave, kvm_debugregs, kvm_vcpu_events, kvm_msr_filter_range, kvm_msr_filter,
    kvm_pit_config,
    kvm_userspace_memory_region, kvm_irq_level, kvm_mp_state, kvm_enable_cap, kvm_device_attr, kvm_enc_region, kvm_run,
    kvm_ioeventfd, kvm_irqfd,
]
LAYOUT_CONSTANTS = [
    "KVM_API_VERSION", "KVMIO", "KVM_NR_INTERRUPTS", "KVM_MAX_XCRS", "KVM_MSR_FILTER_MAX_RANGES",
    "KVM_MSR_FILTER_MAX_BITMAP_SIZE", "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
    "KVM_MSR_FILTER_READ", "KVM_MSR_FILTER_WRITE", "KVM_MSR_FILTER_DEFAULT_ALLOW", "KVM_MSR_FILTER_DEFAULT_DENY",
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY",
    "KVM_EXIT_UNKNOWN", "KVM_EXIT_EXCEPTION", "KVM_EXIT_IO", "KVM_EXIT_HYPERCALL", "KVM_EXIT_DEBUG", "KVM_EXIT_HLT",
    "KVM_EXIT_MMIO", "KVM_EXIT_IRQ_WINDOW_OPEN", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR",
    "KVM_EXIT_NMI", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT", "KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR",
    "KVM_EXIT_AP_RESET_HOLD", "KVM_EXIT_X86_BUS_LOCK", "KVM_EXIT_NOTIFY", "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT",
    "KVM_PIO_PAGE_OFFSET", "KVM_INTERNAL_ERROR_EMULATION", "KVM_INTERNAL_ERROR_SIMUL_EX",
    "KVM_INTERNAL_ERROR_DELIVERY_EV", "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
    "KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_UNINITIALIZED", "KVM_MP_STATE_HALTED", "KVM_MP_STATE_AP_RESET_HOLD",
    "KVM_CAP_MP_STATE", "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS",
    "KVM_SYSTEM_EVENT_SHUTDOWN", "KVM_SYSTEM_EVENT_RESET", "KVM_SYSTEM_EVENT_CRASH", "KVM_SYSTEM_EVENT_SEV_TERM",
    "KVM_MSR_EXIT_REASON_INVAL", "KVM_MSR_EXIT_REASON_UNKNOWN", "KVM_MSR_EXIT_REASON_FILTER",
    "KVM_PIT_SPEAKER_DUMMY",
    "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_PIO", "KVM_IOEVENTFD_FLAG_DEASSIGN",
    "KVM_IRQFD_FLAG_DEASSIGN", "KVM_IRQFD_FLAG_RESAMPLE",
    "KVM_CAP_IOEVENTFD", "KVM_CAP_IRQFD", "KVM_CAP_IRQFD_RESAMPLE", "KVM_CAP_IOEVENTFD_ANY_LENGTH",
    "KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID", "KVM_CAP_NR_VCPUS",
    "KVM_CAP_PIT2", "KVM_CAP_SET_IDENTITY_MAP_ADDR", "KVM_CAP_INTERNAL_ERROR_DATA", "KVM_CAP_XCRS",
    "KVM_CAP_MAX_VCPUS", "KVM_CAP_DEVICE_CTRL",
    "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_X86_USER_SPACE_MSR", "KVM_CAP_X86_MSR_FILTER", "KVM_CAP_VM_TYPES",
]
# Items newer than the installed headers can be: the layout test reports them as
# not checkable there instead of failing (value: the Linux release that added them).
ADDED_IN = {"KVM_CAP_VM_TYPES": "6.10", "struct kvm_run.hypercall.flags": "6.4"}


def msrs_buffer(count: int) -> ctypes.Array:
    """A kvm_msrs header followed by `count` kvm_msr_entry, as one buffer."""

    class kvm_msrs_n(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * count)]

    return kvm_msrs_n(nmsrs=count)


def cpuid2_buffer(count: int) -> ctypes.Structure:
    class kvm_cpuid2_n(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * count)]

    return kvm_cpuid2_n(nent=count)
