"""Attach a guest to the network: parse the definition, make the tap, put virtio-net on the MMIO bus.

Machine.build() calls `attach_network(machine, cfg.net)` once its vCPUs exist;
Machine.close() calls `handle.close()`, which stops the device thread and removes
the tap (and a bridge this guest created, once it has no ports left).

Definition (`vmctl run --net`), a string:
    tap[:BRIDGE][,mac=02:11:22:33:44:55][,mtu=1500][,ifname=NAME][,create-bridge][,vnet-hdr][,host-ip=A.B.C.D/N]
- BRIDGE: enslave the tap to this bridge; `create-bridge` creates it when missing.
- mac: the guest NIC's MAC (default: stable, derived from the guest name).
- mtu: the tap's MTU, also offered to the guest (VIRTIO_NET_F_MTU).
- ifname: the tap's name (default vmmd-<guest name>).
- vnet-hdr: open the tap with IFF_VNET_HDR (the virtio_net_hdr passes through).
- host-ip: an IPv4 address for the host side: on the tap, or on the bridge when this guest creates it.
- vhost: on | off | auto (default): the kernel's vhost-net moves the frames (vmmd.net.vhost), where the host has
  /dev/vhost-net and the VM the ioeventfd fast path; auto falls back to vmmd's own datapath, on refuses to start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vmmd.devices.virtio_fastpath import attach_fast_path
from vmmd.devices.virtio_mmio import VirtioMmio
from vmmd.devices.virtio_net import VirtioNet
from vmmd.devices.virtqueue import DmaWindows
from vmmd.errors import VmmdError
from vmmd.machine import layout as L
from vmmd.net import names, tap
from vmmd.net.vhost import VHOST_MODES, VhostNet, vhost_unavailable_reason

log = logging.getLogger("vmmd.net")

SEV_PLATFORMS = ("sev-es", "sev-es-emu")


@dataclass
class NetSpec:
    """A validated network definition."""

    backend: str = "tap"
    bridge: str | None = None
    create_bridge: bool = False
    mac: bytes | None = None
    mtu: int | None = None
    ifname: str | None = None
    vnet_hdr: bool = False
    host_ip: str | None = None
    vhost: str = "auto"  # vmmd.net.vhost.VHOST_MODES


# The one set of options, `--net tap[:BRIDGE],NAME=VALUE,FLAG` and a definition's [network] table (where names
# use "_" for "-": host_ip, create_bridge, vnet_hdr): name -> True for a value option, False for a flag.
NET_OPTIONS = {"mac": True, "mtu": True, "ifname": True, "host-ip": True, "create-bridge": False, "vnet-hdr": False,
               "vhost": True}


def parse_net_spec(text: str) -> NetSpec:
    """'tap[:BRIDGE][,key=value|flag...]' -> NetSpec; VmmdError naming the bad part."""
    head, *options = [part.strip() for part in text.split(",")]
    backend, _, bridge = head.partition(":")
    if backend != "tap":
        raise VmmdError(f"--net {text!r}: only the 'tap' backend exists (tap[:BRIDGE][,options])")
    spec = NetSpec(bridge=bridge or None)
    if spec.bridge is not None and (len(spec.bridge) >= names.IFNAMSIZ or "/" in spec.bridge):
        raise VmmdError(f"--net {text!r}: bridge name {spec.bridge!r} is not a valid interface name")
    for option in options:
        key, eq, value = option.partition("=")
        try:
            if key == "create-bridge" and not eq:
                spec.create_bridge = True
            elif key == "vnet-hdr" and not eq:
                spec.vnet_hdr = True
            elif key == "mac" and eq:
                spec.mac = names.parse_mac(value)
            elif key == "mtu" and eq:
                try:
                    spec.mtu = int(value, 0)
                except ValueError:
                    raise ValueError(f"MTU {value!r} is not a number") from None
                if not 68 <= spec.mtu <= 65535:
                    raise ValueError(f"MTU {spec.mtu} is outside 68..65535")
            elif key == "ifname" and eq:
                if not value or len(value) >= names.IFNAMSIZ or "/" in value:
                    raise ValueError(f"interface name {value!r} is empty, too long or has a '/'")
                spec.ifname = value
            elif key == "host-ip" and eq:
                tap._split_cidr(value)
                spec.host_ip = value
            elif key == "vhost" and eq:
                if value not in VHOST_MODES:
                    raise ValueError(f"vhost={value!r}: choose one of {', '.join(VHOST_MODES)}")
                spec.vhost = value
            else:
                known = ", ".join(f"{k}=" if v else k for k, v in NET_OPTIONS.items())
                raise ValueError(f"unknown option (known: {known})")
        except ValueError as err:
            raise VmmdError(f"--net {text!r}: option {option!r}: {err}") from None
    if spec.create_bridge and spec.bridge is None:
        raise VmmdError(f"--net {text!r}: create-bridge needs a bridge name (tap:BRIDGE,create-bridge)")
    return spec


class NetworkHandle:
    """What attach_network() made; close() undoes all of it and never raises."""

    def __init__(self, tap_dev: tap.Tap, device: VirtioNet, transport: VirtioMmio, created_bridge: str | None,
                 mmio_gpa: int) -> None:
        self.tap = tap_dev
        self.device = device
        self.transport = transport
        self.created_bridge = created_bridge
        self.mmio_gpa = mmio_gpa

    @property
    def io_path(self) -> str:
        return self.transport.io_path

    @property
    def tap_name(self) -> str:
        return self.tap.name

    @property
    def guest_mac(self) -> str:
        return names.format_mac(self.device.mac)

    def close(self) -> None:
        steps = [("stop the notify thread", self.transport.close_fast_path),
                 ("stop the device thread", self.device.close),
                 ("remove the tap", lambda: tap.delete_link(self.tap.name)),
                 ("close the tap fd", self.tap.close)]
        if self.created_bridge:
            steps.append(("remove the bridge", self._remove_bridge))
        for what, step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - close must finish; the daemon's sweep catches leftovers
                log.warning("network close: could not %s (%s): %s", what, self.tap.name, err)

    def _remove_bridge(self) -> None:
        if not tap.bridge_has_ports(self.created_bridge):
            tap.delete_link(self.created_bridge)


def attach_network(machine, spec: str | NetSpec) -> NetworkHandle:
    """Create the tap for `machine` and plug a virtio-net device at VIRTIO_NET_MMIO_GPA into its MMIO bus.

    Needs machine.mmio_bus, machine.memory, machine.vm, machine.config.name and
    machine.platform.name. On SEV platforms the device may only reach the shared
    region (layout.SHARED_GPA) and insists on VIRTIO_F_ACCESS_PLATFORM.
    """
    if isinstance(spec, str):
        spec = parse_net_spec(spec)
    guest = machine.config.name
    sev = getattr(machine.platform, "name", "plain") in SEV_PLATFORMS
    mac = spec.mac or names.guest_mac(guest)
    ifname = spec.ifname or names.tap_name(guest)
    pid = os.getpid()
    created_bridge = None
    if spec.create_bridge:
        if tap.create_bridge(spec.bridge, names.owner_alias("bridge", pid, guest), spec.host_ip, None):
            created_bridge = spec.bridge
    if spec.host_ip and spec.bridge and not created_bridge:
        raise VmmdError(f"host-ip {spec.host_ip} with the existing bridge {spec.bridge!r}: give the bridge its "
                        "address yourself, or leave out host-ip")
    vhost_reason = _vhost_reason(machine, spec)
    if spec.vhost == "on" and vhost_reason is not None:
        if created_bridge:
            tap.delete_link(created_bridge)
        raise VmmdError(f"--net ...,vhost=on: {vhost_reason}; use vhost=auto to fall back to vmmd's datapath")
    use_vhost = vhost_reason is None
    try:
        tap_dev = tap.open_tap(ifname, spec.vnet_hdr or use_vhost)  # vhost passes the 12-byte header through
    except BaseException:
        if created_bridge:
            tap.delete_link(created_bridge)
        raise
    device = transport = None
    try:
        tap.configure_tap(tap_dev, mac=names.host_mac(guest), mtu=spec.mtu,
                          alias=names.owner_alias("tap", pid, guest), bridge=spec.bridge,
                          host_ip=None if created_bridge or spec.bridge else spec.host_ip)
        windows = DmaWindows(machine.memory, [(L.SHARED_GPA, L.SHARED_SIZE)] if sev else None)
        device = VirtioNet(tap_dev.fd, mac, name=f"virtio-net {tap_dev.name}", mtu=spec.mtu,
                           vnet_hdr=spec.vnet_hdr or use_vhost, require_access_platform=sev,
                           vhost=VhostNet() if use_vhost else None)
        transport = VirtioMmio(device, windows, irq=_irq_line(machine))
        machine.mmio_bus.insert(transport, L.VIRTIO_NET_MMIO_GPA, L.VIRTIO_MMIO_SIZE)
        attach_fast_path(machine, transport, L.VIRTIO_NET_MMIO_GPA, L.VIRTIO_NET_IRQ, device.name,
                         serve_queues=not use_vhost, watches=device.vhost_call_watches(transport))
    except BaseException:
        if transport is not None:
            transport.close_fast_path()
        if device is not None:
            device.close()
        try:
            tap.delete_link(tap_dev.name)
        finally:
            tap_dev.close()
            if created_bridge:
                tap.delete_link(created_bridge)
        raise
    log.info("guest %s: virtio-net at %#x, tap %s, MAC %s, %s", guest, L.VIRTIO_NET_MMIO_GPA, tap_dev.name,
             names.format_mac(mac), transport.io_path)
    return NetworkHandle(tap_dev, device, transport, created_bridge, L.VIRTIO_NET_MMIO_GPA)


def _vhost_reason(machine, spec: NetSpec) -> str | None:
    """None when this guest's virtio-net can use vhost-net, else why not (vhost=off counts)."""
    if spec.vhost == "off":
        return "vhost=off"
    if not getattr(machine.config, "eventfds", True):
        return "vhost-net needs the ioeventfd fast path, which --eventfds off turns off"
    from vmmd.devices.virtio_fastpath import fast_path_capabilities

    if not fast_path_capabilities(machine.kvm, machine.vm)[0]:
        return "vhost-net needs KVM_CAP_IOEVENTFD, which this KVM lacks"
    return vhost_unavailable_reason()


def _irq_line(machine):
    """A level-triggered line through KVM_IRQ_LINE when the VM has an in-kernel irqchip, else None (guests poll)."""
    vm = machine.vm
    irq_line = getattr(vm, "irq_line", None)
    if irq_line is None or not getattr(vm, "has_irqchip", False):
        return None
    return lambda level: irq_line(L.VIRTIO_NET_IRQ, 1 if level else 0)
