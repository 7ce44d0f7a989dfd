"""The suite's skip rule (tests/conftest.py): under VMMD_STRICT_SKIPS=1 only hardware tests may skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SAMPLE = '''
import pytest

def test_tool_missing():
    pytest.skip("some-tool not installed")

@pytest.mark.hw
def test_no_sev_here():
    pytest.skip("no SEV-ES hardware")

def test_passes():
    pass
'''


def _run(tmp_path: Path, strict: bool) -> str:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "hw").mkdir()
    (tmp_path / "hw" / "test_in_hw_dir.py").write_text("import pytest\n\ndef test_x():\n    pytest.skip('no SEV')\n")
    env = {**os.environ, "VMMD_STRICT_SKIPS": "1" if strict else "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "markers=hw: hw",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    return proc.stdout


def test_a_setup_skip_fails_under_make_test(tmp_path: Path) -> None:
    out = _run(tmp_path, strict=True)
    assert "1 failed, 1 passed, 2 skipped" in out, out
    assert "some-tool not installed" in out and "fix the set-up" in out


def test_skips_are_skips_outside_make_test(tmp_path: Path) -> None:
    out = _run(tmp_path, strict=False)
    assert "1 passed, 3 skipped" in out, out
