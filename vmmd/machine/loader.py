"""Loader for flat 64-bit firmware: image, identity page tables, GDT, boot-info page, vCPU state.

The guest starts in 64-bit long mode as firmware/include/bootinfo.h documents.
Everything the VMM writes below FIRMWARE_LOAD_GPA plus the image itself is
described by `LoadedImage.measured_regions()`, in the order an SEV launch
encrypts and measures it.

Page tables follow the AMD64 APM vol. 2, 5.3 (long-mode 4-level paging): PML4
-> PDPT -> one PD per GiB with 2 MiB pages, and 4 KiB pages for the first 2 MiB
so shared pages (GHCB, device buffers) can carry a different C-bit from private
ones (APM vol. 2, 15.34.5: the C-bit in a page-table entry selects encryption).
"""

from __future__ import annotations

import array
import ctypes
import os
import stat
from dataclasses import dataclass

from vmmd.errors import VmmdError
from vmmd.kvm import uapi
from vmmd.machine import bootinfo as bi
from vmmd.machine import layout as L
from vmmd.memory import FOUR_GIB_GPA, PAGE_SIZE, PCI_HOLE_START_GPA, GuestMemory

PTE_P, PTE_RW, PTE_PS = 1 << 0, 1 << 1, 1 << 7
GIB = 1 << 30

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 5, 1 << 9, 1 << 10, 1 << 18
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

# GDT descriptors (Intel SDM vol. 3, 3.4.5): null, 64-bit code (L=1), flat data.
GDT_ENTRIES = [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF]


FLAT = "flat"  # 64-bit image at FIRMWARE_LOAD_GPA, entered in long mode with a boot-info page
RESET_VECTOR = "reset-vector"  # OVMF-style image ending at 4 GiB, entered in the x86 reset state
LINUX = "linux"  # a Linux kernel booted directly (vmmd.machine.linux.LinuxImage), entered at its 64-bit entry
FIRMWARE_TYPES = ("auto", FLAT, RESET_VECTOR)


@dataclass(frozen=True)
class VcpuArea:
    """Where a flat image's per-vCPU pages are: each vCPU's GHCB page (shared) and stack.

    Up to LOW_AREA_VCPUS vCPUs they are the fixed pages below 1 MiB (layout.py). More vCPUs get an area of
    their own from the first 2 MiB boundary after the image: the GHCB pages, then the 4 KiB page tables that
    map them (shared pages need 4 KiB PTEs: their C-bit differs from private RAM's), then the stacks."""

    ghcb_gpa: int
    stacks_gpa: int
    base: int = 0  # 0: the low layout; else the area [base, base + size)
    size: int = 0
    pt_gpa: int = 0  # the area's page tables (measured with the low area)
    pt_count: int = 0

    @classmethod
    def for_image(cls, cpu_count: int, image_end: int) -> VcpuArea:
        if cpu_count <= L.LOW_AREA_VCPUS:
            return cls(L.GHCB_BASE_GPA, L.STACKS_GPA)
        base = (image_end + (2 << 20) - 1) & ~((2 << 20) - 1)
        ghcb_bytes = cpu_count * PAGE_SIZE
        pt_count = (ghcb_bytes + (2 << 20) - 1) >> 21
        stacks = base + ghcb_bytes + pt_count * PAGE_SIZE
        return cls(base, stacks, base, stacks + cpu_count * L.STACK_SIZE - base, base + ghcb_bytes, pt_count)

    def ghcb_range(self, cpu_count: int) -> tuple[int, int]:
        """(gpa, size) of the GHCB pages: the 16 low pages, or one per vCPU in the area."""
        return (self.ghcb_gpa, L.LOW_AREA_VCPUS * PAGE_SIZE) if not self.base else (self.ghcb_gpa,
                                                                                    cpu_count * PAGE_SIZE)


@dataclass
class LoadedImage:
    path: str
    entry_gpa: int
    image_size: int
    low_area_size: int = 0  # flat: bytes from 0 written by the VMM (boot info, GDT, page tables)
    kind: str = FLAT
    image_gpa: int = L.FIRMWARE_LOAD_GPA
    vcpu_area: VcpuArea = VcpuArea(L.GHCB_BASE_GPA, L.STACKS_GPA)

    def measured_regions(self) -> list[tuple[int, int, str]]:
        """(gpa, length, name) in launch order: VMM-built structures (flat images), then the firmware image,
        then the vCPU area's page tables where there is one."""
        name = f"firmware {os.path.basename(self.path)}"
        if self.kind == RESET_VECTOR:
            return [(self.image_gpa, self.image_size, name)]
        regions = [(L.BOOTINFO_GPA, self.low_area_size - L.BOOTINFO_GPA, "boot info, GDT, page tables"),
                   (L.FIRMWARE_LOAD_GPA, (self.image_size + 15) & ~15, name)]
        if self.vcpu_area.pt_count:
            regions.append((self.vcpu_area.pt_gpa, self.vcpu_area.pt_count * PAGE_SIZE,
                            "page tables of the vCPU area (GHCB pages)"))
        return regions


def firmware_kind(path: str | os.PathLike, requested: str = "auto") -> str:
    """flat or reset-vector: as requested, or (auto) reset-vector when the image ends with the OVMF footer table."""
    if requested not in FIRMWARE_TYPES:
        raise VmmdError(f"unknown firmware type {requested!r}: choose one of {', '.join(FIRMWARE_TYPES)}")
    if requested != "auto":
        return requested
    from vmmd.sev.ovmf import is_ovmf_image  # the OVMF footer-table format

    try:
        fd, st = _open_image(path, "firmware")
    except VmmdError:
        return FLAT  # read_firmware() reports the problem (missing, a device, a FIFO ...) without reading
    try:
        tail = os.pread(fd, 64, max(0, st.st_size - 64))
    except OSError:
        return FLAT
    finally:
        os.close(fd)
    return RESET_VECTOR if is_ovmf_image(tail) else FLAT


def load_reset_vector_firmware(memory: GuestMemory, path: str | os.PathLike, read_only: bool = True) -> LoadedImage:
    """Map the image so that it ends at 4 GiB (as a flash chip does, QEMU's pc_system_flash_map()), read-only
    for the guest unless the platform cannot have read-only slots (SEV-ES: the image is encrypted RAM there,
    as QEMU maps -bios as RAM when kvm_readonly_mem_allowed is false); the vCPU starts from the x86 reset
    state at 0xFFFFFFF0."""
    p = os.fspath(path)
    data = read_firmware(p, memory.ram_bytes, limit=L.RESET_VECTOR_MAX_BYTES)
    if len(data) % PAGE_SIZE:
        raise VmmdError(f"reset-vector firmware {p} is {len(data)} bytes, not a multiple of 4 KiB: it must end "
                        "exactly at 4 GiB")
    gpa = FOUR_GIB_GPA - len(data)
    if gpa < L.MMIO_TESTDEV_GPA + L.MMIO_TESTDEV_SIZE + L.VIRTIO_MMIO_SIZE:
        raise VmmdError(f"reset-vector firmware {p} of {len(data)} bytes would cover vmmd's MMIO devices "
                        "below 4 GiB: at most 16 MiB")
    memory.add_slot(gpa, len(data), read_only=read_only)  # read-only for the guest (writes exit as MMIO), not us
    memory.write(gpa, data)
    return LoadedImage(p, RESET_VECTOR_GPA, len(data), kind=RESET_VECTOR, image_gpa=gpa)


RESET_VECTOR_GPA = 0xFFFF_FFF0


def _open_image(path: str | os.PathLike, what: str) -> tuple[int, os.stat_result]:
    """An image file opened for reading, with its stat; VmmdError saying what is wrong unless it is a regular file.

    O_NONBLOCK: opening a FIFO does not wait for a writer (and a device is refused before any read)."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        hint = " (build the guests with `make -C firmware`)" if "firmware/build" in p else ""
        raise VmmdError(f"{what} {p} does not exist{hint}") from None
    except IsADirectoryError:
        raise VmmdError(f"{what} {p} is a directory, not an image file") from None
    except PermissionError:
        raise VmmdError(f"{what} {p} is not readable by this user") from None
    except OSError as err:
        raise VmmdError(f"cannot open {what} {p}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise VmmdError(f"{what} {p} is a directory, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise VmmdError(f"{what} {p} is not a regular file (a device or FIFO is not an image)")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_image_file(path: str | os.PathLike, limit: int, what: str = "firmware", too_large: str = "") -> bytes:
    """The bytes of a regular file of at most `limit` bytes, with errors that say what is wrong (`too_large`:
    what to say about a larger file, after its path).

    Devices and FIFOs are refused before reading (O_NONBLOCK: opening a FIFO does not wait for a writer;
    /dev/zero would never end), and nothing larger than `limit` is read."""
    p = os.fspath(path)
    fd, st = _open_image(p, what)
    try:
        if st.st_size > limit:
            raise VmmdError(f"{what} {p} is {st.st_size} bytes: " + (too_large or f"more than the {limit} allowed"))
        with os.fdopen(fd, "rb", closefd=False) as image:
            data = image.read(limit + 1)
    except OSError as err:
        raise VmmdError(f"cannot read {what} {p}: {err.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we read it
        raise VmmdError(f"{what} {p} is over {limit} bytes: " + (too_large or f"more than the {limit} allowed"))
    return data


def foreign_format(data: bytes | memoryview, path: str) -> str | None:
    """Why `data` (the start of a file given as a flat firmware image) is not one, when its first bytes say it
    is something else; None when nothing gives it away (a flat image is raw code: it has no magic of its own).

    Magic numbers: ELF (elf(5)); the Linux boot protocol's "HdrS" at 0x202 (Documentation/arch/x86/boot.rst);
    a UEFI firmware volume, "_FVH" at byte 40 (PI spec vol. 3, EFI_FIRMWARE_VOLUME_HEADER.Signature), which is
    what OVMF_VARS.fd is; PE/COFF "MZ"; compressed archives."""
    head = bytes(data[:0x210])
    if head[:4] == b"\x7fELF":
        flat = os.path.splitext(path)[0] + ".bin"
        hint = (f"vmmd runs the flat image next to it, {flat}" if os.path.exists(flat) else
                "vmmd runs flat images: objcopy -O binary turns a firmware ELF into one")
        return f"an ELF file, not a flat image: {hint} (a Linux vmlinux boots with --kernel)"
    if head[0x202:0x206] == b"HdrS":
        return "a Linux kernel (bzImage): boot it with --kernel (and --initrd, --append)"
    if head[40:44] == b"_FVH":
        return ("a UEFI firmware volume without OVMF's footer table, so not firmware vmmd can start (OVMF_VARS "
                "files hold UEFI variables, not code: run OVMF_CODE)")
    if head[:2] == b"MZ":
        return "a PE/COFF (EFI or Windows) executable, not a flat image"
    for magic, what in ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                        (b"BZh", "bzip2"), (b"QFI\xfb", "qcow2 disk")):
        if head.startswith(magic):
            return f"{what} data, not a flat image"
    return None


def read_firmware(path: str | os.PathLike, memory_bytes: int, limit: int | None = None) -> bytes:
    """A flat image that fits the RAM above FIRMWARE_LOAD_GPA, or (with `limit`) a reset-vector image."""
    p = os.fspath(path)
    if limit is not None:
        data = read_image_file(p, limit, too_large=f"a reset-vector image may have at most {limit} bytes")
    else:
        room = max(min(memory_bytes, PCI_HOLE_START_GPA) - L.FIRMWARE_LOAD_GPA, 0)
        data = read_image_file(p, room, too_large=f"only {room} bytes of RAM are free above "
                               f"{L.FIRMWARE_LOAD_GPA:#x}: give the guest more memory (--memory)")
    if not data:
        raise VmmdError(f"firmware {p} is empty")
    if limit is None:
        why = foreign_format(data, p)
        if why is not None:
            raise VmmdError(f"firmware {p} is {why}")
    return data


def mapped_gib(memory: GuestMemory) -> int:
    """GiBs the identity map covers: all of 0..4 GiB (MMIO included) and every RAM byte above; one PD each."""
    top = max(FOUR_GIB_GPA, max(gpa + size for gpa, size in memory.ranges()))
    return (top + GIB - 1) // GIB


def build_page_tables(memory: GuestMemory, c_bit: int = 0, shared: list[tuple[int, int]] = (),
                      small: list[tuple[int, int]] = ()) -> int:
    """Identity-map 0..4 GiB (MMIO included) and RAM above it; returns CR3. The first 2 MiB, and each 2 MiB
    region in `small` ((region gpa, gpa of its page table)), use 4 KiB pages, so that pages in `shared` can be
    mapped without the C-bit."""
    enc = (1 << c_bit) if c_bit else 0
    gib_count = mapped_gib(memory)
    if gib_count > L.MAX_PD_PAGES:
        raise VmmdError(f"flat firmware guests map at most {L.MAX_PD_PAGES} GiB of address space; "
                        f"this guest needs {gib_count} GiB: use less memory")

    def is_shared(page_gpa: int) -> bool:
        return any(start <= page_gpa < start + size for start, size in shared)

    memory.write_u64(L.PML4_GPA, L.PDPT_GPA | enc | PTE_P | PTE_RW)
    pdpt = array.array("Q", (L.PD_BASE_GPA + gib * PAGE_SIZE | enc | PTE_P | PTE_RW for gib in range(gib_count)))
    memory.write(L.PDPT_GPA, pdpt.tobytes())
    large = PTE_P | PTE_RW | PTE_PS | enc
    directories = array.array("Q", (gpa | large for gpa in range(0, gib_count * GIB, 2 << 20)))
    for region, table in [(0, L.PT_LOW_GPA), *small]:
        directories[region >> 21] = table | enc | PTE_P | PTE_RW
        ptes = array.array("Q", (gpa | (0 if is_shared(gpa) else enc) | PTE_P | PTE_RW
                                 for gpa in range(region, region + (2 << 20), PAGE_SIZE)))
        memory.write(table, ptes.tobytes())
    memory.write(L.PD_BASE_GPA, directories.tobytes())
    return L.PML4_GPA | enc


def write_gdt(memory: GuestMemory) -> None:
    for i, desc in enumerate(GDT_ENTRIES):
        memory.write_u64(L.GDT_GPA + 8 * i, desc)


def write_bootinfo(memory: GuestMemory, platform: str, cpu_count: int, doorbell_port: int, c_bit: int,
                   guest_arg: int, virtio_net_gpa: int = 0, area: VcpuArea | None = None,
                   virtio_blk_gpas: tuple[int, ...] = ()) -> None:
    area = area or VcpuArea.for_image(cpu_count, 0)
    info = bi.vmmd_bootinfo(magic=bi.VMMD_BOOTINFO_MAGIC, version=bi.VMMD_BOOTINFO_VERSION,
                            size=ctypes.sizeof(bi.vmmd_bootinfo), platform=bi.PLATFORM_CODES[platform],
                            cpu_count=cpu_count, console_port=L.CONSOLE_PORT, debug_exit_port=L.DEBUG_EXIT_PORT,
                            doorbell_port=doorbell_port, ghcb_gpa=area.ghcb_gpa, shared_gpa=L.SHARED_GPA,
                            shared_size=L.SHARED_SIZE, c_bit=c_bit, guest_arg=guest_arg & (2**64 - 1),
                            mmio_testdev_gpa=L.MMIO_TESTDEV_GPA, virtio_net_gpa=virtio_net_gpa,
                            virtio_blk_count=len(virtio_blk_gpas))
    for i, gpa in enumerate(virtio_blk_gpas):
        info.virtio_blk_gpa[i] = gpa
    if platform != "plain":  # where an attested launch's secret goes (vmctl inject-secret's default GPA)
        info.secret_gpa, info.secret_size = L.SECRET_GPA, L.SECRET_SIZE
    ranges = [(0, L.FIRMWARE_LOAD_GPA, bi.VMMD_MEM_RESERVED)]
    for gpa, size in memory.ranges():
        start = max(gpa, L.FIRMWARE_LOAD_GPA)
        if start < gpa + size:
            ranges.append((start, gpa + size - start, bi.VMMD_MEM_RAM))
    if area.base:
        ranges.append((area.base, area.size, bi.VMMD_MEM_RESERVED))  # GHCB pages, their page tables, stacks
    ranges.append((*area.ghcb_range(cpu_count), bi.VMMD_MEM_SHARED))
    ranges.append((L.SHARED_GPA, L.SHARED_SIZE, bi.VMMD_MEM_SHARED))
    for i, (gpa, size, kind) in enumerate(ranges):
        info.mem_ranges[i] = bi.vmmd_mem_range(gpa=gpa, size=size, type=kind)
    info.mem_range_count = len(ranges)
    memory.write(L.BOOTINFO_GPA, bytes(info))


def load_flat_firmware(memory: GuestMemory, path: str | os.PathLike, platform: str, cpu_count: int,
                       doorbell_port: int = 0,
                       c_bit: int = 0, guest_arg: int = 0, virtio_net_gpa: int = 0,
                       virtio_blk_gpas: tuple[int, ...] = ()) -> tuple[LoadedImage, int]:
    """Write image + VMM structures into guest RAM; returns (image, cr3)."""
    if not 1 <= cpu_count <= L.MAX_VCPUS:
        raise VmmdError(f"vcpus must be 1..{L.MAX_VCPUS}, got {cpu_count}")
    data = read_firmware(path, memory.ram_bytes)
    area = VcpuArea.for_image(cpu_count, L.FIRMWARE_LOAD_GPA + len(data))
    if area.base and not memory.contains(area.base, area.size):
        raise VmmdError(f"{cpu_count} vCPUs need {area.size >> 10} KiB for their GHCB pages and stacks after the "
                        f"image, up to {area.base + area.size:#x}: give the guest more memory (--memory)")
    memory.write(L.FIRMWARE_LOAD_GPA, data)
    write_bootinfo(memory, platform, cpu_count, doorbell_port, c_bit, guest_arg, virtio_net_gpa, area,
                   virtio_blk_gpas)
    write_gdt(memory)
    shared = [area.ghcb_range(cpu_count), (L.SHARED_GPA, L.SHARED_SIZE)]
    small = [(area.base + i * (2 << 20), area.pt_gpa + i * PAGE_SIZE) for i in range(area.pt_count)]
    cr3 = build_page_tables(memory, c_bit, shared, small)
    image = LoadedImage(os.fspath(path), L.FIRMWARE_LOAD_GPA, len(data), L.PD_BASE_GPA + mapped_gib(memory) * PAGE_SIZE,
                        vcpu_area=area)
    return image, cr3


def _segment(selector: int, code: bool) -> uapi.kvm_segment:
    return uapi.kvm_segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=0xB if code else 0x3, present=1,
                            dpl=0, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def long_mode_sregs(sregs: uapi.kvm_sregs, cr3: int, xsave: bool, *, gdt_gpa: int = L.GDT_GPA,
                    gdt_entries: int = len(GDT_ENTRIES), code_selector: int = L.CODE64_SELECTOR,
                    data_selector: int = L.DATA_SELECTOR) -> uapi.kvm_sregs:
    """Turn the vCPU's reset sregs into the documented 64-bit entry state (a flat image's by default; the Linux
    loader passes its own GDT and selectors).

    Every field a VMSA records is set here, TR and LDTR included (their reset values
    differ between SVM and VMX), so the entry state is the same on every host: a
    64-bit busy TSS (type 11, the one VMX accepts in long mode) and a present LDT."""
    sregs.cs = _segment(code_selector, True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(data_selector, False))
    sregs.tr = uapi.kvm_segment(base=0, limit=0xFFFF, selector=0, type=0xB, present=1, s=0)
    sregs.ldt = uapi.kvm_segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, s=0)
    sregs.cr2 = 0
    sregs.gdt.base, sregs.gdt.limit = gdt_gpa, 8 * gdt_entries - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if xsave else 0)
    sregs.cr3 = cr3
    sregs.efer = EFER_LME | EFER_LMA
    return sregs


def entry_regs(image: LoadedImage, vcpu_index: int) -> uapi.kvm_regs:
    return uapi.kvm_regs(rip=image.entry_gpa, rsp=image.vcpu_area.stacks_gpa + (vcpu_index + 1) * L.STACK_SIZE,
                         rsi=L.BOOTINFO_GPA, rdi=vcpu_index, rflags=0x2)
