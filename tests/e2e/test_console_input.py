"""Serial console input through `vmctl run --stdin-console`: bytes reach the guest UART on both platforms."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import guest, vmctl
from vmmd.errors import ExitCode

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("platform", ["plain", "sev-es-emu"])
def test_piped_input_reaches_the_guest(platform: str) -> None:
    r = vmctl("run", guest("echo"), "-p", platform, "--stdin-console", "-t", "30", input=b"abc\nq")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    assert "abc\n" in r.stdout and "echo: bye" in r.stdout
