"""Direct Linux boot: a bzImage (or an uncompressed ELF vmlinux), an initrd and a command line, entered through the
x86 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").

What a loader must do, and what this one does (QEMU hw/i386/x86.c x86_load_linux() and Firecracker
src/vmm/src/arch/x86_64 load the same way):
- Check the setup header (boot.rst "The real-mode kernel header"): boot_flag 0xAA55, "HdrS", protocol
  version >= 2.12 (xloadflags), XLF_KERNEL_64 (a 64-bit entry point), kernel_alignment a power of two,
  init_size fitting guest RAM from the load address. The protected-mode kernel starts after
  (setup_sects or 4) + 1 sectors of the file.
- Load it at pref_address when that fits, else (relocatable kernels) at the lowest kernel_alignment-aligned
  address from 1 MiB where init_size fits; the 64-bit entry point is the load address + 0x200.
- Build the zero page: a zeroed struct boot_params with the image's setup header copied in (0x1F1 up to
  0x202 + the byte at 0x201), type_of_loader 0xFF, LOADED_HIGH, cmd_line_ptr, ramdisk_image/size, and an
  e820 table of guest RAM with the MP table's pages reserved.
- Put the initrd as high as initrd_addr_max and RAM below the 32-bit PCI hole allow, page aligned, above the
  kernel's init_size (QEMU's rule, without its ACPI tables).
- Enter in 64-bit mode: paging on with an identity map of 0..4 GiB (and RAM above), a GDT with __BOOT_CS
  (0x10) and __BOOT_DS (0x18) flat descriptors, CS = 0x10, DS/ES/SS = 0x18, interrupts off, RSI = the zero
  page. Other vCPUs stay in KVM's INIT-wait state until the kernel starts them with INIT/SIPI; the ACPI MADT
  (vmmd/machine/acpi.py) and the MP table (vmmd/machine/mptable.py, for kernels without ACPI) tell it they
  exist, and the ACPI DSDT where the virtio-mmio devices are.

For ELF (vmlinux), the PT_LOAD segments are loaded at their physical addresses, the entry point is e_entry
(vmlinux.lds.S: ENTRY(phys_startup_64)), and the zero page's setup header is made up as Firecracker's
load_kernel() does (boot_flag, "HdrS", type_of_loader, kernel_alignment).

The guest-physical layout is the direct-boot contract of docs/linux-boot.md (version LINUX_LAYOUT_VERSION): an
SEV-ES launch measures exactly `LinuxImage.measured_regions()`. Everything read from the files is untrusted:
a malformed or truncated image is a VmmdError (exit 3) naming the field, never an exception from deep inside.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field

from vmmd.errors import VmmdError
from vmmd.kvm import uapi
from vmmd.machine import acpi, mptable
from vmmd.machine import bootparam as bp
from vmmd.machine import layout as L
from vmmd.machine.loader import LINUX, build_page_tables, long_mode_sregs, mapped_gib, read_image_file
from vmmd.memory import PAGE_SIZE, PCI_HOLE_START_GPA, GuestMemory

LINUX_LAYOUT_VERSION = 1  # bump when anything below or in measured_regions() changes (docs/linux-boot.md)

ZERO_PAGE_GPA = 0x1000  # struct boot_params
GDT_GPA = 0x2000  # null, null, __BOOT_CS, __BOOT_DS
# page tables from 0x3000 (vmmd.machine.loader.build_page_tables, the same identity map flat images get)
BOOT_STACK_TOP = 0x20000  # RSP at entry: the boot protocol asks for none, the kernel sets its own at once
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 0x10000 - 1  # the command-line area is 64 KiB, NUL included
KERNEL_MIN_GPA = 0x100000  # nothing of the kernel below 1 MiB
ENTRY_64_OFFSET = 0x200  # boot.rst: the 64-bit entry point is the start of the loaded kernel + 0x200
BOOT_CS, BOOT_DS = 0x10, 0x18  # boot.rst: __BOOT_CS and __BOOT_DS
LINUX_GDT = [0, 0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF]  # 64-bit code; 4 GiB flat data
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags and XLF_KERNEL_64
DEFAULT_INITRD_ADDR_MAX = 0x37FF_FFFF  # boot.rst: for protocols before 2.03
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # arch/x86/include/asm/page_64_types.h __START_KERNEL_map
ELF_KERNEL_ALIGNMENT = 0x100_0000  # what Firecracker puts in a made-up header for an ELF kernel
DEFAULT_APPEND = "console=ttyS0"


@dataclass
class LinuxImage:
    """A loaded kernel: where everything went, what the boot vCPU starts with, and what an SEV-ES launch
    measures."""

    path: str
    entry_gpa: int
    kernel_gpa: int
    kernel_size: int
    init_size: int
    cmdline: bytes
    initrd_gpa: int = 0
    initrd_size: int = 0
    initrd_path: str | None = None
    page_tables_end: int = 0
    cpus: int = 1
    e820: list[tuple[int, int, int]] = field(default_factory=list)
    format: str = "bzImage"
    protocol: int = 0
    acpi_size: int = 0
    kind: str = LINUX

    def measured_regions(self) -> list[tuple[int, int, str]]:
        """(gpa, length, name) of everything the VMM wrote, in ascending GPA order: the order an SEV-ES direct
        boot encrypts and measures them (docs/linux-boot.md)."""
        regions = [(ZERO_PAGE_GPA, PAGE_SIZE, "zero page (boot_params)"),
                   (GDT_GPA, PAGE_SIZE, "GDT"),
                   (L.PML4_GPA, self.page_tables_end - L.PML4_GPA, "page tables"),
                   (CMDLINE_GPA, _align16(len(self.cmdline) + 1), "command line"),
                   (mptable.MPTABLE_GPA, mptable.MPTABLE_END - mptable.MPTABLE_GPA, "MP table"),
                   (acpi.ACPI_GPA, self.acpi_size, "ACPI tables"),
                   (self.kernel_gpa, _align16(self.kernel_size), f"kernel {os.path.basename(self.path)}")]
        if self.initrd_size:
            regions.append((self.initrd_gpa, _align16(self.initrd_size),
                            f"initrd {os.path.basename(self.initrd_path or '')}"))
        return regions


def _align16(n: int) -> int:
    return (n + 15) & ~15


def _bad(path: str, field_name: str, why: str) -> VmmdError:
    return VmmdError(f"kernel {path}: {field_name}: {why}")


@dataclass
class _Kernel:
    """What the file says, before anything is placed."""

    format: str
    header: bp.setup_header  # from the image (bzImage) or made up (ELF)
    header_bytes: bytes  # the bytes to copy into the zero page (bzImage)
    payload: bytes = b""  # bzImage: the protected-mode kernel
    segments: list[tuple[int, bytes, int]] = field(default_factory=list)  # ELF: (paddr, data, memsz)
    elf_entry: int = 0


def parse_kernel(data: bytes, path: str) -> _Kernel:
    """A bzImage or an ELF vmlinux, checked field by field (VmmdError naming the field otherwise)."""
    if data[:4] == b"\x7fELF":
        return _parse_elf(data, path)
    if len(data) < 0x202 + 4 or data[0x202:0x206] != b"HdrS":
        raise _bad(path, "header", "no \"HdrS\" at 0x202: not a Linux bzImage (or ELF vmlinux)")
    header_end = min(0x202 + data[0x201], bp.SETUP_HEADER_OFFSET + ctypes.sizeof(bp.setup_header))
    raw = data[bp.SETUP_HEADER_OFFSET:header_end]
    hdr = bp.setup_header.from_buffer_copy(raw.ljust(ctypes.sizeof(bp.setup_header), b"\0"))
    if hdr.boot_flag != bp.BOOT_FLAG_MAGIC:
        raise _bad(path, "boot_flag", f"{hdr.boot_flag:#06x}, not 0xaa55")
    if hdr.version < MIN_PROTOCOL:
        raise _bad(path, "version", f"boot protocol {hdr.version >> 8}.{hdr.version & 0xFF}; the 64-bit entry "
                   f"needs 2.12 or later (Linux 3.8+)")
    if header_end < bp.SETUP_HEADER_OFFSET + bp.setup_header.init_size.offset + 4:
        raise _bad(path, "jump", f"the setup header ends at {header_end:#x}, before init_size")
    if not hdr.xloadflags & bp.XLF_KERNEL_64:
        raise _bad(path, "xloadflags", "XLF_KERNEL_64 is clear: the kernel has no 64-bit entry point")
    if not hdr.loadflags & bp.LOADED_HIGH:
        raise _bad(path, "loadflags", "LOADED_HIGH is clear: a zImage, which loads below 1 MiB")
    align = hdr.kernel_alignment
    if align == 0 or align & (align - 1) or align < PAGE_SIZE:
        raise _bad(path, "kernel_alignment", f"{align:#x} is not a power of two of at least 4 KiB")
    setup_sects = hdr.setup_sects or 4
    start = (setup_sects + 1) * 512
    if start >= len(data):
        raise _bad(path, "setup_sects", f"{setup_sects} sectors of setup reach past the end of the file "
                   f"({len(data)} bytes): truncated")
    payload = data[start:]
    if hdr.syssize and hdr.syssize * 16 > len(payload) + 15:  # syssize counts 16-byte paragraphs, rounded up
        raise _bad(path, "syssize", f"the kernel is {hdr.syssize * 16} bytes but the file holds {len(payload)} "
                   "after the setup sectors: truncated")
    if hdr.init_size < len(payload):
        raise _bad(path, "init_size", f"{hdr.init_size:#x} is smaller than the kernel itself ({len(payload)} bytes)")
    return _Kernel("bzImage", hdr, raw, payload=payload)


def _parse_elf(data: bytes, path: str) -> _Kernel:
    if len(data) < 64:
        raise _bad(path, "ELF header", "truncated")
    if data[4] != 2 or data[5] != 1:
        raise _bad(path, "ELF header", "not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_machine != 62:  # EM_X86_64
        raise _bad(path, "e_machine", f"{e_machine}, not x86-64 (62)")
    if e_type != 2:  # ET_EXEC
        raise _bad(path, "e_type", f"{e_type}, not an executable (2): a vmlinux is ET_EXEC")
    if e_phentsize != 56 or not 0 < e_phnum <= 64 or e_phoff + 56 * e_phnum > len(data):
        raise _bad(path, "program headers", f"{e_phnum} entries of {e_phentsize} bytes at {e_phoff:#x} do not fit "
                   "the file")
    segments = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", data,
                                                                                          e_phoff + 56 * i)
        if p_type != 1:  # PT_LOAD
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise _bad(path, f"program header {i}", f"{p_filesz} bytes at file offset {p_offset:#x} (of "
                       f"{len(data)}), memory size {p_memsz}: truncated or malformed")
        if p_paddr < KERNEL_MIN_GPA or p_paddr + p_memsz > PCI_HOLE_START_GPA:
            raise _bad(path, f"program header {i}", f"physical address {p_paddr:#x}+{p_memsz:#x} is outside "
                       f"{KERNEL_MIN_GPA:#x}..{PCI_HOLE_START_GPA:#x}")
        segments.append((p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
    if not segments:
        raise _bad(path, "program headers", "no PT_LOAD segment")
    entry = e_entry - START_KERNEL_MAP if e_entry >= START_KERNEL_MAP else e_entry
    if not any(paddr <= entry < paddr + memsz for paddr, _d, memsz in segments):
        raise _bad(path, "e_entry", f"{e_entry:#x} is in no loaded segment")
    hdr = bp.setup_header(boot_flag=bp.BOOT_FLAG_MAGIC, header=bp.HDRS_MAGIC, kernel_alignment=ELF_KERNEL_ALIGNMENT,
                          initrd_addr_max=PCI_HOLE_START_GPA - 1, cmdline_size=CMDLINE_MAX,
                          xloadflags=bp.XLF_KERNEL_64)
    return _Kernel("ELF", hdr, b"", segments=segments, elf_entry=entry)


def _place_kernel(kernel: _Kernel, ram_top: int, path: str) -> tuple[int, int]:
    """(load GPA, init_size) of a bzImage: pref_address when it fits, else the lowest aligned address."""
    hdr = kernel.header
    need = hdr.init_size
    align = hdr.kernel_alignment
    candidates = []
    if hdr.pref_address and hdr.pref_address % align == 0 and hdr.pref_address >= KERNEL_MIN_GPA:
        candidates.append(hdr.pref_address)
    if hdr.relocatable_kernel:
        candidates.append((KERNEL_MIN_GPA + align - 1) & ~(align - 1))
    elif not candidates:
        raise _bad(path, "relocatable_kernel", "0, and pref_address gives no usable load address")
    for gpa in candidates:
        if gpa + need <= ram_top:
            return gpa, need
    raise VmmdError(f"kernel {path} needs {need >> 20} MiB of RAM from {candidates[0]:#x} (init_size), beyond "
                    f"the guest's {ram_top >> 20} MiB below 3 GiB: give the guest more memory (--memory)")


def build_e820(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) of guest RAM as the kernel must see it: base memory up to the MP table (reserved),
    nothing in 640 KiB..1 MiB (the legacy VGA/BIOS hole), the rest of each RAM slot."""
    table = []
    for gpa, size in memory.ranges():
        if gpa == 0:
            table.append((0, mptable.MPTABLE_GPA, bp.E820_TYPE_RAM))
            table.append((mptable.MPTABLE_GPA, mptable.MPTABLE_END - mptable.MPTABLE_GPA, bp.E820_TYPE_RESERVED))
            if size > KERNEL_MIN_GPA:
                table.append((KERNEL_MIN_GPA, size - KERNEL_MIN_GPA, bp.E820_TYPE_RAM))
        else:
            table.append((gpa, size, bp.E820_TYPE_RAM))
    return table


def command_line(append: str | None, extra: list[str]) -> bytes:
    """The command line the kernel gets: the user's (DEFAULT_APPEND when none is given), then what vmmd adds
    (virtio-mmio device locations); VmmdError for a NUL inside it."""
    text = DEFAULT_APPEND if append is None else append
    if "\0" in text:
        raise VmmdError("--append: the kernel command line cannot contain a NUL byte")
    return " ".join(part for part in [text.strip(), *extra] if part).encode()


def load_linux(memory: GuestMemory, kernel_path: str | os.PathLike, initrd_path: str | os.PathLike | None,
               append: str | None, cpus: int, c_bit: int = 0, extra_args: list[str] = (),
               devices: list[acpi.MmioDevice] = ()) -> tuple[LinuxImage, int]:
    """Load kernel, initrd, command line, zero page, GDT, page tables, MP table and ACPI tables (which describe
    `devices`); returns (image, cr3)."""
    path = os.fspath(kernel_path)
    ram_top = min(memory.ram_bytes, PCI_HOLE_START_GPA)  # the low RAM slot ends here
    data = read_image_file(path, ram_top, what="kernel", too_large="more than the guest's RAM below 3 GiB: give "
                           "the guest more memory (--memory)")
    if not data:
        raise VmmdError(f"kernel {path} is empty")
    kernel = parse_kernel(data, path)
    hdr = kernel.header
    if kernel.format == "bzImage":
        kernel_gpa, init_size = _place_kernel(kernel, ram_top, path)
        memory.write(kernel_gpa, kernel.payload)
        kernel_size, entry = len(kernel.payload), kernel_gpa + ENTRY_64_OFFSET
    else:
        kernel_gpa = min(paddr for paddr, _d, _m in kernel.segments)
        end = max(paddr + memsz for paddr, _d, memsz in kernel.segments)
        if end > ram_top:
            raise VmmdError(f"kernel {path} loads up to {end:#x}, beyond the guest's {ram_top >> 20} MiB below "
                            "3 GiB: give the guest more memory (--memory)")
        for paddr, seg, memsz in kernel.segments:
            memory.write(paddr, seg)
            if memsz > len(seg):
                memory.write(paddr + len(seg), bytes(memsz - len(seg)))
        kernel_size = init_size = end - kernel_gpa
        entry = kernel.elf_entry

    cmdline = command_line(append, list(extra_args))
    limit = min(hdr.cmdline_size if hdr.version >= 0x0206 or kernel.format == "ELF" else 255, CMDLINE_MAX)
    if len(cmdline) > limit:
        raise VmmdError(f"the kernel command line is {len(cmdline)} bytes; this kernel takes at most {limit} "
                        "(cmdline_size)")
    memory.write(CMDLINE_GPA, cmdline + b"\0")

    initrd_gpa = initrd_size = 0
    if initrd_path is not None:
        initrd_addr_max = hdr.initrd_addr_max if hdr.version >= 0x0203 else DEFAULT_INITRD_ADDR_MAX
        top = min(initrd_addr_max + 1, ram_top)
        floor = kernel_gpa + init_size
        initrd = read_image_file(initrd_path, max(top - floor, 0), what="initrd",
                                 too_large=f"it does not fit between the kernel (up to {floor:#x}) and "
                                           f"{top:#x} (initrd_addr_max, RAM below 3 GiB): give the guest more "
                                           "memory (--memory)")
        if not initrd:
            raise VmmdError(f"initrd {os.fspath(initrd_path)} is empty")
        initrd_size = len(initrd)
        initrd_gpa = (top - initrd_size) & ~(PAGE_SIZE - 1)
        memory.write(initrd_gpa, initrd)

    e820 = build_e820(memory)
    params = bp.boot_params()
    ctypes.memmove(ctypes.addressof(params) + bp.SETUP_HEADER_OFFSET, kernel.header_bytes, len(kernel.header_bytes))
    if kernel.format == "ELF":
        params.hdr = hdr
    params.hdr.type_of_loader = bp.TYPE_OF_LOADER_UNDEFINED
    params.hdr.loadflags = (params.hdr.loadflags | bp.LOADED_HIGH) & ~(bp.QUIET_FLAG | bp.KEEP_SEGMENTS)
    params.hdr.cmd_line_ptr = CMDLINE_GPA
    params.hdr.ramdisk_image, params.hdr.ramdisk_size = initrd_gpa, initrd_size
    params.hdr.setup_data = 0
    tables = acpi.build_acpi_tables(cpus, list(devices))
    memory.write(acpi.ACPI_GPA, tables)
    params.acpi_rsdp_addr = acpi.ACPI_GPA  # boot.rst: read by the kernel since protocol 2.14 (it also scans)
    for i, (addr, size, kind) in enumerate(e820):
        params.e820_table[i] = bp.boot_e820_entry(addr=addr, size=size, type=kind)
    params.e820_entries = len(e820)
    memory.write(ZERO_PAGE_GPA, bytes(params))
    for i, desc in enumerate(LINUX_GDT):
        memory.write_u64(GDT_GPA + 8 * i, desc)
    table, pointer = mptable.build_mptable(cpus)
    memory.write(mptable.MPTABLE_GPA, bytes(mptable.MPTABLE_END - mptable.MPTABLE_GPA))
    memory.write(mptable.MPTABLE_GPA, table)
    memory.write(mptable.MP_FLOATING_POINTER_GPA, pointer)
    cr3 = build_page_tables(memory, c_bit)
    image = LinuxImage(path, entry, kernel_gpa, kernel_size, init_size, cmdline, initrd_gpa, initrd_size,
                       os.fspath(initrd_path) if initrd_path is not None else None,
                       L.PD_BASE_GPA + mapped_gib(memory) * PAGE_SIZE, cpus, e820, kernel.format, hdr.version,
                       len(tables))
    return image, cr3


def linux_entry_regs(image: LinuxImage) -> uapi.kvm_regs:
    """The boot vCPU's registers at the 64-bit entry point: RSI = the zero page, interrupts off."""
    return uapi.kvm_regs(rip=image.entry_gpa, rsi=ZERO_PAGE_GPA, rsp=BOOT_STACK_TOP, rflags=0x2)


def linux_entry_sregs(sregs: uapi.kvm_sregs, cr3: int, xsave: bool) -> uapi.kvm_sregs:
    """64-bit mode, paging on, CS = __BOOT_CS, DS/ES/SS = __BOOT_DS from vmmd's Linux GDT."""
    return long_mode_sregs(sregs, cr3, xsave, gdt_gpa=GDT_GPA, gdt_entries=len(LINUX_GDT), code_selector=BOOT_CS,
                           data_selector=BOOT_DS)
