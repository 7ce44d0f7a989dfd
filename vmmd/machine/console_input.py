"""Serial console input for foreground runs: bytes from a terminal (or a pipe) into the guest's UART.

When standard input is a terminal it is switched to vmmd.terminal's console mode
(character at a time, no echo or signal keys, output processing on), so every key
goes to the guest; Ctrl-] stops the VM. The terminal is restored however the run
ends.
"""

from __future__ import annotations

import collections
import os
import select
import threading
from collections.abc import Callable

from vmmd.terminal import ESCAPE_BYTE, enter_character_mode, restore


def feed_paced(uart, data: bytes, stop: threading.Event) -> int:
    """Feed `data` to the UART's receiver no faster than the guest reads it, as a terminal's typing would: a
    pasted line must not overrun the 16-byte FIFO. Returns the bytes stored; gives up when `stop` is set."""
    stored = 0
    while data and not stop.is_set():
        room = uart.rx_room()
        if room <= 0:
            stop.wait(0.001)  # the guest has not read the FIFO yet: wait rather than overrun it
            continue
        taken = uart.feed(data[:room])
        stored += taken
        data = data[max(taken, 1):]
    return stored


class PacedInput:
    """Console input that arrives in bursts (the daemon's console clients) fed to the UART from its own thread,
    paced by feed_paced(). At most `limit` bytes wait; more are dropped and counted."""

    def __init__(self, uart, limit: int = 1 << 20) -> None:
        self.uart = uart
        self.limit = limit
        self.stored = 0
        self.dropped = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-paced-input", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        with self._lock:
            room = self.limit - self._pending_bytes
            if len(data) > room:
                self.dropped += len(data) - max(room, 0)
                data = data[:max(room, 0)]
            if data:
                self._pending.append(data)
                self._pending_bytes += len(data)
                self._lock.notify()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                while not self._pending and not self._stop.is_set():
                    self._lock.wait(0.5)
                if self._stop.is_set():
                    return
                data = self._pending.popleft()
                self._pending_bytes -= len(data)
            self.stored += feed_paced(self.uart, data, self._stop)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify()
        self._thread.join(2)


class ConsoleInput:
    def __init__(self, fd: int, uart, on_escape: Callable[[], None]) -> None:
        self.fd = fd
        self.uart = uart
        self.on_escape = on_escape
        self._saved = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="console-input", daemon=True)

    def start(self) -> ConsoleInput:
        if os.isatty(self.fd):
            self._saved = enter_character_mode(self.fd)
        self._thread.start()
        return self

    def _pump(self) -> None:
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self.fd], [], [], 0.2)
                if not ready:
                    continue
                data = os.read(self.fd, 256)
                if not data:
                    return  # end of input: the guest keeps running, it just gets no more bytes
                if ESCAPE_BYTE in data:
                    data = data[:data.index(ESCAPE_BYTE)]
                    self._feed(data)
                    self.on_escape()
                    return
                self._feed(data)
        except OSError:
            return

    def _feed(self, data: bytes) -> None:
        feed_paced(self.uart, data, self._stop)

    def close(self) -> None:
        self._stop.set()
        if self._saved is not None:
            restore(self.fd, self._saved)
            self._saved = None
