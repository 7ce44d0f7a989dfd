"""vCPU signatures (CPUID Fn0000_0001_EAX) by QEMU CPU model name, for the SEV-ES VMSA.

QEMU puts the guest's CPUID 1 EAX in RDX at reset (target/i386/cpu.c x86_cpu_reset():
`env->regs[R_EDX] = env->cpuid_version`), and KVM copies RDX into the VMSA at
LAUNCH_UPDATE_VMSA, so the signature is part of the launch digest. The table
mirrors virtee/sev-snp-measure vcpu_types.py (names from QEMU's builtin_x86_defs).
"""

from __future__ import annotations

from vmmd.errors import VmmdError


def cpu_sig(family: int, model: int, stepping: int) -> int:
    """Encode family/model/stepping as CPUID Fn0000_0001_EAX.

    AMD CPUID Specification #25481, "CPUID Fn0000_0001_EAX Family, Model, Stepping
    Identifiers": Family = BaseFamily[11:8] + ExtFamily[27:20] (BaseFamily is 0xF
    when the family exceeds 0xF), Model = ExtModel[19:16]:BaseModel[7:4],
    Stepping[3:0].
    """
    if not (0 <= family <= 0xF + 0xFF and 0 <= model <= 0xFF and 0 <= stepping <= 0xF):
        raise ValueError(f"family/model/stepping out of range: {family}/{model}/{stepping}")
    if family > 0xF:
        base_family, ext_family = 0xF, family - 0xF
    else:
        base_family, ext_family = family, 0
    return (ext_family << 20) | ((model >> 4) << 16) | (base_family << 8) | ((model & 0xF) << 4) | stepping


def decode_sig(sig: int) -> tuple[int, int, int]:
    """Inverse of cpu_sig(): (family, model, stepping) of a CPUID 1 EAX value."""
    base_family = (sig >> 8) & 0xF
    family = base_family + ((sig >> 20) & 0xFF if base_family == 0xF else 0)
    model = (((sig >> 16) & 0xF) << 4) | ((sig >> 4) & 0xF)
    return family, model, sig & 0xF


# QEMU builtin_x86_defs model -> (family, model, stepping), as sev-snp-measure vcpu_types.py lists them.
_MODELS: dict[str, tuple[int, int, int]] = {
    "EPYC": (23, 1, 2),
    "EPYC-v1": (23, 1, 2),
    "EPYC-v2": (23, 1, 2),
    "EPYC-IBPB": (23, 1, 2),
    "EPYC-v3": (23, 1, 2),
    "EPYC-v4": (23, 1, 2),
    "EPYC-Rome": (23, 49, 0),
    "EPYC-Rome-v1": (23, 49, 0),
    "EPYC-Rome-v2": (23, 49, 0),
    "EPYC-Rome-v3": (23, 49, 0),
    "EPYC-Milan": (25, 1, 1),
    "EPYC-Milan-v1": (25, 1, 1),
    "EPYC-Milan-v2": (25, 1, 1),
    "EPYC-Genoa": (25, 17, 0),
    "EPYC-Genoa-v1": (25, 17, 0),
    "EPYC-Turin": (26, 0, 0),
}

CPU_SIGS: dict[str, int] = {name: cpu_sig(*fms) for name, fms in _MODELS.items()}
DEFAULT_CPU_TYPE = "EPYC-v4"


def resolve_cpu_sig(value: str | int) -> int:
    """A signature from a QEMU model name (case-insensitive) or a number ("0x800f12", 8392466)."""
    if isinstance(value, int):
        sig = value
    else:
        text = value.strip()
        for name, known in CPU_SIGS.items():
            if name.lower() == text.lower():
                return known
        try:
            sig = int(text, 0)
        except ValueError:
            raise VmmdError(
                f"unknown vCPU type {value!r}: use one of {', '.join(CPU_SIGS)} or a CPUID 1 EAX number"
            ) from None
    if not 0 <= sig <= 0xFFFF_FFFF:
        raise VmmdError(f"vCPU signature {sig:#x} does not fit CPUID 1 EAX (32 bits)")
    return sig
