"""The three KVM file-descriptor kinds: Kvm (/dev/kvm), Vm and Vcpu.

Each method is one ioctl (Documentation/virt/kvm/api.rst) with errors turned into
KvmError messages that name the operation, the errno and what to do. `Vcpu.run()`
only decodes kvm_run into an exit value (vmmd.kvm.exits); it interprets nothing.
A run loop may give `Vcpu.make_run()` handlers for one-byte port accesses, keyed
by the raw kvm_run.io header: those are called in place of returning the exit.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import grp
import mmap
import os
from collections.abc import Callable

from vmmd.errors import VmmdError
from vmmd.kvm import exits, uapi
from vmmd.kvm import ioctls as io
from vmmd.memory import GuestMemory

KVM_DEVICE = "/dev/kvm"
# Pages KVM needs for VMX without unrestricted guest (a TSS and an identity-map page table for real mode): as QEMU
# target/i386/kvm/kvm.c kvm_arch_init() places them since it "allows up to 16M BIOSes", below the 16 MiB a
# reset-vector image may take at the top of 4 GiB and above vmmd's MMIO windows (0xFEB00000..).
TSS_ADDR_GPA = 0xFEFF_D000  # 3 pages
IDENTITY_MAP_GPA = TSS_ADDR_GPA - 0x1000  # the page just below, as QEMU has them


class KvmError(VmmdError):
    """An ioctl on a KVM fd failed."""

    def __init__(self, operation: str, err: OSError, hint: str = "") -> None:
        self.operation = operation
        self.errno = err.errno
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        super().__init__(f"{operation} failed: {name} ({os.strerror(err.errno or 0)})" + (f"; {hint}" if hint else ""))


_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl_ulong = _libc.ioctl
_libc_ioctl_ulong.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc_ioctl_ulong.restype = ctypes.c_int


def _ioctl_ulong(fd: int, request: int, value: int, operation: str) -> int:
    """An ioctl whose argument is an unsigned long value (fcntl.ioctl only passes a C int)."""
    ret = _libc_ioctl_ulong(fd, request, value)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(operation, OSError(err, os.strerror(err)))
    return ret


def _ioctl(fd: int, request: int, arg, operation: str, hint: str = "") -> int:
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as err:
        raise KvmError(operation, err, hint) from None


def _get_device_attr(fd: int, group: int, attr: int) -> int | None:
    """KVM_GET_DEVICE_ATTR with a u64 value; None when the kernel lacks the attribute."""
    value = ctypes.c_uint64(0)
    req = uapi.kvm_device_attr(flags=0, group=group, attr=attr, addr=ctypes.addressof(value))
    try:
        fcntl.ioctl(fd, io.KVM_GET_DEVICE_ATTR, req)
    except OSError:
        return None
    return value.value


def _enable_cap(fd: int, cap: int, args: tuple[int, ...], operation: str) -> None:
    """KVM_ENABLE_CAP on a VM or vCPU fd (struct kvm_enable_cap, up to 4 args)."""
    req = uapi.kvm_enable_cap(cap=cap)
    for i, value in enumerate(args):
        req.args[i] = value
    _ioctl(fd, io.KVM_ENABLE_CAP, req, operation)


def _device_access_hint(path: str) -> str:
    """How this user gets read-write access to a device node, from its owner group and mode."""
    try:
        st = os.stat(path)
    except OSError:
        return "run as root"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    if st.st_gid != 0 and st.st_mode & 0o060 == 0o060:
        return f"run as root or add the user to group '{group}' (usermod -aG {group} $USER, then log in again)"
    return (f"it is mode {st.st_mode & 0o777:o} {group}, so only root may open it: run as root, or have udev "
            "give it to a group (e.g. KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\") and join that group")


class Kvm:
    """/dev/kvm: the system fd."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VmmdError(f"{path} does not exist: load the KVM module (modprobe kvm_amd or kvm_intel) and make "
                            "sure virtualization is enabled in the firmware setup") from None
        except PermissionError:
            raise VmmdError(f"{path} is not accessible to this user: {_device_access_hint(path)}") from None
        try:
            version = fcntl.ioctl(self.fd, io.KVM_GET_API_VERSION)
        except OSError as err:
            os.close(self.fd)
            raise VmmdError(f"{path} does not answer KVM_GET_API_VERSION ({os.strerror(err.errno or 0)}): it is "
                            "not a KVM device") from None
        if version != uapi.KVM_API_VERSION:
            os.close(self.fd)
            raise VmmdError(f"KVM API version is {version}, vmmd needs {uapi.KVM_API_VERSION}: the kernel is too "
                            "old or not Linux KVM")
        self.vcpu_mmap_size = fcntl.ioctl(self.fd, io.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when unsupported, else a capability-specific positive value."""
        try:
            return fcntl.ioctl(self.fd, io.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer while the kernel says E2BIG."""
        count = 64
        while True:
            buf = uapi.cpuid2_buffer(count)
            try:
                fcntl.ioctl(self.fd, io.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as err:
                if err.errno == errno.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise KvmError("KVM_GET_SUPPORTED_CPUID", err) from None
            return [uapi.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def get_device_attr(self, group: int, attr: int) -> int | None:
        """KVM_GET_DEVICE_ATTR on /dev/kvm (e.g. KVM_X86_GRP_SEV); None when the kernel lacks the attribute."""
        return _get_device_attr(self.fd, group, attr)

    def create_vm(self, vm_type: int = 0) -> Vm:
        try:
            fd = fcntl.ioctl(self.fd, io.KVM_CREATE_VM, vm_type)
        except OSError as err:
            hint = "this VM type is not supported by the host (see `vmctl host`)" if vm_type else ""
            raise KvmError(f"KVM_CREATE_VM(type={vm_type})", err, hint) from None
        return Vm(self, fd, vm_type)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A VM fd: memory slots, in-kernel devices, capabilities, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int, vm_type: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vm_type = vm_type
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        self._msr_filter_bitmaps: list = []  # kept alive while KVM may read them
        self.has_irqchip = False

    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        region = uapi.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size,
                                                  userspace_addr=hva)
        _ioctl(self.fd, io.KVM_SET_USER_MEMORY_REGION, region, f"KVM_SET_USER_MEMORY_REGION(slot {slot}, {gpa:#x})")

    def add_memory(self, memory: GuestMemory) -> None:
        """Register every slot of `memory` with KVM."""
        for slot in memory.slots:
            flags = uapi.KVM_MEM_READONLY if slot.read_only else 0
            self.set_user_memory_region(slot.slot, slot.gpa, slot.size, slot.hva, flags)
        self.memory = memory

    def set_tss_addr(self, gpa: int = TSS_ADDR_GPA) -> None:
        """KVM_SET_TSS_ADDR, and (before it, as QEMU does) KVM_SET_IDENTITY_MAP_ADDR where the kernel has it:
        otherwise KVM puts the identity map at TSS - 4 KiB by itself. Before any vCPU exists (api.rst)."""
        if self.kvm.check_extension(uapi.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            _ioctl(self.fd, io.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(gpa - 0x1000), "KVM_SET_IDENTITY_MAP_ADDR")
        _ioctl_ulong(self.fd, io.KVM_SET_TSS_ADDR, gpa, "KVM_SET_TSS_ADDR")

    def create_irqchip(self) -> None:
        """In-kernel PIC + IOAPIC + LAPICs (before any vCPU); device interrupts then go through irq_line()."""
        _ioctl(self.fd, io.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = True

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI `irq` of the in-kernel irqchip high (1) or low (0)."""
        _ioctl(self.fd, io.KVM_IRQ_LINE, uapi.kvm_irq_level(irq=irq, level=level), f"KVM_IRQ_LINE({irq})",
               "the VM has no in-kernel irqchip" if not self.has_irqchip else "")

    def ioeventfd(self, addr: int, length: int, fd: int, datamatch: int | None = None, pio: bool = False,
                  deassign: bool = False) -> None:
        """KVM_IOEVENTFD: KVM signals eventfd `fd` on each guest write of `length` bytes to MMIO (or, with `pio`,
        port) `addr`, equal to `datamatch` when given, and completes the write without a userspace exit
        (virt/kvm/eventfd.c kvm_assign_ioeventfd()). `deassign` removes the same registration."""
        flags = ((uapi.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
                 | (uapi.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (uapi.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0))
        _ioctl(self.fd, io.KVM_IOEVENTFD, uapi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd,
                                                            flags=flags), f"KVM_IOEVENTFD({addr:#x})")

    def irqfd(self, fd: int, gsi: int, resamplefd: int | None = None, deassign: bool = False) -> None:
        """KVM_IRQFD: a write to eventfd `fd` raises GSI `gsi` of the in-kernel irqchip (edge); with `resamplefd`
        it is level-triggered and KVM signals `resamplefd` when the guest acknowledges the interrupt."""
        flags = ((uapi.KVM_IRQFD_FLAG_RESAMPLE if resamplefd is not None else 0)
                 | (uapi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0))
        _ioctl(self.fd, io.KVM_IRQFD, uapi.kvm_irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd or 0),
               f"KVM_IRQFD(gsi {gsi})", "the VM has no in-kernel irqchip" if not self.has_irqchip else "")

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2 (after KVM_CREATE_IRQCHIP); flags KVM_PIT_SPEAKER_DUMMY: KVM answers port 0x61."""
        _ioctl(self.fd, io.KVM_CREATE_PIT2, uapi.kvm_pit_config(flags=flags), "KVM_CREATE_PIT2")

    def enable_cap(self, cap: int, *args: int) -> None:
        _enable_cap(self.fd, cap, args, f"KVM_ENABLE_CAP({cap})")

    def set_msr_filter(self, ranges: list[tuple[int, int, int, bytes]], default_deny: bool = False) -> None:
        """KVM_X86_SET_MSR_FILTER. Each range: (flags, base, nmsrs, bitmap) where a 0 bit denies (-> user exit)."""
        flt = uapi.kvm_msr_filter(flags=uapi.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else 0)
        keep = []
        for i, (flags, base, nmsrs, bitmap) in enumerate(ranges):
            buf = (ctypes.c_uint8 * len(bitmap)).from_buffer_copy(bitmap)
            keep.append(buf)
            flt.ranges[i] = uapi.kvm_msr_filter_range(flags=flags, nmsrs=nmsrs, base=base,
                                                      bitmap=ctypes.cast(buf, ctypes.POINTER(ctypes.c_uint8)))
        _ioctl(self.fd, io.KVM_X86_SET_MSR_FILTER, flt, "KVM_X86_SET_MSR_FILTER")
        self._msr_filter_bitmaps = keep

    def get_device_attr(self, group: int, attr: int) -> int | None:
        return _get_device_attr(self.fd, group, attr)

    def memory_encrypt_op(self, data: ctypes.Structure) -> None:
        """KVM_MEMORY_ENCRYPT_OP with a struct kvm_sev_cmd (its `error` field receives the firmware status)."""
        fcntl.ioctl(self.fd, io.KVM_MEMORY_ENCRYPT_OP, data)

    def memory_encrypt_reg_region(self, hva: int, size: int) -> None:
        _ioctl(self.fd, io.KVM_MEMORY_ENCRYPT_REG_REGION, uapi.kvm_enc_region(addr=hva, size=size),
               "KVM_MEMORY_ENCRYPT_REG_REGION", "raise RLIMIT_MEMLOCK (LimitMEMLOCK=) to cover guest RAM")

    def memory_encrypt_unreg_region(self, hva: int, size: int) -> None:
        _ioctl(self.fd, io.KVM_MEMORY_ENCRYPT_UNREG_REGION, uapi.kvm_enc_region(addr=hva, size=size),
               "KVM_MEMORY_ENCRYPT_UNREG_REGION")

    def create_vcpu(self, index: int) -> Vcpu:
        try:
            fd = fcntl.ioctl(self.fd, io.KVM_CREATE_VCPU, index)
        except OSError as err:
            raise KvmError(f"KVM_CREATE_VCPU({index})", err) from None
        vcpu = Vcpu(self, index, fd, self.kvm.vcpu_mmap_size)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Offsets into struct kvm_run (include/uapi/linux/kvm.h), checked by tests/test_layout.py
# through uapi.kvm_run; the union starts at byte 32.
_EXIT_REASON_U32 = uapi.kvm_run.exit_reason.offset // 4
_UNION = uapi.kvm_run.u.offset
assert _UNION == 32
_KVM_EXIT_IO = uapi.KVM_EXIT_IO
_KVM_RUN = io.KVM_RUN
_fcntl_ioctl = fcntl.ioctl  # with no third argument: the cheapest call (ARCHITECTURE.md, hot-path facts)
_IO_EXIT_CACHE_MAX = 256
# Where KVM puts port-I/O data in the vCPU mapping: arch/x86/kvm/x86.c, emulator_pio_in_out(), sets
# kvm_run.io.data_offset = KVM_PIO_PAGE_OFFSET * PAGE_SIZE (arch/x86/include/uapi/asm/kvm.h).
_PIO_DATA_OFFSET = uapi.KVM_PIO_PAGE_OFFSET * mmap.PAGESIZE


def byte_port_key(is_write: bool, port: int) -> int:
    """kvm_run.io's first 8 bytes (direction:8 size:8 port:16 count:32) for a one-byte, count-1 access of
    `port`: the key of `Vcpu.make_run()`'s byte_port_handlers."""
    direction = uapi.KVM_EXIT_IO_OUT if is_write else uapi.KVM_EXIT_IO_IN
    return direction | 1 << 8 | (port & 0xFFFF) << 16 | 1 << 32


class Vcpu:
    """A vCPU fd with its mmap'd kvm_run."""

    def __init__(self, vm: Vm, index: int, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run = uapi.kvm_run.from_buffer(self.run_map)
        view = memoryview(self.run_map)
        self.run_bytes = view
        self._u32 = view.cast("I")
        self._u64 = view.cast("Q")
        # Decoded port-I/O exits by kvm_run.io's first 8 bytes (direction, size, port, count). Exit values
        # are never mutated, so the hot path hands back the same object for the same access instead of
        # building one per exit (see docs/benchmarks.md: each Python object touched per exit costs here).
        self._io_exits: dict[int, exits.IoExit] = {}
        self.run = self.make_run()  # KVM_RUN until an exit, decoded into an exit value (see make_run)

    # --- registers ----------------------------------------------------------
    def _get(self, struct_type, request: int, operation: str):
        """A KVM_GET_* ioctl that fills one struct of `struct_type`."""
        value = struct_type()
        _ioctl(self.fd, request, value, operation)
        return value

    def get_regs(self) -> uapi.kvm_regs:
        return self._get(uapi.kvm_regs, io.KVM_GET_REGS, "KVM_GET_REGS")

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        _ioctl(self.fd, io.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> uapi.kvm_sregs:
        return self._get(uapi.kvm_sregs, io.KVM_GET_SREGS, "KVM_GET_SREGS")

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        _ioctl(self.fd, io.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> uapi.kvm_fpu:
        return self._get(uapi.kvm_fpu, io.KVM_GET_FPU, "KVM_GET_FPU")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: the MSRs KVM returned, in order; it stops at the first one it refuses."""
        buf = uapi.msrs_buffer(len(indices))
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = _ioctl(self.fd, io.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS: returns how many were accepted (KVM stops at the first refusal)."""
        buf = uapi.msrs_buffer(len(values))
        for i, (index, value) in enumerate(values.items()):
            buf.entries[i].index = index
            buf.entries[i].data = value & 0xFFFF_FFFF_FFFF_FFFF
        return _ioctl(self.fd, io.KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def get_msr(self, index: int) -> int | None:
        """One MSR as the guest's RDMSR would see it through KVM; None when KVM refuses it (#GP)."""
        try:
            return self.get_msrs([index]).get(index)
        except KvmError:
            return None

    def set_msr(self, index: int, value: int) -> bool:
        try:
            return self.set_msrs({index: value}) == 1
        except KvmError:
            return False

    def set_cpuid2(self, entries: list[uapi.kvm_cpuid_entry2]) -> None:
        buf = uapi.cpuid2_buffer(len(entries))
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        _ioctl(self.fd, io.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_xsave(self) -> uapi.kvm_xsave:
        return self._get(uapi.kvm_xsave, io.KVM_GET_XSAVE, "KVM_GET_XSAVE")

    def set_xsave(self, xsave: uapi.kvm_xsave) -> None:
        _ioctl(self.fd, io.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> uapi.kvm_xcrs:
        return self._get(uapi.kvm_xcrs, io.KVM_GET_XCRS, "KVM_GET_XCRS")

    def get_xcr0(self) -> int:
        xcrs = self.get_xcrs()
        for i in range(xcrs.nr_xcrs):
            if xcrs.xcrs[i].xcr == 0:
                return xcrs.xcrs[i].value
        return 1

    def set_xcr0(self, value: int) -> None:
        """KVM_SET_XCRS with XCR0 only (the one XCR KVM supports, x86.c kvm_vcpu_ioctl_x86_set_xcrs())."""
        xcrs = uapi.kvm_xcrs(nr_xcrs=1, flags=0)
        xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, value
        _ioctl(self.fd, io.KVM_SET_XCRS, xcrs, f"KVM_SET_XCRS(XCR0={value:#x})",
               "the guest's CPUID (leaf 0xD) must allow every XCR0 bit")

    def get_debugregs(self) -> uapi.kvm_debugregs:
        return self._get(uapi.kvm_debugregs, io.KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, dr6: int, dr7: int, db: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        """KVM_SET_DEBUGREGS: DR0-3, DR6, DR7 (bits 63:32 of DR6/DR7 must be 0, regs.c kvm_dr6_valid())."""
        dbg = uapi.kvm_debugregs(dr6=dr6, dr7=dr7, flags=0)
        for i, value in enumerate(db):
            dbg.db[i] = value
        _ioctl(self.fd, io.KVM_SET_DEBUGREGS, dbg, f"KVM_SET_DEBUGREGS(DR6={dr6:#x}, DR7={dr7:#x})")

    def get_vcpu_events(self) -> uapi.kvm_vcpu_events:
        return self._get(uapi.kvm_vcpu_events, io.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Queue an exception for the next KVM_RUN, as kvm_queue_exception{,_e}() does inside KVM: through
        KVM_SET_VCPU_EVENTS with exception.injected (no KVM_CAP_EXCEPTION_PAYLOAD needed). Any pending port-I/O
        completion runs first (x86.c kvm_arch_vcpu_ioctl_run(): complete_userspace_io, then event injection),
        so the exception is delivered at the next instruction, like one KVM injects while emulating."""
        events = self.get_vcpu_events()
        events.exception.injected = 1
        events.exception.pending = 0
        events.exception.nr = vector
        events.exception.has_error_code = 0 if error_code is None else 1
        events.exception.error_code = error_code or 0
        events.flags = 0  # change nothing else: no NMI / SIPI / SHADOW / SMM / payload / triple-fault fields
        _ioctl(self.fd, io.KVM_SET_VCPU_EVENTS, events, f"KVM_SET_VCPU_EVENTS(exception {vector})")

    def enable_cap(self, cap: int, *args: int) -> None:
        _enable_cap(self.fd, cap, args, f"KVM_ENABLE_CAP({cap}) on vCPU {self.index}")

    def get_mp_state(self) -> int:
        return self._get(uapi.kvm_mp_state, io.KVM_GET_MP_STATE, "KVM_GET_MP_STATE").mp_state

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, io.KVM_SET_MP_STATE, uapi.kvm_mp_state(mp_state=mp_state), "KVM_SET_MP_STATE")

    # --- running ------------------------------------------------------------
    def request_exit(self) -> None:
        """Make the current or next KVM_RUN return EINTR (kvm_run.immediate_exit, KVM_CAP_IMMEDIATE_EXIT)."""
        self.run_bytes[1] = 1

    def make_run(self, byte_port_handlers: dict[int, Callable] | None = None) -> Callable[[], exits.Exit]:
        """Build a `run()` closure over this vCPU's fd and kvm_run views: no attribute lookups per exit.

        `run()` does KVM_RUN until an exit it must report and returns that exit decoded. With
        `byte_port_handlers` (keys from `byte_port_key()`), a one-byte port access whose key is in the dict
        is served right here and KVM_RUN re-entered: an OUT calls `handler(byte)`, an IN calls `handler()`
        and stores its low byte for the guest. The caller owns the dict and decides what goes in it (the run
        loop puts the bus's resolved handlers there); this layer only matches kvm_run.io against the keys,
        it never interprets a port. An exception from a handler propagates out of `run()`.
        """
        fd, u32, u64, data, cache = self.fd, self._u32, self._u64, self.run_bytes, self._io_exits
        decode_io, decode_other, run_failed = self._decode_io, self._decode_other, self._run_failed
        handlers = byte_port_handlers if byte_port_handlers is not None else {}

        def run() -> exits.Exit:
            """KVM_RUN until an exit to report, decoded. Never raises for guest behaviour: failures come back
            as exit values."""
            while True:
                try:
                    _fcntl_ioctl(fd, _KVM_RUN)
                except OSError as err:
                    return run_failed(err)
                reason = u32[_EXIT_REASON_U32]
                if reason != _KVM_EXIT_IO:
                    return decode_other(reason)
                word = u64[4]  # kvm_run.io at byte 32: direction:8 size:8 port:16 count:32
                handler = handlers.get(word)
                if handler is not None and u64[5] == _PIO_DATA_OFFSET:
                    if word & 0xFF:  # KVM_EXIT_IO_OUT
                        handler(data[_PIO_DATA_OFFSET])
                    else:
                        data[_PIO_DATA_OFFSET] = handler() & 0xFF
                    continue
                ex = cache.get(word)
                if ex is not None and ex.data_offset == u64[5]:
                    return ex
                return decode_io(word)

        return run

    @staticmethod
    def _run_failed(err: OSError) -> exits.Exit:
        if err.errno in (errno.EINTR, errno.EAGAIN):
            return exits.INTERRUPTED
        return exits.RunFailedExit(err.errno or 0, f"KVM_RUN failed: {errno.errorcode.get(err.errno or 0)} "
                                                   f"({os.strerror(err.errno or 0)})")

    def _decode_other(self, reason: int) -> exits.Exit:
        """Every exit but port I/O (kvm_run's union members in include/uapi/linux/kvm.h)."""
        u32, u64 = self._u32, self._u64
        if reason == uapi.KVM_EXIT_MMIO:
            length = u32[12]
            is_write = self.run_bytes[52] != 0
            data = u64[5] & ((1 << (8 * length)) - 1) if is_write and length <= 8 else 0
            return exits.MmioExit(u64[4], length, is_write, data)
        if reason in (uapi.KVM_EXIT_X86_RDMSR, uapi.KVM_EXIT_X86_WRMSR):
            return exits.MsrExit(reason == uapi.KVM_EXIT_X86_WRMSR, u32[11], u64[6], u32[10])
        if reason == uapi.KVM_EXIT_HLT:
            return exits.HLT
        if reason == uapi.KVM_EXIT_SHUTDOWN:
            return exits.SHUTDOWN
        if reason == uapi.KVM_EXIT_INTR:
            return exits.INTERRUPTED
        if reason == uapi.KVM_EXIT_FAIL_ENTRY:
            return exits.FailEntryExit(u64[4], u32[10])
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            ndata = min(u32[9], 16)
            return exits.InternalErrorExit(u32[8], tuple(u64[5:5 + ndata]))
        if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            ndata = min(u32[9], 16)
            return exits.SystemEventExit(u32[8], tuple(u64[5:5 + ndata]))
        return exits.UnknownExit(reason, u64[4])

    def _decode_io(self, word: int) -> exits.IoExit:
        """kvm_run.io (struct kvm_run in include/uapi/linux/kvm.h) -> IoExit, remembered for the next time."""
        ex = exits.IoExit((word & 0xFF) == uapi.KVM_EXIT_IO_OUT, (word >> 8) & 0xFF, (word >> 16) & 0xFFFF,
                          word >> 32, self._u64[5])
        cache = self._io_exits
        if len(cache) >= _IO_EXIT_CACHE_MAX:  # the guest picks ports and counts: keep the cache bounded
            cache.clear()
        cache[word] = ex
        return ex

    def complete_msr_exit(self, data: int, error: bool) -> None:
        """Fill kvm_run.msr for the next KVM_RUN: the RDMSR result, or error=1 to inject #GP."""
        self.run_bytes[32] = 1 if error else 0
        self._u64[6] = data & 0xFFFF_FFFF_FFFF_FFFF

    def complete_mmio_read(self, value: int, length: int) -> None:
        self.run_bytes[40:40 + length] = value.to_bytes(8, "little")[:length]

    def close(self) -> None:
        self.kvm_run = None
        self._u32.release()
        self._u64.release()
        self.run_bytes.release()
        try:
            self.run_map.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
