"""Tap naming, MAC derivation, --net parsing (pure), and real taps in a private network namespace: flags,
configuration, removal on close, and the daemon's start-up sweep after a worker is killed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.netns import scratch_netns
from vmmd.errors import VmmdError
from vmmd.net import names
from vmmd.net.attach import parse_net_spec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- pure ------------------------------------------------------------------------------------------------------------
def test_tap_name_fits_ifnamsiz_and_is_stable():
    assert names.tap_name("web") == "vmmd-web"
    long = names.tap_name("a-very-long-guest-name-indeed")
    assert len(long) <= 15 and long.startswith("vmmd-")
    assert long == names.tap_name("a-very-long-guest-name-indeed")
    assert long != names.tap_name("a-very-long-guest-name-other")
    odd = names.tap_name("we/ird name")
    assert len(odd) <= 15 and "/" not in odd and " " not in odd


def test_mac_is_stable_unicast_and_locally_administered():
    mac = names.guest_mac("web")
    assert mac == names.guest_mac("web") and mac != names.guest_mac("db")
    assert len(mac) == 6 and not mac[0] & 1 and mac[0] & 2
    assert names.host_mac("web")[1:] == mac[1:] and names.host_mac("web")[0] == 0xFE


def test_parse_mac():
    assert names.parse_mac("02:11:22:33:44:55") == bytes.fromhex("021122334455")
    for bad in ("01:00:5e:00:00:01", "02:11:22:33:44", "zz:11:22:33:44:55"):
        with pytest.raises(ValueError):
            names.parse_mac(bad)


def test_owner_alias_round_trip():
    alias = names.owner_alias("tap", 1234, "web")
    assert names.parse_owner_alias(alias) == ("tap", 1234, "web")
    assert names.parse_owner_alias("my uplink") is None and names.parse_owner_alias(None) is None


def test_parse_net_spec():
    spec = parse_net_spec("tap:br0,create-bridge,mac=02:00:00:00:00:01,mtu=1400,vnet-hdr,host-ip=10.0.2.2/24")
    assert (spec.bridge, spec.create_bridge, spec.mac, spec.mtu, spec.vnet_hdr, spec.host_ip) == (
        "br0", True, bytes.fromhex("020000000001"), 1400, True, "10.0.2.2/24")
    assert parse_net_spec("tap").bridge is None
    assert parse_net_spec("tap").vhost == "auto" and parse_net_spec("tap,vhost=on").vhost == "on"
    for bad in ("user", "tap,mtu=10", "tap,create-bridge", "tap,vhost=yes", "tap,vhost", "tap,colour=red",
                "tap,host-ip=10.0.2.300/24", "tap:" + "x" * 20):
        with pytest.raises(VmmdError):
            parse_net_spec(bad)
    with pytest.raises(VmmdError, match="MTU 'abc' is not a number"):
        parse_net_spec("tap,mtu=abc")


# --- real taps -------------------------------------------------------------------------------------------------------
@pytest.fixture
def ns():
    from pyroute2 import netns

    with scratch_netns("vmmd-tap") as name:
        netns.pushns(name)  # this thread now lives in the namespace: every tap and IPRoute below is created there
        try:
            yield name
        finally:
            netns.popns()


def link(name):
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        return ipr.get_links(found[0])[0] if found else None


@pytest.mark.timeout(60)
def test_open_and_configure_tap(ns):
    from vmmd.net import tap

    t = tap.open_tap("vmmd-t1", vnet_hdr=True)
    try:
        tap.configure_tap(t, mac=names.host_mac("t1"), mtu=1400, alias=names.owner_alias("tap", os.getpid(), "t1"),
                          bridge=None, host_ip="10.9.0.1/24")
        li = link("vmmd-t1")
        assert li.get_attr("IFLA_MTU") == 1400
        assert li.get_attr("IFLA_ADDRESS") == names.format_mac(names.host_mac("t1"))
        assert names.parse_owner_alias(li.get_attr("IFLA_IFALIAS")) == ("tap", os.getpid(), "t1")
        assert li["flags"] & 1  # IFF_UP
        with open(f"/proc/self/fdinfo/{t.fd}") as info:
            flags = [line for line in info if line.startswith("iff:")][0]
        assert "vmmd-t1" in flags
    finally:
        t.close()
    assert link("vmmd-t1") is None  # not persistent: gone with its fd


@pytest.mark.timeout(60)
def test_tap_name_in_use_is_a_clear_error(ns):
    from vmmd.net import tap

    t = tap.open_tap("vmmd-busy")
    try:
        with pytest.raises(VmmdError, match="TUNSETIFF for tap 'vmmd-busy' failed"):
            tap.open_tap("vmmd-busy")
    finally:
        t.close()


@pytest.mark.timeout(60)
def test_sweep_after_a_killed_worker(ns):
    """A worker that made a bridge and a tap is SIGKILLed: its tap dies with it, the sweep removes the bridge,
    a persistent tap it left, and nothing that is not marked as vmmd's or whose owner is alive."""
    from pyroute2 import IPRoute

    from vmmd.net import tap

    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from pyroute2 import netns, IPRoute
        netns.setns({ns!r})
        from vmmd.net import names, tap
        pid = os.getpid()
        tap.create_bridge("vmmdbr-k", names.owner_alias("bridge", pid, "k"))
        t = tap.open_tap("vmmd-k")
        tap.configure_tap(t, mac=names.host_mac("k"), mtu=None, alias=names.owner_alias("tap", pid, "k"),
                          bridge="vmmdbr-k", host_ip=None)
        with IPRoute() as ipr:  # a persistent tap, as a crashed worker could leave with TUNSETPERSIST
            ipr.link("add", ifname="vmmd-kp", kind="tuntap", mode="tap")
            ipr.link("set", index=ipr.link_lookup(ifname="vmmd-kp")[0], ifalias=names.owner_alias("tap", pid, "kp"))
        os.kill(pid, signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=30)
    assert proc.returncode == -9, proc.stderr
    with IPRoute() as ipr:
        ipr.link("add", ifname="vmmd-foreign", kind="tuntap", mode="tap")  # our prefix, no alias: not ours
        ipr.link("add", ifname="vmmd-live", kind="tuntap", mode="tap")  # owner alive: not stale
        ipr.link("set", index=ipr.link_lookup(ifname="vmmd-live")[0],
                 ifalias=names.owner_alias("tap", os.getpid(), "live"))
    assert link("vmmd-k") is None  # the kernel removed the non-persistent tap with the process
    assert link("vmmdbr-k") is not None and link("vmmd-kp") is not None
    removed = tap.sweep_stale_taps("vmmd-")
    assert sorted(removed) == ["vmmd-kp", "vmmdbr-k"]
    assert link("vmmdbr-k") is None and link("vmmd-kp") is None
    assert link("vmmd-foreign") is not None and link("vmmd-live") is not None
    assert tap.sweep_stale_taps("vmmd-") == []


@pytest.mark.timeout(60)
def test_the_daemon_sweeps_stale_links_when_it_starts(ns, tmp_path):
    """vmmd started in a namespace holding a tap whose owner is dead removes it and says so."""
    import signal
    import time

    from pyroute2 import IPRoute

    from vmmd.daemon.protocol import Client, DaemonError

    dead_pid = subprocess.Popen(["true"])  # its pid is free once it has been waited for
    dead_pid.wait()
    with IPRoute() as ipr:
        ipr.link("add", ifname="vmmd-dead", kind="tuntap", mode="tap")
        ipr.link("set", index=ipr.link_lookup(ifname="vmmd-dead")[0],
                 ifalias=names.owner_alias("tap", dead_pid.pid, "dead"))
    socket_path = str(tmp_path / "v.sock")
    err = tmp_path / "daemon.err"
    daemon = subprocess.Popen([sys.executable, "-m", "vmmd.daemon.server", "--socket", socket_path, "--definitions",
                               str(tmp_path / "vms"), "--state-dir", str(tmp_path / "state"), "--log-dir",
                               str(tmp_path / "log"), "--pool", "0"], cwd=REPO, stderr=open(err, "wb"))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(socket_path, 2) as client:
                    client.request("ping")
                break
            except DaemonError:
                assert time.monotonic() < deadline and daemon.poll() is None, err.read_text()
                time.sleep(0.05)
        assert link("vmmd-dead") is None
        text = err.read_text()
        assert "removed network links left by dead workers: vmmd-dead" in text and "could not sweep" not in text
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
