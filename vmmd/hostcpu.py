"""CPUID of the host CPU itself (not of a guest): for the host report and for CPUID leaves KVM leaves empty."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

# x86-64 SysV: void cpuid(u32 leaf /*edi*/, u32 subleaf /*esi*/, u32 out[4] /*rdx*/)
_CPUID_CODE = bytes([
    0x53,                    # push rbx            (callee-saved, cpuid clobbers it)
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])
_cpuid_func = None
_cpuid_map = None


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of the CPUID instruction on this host (x86-64 only).

    Runs a 27-byte stub from an executable anonymous mapping; falls back to the cpuid
    driver's /dev/cpu/0/cpuid (pread at offset leaf | subleaf << 32) where W^X forbids that.
    """
    global _cpuid_func, _cpuid_map
    if os.uname().machine not in ("x86_64", "AMD64"):
        raise OSError(f"CPUID needs an x86-64 host, this is {os.uname().machine}")
    if _cpuid_func is None:
        try:
            _cpuid_map = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            _cpuid_map.write(_CPUID_CODE)
            address = ctypes.addressof(ctypes.c_char.from_buffer(_cpuid_map))
            prototype = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))
            _cpuid_func = prototype(address)
        except (OSError, ValueError, PermissionError):
            _cpuid_func = False
    if _cpuid_func:
        out = (ctypes.c_uint32 * 4)()
        _cpuid_func(leaf, subleaf, out)
        return out[0], out[1], out[2], out[3]
    with open("/dev/cpu/0/cpuid", "rb") as f:
        data = os.pread(f.fileno(), 16, leaf | (subleaf << 32))
    return struct.unpack("<4I", data)
