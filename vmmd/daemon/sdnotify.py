"""systemd notification (sd_notify(3)) without libsystemd: one datagram to $NOTIFY_SOCKET.

Protocol as systemd's src/libsystemd/sd-daemon/sd-daemon.c: newline-separated KEY=VALUE assignments in
one AF_UNIX SOCK_DGRAM message; a socket path starting with '@' is in the abstract namespace.
vmmd sends READY=1 once the control socket listens, STATUS= lines as guests come and go, and
STOPPING=1 when SIGTERM starts the shutdown (vmmd.service is Type=notify).
"""

from __future__ import annotations

import os
import socket


def notify(*assignments: str) -> bool:
    """Send KEY=VALUE lines to the service manager; False when not run under systemd or on error."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not assignments:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
        return True
    except OSError:
        return False
