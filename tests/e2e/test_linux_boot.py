"""Debian's cloud kernel booted directly by `vmctl run --kernel --initrd --append`, checked from the kernel's own
console output: it saw the e820 map, memory size, command line, initrd range and CPU count vmmd gave it. On hosts
whose KVM emulates guest kernel code (vmmd.kvm.probe) the kernel then stops where the emulator gives up
(tests/linux_guest.py), and the run must end with vmmd's one-line internal-error stop (exit 4), no traceback;
where guest code runs natively it must reach userspace and power off (exit 0).
The suite's one slow test (~2.5 minutes)."""

from __future__ import annotations

import ctypes
import re

import pytest

from tests.e2e.conftest import vmctl
from tests.linux_guest import HOST_EMULATOR_APPEND, INITRAMFS, MILESTONES, VMLINUZ, guest_code_emulated, missing
from vmmd.errors import ExitCode
from vmmd.machine import bootparam as bp

MEMORY_MIB = 256
CPUS = 2



EMULATED = guest_code_emulated()  # vmctl host's "guest code" line: how far a kernel can get here


@pytest.mark.timeout(600)
def test_debian_kernel_sees_the_machine_vmmd_built() -> None:
    if missing():
        pytest.fail(missing())
    r = vmctl("run", "--kernel", str(VMLINUZ), "--initrd", str(INITRAMFS), "--append", HOST_EMULATOR_APPEND,
              "-m", f"{MEMORY_MIB}M", "-c", str(CPUS), "-p", "plain", "-t", "540", timeout=580)
    console = r.stdout
    assert "Traceback" not in r.stderr + console
    for _name, text in MILESTONES:
        assert text in console, f"the kernel never printed {text!r}; console ends:\n{console[-3000:]}\n{r.stderr}"
    assert "Linux version 6." in console

    # the e820 map vmmd built (vmmd.machine.linux.build_e820), as the kernel prints it
    top = MEMORY_MIB << 20
    assert "BIOS-e820: [mem 0x0000000000000000-0x000000000009bfff] usable" in console
    assert "BIOS-e820: [mem 0x000000000009c000-0x000000000009ffff] reserved" in console
    assert f"BIOS-e820: [mem 0x0000000000100000-0x{top - 1:016x}] usable" in console
    assert len(re.findall(r"BIOS-e820: \[mem", console)) == 3

    # memory: what the kernel counts is RAM less the first page and the legacy 640K-1M hole
    total_kib = int(re.search(r"Memory: \d+K/(\d+)K available", console).group(1))
    assert (MEMORY_MIB << 10) - 1024 <= total_kib <= MEMORY_MIB << 10

    # the command line arrives whole
    assert f"Kernel command line: {HOST_EMULATOR_APPEND}" in console

    # the initrd where boot.rst's rules put it: page-aligned at the top of RAM below initrd_addr_max
    header = bp.setup_header.from_buffer_copy(VMLINUZ.read_bytes()[bp.SETUP_HEADER_OFFSET:][:ctypes.sizeof(
        bp.setup_header)])
    size = INITRAMFS.stat().st_size
    start = (min(header.initrd_addr_max + 1, top) - size) & ~0xFFF
    end = (start + size + 0xFFF) & ~0xFFF  # arch/x86/kernel/setup.c reserve_initrd(): PAGE_ALIGN(image + size)
    assert f"RAMDISK: [mem 0x{start:08x}-0x{end - 1:08x}]" in console, re.findall(r"RAMDISK.*", console)

    # the CPU count, from vmmd's ACPI MADT
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in console
    assert f"smpboot: Allowing {CPUS} CPUs, 0 hotplug CPUs" in console

    ends = [line for line in r.stderr.splitlines() if line.startswith("vmctl: guest ended")]
    assert len(ends) == 1, r.stderr
    if EMULATED:  # where the emulator gives up, vmmd ends the VM with one line
        assert r.returncode == ExitCode.GUEST_CRASH, r.stderr
        assert "(internal-error, exit code 4): KVM internal error" in ends[0], r.stderr
    else:  # a host that runs guest code natively: the initramfs reaches userspace and powers off
        assert f"vmmd-linux-guest: userspace reached: {CPUS} CPUs" in console
        assert r.returncode == ExitCode.SUCCESS and "(poweroff, exit code 0)" in ends[0], r.stderr
