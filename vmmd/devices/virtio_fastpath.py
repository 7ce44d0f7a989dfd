"""The virtio-mmio fast path: queue notifications and device interrupts that never pass through the vCPU's
run loop, as QEMU, Firecracker and cloud-hypervisor do.

- Notify: one eventfd per queue, registered with KVM_IOEVENTFD on the transport's QueueNotify register
  (4 bytes, datamatch = the queue index; include/uapi/linux/virtio_mmio.h VIRTIO_MMIO_QUEUE_NOTIFY). KVM
  completes the guest's write in the kernel and signals the eventfd; the device's notify thread wakes and
  serves the queue. On sev-es the guest's write reaches KVM as a GHCB MMIO event, which KVM matches against
  ioeventfds the same way (arch/x86/kvm/svm/sev.c -> kvm_io_bus_write()). Writes that still arrive in
  userspace (sev-es-emu services GHCB MMIO events itself) are routed to the same eventfd by
  VirtioMmio.write(), so queue work always runs on the notify thread.
- Interrupt: an eventfd registered with KVM_IRQFD and KVM_IRQFD_FLAG_RESAMPLE on the device's GSI: writing it
  asserts the (level-triggered) line in the in-kernel irqchip; when the guest acknowledges the interrupt KVM
  lowers the line and signals the resample eventfd, and the notify thread raises it again while the
  transport's InterruptStatus is still non-zero (virt/kvm/eventfd.c irqfd_resampler_ack()).

Both are gated on their capabilities (KVM_CAP_IOEVENTFD, KVM_CAP_IRQFD + KVM_CAP_IRQFD_RESAMPLE and an
in-kernel irqchip); without them the transport keeps the exit path (notify served on the vCPU thread,
KVM_IRQ_LINE for the interrupt). `FastPath.describe()` says which one a device uses.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections.abc import Callable

from vmmd.errors import VmmdError
from vmmd.kvm import uapi

log = logging.getLogger("vmmd.virtio")

QUEUE_NOTIFY_OFFSET = 0x050  # VIRTIO_MMIO_QUEUE_NOTIFY (vmmd.devices.virtio_mmio)


class NotifyThread:
    """One thread per device, sleeping in epoll on its eventfds; each readable eventfd's counter is read and
    its callback run on this thread. `close()` wakes it through a stop eventfd and joins it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._stop, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self.wakeups = 0

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for key, _events in self._selector.select():
                if key.data is None:
                    return
                try:
                    os.eventfd_read(key.fd)
                except BlockingIOError:
                    continue  # another reader got it first
                self.wakeups += 1
                try:
                    key.data()
                except Exception:  # a device bug must not end the thread and leave the queue unserved
                    log.exception("%s: notify handler failed", self.name)

    def close(self) -> None:
        os.eventfd_write(self._stop, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._selector.close()
        os.close(self._stop)


def fast_path_capabilities(kvm, vm) -> tuple[bool, bool]:
    """(ioeventfd usable, irqfd with resample usable) for this VM."""
    notify = bool(kvm.check_extension(uapi.KVM_CAP_IOEVENTFD))
    irq = bool(kvm.check_extension(uapi.KVM_CAP_IRQFD) and kvm.check_extension(uapi.KVM_CAP_IRQFD_RESAMPLE)
               and getattr(vm, "has_irqchip", False))
    return notify, irq


class FastPath:
    """The eventfds of one virtio-mmio transport at `gpa`: install with `FastPath(...).attach(transport)`."""

    def __init__(self, vm, gpa: int, num_queues: int, name: str, use_ioeventfd: bool, irq_gsi: int | None,
                 device_fds: list[int] | None = None) -> None:
        self.vm = vm
        self.gpa = gpa
        self.name = name
        self.thread = NotifyThread(f"{name}-notify")
        self.queue_fds: list[int] = []
        self.ioeventfd = False
        self.irq_fd: int | None = None
        self.resample_fd: int | None = None
        self.irq_gsi = irq_gsi
        self.transport = None
        # device_fds: the eventfds the device's own I/O thread already sleeps on, one per queue (VirtioNet's):
        # KVM then wakes that thread directly, with no hop through the notify thread; they stay the device's
        self.owns_queue_fds = device_fds is None
        try:
            self.queue_fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(num_queues)] \
                if device_fds is None else list(device_fds)
            if use_ioeventfd:
                for index, fd in enumerate(self.queue_fds):
                    vm.ioeventfd(gpa + QUEUE_NOTIFY_OFFSET, 4, fd, datamatch=index)
                self.ioeventfd = True
            if irq_gsi is not None:
                self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.resample_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                vm.irqfd(self.irq_fd, irq_gsi, resamplefd=self.resample_fd)
        except BaseException:
            self.close()
            raise

    def describe(self) -> str:
        notify = "ioeventfd" if self.ioeventfd else "eventfd from the exit path"
        notify += "" if self.owns_queue_fds else " to the device's own thread"
        if self.transport is not None and getattr(self.transport.backend, "vhost", None) is not None:
            notify += " into vhost-net"
        irq = f"irqfd on GSI {self.irq_gsi}" if self.irq_fd is not None else "no irqfd"
        return f"notify {notify}, {irq}" + (", notify thread" if self.owns_queue_fds else "")

    def attach(self, transport, serve_queues: bool = True,
               watches: list[tuple[int, Callable[[], None]]] = ()) -> FastPath:
        """Serve `transport`'s queues on the notify thread from now on; with `serve_queues` False the queue
        eventfds are someone else's to read (vhost's kick), and `watches` are other (eventfd, callback) pairs for
        the notify thread (vhost's call)."""
        self.transport = transport
        for index, fd in enumerate(self.queue_fds if serve_queues and self.owns_queue_fds else []):
            self.thread.watch(fd, lambda index=index: transport.serve_notify(index))
        for fd, callback in watches:
            self.thread.watch(fd, callback)
        if self.resample_fd is not None:
            self.thread.watch(self.resample_fd, transport.resample_irq)
        transport.fast_path = self
        self.thread.start()
        return self

    def kick_queue(self, index: int) -> None:
        """A QueueNotify write that reached userspace: hand it to the notify thread."""
        os.eventfd_write(self.queue_fds[index], 1)

    def raise_irq(self) -> None:
        os.eventfd_write(self.irq_fd, 1)

    def close(self) -> None:
        self.thread.close()
        if self.ioeventfd:
            for index, fd in enumerate(self.queue_fds):
                try:
                    self.vm.ioeventfd(self.gpa + QUEUE_NOTIFY_OFFSET, 4, fd, datamatch=index, deassign=True)
                except (OSError, VmmdError):
                    pass  # the VM is going away
            self.ioeventfd = False
        if self.irq_fd is not None:
            try:
                self.vm.irqfd(self.irq_fd, self.irq_gsi, deassign=True)
            except (OSError, VmmdError):
                pass  # the VM is going away
        for fd in [*(self.queue_fds if self.owns_queue_fds else []), self.irq_fd, self.resample_fd]:
            if fd is not None:
                os.close(fd)
        self.queue_fds, self.irq_fd, self.resample_fd = [], None, None


def attach_fast_path(machine, transport, gpa: int, irq_gsi: int | None, name: str, serve_queues: bool = True,
                     watches: list[tuple[int, Callable[[], None]]] = ()) -> FastPath | None:
    """Give `transport` (at `gpa`, interrupt on `irq_gsi` when the VM has an irqchip) the fast path this VM
    supports; None where the machine's configuration turns it off (MachineConfig.eventfds) or KVM has neither
    ioeventfd nor irqfd."""
    if not getattr(machine.config, "eventfds", True):
        return None
    notify, irq = fast_path_capabilities(machine.kvm, machine.vm)
    if not (notify or (irq and irq_gsi is not None)):
        return None
    device_fds = getattr(transport.backend, "notify_eventfds", None)
    return FastPath(machine.vm, gpa, transport.backend.num_queues, name, notify, irq_gsi if irq else None,
                    device_fds() if device_fds is not None and serve_queues else None).attach(
                        transport, serve_queues, watches)
