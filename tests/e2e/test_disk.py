"""End-to-end: the blk firmware guest on real KVM through `vmctl run --disk`, on plain and sev-es-emu.

The guest writes a pattern across the whole disk, flushes, and prints "blk: flushed" after the FLUSH status
came back; the test then SIGKILLs vmctl at once and reads the pattern back from the image: what the guest was
told is on the disk is in the file, with nothing left to do for the dead VMM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.e2e.conftest import REPO, guest, vmctl
from vmmd.block.image import DiskSpec, open_disk
from vmmd.errors import ExitCode

PLATFORMS = ["plain", "sev-es-emu"]
DISK_BYTES = 256 << 10
pytestmark = pytest.mark.timeout(120)


def pattern(size: int) -> np.ndarray:
    """firmware/guests/blk.c blk_pattern(): word at byte offset o is o * 0x9e3779b97f4a7c15 ^ "vmmdblk"."""
    offsets = np.arange(0, size, 8, dtype=np.uint64)
    return (offsets * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0x766D6D64626C6B00)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(DISK_BYTES))
    return path


@pytest.mark.parametrize("platform", PLATFORMS)
def test_write_flush_verify(platform, image):
    r = vmctl("run", guest("blk"), "-p", platform, "--disk", f"{image},serial=e2e", "-t", "90", timeout=100)
    assert r.returncode == ExitCode.SUCCESS, r.stdout + r.stderr
    assert f"blk: verified {DISK_BYTES} bytes" in r.stdout
    assert "blk: ok" in r.stdout
    assert "via GHCB MMIO events" in r.stdout if platform == "sev-es-emu" else "via MMIO" in r.stdout
    assert "blk: read 256 KiB in" in r.stdout  # the guest's own throughput report
    assert f"virtio-blk at 0xfeb02000: {image} (rw, cache=writeback, serial=e2e)" in r.stderr
    assert np.array_equal(np.fromfile(image, dtype="<u8"), pattern(DISK_BYTES))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_flushed_data_survives_sigkill(platform, cache, image):
    proc = subprocess.Popen([sys.executable, "-m", "vmmd.cli", "run", guest("blk"), "-p", platform, "--guest-arg",
                             "1", "--disk", f"{image},cache={cache}", "-t", "90"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.decode(errors="replace"))
            if line.startswith(b"blk: flushed"):
                os.kill(proc.pid, signal.SIGKILL)  # right after the guest saw FLUSH complete
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen) + stderr
    assert np.array_equal(np.fromfile(image, dtype="<u8"), pattern(DISK_BYTES)), "".join(seen)
    assert image.stat().st_size == DISK_BYTES
    # the lock went with the killed process: the image can be opened for writing again at once
    deadline = time.monotonic() + 5
    while True:
        try:
            open_disk(DiskSpec(str(image))).close()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_read_only_disk_refuses_writes_with_ioerr(platform, image):
    before = image.read_bytes()
    r = vmctl("run", guest("blk"), "-p", platform, "--guest-arg", "2", "--disk", f"{image},ro", "-t", "60")
    assert r.returncode == ExitCode.SUCCESS, r.stdout + r.stderr
    assert "(read-only)" in r.stdout
    assert "blk: write refused with VIRTIO_BLK_S_IOERR" in r.stdout
    assert "blk: read ok" in r.stdout
    assert image.read_bytes() == before


@pytest.mark.parametrize("case", ["missing", "directory", "ragged", "locked"])
def test_unusable_disks_are_exit_3_with_a_sentence(tmp_path, case):
    path = tmp_path / "img"
    holder = None
    if case == "directory":
        path.mkdir()
    elif case == "ragged":
        path.write_bytes(bytes(1000))
    elif case == "locked":
        path.write_bytes(bytes(4096))
        holder = open_disk(DiskSpec(str(path)))  # another guest holds it writable
    try:
        r = vmctl("run", guest("hello"), "-p", "plain", "--disk", str(path), "-t", "30")
    finally:
        if holder is not None:
            holder.close()
    assert r.returncode == ExitCode.HOST_ERROR, r.stderr
    assert "Traceback" not in r.stderr
    assert {"missing": "no such file", "directory": "is a directory", "ragged": "not a whole non-zero number",
            "locked": "is in use by another guest or program"}[case] in r.stderr
    assert path.exists() == (case != "missing")
    if case == "ragged":
        assert path.stat().st_size == 1000


def test_predicted_digest_measures_the_disks_in_the_boot_info_page(image):
    """On sev-es the boot-info page, which names the disks' register pages, is measured: sev-es-emu's predicted
    digest must change with the disks and stay the same for the same disks."""
    import re

    def digest(*extra: str) -> str:
        r = vmctl("run", guest("hello"), "-p", "sev-es-emu", *extra, "-t", "30")
        assert r.returncode == ExitCode.SUCCESS, r.stderr
        return re.search(r"launch digest \(.*\): ([0-9a-f]{64})", r.stderr).group(1)

    bare = digest()
    one = digest("--disk", str(image))
    assert one != bare
    assert digest("--disk", f"{image},ro") == one  # where the disk is, not how it is opened
