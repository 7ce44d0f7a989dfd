"""Vcpu.run() on real KVM: one-byte port accesses in its handler table are served without returning."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import guest
from vmmd.devices.console import Console
from vmmd.errors import VmStop
from vmmd.kvm import exits
from vmmd.kvm.system import byte_port_key
from vmmd.machine.config import MachineConfig
from vmmd.machine.machine import Machine
from vmmd.machine.runloop import handle_exit
from vmmd.platforms import select_platform

pytestmark = pytest.mark.timeout(60)
LOOPS = 300


@pytest.fixture
def exit_loop_machine():
    chosen, _ = select_platform("plain")
    config = MachineConfig(firmware=Path(guest("exit-loop")), memory_bytes=16 << 20, platform="plain",
                           guest_arg=LOOPS)
    machine = Machine(config, chosen, Console(None).write).build()
    yield machine
    machine.close()


def run_to_the_end(machine: Machine, run) -> tuple[list[exits.Exit], VmStop]:
    """Dispatch what run() reports until the guest's debug-exit write stops the VM."""
    reported = []
    while True:
        ex = run()
        reported.append(ex)
        try:
            handle_exit(ex, machine.vcpus[0], machine.ctx)
        except VmStop as stop:
            return reported, stop


def test_tabled_port_writes_never_come_back_to_the_caller(exit_loop_machine: Machine) -> None:
    served: list[int] = []
    run = exit_loop_machine.vcpus[0].make_run({byte_port_key(True, 0x80): served.append})
    reported, stop = run_to_the_end(exit_loop_machine, run)
    assert stop.kind == "debug-exit" and stop.status == 1
    assert served == [0] * LOOPS  # exit-loop writes 0 to port 0x80, LOOPS times
    assert not any(getattr(ex, "port", None) == 0x80 for ex in reported)
    assert exit_loop_machine.port_bus.unmapped_writes == 0


def test_without_a_table_every_port_write_is_reported(exit_loop_machine: Machine) -> None:
    reported, stop = run_to_the_end(exit_loop_machine, exit_loop_machine.vcpus[0].run)
    assert stop.kind == "debug-exit"
    assert sum(getattr(ex, "port", None) == 0x80 for ex in reported) == LOOPS
    assert exit_loop_machine.port_bus.unmapped_writes == LOOPS


def test_a_full_machine_run_counts_every_dropped_write(exit_loop_machine: Machine) -> None:
    result = exit_loop_machine.run()
    assert result.kind == "debug-exit" and result.status == 1
    assert result.details["unmapped_port_writes"] == LOOPS
