"""The worker's half of an attested launch: the guest's launch inputs, and the wait for its owner.

A definition with `attest = true` (or dh_cert/session) hands the worker the guest owner's LAUNCH_START
inputs; the platform then stops after LAUNCH_MEASURE (vmmd/sev/attest.py PausedLaunch) and, before any
vCPU runs, the worker answers the daemon on its channel (docs/daemon.md "Attested launch"):

    daemon -> worker  K inject (JSON {header, secret: base64, gpa})   U resume   Q stop (as when running)
    worker -> daemon  A answer (JSON {ok, info | error})

until `resume` (LAUNCH_FINISH; the guest then runs as any other) or a stop or the definition's timeout
(the VM ends without having run a single instruction).
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import time

from vmmd.errors import ExitCode, VmmdError

MSG_INJECT, MSG_RESUME, MSG_ANSWER = b"K", b"U", b"A"


def apply_launch_inputs(platform, spec: dict) -> None:
    """Put the spec's attest / dh_cert / session into the platform's launch inputs; VmmdError where it has none."""
    attest, dh_cert, session = spec.get("attest", False), spec.get("dh_cert_b64"), spec.get("session_b64")
    if not (attest or dh_cert or session):
        return
    inputs = getattr(platform, "inputs", None)
    if inputs is None or not hasattr(inputs, "attest"):
        raise VmmdError(f"platform {platform.name} has no SEV launch: attest, dh_cert and session need sev-es or "
                        "sev-es-emu")
    inputs.attest = bool(attest)
    inputs.dh_cert = base64.b64decode(dh_cert) if dh_cert else None
    inputs.session = base64.b64decode(session) if session else None


def _result(kind: str, reason: str, code: ExitCode, started: float) -> dict:
    return {"kind": kind, "reason": reason, "exit_code": int(code), "status": None,
            "seconds": time.monotonic() - started, "details": {"attested_launch": "ended before LAUNCH_FINISH"}}


def _answer(sock: socket.socket, **fields) -> None:
    sock.send(MSG_ANSWER + json.dumps(fields).encode())


def serve_paused(sock: socket.socket, machine, paused, max_message: int, stop_kind: bytes) -> dict | None:
    """Answer inject/resume until resumed (None: run the guest now, with what is left of its timeout) or until
    a stop request, a closed channel or the timeout (the result to report; the guest never ran)."""
    started = time.monotonic()
    timeout = machine.config.timeout
    deadline = None if timeout is None else started + timeout
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return _result("timeout", f"timeout of {timeout:g} s reached while the launch waited for its owner "
                           "(after LAUNCH_MEASURE); VM stopped before it ran", ExitCode.TIMEOUT, started)
        sock.settimeout(remaining)
        try:
            data = sock.recv(max_message)
        except TimeoutError:
            continue
        except OSError:
            data = b""
        finally:
            sock.settimeout(None)
        if not data:
            return _result("interrupted", "vmmd closed the worker channel while the launch waited for its owner",
                           ExitCode.INTERRUPTED, started)
        kind = data[:1]
        if kind == stop_kind:
            try:
                reason = json.loads(data[1:]).get("reason", "stopped by request")
            except ValueError:
                reason = "stopped by request"
            return _result("stopped", f"{reason} (while the launch waited for its owner, before LAUNCH_FINISH)",
                           ExitCode.INTERRUPTED, started)
        if kind == MSG_INJECT:
            try:
                request = json.loads(data[1:])
                header = base64.b64decode(request["header"], validate=True)
                payload = base64.b64decode(request["secret"], validate=True)
                injected = paused.inject(header, payload, request.get("gpa"))
            except (ValueError, KeyError, TypeError, binascii.Error):
                _answer(sock, ok=False, errno="EINVAL", error="the inject request is not base64 header and secret")
            except VmmdError as err:
                _answer(sock, ok=False, errno="EINVAL", error=str(err), info=paused.info())
            else:
                _answer(sock, ok=True, injected=injected, info=paused.info())
        elif kind == MSG_RESUME:
            try:
                paused.resume()
            except VmmdError as err:  # LAUNCH_FINISH failed: the sequencer released the VM
                _answer(sock, ok=False, errno="EIO", error=str(err))
                return _result("launch-failed", str(err), ExitCode.HOST_ERROR, started)
            _answer(sock, ok=True, info=paused.info())
            if deadline is not None:
                machine.config.timeout = max(deadline - time.monotonic(), 0.001)
            return None
        # console input (b"I") has nowhere to go before the guest runs: dropped
