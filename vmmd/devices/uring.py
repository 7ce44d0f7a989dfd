"""A minimal io_uring (include/uapi/linux/io_uring.h) for batches of reads and writes at given offsets.

Owns one ring: set up with the io_uring_setup(2) system call, its SQ/CQ rings and SQE array mapped and
viewed as numpy arrays, so a whole batch of submission entries is written with a few numpy calls and reaped
the same way, with one io_uring_enter(2) per batch instead of one preadv()/pwrite() per request. Nothing runs
asynchronously past `run()`: it returns only when every submitted entry has completed, so buffers (guest
memory) are never written after the caller moved on. No liburing: the raw ABI, as the uapi header defines
it, with its structs proven against the header by tests/test_layout.py.

Ordering (the kernel's side is liburing's io_uring_smp_store_release / load_acquire): entries are written
before the SQ tail, and the CQ tail is read before the entries; x86 keeps stores in order and loads in
order, and CPython runs these numpy stores in program order.

`Uring.create()` returns None where the kernel refuses io_uring (ENOSYS, EPERM from
kernel.io_uring_disabled or a seccomp filter, ENOMEM from RLIMIT_MEMLOCK on old kernels): callers then use
plain system calls.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os

import numpy as np

log = logging.getLogger("vmmd.uring")

u32, u64 = ctypes.c_uint32, ctypes.c_uint64
NR_IO_URING_SETUP = 425  # __NR_io_uring_setup, arch/x86/entry/syscalls/syscall_64.tbl
NR_IO_URING_ENTER = 426
IORING_OP_READ = 22  # enum io_uring_op
IORING_OP_WRITE = 23
IORING_SETUP_COOP_TASKRUN = 1 << 8  # Linux 5.19: completions run at the next enter, no IPI to this thread
IORING_ENTER_GETEVENTS = 1 << 0
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1 << 0


class io_sqring_offsets(ctypes.Structure):  # noqa: N801 - the kernel's names
    _fields_ = [("head", u32), ("tail", u32), ("ring_mask", u32), ("ring_entries", u32), ("flags", u32),
                ("dropped", u32), ("array", u32), ("resv1", u32), ("user_addr", u64)]  # resv2 before Linux 6.5


class io_cqring_offsets(ctypes.Structure):  # noqa: N801
    _fields_ = [("head", u32), ("tail", u32), ("ring_mask", u32), ("ring_entries", u32), ("overflow", u32),
                ("cqes", u32), ("flags", u32), ("resv1", u32), ("user_addr", u64)]  # resv2 before Linux 6.5


class io_uring_params(ctypes.Structure):  # noqa: N801
    _fields_ = [("sq_entries", u32), ("cq_entries", u32), ("flags", u32), ("sq_thread_cpu", u32),
                ("sq_thread_idle", u32), ("features", u32), ("wq_fd", u32), ("resv", u32 * 3),
                ("sq_off", io_sqring_offsets), ("cq_off", io_cqring_offsets)]


class io_uring_cqe(ctypes.Structure):  # noqa: N801
    _fields_ = [("user_data", u64), ("res", ctypes.c_int32), ("flags", u32)]


# struct io_uring_sqe (64 bytes; its unions reduced to the members a read or write uses): opcode, flags, ioprio,
# fd, off, addr, len, rw_flags, user_data, then buf_index / personality / splice_fd_in / addr3 / pad, all 0
SQE_DTYPE = np.dtype([("opcode", "u1"), ("flags", "u1"), ("ioprio", "<u2"), ("fd", "<i4"), ("off", "<u8"),
                      ("addr", "<u8"), ("len", "<u4"), ("rw_flags", "<u4"), ("user_data", "<u8"), ("rest", "<u8", 3)])
CQE_DTYPE = np.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4")])
assert SQE_DTYPE.itemsize == 64 and CQE_DTYPE.itemsize == ctypes.sizeof(io_uring_cqe) == 16

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class Uring:
    """One io_uring of `entries` submission slots; `run()` a batch of reads/writes, waiting for all of it."""

    def __init__(self, fd: int, params: io_uring_params) -> None:
        self.fd = fd
        self.entries = params.sq_entries
        sq, cq = params.sq_off, params.cq_off
        sq_bytes = sq.array + params.sq_entries * 4
        cq_bytes = cq.cqes + params.cq_entries * CQE_DTYPE.itemsize
        self._maps: list[mmap.mmap] = []
        try:
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            if params.features & IORING_FEAT_SINGLE_MMAP:
                sq_map = cq_map = self._map(max(sq_bytes, cq_bytes), IORING_OFF_SQ_RING, prot)
            else:
                sq_map = self._map(sq_bytes, IORING_OFF_SQ_RING, prot)
                cq_map = self._map(cq_bytes, IORING_OFF_CQ_RING, prot)
            sqes = self._map(params.sq_entries * SQE_DTYPE.itemsize, IORING_OFF_SQES, prot)
        except BaseException:
            self.close()
            raise
        sq_ring = np.frombuffer(sq_map, dtype=np.uint8)
        cq_ring = np.frombuffer(cq_map, dtype=np.uint8)
        self.sq_tail = sq_ring[sq.tail:sq.tail + 4].view("<u4")
        self.sq_mask = int(sq_ring[sq.ring_mask:sq.ring_mask + 4].view("<u4")[0])
        self.cq_head = cq_ring[cq.head:cq.head + 4].view("<u4")
        self.cq_tail = cq_ring[cq.tail:cq.tail + 4].view("<u4")
        self.cq_mask = int(cq_ring[cq.ring_mask:cq.ring_mask + 4].view("<u4")[0])
        self.cqes = cq_ring[cq.cqes:cq.cqes + params.cq_entries * 16].view(CQE_DTYPE)
        self.sqes = np.frombuffer(sqes, dtype=SQE_DTYPE)
        self.sqes[:] = np.zeros(1, dtype=SQE_DTYPE)
        # SQ slot i always names SQE i: the array is the identity, written once
        sq_ring[sq.array:sq.array + 4 * params.sq_entries].view("<u4")[:] = np.arange(params.sq_entries,
                                                                                     dtype=np.uint32)

    def _map(self, length: int, offset: int, prot: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, length, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot, offset=offset)
        self._maps.append(m)
        return m

    @classmethod
    def create(cls, entries: int) -> Uring | None:
        """A ring of `entries` (a power of two) slots, or None where the kernel offers no io_uring."""
        for flags in (IORING_SETUP_COOP_TASKRUN, 0):  # COOP_TASKRUN: Linux 5.19+, EINVAL before
            params = io_uring_params(flags=flags)
            fd = _syscall(NR_IO_URING_SETUP, entries, ctypes.byref(params))
            if fd >= 0:
                try:
                    return cls(fd, params)
                except OSError as err:
                    log.info("io_uring: mapping the rings failed (%s); using plain system calls", err)
                    return None
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                break
        log.info("io_uring unavailable (%s); using plain system calls", os.strerror(err))
        return None

    def run(self, write: np.ndarray, fd: int, addrs: np.ndarray, lengths: np.ndarray,
            offsets: np.ndarray) -> np.ndarray:
        """Read (write False) or write (True) lengths[i] bytes at host address addrs[i] from/to `fd` at
        offsets[i], for every i; returns each request's result (bytes, or -errno), after all have completed."""
        n = len(addrs)
        results = np.empty(n, dtype=np.int64)
        for start in range(0, n, self.entries):
            end = min(n, start + self.entries)
            self._batch(write[start:end], fd, addrs[start:end], lengths[start:end], offsets[start:end],
                        results[start:end])
        return results

    def _batch(self, write, fd, addrs, lengths, offsets, results) -> None:
        n = len(addrs)
        tail = int(self.sq_tail[0])
        slots = (tail + np.arange(n, dtype=np.int64)) & self.sq_mask
        sqe = np.zeros(n, dtype=SQE_DTYPE)
        sqe["opcode"] = np.where(write, IORING_OP_WRITE, IORING_OP_READ)
        sqe["fd"] = fd
        sqe["off"] = offsets
        sqe["addr"] = addrs
        sqe["len"] = lengths
        sqe["user_data"] = np.arange(n, dtype=np.uint64)
        self.sqes[slots] = sqe
        self.sq_tail[0] = (tail + n) & 0xFFFF_FFFF  # after the entries: the kernel's load_acquire pairs with it
        to_submit, done = n, 0
        while done < n:
            ret = _syscall(NR_IO_URING_ENTER, self.fd, to_submit, n - done, IORING_ENTER_GETEVENTS, None, 0)
            if ret < 0:
                err = ctypes.get_errno()
                if err in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    continue
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            to_submit = max(0, to_submit - ret)
            head, tail_cq = int(self.cq_head[0]), int(self.cq_tail[0])
            count = (tail_cq - head) & 0xFFFF_FFFF
            if count:
                cqes = self.cqes[(head + np.arange(count, dtype=np.int64)) & self.cq_mask]
                results[cqes["user_data"].astype(np.int64)] = cqes["res"]
                self.cq_head[0] = (head + count) & 0xFFFF_FFFF
                done += count

    def close(self) -> None:
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # numpy views still exported; the mapping goes with the last of them
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


LAYOUT_HEADERS = ["linux/io_uring.h"]
LAYOUT_STRUCTS = [io_sqring_offsets, io_cqring_offsets, io_uring_params, io_uring_cqe]
LAYOUT_CONSTANTS = ["IORING_SETUP_COOP_TASKRUN", "IORING_ENTER_GETEVENTS", "IORING_OFF_SQ_RING",
                    "IORING_OFF_CQ_RING", "IORING_OFF_SQES", "IORING_FEAT_SINGLE_MMAP"]
LAYOUT_ENUM_CONSTANTS = ["IORING_OP_READ", "IORING_OP_WRITE"]
# IORING_SETUP_NO_MMAP (6.5) renamed the rings' last reserved word; the offset and size did not change
ADDED_IN = {"struct io_sqring_offsets.user_addr": "6.5", "struct io_cqring_offsets.user_addr": "6.5",
            "struct io_uring_params.sq_off.user_addr": "6.5", "struct io_uring_params.cq_off.user_addr": "6.5"}
