"""vmmd.sev.ghcb: layout proven against Linux's struct definitions and uapi header, codecs, page accessor."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmd.memory import GuestMemory
from vmmd.sev import ghcb as g

# struct ghcb_save_area exactly as arch/x86/include/asm/svm.h declares it: (name, size in bytes)
GHCB_SAVE_AREA_DECL = [
    ("reserved_0x0", 203), ("cpl", 1), ("reserved_0xcc", 116), ("xss", 8), ("reserved_0x148", 24), ("dr7", 8),
    ("reserved_0x168", 16), ("rip", 8), ("reserved_0x180", 88), ("rsp", 8), ("reserved_0x1e0", 24), ("rax", 8),
    ("reserved_0x200", 264), ("rcx", 8), ("rdx", 8), ("rbx", 8), ("reserved_0x320", 8), ("rbp", 8), ("rsi", 8),
    ("rdi", 8), ("r8", 8), ("r9", 8), ("r10", 8), ("r11", 8), ("r12", 8), ("r13", 8), ("r14", 8), ("r15", 8),
    ("reserved_0x380", 16), ("sw_exit_code", 8), ("sw_exit_info_1", 8), ("sw_exit_info_2", 8), ("sw_scratch", 8),
    ("reserved_0x3b0", 56), ("xcr0", 8), ("valid_bitmap", 16), ("x87_state_gpa", 8),
]
# struct ghcb: save area, padding to 2048, shared_buffer[2032], reserved_0xff0[10], u16 protocol_version, u32 usage
GHCB_TAIL_DECL = [("shared_buffer", 2032), ("reserved_0xff0", 10), ("protocol_version", 2), ("ghcb_usage", 4)]


def _offsets(decl: list[tuple[str, int]], start: int = 0) -> tuple[dict[str, int], int]:
    offsets, at = {}, start
    for name, size in decl:
        offsets[name] = at
        at += size
    return offsets, at


def test_save_area_offsets_match_struct_declaration() -> None:
    offsets, size = _offsets(GHCB_SAVE_AREA_DECL)
    assert size == g.GHCB_SAVE_AREA_SIZE == 1032  # EXPECTED_GHCB_SAVE_AREA_SIZE
    for name, offset in g.FIELDS.items():
        assert offsets[name] == offset, name
    assert offsets["valid_bitmap"] == g.VALID_BITMAP
    assert offsets["x87_state_gpa"] == g.X87_STATE_GPA
    # every field the bitmap tracks has a bit below 128
    assert all(g.valid_bit(offset) < 8 * g.VALID_BITMAP_SIZE for offset in g.FIELDS.values())


def test_ghcb_tail_offsets_match_struct_declaration() -> None:
    offsets, end = _offsets(GHCB_TAIL_DECL, 2048)
    assert end == g.GHCB_PAGE_SIZE  # EXPECTED_GHCB_SIZE == PAGE_SIZE
    assert offsets["shared_buffer"] == g.SHARED_BUFFER
    assert offsets["reserved_0xff0"] == g.SHARED_BUFFER_END
    assert offsets["protocol_version"] == g.PROTOCOL_VERSION
    assert offsets["ghcb_usage"] == g.GHCB_USAGE


HEADER = "/usr/include/x86_64-linux-gnu/asm/svm.h"
HEADER_NAMES = ["SVM_EXIT_READ_DR7", "SVM_EXIT_WRITE_DR7", "SVM_EXIT_RDTSC", "SVM_EXIT_RDPMC", "SVM_EXIT_CPUID",
                "SVM_EXIT_INVD", "SVM_EXIT_IOIO", "SVM_EXIT_MSR", "SVM_EXIT_VMMCALL", "SVM_EXIT_RDTSCP",
                "SVM_EXIT_WBINVD", "SVM_EXIT_MONITOR", "SVM_EXIT_MWAIT", "SVM_VMGEXIT_MMIO_READ",
                "SVM_VMGEXIT_MMIO_WRITE", "SVM_VMGEXIT_NMI_COMPLETE", "SVM_VMGEXIT_AP_HLT_LOOP",
                "SVM_VMGEXIT_AP_JUMP_TABLE", "SVM_VMGEXIT_SET_AP_JUMP_TABLE", "SVM_VMGEXIT_GET_AP_JUMP_TABLE",
                "SVM_VMGEXIT_PSC", "SVM_VMGEXIT_GUEST_REQUEST", "SVM_VMGEXIT_EXT_GUEST_REQUEST",
                "SVM_VMGEXIT_AP_CREATION", "SVM_VMGEXIT_HV_FEATURES", "SVM_VMGEXIT_TERM_REQUEST",
                "SVM_VMGEXIT_UNSUPPORTED_EVENT"]


@pytest.mark.skipif(not (os.path.exists(HEADER) and shutil.which("gcc")), reason="needs gcc and linux uapi asm/svm.h")
def test_exit_codes_match_installed_uapi_header() -> None:
    lines = [f'printf("{name} %llu\\n", (unsigned long long)({name}));' for name in HEADER_NAMES]
    lines.append('printf("TERM %llu\\n", (unsigned long long)SVM_VMGEXIT_TERM_REASON(0x5, 0xa7));')
    source = "#include <stdio.h>\n#include <linux/types.h>\ntypedef __u64 u64;\n#include <asm/svm.h>\n" \
             "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "t.c"), "w") as f:
            f.write(source)
        subprocess.run(["gcc", "-o", os.path.join(tmp, "t"), os.path.join(tmp, "t.c")], check=True)
        out = subprocess.run([os.path.join(tmp, "t")], check=True, capture_output=True, text=True).stdout
    values = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    for name in HEADER_NAMES:
        assert getattr(g, name) == values[name], name
    assert g.nae_termination_info(0x5, 0xA7) == values["TERM"]


def test_msr_protocol_literals_from_sev_common_h() -> None:
    # GHCB_MSR_SEV_INFO(max 2, min 1, C-bit 51): GHCBData[63:48]=2, [47:32]=1, [31:24]=51, [11:0]=0x001
    assert g.sev_info_response(2, 1, 51) == 0x0002_0001_3300_0001
    assert g.sev_info_decode(0x0002_0001_3300_0001) == (2, 1, 51)
    # GHCB_CPUID_REQ(0x8000001f, GHCB_CPUID_REQ_EBX)
    assert g.cpuid_request(0x8000001F, g.GHCB_CPUID_REQ_EBX) == 0x8000001F_4000_0004
    # GHCB_SEV_TERM_REASON(SEV_TERM_SET_LINUX, GHCB_TERM_PSC) | GHCB_MSR_TERM_REQ
    assert g.termination_request(1, 1) == 0x0001_1100
    assert g.register_gpa_request(0x12345) == 0x12345_012
    assert g.page_state_change_request(0x12345, 2) == (2 << 52) | (0x12345 << 12) | 0x014
    assert g.hv_features_response(3) == 0x3081
    assert g.ap_reset_hold_response(1) == 0x1007
    assert g.msr_info(0xABCD_E123) == 0x123


@given(st.integers(0, 0xFFFF_FFFF), st.integers(0, 3), st.integers(0, 0xFFFF_FFFF))
def test_cpuid_request_response_roundtrip(function: int, register: int, value: int) -> None:
    request = g.cpuid_request(function, register)
    assert g.msr_info(request) == g.GHCB_MSR_CPUID_REQ
    assert g.cpuid_request_decode(request) == (function, register)
    response = g.cpuid_response(request, value)
    assert g.msr_info(response) == g.GHCB_MSR_CPUID_RESP
    assert response >> 32 == value
    assert (response >> 30) & 3 == register  # KVM keeps GHCBData[31:12] of the request


@given(st.integers(0, 15), st.integers(0, 255))
def test_termination_roundtrips(reason_set: int, reason_code: int) -> None:
    assert g.termination_decode(g.termination_request(reason_set, reason_code)) == (reason_set, reason_code)
    assert g.nae_termination_decode(g.nae_termination_info(reason_set, reason_code)) == (reason_set, reason_code)


def test_describe_termination() -> None:
    assert "protocol range not supported" in g.describe_termination(0, 1)
    assert "PVALIDATE" in g.describe_termination(1, 2)
    assert "unknown reason" in g.describe_termination(7, 0x99)
    assert "code 0x99" in g.describe_termination(7, 0x99)


def test_decode_ioio_out_dx_al() -> None:
    # `out dx, al` with DX = 0x3F8 in 64-bit mode: port [31:16], A64 bit 9, SZ8 bit 4
    info = g.decode_ioio(0x03F8_0210)
    assert info == g.IoioInfo(port=0x3F8, size=1, is_in=False, string=False, rep=False, address_size=64)
    assert g.decode_ioio(0xFFFF_FFFF_0000_0000 | 0x03F8_0210) == info  # upper half ignored, as KVM's u32 io_info


@given(st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4]), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([16, 32, 64]))
def test_ioio_roundtrip(port: int, size: int, is_in: bool, string: bool, rep: bool, asize: int) -> None:
    info = g.encode_ioio(port, size, is_in, string, rep, asize)
    assert g.decode_ioio(info) == g.IoioInfo(port, size, is_in, string, rep, asize)


def test_exception_events() -> None:
    # X86_TRAP_GP | SVM_EVTINJ_TYPE_EXEPT | SVM_EVTINJ_VALID
    assert g.GP_EVENT == 13 | 3 << 8 | 1 << 31
    assert g.UD_EVENT == 6 | 3 << 8 | 1 << 31


@pytest.fixture
def page() -> g.GhcbPage:
    return g.GhcbPage(GuestMemory.with_ram(4 << 20).view(0x10000, 4096))


@pytest.mark.parametrize("name", sorted(g.FIELDS))
def test_set_marks_valid_bit_in_guest_bytes(page: g.GhcbPage, name: str) -> None:
    offset = g.FIELDS[name]
    page.set(offset, 0xA5)
    assert page.get(offset) == 0xA5
    bit = offset // 8
    raw = page.u8[g.VALID_BITMAP:g.VALID_BITMAP + 16]
    assert raw[bit // 8] == 1 << (bit % 8)  # Linux __set_bit() on the u8 array, little-endian
    assert int(np.count_nonzero(raw)) == 1
    assert page.is_valid(offset)
    page.clear_valid()
    assert not page.is_valid(offset) and page.valid_bitmap == 0


def test_set_without_marking_and_u64_width(page: g.GhcbPage) -> None:
    page.set(g.RAX, -1, mark_valid=False)
    assert page.get(g.RAX) == 0xFFFF_FFFF_FFFF_FFFF
    assert page.valid_bitmap == 0
    assert bytes(page.u8[g.RAX:g.RAX + 8]) == b"\xff" * 8
    assert page.u8[g.RAX - 1] == 0 and page.u8[g.RAX + 8] == 0


def test_usage_and_protocol_version_bytes(page: g.GhcbPage) -> None:
    page.usage = 0x11223344
    page.protocol_version = 0x0102
    assert bytes(page.u8[0xFFA:0x1000]) == bytes([0x02, 0x01, 0x44, 0x33, 0x22, 0x11])
    assert (page.usage, page.protocol_version) == (0x11223344, 0x0102)
    assert len(page.shared_buffer()) == 2032


def test_page_rejects_wrong_view() -> None:
    with pytest.raises(ValueError):
        g.GhcbPage(np.zeros(4095, np.uint8))
    for wrong in (np.zeros(512, np.uint64), np.zeros((2, 2048), np.uint8), np.zeros(8192, np.uint8)[::2],
                  memoryview(bytearray(4096)).cast("I"), b"x", 4096):
        with pytest.raises(ValueError):
            g.GhcbPage(wrong)


def test_page_over_a_guest_memory_buffer_is_the_same_page_as_over_a_numpy_view() -> None:
    memory = GuestMemory.with_ram(4 << 20)
    page, twin = g.GhcbPage(memory.buffer(0x10000, 4096)), g.GhcbPage(memory.view(0x10000, 4096))
    page.set(g.CPL, 3)
    page.set(g.RCX, 0x1122_3344_5566_7788)
    page.protocol_version = 2
    page.usage = 7
    assert (twin.get(g.CPL), twin.get(g.RCX), twin.protocol_version, twin.usage) == (3, 0x1122_3344_5566_7788, 2, 7)
    assert twin.valid_bitmap == page.valid_bitmap == g.valid_mask(g.CPL, g.RCX)
    assert memory.read(0x10000 + g.RCX, 8) == (0x1122_3344_5566_7788).to_bytes(8, "little")
    assert bytes(page.shared_buffer()) == bytes(twin.shared_buffer()) == bytes(g.GHCB_SHARED_BUF_SIZE)
