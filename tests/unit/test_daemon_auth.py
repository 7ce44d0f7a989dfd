"""vmmd.daemon.auth: peer credentials from the kernel and the access policy."""

from __future__ import annotations

import os
import socket

import pytest

from vmmd.daemon.auth import AccessDenied, Peer, Policy, open_for, peer_of


def test_peer_of_reads_the_kernels_credentials():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_of(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert set(peer.groups) >= set(os.getgroups()) - {os.getgid()}


def test_policy():
    root, member, outsider = Peer(1, 0, 0, ()), Peer(2, 1000, 1000, (500,)), Peer(3, 1001, 1001, ())
    policy = Policy(500, "vmmd")
    policy.check_connect(root)
    policy.check_connect(member)
    with pytest.raises(AccessDenied, match="uid 1001 may not use vmmd: only root and members of group vmmd"):
        policy.check_connect(outsider)
    policy.check_owner(member, 1000, "stop", "g")
    policy.check_owner(root, 1000, "stop", "g")
    with pytest.raises(AccessDenied, match="uid 1000 may not stop guest 'g': it belongs to uid 0"):
        policy.check_owner(member, 0, "stop", "g")
    with pytest.raises(AccessDenied, match="only root"):
        Policy(None).check_connect(member)
    with pytest.raises(AccessDenied):
        policy.check_root(member, "reload definitions")
    assert Policy(1000).is_member(Peer(4, 1002, 1000, ()))  # primary group counts


def _may_open(path, peer) -> bool:
    try:
        fd = open_for(str(path), peer)
    except (AccessDenied, OSError):
        return False
    os.close(fd)
    return True


def test_open_for_follows_mode_bits():
    import shutil
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="vmmd-auth-"))  # /tmp is 1777: every parent is searchable
    os.chmod(tmp_path, 0o755)
    try:
        _check_open_for(tmp_path)
    finally:
        shutil.rmtree(tmp_path)
    hidden = Path(tempfile.mkdtemp(prefix="vmmd-auth-"))  # 0700: nothing inside is readable by others
    try:
        (hidden / "f").write_bytes(b"x")
        os.chmod(hidden / "f", 0o644)
        assert not _may_open(hidden / "f", Peer(1, 65534, 65534, ()))
    finally:
        shutil.rmtree(hidden)


def _check_open_for(tmp_path):
    public, private = tmp_path / "pub.bin", tmp_path / "priv.bin"
    public.write_bytes(b"x")
    private.write_bytes(b"x")
    os.chmod(public, 0o644)
    os.chmod(private, 0o600)
    nobody = Peer(1, 65534, 65534, ())
    assert _may_open(public, Peer(1, 0, 0, ()))
    assert _may_open(private, Peer(1, 0, 0, ()))
    assert not _may_open(private, nobody)
    assert not _may_open(tmp_path / "missing", nobody)
    os.chmod(private, 0o640)
    os.chown(private, 0, 4242)
    assert _may_open(private, Peer(1, 65534, 65534, (4242,)))
    assert _may_open(public, nobody)


def test_open_for_checks_the_file_it_opened_not_the_path(tmp_path):
    """A symlink the caller owns, to a world-readable file in a directory the caller cannot search, is
    refused; the check follows what the kernel resolved for the fd. FIFOs, devices and directories are
    refused. The daemon's own definitions (peer None) skip the permission check, not the file-type check."""
    import shutil
    import tempfile
    from pathlib import Path

    hidden = Path(tempfile.mkdtemp(prefix="vmmd-auth-"))  # 0700, root's
    try:
        target = hidden / "notes.bin"
        target.write_bytes(b"secret")
        os.chmod(target, 0o644)
        link = tmp_path / "fw.bin"
        link.symlink_to(target)
        nobody = Peer(1, 65534, 65534, ())
        with pytest.raises(AccessDenied, match="not readable by uid 65534"):
            open_for(str(link), nobody)
        fd = open_for(str(link), None)
        assert os.read(fd, 16) == b"secret"
        os.close(fd)
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        for path in (fifo, "/dev/zero", tmp_path):
            for peer in (nobody, None):
                with pytest.raises(OSError, match="not a regular file"):
                    open_for(str(path), peer)
    finally:
        shutil.rmtree(hidden)


def test_open_for_never_opens_what_it_refuses(tmp_path):
    """The refusal comes before any open(2) of the file itself: a writer waiting on a FIFO only root may
    reach stays blocked (an open for reading would release it), as a device's open() would not run."""
    import threading

    hidden = tmp_path / "root-only"
    hidden.mkdir(mode=0o700)
    fifo = hidden / "fifo"
    os.mkfifo(fifo)
    released = threading.Event()

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)  # blocks until someone opens the FIFO for reading
        released.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with pytest.raises(OSError, match="not a regular file"):
        open_for(str(fifo), Peer(1, 65534, 65534, ()))
    assert not released.wait(0.3)
    os.close(os.open(fifo, os.O_RDONLY))  # let the writer go
    assert released.wait(5)
    thread.join(5)
