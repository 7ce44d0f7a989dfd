"""vmmd's SEV-ES launch digest and VMSA pages against virtee/sev-snp-measure, on Debian's OVMF images.

Needs the PyPI package sev-snp-measure (its `sev-snp-measure` command) and Debian's
`ovmf` package (/usr/share/OVMF/*.fd); skips, saying which is missing, otherwise.
sev-snp-measure --mode seves prints the SEV-ES launch digest: SHA-256 over the OVMF
image then the VMSA pages (guest.py seves_calc_launch_digest()); its QEMU VMSA model
carries x87 FCW 0x37f / MXCSR 0x1f80, i.e. KVM's KVM_SEV_INIT2 path (QEMU legacy-vm-type=off),
vmmd's default. QEMU's default launch (legacy-vm-type=auto: KVM_SEV_ES_INIT) leaves the VMSA's
FPU area zero (sev.c sev_es_sync_vmsa()); sev-snp-measure does not model it, so that case is
checked against its VMSA pages with exactly those two fields cleared.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmmd.cli.measure import measure_cmd
from vmmd.sev import vmsa as V
from vmmd.sev.measure import build_ovmf_plan, launch_digest
from vmmd.sev.ovmf import SEV_ES_RESET_BLOCK_GUID, parse_footer_table

# The .venv's copy (make deps installs it) even when the .venv is not on PATH, as under `make test`.
_BESIDE = Path(sys.executable).parent / "sev-snp-measure"
TOOL = str(_BESIDE) if _BESIDE.is_file() else shutil.which("sev-snp-measure")
VCPU_COUNTS = (1, 2, 4)
CPU_TYPES = ("EPYC", "EPYC-Milan", "EPYC-Genoa")


def _images() -> list[str]:
    """Distinct OVMF images (symlinks resolved) that carry the SEV-ES reset block (VARS files do not)."""
    found: dict[str, str] = {}
    for path in sorted(glob.glob("/usr/share/OVMF/*.fd")):
        real = os.path.realpath(path)
        if real in found:
            continue
        if SEV_ES_RESET_BLOCK_GUID in parse_footer_table(Path(real).read_bytes()):
            found[real] = path
    return sorted(found)


IMAGES = _images()
pytestmark = [
    pytest.mark.skipif(TOOL is None, reason="sev-snp-measure not installed (pip install sev-snp-measure)"),
    pytest.mark.skipif(not IMAGES, reason="no SEV-capable OVMF image in /usr/share/OVMF (apt-get install ovmf)"),
]


def _tool(image: str, vcpus: int, cpu_type: str, cwd: Path | None = None, *extra: str) -> str:
    cmd = [str(TOOL), "--mode", "seves", "--vmm-type", "QEMU", "--ovmf", image, "--vcpus", str(vcpus),
           "--vcpu-type", cpu_type, "--output-format", "hex", *extra]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd, timeout=120).stdout.strip()


@pytest.mark.parametrize("cpu_type", CPU_TYPES)
@pytest.mark.parametrize("vcpus", VCPU_COUNTS)
@pytest.mark.parametrize("image", IMAGES or ["none"])
def test_launch_digest_equals_sev_snp_measure(image: str, vcpus: int, cpu_type: str) -> None:
    ours = launch_digest(build_ovmf_plan(Path(image).read_bytes(), vcpus, cpu_type))
    assert ours.hex() == _tool(image, vcpus, cpu_type)


@pytest.mark.parametrize("cpu_type", CPU_TYPES)
@pytest.mark.parametrize("image", IMAGES or ["none"])
def test_vmsa_pages_equal_sev_snp_measure_dump(image: str, cpu_type: str, tmp_path: Path) -> None:
    vcpus = 3  # BSP and two APs
    _tool(image, vcpus, cpu_type, tmp_path, "--dump-vmsa")
    plan = build_ovmf_plan(Path(image).read_bytes(), vcpus, cpu_type)
    for vcpu in plan.vcpus:
        theirs = (tmp_path / f"vmsa{vcpu.index}.bin").read_bytes()
        assert len(theirs) == V.VMSA_PAGE_SIZE
        assert vcpu.vmsa == theirs, f"vCPU {vcpu.index}: first difference at {_first_diff(vcpu.vmsa, theirs):#x}"


def _first_diff(a: bytes, b: bytes) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def test_sev_snp_measure_models_init2_not_legacy(tmp_path: Path) -> None:
    """Its seves VMSA holds FPU state, which KVM writes only on the KVM_SEV_INIT2 path."""
    image = IMAGES[0]
    _tool(image, 1, "EPYC", tmp_path, "--dump-vmsa")
    theirs = (tmp_path / "vmsa0.bin").read_bytes()
    save = V.sev_es_save_area.from_buffer_copy(theirs)
    assert (save.x87_fcw, save.mxcsr) == (V.FCW_DEFAULT, V.MXCSR_DEFAULT)
    legacy = build_ovmf_plan(Path(image).read_bytes(), 1, "EPYC", init2=False)
    assert legacy.vcpus[0].vmsa != theirs


def _without_fpu(page: bytes) -> bytes:
    """A VMSA page as KVM_SEV_ES_INIT leaves it: sev_es_sync_vmsa() skips the whole FPU block, and the only
    non-zero FPU fields of the reset state are FCW and MXCSR."""
    save = V.sev_es_save_area.from_buffer_copy(page[:ctypes.sizeof(V.sev_es_save_area)])
    save.x87_fcw, save.mxcsr = 0, 0
    return bytes(save) + page[ctypes.sizeof(save):]


@pytest.mark.parametrize("cpu_type", CPU_TYPES)
@pytest.mark.parametrize("image", IMAGES or ["none"])
def test_qemu_default_launch_equals_sev_snp_measure_without_the_fpu_block(image: str, cpu_type: str,
                                                                          tmp_path: Path) -> None:
    """`vmctl measure --qemu-legacy-vm-type auto` (QEMU's default: KVM_X86_DEFAULT_VM + KVM_SEV_ES_INIT) predicts
    sev-snp-measure's VMSAs with the FPU block KVM skips cleared, and the digest over the image and those pages."""
    vcpus = 3
    _tool(image, vcpus, cpu_type, tmp_path, "--dump-vmsa")
    theirs = [_without_fpu((tmp_path / f"vmsa{i}.bin").read_bytes()) for i in range(vcpus)]
    plan = build_ovmf_plan(Path(image).read_bytes(), vcpus, cpu_type, init2=False)
    assert [v.vmsa for v in plan.vcpus] == theirs
    digest = hashlib.sha256(Path(image).read_bytes() + b"".join(theirs)).hexdigest()
    for option in ("auto", "on"):
        res = CliRunner().invoke(measure_cmd, [image, "--vcpus", str(vcpus), "--cpu-type", cpu_type, "--json",
                                               "--qemu-legacy-vm-type", option])
        assert res.exit_code == 0, res.output
        assert f'"digest": "{digest}"' in res.output and "legacy-vm-type=auto" in res.output
    res = CliRunner().invoke(measure_cmd, [image, "--vcpus", str(vcpus), "--cpu-type", cpu_type, "--json",
                                           "--qemu-legacy-vm-type", "off"])
    assert f'"digest": "{_tool(image, vcpus, cpu_type)}"' in res.output and "legacy-vm-type=off" in res.output


def test_layout_matches_sev_snp_measure_struct() -> None:
    vmsa_mod = pytest.importorskip("sevsnpmeasure.vmsa")
    theirs = vmsa_mod.SevEsSaveArea
    ours = V.vmsa_field_offsets()
    common = [name for name, *_ in theirs._fields_ if name in ours]
    assert len(common) >= 90  # all but the renamed SSP fields and the tsc_scale/tsc_offset area
    for name in common:
        assert getattr(theirs, name).offset == ours[name], name
    assert ctypes.sizeof(theirs) == V.VMSA_PAGE_SIZE


def test_vmctl_measure_cli_equals_sev_snp_measure() -> None:
    image = IMAGES[-1]
    res = CliRunner().invoke(measure_cmd, [image, "--vcpus", "4", "--cpu-type", "EPYC-Milan", "--json"])
    assert res.exit_code == 0, res.output
    assert f'"digest": "{_tool(image, 4, "EPYC-Milan")}"' in res.output
