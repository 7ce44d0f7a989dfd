"""Does this host run guest kernel-mode code natively, or through KVM's instruction emulator?

On some hosts (nested KVM without hardware help: the project's CI machines run kvm_pvm) guest code at CPL 0 is
executed by KVM's instruction emulator, which lacks instructions every Linux kernel runs early (popcnt, clac,
xrstor, cmpxchg16b, ...): KVM_RUN returns KVM_EXIT_INTERNAL_ERROR with suberror 1 (emulation failure) and no
VMM gets a kernel to userspace. The probe runs a two-instruction real-mode guest, `popcnt eax, ebx; hlt`, in a
throw-away VM (~2 ms): a HLT exit with EAX = 8 means the guest's code runs as the hardware runs it.
"""

from __future__ import annotations

from vmmd.errors import VmmdError
from vmmd.kvm import exits

PROBE_GPA = 0x1000
PROBE_CODE = bytes.fromhex("f30fb8c3f4")  # popcnt eax, ebx; hlt
PROBE_RBX = 0xFF  # popcnt: 8
PROBE_MEMORY = 2 << 20


def real_mode_vcpu(vm, rip: int, **registers: int):
    """vCPU 0 of `vm` in real mode at 0:`rip` (CS base 0, other state KVM's reset state), interrupts off, with
    `registers` (rbx=..., ...) set."""
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = rip, 0x2
    for name, value in registers.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)
    return vcpu


def guest_code_emulated_reason(kvm) -> str | None:
    """None when this KVM runs guest kernel code natively; else a sentence saying what it cannot run."""
    from vmmd.memory import GuestMemory

    memory = GuestMemory.with_ram(PROBE_MEMORY)
    vm = None
    try:
        vm = kvm.create_vm()
        vm.set_tss_addr()
        vm.add_memory(memory)
        memory.write(PROBE_GPA, PROBE_CODE)
        vcpu = real_mode_vcpu(vm, PROBE_GPA, rbx=PROBE_RBX)
        ex = vcpu.run()
        if isinstance(ex, exits.HltExit) and vcpu.get_regs().rax & 0xFFFF_FFFF == 8:
            return None
        if isinstance(ex, exits.InternalErrorExit) and ex.suberror == 1:
            return ("guest kernel code runs through KVM's instruction emulator, which cannot run popcnt (nested KVM "
                    "without hardware help): Linux guests stop early in their boot (docs/linux-boot.md)")
        return f"a popcnt; hlt probe guest ended with {type(ex).__name__}, not HLT: guest code is not run natively"
    except (VmmdError, OSError) as err:
        return f"the guest-code probe could not run: {err}"
    finally:
        if vm is not None:
            vm.close()
        memory.close()
