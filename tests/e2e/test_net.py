"""Guest networking end to end: firmware/guests/net.c on plain and sev-es-emu, a tap in a fresh network namespace,
the host side answered by a UDP socket bound to 10.0.2.2:7777 inside that namespace (the kernel answers ARP).

Both directions are checked: the host socket must receive the guest's datagram from 10.0.2.15:7777, and the guest
must print the reply, which carries a token made up per test run."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import threading

import pytest

from tests.e2e.conftest import REPO, guest
from tests.netns import scratch_netns

IP_FREEBIND = 15  # linux/in.h: bind before the address exists (vmmd puts it on the tap later)


@pytest.fixture
def netns_name():
    from pyroute2 import NetNS

    with scratch_netns("vmmd-test") as name:
        with NetNS(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield name


def in_netns(name, fn):
    from pyroute2 import netns

    netns.pushns(name)
    try:
        return fn()
    finally:
        netns.popns()


class UdpResponder:
    """Bound to 10.0.2.2:7777 in the namespace; answers the first datagram with `reply`."""

    def __init__(self, ns: str, reply: bytes) -> None:
        def make():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
            s.bind(("10.0.2.2", 7777))
            return s

        self.sock = in_netns(ns, make)
        self.sock.settimeout(40)
        self.reply = reply
        self.received: list[tuple[bytes, tuple]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            data, peer = self.sock.recvfrom(4096)
        except OSError:
            return
        self.received.append((data, peer))
        self.sock.sendto(self.reply + data, peer)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def run_in_netns(ns: str, platform: str, net: str, image: str = "net", timeout: float = 40,
                 eventfds: str = "auto", extra: tuple[str, ...] = ()):
    from pyroute2 import netns

    return subprocess.run([sys.executable, "-m", "vmmd.cli", "run", guest(image), "-p", platform, "-t", "30",
                           "--net", net, "--eventfds", eventfds, *extra], preexec_fn=lambda: netns.setns(ns),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def links(ns: str) -> set[str]:
    from pyroute2 import NetNS

    with NetNS(ns) as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def check_exchange(ns: str, platform: str, net: str, eventfds: str = "auto") -> subprocess.CompletedProcess:
    token = secrets.token_hex(4).encode()
    responder = UdpResponder(ns, b"reply " + token + b" to ")
    try:
        proc = run_in_netns(ns, platform, net, eventfds=eventfds)
    finally:
        responder.close()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert responder.received, f"the host never got the guest's datagram\n{out}"
    data, peer = responder.received[0]
    assert data == b"hello from vmmd guest" and peer == ("10.0.2.15", 7777), out
    assert "net: ARP reply: 10.0.2.2 is at fe:" in proc.stdout, out
    assert f'net: UDP reply from 10.0.2.2:7777: "reply {token.decode()} to hello from vmmd guest"' in proc.stdout, out
    assert "net: ok" in proc.stdout
    return proc


@pytest.mark.timeout(60)
def test_plain_tap_with_host_address(netns_name):
    proc = check_exchange(netns_name, "plain", "tap,host-ip=10.0.2.2/24")
    assert "via MMIO" in proc.stdout and "(private RAM)" in proc.stdout
    assert not any(name.startswith("vmmd-") for name in links(netns_name)), "the tap outlived the guest"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("platform", ["plain", "sev-es-emu"])
@pytest.mark.parametrize("eventfds", ["auto", "off"])
def test_the_exchange_is_the_same_on_the_fast_path_and_the_exit_path(netns_name, platform: str, eventfds: str):
    proc = check_exchange(netns_name, platform, "tap,host-ip=10.0.2.2/24", eventfds)
    path = ("notify ioeventfd to the device's own thread, no irqfd" if eventfds == "auto"
            else "notify through the exit path")
    assert f"({path})" in proc.stderr  # firmware guests poll: no irqchip, so no irqfd


@pytest.mark.timeout(60)
def test_sev_es_emu_through_an_existing_bridge(netns_name):
    from pyroute2 import NetNS

    with NetNS(netns_name) as ipr:
        ipr.link("add", ifname="br-test", kind="bridge")
        index = ipr.link_lookup(ifname="br-test")[0]
        ipr.addr("add", index=index, address="10.0.2.2", prefixlen=24)
        ipr.link("set", index=index, state="up")
    proc = check_exchange(netns_name, "sev-es-emu", "tap:br-test")
    assert "via GHCB MMIO events" in proc.stdout and "(shared region)" in proc.stdout
    assert links(netns_name) >= {"br-test"}  # a bridge vmmd did not create stays
    assert not any(name.startswith("vmmd-") for name in links(netns_name))


@pytest.mark.timeout(60)
def test_sev_es_emu_with_a_bridge_it_creates(netns_name):
    proc = check_exchange(netns_name, "sev-es-emu", "tap:vmmdbr0,create-bridge,host-ip=10.0.2.2/24,mtu=1400")
    assert "vmmdbr0" not in links(netns_name), f"the bridge vmmd created outlived the guest\n{proc.stderr}"


@pytest.mark.timeout(60)
def test_no_answer_ends_with_a_clear_failure(netns_name):
    proc = run_in_netns(netns_name, "plain", "tap")  # no address on the host side: nobody answers the ARP
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "net: FAIL no ARP reply after" in proc.stdout


@pytest.mark.timeout(60)
def test_guest_without_net_option_says_so(netns_name):
    proc = subprocess.run([sys.executable, "-m", "vmmd.cli", "run", guest("net"), "-p", "plain", "-t", "20"],
                          capture_output=True, text=True, timeout=40, cwd=REPO)
    assert proc.returncode == 1 and "net: no virtio-net device" in proc.stdout  # guest status 2 -> exit 1


@pytest.mark.timeout(60)
def test_missing_bridge_is_a_host_error(netns_name):
    proc = run_in_netns(netns_name, "plain", "tap:no-such-br")
    assert proc.returncode == 3 and "bridge 'no-such-br' does not exist" in proc.stderr, proc.stderr
    assert not any(name.startswith("vmmd-") for name in links(netns_name))


def test_two_foreground_runs_with_a_tap_each_get_their_own(netns_name):
    """vmctl run names its guest run-PID by default, so its tap (vmmd-run-PID) and MAC differ from any other's."""
    from pyroute2 import netns

    procs = [subprocess.Popen([sys.executable, "-m", "vmmd.cli", "run", guest("spin"), "-p", "plain", "-t", "4",
                               "--net", "tap"], preexec_fn=lambda: netns.setns(netns_name),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    ends = [p.communicate(timeout=40) for p in procs]
    for proc, (_out, err) in zip(procs, ends, strict=True):
        assert proc.returncode == 6, err  # both ran to their timeout; neither failed to make its tap
        assert "guest ended (timeout" in err


def test_a_named_run_keeps_its_name(netns_name):
    r = run_in_netns(netns_name, "plain", "tap", image="hello")
    assert r.returncode == 0, r.stderr
    from pyroute2 import netns

    named = subprocess.run([sys.executable, "-m", "vmmd.cli", "run", guest("hello"), "-p", "plain", "-t", "10",
                            "--net", "tap", "--name", "web1"], preexec_fn=lambda: netns.setns(netns_name),
                           capture_output=True, text=True, timeout=40, cwd=REPO)
    assert named.returncode == 0 and "vmmd-web1" in named.stderr, named.stderr


NET_TX_ETHERTYPE = 0x88B5  # firmware/guests/net-tx.c's frames (local experimental ethertype)
SO_RCVBUFFORCE = 33  # asm-generic/socket.h


@pytest.mark.timeout(120)
@pytest.mark.parametrize("per_notify", [1, 64])
@pytest.mark.parametrize("eventfds", ["auto", "off"])
@pytest.mark.parametrize("platform", ["plain", "sev-es-emu"])
def test_benchmark_guest_frames_all_reach_the_tap(netns_name, platform: str, per_notify: int, eventfds: str):
    """net-tx (scripts/bench/notify.py and net.py) sends every frame, one or a ring per notify, on both paths: each
    arrives on the host side of the tap once, 64 bytes to 02:00:00:00:00:99."""
    frames = 300

    def make():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(NET_TX_ETHERTYPE))
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        s.setblocking(False)
        return s

    capture = in_netns(netns_name, make)
    try:
        proc = run_in_netns(netns_name, platform, "tap,host-ip=10.0.2.2/24", "net-tx", eventfds=eventfds,
                            extra=("--guest-arg", str(per_notify << 32 | frames)))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        via = "GHCB MMIO" if platform == "sev-es-emu" else "MMIO"
        assert f"net-tx: sent {frames} frames, {per_notify} per notify, via {via}\n" in proc.stdout, out
        seen = []
        while True:
            try:
                seen.append(capture.recv(2048))
            except BlockingIOError:
                break
    finally:
        capture.close()
    assert len(seen) == frames, out
    assert all(len(f) == 64 and f[:6] == bytes.fromhex("020000000099") and f[12:14] == b"\x88\xb5" for f in seen)
