"""virtio-blk device (virtio 1.x spec, 5.2) backed by a raw image file descriptor.

Owns the device's features and config space (struct virtio_blk_config), the request parsing of its one
virtqueue (requestq), and the I/O thread that serves it. The vCPU thread only writes QueueNotify, which
kicks an eventfd; parsing, file I/O, fdatasync and completion all happen on the disk's own thread, and the
transport lock is held only while rings are read and completions written, never across file I/O.

Request (spec 5.2.6, include/uapi/linux/virtio_blk.h): a device-readable struct virtio_blk_outhdr
{le32 type; le32 ioprio; le64 sector}, data (device-readable for OUT, device-writable for IN and GET_ID,
readable 16-byte discard/write-zeroes segments), then one device-writable status byte, the chain's last.
Framing is free (spec 2.6.4: the device must not assume descriptor boundaries): readable bytes and writable
bytes are each treated as one stream. Chains of exactly header / data / status - what Linux and the vmmd
firmware post - are parsed for a whole batch at once with numpy; other chains take the per-descriptor walk.

What the driver did wrong, and the answer:
- a request that names sectors past the end of the image, a write to a read-only disk, an I/O error:
  status VIRTIO_BLK_S_IOERR for that request; an unknown type: VIRTIO_BLK_S_UNSUPP.
- a malformed chain (a loop, an address outside the memory the device may reach, no writable status byte or
  the status in a device-readable buffer, a header shorter than 16 bytes, IN/OUT data that is not a multiple
  of 512 bytes or larger than SIZE_MAX * SEG_MAX): the transport's DEVICE_NEEDS_RESET with one log line.

Data safety: a write completes (status written, used ring updated) only after pwrite() returned for all of
it, i.e. it reached the file; FLUSH runs fdatasync() before its status is written. When the driver did not
negotiate VIRTIO_BLK_F_FLUSH the device is write-through: every batch with writes is fdatasync()ed before it
completes (spec 5.2.6.2). cache=none opens with O_DIRECT; requests whose buffers, lengths and offsets are
not DIRECT_ALIGN-aligned go through an aligned bounce buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import select
import threading
from itertools import repeat

import numpy as np

from vmmd.devices.virtio_mmio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VirtioMmio
from vmmd.devices.virtqueue import (
    DESCRIPTOR_BUDGET,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)

log = logging.getLogger("vmmd.blk")

VIRTIO_ID_BLOCK = 2  # include/uapi/linux/virtio_ids.h
# include/uapi/linux/virtio_blk.h
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

SECTOR = 512
SIZE_MAX = 128 << 10  # largest segment offered (VIRTIO_BLK_F_SIZE_MAX)
SEG_MAX = 126  # segments per request offered (VIRTIO_BLK_F_SEG_MAX); Linux takes min(seg_max, queue size - 2)
MAX_DATA_BYTES = 1 << 20  # a request's data never exceeds this (Linux's default max_sectors is far below)
MAX_DISCARD_SEG = 32
MAX_DISCARD_SECTORS = (1 << 32) - 1
MERGE_MAX_IOV = 1024  # IOV_MAX: buffers of one merged preadv()/pwritev()
DIRECT_ALIGN = 4096  # O_DIRECT buffer / offset / length alignment assumed (conservative: any logical block size)
OUTHDR = np.dtype([("type", "<u4"), ("ioprio", "<u4"), ("sector", "<u8")])
SEGMENT = np.dtype([("sector", "<u8"), ("num_sectors", "<u4"), ("flags", "<u4")])

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class virtio_blk_geometry(ctypes.Structure):  # noqa: N801 - the kernel's names
    _pack_ = 1
    _fields_ = [("cylinders", u16), ("heads", u8), ("sectors", u8)]


class virtio_blk_config(ctypes.Structure):  # noqa: N801
    _pack_ = 1
    _fields_ = [("capacity", u64), ("size_max", u32), ("seg_max", u32), ("geometry", virtio_blk_geometry),
                ("blk_size", u32), ("physical_block_exp", u8), ("alignment_offset", u8), ("min_io_size", u16),
                ("opt_io_size", u32), ("wce", u8), ("unused", u8), ("num_queues", u16),
                ("max_discard_sectors", u32), ("max_discard_seg", u32), ("discard_sector_alignment", u32),
                ("max_write_zeroes_sectors", u32), ("max_write_zeroes_seg", u32), ("write_zeroes_may_unmap", u8),
                ("unused1", u8 * 3), ("max_secure_erase_sectors", u32), ("max_secure_erase_seg", u32),
                ("secure_erase_sector_alignment", u32)]


class virtio_blk_outhdr(ctypes.Structure):  # noqa: N801
    _fields_ = [("type", u32), ("ioprio", u32), ("sector", u64)]


class virtio_blk_discard_write_zeroes(ctypes.Structure):  # noqa: N801
    _fields_ = [("sector", u64), ("num_sectors", u32), ("flags", u32)]


assert OUTHDR.itemsize == ctypes.sizeof(virtio_blk_outhdr) == 16
assert SEGMENT.itemsize == ctypes.sizeof(virtio_blk_discard_write_zeroes) == 16

# fallocate(2) modes (include/uapi/linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Malformed(Exception):
    """A request chain breaks the rules: the device needs a reset."""


class VirtioBlk:
    """The virtio-blk backend of a VirtioMmio transport, serving requestq against the image `fd`."""

    device_id = VIRTIO_ID_BLOCK
    num_queues = 1

    def __init__(self, fd: int, size: int, *, name: str = "virtio-blk", read_only: bool = False,
                 direct: bool = False, serial: str = "", discard: bool = False,
                 require_access_platform: bool = False, queue_num_max: int = 256) -> None:
        if size <= 0 or size % SECTOR:
            raise ValueError(f"image size {size} is not a whole number of sectors")
        self.fd = fd
        self.size = size
        self.name = name
        self.read_only = read_only
        self.direct = direct
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.require_access_platform = require_access_platform
        self.queue_num_max = queue_num_max
        self.max_chain_bytes = 16 + MAX_DATA_BYTES + 1 + MAX_DISCARD_SEG * 16
        discard = discard and not read_only
        self.device_features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM) | \
            (1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | \
            (1 << VIRTIO_BLK_F_FLUSH) | ((1 << VIRTIO_BLK_F_RO) if read_only else 0) | \
            (((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)) if discard else 0)
        config = virtio_blk_config(capacity=size // SECTOR, size_max=SIZE_MAX, seg_max=SEG_MAX, blk_size=SECTOR,
                                   num_queues=1)
        if discard:
            config.max_discard_sectors = config.max_write_zeroes_sectors = MAX_DISCARD_SECTORS
            config.max_discard_seg = config.max_write_zeroes_seg = MAX_DISCARD_SEG
            config.discard_sector_alignment = DIRECT_ALIGN // SECTOR
            config.write_zeroes_may_unmap = 1
        self._config = bytes(config)
        self.transport: VirtioMmio | None = None
        self.stats = {"requests": 0, "reads": 0, "writes": 0, "flushes": 0, "ioerr": 0, "notifies": 0,
                      "bytes_read": 0, "bytes_written": 0, "batched": 0, "merged_calls": 0,
                      "uring_batches": 0}
        self._write_through = True  # until the driver negotiates VIRTIO_BLK_F_FLUSH
        self._generation = 0  # bumped by reset(): completions of an older generation are dropped
        self._inflight = threading.Lock()  # held across a batch's file I/O; reset() waits for it (QEMU blk_drain)
        self._bounce: mmap.mmap | None = None
        self._uring = False  # vmmd.devices.uring.Uring once made, None where the kernel has no io_uring
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- VirtioBackend -----------------------------------------------------------------------------------------------
    def config_space(self) -> bytes:
        return self._config

    def accept_features(self, features: int) -> str | None:
        if self.require_access_platform and not features & (1 << VIRTIO_F_ACCESS_PLATFORM):
            return ("VIRTIO_F_ACCESS_PLATFORM not accepted: on SEV-ES the device can only reach the shared region, "
                    "so the driver must place rings and buffers there")
        self._write_through = not features & (1 << VIRTIO_BLK_F_FLUSH)
        return None

    def activate(self, transport: VirtioMmio, queues: list[Virtqueue | None]) -> None:
        self.transport = transport
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-io", daemon=True)
            self._thread.start()
        self._kick()

    def notify_eventfds(self) -> list[int]:
        """The eventfd the I/O thread sleeps on: the fast path registers it as requestq's ioeventfd, so a
        notify wakes this thread without passing through vmmd (vmmd.devices.virtio_fastpath)."""
        return [self._event_fd]

    def notify(self, queue_index: int) -> None:
        self.stats["notifies"] += 1
        self._kick()

    def reset(self) -> None:
        """Drop what is queued; wait for a batch whose file I/O is running (its completion is then dropped)."""
        self._generation += 1
        with self._inflight:
            pass

    # --- thread ------------------------------------------------------------------------------------------------------
    def _kick(self) -> None:
        try:
            os.eventfd_write(self._event_fd, 1)
        except OSError:
            pass

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._event_fd, select.POLLIN)
        while not self._stopping:
            try:
                poller.poll()
            except InterruptedError:
                continue
            if self._stopping:
                break
            try:
                os.eventfd_read(self._event_fd)
            except BlockingIOError:
                pass
            while self.serve_once():
                pass  # more was made available meanwhile, or the pass ran out of budget
        log.debug("%s: I/O thread ends", self.name)

    def serve_once(self) -> bool:
        """One pass: take the available requests, do their I/O, complete them. True if another pass is due."""
        transport = self.transport
        if transport is None:
            return False
        with transport.lock:
            if not transport.driver_ok:
                return False
            q = transport.queues[0]
            if q is None:
                return False
            generation = self._generation
            try:
                batch = self._take(q)
            except (VirtqueueError, _Malformed) as err:
                transport.needs_reset(f"malformed request: {err}")
                return False
            except Exception as err:  # noqa: BLE001 - a device bug must not kill the VMM; stop the device instead
                log.exception("%s: internal error parsing requests", self.name)
                transport.needs_reset(f"internal error ({type(err).__name__}: {err})")
                return False
        if batch is None:
            return False
        failure = None
        with self._inflight:
            if generation == self._generation:
                try:
                    self._execute(batch)
                except Exception as err:  # noqa: BLE001 - a device bug must not kill the VMM
                    log.exception("%s: internal error in request I/O", self.name)
                    failure = f"internal error ({type(err).__name__}: {err})"
        if failure is not None:  # outside _inflight: needs_reset() calls reset(), which takes it
            transport.needs_reset(failure)
            return False
        with transport.lock:
            if generation != self._generation or transport.queues[0] is not q or not transport.driver_ok:
                return False  # reset meanwhile: the rings are no longer the driver's
            self._complete(q, batch)
            transport.signal_used(q)
            return q.available() > 0

    # --- parsing (under the transport lock) --------------------------------------------------------------------------
    def _take(self, q: Virtqueue) -> _Batch | None:
        n = q.available()
        if not n:
            return None
        positions = (q.last_avail + np.arange(n, dtype=np.int64)) & q.mask
        heads = q.avail_ring[positions].astype(np.int64)
        if (heads >= q.size).any():
            raise VirtqueueError(f"queue 0: avail ring entry {int(heads.max())} is past the queue size {q.size}")
        batch = self._take_fast(q, heads)
        if batch is None:
            batch = self._take_slow(q, heads)
        q.last_avail = (q.last_avail + len(batch.heads)) & 0xFFFF
        return batch

    def _take_fast(self, q: Virtqueue, heads: np.ndarray) -> _Batch | None:
        """Every chain header(16, readable) -> data (IN: writable, OUT: readable) -> status (writable, last),
        in one DMA window: the whole batch is checked with numpy. None when the batch is not all like that.

        Written for few numpy calls (each costs microseconds whatever its size): what one batch of 256 requests
        spends here is most of what the device adds to the host's own pread() per request."""
        windows = q.windows
        if len(windows.windows) != 1:
            return None
        start, end, window, _mv = windows.windows[0]
        n = len(heads)
        desc = q.desc
        d0 = desc[heads]
        if (d0["flags"] != VIRTQ_DESC_F_NEXT).any() or (d0["len"] != 16).any() or int(d0["next"].max()) > q.mask:
            return None
        d1 = desc[d0["next"]]
        f1 = d1["flags"]
        if (f1 & np.uint16(0xFFFF ^ VIRTQ_DESC_F_WRITE) != VIRTQ_DESC_F_NEXT).any() or int(d1["next"].max()) > q.mask:
            return None
        d2 = desc[d1["next"]]
        if (d2["flags"] != VIRTQ_DESC_F_WRITE).any() or not int(d2["len"].min()):
            return None
        lengths = d1["len"].astype(np.int64)
        if (lengths & (SECTOR - 1)).any() or not int(lengths.min()) or int(lengths.max()) > MAX_DATA_BYTES:
            return None
        # all three buffers of every request inside the window (addresses are u64: compare before subtracting)
        addrs = np.concatenate((d0["addr"], d1["addr"], d2["addr"]))
        lens = np.concatenate((np.full(n, 16, dtype=np.uint64), lengths.astype(np.uint64),
                               d2["len"].astype(np.uint64)))
        size = np.uint64(end - start)
        # per element: below the window, longer than it, or ending past it (the last term may wrap only where
        # one of the first two already holds)
        if ((addrs < np.uint64(start)) | (lens > size) | (addrs - np.uint64(start) > size - lens)).any():
            windows.locate_many(addrs, lens)  # raises VirtqueueError naming the first bad range
            raise VirtqueueError("a request buffer lies outside the memory the device may access")
        offs = (addrs - np.uint64(start)).astype(np.int64)
        hdr_off, data_off, status_off = offs[:n], offs[n:2 * n], offs[2 * n:] + (lens[2 * n:].astype(np.int64) - 1)
        if not (hdr_off & 7).any():  # headers 8-byte aligned, as drivers place them: two 64-bit gathers
            words = window[:window.size & ~7].view("<u8")
            types = words[hdr_off >> 3] & np.uint64(0xFFFF_FFFF)
            sectors = words[(hdr_off >> 3) + 1]
        else:
            hdrs = window[hdr_off[:, None] + np.arange(16, dtype=np.int64)].view(OUTHDR).ravel()
            types, sectors = hdrs["type"].astype(np.uint64), hdrs["sector"]
        is_in = types == VIRTIO_BLK_T_IN
        if int(types.max()) > VIRTIO_BLK_T_OUT or ((f1 & VIRTQ_DESC_F_WRITE != 0) != is_in).any():
            return None  # other types, or a data buffer whose direction does not match: the slow path
        offsets = (sectors << np.uint64(9)).astype(np.int64)
        bad = (sectors >= np.uint64(self.size // SECTOR)) | (offsets + lengths > self.size)
        if self.read_only:
            bad |= ~is_in
        status = bad.astype(np.uint8)  # VIRTIO_BLK_S_IOERR (1) where bad, VIRTIO_BLK_S_OK (0) elsewhere
        return _Batch(heads=heads, status_off=status_off, status=status,
                      written=np.where(is_in, lengths + 1, 1), fast=(is_in, data_off, lengths, offsets))

    def _take_slow(self, q: Virtqueue, heads: np.ndarray) -> _Batch:
        """The per-descriptor walk, for chains of any framing (and to say what is wrong with a bad one)."""
        q.visited = 0
        taken, requests = [], []
        for head in heads.tolist():
            if q.visited >= DESCRIPTOR_BUDGET:
                break
            requests.append(self._parse_chain(q, head))
            taken.append(head)
        heads = np.array(taken, dtype=np.int64)
        window_status = [(r.status_buf) for r in requests]
        return _Batch(heads=heads, status_off=None, status=np.zeros(len(taken), dtype=np.uint8),
                      written=np.zeros(len(taken), dtype=np.int64), slow=requests, status_bufs=window_status)

    def _parse_chain(self, q: Virtqueue, head: int) -> _Request:
        readable, writable = q.split_chain(head)
        if not writable:
            raise _Malformed(f"chain at {head} has no device-writable status byte (the status must be the last "
                             "byte, in a device-writable buffer)")
        rbufs = [q.windows.buffer(a, n) for a, n in readable]
        wbufs = [q.windows.buffer(a, n) for a, n in writable]
        header = _take_bytes(rbufs, 16)
        if len(header) < 16:
            raise _Malformed(f"chain at {head}: request header is {len(header)} bytes, not 16")
        hdr = np.frombuffer(header, dtype=OUTHDR)[0]
        status_buf = wbufs[-1][-1:]
        wbufs[-1] = wbufs[-1][:-1]
        wbufs = [b for b in wbufs if len(b)]
        rdata = _skip(rbufs, 16)
        req = _Request(head, int(hdr["type"]), int(hdr["sector"]), rdata, wbufs, status_buf)
        if req.type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            data = wbufs if req.type == VIRTIO_BLK_T_IN else rdata
            length = sum(len(b) for b in data)
            if req.type == VIRTIO_BLK_T_IN and rdata:
                raise _Malformed(f"chain at {head}: a read (T_IN) carries {sum(map(len, rdata))} device-readable "
                                 "data bytes")
            if length % SECTOR or length > MAX_DATA_BYTES:
                raise _Malformed(f"chain at {head}: {'read' if req.type == VIRTIO_BLK_T_IN else 'write'} of "
                                 f"{length} bytes, not a multiple of {SECTOR} (or over {MAX_DATA_BYTES})")
            req.data = data
            req.length = length
        return req

    # --- I/O (outside the transport lock) ----------------------------------------------------------------------------
    def _execute(self, batch: _Batch) -> None:
        wrote = False
        if batch.fast is not None:
            self.stats["batched"] += len(batch.heads)
            wrote = self._execute_fast(batch)
        else:
            for i, req in enumerate(batch.slow):
                status, written, did_write = self._serve(req)
                batch.status[i] = status
                batch.written[i] = written
                wrote |= did_write
        if wrote and self._write_through:
            try:
                os.fdatasync(self.fd)
            except OSError as err:
                log.warning("%s: fdatasync failed: %s; the batch's writes report I/O errors", self.name, err)
                if batch.fast is not None:
                    batch.status[~batch.fast[0]] = VIRTIO_BLK_S_IOERR
                else:
                    for i, req in enumerate(batch.slow):
                        if req.type in (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD):
                            batch.status[i] = VIRTIO_BLK_S_IOERR
        self.stats["requests"] += len(batch.heads)
        self.stats["ioerr"] += int((batch.status == VIRTIO_BLK_S_IOERR).sum())

    def _execute_fast(self, batch: _Batch) -> bool:
        """The batch's reads and writes, one preadv()/pwrite() each straight into / out of guest memory, issued
        by map() so no bytecode runs per request; True when it wrote."""
        is_in, data_off, lengths, offsets = batch.fast
        mv = self.transport.windows.windows[0][3]
        todo = batch.status == VIRTIO_BLK_S_OK
        if self.direct:  # O_DIRECT needs aligned buffers, offsets and lengths; the others are bounced
            aligned = ((data_off | lengths | offsets) & (DIRECT_ALIGN - 1)) == 0
            for i in np.flatnonzero(todo & ~aligned).tolist():
                batch.status[i] = self._rw(bool(is_in[i]), mv[data_off[i]:data_off[i] + lengths[i]], int(offsets[i]))
            todo &= aligned
        reads = todo & is_in
        n_reads = int(np.count_nonzero(reads))
        n_todo = int(np.count_nonzero(todo))
        wrote = n_reads != n_todo
        if n_todo > 1 and self._ring() is not None and self._execute_uring(batch, todo, n_todo, n_reads):
            return wrote
        for read, which, count in ((True, reads, n_reads), (False, todo & ~is_in, n_todo - n_reads)):
            if not count:
                continue
            if count == len(which):
                idx, starts, lens, offs = None, data_off, lengths, offsets
            else:
                idx = np.flatnonzero(which)
                starts, lens, offs = data_off[idx], lengths[idx], offsets[idx]
            redo = self._merged(read, mv, starts, lens, offs) if count > 1 else None
            if redo is None:  # no two requests adjacent on the image: one call each
                bufs = map(mv.__getitem__, map(slice, starts.tolist(), (starts + lens).tolist()))
                if read:
                    bufs = zip(bufs)  # preadv takes a sequence of buffers: 1-tuples, built without bytecode
                try:
                    done = np.fromiter(map(os.preadv if read else os.pwrite, repeat(self.fd), bufs, offs.tolist()),
                                       dtype=np.int64, count=count)
                    redo = np.flatnonzero(done != lens)
                except OSError:
                    redo = np.arange(count)  # one by one below, to find which failed and why
            for j in redo.tolist():
                i = j if idx is None else int(idx[j])
                batch.status[i] = self._rw(read, mv[data_off[i]:data_off[i] + lengths[i]], int(offsets[i]))
            nbytes = int(lens.sum())
            self.stats["reads" if read else "writes"] += count
            self.stats["bytes_read" if read else "bytes_written"] += nbytes
        return wrote

    def _ring(self):
        """This disk's io_uring, made on first use (on the I/O thread); None where the kernel has none."""
        if self._uring is False:
            from vmmd.devices.uring import Uring

            self._uring = Uring.create(1 << max(self.queue_num_max - 1, 1).bit_length())
        return self._uring

    def _execute_uring(self, batch: _Batch, todo: np.ndarray, n_todo: int, n_reads: int) -> bool:
        """The batch's requests as io_uring entries, submitted and reaped with one io_uring_enter(): no system
        call per request. Requests adjacent on the image go to _merged() instead (False: not done here)."""
        is_in, data_off, lengths, offsets = batch.fast
        idx = None if n_todo == len(todo) else np.flatnonzero(todo)
        starts, lens, offs = (data_off, lengths, offsets) if idx is None else \
            (data_off[idx], lengths[idx], offsets[idx])
        order = np.argsort(offs, kind="stable")
        so = offs[order]
        if (so[1:] == so[:-1] + lens[order][:-1]).any():
            return False  # something to merge: fewer, larger calls beat one entry per request
        write = ~is_in if idx is None else ~is_in[idx]
        base = self.transport.windows.windows[0][2].ctypes.data
        try:
            done = self._uring.run(write, self.fd, starts.astype(np.uint64) + np.uint64(base), lens, offs)
        except OSError as err:
            log.warning("%s: io_uring failed (%s); using plain system calls from now on", self.name, err)
            self._uring.close()
            self._uring = None
            return False
        mv = self.transport.windows.windows[0][3]
        for j in np.flatnonzero(done != lens).tolist():  # errors and short transfers: again, one by one
            i = j if idx is None else int(idx[j])
            batch.status[i] = self._rw(bool(is_in[i]), mv[data_off[i]:data_off[i] + lengths[i]], int(offsets[i]))
        self.stats["uring_batches"] += 1
        n_bytes_in = int(lens[~write].sum())
        self.stats["reads"] += n_reads
        self.stats["writes"] += n_todo - n_reads
        self.stats["bytes_read"] += n_bytes_in
        self.stats["bytes_written"] += int(lens.sum()) - n_bytes_in
        return True

    def _merged(self, read: bool, mv: memoryview, starts: np.ndarray, lens: np.ndarray,
                offs: np.ndarray) -> np.ndarray | None:
        """Requests that are adjacent on the image, served by one preadv()/pwritev() per run, as QEMU merges them
        (hw/block/virtio-blk.c virtio_blk_submit_multireq). Outstanding requests have no order among themselves
        (spec 5.2.6.4: a driver that needs one waits for the completion first), so sorting them is allowed.
        Returns the positions that must be redone one by one (short or failed runs), or None when nothing is
        adjacent to anything (the caller's one-call-per-request path is cheaper then)."""
        order = np.argsort(offs, kind="stable")
        so, sl = offs[order], lens[order]
        breaks = np.flatnonzero(so[1:] != so[:-1] + sl[:-1]) + 1
        if len(breaks) == len(offs) - 1:
            return None
        bounds = np.concatenate(([0], breaks, [len(offs)]))
        if (np.diff(bounds) > MERGE_MAX_IOV).any():  # IOV_MAX: split long runs
            bounds = np.unique(np.concatenate((bounds, np.arange(0, len(offs), MERGE_MAX_IOV))))
        ss = starts[order]
        bufs = list(map(mv.__getitem__, map(slice, ss.tolist(), (ss + sl).tolist())))
        run_bytes = np.add.reduceat(sl, bounds[:-1])
        call = os.preadv if read else os.pwritev
        fd = self.fd
        redo = []
        self.stats["merged_calls"] += len(bounds) - 1
        for a, b, off, want in zip(bounds[:-1].tolist(), bounds[1:].tolist(), so[bounds[:-1]].tolist(),
                                   run_bytes.tolist(), strict=True):
            try:
                if call(fd, bufs[a:b], off) == want:
                    continue
            except OSError:
                pass
            redo.extend(order[a:b].tolist())
        return np.array(redo, dtype=np.int64)

    def _rw(self, read: bool, buf: memoryview, offset: int) -> int:
        """One whole read into / write from `buf` at `offset`, looping over short transfers; a status."""
        try:
            if self.direct and (offset % DIRECT_ALIGN or len(buf) % DIRECT_ALIGN or _address(buf) % DIRECT_ALIGN):
                return self._rw_bounced(read, buf, offset)
            done = 0
            while done < len(buf):
                part = buf[done:]
                n = os.preadv(self.fd, [part], offset + done) if read else os.pwrite(self.fd, part, offset + done)
                if n <= 0:
                    return VIRTIO_BLK_S_IOERR  # the image shrank under us
                done += n
            return VIRTIO_BLK_S_OK
        except OSError as err:
            log.warning("%s: %s of %d bytes at %d failed: %s", self.name, "read" if read else "write", len(buf),
                        offset, err)
            return VIRTIO_BLK_S_IOERR

    def _rw_bounced(self, read: bool, buf: memoryview, offset: int) -> int:
        """O_DIRECT needs aligned buffers, offsets and lengths: go through an aligned extent of a bounce buffer
        (an anonymous mmap, page aligned), read-modify-write for writes that do not cover whole blocks."""
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + len(buf)) // DIRECT_ALIGN) * DIRECT_ALIGN
        end = min(end, -(-self.size // DIRECT_ALIGN) * DIRECT_ALIGN)
        if self._bounce is None or len(self._bounce) < end - start:
            self._bounce = mmap.mmap(-1, max(end - start, MAX_DATA_BYTES + 2 * DIRECT_ALIGN))
        bounce = memoryview(self._bounce)[:end - start]
        partial = offset != start or offset + len(buf) != end
        if read or partial:
            got = os.preadv(self.fd, [bounce], start)
            if got < min(end, self.size) - start:
                return VIRTIO_BLK_S_IOERR
        lo = offset - start
        if read:
            buf[:] = bounce[lo:lo + len(buf)]
            return VIRTIO_BLK_S_OK
        bounce[lo:lo + len(buf)] = buf
        # the last block of an image whose size is not a multiple of DIRECT_ALIGN cannot be written with O_DIRECT
        # past its end; such tails go through a plain descriptor
        if end > self.size:
            with open(f"/proc/self/fd/{self.fd}", "r+b", buffering=0) as plain:
                plain.seek(offset)
                plain.write(buf)
            return VIRTIO_BLK_S_OK
        if os.pwrite(self.fd, bounce, start) != end - start:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _serve(self, req: _Request) -> tuple[int, int, bool]:
        """(status, bytes written into the chain including the status, wrote to the image) of one request."""
        t = req.type
        if t in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            read = t == VIRTIO_BLK_T_IN
            offset = req.sector * SECTOR
            if offset + req.length > self.size or (not read and self.read_only):
                return VIRTIO_BLK_S_IOERR, 1, False
            status = VIRTIO_BLK_S_OK
            for buf in req.data:
                if status == VIRTIO_BLK_S_OK:
                    status = self._rw(read, buf, offset)
                offset += len(buf)
            self.stats["reads" if read else "writes"] += 1
            self.stats["bytes_read" if read else "bytes_written"] += req.length
            return status, (req.length + 1 if read else 1), not read
        if t == VIRTIO_BLK_T_FLUSH:
            self.stats["flushes"] += 1
            try:
                os.fdatasync(self.fd)
            except OSError as err:
                log.warning("%s: fdatasync failed: %s", self.name, err)
                return VIRTIO_BLK_S_IOERR, 1, False
            return VIRTIO_BLK_S_OK, 1, False
        if t == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            n = _put_bytes(req.wbufs, ident)
            return VIRTIO_BLK_S_OK, n + 1, False
        if t in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and \
                self.device_features & (1 << VIRTIO_BLK_F_DISCARD):
            return self._discard(req), 1, True
        return VIRTIO_BLK_S_UNSUPP, 1, False

    def _discard(self, req: _Request) -> int:
        raw = b"".join(bytes(b) for b in req.rdata)
        if not raw or len(raw) % 16 or len(raw) // 16 > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_UNSUPP if len(raw) // 16 > MAX_DISCARD_SEG else VIRTIO_BLK_S_IOERR
        zeroes = req.type == VIRTIO_BLK_T_WRITE_ZEROES
        for seg in np.frombuffer(raw, dtype=SEGMENT).tolist():
            sector, count, flags = seg
            offset, length = sector * SECTOR, count * SECTOR
            if offset + length > self.size or flags & ~(VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if zeroes else 0):
                return VIRTIO_BLK_S_UNSUPP if offset + length <= self.size else VIRTIO_BLK_S_IOERR
            try:
                if not zeroes:
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                elif flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:  # a hole reads back as zeroes
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                else:
                    fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    log.warning("%s: fallocate failed: %s", self.name, err)
                    return VIRTIO_BLK_S_IOERR
                if not zeroes:
                    return VIRTIO_BLK_S_UNSUPP  # discard is a hint: a file system without holes may refuse it
                status = self._write_zeroes(offset, length)
                if status != VIRTIO_BLK_S_OK:
                    return status
        return VIRTIO_BLK_S_OK

    def _write_zeroes(self, offset: int, length: int) -> int:
        zero = memoryview(mmap.mmap(-1, min(length, 1 << 20)))
        while length:
            n = min(length, len(zero))
            status = self._rw(False, zero[:n], offset)
            if status != VIRTIO_BLK_S_OK:
                return status
            offset += n
            length -= n
        return VIRTIO_BLK_S_OK

    # --- completion (under the transport lock) -----------------------------------------------------------------------
    def _complete(self, q: Virtqueue, batch: _Batch) -> None:
        n = len(batch.heads)
        if batch.status_off is not None:
            q.windows.windows[0][2][batch.status_off] = batch.status
        else:
            for buf, status in zip(batch.status_bufs, batch.status.tolist(), strict=True):
                buf[0] = status
        positions = (q.used_idx + np.arange(n, dtype=np.int64)) & q.mask
        q.used_ring[positions, 0] = batch.heads
        q.used_ring[positions, 1] = batch.written
        q.used_idx = (q.used_idx + n) & 0xFFFF
        q.used_flags_idx[1] = q.used_idx  # after the entries (x86 stores are ordered)

    def close(self) -> None:
        """Stop the I/O thread (the image fd belongs to the caller)."""
        self._stopping = True
        self._kick()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        try:
            os.close(self._event_fd)
        except OSError:
            pass
        self._event_fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
        if self._uring:
            self._uring.close()
        self._uring = None


class _Request:
    __slots__ = ("head", "type", "sector", "rdata", "wbufs", "status_buf", "data", "length")

    def __init__(self, head: int, type_: int, sector: int, rdata: list, wbufs: list, status_buf: memoryview):
        self.head, self.type, self.sector = head, type_, sector
        self.rdata, self.wbufs, self.status_buf = rdata, wbufs, status_buf
        self.data: list = []
        self.length = 0


class _Batch:
    __slots__ = ("heads", "status_off", "status", "written", "fast", "slow", "status_bufs")

    def __init__(self, heads, status_off, status, written, fast=None, slow=None, status_bufs=None) -> None:
        self.heads, self.status_off, self.status, self.written = heads, status_off, status, written
        self.fast, self.slow, self.status_bufs = fast, slow, status_bufs


def _take_bytes(bufs: list[memoryview], n: int) -> bytes:
    out = bytearray()
    for b in bufs:
        if len(out) >= n:
            break
        out += b[:n - len(out)]
    return bytes(out)


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


def _put_bytes(bufs: list[memoryview], data: bytes) -> int:
    done = 0
    for b in bufs:
        take = min(len(b), len(data) - done)
        b[:take] = data[done:done + take]
        done += take
        if done == len(data):
            break
    return done


def _address(buf: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) if not buf.readonly else 0


LAYOUT_HEADERS = ["linux/virtio_blk.h"]
# virtio_blk_config is not compared as a whole: Linux 6.3 appended the zoned characteristics (24 bytes, offered
# only with VIRTIO_BLK_F_ZONED, which vmmd does not offer), so its size differs between the two header sets the
# layout test uses; its fields up to secure_erase_sector_alignment are checked by tests/unit/test_virtio_blk.py.
LAYOUT_STRUCTS = [virtio_blk_geometry, virtio_blk_outhdr, virtio_blk_discard_write_zeroes]
LAYOUT_CONSTANTS = [name for name in dir() if name.startswith("VIRTIO_BLK_") and name.isupper()]
