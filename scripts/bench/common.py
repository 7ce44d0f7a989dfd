"""Shared helpers of the exit and VMGEXIT benchmarks (scripts/bench/exits.py, scripts/bench/vmgexit.py).

Owns: building the C baselines and tiny bench guests into a temp dir (scripts/bench/c/), running a vmmd
guest in-process through the full Machine (vmmd.machine.machine.Machine: build, vCPU thread, run loop,
devices), rates measured by the difference of two loop counts (start-up and tear-down cancel out), and
the one-line JSON summary every benchmark ends with.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_C = REPO / "scripts" / "bench" / "c"
FIRMWARE = REPO / "firmware" / "build"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class BenchError(RuntimeError):
    """A benchmark prerequisite is missing or a guest did not end as expected."""


def firmware(name: str) -> Path:
    path = FIRMWARE / f"{name}.bin"
    if not path.exists():
        raise BenchError(f"{path} is missing: build the guests with `make -C firmware`")
    return path


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BenchError("no C compiler (cc/gcc) on PATH")
    return cc


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BenchError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")


def build_c_program(tmp: Path, source: str, name: str) -> Path:
    """cc -O2 scripts/bench/c/SOURCE (with firmware/include on the include path) -> TMP/NAME."""
    out = tmp / name
    _run([compiler(), "-O2", "-Wall", "-Wextra", "-I", str(REPO / "firmware" / "include"), "-o", str(out),
          str(BENCH_C / source)])
    return out


def build_flat_image(tmp: Path, source: str, name: str, text_gpa: int, defines: dict[str, object]) -> Path:
    """Assemble scripts/bench/c/SOURCE (.S, through cpp) and link it at TEXT_GPA into a flat binary TMP/NAME."""
    obj, elf, out = tmp / f"{name}.o", tmp / f"{name}.elf", tmp / name
    flags = [f"-D{key}={value}" for key, value in defines.items()]
    _run([compiler(), "-c", *flags, "-o", str(obj), str(BENCH_C / source)])
    _run([os.environ.get("LD", "ld"), "-Ttext", hex(text_gpa), "--build-id=none", "-o", str(elf), str(obj)])
    _run([os.environ.get("OBJCOPY", "objcopy"), "-O", "binary", "-j", ".text", str(elf), str(out)])
    return out


def port_loop_guest(tmp: Path) -> Path:
    """scripts/bench/c/port-loop.S as a vmmd flat guest; guest_arg = (port << 32) | count."""
    from vmmd.machine import bootinfo as bi
    from vmmd.machine import layout as L

    return build_flat_image(tmp, "port-loop.S", "port-loop.bin", L.FIRMWARE_LOAD_GPA,
                            {"BI_GUEST_ARG": bi.vmmd_bootinfo.guest_arg.offset,
                             "BI_DEBUG_EXIT_PORT": bi.vmmd_bootinfo.debug_exit_port.offset})


@dataclass
class GuestRun:
    seconds: float  # Machine.run(): vCPU thread start to the VM stop
    kind: str
    status: int | None
    unmapped_port_writes: int
    stats: dict


def run_vmmd_guest(path: Path, guest_arg: int, platform: str = "plain", memory: int = 64 << 20,
                   timeout: float = 60.0, on_machine: Callable[[object], None] | None = None,
                   net: str | None = None, eventfds: bool = True) -> GuestRun:
    """Build and run one guest in this process through the full vmmd Machine; the guest must end cleanly."""
    from vmmd.devices.console import Console
    from vmmd.machine.config import MachineConfig
    from vmmd.machine.machine import Machine
    from vmmd.platforms import select_platform

    console = Console(None, capture=4096)
    chosen, _ = select_platform(platform)
    config = MachineConfig(firmware=path, memory_bytes=memory, cpus=1, platform=platform, timeout=timeout,
                           guest_arg=guest_arg, net=net, eventfds=eventfds, name=f"bench-{os.getpid()}")
    machine = Machine(config, chosen, console.write).build()
    try:
        if on_machine is not None:
            on_machine(machine)
        result = machine.run()
        stats = {}
        service = getattr(chosen, "service", None)
        if service is not None:
            stats["last_error"] = service.last_error[0]
    finally:
        console.flush()
        machine.close()
    if result.kind != "debug-exit" or result.status != 1:
        raise BenchError(f"{path.name} (guest_arg {guest_arg:#x}, {platform}) ended with {result.kind}: "
                         f"{result.reason}; console: {console.captured()[-300:]!r}")
    return GuestRun(result.seconds, result.kind, result.status, result.details.get("unmapped_port_writes", 0), stats)


@dataclass
class Rate:
    """Operations per second from the best (lowest) time of two loop counts, by difference."""

    ops: int  # n_high - n_low
    seconds: float  # best(t_high) - best(t_low)
    low: float
    high: float

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else float("inf")

    @property
    def us_per_op(self) -> float:
        return self.seconds / self.ops * 1e6


def rate_by_difference(timed: Callable[[int], float], n_low: int, n_high: int, repeat: int) -> Rate:
    """Run `timed(n)` for both counts `repeat` times, interleaved; the difference of the best times."""
    best_low = best_high = float("inf")
    for _ in range(repeat):
        best_low = min(best_low, timed(n_low))
        best_high = min(best_high, timed(n_high))
    return Rate(n_high - n_low, best_high - best_low, best_low, best_high)


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


QEMU_DEBUG_EXIT_PORT = 0xF4  # isa-debug-exit,iobase=0xf4: a write of V ends QEMU with status (V << 1) | 1


def qemu_bios_image(tmp: Path, count: int, console_byte: str | None = None) -> Path:
    """scripts/bench/c/qemu-bios.S as a 64 KiB QEMU `-bios` image: optional CONSOLE_BYTE to COM1, COUNT `outb`
    to port 0x80, then 0 to isa-debug-exit at QEMU_DEBUG_EXIT_PORT (QEMU exits with status 1)."""
    defines: dict[str, object] = {"COUNT": count, "DEBUG_EXIT_PORT": hex(QEMU_DEBUG_EXIT_PORT)}
    name = f"qemu-bios-{count}.bin"
    if console_byte is not None:
        defines["CONSOLE_BYTE"] = f"'{console_byte}'"
        name = f"qemu-bios-console-{count}.bin"
    return build_flat_image(tmp, "qemu-bios.S", name, 0, defines)


def vmctl_cmd() -> tuple[list[str], str]:
    """The console script a user runs: the one installed beside this interpreter (the .venv), else on PATH."""
    beside = Path(sys.executable).parent / "vmctl"
    installed = str(beside) if beside.exists() else shutil.which("vmctl")
    if installed:
        return [installed], "vmctl"
    return [sys.executable, "-m", "vmmd.cli"], "python -m vmmd.cli"


def time_process(cmd: list[str], expect_rc: int | None = None, cwd: Path | None = None) -> float:
    """Wall seconds of one run of CMD (stdin from /dev/null, output discarded)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          cwd=cwd)
    elapsed = time.perf_counter() - start
    if expect_rc is not None and proc.returncode != expect_rc:
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode} (expected {expect_rc}): "
                         f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    return elapsed


def first_byte_latency(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> tuple[float, float]:
    """(seconds from spawn to the first byte on stdout, seconds to process exit) of one cold run of CMD."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=cwd, env=env)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - start
    rest, err = proc.communicate()
    t_exit = time.perf_counter() - start
    if not first:
        raise BenchError(f"{' '.join(cmd)} printed nothing (rc {proc.returncode}): "
                         f"{err.decode(errors='replace').strip()[-500:]}")
    return t_first, t_exit


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit_json(figures: dict) -> None:
    """The last line of every benchmark: one JSON object with its figures."""
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=False), flush=True)


EXIT_GOAL_MISSED = 1  # a benchmark ran and at least one of its goals was missed
EXIT_NOT_RUN = 2  # a benchmark could not measure (a prerequisite is missing, a guest misbehaved)


def finish(figures: dict, goals: dict[str, bool | None]) -> int:
    """Emit the JSON line with `goals_met` (goal name -> met; None: not measured in this run) and
    `goals_missed` (their names), and return the exit status: 0 when no measured goal was missed, else
    EXIT_GOAL_MISSED, so `make bench`, CI and people notice a miss without reading the figures."""
    missed = [name for name, met in goals.items() if met is False]
    figures["goals_met"] = goals
    figures["goals_missed"] = missed
    emit_json(figures)
    if missed:
        print(f"{figures.get('bench', 'benchmark')}: goal missed: {', '.join(missed)}", file=sys.stderr)
    return EXIT_GOAL_MISSED if missed else 0
