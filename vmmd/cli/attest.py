"""vmctl commands for an attested launch waiting in vmmd: measurement, inject-secret, resume.

The host side of what QEMU's QMP gives (query-sev-launch-measure + query-sev, sev-inject-launch-secret,
cont); the guest owner's side is `vmctl owner` (vmmd/cli/owner.py). Exit codes as the other daemon
commands (vmmd/cli/daemon.py): 1 refused, 3 a bad file, 69 no daemon, 77 not the guest's owner.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import click

from vmmd.cli.daemon import EXIT_INVALID, _request, json_option, name_argument, socket_option


def _print_info(name: str, info: dict) -> None:
    click.echo(f"guest:          {name}")
    click.echo(f"measurement:    {info['measurement']}")
    click.echo(f"  measure:      {info['measure']}")
    click.echo(f"  mnonce:       {info['mnonce']}")
    click.echo(f"API version:    {info['api_major']}.{info['api_minor']}, build {info['build_id']}")
    click.echo(f"policy:         {info['policy']:#x} ({info['policy_text']})")
    click.echo(f"state:          {info['state']}" + (" (waiting for the guest owner: inject-secret, resume)"
                                                      if info["state"] == "LSECRET" else ""))
    click.echo(f"owner session:  {'yes' if info['owner_session'] else 'no (the firmware drew TEK/TIK itself)'}")
    if info.get("secret_gpa") is not None:
        click.echo(f"secret area:    {info['secret_gpa']:#x}, {info['secret_size']} bytes"
                   + (" (injected)" if info["secret_injected"] else ""))
    if info.get("note"):
        click.echo(f"note:           {info['note']}")


@click.command("measurement")
@name_argument
@json_option
@socket_option
def measurement_cmd(name: str, as_json: bool, socket_path: str | None) -> None:
    """The launch measurement of guest NAME, waiting after LAUNCH_MEASURE (definition key attest = true)."""
    reply = _request(socket_path, "measurement", name=name)
    if as_json:
        click.echo(json.dumps(reply["attest"], sort_keys=True))
    else:
        _print_info(name, reply["attest"])


def _read_packet_file(path: Path, what: str, limit: int) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        click.echo(f"vmctl: cannot read the {what} file {path}: {err.strerror}", err=True)
        sys.exit(EXIT_INVALID)
    if not data or len(data) > limit:
        click.echo(f"vmctl: the {what} file {path} holds {len(data)} bytes: it must hold 1..{limit}", err=True)
        sys.exit(EXIT_INVALID)
    return base64.b64encode(data).decode()


def _gpa(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text, 0)
    except ValueError:
        raise click.BadParameter(f"--gpa must be a guest-physical address (0x...), got {text!r}") from None
    if not 0 <= value < 1 << 52:
        raise click.BadParameter(f"--gpa {text} is not a guest-physical address")
    return value


@click.command("inject-secret")
@name_argument
@click.option("--header", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="the 52-byte LAUNCH_SECRET packet header (vmctl owner secret / sevctl secret build)")
@click.option("--secret", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="the encrypted secret payload")
@click.option("--gpa", default=None, help="guest-physical address (default: the image's secret area)")
@json_option
@socket_option
def inject_secret_cmd(name: str, header: Path, secret: Path, gpa: str | None, as_json: bool,
                      socket_path: str | None) -> None:
    """LAUNCH_SECRET into guest NAME while its attested launch waits (before `vmctl resume`)."""
    fields = {"name": name, "header": _read_packet_file(header, "secret header", 4096),
              "secret": _read_packet_file(secret, "secret payload", 16384)}
    address = _gpa(gpa)
    if address is not None:
        fields["gpa"] = address
    reply = _request(socket_path, "inject-secret", **fields)
    if as_json:
        click.echo(json.dumps(reply, sort_keys=True))
        return
    injected = reply["injected"]
    click.echo(f"injected {injected['length']} bytes at {injected['gpa']:#x} into guest {name}; `vmctl resume "
               f"{name}` runs it")


@click.command("resume")
@name_argument
@json_option
@socket_option
def resume_cmd(name: str, as_json: bool, socket_path: str | None) -> None:
    """LAUNCH_FINISH for guest NAME's attested launch, then run it."""
    reply = _request(socket_path, "resume", name=name)
    if as_json:
        click.echo(json.dumps(reply, sort_keys=True))
    else:
        click.echo(f"guest {name}: LAUNCH_FINISH done, running")
