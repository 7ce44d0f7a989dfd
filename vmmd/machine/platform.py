"""Platforms: what differs between plain, sev-es-emu and sev-es (ARCHITECTURE.md, "Platforms").

The run loop never imports SEV code; it calls the hooks a platform installs in
its ExitContext (MSR exits, the doorbell port, system events).

Guest-visible contract kept here:
- MSR 0xC0010131 (SEV_STATUS) reads 0 on plain and sev-es-emu: trapped with
  KVM_X86_SET_MSR_FILTER + KVM_CAP_X86_USER_SPACE_MSR (KVM_MSR_EXIT_REASON_FILTER).
- On sev-es-emu, MSR 0xC0010130 (GHCB MSR) is a per-vCPU register held by the
  VMGEXIT service, CPUID 0x40000100/0x40000101 carry the signature and doorbell
  port, and an `out` to the doorbell port is a VMGEXIT.
"""

from __future__ import annotations

from vmmd.errors import VmmdError
from vmmd.kvm import exits, uapi
from vmmd.machine import layout as L
from vmmd.machine.runloop import CONTINUE, VCPU_HALTED, ExitContext

MSR_SEV_STATUS = 0xC001_0131  # AMD APM vol. 2, 15.34.10 (SEV_STATUS)
MSR_GHCB = 0xC001_0130  # AMD APM vol. 2, 15.35.5 (GHCB MSR)
PLATFORM_NAMES = ("auto", "plain", "sev-es", "sev-es-emu")


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
        """The KVM VM with guest memory registered."""
        vm = machine.kvm.create_vm(self.vm_type)
        vm.set_tss_addr()
        vm.add_memory(machine.memory)
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


class SevEsEmuPlatform(Platform):
    name = "sev-es-emu"
    doorbell_port = L.DOORBELL_PORT
    description = ("sev-es-emu: the GHCB protocol serviced by vmmd in userspace; nothing is encrypted and "
                   "nothing is attested")

    def __init__(self, inputs=None) -> None:
        from vmmd.sev.platform import LaunchInputs

        self.inputs = inputs or LaunchInputs()  # what the reported launch digest assumes (policy, C-bit, ...)

    def attach(self, machine, ctx: ExitContext) -> None:
        from vmmd.sev.vmgexit import VmgexitAction, VmgexitService  # the run loop never imports SEV code

        self._halt = VmgexitAction.HALT

        self.service = VmgexitService(machine.memory, machine.port_bus, machine.mmio_bus, machine.cpuid.lookup,
                                      c_bit=self.c_bit, vcpu_count=machine.config.cpus,
                                      vcpu_cpuid_lookup=machine.cpuid.vcpu_lookup)
        ctx.msr_handler = self.handle_msr
        ctx.doorbell_port = self.doorbell_port
        ctx.doorbell = self.doorbell

    def handle_msr(self, vcpu, ex: exits.MsrExit) -> None:
        if ex.index == MSR_GHCB:
            if ex.is_write:
                self.service.write_ghcb_msr(vcpu.index, ex.data)
                vcpu.complete_msr_exit(0, error=False)
            else:
                vcpu.complete_msr_exit(self.service.read_ghcb_msr(vcpu.index), error=False)
        else:
            super().handle_msr(vcpu, ex)

    def launch(self, machine) -> None:
        """Run the SEV-ES launch sequence against the software model to report the hardware's launch digest."""
        from vmmd.sev.platform import emulated_launch

        self.launch_result = emulated_launch(machine, self.inputs)

    def release(self, machine) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()

    def doorbell(self, vcpu) -> int:
        return VCPU_HALTED if self.service.vmgexit(vcpu.index, vcpu) is self._halt else CONTINUE


def sev_es_unavailable_reason() -> str | None:
    """None when this host can run sev-es guests, else the first missing prerequisite."""
    try:
        from vmmd.sev.host import host_report
    except ImportError:
        return "vmmd's SEV-ES launch support is not installed"
    report = host_report()
    return None if report.get("sev_es_available") else report.get("sev_es_reason", "SEV-ES is not available")


def select_platform(requested: str) -> tuple[Platform, str]:
    """The platform object and a one-line note saying which platform runs and why."""
    if requested not in PLATFORM_NAMES:
        raise VmmdError(f"unknown platform {requested!r}: choose one of {', '.join(PLATFORM_NAMES)}")
    if requested == "plain":
        return Platform(), "platform plain (as requested)"
    if requested == "sev-es-emu":
        return SevEsEmuPlatform(), "platform sev-es-emu (as requested; the emulator encrypts nothing)"
    reason = sev_es_unavailable_reason()
    if requested == "sev-es":
        if reason is not None:
            raise VmmdError(f"platform sev-es is not available on this host: {reason} (see `vmctl host`)")
        from vmmd.sev.platform import SevEsPlatform
        return SevEsPlatform(), "platform sev-es (hardware SEV-ES)"
    if reason is None:
        from vmmd.sev.platform import SevEsPlatform
        return SevEsPlatform(), "platform sev-es (auto: this host has SEV-ES)"
    return SevEsEmuPlatform(), f"platform sev-es-emu (auto: no SEV-ES here: {reason}; the emulator encrypts nothing)"
