"""Vcpu.inject_exception() on real KVM: the #GP vmmd injects for a refused RDPMC NAE event lands where KVM's own
kvm_inject_gp() would, at the instruction after the VMGEXIT (here: after the `out` that is the sev-es-emu
doorbell), with the port-I/O exit completed first (x86.c kvm_arch_vcpu_ioctl_run(): complete_userspace_io, then
event injection)."""

from __future__ import annotations

import pytest

from vmmd.kvm import Kvm, exits, uapi
from vmmd.memory import GuestMemory

pytestmark = pytest.mark.timeout(60)

CODE = 0x1000  # out 0x80, al ; hlt
HANDLER = 0x1100  # mov bp, sp ; mov ax, [bp+0] ; out 0x82, ax ; hlt   (reports the pushed return IP)


def test_injected_gp_is_delivered_after_the_doorbell_out() -> None:
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr()
    memory = GuestMemory.with_ram(2 << 20)
    memory.write(CODE, bytes.fromhex("e680" "f4"))
    memory.write(HANDLER, bytes.fromhex("89e5" "8b4600" "e782" "f4"))
    memory.write(13 * 4, HANDLER.to_bytes(2, "little") + bytes(2))  # real-mode IVT entry 13 (#GP): 0000:1100
    vm.add_memory(memory)
    try:
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        vcpu.set_regs(uapi.kvm_regs(rip=CODE, rsp=0x8000, rflags=2))
        ex = vcpu.run()
        assert isinstance(ex, exits.IoExit) and ex.port == 0x80
        vcpu.inject_exception(13, 0)  # as the VMGEXIT service does for RDPMC
        ex = vcpu.run()
        assert isinstance(ex, exits.IoExit) and ex.port == 0x82 and ex.size == 2, ex
        returned_to = int.from_bytes(vcpu.run_bytes[ex.data_offset:ex.data_offset + 2], "little")
        assert returned_to == CODE + 2  # the instruction after the out: the I/O completed, then #GP
        assert vcpu.get_vcpu_events().exception.injected == 0
    finally:
        vm.close()
        kvm.close()
        memory.close()
