"""Debian's kernel booted directly to userspace: on plain where the host runs guest code natively, and as an
SEV-ES guest whose launch digest `vmctl measure --kernel` predicted. Skipped elsewhere with `vmctl host`'s
reason (on hosts whose KVM emulates guest kernel code no kernel reaches userspace: docs/linux-boot.md)."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import vmctl
from tests.linux_guest import INITRAMFS, VMLINUZ, guest_code_emulated, missing
from vmmd.sev.host import host_report

MARKER = "vmmd-linux-guest: userspace reached"
APPEND = "console=ttyS0 panic=-1"



_EMULATED = guest_code_emulated()
_REPORT = host_report(memory_bytes=512 << 20)


@pytest.fixture(autouse=True)
def _linux_guest():
    if missing():
        pytest.fail(missing())


@pytest.mark.skipif(_EMULATED is not None, reason=f"guest code is not run natively here: {_EMULATED}")
@pytest.mark.timeout(300)
def test_kernel_reaches_userspace_sees_its_cpus_and_powers_off_on_plain() -> None:
    r = vmctl("run", "--kernel", str(VMLINUZ), "--initrd", str(INITRAMFS), "--append", APPEND, "-m", "512M",
              "-c", "2", "-p", "plain", "-t", "240", timeout=280)
    assert f"{MARKER}: 2 CPUs" in r.stdout, r.stdout[-3000:] + r.stderr
    assert r.returncode == 0 and "guest ended (poweroff, exit code 0)" in r.stderr


@pytest.mark.skipif(not _REPORT["sev_es_available"] or _EMULATED is not None,
                    reason=f"SEV-ES hardware not available: {_REPORT['sev_es_reason'] or _EMULATED}")
@pytest.mark.timeout(300)
def test_sev_es_kernel_reaches_userspace_with_the_predicted_digest() -> None:
    c_bit = _REPORT["cpu"]["leaf_8000001f"]["c_bit_position"]
    measured = vmctl("measure", "--kernel", str(VMLINUZ), "--initrd", str(INITRAMFS), "--append", APPEND,
                     "--memory", "512M", "--c-bit", str(c_bit), "--json")
    assert measured.returncode == 0, measured.stderr
    r = vmctl("run", "--kernel", str(VMLINUZ), "--initrd", str(INITRAMFS), "--append", APPEND, "-m", "512M",
              "-p", "sev-es", "-t", "240", timeout=280)
    digest = re.search(r"launch digest \(measured\): ([0-9a-f]{64})", r.stderr)
    assert digest and digest.group(1) == json.loads(measured.stdout)["digest"], r.stderr
    assert f"{MARKER}: 1 CPUs" in r.stdout, r.stdout[-3000:] + r.stderr
    assert "SEV-ES" in r.stdout  # the kernel's own "Memory Encryption Features active: AMD SEV SEV-ES"
    assert r.returncode == 0, r.stderr
