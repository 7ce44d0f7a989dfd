"""KVM ioctl numbers, one line each, in include/uapi/linux/kvm.h order.

Computed with ioctl-opt from the same direction/type/size the header uses, with
the kernel's quirks kept: KVM_MEMORY_ENCRYPT_OP is _IOWR(.., unsigned long) and
KVM_MEMORY_ENCRYPT_REG_REGION is _IOR though the kernel reads it. The comment
after each names the fd it is issued on and, where one gates it, the capability.
"""

import ctypes

from ioctl_opt import IO, IOR, IOW, IOWR

from vmmd.kvm.uapi import (
    KVMIO,
    kvm_cpuid2,
    kvm_debugregs,
    kvm_device_attr,
    kvm_enable_cap,
    kvm_enc_region,
    kvm_fpu,
    kvm_ioeventfd,
    kvm_irq_level,
    kvm_irqfd,
    kvm_mp_state,
    kvm_msr_filter,
    kvm_msrs,
    kvm_pit_config,
    kvm_regs,
    kvm_sregs,
    kvm_userspace_memory_region,
    kvm_vcpu_events,
    kvm_xcrs,
    kvm_xsave,
)

# /dev/kvm
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, kvm_cpuid2)  # KVM_CAP_EXT_CPUID
# VM fd
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, kvm_userspace_memory_region)  # KVM_CAP_USER_MEMORY
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)  # KVM_CAP_SET_TSS_ADDR
KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)  # KVM_CAP_IRQCHIP
KVM_IRQ_LINE = IOW(KVMIO, 0x61, kvm_irq_level)  # KVM_CAP_IRQCHIP
KVM_IRQFD = IOW(KVMIO, 0x76, kvm_irqfd)  # KVM_CAP_IRQFD
KVM_CREATE_PIT2 = IOW(KVMIO, 0x77, kvm_pit_config)  # KVM_CAP_PIT2
KVM_IOEVENTFD = IOW(KVMIO, 0x79, kvm_ioeventfd)  # KVM_CAP_IOEVENTFD
# device attributes (on /dev/kvm with KVM_X86_GRP_SEV since 6.10, on device fds)
KVM_SET_DEVICE_ATTR = IOW(KVMIO, 0xE1, kvm_device_attr)  # KVM_CAP_DEVICE_CTRL
KVM_GET_DEVICE_ATTR = IOW(KVMIO, 0xE2, kvm_device_attr)  # KVM_CAP_DEVICE_CTRL
KVM_HAS_DEVICE_ATTR = IOW(KVMIO, 0xE3, kvm_device_attr)  # KVM_CAP_DEVICE_CTRL
# vCPU fd
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = IOW(KVMIO, 0x8D, kvm_fpu)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, kvm_cpuid2)  # KVM_CAP_EXT_CPUID
KVM_GET_CPUID2 = IOWR(KVMIO, 0x91, kvm_cpuid2)  # KVM_CAP_EXT_CPUID
KVM_GET_MP_STATE = IOR(KVMIO, 0x98, kvm_mp_state)  # KVM_CAP_MP_STATE
KVM_SET_MP_STATE = IOW(KVMIO, 0x99, kvm_mp_state)  # KVM_CAP_MP_STATE
KVM_GET_VCPU_EVENTS = IOR(KVMIO, 0x9F, kvm_vcpu_events)  # KVM_CAP_VCPU_EVENTS
KVM_SET_VCPU_EVENTS = IOW(KVMIO, 0xA0, kvm_vcpu_events)  # KVM_CAP_VCPU_EVENTS
KVM_GET_DEBUGREGS = IOR(KVMIO, 0xA1, kvm_debugregs)  # KVM_CAP_DEBUGREGS
KVM_SET_DEBUGREGS = IOW(KVMIO, 0xA2, kvm_debugregs)  # KVM_CAP_DEBUGREGS
KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, kvm_enable_cap)  # vCPU, and VM fd with KVM_CAP_ENABLE_CAP_VM
KVM_GET_XSAVE = IOR(KVMIO, 0xA4, kvm_xsave)  # KVM_CAP_XSAVE
KVM_SET_XSAVE = IOW(KVMIO, 0xA5, kvm_xsave)  # KVM_CAP_XSAVE
KVM_GET_XCRS = IOR(KVMIO, 0xA6, kvm_xcrs)  # KVM_CAP_XCRS
KVM_SET_XCRS = IOW(KVMIO, 0xA7, kvm_xcrs)  # KVM_CAP_XCRS
# VM fd, memory encryption (SEV)
KVM_MEMORY_ENCRYPT_OP = IOWR(KVMIO, 0xBA, ctypes.c_ulong)
KVM_MEMORY_ENCRYPT_REG_REGION = IOR(KVMIO, 0xBB, kvm_enc_region)
KVM_MEMORY_ENCRYPT_UNREG_REGION = IOR(KVMIO, 0xBC, kvm_enc_region)
KVM_X86_SET_MSR_FILTER = IOW(KVMIO, 0xC6, kvm_msr_filter)  # KVM_CAP_X86_MSR_FILTER

LAYOUT_HEADERS = ["linux/kvm.h"]
LAYOUT_CONSTANTS = [name for name in dir() if name.startswith("KVM_") and name.isupper()]
ADDED_IN: dict[str, str] = {}
