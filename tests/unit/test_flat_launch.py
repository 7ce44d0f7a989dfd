"""The launch digest sev-es-emu reports equals what the sev-es hardware path would measure for the same inputs."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmmd.machine.config import MachineConfig
from vmmd.machine.loader import load_flat_firmware
from vmmd.machine.machine import Machine
from vmmd.memory import GuestMemory
from vmmd.sev.launch import BackendCaps, SevEsLaunch, SevModel
from vmmd.sev.platform import LaunchInputs, SevEsEmuPlatform, adopt_capabilities, flat_image_digest, flat_launch_plan
from vmmd.sev.psp import PlatformStatus
from vmmd.sev.uapi import SEV_STATUS_FLAGS_CONFIG_ES
from vmmd.sev.vmsa import SVM_SEV_FEAT_DEBUG_SWAP, build_vmsa

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "firmware" / "build" / "hello.bin"
PLATFORM = PlatformStatus(api_major=1, api_minor=55, build=21, state=1, flags=SEV_STATUS_FLAGS_CONFIG_ES,
                          guest_count=0)


def hardware_path_digest(firmware: Path, memory_bytes: int, cpus: int, inputs: LaunchInputs) -> bytes:
    """What SevEsPlatform.launch() would hash: regions as the hardware loader lays them out, then VMSAs.

    Hashed here by hand from the guest bytes, not through measure.launch_digest()."""
    memory = GuestMemory.with_ram(memory_bytes)
    image, cr3 = load_flat_firmware(memory, firmware, "sev-es", cpus, 0, inputs.c_bit, 0)
    plan = flat_launch_plan(memory, image, cr3, cpus, inputs)
    digest = hashlib.sha256()
    for gpa, size, _ in image.measured_regions():
        digest.update(memory.read(gpa, size))
    for launch in plan.vcpus:
        digest.update(bytes(build_vmsa(launch.state, vmsa_features=inputs.vmsa_features, init2=inputs.uses_init2)))
    memory.close()
    return digest.digest()


@pytest.fixture(scope="module")
def emu_machine_digest() -> bytes:
    if not HELLO.exists():
        pytest.fail("firmware/build/hello.bin is missing: run `make -C firmware`")
    machine = Machine(MachineConfig(firmware=HELLO, memory_bytes=16 << 20, cpus=2, platform="sev-es-emu"),
                      SevEsEmuPlatform(), lambda data: None).build()
    try:
        assert machine.platform.launch_result.steps[-1] == "finish"
        return machine.platform.launch_result.expected_digest
    finally:
        machine.close()


def test_emulator_digest_equals_hardware_path(emu_machine_digest: bytes) -> None:
    assert emu_machine_digest == hardware_path_digest(HELLO, 16 << 20, 2, LaunchInputs())


def test_emulator_digest_equals_hardware_path_with_a_vcpu_area() -> None:
    machine = Machine(MachineConfig(firmware=HELLO, memory_bytes=32 << 20, cpus=40, platform="sev-es-emu"),
                      SevEsEmuPlatform(), lambda data: None).build()
    try:
        digest = machine.platform.launch_result.expected_digest
    finally:
        machine.close()
    assert digest == hardware_path_digest(HELLO, 32 << 20, 40, LaunchInputs())


def test_digest_depends_on_every_input(emu_machine_digest: bytes, tmp_path) -> None:
    changed = tmp_path / "hello-changed.bin"
    data = bytearray(HELLO.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    base = LaunchInputs()
    assert hardware_path_digest(changed, 16 << 20, 2, base) != emu_machine_digest
    assert hardware_path_digest(HELLO, 16 << 20, 1, base) != emu_machine_digest
    assert hardware_path_digest(HELLO, 16 << 20, 2, LaunchInputs(c_bit=47)) != emu_machine_digest
    assert hardware_path_digest(HELLO, 16 << 20, 2, LaunchInputs(init2=False)) != emu_machine_digest


def test_vmctl_run_reports_the_digest() -> None:
    proc = subprocess.run([sys.executable, "-m", "vmmd.cli", "run", str(HELLO), "-p", "sev-es-emu", "-m", "16M",
                           "--cpus", "2", "-t", "30"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"launch digest \(what sev-es hardware would measure: KVM_SEV_INIT2, C-bit 51\): "
                      r"([0-9a-f]{64})", proc.stderr)
    assert match
    assert bytes.fromhex(match.group(1)) == hardware_path_digest(HELLO, 16 << 20, 2, LaunchInputs())


def test_offline_digest_equals_emulator(emu_machine_digest: bytes) -> None:
    digest, plan = flat_image_digest(HELLO, 16 << 20, 2, LaunchInputs())
    assert digest == emu_machine_digest and len(plan.vcpus) == 2


def test_vmctl_measure_flat_image_matches_run() -> None:
    proc = subprocess.run([sys.executable, "-m", "vmmd.cli", "measure", str(HELLO), "--memory", "16M", "--vcpus", "2",
                           "--json"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    import json
    assert bytes.fromhex(json.loads(proc.stdout)["digest"]) == hardware_path_digest(HELLO, 16 << 20, 2,
                                                                                     LaunchInputs())


def test_default_policy_is_measures_and_quiet_runs_predict_no_digest() -> None:
    from vmmd.sev import measure

    assert LaunchInputs().policy == measure.DEFAULT_SEVES_POLICY
    platform = SevEsEmuPlatform()
    platform.predict_digest = False  # what `vmctl run -q` sets: it prints no digest
    machine = Machine(MachineConfig(firmware=HELLO, memory_bytes=16 << 20, cpus=1, platform="sev-es-emu"),
                      platform, lambda data: None).build()
    try:
        assert platform.launch_result is None and machine.launch_note is None
    finally:
        machine.close()


@pytest.mark.parametrize(("has_init2", "supported", "requested", "want_features"), [
    (True, 0x20, 0x21, 0x20),   # INIT2 (6.10+): the requested features KVM supports
    (True, 0x20, 0x0, 0x0),     # ... and none unless asked for
    (False, 0x20, 0x0, 0x20),   # ES_INIT on 6.5-6.9 with debug_swap=1 sets DebugSwap by itself
    (False, 0x0, 0x20, 0x0),    # ES_INIT otherwise sets none, whatever was asked
])
def test_host_decides_init_path_and_vmsa_features(has_init2, supported, requested, want_features) -> None:
    inputs = LaunchInputs(vmsa_features=requested)
    assert inputs.init2 is None and inputs.uses_init2  # undecided until a host is asked; predicted as INIT2
    adopt_capabilities(inputs, BackendCaps(has_init2, supported, PLATFORM))
    assert inputs.init2 is has_init2 and inputs.vmsa_features == want_features


def test_legacy_launch_with_debug_swap_runs_and_measures_what_the_plan_says() -> None:
    memory = GuestMemory.with_ram(16 << 20)
    try:
        inputs = LaunchInputs()
        adopt_capabilities(inputs, BackendCaps(False, SVM_SEV_FEAT_DEBUG_SWAP, PLATFORM))
        image, cr3 = load_flat_firmware(memory, HELLO, "sev-es", 2, 0, inputs.c_bit, 0)
        plan = flat_launch_plan(memory, image, cr3, 2, inputs)
        model = SevModel(memory, has_init2=False, vmsa_features=SVM_SEV_FEAT_DEBUG_SWAP, owns_memory=False)
        result = SevEsLaunch(model, plan).run(lambda p: None)
        assert result.init_command == "KVM_SEV_ES_INIT" and result.vmsa_features == SVM_SEV_FEAT_DEBUG_SWAP
        assert result.expected_digest == model.launch_digest
    finally:
        memory.close()
