"""vmctl: the command line (click). One function per command, each building one request.

Exit codes are vmmd.errors.ExitCode (README.md, "Exit codes").
"""

from __future__ import annotations

import sys

import click

from vmmd.errors import ExitCode


def fail(message: str, code: ExitCode = ExitCode.HOST_ERROR) -> None:
    """Print `vmctl: message` on stderr and exit with `code`."""
    click.echo(f"vmctl: {message}", err=True)
    sys.exit(int(code))


# Commands defined in other modules, imported only when used, so that `vmctl run` starts fast:
# name -> (module, attribute holding the click command).
LAZY_COMMANDS = {
    "run": ("vmmd.cli.run", "run"),
    "host": ("vmmd.cli.run", "host"),
    "measure": ("vmmd.cli.measure", "measure_cmd"),
    "verify": ("vmmd.cli.measure", "verify_cmd"),
    "owner": ("vmmd.cli.owner", "owner_cmd"),
    "measurement": ("vmmd.cli.attest", "measurement_cmd"),
    "inject-secret": ("vmmd.cli.attest", "inject_secret_cmd"),
    "resume": ("vmmd.cli.attest", "resume_cmd"),
    **{name: ("vmmd.cli.daemon", f"{name}_cmd") for name in ("start", "stop", "list", "status", "show", "console",
                                                              "log", "remove", "reload")},
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in LAZY_COMMANDS:
            import importlib

            module, attribute = LAZY_COMMANDS[name]
            command = getattr(importlib.import_module(module), attribute)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmmd", prog_name="vmctl", message="%(prog)s %(version)s")
def main() -> None:
    """Run and manage vmmd guests (AMD SEV-ES, with an emulated GHCB platform for any KVM host)."""
