"""Tap devices: /dev/net/tun for the fd, rtnetlink (pyroute2) for everything else; the start-up sweep.

Owns: opening a tap (TUNSETIFF with IFF_TAP | IFF_NO_PI, optionally IFF_VNET_HDR
plus TUNSETVNETHDRSZ 12), setting MTU / MAC / ifalias / up / master, creating and
removing bridges vmmd made, and `sweep_stale_taps()`. No `ip` command is ever run.

Ioctl numbers and flags mirror include/uapi/linux/if_tun.h; struct ifreq is
include/uapi/linux/if.h (16-byte name + 24-byte union; ifr_flags is a short).
The tap is not persistent (no TUNSETPERSIST): if the process dies the kernel
removes it when the last fd closes. Links vmmd made carry an owner alias
(vmmd.net.names) so the daemon's sweep finds what a crash left behind (bridges,
or taps whose fd was inherited by a surviving child).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass

from ioctl_opt import IOW

from vmmd.errors import VmmdError
from vmmd.net import names

log = logging.getLogger("vmmd.net")

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = IOW(ord("T"), 202, ctypes.c_int)  # if_tun.h: _IOW('T', 202, int)
TUNSETVNETHDRSZ = IOW(ord("T"), 216, ctypes.c_int)  # if_tun.h: _IOW('T', 216, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name[IFNAMSIZ], ifr_flags, rest of the 24-byte union


def net_admin_unavailable_reason() -> str | None:
    """None when this process can create taps, else why not (for tests that must skip)."""
    if not os.path.exists(TUN_DEVICE):
        return f"{TUN_DEVICE} does not exist (load the tun module: modprobe tun)"
    if not os.access(TUN_DEVICE, os.R_OK | os.W_OK):
        return f"{TUN_DEVICE} is not accessible to this user"
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    if not int(line.split()[1], 16) & (1 << 12):  # CAP_NET_ADMIN = 12
                        return "this process lacks CAP_NET_ADMIN (needed to create taps and bridges)"
    except OSError:
        pass
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "pyroute2 is not installed (pip install pyroute2)"
    return None


def _ipr():
    from pyroute2 import IPRoute  # imported late: only guests with a network pay for it

    return IPRoute()


@dataclass
class Tap:
    fd: int
    name: str
    vnet_hdr: bool

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tap(name: str, vnet_hdr: bool = False) -> Tap:
    """A non-blocking, close-on-exec tap fd named `name` (TUNSETIFF; the kernel creates the link)."""
    if len(name.encode()) >= names.IFNAMSIZ:
        raise VmmdError(f"tap name {name!r} is longer than {names.IFNAMSIZ - 1} characters")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VmmdError(f"{TUN_DEVICE} does not exist: load the tun module (modprobe tun)") from None
    except PermissionError:
        raise VmmdError(f"opening {TUN_DEVICE} was refused: run vmmd as root or with CAP_NET_ADMIN") from None
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        answer = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 12))  # struct virtio_net_hdr_v1
    except OSError as err:
        os.close(fd)
        hint = {errno.EPERM: "run vmmd as root or with CAP_NET_ADMIN",
                errno.EBUSY: "another process owns a tap of that name (is the guest running already?)",
                errno.EINVAL: "the name is invalid or in use by a link that is not a tap"}.get(err.errno, "")
        raise VmmdError(f"TUNSETIFF for tap {name!r} failed: {os.strerror(err.errno)}"
                        + (f": {hint}" if hint else "")) from None
    actual = _IFREQ.unpack(answer)[0].rstrip(b"\0").decode()
    return Tap(fd, actual, vnet_hdr)


def _link_index(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def configure_tap(tap: Tap, *, mac: bytes, mtu: int | None, alias: str, bridge: str | None,
                  host_ip: str | None) -> None:
    """MTU, MAC, owner alias, master bridge, optional address on the tap; then up."""
    with _ipr() as ipr:
        index = _link_index(ipr, tap.name)
        if index is None:
            raise VmmdError(f"tap {tap.name} vanished right after it was created")
        attrs = {"address": names.format_mac(mac), "ifalias": alias}
        if mtu:
            attrs["mtu"] = mtu
        ipr.link("set", index=index, **attrs)
        if bridge is not None:
            master = _link_index(ipr, bridge)
            if master is None:
                raise VmmdError(f"bridge {bridge!r} does not exist: create it, or add create-bridge to --net")
            ipr.link("set", index=index, master=master)
        if host_ip is not None:
            address, prefixlen = _split_cidr(host_ip)
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")


def create_bridge(name: str, alias: str, host_ip: str | None = None, mtu: int | None = None) -> bool:
    """Create bridge `name` (up, marked with `alias`) unless it exists; True when this call created it."""
    with _ipr() as ipr:
        if _link_index(ipr, name) is not None:
            return False
        try:
            ipr.link("add", ifname=name, kind="bridge")
        except Exception as err:  # pyroute2 NetlinkError
            raise VmmdError(f"creating bridge {name!r} failed: {err}") from None
        index = _link_index(ipr, name)
        ipr.link("set", index=index, ifalias=alias, **({"mtu": mtu} if mtu else {}))
        if host_ip is not None:
            address, prefixlen = _split_cidr(host_ip)
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
        return True


def _split_cidr(text: str) -> tuple[str, int]:
    import ipaddress

    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as err:
        raise VmmdError(f"host-ip {text!r} is not an IPv4 address/prefix ({err})") from None
    return str(iface.ip), iface.network.prefixlen


def delete_link(name: str) -> bool:
    """Remove link `name` if it exists; True when it was removed."""
    with _ipr() as ipr:
        index = _link_index(ipr, name)
        if index is None:
            return False
        try:
            ipr.link("del", index=index)
        except Exception as err:  # noqa: BLE001 - gone meanwhile (ENODEV) is fine
            if getattr(err, "code", None) != errno.ENODEV:
                raise
            return False
        return True


def bridge_has_ports(name: str) -> bool:
    with _ipr() as ipr:
        index = _link_index(ipr, name)
        if index is None:
            return False
        return any(link.get_attr("IFLA_MASTER") == index for link in ipr.get_links())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_taps(prefix: str = names.TAP_PREFIX, only_dead_owners: bool = True) -> list[str]:
    """Remove links a vmmd worker left behind; returns their names. Call at daemon start.

    Removed: taps named `prefix`* whose ifalias is a vmmd owner alias, and bridges
    with a vmmd owner alias and no ports left - in both cases only when the owning
    process is gone (unless only_dead_owners=False). Links without both marks are
    never touched.
    """
    removed = []
    with _ipr() as ipr:
        links = ipr.get_links()
        owned = []
        for link in links:
            name = link.get_attr("IFLA_IFNAME") or ""
            owner = names.parse_owner_alias(link.get_attr("IFLA_IFALIAS"))
            if owner is None:
                continue
            kind, pid, _guest = owner
            if kind == "tap" and not name.startswith(prefix):
                continue
            if only_dead_owners and _pid_alive(pid):
                continue
            owned.append((kind, name, link["index"]))
        for kind, name, index in sorted(owned, key=lambda o: o[0] != "tap"):  # taps first: bridges empty then
            if kind == "bridge":
                ports = [link for link in ipr.get_links() if link.get_attr("IFLA_MASTER") == index]
                if ports:
                    continue
            try:
                ipr.link("del", index=index)
            except Exception as err:  # noqa: BLE001 - vanished meanwhile: nothing to do
                log.debug("sweep: %s already gone (%s)", name, err)
                continue
            log.warning("sweep: removed stale %s %s left by a vmmd worker that is gone", kind, name)
            removed.append(name)
    return removed
