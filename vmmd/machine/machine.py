"""A machine: builds KVM VM, memory, devices, CPUID, platform and vCPUs from a MachineConfig, and runs it.

One thread per vCPU runs `run_vcpu()`; the calling thread supervises: it waits
for the first VmStop (or every vCPU halting), enforces the timeout, and turns
SIGINT into a clean stop. Stopping kicks every vCPU out of KVM_RUN with
kvm_run.immediate_exit plus a signal, as QEMU's qemu_cpu_kick() does.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

from vmmd.devices.acpi_sleep import AcpiSleep
from vmmd.devices.bus import MmioBus, PortBus
from vmmd.devices.cmos import CMOS_INDEX_PORT, Cmos
from vmmd.devices.debug_exit import DEBUG_EXIT_DECODE, DebugExit
from vmmd.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT, RESET_CONTROL_PORT, ResetControl
from vmmd.devices.testdev import TestDev
from vmmd.devices.uart import Uart16550
from vmmd.errors import ExitCode, VmmdError, VmStop
from vmmd.hostcpu import host_cpuid
from vmmd.kvm import Kvm, uapi
from vmmd.machine import layout as L
from vmmd.machine.config import MachineConfig
from vmmd.machine.cpuid import CpuidTable, build_cpuid_table
from vmmd.machine.loader import (
    LINUX,
    RESET_VECTOR,
    entry_regs,
    firmware_kind,
    load_flat_firmware,
    load_reset_vector_firmware,
    long_mode_sregs,
)
from vmmd.machine.platform import Platform
from vmmd.machine.runloop import ExitContext, run_vcpu
from vmmd.memory import PCI_HOLE_START_GPA, GuestMemory

KICK_SIGNAL = signal.SIGUSR1


def virtio_devices(cfg: MachineConfig):
    """The virtio-mmio devices this machine will have, as the ACPI DSDT describes them to Linux."""
    from vmmd.machine.acpi import MmioDevice

    devices = []
    if cfg.net:
        devices.append(MmioDevice(L.VIRTIO_NET_MMIO_GPA, L.VIRTIO_MMIO_SIZE, L.VIRTIO_NET_IRQ))
    devices += [MmioDevice(gpa, L.VIRTIO_MMIO_SIZE, L.VIRTIO_BLK_IRQS[i]) for i, gpa in enumerate(disk_gpas(cfg))]
    return devices


def disk_gpas(cfg: MachineConfig) -> tuple[int, ...]:
    """The register pages of the machine's disks, in the order given (vmmd.block.attach.disk_mmio_gpa)."""
    return tuple(L.VIRTIO_BLK_MMIO_GPA + i * L.VIRTIO_MMIO_SIZE for i in range(len(cfg.disks)))


def virtio_kernel_args(cfg: MachineConfig) -> list[str]:
    """The same devices for kernels without ACPI: one virtio_mmio.device=SIZE@ADDR:IRQ each
    (drivers/virtio/virtio_mmio.c, CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), as Firecracker passes them."""
    return [f"virtio_mmio.device={d.size >> 10}K@{d.gpa:#x}:{d.irq}" for d in virtio_devices(cfg)]


def load_kernel(memory: GuestMemory, cfg: MachineConfig, c_bit: int):
    """Load cfg's kernel, initrd and command line with its virtio devices (vmmd.machine.linux.load_linux):
    (LinuxImage, cr3). The one call both a run and an SEV-ES digest prediction make."""
    from vmmd.machine.linux import load_linux  # only kernel boots pay for the boot-protocol code

    return load_linux(memory, cfg.kernel, cfg.initrd, cfg.append, cfg.cpus, c_bit, virtio_kernel_args(cfg),
                      virtio_devices(cfg))


@dataclass
class VmResult:
    kind: str  # debug-exit, halt, shutdown, sev-term, timeout, interrupted, ...
    reason: str
    exit_code: ExitCode
    status: int | None = None
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


class _Terminate(Exception):
    """SIGTERM arrived: stop the VM as for SIGINT."""


def _raise_terminate(signum, frame) -> None:
    raise _Terminate()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install_signal_handlers():
    """The run's handlers; returns the SIGTERM handler they replace (None off the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)  # only interrupts KVM_RUN with EINTR
        return signal.signal(signal.SIGTERM, _raise_terminate)
    return None


class Machine:
    def __init__(self, config: MachineConfig, platform: Platform, console_sink) -> None:
        self.config = config.validate()
        self.platform = platform
        self.kvm = None
        self.vm = None
        self.memory: GuestMemory | None = None
        self.vcpus = []
        self.port_bus = PortBus()
        self.mmio_bus = MmioBus()
        self.uart = Uart16550(tx_sink=console_sink)
        self.port_bus.insert(self.uart, L.CONSOLE_PORT, 8)
        self.port_bus.insert(DebugExit(), L.DEBUG_EXIT_PORT, DEBUG_EXIT_DECODE)
        self.port_bus.insert(I8042(), I8042_DATA_PORT, I8042_COMMAND_PORT - I8042_DATA_PORT + 1)
        self.port_bus.insert(ResetControl(), RESET_CONTROL_PORT, 1)
        self.port_bus.insert(AcpiSleep(), L.SLEEP_CONTROL_PORT, 2)
        below = min(self.config.memory_bytes, PCI_HOLE_START_GPA)
        self.port_bus.insert(Cmos(below, self.config.memory_bytes - below), CMOS_INDEX_PORT, 2)
        self.mmio_bus.insert(TestDev(), L.MMIO_TESTDEV_GPA, L.MMIO_TESTDEV_SIZE)
        self.cpuid: CpuidTable | None = None
        self.network = None  # vmmd.net handle with close(), when config.net is set
        self.disks = None  # vmmd.block.attach.DisksHandle, when config.disks is set
        self.launch_note: str | None = None  # why the platform reports no launch digest, where it cannot
        self.notes: list[str] = []  # what the platform wants the user told about this run (vmctl prints them)
        self.ctx = ExitContext(self.port_bus, self.mmio_bus)
        self.stop_listeners: list = []  # called once when the VM starts stopping (see _notify_stopping)
        self._stop: VmStop | None = None
        self._stop_lock = threading.Lock()
        self._done = threading.Event()

    # --- building ---------------------------------------------------------------------------------------------
    def build(self) -> Machine:
        cfg = self.config
        try:
            self.kvm = Kvm()
            # api.rst: KVM_CAP_MAX_VCPUS is the hard limit of a VM's vCPUs (KVM_CAP_NR_VCPUS when it says 0)
            kvm_max = self.kvm.check_extension(uapi.KVM_CAP_MAX_VCPUS) or self.kvm.check_extension(
                uapi.KVM_CAP_NR_VCPUS) or 4
            if cfg.cpus > kvm_max:
                raise VmmdError(f"{cfg.cpus} vCPUs asked for, but this host's KVM allows at most {kvm_max} per VM "
                                "(KVM_CAP_MAX_VCPUS)")
            self.memory = GuestMemory.with_ram(cfg.memory_bytes)
            self.firmware_kind = LINUX if cfg.kernel is not None else firmware_kind(cfg.firmware, cfg.firmware_type)
            if self.firmware_kind == LINUX:  # sev-es refuses more than one vCPU in its launch plan
                image, cr3 = load_kernel(self.memory, cfg, self.platform.c_bit)
            elif self.firmware_kind == RESET_VECTOR:
                if cfg.cpus > 1 and self.platform.name != "sev-es":
                    raise VmmdError("reset-vector firmware runs with one vCPU here: its APs wait for INIT/SIPI, "
                                    "which needs an in-kernel irqchip (only the sev-es platform creates one)")
                image, cr3 = load_reset_vector_firmware(self.memory, cfg.firmware,
                                                        read_only=self.platform.readonly_memory), 0
            else:
                image, cr3 = load_flat_firmware(self.memory, cfg.firmware, self.platform.name, cfg.cpus,
                                                self.platform.doorbell_port, self.platform.c_bit, cfg.guest_arg,
                                                L.VIRTIO_NET_MMIO_GPA if cfg.net else 0,
                                                virtio_blk_gpas=disk_gpas(cfg))
            self.image = image
            self.cr3 = cr3
            self.vm = self.platform.create_vm(self)
            if getattr(self.vm, "has_irqchip", False):  # sev-es: the UART raises IRQ 4 (interrupt-driven drivers)
                vm = self.vm
                self.uart.connect_irq(lambda level: vm.irq_line(L.CONSOLE_IRQ, 1 if level else 0))
            self.platform.configure_vm(self)
            has_irqchip = getattr(self.vm, "has_irqchip", False)
            self.cpuid = build_cpuid_table(self.kvm.get_supported_cpuid(), cfg.cpus, self.platform.name,
                                           self.platform.doorbell_port, host_cpuid, lapic=has_irqchip)
            self.platform.create_vcpus(self)
            self.ctx.halt_stops_vm = cfg.cpus == 1 and not has_irqchip  # an in-kernel LAPIC handles HLT itself
            self.ctx.shutdown_is_reboot = self.firmware_kind == LINUX
            if cfg.net:
                from vmmd.net.attach import attach_network  # only guests with a network pay for pyroute2

                self.network = attach_network(self, cfg.net)
            if cfg.disks:
                from vmmd.block.attach import attach_disks

                self.disks = attach_disks(self, list(cfg.disks))
            self.platform.attach(self, self.ctx)
            self.platform.launch(self)
        except BaseException:
            self.close()
            raise
        return self

    def io_paths(self) -> dict[str, str]:
        """How each virtio device's notifies and interrupts travel (vmmd.devices.virtio_fastpath), by device."""
        paths = {}
        if self.network is not None:
            paths["virtio-net"] = self.network.io_path
        for i, disk in enumerate(self.disks.disks if self.disks is not None else []):
            paths[f"disk {i}"] = disk.io_path
        return paths

    @property
    def wants_irqchip(self) -> bool:
        """Does this guest need the in-kernel irqchip and PIT? Linux does (interrupt-driven devices, timer,
        INIT/SIPI for its APs); vmmd's firmware guests poll and run without one except where the platform
        requires it (sev-es)."""
        return self.firmware_kind == LINUX

    # --- running ----------------------------------------------------------------------------------------------
    def _record_stop(self, stop: VmStop | None) -> None:
        with self._stop_lock:
            if stop is not None and self._stop is None:
                self._stop = stop
        if stop is not None:
            self._done.set()
            self._notify_stopping()
            self.kick_all()

    def _notify_stopping(self) -> None:
        """Tell `stop_listeners` (once) that the VM is stopping: e.g. a console that holds vCPU threads back while
        its reader is slow must let them go now, or they could not end."""
        listeners, self.stop_listeners = self.stop_listeners, []
        for listener in listeners:
            listener()

    def request_stop(self, kind: str, reason: str, exit_code: ExitCode) -> None:
        """Stop the VM from any thread (console escape, daemon stop request)."""
        self._record_stop(VmStop(kind, reason, exit_code))

    def kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.request_exit()
        for thread in getattr(self, "_threads", []):
            if thread.is_alive() and thread.ident is not None:
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def _vcpu_thread(self, vcpu) -> None:
        stop = run_vcpu(vcpu, self.ctx, self._done.is_set)
        self._record_stop(stop)
        with self._stop_lock:  # a count, not is_alive(): two vCPUs ending together would each see the other alive
            self._vcpus_running -= 1
            last = self._vcpus_running == 0
        if last:
            self._done.set()  # every vCPU halted: wake run() now rather than at its next poll

    def run(self) -> VmResult:
        """Run until the guest ends, the timeout passes or SIGINT/SIGTERM arrives."""
        previous_sigterm = _install_signal_handlers()
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            # kick_all() sends KICK_SIGNAL to vCPU threads; with its default action that ends the process
            raise VmmdError("Machine.run() needs a handler for the vCPU kick signal (SIGUSR1): call it from the "
                            "main thread, or install one there first")
        try:
            return self._run()
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)  # teardown is not the run: the caller's handler

    def _run(self) -> VmResult:
        start = time.monotonic()
        self._threads = [threading.Thread(target=self._vcpu_thread, args=(v,), name=f"vcpu{v.index}", daemon=True)
                         for v in self.vcpus]
        self._vcpus_running = len(self._threads)
        deadline = None if self.config.timeout is None else start + self.config.timeout
        # SIGINT/SIGTERM wait while the vCPU threads start (they inherit the mask, so such signals always reach
        # this thread): raised inside Thread.start(), the exception escaped this try and a started thread was
        # never joined. Unblocked inside the try, a signal that came meanwhile stops the VM as any other.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS) if _on_main_thread() else None
        try:
            for thread in self._threads:
                thread.start()
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                mask = None
            while not self._done.is_set():
                if all(not t.is_alive() for t in self._threads):
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._record_stop(VmStop("timeout", f"timeout of {self.config.timeout:g} s reached; VM stopped",
                                             ExitCode.TIMEOUT))
                    break
                self._done.wait(0.25 if remaining is None else min(remaining, 0.25))
        except KeyboardInterrupt:
            self._record_stop(VmStop("interrupted", "interrupted (SIGINT); VM stopped", ExitCode.INTERRUPTED))
        except _Terminate:
            self._record_stop(VmStop("interrupted", "terminated (SIGTERM); VM stopped", ExitCode.INTERRUPTED))
        finally:
            if mask is not None:  # Thread.start() failed
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._done.set()
        self._notify_stopping()
        self.kick_all()
        for thread in self._threads:
            while thread.is_alive():
                try:
                    thread.join(0.2)
                except (KeyboardInterrupt, _Terminate):
                    pass  # already stopping: another signal must not leave vCPU threads running on freed memory
                self.kick_all()
        seconds = time.monotonic() - start
        stop = self._stop or VmStop("halt", "every vCPU halted", ExitCode.GUEST_HALTED)
        return VmResult(stop.kind, stop.reason, stop.exit_code, stop.status, seconds,
                        {"unmapped_port_writes": self.port_bus.unmapped_writes,
                         "unmapped_port_reads": self.port_bus.unmapped_reads})

    def create_vcpus_at_entry(self) -> None:
        """Create every vCPU with this machine's CPUID and the image's entry state: the documented 64-bit
        state for flat images; for reset-vector images KVM's reset state (CS 0xF000 base 0xFFFF0000,
        RIP 0xFFF0) with RDX = CPUID 1 EAX, as QEMU's x86_cpu_reset() leaves it."""
        xsave = self.cpuid.has_xsave
        for index in range(self.config.cpus):
            vcpu = self.vm.create_vcpu(index)
            vcpu.set_cpuid2(self.cpuid.for_vcpu(index))
            if self.image.kind == LINUX:  # APs wait for INIT/SIPI from the kernel (KVM_MP_STATE_UNINITIALIZED)
                if index == 0:
                    from vmmd.machine.linux import linux_entry_regs, linux_entry_sregs

                    vcpu.set_sregs(linux_entry_sregs(vcpu.get_sregs(), self.cr3, xsave))
                    vcpu.set_regs(linux_entry_regs(self.image))
                self.vcpus.append(vcpu)
                continue
            if self.image.kind == RESET_VECTOR:
                regs = vcpu.get_regs()
                regs.rdx = self.cpuid.lookup(1)[0]
                vcpu.set_regs(regs)
                self.vcpus.append(vcpu)
                continue
            vcpu.set_sregs(long_mode_sregs(vcpu.get_sregs(), self.cr3, xsave))
            vcpu.set_regs(entry_regs(self.image, index))
            self.vcpus.append(vcpu)

    def close(self) -> None:
        if self.network is not None:
            self.network.close()
            self.network = None
        if self.disks is not None:
            self.disks.close()
            self.disks = None
        self.platform.release(self)
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        self.vcpus = []
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
