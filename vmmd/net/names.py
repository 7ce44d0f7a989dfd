"""Names and addresses derived from a guest: tap interface names, MAC addresses, the ownership alias.

Pure functions, no I/O. A tap is "ours" when its name starts with the prefix
(TAP_PREFIX) and its ifalias (IFLA_IFALIAS, at most IFALIASZ = 256 bytes,
include/uapi/linux/if.h) is an owner alias made here; the daemon's sweep only
ever removes links carrying both marks.
"""

from __future__ import annotations

import hashlib
import re

TAP_PREFIX = "vmmd-"
IFNAMSIZ = 16  # include/uapi/linux/if.h: 15 characters + NUL
ALIAS_PREFIX = "vmmd:"
_ALIAS_RE = re.compile(r"^vmmd:(tap|bridge):pid=(\d+):guest=(.*)$")


def _digest(guest_name: str) -> bytes:
    return hashlib.sha256(b"vmmd-net:" + guest_name.encode()).digest()


def tap_name(guest_name: str, prefix: str = TAP_PREFIX) -> str:
    """`prefix` + the guest's name, within IFNAMSIZ-1 characters; too long a name keeps a hash suffix."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "-", guest_name) or "guest"
    room = IFNAMSIZ - 1 - len(prefix)
    if room < 5:
        raise ValueError(f"tap prefix {prefix!r} leaves no room for a guest name in {IFNAMSIZ - 1} characters")
    if len(clean) <= room:
        return prefix + clean
    return prefix + clean[:room - 5] + "-" + _digest(guest_name).hex()[:4]


def guest_mac(guest_name: str) -> bytes:
    """A stable, locally administered unicast MAC for the guest's NIC (02:xx:xx:xx:xx:xx)."""
    return b"\x02" + _digest(guest_name)[:5]


def host_mac(guest_name: str) -> bytes:
    """The tap's own MAC: the guest's with fe: in front (high, so a bridge never takes it as its address)."""
    return b"\xfe" + _digest(guest_name)[:5]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; ValueError for anything else, or a multicast address."""
    parts = text.strip().replace("-", ":").split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (six hex pairs separated by ':')")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text!r} is a multicast MAC address; a NIC needs a unicast one")
    return mac


def owner_alias(kind: str, pid: int, guest_name: str) -> str:
    """The ifalias marking a link vmmd made: kind 'tap' or 'bridge', the owning process, the guest."""
    alias = f"{ALIAS_PREFIX}{kind}:pid={pid}:guest={guest_name}"
    return alias.encode()[:255].decode(errors="ignore")


def parse_owner_alias(alias: str | None) -> tuple[str, int, str] | None:
    """(kind, pid, guest) of an owner alias, None for any other alias."""
    match = _ALIAS_RE.match(alias or "")
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None
