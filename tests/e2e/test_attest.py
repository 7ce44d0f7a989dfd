"""End to end: an attested launch on sev-es-emu through vmmd and vmctl, as a guest owner and a host run it.

The host exports the (simulated) platform's PDH and certificate chain; the owner checks the chain up to the
simulated root, given explicitly with --ca (vmctl never trusts it by default), and makes a session for the PDH;
the host starts a guest whose definition says attest = true; vmmd stops after LAUNCH_MEASURE; the owner verifies
the measurement with its TIK against the digest `vmctl measure` predicts, builds a LAUNCH_SECRET packet, the host
injects it and resumes, and the guest (firmware/guests/secret.c) prints the SHA-256 of what it found in its secret page.
Then every refusal the issue lists, each with a sentence and the paused VM unharmed. Real KVM, real
daemon and worker processes; the simulated PSP's keys live in a temporary VMMD_SIM_PSP_DIR.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.as_user import run_as_user
from tests.e2e.conftest import REPO, guest
from tests.e2e.test_daemon import Daemon, _free_gid
from vmmd.daemon.protocol import Client, DaemonError

NOBODY = 65534
SECRET = b"correct horse battery staple\n"


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmd.cli", *args], cwd=REPO, capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, text=True)


@pytest.fixture(scope="module")
def world():
    root = Path(tempfile.mkdtemp(prefix="vmmd-attest-"))
    os.chmod(root, 0o755)
    saved = os.environ.get("VMMD_SIM_PSP_DIR")
    os.environ["VMMD_SIM_PSP_DIR"] = str(root / "psp")  # the daemon and every vmctl inherit it
    gid = _free_gid()
    daemon = Daemon(root, group=gid)
    daemon.gid = gid
    owner = root / "owner"
    exported = _cli("host", "--export-pdh", str(root / "pdh"))
    assert exported.returncode == 0, exported.stderr
    assert sorted(os.listdir(root / "pdh")) == ["ask_ark_simulated.cert", "cert_chain.cert", "pdh.cert",
                                                "sev_chain.cert"]
    # the owner checks the chain up to a root it trusts; vmmd's simulated root only because it is given (--ca)
    chain = ["--chain", str(root / "pdh" / "sev_chain.cert")]
    untrusted = _cli("owner", "session", *chain, "--out", str(owner))
    assert untrusted.returncode == 3 and "not signed by the ASK of any AMD generation" in untrusted.stderr, \
        untrusted.stderr
    assert not owner.exists()
    made = _cli("owner", "session", *chain, "--ca", str(root / "pdh" / "ask_ark_simulated.cert"), "--policy", "0x5",
                "--out", str(owner))
    assert made.returncode == 0, made.stderr
    assert "certificate chain verified" in made.stdout and "vmmd's simulated root" in made.stdout
    assert "protects nothing against that host" in made.stderr
    (root / "secret.txt").write_bytes(SECRET)
    digest = json.loads(_cli("measure", guest("secret"), "--memory", "4M", "--json").stdout)["digest"]
    try:
        daemon.start()
        yield daemon, root, owner, digest
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
        if saved is None:
            os.environ.pop("VMMD_SIM_PSP_DIR", None)
        else:
            os.environ["VMMD_SIM_PSP_DIR"] = saved
        shutil.rmtree(root, ignore_errors=True)


def _define(daemon: Daemon, owner: Path, name: str, **extra) -> None:
    daemon.define(name, "secret", attest=True, dh_cert=str(owner / "vm_godh.b64"),
                  session=str(owner / "vm_session.b64"), **{"timeout": 60, **extra})


def _start_paused(daemon: Daemon, name: str) -> dict:
    started = daemon.vmctl("start", name)
    assert started.returncode == 0, started.stderr
    shown = daemon.wait_state(name, ("running", "stopped", "failed"))
    assert shown["state"] == "running", shown
    measured = daemon.vmctl("measurement", name, "--json")
    assert measured.returncode == 0, measured.stderr
    return json.loads(measured.stdout)


def _secret(root: Path, owner: Path, info: dict, tag: str) -> tuple[Path, Path]:
    (root / f"m-{tag}.json").write_text(json.dumps(info))
    out = root / f"pkt-{tag}"
    built = _cli("owner", "secret", "--tek", str(owner / "vm_tek.bin"), "--tik", str(owner / "vm_tik.bin"),
                 "--measurement", str(root / f"m-{tag}.json"), "--secret", str(root / "secret.txt"), "--out", str(out))
    assert built.returncode == 0, built.stderr
    return out / "vm_secret_header.bin", out / "vm_secret_payload.bin"


@pytest.mark.timeout(120)
def test_owner_workflow_and_refusals(world):
    daemon, root, owner, digest = world
    _define(daemon, owner, "vault")
    info = _start_paused(daemon, "vault")
    assert info["state"] == "LSECRET" and info["owner_session"] and info["simulated"]
    assert "simulated PSP" in info["note"] and "proves nothing" in info["note"]
    human = daemon.vmctl("measurement", "vault").stdout.decode()
    assert "waiting for the guest owner" in human and "proves nothing" in human
    (root / "m.json").write_text(json.dumps(info))
    tik = str(owner / "vm_tik.bin")

    # the owner checks the measurement: right TIK and digest match; a wrong TIK does not
    verified = _cli("owner", "verify", "--measurement", str(root / "m.json"), "--tik", tik, "--digest", digest)
    assert verified.returncode == 0 and verified.stdout.startswith("match:"), verified.stdout + verified.stderr
    assert "proves nothing" in verified.stdout
    (root / "wrong_tik.bin").write_bytes(bytes(16))
    wrong = _cli("owner", "verify", "--measurement", str(root / "m.json"), "--tik", str(root / "wrong_tik.bin"),
                 "--digest", digest)
    assert wrong.returncode == 1 and "MISMATCH" in wrong.stdout, wrong.stdout
    # the owner may predict the digest itself, as vmctl measure does
    predicted = _cli("owner", "verify", "--measurement", str(root / "m.json"), "--tik", tik, "--firmware",
                     guest("secret"), "--memory", "4M", "--allow-replay")
    assert predicted.returncode == 0 and predicted.stdout.startswith("match:"), predicted.stdout
    # the same measurement offered again (a replayed MNONCE) is refused
    replay = _cli("owner", "verify", "--measurement", str(root / "m.json"), "--tik", tik, "--digest", digest)
    assert replay.returncode == 1 and "REFUSED" in replay.stdout and "replayed" in replay.stdout, replay.stdout
    # a policy other than the session's
    other = _cli("owner", "verify", "--measurement", str(root / "m.json"), "--tik", tik, "--digest", digest,
                 "--policy", "0x7")
    assert other.returncode == 3 and "reports policy 0x5" in other.stderr, other.stderr

    header, payload = _secret(root, owner, info, "vault")
    # bad packets: each refused with a sentence, the launch still waiting
    tampered = root / "tampered_header.bin"
    raw = bytearray(header.read_bytes())
    raw[10] ^= 0x40
    tampered.write_bytes(bytes(raw))
    for args, text in (
        (["--header", str(tampered), "--secret", str(payload)], "SEV_RET_BAD_MEASUREMENT"),
        (["--header", str(header), "--secret", str(payload), "--gpa", "0xA0008"], "not 16-byte aligned"),
        (["--header", str(header), "--secret", str(payload), "--gpa", "0x40000000"], "not inside guest RAM"),
        (["--header", str(payload), "--secret", str(payload)], f"header is {payload.stat().st_size} bytes"),
    ):
        refused = daemon.vmctl("inject-secret", "vault", *args)
        assert refused.returncode != 0 and text in refused.stderr.decode(), (args, refused.stderr)
        assert "unharmed" in refused.stderr.decode()
    assert daemon.request("show", name="vault")["guest"]["state"] == "running"

    # only the guest's owner (here root) may read the measurement or inject
    socket_path = daemon.socket

    def member() -> dict:
        out = {}
        for op, fields in (("measurement", {}), ("inject-secret", {"header": "AA==", "secret": "AA=="}),
                           ("resume", {})):
            try:
                Client(socket_path).request(op, name="vault", **fields)
                out[op] = None
            except DaemonError as err:
                out[op] = [err.errno, err.message]
        return out

    got = run_as_user(NOBODY, [daemon.gid], member)
    for op in ("measurement", "inject-secret", "resume"):
        assert got[op] and got[op][0] == "EPERM" and "belongs to uid 0" in got[op][1], (op, got)

    injected = daemon.vmctl("inject-secret", "vault", "--header", str(header), "--secret", str(payload))
    assert injected.returncode == 0, injected.stderr
    assert "at 0xa0000" in injected.stdout.decode()
    twice = daemon.vmctl("inject-secret", "vault", "--header", str(header), "--secret", str(payload))
    assert twice.returncode != 0 and "already injected" in twice.stderr.decode(), twice.stderr
    resumed = daemon.vmctl("resume", "vault")
    assert resumed.returncode == 0, resumed.stderr
    after = daemon.vmctl("inject-secret", "vault", "--header", str(header), "--secret", str(payload))
    assert after.returncode != 0 and ("resumed" in after.stderr.decode() or "not running" in after.stderr.decode())
    shown = daemon.wait_state("vault", ("stopped", "failed"), timeout=60)
    assert shown["end"]["kind"] == "debug-exit" and shown["end"]["exit_code"] == 0, shown
    console = daemon.vmctl("console", "vault").stdout.decode()
    assert f"sha256 {hashlib.sha256(SECRET).hexdigest()}" in console, console
    assert "secret: 1 entry" in console


@pytest.mark.timeout(90)
def test_stop_and_timeout_while_paused(world):
    daemon, root, owner, _ = world
    _define(daemon, owner, "paused-stop")
    _start_paused(daemon, "paused-stop")
    stopped = daemon.vmctl("stop", "paused-stop")
    assert stopped.returncode == 0, stopped.stderr
    end = daemon.request("show", name="paused-stop")["guest"]["end"]
    assert end["kind"] == "stopped" and "before LAUNCH_FINISH" in end["reason"], end
    _define(daemon, owner, "paused-timeout", timeout=1)
    _start_paused(daemon, "paused-timeout")
    end = daemon.wait_state("paused-timeout", ("stopped", "failed"), timeout=20)["end"]
    assert end["kind"] == "timeout" and "waited for its owner" in end["reason"], end
    console = daemon.vmctl("console", "paused-timeout").stdout.decode()
    assert "secret" not in console  # the guest never ran


@pytest.mark.timeout(90)
def test_launch_inputs_the_host_refuses(world):
    daemon, root, owner, _ = world
    # a session made for another policy: LAUNCH_START's POLICY_MAC check fails, the start says so
    _define(daemon, owner, "wrong-policy", policy=7)
    started = daemon.vmctl("start", "wrong-policy")
    shown = daemon.wait_state("wrong-policy", ("stopped", "failed"))
    assert shown["state"] == "failed" and "SEV_RET_POLICY_FAILURE" in shown["error"], (started.stderr, shown)
    assert "another policy" in shown["error"]
    # a corrupt base64 certificate and one of the wrong size: the start request is refused at once
    (root / "corrupt.b64").write_text("not base64 at all!\n")
    (root / "short.b64").write_bytes(base64.b64encode(bytes(100)))
    for name, cert, text in (("corrupt", "corrupt.b64", "not valid base64"),
                             ("short", "short.b64", "decodes to 100 bytes")):
        daemon.define(name, "secret", attest=True, dh_cert=str(root / cert), session=str(owner / "vm_session.b64"))
        refused = daemon.vmctl("start", name)
        assert refused.returncode == 3 and text in refused.stderr.decode(), refused.stderr
        assert "key 'dh_cert'" in refused.stderr.decode()
    # a guest without attest has no measurement to hand out
    daemon.define("plainer", "hello", timeout=20)
    assert daemon.vmctl("start", "plainer").returncode == 0
    daemon.wait_state("plainer", ("stopped", "failed"))
    none = daemon.vmctl("measurement", "plainer")
    assert none.returncode == 1 and "no attested launch" in none.stderr.decode(), none.stderr
    assert daemon.proc.poll() is None


@pytest.mark.timeout(60)
def test_foreground_run_takes_the_owner_session(world):
    _, root, owner, _ = world
    ok = _cli("run", guest("secret"), "-p", "sev-es-emu", "-m", "4M", "-t", "30", "--dh-cert",
              str(owner / "vm_godh.b64"), "--session", str(owner / "vm_session.b64"))
    assert "none injected" in ok.stdout and ok.returncode == 1, ok.stdout + ok.stderr  # exit 3: the empty page
    assert "unwrapped the guest owner's session with the simulated PSP" in ok.stderr and "proves nothing" in ok.stderr
    bad = _cli("run", guest("secret"), "-p", "sev-es-emu", "-m", "4M", "--policy", "NODBG,NOKS", "--dh-cert",
               str(owner / "vm_godh.b64"), "--session", str(owner / "vm_session.b64"))
    assert bad.returncode == 3 and "SEV_RET_POLICY_FAILURE" in bad.stderr, bad.stderr
    attest = _cli("run", guest("secret"), "-p", "sev-es-emu", "--attest")
    assert attest.returncode == 3 and "vmctl start" in attest.stderr, attest.stderr


OVMF = "/usr/share/OVMF/OVMF_CODE_4M.fd"  # Debian's ovmf (make deps installs it)


@pytest.mark.timeout(120)
def test_ovmf_image_needs_a_gpa_and_takes_one(world):
    daemon, root, owner, _ = world
    (daemon.defs / "ovmf.toml").write_text(
        f'firmware = "{OVMF}"\nmemory = "64M"\nplatform = "sev-es-emu"\nattest = true\ntimeout = 60\n'
        f'dh_cert = "{owner / "vm_godh.b64"}"\nsession = "{owner / "vm_session.b64"}"\n')
    info = _start_paused(daemon, "ovmf")
    assert info["secret_gpa"] is None  # Debian's generic OVMF declares its SEV secret block with base 0
    (root / "m-ovmf.json").write_text(json.dumps(info))
    verified = _cli("owner", "verify", "--measurement", str(root / "m-ovmf.json"), "--tik", str(owner / "vm_tik.bin"),
                    "--firmware", OVMF)
    assert verified.returncode == 0 and verified.stdout.startswith("match:"), verified.stdout + verified.stderr
    header, payload = _secret(root, owner, info, "ovmf")
    no_gpa = daemon.vmctl("inject-secret", "ovmf", "--header", str(header), "--secret", str(payload))
    assert no_gpa.returncode == 3 and "give the guest address with --gpa" in no_gpa.stderr.decode()
    with_gpa = daemon.vmctl("inject-secret", "ovmf", "--header", str(header), "--secret", str(payload),
                            "--gpa", "0x800000")
    assert with_gpa.returncode == 0 and "at 0x800000" in with_gpa.stdout.decode(), with_gpa.stderr
    assert daemon.vmctl("stop", "ovmf").returncode == 0
