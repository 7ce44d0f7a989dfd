"""The real SEV-ES launch and guest termination on AMD hardware; skipped elsewhere with the host report's reason.

The guest is 16 bytes of real-mode code at GPA 0x7000 (paging off, so every access is encrypted and
the code is what LAUNCH_UPDATE_DATA measured): it writes a GHCB MSR-protocol termination request
(reason set 0, code 1) to MSR 0xC0010130 and executes VMGEXIT (`rep vmmcall`), which KVM reports as
KVM_EXIT_SYSTEM_EVENT / KVM_SYSTEM_EVENT_SEV_TERM (arch/x86/kvm/svm/sev.c
sev_handle_vmgexit_msr_protocol()). `rep vmmcall` hangs KVM_RUN on non-SEV hosts, so nothing here
runs unless host_report() says sev-es is available.
"""

from __future__ import annotations

import pytest

from vmmd.sev.host import host_report

_REPORT = host_report(memory_bytes=4 << 20)
pytestmark = pytest.mark.skipif(not _REPORT["sev_es_available"],
                                reason=f"SEV-ES hardware not available: {_REPORT['sev_es_reason']}")

CODE_GPA = 0x7000
CPU_SIG = 0x00A00F11  # EPYC-Milan; only feeds RDX and the plan's predicted VMSA
# mov ecx, 0xC0010130 ; mov eax, 0x00010100 (GHCB_SEV_TERM_REASON(0, 1) | 0x100) ; xor edx, edx ; wrmsr ;
# rep vmmcall ; hlt ; jmp $-1 ; padding to 32 bytes
GUEST_CODE = bytes.fromhex("66b9300101c0" "66b800010100" "6631d2" "0f30" "f30f01d9" "f4" "ebfd").ljust(32, b"\x90")


def _launch(kvm, secret=None):
    from vmmd.memory import GuestMemory
    from vmmd.sev import measure, vmsa
    from vmmd.sev.launch import KvmSevBackend, SevEsLaunch

    memory = GuestMemory.with_ram(4 << 20)
    memory.write(CODE_GPA, GUEST_CODE)
    backend = KvmSevBackend.create(kvm, memory)
    caps = backend.capabilities()
    state = vmsa.x86_reset_state(CPU_SIG, cs_base=0, rip=CODE_GPA)
    plan = measure.LaunchPlan(
        regions=(measure.MeasuredRegion(CODE_GPA, memory.read(CODE_GPA, 4096), "code page"),),
        vcpus=measure.build_vcpu_launches([state], init2=caps.has_init2, vmsa_features=caps.vmsa_features),
        policy=measure.DEFAULT_SEVES_POLICY, init2=caps.has_init2, vmsa_features=caps.vmsa_features,
        cpu_sig=CPU_SIG)

    def set_vcpu_state(p) -> None:
        vcpu = backend.vm.create_vcpu(0)
        vmsa.program_vcpu(vcpu, p.vcpus[0].state)  # every field the predicted VMSA holds

    launch = SevEsLaunch(backend, plan, secret=secret)
    return backend, launch.run(set_vcpu_state)


@pytest.fixture
def kvm():
    from vmmd.kvm import Kvm

    handle = Kvm()
    yield handle
    handle.close()


def test_full_launch_sequence_on_hardware(kvm) -> None:
    from vmmd.sev.uapi import SevGuestState

    backend, result = _launch(kvm)
    try:
        assert result.steps[0] == "init" and result.steps[-1] == "finish"
        assert len(result.measurement) == 32 and len(result.mnonce) == 16
        handle, policy, state = backend.guest_status()
        assert state == SevGuestState.RUNNING and policy == result.policy and handle == result.handle != 0
        assert result.ghcb_version_chosen_by == "KVM"  # kvm_sev_init.ghcb_version 0, as QEMU passes it
        _assert_registers_after_launch(backend)
    finally:
        backend.release()


def _assert_registers_after_launch(backend) -> None:
    """After LAUNCH_UPDATE_VMSA the vCPU's state lives in the encrypted VMSA. KVM refuses KVM_GET_REGS only for
    VM types with protected state (KVM_X86_SEV_ES_VM, i.e. KVM_SEV_INIT2: arch/x86/kvm/regs.c
    kvm_arch_vcpu_ioctl_get_regs() checks kvm->arch.has_protected_state, which svm.c sets for those types). A
    legacy KVM_SEV_ES_INIT VM (KVM_X86_DEFAULT_VM, every kernel before 6.10) answers with the stale values it held
    before the launch."""
    import errno

    from vmmd.kvm import KvmError
    from vmmd.sev.uapi import KVM_X86_SEV_ES_VM

    vcpu = backend.vm.vcpus[0]
    if backend.vm.vm_type == KVM_X86_SEV_ES_VM:
        with pytest.raises(KvmError) as info:
            vcpu.get_regs()
        assert info.value.errno == errno.EINVAL
    else:
        regs = vcpu.get_regs()  # stale: what program_vcpu() set, not what the guest's VMSA holds from now on
        assert (regs.rip, regs.rdx) == (CODE_GPA, CPU_SIG)


def test_guest_termination_reaches_userspace_and_decodes(kvm) -> None:
    from vmmd.kvm import exits
    from vmmd.kvm.uapi import KVM_SYSTEM_EVENT_SEV_TERM
    from vmmd.sev.termination import MSR_PROTOCOL, decode_sev_termination

    backend, _ = _launch(kvm)
    try:
        ex = backend.vm.vcpus[0].run()
        assert isinstance(ex, exits.SystemEventExit), ex
        assert ex.type == KVM_SYSTEM_EVENT_SEV_TERM
        term = decode_sev_termination(ex.data[0], backend.memory)
        assert term.form == MSR_PROTOCOL and (term.reason_set, term.reason_code) == (0, 1)
        assert "protocol range not supported" in str(term)
    finally:
        backend.release()


def test_failed_launch_releases_and_names_the_step(kvm) -> None:
    """A LAUNCH_SECRET before measuring is impossible in the sequencer; a bad secret address is refused
    by the firmware/kernel and the error names the step and the command."""
    from vmmd.sev.launch import LaunchSecret, SevLaunchError

    with pytest.raises(SevLaunchError) as info:
        _launch(kvm, secret=LaunchSecret(header=bytes(52), guest_gpa=0x9000, payload=bytes(32)))
    assert info.value.step == "secret" and info.value.command == "KVM_SEV_LAUNCH_SECRET"
