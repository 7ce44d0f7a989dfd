"""The SEV platforms (sev-es on hardware, sev-es-emu in software) and the launch plan of a flat firmware guest.

`flat_launch_plan()` is the one description of what an SEV-ES launch of a flat
firmware image measures: the VMM-built low area (boot info, GDT, page tables
with the C-bit) and the image, in `LoadedImage.measured_regions()` order, then
one VMSA per vCPU from the documented 64-bit entry state. The hardware platform
launches exactly that plan through the sequencer (vmmd/sev/launch.py); the
sev-es-emu platform runs the same sequencer against the software model
(`SevModel`) over a copy laid out for the hardware C-bit, so the digest it
reports is the one the PSP would compute for the same inputs.

Sequence as QEMU target/i386/sev.c and the KVM selftests (lib/x86/sev.c) do it:
INIT2 (or ES_INIT) before vCPUs, REG_REGION for RAM, LAUNCH_START,
LAUNCH_UPDATE_DATA, vCPU state, LAUNCH_UPDATE_VMSA, LAUNCH_MEASURE, LAUNCH_FINISH.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmmd.errors import ExitCode, VmmdError, VmStop
from vmmd.kvm import exits
from vmmd.kvm import uapi as kvm_uapi
from vmmd.machine import layout as L
from vmmd.machine.loader import LINUX, RESET_VECTOR, LoadedImage, entry_regs, load_flat_firmware, long_mode_sregs
from vmmd.machine.platform import MSR_GHCB, Platform, create_pc_irqchip
from vmmd.machine.runloop import CONTINUE, VCPU_HALTED, ExitContext
from vmmd.memory import GuestMemory
from vmmd.sev.cpu_types import DEFAULT_CPU_TYPE, decode_sig, resolve_cpu_sig

if TYPE_CHECKING:
    from vmmd.sev import measure
    from vmmd.sev.vmsa import VcpuState

# The launch-plan code (vmmd.sev.measure, vmmd.sev.vmsa, the OVMF parser; vmmd.sev.launch) is imported inside the
# functions that use it: a `vmctl run -q` on sev-es-emu predicts no digest and never loads it (~15-25 ms).
DEFAULT_HW_C_BIT = 51  # EPYC 7xx2/7xx3/9xx4 report C-bit 51 in CPUID 0x8000001F EBX[5:0]
DEFAULT_SEVES_POLICY = 0x5  # NODBG | ES: vmmd.sev.measure.DEFAULT_SEVES_POLICY (tests/unit/test_flat_launch.py)


@dataclass
class LaunchInputs:
    """The launch choices that, with the image and vCPU count, determine the launch digest."""

    policy: int = DEFAULT_SEVES_POLICY
    # KVM_SEV_INIT2 (True) or legacy KVM_SEV_ES_INIT (False); None: the host decides, INIT2 where the kernel
    # has it (Linux 6.10+), else ES_INIT. A digest predicted without a host assumes INIT2 (`uses_init2`).
    init2: bool | None = None
    vmsa_features: int = 0
    c_bit: int = DEFAULT_HW_C_BIT
    # the CPU model whose CPUID 1 EAX a reset-vector image's VMSAs carry in a predicted digest (sev-es-emu);
    # None: DEFAULT_CPU_TYPE, as `vmctl measure`. Hardware launches use the host's own signature.
    cpu_type: str | None = None
    # KVM_SEV_INIT2's ghcb_version; None passes 0 and lets KVM choose (GHCB_VERSION_DEFAULT), as QEMU does
    ghcb_version: int | None = None
    # a guest owner's LAUNCH_START inputs (vmctl run --dh-cert / --session; vmmd/sev/owner.py): the GODH
    # certificate and session blob, raw; and `attest`: stop after LAUNCH_MEASURE for the owner (vmmd/sev/attest.py)
    dh_cert: bytes | None = None
    session: bytes | None = None
    attest: bool = False

    @property
    def uses_init2(self) -> bool:
        return True if self.init2 is None else self.init2


def adopt_capabilities(inputs: LaunchInputs, caps) -> None:
    """Settle the launch inputs the host decides, from the backend's capabilities (vmmd.sev.launch.BackendCaps):
    INIT2 or ES_INIT as the VM was created; with INIT2 the requested VMSA features KVM supports; with ES_INIT
    the features it sets by itself (DebugSwap on Linux 6.5-6.9 with kvm_amd debug_swap=1, else none)."""
    inputs.init2 = caps.has_init2
    if caps.has_init2:
        inputs.vmsa_features &= caps.vmsa_features
    else:
        inputs.vmsa_features = caps.vmsa_features


def entry_states(image: LoadedImage, cr3: int, cpus: int) -> list[VcpuState]:
    """The documented 64-bit entry state of each vCPU, as the hardware launch sets it.

    CR4.OSXSAVE is assumed: every SEV-ES-capable EPYC has XSAVE, and the digest must not depend on the
    host that predicts it. XCR0 = x87 only (the flat firmware uses no SSE/AVX)."""
    from vmmd.sev.vmsa import VcpuState

    return [VcpuState.from_kvm(entry_regs(image, index), long_mode_sregs(kvm_uapi.kvm_sregs(), cr3, xsave=True),
                               xcr0=1)
            for index in range(cpus)]


def flat_launch_plan(memory: GuestMemory, image: LoadedImage, cr3: int, cpus: int,
                     inputs: LaunchInputs) -> measure.LaunchPlan:
    """The plan of a loaded flat image; the regions are copies of what the loader wrote (the launch encrypts
    guest memory in place)."""
    from vmmd.sev import measure

    regions = tuple(measure.MeasuredRegion(gpa, memory.read(gpa, size), name)
                    for gpa, size, name in image.measured_regions())
    states = entry_states(image, cr3, cpus)
    return measure.LaunchPlan(regions=regions,
                              vcpus=measure.build_vcpu_launches(states, init2=inputs.uses_init2,
                                                                vmsa_features=inputs.vmsa_features),
                              policy=inputs.policy, init2=inputs.uses_init2, vmsa_features=inputs.vmsa_features,
                              cpu_sig=0)


def flat_image_digest(firmware, memory_bytes: int, cpus: int, inputs: LaunchInputs,
                      guest_arg: int = 0) -> tuple[bytes, measure.LaunchPlan]:
    """Offline: the launch digest of a flat firmware image for these inputs (no KVM needed)."""
    from vmmd.sev import measure

    memory = GuestMemory.with_ram(memory_bytes)
    try:
        image, cr3 = load_flat_firmware(memory, firmware, "sev-es", cpus, 0, inputs.c_bit, guest_arg)
        plan = flat_launch_plan(memory, image, cr3, cpus, inputs)
        return measure.launch_digest(plan), plan
    finally:
        memory.close()


LINUX_APS_REFUSED = ("an SEV-ES direct Linux boot has one vCPU: the kernel starts its APs through the AP jump "
                     "table of the firmware that launched it (OVMF), and a direct boot has no firmware: boot it with "
                     "one vCPU")


def linux_entry_state(image, cr3: int) -> VcpuState:
    """The boot vCPU of a direct Linux boot at the 64-bit entry point (vmmd.machine.linux), as its VMSA holds it:
    CR4.OSXSAVE and XCR0 = x87, as for flat images, so the digest does not depend on the predicting host."""
    from vmmd.machine.linux import linux_entry_regs, linux_entry_sregs
    from vmmd.sev.vmsa import VcpuState

    return VcpuState.from_kvm(linux_entry_regs(image), linux_entry_sregs(kvm_uapi.kvm_sregs(), cr3, xsave=True),
                              xcr0=1)


def linux_launch_plan(memory: GuestMemory, image, cr3: int, inputs: LaunchInputs) -> measure.LaunchPlan:
    """The plan of a loaded direct Linux boot (docs/linux-boot.md): every region the loader wrote (zero page, GDT,
    page tables with the C-bit, command line, MP and ACPI tables, kernel, initrd) in ascending GPA order, then the
    boot vCPU's VMSA. One vCPU only (LINUX_APS_REFUSED)."""
    from vmmd.sev import measure

    if image.cpus != 1:
        raise VmmdError(LINUX_APS_REFUSED)
    regions = tuple(measure.MeasuredRegion(gpa, memory.read(gpa, size), name)
                    for gpa, size, name in image.measured_regions())
    return measure.LaunchPlan(regions=regions,
                              vcpus=measure.build_vcpu_launches([linux_entry_state(image, cr3)],
                                                                init2=inputs.uses_init2,
                                                                vmsa_features=inputs.vmsa_features),
                              policy=inputs.policy, init2=inputs.uses_init2, vmsa_features=inputs.vmsa_features,
                              cpu_sig=0)


def linux_digest(config, inputs: LaunchInputs) -> tuple[bytes, measure.LaunchPlan]:
    """Offline: the launch digest of a direct Linux boot of `config` (kernel, initrd, append, memory, cpus,
    devices) for these inputs (no KVM needed)."""
    from vmmd.machine.machine import load_kernel
    from vmmd.sev import measure

    memory = GuestMemory.with_ram(config.memory_bytes)
    try:
        image, cr3 = load_kernel(memory, config, inputs.c_bit)
        plan = linux_launch_plan(memory, image, cr3, inputs)
        return measure.launch_digest(plan), plan
    finally:
        memory.close()


def reset_vector_plan(memory: GuestMemory, image: LoadedImage, cpus: int, cpu_sig: int,
                      inputs: LaunchInputs) -> measure.LaunchPlan:
    """An OVMF-style image as QEMU launches it (measure.build_ovmf_plan): the image, then BSP + AP VMSAs.
    VmmdError when the image lacks the SEV-ES reset block an SEV-ES launch needs."""
    from vmmd.sev import measure

    data = memory.buffer(image.image_gpa, image.image_size)
    return measure.build_ovmf_plan(data, cpus, cpu_sig, init2=inputs.uses_init2, vmsa_features=inputs.vmsa_features,
                                   policy=inputs.policy)


def _assumptions(inputs: LaunchInputs, cpu_type: str | None) -> str:
    """What a predicted digest assumes, in words: init command, C-bit, and for images whose VMSAs carry the
    CPU signature, the CPU model."""
    text = f"{'KVM_SEV_INIT2' if inputs.uses_init2 else 'KVM_SEV_ES_INIT'}, C-bit {inputs.c_bit}"
    if cpu_type is not None:
        family, model, stepping = decode_sig(resolve_cpu_sig(cpu_type))
        text += f", CPU {cpu_type}: family {family} model {model} stepping {stepping} (see --cpu-type)"
    return text


def secret_area(machine) -> tuple[int, int] | None:
    """Where an attested launch's secret goes by default: the boot info's secret page for vmmd's flat images,
    OVMF's SEV secret block for reset-vector images, none for a direct Linux boot."""
    if machine.image.kind == RESET_VECTOR:
        from vmmd.sev.attest import ovmf_secret_area

        return ovmf_secret_area(machine.memory.view(machine.image.image_gpa, machine.image.image_size))
    if machine.image.kind == LINUX:
        return None
    return L.SECRET_GPA, L.SECRET_SIZE


def emulated_launch(machine, inputs: LaunchInputs):
    """Run the launch sequence against the software model over a hardware-layout copy of the guest's measured
    memory; returns the LaunchResult, or None (with `machine.launch_note` saying why) when the image could
    not be launched as SEV-ES at all."""
    from vmmd.sev.launch import SevEsLaunch, SevModel

    cfg = machine.config
    cpu_type = inputs.cpu_type or DEFAULT_CPU_TYPE
    machine.platform.assumed = _assumptions(inputs, cpu_type if machine.image.kind == RESET_VECTOR else None)
    if machine.image.kind == LINUX and cfg.cpus != 1:
        machine.launch_note = LINUX_APS_REFUSED.replace(": boot it with one vCPU", "") + (
            ": this guest runs with its vCPUs, as on plain, but sev-es would refuse it")
        return None
    if machine.image.kind == RESET_VECTOR:
        copy = GuestMemory()
        copy.add_slot(machine.image.image_gpa, machine.image.image_size)
        copy.write(machine.image.image_gpa, machine.memory.buffer(machine.image.image_gpa, machine.image.image_size))
    else:
        copy = GuestMemory.with_ram(cfg.memory_bytes)
    try:
        if machine.image.kind == RESET_VECTOR:
            try:
                plan = reset_vector_plan(copy, machine.image, cfg.cpus, resolve_cpu_sig(cpu_type), inputs)
            except (VmmdError, ValueError) as err:
                machine.launch_note = f"not an SEV-ES launchable image: {err}"
                return None
        elif machine.image.kind == LINUX:
            from vmmd.machine.loader import build_page_tables

            # The guest's own bytes, read once by the loader: the sev-es layout differs from this run's only in
            # the C-bit of the initial page tables, which are rebuilt over the copied ones.
            for gpa, size, _name in machine.image.measured_regions():
                copy.write(gpa, machine.memory.buffer(gpa, size))
            cr3 = build_page_tables(copy, inputs.c_bit)
            plan = linux_launch_plan(copy, machine.image, cr3, inputs)
        else:
            from vmmd.machine.machine import disk_gpas  # the boot-info page names the devices: it is measured

            image, cr3 = load_flat_firmware(copy, cfg.firmware, "sev-es", cfg.cpus, 0, inputs.c_bit, cfg.guest_arg,
                                            L.VIRTIO_NET_MMIO_GPA if cfg.net else 0, virtio_blk_gpas=disk_gpas(cfg))
            plan = flat_launch_plan(copy, image, cr3, cfg.cpus, inputs)
        pdh_key = None
        if inputs.dh_cert or inputs.session or inputs.attest:  # the owner's session is made for this host's PDH
            from vmmd.sev import simpsp

            pdh_key = simpsp.load().pdh_key
        # LAUNCH_SECRET's plaintext goes into the guest's own RAM: nothing encrypts it on sev-es-emu
        model = SevModel(copy, has_init2=inputs.uses_init2, vmsa_features=inputs.vmsa_features, owns_memory=False,
                         pdh_key=pdh_key, secret_memory=machine.memory)
        from vmmd.sev.attest import run_launch

        launch = SevEsLaunch(model, plan, dh_cert=inputs.dh_cert, session=inputs.session)
        result = run_launch(machine.platform, launch, lambda plan: None, simulated=True,
                            secret_area=secret_area(machine))
        if inputs.dh_cert:
            from vmmd.sev.simpsp import NOTE

            machine.notes.append(f"LAUNCH_START unwrapped the guest owner's session with the {NOTE}")
        if result.expected_digest != model.launch_digest:
            raise VmmdError("the software model's launch digest differs from the plan's: vmmd bug")
        return result
    finally:
        copy.close()


class SevEsEmuPlatform(Platform):
    """Any KVM host: vmmd services the GHCB protocol in userspace (ARCHITECTURE.md, "Guest-visible contract of
    sev-es-emu"): MSR 0xC0010130 (GHCB MSR) is a per-vCPU register held by the VMGEXIT service, CPUID
    0x40000100/0x40000101 carry the signature and doorbell port, and an `out` to the doorbell port is a VMGEXIT.
    It reports the digest SEV-ES hardware would measure, from the software model (`emulated_launch`)."""

    name = "sev-es-emu"
    doorbell_port = L.DOORBELL_PORT
    description = ("sev-es-emu: the GHCB protocol serviced by vmmd in userspace; nothing is encrypted and "
                   "nothing is attested")

    def __init__(self, inputs: LaunchInputs | None = None) -> None:
        self.assumed = ""  # what the reported digest assumes, in words (set by emulated_launch)
        self.paused = None  # vmmd.sev.attest.PausedLaunch while an attested launch waits for its owner
        self.inputs = inputs or LaunchInputs()  # what the reported launch digest assumes (policy, C-bit, ...)
        # False: launch() predicts no digest (launch_result None), for callers that show none (`vmctl run -q`)
        self.predict_digest = True
        self.launch_result = None

    def attach(self, machine, ctx: ExitContext) -> None:
        from vmmd.sev.vmgexit import VmgexitAction, VmgexitService  # imported by the guests that use it

        self._halt = VmgexitAction.HALT

        self.service = VmgexitService(machine.memory, machine.port_bus, machine.mmio_bus, machine.cpuid.lookup,
                                      c_bit=self.c_bit, vcpu_count=machine.config.cpus,
                                      kvm_cpuid=machine.cpuid.kvm_cpuid)
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
        """Run the SEV-ES launch sequence against the software model to report the hardware's launch digest
        (unless `predict_digest` is off: nothing the guest sees depends on it)."""
        if machine.image.kind == LINUX:
            machine.notes.append("a Linux kernel does not know sev-es-emu's doorbell (its VMGEXIT is `rep vmmcall`, "
                                 "which only SEV-ES hardware services): it boots unencrypted as on plain, and the "
                                 "digest below is what the sev-es launch of the same boot measures")
        owner = self.inputs.dh_cert or self.inputs.session or self.inputs.attest  # the launch is the point then
        self.launch_result = emulated_launch(machine, self.inputs) if self.predict_digest or owner else None

    def release(self, machine) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()

    def doorbell(self, vcpu) -> int:
        return VCPU_HALTED if self.service.vmgexit(vcpu.index, vcpu) is self._halt else CONTINUE


class SevEsPlatform(Platform):
    """Real SEV-ES: the host kernel services VMGEXIT; vmmd owns the launch and termination decoding."""

    name = "sev-es"
    encrypts = True
    readonly_memory = False  # the firmware image becomes encrypted RAM, registered and measured like the rest
    description = "sev-es: AMD SEV-ES hardware; the kernel services VMGEXIT, memory and registers are encrypted"

    def __init__(self, inputs: LaunchInputs | None = None) -> None:
        from vmmd.hostcpu import host_cpuid

        self.inputs = inputs or LaunchInputs()
        self.c_bit = host_cpuid(0x8000_001F)[1] & 0x3F
        self.inputs.c_bit = self.c_bit
        self.backend = None
        self.launch_result = None
        self.paused = None  # vmmd.sev.attest.PausedLaunch while an attested launch waits for its owner

    def create_vm(self, machine):
        from vmmd.sev.launch import KvmSevBackend

        self.backend = KvmSevBackend.create(machine.kvm, machine.memory, use_init2=self.inputs.init2)
        adopt_capabilities(self.inputs, self.backend.capabilities())
        vm = self.backend.vm
        vm.set_tss_addr()
        vm.create_irqchip()  # QEMU requires the in-kernel irqchip for SEV-ES guests
        if machine.wants_irqchip:
            create_pc_irqchip(vm)  # and the PIT, for Linux
        return vm

    def configure_vm(self, machine) -> None:
        """No MSR filter: the hardware answers SEV_STATUS and the kernel owns the GHCB MSR."""

    def create_vcpus(self, machine) -> None:
        """vCPUs are created by the launch sequence (after LAUNCH_UPDATE_DATA, before LAUNCH_UPDATE_VMSA)."""

    def attach(self, machine, ctx) -> None:
        from vmmd.sev.termination import decode_sev_termination

        memory = machine.memory

        def system_event(vcpu, ex) -> None:
            if ex.type == kvm_uapi.KVM_SYSTEM_EVENT_SEV_TERM and ex.data:
                term = decode_sev_termination(ex.data[0], memory)
                known = term.reason_set is not None and term.reason_code is not None
                raise VmStop("sev-term", str(term), ExitCode.GUEST_TERMINATED,  # as sev-es-emu reports it
                             status=term.reason_set << 8 | term.reason_code if known else None)

        ctx.system_event_handler = system_event
        ctx.halt_stops_vm = False  # the in-kernel irqchip handles HLT: KVM_EXIT_HLT never comes
        ctx.registers_protected = True
        # ...so a guest ending in `cli; hlt` is noticed by asking each vCPU now and then (vmmd/sev/halt_watch.py)
        from vmmd.sev.halt_watch import HaltWatch

        self.halt_watch = HaltWatch(machine.config.cpus, machine.kick_all)
        ctx.interrupted = self.halt_watch.check
        self.halt_watch.start()

    def launch(self, machine) -> None:
        from vmmd.sev.launch import SevEsLaunch
        from vmmd.sev.vmsa import program_vcpu

        if machine.image.kind == RESET_VECTOR:
            plan = reset_vector_plan(machine.memory, machine.image, machine.config.cpus, machine.cpuid.lookup(1)[0],
                                     self.inputs)
        elif machine.image.kind == LINUX:
            plan = linux_launch_plan(machine.memory, machine.image, machine.cr3, self.inputs)
        else:
            plan = flat_launch_plan(machine.memory, machine.image, machine.cr3, machine.config.cpus, self.inputs)

        flat = machine.image.kind != RESET_VECTOR

        def set_vcpu_state(plan: measure.LaunchPlan) -> None:
            for launch in plan.vcpus:
                vcpu = machine.vm.create_vcpu(launch.index)
                if flat and launch.index:
                    # Under the in-kernel irqchip KVM parks APs in KVM_MP_STATE_UNINITIALIZED until INIT/SIPI
                    # (x86.c kvm_arch_vcpu_create()); a flat image's APs start at its entry like the BSP
                    # (firmware/include/bootinfo.h). Reset-vector firmware (OVMF) starts its APs itself.
                    vcpu.set_mp_state(kvm_uapi.KVM_MP_STATE_RUNNABLE)
                vcpu.set_cpuid2(machine.cpuid.for_vcpu(launch.index))
                # every field build_vmsa() measured: SREGS, REGS, XCRS, XSAVE, MSRS, DEBUGREGS (issue 16)
                program_vcpu(vcpu, launch.state)
                machine.vcpus.append(vcpu)

        from vmmd.sev.attest import run_launch

        launch = SevEsLaunch(self.backend, plan, ghcb_version=self.inputs.ghcb_version, dh_cert=self.inputs.dh_cert,
                             session=self.inputs.session)
        self.launch_result = run_launch(self, launch, set_vcpu_state, simulated=False,
                                        secret_area=secret_area(machine))

    def release(self, machine) -> None:
        watch = getattr(self, "halt_watch", None)
        if watch is not None:
            watch.close()
            self.halt_watch = None
        if self.backend is not None:
            self.backend.release()
            self.backend = None
