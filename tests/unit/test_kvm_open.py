"""Opening /dev/kvm: each way it can fail gets a message that says what to do."""

from __future__ import annotations

import os

import pytest

from tests.as_user import run_as_user
from vmmd.errors import VmmdError
from vmmd.kvm import Kvm


def test_missing_device_says_load_the_module(tmp_path) -> None:
    with pytest.raises(VmmdError) as err:
        Kvm(str(tmp_path / "kvm"))
    assert "does not exist" in str(err.value) and "modprobe kvm_amd or kvm_intel" in str(err.value)


def test_not_a_kvm_device(tmp_path) -> None:
    with pytest.raises(VmmdError) as err:
        Kvm("/dev/null")
    assert "not a KVM device" in str(err.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_no_permission_says_which_group() -> None:
    """Run as uid 65534 in a forked child: /dev/kvm (mode 0600 or 0660 root:kvm) is not accessible."""
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is world-accessible here")

    def open_kvm() -> dict:
        try:
            Kvm()
            return {"message": "opened"}
        except VmmdError as err:
            return {"message": str(err)}

    result = run_as_user(65534, [], open_kvm)
    text = result.get("message") or str(result)
    assert "is not accessible to this user" in text, text
    st = os.stat("/dev/kvm")
    if st.st_gid != 0 and st.st_mode & 0o060 == 0o060:  # a group may open it: the hint names that group
        assert "usermod -aG" in text, text
    else:  # only root may: the hint says so instead of suggesting a group that would not help
        assert "only root may open it" in text and "udev" in text, text
