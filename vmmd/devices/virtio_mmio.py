"""virtio-mmio transport, version 2 (virtio 1.x spec, 4.2), as a device on the MMIO bus.

Owns the register page: identification, feature negotiation, queue set-up,
notifications, interrupt status, device status (reset on 0, DEVICE_NEEDS_RESET)
and the config-space window at 0x100. What is behind it (virtio-net) is a
VirtioBackend. Register offsets mirror Linux include/uapi/linux/virtio_mmio.h;
status bits include/uapi/linux/virtio_config.h.

Every value the driver writes is untrusted: queue addresses become Virtqueue
objects only through DmaWindows (bounds-checked GuestMemory views); a bad queue
or a malformed chain sets DEVICE_NEEDS_RESET plus a configuration-change
interrupt (spec 2.1.1 / 4.2.2.1) with one clear log line, and nothing else
happens until the driver resets the device by writing 0 to Status.

Interrupts: `irq(level)` is called with True when InterruptStatus becomes non-zero
and False when an ACK clears it (a level line: KVM_IRQ_LINE where an in-kernel
irqchip exists). Without one (plain and sev-es-emu today) `irq` is None and the
driver polls the used ring or InterruptStatus.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from vmmd.devices.virtqueue import DmaWindows, Virtqueue, VirtqueueError

log = logging.getLogger("vmmd.virtio")

# include/uapi/linux/virtio_mmio.h
VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090  # "QueueDriver" in the spec
VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0  # "QueueDevice" in the spec
VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_QUEUE_RESET = 0x0C0
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100
VIRTIO_MMIO_INT_VRING = 1 << 0
VIRTIO_MMIO_INT_CONFIG = 1 << 1

MAGIC = 0x74726976  # "virt"
VERSION = 2  # virtio 1.x (non-legacy) register layout
VENDOR_ID = 0x444D4D56  # "VMMD" little-endian; the spec leaves the vendor id free

# include/uapi/linux/virtio_config.h
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33


class VirtioBackend(Protocol):
    """What a virtio device type (net, ...) supplies to the transport."""

    name: str
    device_id: int
    device_features: int
    num_queues: int
    queue_num_max: int
    max_chain_bytes: int

    def config_space(self) -> bytes: ...

    def accept_features(self, features: int) -> str | None:
        """None to accept the driver's features, else why not (FEATURES_OK then stays clear)."""

    def activate(self, transport: VirtioMmio, queues: list[Virtqueue | None]) -> None: ...

    def notify(self, queue_index: int) -> None: ...

    def reset(self) -> None: ...


class _QueueRegs:
    __slots__ = ("size", "ready", "desc", "driver", "device")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ready = 0
        self.desc = 0
        self.driver = 0
        self.device = 0


def _set_half(old: int, value: int, high: bool) -> int:
    return (old & 0xFFFF_FFFF) | (value << 32) if high else (old & ~0xFFFF_FFFF) | value


class VirtioMmio:
    """The register page of one virtio-mmio device (bus Device protocol: read/write by offset)."""

    def __init__(self, backend: VirtioBackend, windows: DmaWindows,
                 irq: Callable[[bool], None] | None = None) -> None:
        self.backend = backend
        self.windows = windows
        self.irq = irq
        self.lock = threading.RLock()  # register writes (vCPU threads) vs. queue processing (device thread)
        self.odd_accesses = 0  # non-32-bit register accesses, ignored (spec 4.2.2.2)
        self.needs_reset_reason: str | None = None
        self.fast_path = None  # vmmd.devices.virtio_fastpath.FastPath once attached: eventfds, notify thread
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.shm_sel = 0
        self.config_generation = getattr(self, "config_generation", 0)
        self.queue_regs = [_QueueRegs(self.backend.queue_num_max) for _ in range(self.backend.num_queues)]
        self.queues: list[Virtqueue | None] = [None] * self.backend.num_queues

    # --- bus interface -----------------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= VIRTIO_MMIO_CONFIG:
            return self._config_read(offset - VIRTIO_MMIO_CONFIG, size)
        if size != 4 or offset & 3:
            self.odd_accesses += 1
            return 0
        with self.lock:
            return self._reg_read(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= VIRTIO_MMIO_CONFIG:
            return  # virtio-net's config space is read-only for the driver (spec 5.1.4)
        if size != 4 or offset & 3:
            self.odd_accesses += 1
            return
        with self.lock:
            self._reg_write(offset, value)

    # --- registers ---------------------------------------------------------------------------------------------------
    def _selected(self) -> _QueueRegs | None:
        return self.queue_regs[self.queue_sel] if self.queue_sel < len(self.queue_regs) else None

    def _reg_read(self, offset: int) -> int:
        b = self.backend
        if offset == VIRTIO_MMIO_MAGIC_VALUE:
            return MAGIC
        if offset == VIRTIO_MMIO_VERSION:
            return VERSION
        if offset == VIRTIO_MMIO_DEVICE_ID:
            return b.device_id
        if offset == VIRTIO_MMIO_VENDOR_ID:
            return VENDOR_ID
        if offset == VIRTIO_MMIO_DEVICE_FEATURES:
            return (b.device_features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF \
                if self.device_features_sel < 2 else 0
        if offset == VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == VIRTIO_MMIO_STATUS:
            return self.status
        if offset == VIRTIO_MMIO_CONFIG_GENERATION:
            return self.config_generation
        if offset in (VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_BASE_LOW,
                      VIRTIO_MMIO_SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: length -1 (spec 4.2.2)
        q = self._selected()
        if q is None:
            return 0  # QueueNumMax 0: no such queue
        if offset == VIRTIO_MMIO_QUEUE_NUM_MAX:
            return b.queue_num_max
        if offset == VIRTIO_MMIO_QUEUE_READY:
            return q.ready
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            return q.size
        if offset in (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH):
            return (q.desc >> (32 * (offset == VIRTIO_MMIO_QUEUE_DESC_HIGH))) & 0xFFFF_FFFF
        if offset in (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH):
            return (q.driver >> (32 * (offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH))) & 0xFFFF_FFFF
        if offset in (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH):
            return (q.device >> (32 * (offset == VIRTIO_MMIO_QUEUE_USED_HIGH))) & 0xFFFF_FFFF
        return 0  # write-only and reserved registers read as 0

    def _reg_write(self, offset: int, value: int) -> None:
        if offset == VIRTIO_MMIO_QUEUE_NOTIFY:
            if self.fast_path is not None:
                if value < len(self.queues):
                    self.fast_path.kick_queue(value)  # served on the notify thread, as an ioeventfd would be
                return
            self._serve_notify_locked(value)
            return
        if offset == VIRTIO_MMIO_STATUS:
            self._write_status(value & 0xFF)
        elif offset == VIRTIO_MMIO_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            if not self.interrupt_status:
                self._lower_irq()
        elif offset == VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == VIRTIO_MMIO_DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
                self.driver_features = _set_half(self.driver_features, value, self.driver_features_sel == 1)
        elif offset == VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
        else:
            self._queue_write(offset, value)

    def _queue_write(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None:
            return
        if offset == VIRTIO_MMIO_QUEUE_READY:
            if value & 1 and not q.ready:
                self._enable_queue(q)
            elif not value & 1:
                q.ready = 0
                self.queues[self.queue_sel] = None
            return
        if q.ready:
            return  # spec 4.2.2.3: the driver must not change a ready queue's set-up; ignore it
        if offset == VIRTIO_MMIO_QUEUE_NUM:
            q.size = value
        elif offset in (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH):
            q.desc = _set_half(q.desc, value, offset == VIRTIO_MMIO_QUEUE_DESC_HIGH)
        elif offset in (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH):
            q.driver = _set_half(q.driver, value, offset == VIRTIO_MMIO_QUEUE_AVAIL_HIGH)
        elif offset in (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH):
            q.device = _set_half(q.device, value, offset == VIRTIO_MMIO_QUEUE_USED_HIGH)

    def _enable_queue(self, q: _QueueRegs) -> None:
        index = self.queue_sel
        if q.size > self.backend.queue_num_max:
            self.needs_reset(f"queue {index}: size {q.size} is larger than QueueNumMax {self.backend.queue_num_max}")
            return
        try:
            self.queues[index] = Virtqueue(index, q.size, q.desc, q.driver, q.device, self.windows,
                                           self.backend.max_chain_bytes)
        except VirtqueueError as err:
            self.needs_reset(str(err))
            return
        q.ready = 1

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.backend.reset()
            self._reset_state()
            self.needs_reset_reason = None
            self._lower_irq()
            return
        old = self.status
        value &= ~VIRTIO_CONFIG_S_NEEDS_RESET  # the device's bit (spec 2.1.1): a driver cannot set it
        if old & ~VIRTIO_CONFIG_S_NEEDS_RESET & ~value:
            # spec 2.1.2: "The driver MUST NOT clear a device status bit" (other than by writing 0); ignoring
            # the write keeps FEATURES_OK, and so the checked features, from being undone under a running device
            log.warning("%s: status write %#x would clear bits of %#x; ignored", self.backend.name, value, old)
            return
        new = value | (old & VIRTIO_CONFIG_S_NEEDS_RESET)  # only a reset clears NEEDS_RESET
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
            why = self._check_features()
            if why is not None:
                log.warning("%s: refusing the driver's features %#x: %s", self.backend.name, self.driver_features, why)
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK  # spec 3.1.1: the driver re-reads and sees it clear
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            if not new & VIRTIO_CONFIG_S_FEATURES_OK:
                new &= ~VIRTIO_CONFIG_S_DRIVER_OK
            elif not new & VIRTIO_CONFIG_S_NEEDS_RESET:
                self.status = new
                self.backend.activate(self, self.queues)
                return
        self.status = new

    def _check_features(self) -> str | None:
        extra = self.driver_features & ~self.backend.device_features
        if extra:
            return f"it accepted features {extra:#x} the device did not offer"
        if not self.driver_features & (1 << VIRTIO_F_VERSION_1):
            return "VIRTIO_F_VERSION_1 not accepted (legacy drivers are not supported)"
        return self.backend.accept_features(self.driver_features)

    def _config_read(self, offset: int, size: int) -> int:
        config = self.backend.config_space()
        data = config[offset:offset + size] if 0 <= offset < len(config) else b""
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    # --- the notify thread (vmmd.devices.virtio_fastpath) ------------------------------------------------------------
    @property
    def io_path(self) -> str:
        """How notifies and interrupts reach the device: its fast path, or the run loop's exit path."""
        return self.fast_path.describe() if self.fast_path is not None else "notify through the exit path"

    def close_fast_path(self) -> None:
        """Stop the notify thread and give back the eventfds (before the VM goes); notifies then exit again."""
        if self.fast_path is not None:
            self.fast_path.close()
            self.fast_path = None

    def serve_notify(self, index: int) -> None:
        """A queue's eventfd fired (KVM's ioeventfd, or kick_queue() from the exit path): serve the queue."""
        with self.lock:
            self._serve_notify_locked(index)

    def _serve_notify_locked(self, index: int) -> None:
        if index < len(self.queues) and self.status & VIRTIO_CONFIG_S_DRIVER_OK and \
                not self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
            self.backend.notify(index)

    def resample_irq(self) -> None:
        """KVM lowered the irqfd's line at the guest's EOI: raise it again while an interrupt is still pending."""
        with self.lock:
            if self.interrupt_status and self.fast_path is not None:
                self.fast_path.raise_irq()

    def _raise_irq(self) -> None:
        if self.fast_path is not None and self.fast_path.irq_fd is not None:
            self.fast_path.raise_irq()
        elif self.irq is not None:
            self.irq(True)

    def _lower_irq(self) -> None:
        """With an irqfd KVM lowers the line itself at EOI (resample); KVM_IRQ_LINE needs it lowered here."""
        if (self.fast_path is None or self.fast_path.irq_fd is None) and self.irq is not None:
            self.irq(False)

    # --- called by the backend (device thread, under self.lock) ------------------------------------------------------
    def signal_used(self, *queues: Virtqueue) -> None:
        """Used buffers were added (to `queues`): InterruptStatus bit 0, and the interrupt where one exists - unless
        the driver set VIRTQ_AVAIL_F_NO_INTERRUPT on every one of those queues, which means it polls them (spec
        2.7.7.2 "the device SHOULD NOT send a notification"; QEMU virtio_should_notify()). Without queues (vhost's
        call eventfd, which the kernel signals only when the driver wants it) the interrupt always goes."""
        if queues and not any(q.wants_interrupt() for q in queues):
            return
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING
        self._raise_irq()

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
        self._raise_irq()

    def needs_reset(self, reason: str) -> None:
        """The driver broke the rules: DEVICE_NEEDS_RESET + config interrupt, one log line, queues dropped."""
        with self.lock:
            if self.status & VIRTIO_CONFIG_S_NEEDS_RESET:
                return
            self.needs_reset_reason = reason
            log.warning("%s: %s; device set to DEVICE_NEEDS_RESET (status 0x40) until the driver resets it, "
                        "the VM keeps running", self.backend.name, reason)
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
            self.queues = [None] * len(self.queues)
            self.backend.reset()
            self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG
            self._raise_irq()

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK) and not self.status & VIRTIO_CONFIG_S_NEEDS_RESET

