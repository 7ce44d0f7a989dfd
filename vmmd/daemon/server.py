"""The vmmd daemon: control socket, request dispatch, guest lifecycle; `main()` is the `vmmd` command.

One asyncio loop in one thread. Clients speak vmmd.daemon.protocol on a Unix socket; the caller is
identified by SO_PEERCRED (vmmd.daemon.auth) and owns what it starts. Guests run in worker processes
forked by the zygote (vmmd.daemon.worker); the daemon only moves bytes and records states, so a guest
that crashes, hangs or floods its console costs only its own worker. SIGTERM/SIGINT stop every guest
gracefully (stop request, then SIGKILL after --stop-timeout) and exit; SIGHUP rereads the definitions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import grp
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from vmmd.errors import ExitCode, VmmdError
from vmmd.machine.config import MAX_STOP_TIMEOUT_SECONDS, check_seconds

from . import protocol as P
from .attested import MSG_ANSWER, MSG_INJECT, MSG_RESUME
from .auth import AccessDenied, Peer, Policy, open_for, open_image_for, peer_of
from .definitions import DefinitionError, GuestDefinition, parse_definition
from .protocol import ACTIVE
from .registry import ConsoleRing, Guest, Registry
from .sdnotify import notify
from .worker import (
    MAX_MESSAGE,
    MSG_CONSOLE,
    MSG_ERROR,
    MSG_GO,
    MSG_INPUT,
    MSG_RESULT,
    MSG_STARTED,
    MSG_STOP,
    ZygoteClient,
    describe_wait_status,
    send_fd,
)

DEFAULT_DEFINITIONS = "/etc/vmmd/vms"
DEFAULT_STATE_DIR = "/var/lib/vmmd"
DEFAULT_LOG_DIR = "/var/log/vmmd"
MAX_WATCHER_BACKLOG = 1 << 20  # a console client this far behind is detached, the guest never waits for it
MAX_LOG_TAIL = 1 << 20  # bytes of a log one `vmctl log` may return
DEFAULT_LOG_LINES = 200
STATUS_LOST_AFTER = 2.0  # seconds to wait for the zygote's exit status once a worker channel closed
MAX_ADHOC_PER_UID = 64  # ad-hoc guests a non-root uid may keep defined (vmctl remove frees them)
MAX_CONNECTIONS_PER_UID = 64  # open control connections (console streams included) per non-root uid
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds a connection may wait before (or in the middle of) a request line


def _log(message: str) -> None:
    print(f"vmmd: {message}", file=sys.stderr, flush=True)


STATE_LOCK = "vmmd.lock"


def _lock_state_dir(state_dir: Path) -> int:
    """Take the state directory for this daemon (flock(2) on STATE_LOCK inside it, which holds our pid), or exit
    with a sentence naming the vmmd that has it: two daemons on one guests.json would overwrite each other's
    guests. The lock dies with the process, so a crashed vmmd never blocks the next one."""
    import fcntl

    path = state_dir / STATE_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(f"vmmd: the state directory {state_dir} is in use by another vmmd (pid {holder}); stop "
                         "it, or give this one its own --state-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.socket_path = Path(args.socket)
        self.registry = Registry(Path(args.definitions), Path(args.state_dir), Path(args.log_dir))
        self.group_gid, group_name = _resolve_group(args.group)
        self.policy = Policy(self.group_gid, group_name)
        self.zygote = ZygoteClient(args.pool, self._on_worker_exit)
        self.by_pid: dict[int, Guest] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.AbstractServer | None = None
        self.stopping = False
        self.done = asyncio.Event()
        self.clients: set[asyncio.StreamWriter] = set()
        self.connections_by_uid: dict[int, int] = {}
        self._save_failing = False

    # --- start-up -----------------------------------------------------------------------------------------
    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        for directory in (self.registry.state_dir, self.registry.log_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._state_lock = _lock_state_dir(self.registry.state_dir)  # held (fd open) for the daemon's lifetime
        if not self.registry.definitions_dir.is_dir():
            _log(f"the definitions directory {self.registry.definitions_dir} does not exist: no guests are defined "
                 "(create it, or pass --definitions)")
        for problem in self.registry.load():
            _log(problem)
        # pyroute2's synchronous API runs its own event loop: not inside this one (it would refuse), in a thread
        await self.loop.run_in_executor(None, self._sweep_network)
        self.zygote.start(self.loop)
        self.server = await self._listen()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, lambda s=sig: self.loop.create_task(self.shutdown(s)))
        self.loop.add_signal_handler(signal.SIGHUP, self._reload)
        _log(f"listening on {self.socket_path} (pid {os.getpid()}, group {self.policy.group_name or 'none: root only'}"
             f", {len(self.registry.guests)} guests defined, pool {self.args.pool})")
        notify("READY=1", f"MAINPID={os.getpid()}", self._status())
        await self.done.wait()
        return 0

    @staticmethod
    def _sweep_network() -> None:
        """Remove taps and bridges that workers of an earlier vmmd left behind (their owner pid is gone)."""
        try:
            from vmmd.net.tap import net_admin_unavailable_reason, sweep_stale_taps

            if net_admin_unavailable_reason() is None:
                removed = sweep_stale_taps()
                if removed:
                    _log(f"removed network links left by dead workers: {', '.join(removed)}")
        except Exception as err:  # noqa: BLE001 - a failed sweep must not keep the daemon from starting
            _log(f"could not sweep stale network links: {err}")

    async def _listen(self) -> asyncio.AbstractServer:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_socket():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale socket of a daemon that died
            else:
                raise SystemExit(f"vmmd: another vmmd is already listening on {path}")
            finally:
                probe.close()
        old_umask = os.umask(0o177)  # the socket is born 0600, then opened to the group: no window for others
        try:
            server = await asyncio.start_unix_server(self._client, str(path), limit=P.MAX_REQUEST)
        finally:
            os.umask(old_umask)
        if self.group_gid is not None:
            os.chown(path, 0 if os.geteuid() == 0 else -1, self.group_gid)
            os.chmod(path, 0o660)
        return server

    def _status(self) -> str:
        running = sum(1 for g in self.registry.guests.values() if g.state in ACTIVE)
        return f"STATUS={running} guests running, {len(self.registry.guests)} defined"

    def _reload(self) -> None:
        for error in self.registry.scan():
            _log(error)
        self.registry.save()

    # --- clients ----------------------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients.add(writer)
        counted: int | None = None  # the uid this connection is counted under
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            try:
                self.policy.check_connect(peer)
            except AccessDenied as err:
                await self._reply(writer, P.error("EPERM", str(err)))
                return
            open_now = self.connections_by_uid[peer.uid] = self.connections_by_uid.get(peer.uid, 0) + 1
            counted = peer.uid
            if open_now > MAX_CONNECTIONS_PER_UID and not peer.is_root:
                await self._reply(writer, P.error("EAGAIN", f"uid {peer.uid} already has {open_now - 1} connections "
                                                            f"to vmmd (the limit is {MAX_CONNECTIONS_PER_UID}, "
                                                            "console sessions included); close some first"))
                return
            while not self.stopping:
                try:
                    line = await asyncio.wait_for(reader.readuntil(b"\n"), self.args.idle_timeout)
                except TimeoutError:
                    await self._reply(writer, P.error("ETIMEDOUT", f"no complete request in "
                                                                   f"{self.args.idle_timeout:g} s; closing this "
                                                                   "connection"))
                    return
                except asyncio.IncompleteReadError as err:
                    if err.partial.strip():
                        await self._reply(writer, P.error("EINVAL", "request not terminated by a newline"))
                    return
                except asyncio.LimitOverrunError:
                    await self._reply(writer, P.error("EMSGSIZE", f"request exceeds the limit of {P.MAX_REQUEST} "
                                                                  "bytes; closing this connection"))
                    return
                if not line.strip():
                    continue
                try:
                    request = P.parse_request(line)
                except P.ProtocolError as err:
                    await self._reply(writer, P.error(err.errno, err.message))
                    continue
                stream = await self._dispatch(request, peer, writer)
                if stream is not None:
                    await self._stream(stream[0], stream[1], reader, writer)
                    return
        except (ConnectionError, OSError):
            pass
        except Exception as err:  # a daemon bug answers this client and spares the others
            _log(f"internal error serving a client: {type(err).__name__}: {err}")
            try:
                await self._reply(writer, P.error("EIO", f"vmmd internal error: {type(err).__name__}: {err}"))
            except Exception:
                pass
        finally:
            self.clients.discard(writer)
            if counted is not None:
                left = self.connections_by_uid[counted] - 1
                if left > 0:
                    self.connections_by_uid[counted] = left
                else:
                    del self.connections_by_uid[counted]
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict) -> None:
        writer.write(P.encode(reply))
        # a client that stops reading its replies is as idle as one that stops sending
        await asyncio.wait_for(writer.drain(), self.args.idle_timeout)

    async def _dispatch(self, request: dict, peer: Peer, writer: asyncio.StreamWriter) -> tuple[Guest, bool] | None:
        """Answer one request; returns (guest, replay) when the connection becomes the guest's console stream."""
        op = request["op"]
        try:
            if op == "ping":
                reply = P.ok(pid=os.getpid(), uid=peer.uid, version=1, zygote=self.zygote.zygote_pid,
                             zygote_alive=self.zygote.alive, zygote_restarts=self.zygote.restarts)
            elif op == "list":
                reply = P.ok(guests=[g.summary() for g in sorted(self.registry.guests.values(), key=lambda g: g.name)
                                     if peer.is_root or g.owner == peer.uid])
            elif op == "reload":
                self.policy.check_root(peer, "reload definitions")
                self._reload()
                reply = P.ok(errors=self.registry.definition_errors,
                             guests=sum(not g.adhoc for g in self.registry.guests.values()))
            elif op == "start":
                guest = await self._start(request, peer)
                if request.get("attach"):
                    await self._reply(writer, P.ok(guest=guest.summary(), stream=True))
                    return guest, request.get("replay", True)
                reply = P.ok(guest=guest.summary())
            else:
                guest = self._find(request["name"], peer, op)
                if op == "show":
                    reply = P.ok(guest=guest.detail())
                elif op == "stop":
                    reply = await self._stop(guest, request, peer)
                elif op == "log":
                    lines = request.get("lines", DEFAULT_LOG_LINES)
                    if lines < 1:
                        raise _RequestError("EINVAL", f"lines must be a positive number of lines, got {lines!r}")
                    log = self.registry.read_log(guest, lines, MAX_LOG_TAIL)
                    reply = P.ok(log=log.decode("utf-8", "replace"))
                elif op == "console":
                    await self._reply(writer, P.ok(guest=guest.summary(), stream=True))
                    return guest, request.get("replay", True)
                elif op == "remove":
                    reply = self._remove(guest)
                elif op in ("measurement", "inject-secret", "resume"):
                    reply = await self._attested(guest, op, request)
                else:
                    reply = P.error("EOPNOTSUPP", f"op {op!r} is not implemented")
        except AccessDenied as err:
            reply = P.error("EPERM", str(err))
        except _RequestError as err:
            reply = P.error(err.errno, err.message)
        await self._reply(writer, reply)
        return None

    def _remove(self, guest: Guest) -> dict:
        if not guest.adhoc:
            raise _RequestError("EOPNOTSUPP", f"guest {guest.name!r} is defined by {guest.definition.source}: root "
                                         "removes it by deleting that file and reloading vmmd (systemctl reload "
                                         "vmmd, or SIGHUP)")
        if guest.state in ACTIVE:
            raise _RequestError("EBUSY", f"guest {guest.name!r} is {guest.state}: `vmctl stop {guest.name}` first")
        summary = guest.summary()
        removed = self.registry.remove(guest)
        _log(f"{guest.name}: removed (ad-hoc guest of uid {guest.owner}; deleted {len(removed)} log file(s))")
        notify(self._status())
        return P.ok(guest=summary, removed_logs=[str(p) for p in removed])

    def _find(self, name: str, peer: Peer, action: str) -> Guest:
        guest = self.registry.guests.get(name)
        if guest is None:
            self.registry.scan()
            guest = self.registry.guests.get(name)
        if guest is None:
            skipped = [e for e in self.registry.definition_errors if f"{os.sep}{name}.toml:" in e]
            if skipped:  # the file is there but does not validate: say why, not "no such guest"
                raise _RequestError("EINVAL", f"guest {name!r} is not defined: {skipped[0]}")
            raise _RequestError("ENOENT", f"no guest named {name!r} (definitions are read from "
                                          f"{self.registry.definitions_dir}; `vmctl list` shows the known ones)")
        self.policy.check_owner(peer, guest.owner, action, name)
        return guest

    # --- starting ---------------------------------------------------------------------------------------
    async def _start(self, request: dict, peer: Peer) -> Guest:
        if self.stopping:
            raise _RequestError("ESHUTDOWN", "vmmd is shutting down")
        if "name" in request:
            guest = self._find(request["name"], peer, "start")
            if guest.state in ACTIVE:
                raise _RequestError("EBUSY", f"guest {guest.name!r} is already {guest.state} (pid {guest.pid})")
            boot_fds = self._open_boot_files(guest.definition, guest.adhoc, peer)
            disk_fds = self._open_disks(guest.definition, guest.adhoc, peer, boot_fds)
        else:
            parsed, existing = self._adhoc(request["definition"], peer)
            if existing is None and not peer.is_root:
                owned = sum(1 for g in self.registry.guests.values() if g.adhoc and g.owner == peer.uid)
                if owned >= MAX_ADHOC_PER_UID:  # each is kept (and saved) until removed
                    raise _RequestError("EDQUOT", f"uid {peer.uid} already has {owned} ad-hoc guests, the most one "
                                                  "user may keep: `vmctl remove` stopped ones first")
            boot_fds = self._open_boot_files(parsed, True, peer)  # refused: nothing was registered or replaced
            disk_fds = self._open_disks(parsed, True, peer, boot_fds)
            if existing is not None:
                existing.definition = parsed
                guest = existing
            else:
                guest = self.registry.guests[parsed.name] = Guest(parsed, adhoc=True,
                                                                  ring=ConsoleRing(parsed.ring_bytes))
        try:
            return await self._start_worker(guest, peer, boot_fds, disk_fds)
        finally:
            for fd in (*boot_fds, *disk_fds):
                os.close(fd)

    def _open_disks(self, definition: GuestDefinition, adhoc: bool, peer: Peer, boot_fds: list[int]) -> list[int]:
        """The guest's disk images, opened here for the requesting peer (auth.open_image_for: the same pinned-fd
        rule as firmware, plus write permission for a writable disk) and handed to the worker, which locks them.
        On a refusal every fd opened so far, `boot_fds` included, is closed."""
        fds: list[int] = []
        try:
            for i, disk in enumerate(definition.disks):
                where = f"{definition.source}: key 'disk[{i}]'"
                try:
                    fds.append(open_image_for(disk.path, peer if adhoc else None, not disk.read_only))
                except AccessDenied as err:
                    raise AccessDenied(f"{where}: {err}; vmmd opens images only as their caller could") from None
                except OSError as err:
                    from vmmd.block.image import open_error_sentence

                    raise _RequestError("EINVAL", f"{where}: {open_error_sentence(disk, err)}") from None
        except BaseException:
            for fd in (*boot_fds, *fds):
                os.close(fd)
            raise
        return fds

    def _owner_inputs(self, definition: GuestDefinition, adhoc: bool, peer: Peer) -> dict:
        """An attested launch's inputs for the worker: attest, and the guest owner's DH certificate and session
        blob read here (for an ad-hoc guest as its caller, as the firmware is) and checked (base64, sizes)."""
        from vmmd.sev.attest import check_dh_cert, check_session

        fields: dict = {"attest": definition.attest}
        for key, check in (("dh_cert", check_dh_cert), ("session", check_session)):
            path = getattr(definition, key)
            if path is None:
                continue
            where = f"{definition.source}: key '{key}'"
            try:
                fd = open_for(str(path), peer if adhoc else None)
            except AccessDenied as err:
                raise AccessDenied(f"{where}: {err}") from None
            except OSError as err:
                raise _RequestError("EINVAL", f"{where}: cannot open {path}: {err.strerror}") from None
            try:
                with os.fdopen(fd, "rb") as f:
                    data = f.read(64 << 10)
            except OSError as err:
                raise _RequestError("EINVAL", f"{where}: cannot read {path}: {err.strerror}") from None
            try:
                fields[f"{key}_b64"] = base64.b64encode(check(data, path)).decode()
            except VmmdError as err:
                raise _RequestError("EINVAL", f"{where}: {err}") from None
        return fields

    async def _attested(self, guest: Guest, op: str, request: dict) -> dict:
        """measurement / inject-secret / resume of an attested launch waiting for its owner (the caller is the
        guest's owner or root: _find checked)."""
        info = guest.attest
        if guest.state not in ACTIVE or info is None:
            if guest.state == "starting":
                raise _RequestError("EAGAIN", f"guest {guest.name!r} is still starting: its launch has not been "
                                              "measured yet; try again in a moment")
            why = "is not running" if guest.state not in ACTIVE else "was not started with attest = true"
            raise _RequestError("EOPNOTSUPP" if guest.state in ACTIVE else "ESRCH",
                                f"guest {guest.name!r} {why}: there is no attested launch to "
                                f"{'read' if op == 'measurement' else op.replace('-', ' ')}")
        if op == "measurement":
            return P.ok(guest=guest.name, attest=info)
        if info.get("state") == "RUNNING":
            raise _RequestError("EALREADY", f"guest {guest.name!r} was resumed (LAUNCH_FINISH ran): "
                                            + ("a secret can only be injected before `vmctl resume`"
                                               if op == "inject-secret" else "it is running already"))
        if guest.attest_answer is not None and not guest.attest_answer.done():
            raise _RequestError("EBUSY", f"guest {guest.name!r} is answering another request; try again")
        if op == "inject-secret":
            message = MSG_INJECT + json.dumps({k: request[k] for k in ("header", "secret", "gpa")
                                               if k in request}).encode()
        else:
            message = MSG_RESUME
        guest.attest_answer = self.loop.create_future()
        try:
            guest.worker.sock.send(message)
        except OSError as err:
            raise _RequestError("EIO", f"guest {guest.name!r}'s worker did not take the request: {err}") from None
        try:
            answer = await asyncio.wait_for(asyncio.shield(guest.attest_answer), 60)
        except TimeoutError:
            raise _RequestError("ETIMEDOUT", f"guest {guest.name!r}'s worker did not answer in 60 s") from None
        finally:
            guest.attest_answer = None
        if not answer.get("ok"):
            raise _RequestError(answer.get("errno", "EINVAL"), answer.get("error", "refused"))
        if op == "resume":
            self.registry.log_event(guest, "attested launch: LAUNCH_FINISH; the guest runs")
        else:
            self.registry.log_event(guest, f"attested launch: secret injected ({answer['injected']['length']} bytes "
                                           f"at {answer['injected']['gpa']:#x})")
        return P.ok(guest=guest.name, attest=guest.attest, **({"injected": answer["injected"]}
                                                               if "injected" in answer else {}))

    def _open_boot_files(self, definition: GuestDefinition, adhoc: bool, peer: Peer) -> list[int]:
        """The guest's firmware, or its kernel and initrd (definition.boot_files), opened here and handed to the
        worker as fds. An ad-hoc guest's files are opened for the requesting peer (auth.open_for): each must be a
        file that peer can read, checked on the file opened, so nothing can be swapped in between; the
        definitions directory is root's choice. On a refusal nothing stays open."""
        fds: list[int] = []
        try:
            for key, path in definition.boot_files:
                where = f"{definition.source}: key '{key}'"
                try:
                    fds.append(open_for(str(path), peer if adhoc else None))
                except AccessDenied as err:
                    raise AccessDenied(f"{where}: {err}; vmmd loads {key} files only from files its caller could "
                                       "read") from None
                except OSError as err:  # a definition naming a file that cannot be loaded: vmctl's exit 3
                    raise _RequestError("EINVAL", f"{where}: cannot open {path}: {err.strerror}") from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    async def _start_worker(self, guest: Guest, peer: Peer, boot_fds: list[int], disk_fds: list[int] = ()) -> Guest:
        guest.state, guest.error, guest.end, guest.result, guest.build_error = "starting", None, None, None, None
        guest.stop_mode = guest.stop_reason = None
        guest.channel_closed, guest.exit_status, guest.pid = False, None, None
        guest.ring = ConsoleRing(guest.definition.ring_bytes)
        guest.start_mono, guest.started_at, guest.ended_at = time.monotonic(), time.time(), None
        guest.first_byte_seconds = guest.platform = None
        guest.attest = guest.attest_answer = None
        guest.starts += 1
        this_start = guest.starts
        try:
            worker = await self.zygote.take()
        except Exception as err:
            why = f"no worker process could be started: {err or type(err).__name__}"
            if guest.starts == this_start and guest.state in ACTIVE:
                self._fail(guest, why)
            raise _RequestError("EAGAIN", why) from None
        if guest.starts != this_start or guest.state not in ACTIVE:  # stopped (and maybe restarted) meanwhile
            worker.close()
            raise _RequestError("ECANCELED", f"guest {guest.name!r} was stopped before it started")
        guest.worker, guest.pid = worker, worker.pid
        self.by_pid[worker.pid] = guest
        worker.sock.setblocking(False)
        self.loop.add_reader(worker.sock.fileno(), self._on_worker_readable, guest)
        spec = {**guest.definition.summary(), "policy": guest.definition.policy,
                **self._owner_inputs(guest.definition, guest.adhoc, peer)}
        try:
            send_fd(worker.sock, MSG_GO + json.dumps(spec).encode(), *boot_fds, *disk_fds)
        except OSError as err:
            self._fail(guest, f"worker {worker.pid} did not take the guest: {err}")
            raise _RequestError("EIO", guest.error) from None
        self.registry.log_event(guest, f"starting (worker pid {worker.pid}, requested by uid {peer.uid}, "
                                       f"definition {guest.definition.source})")
        self._changed()
        return guest

    def _adhoc(self, definition: dict, peer: Peer) -> tuple[GuestDefinition, Guest | None]:
        """Validate an ad-hoc definition for `peer`; returns it and the ad-hoc guest of that name it would
        replace (None: a new guest). Changes nothing."""
        source = definition["path"]
        path = Path(source)
        try:
            parsed = parse_definition(definition["text"], source, path.stem, peer.uid, path.parent)
        except DefinitionError as err:
            raise _RequestError("EINVAL", str(err)) from None
        if not peer.is_root and parsed.owner != peer.uid:
            raise AccessDenied(f"{source}: key 'owner': uid {peer.uid} may not start a guest owned by uid "
                               f"{parsed.owner}; only root may")
        existing = self.registry.guests.get(parsed.name)
        if existing is not None:
            if not existing.adhoc:
                raise _RequestError("EEXIST", f"{source}: key 'name': {parsed.name!r} is defined by "
                                              f"{existing.definition.source}; start it by name or rename this one")
            self.policy.check_owner(peer, existing.owner, "replace", parsed.name)
            if existing.state in ACTIVE:
                raise _RequestError("EBUSY", f"guest {parsed.name!r} is already {existing.state} "
                                             f"(pid {existing.pid})")
        return parsed, existing

    def _fail(self, guest: Guest, error: str) -> None:
        guest.state, guest.error, guest.ended_at = "failed", error, time.time()
        self.registry.log_event(guest, f"failed: {error}")
        self._release(guest)
        self._wake_waiters(guest)  # a stop waiting for this guest's end has it now
        self._changed()

    def _changed(self) -> None:
        """Persist now (a small JSON file, renamed into place, no fsync: well under a millisecond), so a daemon
        killed at any moment leaves the states it had reported. A failed save (disk full, no descriptors) is
        logged and retried at the next change; it never fails the request whose action already happened."""
        try:
            self.registry.save()
            if self._save_failing:
                _log("saving the guest states works again")
                self._save_failing = False
        except (OSError, ValueError) as err:
            if not self._save_failing:
                _log(f"could not save the guest states to {self.registry.state_file}: {err}; retrying at the "
                     "next change")
            self._save_failing = True
        notify(self._status())

    # --- worker messages --------------------------------------------------------------------------------
    def _on_worker_readable(self, guest: Guest) -> None:
        worker = guest.worker
        if worker is None:
            return
        while True:
            try:
                data = worker.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._channel_closed(guest)
                return
            kind, body = data[:1], data[1:]
            if kind == MSG_CONSOLE:
                self._console(guest, body)
            elif kind == MSG_STARTED:
                info = json.loads(body)
                guest.platform_note, guest.digest, guest.policy_note = info["note"], info["digest"], info["policy"]
                guest.io_paths = info.get("io_paths")
                guest.platform = info["platform"]
                guest.build_seconds = info.get("build_seconds")
                guest.attest = info.get("attest")
                if guest.attest is not None:
                    simulated = " (by the simulated PSP: proves nothing about this host)" \
                        if guest.attest.get("simulated") else ""
                    self.registry.log_event(guest, f"attested launch: measured{simulated}, waiting for the guest "
                                                   "owner (vmctl measurement / inject-secret / resume)")
                if guest.state == "starting":
                    guest.state = "running"
                self.registry.log_event(guest, f"running: {info['note']}")
                if guest.stop_mode is not None:  # a stop arrived while it was being built
                    self._send_stop(guest)
                self._changed()
            elif kind == MSG_ANSWER:
                answer = json.loads(body)
                if answer.get("info"):
                    guest.attest = answer["info"]
                if guest.attest_answer is not None and not guest.attest_answer.done():
                    guest.attest_answer.set_result(answer)
            elif kind == MSG_RESULT:
                guest.result = json.loads(body)
            elif kind == MSG_ERROR:
                guest.build_error = json.loads(body)

    def _console(self, guest: Guest, data: bytes) -> None:
        if guest.first_byte_seconds is None and guest.start_mono is not None:
            guest.first_byte_seconds = time.monotonic() - guest.start_mono
        guest.ring.append(data)
        self.registry.log_console(guest, data)
        for writer in list(guest.watchers):
            if writer.transport.get_write_buffer_size() > MAX_WATCHER_BACKLOG:
                guest.watchers.discard(writer)
                writer.close()  # too slow: detach it rather than buffer without bound
                continue
            writer.write(data)

    def _channel_closed(self, guest: Guest) -> None:
        worker = guest.worker
        if worker is not None and not guest.channel_closed:
            guest.channel_closed = True
            try:
                self.loop.remove_reader(worker.sock.fileno())
            except (ValueError, OSError):
                pass
            if guest.exit_status is not None:
                self._finish(guest)
            else:
                self.loop.call_later(STATUS_LOST_AFTER, self._status_timeout, guest, worker)

    def _status_timeout(self, guest: Guest, worker) -> None:
        if guest.worker is worker and guest.exit_status is None:
            self._finish(guest)

    def _on_worker_exit(self, pid: int, status: int) -> None:
        guest = self.by_pid.get(pid)
        if guest is None or guest.pid != pid:
            return
        guest.exit_status = status
        if guest.worker is not None:
            self._on_worker_readable(guest)  # drain what the worker sent before it exited
            self._channel_closed(guest)
        if guest.channel_closed and guest.state in ACTIVE:
            self._finish(guest)

    def _finish(self, guest: Guest) -> None:
        if guest.state not in ACTIVE:
            return
        guest.ended_at = time.time()
        if guest.build_error is not None:
            guest.state, guest.error = "failed", guest.build_error["message"]
            self.registry.log_event(guest, f"failed: {guest.error}")
        else:
            if guest.result is not None:
                end = dict(guest.result)
            elif guest.stop_mode in ("force", "kill"):
                end = {"kind": "killed", "reason": guest.stop_reason or "killed (SIGKILL)", "status": None,
                       "seconds": None, "exit_code": int(ExitCode.INTERRUPTED)}
            elif guest.exit_status is None and guest.worker is not None and \
                    guest.worker.zygote_pid in self.zygote.dead_zygotes:
                end = {"kind": "killed", "reason": f"the vmmd zygote (pid {guest.worker.zygote_pid}) died and its "
                                                   "worker with it (PR_SET_PDEATHSIG)", "status": None,
                       "seconds": None, "exit_code": int(ExitCode.INTERRUPTED)}
            elif guest.exit_status is None:
                end = {"kind": "vmm-error", "reason": "worker exited; its exit status was not observed "
                                                      "(the zygote is gone)", "status": None, "seconds": None,
                       "exit_code": int(ExitCode.VMM_ERROR)}
            else:
                kind, reason = describe_wait_status(guest.exit_status)
                end = {"kind": kind, "reason": reason, "status": None, "seconds": None,
                       "exit_code": int(ExitCode.INTERRUPTED if kind == "killed" else ExitCode.VMM_ERROR)}
            guest.end = end
            guest.state = "stopped"
            self.registry.log_event(guest, f"ended ({end['kind']}): {end['reason']}")
        self._release(guest)
        for writer in list(guest.watchers):
            writer.close()
        guest.watchers.clear()
        self._wake_waiters(guest)
        self._changed()

    @staticmethod
    def _wake_waiters(guest: Guest) -> None:
        """Resolve every _wait_end() of this guest: it has ended (or failed to start)."""
        for waiter in guest.waiters:
            if not waiter.done():
                waiter.set_result(None)
        guest.waiters.clear()

    def _release(self, guest: Guest) -> None:
        if guest.attest_answer is not None and not guest.attest_answer.done():
            guest.attest_answer.set_result({"ok": False, "errno": "ESRCH", "error": f"guest {guest.name!r} ended "
                                                                                   "before it answered"})
        worker, guest.worker = guest.worker, None
        if worker is not None:
            try:
                self.loop.remove_reader(worker.sock.fileno())
            except (ValueError, OSError):
                pass
            self.by_pid.pop(worker.pid, None)
            worker.close()
        self.registry.close_log(guest)

    # --- stopping ---------------------------------------------------------------------------------------
    def _send_stop(self, guest: Guest) -> None:
        if guest.worker is None:
            return
        try:
            guest.worker.sock.send(MSG_STOP + json.dumps({"reason": guest.stop_reason}).encode())
        except OSError:
            pass

    def _kill(self, guest: Guest, reason: str) -> None:
        """SIGKILL the guest's worker, recording why so the end names it. (A start still waiting for a worker
        has none; _stop ends such a guest itself.)"""
        guest.stop_mode, guest.stop_reason = "kill", reason
        self.registry.log_event(guest, reason)
        if guest.worker is not None:
            guest.worker.signal(signal.SIGKILL)

    async def _wait_end(self, guest: Guest, timeout: float) -> bool:
        if guest.state not in ACTIVE:
            return True
        waiter = self.loop.create_future()
        guest.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except TimeoutError:
            return False

    async def _stop(self, guest: Guest, request: dict, peer: Peer) -> dict:
        if guest.state not in ACTIVE:
            raise _RequestError("EALREADY", f"guest {guest.name!r} is not running (state {guest.state})")
        try:
            timeout = check_seconds(request.get("timeout", self.args.stop_timeout), "the stop timeout",
                                    MAX_STOP_TIMEOUT_SECONDS)
        except VmmdError as err:
            raise _RequestError("EINVAL", str(err)) from None
        if guest.worker is None:  # a start still waiting for a worker: end it here, it never runs
            force = bool(request.get("force"))
            guest.stop_mode = "kill" if force else "stop"
            guest.stop_reason = (f"{'killed by vmctl stop --force' if force else 'stopped by vmctl stop'} "
                                 f"(uid {peer.uid}) before it started")
            guest.result = {"kind": "killed" if force else "stopped", "reason": guest.stop_reason, "status": None,
                            "seconds": None, "exit_code": int(ExitCode.INTERRUPTED)}
            self.registry.log_event(guest, guest.stop_reason)
            self._finish(guest)
            return P.ok(guest=guest.summary())
        if request.get("force"):
            guest.state = "stopping"
            if guest.stop_mode != "kill":  # a second force changes nothing
                self._kill(guest, f"killed by vmctl stop --force (SIGKILL, uid {peer.uid})")
        else:
            if guest.stop_mode is None:  # the first stop request; later ones wait for it (never downgrade a kill)
                guest.state, guest.stop_mode = "stopping", "stop"
                guest.stop_reason = f"stopped by vmctl stop (uid {peer.uid})"
                self.registry.log_event(guest, f"stop requested by uid {peer.uid}")
                self._send_stop(guest)
                self._changed()
            if not await self._wait_end(guest, timeout) and guest.stop_mode == "stop":
                self._kill(guest, f"did not stop within {timeout:g} s of vmctl stop; killed (SIGKILL)")
        await self._wait_end(guest, 10.0)
        return P.ok(guest=guest.summary())

    # --- console streams ------------------------------------------------------------------------------
    async def _stream(self, guest: Guest, replay: bool, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """Ring buffer (when `replay`), then live output until the guest ends; client bytes go to the UART."""
        if replay:
            writer.write(guest.ring.contents())
        if guest.state not in ACTIVE:
            await writer.drain()
            return
        guest.watchers.add(writer)
        try:
            while guest.state in ACTIVE and writer in guest.watchers:
                data = await reader.read(4096)
                if not data:
                    return
                if guest.worker is not None and guest.state in ACTIVE:
                    try:
                        guest.worker.sock.send(MSG_INPUT + data)
                    except OSError:
                        pass
        finally:
            guest.watchers.discard(writer)

    # --- shutdown ---------------------------------------------------------------------------------------
    async def shutdown(self, signum: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        name = signal.Signals(signum).name
        notify("STOPPING=1", f"STATUS=stopping guests ({name})")
        _log(f"{name}: stopping guests (deadline {self.args.stop_timeout:g} s)")
        self.server.close()
        active = [g for g in self.registry.guests.values() if g.state in ACTIVE]
        for guest in active:
            guest.state, guest.stop_mode = "stopping", "shutdown"
            guest.stop_reason = f"stopped by vmmd shutdown ({name})"
            self.registry.log_event(guest, guest.stop_reason)
            self._send_stop(guest)
        self.registry.save()
        await asyncio.gather(*(self._wait_end(g, self.args.stop_timeout) for g in active))
        for guest in active:
            if guest.state in ACTIVE:
                self._kill(guest, f"did not stop within {self.args.stop_timeout:g} s of vmmd shutdown; "
                                  "killed (SIGKILL)")
        await asyncio.gather(*(self._wait_end(g, STATUS_LOST_AFTER + 1) for g in active))
        for writer in list(self.clients):
            writer.close()
        self.zygote.close()
        for guest in list(self.registry.guests.values()):
            self.registry.close_log(guest)
        self.registry.save()
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        _log("stopped")
        self.done.set()


class _RequestError(Exception):
    def __init__(self, errno: str, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


def _resolve_group(group: str | None) -> tuple[int | None, str | None]:
    if group is None or group == "":
        return None, None
    if group.isdigit():
        gid = int(group)
        try:
            return gid, grp.getgrgid(gid).gr_name
        except KeyError:
            return gid, str(gid)
    try:
        return grp.getgrnam(group).gr_gid, group
    except KeyError:
        raise SystemExit(f"vmmd: --group {group!r}: no such group (create it, e.g. groupadd {group})") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vmmd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmmd", description="The vmmd daemon: runs guests for vmctl, one worker "
                                     "process per guest. See docs/daemon.md.")
    parser.add_argument("--version", action="version", version=f"vmmd {_version()}")
    parser.add_argument("--socket", default=os.environ.get(P.SOCKET_ENV, P.DEFAULT_SOCKET),
                        help=f"control socket path (default {P.DEFAULT_SOCKET}, or ${P.SOCKET_ENV})")
    parser.add_argument("--definitions", default=DEFAULT_DEFINITIONS, help="directory of NAME.toml guest definitions")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where guests.json is kept across restarts")
    parser.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help="per-guest log files NAME.log")
    parser.add_argument("--group", default=None,
                        help="group (name or gid) whose members may manage their own guests; the socket is "
                             "made 0660 root:GROUP (without it: 0600, root only)")
    parser.add_argument("--pool", type=int, default=4, help="idle warm worker processes kept ready (default 4)")
    parser.add_argument("--stop-timeout", type=float, default=10.0,
                        help="seconds a guest gets to stop before SIGKILL (vmctl stop, daemon shutdown)")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                        help="seconds a control connection may sit without a complete request before it is "
                             f"closed (default {DEFAULT_IDLE_TIMEOUT:g}; console streams are not affected)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.pool < 0 or args.pool > 256:
        raise SystemExit("vmmd: --pool must be 0..256")
    try:
        check_seconds(args.idle_timeout, "--idle-timeout", 86400)
        check_seconds(args.stop_timeout, "--stop-timeout", MAX_STOP_TIMEOUT_SECONDS)
    except VmmdError as err:
        raise SystemExit(f"vmmd: {err}") from None
    daemon = Daemon(args)
    sys.exit(asyncio.run(daemon.run()))


if __name__ == "__main__":
    main()
