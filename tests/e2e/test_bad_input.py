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


@pytest.mark.parametrize("command", ["run", "measure"])
def test_files_that_are_not_flat_images_are_named_for_what_they_are(tmp_path, command: str) -> None:
    elf = guest("hello").replace(".bin", ".elf")
    r = vmctl(command, elf, *(["-p", "plain", "-t", "5"] if command == "run" else []))
    assert r.returncode == ExitCode.HOST_ERROR
    assert f"is an ELF file, not a flat image: vmmd runs the flat image next to it, {guest('hello')}" in \
        _one_error(r)
    volume = bytearray(64 << 10)  # a UEFI variable store: a firmware volume header, no OVMF footer table
    volume[40:44] = b"_FVH"
    (tmp_path / "VARS.fd").write_bytes(volume)
    r = vmctl(command, str(tmp_path / "VARS.fd"), *(["-p", "plain", "-t", "5"] if command == "run" else []))
    assert r.returncode == ExitCode.HOST_ERROR and "UEFI firmware volume without OVMF's footer" in _one_error(r)
    kernel = bytearray(4096)
    kernel[0x202:0x206] = b"HdrS"
    (tmp_path / "vmlinuz").write_bytes(kernel)
    r = vmctl(command, str(tmp_path / "vmlinuz"), *(["-p", "plain", "-t", "5"] if command == "run" else []))
    assert r.returncode == ExitCode.HOST_ERROR and "a Linux kernel (bzImage): boot it with --kernel" in _one_error(r)


def test_firmware_larger_than_ram(tmp_path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"\x90" * (3 << 20))
    r = vmctl("run", str(path), "-p", "plain", "-m", "2M")
    assert r.returncode == ExitCode.HOST_ERROR
    assert "give the guest more memory" in _one_error(r)


@pytest.mark.parametrize("size,words,code", [
    ("1000", "multiple of 4 KiB", ExitCode.HOST_ERROR), ("1M", "too small", ExitCode.HOST_ERROR),
    ("99999999999G", "more than vmmd maps", ExitCode.HOST_ERROR),
    ("lots", "is not a size", ExitCode.USAGE), ("12Q", "is not a size", ExitCode.USAGE),
])
def test_bad_memory_sizes(size: str, words: str, code: ExitCode) -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "-m", size)
    assert r.returncode == code
    assert words in _one_error(r)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e308"])
def test_bad_timeouts(value: str) -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "-t", value)
    assert r.returncode == ExitCode.HOST_ERROR
    assert "timeout must be a number of seconds above 0" in _one_error(r)


@pytest.mark.parametrize("path", ["/dev/zero", "FIFO"])
def test_devices_and_fifos_are_refused_without_reading(tmp_path, path: str) -> None:
    import os

    if path == "FIFO":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    r = vmctl("run", path, "-p", "plain", "-t", "5", timeout=20)
    assert r.returncode == ExitCode.HOST_ERROR
    assert "is not a regular file" in _one_error(r)


def test_closed_stdout_is_a_usage_error() -> None:
    import subprocess
    import sys

    from tests.e2e.conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "vmmd.cli", "run", guest("hello"), "-p", "plain", "-t", "5"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=30,
                          preexec_fn=lambda: __import__("os").close(1))
    assert proc.returncode == ExitCode.USAGE and "standard output is closed" in proc.stderr, proc.stderr


def test_console_write_errors_are_reported(tmp_path) -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "-t", "5", "-q", "--console", "/dev/full")
    assert r.returncode == ExitCode.SUCCESS  # the guest ran to its end
    assert "could not write all of the guest's console output" in _one_error(r) and "No space left" in r.stderr


def test_unknown_platform_is_a_usage_error() -> None:
    r = vmctl("run", guest("hello"), "-p", "sev-snp")
    assert r.returncode == ExitCode.USAGE
    assert "sev-snp" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.hw  # meaningful only on hosts without SEV-ES
def test_sev_es_without_hardware_fails_before_creating_anything() -> None:
    from vmmd.platforms import sev_es_unavailable_reason

    reason = sev_es_unavailable_reason()
    if reason is None:
        pytest.skip("this host has SEV-ES")
    r = vmctl("run", guest("hello"), "-p", "sev-es")
    assert r.returncode == ExitCode.HOST_ERROR
    line = _one_error(r)
    assert "sev-es is not available on this host" in line and reason in line and "vmctl host" in line


@pytest.mark.parametrize("cpus", ["0", "255"])
def test_bad_cpu_count(cpus: str) -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "--cpus", cpus)
    assert r.returncode == ExitCode.HOST_ERROR
    assert "cpus must be" in _one_error(r)


def test_bad_timeout() -> None:
    r = vmctl("run", guest("hello"), "-p", "plain", "-t", "-1")
    assert r.returncode == ExitCode.HOST_ERROR
    assert "timeout must be" in _one_error(r)
