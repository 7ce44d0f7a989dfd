"""The guest registry: every guest the daemon knows, its state, console ring, log file and last end.

States: defined -> starting -> running -> stopping -> stopped (with an end: kind, reason, exit code) or
failed (with the error that kept it from running). The registry is persisted to STATE_DIR/guests.json
after every change, so a restarted daemon keeps ad-hoc definitions and last ends, and reports honestly
a guest that was running when the previous daemon died (its workers died with it: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmmd.errors import ExitCode

from .definitions import DefinitionError, GuestDefinition, load_directory, parse_definition
from .protocol import ACTIVE, STATES

LOG_ROTATE_BYTES = 8 << 20  # NAME.log is renamed to NAME.log.1 beyond this


class ConsoleRing:
    """The last `limit` bytes of a guest's console, and how many bytes it printed in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._buf = bytearray()

    def append(self, data: bytes) -> None:
        self.total += len(data)
        self._buf += data
        if len(self._buf) > self.limit:
            del self._buf[:len(self._buf) - self.limit]

    def clear(self) -> None:
        self._buf.clear()
        self.total = 0

    def contents(self) -> bytes:
        return bytes(self._buf)


@dataclass
class Guest:
    definition: GuestDefinition
    adhoc: bool  # started with vmctl start -f (persisted by the daemon), else from the definitions directory
    state: str = "defined"
    error: str | None = None
    end: dict[str, Any] | None = None
    pid: int | None = None
    started_at: float | None = None  # wall clock
    ended_at: float | None = None
    start_mono: float | None = None
    first_byte_seconds: float | None = None  # start request -> first console byte reached the daemon
    build_seconds: float | None = None  # in the worker: definition received -> Machine built
    platform: str | None = None  # what the last start runs on (the definition may say "auto")
    platform_note: str | None = None
    io_paths: dict | None = None  # virtio device -> its notify/interrupt path (Machine.io_paths()), of the last start
    digest: str | None = None
    policy_note: str | None = None
    ring: ConsoleRing = field(default_factory=lambda: ConsoleRing(64 << 10))
    starts: int = 0
    # runtime only (not persisted)
    worker: Any = None
    result: dict | None = None
    build_error: dict | None = None
    stop_mode: str | None = None  # "stop", "force", "shutdown"
    stop_reason: str | None = None
    watchers: set = field(default_factory=set)
    waiters: list = field(default_factory=list)
    channel_closed: bool = False
    exit_status: int | None = None
    attest: dict | None = None  # an attested launch's measurement and state (vmmd.sev.attest.PausedLaunch.info())
    attest_answer: Any = None  # the asyncio future awaiting the worker's answer to inject-secret / resume

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def owner(self) -> int:
        return self.definition.owner

    def summary(self) -> dict[str, Any]:
        d = self.definition
        now = time.time()
        return {"name": self.name, "state": self.state, "owner": self.owner, "platform": self.platform or d.platform,
                "memory_bytes": d.memory_bytes, "vcpus": d.cpus, "pid": self.pid,
                "uptime": (now - self.started_at) if self.state in ACTIVE and self.started_at else None,
                "end": self.end, "error": self.error, "adhoc": self.adhoc, "console_bytes": self.ring.total}

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "definition": self.definition.summary(), "started_at": self.started_at,
                "ended_at": self.ended_at, "first_byte_seconds": self.first_byte_seconds,
                "build_seconds": self.build_seconds,
                "platform_note": self.platform_note, "io_paths": self.io_paths, "launch_digest": self.digest,
                "policy_note": self.policy_note,
                "starts": self.starts, "attest": self.attest}


def lost_end(state: str, pid: int | None) -> dict[str, Any]:
    """The end of a guest that was active when the previous daemon died (its worker died with it)."""
    return {"kind": "killed", "exit_code": int(ExitCode.INTERRUPTED), "status": None, "seconds": None,
            "reason": f"vmmd exited while the guest was {state} (worker pid {pid}); the worker was killed with it "
                      "(PR_SET_PDEATHSIG); found at daemon restart"}


class Registry:
    def __init__(self, definitions_dir: Path, state_dir: Path, log_dir: Path) -> None:
        self.definitions_dir = definitions_dir
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.guests: dict[str, Guest] = {}
        self.definition_errors: list[str] = []
        # saved ad-hoc guests that no longer validate (stricter rules after an upgrade): kept, never dropped
        self.unloadable: dict[str, dict] = {}
        self._logs: dict[str, Any] = {}

    # --- definitions and persistence ------------------------------------------------------------------------
    def scan(self) -> list[str]:
        """(Re)read the definitions directory; active guests keep the definition they started with."""
        definitions, errors = load_directory(self.definitions_dir)
        for name, definition in definitions.items():
            guest = self.guests.get(name)
            if guest is None:
                self.guests[name] = Guest(definition, adhoc=False, ring=ConsoleRing(definition.ring_bytes))
            elif guest.adhoc and guest.state not in ACTIVE:
                errors.append(f"{definition.source}: key 'name': {name!r} is also an ad-hoc guest of uid "
                              f"{guest.owner}; the file wins")
                self.guests[name] = Guest(definition, adhoc=False, ring=ConsoleRing(definition.ring_bytes))
            elif not guest.adhoc and guest.state not in ACTIVE:
                guest.definition = definition
        for name in [n for n, g in self.guests.items()
                     if not g.adhoc and n not in definitions and g.state not in ACTIVE]:
            del self.guests[name]  # its file was removed
        self.definition_errors = errors
        return errors

    @property
    def state_file(self) -> Path:
        return self.state_dir / "guests.json"

    def load(self) -> list[str]:
        """Definitions directory plus the persisted state of the previous daemon; returns problems found."""
        problems = list(self.scan())
        try:
            saved = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return problems
        except (OSError, ValueError) as err:
            return problems + [f"{self.state_file}: unreadable ({err}); starting with no saved state"]
        for entry in saved.get("unloadable", []):
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                saved.setdefault("guests", []).append(entry)  # tried again: the rules may accept it now
        for entry in saved.get("guests", []):
            try:
                name = entry["name"]
                guest = self.guests.get(name)
                if entry.get("adhoc"):
                    if guest is not None:
                        problems.append(f"{self.state_file}: ad-hoc guest {name!r} is now defined by "
                                        f"{guest.definition.source}; dropped")
                        continue
                    source = entry["source"]
                    try:
                        definition = parse_definition(entry["text"], source, Path(source).stem, entry["owner"],
                                                      Path(source).parent)
                    except DefinitionError as err:
                        problems.append(f"saved ad-hoc guest {name!r} no longer validates: {err}; kept in "
                                        f"{self.state_file} under 'unloadable' (its owner can start -f a fixed "
                                        "definition under that name)")
                        self.unloadable[name] = entry
                        continue
                    guest = self.guests[name] = Guest(definition, adhoc=True,
                                                      ring=ConsoleRing(definition.ring_bytes))
                elif guest is None:
                    continue  # its definition file is gone
                state = entry.get("state", "defined")
                guest.end, guest.error = entry.get("end"), entry.get("error")
                guest.started_at, guest.ended_at = entry.get("started_at"), entry.get("ended_at")
                guest.starts = entry.get("starts", 0)
                guest.platform_note, guest.platform = entry.get("platform_note"), entry.get("platform")
                if state in ACTIVE:
                    guest.state, guest.end = "stopped", lost_end(state, entry.get("pid"))
                    guest.ended_at = time.time()
                    self.log_event(guest, guest.end["reason"])
                elif state in STATES:
                    guest.state = state
            except (KeyError, TypeError) as err:
                problems.append(f"{self.state_file}: bad entry {entry!r}: {err}")
        self.save()
        return problems

    def save(self) -> None:
        entries = []
        for name in list(self.unloadable):
            if name in self.guests:  # a new guest of that name replaced it
                del self.unloadable[name]
        for guest in self.guests.values():
            entry = {"name": guest.name, "adhoc": guest.adhoc, "owner": guest.owner, "state": guest.state,
                     "end": guest.end, "error": guest.error, "pid": guest.pid, "started_at": guest.started_at,
                     "ended_at": guest.ended_at, "starts": guest.starts, "platform_note": guest.platform_note,
                     "platform": guest.platform}
            if guest.adhoc:
                entry.update(source=guest.definition.source, text=guest.definition.text)
            entries.append(entry)
        tmp = self.state_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"version": 1, "guests": entries, "unloadable": list(self.unloadable.values())}, f, indent=1)
        os.replace(tmp, self.state_file)

    # --- per-guest log file ---------------------------------------------------------------------------------
    def log_path(self, guest: Guest) -> Path:
        return self.log_dir / f"{guest.name}.log"

    def _log_file(self, guest: Guest):
        f = self._logs.get(guest.name)
        if f is None:
            path = self.log_path(guest)
            try:
                if path.stat().st_size > LOG_ROTATE_BYTES:
                    os.replace(path, path.with_suffix(".log.1"))
            except FileNotFoundError:
                pass
            f = self._logs[guest.name] = open(path, "ab", buffering=0)
            os.chmod(path, 0o640)
        return f

    def _append(self, guest: Guest, data: bytes) -> None:
        """Write to NAME.log; once it passes LOG_ROTATE_BYTES it becomes NAME.log.1 (replacing the previous
        one) and a new NAME.log begins, also while the guest runs. Never raises: a log is not worth a guest."""
        try:
            f = self._log_file(guest)
            f.write(data)
            if f.tell() > LOG_ROTATE_BYTES:
                self.close_log(guest)  # the next write opens NAME.log anew, rotating this one away
        except OSError:
            pass

    def log_event(self, guest: Guest, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._append(guest, f"\n--- vmmd {stamp}: {message}\n".encode(errors="replace"))

    def log_console(self, guest: Guest, data: bytes) -> None:
        if guest.definition.log_console:
            self._append(guest, data)

    def close_log(self, guest: Guest) -> None:
        f = self._logs.pop(guest.name, None)
        if f is not None:
            f.close()

    def remove(self, guest: Guest) -> list[Path]:
        """Forget an ad-hoc guest that is not active: its definition, last end and log files (returned)."""
        if not guest.adhoc or guest.state in ACTIVE:
            raise ValueError(f"guest {guest.name!r} is {'active' if guest.adhoc else 'defined by a file'}")
        self.close_log(guest)
        del self.guests[guest.name]
        removed = []
        for path in (self.log_path(guest), self.log_path(guest).with_suffix(".log.1")):
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
        self.save()
        return removed

    def read_log(self, guest: Guest, lines: int, max_bytes: int) -> bytes:
        """The last `lines` lines of the guest's log, as `tail -n` counts them (a last line without a newline
        counts), from at most the last `max_bytes` bytes."""
        path = self.log_path(guest)
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = size
                data = b""
                while start > 0 and size - start < max_bytes:
                    step = min(64 << 10, start, max_bytes - (size - start))
                    start -= step
                    f.seek(start)
                    data = f.read(step) + data
                    if data.count(b"\n", 0, len(data) - 1) >= lines:  # the last byte's newline ends the last line
                        break
        except FileNotFoundError:
            return b""
        if start > 0:  # the first line read may have begun before what was read: whole lines only
            data = data[data.find(b"\n") + 1:] if b"\n" in data[:-1] else b""
        return last_lines(data, lines)


def last_lines(data: bytes, lines: int) -> bytes:
    """The last `lines` lines of `data` (`tail -n`); a final line without a newline counts as one."""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    cut = end
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1:]
