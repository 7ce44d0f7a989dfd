"""Property test: random GHCB pages and GHCB MSR values thrown at VmgexitService.

Whatever the guest writes, the service raises nothing but VmStop (with a kind and a reason), answers
with SW_EXITINFO1 in {0, 1, 2} when it returns, and writes no guest byte outside the GHCB page and the
scratch window the event may use.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmd.devices.bus import MmioBus, PortBus
from vmmd.errors import VmmdError, VmStop
from vmmd.memory import GuestMemory
from vmmd.sev import ghcb as g
from vmmd.sev.vmgexit import GHCB_SCRATCH_AREA_LIMIT, VmgexitAction, VmgexitService

RAM = 4 << 20
GHCB_GPA = 0x10000
STOP_KINDS = {"sev-term", "ghcb-violation", "internal-error"}
U64 = st.integers(0, (1 << 64) - 1)


class Registers:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")


def cpuid_lookup(function: int, index: int) -> tuple[int, int, int, int]:
    if function == 0xD:
        return {0: (0xE7, 0x340, 0x988, 0), 1: (0xF, 0, 0, 0), 2: (256, 576, 0, 0)}.get(index, (0, 0, 0, 0))
    return (function, index, 0x1234, 0x5678) if function < 0x20 else (0, 0, 0, 0)


@pytest.fixture(scope="module")
def setup():
    memory = GuestMemory.with_ram(RAM)
    ports, mmio = PortBus(), MmioBus()
    ports.insert(Registers(16), 0x700, 16)
    mmio.insert(Registers(4096), 0xFEB0_0000, 4096)
    try:
        from vmmd.kvm import Kvm
        vm = Kvm().create_vm()
        vcpu = vm.create_vcpu(0)
    except (OSError, VmmdError):  # pragma: no cover - without /dev/kvm the MSR event answers #GP
        vm = vcpu = None
    yield memory, ports, mmio, vcpu
    if vcpu is not None:
        vcpu.close()
        vm.close()


KNOWN_CODES = sorted(g.NAE_EVENT_NAMES)
exit_codes = st.one_of(st.sampled_from(KNOWN_CODES), st.sampled_from([0x72, 0x7B] * 3), U64)
ioio_infos = st.builds(lambda port, size_bits, flags: port << 16 | size_bits << 4 | flags,
                       st.sampled_from([0x700, 0x704, 0x70F, 0x3F8, 0xFFFF]), st.integers(0, 7), st.integers(0, 0xF))
scratch_gpas = st.one_of(
    st.sampled_from([0, GHCB_GPA + g.SHARED_BUFFER, GHCB_GPA + 0x7F8, GHCB_GPA + g.SHARED_BUFFER_END - 8,
                     GHCB_GPA + 0xFFF, 0x30000, RAM - 16, RAM, 0xC000_0000, (1 << 64) - 8, GHCB_GPA + 0x1000]),
    st.integers(0, RAM + 0x10000), U64)
bitmaps = st.one_of(U64.map(lambda lo: lo | (0x7 << (114 - 64)) << 64 if lo & 1 else lo),
                    st.integers(0, (1 << 128) - 1), st.just((1 << 128) - 1))
small_or_any = st.one_of(st.integers(0, 64), st.integers(0, 5000), U64)
ghcb_msr_values = st.one_of(st.just(GHCB_GPA), st.just(GHCB_GPA), st.integers(0, 0xFFF),
                            U64.map(lambda v: v & ~0xFFF), U64,
                            st.sampled_from([0x002, 0x004, 0x006, 0x080, 0x100, 0x010, 0x012, 0x014]).flatmap(
                                lambda code: U64.map(lambda v: v & ~0xFFF | code)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(exit_code=exit_codes, ioio=ioio_infos, info1=small_or_any, info2=small_or_any, bitmap=bitmaps,
       scratch=scratch_gpas, usage=st.sampled_from([0, 0, 0, 1, 0xFFFF_FFFF]), regs=st.lists(U64, min_size=6,
       max_size=6), cpl=st.integers(0, 255), msr=ghcb_msr_values, noise=st.binary(min_size=64, max_size=64))
def test_service_survives_any_ghcb(setup, exit_code, ioio, info1, info2, bitmap, scratch, usage, regs, cpl, msr,
                                   noise) -> None:
    memory, ports, mmio, vcpu = setup
    service = VmgexitService(memory, ports, mmio, cpuid_lookup, c_bit=51, vcpu_count=1)
    ram = memory.view(0, RAM)
    ram[0x30000:0x30040] = np.frombuffer(noise, np.uint8)
    page = g.GhcbPage(memory.view(GHCB_GPA, 4096))
    page.u8[:] = 0
    page.u8[g.SHARED_BUFFER:g.SHARED_BUFFER + 64] = np.frombuffer(noise, np.uint8)
    if exit_code == g.SVM_EXIT_IOIO:
        info1 = ioio
    for offset, value in zip((g.RAX, g.RBX, g.RCX, g.RDX, g.XCR0, g.XSS), regs, strict=True):
        page.set(offset, value, mark_valid=False)
    page.set(g.SW_EXIT_CODE, exit_code, mark_valid=False)
    page.set(g.SW_EXIT_INFO_1, info1, mark_valid=False)
    page.set(g.SW_EXIT_INFO_2, info2, mark_valid=False)
    page.set(g.SW_SCRATCH, scratch, mark_valid=False)
    page.set(g.CPL, cpl, mark_valid=False)
    page.valid_bitmap = bitmap
    page.usage = usage
    service.write_ghcb_msr(0, msr)
    before = ram.copy()

    try:
        action = service.vmgexit(0, vcpu)
    except VmStop as stop:
        assert stop.kind in STOP_KINDS and stop.reason
        action = None  # anything else propagates and fails the property

    # bytes written: only the GHCB page the MSR names and a scratch window of at most 16 pages
    nae = msr & 0xFFF == 0 and 0 < msr < RAM
    changed = np.flatnonzero(ram != before)
    allowed = np.zeros(RAM, bool)
    if nae:
        allowed[msr:msr + 4096] = True
        used_scratch = g.GhcbPage(memory.view(msr, 4096)).get(g.SW_SCRATCH) if msr != GHCB_GPA else scratch
        if used_scratch < RAM:
            allowed[used_scratch:used_scratch + GHCB_SCRATCH_AREA_LIMIT] = True
    assert not changed.size or allowed[changed].all(), f"wrote outside GHCB/scratch at {changed[:4]}"

    if action is not None:
        assert isinstance(action, VmgexitAction)
        if nae:  # a NAE event: a complete response in the GHCB
            answered = g.GhcbPage(memory.view(msr, 4096))
            assert answered.get(g.SW_EXIT_INFO_1) in (0, 1, 2)
            assert answered.valid_bitmap & g.valid_mask(g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2) == \
                g.valid_mask(g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2)
            if answered.get(g.SW_EXIT_INFO_1) == 2:
                assert 1 <= answered.get(g.SW_EXIT_INFO_2) <= 6
        else:
            assert not changed.size  # the MSR protocol never touches memory
