"""16550A UART register behaviour (PC16550D data sheet, QEMU hw/char/serial.c) and the console sink."""

from __future__ import annotations

import io
import sys
import threading

import pytest

from vmmd.devices import uart as u
from vmmd.devices.bus import PortBus
from vmmd.devices.console import Console
from vmmd.devices.uart import Uart16550

COM1 = 0x3F8


class Harness:
    """A UART on a real PortBus at COM1, its output collected and its IRQ line edges recorded."""

    def __init__(self, with_irq: bool = True) -> None:
        self.out: list[bytes] = []
        self.edges: list[bool] = []
        self.uart = Uart16550(tx_sink=self.out.append, irq=self.edges.append if with_irq else None)
        self.bus = PortBus()
        self.bus.insert(self.uart, COM1, 8)

    def rd(self, reg: int) -> int:
        return self.bus.read(COM1 + reg, 1)

    def wr(self, reg: int, value: int) -> None:
        self.bus.write(COM1 + reg, 1, value)

    @property
    def sent(self) -> bytes:
        return b"".join(self.out)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_reset_values(h: Harness) -> None:
    assert h.rd(u.UART_IER) == 0
    assert h.rd(u.UART_IIR) == u.IIR_NO_INT
    assert h.rd(u.UART_LCR) == 0
    assert h.rd(u.UART_MCR) == u.MCR_OUT2
    assert h.rd(u.UART_LSR) == u.LSR_THRE | u.LSR_TEMT
    assert h.rd(u.UART_MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS
    assert h.rd(u.UART_SCR) == 0
    assert h.uart.baud == 9600
    assert h.edges == [] and not h.uart.irq_level


def test_thr_goes_to_sink_and_is_counted(h: Harness) -> None:
    for byte in b"hi\n":
        h.wr(u.UART_TX, byte)
    h.bus.write(COM1, 2, 0x4100 | ord("!"))  # a wider write transmits the low byte only
    assert h.sent == b"hi\n!"
    assert all(len(chunk) == 1 for chunk in h.out)
    assert h.uart.tx_bytes == 4
    assert h.rd(u.UART_LSR) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT


def test_dlab_divisor_latch(h: Harness) -> None:
    h.wr(u.UART_IER, 0x05)
    h.wr(u.UART_LCR, u.LCR_DLAB | 0x03)
    assert h.rd(u.UART_DLL) == 0x0C and h.rd(u.UART_DLM) == 0x00
    h.wr(u.UART_DLL, 0x01)  # 115200 baud
    h.wr(u.UART_DLM, 0x00)
    assert h.uart.baud == 115200
    h.wr(u.UART_DLM, 0x12)
    assert (h.rd(u.UART_DLM), h.rd(u.UART_DLL)) == (0x12, 0x01)
    assert h.uart.divisor == 0x1201
    assert h.sent == b""  # divisor writes are not transmitted
    assert h.rd(u.UART_LCR) == u.LCR_DLAB | 0x03
    h.wr(u.UART_LCR, 0x03)
    assert h.rd(u.UART_IER) == 0x05  # IER was untouched by DLM writes
    h.wr(u.UART_TX, ord("x"))
    assert h.sent == b"x"


def test_ier_keeps_low_nibble(h: Harness) -> None:
    h.wr(u.UART_IER, 0xF5)
    assert h.rd(u.UART_IER) == 0x05


def test_scratch(h: Harness) -> None:
    for value in (0x55, 0xAA, 0x00):
        h.wr(u.UART_SCR, value)
        assert h.rd(u.UART_SCR) == value


def test_lsr_msr_writes_ignored(h: Harness) -> None:
    h.wr(u.UART_LSR, 0xFF)
    h.wr(u.UART_MSR, 0x00)
    assert h.rd(u.UART_LSR) == u.LSR_THRE | u.LSR_TEMT
    assert h.rd(u.UART_MSR) == u.MSR_IDLE_INPUTS


def test_rx_without_fifo_and_overrun(h: Harness) -> None:
    assert h.uart.feed(b"a") == 1
    assert h.rd(u.UART_LSR) & u.LSR_DR
    assert h.uart.feed(b"bc") == 2  # each byte overwrites the holding register
    lsr = h.rd(u.UART_LSR)
    assert lsr & (u.LSR_DR | u.LSR_OE) == u.LSR_DR | u.LSR_OE
    assert h.rd(u.UART_LSR) & u.LSR_OE == 0  # reading LSR cleared OE
    assert h.rd(u.UART_RX) == ord("c")
    assert h.rd(u.UART_LSR) & u.LSR_DR == 0
    assert h.rd(u.UART_RX) == ord("c")  # the holding register keeps its last byte (QEMU)
    assert h.uart.rx_overruns == 2


def test_rx_fifo_16_deep_overrun_keeps_contents(h: Harness) -> None:
    h.wr(u.UART_FCR, u.FCR_ENABLE)
    assert h.uart.rx_room() == 16
    data = bytes(range(0x41, 0x41 + 20))
    assert h.uart.feed(data) == 16
    assert h.uart.rx_room() == 0
    assert h.rd(u.UART_LSR) & u.LSR_OE
    received = bytearray()
    while h.rd(u.UART_LSR) & u.LSR_DR:
        received.append(h.rd(u.UART_RX))
    assert bytes(received) == data[:16]
    assert h.rd(u.UART_RX) == 0  # empty FIFO reads 0 (QEMU)
    assert h.uart.rx_overruns == 4


def test_fcr_reset_and_disable(h: Harness) -> None:
    h.wr(u.UART_FCR, u.FCR_ENABLE)
    h.uart.feed(b"abc")
    h.wr(u.UART_FCR, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    assert h.rd(u.UART_LSR) & u.LSR_DR == 0
    h.uart.feed(b"de")
    h.wr(u.UART_FCR, 0)  # disabling FIFOs flushes them
    assert h.rd(u.UART_LSR) & u.LSR_DR == 0
    assert h.rd(u.UART_IIR) & 0xC0 == 0
    assert h.uart.rx_room() == 1


def test_iir_fifo_bits(h: Harness) -> None:
    h.wr(u.UART_FCR, u.FCR_ENABLE | 0xC0)
    assert h.rd(u.UART_IIR) == u.IIR_FIFO_ENABLED | u.IIR_NO_INT
    h.wr(u.UART_FCR, 0)
    assert h.rd(u.UART_IIR) == u.IIR_NO_INT


@pytest.mark.parametrize("bits,level", [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_trigger_level_and_timeout(h: Harness, bits: int, level: int) -> None:
    h.wr(u.UART_FCR, u.FCR_ENABLE | bits)
    h.wr(u.UART_IER, u.IER_RDI)
    assert h.edges == []
    h.uart.feed(b"x" * (level - 1))
    if level > 1:
        assert h.rd(u.UART_IIR) == u.IIR_FIFO_ENABLED | u.IIR_CTI  # below the trigger level: timeout
        assert h.edges == [True]
    h.uart.feed(b"y")
    assert h.rd(u.UART_IIR) == u.IIR_FIFO_ENABLED | u.IIR_RDI
    for _ in range(level):
        h.rd(u.UART_RX)
    assert h.rd(u.UART_IIR) == u.IIR_FIFO_ENABLED | u.IIR_NO_INT
    assert h.edges == [True, False]


def test_thre_interrupt_cleared_by_iir_read_and_rearmed_by_thr_write(h: Harness) -> None:
    h.wr(u.UART_IER, u.IER_THRI)  # rising edge of IER.THRI with THR empty -> pending
    assert h.edges == [True]
    assert h.rd(u.UART_IIR) == u.IIR_THRI
    assert h.edges == [True, False]  # reading IIR (THRE the source) cleared it
    assert h.rd(u.UART_IIR) == u.IIR_NO_INT
    h.wr(u.UART_TX, ord("z"))
    assert h.edges == [True, False, True]  # THR emptied again -> new interrupt
    assert h.sent == b"z"
    h.wr(u.UART_IER, 0)
    assert h.edges[-1] is False and h.rd(u.UART_IIR) == u.IIR_NO_INT


def test_clearing_the_tx_fifo_rearms_the_thre_interrupt(h: Harness) -> None:
    h.wr(u.UART_IER, u.IER_THRI)
    assert h.rd(u.UART_IIR) == u.IIR_THRI  # consumed
    h.wr(u.UART_FCR, u.FCR_ENABLE | u.FCR_CLEAR_TX)  # QEMU serial_ioport_write case 2: THRE pending again
    assert h.rd(u.UART_IIR) == u.IIR_FIFO_ENABLED | u.IIR_THRI


def test_thr_write_with_thri_pending_gives_an_edge(h: Harness) -> None:
    h.wr(u.UART_IER, u.IER_THRI)
    h.wr(u.UART_TX, ord("a"))  # still pending: line drops and rises again like QEMU's lower/raise
    assert h.edges == [True, False, True]


def test_iir_priority(h: Harness) -> None:
    h.wr(u.UART_IER, u.IER_RDI | u.IER_THRI | u.IER_RLSI | u.IER_MSI)
    h.wr(u.UART_MCR, u.MCR_LOOP | u.MCR_OUT2)  # entering loopback drops DSR/CTS -> modem status deltas
    assert h.uart.msr & u.MSR_DELTAS
    h.wr(u.UART_MCR, u.MCR_OUT2)
    h.uart.feed(b"ab")  # no FIFO: second byte overruns
    assert h.rd(u.UART_IIR) == u.IIR_RLSI
    h.rd(u.UART_LSR)  # clears OE
    assert h.rd(u.UART_IIR) == u.IIR_RDI
    h.rd(u.UART_RX)
    assert h.rd(u.UART_IIR) == u.IIR_THRI  # and this read clears it
    assert h.rd(u.UART_IIR) == u.IIR_MSI
    h.rd(u.UART_MSR)
    assert h.rd(u.UART_IIR) == u.IIR_NO_INT
    assert not h.uart.irq_level


def test_line_status_interrupt_needs_rlsi(h: Harness) -> None:
    h.uart.feed(b"ab")
    assert h.rd(u.UART_IIR) == u.IIR_NO_INT  # nothing enabled: polling guests only see LSR
    h.wr(u.UART_IER, u.IER_RLSI)
    assert h.rd(u.UART_IIR) == u.IIR_RLSI


def test_loopback(h: Harness) -> None:
    h.wr(u.UART_FCR, u.FCR_ENABLE)
    h.wr(u.UART_MCR, u.MCR_LOOP)
    assert h.rd(u.UART_MSR) & 0xF0 == 0
    for mcr, msr in [(u.MCR_DTR, u.MSR_DSR), (u.MCR_RTS, u.MSR_CTS), (u.MCR_OUT1, u.MSR_RI),
                     (u.MCR_OUT2, u.MSR_DCD), (0x0A, 0x90), (0x0F, 0xF0)]:
        h.wr(u.UART_MCR, u.MCR_LOOP | mcr)
        assert h.rd(u.UART_MSR) & 0xF0 == msr
    for byte in b"loop":
        h.wr(u.UART_TX, byte)
    assert h.sent == b"" and h.uart.tx_bytes == 0
    assert h.uart.feed(b"ignored") == 0  # serial input disconnected in loopback
    got = bytes(h.rd(u.UART_RX) for _ in range(4))
    assert got == b"loop"
    assert h.rd(u.UART_LSR) & u.LSR_DR == 0
    h.wr(u.UART_MCR, u.MCR_OUT2)
    h.wr(u.UART_TX, ord("o"))
    assert h.sent == b"o"


def test_loopback_msr_deltas(h: Harness) -> None:
    h.wr(u.UART_MCR, u.MCR_LOOP | u.MCR_OUT1)  # DCD, DSR, CTS fall; RI rises
    assert h.rd(u.UART_MSR) == u.MSR_RI | u.MSR_DDCD | u.MSR_DDSR | u.MSR_DCTS
    assert h.rd(u.UART_MSR) == u.MSR_RI  # deltas cleared by the read
    h.wr(u.UART_MCR, u.MCR_LOOP)  # RI falls: trailing edge
    assert h.rd(u.UART_MSR) == u.MSR_TERI
    h.wr(u.UART_MCR, u.MCR_LOOP | u.MCR_OUT1)  # RI rises: no TERI
    assert h.rd(u.UART_MSR) == u.MSR_RI


def test_linux_8250_probe_sequence(h: Harness) -> None:
    # drivers/tty/serial/8250/8250_port.c autoconfig(): scratch, IER and loopback checks
    h.wr(u.UART_IER, 0)
    assert h.rd(u.UART_IER) & 0x0F == 0
    h.wr(u.UART_IER, 0x0F)
    assert h.rd(u.UART_IER) & 0x0F == 0x0F
    h.wr(u.UART_IER, 0)
    h.wr(u.UART_MCR, u.MCR_LOOP | 0x0A)
    assert h.rd(u.UART_MSR) & 0xF0 == 0x90
    h.wr(u.UART_FCR, u.FCR_ENABLE)
    assert h.rd(u.UART_IIR) >> 6 == 3  # 16550A: FIFOs work


def test_polling_without_irq_callback() -> None:
    h = Harness(with_irq=False)
    h.wr(u.UART_IER, u.IER_RDI)
    h.uart.feed(b"k")
    assert h.uart.irq_level
    assert h.rd(u.UART_IIR) == u.IIR_RDI
    assert h.rd(u.UART_RX) == ord("k")
    assert not h.uart.irq_level


def test_wide_read_returns_the_byte(h: Harness) -> None:
    h.wr(u.UART_SCR, 0x5A)
    assert h.bus.read(COM1 + u.UART_SCR, 1) == 0x5A
    h.wr(u.UART_LCR, 0x03)
    assert h.bus.read(COM1 + u.UART_LCR, 4) == 0x03  # offsets 3..6: acts on LCR alone, zero-extended
    assert h.bus.read(COM1 + u.UART_SCR, 2) == 0xFFFF  # runs past the device: unmapped


def test_feed_from_another_thread(h: Harness) -> None:
    h.wr(u.UART_FCR, u.FCR_ENABLE)
    data = bytes(range(256)) * 4
    done = threading.Event()

    def pump() -> None:
        for byte in data:
            while h.uart.rx_room() == 0:
                pass
            h.uart.feed(bytes((byte,)))
        done.set()

    thread = threading.Thread(target=pump)
    thread.start()
    received = bytearray()
    while len(received) < len(data):
        if h.rd(u.UART_LSR) & u.LSR_DR:
            received.append(h.rd(u.UART_RX))
        h.wr(u.UART_TX, ord("."))  # interleave TX traffic on the "vCPU" side
    thread.join(timeout=10)
    assert done.is_set()
    assert bytes(received) == data
    assert h.uart.rx_overruns == 0


def test_console_line_buffering_and_capture() -> None:
    out = io.BytesIO()
    console = Console(out, capture=8)
    uart = Uart16550(tx_sink=console.write)
    for byte in b"abc":
        uart.write(0, 1, byte)
    assert out.getvalue() == b""  # no newline yet
    uart.write(0, 1, ord("\n"))
    assert out.getvalue() == b"abc\n"
    for byte in b"0123456789tail":
        uart.write(0, 1, byte)
    assert console.captured == b"6789tail"
    console.flush()
    assert out.getvalue() == b"abc\n0123456789tail"
    assert console.bytes_written == uart.tx_bytes == 18


def test_console_unbuffered_and_max_buffer() -> None:
    out = io.BytesIO()
    Console(out, line_buffered=False).write(b">")
    assert out.getvalue() == b">"
    out = io.BytesIO()
    console = Console(out, max_buffer=4)
    for byte in b"abcdef":
        console.write(bytes((byte,)))
    assert out.getvalue() == b"abcd"


def test_console_survives_a_closed_output() -> None:
    out = io.BytesIO()
    console = Console(out, capture=64)
    out.close()
    console.write(b"after close\n")
    assert console.out_error is not None
    assert console.captured == b"after close\n"


def test_console_loses_nothing_with_concurrent_writers() -> None:
    out = io.BytesIO()
    console = Console(out, max_buffer=2)
    letters = b"ABCD"

    def writer(letter: int) -> None:
        for n in range(20000):
            console.write(b"\n" if n % 97 == 96 else bytes((letter,)))

    threads = [threading.Thread(target=writer, args=(letter,)) for letter in letters]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to provoke races
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    console.flush()
    data = out.getvalue()
    assert len(data) == console.bytes_written == 4 * 20000
    for letter in letters:
        assert data.count(letter) == 20000 - 20000 // 97


def test_an_irq_connected_later_gets_the_current_level_then_every_change() -> None:
    levels: list[bool] = []
    uart = u.Uart16550(tx_sink=lambda data: None)
    uart.write(u.UART_IER, 1, u.IER_THRI)  # pending before anything is connected
    uart.connect_irq(levels.append)
    assert levels == [True]
    uart.read(u.UART_IIR, 1)  # THRE consumed
    assert levels == [True, False]


def test_the_console_irq_reaches_an_in_kernel_irqchip() -> None:
    """What Machine wires on platforms with an irqchip (sev-es): UART level -> KVM_IRQ_LINE(CONSOLE_IRQ)."""
    from vmmd.kvm import Kvm
    from vmmd.machine.layout import CONSOLE_IRQ

    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    uart = u.Uart16550(tx_sink=lambda data: None)
    uart.connect_irq(lambda level: vm.irq_line(CONSOLE_IRQ, 1 if level else 0))
    uart.write(u.UART_IER, 1, u.IER_THRI)
    uart.read(u.UART_IIR, 1)
    vm.close()
    kvm.close()


def test_a_reader_that_stops_reading_holds_the_guest_back_only_until_the_vm_stops() -> None:
    """Console(threaded=True): guest output waits for a slow reader (backpressure) while the VM runs; after
    release() (the VM is stopping) writers no longer wait, so vCPU threads can end; drain() ends when the
    reader goes away (EPIPE)."""
    import os
    import threading
    import time

    read_end, write_end = os.pipe()
    console = Console(os.fdopen(write_end, "wb"), threaded=True, max_pending=4096)
    line = b"x" * 63 + b"\n"

    def guest() -> None:
        for _ in range(16384):  # 1 MiB: far more than the pipe and the queue hold
            console.write(line)

    vcpu = threading.Thread(target=guest, daemon=True)
    vcpu.start()
    time.sleep(0.3)
    assert vcpu.is_alive()  # held back: nobody reads the pipe
    console.release()
    vcpu.join(5)
    assert not vcpu.is_alive()  # let go once the VM stops
    os.close(read_end)  # the reader goes away: the pending output fails with EPIPE
    start = time.monotonic()
    console.drain()
    assert time.monotonic() - start < 5 and console.out_error is not None
