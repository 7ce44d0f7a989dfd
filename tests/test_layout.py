"""Every ctypes struct, field offset and constant vmmd mirrors equals the installed C headers'."""

from __future__ import annotations

import ctypes
import importlib
import shutil

import pytest

from tests.layout_check import check_module

MODULES = ["vmmd.kvm.uapi", "vmmd.kvm.ioctls", "vmmd.sev.uapi", "vmmd.machine.bootinfo", "vmmd.machine.bootparam"]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to compile the layout probe")


@pytest.mark.parametrize("module_name", MODULES)
def test_module_matches_headers(module_name: str) -> None:
    module = importlib.import_module(module_name)
    report = check_module(module)
    assert not report.mismatches, "\n".join(report.mismatches)
    assert report.compared > 0
    if report.unavailable:
        print(f"{module_name}: not in the installed headers, not checked: {', '.join(report.unavailable)}")


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
