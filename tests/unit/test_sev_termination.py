"""Decoding KVM_SYSTEM_EVENT_SEV_TERM data[0]: MSR-protocol value or GHCB GPA (hand-built GHCB pages)."""

from __future__ import annotations

import pytest

from vmmd.memory import GuestMemory
from vmmd.sev import ghcb
from vmmd.sev.termination import GHCB_NAE, MSR_PROTOCOL, UNDECODABLE, decode_sev_termination

GHCB_GPA = 0x10000


@pytest.fixture
def memory():
    mem = GuestMemory.with_ram(2 << 20)
    yield mem
    mem.close()


@pytest.mark.parametrize("reason_set, code, text", [
    (0, 0, "general termination request"),
    (0, 1, "SEV-ES / GHCB protocol range not supported"),
    (0, 2, "SEV-SNP features not supported"),
    (1, 4, "CPUID validation failure"),
    (7, 0x99, "unknown code"),
])
def test_msr_protocol_termination(reason_set: int, code: int, text: str) -> None:
    value = (code << 16) | (reason_set << 12) | 0x100  # GHCB_SEV_TERM_REASON(set, code) | GHCB_MSR_TERM_REQ
    term = decode_sev_termination(value, None)
    assert term.form == MSR_PROTOCOL and (term.reason_set, term.reason_code) == (reason_set, code)
    assert text in str(term) and f"GHCB MSR {value:#x}" in str(term)


def test_nae_termination_reads_the_shared_ghcb(memory: GuestMemory) -> None:
    memory.write_u64(GHCB_GPA + 0x390, 0x8000_FFFE)  # sw_exit_code = SVM_VMGEXIT_TERM_REQUEST
    memory.write_u64(GHCB_GPA + 0x398, (0x01 << 4) | 0x0)  # sw_exit_info_1: set [3:0] = 0, code [11:4] = 1
    term = decode_sev_termination(GHCB_GPA, memory)
    assert term.form == GHCB_NAE and (term.reason_set, term.reason_code) == (0, 1)
    assert "protocol range not supported" in str(term) and f"GPA {GHCB_GPA:#x}" in str(term)


def test_nae_with_the_info_kvm_zeroed_is_unknown_not_reason_zero(memory: GuestMemory) -> None:
    memory.write_u64(GHCB_GPA + 0x390, 0x8000_FFFE)
    memory.write_u64(GHCB_GPA + 0x398, 0)  # what sev_handle_vmgexit() leaves in the GHCB
    term = decode_sev_termination(GHCB_GPA, memory)
    assert term.form == GHCB_NAE and term.reason_set is None and "reason unknown" in str(term)
    assert "dmesg" in term.detail


def test_nae_with_another_exit_code_is_reported_not_guessed(memory: GuestMemory) -> None:
    memory.write_u64(GHCB_GPA + 0x390, 0x7B)  # IOIO, not a termination request
    term = decode_sev_termination(GHCB_GPA, memory)
    assert term.reason_set is None and "0x7b" in term.detail and "reason unknown" in str(term)


@pytest.mark.parametrize("data0", [0x7FFF_F000, 0xFFFF_FFFF_FFFF_F000, 2 << 20])
def test_ghcb_gpa_outside_ram_never_raises(memory: GuestMemory, data0: int) -> None:
    term = decode_sev_termination(data0, memory)
    assert term.form == GHCB_NAE and term.reason_set is None and "not inside guest RAM" in term.detail


def test_other_msr_request_codes_are_undecodable() -> None:
    term = decode_sev_termination(0x004, None)  # a CPUID request, not a termination
    assert term.form == UNDECODABLE and "0x4" in term.detail


def test_codec_agrees_with_the_ghcb_helpers(memory: GuestMemory) -> None:
    for reason_set in range(16):
        for code in (0, 1, 0x7F, 0xFF):
            msr = decode_sev_termination(ghcb.termination_request(reason_set, code), None)
            assert (msr.reason_set, msr.reason_code) == (reason_set, code)
            memory.write_u64(GHCB_GPA + ghcb.SW_EXIT_CODE, ghcb.SVM_VMGEXIT_TERM_REQUEST)
            memory.write_u64(GHCB_GPA + ghcb.SW_EXIT_INFO_1, ghcb.nae_termination_info(reason_set, code))
            nae = decode_sev_termination(GHCB_GPA, memory)
            if reason_set or code:
                assert (nae.reason_set, nae.reason_code) == (reason_set, code)
            else:  # indistinguishable from what KVM leaves after clearing the field
                assert nae.reason_set is None
