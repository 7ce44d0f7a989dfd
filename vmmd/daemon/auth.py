"""Who is asking: peer credentials of a control-socket client and the daemon's access policy.

Credentials come from the kernel, never from the request: SO_PEERCRED (struct ucred {pid, uid, gid},
include/uapi/linux/socket.h / socket(7)) and SO_PEERGROUPS (the peer's supplementary groups at
connect() time, Linux 4.13+, net/core/sock.c sk_getsockopt()). Policy, as OpenBSD vmd's control.c:
root may do anything; members of the configured group may start/list/show/console/log/stop guests
they own; everyone else is refused with a message saying so.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass

SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)  # asm-generic/socket.h
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # asm-generic/socket.h
_UCRED = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
MAX_GROUPS = 65536  # NGROUPS_MAX


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def peer_of(sock: socket.socket) -> Peer:
    """The kernel's record of who connected `sock` (SO_PEERCRED + SO_PEERGROUPS)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_PEERCRED, _UCRED.size))
    groups: tuple[int, ...] = ()
    size = 64 * 4
    while size <= MAX_GROUPS * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            groups = struct.unpack(f"{len(raw) // 4}I", raw)
            break
        except OSError as err:
            if err.errno == 34:  # ERANGE: buffer too small
                size *= 4
                continue
            break  # kernel without SO_PEERGROUPS: primary group only
    return Peer(pid, uid, gid, groups)


class AccessDenied(Exception):
    """Refused by policy; the message says who may do what."""


class Policy:
    """root: everything. Members of `group_gid`: their own guests. Others: nothing."""

    def __init__(self, group_gid: int | None, group_name: str | None = None) -> None:
        self.group_gid = group_gid
        self.group_name = group_name or (str(group_gid) if group_gid is not None else None)

    def is_member(self, peer: Peer) -> bool:
        return self.group_gid is not None and (peer.gid == self.group_gid or self.group_gid in peer.groups)

    def check_connect(self, peer: Peer) -> None:
        if peer.is_root or self.is_member(peer):
            return
        who = f"uid {peer.uid}"
        if self.group_gid is None:
            raise AccessDenied(f"{who} may not use vmmd: only root may (no --group is configured)")
        raise AccessDenied(f"{who} may not use vmmd: only root and members of group {self.group_name} may")

    def check_owner(self, peer: Peer, owner: int, action: str, name: str) -> None:
        """A non-root caller may act only on guests it owns."""
        if peer.is_root or peer.uid == owner:
            return
        raise AccessDenied(f"uid {peer.uid} may not {action} guest {name!r}: it belongs to uid {owner}; "
                           "only its owner or root may")

    def check_root(self, peer: Peer, action: str) -> None:
        if not peer.is_root:
            raise AccessDenied(f"uid {peer.uid} may not {action}: only root may")


def open_for(path: str, peer: Peer | None) -> int:
    """Open `path` read-only on behalf of `peer` (None: for the daemon itself, e.g. a firmware named in its
    own definitions directory); returns the fd. AccessDenied; OSError (EINVAL: not a regular file).

    The daemon runs as root and loads firmware for its callers; a group member must not make it load a
    file the member could not read (/etc/shadow, printed by the guest). The check is on the file that was
    opened, not on the path, which the caller could swap for a symlink between a check and a later open:
    the path is first opened with O_PATH, which pins the inode without opening it (no driver open() of a
    device, no FIFO rendezvous, as root, for a caller who may not touch it; open(2)); then the pinned
    inode must be a regular file, its owner and mode bits must let the peer read it, and the peer must be
    able to search each directory of the path the kernel resolved for it (/proc/self/fd, proc(5)). Only
    then is it opened for reading, through /proc/self/fd, i.e. that same inode. The fd is O_CLOEXEC, for
    handing to a worker with SCM_RIGHTS. Root callers skip the permission check, not the file-type check."""
    pinned = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(pinned)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if peer is not None and not peer.is_root and not _may_read(st, os.readlink(f"/proc/self/fd/{pinned}"),
                                                                     peer):
            raise AccessDenied(f"{path} is not readable by uid {peer.uid}")
        return os.open(f"/proc/self/fd/{pinned}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(pinned)


def open_image_for(path: str, peer: Peer | None, writable: bool) -> int:
    """Open a disk image for `peer` (None: the daemon's own definitions) as open_for() opens firmware: pinned
    with O_PATH, the pinned inode must be a regular file or block device the peer may read (and write, for a
    writable disk), through directories it may search; then opened through /proc/self/fd, O_RDWR or O_RDONLY,
    never created or truncated (vmmd.block.image.open_flags). AccessDenied; OSError."""
    from vmmd.block.image import open_flags

    pinned = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(pinned)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "is a directory", path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise OSError(errno.EINVAL, "not a regular file or block device", path)
        if peer is not None and not peer.is_root:
            resolved = os.readlink(f"/proc/self/fd/{pinned}")
            if not _may_read(st, resolved, peer) or (writable and not _may_read(st, resolved, peer, write=True)):
                raise AccessDenied(f"{path} is not {'writable' if writable else 'readable'} by uid {peer.uid}")
        fd = os.open(f"/proc/self/fd/{pinned}", open_flags(not writable))
        os.set_blocking(fd, True)
        return fd
    finally:
        os.close(pinned)


def _may_read(st: os.stat_result, resolved: str, peer: Peer, write: bool = False) -> bool:
    """Mode bits of the opened file `st` (read, or with `write` write) and search bits of each parent of
    `resolved`, for `peer`."""
    groups = set(peer.groups) | {peer.gid}

    def allowed(entry: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if entry.st_uid == peer.uid:
            return bool(entry.st_mode & bits[0])
        if entry.st_gid in groups:
            return bool(entry.st_mode & bits[1])
        return bool(entry.st_mode & bits[2])

    if not resolved.startswith("/") or resolved.endswith(" (deleted)"):
        return False  # not a path in this mount namespace, or unlinked since: nothing to vouch for it
    try:
        parent = os.path.dirname(resolved)
        while True:
            if not allowed(os.stat(parent), (0o100, 0o010, 0o001)):
                return False
            if parent == "/":
                break
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return allowed(st, (0o200, 0o020, 0o002) if write else (0o400, 0o040, 0o004))
