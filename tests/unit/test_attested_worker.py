"""The worker's wait for the guest owner (vmmd/daemon/attested.py) over a real SOCK_SEQPACKET pair, no KVM:
malformed requests are answered and change nothing, stop and timeout end the wait, resume hands the rest of
the timeout to the run."""

from __future__ import annotations

import base64
import json
import socket
import threading
from types import SimpleNamespace

import pytest

from vmmd.daemon.attested import MSG_ANSWER, MSG_INJECT, MSG_RESUME, apply_launch_inputs, serve_paused
from vmmd.errors import VmmdError

STOP = b"Q"


def _paused():
    """A real PausedLaunch: the firmware model launched with a guest owner's session, stopped after LAUNCH_MEASURE;
    returns it, the owner's session and the guest memory."""
    from vmmd.memory import GuestMemory
    from vmmd.sev import measure, owner, sevcert, vmsa
    from vmmd.sev.attest import PausedLaunch
    from vmmd.sev.launch import SevEsLaunch, SevModel

    pdh, pdh_key = sevcert.generate()
    made = owner.make_session(pdh, 0x5)
    memory = GuestMemory.with_ram(2 << 20)
    state = vmsa.x86_reset_state(0x00A00F11, cs_base=0, rip=0x100000)
    plan = measure.LaunchPlan(regions=(measure.MeasuredRegion(0x100000, bytes(4096), "code"),),
                              vcpus=measure.build_vcpu_launches([state], init2=True, vmsa_features=0),
                              policy=0x5, init2=True, vmsa_features=0, cpu_sig=0x00A00F11)
    launch = SevEsLaunch(SevModel(memory, pdh_key=pdh_key), plan, dh_cert=made.godh, session=made.session)
    launch.run_to_measure(lambda p: None)
    return PausedLaunch(launch, simulated=True, secret_area=(0xA0000, 0x1000)), made, memory


def _packet(made, paused, tamper: bool = False) -> dict:
    from vmmd.sev import owner

    header, payload = owner.build_secret(made.tek, made.tik, paused.launch.measurement, b"k" * 32)
    if tamper:
        header = header[:8] + bytes([header[8] ^ 1]) + header[9:]
    return {"header": base64.b64encode(header).decode(), "secret": base64.b64encode(payload).decode()}


def _serve(timeout: float | None, paused):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    machine = SimpleNamespace(config=SimpleNamespace(timeout=timeout))  # serve_paused reads only config.timeout
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=serve_paused(theirs, machine, paused, 65536, STOP)))
    thread.start()
    return ours, thread, out, paused, machine


def _ask(sock: socket.socket, message: bytes) -> dict:
    sock.send(message)
    reply = sock.recv(65536)
    assert reply[:1] == MSG_ANSWER
    return json.loads(reply[1:])


@pytest.mark.timeout(10)
def test_malformed_requests_are_answered_then_resume_runs() -> None:
    paused, made, memory = _paused()
    sock, thread, out, _, machine = _serve(30.0, paused)
    assert _ask(sock, MSG_INJECT + b"not json")["errno"] == "EINVAL"
    assert _ask(sock, MSG_INJECT + json.dumps({"header": "!!", "secret": "AA=="}).encode())["errno"] == "EINVAL"
    assert _ask(sock, MSG_INJECT + json.dumps({"secret": "AA=="}).encode())["errno"] == "EINVAL"
    refused = _ask(sock, MSG_INJECT + json.dumps(_packet(made, paused, tamper=True)).encode())
    assert not refused["ok"] and "SEV_RET_BAD_MEASUREMENT" in refused["error"]
    assert not refused["info"]["secret_injected"]
    sock.send(b"Ikeys before the guest runs")  # console input: dropped, no answer
    good = _ask(sock, MSG_INJECT + json.dumps(_packet(made, paused)).encode())
    assert good["ok"] and good["injected"] == {"gpa": 0xA0000, "length": 32} and good["info"]["secret_injected"]
    assert memory.read(0xA0000, 32) == b"k" * 32
    resumed = _ask(sock, MSG_RESUME)
    thread.join(5)
    assert resumed["ok"] and resumed["info"]["state"] == "RUNNING" and out["result"] is None  # None: run it now
    assert 0 < machine.config.timeout <= 30.0
    memory.close()


@pytest.mark.timeout(10)
def test_stop_timeout_and_closed_channel_end_the_wait() -> None:
    paused, _, memory = _paused()
    sock, thread, out, _, _ = _serve(None, paused)
    sock.send(STOP + json.dumps({"reason": "stopped by vmctl stop"}).encode())
    thread.join(5)
    assert out["result"]["kind"] == "stopped" and "before LAUNCH_FINISH" in out["result"]["reason"]
    sock, thread, out, _, _ = _serve(0.2, paused)
    thread.join(5)
    assert out["result"]["kind"] == "timeout" and "waited for its owner" in out["result"]["reason"]
    sock, thread, out, _, _ = _serve(None, paused)
    sock.close()
    thread.join(5)
    assert out["result"]["kind"] == "interrupted"
    memory.close()


@pytest.mark.timeout(10)
def test_a_failed_launch_finish_ends_the_guest() -> None:
    paused, _, memory = _paused()
    paused.launch.abort()  # the VM is gone (as after a failed step): LAUNCH_FINISH cannot run
    sock, thread, out, _, _ = _serve(None, paused)
    answer = _ask(sock, MSG_RESUME)
    thread.join(5)
    assert not answer["ok"] and "aborted" in answer["error"] and out["result"]["kind"] == "launch-failed"


def test_launch_inputs_need_an_sev_platform() -> None:
    from vmmd.machine.platform import Platform

    apply_launch_inputs(Platform(), {})  # nothing asked: nothing to refuse
    with pytest.raises(VmmdError, match="has no SEV launch"):
        apply_launch_inputs(Platform(), {"attest": True})
