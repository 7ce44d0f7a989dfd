"""The terminal mode of interactive consoles (`vmctl run` on a terminal, `vmctl console`).

Input goes character at a time, without echo, signal keys or CR/LF translation, so every key reaches the guest
(Ctrl-C and Ctrl-Z too); Ctrl-] (0x1d, as in telnet and virsh console) is vmctl's escape. Output processing
stays on (OPOST, ONLCR), as QEMU's `-serial stdio` keeps it (chardev/char-stdio.c qemu_chr_set_echo_stdio()):
a guest that ends lines with a bare "\\n" does not stair-step across the screen. termios(3) flags.
"""

from __future__ import annotations

import termios

ESCAPE_BYTE = 0x1D  # Ctrl-]


def enter_character_mode(fd: int) -> list:
    """Switch terminal `fd` to the console mode above; returns the attributes to give back to restore()."""
    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[0] &= ~(termios.ICRNL | termios.IXON | termios.INLCR | termios.IGNCR | termios.ISTRIP)  # iflag
    mode[1] |= termios.OPOST | termios.ONLCR  # oflag: output as a terminal expects it
    mode[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)  # lflag
    mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, mode)
    return saved


def restore(fd: int, saved: list) -> None:
    """Give terminal `fd` back the attributes enter_character_mode() saved (after pending output is written)."""
    termios.tcsetattr(fd, termios.TCSADRAIN, saved)
