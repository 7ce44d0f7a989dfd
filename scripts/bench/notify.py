#!/usr/bin/env python3
"""virtio queue notify round trips: the ioeventfd fast path vs the exit path, next to the C VMM's exit round trip.

firmware/build/net-tx.bin makes one 64-byte frame available on virtio-net's TX queue, writes QueueNotify once and
polls the used ring until the device has taken it, guest_arg times (one frame per notify; eight guest instructions
a round trip, descriptors and avail slots written once). vmmd runs it in this process
through the whole Machine with a tap (in the root network namespace; the frames go nowhere), on plain and
sev-es-emu, with `eventfds` on (the QueueNotify write is a KVM ioeventfd that wakes virtio-net's I/O thread
directly; on sev-es-emu the GHCB MMIO event still reaches vmmd, which signals the same eventfd) and off (every
notify exits to the run loop, which wakes the I/O thread). The per-notify time is the difference of two loop
counts (start-up and tear-down cancel out), best of --repeat. Reference: scripts/bench/c/minivmm.c's port-I/O
exit round trip (firmware/build/exit-loop.bin), the C VMM's exit path, same run.

Goals (plain): fast-path round trip >= 1.5x faster than the exit path's, and shorter than the C VMM's exit round
trip. The C figure is a bare port write with no device behind it; a notify round trip, on either path, also
includes the device's pass (a thread wake-up, the Python TX pass, the tap write) and the guest's own loop (on hosts
whose KVM emulates guest kernel code, ~1 us an instruction: `guest_code_emulated` in the JSON). `*_io_path` says
which path each run took (with /dev/vhost-net the fast path is vhost-net's kernel worker). Needs root (a tap).
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    EXIT_NOT_RUN,
    BenchError,
    build_c_program,
    finish,
    firmware,
    rate_by_difference,
    run_vmmd_guest,
)

SPEEDUP_GOAL = 1.5


def notify_loop(guest: Path, platform: str, eventfds: bool, io_paths: set[str]):
    def timed(n: int) -> float:
        return run_vmmd_guest(guest, n, platform, net="tap", eventfds=eventfds,
                              on_machine=lambda machine: io_paths.add(machine.io_paths()["virtio-net"])).seconds
    return timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=1000, help="notifies in the short run")
    parser.add_argument("--high", type=int, default=6000, help="notifies in the long run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per count (best is kept)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("notify.py needs root (it creates a tap)", file=sys.stderr)
        return EXIT_NOT_RUN
    from tests.linux_guest import guest_code_emulated

    guest = firmware("net-tx")
    figures: dict = {"bench": "notify", "low": args.low, "high": args.high, "repeat": args.repeat,
                     "guest_code_emulated": guest_code_emulated() is not None}
    with tempfile.TemporaryDirectory(prefix="vmmd-bench-") as tmpdir:
        from exits import c_loop

        minivmm = build_c_program(Path(tmpdir), "minivmm.c", "minivmm")
        c = rate_by_difference(c_loop(minivmm, firmware("exit-loop"), lambda n: n, "unmapped_port_writes"),
                               10_000, 60_000, args.repeat)
        figures["c_exit_us"] = round(c.us_per_op, 3)
        print(f"  minimal C VMM port-I/O exit round trip: {c.us_per_op:8.2f} us")
        for platform in ("plain", "sev-es-emu"):
            for path, eventfds in (("fast", True), ("exit", False)):
                io_paths: set[str] = set()
                rate = rate_by_difference(notify_loop(guest, platform, eventfds, io_paths), args.low, args.high,
                                          args.repeat)
                figures[f"{platform}_{path}_us_per_notify"] = round(rate.us_per_op, 3)
                figures[f"{platform}_{path}_io_path"] = " / ".join(sorted(io_paths))
                print(f"  {platform:<10} {path + ' path':<10} notify round trip: {rate.us_per_op:8.2f} us")
            figures[f"{platform}_speedup"] = round(figures[f"{platform}_exit_us_per_notify"]
                                                   / figures[f"{platform}_fast_us_per_notify"], 3)
    speedup = figures["plain_speedup"]
    print(f"  plain: fast path {speedup:.2f}x faster than the exit path (goal >= {SPEEDUP_GOAL}); "
          f"{figures['plain_fast_us_per_notify']:.1f} us vs the C VMM's exit {figures['c_exit_us']:.1f} us")
    return finish(figures, {"fast path >= 1.5x faster than the exit path": speedup >= SPEEDUP_GOAL,
                            "fast path faster than the C VMM's exit path":
                                figures["plain_fast_us_per_notify"] < figures["c_exit_us"]})


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"notify.py: {err}", file=sys.stderr)
        sys.exit(EXIT_NOT_RUN)
