"""`vmctl measure` and `vmctl verify`: the expected SEV-ES launch digest / measurement of a firmware image.

Two click commands (`measure_cmd`, `verify_cmd`) for the vmctl group to add. They build
the same LaunchPlan the sev-es launch sequencer follows (vmmd.sev.measure.build_ovmf_plan)
and print its digest; with the platform's TIK, API version, build and a measurement
nonce they print the MEASURE the firmware should report (`measure`), or check a
reported LAUNCH_MEASURE blob (`verify`, exit 0 on match, 1 on mismatch, 3 on a host error).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from vmmd.errors import ExitCode, VmmdError
from vmmd.machine.layout import MAX_VCPUS
from vmmd.sev.cpu_types import CPU_SIGS, DEFAULT_CPU_TYPE, decode_sig
from vmmd.sev.measure import (
    DEFAULT_SEVES_POLICY,
    MEASURE_BLOB_SIZE,
    MNONCE_SIZE,
    QEMU_LEGACY_VM_TYPE_INIT2,
    TIK_SIZE,
    LaunchPlan,
    build_ovmf_plan,
    expected_measurement,
    launch_digest,
    verify,
)
from vmmd.sev.ovmf import is_ovmf_image


def _definition(config_or_firmware: Path):
    """The guest definition (docs/daemon.md) when the argument is a .toml file, else None."""
    if config_or_firmware.suffix != ".toml":
        return None
    from vmmd.daemon.definitions import DefinitionError, parse_definition

    try:
        text = config_or_firmware.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise VmmdError(f"cannot read guest definition {config_or_firmware}: {err}") from None
    try:
        return parse_definition(text, str(config_or_firmware), config_or_firmware.stem, os.getuid(),
                                config_or_firmware.parent)
    except DefinitionError as err:
        raise VmmdError(str(err)) from None


def _given(name: str) -> bool:
    """Was option `name` given on the command line (rather than left at its default)?"""
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) == ParameterSource.COMMANDLINE


def _int(text: str, what: str, bits: int = 64) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{what} must be a number (0x.. for hex), got {text!r}") from None
    if not 0 <= value < 1 << bits:
        raise click.BadParameter(f"{what} must be between 0 and {(1 << bits) - 1:#x}, got {text!r}")
    return value


def _read_tik(path: Path) -> bytes:
    """A TIK file: 16 raw bytes, or 32 hex digits."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise VmmdError(f"cannot read TIK file {path}: {err.strerror}") from None
    if len(raw) == TIK_SIZE:
        return raw
    try:
        tik = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        tik = b""
    if len(tik) != TIK_SIZE:
        raise VmmdError(f"TIK file {path} must hold {TIK_SIZE} raw bytes or {2 * TIK_SIZE} hex digits")
    return tik


def _decode_blob(text: str) -> bytes:
    """A LAUNCH_MEASURE blob from a file (raw 48 bytes, or text) or text: hex, or base64 as QEMU's QMP gives it."""
    path = Path(text)
    data: bytes | str = text
    if path.is_file():
        raw = path.read_bytes()
        if len(raw) == MEASURE_BLOB_SIZE:
            return raw
        data = raw.decode("ascii", errors="replace")
    data = str(data).strip()
    for decode in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True)):
        try:
            blob = decode(data)
        except (ValueError, binascii.Error):
            continue
        if len(blob) == MEASURE_BLOB_SIZE:
            return blob
    looks_like_path = os.sep in text or text.endswith((".bin", ".txt", ".b64"))
    missing = f"; there is no file {text}" if looks_like_path and not path.exists() else ""
    raise VmmdError(f"--measurement must be {MEASURE_BLOB_SIZE} bytes (MEASURE ‖ MNONCE): a raw file, "
                    f"hex or base64{missing}")


def _api_version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(part) for part in text.split("."))
    except ValueError:
        raise click.BadParameter(f"--api-version must look like 0.24, got {text!r}") from None
    if not (0 <= major <= 255 and 0 <= minor <= 255):
        raise click.BadParameter(f"--api-version: major and minor are bytes (0..255), got {text!r}")
    return major, minor


def _plan(config_or_firmware: Path | None, vcpus: int, cpu_type: str, policy: str, init2: bool,
          vmsa_features: str, memory: str = "64M", c_bit: int = 51, kernel: Path | None = None,
          initrd: Path | None = None, append: str | None = None, with_net: bool = False) -> tuple[LaunchPlan, Path]:
    """The launch plan of an image, of a direct Linux boot (--kernel), or of a guest definition: its firmware,
    memory, vCPUs, guest_arg and policy, unless an option given on the command line says otherwise."""
    from vmmd.machine import layout as L
    from vmmd.machine.config import parse_size
    from vmmd.machine.loader import RESET_VECTOR, firmware_kind, read_image_file
    from vmmd.sev.cpu_types import resolve_cpu_sig

    resolve_cpu_sig(cpu_type)  # a bad --cpu-type is an error whatever the image
    policy_value = _int(policy, "--policy", 32)
    features = _int(vmsa_features, "--vmsa-features")
    memory_bytes, guest_arg = parse_size(memory), 0
    if (config_or_firmware is None) == (kernel is None):
        raise click.UsageError("give a firmware image, a guest definition (.toml) or --kernel, and only one")
    if kernel is None and (initrd is not None or append is not None):
        raise click.UsageError("--initrd and --append go with --kernel")
    definition = _definition(config_or_firmware) if config_or_firmware is not None else None
    firmware, disks = config_or_firmware, ()
    if definition is not None:
        firmware, guest_arg = definition.firmware, definition.guest_arg
        kernel, initrd, append = definition.kernel, definition.initrd, definition.append  # a direct Linux boot
        with_net, disks = with_net or definition.net is not None, definition.disks
        if not _given("vcpus"):
            vcpus = definition.cpus
        if not _given("memory"):
            memory_bytes = definition.memory_bytes
        if not _given("policy") and definition.policy is not None:
            policy_value = definition.policy
    if kernel is not None:
        return _linux_plan(kernel, initrd, append, memory_bytes, vcpus, with_net, policy_value, init2, features,
                           c_bit, disks), kernel
    if firmware_kind(firmware) != RESET_VECTOR:  # a vmmd flat firmware image: measured as vmctl run loads it
        from vmmd.sev.platform import LaunchInputs, flat_image_digest

        inputs = LaunchInputs(policy=policy_value, init2=init2, vmsa_features=features, c_bit=c_bit)
        try:
            _, plan = flat_image_digest(firmware, memory_bytes, vcpus, inputs, guest_arg)
        except ValueError as err:
            raise VmmdError(str(err)) from None
        return plan, firmware
    image = read_image_file(firmware, L.RESET_VECTOR_MAX_BYTES,
                            too_large=f"an OVMF image may have at most {L.RESET_VECTOR_MAX_BYTES >> 20} MiB")
    if not is_ovmf_image(image):
        raise VmmdError(f"{firmware} changed while it was read")
    try:
        plan = build_ovmf_plan(image, vcpus, cpu_type, init2=init2, vmsa_features=features, policy=policy_value)
    except ValueError as err:
        raise VmmdError(str(err)) from None
    return plan, firmware


def _linux_plan(kernel: Path, initrd: Path | None, append: str | None, memory_bytes: int, vcpus: int,
                with_net: bool, policy: int, init2: bool, features: int, c_bit: int, disks: tuple = ()) -> LaunchPlan:
    """A direct Linux boot laid out as `vmctl run --kernel` lays it out (docs/linux-boot.md); its devices (net,
    `disks`) are in the measured ACPI tables and command line."""
    from vmmd.machine.config import MachineConfig
    from vmmd.sev.platform import LaunchInputs, linux_digest

    config = MachineConfig(firmware=None, kernel=kernel, initrd=initrd, append=append, memory_bytes=memory_bytes,
                           cpus=vcpus, net="tap" if with_net else None, disks=tuple(disks))
    inputs = LaunchInputs(policy=policy, init2=init2, vmsa_features=features, c_bit=c_bit)
    try:
        return linux_digest(config, inputs)[1]
    except ValueError as err:
        raise VmmdError(str(err)) from None


def _command_line(plan: LaunchPlan) -> str | None:
    """The kernel command line a direct-boot plan measures (its "command line" region, NUL-terminated)."""
    for region in plan.regions:
        if region.name == "command line":
            return bytes(region.data).split(b"\0", 1)[0].decode(errors="replace")
    return None


def _assumed(plan: LaunchPlan, firmware: Path, cpu_type: str) -> dict[str, Any]:
    if not plan.cpu_sig:  # a flat image or kernel starts in 64-bit mode: no CPUID signature in its VMSAs
        cmdline = _command_line(plan)
        return {"firmware": str(firmware), "cpu_type": None, "cpu_family_model_stepping": None,
                **({"cmdline": cmdline} if cmdline is not None else {}), **plan.describe()}
    family, model, stepping = decode_sig(plan.cpu_sig)
    return {"firmware": str(firmware), "cpu_type": cpu_type,
            "cpu_family_model_stepping": f"{family}/{model}/{stepping}", **plan.describe()}


def _policy_words(policy: int) -> str:
    from vmmd.sev.measure import SevPolicy

    names = [flag.name for flag in SevPolicy if policy & flag]
    api = f", API >= {(policy >> 16) & 0xFF}.{(policy >> 24) & 0xFF}" if policy >> 16 else ""
    return f"{policy:#x} ({', '.join(names) or 'no flags'}{api})"


def format_assumed(assumed: dict[str, Any]) -> list[str]:
    """What a digest assumes, as `vmctl measure` prints it for people (--json gives the same as JSON)."""
    lines = [("image", assumed["firmware"])]
    if assumed.get("cpu_type"):
        family, model, stepping = assumed["cpu_family_model_stepping"].split("/")
        lines.append(("CPU", f"{assumed['cpu_type']}: family {family}, model {model}, stepping {stepping} "
                             f"(CPUID 1 EAX {assumed['cpu_sig']}, in the VMSAs' RDX)"))
    if "cmdline" in assumed:
        lines.append(("command line", assumed["cmdline"]))
    lines += [("vCPUs", str(assumed["vcpus"])), ("policy", _policy_words(int(assumed["policy"], 16))),
              ("init", assumed["init"]), ("VMSA features", assumed["vmsa_features"])]
    if assumed.get("matches"):
        lines.append(("matches", assumed["matches"]))
    for key, label in (("digest", "launch digest"), ("api_version", "API version"), ("build", "build"),
                       ("mnonce", "mnonce")):
        if key in assumed:
            lines.append((label, str(assumed[key])))
    out = [f"{label + ':':<15}{value}" if len(label) < 14 else f"{label}: {value}" for label, value in lines]
    out.append("measured, in launch order:")
    out += [f"  {region['gpa']:>12}  {region['size']:>9} bytes  {region['name']}" for region in assumed["regions"]]
    out.append(f"  {'':>12}  {4096 * assumed['vcpus']:>9} bytes  {assumed['vcpus']} VMSA page(s), vCPU 0 first")
    return out


def _plan_options(func: Any) -> Any:
    options = [
        click.argument("config_or_firmware", type=click.Path(path_type=Path, dir_okay=False), required=False),
        click.option("--kernel", "-k", type=click.Path(path_type=Path, dir_okay=False),
                     help="a direct Linux boot of this kernel, laid out as `vmctl run --kernel` (docs/linux-boot.md)"),
        click.option("--initrd", type=click.Path(path_type=Path, dir_okay=False), help="with --kernel"),
        click.option("--append", metavar="CMDLINE", help="with --kernel: the command line, as for vmctl run "
                     "(default \"console=ttyS0\")"),
        click.option("--with-net", is_flag=True, help="the guest has a virtio-net device (vmctl run --net): it "
                     "appears in the measured boot info, or a kernel's ACPI tables and command line"),
        click.option("--vcpus", type=click.IntRange(1, MAX_VCPUS), default=1, show_default=True,
                     help=f"vCPUs, 1..{MAX_VCPUS} (vmmd's one limit, as vmctl run --cpus)"),
        click.option("--cpu-type", default=DEFAULT_CPU_TYPE, show_default=True,
                     help=f"QEMU model ({', '.join(CPU_SIGS)}) or a CPUID 1 EAX number"),
        click.option("--policy", default=hex(DEFAULT_SEVES_POLICY), show_default=True, help="SEV guest policy"),
        click.option("--init2/--legacy-init", default=True, show_default=True,
                     help="KVM_X86_SEV_ES_VM + KVM_SEV_INIT2 (FPU state in the VMSA; QEMU legacy-vm-type=off) or "
                          "KVM_X86_DEFAULT_VM + KVM_SEV_ES_INIT (FPU area zero; QEMU's default)"),
        click.option("--qemu-legacy-vm-type", type=click.Choice(sorted(QEMU_LEGACY_VM_TYPE_INIT2)),
                     help="predict what QEMU measures with -object sev-guest,legacy-vm-type=...: auto (QEMU's "
                          "default) and on use KVM_SEV_ES_INIT, off uses KVM_SEV_INIT2"),
        click.option("--vmsa-features", default="0", show_default=True, help="VMSA sev_features (INIT2 only)"),
        click.option("--memory", default="64M", show_default=True,
                     help="guest RAM, for vmmd flat images and kernels (OVMF images ignore it)"),
        click.option("--c-bit", type=click.IntRange(32, 63), default=51, show_default=True,
                     help="C-bit position of the target host, for vmmd flat images and kernels"),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _init_path(init2: bool, qemu_legacy_vm_type: str | None) -> bool:
    """--init2/--legacy-init, or what QEMU's legacy-vm-type setting makes of it (measure.launch_matches())."""
    if qemu_legacy_vm_type is None:
        return init2
    if _given("init2"):
        raise click.UsageError("give either --init2/--legacy-init or --qemu-legacy-vm-type, not both")
    return QEMU_LEGACY_VM_TYPE_INIT2[qemu_legacy_vm_type]


def _fail(err: VmmdError) -> None:
    click.echo(f"vmctl: {err}", err=True)
    sys.exit(int(ExitCode.HOST_ERROR))


@click.command("measure")
@_plan_options
@click.option("--dump-vmsa", type=click.Path(path_type=Path, file_okay=False), help="write vmsa<N>.bin here")
@click.option("--tik", type=click.Path(path_type=Path, dir_okay=False), help="TIK (16 bytes raw or hex)")
@click.option("--api-version", help="SEV firmware API version MAJ.MIN (with --tik)")
@click.option("--build", "build_id", type=click.IntRange(0, 255), help="SEV firmware build (with --tik)")
@click.option("--mnonce", help="measurement nonce, 32 hex digits (with --tik)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def measure_cmd(config_or_firmware: Path | None, kernel: Path | None, initrd: Path | None, append: str | None,
                with_net: bool, vcpus: int, cpu_type: str, policy: str, init2: bool,
                qemu_legacy_vm_type: str | None, vmsa_features: str, memory: str, c_bit: int,
                dump_vmsa: Path | None, tik: Path | None, api_version: str | None, build_id: int | None,
                mnonce: str | None, as_json: bool) -> None:
    """Print the SEV-ES launch digest (and, with --tik ..., the expected MEASURE) of a firmware image.

    The digest depends on how KVM is asked to launch: the default (--init2) predicts KVM_SEV_INIT2, i.e. QEMU
    with legacy-vm-type=off and vmmd on Linux 6.10+; QEMU's own default is --qemu-legacy-vm-type auto
    (KVM_SEV_ES_INIT). The output names which launches the digest matches."""
    init2 = _init_path(init2, qemu_legacy_vm_type)
    want_measure = [tik, api_version, build_id, mnonce]
    if any(v is not None for v in want_measure) and not all(v is not None for v in want_measure):
        raise click.UsageError("--tik, --api-version, --build and --mnonce go together")
    try:
        plan, firmware = _plan(config_or_firmware, vcpus, cpu_type, policy, init2, vmsa_features, memory, c_bit,
                               kernel, initrd, append, with_net)
        digest = launch_digest(plan)
        result: dict[str, Any] = {"digest": digest.hex(), "assumed": _assumed(plan, firmware, cpu_type)}
        if tik is not None:
            major, minor = _api_version(str(api_version))
            try:
                nonce = bytes.fromhex(str(mnonce))
            except ValueError:
                nonce = b""
            if len(nonce) != MNONCE_SIZE:
                raise click.BadParameter(f"--mnonce must be {2 * MNONCE_SIZE} hex digits")
            result["measurement"] = expected_measurement(digest, _read_tik(tik), major, minor, int(str(build_id)),
                                                         plan.policy, nonce).hex()
            result["assumed"].update({"api_version": f"{major}.{minor}", "build": build_id, "mnonce": nonce.hex()})
        if dump_vmsa is not None:
            dump_vmsa.mkdir(parents=True, exist_ok=True)
            for vcpu in plan.vcpus:
                (dump_vmsa / f"vmsa{vcpu.index}.bin").write_bytes(vcpu.vmsa)
    except VmmdError as err:
        _fail(err)
        return
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(f"launch digest: {result['digest']}")
    if "measurement" in result:
        click.echo(f"measurement:   {result['measurement']}")
    click.echo("\n".join(format_assumed(result["assumed"])))


@click.command("verify")
@_plan_options
@click.option("--measurement", "blob", required=True, help="LAUNCH_MEASURE blob: file, hex or base64 (48 bytes)")
@click.option("--tik", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--api-version", required=True, help="SEV firmware API version MAJ.MIN")
@click.option("--build", "build_id", type=click.IntRange(0, 255), required=True)
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(config_or_firmware: Path | None, kernel: Path | None, initrd: Path | None, append: str | None,
               with_net: bool, vcpus: int, cpu_type: str, policy: str, init2: bool,
               qemu_legacy_vm_type: str | None, vmsa_features: str, memory: str, c_bit: int,
               blob: str, tik: Path, api_version: str, build_id: int, as_json: bool) -> None:
    """Check a reported launch measurement against the firmware image: exit 0 on match, 1 on mismatch."""
    init2 = _init_path(init2, qemu_legacy_vm_type)
    try:
        plan, firmware = _plan(config_or_firmware, vcpus, cpu_type, policy, init2, vmsa_features, memory, c_bit,
                               kernel, initrd, append, with_net)
        major, minor = _api_version(api_version)
        result = verify(_decode_blob(blob), _read_tik(tik), digest=launch_digest(plan), api_major=major,
                        api_minor=minor, build=build_id, policy=plan.policy,
                        assumed=_assumed(plan, firmware, cpu_type))
    except VmmdError as err:
        _fail(err)
        return
    if as_json:
        click.echo(json.dumps({"match": result.match, "reported": result.reported.hex(),
                               "expected": result.expected.hex(), "assumed": result.assumed}, sort_keys=True))
    elif result.match:
        click.echo(f"match: {result.reported.hex()}")
    else:
        click.echo("MISMATCH")
        click.echo(f"  reported: {result.reported.hex()}")
        click.echo(f"  expected: {result.expected.hex()}")
        click.echo("  assuming:")
        for line in format_assumed(result.assumed):
            click.echo(f"    {line}")
    sys.exit(0 if result.match else 1)
