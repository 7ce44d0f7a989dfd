"""virtio-net device (virtio 1.x spec, 5.1) bridged to a tap file descriptor.

Owns the device's features and config space, and the thread that moves frames:
queue 0 (receiveq1) is filled from the tap, queue 1 (transmitq1) is drained into
it. The thread sleeps in poll() on the tap fd (only while receive buffers are
posted) and an eventfd that QueueNotify writes; there is no busy polling. The
vCPU thread never touches the tap.

Features offered: VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
VIRTIO_F_ACCESS_PLATFORM (the device only reaches memory through the platform's
DMA windows: on SEV-ES the shared region, where the guest keeps rings and
buffers), and VIRTIO_NET_F_MTU when an MTU is configured. No offloads, no
mergeable receive buffers: every frame carries the 12-byte virtio_net_hdr
(struct virtio_net_hdr_v1, include/uapi/linux/virtio_net.h) with
num_buffers = 1.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading

from vmmd.devices.virtio_mmio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VirtioMmio
from vmmd.devices.virtqueue import Virtqueue, VirtqueueError

log = logging.getLogger("vmmd.net")

VIRTIO_ID_NET = 1  # include/uapi/linux/virtio_ids.h
# include/uapi/linux/virtio_net.h
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (VERSION_1 always has num_buffers)
RX_QUEUE, TX_QUEUE = 0, 1
# largest chain accepted: header + a 64 KiB frame + Ethernet/VLAN header; anything larger is a driver bug
MAX_CHAIN_BYTES = VIRTIO_NET_HDR_SIZE + 65536 + 18
RX_HEADER = bytes(10) + struct.pack("<H", 1)  # flags 0, gso NONE, ..., num_buffers = 1


class VirtioNet:
    """The virtio-net backend of a VirtioMmio transport, moving frames between its queues and `tap_fd`."""

    device_id = VIRTIO_ID_NET
    num_queues = 2

    def __init__(self, tap_fd: int, mac: bytes, *, name: str = "virtio-net", mtu: int | None = None,
                 vnet_hdr: bool = False, require_access_platform: bool = False, queue_num_max: int = 1024,
                 vhost=None) -> None:
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
        self.tap_fd = tap_fd
        self.mac = bytes(mac)
        self.name = name
        self.mtu = mtu
        self.vnet_hdr = vnet_hdr
        self.require_access_platform = require_access_platform
        self.queue_num_max = queue_num_max
        self.max_chain_bytes = MAX_CHAIN_BYTES
        self.device_features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM) | \
            (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | ((1 << VIRTIO_NET_F_MTU) if mtu else 0)
        self._config = self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, mtu or 0)
        self.transport: VirtioMmio | None = None
        self.stats = {"tx_frames": 0, "tx_dropped": 0, "rx_frames": 0, "notifies": 0}
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread: threading.Thread | None = None
        # vmmd.net.vhost.VhostNet: the kernel moves the frames; one call eventfd per queue, which the transport's
        # notify thread watches (vhost_call_watches()) to set InterruptStatus
        self.vhost = vhost
        self.vhost_call_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(self.num_queues)] \
            if vhost is not None else []

    # --- VirtioBackend -----------------------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return self._config  # struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu

    def accept_features(self, features: int) -> str | None:
        if self.require_access_platform and not features & (1 << VIRTIO_F_ACCESS_PLATFORM):
            return ("VIRTIO_F_ACCESS_PLATFORM not accepted: on SEV-ES the device can only reach the shared region, "
                    "so the driver must place rings and buffers there")
        return None

    def activate(self, transport: VirtioMmio, queues: list[Virtqueue | None]) -> None:
        self.transport = transport  # its queues are read at each pass: the driver may disable or re-enable one
        if self.vhost is not None:
            self._start_vhost(transport, queues)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-io", daemon=True)
            self._thread.start()
        self._kick()

    def notify_eventfds(self) -> list[int]:
        """The eventfd the I/O thread sleeps on, for each queue: the fast path registers it as the queues'
        ioeventfd, so a notify wakes this thread without passing through vmmd (vmmd.devices.virtio_fastpath)."""
        return [self._event_fd] * self.num_queues

    def notify(self, queue_index: int) -> None:
        self.stats["notifies"] += 1
        self._kick()

    def reset(self) -> None:
        """The transport forgets its queues on reset; the next pass finds none (vhost: the kernel lets go)."""
        if self.vhost is not None:
            self.vhost.stop()

    # --- vhost-net ---------------------------------------------------------------------------------------------------
    def vhost_call_watches(self, transport: VirtioMmio) -> list[tuple[int, object]]:
        """(eventfd, callback) pairs for the notify thread: vhost signals a queue's call eventfd when it added used
        buffers; InterruptStatus and the interrupt are the transport's."""
        def called() -> None:
            with transport.lock:
                transport.signal_used()

        return [(fd, called) for fd in self.vhost_call_fds]

    def _start_vhost(self, transport: VirtioMmio, queues: list[Virtqueue | None]) -> None:
        from vmmd.net.vhost import VhostError, vring_plan

        fast_path = transport.fast_path
        if fast_path is None or not fast_path.ioeventfd:
            transport.needs_reset("vhost-net needs the queues' ioeventfds, and this device has none")
            return
        regions, rings = vring_plan(transport.windows.memory, transport.windows, queues)
        try:
            self.vhost.start(transport.driver_features & self.vhost.features, regions,
                             [(*ring, fast_path.queue_fds[ring[0]], self.vhost_call_fds[ring[0]]) for ring in rings],
                             self.tap_fd)
        except VhostError as err:
            self.vhost.stop()
            transport.needs_reset(str(err))

    # --- thread ------------------------------------------------------------------------------------------------------
    def _kick(self) -> None:
        try:
            os.eventfd_write(self._event_fd, 1)
        except OSError:
            pass  # closed during shutdown, or the counter is saturated (a wake-up is pending anyway)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._event_fd, select.POLLIN)
        tap_registered = False
        while not self._stopping:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            if self._stopping:
                break
            for fd, _mask in events:
                if fd == self._event_fd:
                    try:
                        os.eventfd_read(self._event_fd)
                    except BlockingIOError:
                        pass
                    break
            want_tap = self._service()
            if want_tap != tap_registered:
                if want_tap:
                    poller.register(self.tap_fd, select.POLLIN)
                else:
                    poller.unregister(self.tap_fd)
                tap_registered = want_tap
        log.debug("%s: I/O thread ends", self.name)

    def _service(self) -> bool:
        """Drain TX, fill RX; True when the tap should be polled for input (receive buffers are posted)."""
        transport = self.transport
        if transport is None:
            return False
        with transport.lock:
            if not transport.driver_ok:
                return False
            rx, tx = transport.queues[RX_QUEUE], transport.queues[TX_QUEUE]
            used: list[Virtqueue] = []
            try:
                if tx is not None:
                    n, dropped = tx.drain_to_fd(self.tap_fd, 0 if self.vnet_hdr else VIRTIO_NET_HDR_SIZE)
                    if n:
                        used.append(tx)
                        self.stats["tx_frames"] += n - dropped
                        self.stats["tx_dropped"] += dropped
                    if tx.available():  # the pass ran out of budget: go on after releasing the lock
                        self._kick()
                if rx is not None and rx.available():
                    if self.vnet_hdr:  # the kernel writes the header; num_buffers (offset 10) must say 1
                        delivered, _ = rx.fill_from_fd(self.tap_fd, b"", (10, b"\x01\x00"))
                    else:
                        delivered, _ = rx.fill_from_fd(self.tap_fd, RX_HEADER)
                    if delivered:
                        used.append(rx)
                        self.stats["rx_frames"] += delivered
                    want_tap = rx.available() > 0
                else:
                    want_tap = False
            except VirtqueueError as err:
                transport.needs_reset(f"malformed virtqueue: {err}")
                return False
            except OSError as err:
                transport.needs_reset(f"tap I/O failed: {err}")
                return False
            except Exception as err:  # noqa: BLE001 - a device bug must not kill the VMM; stop the device instead
                log.exception("%s: internal error in the I/O thread", self.name)
                transport.needs_reset(f"internal error ({type(err).__name__}: {err})")
                return False
            if used:
                transport.signal_used(*used)
            return want_tap

    def close(self) -> None:
        """Stop the I/O thread (or vhost) and release the eventfds (the tap fd belongs to the caller)."""
        if self.vhost is not None:
            self.vhost.close()
            self.vhost = None
        for fd in self.vhost_call_fds:
            os.close(fd)
        self.vhost_call_fds = []
        self._stopping = True
        self._kick()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            os.close(self._event_fd)
        except OSError:
            pass
        self._event_fd = -1
