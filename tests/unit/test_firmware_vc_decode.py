"""The firmware #VC handler's instruction decoder (firmware/lib/vc_decode.c), compiled for the host and fed bytes.

The handler itself only runs on SEV-ES hardware; its decoding is a pure function, so it is checked here against
the Intel SDM encodings of IN / OUT / RDMSR / WRMSR / CPUID (operand size as Linux vc_ioio_exitinfo())."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "vc_decode.h"
int main(int argc, char **argv)
{
	for (int a = 1; a < argc; a += 2) {
		uint8_t ip[16] = {0};
		unsigned n = 0, byte;
		for (const char *p = argv[a]; n < sizeof(ip) && sscanf(p, "%2x", &byte) == 1; p += 2)
			ip[n++] = (uint8_t)byte;
		struct fw_vc_insn insn;
		int ok = fw_vc_decode(ip, strtoull(argv[a + 1], NULL, 0), &insn);
		printf("%d %d %u %u %u\n", ok, insn.kind, insn.port, insn.size, insn.length);
	}
	return 0;
}
"""
NONE, OUT, IN, RDMSR, WRMSR, CPUID = range(6)
RDX = 0x1_0000_03F8  # the DX forms use the low 16 bits
CASES = [
    ("e680", (1, OUT, 0x80, 1, 2)), ("ee", (1, OUT, 0x3F8, 1, 1)),
    ("e471", (1, IN, 0x71, 1, 2)), ("ec", (1, IN, 0x3F8, 1, 1)),
    ("e780", (1, OUT, 0x80, 4, 2)), ("66e780", (1, OUT, 0x80, 2, 3)),
    ("ef", (1, OUT, 0x3F8, 4, 1)), ("66ef", (1, OUT, 0x3F8, 2, 2)),
    ("e5f0", (1, IN, 0xF0, 4, 2)), ("66e5f0", (1, IN, 0xF0, 2, 3)),
    ("ed", (1, IN, 0x3F8, 4, 1)), ("66ed", (1, IN, 0x3F8, 2, 2)),
    ("66ee", (1, OUT, 0x3F8, 1, 2)),  # AL forms keep one byte under 0x66
    ("0f30", (1, WRMSR, 0, 0, 2)), ("0f32", (1, RDMSR, 0, 0, 2)), ("0fa2", (1, CPUID, 0, 0, 2)),
    ("6e", (0, NONE, 0, 0, 0)), ("f36e", (0, NONE, 0, 0, 0)), ("6c", (0, NONE, 0, 0, 0)),  # string I/O
    ("f3e680", (0, NONE, 0, 0, 0)), ("0f01d9", (0, NONE, 0, 0, 0)), ("90", (0, NONE, 0, 0, 0)),
]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("vc-decode")
    (work / "harness.c").write_text(HARNESS)
    exe = work / "decode"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-I", str(FIRMWARE / "include"), "-o", str(exe),
                    str(work / "harness.c"), str(FIRMWARE / "lib" / "vc_decode.c")], check=True)
    return exe


def test_decoder_matches_the_encodings(decoder: Path) -> None:
    args = [arg for hex_bytes, _ in CASES for arg in (hex_bytes, hex(RDX))]
    lines = subprocess.run([str(decoder), *args], capture_output=True, text=True, check=True).stdout.splitlines()
    got = {hex_bytes: tuple(int(x) for x in line.split()) for (hex_bytes, _), line in zip(CASES, lines, strict=True)}
    assert got == dict(CASES)
