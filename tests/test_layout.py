"""Every ctypes struct, field offset and constant vmmd mirrors equals the C headers', on two header sets.

The installed headers (Debian 12's linux-libc-dev, Linux 6.1) lack the KVM_SEV_INIT2 ABI, so the probe runs a
second time against a newer kernel's uapi headers, which `make uapi-headers` (part of `make test`) builds from
Debian's linux-source-6.12 into NEWER_HEADERS. Every item vmmd mirrors must be compared against at least one
header set that has it, and each module's ADDED_IN must say truly which items a header set of a given release
has: an item is missing exactly when the header set is older than the release ADDED_IN names.
"""

from __future__ import annotations

import ctypes
import importlib
import shutil
from pathlib import Path

import pytest

from tests.layout_check import LayoutReport, check_module, linux_version, release

MODULES = ["vmmd.kvm.uapi", "vmmd.kvm.ioctls", "vmmd.sev.uapi", "vmmd.machine.bootinfo", "vmmd.machine.bootparam",
           "vmmd.net.vhost_uapi", "vmmd.devices.virtio_blk",
           "vmmd.devices.uring"]
KERNEL_MODULES = [m for m in MODULES if m != "vmmd.machine.bootinfo"]  # bootinfo mirrors firmware/include
REPO = Path(__file__).resolve().parent.parent
# The Makefile's NEWER_UAPI (target uapi-headers): keep the two in step.
NEWER_HEADERS = REPO / ".cache" / "linux-uapi-6.12" / "include"
HEADER_SETS = {"installed": [], "linux-6.12": [str(NEWER_HEADERS)]}

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to compile the layout probe")


def _include_dirs(header_set: str) -> list[str]:
    dirs = HEADER_SETS[header_set]
    if dirs and not (NEWER_HEADERS / "linux" / "kvm.h").is_file():
        pytest.fail(f"{NEWER_HEADERS} is missing: run `make uapi-headers` (make test does) to fetch the newer "
                    "kernel's uapi headers this test compares against")
    return dirs


_reports: dict[tuple[str, str], LayoutReport] = {}


def _report(module_name: str, header_set: str) -> LayoutReport:
    key = (module_name, header_set)
    if key not in _reports:
        _reports[key] = check_module(importlib.import_module(module_name), include_dirs=_include_dirs(header_set))
    return _reports[key]


@pytest.mark.parametrize("header_set", HEADER_SETS)
@pytest.mark.parametrize("module_name", MODULES)
def test_module_matches_headers(module_name: str, header_set: str) -> None:
    report = _report(module_name, header_set)
    assert not report.mismatches, "\n".join(report.mismatches)
    assert report.compared > 0
    if report.unavailable:
        print(f"{module_name} ({header_set}): not in these headers, not checked: {', '.join(report.unavailable)}")


@pytest.mark.parametrize("header_set", HEADER_SETS)
@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_added_in_names_the_release_truly(module_name: str, header_set: str) -> None:
    """A header set lacks an ADDED_IN item exactly when it is older than the release ADDED_IN names."""
    module = importlib.import_module(module_name)
    version = linux_version(_include_dirs(header_set))
    report = _report(module_name, header_set)
    for name, added in getattr(module, "ADDED_IN", {}).items():
        newer = release(added) > version
        assert (name in report.missing) == newer, (
            f"{name}: ADDED_IN says Linux {added}, but the {header_set} headers (Linux {version[0]}.{version[1]}) "
            f"{'have' if name not in report.missing else 'lack'} it")
        if not newer:
            assert name in report.proven, f"{name} is in the {header_set} headers but was not compared"


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_every_item_is_proven_by_some_header_set(module_name: str) -> None:
    module = importlib.import_module(module_name)
    proven = set().union(*(_report(module_name, header_set).proven for header_set in HEADER_SETS))
    unproven = set(getattr(module, "ADDED_IN", {})) - proven
    assert not unproven, f"compared against no header set: {', '.join(sorted(unproven))}"


def test_newer_headers_have_the_init2_abi() -> None:
    """The second header set is the one that proves KVM_SEV_INIT2: it must be a kernel that has it (6.10+)."""
    assert linux_version(_include_dirs("linux-6.12")) >= (6, 10)
    proven = _report("vmmd.sev.uapi", "linux-6.12").proven | _report("vmmd.kvm.uapi", "linux-6.12").proven
    assert {"kvm_sev_init", "KVM_SEV_INIT2", "KVM_X86_SEV_ES_VM", "KVM_X86_GRP_SEV", "KVM_X86_SEV_VMSA_FEATURES",
            "KVM_CAP_VM_TYPES", "struct kvm_run.hypercall.flags"} <= proven


def test_check_detects_a_wrong_layout() -> None:
    """The comparison can fail: a kvm_regs missing rflags and a wrong constant are both reported."""
    from vmmd.kvm import uapi

    class kvm_regs(ctypes.Structure):  # noqa: N801 - the kernel's name, on purpose
        _fields_ = [(name, ctypes.c_uint64) for name in ("rax", "rbx", "rcx", "rdx")]
        _fields_ += [("rsi", ctypes.c_uint32)]

    class Broken:
        LAYOUT_HEADERS = uapi.LAYOUT_HEADERS
        LAYOUT_STRUCTS = [kvm_regs]
        LAYOUT_CONSTANTS = ["KVM_EXIT_IO"]
        KVM_EXIT_IO = 3

    report = check_module(Broken)
    text = "\n".join(report.mismatches)
    assert "sizeof struct kvm_regs: python 40 != C 144" in text
    assert "sizeof struct kvm_regs.rsi: python 4 != C 8" in text
    assert "KVM_EXIT_IO: python 3 != C 2" in text


def test_old_hypercall_layout_fails_against_newer_headers() -> None:
    """What issue 16 found: Linux 6.1's `longmode, pad` no longer compiles against 6.12's kvm_run."""

    class kvm_run_hypercall(ctypes.Structure):  # noqa: N801
        _fields_ = [("nr", ctypes.c_uint64), ("args", ctypes.c_uint64 * 6), ("ret", ctypes.c_uint64),
                    ("longmode", ctypes.c_uint32), ("pad", ctypes.c_uint32)]

    class kvm_run(ctypes.Structure):  # noqa: N801
        _fields_ = [("request_interrupt_window", ctypes.c_uint8), ("padding1", ctypes.c_uint8 * 31),
                    ("hypercall", kvm_run_hypercall)]

    class Old:
        LAYOUT_HEADERS = ["linux/kvm.h"]
        LAYOUT_STRUCTS = [kvm_run]

    with pytest.raises(AssertionError, match="no member named .pad."):
        check_module(Old, structs=[kvm_run], include_dirs=_include_dirs("linux-6.12"))
