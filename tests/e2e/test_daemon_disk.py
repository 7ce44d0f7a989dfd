"""End to end: disks of daemon guests. [[disk]] tables, images opened by the daemon for the requesting user
(the pinned-fd rule firmware follows) and handed to the worker with the firmware's descriptor, `vmctl show`
listing them, and a locked image refused with a sentence."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.as_user import run_as_user
from tests.e2e.conftest import guest
from tests.e2e.test_daemon import NOBODY, scratch_daemon
from tests.e2e.test_disk import DISK_BYTES, pattern
from vmmd.block.image import DiskSpec, open_disk
from vmmd.daemon.protocol import Client, DaemonError

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def daemon():
    with scratch_daemon("vmmd-e2e-disk-") as d:
        yield d


def definition(name: str, firmware: str, disks: list[str], guest_arg: int = 0) -> str:
    lines = [f'name = "{name}"', f'firmware = "{guest(firmware)}"', 'memory = "4M"', 'platform = "sev-es-emu"',
             "timeout = 60", f"guest_arg = {guest_arg}"]
    for disk in disks:
        lines += ["[[disk]]", disk]
    return "\n".join(lines) + "\n"


def image(path: Path, mode: int = 0o644) -> Path:
    path.write_bytes(bytes(DISK_BYTES))
    os.chmod(path, mode)
    return path


def test_defined_guest_writes_its_disk_and_show_lists_it(daemon):
    img = image(daemon.defs / "data.img")
    (daemon.defs / "blk.toml").write_text(definition("blk", "blk", ['path = "data.img"\nserial = "d0"']))
    ran = daemon.vmctl("start", "blk", "--wait", timeout=80)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert np.array_equal(np.fromfile(img, dtype="<u8"), pattern(DISK_BYTES))
    shown = daemon.vmctl("show", "blk").stdout.decode()
    assert "disk 0" in shown and f"{img} (rw, cache=writeback, serial=d0)" in shown, shown
    assert "disk 0 I/O" in shown and "ioeventfd" in shown, shown  # the fast path this VM got
    console = daemon.vmctl("console", "blk").stdout.decode()
    assert "blk: ok" in console, console


def test_locked_image_fails_the_start_with_a_sentence(daemon):
    img = image(daemon.defs / "locked.img")
    (daemon.defs / "locked.toml").write_text(definition("locked", "blk", ['path = "locked.img"']))
    holder = open_disk(DiskSpec(str(img)))
    try:
        daemon.request("start", name="locked")
        shown = daemon.wait_state("locked", ("stopped", "failed"))
    finally:
        holder.close()
    assert shown["state"] == "failed", shown
    assert "is in use by another guest or program" in shown["error"], shown


def test_a_user_gets_only_the_access_the_image_gives_them(daemon):
    where = daemon.root / "user"
    where.mkdir()
    os.chmod(where, 0o755)
    theirs = image(where / "theirs.img", 0o644)  # root's image: readable by everyone, writable by root only
    socket_path = daemon.socket
    rw = definition("user-rw", "blk", [f'path = "{theirs}"'], guest_arg=0)
    ro = definition("user-ro", "blk", [f'path = "{theirs}"\nro = true'], guest_arg=2)

    def member() -> dict:
        out = {}
        with Client(socket_path) as c:
            try:
                c.request("start", definition={"path": str(where / "user-rw.toml"), "text": rw})
                out["rw"] = "allowed"
            except DaemonError as err:
                out["rw"] = [err.errno, err.message]
            out["ro"] = c.request("start", definition={"path": str(where / "user-ro.toml"), "text": ro})["ok"]
        return out

    result = run_as_user(NOBODY, [NOBODY, daemon.group], member)
    assert "rw" in result, result
    assert result["rw"][0] == "EPERM" and "not writable by uid 65534" in result["rw"][1], result
    assert result["ro"] is True, result
    shown = daemon.wait_state("user-ro", ("stopped", "failed"))
    assert shown["state"] == "stopped" and shown["end"]["exit_code"] == 0, shown
    assert theirs.read_bytes() == bytes(DISK_BYTES)


def test_vmctl_start_names_a_missing_or_locked_image_with_exit_3(daemon):
    (daemon.defs / "nodisk.toml").write_text(definition("nodisk", "blk", ['path = "missing.img"']))
    r = daemon.vmctl("start", "nodisk", "--wait")
    assert r.returncode == 3, r.stderr
    assert b"key 'disk[0]': disk " in r.stderr and b"missing.img: no such file" in r.stderr, r.stderr
    assert not (daemon.defs / "missing.img").exists()  # nothing created
    img = image(daemon.defs / "held.img")
    (daemon.defs / "held.toml").write_text(definition("held", "blk", ['path = "held.img"']))
    holder = open_disk(DiskSpec(str(img)))
    try:
        r = daemon.vmctl("start", "held", "--wait")
    finally:
        holder.close()
    assert r.returncode == 3, r.stderr
    assert b"is in use by another guest or program" in r.stderr, r.stderr
