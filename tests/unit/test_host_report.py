"""host_report() against what this machine really has, plus the blocker logic on hand-built reports."""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import resource
from pathlib import Path

import pytest

from vmmd.errors import VmmdError
from vmmd.sev import uapi
from vmmd.sev.host import _sev_es_blockers, format_host_report, host_cpuid, host_report
from vmmd.sev.psp import Psp, SevError


def _cpuinfo(field: str) -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return None


@pytest.fixture(scope="module")
def report() -> dict:
    return host_report(memory_bytes=256 << 20)


def test_report_is_json_and_matches_the_machine(report: dict) -> None:
    json.dumps(report)
    assert report["kernel"] == os.uname().release
    assert report["kvm"]["present"] == os.path.exists("/dev/kvm")
    assert report["sev_device"]["present"] == os.path.exists("/dev/sev")
    assert report["kvm_amd"]["loaded"] == os.path.isdir("/sys/module/kvm_amd")
    assert report["cpu"]["vendor"] == _cpuinfo("vendor_id")
    flags = (_cpuinfo("flags") or "").split()
    leaf = report["cpu"]["leaf_8000001f"]
    if "sev_es" in flags:
        assert leaf is not None and leaf["sev_es"]
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert report["memlock"]["soft"] == (None if soft == resource.RLIM_INFINITY else soft)


def test_kvm_facts_match_ioctls(report: dict) -> None:
    if not report["kvm"].get("accessible_rw"):
        pytest.skip("/dev/kvm is not usable here")
    from vmmd.kvm import Kvm
    from vmmd.kvm.ioctls import KVM_GET_API_VERSION

    kvm = Kvm()
    try:
        assert report["kvm"]["api_version"] == fcntl.ioctl(kvm.fd, KVM_GET_API_VERSION) == 12
        assert report["kvm"]["vm_types"] == kvm.check_extension(235)
        assert report["kvm"]["sev_vmsa_features"] == kvm.get_device_attr(uapi.KVM_X86_GRP_SEV,
                                                                          uapi.KVM_X86_SEV_VMSA_FEATURES)
    finally:
        kvm.close()
    assert report["platforms"]["plain"]["available"]


def test_host_cpuid_vendor_leaf() -> None:
    eax, ebx, ecx, edx = host_cpuid(0)
    assert eax >= 1
    assert (ebx.to_bytes(4, "little") + edx.to_bytes(4, "little") + ecx.to_bytes(4, "little")).decode() == \
        _cpuinfo("vendor_id")


def test_sev_es_conclusion_is_precise(report: dict) -> None:
    verdict = report["platforms"]["sev-es"]
    text = format_host_report(report)
    assert report["sev_es_available"] == verdict["available"]
    if verdict["available"]:
        assert verdict["missing"] == [] and "sev-es      available" in text
        return
    assert verdict["reason"] == verdict["missing"][0] == report["sev_es_reason"]
    assert f"sev-es      unavailable: {verdict['reason']}" in text
    if not report["cpu"].get("amd"):
        assert verdict["reason"].startswith(f"the CPU vendor is {report['cpu']['vendor']}")
    if not report["sev_device"]["present"]:
        assert any("/dev/sev does not exist" in line for line in verdict["missing"])


def _good_amd_report() -> dict:
    """A hand-built report of an EPYC host where everything is in place."""
    return {
        "kvm": {"present": True, "accessible_rw": True, "api_version": 12, "sev_es_vm_type": True},
        "cpu": {"vendor": "AuthenticAMD", "amd": True, "model_name": "AMD EPYC 7763",
                "leaf_8000001f": {"sev": True, "sev_es": True}},
        "kvm_amd": {"loaded": True, "sev": "Y", "sev_es": "Y", "kvm_modules": ["kvm", "kvm_amd"]},
        "sev_device": {"present": True, "accessible_rw": True, "mode": "crw-rw----",
                       "platform_status": {"es_supported": True}},
        "memlock": {"soft": 1 << 40, "cap_ipc_lock": False, "guest_bytes": 1 << 30,
                    "needed_bytes": (1 << 30) + (16 << 20), "sufficient": True},
    }


@pytest.mark.parametrize("change, first", [
    (lambda r: r["cpu"]["leaf_8000001f"].update(sev_es=False), "EAX[3] (SEV-ES) is clear"),
    (lambda r: r["kvm_amd"].update(loaded=False), "kvm_amd module is not loaded"),
    (lambda r: r["kvm_amd"].update(sev_es="N"), "kvm_amd parameter sev_es is 'N'"),
    (lambda r: r["sev_device"].update(present=False), "/dev/sev does not exist"),
    (lambda r: r["sev_device"].update(accessible_rw=False), "/dev/sev is not read-write accessible"),
    (lambda r: r["sev_device"]["platform_status"].update(es_supported=False), "flags bit 8 clear"),
    (lambda r: r["memlock"].update(sufficient=False, soft=65536), "RLIMIT_MEMLOCK is 65536 bytes"),
])
def test_blockers_name_the_first_missing_prerequisite(change, first: str) -> None:
    good = _good_amd_report()
    assert _sev_es_blockers(good) == []
    broken = copy.deepcopy(good)
    change(broken)
    blockers = _sev_es_blockers(broken)
    assert len(blockers) == 1 and first in blockers[0]


def test_blockers_are_ordered() -> None:
    broken = _good_amd_report()
    broken["cpu"].update(vendor="GenuineIntel", amd=False)
    broken["sev_device"].update(present=False)
    blockers = _sev_es_blockers(broken)
    assert "GenuineIntel" in blockers[0] and "/dev/sev" in blockers[1]


def test_psp_open_and_error_messages() -> None:
    if os.path.exists("/dev/sev"):
        with Psp() as psp:
            status = psp.platform_status()
        assert status.api_major >= 0
    else:
        with pytest.raises(VmmdError, match="/dev/sev does not exist.*modprobe kvm_amd sev=1 sev_es=1"):
            Psp()
    err = SevError("KVM_SEV_LAUNCH_UPDATE_DATA", errno.EIO, uapi.SEV_RET_INVALID_LEN)
    assert str(err).startswith("KVM_SEV_LAUNCH_UPDATE_DATA failed: EIO")
    assert "SEV_RET_INVALID_LEN (0x4)" in str(err) and err.fw_error_name == "SEV_RET_INVALID_LEN"
    assert "no firmware status" in str(SevError("KVM_SEV_INIT2", errno.EINVAL, None))


def test_status_struct_is_packed_12_bytes() -> None:
    import ctypes

    assert ctypes.sizeof(uapi.sev_user_data_status) == 12
    assert uapi.sev_user_data_status.build.offset == 7 and uapi.sev_user_data_status.guest_count.offset == 8


def test_memlock_counts_the_firmware_pinned_again_during_launch_update_data() -> None:
    """sev_pin_memory() adds each measured region to RAM already pinned: a limit of exactly the guest's RAM
    is not enough (checked as uid 65534, without CAP_IPC_LOCK, in a child that lowers its own soft limit)."""
    from tests.as_user import run_as_user
    from vmmd.sev.host import _memlock_facts

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another uid")
    ram = 4 << 20
    if resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] < ram:
        pytest.skip("the hard RLIMIT_MEMLOCK here is below the 4 MiB this test sets")

    def facts() -> dict:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (ram, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))
        return _memlock_facts(ram)

    got = run_as_user(65534, [], facts)
    assert got.get("cap_ipc_lock") is False, got
    assert got["needed_bytes"] == ram + (16 << 20) and got["sufficient"] is False, got
