"""KVM_IOEVENTFD and KVM_IRQFD on real KVM (vmmd.kvm.system.Vm.ioeventfd / irqfd), with two tiny real-mode
guests: port writes matched by an ioeventfd never reach userspace and are counted by the eventfd; a write to an
irqfd raises the GSI through the in-kernel PIC and the guest's handler runs."""

from __future__ import annotations

import os
import threading

import pytest

from vmmd.kvm import Kvm, exits, uapi
from vmmd.kvm.probe import real_mode_vcpu
from vmmd.memory import GuestMemory

pytestmark = pytest.mark.timeout(30)
CODE_GPA = 0x1000
HANDLER_GPA = 0x1100
NOTIFY_PORT, DONE_PORT, READY_PORT = 0x80, 0x81, 0x82


@pytest.fixture
def vm():
    kvm = Kvm()
    handle = kvm.create_vm()
    handle.set_tss_addr()
    memory = GuestMemory.with_ram(2 << 20)
    handle.add_memory(memory)
    handle.create_irqchip()
    yield kvm, handle, memory
    handle.close()
    memory.close()
    kvm.close()


def _real_mode_vcpu(vm, memory, code: bytes):
    memory.write(CODE_GPA, code)
    return real_mode_vcpu(vm, CODE_GPA)


def _run_with_deadline(vcpu, seconds: float = 10):
    """vcpu.run() on a thread: a guest that never exits fails the test instead of hanging it."""
    result = []
    thread = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"the guest did not exit within {seconds} s"
    return result[0]


def test_capabilities_are_reported(vm) -> None:
    kvm, _vm, _memory = vm
    assert kvm.check_extension(uapi.KVM_CAP_IOEVENTFD) and kvm.check_extension(uapi.KVM_CAP_IRQFD)


def test_port_writes_matched_by_an_ioeventfd_are_counted_without_exits(vm) -> None:
    _kvm, handle, memory = vm
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        handle.ioeventfd(NOTIFY_PORT, 1, efd, pio=True)
        # mov cx, 1000; l: out 0x80, al; loop l; out 0x81, al; hlt
        vcpu = _real_mode_vcpu(handle, memory, bytes.fromhex("b9e803" "e680" "e2fc" "e681" "f4"))
        ex = _run_with_deadline(vcpu)
        assert isinstance(ex, exits.IoExit) and ex.port == DONE_PORT  # the 1000 notifies never came back
        assert os.eventfd_read(efd) == 1000
        handle.ioeventfd(NOTIFY_PORT, 1, efd, pio=True, deassign=True)
    finally:
        os.close(efd)


def test_datamatch_selects_the_queue(vm) -> None:
    _kvm, handle, memory = vm
    queue0, queue1 = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        handle.ioeventfd(NOTIFY_PORT, 1, queue0, datamatch=0, pio=True)
        handle.ioeventfd(NOTIFY_PORT, 1, queue1, datamatch=1, pio=True)
        # mov al,1; out 0x80,al; out 0x80,al; mov al,0; out 0x80,al; mov al,7; out 0x80,al (unmatched: exits)
        vcpu = _real_mode_vcpu(handle, memory, bytes.fromhex("b001e680e680" "b000e680" "b007e680" "f4"))
        ex = _run_with_deadline(vcpu)
        assert isinstance(ex, exits.IoExit) and ex.port == NOTIFY_PORT  # value 7 matches no registration
        assert os.eventfd_read(queue0) == 1 and os.eventfd_read(queue1) == 2
    finally:
        os.close(queue0)
        os.close(queue1)


def test_an_irqfd_write_raises_the_gsi_and_the_guest_handler_runs(vm) -> None:
    _kvm, handle, memory = vm
    # cli; PIC ICW1..4 (vector base 0x20), mask all but IRQ 5; IVT[0x25] = 0:HANDLER; out 0x82 (ready); sti; hlt
    code = bytes.fromhex("fa" "b011e620" "b020e621" "b004e621" "b001e621" "b0dfe621" "c70694000011" "c70696000000"
                         "b055e682" "fb" "f4" "ebfd")
    memory.write(HANDLER_GPA, bytes.fromhex("b0aa" "e681" "f4" "ebfd"))  # mov al,0xaa; out 0x81,al; hlt
    ifd = os.eventfd(0)
    try:
        handle.irqfd(ifd, 5)
        vcpu = _real_mode_vcpu(handle, memory, code)
        ex = _run_with_deadline(vcpu)
        assert isinstance(ex, exits.IoExit) and ex.port == READY_PORT
        timer = threading.Timer(0.05, lambda: os.eventfd_write(ifd, 1))
        timer.start()
        ex = _run_with_deadline(vcpu)  # halted with interrupts on until the irqfd fires
        assert isinstance(ex, exits.IoExit) and ex.port == DONE_PORT
        handle.irqfd(ifd, 5, deassign=True)
    finally:
        os.close(ifd)
