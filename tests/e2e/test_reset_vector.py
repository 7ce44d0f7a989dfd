"""Reset-vector firmware (OVMF-style images ending at 4 GiB) through `vmctl run`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import guest, vmctl
from vmmd.errors import ExitCode

pytestmark = pytest.mark.timeout(120)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")


def tiny_reset_vector_image(path: Path) -> Path:
    """4 KiB of 16-bit code at 0xFFFFF000 and a jump at the reset vector 0xFFFFFFF0 (hand-assembled):
    print 'R' and a newline on COM1, then write 0 to the debug-exit port."""
    code = bytes([
        0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
        0xB0, ord("R"),    # mov al, 'R'
        0xEE,              # out dx, al
        0xB0, 0x0A,        # mov al, '\n'
        0xEE,              # out dx, al
        0xBA, 0x01, 0x05,  # mov dx, 0x501
        0xB0, 0x00,        # mov al, 0
        0xEE,              # out dx, al
        0xF4,              # hlt
    ])
    image = bytearray(b"\xF4" * 4096)
    image[:len(code)] = code
    # CS base 0xFFFF0000, IP 0xFFF0 -> 0xFFFFFFF0: jmp near to IP 0xF000 (rel16 = 0xF000 - 0xFFF3)
    image[0xFF0:0xFF3] = bytes([0xE9]) + ((0xF000 - 0xFFF3) & 0xFFFF).to_bytes(2, "little")
    path.write_bytes(bytes(image))
    return path


@pytest.mark.parametrize("platform", ["plain", "sev-es-emu"])
def test_tiny_reset_vector_image_runs_from_the_reset_state(tmp_path, platform: str) -> None:
    image = tiny_reset_vector_image(tmp_path / "reset.bin")
    r = vmctl("run", str(image), "--firmware-type", "reset-vector", "-p", platform, "-t", "30")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    assert r.stdout == "R\n"
    if platform == "sev-es-emu":  # no SEV-ES reset block: launchable only as a plain image
        assert "no launch digest: not an SEV-ES launchable image" in r.stderr


def test_reset_vector_needs_whole_pages(tmp_path) -> None:
    image = tmp_path / "odd.bin"
    image.write_bytes(b"\x90" * 1000)
    r = vmctl("run", str(image), "--firmware-type", "reset-vector", "-p", "plain")
    assert r.returncode == ExitCode.HOST_ERROR and "not a multiple of 4 KiB" in r.stderr


@pytest.mark.parametrize("cpu_type", [None, "EPYC-Milan"])
def test_ovmf_is_detected_and_its_emulated_digest_matches_vmctl_measure(cpu_type: str | None) -> None:
    """OVMF is recognised by its footer table, mapped below 4 GiB and started; the launch digest sev-es-emu
    reports names the CPU type it assumes and equals `vmctl measure` for the same type (EPYC-v4 by default
    for both). (This host's instruction emulator stops OVMF early, e.g. at x87 FNINIT: the run must still end
    with a reason, never a traceback.)"""
    extra = ["--cpu-type", cpu_type] if cpu_type else []
    r = vmctl("run", str(OVMF_CODE), "-p", "sev-es-emu", "-m", "256M", "-t", "3", *extra)
    assert "Traceback" not in r.stderr
    assert r.returncode in (ExitCode.TIMEOUT, ExitCode.GUEST_CRASH), r.stderr
    assert "guest ended" in r.stderr
    digest = re.search(r"launch digest \(what sev-es hardware would measure: .*, CPU ([^:]+): family .*\): "
                       r"([0-9a-f]{64})", r.stderr)
    assert digest, r.stderr
    assert digest.group(1) == (cpu_type or "EPYC-v4")
    m = vmctl("measure", str(OVMF_CODE), "--vcpus", "1", *extra, "--json")
    assert m.returncode == 0, m.stderr
    assert json.loads(m.stdout)["digest"] == digest.group(2)


def test_cpu_type_is_refused_where_it_means_nothing() -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "--cpu-type", "EPYC")
    assert r.returncode == ExitCode.HOST_ERROR and "applies to sev-es-emu's predicted digest only" in r.stderr
    r = vmctl("run", str(OVMF_CODE), "-p", "sev-es-emu", "-t", "3", "--cpu-type", "Pentium")
    assert r.returncode == ExitCode.HOST_ERROR and "unknown vCPU type 'Pentium'" in r.stderr
