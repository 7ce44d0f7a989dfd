"""End to end: a guest definition that boots a Linux kernel directly (kernel, initrd, append keys). The daemon
opens the kernel and initrd for the requesting user (the pinned-fd rule firmware follows) and hands both to the
worker; `vmctl show` names them; the sev-es-emu digest the daemon reports is the one `vmctl measure` predicts
from the same definition; a missing initrd or a definition giving firmware and kernel is refused with a sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import vmctl
from tests.e2e.test_daemon import Daemon, scratch_daemon
from tests.linux_guest import INITRAMFS, VMLINUZ, missing

pytestmark = pytest.mark.timeout(120)
APPEND = "console=ttyS0 panic=-1"


@pytest.fixture(scope="module")
def daemon():
    if missing():
        pytest.fail(missing())
    with scratch_daemon("vmmd-e2e-linux-") as d:
        yield d


def define(daemon: Daemon, name: str, **keys: object) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in {"memory": "256M", "platform": "sev-es-emu", "timeout": 3,
                                                    **keys}.items()]
    path = daemon.defs / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_kernel_definition_starts_shows_its_files_and_reports_the_predicted_digest(daemon) -> None:
    path = define(daemon, "linux", kernel=str(VMLINUZ), initrd=str(INITRAMFS), append=APPEND)
    measured = vmctl("measure", str(path), "--json")
    assert measured.returncode == 0, measured.stderr
    predicted = json.loads(measured.stdout)
    assert predicted["assumed"]["cmdline"] == APPEND
    started = daemon.vmctl("start", "linux")
    assert started.returncode == 0, started.stderr
    shown = daemon.wait_state("linux", ("running", "stopped", "failed"))
    assert shown["state"] in ("running", "stopped"), shown
    assert shown["launch_digest"] == predicted["digest"]
    text = daemon.vmctl("show", "linux").stdout.decode()
    for line in ("kernel", str(VMLINUZ), str(INITRAMFS), APPEND):
        assert line in text, text
    ended = daemon.wait_state("linux", ("stopped", "failed"), timeout=30)
    assert ended["state"] == "stopped" and ended["end"]["kind"] == "timeout", ended


def test_a_missing_initrd_is_refused_naming_the_key(daemon, tmp_path: Path) -> None:
    define(daemon, "noinitrd", kernel=str(VMLINUZ), initrd=str(tmp_path / "gone.gz"))
    r = daemon.vmctl("start", "noinitrd")
    assert r.returncode == 3, r.stderr
    assert "key 'initrd'" in r.stderr.decode() and "gone.gz" in r.stderr.decode()


def test_firmware_and_kernel_together_are_refused(daemon) -> None:
    path = define(daemon, "both", kernel=str(VMLINUZ), firmware=str(VMLINUZ))
    r = vmctl("measure", str(path))
    assert r.returncode == 3 and "not both" in r.stderr, r.stderr
