"""The PC pieces a Linux guest needs (the MP table, the ACPI tables, the i8042 and 0xCF9 reset paths, the CMOS
clock, ACPI S5), checked against their specifications' sizes, checksums and register behaviour. The ACPI tables
are also disassembled by ACPICA's iasl, an implementation independent of ours."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from vmmd.devices.acpi_sleep import SLP_EN, AcpiSleep
from vmmd.devices.cmos import Cmos
from vmmd.devices.i8042 import I8042, ResetControl
from vmmd.errors import ExitCode, VmStop
from vmmd.machine import acpi, mptable
from vmmd.machine import layout as L

NET = acpi.MmioDevice(L.VIRTIO_NET_MMIO_GPA, L.VIRTIO_MMIO_SIZE, L.VIRTIO_NET_IRQ)
DISK = acpi.MmioDevice(L.VIRTIO_NET_MMIO_GPA + 0x1000, L.VIRTIO_MMIO_SIZE, L.VIRTIO_NET_IRQ + 1)


# --- MP table (MultiProcessor Specification 1.4, chapter 4) ------------------------------------------------------
@pytest.mark.parametrize("cpus", [1, 2, 16, mptable.MAX_CPUS])
def test_mp_table_sizes_checksums_and_entries(cpus: int) -> None:
    table, pointer = mptable.build_mptable(cpus)
    assert len(pointer) == 16 and pointer[:4] == b"_MP_" and sum(pointer) % 256 == 0
    assert struct.unpack_from("<I", pointer, 4)[0] == mptable.MPTABLE_GPA
    assert pointer[8] == 1 and pointer[9] == 4  # length in 16-byte units, spec revision 1.4
    assert table[:4] == b"PCMP" and sum(table) % 256 == 0
    length, _rev, _sum = struct.unpack_from("<HBB", table, 4)
    entry_count, lapic = struct.unpack_from("<HI", table, 34)
    assert length == len(table) and lapic == mptable.APIC_DEFAULT_PHYS_BASE
    assert mptable.MPTABLE_GPA + len(table) <= mptable.MP_FLOATING_POINTER_GPA
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    offset, seen = 44, []
    while offset < len(table):
        seen.append(table[offset])
        offset += sizes[table[offset]]
    assert offset == len(table) and len(seen) == entry_count
    assert seen.count(0) == cpus and seen.count(2) == 1 and seen.count(3) == 16 and seen.count(4) == 2
    processors = [table[44 + 20 * i:44 + 20 * (i + 1)] for i in range(cpus)]
    assert [p[1] for p in processors] == list(range(cpus))  # APIC ID = vCPU index
    assert [p[3] for p in processors] == [3] + [1] * (cpus - 1)  # enabled; vCPU 0 the BSP


def test_mp_table_refuses_cpu_counts_the_apic_ids_cannot_carry() -> None:
    for cpus in (0, mptable.MAX_CPUS + 1):
        with pytest.raises(ValueError):
            mptable.build_mptable(cpus)


# --- ACPI tables (ACPI 6.5, chapter 5) ----------------------------------------------------------------------------
def _tables(blob: bytes, base: int = acpi.ACPI_GPA) -> dict[bytes, bytes]:
    """The tables the RSDP leads to, by signature, followed the way a kernel does."""
    assert blob[:8] == b"RSD PTR " and sum(blob[:20]) % 256 == 0 and sum(blob[:36]) % 256 == 0
    assert blob[15] == 2 and struct.unpack_from("<I", blob, 20)[0] == 36
    xsdt_at = struct.unpack_from("<Q", blob, 24)[0]

    def table(at: int) -> bytes:
        length = struct.unpack_from("<I", blob, at - base + 4)[0]
        data = blob[at - base:at - base + length]
        assert sum(data) % 256 == 0, f"{data[:4]} checksum"
        return data

    xsdt = table(xsdt_at)
    found = {b"XSDT": xsdt}
    for (at,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = table(at)
        found[t[:4]] = t
    fadt = found[b"FACP"]
    found[b"DSDT"] = table(struct.unpack_from("<Q", fadt, 140)[0])
    assert struct.unpack_from("<I", fadt, 40)[0] == struct.unpack_from("<Q", fadt, 140)[0]
    return found


@pytest.mark.parametrize("cpus", [1, 4, 64])
def test_acpi_tables_checksum_and_link_up(cpus: int) -> None:
    found = _tables(acpi.build_acpi_tables(cpus, [NET]))
    assert set(found) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    madt = found[b"APIC"]
    entries, offset = [], 44
    while offset < len(madt):
        entries.append(madt[offset:offset + madt[offset + 1]])
        offset += madt[offset + 1]
    lapics = [e for e in entries if e[0] == 0]
    assert [(e[2], e[3], struct.unpack_from("<I", e, 4)[0]) for e in lapics] == [(i, i, 1) for i in range(cpus)]
    ioapics = [e for e in entries if e[0] == 1]
    assert len(ioapics) == 1 and struct.unpack_from("<I", ioapics[0], 4)[0] == mptable.IO_APIC_DEFAULT_PHYS_BASE


def test_fadt_is_hardware_reduced_with_the_reset_and_sleep_registers_vmmd_serves() -> None:
    fadt = _tables(acpi.build_acpi_tables(1, []))[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5  # ACPI 6.5 FADT
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & acpi.FADT_HW_REDUCED_ACPI and flags & acpi.FADT_RESET_REG_SUP
    space, width, _off, _size, address = struct.unpack_from("<BBBBQ", fadt, 116)
    assert (space, width, address, fadt[128]) == (1, 8, 0xCF9, 6)  # port 0xCF9, value 6: ResetControl reboots
    assert struct.unpack_from("<BBBBQ", fadt, 244)[4] == L.SLEEP_CONTROL_PORT
    assert struct.unpack_from("<BBBBQ", fadt, 256)[4] == L.SLEEP_CONTROL_PORT + 1


def test_dsdt_names_each_virtio_mmio_device_with_its_window_and_interrupt() -> None:
    dsdt = _tables(acpi.build_acpi_tables(1, [NET, DISK]))[b"DSDT"]
    assert dsdt.count(b"LNRO0005") == 2  # drivers/virtio/virtio_mmio.c's ACPI match
    assert struct.pack("<II", NET.gpa, NET.size) in dsdt and struct.pack("<II", DISK.gpa, DISK.size) in dsdt
    assert b"_S5_" in dsdt


def test_acpi_tables_fit_the_bios_area_at_the_largest_cpu_count() -> None:
    blob = acpi.build_acpi_tables(L.MAX_VCPUS, [NET, DISK])
    assert acpi.ACPI_GPA + len(blob) <= acpi.ACPI_GPA + acpi.ACPI_MAX_BYTES


def test_iasl_disassembles_the_tables_as_we_mean_them(tmp_path: Path) -> None:
    """ACPICA (the kernel's own ACPI interpreter, packaged as acpica-tools) reads each table back."""
    iasl = shutil.which("iasl")
    assert iasl, "iasl (Debian's acpica-tools) is missing: make test installs it"
    found = _tables(acpi.build_acpi_tables(2, [NET]))
    text = {}
    for signature in (b"FACP", b"APIC", b"DSDT"):
        path = tmp_path / f"{signature.decode().lower()}.dat"
        path.write_bytes(found[signature])
        run = subprocess.run([iasl, "-d", str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        text[signature] = path.with_suffix(".dsl").read_text()
    facp = {line.split(":")[0].strip().split("]")[-1].strip(): line.split(":", 1)[1].strip()
            for line in text[b"FACP"].splitlines() if ":" in line and not line.lstrip().startswith(("/*", "*"))}
    assert facp["Hardware Reduced (V5)"] == "1" and facp["Reset Register Supported (V2)"] == "1"
    assert facp["Value to cause reset"] == "06"
    assert "Address : 0000000000000CF9" in text[b"FACP"]
    assert text[b"APIC"].count("Processor Local APIC") == 2 and "I/O APIC" in text[b"APIC"]
    dsl = text[b"DSDT"]
    assert 'Name (_HID, "LNRO0005")' in dsl and "Memory32Fixed (ReadWrite," in dsl
    assert f"0x{NET.gpa:08X}" in dsl and f"0x{NET.irq:08X}" in dsl
    assert "Name (_S5, Package" in dsl


# --- reset: i8042 (reboot=k) and the reset control register (reboot=p; the FADT's reset register) ----------------
def test_i8042_reset_command_ends_the_vm_as_a_reboot() -> None:
    kbc = I8042()
    assert kbc.read(4, 1) & 0x04  # system flag: the self-test passed at power-on
    with pytest.raises(VmStop) as stop:
        kbc.write(4, 1, 0xFE)  # pulse the reset line: Linux's reboot=k (arch/x86/kernel/reboot.c kb_wait + 0xfe)
    assert stop.value.exit_code == ExitCode.GUEST_REBOOT and stop.value.kind == "reboot"


def test_i8042_output_port_with_the_reset_line_low_reboots_and_other_bytes_do_not() -> None:
    kbc = I8042()
    kbc.write(4, 1, 0xD1)  # write output port
    kbc.write(0, 1, 0x03)  # reset line high, A20 on: nothing happens
    kbc.write(4, 1, 0xD0)
    assert kbc.read(4, 1) & 0x01 and kbc.read(0, 1) == 0x03
    kbc.write(4, 1, 0xD1)
    with pytest.raises(VmStop):
        kbc.write(0, 1, 0x02)


def test_i8042_answers_the_probes_a_kernel_makes() -> None:
    kbc = I8042()
    kbc.write(4, 1, 0xAA)  # self-test
    assert kbc.read(4, 1) & 0x01 and kbc.read(0, 1) == 0x55
    assert not kbc.read(4, 1) & 0x01  # read once
    kbc.write(4, 1, 0x20)  # read the command byte
    assert kbc.read(0, 1) == 0x45
    kbc.write(4, 1, 0xF1)  # pulse other lines than reset: no reboot
    kbc.write(0, 1, 0xED)  # a byte for the absent keyboard is dropped
    assert kbc.dropped_device_bytes == 1


def test_reset_control_register_reboots_on_rst_cpu_only() -> None:
    rcr = ResetControl()
    rcr.write(0, 1, 0x02)  # system reset bit without RST_CPU: the first half of reboot=p's sequence
    assert rcr.read(0, 1) == 0x02
    with pytest.raises(VmStop) as stop:
        rcr.write(0, 1, 0x06)
    assert stop.value.exit_code == ExitCode.GUEST_REBOOT


# --- CMOS / RTC ----------------------------------------------------------------------------------------------------
def _cmos_read(cmos: Cmos, index: int) -> int:
    cmos.write(0, 1, index)
    return cmos.read(1, 1)


def test_cmos_reports_the_time_in_bcd_with_update_in_progress_clear() -> None:
    clock = time.struct_time((2026, 12, 4, 19, 45, 37, 4, 338, 0))
    cmos = Cmos(64 << 20, clock=lambda: clock)
    assert [_cmos_read(cmos, i) for i in (0, 2, 4, 7, 8, 9, 0x32)] == [0x37, 0x45, 0x19, 0x04, 0x12, 0x26, 0x20]
    assert not _cmos_read(cmos, 0x0A) & 0x80  # UIP clear: mach_get_cmos_time() would wait for ever otherwise
    assert _cmos_read(cmos, 0x0B) & 0x02 and _cmos_read(cmos, 0x0D) & 0x80
    cmos.write(0, 1, 0x0B)
    cmos.write(1, 1, 0x06)  # binary mode
    assert _cmos_read(cmos, 0) == 37
    cmos.write(0, 1, 0x80 | 0x04)  # bit 7 masks NMI; the index is 4
    assert cmos.read(1, 1) == 19


def test_cmos_memory_sizes_as_a_pc_bios_stores_them() -> None:
    cmos = Cmos(48 << 20, 1 << 30)
    word = lambda i: _cmos_read(cmos, i) | _cmos_read(cmos, i + 1) << 8  # noqa: E731
    assert word(0x15) == 640 and word(0x17) == word(0x30) == (47 << 10)  # KiB above 1 MiB
    assert word(0x34) == (48 - 16) << 4  # 64 KiB units above 16 MiB
    assert _cmos_read(cmos, 0x5B) | _cmos_read(cmos, 0x5C) << 8 | _cmos_read(cmos, 0x5D) << 16 == (1 << 30) >> 16


def test_cmos_extended_memory_saturates_at_what_16_bits_hold() -> None:
    cmos = Cmos(512 << 20)
    assert _cmos_read(cmos, 0x17) == _cmos_read(cmos, 0x18) == 0xFF  # 64 MiB and more: 0xFFFF KiB, as QEMU stores


def test_cmos_status_registers_c_and_d_are_read_only() -> None:
    cmos = Cmos()
    for index in (0x0C, 0x0D):
        before = _cmos_read(cmos, index)
        cmos.write(1, 1, 0x00)
        assert _cmos_read(cmos, index) == before


# --- ACPI S5 -------------------------------------------------------------------------------------------------------
def test_s5_with_slp_en_powers_off_cleanly_and_other_states_are_ignored() -> None:
    sleep = AcpiSleep()
    sleep.write(0, 1, 3 << 2 | SLP_EN)  # S3: not entered
    sleep.write(0, 1, L.SLEEP_TYPE_S5 << 2)  # S5 without SLP_EN: nothing yet
    assert sleep.ignored_requests == 1
    with pytest.raises(VmStop) as stop:
        sleep.write(0, 1, L.SLEEP_TYPE_S5 << 2 | SLP_EN)
    assert stop.value.exit_code == ExitCode.SUCCESS and stop.value.kind == "poweroff"
