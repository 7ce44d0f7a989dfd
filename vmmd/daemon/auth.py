"""Who is asking: peer credentials of a control-socket client and the daemon's access policy.

Credentials come from the kernel, never from the request: SO_PEERCRED (struct ucred {pid, uid, gid},
include/uapi/linux/socket.h / socket(7)) and SO_PEERGROUPS (the peer's supplementary groups at
connect() time, Linux 4.13+, net/core/sock.c sk_getsockopt()). Policy, as OpenBSD vmd's control.c:
root may do anything; members of the configured group may start/list/show/console/log/stop guests
they own; everyone else is refused with a message saying so.
"""

from __future__ import annotations

import os
import socket
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


def may_read(path: str, peer: Peer) -> bool:
    """Could `peer` open `path` for reading (mode bits of the file and search bits of each parent)?

    The daemon runs as root and loads firmware on a caller's behalf; without this a group member could
    make it load /etc/shadow into a guest and print it. Root callers skip the check."""
    if peer.is_root:
        return True
    groups = set(peer.groups) | {peer.gid}

    def allowed(st: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if st.st_uid == peer.uid:
            return bool(st.st_mode & bits[0])
        if st.st_gid in groups:
            return bool(st.st_mode & bits[1])
        return bool(st.st_mode & bits[2])

    real = os.path.realpath(path)
    try:
        parent = os.path.dirname(real)
        while True:
            if not allowed(os.stat(parent), (0o100, 0o010, 0o001)):
                return False
            if parent == "/":
                break
            parent = os.path.dirname(parent)
        return allowed(os.stat(real), (0o400, 0o040, 0o004))
    except OSError:
        return False
