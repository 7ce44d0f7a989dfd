"""`vmctl run` (a guest in the foreground) and `vmctl host` (what this host can run)."""

from __future__ import annotations

import os
import signal
import sys
from types import SimpleNamespace

import click

from vmmd.cli import fail as _fail
from vmmd.errors import ExitCode, VmmdError


@click.command("run")
@click.argument("firmware", type=click.Path(), required=False)  # the loader checks it (exit 3 like every host problem)
@click.option("--kernel", "-k", type=click.Path(), default=None,
              help="boot this Linux kernel directly (bzImage or ELF vmlinux) instead of FIRMWARE (docs/linux-boot.md)")
@click.option("--initrd", type=click.Path(), default=None, help="with --kernel: the initial ramdisk")
@click.option("--append", default=None, metavar="CMDLINE",
              help="with --kernel: the kernel command line (default \"console=ttyS0\"); vmmd adds its devices' "
                   "virtio_mmio.device= entries")
@click.option("--memory", "-m", default="64M", show_default=True, help="guest RAM (bytes, or K/M/G suffix)")
@click.option("--cpus", "-c", default=1, show_default=True, type=int,
              help="number of vCPUs: 1..254, and at most what this host's KVM allows (KVM_CAP_MAX_VCPUS)")
@click.option("--platform", "-p", default="auto", show_default=True,
              type=click.Choice(["auto", "plain", "sev-es", "sev-es-emu"]),
              help="auto picks sev-es where the host has it, else sev-es-emu")
@click.option("--timeout", "-t", type=float, default=None, help="stop the VM after this many seconds")
@click.option("--console", "console_path", type=click.Path(dir_okay=False), default=None,
              help="write the serial console to FILE instead of standard output")
@click.option("--guest-arg", type=str, default="0", help="a number handed to the guest in its boot-info page")
@click.option("--firmware-type", type=click.Choice(["auto", "flat", "reset-vector"]), default="auto",
              show_default=True, help="flat 64-bit image, or a reset-vector image ending at 4 GiB (OVMF); "
                                      "auto: reset-vector when the image has OVMF's footer table")
@click.option("--net", type=str, default=None, metavar="tap[:BRIDGE][,OPTION...]",
              help="attach a virtio-net device backed by a new tap, optionally enslaved to BRIDGE; options: "
                   "mac=, mtu=, ifname=, create-bridge, vnet-hdr, host-ip=A.B.C.D/N (docs/networking.md)")
@click.option("--disk", "disks", multiple=True, metavar="PATH[,ro][,cache=none|writeback][,serial=ID]",
              help="attach a virtio-blk disk backed by the existing raw image PATH (repeatable, up to 4; never "
                   "created or resized; docs/disks.md)")
@click.option("--eventfds", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
              help="virtio queue notifies and interrupts through KVM_IOEVENTFD / KVM_IRQFD and a device thread "
                   "where KVM has them (auto), or every notify through vmmd's exit path (off)")
@click.option("--stdin-console", is_flag=True,
              help="feed standard input to the serial console even when it is not a terminal (it is on a terminal)")
@click.option("--name", "-n", default=None,
              help="the guest's name: its tap is vmmd-NAME, its MAC derives from it (default run-PID, unique)")
@click.option("--cpu-type", default=None,
              help="sev-es-emu: the CPU model (QEMU name or CPUID 1 EAX) the reported digest of a reset-vector "
                   "image assumes, as `vmctl measure --cpu-type` (default EPYC-v4)")
@click.option("--policy", default=None, help="SEV guest policy: a number or flags (NODBG,NOKS); default 0x5")
@click.option("--dh-cert", type=click.Path(dir_okay=False), default=None,
              help="the guest owner's DH certificate for LAUNCH_START (base64, vmctl owner session's NAME_godh.b64)")
@click.option("--session", type=click.Path(dir_okay=False), default=None,
              help="the guest owner's launch session blob (base64, NAME_session.b64); with --dh-cert")
@click.option("--attest", is_flag=True, help="wait for the guest owner after LAUNCH_MEASURE: needs the daemon")
@click.option("--quiet", "-q", is_flag=True, help="do not print the platform and end-of-run lines")
def run(**options) -> None:
    """Boot FIRMWARE (a flat 64-bit image or OVMF), or a Linux kernel with --kernel, in the foreground; the exit
    status reflects how the guest ended."""
    # While the guest runs, Machine.run() turns SIGINT/SIGTERM into a clean stop (exit 130); before and after,
    # they end vmctl the same way, with a sentence instead of a traceback or SIGTERM's default exit 143.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _run(SimpleNamespace(**options))
    except KeyboardInterrupt:
        click.echo("\nvmctl: interrupted (SIGINT/SIGTERM) while the VM was being set up or torn down; nothing is "
                   "left running", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))


RUN_NAME_PREFIX = "run-"  # default names of foreground guests; vmmd refuses them for its own (definitions.py)


def default_run_name() -> str:
    """A name no other foreground run has now (the pid is unique while we run) and no daemon guest may take."""
    return f"{RUN_NAME_PREFIX}{os.getpid()}"


def _same_terminal(a, b) -> bool:
    """Do file objects `a` and `b` both write to one terminal?"""
    try:
        return a.isatty() and b.isatty() and os.ttyname(a.fileno()) == os.ttyname(b.fileno())
    except (OSError, ValueError, AttributeError):
        return False


def _apply_cpu_type(platform, cpu_type: str | None) -> None:
    """--cpu-type shapes only the digest sev-es-emu predicts; elsewhere it has no meaning, so it is refused."""
    if cpu_type is None:
        return
    if platform.name != "sev-es-emu":
        raise VmmdError(f"--cpu-type applies to sev-es-emu's predicted digest only; on {platform.name} "
                        + ("the launch measures the host's own CPU" if platform.name == "sev-es" else
                           "nothing is measured"), ExitCode.HOST_ERROR)
    from vmmd.sev.cpu_types import resolve_cpu_sig

    resolve_cpu_sig(cpu_type)  # VmmdError naming the known models
    platform.inputs.cpu_type = cpu_type


def _valid_name(name: str) -> bool:
    """The daemon's rule for guest names; its protocol module (json, socket: ~4 ms) loads only for --name."""
    from vmmd.daemon.protocol import NAME_RE

    return NAME_RE.fullmatch(name) is not None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _run(o: SimpleNamespace) -> None:
    from vmmd.devices.console import Console
    from vmmd.machine.config import MachineConfig, parse_size
    from vmmd.machine.machine import Machine
    from vmmd.platforms import select_platform

    try:
        arg = int(o.guest_arg, 0)
    except ValueError:
        _fail(f"--guest-arg {o.guest_arg!r} is not a number", ExitCode.USAGE)
    name = o.name or default_run_name()  # valid by construction (tests/unit/test_cli_run.py)
    if o.name and not _valid_name(o.name):
        _fail(f"--name {name!r} is not valid: 1-63 of A-Z a-z 0-9 . _ - starting with a letter or digit",
              ExitCode.USAGE)
    quiet = o.quiet
    out = None
    try:
        from vmmd.block.image import parse_disk_spec

        disks = tuple(parse_disk_spec(text) for text in o.disks)
        config = MachineConfig(firmware=o.firmware, memory_bytes=parse_size(o.memory), cpus=o.cpus,
                               platform=o.platform, timeout=o.timeout, guest_arg=arg, name=name,
                               firmware_type=o.firmware_type, net=o.net, kernel=o.kernel, initrd=o.initrd,
                               append=o.append, eventfds=o.eventfds == "auto", disks=disks).validate()
        chosen, note = select_platform(o.platform)
        _apply_cpu_type(chosen, o.cpu_type)
        if quiet and hasattr(chosen, "predict_digest"):
            chosen.predict_digest = False  # sev-es-emu: -q prints no digest, so the software launch is not run
        from vmmd.cli.owner import apply_launch_options

        apply_launch_options(chosen, o.policy, o.dh_cert, o.session, o.attest)
        if o.console_path is not None:
            out = open(o.console_path, "wb")
        elif sys.stdout is None:
            raise VmmdError("standard output is closed: give --console FILE for the guest's serial output",
                            ExitCode.USAGE)
        interactive = o.stdin_console or (sys.stdin is not None and not sys.stdin.closed and sys.stdin.isatty())
        # Interactive: show every byte at once (prompts and echoes end in no newline); else write per line.
        console = Console(out if out is not None else sys.stdout.buffer, line_buffered=not interactive, threaded=True)
        machine = Machine(config, chosen, console.write).build()
        machine.stop_listeners.append(console.release)
        if not quiet:
            click.echo(f"vmctl: {note}", err=True)
            for line in machine.notes:
                click.echo(f"vmctl: {line}", err=True)
            if machine.network is not None:
                click.echo(f"vmctl: guest {name}: virtio-net on tap {machine.network.tap_name}, guest MAC "
                           f"{machine.network.guest_mac} ({machine.network.io_path})", err=True)
            for disk in machine.disks.disks if machine.disks is not None else ():
                click.echo(f"vmctl: guest {name}: virtio-blk at {disk.gpa:#x}: {disk.image.spec.describe()}, "
                           f"{disk.image.size >> 10} KiB ({disk.io_path})", err=True)
            launch = getattr(chosen, "launch_result", None)
            if launch is None and getattr(machine, "launch_note", None):
                click.echo(f"vmctl: no launch digest: {machine.launch_note}", err=True)
            if launch is not None:
                what = "measured" if chosen.encrypts else f"what sev-es hardware would measure: {chosen.assumed}"
                click.echo(f"vmctl: launch digest ({what}): {launch.expected_digest.hex()}", err=True)
    except VmmdError as err:
        if out is not None:
            out.close()
        _fail(str(err), err.exit_code)
    except OSError as err:
        if out is not None:
            out.close()
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}")
    console_input = None
    if interactive:
        from vmmd.machine.console_input import ConsoleInput

        if not quiet:
            click.echo("vmctl: keys go to the guest's serial console (Ctrl-C too); Ctrl-] stops the VM", err=True)

        console_input = ConsoleInput(sys.stdin.fileno(), machine.uart, lambda: machine.request_stop(
            "interrupted", "Ctrl-] pressed; VM stopped", ExitCode.INTERRUPTED)).start()
    result = None
    try:
        result = machine.run()
    finally:
        if console_input is not None:
            console_input.close()
        machine.close()
        if result is not None and result.kind != "interrupted":
            console.drain()  # the VM is gone; what it printed still reaches a slow reader (Ctrl-C gives up)
        if out is not None:
            try:
                out.close()
            except OSError as err:
                console.out_error = console.out_error or err
    if console.out_error is not None:  # the guest ran on; say that its output did not all arrive
        click.echo(f"vmctl: could not write all of the guest's console output ({console.bytes_written} bytes): "
                   f"{console.out_error.strerror or console.out_error}", err=True)
    if not quiet:
        if out is None and console.ends_mid_line and _same_terminal(sys.stdout, sys.stderr):
            click.echo("", err=True)  # the end line starts on a line of its own, not after the guest's last text
        click.echo(f"vmctl: guest ended ({result.kind}, exit code {int(result.exit_code)}): {result.reason} "
                   f"[{result.seconds:.3f} s]", err=True)
    sys.stdout.flush()
    os._exit(int(result.exit_code)) if result.kind == "interrupted" else sys.exit(int(result.exit_code))


@click.command("host")
@click.option("--memory", "-m", default=None, help="also check RLIMIT_MEMLOCK against a guest of this size")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.option("--export-pdh", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="write the platform's PDH certificate (and chain) to DIR for a guest owner (vmctl owner session)")
def host(memory: str | None, as_json: bool, export_pdh: str | None) -> None:
    """What this host can run (plain, sev-es-emu, sev-es) and, where not, why."""
    import json

    if export_pdh is not None:
        from pathlib import Path

        from vmmd.cli.owner import export_pdh as export

        try:
            lines = export(Path(export_pdh))
        except VmmdError as err:
            _fail(str(err), err.exit_code)
        click.echo("\n".join(f"vmctl: {line}" for line in lines))
        return

    from vmmd.machine.config import parse_size
    from vmmd.sev.host import format_host_report, host_report

    try:
        report = host_report(parse_size(memory) if memory else None, probe_guest_code=True)
    except VmmdError as err:
        _fail(str(err), err.exit_code)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else format_host_report(report))
