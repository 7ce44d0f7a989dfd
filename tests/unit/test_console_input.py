"""ConsoleInput on a real pty: raw mode while running, bytes into a real UART, Ctrl-] escape, mode restored."""

from __future__ import annotations

import os
import pty
import termios
import time

from vmmd.devices.uart import Uart16550
from vmmd.machine.console_input import ConsoleInput


def test_pty_bytes_reach_uart_escape_stops_and_mode_is_restored() -> None:
    controller, device = pty.openpty()
    before = termios.tcgetattr(device)
    uart = Uart16550(tx_sink=lambda data: None)
    uart.write(2, 1, 0x07)  # FCR: FIFO on, so 16 bytes fit without the guest reading
    escaped = []
    feeder = ConsoleInput(device, uart, lambda: escaped.append(True)).start()
    try:
        assert not termios.tcgetattr(device)[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
        os.write(controller, b"ab\x03c\x1dz")  # ^C goes to the guest too; z after the escape is not fed
        deadline = time.monotonic() + 5
        while not escaped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert escaped
        received = bytes(uart.read(0, 1) for _ in range(uart.rx_pending()))
        assert received == b"ab\x03c"
    finally:
        feeder.close()
        assert termios.tcgetattr(device) == before
        os.close(controller)
        os.close(device)
