"""The SEV-ES direct Linux boot (docs/linux-boot.md): what its launch measures, checked like the flat image's
(tests/unit/test_flat_launch.py): the digest the sev-es-emu platform reports from the software PSP (SevModel)
equals the one computed here by hand from the files, equals `vmctl measure --kernel`'s, and changes with every
input the guest owner must be able to pin down."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.linux_guest import INITRAMFS, VMLINUZ, missing
from tests.unit.test_linux_boot import bzimage
from vmmd.errors import VmmdError
from vmmd.machine import bootparam as bp
from vmmd.machine import layout as L
from vmmd.machine import linux as lx
from vmmd.machine.config import MachineConfig
from vmmd.machine.machine import Machine
from vmmd.memory import GuestMemory
from vmmd.sev.platform import LINUX_APS_REFUSED, LaunchInputs, SevEsEmuPlatform, linux_digest
from vmmd.sev.vmsa import build_vmsa

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def _pad16(data: bytes) -> bytes:
    return data + bytes(-len(data) % 16)


def by_hand_digest(kernel: Path, initrd: Path | None, cmdline: bytes, memory_bytes: int,
                   inputs: LaunchInputs) -> bytes:
    """SHA-256 over the launch's LAUNCH_UPDATE_DATA regions in GPA order, then the VMSA: the kernel, initrd and
    command line taken from the files and the text, not from guest memory; the tables the loader made (zero page,
    GDT, page tables, MP and ACPI tables) read back from a loaded guest."""
    memory = GuestMemory.with_ram(memory_bytes)
    try:
        image, cr3 = lx.load_linux(memory, kernel, initrd, cmdline.decode(), 1, inputs.c_bit)
        data = kernel.read_bytes()
        setup_sects = data[bp.SETUP_HEADER_OFFSET] or 4
        digest = hashlib.sha256()
        digest.update(memory.read(lx.ZERO_PAGE_GPA, 4096))
        digest.update(memory.read(lx.GDT_GPA, 4096))
        digest.update(memory.read(L.PML4_GPA, image.page_tables_end - L.PML4_GPA))
        digest.update(_pad16(cmdline + b"\0"))
        digest.update(memory.read(0x9C000, 0x4000))  # MP table
        digest.update(memory.read(0xE0000, image.acpi_size))  # ACPI tables
        digest.update(_pad16(data[(setup_sects + 1) * 512:]))
        if initrd is not None:
            digest.update(_pad16(initrd.read_bytes()))
        from vmmd.sev.platform import linux_entry_state

        state = linux_entry_state(image, cr3)
        assert state.cr3 == L.PML4_GPA | 1 << inputs.c_bit and state.rip == image.entry_gpa
        assert state.rsi == lx.ZERO_PAGE_GPA
        assert memory.read_u64(L.PML4_GPA) & 1 << inputs.c_bit  # the initial page tables map memory encrypted
        digest.update(bytes(build_vmsa(state, vmsa_features=inputs.vmsa_features, init2=inputs.uses_init2)))
        return digest.digest()
    finally:
        memory.close()


@pytest.fixture(scope="module")
def small_kernel(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("linux")
    kernel, initrd = root / "bzImage", root / "initrd"
    kernel.write_bytes(bzimage(payload=bytes(range(256)) * 100 + b"tail"))
    initrd.write_bytes(b"initrd bytes " * 999)
    return kernel, initrd


def _config(kernel: Path, initrd: Path | None, append: str | None = "console=ttyS0 quiet",
            memory_bytes: int = 64 * MIB, cpus: int = 1, net: str | None = None) -> MachineConfig:
    return MachineConfig(firmware=None, kernel=kernel, initrd=initrd, append=append, memory_bytes=memory_bytes,
                         cpus=cpus, platform="sev-es-emu", net=net)


def _emulated_digest(config: MachineConfig) -> bytes:
    machine = Machine(config, SevEsEmuPlatform(), lambda data: None).build()
    try:
        result = machine.platform.launch_result
        assert result.steps[-1] == "finish"
        return result.expected_digest
    finally:
        machine.close()


def test_emulated_launch_offline_prediction_and_hand_computation_agree(small_kernel) -> None:
    kernel, initrd = small_kernel
    config = _config(kernel, initrd)
    emulated = _emulated_digest(config)
    offline, plan = linux_digest(config, LaunchInputs())
    assert emulated == offline == by_hand_digest(kernel, initrd, b"console=ttyS0 quiet", 64 * MIB, LaunchInputs())
    assert [r.name for r in plan.regions][-2:] == ["kernel bzImage", "initrd initrd"] and len(plan.vcpus) == 1


def test_digest_depends_on_every_input(small_kernel, tmp_path: Path) -> None:
    kernel, initrd = small_kernel
    base = linux_digest(_config(kernel, initrd), LaunchInputs())[0]
    changed_kernel = tmp_path / "bzImage"
    data = bytearray(kernel.read_bytes())
    data[-1] ^= 1
    changed_kernel.write_bytes(bytes(data))
    changed_initrd = tmp_path / "initrd"
    changed_initrd.write_bytes(initrd.read_bytes()[:-1] + b"!")
    variants = [
        linux_digest(_config(changed_kernel, initrd), LaunchInputs()),
        linux_digest(_config(kernel, changed_initrd), LaunchInputs()),
        linux_digest(_config(kernel, None), LaunchInputs()),
        linux_digest(_config(kernel, initrd, append="console=ttyS0 quiet single"), LaunchInputs()),
        linux_digest(_config(kernel, initrd, memory_bytes=96 * MIB), LaunchInputs()),  # e820, initrd place
        linux_digest(_config(kernel, initrd, net="tap"), LaunchInputs()),  # ACPI DSDT and virtio_mmio.device=
        linux_digest(_config(kernel, initrd), LaunchInputs(c_bit=47)),
        linux_digest(_config(kernel, initrd), LaunchInputs(init2=False)),
        linux_digest(_config(kernel, initrd), LaunchInputs(policy=0x7)),
    ]
    digests = [digest for digest, _plan in variants[:-1]]
    assert base not in digests and len(set(digests)) == len(digests)
    assert variants[-1][1].policy == 0x7  # the policy goes into LAUNCH_START and the measurement, not the digest


def test_a_direct_boot_with_more_than_one_vcpu_is_refused_with_the_reason(small_kernel) -> None:
    kernel, initrd = small_kernel
    with pytest.raises(VmmdError, match="AP jump table"):
        linux_digest(_config(kernel, initrd, cpus=2), LaunchInputs())
    assert "one vCPU" in LINUX_APS_REFUSED


def test_sev_es_emu_runs_a_two_vcpu_kernel_but_reports_no_digest_and_says_why(small_kernel) -> None:
    kernel, initrd = small_kernel
    machine = Machine(_config(kernel, initrd, cpus=2), SevEsEmuPlatform(), lambda data: None).build()
    try:
        assert machine.platform.launch_result is None
        assert "AP jump table" in machine.launch_note and len(machine.vcpus) == 2
        assert any("rep vmmcall" in note for note in machine.notes)  # and why Linux runs as on plain
    finally:
        machine.close()


def _vmctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmd.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_vmctl_measure_kernel_predicts_what_vmctl_run_reports_for_debians_kernel() -> None:
    assert not missing(), missing()
    common = ["--initrd", str(INITRAMFS), "--append", "console=ttyS0 panic=-1"]
    measured = _vmctl("measure", "--kernel", str(VMLINUZ), *common, "--memory", "256M", "--json")
    assert measured.returncode == 0, measured.stderr
    result = json.loads(measured.stdout)
    assert result["assumed"]["cmdline"] == "console=ttyS0 panic=-1"
    ran = _vmctl("run", "--kernel", str(VMLINUZ), *common, "-m", "256M", "-p", "sev-es-emu", "-t", "1")
    match = re.search(r"launch digest \(what sev-es hardware would measure: KVM_SEV_INIT2, C-bit 51\): "
                      r"([0-9a-f]{64})", ran.stderr)
    assert match, ran.stderr
    assert match.group(1) == result["digest"]
    assert match.group(1) == by_hand_digest(VMLINUZ, INITRAMFS, b"console=ttyS0 panic=-1", 256 * MIB,
                                            LaunchInputs()).hex()
    assert "rep vmmcall" in ran.stderr  # the run says the kernel itself runs as on plain


def test_vmctl_measure_kernel_reads_like_the_rest(small_kernel) -> None:
    kernel, initrd = small_kernel
    out = _vmctl("measure", "--kernel", str(kernel), "--initrd", str(initrd), "--append", "ro quiet")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^launch digest: [0-9a-f]{64}$", out.stdout, re.M)
    assert re.search(r"^command line:  ro quiet$", out.stdout, re.M)
    for name in ("zero page (boot_params)", "page tables", "ACPI tables", "kernel bzImage", "initrd initrd"):
        assert name in out.stdout
    refused = _vmctl("measure", "--kernel", str(kernel), "--vcpus", "2")
    assert refused.returncode == 3 and "AP jump table" in refused.stderr and "Traceback" not in refused.stderr
    both = _vmctl("measure", str(kernel), "--kernel", str(kernel))
    assert both.returncode == 2 and "only one" in both.stderr


def test_vmctl_verify_kernel_accepts_the_measurement_of_its_digest_and_refuses_another(small_kernel,
                                                                                       tmp_path: Path) -> None:
    from vmmd.sev import measure

    kernel, initrd = small_kernel
    tik = tmp_path / "tik.bin"
    tik.write_bytes(bytes(range(16)))
    digest, plan = linux_digest(_config(kernel, initrd, append=None), LaunchInputs())
    mnonce = bytes(range(100, 116))
    blob = measure.expected_measurement(digest, tik.read_bytes(), 1, 55, 21, plan.policy, mnonce) + mnonce
    args = ["--kernel", str(kernel), "--initrd", str(initrd), "--tik", str(tik), "--api-version", "1.55",
            "--build", "21"]
    ok = _vmctl("verify", *args, "--measurement", blob.hex())
    assert ok.returncode == 0 and ok.stdout.startswith("match: "), ok.stdout + ok.stderr
    other = _vmctl("verify", *args, "--append", "console=ttyS0 single", "--measurement", blob.hex())
    assert other.returncode == 1 and "MISMATCH" in other.stdout
    assert "command line:  console=ttyS0 single" in other.stdout
