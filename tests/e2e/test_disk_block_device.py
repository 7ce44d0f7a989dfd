"""A disk backed by a block device (a loop device over a scratch file): its size from BLKGETSIZE64, the blk guest
writes and verifies it, and a user without permission on the device node gets a sentence. Needs root and
/dev/loop-control (util-linux losetup)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from tests.as_user import run_as_user
from tests.e2e.conftest import guest, vmctl
from tests.e2e.test_disk import pattern
from vmmd.block.image import DiskSpec, open_disk
from vmmd.errors import ExitCode, VmmdError

LOSETUP = shutil.which("losetup")
DEVICE_BYTES = 256 << 10
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.hw,  # a loop device is what the host may lack (containers without /dev/loop-control)
              pytest.mark.skipif(os.geteuid() != 0 or LOSETUP is None or not os.path.exists("/dev/loop-control"),
                                 reason="needs root, losetup and /dev/loop-control for a loop device")]


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(DEVICE_BYTES))
    dev = subprocess.run([LOSETUP, "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    node = dev.stdout.strip()
    try:
        yield node, backing
    finally:
        subprocess.run([LOSETUP, "-d", node], check=False)


def test_blk_guest_on_a_loop_device(loop_device):
    node, backing = loop_device
    disk = open_disk(DiskSpec(node))
    try:
        assert disk.block_device and disk.size == DEVICE_BYTES
    finally:
        disk.close()
    r = vmctl("run", guest("blk"), "-p", "plain", "--disk", node, "-t", "90", timeout=100)
    assert r.returncode == ExitCode.SUCCESS, r.stdout + r.stderr
    assert f"blk: verified {DEVICE_BYTES} bytes" in r.stdout
    assert np.array_equal(np.fromfile(backing, dtype="<u8"), pattern(DEVICE_BYTES))


def test_device_without_permission_is_a_sentence(loop_device):
    node, _backing = loop_device
    os.chmod(node, 0o600)

    def attempt() -> dict:
        try:
            open_disk(DiskSpec(node, read_only=True)).close()
            return {"result": "opened"}
        except VmmdError as err:
            return {"result": str(err), "code": int(err.exit_code)}

    got = run_as_user(65534, [65534], attempt)
    assert got["result"] == f"disk {node}: permission denied: you need to be able to read it", got
    assert got["code"] == ExitCode.HOST_ERROR
