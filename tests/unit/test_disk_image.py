"""Disk definitions and images: the one parser, sentences for unusable images, nothing created or truncated,
and QEMU-compatible OFD image locks between two openers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from vmmd.block.image import DiskSpec, disk_spec, open_disk, parse_disk_spec
from vmmd.errors import ExitCode, VmmdError


def test_parse_disk_spec_options():
    assert parse_disk_spec("a.img") == DiskSpec("a.img")
    assert parse_disk_spec("a.img,ro,cache=none,serial=disk0") == DiskSpec("a.img", True, "none", "disk0")
    for bad, word in (("a.img,cache=fast", "cache="), ("a.img,rw", "not one of"), ("a.img,ro=1", "not one of"),
                      ("a.img,serial=" + "x" * 21, "20 bytes"), (",ro", "path")):
        with pytest.raises(VmmdError, match=word):
            parse_disk_spec(bad)


def test_table_form_goes_through_the_same_validator():
    assert disk_spec({"path": "a.img", "ro": True, "serial": "s"}, "x") == DiskSpec("a.img", True, "writeback", "s")
    with pytest.raises(VmmdError, match="'ro' is true or false"):
        disk_spec({"path": "a.img", "ro": "yes"}, "x")
    with pytest.raises(VmmdError, match="unknown option 'size'"):
        disk_spec({"path": "a.img", "size": 5}, "x")


@pytest.mark.parametrize("case", ["missing", "directory", "ragged", "empty", "fifo"])
def test_unusable_images_are_exit_3_sentences_and_nothing_is_created(tmp_path, case):
    path = tmp_path / "img"
    if case == "directory":
        path.mkdir()
    elif case == "ragged":
        path.write_bytes(b"x" * 1000)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "fifo":
        os.mkfifo(path)
    with pytest.raises(VmmdError) as info:
        open_disk(DiskSpec(str(path)))
    assert info.value.exit_code == ExitCode.HOST_ERROR
    text = str(info.value)
    assert text.startswith(f"disk {path}: ")
    assert {"missing": "no such file", "directory": "is a directory", "ragged": "1000 bytes",
            "empty": "0 bytes", "fifo": "not a regular file"}[case] in text
    if case == "missing":
        assert not path.exists()
    if case == "ragged":
        assert path.stat().st_size == 1000  # not rounded, not truncated


def test_no_permission():
    """A user who may only read an image gets a sentence for a writable disk, and the read-only disk works."""
    from tests.as_user import run_as_user

    with tempfile.TemporaryDirectory() as where:  # pytest's tmp_path lies under a directory only its owner enters
        os.chmod(where, 0o755)
        path = Path(where) / "img"
        path.write_bytes(bytes(4096))
        path.chmod(0o444)
        _check_no_permission(path, run_as_user)


def _check_no_permission(path, run_as_user):

    def attempt() -> dict:
        out = {}
        for ro in (False, True):
            try:
                open_disk(DiskSpec(str(path), read_only=ro)).close()
                out[str(ro)] = "ok"
            except VmmdError as err:
                out[str(ro)] = str(err)
        return out

    result = run_as_user(65534, [65534], attempt) if os.geteuid() == 0 else attempt()
    assert "permission denied: you need to be able to read and write" in result["False"], result
    assert result["True"] == "ok"


def test_two_writers_conflict_two_readers_share(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(64 << 10))
    first = open_disk(DiskSpec(str(path)))
    try:
        with pytest.raises(VmmdError, match="is in use by another guest or program"):
            open_disk(DiskSpec(str(path)))
        with pytest.raises(VmmdError, match="in use"):
            open_disk(DiskSpec(str(path), read_only=True))  # a reader does not share writing (QEMU share-rw=off)
    finally:
        first.close()
    readers = [open_disk(DiskSpec(str(path), read_only=True)) for _ in range(2)]
    try:
        with pytest.raises(VmmdError, match="in use"):
            open_disk(DiskSpec(str(path)))
    finally:
        for r in readers:
            r.close()
    again = open_disk(DiskSpec(str(path)))  # every lock went with its descriptor
    again.close()
    assert path.stat().st_size == 64 << 10


def test_a_descriptor_opened_read_only_is_not_a_writable_disk(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDONLY)
    with pytest.raises(VmmdError, match="permission denied"):
        open_disk(DiskSpec(str(path), fd=fd))
