"""handle_exit() with synthetic exits: dispatch, stops with reasons, never a stray exception."""

from __future__ import annotations

import pytest

from vmmd.devices.bus import MmioBus, PortBus
from vmmd.errors import ExitCode, VmStop
from vmmd.kvm import exits
from vmmd.kvm.system import byte_port_key
from vmmd.machine.runloop import CONTINUE, VCPU_HALTED, ExitContext, handle_exit, run_vcpu


class Recorder:
    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class FakeRunArea:
    """Stands in for a vCPU's kvm_run page (a plain buffer) for synthetic exits; there is no KVM_RUN here."""

    def __init__(self) -> None:
        self.index = 0
        self.run_bytes = memoryview(bytearray(4096))
        self.mmio_result = None
        self.msr_result = None

    def complete_mmio_read(self, value: int, length: int) -> None:
        self.mmio_result = (value, length)

    def complete_msr_exit(self, data: int, error: bool) -> None:
        self.msr_result = (data, error)


def make_ctx() -> tuple[ExitContext, Recorder, Recorder]:
    ports, mmio = PortBus(), MmioBus()
    dev, mdev = Recorder(0x5A), Recorder(0x1122334455667788)
    ports.insert(dev, 0x3F8, 8)
    mmio.insert(mdev, 0xFEB0_0000, 0x1000)
    return ExitContext(ports, mmio), dev, mdev


def test_port_write_reaches_device_with_offset() -> None:
    ctx, dev, _ = make_ctx()
    vcpu = FakeRunArea()
    vcpu.run_bytes[0x100] = 0x41
    assert handle_exit(exits.IoExit(True, 1, 0x3F9, 1, 0x100), vcpu, ctx) == CONTINUE
    assert dev.writes == [(1, 1, 0x41)]


def test_string_port_write_repeats() -> None:
    ctx, dev, _ = make_ctx()
    vcpu = FakeRunArea()
    vcpu.run_bytes[0x100:0x106] = b"\x01\x00\x02\x00\x03\x00"
    handle_exit(exits.IoExit(True, 2, 0x3F8, 3, 0x100), vcpu, ctx)
    assert dev.writes == [(0, 2, 1), (0, 2, 2), (0, 2, 3)]


def test_port_read_fills_kvm_run_and_unmapped_reads_all_ones() -> None:
    ctx, _, _ = make_ctx()
    vcpu = FakeRunArea()
    handle_exit(exits.IoExit(False, 1, 0x3FD, 1, 0x200), vcpu, ctx)
    assert vcpu.run_bytes[0x200] == 0x5A
    handle_exit(exits.IoExit(False, 4, 0x80, 2, 0x300), vcpu, ctx)
    assert bytes(vcpu.run_bytes[0x300:0x308]) == b"\xff" * 8
    assert ctx.port_bus.unmapped_reads == 2


def test_io_data_outside_kvm_run_stops_vm() -> None:
    ctx, _, _ = make_ctx()
    with pytest.raises(VmStop) as stop:
        handle_exit(exits.IoExit(True, 4, 0x3F8, 2000, 0x100), FakeRunArea(), ctx)
    assert stop.value.exit_code == ExitCode.GUEST_CRASH


def test_mmio_read_and_write() -> None:
    ctx, _, mdev = make_ctx()
    vcpu = FakeRunArea()
    handle_exit(exits.MmioExit(0xFEB0_0010, 4, True, 0xDEADBEEF), vcpu, ctx)
    assert mdev.writes == [(0x10, 4, 0xDEADBEEF)]
    handle_exit(exits.MmioExit(0xFEB0_0010, 2, False, 0), vcpu, ctx)
    assert vcpu.mmio_result == (0x7788, 2)
    handle_exit(exits.MmioExit(0x1_0000_0000, 8, False, 0), vcpu, ctx)
    assert vcpu.mmio_result == (0xFFFF_FFFF_FFFF_FFFF, 8)


def test_msr_exit_without_platform_handler_injects_gp() -> None:
    ctx, _, _ = make_ctx()
    vcpu = FakeRunArea()
    handle_exit(exits.MsrExit(False, 0xC0010131, 0, 4), vcpu, ctx)
    assert vcpu.msr_result == (0, True)


@pytest.mark.parametrize("ex,kind,code", [
    (exits.SHUTDOWN, "shutdown", ExitCode.GUEST_CRASH),
    (exits.FailEntryExit(0x80000021, 1), "fail-entry", ExitCode.GUEST_CRASH),
    (exits.InternalErrorExit(1, (1, 2)), "internal-error", ExitCode.GUEST_CRASH),
    (exits.UnknownExit(99, 7), "unknown-exit", ExitCode.GUEST_CRASH),
    (exits.RunFailedExit(22, "KVM_RUN failed: EINVAL"), "run-failed", ExitCode.GUEST_CRASH),
    (exits.SystemEventExit(6, (0x100,)), "system-event", ExitCode.GUEST_CRASH),
    (exits.HLT, "halt", ExitCode.GUEST_HALTED),
])
def test_stopping_exits_name_their_reason(ex, kind: str, code: ExitCode) -> None:
    ctx, _, _ = make_ctx()
    with pytest.raises(VmStop) as stop:
        handle_exit(ex, FakeRunArea(), ctx)
    assert stop.value.kind == kind and stop.value.exit_code == code and stop.value.reason


def test_a_linux_guests_triple_fault_is_a_reboot_not_a_crash() -> None:
    ctx, _, _ = make_ctx()
    ctx.shutdown_is_reboot = True  # Machine sets it for --kernel guests: reboot=t resets this way
    with pytest.raises(VmStop) as stop:
        handle_exit(exits.SHUTDOWN, FakeRunArea(), ctx)
    assert stop.value.kind == "reboot" and stop.value.exit_code == ExitCode.GUEST_REBOOT
    assert "reboot=t" in stop.value.reason


def test_halt_of_one_vcpu_among_many_does_not_stop_the_vm() -> None:
    ctx, _, _ = make_ctx()
    ctx.halt_stops_vm = False
    assert handle_exit(exits.HLT, FakeRunArea(), ctx) == VCPU_HALTED


class ScriptedVcpu(FakeRunArea):
    """Yields a scripted sequence of decoded exits, as Vcpu.run() would."""

    def __init__(self, script: list[exits.Exit]) -> None:
        super().__init__()
        self.script = list(script)

        self.byte_port_handlers: dict | None = None

    def run(self) -> exits.Exit:
        return self.script.pop(0)

    def make_run(self, byte_port_handlers: dict):
        """The scripted exits as they are; keeps the run loop's table to look at (serving the table is
        Vcpu.run()'s part, run on real KVM in tests/e2e)."""
        self.byte_port_handlers = byte_port_handlers
        return self.run

    def get_regs(self):
        raise OSError("no registers in a scripted vCPU")


def test_device_bug_becomes_vm_stop_not_exception() -> None:
    ctx, _, _ = make_ctx()

    class Broken:
        def read(self, offset: int, size: int) -> int:
            raise ZeroDivisionError("device bug")

        def write(self, offset: int, size: int, value: int) -> None:
            raise ZeroDivisionError("device bug")

    ctx.port_bus.insert(Broken(), 0x60, 1)
    stop = run_vcpu(ScriptedVcpu([exits.IoExit(True, 1, 0x60, 1, 0x100)]), ctx, lambda: False)
    assert stop is not None and stop.kind == "vmm-error" and "ZeroDivisionError" in stop.reason
    assert stop.exit_code == ExitCode.VMM_ERROR


def test_crash_report_of_a_protected_vcpu_does_not_ask_kvm_for_registers() -> None:
    ctx, _, _ = make_ctx()
    ctx.registers_protected = True
    stop = run_vcpu(ScriptedVcpu([exits.SHUTDOWN]), ctx, lambda: False)  # its get_regs() would raise
    assert stop.kind == "shutdown" and "registers are encrypted in its VMSA" in stop.reason


def test_run_vcpu_returns_on_stop_request_after_interrupt() -> None:
    ctx, _, _ = make_ctx()
    assert run_vcpu(ScriptedVcpu([exits.INTERRUPTED]), ctx, lambda: True) is None


def test_run_vcpu_reports_crash_with_register_dump_fallback() -> None:
    ctx, _, _ = make_ctx()
    stop = run_vcpu(ScriptedVcpu([exits.SHUTDOWN]), ctx, lambda: False)
    assert stop.kind == "shutdown" and "registers not readable" in stop.reason


def test_run_vcpu_resolves_a_one_byte_access_once_and_hands_it_to_the_vcpu() -> None:
    ctx, dev, _ = make_ctx()
    vcpu = ScriptedVcpu([exits.IoExit(True, 1, 0x3F9, 1, 0x100), exits.IoExit(False, 1, 0x3FD, 1, 0x100),
                         exits.IoExit(True, 1, 0x80, 1, 0x100), exits.SHUTDOWN])
    vcpu.run_bytes[0x100] = 0x41
    stop = run_vcpu(vcpu, ctx, lambda: False)
    assert stop is not None and stop.kind == "shutdown"
    assert dev.writes == [(1, 1, 0x41)] and vcpu.run_bytes[0x100] == 0x5A  # the IN stored the device's byte
    assert ctx.port_bus.unmapped_writes == 1
    table = vcpu.byte_port_handlers
    assert set(table) == {byte_port_key(True, 0x3F9), byte_port_key(False, 0x3FD), byte_port_key(True, 0x80)}
    table[byte_port_key(True, 0x3F9)](0x42)  # what Vcpu.run() will call for the next OUT to 0x3f9
    assert dev.writes[-1] == (1, 1, 0x42)
    assert table[byte_port_key(False, 0x3FD)]() == 0x5A
    table[byte_port_key(True, 0x80)](0)
    assert ctx.port_bus.unmapped_writes == 2


def test_run_vcpu_never_puts_the_doorbell_or_wide_accesses_in_the_table() -> None:
    ctx, dev, _ = make_ctx()
    rings = []
    ctx.doorbell_port, ctx.doorbell = 0x3FA, lambda vcpu: rings.append(vcpu) or CONTINUE
    vcpu = ScriptedVcpu([exits.IoExit(True, 1, 0x3FA, 1, 0x100), exits.IoExit(True, 2, 0x3F8, 1, 0x100),
                         exits.IoExit(True, 1, 0x3F8, 2, 0x100), exits.SHUTDOWN])
    run_vcpu(vcpu, ctx, lambda: False)
    assert len(rings) == 1 and vcpu.byte_port_handlers == {}
    assert [w[1] for w in dev.writes] == [2, 1, 1]  # the word write, then the two bytes of the string write


def test_the_resolved_table_is_bounded() -> None:
    ctx, _, _ = make_ctx()
    script = [exits.IoExit(True, 1, port, 1, 0x100) for port in range(0x1000, 0x1000 + 3 * 512)]
    vcpu = ScriptedVcpu([*script, exits.SHUTDOWN])
    run_vcpu(vcpu, ctx, lambda: False)
    assert 0 < len(vcpu.byte_port_handlers) <= 512
    assert ctx.port_bus.unmapped_writes == 3 * 512


def test_machine_run_off_the_main_thread_without_a_kick_handler_refuses_instead_of_dying() -> None:
    """kick_all() signals vCPU threads with SIGUSR1; with its default action that would end the process."""
    import signal
    import threading
    from pathlib import Path

    from vmmd.devices.console import Console
    from vmmd.errors import VmmdError
    from vmmd.machine.config import MachineConfig
    from vmmd.machine.machine import KICK_SIGNAL, Machine
    from vmmd.platforms import select_platform

    hello = Path(__file__).resolve().parents[2] / "firmware" / "build" / "hello.bin"
    previous = signal.signal(KICK_SIGNAL, signal.SIG_DFL)
    outcome: list = []
    try:
        chosen, _ = select_platform("plain")
        machine = Machine(MachineConfig(firmware=hello, memory_bytes=16 << 20, platform="plain"), chosen,
                          Console(None).write).build()
        try:
            def run() -> None:
                try:
                    outcome.append(machine.run())
                except VmmdError as err:
                    outcome.append(err)

            thread = threading.Thread(target=run)
            thread.start()
            thread.join(30)
        finally:
            machine.close()
    finally:
        signal.signal(KICK_SIGNAL, previous)
    assert len(outcome) == 1 and isinstance(outcome[0], VmmdError) and "kick signal" in str(outcome[0])
