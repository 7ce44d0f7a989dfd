"""Disk images: the one parser of a disk definition, opening an image safely, and QEMU-compatible image locks.

Owns what `--disk PATH[,ro][,cache=none|writeback][,serial=ID]` and a definition's `[[disk]]` table mean
(`disk_spec()` is the one validator both go through), and turning a DiskSpec (or a descriptor the daemon
opened and pinned for its caller) into an open, locked DiskImage. Nothing here ever creates, truncates or
resizes a file: images are opened without O_CREAT/O_TRUNC, and a size that is not a whole number of 512-byte
sectors is refused, not rounded.

Locking follows QEMU's image locking (block/file-posix.c raw_apply_lock_bytes() / raw_check_lock_bytes(),
util/osdep.c qemu_lock_fd()): open-file-description (OFD) locks, F_RDLCK on single bytes, byte
RAW_LOCK_PERM_BASE + i for each permission bit i the holder uses and RAW_LOCK_SHARED_BASE + i for each bit it
does not share with others. A conflict is a byte another description holds, tested with F_OFD_GETLK and
F_WRLCK. vmmd takes the permissions QEMU's virtio-blk takes (hw/block/block.c blkconf_apply_backend_options):
CONSISTENT_READ, plus WRITE unless read-only; it shares everything except WRITE. So two writers conflict, a
reader and a writer conflict (as in QEMU without share-rw=on), two readers do not - and the rule holds between
vmmd and QEMU in both directions. OFD locks belong to the open file, so a descriptor handed to a worker with
SCM_RIGHTS keeps them, and they vanish when the last descriptor closes (also on SIGKILL).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass, field

from vmmd.errors import ExitCode, VmmdError

SECTOR_SIZE = 512  # virtio-blk's unit (spec 5.2.6: "sector" is always 512 bytes)
MAX_DISKS = 4
CACHE_MODES = ("writeback", "none")
SERIAL_BYTES = 20  # VIRTIO_BLK_ID_BYTES (include/uapi/linux/virtio_blk.h)

# block/file-posix.c
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
# include/block/block-common.h: enum BlockPermission
BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_ALL = 0x0F
BLKGETSIZE64 = 0x80081272  # include/uapi/linux/fs.h: _IOR(0x12, 114, size_t)

# The one set of options: name -> True for a value option, False for a flag (a [[disk]] table uses the same
# names; its flags are booleans, and `path` is a key there).
DISK_OPTIONS = {"ro": False, "cache": True, "serial": True}


@dataclass(frozen=True)
class DiskSpec:
    """A validated disk definition."""

    path: str
    read_only: bool = False
    cache: str = "writeback"  # writeback: the page cache; none: O_DIRECT
    serial: str = ""  # what VIRTIO_BLK_T_GET_ID answers (at most 20 bytes)
    fd: int | None = field(default=None, compare=False)  # opened (and checked) for us: the daemon's workers

    def describe(self) -> str:
        opts = ["ro" if self.read_only else "rw", f"cache={self.cache}"] + ([f"serial={self.serial}"] if self.serial
                                                                            else [])
        return f"{self.path} ({', '.join(opts)})"

    def summary(self) -> dict:
        return {"path": self.path, "ro": self.read_only, "cache": self.cache, "serial": self.serial}


def disk_spec(options: dict, where: str) -> DiskSpec:
    """The one validator: {path, ro, cache, serial} -> DiskSpec; VmmdError (exit 3) naming `where` and the key."""
    unknown = sorted(set(options) - set(DISK_OPTIONS) - {"path"})
    if unknown:
        known = ", ".join(["path"] + [f"{k}=" if v else k for k, v in DISK_OPTIONS.items()])
        raise VmmdError(f"{where}: unknown option {unknown[0]!r} (known: {known})")
    path = options.get("path")
    if not isinstance(path, str) or not path:
        raise VmmdError(f"{where}: a disk needs the path of an existing image file")
    ro = options.get("ro", False)
    if not isinstance(ro, bool):
        raise VmmdError(f"{where}: 'ro' is true or false, got {ro!r}")
    cache = options.get("cache", "writeback")
    if cache not in CACHE_MODES:
        raise VmmdError(f"{where}: cache={cache!r}: use cache=writeback (the default) or cache=none (O_DIRECT)")
    serial = options.get("serial", "")
    if not isinstance(serial, str) or len(serial.encode()) > SERIAL_BYTES or not serial.isprintable():
        raise VmmdError(f"{where}: serial={serial!r}: at most {SERIAL_BYTES} bytes of printable text")
    return DiskSpec(path, ro, cache, serial)


def parse_disk_spec(text: str) -> DiskSpec:
    """'PATH[,ro][,cache=none|writeback][,serial=ID]' -> DiskSpec (the command line form of disk_spec())."""
    path, *parts = text.split(",")
    options: dict = {"path": path}
    where = f"--disk {text!r}"
    for part in parts:
        key, eq, value = part.partition("=")
        if key not in DISK_OPTIONS or DISK_OPTIONS[key] != bool(eq):
            known = ", ".join(f"{k}=" if v else k for k, v in DISK_OPTIONS.items())
            raise VmmdError(f"{where}: option {part!r} is not one of {known} (a path with a comma cannot be given "
                            "here)")
        options[key] = value if eq else True
    return disk_spec(options, where)


def check_disk_count(specs: list[DiskSpec]) -> None:
    if len(specs) > MAX_DISKS:
        raise VmmdError(f"{len(specs)} disks asked for; a guest has at most {MAX_DISKS}")


# --- opening -------------------------------------------------------------------------------------------------------
@dataclass
class DiskImage:
    """An open, locked image. `fd` is owned here; close() releases it and with it the locks."""

    spec: DiskSpec
    fd: int
    size: int  # bytes, a multiple of SECTOR_SIZE
    direct: bool  # O_DIRECT is set (cache=none)
    block_device: bool

    @property
    def sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_flags(read_only: bool) -> int:
    """How an image is opened: never created, never truncated; O_RDONLY for read-only disks."""
    return (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def open_image_fd(path: str, read_only: bool) -> int:
    """Open `path` for a disk, refusing what is not a regular file or block device before opening it for I/O.

    The path is pinned with O_PATH first (no driver open of a FIFO or character device); the open for I/O goes
    through /proc/self/fd, i.e. that same inode. OSError as the system gives it (turned into sentences by
    open_disk())."""
    pinned = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        mode = os.fstat(pinned).st_mode
        if stat.S_ISDIR(mode):
            raise OSError(errno.EISDIR, "is a directory", path)
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise OSError(errno.EINVAL, "not a regular file or block device", path)
        fd = os.open(f"/proc/self/fd/{pinned}", open_flags(read_only))
    finally:
        os.close(pinned)
    os.set_blocking(fd, True)
    return fd


def open_error_sentence(spec: DiskSpec, err: OSError) -> str:
    what = f"disk {spec.path}"
    if err.errno == errno.ENOENT:
        return f"{what}: no such file: create the image first (e.g. truncate -s 64M {spec.path}); vmmd never " \
               "creates or resizes one"
    if err.errno == errno.EISDIR:
        return f"{what}: is a directory; give the path of an image file"
    if err.errno in (errno.EACCES, errno.EPERM):
        how = "read" if spec.read_only else "read and write (or add ,ro)"
        return f"{what}: permission denied: you need to be able to {how} it"
    if err.errno == errno.EROFS:
        return f"{what}: on a read-only file system: add ,ro"
    if err.errno == errno.EINVAL and "block device" in str(err.strerror):
        return f"{what}: not a regular file or block device"
    if err.errno == errno.EINVAL and spec.cache == "none":
        return f"{what}: the file system does not support O_DIRECT (cache=none): use cache=writeback"
    return f"{what}: {err.strerror or err}"


def open_disk(spec: DiskSpec) -> DiskImage:
    """Open (or adopt `fd`, which the daemon opened for its caller) and lock a disk image; VmmdError (exit 3)
    with a sentence for a missing file, a directory, no permission, a locked image or a ragged size."""
    fd = spec.fd
    try:
        if fd is None:
            fd = open_image_fd(spec.path, spec.read_only)
        else:
            accmode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            if not spec.read_only and accmode != os.O_RDWR:
                os.close(fd)
                raise OSError(errno.EACCES, "opened read-only", spec.path)
    except OSError as err:
        raise VmmdError(open_error_sentence(spec, err), ExitCode.HOST_ERROR) from None
    try:
        st = os.fstat(fd)
        block_device = stat.S_ISBLK(st.st_mode)
        if not (block_device or stat.S_ISREG(st.st_mode)):
            raise VmmdError(f"disk {spec.path}: not a regular file or block device")
        if block_device:
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0]
        else:
            size = st.st_size
        if size == 0 or size % SECTOR_SIZE:
            raise VmmdError(f"disk {spec.path}: its size, {size} bytes, is not a whole non-zero number of "
                            f"{SECTOR_SIZE}-byte sectors; resize it yourself (e.g. truncate -s 64M), vmmd does "
                            "not")
        lock_image(fd, spec.read_only, spec.path)
        direct = spec.cache == "none"
        if direct:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            except OSError as err:
                raise VmmdError(open_error_sentence(spec, err)) from None
        return DiskImage(spec, fd, size, direct, block_device)
    except BaseException:
        os.close(fd)
        raise


# --- QEMU-compatible locks -----------------------------------------------------------------------------------------
def _flock(kind: int, start: int) -> bytes:
    # struct flock (x86-64): short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


def _held_by_other(fd: int, byte: int) -> bool:
    """qemu_lock_fd_test(fd, byte, 1, true): would an exclusive lock on `byte` conflict with someone's lock?"""
    result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return struct.unpack("hhqqi4x", result)[0] != fcntl.F_UNLCK


def image_permissions(read_only: bool) -> tuple[int, int]:
    """(perm, shared_perm) as QEMU's virtio-blk asks for them (hw/block/block.c, share-rw=off)."""
    perm = BLK_PERM_CONSISTENT_READ | (0 if read_only else BLK_PERM_WRITE)
    return perm, BLK_PERM_ALL & ~BLK_PERM_WRITE


def lock_image(fd: int, read_only: bool, path: str) -> None:
    """Take QEMU's lock bytes for a disk on `fd` (raw_apply_lock_bytes), after checking nobody conflicts
    (raw_check_lock_bytes); VmmdError naming the image when another program holds it."""
    perm, shared = image_permissions(read_only)
    try:
        for i in range(4):
            bit = 1 << i
            if perm & bit:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, RAW_LOCK_PERM_BASE + i))
            if not shared & bit:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, RAW_LOCK_SHARED_BASE + i))
        for i in range(4):
            bit = 1 << i
            if perm & bit and _held_by_other(fd, RAW_LOCK_SHARED_BASE + i):
                raise VmmdError(_locked(path, read_only))
            if not shared & bit and _held_by_other(fd, RAW_LOCK_PERM_BASE + i):
                raise VmmdError(_locked(path, read_only))
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            raise VmmdError(_locked(path, read_only)) from None
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise VmmdError(f"disk {path}: its file system does not support the OFD locks that keep two guests "
                            f"from writing one image ({err.strerror})") from None
        raise


def _locked(path: str, read_only: bool) -> str:
    other = "is in use by another guest or program that writes it" if read_only else \
        "is in use by another guest or program (a vmmd guest or QEMU)"
    return f"disk {path}: {other}; stop that one first, or give this guest its own image"
