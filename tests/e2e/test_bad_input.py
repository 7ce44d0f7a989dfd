"""Bad input to `vmctl run` gets one clear error line and a documented exit code, nothing else."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import guest, vmctl
from vmmd.errors import ExitCode

pytestmark = pytest.mark.timeout(60)


def _one_error(r) -> str:
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_firmware(tmp_path) -> None:
    r = vmctl("run", str(tmp_path / "nope.bin"))
    assert r.returncode == ExitCode.HOST_ERROR
    assert "does not exist" in _one_error(r)


def test_empty_firmware(tmp_path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    r = vmctl("run", str(path), "-p", "plain")
    assert r.returncode == ExitCode.HOST_ERROR
    assert "is empty" in _one_error(r)


def test_firmware_larger_than_ram(tmp_path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x90" * (3 << 20))
    r = vmctl("run", str(path), "-p", "plain", "-m", "2M")
    assert r.returncode == ExitCode.HOST_ERROR
    assert "give the guest more memory" in _one_error(r)


@pytest.mark.parametrize("size,words", [("1000", "multiple of 4 KiB"), ("1M", "too small"),
                                        ("lots", "is not a size")])
def test_bad_memory_sizes(size: str, words: str) -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "-m", size)
    assert r.returncode == ExitCode.HOST_ERROR
    assert words in _one_error(r)


def test_unknown_platform_is_a_usage_error() -> None:
    r = vmctl("run", guest("hello"), "-p", "sev-snp")
    assert r.returncode == ExitCode.USAGE
    assert "sev-snp" in r.stderr and "Traceback" not in r.stderr


def test_sev_es_without_hardware_fails_before_creating_anything() -> None:
    from vmmd.machine.platform import sev_es_unavailable_reason

    reason = sev_es_unavailable_reason()
    if reason is None:
        pytest.skip("this host has SEV-ES")
    r = vmctl("run", guest("hello"), "-p", "sev-es")
    assert r.returncode == ExitCode.HOST_ERROR
    line = _one_error(r)
    assert "sev-es is not available on this host" in line and reason in line and "vmctl host" in line


@pytest.mark.parametrize("cpus", ["0", "17"])
def test_bad_cpu_count(cpus: str) -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "--cpus", cpus)
    assert r.returncode == ExitCode.HOST_ERROR
    assert "cpus must be" in _one_error(r)


def test_bad_timeout() -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "-t", "-1")
    assert r.returncode == ExitCode.HOST_ERROR
    assert "timeout must be" in _one_error(r)
