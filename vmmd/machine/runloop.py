"""The vCPU run loop: decode (Vcpu.run) apart from dispatch (handle_exit).

`handle_exit()` is a plain function over an exit value and an ExitContext, so
unit tests feed it synthetic exits. It returns CONTINUE or VCPU_HALTED, or
raises VmStop with a one-line reason. `run_vcpu()` never lets any other
exception out: a bug in a device becomes a VM stop naming the exit, never a
traceback that kills the process (or, under the daemon, the worker).

The one shortcut: a one-byte port access the bus has resolved once is handed
to `Vcpu.make_run()` as a handler keyed by its kvm_run.io header, so the next
identical access is served inside `run()` (see `run_vcpu`). The bus decides
what the handler is; the KVM layer only matches keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vmmd.devices.bus import MmioBus, PortBus
from vmmd.errors import ExitCode, VmStop
from vmmd.kvm import exits, uapi
from vmmd.kvm.system import byte_port_key

CONTINUE = 0
_RESOLVED_MAX = 512  # one-byte port handlers a vCPU keeps resolved (at most 2 x 65536 distinct accesses)
VCPU_HALTED = 1  # this vCPU is done (HLT with nothing to wake it, AP hold); others may go on

INTERNAL_ERROR_NAMES = {
    uapi.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
    uapi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    uapi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed (e.g. a fault on the IDT or stack)",
    uapi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected VM exit",
}


@dataclass
class ExitContext:
    """What exit handling needs besides the exit itself; the platform fills the hooks."""

    port_bus: PortBus
    mmio_bus: MmioBus
    # (vcpu, MsrExit) -> None; must complete the exit (vcpu.complete_msr_exit)
    msr_handler: Callable[[object, exits.MsrExit], None] | None = None
    # port -> handler(vcpu) for ports the platform owns (the sev-es-emu doorbell); returns CONTINUE/VCPU_HALTED
    doorbell_port: int = -1
    doorbell: Callable[[object], int] | None = None
    # (vcpu, SystemEventExit) -> never returns (raises VmStop); platform decodes SEV termination
    system_event_handler: Callable[[object, exits.SystemEventExit], None] | None = None
    halt_stops_vm: bool = True  # single vCPU without an irqchip: nothing can wake a halted CPU
    shutdown_is_reboot: bool = False  # Linux guests: a triple fault is how reboot=t resets the machine
    # SEV-ES: the registers live encrypted in the VMSA; KVM_GET_REGS refuses them (6.10+) or, on older
    # kernels, answers with the stale pre-launch values, so crash reports leave them out
    registers_protected: bool = False
    # (vcpu) -> None, after a KVM_RUN that returned EINTR (the VM is not stopping); may raise VmStop. sev-es uses
    # it to notice a guest halted for good while KVM handles HLT in the kernel (vmmd.sev.halt_watch)
    interrupted: Callable[[object], None] | None = None
    counters: dict = field(default_factory=dict)


def handle_io(ex: exits.IoExit, vcpu, ctx: ExitContext) -> int:
    size = ex.size
    port = ex.port
    if port == ctx.doorbell_port and ctx.doorbell is not None:
        return ctx.doorbell(vcpu)
    data = vcpu.run_bytes
    offset = ex.data_offset
    end = offset + ex.count * size
    if size not in (1, 2, 4) or end > len(data):
        raise VmStop("io-error", f"KVM_EXIT_IO with size {size} count {ex.count} at offset {offset:#x} does not fit "
                     "kvm_run", ExitCode.GUEST_CRASH)
    bus = ctx.port_bus
    if ex.is_write:
        if ex.count == 1:
            bus.write(port, size, int.from_bytes(data[offset:end], "little"))
        else:
            for pos in range(offset, end, size):
                bus.write(port, size, int.from_bytes(data[pos:pos + size], "little"))
    else:
        for pos in range(offset, end, size):
            data[pos:pos + size] = bus.read(port, size).to_bytes(size, "little")
    return CONTINUE


def handle_exit(ex: exits.Exit, vcpu, ctx: ExitContext) -> int:
    """Dispatch one decoded exit. Raises VmStop when the VM must end."""
    if type(ex) is exits.IoExit:
        return handle_io(ex, vcpu, ctx)
    kind = type(ex)
    if kind is exits.MmioExit:
        if ex.length > 8 or ex.length == 0:
            raise VmStop("mmio-error", f"MMIO access of {ex.length} bytes at {ex.gpa:#x}", ExitCode.GUEST_CRASH)
        if ex.is_write:
            ctx.mmio_bus.write(ex.gpa, ex.length, ex.data)
        else:
            vcpu.complete_mmio_read(ctx.mmio_bus.read(ex.gpa, ex.length), ex.length)
        return CONTINUE
    if kind is exits.MsrExit:
        if ctx.msr_handler is None:
            vcpu.complete_msr_exit(0, error=True)
        else:
            ctx.msr_handler(vcpu, ex)
        return CONTINUE
    if kind is exits.InterruptedExit:
        if ctx.interrupted is not None:
            ctx.interrupted(vcpu)
        return CONTINUE
    if kind is exits.HltExit:
        if ctx.halt_stops_vm:
            raise VmStop("halt", "guest halted (HLT with interrupts off and nothing to wake it)",
                         ExitCode.GUEST_HALTED)
        return VCPU_HALTED
    if kind is exits.ShutdownExit:
        if ctx.shutdown_is_reboot:  # a PC resets on a triple fault; QEMU treats it as a reset request too
            raise VmStop("reboot", "the guest rebooted (triple fault: Linux's reboot=t, or a crash too early for "
                         "its exception handlers); vmmd does not restart guests", ExitCode.GUEST_REBOOT)
        raise VmStop("shutdown", "guest triple-faulted (KVM_EXIT_SHUTDOWN)", ExitCode.GUEST_CRASH)
    if kind is exits.FailEntryExit:
        raise VmStop("fail-entry", f"VM entry failed: hardware reason {ex.hardware_entry_failure_reason:#x} on "
                     f"host CPU {ex.cpu} (KVM_EXIT_FAIL_ENTRY)", ExitCode.GUEST_CRASH)
    if kind is exits.InternalErrorExit:
        what = INTERNAL_ERROR_NAMES.get(ex.suberror, f"suberror {ex.suberror}")
        data = " ".join(f"{d:#x}" for d in ex.data[:4])
        raise VmStop("internal-error", f"KVM internal error: {what}" + (f" (data {data})" if data else ""),
                     ExitCode.GUEST_CRASH)
    if kind is exits.SystemEventExit:
        if ctx.system_event_handler is not None:
            ctx.system_event_handler(vcpu, ex)
        raise VmStop("system-event", f"guest system event type {ex.type} data {[hex(d) for d in ex.data]}",
                     ExitCode.GUEST_CRASH)
    if kind is exits.RunFailedExit:
        raise VmStop("run-failed", ex.message, ExitCode.GUEST_CRASH)
    if kind is exits.UnknownExit:
        raise VmStop("unknown-exit", f"unhandled KVM exit reason {ex.exit_reason} "
                     f"(hardware reason {ex.hardware_exit_reason:#x})", ExitCode.GUEST_CRASH)
    raise VmStop("unknown-exit", f"unhandled exit {ex.name}", ExitCode.GUEST_CRASH)


def register_dump(vcpu, protected: bool = False) -> str:
    """One line of the vCPU's state, for crash reports; never raises."""
    if protected:
        return f"vCPU {vcpu.index}: registers are encrypted in its VMSA (SEV-ES); the host cannot show them"
    try:
        r = vcpu.get_regs()
        s = vcpu.get_sregs()
    except Exception as err:  # noqa: BLE001 - SEV-ES state is not readable, say so
        return f"vCPU {vcpu.index}: registers not readable ({err})"
    return (f"vCPU {vcpu.index}: RIP={r.rip:#x} RSP={r.rsp:#x} RFLAGS={r.rflags:#x} RAX={r.rax:#x} RBX={r.rbx:#x} "
            f"RCX={r.rcx:#x} RDX={r.rdx:#x} RSI={r.rsi:#x} RDI={r.rdi:#x} CR0={s.cr0:#x} CR2={s.cr2:#x} "
            f"CR3={s.cr3:#x} CR4={s.cr4:#x} EFER={s.efer:#x} CS={s.cs.selector:#x}")


def run_vcpu(vcpu, ctx: ExitContext, should_stop: Callable[[], bool]) -> VmStop | None:
    """Run one vCPU until it halts (None) or the VM must stop (the VmStop). Never raises.

    One-byte port I/O (the console, debug ports) is dispatched once through the bus, which resolves the
    access to its device handler; the handler then goes into this vCPU's table and `Vcpu.run()` serves
    every later identical access itself, without coming back here (KVM_RUN, match, call, KVM_RUN). The
    sev-es-emu doorbell never enters the table. Every other exit goes through handle_exit(). Each Python
    object and call per exit costs far more here than in a warm micro-benchmark (the exit leaves the caches
    cold), so this path stays short: docs/benchmarks.md.
    """
    handle = handle_exit
    io_exit = exits.IoExit
    data = vcpu.run_bytes
    data_len = len(data)
    bus = ctx.port_bus
    resolved = bus.handler_table()
    run = vcpu.make_run(resolved)
    doorbell = ctx.doorbell
    doorbell_port = ctx.doorbell_port if doorbell is not None else -1
    interrupted = ctx.interrupted
    try:
        while True:
            ex = run()
            if type(ex) is io_exit:
                port = ex.port
                if port == doorbell_port:
                    if doorbell(vcpu) == VCPU_HALTED:
                        return None
                    continue
                offset = ex.data_offset
                if ex.size == 1 and ex.count == 1 and offset < data_len:
                    # first time this vCPU makes this access: resolve it, do it, remember it for Vcpu.run()
                    if len(resolved) >= _RESOLVED_MAX:  # the guest picks the ports: keep the table bounded
                        resolved.clear()
                    if ex.is_write:
                        handler = resolved[byte_port_key(True, port)] = bus.byte_writer(port)
                        handler(data[offset])
                    else:
                        handler = resolved[byte_port_key(False, port)] = bus.byte_reader(port)
                        data[offset] = handler() & 0xFF
                    continue
                if handle_io(ex, vcpu, ctx) == VCPU_HALTED:
                    return None
                continue
            if ex is exits.INTERRUPTED:
                vcpu.run_bytes[1] = 0  # clear immediate_exit first: a kick landing after this is not lost
                if should_stop():
                    return None
                if interrupted is not None:
                    interrupted(vcpu)
                continue
            if handle(ex, vcpu, ctx) == VCPU_HALTED:
                return None
    except VmStop as stop:
        if stop.exit_code in (ExitCode.GUEST_CRASH,):
            stop.reason = f"{stop.reason}\n  {register_dump(vcpu, ctx.registers_protected)}"
        return stop
    except Exception as err:  # noqa: BLE001 - a VMM bug must stop this VM, not the process
        import traceback  # only on this rare path: it costs start-up time otherwise

        detail = traceback.format_exc(limit=-3).strip().splitlines()
        return VmStop("vmm-error", f"vmmd internal error while running vCPU {vcpu.index}: "
                      f"{type(err).__name__}: {err} [{' | '.join(line.strip() for line in detail[-3:])}]",
                      ExitCode.VMM_ERROR)
