"""A guest that halts for good is noticed while KVM handles HLT in the kernel (issue 16, item 7).

With an in-kernel irqchip, as on sev-es, KVM_EXIT_HLT never comes: the vCPU blocks inside KVM_RUN. Here a real
KVM VM with KVM_CREATE_IRQCHIP runs `cli; hlt` (must stop as "halt", exit 7) and `sti; hlt` (an interrupt could
still come: must keep waiting), through run_vcpu() with the HaltWatch the sev-es platform installs.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

from vmmd.devices.bus import MmioBus, PortBus
from vmmd.errors import ExitCode
from vmmd.kvm import Kvm, uapi
from vmmd.machine.runloop import ExitContext, run_vcpu
from vmmd.memory import GuestMemory
from vmmd.sev.halt_watch import HaltWatch

pytestmark = pytest.mark.timeout(60)
CODE = 0x1000


def _run(guest: bytes, wait: float):
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr()
    vm.create_irqchip()
    memory = GuestMemory.with_ram(2 << 20)
    memory.write(CODE, guest)
    vm.add_memory(memory)
    done = threading.Event()
    result = []
    try:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        vcpu.set_regs(uapi.kvm_regs(rip=CODE, rflags=2))
        thread = threading.Thread(target=lambda: result.append(run_vcpu(vcpu, ctx, done.is_set)))

        def kick() -> None:
            vcpu.request_exit()
            if thread.ident is not None and thread.is_alive():
                signal.pthread_kill(thread.ident, signal.SIGUSR1)

        watch = HaltWatch(1, kick, interval=0.05)
        ctx = ExitContext(PortBus(), MmioBus(), halt_stops_vm=False, interrupted=watch.check)
        thread.start()
        watch.start()
        thread.join(wait)
        still_running = thread.is_alive()
        done.set()
        while thread.is_alive():
            kick()
            thread.join(0.1)
        watch.close()
        mp_state = vcpu.get_mp_state()
        return still_running, result[0], mp_state
    finally:
        vm.close()
        kvm.close()
        memory.close()
        signal.signal(signal.SIGUSR1, previous)


def test_cli_hlt_stops_as_halted() -> None:
    started = time.monotonic()
    still_running, stop, mp_state = _run(bytes.fromhex("fa" "f4" "ebfd"), wait=20)  # cli; hlt; jmp $-1
    assert not still_running and stop is not None, "the halted guest was not noticed"
    assert stop.kind == "halt" and stop.exit_code == ExitCode.GUEST_HALTED
    assert mp_state == uapi.KVM_MP_STATE_HALTED
    assert time.monotonic() - started < 20


def test_sti_hlt_keeps_waiting_for_an_interrupt() -> None:
    still_running, stop, mp_state = _run(bytes.fromhex("fb" "f4" "ebfd"), wait=1.0)  # sti; hlt; jmp $-1
    assert still_running and stop is None
    assert mp_state == uapi.KVM_MP_STATE_HALTED
