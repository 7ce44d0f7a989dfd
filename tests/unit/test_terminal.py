"""vmmd.terminal's console mode on a real pty: keys pass raw, guest output still gets "\\n" -> "\\r\\n"."""

from __future__ import annotations

import os
import pty
import termios

from vmmd.terminal import enter_character_mode, restore


def test_console_mode_keeps_output_processing_and_restores() -> None:
    controller, device = pty.openpty()
    try:
        mode = termios.tcgetattr(device)
        mode[1] &= ~termios.OPOST  # as a terminal left raw by another program: the mode must turn it back on
        termios.tcsetattr(device, termios.TCSANOW, mode)
        before = termios.tcgetattr(device)
        saved = enter_character_mode(device)
        now = termios.tcgetattr(device)
        assert not now[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not now[0] & termios.ICRNL  # Enter reaches the guest as CR, as a serial terminal sends it
        os.write(device, b"line one\nline two")  # what a guest prints: bare newlines
        assert os.read(controller, 100) == b"line one\r\nline two"
        os.write(controller, b"\r\x03")  # CR and Ctrl-C arrive as bytes, not as a newline or SIGINT
        assert os.read(device, 100) == b"\r\x03"
        restore(device, saved)
        assert termios.tcgetattr(device) == before
    finally:
        os.close(controller)
        os.close(device)
