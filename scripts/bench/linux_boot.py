#!/usr/bin/env python3
"""Direct Linux boot: Debian's cloud kernel under vmmd and under QEMU, one after the other in the same run.

Both boot the same bzImage, initramfs and command line (tests/linux_guest.py: the options that let a kernel
get as far as this host's instruction emulator allows), with the same RAM and vCPUs:
  - vmmd:  vmctl run --kernel K --initrd I --append S -m 256M -c 2 -p plain
  - QEMU:  qemu-system-x86_64 -accel kvm -machine pc -m 256M -smp 2 -kernel K -initrd I -append S, so SeaBIOS
           and its linuxboot option ROM run first, as they do for every QEMU -kernel boot.
Each console line is time-stamped as it arrives (seconds from the process start); the milestones are the
early lines both reach (tests/linux_guest.MILESTONES). On this host the kernel then stops where KVM's emulator
gives up: vmmd ends the VM itself (exit 4); QEMU reports "KVM internal error" and stays paused, so it is
killed then.

`ratio` = vmmd's time / QEMU's time to the last milestone both reached. Goals: ratio <= 1.0 (a direct boot runs
no BIOS), and vmmd reaches every milestone QEMU reaches. Last line of output: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXIT_NOT_RUN, REPO, finish, qemu_binary  # noqa: E402

from tests.linux_guest import HOST_EMULATOR_APPEND, INITRAMFS, MILESTONES, VMLINUZ, missing  # noqa: E402

MEMORY = "256M"
CPUS = 2
GIVE_UP_SECONDS = 480
KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")  # printk's timestamp


def timed_console(cmd: list[str], stop_on: str | None, limit: float) -> tuple[dict[str, float], str, float, int]:
    """Run `cmd`, time-stamping each console line; returns (milestone -> seconds, last kernel line, total
    seconds, exit status or -signal). Stops the process once `stop_on` appears in its output (QEMU's
    internal-error report), or after `limit` seconds."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    reached: dict[str, float] = {}
    last = ""
    buffer = b""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            remaining = limit - (time.monotonic() - start)
            if remaining <= 0:
                break
            if not selector.select(min(remaining, 1.0)):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            now = time.monotonic() - start
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip("\r")
                if KERNEL_LINE.match(line):  # the kernel's own lines, not the VMMs' reports after them
                    last = line
                for name, text in MILESTONES:
                    if name not in reached and text in line:
                        reached[name] = round(now, 3)
                if stop_on is not None and stop_on in line:
                    raise StopIteration
    except StopIteration:
        pass
    finally:
        total = time.monotonic() - start
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        selector.close()
    return reached, last, round(total, 3), proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=GIVE_UP_SECONDS, help="seconds to give each VMM")
    args = parser.parse_args()
    reason = missing()
    qemu = qemu_binary()
    if reason or qemu is None:
        print(reason or "qemu-system-x86_64 is missing: make bench-deps installs it", file=sys.stderr)
        return EXIT_NOT_RUN
    vmmd_cmd = [sys.executable, "-m", "vmmd.cli", "run", "--kernel", str(VMLINUZ), "--initrd", str(INITRAMFS),
                "--append", HOST_EMULATOR_APPEND, "-m", MEMORY, "-c", str(CPUS), "-p", "plain",
                "-t", str(args.limit)]
    qemu_cmd = [qemu, "-accel", "kvm", "-machine", "pc", "-m", MEMORY, "-smp", str(CPUS), "-nodefaults",
                "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(VMLINUZ),
                "-initrd", str(INITRAMFS), "-append", HOST_EMULATOR_APPEND]
    print(f"vmmd: {' '.join(vmmd_cmd[1:])}", file=sys.stderr)
    vmmd_reached, vmmd_last, vmmd_total, vmmd_status = timed_console(vmmd_cmd, None, args.limit + 30)
    print(f"  reached {vmmd_reached}\n  last line: {vmmd_last}", file=sys.stderr)
    print(f"qemu: {' '.join(qemu_cmd)}", file=sys.stderr)
    qemu_reached, qemu_last, qemu_total, qemu_status = timed_console(qemu_cmd, "KVM internal error", args.limit)
    print(f"  reached {qemu_reached}\n  last line: {qemu_last}", file=sys.stderr)

    common = [name for name, _text in MILESTONES if name in vmmd_reached and name in qemu_reached]
    last_common = common[-1] if common else None
    ratio = round(vmmd_reached[last_common] / qemu_reached[last_common], 3) if last_common else None
    figures = {
        "bench": "linux_boot", "kernel": (VMLINUZ.parent / "version").read_text().strip(),
        "memory": MEMORY, "cpus": CPUS,
        "vmmd_seconds": vmmd_reached, "qemu_seconds": qemu_reached,
        "vmmd_last_line": vmmd_last, "qemu_last_line": qemu_last,
        "vmmd_total_seconds": vmmd_total, "vmmd_exit_status": vmmd_status, "qemu_total_seconds": qemu_total,
        "last_common_milestone": last_common, "ratio": ratio,
        "milestone_ratios": {name: round(vmmd_reached[name] / qemu_reached[name], 3) for name in common},
    }
    goals = {"ratio <= 1.0": None if ratio is None else ratio <= 1.0,
             "vmmd reaches every milestone QEMU reaches": all(name in vmmd_reached for name in qemu_reached)}
    return finish(figures, goals)


if __name__ == "__main__":
    sys.exit(main())
