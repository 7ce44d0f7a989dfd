#!/usr/bin/env python3
"""Throughput of vmmd's SEV-ES launch digest next to raw hashlib SHA-256 over the same bytes, same run.

Builds a LaunchPlan with one 64 MiB LAUNCH_UPDATE_DATA region (a numpy view, as guest RAM
is) plus N VMSA pages, then times vmmd.sev.measure.launch_digest(plan) and a bare
hashlib.sha256 fed the same buffers, interleaved, best of --repeat. Goal: ratio >= 0.9.
The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish  # noqa: E402


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vmmd.sev.measure import LaunchPlan, MeasuredRegion, build_vcpu_launches, launch_digest
    from vmmd.sev.ovmf import ap_reset_state, bsp_reset_state

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="region size in MiB")
    parser.add_argument("--vcpus", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    ram = np.random.default_rng(1).integers(0, 256, size=args.mib << 20, dtype=np.uint8)
    sig = 0x00A00F11
    states = [bsp_reset_state(sig)] + [ap_reset_state(0x80B004, sig)] * (args.vcpus - 1)
    plan = LaunchPlan(regions=(MeasuredRegion(gpa=0x100000, data=ram, name="ram"),),
                      vcpus=build_vcpu_launches(states, init2=True, vmsa_features=0),
                      policy=0x5, init2=True, vmsa_features=0, cpu_sig=sig)
    vmsas = [v.vmsa for v in plan.vcpus]
    nbytes = ram.nbytes + sum(len(v) for v in vmsas)

    def raw() -> bytes:
        h = hashlib.sha256()
        h.update(ram)
        for page in vmsas:
            h.update(page)
        return h.digest()

    best = {"vmmd": float("inf"), "hashlib": float("inf")}
    results = {}
    for _ in range(args.repeat):
        for name, fn in (("vmmd", lambda: launch_digest(plan)), ("hashlib", raw)):
            start = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    if results["vmmd"] != results["hashlib"]:
        print("digest mismatch between vmmd and hashlib", file=sys.stderr)
        return 1
    mbps = {name: nbytes / t / 1e6 for name, t in best.items()}
    ratio = mbps["vmmd"] / mbps["hashlib"]
    print(f"bytes hashed:      {nbytes} ({args.mib} MiB region + {args.vcpus} VMSA pages)")
    print(f"vmmd launch_digest: {mbps['vmmd']:.1f} MB/s (best of {args.repeat})")
    print(f"hashlib sha256:     {mbps['hashlib']:.1f} MB/s (best of {args.repeat})")
    print(f"ratio:              {ratio:.3f} (goal >= 0.9)")
    return finish({"bench": "measure", "bytes": nbytes, "vmmd_mb_s": round(mbps["vmmd"], 1),
                   "hashlib_mb_s": round(mbps["hashlib"], 1), "ratio": round(ratio, 3), "goal": 0.9,
                   "repeat": args.repeat, "digest": results["vmmd"].hex()}, {"ratio": ratio >= 0.9})


if __name__ == "__main__":
    sys.exit(main())
