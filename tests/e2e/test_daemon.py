"""End to end: the vmmd daemon on a temporary socket, driven through vmctl and the protocol client.

Real guests on real KVM (firmware/build), real worker processes, real peer credentials (a forked client
that drops to uid 65534), real signals. Every guest is tiny; the whole module stays well under a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.as_user import run_as_user
from tests.e2e.conftest import REPO, guest
from vmmd.daemon.protocol import MAX_REQUEST, Client, DaemonError
from vmmd.daemon.server import MAX_CONNECTIONS_PER_UID

NOBODY = 65534
OTHER_UID = 65533


def _free_gid() -> int:
    import grp

    used = {g.gr_gid for g in grp.getgrall()}
    return next(g for g in range(47000, 48000) if g not in used)


class Daemon:
    """A vmmd process with its own socket, definitions, state and log directories."""

    def __init__(self, root: Path, group: int | None = None, stop_timeout: float = 3.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.extra_args = extra_args
        self.socket = str(root / "run" / "vmmd.sock")
        self.defs = root / "vms"
        self.defs.mkdir(exist_ok=True)
        self.group = group
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.notify_sock: socket.socket | None = None

    def define(self, name: str, firmware: str, **extra: object) -> Path:
        lines = [f'firmware = "{guest(firmware)}"', 'memory = "4M"', 'platform = "sev-es-emu"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        path = self.defs / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, notify: bool = False) -> None:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        if notify:
            self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            path = str(self.root / "notify.sock")
            if os.path.exists(path):
                os.unlink(path)
            self.notify_sock.bind(path)
            self.notify_sock.settimeout(10)
            env["NOTIFY_SOCKET"] = path
        args = [sys.executable, "-m", "vmmd.daemon.server", "--socket", self.socket, "--definitions", str(self.defs),
                "--state-dir", str(self.root / "state"), "--log-dir", str(self.root / "log"), "--pool", "4",
                "--stop-timeout", str(self.stop_timeout), *self.extra_args]
        if self.group is not None:
            args += ["--group", str(self.group)]
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=open(self.root / "daemon.err", "ab"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vmmd exited with {self.proc.returncode}: {(self.root / 'daemon.err').read_text()}")
            try:
                with Client(self.socket, 2) as client:
                    client.request("ping")
                return
            except DaemonError:
                time.sleep(0.05)
        pytest.fail("vmmd did not answer within 15 s")

    def client(self, timeout: float | None = 10) -> Client:
        return Client(self.socket, timeout)

    def request(self, op: str, **fields: object) -> dict:
        with self.client(30) as client:
            return client.request(op, **fields)

    def vmctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vmmd.cli", *args, "--socket", self.socket], cwd=REPO,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def wait_state(self, name: str, states: tuple[str, ...], timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.request("show", name=name)["guest"]
            if shown["state"] in states or time.monotonic() > deadline:
                return shown
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@contextlib.contextmanager
def scratch_daemon(prefix: str):
    """A started Daemon in a fresh directory of its own (a group for unprivileged clients), stopped and removed
    afterwards: the module fixture of daemon test files that need no predefined guests."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    d = Daemon(root, group=_free_gid())
    d.start()
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon():
    root = Path(tempfile.mkdtemp(prefix="vmmd-e2e-"))
    os.chmod(root, 0o755)  # the unprivileged client must reach the socket
    gid = _free_gid()
    d = Daemon(root, group=gid)
    d.gid = gid
    for i, firmware in enumerate(["hello", "demo", "ghcb-selftest", "mmio-poke"] * 2):
        d.define(f"g{i}", firmware, timeout=20)
    d.define("tf", "triple-fault")
    d.define("garbage", "ghcb-garbage")
    d.define("term", "ghcb-terminate")
    d.define("spin", "spin")
    d.define("spin2", "spin")
    d.start()
    yield d
    if d.proc.poll() is None:
        d.stop()
    shutil.rmtree(root, ignore_errors=True)


EXPECTED_TEXT = {"hello": "Hello from a vmmd guest", "demo": "vmmd demo guest", "ghcb-selftest": "# done",
                 "mmio-poke": "mmio-poke: 8-byte ok"}


@pytest.mark.timeout(60)
def test_eight_guests_at_once_reach_their_ends(daemon):
    names = [f"g{i}" for i in range(8)]
    replies: dict[str, dict | Exception] = {}

    def start(name: str) -> None:
        try:
            replies[name] = daemon.request("start", name=name)
        except Exception as err:  # noqa: BLE001 - reported below
            replies[name] = err

    threads = [threading.Thread(target=start, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, dict) and r["ok"] for r in replies.values()), replies
    pids = {replies[n]["guest"]["pid"] for n in names}
    assert len(pids) == 8, "each guest must run in its own worker process"
    assert os.getpid() not in pids and daemon.proc.pid not in pids
    for i, name in enumerate(names):
        shown = daemon.wait_state(name, ("stopped", "failed"))
        assert shown["state"] == "stopped", shown
        assert shown["end"]["kind"] == "debug-exit" and shown["end"]["exit_code"] == 0, shown
        console = daemon.vmctl("console", name)
        assert console.returncode == 0, console.stderr
        firmware = ["hello", "demo", "ghcb-selftest", "mmio-poke"][i % 4]
        assert EXPECTED_TEXT[firmware] in console.stdout.decode(), console.stdout
        log = daemon.vmctl("log", name)
        assert EXPECTED_TEXT[firmware] in log.stdout.decode() and "ended (debug-exit)" in log.stdout.decode()
        last_two = daemon.vmctl("log", name, "--tail", "2").stdout.decode()  # lines, as tail -n counts them
        assert last_two.count("\n") == 2 and log.stdout.decode().endswith(last_two), last_two
    table = daemon.vmctl("list")
    assert table.returncode == 0
    rows = {line.split()[0]: line for line in table.stdout.decode().splitlines()[1:]}
    assert all("stopped" in rows[n] and "debug-exit" in rows[n] for n in names), table.stdout
    listed = json.loads(daemon.vmctl("list", "--json").stdout)
    assert {g["name"] for g in listed} >= set(names)


@pytest.mark.timeout(60)
def test_crashing_guests_cost_only_themselves(daemon):
    daemon.request("start", name="spin")
    spin = daemon.wait_state("spin", ("running",))
    assert spin["state"] == "running"
    for name in ("tf", "garbage", "term"):
        daemon.request("start", name=name)
    ends = {name: daemon.wait_state(name, ("stopped", "failed")) for name in ("tf", "garbage", "term")}
    assert ends["tf"]["end"]["kind"] == "shutdown" and ends["tf"]["end"]["exit_code"] == 4, ends["tf"]
    assert "triple-fault" in ends["tf"]["end"]["reason"]
    assert ends["garbage"]["end"]["kind"] == "ghcb-violation", ends["garbage"]
    assert ends["term"]["end"]["kind"] == "sev-term" and ends["term"]["end"]["exit_code"] == 5, ends["term"]
    assert "code 0x42" in ends["term"]["end"]["reason"]
    # A worker that dies by a signal (a crash of the VMM process itself) is reported as such.
    daemon.request("start", name="spin2")
    spin2 = daemon.wait_state("spin2", ("running",))
    os.kill(spin2["pid"], signal.SIGSEGV)
    crashed = daemon.wait_state("spin2", ("stopped", "failed"))
    assert crashed["end"]["kind"] == "killed" and "worker crashed (signal 11" in crashed["end"]["reason"], crashed
    # The daemon and the spinning guest are unaffected; a new guest still runs.
    assert daemon.request("show", name="spin")["guest"]["state"] == "running"
    assert daemon.proc.poll() is None
    ran = daemon.vmctl("start", "g0", "--wait")
    assert ran.returncode == 0, ran.stderr
    # Live console: attach to the spinning guest, stop it from elsewhere, the stream ends with it.
    with daemon.client(timeout=15) as watcher:
        watcher.request("console", name="spin")
        received = watcher.take_buffered()
        while b"spinning forever" not in received:
            received += watcher.sock.recv(4096)
        stopped = daemon.vmctl("stop", "spin")
        assert stopped.returncode == 0, stopped.stderr
        while chunk := watcher.sock.recv(4096):  # EOF when the guest has ended
            received += chunk
    end = daemon.request("show", name="spin")["guest"]["end"]
    assert end["kind"] == "stopped" and "vmctl stop" in end["reason"], end
    again = daemon.vmctl("stop", "spin")
    assert again.returncode == 1 and b"not running" in again.stderr


def _directory(path: Path, mode: int) -> Path:
    path.mkdir(exist_ok=True)
    os.chmod(path, mode)
    return path


def _hello_copy(path: Path, mode: int) -> Path:
    """The hello guest's image at `path`, with `mode`: firmware a test user may or may not read."""
    shutil.copy(guest("hello"), path)
    os.chmod(path, mode)
    return path


@pytest.mark.timeout(60)
def test_unprivileged_client_only_touches_its_own_guests(daemon):
    daemon.request("start", name="g1")  # a root-owned guest
    daemon.wait_state("g1", ("stopped",))
    firmware_dir = _directory(daemon.root / "fw", 0o755)
    mine = _hello_copy(firmware_dir / "hello.bin", 0o644)
    secret = _hello_copy(firmware_dir / "secret.bin", 0o600)
    socket_path = daemon.socket

    def member() -> dict:
        out: dict = {}
        with Client(socket_path) as c:
            out["ping_uid"] = c.request("ping")["uid"]
            out["list"] = [g["name"] for g in c.request("list")["guests"]]
            for op, fields in (("show", {}), ("stop", {}), ("console", {}), ("log", {}), ("start", {}),
                               ("remove", {})):
                try:
                    c.request(op, name="g1", **fields)
                    out[op] = "allowed"
                except DaemonError as err:
                    out[op] = [err.errno, err.message]
            text = f'name = "nobodys"\nfirmware = "{mine}"\nmemory = "4M"\nplatform = "sev-es-emu"\n'
            started = c.request("start", definition={"path": str(firmware_dir / "nobodys.toml"), "text": text})
            out["own_owner"] = started["guest"]["owner"]
            try:
                c.request("start", definition={"path": str(firmware_dir / "x.toml"),
                                               "text": text.replace(str(mine), str(secret)).replace("nobodys", "x")})
                out["secret"] = "allowed"
            except DaemonError as err:
                out["secret"] = [err.errno, err.message]
            try:
                c.request("start", definition={"path": str(firmware_dir / "y.toml"),
                                               "text": text.replace("nobodys", "y") + "owner = 0\n"})
                out["as_root"] = "allowed"
            except DaemonError as err:
                out["as_root"] = [err.errno, err.message]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with Client(socket_path) as c:
                shown = c.request("show", name="nobodys")["guest"]
            if shown["state"] == "stopped":
                break
            time.sleep(0.05)
        out["own_end"] = shown["end"]
        with Client(socket_path) as c:
            out["list_after"] = [g["name"] for g in c.request("list")["guests"]]
        return out

    got = run_as_user(NOBODY, [daemon.gid], member)
    assert "exception" not in got, got
    assert got["ping_uid"] == NOBODY
    assert got["list"] == [] and got["list_after"] == ["nobodys"], got
    for op in ("show", "stop", "console", "log", "start", "remove"):
        assert got[op][0] == "EPERM" and "belongs to uid 0" in got[op][1], (op, got[op])
    assert got["own_owner"] == NOBODY
    assert got["own_end"]["kind"] == "debug-exit", got["own_end"]
    assert got["secret"][0] == "EPERM" and "not readable by uid 65534" in got["secret"][1], got["secret"]
    assert got["as_root"][0] == "EPERM" and "key 'owner'" in got["as_root"][1], got["as_root"]
    # root sees the member's guest and its owner
    assert daemon.request("show", name="nobodys")["guest"]["owner"] == NOBODY

    def outsider() -> dict:
        try:
            Client(socket_path).request("ping")
            return {"connected": True}
        except DaemonError as err:
            return {"errno": err.errno, "message": err.message}

    refused = run_as_user(OTHER_UID, [OTHER_UID], outsider)
    assert refused.get("errno") == "EACCES" and "members of its configured group" in refused["message"], refused
    assert daemon.proc.poll() is None


@pytest.mark.timeout(30)
def test_malformed_and_oversized_requests_get_errors(daemon):
    with daemon.client() as c:
        for raw, errno in ((b"not json\n", "EINVAL"), (b"[1,2]\n", "EINVAL"), (b'{"op":"reboot"}\n', "EOPNOTSUPP"),
                           (b'{"op":"show"}\n', "EINVAL"), (b'{"op":"show","name":"../etc"}\n', "EINVAL"),
                           (b'{"op":"stop","name":"g0","force":"yes"}\n', "EINVAL"),
                           (b'{"op":"list","uid":0}\n', "EINVAL"), (b"\xff\xfe\x00garbage\n", "EINVAL"),
                           (b'{"op":"show","name":"nope"}\n', "ENOENT")):
            c.send_raw(raw)
            reply = c.read_reply()
            assert reply["ok"] is False and reply["errno"] == errno, (raw, reply)
            assert reply["error"]
        assert c.request("ping")["ok"]  # the same connection still works
    with daemon.client() as c:
        c.send_raw(b'{"op":"ping","pad":"' + b"x" * (MAX_REQUEST + 10) + b'"}\n')
        reply = c.read_reply()
        assert reply["errno"] == "EMSGSIZE", reply
        assert c.sock.recv(10) == b""  # and that connection is closed
    for _ in range(20):  # clients that vanish mid-request
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.socket)
        s.sendall(b'{"op":"li')
        s.close()
    assert daemon.request("ping")["ok"] and daemon.proc.poll() is None


@pytest.mark.timeout(60)
def test_firmware_is_checked_on_every_start_against_the_file_opened(daemon):
    """A member's ad-hoc guest points at a symlink the member owns. Re-pointed at a world-readable file in a
    directory the member cannot search, a later `start NAME` is refused: the daemon opens the firmware
    itself and checks the opened file for the requester, at every start. A missing firmware is refused
    at `start` with its path, and the guest keeps its state."""
    work = _directory(daemon.root / "swap", 0o777)
    secret = _hello_copy(_directory(daemon.root / "hidden", 0o700) / "hello.bin", 0o644)
    readable = _hello_copy(work / "hello.bin", 0o644)
    socket_path = str(daemon.socket)

    def member() -> dict:
        link = work / "fw.bin"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(readable)
        text = f'name = "swapper"\nfirmware = "{link}"\nmemory = "4M"\nplatform = "plain"\ntimeout = 20\n'
        out: dict = {}
        with Client(socket_path) as c:
            out["first"] = c.request("start", definition={"path": str(work / "swapper.toml"), "text": text})["ok"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with Client(socket_path) as c:
                if c.request("show", name="swapper")["guest"]["state"] == "stopped":
                    break
            time.sleep(0.05)
        link.unlink()
        link.symlink_to(secret)
        try:
            with Client(socket_path) as c:
                c.request("start", name="swapper")
            out["second"] = "allowed"
        except DaemonError as err:
            out["second"] = [err.errno, err.message]
        return out

    got = run_as_user(NOBODY, [daemon.gid], member)
    assert got.get("first") is True, got
    assert got["second"][0] == "EPERM" and "not readable by uid 65534" in got["second"][1], got
    assert daemon.request("show", name="swapper")["guest"]["end"]["kind"] == "debug-exit"

    missing = daemon.define("lost", "hello")
    missing.write_text(missing.read_text().replace(guest("hello"), str(daemon.root / "nowhere.bin")))
    before = daemon.request("show", name="lost")["guest"]["state"]
    r = daemon.vmctl("start", "lost")
    assert r.returncode == 3 and b"nowhere.bin" in r.stderr and b"No such file" in r.stderr
    assert daemon.request("show", name="lost")["guest"]["state"] == before


@pytest.mark.timeout(60)
def test_attach_and_console_say_how_the_guest_ended_or_failed(daemon, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x90" * (6 << 20))  # more than a 4M guest has room for: the worker's loader refuses it
    os.chmod(tmp_path, 0o755)
    failing = daemon.define("toobig", "hello")
    failing.write_text(failing.read_text().replace(guest("hello"), str(big)))
    r = daemon.vmctl("start", "toobig", "--attach")
    assert r.returncode == 3 and b"guest toobig failed:" in r.stderr and b"more memory" in r.stderr, r.stderr
    ok = daemon.vmctl("start", "g2", "--attach")
    assert ok.returncode == 0 and b"guest g2 ended (debug-exit" in ok.stderr, ok.stderr
    history = daemon.vmctl("console", "g2")
    assert history.returncode == 0 and b"guest g2 is stopped: its console history follows" in history.stderr
    assert EXPECTED_TEXT["ghcb-selftest"].encode() in history.stdout


@pytest.mark.timeout(60)
def test_console_input_sent_at_once_reaches_the_guest_whole(daemon):
    """A pasted line (one message of 40 bytes, more than the UART's 16-byte FIFO) is fed as the guest reads."""
    daemon.define("echo", "echo", timeout=20)
    daemon.request("start", name="echo")
    daemon.wait_state("echo", ("running",))
    line = b"pasted line longer than sixteen bytes!!"
    with daemon.client(None) as client:
        client.request("console", name="echo", replay=True)
        client.sock.settimeout(15)
        client.sock.sendall(line + b"q")
        seen = client.take_buffered()
        while b"echo: bye" not in seen:
            chunk = client.sock.recv(4096)
            if not chunk:
                break
            seen += chunk
    assert line in seen, seen
    end = daemon.wait_state("echo", ("stopped",))["end"]
    assert end["kind"] == "debug-exit" and end["details"]["console_input_stored"] == len(line) + 1, end


def _read_error(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


@pytest.mark.timeout(60)
def test_one_uid_cannot_hold_every_connection(daemon):
    socket_path = daemon.socket

    def member() -> dict:
        held = []
        try:
            for _ in range(MAX_CONNECTIONS_PER_UID):
                c = Client(socket_path)
                c.request("ping")  # answered: this connection is counted
                held.append(c)
            extra = socket.socket(socket.AF_UNIX)
            extra.connect(socket_path)
            refused = _read_error(extra)
            after_eof = extra.recv(10)
            extra.close()
        finally:
            for c in held:
                c.close()
        time.sleep(0.2)
        with Client(socket_path) as c:
            again = c.request("ping")["ok"]
        return {"refused": refused, "eof": after_eof.decode(), "again": again}

    got = run_as_user(NOBODY, [daemon.gid], member)
    assert "exception" not in got, got
    assert got["refused"]["errno"] == "EAGAIN" and f"limit is {MAX_CONNECTIONS_PER_UID}" in got["refused"]["error"]
    assert got["eof"] == "" and got["again"] is True
    assert daemon.request("ping")["ok"]  # root was never limited by it


@pytest.mark.timeout(60)
def test_idle_and_trickling_connections_are_closed():
    root = Path(tempfile.mkdtemp(prefix="vmmd-e2e-idle-"))
    d = Daemon(root, extra_args=("--idle-timeout", "0.5", "--pool", "0"))
    d.start()
    try:
        idle = socket.socket(socket.AF_UNIX)
        idle.connect(d.socket)
        trickle = socket.socket(socket.AF_UNIX)
        trickle.connect(d.socket)
        trickle.sendall(b'{"op":')
        started = time.monotonic()
        for s in (idle, trickle):
            reply = _read_error(s)
            assert reply["errno"] == "ETIMEDOUT" and "0.5 s" in reply["error"], reply
            assert s.recv(10) == b""
            s.close()
        assert time.monotonic() - started < 5
        with d.client() as c:  # a client that keeps asking is not idle
            for _ in range(4):
                assert c.request("ping")["ok"]
                time.sleep(0.3)
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(30)
def test_bad_definition_is_named(daemon, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'firmware = "{guest("hello")}"\nplatform = "sev-snp"\n')
    r = daemon.vmctl("start", "-f", str(bad))
    assert r.returncode == 3
    assert f"{bad}: key 'platform'" in r.stderr.decode() and "sev-es-emu" in r.stderr.decode()
    missing = daemon.vmctl("start", "no-such-guest")
    assert missing.returncode == 1 and b"no guest named" in missing.stderr
    (daemon.defs / "broken.toml").write_text(f'firmware = "{guest("hello")}"\nmemroy = "4M"\n')
    broken = daemon.vmctl("start", "broken")  # the file exists but is skipped: say why
    assert broken.returncode == 3 and b"broken.toml: key 'memroy': unknown key" in broken.stderr, broken.stderr
    (daemon.defs / "broken.toml").unlink()


@pytest.mark.timeout(60)
def test_remove_forgets_a_stopped_adhoc_guest_and_nothing_else(daemon, tmp_path):
    definition = tmp_path / "adhoc-rm.toml"
    definition.write_text(f'firmware = "{guest("hello")}"\nmemory = "4M"\nplatform = "plain"\ntimeout = 20\n')
    assert daemon.vmctl("start", "-f", str(definition), "--wait").returncode == 0
    log = daemon.root / "log" / "adhoc-rm.log"
    assert log.exists()

    defined = daemon.vmctl("remove", "g0")
    assert defined.returncode == 1 and b"defined by" in defined.stderr and b"systemctl reload" in defined.stderr

    spin = tmp_path / "adhoc-spin.toml"
    spin.write_text(f'firmware = "{guest("spin")}"\nmemory = "4M"\nplatform = "plain"\ntimeout = 20\n')
    assert daemon.vmctl("start", "-f", str(spin)).returncode == 0
    daemon.wait_state("adhoc-spin", ("running",))
    busy = daemon.vmctl("remove", "adhoc-spin")
    assert busy.returncode == 1 and b"vmctl stop adhoc-spin" in busy.stderr
    for bad in ("-1", "0", "nan", "601"):  # the rule `vmctl run -t` follows: above 0, bounded
        refused = daemon.vmctl("stop", "adhoc-spin", "--timeout", bad)
        assert refused.returncode == 3 and b"--timeout must be a number of seconds above 0" in refused.stderr, bad
    with pytest.raises(DaemonError) as err:  # a client that skips vmctl's check meets the daemon's
        daemon.request("stop", name="adhoc-spin", timeout=-1)
    assert err.value.errno == "EINVAL"
    assert daemon.wait_state("adhoc-spin", ("running",))
    stopped = daemon.vmctl("stop", "adhoc-spin", "--timeout", "5")
    assert stopped.returncode == 0 and b"guest adhoc-spin ended (stopped" in stopped.stderr, stopped.stderr

    removed = daemon.vmctl("remove", "adhoc-rm")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.decode().startswith("removed guest adhoc-rm and its log")
    assert not log.exists()
    names = [g["name"] for g in daemon.request("list")["guests"]]
    assert "adhoc-rm" not in names and "g0" in names and "adhoc-spin" in names
    state = json.loads((daemon.root / "state" / "guests.json").read_text())
    assert "adhoc-rm" not in [g["name"] for g in state["guests"]]
    again = daemon.vmctl("remove", "adhoc-rm")
    assert again.returncode == 1 and b"no guest named 'adhoc-rm'" in again.stderr
    assert daemon.vmctl("remove", "adhoc-spin").returncode == 0
    assert daemon.proc.poll() is None


@pytest.mark.timeout(60)
def test_restart_keeps_definitions_and_reports_honestly():
    root = Path(tempfile.mkdtemp(prefix="vmmd-restart-"))
    d = Daemon(root, stop_timeout=2.0)
    try:
        d.define("hi", "hello")
        d.define("loop", "spin")
        d.start(notify=True)
        assert b"READY=1" in d.notify_sock.recv(4096)
        adhoc = root / "adhoc.toml"
        adhoc.write_text(f'name = "adhoc"\nfirmware = "{guest("hello")}"\nmemory = "4M"\nplatform = "sev-es-emu"\n')
        assert d.vmctl("start", "-f", str(adhoc), "--wait").returncode == 0
        assert d.vmctl("start", "hi", "--wait").returncode == 0
        d.request("start", name="loop")
        loop_pid = d.wait_state("loop", ("running",))["pid"]
        # The daemon dies hard: its workers die with it, and the next daemon says so.
        d.stop(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{loop_pid}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{loop_pid}"), "the worker outlived its daemon"
        d.start(notify=True)
        guests = {g["name"]: g for g in d.request("list")["guests"]}
        assert set(guests) == {"hi", "loop", "adhoc"}, guests
        assert guests["hi"]["state"] == "stopped" and guests["hi"]["end"]["kind"] == "debug-exit"
        assert guests["adhoc"]["state"] == "stopped" and guests["adhoc"]["adhoc"]
        assert guests["loop"]["state"] == "stopped" and guests["loop"]["end"]["kind"] == "killed", guests["loop"]
        assert "vmmd exited while the guest was running" in guests["loop"]["end"]["reason"]
        # Graceful shutdown: SIGTERM stops running guests with a reason, tells systemd, exits 0.
        d.request("start", name="loop")
        d.wait_state("loop", ("running",))
        while b"READY=1" not in d.notify_sock.recv(4096):
            pass
        assert d.stop(signal.SIGTERM) == 0
        messages = b""
        d.notify_sock.settimeout(1)
        try:
            while True:
                messages += d.notify_sock.recv(4096)
        except TimeoutError:
            pass
        assert b"STOPPING=1" in messages
        d.start()
        loop = d.request("show", name="loop")["guest"]
        assert loop["end"]["kind"] == "stopped" and "vmmd shutdown (SIGTERM)" in loop["end"]["reason"], loop
        assert d.request("show", name="adhoc")["guest"]["definition"]["firmware"] == guest("hello")
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(30)
def test_console_attach_types_to_the_guest_and_detaches_with_ctrl_bracket(daemon):
    import pty
    import select as select_mod

    daemon.request("start", name="spin2")
    daemon.wait_state("spin2", ("running",))
    pid, fd = pty.fork()
    if pid == 0:  # vmctl on a real terminal, as a user runs it
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "vmmd.cli", "console", "spin2", "--socket", daemon.socket])
    seen = b""

    def read_until(token: bytes, timeout: float = 10) -> bytes:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while token not in seen and time.monotonic() < deadline:
            ready, _, _ = select_mod.select([fd], [], [], 0.1)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        return seen

    assert b"spinning forever" in read_until(b"spinning forever"), seen
    os.write(fd, b"abc")
    time.sleep(0.3)
    os.write(fd, b"\x1d")  # Ctrl-]
    assert b"detached from spin2" in read_until(b"detached from spin2"), seen
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert daemon.request("show", name="spin2")["guest"]["state"] == "running"  # detaching leaves it running
    daemon.request("stop", name="spin2")
    end = daemon.request("show", name="spin2")["guest"]["end"]
    assert end["kind"] == "stopped"
    assert end["details"]["console_input_bytes"] == 3, end  # the typed bytes reached the guest's UART


@pytest.mark.timeout(90)
def test_stops_racing_a_start_or_each_other_end_the_guest_once_and_honestly():
    """A stop --force that arrives while a start waits for a worker ends the guest before it runs; a plain stop
    after a force does not turn the end into a crash report; a stop of a start that fails returns at once."""
    root = Path(tempfile.mkdtemp(prefix="vmmd-e2e-race-"))
    d = Daemon(root, extra_args=("--pool", "0"))
    d.define("spin", "spin", timeout=30)
    d.start()
    try:
        zygote = d.request("ping")["zygote"]
        os.kill(zygote, signal.SIGSTOP)  # the start below waits for a fork
        starter = threading.Thread(target=lambda: d.vmctl("start", "spin"))
        starter.start()
        assert d.wait_state("spin", ("starting",), timeout=5)["state"] == "starting"
        forced = d.vmctl("stop", "spin", "--force", "--timeout", "1")
        os.kill(zygote, signal.SIGCONT)
        starter.join(30)
        shown = d.request("show", name="spin")["guest"]
        assert shown["state"] == "stopped" and shown["end"]["kind"] == "killed", shown
        assert "before it started" in shown["end"]["reason"], shown
        assert forced.returncode in (0, 1), forced.stderr

        d.request("start", name="spin")
        d.wait_state("spin", ("running",))
        first = d.vmctl("stop", "spin", "--force")
        second = d.vmctl("stop", "spin")  # a later plain stop must not downgrade the kill
        end = d.request("show", name="spin")["guest"]["end"]
        assert end["kind"] == "killed" and "vmctl stop --force" in end["reason"], (end, first.stderr, second.stderr)
    finally:
        try:
            os.kill(zygote, signal.SIGCONT)
        except (OSError, UnboundLocalError):
            pass
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(90)
def test_a_killed_zygote_is_replaced_and_its_guests_end_honestly():
    root = Path(tempfile.mkdtemp(prefix="vmmd-e2e-zygote-"))
    d = Daemon(root, extra_args=("--pool", "1"))
    d.define("spin", "spin", timeout=30)
    d.define("hello", "hello", timeout=20)
    d.start()
    try:
        d.request("start", name="spin")
        d.wait_state("spin", ("running",))
        old = d.request("ping")["zygote"]
        os.kill(old, signal.SIGKILL)
        end = d.wait_state("spin", ("stopped", "failed"), timeout=20)["end"]
        assert end["kind"] == "killed" and f"zygote (pid {old}) died" in end["reason"], end
        deadline = time.monotonic() + 20
        while True:
            ping = d.request("ping")
            if ping["zygote_alive"] and ping["zygote"] != old:
                break
            assert time.monotonic() < deadline, ping
            time.sleep(0.1)
        assert ping["zygote_restarts"] == 1
        r = d.vmctl("start", "hello", "--wait")
        assert r.returncode == 0, r.stderr  # starts work again with the new zygote
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(60)
def test_a_member_may_keep_a_bounded_number_of_adhoc_guests():
    from vmmd.daemon.server import MAX_ADHOC_PER_UID

    root = Path(tempfile.mkdtemp(prefix="vmmd-e2e-quota-"))
    os.chmod(root, 0o755)
    gid = _free_gid()
    fw = _hello_copy(_directory(root / "fw", 0o755) / "hello.bin", 0o644)
    text = f'firmware = "{fw}"\nmemory = "4M"\nplatform = "plain"\n'
    (root / "state").mkdir()
    saved = [{"name": f"mine{i}", "adhoc": True, "owner": NOBODY, "state": "stopped",
              "source": str(root / "fw" / f"mine{i}.toml"), "text": text} for i in range(MAX_ADHOC_PER_UID)]
    (root / "state" / "guests.json").write_text(json.dumps({"version": 1, "guests": saved}))
    d = Daemon(root, group=gid, extra_args=("--pool", "0"))
    d.start()
    socket_path = d.socket
    try:
        def member() -> dict:
            with Client(socket_path) as c:
                try:
                    c.request("start", definition={"path": str(root / "fw" / "one-more.toml"), "text": text})
                    return {"started": True}
                except DaemonError as err:
                    return {"errno": err.errno, "message": err.message}

        got = run_as_user(NOBODY, [gid], member)
        assert got.get("errno") == "EDQUOT" and "vmctl remove" in got["message"], got
        assert len([g for g in d.request("list")["guests"] if g["name"].startswith("mine")]) == MAX_ADHOC_PER_UID
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(60)
def test_list_shows_the_platform_an_auto_guest_runs_on(daemon, tmp_path):
    from vmmd.platforms import select_platform

    actual = select_platform("auto")[0].name  # sev-es-emu here, sev-es on an SEV-ES host
    definition = tmp_path / "auto.toml"
    definition.write_text(f'firmware = "{guest("hello")}"\nmemory = "4M"\nplatform = "auto"\ntimeout = 20\n')
    assert daemon.vmctl("start", "-f", str(definition), "--wait").returncode == 0
    row = next(line for line in daemon.vmctl("list").stdout.decode().splitlines() if line.startswith("auto "))
    assert row.split()[3] == actual, row
    shown = daemon.request("show", name="auto")["guest"]
    assert shown["platform"] == actual and shown["definition"]["platform"] == "auto"


def test_a_second_vmmd_on_the_same_state_directory_is_refused(daemon):
    other_socket = daemon.root / "run" / "second.sock"
    proc = subprocess.run([sys.executable, "-m", "vmmd.daemon.server", "--socket", str(other_socket),
                           "--definitions", str(daemon.defs), "--state-dir", str(daemon.root / "state"),
                           "--log-dir", str(daemon.root / "log2"), "--pool", "0"],
                          cwd=REPO, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    message = proc.stderr.decode()
    assert f"is in use by another vmmd (pid {daemon.proc.pid})" in message and "--state-dir" in message, message
    assert "Traceback" not in message and not other_socket.exists()
    assert daemon.request("ping")["ok"] and daemon.proc.poll() is None


def test_vmctl_reload_rereads_definitions_and_names_the_bad_ones(daemon):
    good = daemon.define("reloaded", "hello", timeout=20)
    bad = daemon.defs / "broken.toml"
    bad.write_text('firmware = "x.bin"\nvcpus = 0\n')
    try:
        r = daemon.vmctl("reload")
        assert r.returncode == 3, r.stderr
        assert f"{bad}: key 'vcpus'" in r.stderr.decode() and "guests defined" in r.stderr.decode()
        assert "reloaded" in {g["name"] for g in daemon.request("list")["guests"]}
    finally:
        bad.unlink()
        good.unlink()
    r = daemon.vmctl("reload", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["errors"] == []
    assert "reloaded" not in {g["name"] for g in daemon.request("list")["guests"]}


def test_version_of_both_commands_is_the_package_version():
    from importlib.metadata import version

    for command in (["-m", "vmmd.cli", "--version"], ["-m", "vmmd.daemon.server", "--version"]):
        out = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=30, cwd=REPO)
        assert out.returncode == 0 and out.stdout.split()[-1] == version("vmmd"), out
