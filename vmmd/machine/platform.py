"""The platform base class and the plain platform (ARCHITECTURE.md, "Platforms").

A platform owns what differs between plain, sev-es-emu and sev-es. The SEV
platforms derive from `Platform` in vmmd/sev/platform.py; vmmd/platforms.py
picks one. Neither the run loop nor this module imports SEV code: the run loop
calls the hooks a platform installs in its ExitContext (MSR exits, the doorbell
port, system events).

Guest-visible contract kept here: MSR 0xC0010131 (SEV_STATUS) reads 0 on plain
and sev-es-emu, trapped with KVM_X86_SET_MSR_FILTER + KVM_CAP_X86_USER_SPACE_MSR
(KVM_MSR_EXIT_REASON_FILTER).
"""

from __future__ import annotations

from vmmd.errors import VmmdError
from vmmd.kvm import exits, uapi
from vmmd.machine.runloop import ExitContext

MSR_SEV_STATUS = 0xC001_0131  # AMD APM vol. 2, 15.34.10 (SEV_STATUS)
MSR_GHCB = 0xC001_0130  # AMD APM vol. 2, 15.35.5 (GHCB MSR)
PLATFORM_NAMES = ("auto", "plain", "sev-es", "sev-es-emu")


def create_pc_irqchip(vm) -> None:
    """The PC interrupt hardware in the kernel, as QEMU's kernel-irqchip=on and Firecracker create it: PIC,
    IOAPIC and local APICs (KVM_CREATE_IRQCHIP), then the PIT (KVM_CREATE_PIT2) with port 0x61 emulated
    (KVM_PIT_SPEAKER_DUMMY). Before any vCPU exists (api.rst)."""
    if not vm.has_irqchip:
        vm.create_irqchip()
    vm.create_pit2(uapi.KVM_PIT_SPEAKER_DUMMY)


class Platform:
    name = "plain"
    vm_type = 0
    doorbell_port = 0
    c_bit = 0
    encrypts = False
    # KVM_MEM_READONLY slots (a flash-like reset-vector image). KVM refuses them for VMs with protected
    # state: virt/kvm/kvm_main.c check_memory_region_flags() asks kvm_arch_has_readonly_mem(), false for
    # SEV-ES VMs (arch/x86/include/asm/kvm_host.h: !kvm->arch.has_protected_state).
    readonly_memory = True
    description = "plain KVM guest: no GHCB, the guest uses real I/O instructions"

    def create_vm(self, machine):
        """The KVM VM with guest memory registered; with the in-kernel irqchip and PIT a Linux guest needs."""
        vm = machine.kvm.create_vm(self.vm_type)
        vm.set_tss_addr()
        vm.add_memory(machine.memory)
        if machine.wants_irqchip:
            create_pc_irqchip(vm)
        return vm

    def create_vcpus(self, machine) -> None:
        machine.create_vcpus_at_entry()

    def release(self, machine) -> None:
        """Give back platform resources (called from Machine.close(), also after a failed build)."""

    def configure_vm(self, machine) -> None:
        """After the VM and its memory exist, before vCPUs: trap the SEV MSRs into userspace."""
        vm = machine.vm
        if not machine.kvm.check_extension(uapi.KVM_CAP_X86_USER_SPACE_MSR) or \
                not machine.kvm.check_extension(uapi.KVM_CAP_X86_MSR_FILTER):
            raise VmmdError("this kernel lacks KVM_CAP_X86_USER_SPACE_MSR / KVM_CAP_X86_MSR_FILTER (Linux >= 5.10 "
                            "is needed to present SEV_STATUS to the guest)")
        vm.enable_cap(uapi.KVM_CAP_X86_USER_SPACE_MSR, uapi.KVM_MSR_EXIT_REASON_FILTER)
        # one range from MSR_GHCB: bit 0 = GHCB MSR, bit 1 = SEV_STATUS; a 0 bit denies -> user-space exit
        vm.set_msr_filter([(uapi.KVM_MSR_FILTER_READ | uapi.KVM_MSR_FILTER_WRITE, MSR_GHCB, 2, b"\x00")])

    def attach(self, machine, ctx: ExitContext) -> None:
        ctx.msr_handler = self.handle_msr

    def handle_msr(self, vcpu, ex: exits.MsrExit) -> None:
        if ex.index == MSR_SEV_STATUS and not ex.is_write:
            vcpu.complete_msr_exit(0, error=False)  # no SEV, no SEV-ES
        else:
            vcpu.complete_msr_exit(0, error=True)  # #GP, as on a CPU without the MSR

    def launch(self, machine) -> None:
        """Platform-specific steps after memory and vCPU state are loaded."""
