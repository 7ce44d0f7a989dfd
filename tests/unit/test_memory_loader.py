"""Guest memory bounds, RAM layout around the PCI hole, the flat loader and CPUID table, on real KVM where needed."""

from __future__ import annotations

import ctypes

import pytest

from vmmd.errors import GuestMemoryError, VmmdError
from vmmd.kvm import Kvm, uapi
from vmmd.machine import bootinfo as bi
from vmmd.machine import layout as L
from vmmd.machine.config import MachineConfig, parse_size
from vmmd.machine.cpuid import HYPERVISOR_SIGNATURE, build_cpuid_table
from vmmd.machine.loader import PTE_P, PTE_PS, entry_regs, load_flat_firmware
from vmmd.memory import FOUR_GIB_GPA, PCI_HOLE_START_GPA, GuestMemory, ram_layout


def test_ram_layout_splits_at_pci_hole() -> None:
    assert ram_layout(64 << 20) == [(0, 64 << 20)]
    assert ram_layout(4 << 30) == [(0, PCI_HOLE_START_GPA), (FOUR_GIB_GPA, (4 << 30) - PCI_HOLE_START_GPA)]


@pytest.mark.parametrize("gpa,size", [(-1, 1), ((4 << 20) - 4, 8), (4 << 20, 1), (0, (4 << 20) + 1), (2**64, 1),
                                      (0x1000, -1)])
@pytest.mark.parametrize("access", ["view", "buffer", "hva"])
def test_view_refuses_ranges_leaving_ram(gpa: int, size: int, access: str) -> None:
    memory = GuestMemory.with_ram(4 << 20)
    with pytest.raises(GuestMemoryError):
        getattr(memory, access)(gpa, size)
    assert not memory.contains(gpa, size)


@pytest.mark.parametrize("access", ["view", "buffer", "hva"])
def test_view_refuses_range_across_the_hole(access: str) -> None:
    memory = GuestMemory.with_ram(PCI_HOLE_START_GPA + (2 << 20))
    assert memory.contains(FOUR_GIB_GPA, 4096)
    with pytest.raises(GuestMemoryError):
        getattr(memory, access)(PCI_HOLE_START_GPA - 8, 16)
    with pytest.raises(GuestMemoryError):
        getattr(memory, access)(PCI_HOLE_START_GPA, 8)


def test_views_are_zero_copy() -> None:
    memory = GuestMemory.with_ram(4 << 20)
    view = memory.view(0x2000, 16)
    view[:4] = [1, 2, 3, 4]
    assert memory.read(0x2000, 4) == b"\x01\x02\x03\x04"


def test_buffers_are_zero_copy_bytes_at_the_slots_hva() -> None:
    memory = GuestMemory.with_ram(PCI_HOLE_START_GPA + (2 << 20))
    buf = memory.buffer(FOUR_GIB_GPA + 0x2000, 16)
    assert (buf.format, buf.nbytes, buf.readonly) == ("B", 16, False)
    buf[:4] = b"\x01\x02\x03\x04"
    assert memory.read(FOUR_GIB_GPA + 0x2000, 4) == b"\x01\x02\x03\x04"
    memory.write(FOUR_GIB_GPA + 0x2004, b"\x05")
    assert buf[4] == 5
    high = memory.slots[1]
    assert memory.hva(FOUR_GIB_GPA + 0x2000, 16) == high.hva + 0x2000
    assert ctypes.string_at(memory.hva(FOUR_GIB_GPA + 0x2000, 5), 5) == b"\x01\x02\x03\x04\x05"
    del buf
    memory.close()


@pytest.mark.parametrize("size", [4095, 1 << 20])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory.with_ram(size)


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("2g") == 2 << 30 and parse_size("4096") == 4096
    assert parse_size("1GiB") == 1 << 30
    with pytest.raises(VmmdError):
        parse_size("12X")


def test_config_validation() -> None:
    with pytest.raises(VmmdError):
        MachineConfig(firmware="x", cpus=0).validate()


def test_loader_builds_identity_map_bootinfo_and_gdt(tmp_path) -> None:
    image = tmp_path / "fw.bin"
    image.write_bytes(b"\xf4" * 100)
    memory = GuestMemory.with_ram(64 << 20)
    loaded, cr3 = load_flat_firmware(memory, image, "sev-es-emu", 2, L.DOORBELL_PORT, 0, 42)
    assert cr3 == L.PML4_GPA and loaded.entry_gpa == L.FIRMWARE_LOAD_GPA
    assert memory.read(L.FIRMWARE_LOAD_GPA, 100) == b"\xf4" * 100
    info = bi.vmmd_bootinfo.from_buffer_copy(memory.read(L.BOOTINFO_GPA, 4096)[:len(bytes(bi.vmmd_bootinfo()))])
    assert info.magic == bi.VMMD_BOOTINFO_MAGIC and info.platform == bi.VMMD_PLATFORM_SEV_ES_EMU
    assert info.cpu_count == 2 and info.guest_arg == 42 and info.doorbell_port == L.DOORBELL_PORT
    assert info.ghcb_gpa == L.GHCB_BASE_GPA and info.console_port == 0x3F8
    # 2 MiB page for 0xFEB00000 (MMIO test page) maps to itself
    gib, index = divmod(L.MMIO_TESTDEV_GPA, 1 << 30)
    pde = memory.read_u64(L.PD_BASE_GPA + gib * 4096 + 8 * (index >> 21))
    assert pde & ~0xFFF == L.MMIO_TESTDEV_GPA & ~((2 << 20) - 1) and pde & PTE_PS and pde & PTE_P
    measured = loaded.measured_regions()
    assert measured[0][0] == L.BOOTINFO_GPA and all(gpa % 16 == 0 and size % 16 == 0 for gpa, size, _ in measured)


def test_loader_c_bit_clear_on_shared_pages(tmp_path) -> None:
    image = tmp_path / "fw.bin"
    image.write_bytes(b"\x90" * 16)
    memory = GuestMemory.with_ram(64 << 20)
    _, cr3 = load_flat_firmware(memory, image, "sev-es", 1, 0, 51, 0)
    c = 1 << 51
    assert cr3 & c
    assert memory.read_u64(L.PT_LOW_GPA + 8 * (L.GHCB_BASE_GPA >> 12)) & c == 0
    assert memory.read_u64(L.PT_LOW_GPA + 8 * (L.SHARED_GPA >> 12)) & c == 0
    assert memory.read_u64(L.PT_LOW_GPA + 8 * (L.BOOTINFO_GPA >> 12)) & c


def test_more_than_16_vcpus_get_their_own_area_after_the_image(tmp_path) -> None:
    """vCPUs past the 16 that fit below 1 MiB: GHCB pages (shared, 4 KiB PTEs without the C-bit) and stacks in an
    area from the first 2 MiB boundary after the image, reserved in the boot info, its page tables measured."""
    image = tmp_path / "fw.bin"
    image.write_bytes(b"\x90" * (3 << 20))  # the image itself crosses a 2 MiB boundary
    memory = GuestMemory.with_ram(64 << 20)
    cpus, c = 200, 1 << 51
    loaded, _ = load_flat_firmware(memory, image, "sev-es", cpus, 0, 51, 0)
    area = loaded.vcpu_area
    assert area.base == 4 << 20 and area.ghcb_gpa == area.base and area.pt_count == 1
    info = bi.vmmd_bootinfo.from_buffer_copy(memory.read(L.BOOTINFO_GPA, 4096)[:len(bytes(bi.vmmd_bootinfo()))])
    assert info.ghcb_gpa == area.ghcb_gpa and info.cpu_count == cpus
    ranges = [(r.gpa, r.size, r.type) for r in info.mem_ranges[:info.mem_range_count]]
    assert (area.base, area.size, bi.VMMD_MEM_RESERVED) in ranges
    assert (area.ghcb_gpa, cpus * 4096, bi.VMMD_MEM_SHARED) in ranges
    pde = memory.read_u64(L.PD_BASE_GPA + 8 * (area.base >> 21))
    assert not pde & PTE_PS and pde & ~0xFFF & ~c == area.pt_gpa  # the area's 2 MiB use 4 KiB pages
    for cpu in (0, 17, cpus - 1):  # every GHCB page shared, the page after the last one private
        assert memory.read_u64(area.pt_gpa + 8 * cpu) == area.ghcb_gpa + cpu * 4096 | PTE_P | 2
    assert memory.read_u64(area.pt_gpa + 8 * cpus) & c
    stacks = [entry_regs(loaded, i).rsp for i in range(cpus)]
    assert len(set(stacks)) == cpus and min(stacks) > area.pt_gpa and max(stacks) == area.base + area.size
    assert (area.pt_gpa, 4096, "page tables of the vCPU area (GHCB pages)") in loaded.measured_regions()
    with pytest.raises(VmmdError, match="give the guest more memory"):
        load_flat_firmware(GuestMemory.with_ram(4 << 20), image, "sev-es", cpus, 0, 51, 0)
    with pytest.raises(VmmdError, match="vcpus must be 1..254"):
        load_flat_firmware(GuestMemory.with_ram(64 << 20), image, "sev-es", 255, 0, 51, 0)


def supported_leaf_1_edx(supported) -> int:
    return next(e.edx for e in supported if e.function == 1)


def test_cpuid_table_from_real_kvm() -> None:
    supported = Kvm().get_supported_cpuid()
    emu = build_cpuid_table(supported, 2, "sev-es-emu", L.DOORBELL_PORT)
    eax, ebx, ecx, edx = emu.lookup(0x40000100)
    assert b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx)) == HYPERVISOR_SIGNATURE
    assert emu.lookup(0x40000101)[0] == L.DOORBELL_PORT
    plain = build_cpuid_table(supported, 1, "plain")
    assert plain.lookup(0x40000100) == (0, 0, 0, 0)
    assert plain.lookup(0x8000001F) == (0, 0, 0, 0)
    assert emu.for_vcpu(1)[[e.function for e in emu.entries].index(1)].ebx >> 24 == 1
    assert plain.lookup(1)[2] & (1 << 31)
    for table in (plain, emu):  # no in-kernel LAPIC on these platforms: none advertised
        assert not table.lookup(1)[3] & (1 << 9) and not table.lookup(1)[2] & ((1 << 21) | (1 << 24))
        assert not table.lookup(0x8000_0001)[3] & (1 << 9)
    sev = build_cpuid_table(supported, 1, "sev-es")
    assert sev.lookup(1)[3] & (1 << 9) == supported_leaf_1_edx(supported) & (1 << 9)


@pytest.mark.parametrize("vcpus", [1, 2, 3, 4, 8])
def test_cpuid_topology_is_one_package_of_single_thread_cores(vcpus: int) -> None:
    """Leaves 1, 4 and 0xB agree with --cpus for every vCPU, and KVM takes each vCPU's table."""
    kvm = Kvm()
    table = build_cpuid_table(kvm.get_supported_cpuid(), vcpus, "plain")
    core_bits = (vcpus - 1).bit_length()
    eax, ebx, ecx, edx = table.lookup(1)
    assert (ebx >> 16) & 0xFF == vcpus and bool(edx & (1 << 28)) == (vcpus > 1)  # count, HTT
    for sub in range(8):
        eax4 = table.lookup(4, sub)[0]
        if eax4 & 0x1F:
            assert eax4 >> 26 == (1 << core_bits) - 1
            assert (eax4 >> 14) & 0xFFF == ((1 << core_bits) - 1 if (eax4 >> 5) & 7 >= 3 else 0)
    vm = kvm.create_vm()
    for index in range(vcpus):
        if table.lookup(0xB, 0) != (0, 0, 0, 0):  # KVM offers leaf 0xB: ours, per subleaf
            smt, core, end = (table.vcpu_lookup(index, 0xB, sub) for sub in range(3))
            assert smt[1:3] == (1, 1 << 8) and smt[3] == index
            assert core == (core_bits, vcpus, 1 | 2 << 8, index) and end[2] == 2
        vm.create_vcpu(index).set_cpuid2(table.for_vcpu(index))
    vm.close()
    kvm.close()


def test_vcpu_accepts_table(tmp_path) -> None:
    kvm = Kvm()
    table = build_cpuid_table(kvm.get_supported_cpuid(), 1, "sev-es-emu", L.DOORBELL_PORT)
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(table.for_vcpu(0))
    assert isinstance(vcpu.get_regs(), uapi.kvm_regs)
    vm.close()
    kvm.close()


def test_irq_line_needs_and_uses_the_in_kernel_irqchip() -> None:
    from vmmd.kvm import KvmError

    kvm = Kvm()
    vm = kvm.create_vm()
    with pytest.raises(KvmError) as err:
        vm.irq_line(5, 1)
    assert "KVM_IRQ_LINE(5)" in str(err.value) and "no in-kernel irqchip" in str(err.value)
    vm.create_irqchip()
    assert vm.has_irqchip
    vm.irq_line(5, 1)
    vm.irq_line(5, 0)
    vm.close()
    kvm.close()


def test_aps_wait_for_sipi_under_the_in_kernel_irqchip_until_made_runnable() -> None:
    """What SevEsPlatform relies on to start every vCPU of a flat image at its entry (bootinfo.h contract)."""
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    bsp, ap = vm.create_vcpu(0), vm.create_vcpu(1)
    assert bsp.get_mp_state() == uapi.KVM_MP_STATE_RUNNABLE
    assert ap.get_mp_state() == uapi.KVM_MP_STATE_UNINITIALIZED
    ap.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
    assert ap.get_mp_state() == uapi.KVM_MP_STATE_RUNNABLE
    vm.close()
    kvm.close()


@pytest.mark.parametrize("read_only", [True, False])
def test_reset_vector_image_ends_at_4_gib_read_only_unless_the_platform_cannot(tmp_path, read_only: bool) -> None:
    from vmmd.machine.loader import load_reset_vector_firmware
    from vmmd.sev.platform import SevEsEmuPlatform, SevEsPlatform

    image = tmp_path / "flash.bin"
    image.write_bytes(bytes(range(256)) * 32)  # 8 KiB
    memory = GuestMemory.with_ram(16 << 20)
    try:
        loaded = load_reset_vector_firmware(memory, image, read_only=read_only)
        slot = memory.slots[-1]
        assert (slot.gpa, slot.size, slot.read_only) == (0x1_0000_0000 - 8192, 8192, read_only)
        assert loaded.image_gpa == slot.gpa and memory.read(slot.gpa, 256) == bytes(range(256))
    finally:
        memory.close()
    # KVM refuses KVM_MEM_READONLY for SEV-ES VMs (kvm_arch_has_readonly_mem): that platform maps it as RAM
    assert SevEsPlatform.readonly_memory is False and SevEsEmuPlatform.readonly_memory is True


def test_kvm_private_pages_clear_ram_devices_and_the_largest_reset_vector_image() -> None:
    """The identity map and TSS pages KVM_SET_IDENTITY_MAP_ADDR / KVM_SET_TSS_ADDR claim (4 pages) overlap
    nothing a guest has: RAM ends below the PCI hole, the MMIO windows end below, a 16 MiB image starts above."""
    from vmmd.kvm.system import IDENTITY_MAP_GPA, TSS_ADDR_GPA

    kvm_pages = (IDENTITY_MAP_GPA, TSS_ADDR_GPA + 3 * 4096)
    assert kvm_pages[0] + 4096 == TSS_ADDR_GPA
    assert PCI_HOLE_START_GPA <= L.MMIO_TESTDEV_GPA < L.VIRTIO_NET_MMIO_GPA + L.VIRTIO_MMIO_SIZE <= kvm_pages[0]
    assert kvm_pages[1] <= FOUR_GIB_GPA - (16 << 20)
