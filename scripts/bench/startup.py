#!/usr/bin/env python3
"""Whole-process cost of one `vmctl run`: plain next to sev-es-emu, and QEMU -machine microvm, same run.

What is measured (docs/benchmarks.md has the method and the latest figures): the wall time from spawn
to exit of a new process, --repeat times each, interleaved (plain, sev-es-emu, QEMU, plain, ...) after
one uncounted warm-up round (page cache, bytecode):
  1. `vmctl run firmware/build/demo.bin -p plain -q` (the `vmctl` console script beside this interpreter,
     else on PATH, else `python -m vmmd.cli`): interpreter start, imports, VM build, the guest, tear-down;
  2. the same with `-p sev-es-emu`: also the VMGEXIT service, the GHCB protocol the demo speaks, and the
     launch digest the emulator predicts;
  3. QEMU `-machine microvm -accel kvm` (when qemu-system-x86_64 is installed: `make bench-deps`) running
     scripts/bench/c/qemu-bios.S, whose first act is a write to isa-debug-exit, i.e. QEMU's cost to start a
     tiny guest and exit. `-cpu qemu64`: with `-cpu host` QEMU 7.2 aborts on these hosts (KVM refuses its
     MSR 0x10a, IA32_ARCH_CAPABILITIES, write), and a guest that runs four instructions cares for no model;
  4. the floor: `python -c pass` with the same interpreter (no vmmd, no click).

Goal: sev-es-emu costs at most 20 ms more than plain per run (medians). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import compileall
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    EXIT_NOT_RUN,
    QEMU_DEBUG_EXIT_PORT,
    REPO,
    BenchError,
    finish,
    firmware,
    median,
    qemu_binary,
    qemu_bios_image,
    time_process,
    vmctl_cmd,
)

EMU_EXTRA_GOAL_MS = 20.0  # sev-es-emu minus plain, medians


def qemu_microvm_cmd(qemu: str, image: Path) -> list[str]:
    return [qemu, "-machine", "microvm", "-accel", "kvm", "-cpu", "qemu64", "-m", "16", "-bios", str(image),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none",
            "-device", f"isa-debug-exit,iobase={QEMU_DEBUG_EXIT_PORT:#x},iosize=4"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="runs of each command (the median is reported)")
    args = parser.parse_args()
    demo = firmware("demo")
    cmd, label = vmctl_cmd()
    # An installed package has bytecode caches (pip and `make deps` compile them); without them every start
    # would compile vmmd from source, which no user sees.
    compileall.compile_dir(str(REPO / "vmmd"), quiet=1)
    qemu = qemu_binary()
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-") as tmpdir:
        commands: dict[str, tuple[list[str], int]] = {
            "plain": ([*cmd, "run", str(demo), "-p", "plain", "-q", "-t", "30"], 0),
            "sev_es_emu": ([*cmd, "run", str(demo), "-p", "sev-es-emu", "-q", "-t", "30"], 0),
            "python_floor": ([sys.executable, "-c", "pass"], 0),
        }
        if qemu:
            commands["qemu_microvm"] = (qemu_microvm_cmd(qemu, qemu_bios_image(Path(tmpdir), 0)), 1)
        else:
            print("QEMU: qemu-system-x86_64 not found (make bench-deps); its figure is skipped")
        times: dict[str, list[float]] = {name: [] for name in commands}
        for round_ in range(args.repeat + 1):
            for name, (argv, rc) in commands.items():
                seconds = time_process(argv, expect_rc=rc, cwd=REPO)
                if round_:  # round 0 warms the page cache and is not counted
                    times[name].append(seconds)
    ms = {name: round(median(values) * 1e3, 1) for name, values in times.items()}
    extra = round(ms["sev_es_emu"] - ms["plain"], 1)
    print(f"whole `{label} run demo.bin -q` process, spawn to exit (median of {args.repeat}):")
    for name, value in ms.items():
        spread = times[name]
        print(f"  {name:<14} {value:7.1f} ms   (min {min(spread) * 1e3:.1f}, max {max(spread) * 1e3:.1f})")
    print(f"  sev-es-emu - plain: {extra:.1f} ms (goal <= {EMU_EXTRA_GOAL_MS:g})")
    figures: dict = {"bench": "startup", "repeat": args.repeat, "vmctl_cmd": label,
                     "plain_ms": ms["plain"], "sev_es_emu_ms": ms["sev_es_emu"],
                     "qemu_microvm_ms": ms.get("qemu_microvm"), "python_floor_ms": ms["python_floor"],
                     "sev_es_emu_minus_plain_ms": extra, "sev_es_emu_minus_plain_goal_ms": EMU_EXTRA_GOAL_MS,
                     "ratio_sev_es_emu_vs_plain": round(ms["sev_es_emu"] / ms["plain"], 3)}
    if "qemu_microvm" in ms:
        figures["ratio_plain_vs_qemu_microvm"] = round(ms["plain"] / ms["qemu_microvm"], 3)
        figures["ratio_sev_es_emu_vs_qemu_microvm"] = round(ms["sev_es_emu"] / ms["qemu_microvm"], 3)
    return finish(figures, {"sev_es_emu_minus_plain_le_20ms": extra <= EMU_EXTRA_GOAL_MS})


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"startup.py: {err}", file=sys.stderr)
        sys.exit(EXIT_NOT_RUN)
