"""The Linux guest the Linux-boot test (tests/e2e/test_linux_boot.py) and benchmark (scripts/bench/linux_boot.py)
boot: Debian's cloud kernel and the busybox initramfs `make linux-guest` puts in .cache/linux, and the command
line that lets it get as far as this host's instruction emulator allows.

Guest kernel code on these machines runs through KVM's instruction emulator, which lacks instructions a kernel
executes early (xrstor, cmpxchg16b, clac, popcnt, ...; HOST-LIMITS in the project notes). CPUID masking does not
hide XSAVE there; the kernel's own options do: HOST_EMULATOR_APPEND. With them the kernel reaches "x87 FPU will use
FXSAVE" and stops on its int3 alternatives self-test, under vmmd and QEMU alike.
"""

from __future__ import annotations

from pathlib import Path

LINUX_GUEST = Path(__file__).resolve().parents[1] / ".cache" / "linux"
VMLINUZ = LINUX_GUEST / "vmlinuz"
INITRAMFS = LINUX_GUEST / "initramfs.gz"
HOST_EMULATOR_APPEND = ("earlyprintk=serial console=ttyS0 noxsave nofsgsbase nopcid noinvpcid "
                        "clearcpuid=smap,popcnt,rdpid,rdtscp,rdrand,rdseed,cx16 mitigations=off")

# Console lines both VMMs reach, in order: (name, text the line contains). The benchmark times each.
MILESTONES = [
    ("first line", "Linux version"),
    ("e820 map", "BIOS-provided physical RAM map"),
    ("command line", "Kernel command line:"),
    ("memory", "Memory: "),
    ("SLUB", "SLUB: HWalign"),
    ("RCU", "rcu: Preemptible hierarchical RCU"),
    ("FPU", "x86/fpu: x87 FPU will use FXSAVE"),
]


def guest_code_emulated() -> str | None:
    """vmctl host's "guest code" verdict: None where this host runs guest kernel code natively, else why not."""
    from vmmd.kvm import Kvm
    from vmmd.kvm.probe import guest_code_emulated_reason

    kvm = Kvm()
    try:
        return guest_code_emulated_reason(kvm)
    finally:
        kvm.close()


def missing() -> str | None:
    """Why the Linux guest cannot be booted (None when it can)."""
    for path in (VMLINUZ, INITRAMFS):
        if not path.exists():
            return f"{path} is missing: run `make linux-guest` (make test and make bench do)"
    return None
