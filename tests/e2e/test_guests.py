"""End-to-end: the firmware guests on real KVM through `vmctl run`, on plain and sev-es-emu."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import guest, vmctl
from vmmd.errors import ExitCode

PLATFORMS = ["plain", "sev-es-emu"]
pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_hello_prints_and_ends_cleanly(platform: str) -> None:
    r = vmctl("run", guest("hello"), "-p", platform, "-t", "30")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    assert f"Hello from a vmmd guest (platform: {platform})" in r.stdout
    assert f"platform {platform}" in r.stderr
    assert "guest ended (debug-exit, exit code 0): guest wrote 0x0 to the debug-exit port: success" in r.stderr


def test_demo_on_auto_picks_emulator_here_and_shows_ghcb_facts() -> None:
    r = vmctl("run", guest("demo"), "-t", "30")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    assert "platform sev-es-emu (auto: no SEV-ES here:" in r.stderr
    assert "platform:  sev-es-emu" in r.stdout
    assert re.search(r"GHCB:\s+protocol v2", r.stdout)
    vendor = re.search(r"vendor:\s+(\S+) \(via GHCB CPUID\)", r.stdout)
    assert vendor and vendor.group(1) in ("GenuineIntel", "AuthenticAMD")
    brand = re.search(r"brand:\s+(.+)", r.stdout)
    assert brand and brand.group(1).strip() not in ("", "(empty)")
    assert "encrypts nothing" in r.stdout


def test_demo_on_plain_has_no_ghcb() -> None:
    r = vmctl("run", guest("demo"), "-p", "plain", "-t", "30")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    assert "platform:  plain" in r.stdout
    assert "GHCB" in r.stdout and "no GHCB" in r.stdout


SELFTEST_CHECKS = [
    "msr-protocol sev-info response",
    "msr-protocol cpuid leaf 0 matches ghcb cpuid",
    "ghcb cpuid leaf 0",
    "ghcb cpuid leaf 0xd subleaf 0 with xcr0",
    "ioio out8 then in8 scratch register",
    "ioio out16 unmapped port",
    "ioio out32 unmapped port",
    "ioio in16 unmapped port reads 0xffff",
    "ioio in32 unmapped port reads 0xffffffff",
    "ioio rep outsb to scratch register",
    "ioio rep insb from scratch register",
    "msr write then read pat",
    "msr read of unknown msr injects gp",
    "mmio write then read 1 byte",
    "mmio write then read 2 bytes",
    "mmio write then read 4 bytes",
    "mmio write then read 8 bytes",
    "mmio write then read 16 bytes in 8-byte fragments",
    "nmi complete",
    "ap jump table set then get",
    "hv features",
    "error missing rcx valid bit",
    "error nonzero ghcb usage",
    "error scratch outside shared buffer",
    "error unknown exit code 0x12345",
    "error mmio length past the shared buffer",
    "msr-protocol unknown request 0xfff left as is",
    "ghcb cpuid works after the error paths",
]


@pytest.fixture(scope="module")
def selftest_output() -> str:
    r = vmctl("run", guest("ghcb-selftest"), "-p", "sev-es-emu", "-t", "60")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    return r.stdout


def test_selftest_plan_and_no_failures(selftest_output: str) -> None:
    assert f"1..{len(SELFTEST_CHECKS)}" in selftest_output.splitlines()
    assert "not ok" not in selftest_output
    assert "# done" in selftest_output


@pytest.mark.parametrize("number,description", list(enumerate(SELFTEST_CHECKS, start=1)))
def test_selftest_check(selftest_output: str, number: int, description: str) -> None:
    assert f"ok {number} - {description}" in selftest_output.splitlines()


def test_selftest_skips_on_plain() -> None:
    r = vmctl("run", guest("ghcb-selftest"), "-p", "plain", "-t", "30")
    assert r.returncode == ExitCode.SUCCESS
    assert "1..0 # SKIP no GHCB on plain" in r.stdout


@pytest.mark.parametrize("platform", PLATFORMS)
def test_triple_fault_stops_with_reason_and_register_dump(platform: str) -> None:
    r = vmctl("run", guest("triple-fault"), "-p", platform, "-t", "30")
    assert r.returncode == ExitCode.GUEST_CRASH
    assert "triple-faulted (KVM_EXIT_SHUTDOWN)" in r.stderr
    assert re.search(r"vCPU 0: RIP=0x[0-9a-f]+ RSP=", r.stderr)
    assert "Traceback" not in r.stderr


def test_spinning_guest_is_stopped_by_timeout() -> None:
    r = vmctl("run", guest("spin"), "-p", "sev-es-emu", "-t", "1")
    assert r.returncode == ExitCode.TIMEOUT
    assert "timeout of 1 s reached; VM stopped" in r.stderr


@pytest.mark.parametrize("platform", PLATFORMS)
def test_guest_in_a_port_write_loop_is_stopped_by_timeout(platform: str) -> None:
    """Its outb exits are served inside Vcpu.run() without returning to the run loop: the stop must still land."""
    r = vmctl("run", guest("exit-loop"), "-p", platform, "--guest-arg", str(10**12), "-t", "1")
    assert r.returncode == ExitCode.TIMEOUT, r.stderr
    assert "timeout of 1 s reached; VM stopped" in r.stderr


def test_halting_guest_ends_as_halted() -> None:
    r = vmctl("run", guest("halt"), "-p", "plain", "-t", "30")
    assert r.returncode == ExitCode.GUEST_HALTED
    assert "guest halted" in r.stderr


def test_ghcb_gpa_outside_ram_stops_cleanly() -> None:
    r = vmctl("run", guest("ghcb-garbage"), "-p", "sev-es-emu", "-t", "30")
    assert r.returncode == ExitCode.GUEST_CRASH, r.stderr
    assert "0x7f0000000000" in r.stderr and "not inside guest RAM" in r.stderr
    assert "Traceback" not in r.stderr


def test_msr_protocol_termination_shows_reason() -> None:
    r = vmctl("run", guest("ghcb-terminate"), "-p", "sev-es-emu", "-t", "30")
    assert r.returncode == ExitCode.GUEST_TERMINATED, r.stderr
    assert "sev-term" in r.stderr
    assert re.search(r"set 1", r.stderr) and "0x42" in r.stderr


@pytest.mark.parametrize("platform", PLATFORMS)
def test_mmio_round_trips(platform: str) -> None:
    r = vmctl("run", guest("mmio-poke"), "-p", platform, "-t", "30")
    assert r.returncode == ExitCode.SUCCESS, r.stdout + r.stderr


def test_two_vcpus_run() -> None:
    r = vmctl("run", guest("hello"), "-p", "sev-es-emu", "--cpus", "2", "-t", "30")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    assert "Hello from a vmmd guest" in r.stdout


def test_console_to_file(tmp_path) -> None:
    out = tmp_path / "console.log"
    r = vmctl("run", guest("hello"), "-p", "plain", "--console", str(out), "-t", "30")
    assert r.returncode == ExitCode.SUCCESS
    assert "Hello from a vmmd guest" in out.read_text()
    assert "Hello" not in r.stdout


def test_exit_loop_counts_dropped_port_writes() -> None:
    r = vmctl("run", guest("exit-loop"), "-p", "plain", "--guest-arg", "500", "-t", "30")
    assert r.returncode == ExitCode.SUCCESS, r.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_vm_with_exit_130(sig: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.e2e.conftest import REPO

    proc = subprocess.Popen([sys.executable, "-m", "vmmd.cli", "run", guest("spin"), "-p", "plain", "-t", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while "spin" not in proc.stdout.readline() and time.monotonic() < deadline:
            pass  # the guest is running once it printed
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "Traceback" not in err and ("interrupted" in err or "terminated" in err), err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_vcpu_threads_start_stops_the_vm_cleanly(sig: str, monkeypatch) -> None:
    """The signal arrives inside Thread.start() (as it did on a loaded host once the guest had printed): the
    run still ends as interrupted, with every vCPU thread joined, instead of the exception escaping run()."""
    import os
    import signal
    import threading

    from vmmd.machine.config import MachineConfig
    from vmmd.machine.machine import Machine
    from vmmd.platforms import select_platform

    platform, _ = select_platform("plain")
    machine = Machine(MachineConfig(firmware=guest("spin"), memory_bytes=16 << 20, cpus=2, platform="plain",
                                    timeout=30), platform, lambda data: None).build()
    start = threading.Thread.start

    def start_and_signal(thread) -> None:
        os.kill(os.getpid(), getattr(signal, sig))  # pending now; Python runs its handler at the next bytecode
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_and_signal)
    escaped = None
    try:
        result = machine.run()
    except BaseException as exc:  # the bug this guards against: KeyboardInterrupt / _Terminate out of run()
        escaped = exc
        machine.request_stop("interrupted", "test cleanup", ExitCode.INTERRUPTED)
    finally:
        monkeypatch.undo()
        threads = getattr(machine, "_threads", [])
        for thread in threads:
            while thread.is_alive():
                machine.kick_all()
                thread.join(0.2)
        machine.close()
    assert escaped is None, f"{type(escaped).__name__} escaped Machine.run()"
    assert result.kind == "interrupted" and result.exit_code == ExitCode.INTERRUPTED, result.reason
    assert threads and not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("platform", ["plain", "sev-es-emu"])
def test_more_vcpus_than_fit_below_1_mib(platform: str) -> None:
    """40 vCPUs: GHCB pages and stacks in the vCPU area after the image; every vCPU starts, the BSP prints, and
    on sev-es-emu the reported digest is the one `vmctl measure` predicts for 40 vCPUs."""
    r = vmctl("run", guest("hello"), "-p", platform, "-c", "40", "-m", "32M", "-t", "60")
    assert r.returncode == ExitCode.SUCCESS, r.stderr
    assert f"Hello from a vmmd guest (platform: {platform})" in r.stdout
    if platform == "sev-es-emu":
        reported = re.search(r"launch digest \(what sev-es hardware would measure: [^)]*\): ([0-9a-f]{64})", r.stderr)
        measured = vmctl("measure", guest("hello"), "--vcpus", "40", "--memory", "32M", "--json")
        assert reported and json.loads(measured.stdout)["digest"] == reported.group(1)


def test_one_vcpu_limit_everywhere(tmp_path) -> None:
    run = vmctl("run", guest("hello"), "-p", "plain", "-c", "255")
    assert run.returncode == ExitCode.HOST_ERROR and "cpus must be 1..254" in run.stderr
    measure = vmctl("measure", guest("hello"), "--vcpus", "255")
    assert measure.returncode == ExitCode.USAGE and "1<=x<=254" in measure.stderr
    ovmf = vmctl("measure", "/usr/share/OVMF/OVMF_CODE.fd", "--vcpus", "255")
    assert ovmf.returncode == ExitCode.USAGE and "1<=x<=254" in ovmf.stderr
    for help_text in (vmctl("run", "--help").stdout, vmctl("measure", "--help").stdout):
        assert "254" in help_text


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(("method", "exit_code", "said"), [
    (0, ExitCode.GUEST_REBOOT, "the guest rebooted (i8042 reset command, reboot=k)"),
    (1, ExitCode.GUEST_REBOOT, "the guest rebooted (reset control register 0xCF9, reboot=p)"),
    (2, ExitCode.SUCCESS, "guest ended (poweroff, exit code 0): the guest powered off (ACPI S5)"),
])
def test_guest_reset_and_poweroff_end_the_vm_cleanly(platform: str, method: int, exit_code: ExitCode,
                                                     said: str) -> None:
    r = vmctl("run", guest("reset"), "-p", platform, "--guest-arg", str(method), "-t", "30")
    assert r.returncode == exit_code, r.stderr
    assert said in r.stderr
    assert "still running" not in r.stdout and "Traceback" not in r.stderr
