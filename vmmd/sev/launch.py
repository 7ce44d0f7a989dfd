"""The SEV-ES launch: a sequencer over a small backend interface, a KVM backend and a firmware model.

Order (Documentation/virt/kvm/x86/amd-memory-encryption.rst; QEMU target/i386/sev.c
sev_kvm_init() -> sev_launch_start(), sev_launch_update_data(), sev_launch_get_measure() which
issues LAUNCH_UPDATE_VMSA first, sev_launch_finish(); Linux selftests lib/x86/sev.c
sev_vm_launch*(), which check KVM_SEV_GUEST_STATUS after each step):

    init          KVM_SEV_INIT2 on a KVM_X86_SEV_ES_VM (vmsa_features; ghcb_version 0, i.e. KVM's
                  choice, as QEMU and the selftests pass it, unless the caller asks for one), or the
                  legacy KVM_SEV_ES_INIT on a default VM (kernels before 6.10; GHCB version 1)
    register      KVM_MEMORY_ENCRYPT_REG_REGION over every RAM slot (pins it)
    launch_start  KVM_SEV_LAUNCH_START (policy, optional guest-owner DH cert / session)  -> LUPDATE
    update_data   KVM_SEV_LAUNCH_UPDATE_DATA for each plan region, in plan order         -> LUPDATE
    vcpu_state    the platform creates the vCPUs and sets their registers (callback)
    update_vmsa   KVM_SEV_LAUNCH_UPDATE_VMSA (every vCPU, in creation order)              -> LUPDATE
    measure       KVM_SEV_LAUNCH_MEASURE (size query, then the 48-byte blob)              -> LSECRET
    secret        KVM_SEV_LAUNCH_SECRET (optional)                                       -> LSECRET
    finish        KVM_SEV_LAUNCH_FINISH                                                  -> RUNNING

The plan (vmmd.sev.measure.LaunchPlan) is the single description of what is measured: the
sequencer issues LAUNCH_UPDATE_DATA from `plan.regions` and checks that guest memory holds
exactly the plan's bytes first, and the model hashes what it is asked to encrypt, so the order
and the predicted digest cannot drift apart.

Backends: `KvmSevBackend` issues the real ioctls on a KVM VM fd plus /dev/sev; `SevModel`
implements the firmware's guest state machine in software (same SEV_RET codes, 16-byte
alignment, the launch digest as the PSP computes it). It encrypts nothing. Any failure in the
sequencer releases everything (regions, VM and /dev/sev fds, guest memory) and names the step.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import hmac
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from vmmd.errors import GuestMemoryError, VmmdError
from vmmd.memory import GuestMemory
from vmmd.sev import measure, uapi
from vmmd.sev.psp import PlatformStatus, SevError
from vmmd.sev.uapi import SevGuestState, SevPolicy

UPDATE_ALIGN = 16  # SEV API: LAUNCH_UPDATE_DATA / LAUNCH_SECRET address and length alignment
PAGE_SIZE = 4096
STEPS = ("init", "register", "launch_start", "update_data", "vcpu_state", "update_vmsa", "measure", "secret",
         "finish")


# --- policy ---------------------------------------------------------------------------------
def build_policy(names: Iterable[str] = ("NODBG",), api_major: int = 0, api_minor: int = 0) -> int:
    """A policy word from flag names (case-insensitive: NODBG NOKS ES NOSEND DOMAIN SEV); ES is always set."""
    flags = SevPolicy.ES
    for name in names:
        try:
            flags |= SevPolicy[name.strip().upper()]
        except KeyError:
            valid = ", ".join(flag.name for flag in SevPolicy)
            raise VmmdError(f"unknown SEV policy flag {name!r}: use {valid}") from None
    return uapi.make_policy(flags, api_major, api_minor)


def check_policy(policy: int, platform: PlatformStatus | None) -> None:
    """Refuse, before anything is created, a policy an SEV-ES launch cannot use."""
    if not 0 <= policy <= 0xFFFF_FFFF:
        raise VmmdError(f"SEV policy {policy:#x} does not fit 32 bits")
    if not policy & SevPolicy.ES:
        raise VmmdError(f"SEV policy {uapi.describe_policy(policy)} lacks ES (bit 2): an SEV-ES guest needs it")
    if policy & uapi.SEV_POLICY_RESERVED_MASK:
        raise VmmdError(f"SEV policy {policy:#x} sets reserved bits {policy & uapi.SEV_POLICY_RESERVED_MASK:#x} "
                        "(15:6 must be zero)")
    if platform is not None:
        want = uapi.policy_api_version(policy)
        have = (platform.api_major, platform.api_minor)
        if want > have:
            raise VmmdError(f"SEV policy requires firmware API {want[0]}.{want[1]} but this firmware is "
                            f"{have[0]}.{have[1]}: LAUNCH_START would fail with SEV_RET_POLICY_FAILURE")
        if not platform.es_supported:
            raise VmmdError("the SEV firmware does not support SEV-ES (PLATFORM_STATUS flags bit 8 clear)")


# --- the backend interface -------------------------------------------------------------------
@dataclass(frozen=True)
class BackendCaps:
    """What a backend offers before anything is issued."""

    has_init2: bool  # KVM_X86_SEV_ES_VM + KVM_SEV_INIT2 (else legacy KVM_SEV_ES_INIT)
    vmsa_features: int  # INIT2: KVM_X86_SEV_VMSA_FEATURES; legacy: what ES_INIT sets (debug_swap)
    platform: PlatformStatus | None


class SevBackend(Protocol):
    """One method per launch command; each raises SevError(command, errno, fw_error) on failure."""

    name: str
    memory: GuestMemory

    def capabilities(self) -> BackendCaps: ...
    def init2(self, vmsa_features: int, ghcb_version: int) -> None: ...
    def es_init(self) -> None: ...
    def register_ram(self) -> None: ...
    def launch_start(self, policy: int, dh_cert: bytes | None, session: bytes | None) -> int: ...
    def launch_update_data(self, gpa: int, length: int) -> None: ...
    def launch_update_vmsa(self, vmsa_pages: list[bytes]) -> None: ...
    def launch_measure(self, length: int) -> tuple[int, bytes]: ...
    def launch_secret(self, header: bytes, guest_gpa: int, payload: bytes) -> None: ...
    def launch_finish(self) -> None: ...
    def guest_status(self) -> tuple[int, int, int]: ...
    def release(self) -> None: ...


def _hva(memory: GuestMemory, gpa: int, length: int, command: str) -> int:
    try:
        return memory.hva(gpa, length)
    except GuestMemoryError as err:
        raise SevError(command, errno.EFAULT, None, str(err)) from None


def _read_param(path: str) -> str:
    """A module parameter's value, "" when the module has no such parameter. (No pathlib here: this module is
    on the start path of every sev-es-emu run that reports a digest.)"""
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _buffer(data: bytes) -> ctypes.Array:
    return ctypes.create_string_buffer(bytes(data), len(data))


class KvmSevBackend:
    """The real commands: KVM_MEMORY_ENCRYPT_OP on a VM fd, with /dev/sev's fd in kvm_sev_cmd.sev_fd."""

    name = "kvm"

    def __init__(self, vm, memory: GuestMemory, sev_fd: int, caps: BackendCaps) -> None:
        self.vm = vm
        self.memory = memory
        self.sev_fd = sev_fd
        self._caps = caps
        self._registered: list[tuple[int, int]] = []

    @classmethod
    def create(cls, kvm, memory: GuestMemory, *, use_init2: bool | None = None,
               sev_path: str = "/dev/sev") -> KvmSevBackend:
        """Open /dev/sev, create the VM with the type the init path needs, add guest memory.

        use_init2 None: INIT2 when KVM_CAP_VM_TYPES has KVM_X86_SEV_ES_VM and KVM_X86_GRP_SEV exists.
        """
        from vmmd.kvm.uapi import KVM_CAP_VM_TYPES
        from vmmd.sev.psp import Psp

        psp = Psp(sev_path)
        try:
            platform = psp.platform_status()
            supported = kvm.get_device_attr(uapi.KVM_X86_GRP_SEV, uapi.KVM_X86_SEV_VMSA_FEATURES)
            can_init2 = bool(kvm.check_extension(KVM_CAP_VM_TYPES) & (1 << uapi.KVM_X86_SEV_ES_VM)) and \
                supported is not None
            if use_init2 is None:
                use_init2 = can_init2
            elif use_init2 and not can_init2:
                raise VmmdError("KVM_SEV_INIT2 was requested but this kernel lacks KVM_X86_SEV_ES_VM / "
                                "KVM_X86_GRP_SEV (Linux 6.10+)")
            if use_init2:
                features = supported or 0
            elif supported is not None:
                features = 0  # 6.10+: legacy KVM_SEV_ES_INIT behaves as INIT2 with vmsa_features 0
            else:
                # before 6.10 ES_INIT sets DebugSwap when kvm_amd debug_swap=Y (6.5-6.9; amd-memory-encryption.rst)
                on = _read_param("/sys/module/kvm_amd/parameters/debug_swap").upper() in ("Y", "1")
                features = uapi.SVM_SEV_FEAT_DEBUG_SWAP if on else 0
            caps = BackendCaps(use_init2, features, platform)
            vm = kvm.create_vm(uapi.KVM_X86_SEV_ES_VM if use_init2 else uapi.KVM_X86_DEFAULT_VM)
        except BaseException:
            psp.close()
            raise
        try:
            vm.add_memory(memory)
        except BaseException:
            vm.close()
            psp.close()
            raise
        backend = cls(vm, memory, psp.fd, caps)
        psp.fd = -1  # the backend owns it now
        return backend

    def capabilities(self) -> BackendCaps:
        return self._caps

    def _op(self, cmd_id: int, data: ctypes.Structure | None) -> None:
        cmd = uapi.kvm_sev_cmd(id=cmd_id, data=ctypes.addressof(data) if data is not None else 0, error=0,
                               sev_fd=self.sev_fd & 0xFFFF_FFFF)
        try:
            self.vm.memory_encrypt_op(cmd)
        except OSError as err:
            raise SevError(uapi.KVM_SEV_COMMAND_NAMES.get(cmd_id, f"KVM_SEV command {cmd_id}"), err.errno or 0,
                           cmd.error) from None

    def init2(self, vmsa_features: int, ghcb_version: int) -> None:
        self._op(uapi.KVM_SEV_INIT2, uapi.kvm_sev_init(vmsa_features=vmsa_features, flags=0,
                                                       ghcb_version=ghcb_version))

    def es_init(self) -> None:
        self._op(uapi.KVM_SEV_ES_INIT, None)

    def register_ram(self) -> None:
        for slot in self.memory.slots:
            if slot.read_only:
                continue
            try:
                self.vm.memory_encrypt_reg_region(slot.hva, slot.size)
            except VmmdError as err:
                code = getattr(err, "errno", 0) or 0
                hint = f"slot at GPA {slot.gpa:#x}"
                if code == errno.ENOMEM:  # sev_pin_memory(): over RLIMIT_MEMLOCK without CAP_IPC_LOCK
                    hint += f": {MEMLOCK_HINT}"
                raise SevError("KVM_MEMORY_ENCRYPT_REG_REGION", code, None, hint) from None
            self._registered.append((slot.hva, slot.size))

    def launch_start(self, policy: int, dh_cert: bytes | None, session: bytes | None) -> int:
        start = uapi.kvm_sev_launch_start(handle=0, policy=policy)
        keep = []
        if dh_cert:
            keep.append(_buffer(dh_cert))
            start.dh_uaddr, start.dh_len = ctypes.addressof(keep[-1]), len(dh_cert)
        if session:
            keep.append(_buffer(session))
            start.session_uaddr, start.session_len = ctypes.addressof(keep[-1]), len(session)
        self._op(uapi.KVM_SEV_LAUNCH_START, start)
        return start.handle

    def launch_update_data(self, gpa: int, length: int) -> None:
        hva = _hva(self.memory, gpa, length, "KVM_SEV_LAUNCH_UPDATE_DATA")
        try:
            self._op(uapi.KVM_SEV_LAUNCH_UPDATE_DATA, uapi.kvm_sev_launch_update_data(uaddr=hva, len=length))
        except SevError as err:
            if err.errno == errno.ENOMEM and err.fw_error is None:  # sev_pin_memory() on top of REG_REGION's pins
                raise SevError(err.command, err.errno, None, MEMLOCK_HINT) from None
            raise

    def launch_update_vmsa(self, vmsa_pages: list[bytes]) -> None:
        # KVM builds each VMSA from the vCPU's registers (sev_es_sync_vmsa()); the pages are the
        # prediction only. It encrypts every created vCPU, so the counts must agree.
        if len(self.vm.vcpus) != len(vmsa_pages):
            raise SevError("KVM_SEV_LAUNCH_UPDATE_VMSA", errno.EINVAL, None,
                           f"the VM has {len(self.vm.vcpus)} vCPUs but the plan has {len(vmsa_pages)} VMSAs")
        self._op(uapi.KVM_SEV_LAUNCH_UPDATE_VMSA, None)

    def launch_measure(self, length: int) -> tuple[int, bytes]:
        if length == 0:  # size query: the firmware answers SEV_RET_INVALID_LEN and KVM returns the size
            query = uapi.kvm_sev_launch_measure(uaddr=0, len=0)
            try:
                self._op(uapi.KVM_SEV_LAUNCH_MEASURE, query)
            except SevError as err:
                if err.fw_error != uapi.SEV_RET_INVALID_LEN or not query.len:
                    raise
            return query.len, b""
        buf = ctypes.create_string_buffer(length)
        data = uapi.kvm_sev_launch_measure(uaddr=ctypes.addressof(buf), len=length)
        self._op(uapi.KVM_SEV_LAUNCH_MEASURE, data)
        return data.len, buf.raw[:data.len]

    def launch_secret(self, header: bytes, guest_gpa: int, payload: bytes) -> None:
        hdr, trans = _buffer(header), _buffer(payload)
        guest = _hva(self.memory, guest_gpa, len(payload), "KVM_SEV_LAUNCH_SECRET")
        self._op(uapi.KVM_SEV_LAUNCH_SECRET, uapi.kvm_sev_launch_secret(
            hdr_uaddr=ctypes.addressof(hdr), hdr_len=len(header), guest_uaddr=guest, guest_len=len(payload),
            trans_uaddr=ctypes.addressof(trans), trans_len=len(payload)))

    def launch_finish(self) -> None:
        self._op(uapi.KVM_SEV_LAUNCH_FINISH, None)

    def guest_status(self) -> tuple[int, int, int]:
        status = uapi.kvm_sev_guest_status()
        self._op(uapi.KVM_SEV_GUEST_STATUS, status)
        return status.handle, status.policy, status.state

    def release(self) -> None:
        """Unregister regions, close the VM (and its vCPUs), /dev/sev and guest memory. Idempotent."""
        for hva, size in reversed(self._registered):
            try:
                self.vm.memory_encrypt_unreg_region(hva, size)
            except (VmmdError, OSError):
                pass  # closing the VM fd unregisters and unpins them anyway (sev_vm_destroy())
        self._registered.clear()
        if self.vm is not None:
            self.vm.close()
        if self.sev_fd >= 0:
            os.close(self.sev_fd)
            self.sev_fd = -1
        self.memory.close()


# --- the software model ---------------------------------------------------------------------
# sev_pin_memory() (arch/x86/kvm/svm/sev.c) counts pages per VM against RLIMIT_MEMLOCK unless CAP_IPC_LOCK:
# REG_REGION pins all guest RAM for the VM's life and LAUNCH_UPDATE_DATA pins each region again while it runs.
MEMLOCK_HINT = ("raise RLIMIT_MEMLOCK (ulimit -l, LimitMEMLOCK=) to guest RAM plus the largest measured region "
                "(the firmware image), or grant CAP_IPC_LOCK")
MODEL_CIPHER_BYTE = 0xA5  # what SevModel XORs measured pages with, standing in for their encryption
_MODEL_CIPHER_TABLE = bytes(b ^ MODEL_CIPHER_BYTE for b in range(256))  # bytes.translate() table of that XOR


class SevModel:
    """The SEV firmware's launch state machine (plus the KVM checks around it), in software.

    Guest states follow SEV API 55766: UNINIT -LAUNCH_START-> LUPDATE -LAUNCH_MEASURE-> LSECRET
    -LAUNCH_FINISH-> RUNNING. A command in the wrong state fails like the firmware's: EIO with
    SEV_RET_INVALID_GUEST_STATE. LAUNCH_UPDATE_DATA checks 16-byte alignment (SEV_RET_INVALID_ADDRESS /
    SEV_RET_INVALID_LEN), hashes the guest bytes it is given and then scrambles them in place (the firmware
encrypts them: the host never reads the plaintext back), then LAUNCH_UPDATE_VMSA hashes each
    VMSA page, into the launch digest GCTX.LD. LAUNCH_MEASURE returns HMAC-SHA256(TIK, ...) ‖ MNONCE
    with this model's TIK (random unless given). Kernel-side refusals (no INIT yet -> ENOTTY, bad INIT2
    arguments -> EINVAL) carry no firmware status, as in arch/x86/kvm/svm/sev.c. Model choices where
    the spec leaves it open: a second LAUNCH_START and LAUNCH_UPDATE_VMSA on a policy without ES fail
    with SEV_RET_INVALID_GUEST_STATE and SEV_RET_POLICY_FAILURE.

    The guest owner's channel (SEV API "Key Agreement", LAUNCH_START / LAUNCH_SECRET; vmmd/sev/owner.py): the
    model holds a P-384 PDH key (`pdh_key`, the simulated platform's; vmmd/sev/simpsp.py keeps one per host).
    With a GODH certificate and session blob, LAUNCH_START derives KEK/KIK from ECDH(PDH, GODH) and the
    session nonce, checks WRAP_MAC with KIK, unwraps TEK ‖ TIK with KEK and checks POLICY_MAC with TIK;
    without them it draws TEK and TIK itself, as the firmware does. LAUNCH_MEASURE's HMAC uses that TIK.
    LAUNCH_SECRET checks the packet MAC (TIK, over the header, payload and the MEASURE it reported),
    decrypts the payload with TEK and writes the plaintext to guest memory (`secret_memory`: on sev-es-emu
    the guest's own RAM, which nothing encrypts). Status codes where the spec names a check but this model
    had to choose the code: a malformed GODH -> SEV_RET_INVALID_CERTIFICATE, a wrong buffer length ->
    SEV_RET_INVALID_LEN, WRAP_MAC or packet MAC mismatch -> SEV_RET_BAD_MEASUREMENT, POLICY_MAC mismatch ->
    SEV_RET_POLICY_FAILURE, a compressed packet -> SEV_RET_UNSUPPORTED, unknown header flags ->
    SEV_RET_INVALID_PARAM. A simulated PSP proves nothing about a host: its key is not AMD's.
    """

    name = "model"

    def __init__(self, memory: GuestMemory, *, platform: PlatformStatus | None = None, has_init2: bool = True,
                 vmsa_features: int = 0, tik: bytes | None = None, owns_memory: bool = True,
                 pdh_key=None, secret_memory: GuestMemory | None = None) -> None:
        from vmmd.sev import sevcert

        self.memory = memory
        self.secret_memory = secret_memory if secret_memory is not None else memory
        self.pdh_key = pdh_key if pdh_key is not None else sevcert.generate(sevcert.Usage.PDH)[1]
        self.tek = os.urandom(16)
        self.owner_session = False  # did LAUNCH_START unwrap a guest owner's TEK/TIK?
        self.last_measure = b""  # the MEASURE LAUNCH_MEASURE reported (LAUNCH_SECRET's MAC covers it)
        self.secrets: list[tuple[int, int]] = []  # (gpa, length) of every LAUNCH_SECRET accepted
        self.platform = platform or PlatformStatus(api_major=1, api_minor=55, build=21, state=1,
                                                   flags=uapi.SEV_STATUS_FLAGS_CONFIG_ES, guest_count=0)
        self.has_init2 = has_init2
        self.supported_vmsa_features = vmsa_features
        self.tik = tik if tik is not None else os.urandom(measure.TIK_SIZE)
        self.owns_memory = owns_memory
        self.initialized = False
        self.es = False
        self.vmsa_features = 0
        self.ghcb_version = 0
        self.requested_ghcb_version: int | None = None  # kvm_sev_init.ghcb_version as INIT2 received it
        self.regions_registered = False
        self.state = SevGuestState.UNINIT
        self.handle = 0
        self.policy = 0
        self.vmsa_done = False
        self._digest = hashlib.sha256()
        self.log: list[str] = []  # every command accepted, in order
        self.released = False

    # helpers
    def capabilities(self) -> BackendCaps:
        return BackendCaps(self.has_init2, self.supported_vmsa_features, self.platform)

    @property
    def launch_digest(self) -> bytes:
        """GCTX.LD so far: SHA-256 over every byte LAUNCH_UPDATE_DATA / _VMSA took, in order."""
        return self._digest.copy().digest()

    def _need_guest(self, command: str) -> None:
        if not self.initialized:
            raise SevError(command, errno.ENOTTY, None, "no KVM_SEV_INIT2 / KVM_SEV_ES_INIT yet")

    def _need_state(self, command: str, *states: SevGuestState) -> None:
        self._need_guest(command)
        if self.state not in states:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_GUEST_STATE,
                           f"guest state is {self.state.name}, the command needs {'/'.join(s.name for s in states)}")

    # commands
    def init2(self, vmsa_features: int, ghcb_version: int) -> None:
        command = "KVM_SEV_INIT2"
        if not self.has_init2:
            raise SevError(command, errno.EINVAL, None, "this model has no KVM_X86_SEV_ES_VM")
        if self.initialized:
            raise SevError(command, errno.EINVAL, None, "already initialised")
        if vmsa_features & ~self.supported_vmsa_features:
            raise SevError(command, errno.EINVAL, None,
                           f"vmsa_features {vmsa_features:#x} not within {self.supported_vmsa_features:#x}")
        if ghcb_version > uapi.GHCB_VERSION_MAX:
            raise SevError(command, errno.EINVAL, None, f"ghcb_version {ghcb_version} > {uapi.GHCB_VERSION_MAX}")
        self.initialized, self.es = True, True
        self.vmsa_features = vmsa_features
        self.requested_ghcb_version = ghcb_version
        self.ghcb_version = ghcb_version or uapi.GHCB_VERSION_DEFAULT  # sev.c __sev_guest_init()
        self.log.append(command)

    def es_init(self) -> None:
        if self.initialized:
            raise SevError("KVM_SEV_ES_INIT", errno.EINVAL, None, "already initialised")
        self.initialized, self.es = True, True
        self.vmsa_features = self.supported_vmsa_features if not self.has_init2 else 0
        self.ghcb_version = uapi.GHCB_VERSION_MIN  # sev.c sev_guest_init(): "the minimal GHCB protocol version"
        self.log.append("KVM_SEV_ES_INIT")

    def register_ram(self) -> None:
        self._need_guest("KVM_MEMORY_ENCRYPT_REG_REGION")
        self.regions_registered = True
        self.log.append("KVM_MEMORY_ENCRYPT_REG_REGION")

    def launch_start(self, policy: int, dh_cert: bytes | None, session: bytes | None) -> int:
        command = "KVM_SEV_LAUNCH_START"
        self._need_state(command, SevGuestState.UNINIT)
        if uapi.policy_api_version(policy) > (self.platform.api_major, self.platform.api_minor):
            raise SevError(command, errno.EIO, uapi.SEV_RET_POLICY_FAILURE, "policy needs a newer firmware API")
        if policy & SevPolicy.ES and not self.platform.es_supported:
            raise SevError(command, errno.EIO, uapi.SEV_RET_POLICY_FAILURE, "the platform has no SEV-ES")
        if dh_cert or session:
            self.tek, self.tik = self._unwrap_owner_session(command, policy, dh_cert, session)
            self.owner_session = True
        self.state, self.handle, self.policy = SevGuestState.LUPDATE, 1, policy
        self.log.append(command)
        return self.handle

    def _unwrap_owner_session(self, command: str, policy: int, dh_cert: bytes | None,
                              session: bytes | None) -> tuple[bytes, bytes]:
        """SEV API LAUNCH_START with a guest owner: (TEK, TIK) from the GODH certificate and session blob."""
        from vmmd.sev import owner, sevcert

        if not dh_cert or not session:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_PARAM,
                           "a guest-owner launch needs both the DH certificate and the session blob")
        if len(dh_cert) != sevcert.CERT_SIZE:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_LEN,
                           f"the DH certificate is {len(dh_cert)} bytes, not {sevcert.CERT_SIZE:#x}")
        if len(session) != owner.SESSION_SIZE:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_LEN,
                           f"the session blob is {len(session)} bytes, not {owner.SESSION_SIZE}")
        try:
            godh = sevcert.SevCert.decode(dh_cert)
            if godh.curve != sevcert.Curve.P384:
                raise sevcert.CertError("the key is not on P-384")
            z = owner.shared_secret(self.pdh_key, godh)
        except (sevcert.CertError, owner.OwnerError) as err:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_CERTIFICATE, f"the DH certificate: {err}") \
                from None
        try:
            return owner.unwrap_session(z, owner.SessionBlob.decode(session), policy)
        except owner.PolicyMismatch as err:
            raise SevError(command, errno.EIO, uapi.SEV_RET_POLICY_FAILURE, str(err)) from None
        except owner.MacMismatch as err:
            raise SevError(command, errno.EIO, uapi.SEV_RET_BAD_MEASUREMENT, str(err)) from None

    def launch_update_data(self, gpa: int, length: int) -> None:
        command = "KVM_SEV_LAUNCH_UPDATE_DATA"
        self._need_state(command, SevGuestState.LUPDATE)
        if gpa % UPDATE_ALIGN:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_ADDRESS, f"address {gpa:#x} not 16-byte aligned")
        if length <= 0 or length % UPDATE_ALIGN:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_LEN, f"length {length} not a multiple of 16")
        try:
            data = self.memory.buffer(gpa, length)
        except GuestMemoryError as err:
            raise SevError(command, errno.EFAULT, None, str(err)) from None
        self._digest.update(data)
        # The firmware encrypts these pages in place; from the host they no longer read as what was measured.
        # A stand-in transform keeps the model as unforgiving as the hardware to code that rereads them.
        data[:] = data.tobytes().translate(_MODEL_CIPHER_TABLE)
        self.log.append(command)

    def launch_update_vmsa(self, vmsa_pages: list[bytes]) -> None:
        command = "KVM_SEV_LAUNCH_UPDATE_VMSA"
        self._need_guest(command)
        if not self.es:
            raise SevError(command, errno.ENOTTY, None, "not an SEV-ES guest")
        self._need_state(command, SevGuestState.LUPDATE)
        if self.vmsa_done:
            raise SevError(command, errno.EINVAL, None, "the vCPUs' state is already protected")
        if not self.policy & SevPolicy.ES:
            raise SevError(command, errno.EIO, uapi.SEV_RET_POLICY_FAILURE, "the guest policy lacks ES")
        for page in vmsa_pages:
            if len(page) != PAGE_SIZE:
                raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_LEN, "a VMSA is one 4 KiB page")
        for page in vmsa_pages:
            self._digest.update(page)
        self.vmsa_done = True
        self.log.append(command)

    def launch_measure(self, length: int) -> tuple[int, bytes]:
        command = "KVM_SEV_LAUNCH_MEASURE"
        self._need_state(command, SevGuestState.LUPDATE)
        size = measure.MEASURE_BLOB_SIZE
        if length < size:  # the size query: nothing changes
            return size, b""
        mnonce = os.urandom(measure.MNONCE_SIZE)
        value = measure.expected_measurement(self.launch_digest, self.tik, self.platform.api_major,
                                             self.platform.api_minor, self.platform.build, self.policy, mnonce)
        self.state = SevGuestState.LSECRET
        self.last_measure = value
        self.log.append(command)
        return size, value + mnonce

    def launch_secret(self, header: bytes, guest_gpa: int, payload: bytes) -> None:
        command = "KVM_SEV_LAUNCH_SECRET"
        self._need_state(command, SevGuestState.LSECRET)
        if guest_gpa % UPDATE_ALIGN:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_ADDRESS, f"address {guest_gpa:#x} not aligned")
        if not payload or len(payload) % UPDATE_ALIGN:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_LEN, f"length {len(payload)} not a multiple of 16")
        from vmmd.sev import owner

        if len(header) != owner.SECRET_HEADER_SIZE:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_LEN,
                           f"the packet header is {len(header)} bytes, not {owner.SECRET_HEADER_SIZE}")
        flags = owner.SecretHeader.decode(header).flags
        if flags & owner.SECRET_FLAG_COMPRESSED:
            raise SevError(command, errno.EIO, uapi.SEV_RET_UNSUPPORTED, "compressed secret packets are not supported")
        if flags & ~owner.SECRET_FLAGS_KNOWN:
            raise SevError(command, errno.EIO, uapi.SEV_RET_INVALID_PARAM, f"unknown header flags {flags:#x}")
        if not self.secret_memory.contains(guest_gpa, len(payload)):
            raise SevError(command, errno.EFAULT, None,
                           f"guest range {guest_gpa:#x}+{len(payload):#x} is not inside guest RAM")
        try:
            plain = owner.open_secret(self.tek, self.tik, self.last_measure, header, payload, len(payload))
        except owner.MacMismatch as err:
            raise SevError(command, errno.EIO, uapi.SEV_RET_BAD_MEASUREMENT, str(err)) from None
        try:
            self.secret_memory.write(guest_gpa, plain)
        except GuestMemoryError as err:
            raise SevError(command, errno.EFAULT, None, str(err)) from None
        self.secrets.append((guest_gpa, len(payload)))
        self.log.append(command)

    def launch_finish(self) -> None:
        command = "KVM_SEV_LAUNCH_FINISH"
        self._need_state(command, SevGuestState.LSECRET)
        self.state = SevGuestState.RUNNING
        self.log.append(command)

    def guest_status(self) -> tuple[int, int, int]:
        self._need_guest("KVM_SEV_GUEST_STATUS")
        if self.state == SevGuestState.UNINIT:
            raise SevError("KVM_SEV_GUEST_STATUS", errno.EIO, uapi.SEV_RET_INVALID_GUEST, "no LAUNCH_START yet")
        return self.handle, self.policy, int(self.state)

    def release(self) -> None:
        self.released = True
        self.initialized = False
        self.state = SevGuestState.UNINIT
        if self.owns_memory:
            self.memory.close()


# --- the sequencer --------------------------------------------------------------------------
class SevLaunchError(VmmdError):
    """A launch step failed; everything was released. Carries the step and, when a command failed, its codes."""

    def __init__(self, step: str, message: str, cause: SevError | None = None) -> None:
        self.step = step
        self.command = cause.command if cause else None
        self.errno = cause.errno if cause else None
        self.fw_error = cause.fw_error if cause else None
        super().__init__(f"SEV-ES launch failed at step '{step}': {message}; the VM, its memory and /dev/sev "
                         "were released")


class LaunchSecretError(VmmdError):
    """LAUNCH_SECRET was refused (by vmmd's checks or the firmware); the launch itself goes on, still paused."""

    def __init__(self, message: str, cause: SevError | None = None) -> None:
        self.fw_error = cause.fw_error if cause else None
        super().__init__(f"LAUNCH_SECRET refused: {message}; the guest is unharmed and still waits (LSECRET)")


def secret_shape_problem(secret: LaunchSecret, memory: GuestMemory | None) -> str | None:
    """Why a LAUNCH_SECRET packet cannot be issued as it stands (alignment, size, the page rule, guest RAM)."""
    from vmmd.sev.owner import SECRET_HEADER_SIZE

    if len(secret.header) != SECRET_HEADER_SIZE:
        return f"the packet header is {len(secret.header)} bytes; a LAUNCH_SECRET header is {SECRET_HEADER_SIZE}"
    if not secret.payload or len(secret.payload) % UPDATE_ALIGN:
        return f"the payload is {len(secret.payload)} bytes; it must be a non-zero multiple of 16"
    if secret.guest_gpa % UPDATE_ALIGN:
        return f"guest address {secret.guest_gpa:#x} is not 16-byte aligned (LAUNCH_SECRET's rule)"
    if secret.guest_gpa // PAGE_SIZE != (secret.guest_gpa + len(secret.payload) - 1) // PAGE_SIZE:
        return (f"the payload ({len(secret.payload)} bytes at {secret.guest_gpa:#x}) would cross a 4 KiB page: a "
                "LAUNCH_SECRET payload must not")
    if memory is not None and not memory.contains(secret.guest_gpa, len(secret.payload)):
        return f"guest address {secret.guest_gpa:#x}+{len(secret.payload):#x} is not inside guest RAM"
    return None


@dataclass(frozen=True)
class LaunchSecret:
    """A guest owner's LAUNCH_SECRET packet: header and (transport-encrypted) payload for guest_gpa."""

    header: bytes
    guest_gpa: int
    payload: bytes


@dataclass
class LaunchResult:
    backend: str
    init_command: str
    vm_type: int
    vmsa_features: int
    ghcb_version: int  # the version the guest's SEV_INFO offers as its maximum
    ghcb_version_chosen_by: str  # "request" or "KVM" (what sev.c __sev_guest_init() does with 0)
    handle: int
    policy: int
    measurement: bytes
    mnonce: bytes
    expected_digest: bytes  # measure.launch_digest(plan): what GCTX.LD must be
    platform: PlatformStatus | None
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "init": self.init_command, "vm_type": self.vm_type,
                "vmsa_features": self.vmsa_features, "ghcb_version": self.ghcb_version,
                "ghcb_version_chosen_by": self.ghcb_version_chosen_by, "handle": self.handle,
                "policy": uapi.describe_policy(self.policy), "measurement": self.measurement.hex(),
                "mnonce": self.mnonce.hex(), "launch_digest": self.expected_digest.hex(), "steps": self.steps,
                "platform": self.platform.as_dict() if self.platform else None}


# Guest state KVM_SEV_GUEST_STATUS must report after each step (Linux selftests lib/x86/sev.c).
EXPECTED_STATE = {
    "launch_start": SevGuestState.LUPDATE, "update_data": SevGuestState.LUPDATE,
    "update_vmsa": SevGuestState.LUPDATE, "measure": SevGuestState.LSECRET, "secret": SevGuestState.LSECRET,
    "finish": SevGuestState.RUNNING,
}


class SevEsLaunch:
    """Runs a LaunchPlan through a backend in the one valid order, checking guest state after each step."""

    def __init__(self, backend: SevBackend, plan: measure.LaunchPlan, *, ghcb_version: int | None = None,
                 dh_cert: bytes | None = None, session: bytes | None = None,
                 secret: LaunchSecret | None = None) -> None:
        self.backend = backend
        self.plan = plan.frozen()  # the bytes as planned; the launch encrypts guest memory in place
        self.ghcb_version = ghcb_version
        self.dh_cert = dh_cert
        self.session = session
        self.secret = secret
        self.caps = backend.capabilities()
        self.done: list[str] = []
        self.handle = 0
        self.measurement = b""
        self.mnonce = b""
        self.released = False
        try:
            self._check_plan()
        except VmmdError as err:
            self.abort()
            raise SevLaunchError("plan", str(err)) from None

    @staticmethod
    def load_blob(path: str | os.PathLike | None, what: str) -> bytes | None:
        """Read a guest-owner file (DH certificate, session blob); None when no path was given."""
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as err:
            raise VmmdError(f"cannot read the {what} file {path}: {err.strerror}") from None

    def _check_plan(self) -> None:
        plan, caps = self.plan, self.caps
        check_policy(plan.policy, caps.platform)
        if plan.init2 and not caps.has_init2:
            raise VmmdError("the plan assumes KVM_SEV_INIT2 but the backend only has legacy KVM_SEV_ES_INIT: "
                            "rebuild the plan with init2=False")
        if not plan.init2 and caps.has_init2:
            raise VmmdError("the plan assumes legacy KVM_SEV_ES_INIT but the backend's VM is a KVM_X86_SEV_ES_VM "
                            "(KVM_SEV_INIT2): rebuild the plan with init2=True")
        if plan.init2 and plan.vmsa_features & ~caps.vmsa_features:
            raise VmmdError(f"the plan's VMSA features {plan.vmsa_features:#x} are not all supported "
                            f"(KVM_X86_SEV_VMSA_FEATURES {caps.vmsa_features:#x}): use the intersection")
        if not plan.init2 and plan.vmsa_features != caps.vmsa_features:
            raise VmmdError(f"legacy KVM_SEV_ES_INIT will set VMSA features {caps.vmsa_features:#x} (kvm_amd "
                            f"debug_swap) but the plan assumes {plan.vmsa_features:#x}")
        if self.ghcb_version is not None:
            if not uapi.GHCB_VERSION_MIN <= self.ghcb_version <= uapi.GHCB_VERSION_MAX:
                raise VmmdError(f"GHCB version {self.ghcb_version} is outside {uapi.GHCB_VERSION_MIN}.."
                                f"{uapi.GHCB_VERSION_MAX}")
            if not plan.init2 and self.ghcb_version != uapi.GHCB_VERSION_MIN:
                raise VmmdError(f"GHCB version {self.ghcb_version} needs KVM_SEV_INIT2: legacy KVM_SEV_ES_INIT "
                                f"always offers version {uapi.GHCB_VERSION_MIN} (sev.c sev_guest_init())")
        if not plan.vcpus:
            raise VmmdError("the plan has no vCPUs: an SEV-ES launch measures at least one VMSA")
        for region in plan.regions:
            if not self.backend.memory.contains(region.gpa, region.size):
                raise VmmdError(f"region {region.name} ({region.gpa:#x}+{region.size:#x}) is not inside guest RAM")
        if self.secret is not None:
            problem = secret_shape_problem(self.secret, None)
            if problem:
                raise VmmdError(problem)

    # --- plumbing ----------------------------------------------------------------------------
    def abort(self) -> None:
        if not self.released:
            self.released = True
            self.backend.release()

    def _step(self, step: str, action: Callable[[], None], what: str = "") -> None:
        expected = next((s for s in STEPS if s not in self.done and not (s == "secret" and self.secret is None)),
                        None)
        if self.released:
            raise SevLaunchError(step, "the launch was already aborted")
        if step != expected:
            self.abort()
            raise SevLaunchError(step, f"out of order: the next step is '{expected}'")
        try:
            action()
            if step in EXPECTED_STATE:
                self._check_state(step)
        except SevError as err:
            self.abort()
            raise SevLaunchError(step + (f" ({what})" if what else ""), str(err), err) from None
        except (VmmdError, OSError, ValueError) as err:
            self.abort()
            raise SevLaunchError(step + (f" ({what})" if what else ""), str(err)) from None
        except BaseException:
            self.abort()
            raise
        self.done.append(step)

    def _check_state(self, step: str) -> None:
        handle, policy, state = self.backend.guest_status()
        want = EXPECTED_STATE[step]
        if state != want:
            name = SevGuestState(state).name if state in SevGuestState._value2member_map_ else str(state)
            raise VmmdError(f"KVM_SEV_GUEST_STATUS reports state {name}, expected {want.name}")
        if policy != self.plan.policy:
            raise VmmdError(f"KVM_SEV_GUEST_STATUS reports policy {policy:#x}, launched with {self.plan.policy:#x}")
        if self.handle and handle != self.handle:
            raise VmmdError(f"KVM_SEV_GUEST_STATUS reports handle {handle}, LAUNCH_START gave {self.handle}")

    # --- the steps, in order -----------------------------------------------------------------
    def init(self) -> None:
        if self.plan.init2:
            # 0 lets KVM choose (sev.c __sev_guest_init(): GHCB_VERSION_DEFAULT), as QEMU's sev_common_kvm_init()
            # and the selftests' vm_sev_ioctl(KVM_SEV_INIT2) pass it
            self._step("init", lambda: self.backend.init2(self.plan.vmsa_features, self.ghcb_version or 0))
        else:
            self._step("init", self.backend.es_init)

    def register(self) -> None:
        self._step("register", self.backend.register_ram)

    def launch_start(self) -> None:
        def start() -> None:
            self.handle = self.backend.launch_start(self.plan.policy, self.dh_cert, self.session)
        self._step("launch_start", start)

    def update_data(self) -> None:
        memory = self.backend.memory

        def update() -> None:
            for region in self.plan.regions:
                # bytes == bytes is a memcmp; memoryview == memoryview compares byte by byte, ~30x slower
                if memory.read(region.gpa, region.size) != bytes(region.view()):
                    raise VmmdError(f"guest memory of region {region.name} at {region.gpa:#x} differs from the "
                                    "launch plan: the loader and the plan drifted apart")
                try:
                    self.backend.launch_update_data(region.gpa, region.size)
                except SevError as err:
                    raise SevError(err.command, err.errno, err.fw_error,
                                   f"region {region.name} at {region.gpa:#x}+{region.size:#x}") from None
        self._step("update_data", update)

    def vcpu_state(self, set_vcpu_state: Callable[[measure.LaunchPlan], None]) -> None:
        self._step("vcpu_state", lambda: set_vcpu_state(self.plan))

    def update_vmsa(self) -> None:
        self._step("update_vmsa", lambda: self.backend.launch_update_vmsa([v.vmsa for v in self.plan.vcpus]))

    def measure(self) -> tuple[bytes, bytes]:
        def do_measure() -> None:
            size, _ = self.backend.launch_measure(0)
            if size < measure.MEASURE_BLOB_SIZE:
                raise VmmdError(f"LAUNCH_MEASURE reports a {size}-byte blob, expected {measure.MEASURE_BLOB_SIZE}")
            _, blob = self.backend.launch_measure(size)
            self.measurement, self.mnonce = measure.split_measure_blob(blob[:measure.MEASURE_BLOB_SIZE])
        self._step("measure", do_measure)
        return self.measurement, self.mnonce

    def inject_secret(self) -> None:
        s = self.secret
        if s is None:
            raise SevLaunchError("secret", "no LAUNCH_SECRET packet was given")
        self._step("secret", lambda: self.backend.launch_secret(s.header, s.guest_gpa, s.payload))

    def finish(self) -> None:
        self._step("finish", self.backend.launch_finish)

    def inject(self, secret: LaunchSecret) -> None:
        """LAUNCH_SECRET while the launch waits between LAUNCH_MEASURE and LAUNCH_FINISH (vmctl inject-secret).

        Unlike the other steps a refusal releases nothing: the firmware leaves the guest in LSECRET after a
        failed LAUNCH_SECRET, so the guest owner may try again. Raises LaunchSecretError with the reason; one
        secret per launch (vmmd's rule: a second packet is refused before the firmware sees it)."""
        if self.released:
            raise LaunchSecretError("the launch was aborted: there is no guest to inject into")
        if "finish" in self.done:
            raise LaunchSecretError("the guest was resumed (LAUNCH_FINISH ran): a secret can only be injected "
                                    "between LAUNCH_MEASURE and LAUNCH_FINISH")
        if "measure" not in self.done:
            raise LaunchSecretError("LAUNCH_MEASURE has not run yet: a secret goes in after the measurement")
        if "secret" in self.done:
            raise LaunchSecretError("a secret was already injected into this launch: vmmd injects one per launch")
        # the memory the secret lands in: the model's secret_memory (sev-es-emu: the guest's RAM), else guest RAM
        problem = secret_shape_problem(secret, getattr(self.backend, "secret_memory", self.backend.memory))
        if problem:
            raise LaunchSecretError(problem)
        try:
            self.backend.launch_secret(secret.header, secret.guest_gpa, secret.payload)
            self._check_state("secret")
        except SevError as err:
            raise LaunchSecretError(str(err), err) from None
        except VmmdError as err:
            raise LaunchSecretError(str(err)) from None
        self.secret = secret
        self.done.append("secret")

    def run_to_measure(self, set_vcpu_state: Callable[[measure.LaunchPlan], None]) -> tuple[bytes, bytes]:
        """Every step up to LAUNCH_MEASURE (an attested launch then waits for its owner); (MEASURE, MNONCE)."""
        self.init()
        self.register()
        self.launch_start()
        self.update_data()
        self.vcpu_state(set_vcpu_state)
        self.update_vmsa()
        return self.measure()

    @property
    def effective_ghcb_version(self) -> int:
        """The GHCB version KVM runs the guest with: the request, else what KVM picks (sev.c: INIT2 with 0 ->
        GHCB_VERSION_DEFAULT; KVM_SEV_ES_INIT -> GHCB_VERSION_MIN). KVM does not report it back (kvm_sev_init is
        input only, and the GHCB MSR it preloads with SEV_INFO is not readable through KVM_GET_MSRS); the guest
        sees it in the SEV_INFO response."""
        if self.ghcb_version is not None:
            return self.ghcb_version
        return uapi.GHCB_VERSION_DEFAULT if self.plan.init2 else uapi.GHCB_VERSION_MIN

    def result(self) -> LaunchResult:
        caps = self.caps
        return LaunchResult(
            backend=self.backend.name, init_command="KVM_SEV_INIT2" if self.plan.init2 else "KVM_SEV_ES_INIT",
            vm_type=uapi.KVM_X86_SEV_ES_VM if self.plan.init2 else uapi.KVM_X86_DEFAULT_VM,
            vmsa_features=self.plan.vmsa_features, ghcb_version=self.effective_ghcb_version,
            ghcb_version_chosen_by="request" if self.ghcb_version is not None else "KVM",
            handle=self.handle, policy=self.plan.policy, measurement=self.measurement, mnonce=self.mnonce,
            expected_digest=measure.launch_digest(self.plan), platform=caps.platform, steps=list(self.done))

    def run(self, set_vcpu_state: Callable[[measure.LaunchPlan], None]) -> LaunchResult:
        """All steps in order. `set_vcpu_state(plan)` must create the plan's vCPUs (index order) and set their
        registers from plan.vcpus[i].state; it runs after LAUNCH_UPDATE_DATA, before LAUNCH_UPDATE_VMSA."""
        self.run_to_measure(set_vcpu_state)
        if self.secret is not None:
            self.inject_secret()
        self.finish()
        return self.result()


def verify_model_measurement(result: LaunchResult, model: SevModel) -> bool:
    """True when the model's measurement equals HMAC(TIK, ... LD(plan) ...): the digest the plan predicts."""
    platform = model.platform
    expected = measure.expected_measurement(result.expected_digest, model.tik, platform.api_major,
                                            platform.api_minor, platform.build, result.policy, result.mnonce)
    return hmac.compare_digest(expected, result.measurement)
