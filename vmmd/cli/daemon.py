"""vmctl commands that talk to the vmmd daemon: start, stop, list/status, show, console, log.

Each command builds one request of vmmd.daemon.protocol (the command table idea of OpenBSD vmctl's
ctl_commands[]); vmmd/cli/__init__.py's LAZY_COMMANDS adds them to the vmctl group. Only click and the protocol module
are imported here, so these commands start fast.

Exit codes (docs/daemon.md):
  0   success (console: the guest ended or you detached)
  1   the daemon refused the request: no such guest, already running, not running, name taken, shutting down
  2   bad command line
  3   invalid guest definition, or a file that cannot be read
  69  vmmd cannot be reached (no socket, nobody listening)
  77  permission denied (not root, not in vmmd's group, or not the guest's owner)
  start --wait: the guest's own exit code, as for `vmctl run` (README.md "Exit codes")
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
from pathlib import Path

import click

from vmmd.daemon.protocol import ACTIVE, SOCKET_ENV, Client, DaemonError
from vmmd.errors import ExitCode
from vmmd.terminal import ESCAPE_BYTE

EXIT_REFUSED, EXIT_INVALID, EXIT_UNAVAILABLE, EXIT_NOPERM = 1, 3, 69, 77
DETACH_BYTE = bytes([ESCAPE_BYTE])  # Ctrl-], as virsh console and telnet
_CONNECT_ERRORS = ("ENOENT", "ECONNREFUSED", "ECONNRESET", "EIO")


def _exit_for(err: DaemonError, connecting: bool = False) -> int:
    if err.errno in ("EPERM", "EACCES"):
        return EXIT_NOPERM
    if connecting:
        return EXIT_UNAVAILABLE
    if err.errno == "EINVAL":
        return EXIT_INVALID
    return EXIT_REFUSED


def _connect(socket_path: str | None, timeout: float | None = 30.0) -> Client:
    try:
        return Client(socket_path, timeout)
    except DaemonError as err:
        _die(err, connecting=True)


def _die(err: DaemonError, connecting: bool = False):
    click.echo(f"vmctl: {err.message}", err=True)
    sys.exit(_exit_for(err, connecting))


def _request(socket_path: str | None, op: str, client_timeout: float | None = 30.0, **fields) -> dict:
    """One request; `client_timeout` bounds the wait for the reply (None: as long as the daemon takes)."""
    client = _connect(socket_path, client_timeout)
    try:
        return client.request(op, **fields)
    except DaemonError as err:
        _die(err)
    except (TimeoutError, OSError) as err:
        click.echo(f"vmctl: no answer from vmmd: {err}", err=True)
        sys.exit(EXIT_UNAVAILABLE)
    finally:
        client.close()


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str):
    """Shell completion of guest names: asks the daemon (silently nothing when it cannot)."""
    try:
        with Client(ctx.params.get("socket_path"), timeout=2) as client:
            guests = client.request("list")["guests"]
    except Exception:
        return []
    return [g["name"] for g in guests if g["name"].startswith(incomplete)]


socket_option = click.option("--socket", "socket_path", envvar=SOCKET_ENV, default=None, is_eager=True,
                             metavar="PATH", help=f"vmmd control socket (default /run/vmmd/vmmd.sock, ${SOCKET_ENV})")
json_option = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
name_argument = click.argument("name", shell_complete=_complete_names)


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _end_text(guest: dict) -> str:
    if guest.get("error"):
        return f"error: {guest['error']}"
    end = guest.get("end")
    if not end:
        return "-"
    return f"{end['kind']}: {end['reason']}"


def format_table(guests: list[dict]) -> str:
    """The `vmctl list` table (one row per guest, the end reason last and untruncated)."""
    header = ("NAME", "STATE", "OWNER", "PLATFORM", "MEMORY", "VCPUS", "PID", "UPTIME", "END")
    rows = [header] + [(g["name"], g["state"], _user(g["owner"]), g["platform"], _size(g["memory_bytes"]),
                        str(g["vcpus"]), str(g["pid"]) if g["state"] in ACTIVE
                        and g["pid"] else "-", _duration(g.get("uptime")), _end_text(g)) for g in guests]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
                     for row in rows)


# --- commands ---------------------------------------------------------------------------------------------
@click.command("start")
@click.argument("name", required=False, shell_complete=_complete_names)
@click.option("--file", "-f", "file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="start an ad-hoc guest from this TOML definition (you own it)")
@click.option("--attach", "-a", is_flag=True, help="attach to the console right away (detach with Ctrl-])")
@click.option("--wait", "-w", is_flag=True, help="wait for the guest to end; exit with its exit code")
@json_option
@socket_option
def start_cmd(name: str | None, file: Path | None, attach: bool, wait: bool, as_json: bool,
              socket_path: str | None) -> None:
    """Start the defined guest NAME, or an ad-hoc guest with -f FILE."""
    if (name is None) == (file is None):
        raise click.UsageError("give a guest NAME or -f FILE (one of them)")
    fields: dict = {"name": name} if name else {}
    if file is not None:
        try:
            text = file.read_text()
        except UnicodeDecodeError:
            click.echo(f"vmctl: {file} is not a TOML guest definition (it is not text); to boot an image in the "
                       f"foreground use `vmctl run {file}`", err=True)
            sys.exit(EXIT_INVALID)
        except OSError as err:
            click.echo(f"vmctl: {file}: cannot read: {err.strerror}", err=True)
            sys.exit(EXIT_INVALID)
        fields = {"definition": {"path": str(file.resolve()), "text": text}}
    if attach or wait:
        client = _connect(socket_path)
        try:
            reply = client.request("start", attach=True, **fields)
        except DaemonError as err:
            _die(err)
        guest = reply["guest"]
        with _interrupt_leaves_guest_running(guest["name"]):
            detached = _attach(client, guest["name"]) if attach else _drain(client)
        client.close()
        if detached:
            return
        shown = _after_stream(socket_path, guest["name"])
        if wait:
            _report_end(shown, as_json)
            sys.exit(_guest_exit_code(shown))
        _report_end(shown, False)
        sys.exit(EXIT_INVALID if shown.get("state") == "failed" else 0)
    reply = _request(socket_path, "start", **fields)
    guest = reply["guest"]
    if as_json:
        click.echo(json.dumps(guest, sort_keys=True))
    else:
        click.echo(f"vmctl: started {guest['name']} (pid {guest['pid']})", err=True)


def _guest_exit_code(guest: dict) -> int:
    if guest.get("state") == "failed":
        return EXIT_INVALID
    end = guest.get("end") or {}
    return int(end.get("exit_code", 0))


def _report_end(guest: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(guest, sort_keys=True))
    elif guest.get("state") == "failed":
        click.echo(f"vmctl: guest {guest['name']} failed: {guest.get('error')}", err=True)
    else:
        click.echo(f"vmctl: guest {guest['name']} ended ({_end_text(guest)})", err=True)


@click.command("stop")
@name_argument
@click.option("--force", is_flag=True, help="kill the worker now (SIGKILL) instead of asking the guest to stop")
@click.option("--timeout", type=float, default=None,
              help="seconds to wait before killing, above 0 and at most 600 (default: vmmd's --stop-timeout, 10)")
@json_option
@socket_option
def stop_cmd(name: str, force: bool, timeout: float | None, as_json: bool, socket_path: str | None) -> None:
    """Stop guest NAME (stop request, then SIGKILL after the timeout)."""
    from vmmd.errors import VmmdError
    from vmmd.machine.config import MAX_STOP_TIMEOUT_SECONDS, check_seconds

    fields: dict = {"name": name, "force": force}
    try:
        if check_seconds(timeout, "--timeout", MAX_STOP_TIMEOUT_SECONDS) is not None:
            fields["timeout"] = timeout
    except VmmdError as err:
        click.echo(f"vmctl: {err}", err=True)
        sys.exit(EXIT_INVALID)
    guest = _request(socket_path, "stop", client_timeout=None, **fields)["guest"]
    _report_end(guest, as_json)


@click.command("remove")
@name_argument
@json_option
@socket_option
def remove_cmd(name: str, as_json: bool, socket_path: str | None) -> None:
    """Forget the stopped ad-hoc guest NAME (started with `vmctl start -f`): its definition, last end and log."""
    reply = _request(socket_path, "remove", name=name)
    if as_json:
        click.echo(json.dumps(reply, indent=1, sort_keys=True))
        return
    logs = reply["removed_logs"]
    click.echo(f"removed guest {name}" + (f" and its log ({', '.join(logs)})" if logs else ""))


@click.command("reload")
@json_option
@socket_option
def reload_cmd(as_json: bool, socket_path: str | None) -> None:
    """Reread the definitions directory (root only; as `systemctl reload vmmd` or SIGHUP). Exit 3 when a
    definition does not validate (it is named; the others are loaded)."""
    reply = _request(socket_path, "reload")
    errors = reply.get("errors", [])
    if as_json:
        click.echo(json.dumps({"errors": errors, "guests": reply.get("guests")}, sort_keys=True))
    else:
        click.echo(f"vmctl: definitions reread: {reply.get('guests')} guests defined"
                   + (f", {len(errors)} definition(s) refused:" if errors else ""), err=True)
        for error in errors:
            click.echo(f"  {error}", err=True)
    sys.exit(EXIT_INVALID if errors else 0)


@click.command("list")
@json_option
@socket_option
def list_cmd(as_json: bool, socket_path: str | None) -> None:
    """Guests you may see (root: all) with their state and how they last ended."""
    guests = _request(socket_path, "list")["guests"]
    click.echo(json.dumps(guests, indent=1, sort_keys=True) if as_json else format_table(guests))


status_cmd = click.Command("status", callback=list_cmd.callback, params=list_cmd.params,
                           help="Same as `vmctl list`.")


@click.command("show")
@name_argument
@json_option
@socket_option
def show_cmd(name: str, as_json: bool, socket_path: str | None) -> None:
    """Everything the daemon knows about guest NAME."""
    guest = _request(socket_path, "show", name=name)["guest"]
    if as_json:
        click.echo(json.dumps(guest, indent=1, sort_keys=True))
        return
    d = guest["definition"]
    lines = [("name", guest["name"]), ("state", guest["state"]), ("owner", f"{_user(guest['owner'])} "
                                                                            f"({guest['owner']})"),
             ("definition", d["source"] + (" (ad hoc)" if guest["adhoc"] else "")),
             *([("kernel", d["kernel"]), ("initrd", d.get("initrd") or "none"),
                ("append", d["append"] if d.get("append") is not None else "(default) console=ttyS0")]
               if d.get("kernel") else [("firmware", d["firmware"])]),
             ("memory", _size(d["memory_bytes"])), ("vcpus", str(d["vcpus"])), ("platform", d["platform"]),
             ("timeout", f"{d['timeout']:g} s" if d["timeout"] else "none"),
             ("policy", f"{d['policy']:#x}" if d["policy"] is not None else "default")]
    for i, disk in enumerate(d.get("disks") or []):
        opts = ["ro" if disk["ro"] else "rw", f"cache={disk['cache']}"] + ([f"serial={disk['serial']}"]
                                                                            if disk["serial"] else [])
        lines.append((f"disk {i}", f"{disk['path']} ({', '.join(opts)})"))
    if guest.get("platform_note"):
        lines.append(("running on", guest["platform_note"]))
    for device, path in (guest.get("io_paths") or {}).items():
        lines.append((f"{device} I/O", path))
    if guest.get("launch_digest"):
        lines.append(("launch digest", guest["launch_digest"]))
    attest = guest.get("attest")
    if attest and guest.get("state") in ACTIVE:  # docs/attestation.md
        lines.append(("attested launch", ("waiting for the guest owner after LAUNCH_MEASURE (vmctl measurement, "
                      "inject-secret, resume)" if attest.get("state") == "LSECRET" else "resumed (LAUNCH_FINISH ran)")
                      + ("; measured by the simulated PSP: proves nothing about this host"
                         if attest.get("simulated") else "")))
    if guest.get("pid") and guest["state"] in ACTIVE:
        lines.append(("pid", str(guest["pid"])))
    for key, label in (("started_at", "started"), ("ended_at", "ended")):
        if guest.get(key):
            lines.append((label, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(guest[key]))))
    if guest.get("first_byte_seconds") is not None:
        lines.append(("first console byte", f"{guest['first_byte_seconds'] * 1000:.1f} ms after start"))
    lines.append(("console bytes", str(guest["console_bytes"])))
    lines.append(("end", _end_text(guest)))
    width = max(len(k) for k, _ in lines)
    click.echo("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))


@click.command("log")
@name_argument
@click.option("--tail", "-n", "lines", type=click.IntRange(1, 1 << 20), default=200, show_default=True,
              help="lines from the end of the log, as tail -n counts them (at most the last MiB)")
@socket_option
def log_cmd(name: str, lines: int, socket_path: str | None) -> None:
    """The per-guest log of NAME: daemon events and console output."""
    text = _request(socket_path, "log", name=name, lines=lines)["log"]
    click.echo(text, nl=not text.endswith("\n"))


@click.command("console")
@name_argument
@click.option("--no-replay", is_flag=True, help="do not print the console history first")
@socket_option
def console_cmd(name: str, no_replay: bool, socket_path: str | None) -> None:
    """Attach to NAME's serial console (history first, then live; keys go to the guest). Detach: Ctrl-]."""
    client = _connect(socket_path)
    try:
        reply = client.request("console", name=name, replay=not no_replay)
    except DaemonError as err:
        _die(err)
    state = reply.get("guest", {}).get("state")
    if state not in ACTIVE:
        click.echo(f"vmctl: guest {name} is {state}: its console history follows", err=True)
    with _interrupt_leaves_guest_running(name):
        detached = _attach(client, name)
    client.close()
    if not detached and state in ACTIVE:
        _report_end(_after_stream(socket_path, name), False)


@contextlib.contextmanager
def _interrupt_leaves_guest_running(name: str):
    """Ctrl-C while following a console (not in raw mode, where it goes to the guest): leave, say so, exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(f"\nvmctl: interrupted; guest {name} keeps running (vmctl stop {name} ends it)", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))


def _after_stream(socket_path: str | None, name: str) -> dict:
    """The guest as the daemon has it once its console stream ended (the end is recorded by then)."""
    try:
        with Client(socket_path, 30.0) as client:
            return client.request("show", name=name)["guest"]
    except DaemonError as err:
        click.echo(f"vmctl: the console stream of {name} ended and vmmd did not answer ({err.message}): how the "
                   "guest ended is unknown", err=True)
        sys.exit(EXIT_UNAVAILABLE)


def _drain(client: Client) -> bool:
    """Read a console stream to its end without showing it (start --wait). False: not detached."""
    client.sock.settimeout(None)
    while client.sock.recv(65536):
        pass
    return False


def _attach(client: Client, name: str) -> bool:
    """Pump the console stream to stdout and stdin to the guest until the guest ends (False) or Ctrl-] is
    pressed (True)."""
    out = sys.stdout.buffer
    sock = client.sock
    sock.settimeout(None)
    stdin_fd = sys.stdin.fileno() if sys.stdin is not None else -1
    interactive = stdin_fd >= 0 and os.isatty(stdin_fd)
    saved = None
    if interactive:  # console mode before any output: keys typed after the history shows go to the guest as typed
        from vmmd.terminal import enter_character_mode

        saved = enter_character_mode(stdin_fd)
        click.echo(f"vmctl: connected to {name} (detach with Ctrl-])", err=True)
    reading_stdin = stdin_fd >= 0
    detached = False
    try:
        pending = client.take_buffered()
        if pending:
            out.write(pending)
            out.flush()
        while True:
            fds = [sock] + ([stdin_fd] if reading_stdin else [])
            ready, _, _ = select.select(fds, [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                out.write(data)
                out.flush()
            if reading_stdin and stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if not data:
                    reading_stdin = False  # EOF on stdin: keep showing output until the guest ends
                    continue
                if DETACH_BYTE in data:
                    head = data.split(DETACH_BYTE, 1)[0]
                    if head:
                        sock.sendall(head)
                    detached = True
                    break
                sock.sendall(data)
    except (ConnectionError, OSError):
        pass
    finally:
        if saved is not None:
            from vmmd.terminal import restore

            restore(stdin_fd, saved)
    if interactive and detached:
        click.echo(f"\nvmctl: detached from {name}; it keeps running", err=True)
    elif interactive:
        click.echo("", err=True)
    return detached

