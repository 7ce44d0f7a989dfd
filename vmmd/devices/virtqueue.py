"""Split virtqueues (virtio 1.x spec, 2.7), device side, over bounds-checked guest memory.

Owns the ring layout, the walk of descriptor chains and every check on what the
driver wrote there. The guest is untrusted: a descriptor loop, a `next` past the
queue size, an address outside the DMA windows, a length that does not fit, an
avail index that runs ahead by more than the queue size - each raises
VirtqueueError (the transport then sets DEVICE_NEEDS_RESET) before the device
touches a byte it should not. Guest memory is reached only through views that
GuestMemory.view() handed out (DmaWindows); offsets into them are checked here
against the window size, so no guest value can index outside guest RAM.

Ring layout (spec 2.7.5 / 2.7.6 / 2.7.8, Linux include/uapi/linux/virtio_ring.h):
    struct virtq_desc  { le64 addr; le32 len; le16 flags; le16 next; };      16 bytes, 16-aligned table
    struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; }   2-aligned
    struct virtq_used  { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[N]; le16 avail_event; } 4-aligned
"""

from __future__ import annotations

import errno
import os
import struct
from collections import deque
from collections.abc import Iterator
from itertools import repeat

import numpy as np

from vmmd.memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1  # virtio_ring.h
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768  # spec 2.7: "The maximum Queue Size value is 32768"
GATHER_MAX_FRAME = 2048  # TX batches of equal frames up to this size are copied out in one numpy gather
GATHER_MAX_BYTES = 32 << 20  # ... as long as the copy stays below this
# Descriptors one drain/fill pass walks through chain() at most. Every chain may be as long as the queue, and
# every avail entry may name the same long chain: without a budget one notification costs queue size squared
# steps, all under the transport lock a vCPU's MMIO access waits for. What is left stays available for the
# next pass (the device thread kicks itself for TX; the tap stays readable for RX).
DESCRIPTOR_BUDGET = 4096
SMALL_BATCH = 4  # TX batches up to this many chains skip the vectorised path (drain_to_fd)

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
assert DESC_DTYPE.itemsize == 16
_unpack_desc = struct.Struct("<QIHH").unpack_from  # struct virtq_desc, for one descriptor (no numpy call)

# errnos a tap write may answer for one bad frame; the frame is dropped, the queue goes on
_DROP_ERRNOS = (errno.EINVAL, errno.EIO, errno.ENOBUFS, errno.EAGAIN, errno.EMSGSIZE, errno.EFAULT, errno.ENOMEM)


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules; the device must enter DEVICE_NEEDS_RESET."""


class DmaWindows:
    """The guest-physical ranges a device may read and write, as GuestMemory views taken once.

    On plain guests that is all RAM; on SEV-ES guests only the shared (unencrypted)
    region, since private pages are ciphertext to the host (VIRTIO_F_ACCESS_PLATFORM).
    """

    def __init__(self, memory: GuestMemory, ranges: list[tuple[int, int]] | None = None) -> None:
        self.memory = memory
        if ranges is None:
            ranges = memory.ranges()
        self.windows: list[tuple[int, int, np.ndarray, memoryview]] = []
        for gpa, size in sorted(ranges):
            view = memory.view(gpa, size)  # GuestMemoryError here is the host's own bug: let it out
            self.windows.append((gpa, gpa + size, view, memoryview(view)))

    def locate(self, gpa: int, length: int) -> tuple[int, int]:
        """(window index, offset) of [gpa, gpa+length) lying wholly in one window, else VirtqueueError."""
        for i, (start, end, _view, _mv) in enumerate(self.windows):
            if start <= gpa and gpa + length <= end:
                return i, gpa - start
        raise VirtqueueError(f"guest range {gpa:#x}+{length:#x} is outside the memory the device may access")

    def view(self, gpa: int, length: int) -> np.ndarray:
        i, offset = self.locate(gpa, length)
        return self.windows[i][2][offset:offset + length]

    def buffer(self, gpa: int, length: int) -> memoryview:
        i, offset = self.locate(gpa, length)
        return self.windows[i][3][offset:offset + length]

    def locate_many(self, gpas: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised locate(): (window index array, offset array); VirtqueueError if any range fits no window."""
        gpas = gpas.astype(np.uint64, copy=False)
        ends = gpas + lengths.astype(np.uint64)
        which = np.full(gpas.shape, -1, dtype=np.int64)
        offsets = np.zeros(gpas.shape, dtype=np.int64)
        for i, (start, end, _view, _mv) in enumerate(self.windows):
            hit = (which < 0) & (gpas >= start) & (ends <= end) & (ends >= gpas)  # ends >= gpas: no u64 wrap
            which[hit] = i
            offsets[hit] = (gpas[hit] - np.uint64(start)).astype(np.int64)
        if (which < 0).any():
            bad = int(np.argmax(which < 0))
            raise VirtqueueError(f"guest range {int(gpas[bad]):#x}+{int(lengths[bad]):#x} is outside the memory "
                                 "the device may access")
        return which, offsets


class Virtqueue:
    """One enabled split virtqueue: views of its three areas plus the device's own indices."""

    def __init__(self, index: int, size: int, desc_gpa: int, driver_gpa: int, device_gpa: int,
                 windows: DmaWindows, max_chain_bytes: int) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue {index}: size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        for what, gpa, align in (("descriptor table", desc_gpa, 16), ("driver area", driver_gpa, 2),
                                 ("device area", device_gpa, 4)):
            if gpa % align:
                raise VirtqueueError(f"queue {index}: {what} at {gpa:#x} is not {align}-byte aligned (spec 2.7)")
        self.index = index
        self.size = size
        self.desc_gpa, self.driver_gpa, self.device_gpa = desc_gpa, driver_gpa, device_gpa
        self.mask = size - 1
        self.windows = windows
        self.max_chain_bytes = max_chain_bytes
        try:
            self.desc = windows.view(desc_gpa, 16 * size).view(DESC_DTYPE)
            avail = windows.view(driver_gpa, 6 + 2 * size).view("<u2")
            used_head = windows.view(device_gpa, 4).view("<u2")
            used_ring = windows.view(device_gpa + 4, 8 * size).view("<u4").reshape(size, 2)
        except VirtqueueError as err:
            raise VirtqueueError(f"queue {index}: ring area: {err}") from None
        self.avail_flags_idx = avail[0:2]
        self.avail_ring = avail[2:2 + size]
        self.used_flags_idx = used_head
        self.used_ring = used_ring
        # The same areas as memoryviews, for the per-chain paths: indexing one costs a third of a numpy scalar
        # access, which is most of a notify-per-frame pass. Native order is the rings' little-endian (x86 host).
        self._desc_bytes = windows.buffer(desc_gpa, 16 * size)
        self._avail_u16 = windows.buffer(driver_gpa, 6 + 2 * size).cast("H")  # flags, idx, ring[size], used_event
        self._used_u16 = windows.buffer(device_gpa, 4).cast("H")  # flags, idx
        self._used_u32 = windows.buffer(device_gpa + 4, 8 * size).cast("I")  # {id, len}[size]
        self.last_avail = 0  # a queue starts at index 0 after reset, whatever the ring memory holds (QEMU does too)
        self.used_idx = 0
        self.visited = 0  # descriptors walked by chain() in the current pass (DESCRIPTOR_BUDGET)

    # --- indices ---------------------------------------------------------------------------------------------------
    def available(self) -> int:
        """Chains the driver made available that the device has not taken yet (spec 2.7.6)."""
        avail_idx = self._avail_u16[1]
        n = (avail_idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise VirtqueueError(f"queue {self.index}: avail idx {avail_idx} is {n} entries ahead "
                                 f"of the device's {self.last_avail}, more than the queue size {self.size}")
        return n

    def wants_interrupt(self) -> bool:
        return not self._avail_u16[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def _head(self, position: int) -> int:
        head = self._avail_u16[2 + (position & self.mask)]
        if head >= self.size:
            raise VirtqueueError(f"queue {self.index}: avail ring entry {head} is past the queue size {self.size}")
        return head

    # --- chains ----------------------------------------------------------------------------------------------------
    def chain(self, head: int, writable: bool) -> list[tuple[int, int]]:
        """(gpa, len) segments of the chain at `head`, all device-writable (or all readable), checked."""
        readable, written = self.split_chain(head, only=writable)
        return written if writable else readable

    def split_chain(self, head: int, only: bool | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(device-readable, device-writable) (gpa, len) segments of the chain at `head`, checked: no indirect
        descriptors, readable ones before writable ones (spec 2.7.4.2), every buffer inside the DMA windows, the
        total under max_chain_bytes, no link past the queue, no loop. With `only` True (False) every descriptor
        must be device-writable (readable): a receive (transmit) chain."""
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total = 0
        index = head
        desc = self._desc_bytes
        for _ in range(self.size):  # a chain visits each descriptor at most once: longer means a loop
            self.visited += 1
            addr, length, flags, nxt = _unpack_desc(desc, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise VirtqueueError(f"queue {self.index}: descriptor {index} is indirect, a feature this device "
                                     "did not offer")
            is_write = bool(flags & VIRTQ_DESC_F_WRITE)
            if only is not None and is_write != only:
                raise VirtqueueError(f"queue {self.index}: descriptor {index} is device-"
                                     f"{'readable' if only else 'writable'} in a "
                                     f"{'receive' if only else 'transmit'} chain")
            total += length
            if total > self.max_chain_bytes:
                raise VirtqueueError(f"queue {self.index}: chain at {head} is {total} bytes or more, over the limit "
                                     f"of {self.max_chain_bytes}")
            if length:
                self.windows.locate(addr, length)
                if not is_write and writable:
                    raise VirtqueueError(f"queue {self.index}: chain at {head}: device-readable descriptor {index} "
                                         "after a device-writable one (spec 2.7.4.2)")
                (writable if is_write else readable).append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return readable, writable
            if nxt >= self.size:
                raise VirtqueueError(f"queue {self.index}: descriptor {index} links to {nxt}, past the queue size "
                                     f"{self.size}")
            index = nxt
        raise VirtqueueError(f"queue {self.index}: descriptor chain at {head} loops (longer than the queue size "
                             f"{self.size})")

    def push_used(self, head: int, length: int) -> None:
        slot = 2 * (self.used_idx & self.mask)
        self._used_u32[slot] = head
        self._used_u32[slot + 1] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used_u16[1] = self.used_idx  # after the entry: x86 stores are ordered (TSO)

    def _write_chain(self, fd: int, head: int, skip: int) -> int:
        """Write the device-readable chain at `head` to `fd` in one writev(), minus its first `skip` bytes;
        1 when it was dropped (nothing after the skip, or the fd refused it), else 0."""
        buffers = self.windows.buffer
        parts = []
        to_skip = skip
        for addr, length in self.chain(head, writable=False):
            if to_skip >= length:
                to_skip -= length
                continue
            parts.append(buffers(addr + to_skip, length - to_skip))
            to_skip = 0
        if to_skip or not parts:
            return 1
        try:
            if len(parts) == 1:
                os.write(fd, parts[0])
            else:
                os.writev(fd, parts)
        except OSError as err:
            if err.errno not in _DROP_ERRNOS:
                raise
            return 1
        return 0

    def _drain_few(self, fd: int, skip: int, n: int) -> tuple[int, int]:
        """drain_to_fd() for a handful of chains, in plain Python: each chain walked and checked by chain()."""
        dropped = 0
        self.visited = 0
        for _ in range(n):
            head = self._head(self.last_avail)
            dropped += self._write_chain(fd, head, skip)
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            self.push_used(head, 0)
        return n, dropped

    # --- bulk paths --------------------------------------------------------------------------------------------------
    def _frames(self, starts: np.ndarray, ends: np.ndarray) -> Iterator[bytes | memoryview]:
        """The buffers [start, end) of the single DMA window, checked, in order, ready for os.write().

        Frames of one length (a driver's fixed-size buffers, a burst of small packets)
        are copied out in one numpy gather - a strided view when the buffers are
        evenly spaced - and split into bytes objects by tolist() on a void dtype, so
        no Python bytecode runs per frame. Other batches get memoryview slices.
        """
        window = self.windows.windows[0][2]
        n = len(starts)
        length = int(ends[0] - starts[0])
        if n > 1 and length <= GATHER_MAX_FRAME and n * length <= GATHER_MAX_BYTES and \
                bool(((ends - starts) == length).all()):
            first = int(starts[0])
            stride = int(starts[1] - starts[0])
            if stride > 0 and bool((np.diff(starts) == stride).all()) and \
                    first + (n - 1) * stride + length <= window.size:  # == ends[-1], checked by locate_many
                rows = np.lib.stride_tricks.as_strided(window[first:], shape=(n, length), strides=(stride, 1))
            else:
                rows = window[np.add.outer(starts, np.arange(length, dtype=np.int64))]
            return iter(np.ascontiguousarray(rows).view(f"V{length}").ravel().tolist())
        mv = self.windows.windows[0][3]
        return map(mv.__getitem__, map(slice, starts.tolist(), ends.tolist()))

    def drain_to_fd(self, fd: int, skip: int) -> tuple[int, int]:
        """Write every available device-readable chain to `fd`, one write per chain, minus its first `skip` bytes.

        For a tap that is one frame per write (the virtio_net_hdr is `skip`). Returns
        (chains, dropped). Chains of one descriptor - what Linux virtio-net and the
        vmmd guest post - are checked for the whole batch at once with numpy, then
        written in a tight os.write loop; other chains take the per-descriptor walk.
        """
        n = self.available()
        if not n:
            return 0, 0
        if n <= SMALL_BATCH:  # a notify per frame: numpy's per-call cost would be most of the work
            return self._drain_few(fd, skip, n)
        positions = (self.last_avail + np.arange(n, dtype=np.int64)) & self.mask
        heads = self.avail_ring[positions].astype(np.int64)
        if (heads >= self.size).any():
            raise VirtqueueError(f"queue {self.index}: avail ring entry {int(heads.max())} is past the queue size "
                                 f"{self.size}")
        d = self.desc[heads]
        flags = d["flags"]
        dropped = 0
        write = os.write
        if not (flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)).any():
            lengths = d["len"].astype(np.int64)
            if (lengths > self.max_chain_bytes).any():
                bad = int(np.argmax(lengths > self.max_chain_bytes))
                raise VirtqueueError(f"queue {self.index}: descriptor {int(heads[bad])} is {int(lengths[bad])} bytes, "
                                     f"over the limit of {self.max_chain_bytes}")
            which, offsets = self.windows.locate_many(d["addr"], lengths)
            short = lengths <= skip  # nothing after the header: not a frame
            dropped += int(short.sum())
            if len(self.windows.windows) == 1:
                keep = ~short
                starts = offsets + skip
                ends = offsets + lengths
                if not keep.all():
                    starts, ends = starts[keep], ends[keep]
                if len(starts):  # every frame of the batch may have been header only
                    dropped += _write_all(fd, self._frames(starts, ends))
            else:
                mvs = [w[3] for w in self.windows.windows]
                for w, start, end, is_short in zip(which.tolist(), (offsets + skip).tolist(),
                                                   (offsets + lengths).tolist(), short.tolist(), strict=True):
                    if not is_short:
                        try:
                            write(fd, mvs[w][start:end])
                        except OSError as err:
                            if err.errno not in _DROP_ERRNOS:
                                raise
                            dropped += 1
        else:
            self.visited = 0
            taken = 0
            for head in heads.tolist():
                if self.visited >= DESCRIPTOR_BUDGET:
                    break  # the rest waits for the next pass
                taken += 1
                dropped += self._write_chain(fd, head, skip)
            if taken < n:
                n, heads = taken, heads[:taken]
        used_positions = (self.used_idx + np.arange(n, dtype=np.int64)) & self.mask
        self.used_ring[used_positions, 0] = heads
        self.used_ring[used_positions, 1] = 0
        self.last_avail = (self.last_avail + n) & 0xFFFF
        self.used_idx = (self.used_idx + n) & 0xFFFF
        self.used_flags_idx[1] = self.used_idx
        return n, dropped

    def fill_from_fd(self, fd: int, header: bytes, patch: tuple[int, bytes] | None = None) -> tuple[int, bool]:
        """Read packets from `fd` into available device-writable chains, each preceded by `header`.

        `patch` = (offset, bytes) is stored into the chain after each read (virtio-net
        sets num_buffers in a header the kernel wrote with IFF_VNET_HDR).
        Returns (packets delivered, fd drained). A chain is consumed only once a
        packet landed in it (EAGAIN leaves it available). Packets larger than the
        chain are truncated by the kernel, as tun_put_user() does for a short read.
        """
        delivered = 0
        hlen = len(header)
        buffers = self.windows.buffer
        self.visited = 0
        while self.available():
            if self.visited >= DESCRIPTOR_BUDGET:
                return delivered, False  # the rest in the next pass (the fd is still readable)
            head = self._head(self.last_avail)
            segments = self.chain(head, writable=True)
            capacity = sum(length for _addr, length in segments)
            if capacity <= hlen:
                raise VirtqueueError(f"queue {self.index}: receive chain at {head} holds {capacity} bytes, no room "
                                     f"after the {hlen}-byte header")
            parts = []
            head_parts = []
            to_skip = hlen
            for addr, length in segments:
                if to_skip:
                    take = min(to_skip, length)
                    head_parts.append(buffers(addr, take))
                    to_skip -= take
                    if take == length:
                        continue
                    addr, length = addr + take, length - take
                parts.append(buffers(addr, length))
            try:
                got = os.readv(fd, parts)
            except BlockingIOError:
                return delivered, True
            pos = 0
            for part in head_parts:
                part[:] = header[pos:pos + len(part)]
                pos += len(part)
            if patch is not None:
                _scatter(parts, patch[0], patch[1])
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            self.push_used(head, hlen + got)
            delivered += 1
        return delivered, False



def _scatter(parts: list[memoryview], offset: int, data: bytes) -> None:
    """Store `data` at byte `offset` of the concatenation of `parts` (as far as they reach)."""
    for part in parts:
        if offset >= len(part):
            offset -= len(part)
            continue
        take = min(len(data), len(part) - offset)
        part[offset:offset + take] = data[:take]
        data = data[take:]
        offset = 0
        if not data:
            return


def _write_all(fd: int, buffers: Iterator[bytes | memoryview]) -> int:
    """os.write(fd, buffer) for each buffer, in order; returns how many writes failed (and were dropped).

    The loop runs inside map() and deque(): no Python bytecode per frame, which is
    most of what the TX path costs beyond the write() system call itself. After a
    failed write map() has consumed that frame; the next pass goes on with the rest.
    """
    pending = buffers
    write = os.write
    dropped = 0
    while True:
        try:
            deque(map(write, repeat(fd), pending), maxlen=0)
            return dropped
        except OSError as err:
            if err.errno not in _DROP_ERRNOS:
                raise
            dropped += 1
