"""Serial console input: piped with --stdin-console, and interactive on a terminal with the Ctrl-] escape."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

from tests.e2e.conftest import REPO, guest, vmctl
from vmmd.errors import ExitCode

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("platform", ["plain", "sev-es-emu"])
def test_piped_input_reaches_the_guest(platform: str) -> None:
    r = vmctl("run", guest("echo"), "-p", platform, "--stdin-console", "-t", "30", input=b"abc\nq")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    assert "abc\n" in r.stdout and "echo: bye" in r.stdout


def _read_until(fd: int, needle: bytes, timeout: float = 30) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {needle!r}; the terminal shows {seen!r}")
        seen += os.read(fd, 4096)
    return seen


def test_terminal_keys_echo_at_once_and_ctrl_bracket_detaches() -> None:
    """On a terminal: keys reach the guest unechoed, its output shows without waiting for a newline,
    Ctrl-] stops the VM and the terminal mode is restored."""
    controller, device = pty.openpty()
    before = termios.tcgetattr(device)
    proc = subprocess.Popen([sys.executable, "-m", "vmmd.cli", "run", guest("echo"), "-p", "plain", "-t", "30"],
                            stdin=device, stdout=device, stderr=device, cwd=REPO)
    try:
        _read_until(controller, b"echo: type")
        assert not termios.tcgetattr(device)[3] & termios.ECHO
        os.write(controller, b"xyz")
        assert b"xyz" in _read_until(controller, b"xyz")  # the guest's echo, unbuffered (no newline yet)
        os.write(controller, b"\x1d")
        assert proc.wait(timeout=20) == ExitCode.INTERRUPTED
        shown = _read_until(controller, b"Ctrl-] pressed; VM stopped")
        # the guest's last line had no newline: the end line starts on a line of its own, and every "\n" the
        # guest or vmctl wrote reached the terminal as "\r\n" (output processing stays on)
        assert b"\r\nvmctl: guest ended (interrupted, exit code 130)" in shown, shown
        assert b"\n" not in shown.replace(b"\r\n", b""), shown
        assert termios.tcgetattr(device) == before
    finally:
        proc.kill()
        os.close(controller)
        os.close(device)
