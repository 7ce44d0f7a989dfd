"""An 8250/16550A UART: the guest's serial console (COM1 at port 0x3F8).

Modelled on the National Semiconductor / TI PC16550D data sheet ("PC16550D
Universal Asynchronous Receiver/Transmitter with FIFOs": Table II register
summary, Table IV interrupt control functions, the register descriptions) and cross-checked with QEMU hw/char/serial.c
(serial_ioport_read/write, serial_update_irq, serial_xmit, serial_receive1,
serial_reset). Eight byte-wide registers at offsets 0..7:

| off | DLAB=0 read | DLAB=0 write | DLAB=1 |
|---|---|---|---|
| 0 | RBR (receive buffer) | THR (transmit holding) | DLL (divisor low) |
| 1 | IER | IER | DLM (divisor high) |
| 2 | IIR | FCR | (same as DLAB=0) |
| 3 | LCR | LCR | |
| 4 | MCR | MCR | |
| 5 | LSR | (ignored) | |
| 6 | MSR | (ignored) | |
| 7 | SCR | SCR | |

Model decisions (documented differences from a wire-level UART):

- Transmission is instantaneous, as in QEMU's serial_xmit when the back end
  accepts the byte: every THR write goes straight to `tx_sink`, so LSR THRE and
  TEMT always read 1 and the 16-byte TX FIFO never holds anything.
- The hot path: a THR write with DLAB=0, no loopback and the THRE interrupt
  disabled is one flag test, a counter increment and one `tx_sink` call with a
  cached 1-byte `bytes` object. Anything else takes the locked slow path.
- `tx_sink(data: bytes)` is called once per transmitted byte; buffering belongs
  to the sink (see vmmd.devices.console.Console, which flushes per line).
- Character timeout (data sheet, FIFO interrupt mode operation: RX FIFO holds fewer bytes than the
  trigger level and nothing arrived for 4 character times): `feed()` delivers
  whole bursts and no clock runs here, so the timeout is taken as already
  elapsed whenever the FIFO holds 1..trigger-1 bytes; IIR then reports 0x0C.
  With the trigger level reached it reports RX data available (0x04).
- Modem inputs: outside loopback CTS, DSR and DCD read as asserted and RI as
  not (QEMU serial_reset: msr = DCD | DSR | CTS). In loopback the inputs follow
  MCR (DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD, data sheet MCR bit 4 / QEMU
  serial_ioport_read case 6) and, as the data sheet says, changes set the delta
  bits (TERI only on RI falling), which QEMU does not model.
- MCR resets to OUT2 like QEMU (the data sheet resets it to 0); the interrupt
  output is not gated by OUT2 (QEMU does not gate it either).
- No parity/framing errors or breaks are ever received: LSR PE/FE/BI and bit 7
  stay 0; only OE (receiver overrun) can be set.
- Access size: the registers are one byte wide. A wider access (inw/inl or a
  2/4-byte write) acts on the single register at the access's offset: a read
  returns that byte zero-extended, a write uses the low byte of the value.
  Offsets are taken modulo 8.

Thread safety: `feed()` may be called from a stdin reader thread while vCPU
threads access registers; all state except the TX fast path is guarded by one
lock. The `irq(level)` callback runs with that lock held and must not call back
into the UART.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

# Register offsets (data sheet Table II; Linux include/uapi/linux/serial_reg.h)
UART_RX = 0  # RBR (read, DLAB=0)
UART_TX = 0  # THR (write, DLAB=0)
UART_DLL = 0  # divisor latch low (DLAB=1)
UART_IER = 1
UART_DLM = 1  # divisor latch high (DLAB=1)
UART_IIR = 2  # read
UART_FCR = 2  # write
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

# IER (interrupt enable)
IER_RDI = 0x01  # received data available (and character timeout)
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status

# IIR (interrupt identification): bit 0 = no interrupt pending, bits 3:1 = source, 7:6 = FIFOs enabled
IIR_NO_INT = 0x01
IIR_MSI = 0x00  # priority 4: modem status
IIR_THRI = 0x02  # priority 3: THR empty
IIR_RDI = 0x04  # priority 2: received data available / trigger level reached
IIR_RLSI = 0x06  # priority 1: receiver line status
IIR_CTI = 0x0C  # priority 2: character timeout
IIR_ID_MASK = 0x0E
IIR_FIFO_ENABLED = 0xC0

# FCR (FIFO control, write only)
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER_MASK = 0xC0
FCR_STICKY = FCR_ENABLE | FCR_DMA_MODE | FCR_TRIGGER_MASK  # bits that stay set (QEMU: fcr = val & 0xC9)
RX_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}  # 16550A trigger levels (data sheet FCR bits 7:6)
FIFO_DEPTH = 16

# LCR (line control)
LCR_DLAB = 0x80

# MCR (modem control)
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR (line status)
LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error
LSR_PE = 0x04  # parity error
LSR_FE = 0x08  # framing error
LSR_BI = 0x10  # break interrupt
LSR_THRE = 0x20  # THR empty
LSR_TEMT = 0x40  # transmitter empty
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI  # cleared by reading LSR; raise the line-status interrupt

# MSR (modem status): inputs in bits 7:4, their deltas in bits 3:0
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  # trailing edge of RI (1 -> 0)
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
MSR_IDLE_INPUTS = MSR_DCD | MSR_DSR | MSR_CTS  # what QEMU reports with no real modem lines behind it

BAUD_BASE = 115200  # 1.8432 MHz crystal / 16
RESET_DIVISOR = 0x0C  # 9600 baud, QEMU serial_reset

_BYTES = tuple(bytes((n,)) for n in range(256))

IrqCallback = Callable[[bool], None]
TxSink = Callable[[bytes], None]


def loopback_inputs(mcr: int) -> int:
    """MSR bits 7:4 while MCR bit 4 is set: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (data sheet MCR bit 4 loopback)."""
    return ((mcr & (MCR_OUT1 | MCR_OUT2)) << 4) | ((mcr & MCR_RTS) << 3) | ((mcr & MCR_DTR) << 5)


class Uart16550:
    """A 16550A UART; plug it into a PortBus with `bus.insert(uart, 0x3F8, 8)`."""

    def __init__(self, tx_sink: TxSink, irq: IrqCallback | None = None) -> None:
        self._tx_sink = tx_sink
        self._irq = irq
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self.tx_bytes = 0  # bytes handed to tx_sink (loopback bytes excluded)
        self.rx_bytes = 0  # bytes stored in the receiver (fed or looped back)
        self.rx_overruns = 0  # overrun events (LSR OE): a byte refused by a full FIFO or an unread byte overwritten
        self.rx_dropped = 0  # bytes fed while in loopback (receiver input disconnected)
        self.irq_level = False
        self.reset()

    def reset(self) -> None:
        """Master reset, values as QEMU serial_reset() sets them."""
        with self._lock:
            self.ier = 0
            self.lcr = 0
            self.mcr = MCR_OUT2
            self.fcr = 0
            self.scr = 0
            self.divisor = RESET_DIVISOR
            self._lsr_errors = 0
            self._msr = MSR_IDLE_INPUTS
            self._rbr = 0
            self._rx.clear()
            self._rx_trigger = 1
            self._thr_ipending = False
            self._update_fast_path()
            self._set_irq(False)

    # --- bus interface -------------------------------------------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and self._tx_fast:
            self.tx_bytes += 1
            self._tx_sink(_BYTES[value & 0xFF])
            return
        if offset == UART_SCR:
            self.scr = value & 0xFF  # the scratch register has no side effects: no lock needed
            return
        with self._lock:
            self._write_register(offset & 7, value & 0xFF)

    def read(self, offset: int, size: int) -> int:
        if offset == UART_LSR and not self._lsr_errors:
            # Polling guests read LSR before every THR write: with no error bits to clear, reading it has no side
            # effect, so skip the lock (a concurrent feed() is simply ordered after this read).
            return LSR_THRE | LSR_TEMT | LSR_DR if self._rx else LSR_THRE | LSR_TEMT
        if offset == UART_SCR:
            return self.scr
        with self._lock:
            return self._read_register(offset & 7)

    # --- receiver input ------------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Queue bytes that arrived on the serial input; returns how many were stored (the rest set LSR OE).

        FIFO mode holds 16 bytes; a byte arriving at a full FIFO is lost and sets OE
        (data sheet LSR bit 1: the FIFO contents are not overwritten). Without FIFOs the
        holding register is overwritten and OE set if the previous byte was unread.
        In loopback the serial input is disconnected and fed bytes are dropped.
        """
        with self._lock:
            if self.mcr & MCR_LOOP:
                self.rx_dropped += len(data)
                return 0
            stored = 0
            for byte in data:
                stored += self._receive(byte)
            self._update_irq()
            return stored

    def rx_room(self) -> int:
        """Bytes the receiver can take now without an overrun (a stdin pump may wait for this to be > 0)."""
        with self._lock:
            if self.mcr & MCR_LOOP:
                return 0
            depth = FIFO_DEPTH if self.fcr & FCR_ENABLE else 1
            return depth - len(self._rx)

    # --- internals (lock held) -----------------------------------------------------------------------------------

    def _receive(self, byte: int) -> int:
        rx = self._rx
        if self.fcr & FCR_ENABLE:
            if len(rx) >= FIFO_DEPTH:
                self._lsr_errors |= LSR_OE  # QEMU recv_fifo_put: overruns do not overwrite FIFO contents
                self.rx_overruns += 1
                return 0
        elif rx:
            self._lsr_errors |= LSR_OE  # holding register overwritten before it was read
            self.rx_overruns += 1
            rx.clear()
        rx.append(byte)
        self.rx_bytes += 1
        return 1

    def _update_fast_path(self) -> None:
        # A THR write needs no state change when DLAB=0, not in loopback and the THRE interrupt is off:
        # transmission is instantaneous, so THRE/TEMT stay set and thr_ipending is unused (QEMU keeps it 0).
        self._tx_fast = not (self.lcr & LCR_DLAB) and not (self.mcr & MCR_LOOP) and not (self.ier & IER_THRI)

    def connect_irq(self, irq: IrqCallback) -> None:
        """Drive `irq` (level) from now on, starting with the current level (the VM may be created after us)."""
        with self._lock:
            self._irq = irq
            irq(self.irq_level)

    def _set_irq(self, level: bool) -> None:
        if level != self.irq_level:
            self.irq_level = level
            if self._irq is not None:
                self._irq(level)

    def _pending(self) -> int:
        """Highest-priority pending source (data sheet Table IV; QEMU serial_update_irq)."""
        ier = self.ier
        if ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            if self.fcr & FCR_ENABLE and len(self._rx) < self._rx_trigger:
                return IIR_CTI  # below the trigger level: the character timeout has (by our model) elapsed
            return IIR_RDI
        if ier & IER_THRI and self._thr_ipending:
            return IIR_THRI
        if ier & IER_MSI and self._msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        self._set_irq(self._pending() != IIR_NO_INT)

    def _transmit(self, byte: int) -> None:
        # QEMU serial_write THR + serial_xmit: THR write clears THRE and the THRE interrupt, the byte leaves at
        # once, THRE/TEMT set again and the THRE interrupt becomes pending (an IRQ edge when IER.THRI is set).
        self._thr_ipending = False
        self._update_irq()
        if self.mcr & MCR_LOOP:
            self._receive(byte)  # serial output looped to serial input
        else:
            self.tx_bytes += 1
            self._tx_sink(_BYTES[byte])
        self._thr_ipending = True
        self._update_irq()

    def _set_mcr(self, value: int) -> None:
        old_inputs = self._msr_inputs()
        self.mcr = value & MCR_MASK
        new_inputs = self._msr_inputs()
        deltas = (old_inputs ^ new_inputs) >> 4  # DCD/RI/DSR/CTS changes, aligned with their delta bits
        if not (old_inputs & MSR_RI and not new_inputs & MSR_RI):
            deltas &= ~MSR_TERI  # TERI is set only on the trailing (1 -> 0) edge of RI
        self._msr = new_inputs | (self._msr & MSR_DELTAS) | deltas
        self._update_fast_path()
        self._update_irq()

    def _msr_inputs(self) -> int:
        return loopback_inputs(self.mcr) if self.mcr & MCR_LOOP else MSR_IDLE_INPUTS

    def _write_fcr(self, value: int) -> None:
        # Data sheet FCR bit 0: FIFO enable must be 1 for the other FCR bits to be programmed; changing it clears both
        # FIFOs (QEMU serial_ioport_write case 2 forces XFR|RFR when FE toggles).
        enable = value & FCR_ENABLE
        if (value ^ self.fcr) & FCR_ENABLE:
            value |= FCR_CLEAR_RX | FCR_CLEAR_TX
        if value & FCR_CLEAR_RX:
            self._rx.clear()
        if value & FCR_CLEAR_TX:  # the TX FIFO is always empty here (instantaneous transmission); THRE stays set,
            self._thr_ipending = True  # and, as QEMU's serial_ioport_write case 2 does, its interrupt is re-armed
        if enable:
            self.fcr = value & FCR_STICKY
            self._rx_trigger = RX_TRIGGER_LEVELS[value & FCR_TRIGGER_MASK]
        else:
            self.fcr = 0
            self._rx_trigger = 1
        self._update_irq()

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == UART_TX:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == UART_IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
                return
            changed = (self.ier ^ value) & 0x0F
            self.ier = value & 0x0F
            if changed & IER_THRI:
                # QEMU (after bochs): a rising edge of IER.THRI while THR is empty makes the THRE interrupt
                # pending again even if an IIR read had cleared it; a falling edge forgets it. THR is always
                # empty here (LSR.THRE = 1).
                self._thr_ipending = bool(self.ier & IER_THRI)
            self._update_fast_path()
            self._update_irq()
        elif offset == UART_FCR:
            self._write_fcr(value)
        elif offset == UART_LCR:
            self.lcr = value
            self._update_fast_path()
        elif offset == UART_MCR:
            self._set_mcr(value)
        elif offset == UART_SCR:
            self.scr = value
        # LSR and MSR writes are ignored (factory test registers on the real part; QEMU ignores them too)

    def _read_register(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == UART_RX:
            if dlab:
                return self.divisor & 0xFF
            return self._read_rbr()
        if offset == UART_IER:
            return (self.divisor >> 8) if dlab else self.ier
        if offset == UART_IIR:
            source = self._pending()
            if source == IIR_THRI:
                self._thr_ipending = False  # data sheet Table IV: reading IIR (if source of interrupt) resets THRE
                self._update_irq()
            return source | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == UART_LCR:
            return self.lcr
        if offset == UART_MCR:
            return self.mcr
        if offset == UART_LSR:
            value = self.lsr
            if self._lsr_errors:
                self._lsr_errors = 0  # reading LSR clears OE/PE/FE/BI (data sheet LSR)
                self._update_irq()
            return value
        if offset == UART_MSR:
            value = self._msr
            if value & MSR_DELTAS:
                self._msr = value & ~MSR_DELTAS  # reading MSR clears the delta bits (data sheet MSR)
                self._update_irq()
            return value
        return self.scr

    def _read_rbr(self) -> int:
        rx = self._rx
        if rx:
            self._rbr = rx.popleft()
            value = self._rbr
        else:
            # QEMU: an empty FIFO reads 0; without FIFOs the holding register keeps its last byte
            value = self._rbr if not self.fcr & FCR_ENABLE else 0
        self._update_irq()
        return value

    # --- state for tests and the monitor ------------------------------------------------------------------------

    @property
    def lsr(self) -> int:
        return LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx else 0)

    @property
    def msr(self) -> int:
        """MSR without the read side effect."""
        return self._msr

    @property
    def baud(self) -> int:
        """Programmed baud rate (0 when the divisor is 0; QEMU then assumes ~3500)."""
        return BAUD_BASE // self.divisor if self.divisor else 0

    def rx_pending(self) -> int:
        with self._lock:
            return len(self._rx)
