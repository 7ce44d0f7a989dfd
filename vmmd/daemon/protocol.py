"""The vmmd control protocol, defined once for the daemon and vmctl: requests, replies, framing, a client.

Framing: newline-delimited JSON over a Unix stream socket (default /run/vmmd/vmmd.sock). Each request is
one JSON object on one line, at most MAX_REQUEST bytes including the newline; each reply is one JSON
object on one line. A reply is {"ok": true, ...} or {"ok": false, "errno": "EPERM", "error": "message"}:
an errno name (as OpenBSD vmd answers vmctl with an errno, usr.sbin/vmd/control.c) and a sentence saying
what to do. Malformed or oversized requests get an error reply; an oversized one also closes the
connection (the rest of the line cannot be trusted to be a request).

The caller's identity is never part of a request: the daemon reads it with SO_PEERCRED (vmmd.daemon.auth)
and stamps the owner uid itself.

`console` (and `start` with "attach": true) turn the connection, after the ok reply, into a raw byte
stream: guest console output (the ring buffer first, then live) flows to the client, bytes the client
writes go to the guest UART's receiver. The daemon closes the stream when the guest ends; the client
detaches by closing it.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import re
import socket
import stat
from typing import Any

DEFAULT_SOCKET = "/run/vmmd/vmmd.sock"
SOCKET_ENV = "VMMD_SOCKET"
MAX_REQUEST = 64 * 1024  # bytes per request line, newline included; a TOML definition fits easily
MAX_REPLY = 16 * 1024 * 1024  # the client refuses replies larger than this
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# Guest states in replies (docs/daemon.md "Guest states and ends"); ACTIVE: a worker is (being) assigned.
STATES = ("defined", "starting", "running", "stopping", "stopped", "failed")
ACTIVE = ("starting", "running", "stopping")

# op -> {field: (type or tuple of types, required)}. Fields not listed are refused.
OPS: dict[str, dict[str, tuple[Any, bool]]] = {
    "ping": {},
    "list": {},
    "show": {"name": (str, True)},
    "start": {"name": (str, False), "definition": (dict, False), "attach": (bool, False), "replay": (bool, False)},
    "stop": {"name": (str, True), "force": (bool, False), "timeout": ((int, float), False)},
    "console": {"name": (str, True), "replay": (bool, False)},
    "log": {"name": (str, True), "lines": (int, False)},
    "remove": {"name": (str, True)},
    "reload": {},
    # an attested launch waiting for its owner (docs/daemon.md "Attested launch"); header/secret are base64
    "measurement": {"name": (str, True)},
    "inject-secret": {"name": (str, True), "header": (str, True), "secret": (str, True), "gpa": (int, False)},
    "resume": {"name": (str, True)},
}
STREAM_OPS = ("console",)  # ops whose ok reply is followed by a raw console stream ("start" when attach=true)


class ProtocolError(Exception):
    """A request that is not well formed; `errno` is the errno name for the reply."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


class DaemonError(Exception):
    """An error reply from the daemon (or no daemon at all), as the client sees it."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


def encode(obj: dict) -> bytes:
    """One frame: compact JSON and a newline (JSON never contains a raw newline)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def ok(**fields: Any) -> dict:
    return {"ok": True, **fields}


def error(errno: str, message: str) -> dict:
    return {"ok": False, "errno": errno, "error": message}


def parse_request(line: bytes) -> dict:
    """Decode and validate one request line; raises ProtocolError naming what is wrong."""
    if len(line) > MAX_REQUEST:
        raise ProtocolError("EMSGSIZE", f"request of {len(line)} bytes exceeds the limit of {MAX_REQUEST} bytes")
    try:
        request = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:  # ValueError: JSONDecodeError, integers over 4300 digits
        raise ProtocolError("EINVAL", f"request is not a JSON object on one line: {err}") from None
    except RecursionError:
        raise ProtocolError("EINVAL", "request is nested too deeply") from None
    if not isinstance(request, dict):
        raise ProtocolError("EINVAL", f"request must be a JSON object, got {type(request).__name__}")
    op = request.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError("EOPNOTSUPP", f"unknown op {op!r}: use one of {', '.join(OPS)}")
    fields = OPS[op]
    for key, value in request.items():
        if key == "op":
            continue
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise ProtocolError("EINVAL", f"op {op!r} does not take field {key!r} (fields: {allowed})")
        kind, _ = fields[key]
        if isinstance(value, bool) and kind is not bool:
            raise ProtocolError("EINVAL", f"field {key!r} of op {op!r} must not be a boolean")
        if not isinstance(value, kind):
            want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ProtocolError("EINVAL", f"field {key!r} of op {op!r} must be {want}, got {type(value).__name__}")
    for key, (_, required) in fields.items():
        if required and key not in request:
            raise ProtocolError("EINVAL", f"op {op!r} needs field {key!r}")
    for key, value in [*request.items(), *(request.get("definition") or {}).items()]:
        if isinstance(value, str) and not _is_clean_text(value):
            raise ProtocolError("EINVAL", f"field {key!r} holds a NUL or a lone surrogate (not text a file name "
                                          "or a definition can have)")
    name = request.get("name")
    if name is not None and not NAME_RE.fullmatch(name):
        raise ProtocolError("EINVAL", f"guest name {name!r} is not valid: use 1-63 of A-Z a-z 0-9 . _ - "
                                      "starting with a letter or digit")
    if op == "start" and ("name" in request) == ("definition" in request):
        raise ProtocolError("EINVAL", "op 'start' needs exactly one of 'name' (a defined guest) or 'definition' "
                                      "(an ad-hoc guest: {\"path\": ..., \"text\": ...})")
    if op == "start" and "definition" in request:
        definition = request["definition"]
        if set(definition) != {"path", "text"} or not all(isinstance(v, str) for v in definition.values()):
            raise ProtocolError("EINVAL", "field 'definition' must be {\"path\": string, \"text\": string}")
    return request


def _is_clean_text(text: str) -> bool:
    """Encodable as UTF-8 (JSON lets "\\ud800" through as a lone surrogate) and free of NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in text


def socket_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class Client:
    """A blocking client: one connection, request() per op; used by vmctl, the tests and the bench."""

    def __init__(self, path: str | None = None, timeout: float | None = 30.0) -> None:
        self.path = socket_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except FileNotFoundError:
            self.sock.close()
            raise DaemonError("ENOENT", f"no vmmd control socket at {self.path}: is vmmd running? "
                                        "(systemctl start vmmd, or pass --socket)") from None
        except ConnectionRefusedError:
            self.sock.close()
            if not stat.S_ISSOCK(os.stat(self.path).st_mode):
                raise DaemonError("ENOTSOCK", f"{self.path} is not a socket: pass the control socket of vmmd "
                                              f"with --socket (default {DEFAULT_SOCKET})") from None
            raise DaemonError("ECONNREFUSED", f"vmmd is not listening on {self.path} (a socket left by a vmmd "
                                              "that stopped): start it with systemctl start vmmd") from None
        except PermissionError:
            self.sock.close()
            raise DaemonError("EACCES", f"permission denied connecting to {self.path}: vmmd accepts root and "
                                        "members of its configured group (see docs/daemon.md)") from None
        except OSError as err:
            self.sock.close()
            raise DaemonError(_errno.errorcode.get(err.errno or 0, "EIO"),
                              f"cannot connect to {self.path}: {err.strerror or err}") from None
        self._buf = b""

    def send(self, request: dict) -> None:
        self.sock.sendall(encode(request))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> dict:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_REPLY:
                raise DaemonError("EMSGSIZE", "reply from vmmd is too large")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise DaemonError("ECONNRESET", "vmmd closed the connection without a reply")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError as err:
            raise DaemonError("EPROTO", f"malformed reply from vmmd: {err}") from None
        if not isinstance(reply, dict):
            raise DaemonError("EPROTO", "malformed reply from vmmd: not an object")
        return reply

    def request(self, op: str, **fields: Any) -> dict:
        """Send one request; return the ok reply or raise DaemonError with the daemon's errno and message."""
        try:
            self.send({"op": op, **fields})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed before reading (a refusal at connect): its reply is readable
        reply = self.read_reply()
        if not reply.get("ok"):
            raise DaemonError(str(reply.get("errno", "EIO")), str(reply.get("error", "unknown error")))
        return reply

    def take_buffered(self) -> bytes:
        """Bytes already read past the reply (the start of a console stream)."""
        data, self._buf = self._buf, b""
        return data

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
