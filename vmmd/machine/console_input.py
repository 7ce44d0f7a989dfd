"""Serial console input for foreground runs: bytes from a terminal (or a pipe) into the guest's UART.

When standard input is a terminal it is switched to character-at-a-time mode
without echo or signal keys (output processing stays on), so every key goes to
the guest; Ctrl-] (0x1d, as in telnet and virsh console) stops the VM. The
terminal is restored however the run ends.
"""

from __future__ import annotations

import os
import select
import termios
import threading
from collections.abc import Callable

ESCAPE_BYTE = 0x1D  # Ctrl-]


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
            self._saved = termios.tcgetattr(self.fd)
            mode = termios.tcgetattr(self.fd)
            mode[0] &= ~(termios.ICRNL | termios.IXON | termios.INLCR)  # iflag: pass CR and ^S/^Q through
            mode[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)  # lflag
            mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
            termios.tcsetattr(self.fd, termios.TCSANOW, mode)
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
        while data and not self._stop.is_set():
            room = self.uart.rx_room()
            if room <= 0:
                self._stop.wait(0.001)  # the guest has not read the FIFO yet: wait rather than overrun it
                continue
            taken = self.uart.feed(data[:room])
            data = data[max(taken, 1):]

    def close(self) -> None:
        self._stop.set()
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
