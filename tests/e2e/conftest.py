"""Shared fixtures for end-to-end tests: real guests on real KVM, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware" / "build"


def have_kvm() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    return None


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str


def vmctl(*args: str, timeout: float = 60, input: bytes | None = None) -> RunResult:  # noqa: A002
    """`vmctl ARGS...` in a fresh process, exactly as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "vmmd.cli", *args], capture_output=True, timeout=timeout,
                          input=input, cwd=REPO)
    return RunResult(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def guest(name: str) -> str:
    path = FIRMWARE / f"{name}.bin"
    if not path.exists():
        pytest.fail(f"{path} is missing: build the firmware with `make -C firmware` (make test does)")
    return str(path)


@pytest.fixture(autouse=True)
def _needs_kvm():
    reason = have_kvm()
    if reason:
        pytest.skip(reason)
