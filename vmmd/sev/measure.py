"""What an SEV-ES launch measures, and the digest / measurement the firmware will report.

Owns the ONE description of a launch's measured content, `LaunchPlan`: the ordered
LAUNCH_UPDATE_DATA regions, then one VMSA page per vCPU in vCPU-index order (KVM
sev_launch_update_vmsa() walks kvm_for_each_vcpu, i.e. creation order), plus the
policy. The launch sequencer (vmmd/sev/launch.py) issues the commands from
`plan.regions` / `plan.vcpus` in that order; `launch_digest()` hashes
`plan.measured_chunks()`, which walks the same two tuples, so they cannot drift apart.

The SEV firmware (SEV API spec, LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA /
LAUNCH_MEASURE) keeps GCTX.LD = SHA-256 over every byte it encrypted, in order, and
reports MEASURE = HMAC-SHA256(TIK, 0x04 ‖ API_MAJOR ‖ API_MINOR ‖ BUILD ‖
GCTX.POLICY (u32 LE) ‖ GCTX.LD ‖ MNONCE) followed by MNONCE (the 48-byte blob of
KVM_SEV_LAUNCH_MEASURE). virtee/sev session.rs verify() checks the same bytes, and
virtee/sev-snp-measure guest.py seves_calc_launch_digest() computes the same LD for
OVMF (image, then VMSAs).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
from collections.abc import Iterator, Sequence

from vmmd.machine.layout import MAX_VCPUS
from vmmd.sev.cpu_types import resolve_cpu_sig
from vmmd.sev.ovmf import OvmfImage, ap_reset_state, bsp_reset_state
from vmmd.sev.vmsa import VMSA_PAGE_SIZE, VcpuState, build_vmsa

DIGEST_SIZE = 32
TIK_SIZE = 16
MNONCE_SIZE = 16
MEASURE_BLOB_SIZE = DIGEST_SIZE + MNONCE_SIZE
MEASURE_CONTEXT = 0x04  # SEV API spec LAUNCH_MEASURE: the constant byte that opens the HMAC input
# SEV API: LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA addresses and lengths are 16-byte aligned.
_UPDATE_ALIGN = 16


class SevPolicy(enum.IntFlag):
    """Guest policy bits (SEV API spec "Guest Policy"; API_MAJOR in [23:16], API_MINOR in [31:24])."""

    NODBG = 1 << 0
    NOKS = 1 << 1
    ES = 1 << 2
    NOSEND = 1 << 3
    DOMAIN = 1 << 4
    SEV = 1 << 5


DEFAULT_SEVES_POLICY = int(SevPolicy.NODBG | SevPolicy.ES)


@dataclasses.dataclass(frozen=True)
class MeasuredRegion:
    """One LAUNCH_UPDATE_DATA range: `data` is encrypted in place at `gpa` and hashed as it stands."""

    gpa: int
    data: bytes | bytearray | memoryview
    name: str

    def __post_init__(self) -> None:
        size = memoryview(self.data).nbytes
        if size == 0 or size % _UPDATE_ALIGN or self.gpa % _UPDATE_ALIGN or self.gpa < 0:
            raise ValueError(f"region {self.name}: gpa {self.gpa:#x} / size {size} must be 16-byte aligned, "
                             "non-empty (LAUNCH_UPDATE_DATA)")

    @property
    def size(self) -> int:
        return memoryview(self.data).nbytes

    def view(self) -> memoryview:
        """The bytes as an unsigned-byte memoryview (no copy)."""
        view = memoryview(self.data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")


@dataclasses.dataclass(frozen=True)
class VcpuLaunch:
    """A vCPU as launched: the state vmmd programs into KVM and the VMSA page KVM will derive from it.

    The platform programs `state` with vmsa.program_vcpu() (KVM_SET_SREGS / REGS / XCRS / XSAVE / MSRS /
    DEBUGREGS: every field build_vmsa() uses; KVM_SET_FPU would drop MXCSR) before LAUNCH_UPDATE_VMSA.
    """

    index: int
    state: VcpuState
    vmsa: bytes

    def __post_init__(self) -> None:
        if len(self.vmsa) != VMSA_PAGE_SIZE:
            raise ValueError(f"vCPU {self.index}: VMSA page must be {VMSA_PAGE_SIZE} bytes")


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Everything an SEV-ES launch measures, in launch order (see the module docstring)."""

    regions: tuple[MeasuredRegion, ...]
    vcpus: tuple[VcpuLaunch, ...]
    policy: int
    init2: bool
    vmsa_features: int
    cpu_sig: int

    def __post_init__(self) -> None:
        if [v.index for v in self.vcpus] != list(range(len(self.vcpus))):
            raise ValueError("vCPUs must be listed in index order 0..n-1 (KVM's LAUNCH_UPDATE_VMSA order)")
        if not 0 <= self.policy <= 0xFFFF_FFFF:
            raise ValueError(f"policy {self.policy:#x} is not a u32")
        if self.vcpus and not self.policy & SevPolicy.ES:
            raise ValueError(f"policy {self.policy:#x} lacks the ES bit (0x4) but the plan has VMSAs")

    def frozen(self) -> LaunchPlan:
        """This plan with every region's bytes copied: LAUNCH_UPDATE_DATA encrypts guest memory in place
        (arch/x86/kvm/svm/sev.c sev_launch_update_data()), so a plan over live guest-memory views would
        describe ciphertext once the launch has run."""
        if all(isinstance(r.data, bytes) for r in self.regions):
            return self
        regions = tuple(MeasuredRegion(r.gpa, bytes(r.view()), r.name) for r in self.regions)
        return dataclasses.replace(self, regions=regions)

    def measured_chunks(self) -> Iterator[memoryview]:
        """Every measured byte range, in the order the firmware hashes them."""
        for region in self.regions:
            yield region.view()
        for vcpu in self.vcpus:
            yield memoryview(vcpu.vmsa)

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary of the assumed inputs."""
        return {
            "regions": [{"name": r.name, "gpa": f"{r.gpa:#x}", "size": r.size} for r in self.regions],
            "vcpus": len(self.vcpus),
            "cpu_sig": f"{self.cpu_sig:#x}",
            "policy": f"{self.policy:#x}",
            "init": "KVM_SEV_INIT2" if self.init2 else "KVM_SEV_ES_INIT",
            "vmsa_features": f"{self.vmsa_features:#x}",
            "matches": launch_matches(self.init2, qemu=self.cpu_sig != 0),  # cpu_sig 0: a flat image, vmmd's own
        }


# Which launches a digest is the digest of. KVM puts the x87/SSE/AVX state into the VMSA only for VM types other
# than KVM_X86_DEFAULT_VM (arch/x86/kvm/svm/sev.c sev_es_sync_vmsa(): "Skip FPU and AVX setup with
# KVM_SEV_ES_INIT to avoid breaking older measurements"), so the two init paths measure different VMSAs.
# QEMU (target/i386/sev.c sev_kvm_type()) creates KVM_X86_DEFAULT_VM + KVM_SEV_ES_INIT for legacy-vm-type=on
# and for its default, auto (no sev-guest option QEMU exposes requires KVM_SEV_INIT2), and KVM_X86_SEV_ES_VM +
# KVM_SEV_INIT2 only for legacy-vm-type=off.
QEMU_LEGACY_VM_TYPE_INIT2 = {"off": True, "on": False, "auto": False}


def launch_matches(init2: bool, qemu: bool = True) -> str:
    """The launches a plan's digest predicts, named as QEMU and vmmd users choose them (`qemu` False for images
    only vmmd launches, such as its flat firmware)."""
    if init2:
        qemu_part = "QEMU -object sev-guest,legacy-vm-type=off; " if qemu else ""
        tool = "; sev-snp-measure --mode seves" if qemu else ""
        return (f"KVM_X86_SEV_ES_VM + KVM_SEV_INIT2 (FPU state in the VMSA): {qemu_part}vmmd's sev-es launch on "
                f"Linux 6.10+{tool}")
    qemu_part = "QEMU's default sev-guest (legacy-vm-type=auto) and legacy-vm-type=on; " if qemu else ""
    return (f"KVM_X86_DEFAULT_VM + KVM_SEV_ES_INIT (VMSA FPU area zero): {qemu_part}vmmd's sev-es launch before "
            "Linux 6.10")


def launch_digest(plan: LaunchPlan) -> bytes:
    """GCTX.LD: SHA-256 over every LAUNCH_UPDATE_DATA byte in order, then each VMSA page in vCPU order."""
    digest = hashlib.sha256()
    for chunk in plan.measured_chunks():
        digest.update(chunk)
    return digest.digest()


def _check_u8(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{name} {value} does not fit a byte")


def expected_measurement(digest: bytes, tik: bytes, api_major: int, api_minor: int, build: int, policy: int,
                         mnonce: bytes) -> bytes:
    """MEASURE = HMAC-SHA256(TIK, 0x04 ‖ API_MAJOR ‖ API_MINOR ‖ BUILD ‖ POLICY (u32 LE) ‖ LD ‖ MNONCE)."""
    if len(digest) != DIGEST_SIZE or len(tik) != TIK_SIZE or len(mnonce) != MNONCE_SIZE:
        raise ValueError(f"need a {DIGEST_SIZE}-byte digest, {TIK_SIZE}-byte TIK and {MNONCE_SIZE}-byte mnonce")
    for name, value in (("api_major", api_major), ("api_minor", api_minor), ("build", build)):
        _check_u8(name, value)
    if not 0 <= policy <= 0xFFFF_FFFF:
        raise ValueError(f"policy {policy:#x} is not a u32")
    message = (bytes((MEASURE_CONTEXT, api_major, api_minor, build)) + policy.to_bytes(4, "little")
               + bytes(digest) + bytes(mnonce))
    return hmac.new(bytes(tik), message, hashlib.sha256).digest()


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Outcome of verify(): `match`, both MEASURE values and the inputs that were assumed."""

    match: bool
    reported: bytes
    expected: bytes
    mnonce: bytes
    assumed: dict[str, object]


def split_measure_blob(blob: bytes) -> tuple[bytes, bytes]:
    """(MEASURE, MNONCE) from the 48-byte LAUNCH_MEASURE blob."""
    if len(blob) != MEASURE_BLOB_SIZE:
        raise ValueError(f"a LAUNCH_MEASURE blob is {MEASURE_BLOB_SIZE} bytes (MEASURE ‖ MNONCE), got {len(blob)}")
    return bytes(blob[:DIGEST_SIZE]), bytes(blob[DIGEST_SIZE:])


def verify(blob: bytes, tik: bytes, *, digest: bytes, api_major: int, api_minor: int, build: int,
           policy: int, assumed: dict[str, object] | None = None) -> VerifyResult:
    """Check a LAUNCH_MEASURE blob (MEASURE ‖ MNONCE) against the digest we expect; constant-time compare."""
    reported, mnonce = split_measure_blob(blob)
    expected = expected_measurement(digest, tik, api_major, api_minor, build, policy, mnonce)
    inputs: dict[str, object] = {
        "digest": digest.hex(), "api_version": f"{api_major}.{api_minor}", "build": build,
        "policy": f"{policy:#x}", "mnonce": mnonce.hex(),
    }
    inputs.update(assumed or {})
    return VerifyResult(match=hmac.compare_digest(reported, expected), reported=reported, expected=expected,
                        mnonce=mnonce, assumed=inputs)


def build_vcpu_launches(states: Sequence[VcpuState], *, init2: bool, vmsa_features: int) -> tuple[VcpuLaunch, ...]:
    """Pair each vCPU state with its VMSA page, index = position."""
    return tuple(VcpuLaunch(index=i, state=state,
                            vmsa=bytes(build_vmsa(state, vmsa_features=vmsa_features, init2=init2)))
                 for i, state in enumerate(states))


def build_ovmf_plan(ovmf_bytes: bytes | bytearray | memoryview, vcpus: int, cpu_sig: int | str, init2: bool = True,
                    vmsa_features: int = 0, policy: int = DEFAULT_SEVES_POLICY) -> LaunchPlan:
    """The plan QEMU follows for an OVMF SEV-ES guest: the whole image at 4 GiB - size, then the VMSAs.

    vCPU 0 is the BSP in the x86 reset state; the others start at the SEV-ES reset block EIP.
    `init2` defaults to True: KVM_SEV_INIT2 syncs the FPU state (FCW 0x37f, MXCSR 0x1f80) into
    the VMSA, which is what sev-snp-measure's seves/QEMU model contains and what QEMU measures with
    legacy-vm-type=off. QEMU's default (legacy-vm-type=auto) launches with KVM_SEV_ES_INIT: init2=False
    (launch_matches()).
    """
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"vcpus must be 1..{MAX_VCPUS}, got {vcpus}")
    sig = resolve_cpu_sig(cpu_sig)
    image = OvmfImage.from_bytes(ovmf_bytes)
    # QEMU refuses an SEV-ES launch without the reset block whatever the vCPU count
    # (hw/i386/pc_sysfw.c pc_system_flash_map() -> sev_es_save_reset_vector()).
    ap = ap_reset_state(image.sev_es_reset_eip(), sig)
    states = [bsp_reset_state(sig)] + [ap] * (vcpus - 1)
    region = MeasuredRegion(gpa=image.gpa, data=image.data, name="ovmf")
    return LaunchPlan(regions=(region,), vcpus=build_vcpu_launches(states, init2=init2, vmsa_features=vmsa_features),
                      policy=policy, init2=init2, vmsa_features=vmsa_features, cpu_sig=sig)
