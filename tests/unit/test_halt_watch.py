"""HaltWatch's decision on synthetic vCPU answers (the real-KVM run is tests/e2e/test_halt_watch.py)."""

from __future__ import annotations

import pytest

from vmmd.errors import VmStop
from vmmd.kvm import uapi
from vmmd.sev.halt_watch import IF_FLAG_OFFSET, HaltWatch


class FakeVcpu:
    def __init__(self, index: int, mp_state: int, if_flag: int) -> None:
        self.index, self.mp_state = index, mp_state
        self.run_bytes = bytearray(64)
        self.run_bytes[IF_FLAG_OFFSET] = if_flag

    def get_mp_state(self) -> int:
        return self.mp_state


def _sweeps(watch: HaltWatch, vcpus: list[FakeVcpu], count: int) -> None:
    for _ in range(count):
        watch.sweep()
        for vcpu in vcpus:
            watch.check(vcpu)


def test_one_vcpu_halted_with_interrupts_off_stops_after_two_sweeps() -> None:
    watch = HaltWatch(1, kick=lambda: None)
    halted = FakeVcpu(0, uapi.KVM_MP_STATE_HALTED, 0)
    _sweeps(watch, [halted], 1)
    with pytest.raises(VmStop) as stop:
        _sweeps(watch, [halted], 1)
    assert stop.value.kind == "halt" and stop.value.exit_code == 7


@pytest.mark.parametrize(("mp_state", "if_flag"), [(uapi.KVM_MP_STATE_HALTED, 1), (uapi.KVM_MP_STATE_RUNNABLE, 0)])
def test_a_vcpu_that_can_still_run_keeps_the_vm_going(mp_state: int, if_flag: int) -> None:
    watch = HaltWatch(2, kick=lambda: None)
    _sweeps(watch, [FakeVcpu(0, uapi.KVM_MP_STATE_HALTED, 0), FakeVcpu(1, mp_state, if_flag)], 5)


def test_aps_waiting_for_a_sipi_cannot_wake_a_halted_bsp() -> None:
    watch = HaltWatch(3, kick=lambda: None)
    vcpus = [FakeVcpu(0, uapi.KVM_MP_STATE_HALTED, 0), FakeVcpu(1, uapi.KVM_MP_STATE_UNINITIALIZED, 0),
             FakeVcpu(2, uapi.KVM_MP_STATE_AP_RESET_HOLD, 1)]
    with pytest.raises(VmStop):
        _sweeps(watch, vcpus, 2)


def test_a_vcpu_that_woke_between_sweeps_resets_the_count() -> None:
    watch = HaltWatch(2, kick=lambda: None)
    bsp, ap = FakeVcpu(0, uapi.KVM_MP_STATE_HALTED, 0), FakeVcpu(1, uapi.KVM_MP_STATE_HALTED, 0)
    _sweeps(watch, [bsp, ap], 1)
    ap.mp_state = uapi.KVM_MP_STATE_RUNNABLE
    _sweeps(watch, [bsp, ap], 1)
    ap.mp_state = uapi.KVM_MP_STATE_HALTED
    watch.sweep()
    watch.check(bsp)
    watch.check(ap)  # halted again, but only one sweep in a row so far
    with pytest.raises(VmStop):
        _sweeps(watch, [bsp, ap], 1)


def test_a_vcpu_not_yet_asked_this_sweep_defers_the_decision() -> None:
    watch = HaltWatch(2, kick=lambda: None)
    bsp, ap = FakeVcpu(0, uapi.KVM_MP_STATE_HALTED, 0), FakeVcpu(1, uapi.KVM_MP_STATE_HALTED, 0)
    _sweeps(watch, [bsp, ap], 1)
    watch.sweep()
    watch.check(bsp)  # the AP has not answered sweep 2 yet: no stop
    with pytest.raises(VmStop):
        watch.check(ap)
