"""An attested launch that waits for its guest owner between LAUNCH_MEASURE and LAUNCH_FINISH.

What QEMU offers through QMP (target/i386/sev.c: query-sev-launch-measure, query-sev,
sev-inject-launch-secret, and `cont` for LAUNCH_FINISH), for one vmmd launch: the platform runs the
sequencer up to LAUNCH_MEASURE (SevEsLaunch.run_to_measure()) and keeps a `PausedLaunch`; the daemon's
worker serves `measurement`, `inject-secret` and `resume` from it before the vCPUs ever run.

The default secret GPA is the boot-info page's secret_gpa for vmmd's flat images (firmware/include/
bootinfo.h) and, for OVMF, the base of the SEV secret block in its footer table (GUID
4c2eb361-7d9b-4cc3-8081-127c90d3d294: u32 base, u32 size; QEMU sev.c SEV_SECRET_GUID).
"""

from __future__ import annotations

import base64
import binascii
import struct
import uuid

from vmmd.errors import VmmdError
from vmmd.sev.launch import LaunchSecret, LaunchSecretError, SevEsLaunch
from vmmd.sev.uapi import SevGuestState, describe_policy

OVMF_SEV_SECRET_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")


def decode_base64_file(data: bytes, where: object, what: str, size: int) -> bytes:
    """A base64 file (whitespace ignored, as QEMU's g_base64_decode reads dh-cert-file= / session-file=) that
    must decode to exactly `size` bytes; VmmdError naming `where` otherwise."""
    text = b"".join(bytes(data).split())
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VmmdError(f"the {what} file {where} is not valid base64 (sevctl and vmctl owner session write it "
                        "base64-encoded)") from None
    if len(raw) != size:
        raise VmmdError(f"the {what} file {where} decodes to {len(raw)} bytes; a {what} is {size} ({size:#x}) bytes")
    return raw


def check_dh_cert(data: bytes, where: object) -> bytes:
    """The raw GODH certificate from a base64 file's bytes, checked to be an SEV certificate."""
    from vmmd.sev import sevcert

    raw = decode_base64_file(data, where, "guest-owner DH certificate", sevcert.CERT_SIZE)
    try:
        sevcert.SevCert.decode(raw)
    except sevcert.CertError as err:
        raise VmmdError(f"the guest-owner DH certificate {where} is not an SEV certificate: {err}") from None
    return raw


def check_session(data: bytes, where: object) -> bytes:
    from vmmd.sev.owner import SESSION_SIZE

    return decode_base64_file(data, where, "launch session", SESSION_SIZE)


def ovmf_secret_area(image: bytes | memoryview) -> tuple[int, int] | None:
    """(base GPA, size) of OVMF's SEV secret block, None when the image has none."""
    from vmmd.sev.ovmf import parse_footer_table

    data = parse_footer_table(image).get(OVMF_SEV_SECRET_GUID)
    if data is None or len(data) < 8:
        return None
    base, size = struct.unpack_from("<II", data)
    return (base, size) if base and size else None


class PausedLaunch:
    """The launch between LAUNCH_MEASURE and LAUNCH_FINISH; `simulated` when the PSP is vmmd's SevModel."""

    def __init__(self, launch: SevEsLaunch, *, simulated: bool, secret_area: tuple[int, int] | None) -> None:
        self.launch = launch
        self.simulated = simulated
        self.secret_area = secret_area
        self.injected: dict | None = None
        self.resumed = False

    def info(self) -> dict:
        """What `vmctl measurement --json` shows: QEMU's query-sev-launch-measure (`measurement`, base64 of
        MEASURE ‖ MNONCE) and query-sev (api_major, api_minor, build_id, policy, state, handle)."""
        launch = self.launch
        platform = launch.caps.platform
        info = {
            "measurement": base64.b64encode(launch.measurement + launch.mnonce).decode(),
            "measure": launch.measurement.hex(), "mnonce": launch.mnonce.hex(),
            "api_major": platform.api_major if platform else None,
            "api_minor": platform.api_minor if platform else None,
            "build_id": platform.build if platform else None,
            "policy": launch.plan.policy, "policy_text": describe_policy(launch.plan.policy),
            "handle": launch.handle,
            "state": (SevGuestState.RUNNING if self.resumed else SevGuestState.LSECRET).name,
            "owner_session": launch.session is not None,
            "secret_gpa": self.secret_area[0] if self.secret_area else None,
            "secret_size": self.secret_area[1] if self.secret_area else None,
            "secret_injected": self.injected is not None, "simulated": self.simulated,
        }
        if self.simulated:
            from vmmd.sev.simpsp import NOTE

            info["note"] = f"this measurement comes from a {NOTE}"
        return info

    def inject(self, header: bytes, payload: bytes, gpa: int | None) -> dict:
        """LAUNCH_SECRET; LaunchSecretError (the launch still waiting) when it is refused."""
        if self.resumed:
            raise LaunchSecretError("the guest was resumed (LAUNCH_FINISH ran): a secret can only be injected "
                                    "between LAUNCH_MEASURE and LAUNCH_FINISH")
        if gpa is None:
            if self.secret_area is None:
                raise LaunchSecretError("this image declares no secret area: give the guest address with --gpa")
            gpa = self.secret_area[0]
        if self.secret_area is not None and gpa == self.secret_area[0] and len(payload) > self.secret_area[1]:
            raise LaunchSecretError(f"the payload ({len(payload)} bytes) is larger than the secret area "
                                    f"({self.secret_area[1]} bytes)")
        self.launch.inject(LaunchSecret(header=bytes(header), guest_gpa=gpa, payload=bytes(payload)))
        self.injected = {"gpa": gpa, "length": len(payload)}
        return dict(self.injected)

    def resume(self) -> None:
        """LAUNCH_FINISH: the guest may run now."""
        if self.resumed:
            raise VmmdError("the guest was already resumed")
        self.launch.finish()
        self.resumed = True


def run_launch(platform, launch: SevEsLaunch, set_vcpu_state, *, simulated: bool,
               secret_area: tuple[int, int] | None):
    """The whole launch, or with platform.inputs.attest up to LAUNCH_MEASURE, leaving platform.paused set."""
    if not platform.inputs.attest:
        return launch.run(set_vcpu_state)
    launch.run_to_measure(set_vcpu_state)
    platform.paused = PausedLaunch(launch, simulated=simulated, secret_area=secret_area)
    return launch.result()
