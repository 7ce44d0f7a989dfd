"""Reset-vector firmware (OVMF) for SEV-ES: the footer GUID table, the AP reset block, vCPU start states.

Mirrors QEMU hw/i386/pc_sysfw_ovmf.c (pc_system_parse_ovmf_flash(),
pc_system_ovmf_table_find()) and target/i386/sev.c (sev_es_find_reset_vector(),
sev_es_set_reset_vector()), and virtee/sev-snp-measure ovmf.py:

- the image is mapped so that it ends at 4 GiB (GPA = 4 GiB - size);
- 48 bytes before the end sits the table footer GUID, preceded by a u16 holding the
  table's total length (GUID and u16 included); entries run backwards from there,
  each being `data ‖ u16 length ‖ GUID` with the length covering all three;
- the SEV-ES reset block entry holds the u32 EIP at which APs start.

The BSP starts in the x86 reset state (CS 0xf000 base 0xffff0000, RIP 0xfff0); APs
start with CS base = EIP & 0xffff0000 and RIP = EIP & 0xffff.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import uuid
from typing import TYPE_CHECKING

from vmmd.errors import VmmdError
from vmmd.machine.layout import RESET_VECTOR_MAX_BYTES

if TYPE_CHECKING:
    from vmmd.sev.vmsa import VcpuState

# Light to import (the VMSA model is imported by the two reset-state functions only): the loader asks
# is_ovmf_image() about every firmware image `vmctl run` starts, plain or not.

FOUR_GIB = 1 << 32
OVMF_TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_RV_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
OVMF_SEV_META_DATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")

BSP_RESET_EIP = 0xFFFFFFF0
_ENTRY_HEADER = 2 + 16  # u16 length + GUID, as QEMU's min_len
_FOOTER_FROM_END = 32 + 16  # "guid 48 bytes before the end of the flash file"
_PAGE = 4096


def is_ovmf_image(image: bytes | memoryview) -> bool:
    """Whether the image ends with the OVMF footer-table GUID (else it is not a reset-vector firmware vmmd knows)."""
    data = memoryview(image)
    if len(data) < _FOOTER_FROM_END + 2:
        return False
    footer_at = len(data) - _FOOTER_FROM_END
    return uuid.UUID(bytes_le=bytes(data[footer_at:footer_at + 16])) == OVMF_TABLE_FOOTER_GUID


def parse_footer_table(image: bytes | memoryview) -> dict[uuid.UUID, bytes]:
    """GUID -> entry data of the OVMF footer table; empty when the image has no table.

    Raises VmmdError for a table whose lengths point outside the image or overlap.
    """
    data = memoryview(image)
    size = len(data)
    if size < _FOOTER_FROM_END + 2:
        return {}
    footer_at = size - _FOOTER_FROM_END
    if uuid.UUID(bytes_le=bytes(data[footer_at:footer_at + 16])) != OVMF_TABLE_FOOTER_GUID:
        return {}
    (total_len,) = struct.unpack_from("<H", data, footer_at - 2)
    table_len = total_len - _ENTRY_HEADER
    table_start = footer_at - 2 - table_len
    if table_len < 0 or table_start < 0:
        raise VmmdError(f"OVMF footer table has invalid size {total_len} (image is {size} bytes)")
    table: dict[uuid.UUID, bytes] = {}
    end = footer_at - 2  # entries end here and run backwards
    while end - table_start >= _ENTRY_HEADER:
        guid = uuid.UUID(bytes_le=bytes(data[end - 16:end]))
        (entry_len,) = struct.unpack_from("<H", data, end - 18)
        if entry_len < _ENTRY_HEADER or end - entry_len < table_start:
            raise VmmdError(f"OVMF footer table entry {guid} has invalid length {entry_len}")
        table.setdefault(guid, bytes(data[end - entry_len:end - _ENTRY_HEADER]))
        end -= entry_len
    return table


@dataclasses.dataclass(frozen=True)
class OvmfImage:
    """A reset-vector firmware image placed to end at `end_gpa` (4 GiB), with its parsed footer table."""

    data: bytes
    gpa: int
    table: dict[uuid.UUID, bytes]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, end_gpa: int = FOUR_GIB) -> OvmfImage:
        size = len(data)
        if size == 0 or size % _PAGE:
            raise VmmdError(f"firmware image size {size} is not a non-zero multiple of 4 KiB")
        if size > end_gpa or size > RESET_VECTOR_MAX_BYTES:
            raise VmmdError(f"firmware image of {size} bytes is too large to map below {end_gpa:#x}")
        raw = bytes(data)
        return cls(data=raw, gpa=end_gpa - size, table=parse_footer_table(raw))

    @classmethod
    def load(cls, path: str | os.PathLike, end_gpa: int = FOUR_GIB) -> OvmfImage:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise VmmdError(f"cannot read firmware image {path}: {err.strerror}") from None
        return cls.from_bytes(raw, end_gpa)

    @property
    def size(self) -> int:
        return len(self.data)

    def sev_es_reset_eip(self) -> int:
        """The AP reset EIP from the SEV-ES reset block (target/i386/sev.c sev_es_find_reset_vector())."""
        entry = self.table.get(SEV_ES_RESET_BLOCK_GUID)
        if entry is None:
            raise VmmdError("firmware has no SEV-ES reset block (GUID 00f771de-...): "
                            "it cannot start APs under SEV-ES; use an OVMF built with SEV support")
        if len(entry) < 4:
            raise VmmdError("SEV-ES reset block entry is shorter than 4 bytes")
        (eip,) = struct.unpack_from("<I", entry)
        if eip == 0:
            raise VmmdError("SEV-ES reset address is zero")
        return eip

    def sev_hash_table_gpa(self) -> int | None:
        """GPA of the kernel-hashes table (SEV_HASH_TABLE_RV_GUID), None when absent or zero."""
        entry = self.table.get(SEV_HASH_TABLE_RV_GUID)
        if entry is None or len(entry) < 4:
            return None
        (gpa,) = struct.unpack_from("<I", entry)
        return gpa or None


def bsp_reset_state(cpu_sig: int) -> VcpuState:
    """The BSP's start state: the plain x86 reset state (QEMU leaves the BSP alone for SEV-ES)."""
    from vmmd.sev.vmsa import x86_reset_state

    return x86_reset_state(cpu_sig, cs_base=BSP_RESET_EIP & 0xFFFF0000, rip=BSP_RESET_EIP & 0xFFFF)


def ap_reset_state(reset_eip: int, cpu_sig: int) -> VcpuState:
    """An AP's start state: target/i386/sev.c sev_es_set_reset_vector() (selector stays 0xf000)."""
    if not 0 < reset_eip <= 0xFFFF_FFFF:
        raise VmmdError(f"SEV-ES AP reset EIP {reset_eip:#x} is not a 32-bit address")
    from vmmd.sev.vmsa import x86_reset_state

    return x86_reset_state(cpu_sig, cs_base=reset_eip & 0xFFFF0000, rip=reset_eip & 0xFFFF)
