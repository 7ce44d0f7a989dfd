"""What a `vmctl run` process imports: the start path of every run stays free of code it does not use.

numpy costs ~30-90 ms to import here and the launch-plan code (vmmd.sev.measure, vmsa, launch) ~15-25 ms,
against ~60 ms for a whole plain run (scripts/bench/startup.py measures the time). The imports are read
from `python -X importtime` of a real run, so this checks what runs, not what the source says.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, guest
from vmmd.errors import ExitCode

pytestmark = pytest.mark.timeout(120)

LAUNCH_PLAN = {"vmmd.sev.measure", "vmmd.sev.vmsa", "vmmd.sev.launch"}


def imported_by_run(*args: str) -> tuple[set[str], str]:
    """(every module the run imported, its stdout)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "vmmd.cli", "run", *args, "-t", "30"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == ExitCode.SUCCESS, proc.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return modules, proc.stdout


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_plain_run_loads_no_sev_code_and_no_numpy() -> None:
    modules, out = imported_by_run(guest("demo"), "-p", "plain", "-q")
    assert "platform:  plain" in out
    assert "numpy" not in top_level(modules)
    assert not {m for m in modules if m.startswith("vmmd.sev.") and m != "vmmd.sev.ovmf"}, \
        "only the OVMF footer check (vmmd.sev.ovmf) may load on plain"


def test_quiet_emulator_run_services_the_ghcb_without_numpy_or_the_launch_plan() -> None:
    modules, out = imported_by_run(guest("demo"), "-p", "sev-es-emu", "-q")
    assert "GHCB:      protocol v2" in out and "(via GHCB CPUID)" in out  # the VMGEXIT service did run
    assert "vmmd.sev.vmgexit" in modules
    assert "numpy" not in top_level(modules)
    assert not modules & LAUNCH_PLAN, "-q prints no digest: nothing should predict one"


def test_emulator_run_that_prints_the_digest_needs_no_numpy() -> None:
    proc_modules, _ = imported_by_run(guest("demo"), "-p", "sev-es-emu")
    assert LAUNCH_PLAN <= proc_modules
    assert "numpy" not in top_level(proc_modules)
