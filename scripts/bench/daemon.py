#!/usr/bin/env python3
"""vmmd daemon start latency and memory next to QEMU's, measured in the same run.

1. QEMU reference: a tiny BIOS image built here with as/ld (nothing downloaded) that prints one byte to
   the 16550 at 0x3f8 and exits through isa-debug-exit (port 0x501, as vmmd's layout); run with
   `qemu-system-x86_64 -accel kvm -machine q35 -m 64 -nodefaults -display none -serial stdio -bios IMG`.
   Cold start = process spawn -> first console byte on the pipe (median of --repeat). A second image
   prints and then spins, for QEMU's RSS while the guest runs.
2. vmmd: the daemon on a temporary socket (warm pool of --pool pre-forked workers). With it running:
   a) one start: protocol client `start` (attach) -> first console byte, median of --repeat;
   b) the same through a fresh `vmctl start --attach` process (includes Python start-up);
   c) 16 guests started at once, each watched for its first byte: time until the last one's first byte;
   d) RSS (and PSS) of the daemon, the zygote and each of 16 workers running a spinning 64 MiB guest,
      next to QEMU's RSS for the spinning 64 MiB tiny guest.
Goals: (a) <= 0.25x QEMU cold start; worker RSS <= QEMU RSS. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vmmd.daemon.protocol import Client, DaemonError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import finish  # noqa: E402

BIOS_ASM = """
    .code16
    .globl _start
_start:
    cli
    mov $0x3f8, %dx
    mov $'Q', %al
    out %al, %dx
    mov $'\\n', %al
    out %al, %dx
{tail}
"""
EXIT_TAIL = """    mov $0x501, %dx
    xor %al, %al
    out %al, %dx
1:  hlt
    jmp 1b
"""
SPIN_TAIL = """1:  jmp 1b
"""
BIOS_SIZE = 64 * 1024


def build_bios(workdir: Path, name: str, tail: str) -> Path:
    """A 64 KiB BIOS image: code at F000:0000, a far jump to it at the reset vector F000:FFF0."""
    asm = workdir / f"{name}.S"
    asm.write_text(BIOS_ASM.replace("{tail}", tail))
    obj, raw = workdir / f"{name}.o", workdir / f"{name}.raw"
    subprocess.run(["as", "--32", "-o", str(obj), str(asm)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0", "--oformat", "binary", "-o", str(raw), str(obj)],
                   check=True)
    code = raw.read_bytes()
    image = bytearray(b"\xf4" * BIOS_SIZE)
    image[:len(code)] = code
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"  # ljmp $0xf000, $0x0000 (16-bit far jump)
    out = workdir / f"{name}.bin"
    out.write_bytes(bytes(image))
    return out


def qemu_cmd(bios: Path) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "kvm", "-machine", "q35", "-m", "64", "-nodefaults", "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
            "-bios", str(bios)]


def qemu_cold_start(bios: Path) -> tuple[float, float, int]:
    """(spawn -> first console byte, spawn -> exit, exit status)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(qemu_cmd(bios), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    first = proc.stdout.read(1)
    t1 = time.perf_counter()
    if not first:
        raise RuntimeError("QEMU printed nothing")
    proc.stdout.read()
    status = proc.wait(30)
    return t1 - t0, time.perf_counter() - t0, status


def rss_kib(pid: int) -> tuple[int, int | None]:
    """(VmRSS, Pss) in KiB from /proc."""
    rss = pss = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def qemu_running_rss(bios: Path) -> tuple[int, int | None]:
    proc = subprocess.Popen(qemu_cmd(bios), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        proc.stdout.read(1)
        time.sleep(0.5)
        return rss_kib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def start_and_first_byte(sock: str, name: str) -> tuple[float, Client]:
    client = Client(sock, 30)
    t0 = time.perf_counter()
    client.send({"op": "start", "name": name, "attach": True})
    reply = client.read_reply()
    if not reply.get("ok"):
        raise DaemonError(reply.get("errno", "EIO"), reply.get("error", ""))
    if not client.take_buffered():
        if not client.sock.recv(1):
            raise RuntimeError(f"guest {name} ended without console output")
    return time.perf_counter() - t0, client


def drain(client: Client) -> None:
    while client.sock.recv(65536):
        pass
    client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--guests", type=int, default=16)
    parser.add_argument("--pool", type=int, default=16, help="vmmd --pool (idle warm workers)")
    args = parser.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86 (make bench-deps)", file=sys.stderr)
        return 1
    hello = REPO / "firmware" / "build" / "hello.bin"
    spin = REPO / "firmware" / "build" / "spin.bin"
    if not hello.exists():
        print("build the firmware first: make -C firmware", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="vmmd-bench-"))
    daemon = None
    try:
        # --- QEMU reference ---------------------------------------------------------------------------
        bios_exit = build_bios(work, "tiny-exit", EXIT_TAIL)
        bios_spin = build_bios(work, "tiny-spin", SPIN_TAIL)
        qemu_cold_start(bios_exit)  # page cache warm-up, not counted
        runs = [qemu_cold_start(bios_exit) for _ in range(args.repeat)]
        qemu_first = statistics.median(r[0] for r in runs)
        qemu_total = statistics.median(r[1] for r in runs)
        qemu_status = runs[-1][2]
        qemu_rss, qemu_pss = qemu_running_rss(bios_spin)
        version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
        print(version.splitlines()[0])
        print(f"QEMU tiny guest: cold start -> first console byte {qemu_first * 1e3:.1f} ms (median of "
              f"{args.repeat}), -> exit {qemu_total * 1e3:.1f} ms (exit status {qemu_status}); "
              f"RSS while running {qemu_rss} KiB (PSS {qemu_pss} KiB)")

        # --- vmmd daemon --------------------------------------------------------------------------------
        defs = work / "vms"
        defs.mkdir()
        for i in range(args.guests):
            (defs / f"h{i}.toml").write_text(f'firmware = "{hello}"\nmemory = "64M"\nplatform = "sev-es-emu"\n'
                                             'timeout = 30\n')
            (defs / f"s{i}.toml").write_text(f'firmware = "{spin}"\nmemory = "64M"\nplatform = "sev-es-emu"\n')
        sock = str(work / "vmmd.sock")
        daemon = subprocess.Popen([sys.executable, "-m", "vmmd.daemon.server", "--socket", sock, "--definitions",
                                   str(defs), "--state-dir", str(work / "state"), "--log-dir", str(work / "log"),
                                   "--pool", str(args.pool)], cwd=REPO, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(sock, 2) as c:
                    zygote = c.request("ping")["zygote"]
                break
            except DaemonError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("vmmd did not come up") from None
                time.sleep(0.05)
        time.sleep(1.5)  # let the pool fill

        single = []
        for _ in range(args.repeat):
            seconds, client = start_and_first_byte(sock, "h0")
            drain(client)
            single.append(seconds)
            time.sleep(0.3)  # the pool refills
        one = statistics.median(single)
        print(f"vmmd: start request -> first console byte {one * 1e3:.1f} ms (median of {args.repeat}; "
              f"min {min(single) * 1e3:.1f}, max {max(single) * 1e3:.1f})")

        cli = []
        env = dict(os.environ, VMMD_SOCKET=sock)
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "vmmd.cli", "start", "h0", "--attach"], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            proc.stdout.read(1)
            cli.append(time.perf_counter() - t0)
            proc.stdout.read()
            proc.wait(30)
            time.sleep(0.3)
        one_cli = statistics.median(cli)
        print(f"vmmd: fresh `vmctl start --attach` process -> first console byte {one_cli * 1e3:.1f} ms "
              f"(median of {args.repeat}; includes Python start-up)")

        time.sleep(1.0)
        results: dict[str, float] = {}
        clients: list[Client] = []
        t0 = time.perf_counter()

        def one_start(name: str) -> None:
            seconds, client = start_and_first_byte(sock, name)
            results[name] = seconds
            clients.append(client)

        threads = [threading.Thread(target=one_start, args=(f"h{i}",)) for i in range(args.guests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        all16 = time.perf_counter() - t0
        for client in clients:
            drain(client)
        if len(results) != args.guests:
            raise RuntimeError(f"only {len(results)} of {args.guests} guests printed")
        print(f"vmmd: {args.guests} guests started at once -> every first console byte seen: {all16 * 1e3:.1f} ms "
              f"(per guest median {statistics.median(results.values()) * 1e3:.1f} ms, "
              f"max {max(results.values()) * 1e3:.1f} ms)")

        time.sleep(1.0)
        spinning = []
        for i in range(args.guests):
            seconds, client = start_and_first_byte(sock, f"s{i}")
            spinning.append(client)
        time.sleep(0.5)
        with Client(sock) as c:
            pids = [c.request("show", name=f"s{i}")["guest"]["pid"] for i in range(args.guests)]
        workers = [rss_kib(pid) for pid in pids]
        daemon_rss = rss_kib(daemon.pid)
        zygote_rss = rss_kib(zygote)
        with Client(sock) as c:
            for i in range(args.guests):
                c.request("stop", name=f"s{i}", force=True)
        for client in spinning:
            drain(client)
        worker_rss = [w[0] for w in workers]
        worker_pss = [w[1] for w in workers if w[1] is not None]
        print(f"vmmd memory: daemon RSS {daemon_rss[0]} KiB (PSS {daemon_rss[1]}), zygote RSS {zygote_rss[0]} KiB; "
              f"workers (64 MiB spinning guests) RSS KiB: {worker_rss}")
        print(f"             worker RSS median {statistics.median(worker_rss)} KiB, max {max(worker_rss)} KiB; "
              f"PSS median {statistics.median(worker_pss) if worker_pss else None} KiB; QEMU RSS {qemu_rss} KiB")

        figures = {
            "qemu_cold_first_byte_ms": round(qemu_first * 1e3, 2),
            "qemu_cold_exit_ms": round(qemu_total * 1e3, 2),
            "qemu_rss_kib": qemu_rss, "qemu_pss_kib": qemu_pss,
            "vmmd_start_first_byte_ms": round(one * 1e3, 2),
            "vmmd_cli_start_first_byte_ms": round(one_cli * 1e3, 2),
            f"vmmd_{args.guests}_guests_all_first_bytes_ms": round(all16 * 1e3, 2),
            "vmmd_daemon_rss_kib": daemon_rss[0], "vmmd_daemon_pss_kib": daemon_rss[1],
            "vmmd_zygote_rss_kib": zygote_rss[0],
            "vmmd_worker_rss_kib": worker_rss, "vmmd_worker_pss_kib": worker_pss,
            "vmmd_worker_rss_median_kib": statistics.median(worker_rss),
            "ratio_start_vs_qemu": round(one / qemu_first, 3),
            "ratio_cli_start_vs_qemu": round(one_cli / qemu_first, 3),
            "ratio_worker_rss_vs_qemu": round(max(worker_rss) / qemu_rss, 3),
            "ratio_worker_pss_vs_qemu": round(max(worker_pss) / qemu_pss, 3) if worker_pss and qemu_pss else None,
            "pool": args.pool, "repeat": args.repeat,
        }
        return finish(figures, {"start_le_0.25_qemu": one / qemu_first <= 0.25,
                                "worker_rss_le_qemu": max(worker_rss) <= qemu_rss})
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
