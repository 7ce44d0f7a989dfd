"""VmgexitService: every NAE event, every MSR-protocol request and every validation rule, on hand-built GHCBs.

GHCB pages live in a real GuestMemory; I/O and MMIO go to real buses with small devices defined here; MSR
events go to a real KVM vCPU.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from vmmd.devices.bus import MmioBus, PortBus
from vmmd.errors import ExitCode, VmmdError, VmStop
from vmmd.memory import GuestMemory
from vmmd.sev import ghcb as g
from vmmd.sev import vmgexit as vmg
from vmmd.sev.vmgexit import (
    GHCB_SCRATCH_AREA_LIMIT,
    KVM_ENOSYS,
    VmgexitAction,
    VmgexitService,
)

GHCB_GPA = 0x10000
RAM = 4 << 20
REG_PORT = 0x700  # ScratchRegisters: 16 ports
FIFO_PORT = 0x710  # Fifo: 4 ports (dword accesses at its base)
MMIO_GPA = 0xFEB0_0000


class ScratchRegisters:
    """16 byte-wide registers behind 16 ports; multi-byte accesses span consecutive registers."""

    def __init__(self) -> None:
        self.regs = bytearray(16)
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return int.from_bytes(self.regs[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
        self.regs[offset:offset + size] = value.to_bytes(size, "little")


class Fifo:
    """One port: writes append, reads pop (0 when empty) - shows element order of string I/O."""

    def __init__(self) -> None:
        self.written: list[tuple[int, int]] = []
        self.to_read: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return self.to_read.pop(0) if self.to_read else 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.written.append((size, value))


class MmioPage:
    """4 KiB of MMIO backed by a bytearray, any access size 1..8."""

    def __init__(self) -> None:
        self.data = bytearray(4096)
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
        self.data[offset:offset + size] = value.to_bytes(size, "little")


class Broken:
    def read(self, offset: int, size: int) -> int:
        raise RuntimeError("device bug")

    def write(self, offset: int, size: int, value: int) -> None:
        raise VmStop("debug-exit", "guest asked to exit", ExitCode.SUCCESS, status=1)


# A CPUID table as KVM_SET_CPUID2 would hold it (leaf 0xD component sizes as on an AVX-512 part)
CPUID_TABLE = {
    (0x0, 0): (0xD, 0x68747541, 0x444D4163, 0x69746E65),
    (0x1, 0): (0x00A00F11, 0x00010800, 0xFEDA3203, 0x178BFBFF),
    (0xD, 0): (0xE7, 0x340, 0x988, 0),
    (0xD, 1): (0xF, 0x340, 0, 0),  # XSAVEOPT, XSAVEC, XGETBV1, XSAVES
    (0xD, 2): (256, 576, 0, 0),  # AVX
    (0xD, 5): (64, 1088, 0, 0),  # opmask
    (0xD, 6): (512, 1152, 0, 0),  # ZMM_Hi256
    (0xD, 7): (1024, 1664, 0, 0),  # Hi16_ZMM
    (0x80000001, 0): (0x00A00F11, 0, 0x75C237FF, 0x2FD3FBFF),  # EDX[27] RDTSCP
    (0x8000001F, 0): (0x1000F, 0x16F, 0x1FD, 0x64),
}


def cpuid_lookup(function: int, index: int) -> tuple[int, int, int, int]:
    return CPUID_TABLE.get((function, index), (0, 0, 0, 0))


class Machine:
    def __init__(self, vcpu_count: int = 2) -> None:
        self.memory = GuestMemory.with_ram(RAM)
        self.ports = PortBus()
        self.regs = ScratchRegisters()
        self.fifo = Fifo()
        self.ports.insert(self.regs, REG_PORT, 16)
        self.ports.insert(self.fifo, FIFO_PORT, 4)
        self.ports.insert(Broken(), 0x720, 1)
        self.mmio = MmioBus()
        self.mmio_dev = MmioPage()
        self.mmio.insert(self.mmio_dev, MMIO_GPA, 4096)
        self.service = VmgexitService(self.memory, self.ports, self.mmio, cpuid_lookup, c_bit=51,
                                      vcpu_count=vcpu_count)
        self.page = g.GhcbPage(self.memory.view(GHCB_GPA, 4096))

    def ghcb(self, exit_code: int, info1: int = 0, info2: int = 0, vcpu: int = 0, gpa: int = GHCB_GPA,
             **fields: int) -> g.GhcbPage:
        """Fill a GHCB as a guest's #VC handler does (vc_ghcb_invalidate + ghcb_set_*) and register it."""
        page = g.GhcbPage(self.memory.view(gpa, 4096))
        page.u8[:g.SHARED_BUFFER] = 0
        page.set(g.SW_EXIT_CODE, exit_code)
        page.set(g.SW_EXIT_INFO_1, info1)
        page.set(g.SW_EXIT_INFO_2, info2)
        for name, value in fields.items():
            page.set(g.FIELDS[name], value)
        self.service.write_ghcb_msr(vcpu, gpa)
        return page

    def run(self, vcpu_obj=None, vcpu: int = 0) -> VmgexitAction:
        return self.service.vmgexit(vcpu, vcpu_obj)

    def response(self, page: g.GhcbPage | None = None) -> tuple[int, int]:
        page = page or self.page
        return page.get(g.SW_EXIT_INFO_1), page.get(g.SW_EXIT_INFO_2)


@pytest.fixture
def m() -> Machine:
    return Machine()


@pytest.fixture(scope="module")
def kvm_vcpu():
    try:
        from vmmd.kvm import Kvm
        vm = Kvm().create_vm()
        vcpu = vm.create_vcpu(0)
    except (OSError, VmmdError) as exc:  # pragma: no cover - only without /dev/kvm
        pytest.skip(f"no usable KVM: {exc}")
    yield vcpu
    vcpu.close()
    vm.close()


OUT_FIELDS = {g.RAX, g.RBX, g.RCX, g.RDX, g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2}


def assert_outputs_valid(page: g.GhcbPage) -> None:
    """sev_es_sync_to_ghcb(): exactly RAX, RBX, RCX, RDX and SW_EXITINFO1/2 are marked valid."""
    assert page.valid_bitmap == g.valid_mask(*OUT_FIELDS)


# --- GHCB MSR and MSR protocol -------------------------------------------------------------------------------
def test_ghcb_msr_reset_value_is_sev_info(m: Machine) -> None:
    for i in range(2):
        assert g.msr_info(m.service.read_ghcb_msr(i)) == g.GHCB_MSR_SEV_INFO_RESP
        assert g.sev_info_decode(m.service.read_ghcb_msr(i)) == (2, 1, 51)
    m.service.write_ghcb_msr(1, 0x1234_5000)
    assert m.service.read_ghcb_msr(1) == 0x1234_5000 and m.service.read_ghcb_msr(0) != 0x1234_5000


@pytest.mark.parametrize("version", [1, 2])
def test_msr_sev_info_request(version: int) -> None:
    machine = Machine()
    machine.service = VmgexitService(machine.memory, machine.ports, machine.mmio, cpuid_lookup, c_bit=47,
                                     vcpu_count=1, ghcb_version=version)
    machine.service.write_ghcb_msr(0, g.sev_info_request())
    assert machine.run() is VmgexitAction.RESUME
    assert machine.service.read_ghcb_msr(0) == g.sev_info_response(version, g.GHCB_VERSION_MIN, 47)


def test_service_refuses_unknown_ghcb_version(m: Machine) -> None:
    with pytest.raises(ValueError):
        VmgexitService(m.memory, m.ports, m.mmio, cpuid_lookup, ghcb_version=3)


@pytest.mark.parametrize("register", range(4))
@pytest.mark.parametrize("function", [0x0, 0x1, 0x8000001F, 0x4000_0000])
def test_msr_cpuid_request(m: Machine, function: int, register: int) -> None:
    m.service.write_ghcb_msr(0, g.cpuid_request(function, register))
    assert m.run() is VmgexitAction.RESUME
    value = m.service.read_ghcb_msr(0)
    assert g.msr_info(value) == g.GHCB_MSR_CPUID_RESP
    assert value >> 32 == cpuid_lookup(function, 0)[register]


def test_msr_cpuid_leaf_d_uses_last_xcr0(m: Machine) -> None:
    m.service.write_ghcb_msr(0, g.cpuid_request(0xD, g.GHCB_CPUID_REQ_EBX))
    m.run()
    assert m.service.read_ghcb_msr(0) >> 32 == 576  # XCR0 = FP only after reset
    m.ghcb(g.SVM_EXIT_CPUID, rax=0xD, rcx=0, xcr0=0x7)  # a NAE event carrying XCR0 updates the vCPU's XCR0
    m.run()
    m.service.write_ghcb_msr(0, g.cpuid_request(0xD, g.GHCB_CPUID_REQ_EBX))
    m.run()
    assert m.service.read_ghcb_msr(0) >> 32 == 576 + 256


def test_msr_ap_reset_hold_and_wake(m: Machine) -> None:
    m.service.write_ghcb_msr(1, g.ap_reset_hold_request())
    assert not m.service.ap_reset_hold_pending(1)
    assert m.run(vcpu=1) is VmgexitAction.HALT
    assert m.service.read_ghcb_msr(1) == g.ap_reset_hold_response(0)
    assert m.service.ap_reset_hold_pending(1)
    assert not m.service.complete_ap_reset_hold(0)
    assert m.service.complete_ap_reset_hold(1)
    assert m.service.read_ghcb_msr(1) == g.ap_reset_hold_response(1)
    assert not m.service.ap_reset_hold_pending(1)
    assert not m.service.complete_ap_reset_hold(1)


def test_msr_hv_features_request(m: Machine) -> None:
    m.service.write_ghcb_msr(0, g.hv_features_request())
    assert m.run() is VmgexitAction.RESUME
    assert m.service.read_ghcb_msr(0) == g.hv_features_response(0)  # no SNP features on an SEV-ES VM


@pytest.mark.parametrize("request_value", [g.preferred_gpa_request(), g.register_gpa_request(0x10),
                                           g.page_state_change_request(0x10, 2)])
def test_msr_snp_only_requests_stop_the_vm(m: Machine, request_value: int) -> None:
    m.service.write_ghcb_msr(0, request_value)
    with pytest.raises(VmStop) as stop:
        m.run()
    assert stop.value.kind == "ghcb-violation" and stop.value.exit_code == ExitCode.GUEST_CRASH
    assert "SNP" in stop.value.reason and f"{g.msr_info(request_value):#05x}" in stop.value.reason


def test_msr_termination_request(m: Machine) -> None:
    m.service.write_ghcb_msr(1, g.termination_request(0, 1))
    with pytest.raises(VmStop) as stop:
        m.run(vcpu=1)
    assert stop.value.kind == "sev-term" and stop.value.exit_code == ExitCode.GUEST_TERMINATED
    assert "protocol range not supported" in stop.value.reason and "vCPU 1" in stop.value.reason
    assert stop.value.status == 0x001


@pytest.mark.parametrize("code", [0x003, 0x008, 0x0FF, 0x101, 0xFFF])
def test_msr_unknown_request_left_as_is(m: Machine, code: int) -> None:
    value = 0xABCD_0000_0000_0000 | code
    m.service.write_ghcb_msr(0, value)
    assert m.run() is VmgexitAction.RESUME
    assert m.service.read_ghcb_msr(0) == value


# --- GHCB GPA --------------------------------------------------------------------------------------------------
def test_no_ghcb_registered_stops(m: Machine) -> None:
    m.service.write_ghcb_msr(0, 0)
    with pytest.raises(VmStop, match="no GHCB registered") as stop:
        m.run()
    assert stop.value.kind == "ghcb-violation"


@pytest.mark.parametrize("gpa", [RAM, RAM - 0x1000 + 0x1000, 0xC000_0000, 0xFFFF_FFFF_FFFF_F000, 1 << 51 | GHCB_GPA])
def test_ghcb_outside_ram_stops(m: Machine, gpa: int) -> None:
    m.service.write_ghcb_msr(0, gpa)
    with pytest.raises(VmStop, match="not inside guest RAM"):
        m.run()


def test_ghcb_in_rom_stops(m: Machine) -> None:
    m.memory.add_slot(0xFFF0_0000, 0x10_0000, read_only=True)
    m.service.write_ghcb_msr(0, 0xFFF0_0000)
    with pytest.raises(VmStop, match="read-only"):
        m.run()


def test_ghcb_page_cache_follows_msr(m: Machine) -> None:
    first = m.ghcb(g.SVM_EXIT_CPUID, rax=1, rcx=0)
    m.run()
    second = m.ghcb(g.SVM_EXIT_CPUID, gpa=GHCB_GPA + 0x1000, rax=0, rcx=0)
    m.run()
    assert second.get(g.RBX) == CPUID_TABLE[(0, 0)][1]
    assert first.get(g.RBX) == CPUID_TABLE[(1, 0)][1]


# --- validation ------------------------------------------------------------------------------------------------
def test_usage_must_be_zero(m: Machine) -> None:
    page = m.ghcb(g.SVM_EXIT_CPUID, rax=0, rcx=0)
    page.usage = 1
    assert m.run() is VmgexitAction.RESUME
    assert m.response() == (2, g.GHCB_ERR_INVALID_USAGE)
    assert page.get(g.RBX) == 0  # not serviced
    assert_outputs_valid(page)


@pytest.mark.parametrize("field", [g.SW_EXIT_CODE, g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2])
def test_exit_fields_required(m: Machine, field: int) -> None:
    page = m.ghcb(g.SVM_VMGEXIT_NMI_COMPLETE)
    page.valid_bitmap &= ~g.valid_mask(field)
    m.run()
    assert m.response() == (2, g.GHCB_ERR_MISSING_INPUT)


def test_protocol_version_not_checked_like_kvm(m: Machine) -> None:
    page = m.ghcb(g.SVM_VMGEXIT_NMI_COMPLETE)
    page.protocol_version = 0x7777
    m.run()
    assert m.response() == (0, 0)


IO_OUT = g.encode_ioio(REG_PORT, 1, False)
IO_STR_IN = g.encode_ioio(REG_PORT, 1, True, string=True)
SCRATCH = GHCB_GPA + g.SHARED_BUFFER

# (exit code, SW_EXITINFO1, every input field KVM requires for that case - sev_es_validate_vmgexit())
REQUIRED_CASES = [
    (g.SVM_EXIT_READ_DR7, 0, {}),
    (g.SVM_EXIT_WRITE_DR7, 0, {"rax": 0x400}),
    (g.SVM_EXIT_RDPMC, 0, {"rcx": 0}),
    (g.SVM_EXIT_CPUID, 0, {"rax": 1, "rcx": 0}),
    (g.SVM_EXIT_CPUID, 0, {"rax": 0xD, "rcx": 0, "xcr0": 7}),
    (g.SVM_EXIT_INVD, 0, {}),
    (g.SVM_EXIT_IOIO, IO_OUT, {"rax": 5}),
    (g.SVM_EXIT_IOIO, g.encode_ioio(REG_PORT, 1, True), {}),
    (g.SVM_EXIT_IOIO, IO_STR_IN, {"sw_scratch": SCRATCH}),
    (g.SVM_EXIT_MSR, 0, {"rcx": 0x174}),
    (g.SVM_EXIT_MSR, 1, {"rcx": 0x174, "rax": 1, "rdx": 0}),
    (g.SVM_EXIT_VMMCALL, 0, {"rax": 1, "cpl": 0}),
    (g.SVM_EXIT_RDTSCP, 0, {}),
    (g.SVM_EXIT_WBINVD, 0, {}),
    (g.SVM_EXIT_MONITOR, 0, {"rax": 0, "rcx": 0, "rdx": 0}),
    (g.SVM_EXIT_MWAIT, 0, {"rax": 0, "rcx": 0}),
    (g.SVM_VMGEXIT_MMIO_READ, MMIO_GPA, {"sw_scratch": SCRATCH}),
    (g.SVM_VMGEXIT_MMIO_WRITE, MMIO_GPA, {"sw_scratch": SCRATCH}),
    (g.SVM_VMGEXIT_NMI_COMPLETE, 0, {}),
    (g.SVM_VMGEXIT_AP_JUMP_TABLE, 1, {}),
    (g.SVM_VMGEXIT_HV_FEATURES, 0, {}),
]


@pytest.mark.parametrize("exit_code,info1,fields", REQUIRED_CASES,
                         ids=[f"{g.NAE_EVENT_NAMES[c[0]]}-{i}" for i, c in enumerate(REQUIRED_CASES)])
def test_required_inputs(kvm_vcpu, exit_code: int, info1: int, fields: dict[str, int]) -> None:
    machine = Machine()
    machine.ghcb(exit_code, info1, 4 if exit_code != g.SVM_EXIT_IOIO else 1, **fields)
    assert machine.run(kvm_vcpu) is VmgexitAction.RESUME
    assert machine.response()[0] in (0, 1)  # complete: serviced (or an exception to raise)
    for missing in fields:
        machine.ghcb(exit_code, info1, 4 if exit_code != g.SVM_EXIT_IOIO else 1, **fields)
        machine.page.valid_bitmap &= ~g.valid_mask(g.FIELDS[missing])
        machine.run(kvm_vcpu)
        assert machine.response() == (2, g.GHCB_ERR_MISSING_INPUT), missing
        assert_outputs_valid(machine.page)


@pytest.mark.parametrize("exit_code", [0x0, 0x78, 0x7F, 0x400, 0x403, 0x8000_0000, 0x8000_0006, 0x8000_0018,
                                       0x1_0000_0072, 0xFFFF_FFFF_FFFF_FFFF])
def test_unknown_exit_code_is_invalid_event(m: Machine, exit_code: int) -> None:
    m.ghcb(exit_code)
    assert m.run() is VmgexitAction.RESUME
    assert m.response() == (2, g.GHCB_ERR_INVALID_EVENT)
    assert m.service.last_error[0] == (exit_code, g.GHCB_ERR_INVALID_EVENT)


@pytest.mark.parametrize("exit_code", sorted(g.SNP_ONLY_NAE_EVENTS))
def test_snp_only_events_answer_missing_input(m: Machine, exit_code: int) -> None:
    m.ghcb(exit_code, 0x1000, 0x2000, rax=0, sw_scratch=SCRATCH)
    m.run()
    assert m.response() == (2, g.GHCB_ERR_MISSING_INPUT)  # sev_es_validate_vmgexit(): !sev_snp_guest()


# --- scratch area (setup_vmgexit_scratch()) ----------------------------------------------------------------------
def string_out(m: Machine, scratch: int, count: int, size: int = 1, port: int = FIFO_PORT) -> g.GhcbPage:
    return m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(port, size, False, string=True, rep=True), count,
                  sw_scratch=scratch)


@pytest.mark.parametrize("scratch,count", [
    (0, 1),  # no scratch GPA
    (GHCB_GPA, 1),  # inside the GHCB but in the save area
    (GHCB_GPA + g.SHARED_BUFFER - 1, 1),
    (GHCB_GPA + g.SHARED_BUFFER_END - 4, 5),  # runs into reserved_0xff0
    (GHCB_GPA + g.SHARED_BUFFER_END, 1),
    (0x30000, GHCB_SCRATCH_AREA_LIMIT + 1),  # outside the GHCB: over KVM's 16-page limit
    (0xFFFF_FFFF_FFFF_FFF0, 0x20),  # wraps around 2^64
])
def test_invalid_scratch_area(m: Machine, scratch: int, count: int) -> None:
    string_out(m, scratch, count)
    assert m.run() is VmgexitAction.RESUME
    assert m.response() == (2, g.GHCB_ERR_INVALID_SCRATCH_AREA)
    assert m.fifo.written == []


def test_scratch_missing_is_missing_input(m: Machine) -> None:
    page = string_out(m, SCRATCH, 1)
    page.valid_bitmap &= ~g.valid_mask(g.SW_SCRATCH)
    m.run()
    assert m.response() == (2, g.GHCB_ERR_MISSING_INPUT)


def test_scratch_exactly_fills_shared_buffer(m: Machine) -> None:
    m.page.u8[g.SHARED_BUFFER:g.SHARED_BUFFER_END] = np.arange(g.GHCB_SHARED_BUF_SIZE) & 0xFF
    string_out(m, SCRATCH, g.GHCB_SHARED_BUF_SIZE)
    m.page.u8[g.SHARED_BUFFER:g.SHARED_BUFFER_END] = np.arange(g.GHCB_SHARED_BUF_SIZE) & 0xFF
    m.run()
    assert m.response() == (0, 0)
    assert [v for _, v in m.fifo.written] == [i & 0xFF for i in range(g.GHCB_SHARED_BUF_SIZE)]


def test_scratch_outside_ghcb_in_ram(m: Machine) -> None:
    m.memory.write(0x30000, bytes([1, 0, 2, 0, 3, 0]))
    string_out(m, 0x30000, 3, size=2)
    m.run()
    assert m.response() == (0, 0)
    assert m.fifo.written == [(2, 1), (2, 2), (2, 3)]


def test_scratch_outside_ram_stops_like_kvm_efault(m: Machine) -> None:
    string_out(m, RAM - 2, 4)
    with pytest.raises(VmStop, match="outside guest RAM") as stop:
        m.run()
    assert stop.value.kind == "ghcb-violation"
    assert m.fifo.written == []


def test_scratch_zero_length_outside_ram_is_fine(m: Machine) -> None:
    string_out(m, 0x7000_0000, 0)
    m.run()
    assert m.response() == (0, 0)


def test_string_io_count_overflow_stops(m: Machine) -> None:
    string_out(m, SCRATCH, 0x4000_0000, size=2)  # count * size > INT_MAX
    with pytest.raises(VmStop, match="overflows"):
        m.run()
    string_out(m, SCRATCH, 0x8000_0000)  # count > INT_MAX
    with pytest.raises(VmStop, match="overflows"):
        m.run()


# --- CPUID ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("function,index", [(0, 0), (1, 0), (0x8000001F, 0), (0x1234, 0), (1, 5)])
def test_cpuid(m: Machine, function: int, index: int) -> None:
    page = m.ghcb(g.SVM_EXIT_CPUID, rax=0xFFFF_FFFF_0000_0000 | function if function != 0xD else function,
                  rcx=index, rbx=0xDEAD, rdx=0xBEEF)
    page.valid_bitmap &= ~g.valid_mask(g.SW_SCRATCH)
    assert m.run() is VmgexitAction.RESUME
    assert m.response() == (0, 0)
    expected = cpuid_lookup(function, index)
    assert tuple(page.get(f) for f in (g.RAX, g.RBX, g.RCX, g.RDX)) == expected
    assert_outputs_valid(page)


@pytest.mark.parametrize("xcr0,xss,standard,compacted", [
    (0x1, 0, 576, 576),
    (0x3, 0, 576, 576),
    (0x7, 0, 576 + 256, 576 + 256),
    (0xE7, 0, 1664 + 1024, 832 + 64 + 512 + 1024),
    (0xE3, 0, 1664 + 1024, 576 + 64 + 512 + 1024),  # no AVX: the AVX-512 parts pack at 576
    (0x7 | 1 << 40, 0, 832, 832),  # a bit the table has no component for adds nothing
])
def test_cpuid_leaf_d_sized_for_xcr0(m: Machine, xcr0: int, xss: int, standard: int, compacted: int) -> None:
    page = m.ghcb(g.SVM_EXIT_CPUID, rax=0xD, rcx=0, xcr0=xcr0)
    m.run()
    assert page.get(g.RBX) == standard
    assert (page.get(g.RAX), page.get(g.RCX)) == CPUID_TABLE[(0xD, 0)][::2]
    page = m.ghcb(g.SVM_EXIT_CPUID, rax=0xD, rcx=1, xcr0=xcr0, xss=xss)
    m.run()
    assert page.get(g.RBX) == compacted
    page = m.ghcb(g.SVM_EXIT_CPUID, rax=0xD, rcx=2, xcr0=xcr0)
    m.run()
    assert page.get(g.RBX) == 576  # other subleaves straight from the table


# --- IOIO ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 4])
def test_ioio_out(m: Machine, size: int) -> None:
    page = m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(REG_PORT + 4, size, False), 0x1234, rax=0xAABBCCDD_11223344)
    assert m.run() is VmgexitAction.RESUME
    assert m.response() == (0, 0)
    assert m.regs.log == [("w", 4, size, 0x11223344 & ((1 << 8 * size) - 1))]
    assert page.get(g.RAX) == 0xAABBCCDD_11223344
    assert_outputs_valid(page)


@pytest.mark.parametrize("size,expected_rax", [(1, 0xAABBCCDD_112233F1), (2, 0xAABBCCDD_1122F2F1),
                                               (4, 0xF4F3F2F1)])
def test_ioio_in_merges_like_complete_fast_pio_in(m: Machine, size: int, expected_rax: int) -> None:
    m.regs.regs[0:4] = bytes([0xF1, 0xF2, 0xF3, 0xF4])
    page = m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(REG_PORT, size, True), 0, rax=0xAABBCCDD_11223344)
    m.run()
    assert m.response() == (0, 0)
    assert page.get(g.RAX) == expected_rax


def test_ioio_in_without_rax_starts_from_zero(m: Machine) -> None:
    m.regs.regs[0] = 0x5A
    page = m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(REG_PORT, 1, True))
    m.run()
    assert page.get(g.RAX) == 0x5A


def test_ioio_unmapped_port_reads_all_ones(m: Machine) -> None:
    page = m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(0x1234, 2, True), rax=0)
    m.run()
    assert page.get(g.RAX) == 0xFFFF


@pytest.mark.parametrize("size_bits", [0, 3, 5, 6, 7])
def test_ioio_bad_operand_size_is_invalid_input(m: Machine, size_bits: int) -> None:
    info = g.encode_ioio(REG_PORT, 1, False) & ~g.SVM_IOIO_SIZE_MASK | size_bits << g.SVM_IOIO_SIZE_SHIFT
    m.ghcb(g.SVM_EXIT_IOIO, info, rax=1)
    m.run()
    assert m.response() == (2, g.GHCB_ERR_INVALID_INPUT)
    assert m.regs.log == []


@pytest.mark.parametrize("size", [1, 2, 4])
def test_string_out_in_ghcb_shared_buffer(m: Machine, size: int) -> None:
    count = 5
    data = bytes(range(1, count * size + 1))
    m.page.u8[g.SHARED_BUFFER + 8:g.SHARED_BUFFER + 8 + len(data)] = np.frombuffer(data, np.uint8)
    m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(FIFO_PORT, size, False, string=True, rep=True), count,
           sw_scratch=SCRATCH + 8)
    m.page.u8[g.SHARED_BUFFER + 8:g.SHARED_BUFFER + 8 + len(data)] = np.frombuffer(data, np.uint8)
    m.run()
    assert m.response() == (0, 0)
    assert m.fifo.written == [(size, int.from_bytes(data[k * size:(k + 1) * size], "little")) for k in range(count)]


@pytest.mark.parametrize("size", [1, 2, 4])
def test_string_in_fills_scratch(m: Machine, size: int) -> None:
    values = [0x11111111 * (k + 1) & ((1 << 8 * size) - 1) for k in range(4)]
    m.fifo.to_read = list(values)
    m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(FIFO_PORT, size, True, string=True, rep=True), 4, sw_scratch=SCRATCH)
    m.page.u8[g.SHARED_BUFFER:g.SHARED_BUFFER_END] = 0xEE
    m.run()
    assert m.response() == (0, 0)
    got = bytes(m.page.u8[g.SHARED_BUFFER:g.SHARED_BUFFER + 4 * size])
    assert got == b"".join(v.to_bytes(size, "little") for v in values)
    assert m.page.u8[g.SHARED_BUFFER + 4 * size] == 0xEE  # nothing past count * size


def test_string_in_outside_ghcb(m: Machine) -> None:
    m.fifo.to_read = [0xA1, 0xA2]
    m.memory.write(0x30000, b"\xee" * 4)
    m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(FIFO_PORT, 1, True, string=True), 2, sw_scratch=0x30000)
    m.run()
    assert m.memory.read(0x30000, 4) == b"\xa1\xa2\xee\xee"


def test_string_in_into_rom_scratch_stops(m: Machine) -> None:
    m.memory.add_slot(0xFFF0_0000, 0x10_0000, read_only=True)
    m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(FIFO_PORT, 1, True, string=True), 2, sw_scratch=0xFFF0_0000)
    with pytest.raises(VmStop, match="read-only"):
        m.run()


# --- MSR (real KVM vCPU) -----------------------------------------------------------------------------------------
MSR_IA32_SYSENTER_CS = 0x174
MSR_KERNEL_GS_BASE = 0xC000_0102
MSR_PLATFORM_INFO = 0xCE
PAT_DEFAULT, PAT_OTHER = 0x0007_0406_0007_0406, 0x0006_0406_0007_0405  # every byte a valid memory type


def test_msr_write_then_read(m: Machine, kvm_vcpu) -> None:
    page = m.ghcb(g.SVM_EXIT_MSR, 1, rcx=vmg.MSR_IA32_CR_PAT, rax=0xDEAD_0000_0007_0405,
                  rdx=0xBEEF_0006_0406)
    assert m.run(kvm_vcpu) is VmgexitAction.RESUME
    assert m.response() == (0, 0)
    assert kvm_vcpu.get_msr(vmg.MSR_IA32_CR_PAT) == PAT_OTHER  # EDX:EAX, upper halves ignored
    page = m.ghcb(g.SVM_EXIT_MSR, 0, rcx=0xFFFF_FFFF_0000_0000 | vmg.MSR_IA32_CR_PAT, rax=-1, rdx=-1)
    m.run(kvm_vcpu)
    assert m.response() == (0, 0)
    assert (page.get(g.RAX), page.get(g.RDX)) == (PAT_OTHER & 0xFFFF_FFFF, PAT_OTHER >> 32)
    assert_outputs_valid(page)


@pytest.mark.parametrize("info1", [0, 1])
def test_msr_refused_injects_gp(m: Machine, kvm_vcpu, info1: int) -> None:
    m.ghcb(g.SVM_EXIT_MSR, info1, rcx=0xDEAD_BEEF, rax=0, rdx=0)
    assert m.run(kvm_vcpu) is VmgexitAction.RESUME
    assert m.response() == (1, g.GP_EVENT)


@pytest.mark.parametrize(("index", "value"), [
    (MSR_PLATFORM_INFO, 0xFF00),  # read-only for a guest; KVM_SET_MSRS (host-initiated) would write it
    (vmg.MSR_IA32_TSC, 0x1234),  # a host-initiated TSC write resynchronises the clock
    (MSR_KERNEL_GS_BASE, 0x1000),
    (MSR_IA32_SYSENTER_CS, 0x10),
    (0xC001_0130, 0),  # the GHCB MSR itself
])
def test_msr_writes_outside_the_allowlist_inject_gp_and_change_nothing(m: Machine, kvm_vcpu, index: int,
                                                                       value: int) -> None:
    before = kvm_vcpu.get_msr(index)
    m.ghcb(g.SVM_EXIT_MSR, 1, rcx=index, rax=value & 0xFFFF_FFFF, rdx=value >> 32)
    m.run(kvm_vcpu)
    assert m.response() == (1, g.GP_EVENT)
    if index != vmg.MSR_IA32_TSC:  # the TSC moves on by itself
        assert kvm_vcpu.get_msr(index) == before


def test_tsc_aux_follows_the_guests_cpuid(m: Machine, kvm_vcpu) -> None:
    m.ghcb(g.SVM_EXIT_MSR, 1, rcx=vmg.MSR_TSC_AUX, rax=0x1234, rdx=0)
    m.run(kvm_vcpu)
    assert m.response() == (0, 0) and kvm_vcpu.get_msr(vmg.MSR_TSC_AUX) == 0x1234
    no_rdtscp = VmgexitService(m.memory, m.ports, m.mmio, lambda f, i: (0, 0, 0, 0), c_bit=51, vcpu_count=2)
    m.service = no_rdtscp
    m.ghcb(g.SVM_EXIT_MSR, 0, rcx=vmg.MSR_TSC_AUX)
    m.run(kvm_vcpu)
    assert m.response() == (1, g.GP_EVENT)


def test_msr_without_vcpu_injects_gp(m: Machine) -> None:
    m.ghcb(g.SVM_EXIT_MSR, 0, rcx=MSR_IA32_SYSENTER_CS)
    m.run(None)
    assert m.response() == (1, g.GP_EVENT)


# --- MMIO --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 2, 4, 8, 3, 16, 13])
def test_mmio_write_then_read(m: Machine, length: int) -> None:
    data = bytes(range(0x40, 0x40 + length))
    m.ghcb(g.SVM_VMGEXIT_MMIO_WRITE, MMIO_GPA + 0x100, length, sw_scratch=SCRATCH + 16)
    m.page.u8[g.SHARED_BUFFER + 16:g.SHARED_BUFFER + 16 + length] = np.frombuffer(data, np.uint8)
    m.run()
    assert m.response() == (0, 0)
    assert bytes(m.mmio_dev.data[0x100:0x100 + length]) == data
    assert [entry[2] for entry in m.mmio_dev.log] == [min(8, length - k) for k in range(0, length, 8)]
    m.ghcb(g.SVM_VMGEXIT_MMIO_READ, MMIO_GPA + 0x100, length, sw_scratch=SCRATCH + 100)
    m.run()
    assert m.response() == (0, 0)
    assert bytes(m.page.u8[g.SHARED_BUFFER + 100:g.SHARED_BUFFER + 100 + length]) == data


def test_mmio_read_unmapped_is_all_ones(m: Machine) -> None:
    m.ghcb(g.SVM_VMGEXIT_MMIO_READ, 0xFED0_0000, 4, sw_scratch=SCRATCH)
    m.run()
    assert bytes(m.page.u8[g.SHARED_BUFFER:g.SHARED_BUFFER + 4]) == b"\xff" * 4


def test_mmio_scratch_rules_apply(m: Machine) -> None:
    m.ghcb(g.SVM_VMGEXIT_MMIO_READ, MMIO_GPA, 64, sw_scratch=GHCB_GPA + g.SHARED_BUFFER_END - 32)
    m.run()
    assert m.response() == (2, g.GHCB_ERR_INVALID_SCRATCH_AREA)
    assert m.mmio_dev.log == []


# --- scratch areas KVM reads with kvm_read_guest(): across slots, through a bounce buffer (issue 16, 11-12) -----
def test_scratch_across_adjacent_slots_is_read_and_written_across_them(m: Machine) -> None:
    """kvm_read_guest()/kvm_write_guest() walk guest pages slot by slot: a scratch area from the end of RAM into
    a slot that starts right there is one area (KVM answers ok; vmmd used to stop the VM)."""
    m.memory.add_slot(RAM, 0x10_0000)
    data = bytes(range(0x50, 0x70))
    m.memory.write(RAM - 16, data[:16])
    m.memory.write(RAM, data[16:])
    m.ghcb(g.SVM_VMGEXIT_MMIO_WRITE, MMIO_GPA, 32, sw_scratch=RAM - 16)
    m.run()
    assert m.response() == (0, 0)
    assert bytes(m.mmio_dev.data[:32]) == data
    m.mmio_dev.data[0x200:0x220] = bytes(range(0xA0, 0xC0))
    m.ghcb(g.SVM_VMGEXIT_MMIO_READ, MMIO_GPA + 0x200, 32, sw_scratch=RAM - 8)
    m.run()
    assert m.response() == (0, 0)
    assert m.memory.read(RAM - 8, 8) + m.memory.read(RAM, 24) == bytes(range(0xA0, 0xC0))


def test_scratch_from_the_rom_below_4g_into_ram_above_it_is_read(m: Machine) -> None:
    """The case issue 16 names: the read-only image slot ending at 4 GiB, RAM starting there."""
    m.memory.add_slot(0xFFF0_0000, 0x10_0000, read_only=True)
    m.memory.add_slot(0x1_0000_0000, 0x10_0000)
    m.memory.slots[-2].mapping[-4:] = b"ROM!"  # the ROM slot's last bytes, written host-side
    m.memory.write(0x1_0000_0000, b"RAM!")
    m.ghcb(g.SVM_VMGEXIT_MMIO_WRITE, MMIO_GPA, 8, sw_scratch=0x1_0000_0000 - 4)
    m.run()
    assert m.response() == (0, 0)
    assert bytes(m.mmio_dev.data[:8]) == b"ROM!RAM!"
    m.ghcb(g.SVM_VMGEXIT_MMIO_READ, MMIO_GPA, 8, sw_scratch=0x1_0000_0000 - 4)
    with pytest.raises(VmStop, match="read-only"):  # writing it back would reach the ROM (documented)
        m.run()


def test_scratch_across_a_gap_between_slots_still_stops(m: Machine) -> None:
    m.memory.add_slot(RAM + 0x1000, 0x1000)  # one page of nothing in between
    m.ghcb(g.SVM_VMGEXIT_MMIO_WRITE, MMIO_GPA, 0x2000, sw_scratch=RAM - 0x800)
    with pytest.raises(VmStop, match="outside guest RAM"):
        m.run()
    assert m.mmio_dev.log == []


OVERLAP = GHCB_GPA - 8  # begins in the page before the GHCB, so KVM bounces it, and runs into the GHCB's save area
OVERLAP_LEN = 0x400  # up to GHCB + 0x3F8: covers RAX..SW_SCRATCH and the low half of the valid bitmap


def _kvm_view_of_the_ghcb_before_the_scratch_read(page_bytes: bytes) -> bytes:
    """The GHCB after sev_es_sync_from_ghcb() (bitmap cleared) and svm_vmgexit_success(svm, 0) (SW_EXITINFO1/2
    zero and marked valid): what kvm_read_guest() of an overlapping scratch area reads."""
    page = bytearray(page_bytes)
    page[g.VALID_BITMAP:g.VALID_BITMAP + 16] = g.valid_mask(g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2).to_bytes(16, "little")
    page[g.SW_EXIT_INFO_1:g.SW_EXIT_INFO_1 + 16] = bytes(16)
    return bytes(page)


def test_scratch_overlapping_the_ghcb_is_read_as_kvm_reads_it(m: Machine) -> None:
    """MMIO write from an area overlapping the GHCB: the device gets the GHCB as KVM has rewritten it by the time
    setup_vmgexit_scratch() copies the area, not the guest's fields as written."""
    m.memory.write(OVERLAP, bytes(range(8)))
    page = m.ghcb(g.SVM_VMGEXIT_MMIO_WRITE, MMIO_GPA, OVERLAP_LEN, rax=0x1111, rbx=0x2222, sw_scratch=OVERLAP)
    expected = bytes(range(8)) + _kvm_view_of_the_ghcb_before_the_scratch_read(page.u8.tobytes())[:OVERLAP_LEN - 8]
    m.run()
    assert m.response() == (0, 0)
    assert bytes(m.mmio_dev.data[:OVERLAP_LEN]) == expected


def test_scratch_overlapping_the_ghcb_is_copied_back_before_the_gprs(m: Machine) -> None:
    """MMIO read into an area overlapping the GHCB: KVM writes the bounce buffer back at sev_es_unmap_ghcb(), after
    the event set SW_EXITINFO1/2 and before sev_es_sync_to_ghcb() sets RAX..RDX and their valid bits."""
    m.mmio_dev.data[:OVERLAP_LEN] = b"\xab" * OVERLAP_LEN
    page = m.ghcb(g.SVM_VMGEXIT_MMIO_READ, MMIO_GPA, OVERLAP_LEN, rax=0x1111, rcx=0x3333, sw_scratch=OVERLAP)
    m.run()
    assert m.memory.read(OVERLAP, 8) == b"\xab" * 8
    filler = int.from_bytes(b"\xab" * 8, "little")
    assert m.response() == (filler, filler)  # the device's bytes won over SW_EXITINFO1/2 = 0
    assert (page.get(g.RAX), page.get(g.RBX), page.get(g.RCX), page.get(g.RDX)) == (0x1111, 0, 0x3333, 0)
    gprs = g.valid_mask(g.RAX, g.RBX, g.RCX, g.RDX)
    low = filler | (gprs & (1 << 64) - 1)
    high = (g.valid_mask(g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2) | gprs) >> 64  # beyond the area: as KVM left it
    assert page.valid_bitmap == low | high << 64
    assert page.get(g.SW_EXIT_CODE) == filler and page.get(g.SW_SCRATCH) == filler


# --- the rest of the events ------------------------------------------------------------------------------------
def test_nmi_complete(m: Machine) -> None:
    page = m.ghcb(g.SVM_VMGEXIT_NMI_COMPLETE)
    assert m.run() is VmgexitAction.RESUME
    assert m.response() == (0, 0)
    assert_outputs_valid(page)


def test_ap_hlt_loop_holds_until_woken(m: Machine) -> None:
    page = m.ghcb(g.SVM_VMGEXIT_AP_HLT_LOOP, vcpu=1, gpa=GHCB_GPA + 0x1000)
    assert m.run(vcpu=1) is VmgexitAction.HALT
    assert m.response(page) == (0, 0)
    assert m.service.ap_reset_hold_pending(1)
    assert m.service.complete_ap_reset_hold(1)
    assert m.response(page) == (0, 1)  # sev_vcpu_deliver_sipi_vector(): SW_EXITINFO2 = 1
    assert page.is_valid(g.SW_EXIT_INFO_2)


def test_ap_jump_table_is_per_vm(m: Machine) -> None:
    m.ghcb(g.SVM_VMGEXIT_AP_JUMP_TABLE, g.SVM_VMGEXIT_SET_AP_JUMP_TABLE, 0x9F000, vcpu=0)
    m.run()
    assert m.response() == (0, 0)
    page = m.ghcb(g.SVM_VMGEXIT_AP_JUMP_TABLE, g.SVM_VMGEXIT_GET_AP_JUMP_TABLE, 0, vcpu=1,
                  gpa=GHCB_GPA + 0x1000)
    m.run(vcpu=1)
    assert m.response(page) == (0, 0x9F000)
    m.ghcb(g.SVM_VMGEXIT_AP_JUMP_TABLE, 2, 0)
    m.run()
    assert m.response() == (2, g.GHCB_ERR_INVALID_INPUT)


def test_hv_features(m: Machine) -> None:
    m.ghcb(g.SVM_VMGEXIT_HV_FEATURES)
    m.run()
    assert m.response() == (0, 0)


def test_nae_termination_request(m: Machine) -> None:
    m.ghcb(g.SVM_VMGEXIT_TERM_REQUEST, g.nae_termination_info(1, 2), 0x77)
    with pytest.raises(VmStop) as stop:
        m.run()
    assert stop.value.kind == "sev-term" and stop.value.exit_code == ExitCode.GUEST_TERMINATED
    assert "PVALIDATE" in stop.value.reason and "0x77" in stop.value.reason
    assert stop.value.status == 0x102


def test_unsupported_event_stops(m: Machine) -> None:
    m.ghcb(g.SVM_VMGEXIT_UNSUPPORTED_EVENT, 0x29, 0x1234)
    with pytest.raises(VmStop, match="unsupported event") as stop:
        m.run()
    assert stop.value.exit_code == ExitCode.GUEST_CRASH and "0x29" in stop.value.reason


@pytest.mark.parametrize("cpl,nr,expected", [(0, 1, 0), (0, 5, -KVM_ENOSYS), (0, 12, -KVM_ENOSYS), (3, 1, -1)])
def test_vmmcall(m: Machine, cpl: int, nr: int, expected: int) -> None:
    page = m.ghcb(g.SVM_EXIT_VMMCALL, rax=nr, cpl=cpl, rbx=7)
    m.run()
    assert m.response() == (0, 0)
    assert page.get(g.RAX) == expected & 0xFFFF_FFFF_FFFF_FFFF
    assert page.get(g.RBX) == 7


@pytest.mark.parametrize("exit_code,fields", [
    (g.SVM_EXIT_READ_DR7, {}), (g.SVM_EXIT_WRITE_DR7, {"rax": 0x400}), (g.SVM_EXIT_INVD, {}),
    (g.SVM_EXIT_WBINVD, {}), (g.SVM_EXIT_MONITOR, {"rax": 1, "rcx": 0, "rdx": 0}),
    (g.SVM_EXIT_MWAIT, {"rax": 0, "rcx": 0})])
def test_nop_events(m: Machine, exit_code: int, fields: dict[str, int]) -> None:
    page = m.ghcb(exit_code, **fields)
    m.run()
    assert m.response() == (0, 0)
    assert page.get(g.RAX) == fields.get("rax", 0)


def test_rdtscp_raises_ud(m: Machine) -> None:
    m.ghcb(g.SVM_EXIT_RDTSCP)
    m.run()
    assert m.response() == (1, g.UD_EVENT)


class PmuVcpu:
    """The vCPU side of RDPMC: counter MSRs, CR0/CR4, and the exceptions queued for the next KVM_RUN."""

    def __init__(self, counters: dict[int, int], cr0: int = 0x8000_0011, cr4: int = 0) -> None:
        self.counters = counters
        self.cr0, self.cr4 = cr0, cr4
        self.injected: list[tuple[int, int | None]] = []

    def get_msr(self, index: int) -> int | None:
        return self.counters.get(index)

    def set_msr(self, index: int, value: int) -> bool:
        return False

    def get_sregs(self):
        from vmmd.kvm import uapi

        return uapi.kvm_sregs(cr0=self.cr0, cr4=self.cr4)

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        self.injected.append((vector, error_code))


AMD_PMU = {(0, 0): (0x10, 0x6874_7541, 0x444D_4163, 0x6974_6E65), (0x8000_0001, 0): (0, 0, 1 << 23, 0)}
INTEL_PMU = {(0, 0): (0x16, 0x756E_6547, 0x6C65_746E, 0x4965_6E69),
             (0xA, 0): (2 | 4 << 8 | 40 << 16, 0, 0, 3 | 48 << 5)}  # v2: 4 GP x 40 bits, 3 fixed x 48 bits


def _rdpmc(table: dict, vcpu: PmuVcpu, ecx: int, pmu_enabled: bool = True, cpl: int | None = None):
    machine = Machine()
    machine.service = VmgexitService(machine.memory, machine.ports, machine.mmio,
                                     lambda f, i: table.get((f, i), (0, 0, 0, 0)), pmu_enabled=pmu_enabled)
    fields = {"rcx": ecx, "rax": 0xAAAA, "rdx": 0xDDDD}
    if cpl is not None:
        fields["cpl"] = cpl
    page = machine.ghcb(g.SVM_EXIT_RDPMC, **fields)
    machine.run(vcpu)
    return machine.response(), (page.get(g.RAX), page.get(g.RDX))


@pytest.mark.parametrize(("table", "ecx", "msr", "value"), [
    (AMD_PMU, 0, 0xC001_0201, 0x1234_5678_9ABC),  # PERFCTR_CORE: MSR_F15H_PERF_CTR + 2 * index
    (AMD_PMU, 5, 0xC001_020B, 0xFFFF_FFFF_FFFF),
    ({(0, 0): AMD_PMU[(0, 0)]}, 3, 0xC001_0007, 0x42),  # no PERFCTR_CORE: MSR_K7_PERFCTR0 + index
    (INTEL_PMU, 3, 0xC4, 0xFF_1234_5678_9ABC),  # GP counter, masked to 40 bits
    (INTEL_PMU, (1 << 30) | 2, 0x30B, 0xFFFF_1234_5678_9ABC),  # fixed counter 2, masked to 48 bits
])
def test_rdpmc_reads_the_counter_kvm_would(table: dict, ecx: int, msr: int, value: int) -> None:
    """kvm_emulate_rdpmc(): EAX = low 32 bits, EDX = high 32 bits of the counter (masked to its width)."""
    vcpu = PmuVcpu({msr: value})
    response, (rax, rdx) = _rdpmc(table, vcpu, ecx)
    width = 40 if table is INTEL_PMU and not ecx & (1 << 30) else 48 if table is INTEL_PMU else 64
    masked = value & ((1 << width) - 1)
    assert response == (0, 0) and (rax, rdx) == (masked & 0xFFFF_FFFF, masked >> 32)
    assert vcpu.injected == []


@pytest.mark.parametrize(("table", "ecx", "enabled", "cpl", "cr4"), [
    (AMD_PMU, 0, False, None, 0),  # kvm.enable_pmu=N: pmu->version 0
    (AMD_PMU, 6, True, None, 0),  # past the 6 PERFCTR_CORE counters
    ({(0, 0): AMD_PMU[(0, 0)]}, 4, True, None, 0),  # past the 4 legacy counters
    (AMD_PMU, 0x8000_0000, True, None, 0),  # AMD: all of ECX is the index
    (INTEL_PMU, 4, True, None, 0),
    (INTEL_PMU, (1 << 30) | 3, True, None, 0),
    (INTEL_PMU, 0x2000_0000, True, None, 0),  # an unknown counter type
    ({(0, 0): INTEL_PMU[(0, 0)]}, 0, True, None, 0),  # CPUID 0xA version 0: no vPMU
    (AMD_PMU, 0, True, 3, 0),  # CPL 3 without CR4.PCE
])
def test_rdpmc_refusal_is_a_gp_kvm_injects(table: dict, ecx: int, enabled: bool, cpl: int | None, cr4: int) -> None:
    """KVM injects #GP itself (kvm_inject_gp()) and leaves SW_EXITINFO1 = 0 and RAX/RDX as they came."""
    vcpu = PmuVcpu({0xC001_0201: 7, 0xC1: 7, 0x309: 7}, cr4=cr4)
    response, regs = _rdpmc(table, vcpu, ecx, pmu_enabled=enabled, cpl=cpl)
    assert response == (0, 0) and regs == (0xAAAA, 0xDDDD)
    assert vcpu.injected == [(13, 0)]


def test_rdpmc_at_cpl3_needs_cr4_pce_only_in_protected_mode() -> None:
    assert _rdpmc(AMD_PMU, PmuVcpu({0xC001_0201: 9}, cr4=1 << 8), 0, cpl=3)[1] == (9, 0)  # CR4.PCE
    assert _rdpmc(AMD_PMU, PmuVcpu({0xC001_0201: 9}, cr0=0), 0, cpl=3)[1] == (9, 0)  # real mode: CPL moot


def test_rdpmc_without_a_vcpu_answers_gp_through_the_ghcb(m: Machine) -> None:
    m.ghcb(g.SVM_EXIT_RDPMC, rcx=0)
    m.run()
    assert m.response() == (1, g.GP_EVENT)


def test_rdtsc_stops_like_kvm(m: Machine) -> None:
    m.ghcb(g.SVM_EXIT_RDTSC)
    with pytest.raises(VmStop, match="RDTSC"):
        m.run()


def test_device_exception_becomes_vmstop(m: Machine) -> None:
    m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(0x720, 1, True))
    with pytest.raises(VmStop) as stop:
        m.run()
    assert stop.value.kind == "internal-error" and "device bug" in stop.value.reason
    assert stop.value.exit_code == ExitCode.VMM_ERROR


def test_close_releases_guest_memory(m: Machine) -> None:
    m.ghcb(g.SVM_VMGEXIT_NMI_COMPLETE)
    m.run()
    del m.page
    mapping = m.memory.slots[0].mapping
    m.service.close()
    m.memory.close()  # leaves the mapping open (BufferError swallowed) while a view is still exported
    assert mapping.closed


def test_device_vmstop_passes_through(m: Machine) -> None:
    m.ghcb(g.SVM_EXIT_IOIO, g.encode_ioio(0x720, 1, False), rax=0)
    with pytest.raises(VmStop) as stop:
        m.run()
    assert stop.value.kind == "debug-exit" and stop.value.status == 1


def test_inputs_not_valid_read_as_zero(m: Machine) -> None:
    """sev_es_sync_from_ghcb(): a register not marked valid is 0, whatever the page holds."""
    page = m.ghcb(g.SVM_VMGEXIT_NMI_COMPLETE)
    page.set(g.RBX, 0x1234, mark_valid=False)
    m.run()
    assert page.get(g.RBX) == 0


# --- hot path ------------------------------------------------------------------------------------------------------
def test_hot_path_cost(m: Machine) -> None:
    """CPUID and IOIO events cost a few µs of Python (budget ~2-3 µs; bound loose for slow CI).

    Each iteration refills the GHCB as a guest would; that refill is timed separately and subtracted.
    """
    q = m.page.q
    n = 3000

    def timed(exit_code: int, info1: int, rax: int, serve: bool) -> float:
        fields = [(g.SW_EXIT_CODE >> 3, exit_code), (g.SW_EXIT_INFO_1 >> 3, info1), (g.SW_EXIT_INFO_2 >> 3, 0),
                  (g.RAX >> 3, rax), (g.RCX >> 3, 0)]
        bitmap = g.valid_mask(g.SW_EXIT_CODE, g.SW_EXIT_INFO_1, g.SW_EXIT_INFO_2, g.RAX, g.RCX)
        lo, hi, bq = bitmap & 0xFFFF_FFFF_FFFF_FFFF, bitmap >> 64, g.VALID_BITMAP >> 3
        vmgexit = m.service.vmgexit if serve else (lambda i, v: None)
        start = time.perf_counter()
        for _ in range(n):
            for index, value in fields:
                q[index] = value
            q[bq] = lo
            q[bq + 1] = hi
            vmgexit(0, None)
        return (time.perf_counter() - start) / n * 1e6

    m.service.write_ghcb_msr(0, GHCB_GPA)
    refill = timed(g.SVM_EXIT_CPUID, 0, 1, False)
    cpuid_us = timed(g.SVM_EXIT_CPUID, 0, 1, True) - refill
    assert m.response() == (0, 0) and m.page.get(g.RBX) == CPUID_TABLE[(1, 0)][1]
    ioio_us = timed(g.SVM_EXIT_IOIO, g.encode_ioio(REG_PORT, 1, False), 0x41, True) - refill
    assert m.response() == (0, 0) and m.regs.regs[0] == 0x41
    print(f"CPUID {cpuid_us:.2f} µs, IOIO OUT {ioio_us:.2f} µs per VMGEXIT (guest-side refill {refill:.2f} µs)")
    assert cpuid_us < 20 and ioio_us < 20


def test_ghcb_cpuid_answers_with_each_vcpus_own_apic_id() -> None:
    """The GHCB CPUID and MSR-protocol CPUID answers are the ones KVM gives each vCPU from its own table
    (CpuidTable.for_vcpu): APIC ID in leaf 1 EBX[31:24] and the x2APIC ID in leaf 0xB EDX."""
    from vmmd.kvm import Kvm
    from vmmd.machine.cpuid import build_cpuid_table

    kvm = Kvm()
    table = build_cpuid_table(kvm.get_supported_cpuid(), 4, "sev-es-emu", 0xE80)
    kvm.close()
    m = Machine(vcpu_count=4)
    m.service = VmgexitService(m.memory, m.ports, m.mmio, table.lookup, c_bit=51, vcpu_count=4,
                               kvm_cpuid=table.kvm_cpuid)
    for vcpu in range(4):
        gpa = GHCB_GPA + 0x1000 * vcpu
        page = m.ghcb(g.SVM_EXIT_CPUID, vcpu=vcpu, gpa=gpa, rax=1, rcx=0)
        m.run(vcpu=vcpu)
        own_leaf_1 = next(e for e in table.for_vcpu(vcpu) if e.function == 1)
        assert page.get(g.RBX) >> 24 == vcpu == own_leaf_1.ebx >> 24
        m.service.write_ghcb_msr(vcpu, g.cpuid_request(1, 1))  # MSR protocol: leaf 1, EBX
        m.service.vmgexit(vcpu, None)
        assert (m.service.ghcb_msr[vcpu] >> 32) >> 24 == vcpu
