"""The host end of the serial console: buffers guest output and writes it out per line.

`Console.write` is the `tx_sink` of the UART (vmmd.devices.uart.Uart16550): it is
called once per guest byte, so it only appends to a bytearray. The buffer goes
to `out` (normally sys.stdout.buffer) when a newline arrives, when it reaches
`max_buffer` bytes, on every write when `line_buffered=False` (interactive use:
prompts without a newline must show at once), and on `flush()`, which the run
loop calls when the VM stops. Output is written as raw bytes: the guest's bytes
reach the terminal unchanged.

With `threaded=True` (vmctl run) the writes to `out` happen on a writer thread: see
Console.__init__ and release().

A tail of the output can be kept in memory (`capture=N` bytes) for tests and for
error reports ("last lines the guest printed"). If `out` fails (closed pipe),
output to it stops and the console keeps counting and capturing: a host-side
write error never stops the guest.
"""

from __future__ import annotations

import collections
import threading
from typing import BinaryIO


class Console:
    """Line-buffered sink for guest serial output."""

    def __init__(self, out: BinaryIO | None = None, *, line_buffered: bool = True, capture: int = 0,
                 max_buffer: int = 4096, threaded: bool = False, max_pending: int = 1 << 20) -> None:
        self.out = out
        self.line_buffered = line_buffered
        self.capture_limit = capture
        self.max_buffer = max_buffer
        self.out_error: OSError | None = None  # first error writing to `out`, after which `out` is left alone
        self._threshold = max_buffer if line_buffered else 1
        self._buf = bytearray()
        self._flushed = 0
        self._last_byte = b"\n"  # the last byte flushed: "\n" when the output is at the start of a line
        self._captured = bytearray()
        self._flush_lock = threading.Lock()
        # threaded: a writer thread does the writes to `out`, so a reader that stops reading (a paused pager, a
        # full pipe) holds vCPU threads back only while the VM runs: they wait while `max_pending` bytes are
        # queued, and stop waiting once release() is called (the VM stops), so stops and timeouts still land.
        self._pump = _OutputPump(self, max_pending) if threaded and out is not None else None

    def write(self, data: bytes) -> None:
        # Hot path, once per guest byte: no lock (a threading.Lock costs ~300 ns a round trip here). `+=` on a
        # bytearray is one C call under the GIL, and flushing only ever removes the prefix it wrote, so bytes
        # appended by another vCPU thread meanwhile are kept.
        buf = self._buf
        buf += data
        if b"\n" in data or len(buf) >= self._threshold:
            self.flush()

    def flush(self) -> None:
        with self._flush_lock:
            buf = self._buf
            count = len(buf)
            if not count:
                return
            data = bytes(buf[:count])
            del buf[:count]
            self._flushed += count
            self._last_byte = data[-1:]
            if self.capture_limit:
                self._captured += data
                if len(self._captured) > 2 * self.capture_limit:  # trim rarely, not on every line
                    del self._captured[:-self.capture_limit]
            if self._pump is not None:
                self._pump.put(data)
            elif self.out is not None and self.out_error is None:
                self._write_out(data)

    def _write_out(self, data: bytes) -> None:
        try:
            self.out.write(data)
            self.out.flush()
        except OSError as error:
            self.out_error = error
        except ValueError as error:  # write to a closed file object
            self.out_error = OSError(str(error))

    def release(self) -> None:
        """Threaded: writers no longer wait for the reader (the VM is stopping); output is still delivered."""
        if self._pump is not None:
            self._pump.release()

    def drain(self) -> None:
        """Flush, and (threaded) wait until everything reached `out` or failed: the end of a run. Ctrl-C
        (KeyboardInterrupt) interrupts the wait."""
        self.flush()
        if self._pump is not None:
            self._pump.drain()

    @property
    def ends_mid_line(self) -> bool:
        """The output so far does not end with a newline (a line written after it would continue it)."""
        last = self._buf[-1:] or self._last_byte
        return last != b"\n"

    @property
    def bytes_written(self) -> int:
        """Bytes received from the guest so far (flushed or not)."""
        return self._flushed + len(self._buf)

    @property
    def captured(self) -> bytes:
        """The last `capture` bytes the guest printed, including any not yet flushed."""
        if not self.capture_limit:
            return b""
        with self._flush_lock:
            data = bytes(self._captured) + bytes(self._buf)
        return data[-self.capture_limit:]


class _OutputPump:
    """The writer thread of a threaded Console: queued chunks go to console.out in order."""

    def __init__(self, console: Console, max_pending: int) -> None:
        self.console = console
        self.max_pending = max_pending
        self._chunks: collections.deque[bytes] = collections.deque()  # one chunk per byte when interactive
        self._pending = 0
        self._released = False
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="console-out", daemon=True).start()

    def put(self, data: bytes) -> None:
        with self._cond:
            while self._pending >= self.max_pending and not self._released and self.console.out_error is None:
                self._cond.wait(0.1)  # backpressure: the guest waits for its reader, as on a real slow line
            if self.console.out_error is not None:
                return
            self._chunks.append(data)
            self._pending += len(data)
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def drain(self) -> None:
        with self._cond:
            while self._pending and self.console.out_error is None:
                self._cond.wait(0.1)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks:
                    self._cond.wait()
                data = self._chunks.popleft()
            if self.console.out_error is None:
                self.console._write_out(data)
            with self._cond:
                self._pending -= len(data)
                self._cond.notify_all()
