"""Image locking interoperates with QEMU (block/file-posix.c): QEMU cannot write an image vmmd holds, vmmd
refuses an image QEMU holds, and readers share with readers on both sides. Needs qemu-io (Debian
qemu-utils, which `make deps` installs)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from vmmd.block.image import DiskSpec, open_disk
from vmmd.errors import VmmdError

QEMU_IO = shutil.which("qemu-io")
pytestmark = [pytest.mark.skipif(QEMU_IO is None, reason="qemu-io (package qemu-utils) is not installed"),
              pytest.mark.timeout(60)]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


def qemu_io(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IO, "-f", "raw", *args], capture_output=True, text=True, timeout=30)


def test_qemu_cannot_open_an_image_vmmd_writes(image):
    disk = open_disk(DiskSpec(str(image)))
    try:
        w = qemu_io("-c", "write -P 0x55 0 512", str(image))
        assert w.returncode != 0 and 'Failed to get "write" lock' in w.stdout + w.stderr, w
        # qemu-io -r wants only CONSISTENT_READ and shares everything with the writer: QEMU lets it read
        r = qemu_io("-r", "-c", "read 0 512", str(image))
        assert r.returncode == 0, r
    finally:
        disk.close()
    assert image.read_bytes() == bytes(1 << 20)  # QEMU wrote nothing
    assert qemu_io("-c", "write -P 0x55 0 512", str(image)).returncode == 0  # the lock went with vmmd's fd


def test_vmmd_refuses_an_image_qemu_holds(image):
    holder = subprocess.Popen([QEMU_IO, "-f", "raw", str(image)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:  # qemu-io takes its locks when it has opened the image, before its first prompt
            try:
                open_disk(DiskSpec(str(image), read_only=True)).close()
            except VmmdError as err:
                assert "in use" in str(err)
                break
            assert holder.poll() is None and time.monotonic() < deadline, "qemu-io did not lock the image"
            time.sleep(0.05)
        with pytest.raises(VmmdError, match="is in use by another guest or program"):
            open_disk(DiskSpec(str(image)))
    finally:
        holder.communicate("quit\n", timeout=20)
    open_disk(DiskSpec(str(image))).close()


def test_readers_share_across_vmmd_and_qemu(image):
    disk = open_disk(DiskSpec(str(image), read_only=True))
    try:
        r = qemu_io("-r", "-c", "read 0 512", str(image))
        assert r.returncode == 0, r
    finally:
        disk.close()
