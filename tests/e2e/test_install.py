"""`make install` into a scratch prefix: what it installs runs, and an existing definition is never overwritten."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.timeout(300)


def test_make_install_gives_working_commands_and_keeps_user_files(tmp_path: Path) -> None:
    prefix, etc = tmp_path / "usr", tmp_path / "etc"
    make = ["make", "-s", "install", f"PREFIX={prefix}", f"SYSCONFDIR={etc}"]
    first = subprocess.run(make, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert first.returncode == 0, first.stderr
    demo = etc / "vmmd" / "vms" / "demo.toml"
    assert f'firmware = "{prefix}/share/vmmd/demo.bin"' in demo.read_text()
    unit = (prefix / "lib" / "systemd" / "system" / "vmmd.service").read_text()
    assert f"ExecStart={prefix}/bin/vmmd " in unit
    run = subprocess.run([prefix / "bin" / "vmctl", "run", prefix / "share" / "vmmd" / "hello.bin", "-p", "plain",
                          "-t", "20"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0 and "Hello from a vmmd guest" in run.stdout, run.stderr
    measured = subprocess.run([prefix / "bin" / "vmctl", "measure", demo], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
    assert measured.returncode == 0 and "demo.bin" in measured.stdout, measured.stderr
    assert subprocess.run([prefix / "bin" / "vmmd", "--version"], capture_output=True, timeout=30).returncode == 0

    demo.write_text(demo.read_text() + "# my change\n")  # the user's own edit survives a second install
    again = subprocess.run(make, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert again.returncode == 0 and "kept the existing" in again.stdout, again.stdout + again.stderr
    assert demo.read_text().endswith("# my change\n")
