"""The direct Linux boot loader (vmmd/machine/linux.py) against Documentation/arch/x86/boot.rst: every setup-header
check, the placement rules, the zero page the kernel reads, and every malformed image refused with a sentence
naming the field (exit code 3). The images are built here field by field; one test loads Debian's real kernel."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest

from vmmd.errors import ExitCode, VmmdError
from vmmd.machine import acpi, mptable
from vmmd.machine import bootparam as bp
from vmmd.machine import layout as L
from vmmd.machine import linux as lx
from vmmd.machine.loader import PTE_P, PTE_PS
from vmmd.memory import PAGE_SIZE, GuestMemory

MIB = 1 << 20
LINUX_GUEST = Path(__file__).resolve().parents[2] / ".cache" / "linux"  # make linux-guest


def bzimage(payload: bytes = b"\x90" * 8192, setup_sects: int = 4, **fields) -> bytes:
    """A bzImage: `setup_sects` + 1 sectors of real-mode setup holding the setup header, then the payload."""
    values = dict(setup_sects=setup_sects, boot_flag=bp.BOOT_FLAG_MAGIC, header=bp.HDRS_MAGIC, version=0x020F,
                  loadflags=bp.LOADED_HIGH, kernel_alignment=2 * MIB, relocatable_kernel=1,
                  xloadflags=bp.XLF_KERNEL_64, cmdline_size=2047, initrd_addr_max=0x7FFF_FFFF,
                  pref_address=16 * MIB, init_size=4 * MIB, syssize=(len(payload) + 15) // 16,
                  jump=0x6AEB)  # jmp +0x6A: the header runs to 0x26C, the 2.15 header's end
    values.update(fields)
    header = bp.setup_header(**values)
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[bp.SETUP_HEADER_OFFSET:bp.SETUP_HEADER_OFFSET + ctypes.sizeof(header)] = bytes(header)
    return bytes(setup) + payload


def elf_vmlinux(paddr: int = 16 * MIB, entry: int = lx.START_KERNEL_MAP + 16 * MIB, code: bytes = b"\xf4" * 64,
                memsz: int | None = None, e_type: int = 2, e_machine: int = 62, phnum: int = 1,
                phoff: int = 64) -> bytes:
    """A 64-bit ELF executable with one PT_LOAD segment holding `code` at physical address `paddr`."""
    data_offset = 0x1000
    ehdr = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, e_type, e_machine, 1, entry, phoff, 0, 0,
                       64, 56, phnum, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, data_offset, lx.START_KERNEL_MAP + paddr, paddr, len(code),
                       len(code) if memsz is None else memsz, 0x1000)
    image = bytearray(data_offset + len(code))
    image[:64] = ehdr
    image[64:64 + 56] = phdr
    image[data_offset:] = code
    return bytes(image)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def load(tmp_path: Path, kernel: bytes, memory_bytes: int = 64 * MIB, initrd: bytes | None = None,
         append: str | None = None, cpus: int = 1, devices=()):
    memory = GuestMemory.with_ram(memory_bytes)
    initrd_path = write(tmp_path, "initrd", initrd) if initrd is not None else None
    image, cr3 = lx.load_linux(memory, write(tmp_path, "bzImage", kernel), initrd_path, append, cpus,
                               devices=list(devices))
    return memory, image, cr3


def zero_page(memory: GuestMemory) -> bp.boot_params:
    return bp.boot_params.from_buffer_copy(memory.read(lx.ZERO_PAGE_GPA, ctypes.sizeof(bp.boot_params)))


def refused(tmp_path: Path, kernel: bytes, **kwargs) -> str:
    with pytest.raises(VmmdError) as caught:
        load(tmp_path, kernel, **kwargs)
    assert caught.value.exit_code == ExitCode.HOST_ERROR
    return str(caught.value)


# --- the zero page (boot.rst "Details of header fields", "64-bit boot protocol") -----------------------------
def test_zero_page_carries_the_header_and_what_the_loader_fills_in(tmp_path: Path) -> None:
    kernel = bzimage(loadflags=bp.LOADED_HIGH | bp.QUIET_FLAG | bp.KEEP_SEGMENTS | bp.CAN_USE_HEAP)
    memory, image, _cr3 = load(tmp_path, kernel, initrd=b"\x5a" * 10000, append="console=ttyS0 root=/dev/vda")
    params = zero_page(memory)
    image_header = bp.setup_header.from_buffer_copy(kernel[bp.SETUP_HEADER_OFFSET:].ljust(
        ctypes.sizeof(bp.setup_header), b"\0"))
    assert params.hdr.header == bp.HDRS_MAGIC and params.hdr.version == 0x020F
    assert params.hdr.kernel_alignment == image_header.kernel_alignment  # copied from the image
    assert params.hdr.init_size == image_header.init_size
    assert params.hdr.type_of_loader == 0xFF  # boot.rst: no assigned loader ID
    assert params.hdr.loadflags & bp.LOADED_HIGH and params.hdr.loadflags & bp.CAN_USE_HEAP
    assert not params.hdr.loadflags & (bp.QUIET_FLAG | bp.KEEP_SEGMENTS)  # the loader's flags, not the image's
    assert params.hdr.cmd_line_ptr == lx.CMDLINE_GPA
    assert memory.read(lx.CMDLINE_GPA, len(image.cmdline) + 1) == b"console=ttyS0 root=/dev/vda\0"
    assert (params.hdr.ramdisk_image, params.hdr.ramdisk_size) == (image.initrd_gpa, 10000)
    assert memory.read(image.initrd_gpa, 10000) == b"\x5a" * 10000
    assert params.hdr.setup_data == 0
    assert params.acpi_rsdp_addr == acpi.ACPI_GPA
    assert memory.read(acpi.ACPI_GPA, 8) == b"RSD PTR "


def test_e820_matches_guest_ram_with_the_mp_table_reserved_and_the_legacy_hole_left_out(tmp_path: Path) -> None:
    memory, image, _cr3 = load(tmp_path, bzimage(), memory_bytes=96 * MIB)
    params = zero_page(memory)
    table = [(e.addr, e.size, e.type) for e in params.e820_table[:params.e820_entries]]
    assert table == image.e820 == [(0, mptable.MPTABLE_GPA, bp.E820_TYPE_RAM),
                                   (mptable.MPTABLE_GPA, mptable.MPTABLE_END - mptable.MPTABLE_GPA,
                                    bp.E820_TYPE_RESERVED),
                                   (MIB, 95 * MIB, bp.E820_TYPE_RAM)]


def test_e820_lists_ram_above_4_gib(tmp_path: Path) -> None:
    memory = GuestMemory.with_ram(3 * 1024 * MIB + 512 * MIB)  # 3.5 GiB: 512 MiB lands above 4 GiB
    try:
        table = lx.build_e820(memory)
    finally:
        memory.close()
    assert table[-1] == (4 * 1024 * MIB, 512 * MIB, bp.E820_TYPE_RAM)
    assert table[-2] == (MIB, 3 * 1024 * MIB - MIB, bp.E820_TYPE_RAM)


def test_entry_state_is_the_64_bit_boot_protocol(tmp_path: Path) -> None:
    memory, image, cr3 = load(tmp_path, bzimage())
    regs = lx.linux_entry_regs(image)
    assert regs.rip == image.kernel_gpa + 0x200  # boot.rst: 64-bit entry at the loaded kernel + 0x200
    assert regs.rsi == lx.ZERO_PAGE_GPA
    assert not regs.rflags & (1 << 9)  # interrupts off
    from vmmd.kvm import uapi

    sregs = lx.linux_entry_sregs(uapi.kvm_sregs(), cr3, xsave=False)
    assert sregs.cs.selector == 0x10 and sregs.cs.l == 1  # __BOOT_CS, 64-bit
    assert {sregs.ds.selector, sregs.es.selector, sregs.ss.selector} == {0x18}  # __BOOT_DS
    assert sregs.cr0 & 0x8000_0001 == 0x8000_0001 and sregs.cr4 & (1 << 5) and sregs.efer & (1 << 10)  # PG PE PAE LMA
    assert sregs.gdt.base == lx.GDT_GPA
    # the GDT holds flat 64-bit code at 0x10 and flat data at 0x18
    assert memory.read_u64(lx.GDT_GPA + 0x10) == 0x00AF_9A00_0000_FFFF
    assert memory.read_u64(lx.GDT_GPA + 0x18) == 0x00CF_9200_0000_FFFF
    # identity map: the kernel's entry and the zero page translate to themselves
    assert cr3 == L.PML4_GPA
    pdpte = memory.read_u64(L.PDPT_GPA)
    pde = memory.read_u64((pdpte & ~0xFFF) + 8 * (image.entry_gpa >> 21))
    assert pde & (PTE_P | PTE_PS) == PTE_P | PTE_PS and pde & ~0xFFF == image.entry_gpa & ~((2 << 20) - 1)


# --- placement ---------------------------------------------------------------------------------------------------
def test_kernel_goes_to_pref_address_when_it_fits(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40
    memory, image, _cr3 = load(tmp_path, bzimage(payload=payload))
    assert image.kernel_gpa == 16 * MIB
    assert memory.read(16 * MIB, len(payload)) == payload  # the protected-mode part, after the setup sectors


def test_relocatable_kernel_moves_to_the_lowest_aligned_address_when_pref_address_does_not_fit(tmp_path) -> None:
    _memory, image, _cr3 = load(tmp_path, bzimage(pref_address=16 * MIB, init_size=20 * MIB), memory_bytes=32 * MIB)
    assert image.kernel_gpa == 2 * MIB  # kernel_alignment above 1 MiB


def test_kernel_without_room_for_init_size_asks_for_more_memory(tmp_path: Path) -> None:
    message = refused(tmp_path, bzimage(init_size=40 * MIB), memory_bytes=32 * MIB)
    assert "init_size" in message and "--memory" in message


def test_non_relocatable_kernel_stays_at_pref_address(tmp_path: Path) -> None:
    _memory, image, _cr3 = load(tmp_path, bzimage(relocatable_kernel=0, pref_address=4 * MIB))
    assert image.kernel_gpa == 4 * MIB
    assert "--memory" in refused(tmp_path, bzimage(relocatable_kernel=0, pref_address=62 * MIB))


def test_initrd_sits_page_aligned_at_the_top_below_initrd_addr_max_and_clear_of_init_size(tmp_path) -> None:
    _memory, image, _cr3 = load(tmp_path, bzimage(), initrd=b"\1" * 5000)
    assert image.initrd_gpa % PAGE_SIZE == 0
    assert image.initrd_gpa + 5000 <= 64 * MIB
    assert image.initrd_gpa >= image.kernel_gpa + image.init_size
    _memory, low, _cr3 = load(tmp_path, bzimage(initrd_addr_max=32 * MIB - 1), initrd=b"\1" * 5000)
    assert low.initrd_gpa + 5000 <= 32 * MIB and low.initrd_gpa > 31 * MIB


def test_initrd_that_does_not_fit_above_the_kernel_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, bzimage(initrd_addr_max=21 * MIB - 1), initrd=b"\1" * (2 * MIB))
    assert "initrd" in message and "--memory" in message


def test_empty_initrd_is_refused(tmp_path: Path) -> None:
    assert "empty" in refused(tmp_path, bzimage(), initrd=b"")


def test_measured_regions_ascend_without_overlap_and_cover_what_was_written(tmp_path: Path) -> None:
    _memory, image, _cr3 = load(tmp_path, bzimage(), initrd=b"\1" * 5000, cpus=4,
                                devices=[acpi.MmioDevice(L.VIRTIO_NET_MMIO_GPA, L.VIRTIO_MMIO_SIZE, 5)])
    regions = image.measured_regions()
    names = [name for _gpa, _len, name in regions]
    assert names[:6] == ["zero page (boot_params)", "GDT", "page tables", "command line", "MP table", "ACPI tables"]
    assert names[6].startswith("kernel ") and names[7].startswith("initrd ")
    for (gpa, length, _n), (next_gpa, _l, _m) in zip(regions, regions[1:], strict=False):
        assert gpa + length <= next_gpa
    assert all(gpa % 16 == 0 and length % 16 == 0 and length > 0 for gpa, length, _n in regions)


# --- the command line --------------------------------------------------------------------------------------------
def test_command_line_defaults_to_the_serial_console_and_gets_vmmds_device_arguments(tmp_path: Path) -> None:
    assert lx.command_line(None, []) == b"console=ttyS0"
    assert lx.command_line(" quiet ", ["virtio_mmio.device=4K@0xfeb01000:5"]) == \
        b"quiet virtio_mmio.device=4K@0xfeb01000:5"
    assert lx.command_line("", []) == b""


def test_command_line_longer_than_cmdline_size_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, bzimage(cmdline_size=16), append="x" * 17)
    assert "cmdline_size" in message


def test_command_line_with_a_nul_is_refused(tmp_path: Path) -> None:
    assert "NUL" in refused(tmp_path, bzimage(), append="a\0b")


# --- malformed bzImages: each refused with the field it is about ------------------------------------------------
@pytest.mark.parametrize(("kernel", "field_name"), [
    (bzimage()[:0x200], "header"),  # truncated before "HdrS"
    (bzimage(header=0x12345678), "header"),
    (bzimage(boot_flag=0x1234), "boot_flag"),
    (bzimage(version=0x020B), "version"),  # 2.11: no 64-bit entry
    (bzimage(xloadflags=0), "xloadflags"),
    (bzimage(loadflags=0), "loadflags"),  # a zImage
    (bzimage(kernel_alignment=0), "kernel_alignment"),
    (bzimage(kernel_alignment=3 * MIB), "kernel_alignment"),
    (bzimage(kernel_alignment=0x200), "kernel_alignment"),
    (bzimage(payload=b"", setup_sects=4), "setup_sects"),  # nothing after the setup sectors
    (bzimage(setup_sects=200)[:20 * 512], "setup_sects"),  # truncated inside the setup sectors
    (bzimage(payload=b"\x90" * 4096, syssize=4096), "syssize"),  # says 64 KiB, holds 4 KiB
    (bzimage(payload=b"\x90" * 8192, init_size=4096), "init_size"),
    (bzimage(jump=0x30EB), "jump"),  # the header ends before init_size
    (bzimage(relocatable_kernel=0, pref_address=0), "relocatable_kernel"),
])
def test_malformed_bzimage_is_refused_naming_the_field(tmp_path: Path, kernel: bytes, field_name: str) -> None:
    assert f": {field_name}:" in refused(tmp_path, kernel)


def test_empty_kernel_file_is_refused(tmp_path: Path) -> None:
    assert "empty" in refused(tmp_path, b"")


def test_kernel_larger_than_ram_is_refused_before_reading_it(tmp_path: Path) -> None:
    assert "--memory" in refused(tmp_path, bzimage(payload=b"\0" * (5 * MIB)), memory_bytes=4 * MIB)


def test_setup_sects_zero_means_four(tmp_path: Path) -> None:
    payload = b"\xcc" * 4096
    memory, image, _cr3 = load(tmp_path, bzimage(payload=payload, setup_sects=0))
    assert memory.read(image.kernel_gpa, 4096) == payload  # boot.rst: "If this field is 0, the real value is 4"


# --- ELF vmlinux ------------------------------------------------------------------------------------------------
def test_elf_vmlinux_loads_its_segments_at_their_physical_addresses(tmp_path: Path) -> None:
    code = b"\xeb\xfe" * 32
    memory, image, _cr3 = load(tmp_path, elf_vmlinux(code=code, memsz=len(code) + 4096))
    assert image.format == "ELF" and image.kernel_gpa == 16 * MIB
    assert memory.read(16 * MIB, len(code)) == code
    assert memory.read(16 * MIB + len(code), 4096) == bytes(4096)  # the BSS is zeroed
    assert image.entry_gpa == 16 * MIB  # e_entry, a __START_KERNEL_map address, translated
    params = zero_page(memory)
    assert params.hdr.boot_flag == bp.BOOT_FLAG_MAGIC and params.hdr.header == bp.HDRS_MAGIC
    assert params.hdr.type_of_loader == 0xFF and params.hdr.cmd_line_ptr == lx.CMDLINE_GPA


@pytest.mark.parametrize(("kernel", "field_name"), [
    (elf_vmlinux()[:40], "ELF header"),
    (elf_vmlinux(e_machine=3), "e_machine"),
    (elf_vmlinux(e_type=3), "e_type"),
    (elf_vmlinux(phnum=0), "program headers"),
    (elf_vmlinux(phoff=0x100000), "program headers"),
    (elf_vmlinux(paddr=0x1000), "program header 0"),  # below 1 MiB
    (elf_vmlinux(memsz=1), "program header 0"),  # file size > memory size
    (elf_vmlinux(entry=0x5000), "e_entry"),
])
def test_malformed_elf_is_refused_naming_the_field(tmp_path: Path, kernel: bytes, field_name: str) -> None:
    assert f": {field_name}:" in refused(tmp_path, kernel)


def test_elf_beyond_guest_ram_asks_for_more_memory(tmp_path: Path) -> None:
    assert "--memory" in refused(tmp_path, elf_vmlinux(paddr=60 * MIB, entry=60 * MIB, memsz=8 * MIB))


# --- Debian's real kernel ----------------------------------------------------------------------------------------
def test_debian_cloud_kernel_parses_and_places_as_boot_rst_says() -> None:
    vmlinuz = LINUX_GUEST / "vmlinuz"
    assert vmlinuz.exists(), "run `make linux-guest` (make test does) to fetch Debian's kernel"
    memory = GuestMemory.with_ram(512 * MIB)
    try:
        image, _cr3 = lx.load_linux(memory, vmlinuz, LINUX_GUEST / "initramfs.gz", None, 2)
        params = zero_page(memory)
    finally:
        memory.close()
    data = vmlinuz.read_bytes()
    header = bp.setup_header.from_buffer_copy(data[bp.SETUP_HEADER_OFFSET:bp.SETUP_HEADER_OFFSET
                                                   + ctypes.sizeof(bp.setup_header)])
    assert header.version >= 0x020F and header.xloadflags & bp.XLF_KERNEL_64 and header.relocatable_kernel
    assert image.kernel_gpa == header.pref_address  # 16 MiB for Debian's config
    assert image.kernel_size == len(data) - (header.setup_sects + 1) * 512
    assert image.init_size == header.init_size
    assert params.hdr.ramdisk_image >= image.kernel_gpa + header.init_size
    assert params.hdr.ramdisk_image + params.hdr.ramdisk_size <= min(header.initrd_addr_max + 1, 512 * MIB)
    assert params.hdr.version == header.version and params.hdr.type_of_loader == 0xFF
