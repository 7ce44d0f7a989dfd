"""The SEV-ES launch sequencer against the firmware model: order, state checks, digest, cleanup."""

from __future__ import annotations

import errno
import hashlib
import hmac

import pytest

from vmmd.errors import VmmdError
from vmmd.memory import GuestMemory
from vmmd.sev import measure, uapi, vmsa
from vmmd.sev.launch import (
    LaunchSecret,
    SevEsLaunch,
    SevLaunchError,
    SevModel,
    build_policy,
    check_policy,
    verify_model_measurement,
)
from vmmd.sev.psp import PlatformStatus, SevError
from vmmd.sev.uapi import SevGuestState, SevPolicy

CPU_SIG = 0x00800F12
FW_GPA = 0x100000
MEM_BYTES = 4 << 20


def _image(size: int = 0x3000) -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(size))


def _setup(vcpus: int = 2, init2: bool = True, features: int = 0, policy: int = measure.DEFAULT_SEVES_POLICY,
           model_kwargs: dict | None = None, model_cls=SevModel):
    memory = GuestMemory.with_ram(MEM_BYTES)
    image = _image()
    memory.write(FW_GPA, image)
    boot = bytes(range(16)) * 2
    memory.write(0x7000, boot)
    # distinct VMSAs (each vCPU its own RIP), so their order shows in the digest
    states = [vmsa.x86_reset_state(CPU_SIG, cs_base=0, rip=0x7000 + 0x10 * i) for i in range(vcpus)]
    plan = measure.LaunchPlan(
        regions=(measure.MeasuredRegion(FW_GPA, image, "firmware"), measure.MeasuredRegion(0x7000, boot, "boot")),
        vcpus=measure.build_vcpu_launches(states, init2=init2, vmsa_features=features),
        policy=policy, init2=init2, vmsa_features=features, cpu_sig=CPU_SIG)
    kwargs = {"has_init2": init2, "vmsa_features": features}
    kwargs.update(model_kwargs or {})
    model = model_cls(memory, **kwargs)
    return memory, plan, model


def test_full_launch_order_digest_and_measurement() -> None:
    memory, plan, model = _setup()
    seen_states = []
    result = SevEsLaunch(model, plan).run(lambda p: seen_states.append(model.state))
    assert model.log == ["KVM_SEV_INIT2", "KVM_MEMORY_ENCRYPT_REG_REGION", "KVM_SEV_LAUNCH_START",
                         "KVM_SEV_LAUNCH_UPDATE_DATA", "KVM_SEV_LAUNCH_UPDATE_DATA", "KVM_SEV_LAUNCH_UPDATE_VMSA",
                         "KVM_SEV_LAUNCH_MEASURE", "KVM_SEV_LAUNCH_FINISH"]
    assert result.steps == ["init", "register", "launch_start", "update_data", "vcpu_state", "update_vmsa",
                            "measure", "finish"]
    assert seen_states == [SevGuestState.LUPDATE]  # vCPU state is set between UPDATE_DATA and UPDATE_VMSA
    assert model.state == SevGuestState.RUNNING
    # The digest, computed here by hand: region bytes in plan order, then each VMSA page.
    by_hand = hashlib.sha256(_image() + bytes(range(16)) * 2 + b"".join(v.vmsa for v in plan.vcpus)).digest()
    assert model.launch_digest == by_hand == result.expected_digest
    message = (bytes((4, 1, 55, 21)) + plan.policy.to_bytes(4, "little") + by_hand + result.mnonce)
    assert result.measurement == hmac.new(model.tik, message, hashlib.sha256).digest()
    assert verify_model_measurement(result, model)
    assert result.init_command == "KVM_SEV_INIT2" and result.vm_type == uapi.KVM_X86_SEV_ES_VM
    assert result.ghcb_version == 2 and len(result.mnonce) == 16
    memory.close()


def test_init2_lets_kvm_choose_the_ghcb_version_unless_asked() -> None:
    """QEMU (sev_common_kvm_init(): struct kvm_sev_init args = { 0 }) and the selftests pass ghcb_version 0;
    KVM then uses GHCB_VERSION_DEFAULT (sev.c __sev_guest_init()). The result says who chose it."""
    memory, plan, model = _setup()
    result = SevEsLaunch(model, plan).run(lambda p: None)
    assert model.requested_ghcb_version == 0
    assert (result.ghcb_version, result.ghcb_version_chosen_by) == (uapi.GHCB_VERSION_DEFAULT, "KVM")
    assert result.as_dict()["ghcb_version_chosen_by"] == "KVM"
    memory.close()
    memory, plan, model = _setup()
    result = SevEsLaunch(model, plan, ghcb_version=1).run(lambda p: None)
    assert model.requested_ghcb_version == 1 == model.ghcb_version
    assert (result.ghcb_version, result.ghcb_version_chosen_by) == (1, "request")
    memory.close()
    for bad in (0, 3):
        memory, plan, model = _setup()
        with pytest.raises(SevLaunchError, match=f"GHCB version {bad} is outside 1..2"):
            SevEsLaunch(model, plan, ghcb_version=bad)
        memory.close()


def test_legacy_es_init_cannot_offer_ghcb_version_2() -> None:
    memory, plan, model = _setup(init2=False)
    with pytest.raises(SevLaunchError, match="needs KVM_SEV_INIT2"):
        SevEsLaunch(model, plan, ghcb_version=2)
    memory.close()


def test_plan_over_live_guest_memory_still_predicts_the_plaintext_digest() -> None:
    """LAUNCH_UPDATE_DATA encrypts in place (the model scrambles): the sequencer must hash what was planned."""
    memory, plan, model = _setup()
    live = measure.LaunchPlan(
        regions=tuple(measure.MeasuredRegion(r.gpa, memory.view(r.gpa, r.size), r.name) for r in plan.regions),
        vcpus=plan.vcpus, policy=plan.policy, init2=plan.init2, vmsa_features=plan.vmsa_features,
        cpu_sig=plan.cpu_sig)
    result = SevEsLaunch(model, live).run(lambda p: None)
    assert memory.read(FW_GPA, 0x3000) != _image()  # the host no longer reads the plaintext
    assert result.expected_digest == model.launch_digest == measure.launch_digest(plan)
    memory.close()


def test_legacy_es_init_path() -> None:
    memory, plan, model = _setup(init2=False)
    result = SevEsLaunch(model, plan).run(lambda p: None)
    assert model.log[0] == "KVM_SEV_ES_INIT"
    assert result.init_command == "KVM_SEV_ES_INIT" and result.vm_type == uapi.KVM_X86_DEFAULT_VM
    assert result.ghcb_version == 1 and model.vmsa_features == 0
    assert result.ghcb_version_chosen_by == "KVM" and model.ghcb_version == 1
    assert model.launch_digest == result.expected_digest
    memory.close()
    # A pre-6.10 kernel whose ES_INIT turns DebugSwap on (kvm_amd debug_swap=Y) cannot run a plan built for 0.
    memory, plan, model = _setup(init2=False, model_kwargs={"vmsa_features": uapi.SVM_SEV_FEAT_DEBUG_SWAP})
    with pytest.raises(SevLaunchError, match="legacy KVM_SEV_ES_INIT will set VMSA features 0x20"):
        SevEsLaunch(model, plan)


@pytest.mark.parametrize("command, setup_steps", [
    ("launch_finish", ["start"]),  # FINISH needs LSECRET
    ("launch_update_data", ["start", "measure"]),  # no more data once measured
    ("launch_update_vmsa", ["start", "measure"]),
    ("launch_measure", ["start", "measure"]),  # measured twice
    ("launch_secret", ["start"]),  # SECRET needs LSECRET
    ("launch_start", ["start"]),
])
def test_model_rejects_commands_in_the_wrong_state(command: str, setup_steps: list[str]) -> None:
    memory, plan, model = _setup()
    model.init2(0, 2)
    for step in setup_steps:
        if step == "start":
            model.launch_start(plan.policy, None, None)
        else:
            model.launch_measure(48)
    args = {"launch_finish": (), "launch_update_data": (FW_GPA, 16), "launch_update_vmsa": ([bytes(4096)],),
            "launch_measure": (48,), "launch_secret": (b"h", FW_GPA, bytes(16)),
            "launch_start": (plan.policy, None, None)}[command]
    with pytest.raises(SevError) as info:
        getattr(model, command)(*args)
    assert info.value.fw_error == uapi.SEV_RET_INVALID_GUEST_STATE
    assert info.value.errno == errno.EIO
    assert "SEV_RET_INVALID_GUEST_STATE" in str(info.value) and "EIO" in str(info.value)
    memory.close()


def test_model_kernel_side_refusals() -> None:
    memory, plan, model = _setup(features=0)
    with pytest.raises(SevError) as info:
        model.launch_start(plan.policy, None, None)  # no INIT yet: KVM answers ENOTTY, no firmware call
    assert info.value.errno == errno.ENOTTY and info.value.fw_error is None
    with pytest.raises(SevError) as info:
        model.init2(uapi.SVM_SEV_FEAT_DEBUG_SWAP, 2)  # unsupported VMSA feature -> EINVAL
    assert info.value.errno == errno.EINVAL
    with pytest.raises(SevError):
        model.init2(0, 3)  # GHCB version above 2
    model.init2(0, 0)
    assert model.ghcb_version == 2  # 0 means the default
    with pytest.raises(SevError) as info:
        model.guest_status()  # no guest handle yet
    assert info.value.fw_error == uapi.SEV_RET_INVALID_GUEST
    memory.close()


def test_model_alignment_and_size_query() -> None:
    memory, plan, model = _setup()
    model.init2(0, 2)
    model.launch_start(plan.policy, None, None)
    with pytest.raises(SevError) as info:
        model.launch_update_data(FW_GPA + 8, 16)
    assert info.value.fw_error == uapi.SEV_RET_INVALID_ADDRESS
    with pytest.raises(SevError) as info:
        model.launch_update_data(FW_GPA, 24)
    assert info.value.fw_error == uapi.SEV_RET_INVALID_LEN
    with pytest.raises(SevError) as info:
        model.launch_update_data(MEM_BYTES - 16, 32)  # runs past guest RAM: the kernel cannot pin it
    assert info.value.errno == errno.EFAULT
    assert model.launch_measure(0) == (48, b"")  # the size query changes nothing
    assert model.state == SevGuestState.LUPDATE
    memory.close()


def test_out_of_order_step_aborts_and_releases_everything() -> None:
    memory, plan, model = _setup()
    launch = SevEsLaunch(model, plan)
    launch.init()
    with pytest.raises(SevLaunchError) as info:
        launch.launch_start()  # 'register' was skipped
    assert info.value.step == "launch_start" and "next step is 'register'" in str(info.value)
    assert model.released and memory.slots == []
    with pytest.raises(SevLaunchError):
        launch.register()  # nothing more after an abort


def test_memory_that_drifted_from_the_plan_fails_update_data() -> None:
    memory, plan, model = _setup()
    launch = SevEsLaunch(model, plan)
    launch.init()
    launch.register()
    launch.launch_start()
    memory.write(FW_GPA + 0x1000, b"\xff" * 16)
    with pytest.raises(SevLaunchError) as info:
        launch.update_data()
    assert info.value.step == "update_data" and "firmware" in str(info.value) and "drifted" in str(info.value)
    assert model.released and memory.slots == []
    assert "KVM_SEV_LAUNCH_UPDATE_DATA" not in model.log


class _StuckMeasureModel(SevModel):
    """A firmware whose LAUNCH_MEASURE reports success but leaves the guest in LUPDATE."""

    def launch_measure(self, length: int) -> tuple[int, bytes]:
        size, blob = super().launch_measure(length)
        self.state = SevGuestState.LUPDATE
        return size, blob


def test_guest_status_is_checked_after_each_step() -> None:
    _memory, plan, model = _setup(model_cls=_StuckMeasureModel)
    with pytest.raises(SevLaunchError) as info:
        SevEsLaunch(model, plan).run(lambda p: None)
    assert info.value.step == "measure"
    assert "reports state LUPDATE, expected LSECRET" in str(info.value)
    assert "KVM_SEV_LAUNCH_FINISH" not in model.log and model.released


def test_firmware_error_names_step_command_and_status() -> None:
    # A firmware older than the policy's minimum API, with the sequencer's own check bypassed: the model
    # fails LAUNCH_START with SEV_RET_POLICY_FAILURE and the error names everything.
    memory, plan, model = _setup()
    launch = SevEsLaunch(model, plan)
    model.platform = PlatformStatus(0, 17, 48, 1, uapi.SEV_STATUS_FLAGS_CONFIG_ES, 0)
    launch.plan = measure.LaunchPlan(plan.regions, plan.vcpus, uapi.make_policy(SevPolicy.ES, 1, 0), True, 0,
                                     CPU_SIG)
    launch.init()
    launch.register()
    with pytest.raises(SevLaunchError) as info:
        launch.launch_start()
    err = info.value
    assert err.step == "launch_start" and err.command == "KVM_SEV_LAUNCH_START"
    assert err.errno == errno.EIO and err.fw_error == uapi.SEV_RET_POLICY_FAILURE
    assert "SEV_RET_POLICY_FAILURE" in str(err) and "released" in str(err)
    assert memory.slots == []


def test_plan_must_match_the_backend() -> None:
    memory, plan, model = _setup(init2=True, model_kwargs={"has_init2": False})
    with pytest.raises(SevLaunchError) as info:
        SevEsLaunch(model, plan)
    assert info.value.step == "plan" and "init2=False" in str(info.value)
    assert memory.slots == []
    memory, plan, model = _setup(features=uapi.SVM_SEV_FEAT_DEBUG_SWAP, model_kwargs={"vmsa_features": 0})
    with pytest.raises(SevLaunchError) as info:
        SevEsLaunch(model, plan)
    assert "KVM_X86_SEV_VMSA_FEATURES" in str(info.value)


def test_policy_names_and_refusals() -> None:
    policy = build_policy(["nodbg", "NOKS"], api_major=1, api_minor=2)
    assert policy == 0x7 | 1 << 16 | 2 << 24
    assert build_policy([]) == SevPolicy.ES  # ES is always set
    with pytest.raises(VmmdError, match="unknown SEV policy flag 'DEBUG'"):
        build_policy(["DEBUG"])
    status = PlatformStatus(1, 55, 21, 1, uapi.SEV_STATUS_FLAGS_CONFIG_ES, 0)
    check_policy(policy, status)
    with pytest.raises(VmmdError, match="lacks ES"):
        check_policy(int(SevPolicy.NODBG), status)
    with pytest.raises(VmmdError, match="reserved bits 0x40"):
        check_policy(int(SevPolicy.ES) | 0x40, status)
    with pytest.raises(VmmdError, match="SEV_RET_POLICY_FAILURE"):
        check_policy(uapi.make_policy(SevPolicy.ES, 1, 56), status)
    with pytest.raises(VmmdError, match="does not support SEV-ES"):
        check_policy(int(SevPolicy.ES), PlatformStatus(1, 55, 21, 1, 0, 0))


def _owner_setup(policy: int = measure.DEFAULT_SEVES_POLICY, session_policy: int | None = None):
    """A model with a PDH key and a guest owner's session made for it (vmmd/sev/owner.py)."""
    from vmmd.sev import owner, sevcert

    pdh_cert, pdh_key = sevcert.generate(sevcert.Usage.PDH)
    made = owner.make_session(pdh_cert, policy if session_policy is None else session_policy)
    memory, plan, model = _setup(policy=policy, model_kwargs={"pdh_key": pdh_key})
    return memory, plan, model, made


def test_owner_session_measurement_and_secret() -> None:
    from vmmd.sev import owner

    memory, plan, model, made = _owner_setup()
    launch = SevEsLaunch(model, plan, dh_cert=made.godh, session=made.session)
    measurement, mnonce = launch.run_to_measure(lambda p: None)
    assert model.owner_session and model.tik == made.tik and model.tek == made.tek
    # the owner checks the measurement with the TIK it made, against the digest it predicts
    assert measure.verify(measurement + mnonce, made.tik, digest=measure.launch_digest(plan),
                          api_major=model.platform.api_major, api_minor=model.platform.api_minor,
                          build=model.platform.build, policy=plan.policy).match
    table = owner.build_secret_table([(owner.SEV_SECRET_TABLE_GUID, b"disk key")])
    header, payload = owner.build_secret(made.tek, made.tik, measurement, table)
    launch.inject(LaunchSecret(header, 0x9000, payload))
    assert memory.read(0x9000, len(table)) == table  # decrypted with the TEK into guest memory
    with pytest.raises(VmmdError, match="already injected"):
        launch.inject(LaunchSecret(header, 0x9000, payload))
    launch.finish()
    assert model.log[-2:] == ["KVM_SEV_LAUNCH_SECRET", "KVM_SEV_LAUNCH_FINISH"]
    with pytest.raises(VmmdError, match="resumed"):
        launch.inject(LaunchSecret(header, 0x9000, payload))
    memory.close()


@pytest.mark.parametrize("tamper", ["header-iv", "header-mac", "payload", "other-tik", "flags"])
def test_tampered_secret_packets_are_refused_and_the_launch_waits(tamper: str) -> None:
    from vmmd.sev import owner

    memory, plan, model, made = _owner_setup()
    launch = SevEsLaunch(model, plan, dh_cert=made.godh, session=made.session)
    measurement, _ = launch.run_to_measure(lambda p: None)
    tik = bytes(16) if tamper == "other-tik" else made.tik
    header, payload = owner.build_secret(made.tek, tik, measurement, bytes(32))
    header, payload = bytearray(header), bytearray(payload)
    if tamper == "header-iv":
        header[5] ^= 1
    elif tamper == "header-mac":
        header[40] ^= 1
    elif tamper == "payload":
        payload[0] ^= 1
    elif tamper == "flags":
        header[0] = 2
    with pytest.raises(VmmdError) as info:
        launch.inject(LaunchSecret(bytes(header), 0x9000, bytes(payload)))
    want = uapi.SEV_RET_INVALID_PARAM if tamper == "flags" else uapi.SEV_RET_BAD_MEASUREMENT
    assert info.value.fw_error == want and "unharmed" in str(info.value)
    assert memory.read(0x9000, 32) == bytes(32)  # nothing was written
    header, payload = owner.build_secret(made.tek, made.tik, measurement, b"x" * 32)  # the right packet still works
    launch.inject(LaunchSecret(header, 0x9000, payload))
    launch.finish()
    memory.close()


@pytest.mark.parametrize(("change", "fw_error"), [
    ("policy", uapi.SEV_RET_POLICY_FAILURE), ("session", uapi.SEV_RET_BAD_MEASUREMENT),
    ("other-pdh", uapi.SEV_RET_BAD_MEASUREMENT), ("short-cert", uapi.SEV_RET_INVALID_LEN),
    ("bad-cert", uapi.SEV_RET_INVALID_CERTIFICATE), ("short-session", uapi.SEV_RET_INVALID_LEN),
    ("no-session", uapi.SEV_RET_INVALID_PARAM),
])
def test_launch_start_refuses_a_session_it_cannot_unwrap(change: str, fw_error: int) -> None:
    from vmmd.sev import owner, sevcert

    policy = measure.DEFAULT_SEVES_POLICY
    memory, plan, model, made = _owner_setup(policy, session_policy=policy | 0x2 if change == "policy" else policy)
    godh, session = made.godh, bytearray(made.session)
    if change == "session":
        session[20] ^= 1
    elif change == "other-pdh":
        made = owner.make_session(sevcert.generate()[0], policy)
        godh, session = made.godh, bytearray(made.session)
    elif change == "short-cert":
        godh = godh[:-4]
    elif change == "bad-cert":
        godh = godh[:16] + (9).to_bytes(4, "little") + godh[20:]
    elif change == "short-session":
        session = session[:100]
    elif change == "no-session":
        session = bytearray()
    with pytest.raises(SevLaunchError) as info:
        SevEsLaunch(model, plan, dh_cert=godh, session=bytes(session)).run_to_measure(lambda p: None)
    assert info.value.step == "launch_start" and info.value.fw_error == fw_error
    assert model.released
    memory.close()


def test_launch_secret_shape_is_checked() -> None:
    memory, plan, model = _setup()
    with pytest.raises(SevLaunchError, match="cross a 4 KiB page"):
        SevEsLaunch(model, plan, secret=LaunchSecret(bytes(52), 0x9FF0, bytes(32)))
    memory, plan, model = _setup()
    launch = SevEsLaunch(model, plan)
    launch.run_to_measure(lambda p: None)
    for secret, match in ((LaunchSecret(bytes(52), 0x9008, bytes(16)), "not 16-byte aligned"),
                          (LaunchSecret(bytes(52), MEM_BYTES, bytes(16)), "not inside guest RAM"),
                          (LaunchSecret(bytes(40), 0x9000, bytes(16)), "header is 40 bytes")):
        with pytest.raises(VmmdError, match=match):
            launch.inject(secret)
    # the model drew its own TEK/TIK (no owner session): a packet made with any other key fails the MAC
    with pytest.raises(VmmdError, match="SEV_RET_BAD_MEASUREMENT"):
        launch.inject(LaunchSecret(bytes(52), 0x9000, bytes(16)))
    launch.finish()
    memory.close()


def test_real_backend_on_a_host_without_sev_fails_cleanly() -> None:
    """The KvmSevBackend's real ioctls on this host's KVM: a default VM has no SEV, KVM answers ENOTTY,
    and the sequencer names the step and releases the VM and its memory."""
    from vmmd.kvm import Kvm
    from vmmd.sev.launch import BackendCaps, KvmSevBackend

    kvm = Kvm()
    try:
        memory, plan, _ = _setup()
        vm = kvm.create_vm(0)
        vm.add_memory(memory)
        backend = KvmSevBackend(vm, memory, -1, BackendCaps(True, 0, None))
        with pytest.raises(SevError) as info:
            backend.guest_status()
        assert info.value.command == "KVM_SEV_GUEST_STATUS" and info.value.errno == errno.ENOTTY
        with pytest.raises(SevLaunchError) as info:
            SevEsLaunch(backend, plan).run(lambda p: None)
        assert info.value.step == "init" and info.value.command == "KVM_SEV_INIT2"
        assert info.value.errno == errno.ENOTTY and info.value.fw_error is None
        assert vm.fd == -1 and memory.slots == []
    finally:
        kvm.close()


def test_memlock_refusals_say_what_to_raise_and_by_how_much() -> None:
    """sev_pin_memory()'s ENOMEM at LAUNCH_UPDATE_DATA (no firmware status): the hint names
    RLIMIT_MEMLOCK, guest RAM plus the largest region, and CAP_IPC_LOCK. The VM stands in for a kernel
    over its memlock limit; the error mapping is what is tested."""
    from vmmd.sev.launch import MEMLOCK_HINT, BackendCaps, KvmSevBackend

    class OverMemlockVm:
        vcpus: list = []

        def memory_encrypt_op(self, cmd) -> None:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

    memory, _, _ = _setup()
    try:
        backend = KvmSevBackend(OverMemlockVm(), memory, -1, BackendCaps(True, 0, None))
        with pytest.raises(SevError) as info:
            backend.launch_update_data(FW_GPA, 0x1000)
        assert info.value.errno == errno.ENOMEM and MEMLOCK_HINT in str(info.value)
        assert "guest RAM plus the largest measured region" in MEMLOCK_HINT and "CAP_IPC_LOCK" in MEMLOCK_HINT
    finally:
        memory.close()
