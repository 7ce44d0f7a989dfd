"""One process per guest, forked from a warm zygote; the daemon never runs a vCPU itself.

Three parts:

- The **zygote** (`python -m vmmd.daemon.worker --zygote FD`, started once by the daemon): imports numpy,
  vmmd.machine and the platforms, probes the host once, then forks a worker for each request that arrives
  on FD (a SOCK_SEQPACKET socket carrying the worker's channel by SCM_RIGHTS), and reports each worker's
  wait status when it exits. Forking from a clean, single-threaded process (as Python's multiprocessing
  "forkserver" and Android's zygote do) keeps the daemon's sockets and event loop out of the workers.
- The **worker** (the forked child): waits idle on its channel until the daemon sends the guest's
  definition, then builds and runs the Machine, streams console bytes, takes console input and stop
  requests, and reports the VmResult. The daemon keeps a few idle workers ready (the warm pool), so
  `vmctl start` costs a message, not a Python start-up.
- **ZygoteClient** (daemon side, asyncio): spawns the zygote, hands out idle workers, refills the pool.

Channel messages (SOCK_SEQPACKET keeps boundaries): one type byte then the payload.
worker -> daemon: C console bytes, S started (JSON), R result (JSON), E build error (JSON).
daemon -> worker: G go (JSON definition), I console input bytes, Q stop (JSON reason); while an attested launch
waits for its owner also K inject and U resume, answered with A (vmmd/daemon/attested.py).
zygote <-> daemon: F fork (JSON {id} + fd), P forked (JSON {id, pid}), X exited (JSON {pid, status}).
Parent death is chained with PR_SET_PDEATHSIG (prctl(2)): daemon dies -> zygote dies -> workers die.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

MSG_CONSOLE, MSG_STARTED, MSG_RESULT, MSG_ERROR = b"C", b"S", b"R", b"E"
MSG_GO, MSG_INPUT, MSG_STOP = b"G", b"I", b"Q"
MSG_FORK, MSG_FORKED, MSG_EXITED = b"F", b"P", b"X"
MAX_MESSAGE = 64 * 1024
CONSOLE_CHUNK = 16 * 1024
REFILL_DELAY = 0.2  # seconds after a start before the pool forks its replacement
FLUSH_INTERVAL = 0.02  # seconds: console output without a newline (prompts) reaches the daemon this fast

PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1  # include/uapi/linux/prctl.h


def _prctl(option: int, arg: int | bytes) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, arg, 0, 0, 0)


def _die_with_parent(expected_parent: int) -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:  # the parent died before prctl took effect
        os._exit(1)


MAX_FDS = 2 + 4  # the firmware (or a kernel and its initrd) and up to vmmd.block.image.MAX_DISKS disk images


def send_fd(sock: socket.socket, payload: bytes, fd: int, *more: int) -> None:
    """One message with `fd` (and `more`) attached with SCM_RIGHTS, in that order."""
    sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd, *more]))])


def recv_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """A message and the descriptors that came with it (up to MAX_FDS), in the order they were sent."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    return data, list(fds)


def recv_fd(sock: socket.socket) -> tuple[bytes, int | None]:
    """A message and its first descriptor (any others are closed)."""
    data, fds = recv_fds(sock)
    for extra in fds[1:]:
        os.close(extra)
    return data, fds[0] if fds else None


# --- the worker (runs in the forked child) --------------------------------------------------------------------
class _ChannelOut:
    """A BinaryIO-like `out` for vmmd.devices.console.Console: every flush becomes C messages."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> int:
        for start in range(0, len(data), CONSOLE_CHUNK):
            self.sock.send(MSG_CONSOLE + data[start:start + CONSOLE_CHUNK])
        return len(data)

    def flush(self) -> None:
        pass


def _first_byte_flusher(console):
    """The UART's tx_sink: Console.write, except that the guest's very first byte is flushed at once.

    The console is line buffered (one channel message per line); a start's first sign of life should not
    wait for the end of the first line, which on sev-es-emu costs one GHCB exit per character."""
    state = {"first": True}
    write = console.write

    def sink(data: bytes) -> None:
        write(data)
        if state["first"]:
            state["first"] = False
            console.flush()

    return sink


def _send_json(sock: socket.socket, kind: bytes, obj: dict) -> None:
    sock.send(kind + json.dumps(obj).encode())


def run_worker(sock: socket.socket, warm: bool = True) -> int:
    """Wait for the go message, then build and run one guest; returns the process exit status."""
    from vmmd.devices.console import Console
    from vmmd.errors import ExitCode, VmmdError, VmStop
    from vmmd.machine.config import MachineConfig
    from vmmd.machine.console_input import PacedInput
    from vmmd.machine.machine import Machine
    from vmmd.platforms import select_platform

    if warm:
        _throwaway_run("sev-es-emu", run=True)
    while True:
        try:
            message, fds = recv_fds(sock)
        except InterruptedError:
            continue
        if not message:
            return 0  # the daemon let an idle worker go
        if message[:1] == MSG_GO:
            break
        for fd in fds:
            os.close(fd)
    t_go = time.monotonic()
    spec = json.loads(message[1:])
    name = spec["name"]
    # The daemon opened the firmware (for the requesting user: vmmd.daemon.auth.open_for) and sent the fd; the
    # path is only its name in messages. /proc/self/fd/N reopens that very file. Never open the path here: this
    # process is root and nobody checked the path for the requester.
    # Disk images likewise: opened (and checked for the requester) by the daemon, one fd each after the firmware's,
    # in the definition's order; the worker only locks and uses them (vmmd.block.image.open_disk with spec.fd).
    # A direct Linux boot sends its kernel and initrd the same way, in place of the firmware.
    disks_spec = spec.get("disks") or []
    boot_keys = ["kernel", *(["initrd"] if spec.get("initrd") else [])] if spec.get("kernel") else ["firmware"]
    if len(fds) != len(boot_keys) + len(disks_spec):
        for fd in fds:
            os.close(fd)
        _send_json(sock, MSG_ERROR, {"message": f"vmmd sent {len(fds)} file descriptors with the guest, not "
                                                f"{len(boot_keys) + len(disks_spec)} (vmmd bug)",
                                     "exit_code": int(ExitCode.VMM_ERROR)})
        return int(ExitCode.VMM_ERROR)
    from vmmd.block.image import DiskSpec

    boot = {key: f"/proc/self/fd/{fd}" for key, fd in zip(boot_keys, fds, strict=False)}
    disks = tuple(DiskSpec(d["path"], d["ro"], d["cache"], d["serial"], fd=fd)
                  for d, fd in zip(disks_spec, fds[len(boot_keys):], strict=True))

    def named(text: str) -> str:
        """Messages name the boot files as the definition does, not by their descriptors."""
        for key, proc_path in boot.items():
            fd = proc_path.rsplit("/", 1)[1]
            text = (text.replace(proc_path, spec[key])
                    .replace(f"{key} {fd} ", f"{key} {os.path.basename(spec[key])} "))
        return text

    _prctl(PR_SET_NAME, f"vmmd:{name}"[:15].encode())
    console = Console(_ChannelOut(sock), line_buffered=True)
    try:
        config = MachineConfig(firmware=boot.get("firmware"), memory_bytes=spec["memory_bytes"], cpus=spec["vcpus"],
                               platform=spec["platform"], timeout=spec["timeout"], guest_arg=spec["guest_arg"],
                               name=name, net=spec["net"], disks=disks, kernel=boot.get("kernel"),
                               initrd=boot.get("initrd"), append=spec.get("append")).validate()
        platform, note = select_platform(config.platform)
        policy_note = _apply_policy(platform, spec.get("policy"))
        from vmmd.daemon.attested import apply_launch_inputs, serve_paused

        apply_launch_inputs(platform, spec)
        machine = Machine(config, platform, _first_byte_flusher(console)).build()
    except VmmdError as err:
        _send_json(sock, MSG_ERROR, {"message": named(str(err)), "exit_code": int(err.exit_code)})
        return int(err.exit_code)
    except OSError as err:
        _send_json(sock, MSG_ERROR, {"message": named(f"{err.filename or ''}: {err.strerror or err}"),
                                     "exit_code": int(ExitCode.HOST_ERROR)})
        return int(ExitCode.HOST_ERROR)
    except Exception as err:  # a vmmd bug must not look like a guest problem
        _send_json(sock, MSG_ERROR, {"message": f"vmmd bug while building the guest: {type(err).__name__}: {err}",
                                     "exit_code": int(ExitCode.VMM_ERROR)})
        return int(ExitCode.VMM_ERROR)
    launch = getattr(platform, "launch_result", None)
    paused = getattr(platform, "paused", None)  # an attested launch waiting for its owner (vmmd/daemon/attested.py)
    _send_json(sock, MSG_STARTED, {"pid": os.getpid(), "platform": platform.name, "note": note,
                                   "policy": policy_note, "build_seconds": time.monotonic() - t_go,
                                   "digest": launch.expected_digest.hex() if launch is not None else None,
                                   "io_paths": machine.io_paths(),
                                   "attest": paused.info() if paused is not None else None})
    if paused is not None:
        ended = serve_paused(sock, machine, paused, MAX_MESSAGE, MSG_STOP)
        if ended is not None:
            return _report_end(sock, machine, ended)
    done = threading.Event()
    input_stats = {"received": 0}  # console input bytes received; paced.stored: those the UART took
    paced = PacedInput(machine.uart)

    def reader() -> None:
        while not done.is_set():
            try:
                data = sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                machine._record_stop(VmStop("interrupted", "vmmd closed the worker channel; VM stopped",
                                            ExitCode.INTERRUPTED))
                return
            if data[:1] == MSG_INPUT:
                input_stats["received"] += len(data) - 1
                paced.put(data[1:])  # a pasted line arrives at once; the guest reads 16 bytes at a time
            elif data[:1] == MSG_STOP:
                reason = json.loads(data[1:]).get("reason", "stopped by request")
                machine._record_stop(VmStop("stopped", reason, ExitCode.INTERRUPTED))

    def flusher() -> None:
        while not done.wait(FLUSH_INTERVAL):
            console.flush()

    threading.Thread(target=reader, name="channel", daemon=True).start()
    threading.Thread(target=flusher, name="console-flush", daemon=True).start()
    try:
        result = machine.run()
        payload = {"kind": result.kind, "reason": result.reason, "exit_code": int(result.exit_code),
                   "status": result.status, "seconds": result.seconds,
                   "details": {**result.details, "console_input_bytes": input_stats["received"],
                               "console_input_stored": paced.stored, "console_input_dropped": paced.dropped}}
    except Exception as err:
        payload = {"kind": "vmm-error", "reason": f"vmmd bug while running the guest: {type(err).__name__}: {err}",
                   "exit_code": int(ExitCode.VMM_ERROR), "status": None, "seconds": 0.0, "details": {}}
    done.set()
    paced.close()
    console.flush()
    return _report_end(sock, machine, payload)


def _report_end(sock, machine, payload: dict) -> int:
    """The guest's end to vmmd (which may be gone already), then the machine closed; the worker's exit status."""
    try:
        _send_json(sock, MSG_RESULT, payload)
    except OSError:
        pass
    machine.close()
    return payload["exit_code"] & 0xFF


def _apply_policy(platform, policy: int | None) -> str | None:
    """Put the definition's SEV policy into the platform's launch inputs where the platform takes one."""
    if policy is None:
        return None
    inputs = getattr(platform, "inputs", None)
    if inputs is not None and hasattr(inputs, "policy"):
        inputs.policy = policy
        return f"{policy:#x} applied"
    return f"{policy:#x} recorded; platform {platform.name} launches with its default policy"


def _worker_child(sock: socket.socket, zygote_pid: int) -> None:
    """Body of a forked worker: never returns."""
    code = 1
    try:
        _die_with_parent(zygote_pid)
        os.setpgid(0, 0)  # a Ctrl-C on the daemon's terminal is not a Ctrl-C for the guests
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = run_worker(sock)
    except BaseException as err:  # never let the child fall back into the zygote's loop
        try:
            print(f"vmmd worker {os.getpid()}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        except Exception:
            pass
    finally:
        os._exit(code)


# --- the zygote ---------------------------------------------------------------------------------------------
WARM_IMAGE = b"\xf4" * 16  # hlt: the guest of the throwaway warm-up runs


def _warm_up() -> None:
    """Pay every one-time cost in the zygote, once, instead of in each guest start: imports (numpy,
    vmmd.machine, the lazily imported SEV launch model), the host probe behind platform 'auto', and a
    throwaway build of a one-instruction guest on each software platform (module-level caches)."""
    import numpy  # noqa: F401  (guest-memory views of the virtio queues; the GHCB service no longer loads it)

    import vmmd.devices.console  # noqa: F401
    from vmmd.platforms import select_platform

    try:
        select_platform("auto")
    except Exception:
        pass
    try:
        import vmmd.sev.platform  # noqa: F401
        import vmmd.sev.vmgexit  # noqa: F401
    except ImportError:
        pass
    for name in ("sev-es-emu", "plain"):
        _throwaway_run(name, run=False)


def _throwaway_run(platform_name: str, run: bool) -> None:
    """Build (and with `run`, run to its HLT) a 2 MiB guest whose firmware is one hlt, then close it all.

    In the zygote this fills module caches. In a fresh idle worker it also takes, ahead of time, the
    copy-on-write faults and first-call costs of the build and run paths (measured: ~3-5 ms of a start),
    so the guest that arrives later starts at warm speed. Nothing survives: Machine.close() closes the VM,
    vCPUs and guest memory."""
    from vmmd.machine.config import MachineConfig
    from vmmd.machine.machine import Machine
    from vmmd.platforms import select_platform

    fd = -1
    try:
        fd = os.memfd_create("vmmd-warm-image", os.MFD_CLOEXEC)  # nothing left behind if we are killed
        os.write(fd, WARM_IMAGE)
        platform, _ = select_platform(platform_name)
        machine = Machine(MachineConfig(firmware=f"/proc/self/fd/{fd}", memory_bytes=2 << 20,
                                        platform=platform_name, timeout=2), platform, lambda data: None).build()
        try:
            if run:
                machine.run()
        finally:
            machine.close()
    except Exception as err:
        print(f"vmmd: warm-up on {platform_name} failed (starts will be slower): {err}", file=sys.stderr, flush=True)
    finally:
        if fd >= 0:
            os.close(fd)


def zygote_main(fd: int, daemon_pid: int) -> None:
    """Import everything a worker needs, then fork workers on request until the daemon goes away."""
    _die_with_parent(daemon_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _warm_up()
    import gc

    gc.collect()
    gc.freeze()  # objects made so far are never scanned again: forked workers do not copy their pages for gc
    ctl = socket.socket(fileno=fd)
    # Single-threaded: the SIGCHLD handler runs between bytecodes of this thread, and each send() of a
    # SOCK_SEQPACKET message is one whole message, so no lock is needed (a lock here could self-deadlock).

    def reap(signum=None, frame=None) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                _send_json(ctl, MSG_EXITED, {"pid": pid, "status": status})
            except OSError:
                os._exit(0)

    signal.signal(signal.SIGCHLD, reap)
    my_pid = os.getpid()
    while True:
        try:
            data, child_fd = recv_fd(ctl)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)
        if not data:
            os._exit(0)  # the daemon closed the control socket
        if data[:1] != MSG_FORK or child_fd is None:
            if child_fd is not None:
                os.close(child_fd)
            continue
        request = json.loads(data[1:])
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            ctl.close()
            _worker_child(socket.socket(fileno=child_fd), my_pid)
        os.close(child_fd)
        _send_json(ctl, MSG_FORKED, {"id": request["id"], "pid": pid})
        reap()


# --- daemon side ---------------------------------------------------------------------------------------------
@dataclass
class WorkerHandle:
    pid: int
    sock: socket.socket
    pidfd: int | None = None
    forked_at: float = field(default_factory=time.monotonic)
    zygote_pid: int | None = None  # the zygote that forked it: the worker dies with it (PR_SET_PDEATHSIG)

    def signal(self, sig: int) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, OSError):
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None


class ZygoteClient:
    """Daemon side of the zygote: a warm pool of idle workers and the exit statuses of all workers."""

    def __init__(self, pool_size: int, on_exit) -> None:
        self.pool_size = pool_size
        self.on_exit = on_exit  # callback(pid, wait_status)
        self.idle: list[WorkerHandle] = []
        self._pending: dict[int, tuple[socket.socket, asyncio.Future | None]] = {}
        self._next_id = 0
        self._proc: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_status: dict[int, int] = {}
        self.dead_zygotes: set[int] = set()  # pids of zygotes that died; their workers died with them
        self.restarts = 0
        self._closing = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the daemon speaks to systemd
        self._proc = subprocess.Popen([sys.executable, "-m", "vmmd.daemon.worker", "--zygote", str(theirs.fileno()),
                                       str(os.getpid())], pass_fds=[theirs.fileno()], env=env,
                                      stdin=subprocess.DEVNULL)
        theirs.close()
        ours.setblocking(False)
        self._ctl = ours
        loop.add_reader(ours.fileno(), self._on_readable)
        self.refill()

    @property
    def zygote_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def alive(self) -> bool:
        return self._ctl is not None and self._proc is not None and self._proc.poll() is None

    def _zygote_died(self) -> None:
        """The zygote is gone (killed, crashed): reap it, drop what depended on it, start another after a delay
        that grows with each death (0.5 s, 1 s, 2 s ... at most 30 s)."""
        self._loop.remove_reader(self._ctl.fileno())
        self._ctl.close()
        self._ctl = None
        pid = self._proc.pid
        try:
            status = self._proc.wait(2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            status = self._proc.wait()
        self.dead_zygotes.add(pid)
        for worker in self.idle:
            worker.close()
        self.idle = []
        for sock, future in self._pending.values():
            sock.close()
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"the vmmd zygote (pid {pid}) died"))
        self._pending.clear()
        if self._closing:
            return
        delay = min(30.0, 0.5 * 2 ** min(self.restarts, 6))
        self.restarts += 1
        print(f"vmmd: the zygote (pid {pid}) exited with status {status}; its workers died with it; starting a new "
              f"one in {delay:g} s", file=sys.stderr, flush=True)
        self._loop.call_later(delay, self._respawn)

    def _respawn(self) -> None:
        if self._closing or self._ctl is not None:
            return
        self.start(self._loop)

    def _request(self, future: asyncio.Future | None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._next_id += 1
        self._pending[self._next_id] = (ours, future)
        try:
            send_fd(self._ctl, MSG_FORK + json.dumps({"id": self._next_id}).encode(), theirs.fileno())
        except OSError as err:
            del self._pending[self._next_id]
            ours.close()
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"the vmmd zygote is gone: {err}"))
        finally:
            theirs.close()

    def refill(self) -> None:
        missing = self.pool_size - len(self.idle) - sum(1 for _, f in self._pending.values() if f is None)
        for _ in range(max(0, missing)):
            self._request(None)

    async def take(self) -> WorkerHandle:
        """An idle warm worker (forking one now when the pool is empty); the pool refills in the background."""
        if self._ctl is None:
            raise RuntimeError("the vmmd zygote died and is being restarted: try again in a few seconds")
        if self.idle:
            worker = self.idle.pop(0)
        else:
            future = self._loop.create_future()
            self._request(future)
            worker = await asyncio.wait_for(future, 10)
        # Refill a little later: forking now would compete for CPU with the guest being started.
        self._loop.call_later(REFILL_DELAY, self.refill)
        return worker

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._ctl.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._zygote_died()
                return
            body = json.loads(data[1:])
            if data[:1] == MSG_FORKED:
                sock, future = self._pending.pop(body["id"], (None, None))
                if sock is None:
                    continue
                try:
                    pidfd = os.pidfd_open(body["pid"])
                except OSError:
                    pidfd = None
                worker = WorkerHandle(body["pid"], sock, pidfd, zygote_pid=self.zygote_pid)
                if future is None:
                    self.idle.append(worker)
                elif not future.done():
                    future.set_result(worker)
                else:
                    worker.close()
            elif data[:1] == MSG_EXITED:
                self.exit_status[body["pid"]] = body["status"]
                for worker in [w for w in self.idle if w.pid == body["pid"]]:
                    self.idle.remove(worker)
                    worker.close()
                self.on_exit(body["pid"], body["status"])

    def close(self) -> None:
        self._closing = True
        for worker in self.idle:
            worker.close()
        self.idle = []
        if self._ctl is not None:
            if self._loop is not None:
                try:
                    self._loop.remove_reader(self._ctl.fileno())
                except (ValueError, OSError):
                    pass
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def describe_wait_status(status: int) -> tuple[str, str]:
    """(kind, reason) for a worker that ended without reporting a result."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return "killed", f"worker crashed (signal {sig}, {name})"
    if os.WIFEXITED(status):
        return "vmm-error", f"worker exited with status {os.WEXITSTATUS(status)} without reporting how the guest ended"
    return "vmm-error", f"worker ended with wait status {status:#x}"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--zygote":
        zygote_main(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print("usage: python -m vmmd.daemon.worker --zygote FD DAEMON_PID (started by vmmd)", file=sys.stderr)
        sys.exit(2)
