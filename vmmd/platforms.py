"""Choosing a platform: plain (vmmd.machine.platform) or an SEV one (vmmd.sev.platform), by name or by what the
host has (`--platform auto`). Above both layers, so that neither imports the other's platforms; the SEV modules
are imported only when an SEV platform is chosen (`vmctl run -p plain` never loads them)."""

from __future__ import annotations

from vmmd.errors import VmmdError
from vmmd.machine.platform import PLATFORM_NAMES, Platform


def sev_es_unavailable_reason() -> str | None:
    """None when this host can run sev-es guests, else the first missing prerequisite."""
    try:
        from vmmd.sev.host import host_report
    except ImportError:
        return "vmmd's SEV-ES launch support is not installed"
    report = host_report()
    return None if report.get("sev_es_available") else report.get("sev_es_reason", "SEV-ES is not available")


def select_platform(requested: str) -> tuple[Platform, str]:
    """The platform object and a one-line note saying which platform runs and why."""
    if requested not in PLATFORM_NAMES:
        raise VmmdError(f"unknown platform {requested!r}: choose one of {', '.join(PLATFORM_NAMES)}")
    if requested == "plain":
        return Platform(), "platform plain (as requested)"
    from vmmd.sev.platform import SevEsEmuPlatform, SevEsPlatform

    if requested == "sev-es-emu":
        return SevEsEmuPlatform(), "platform sev-es-emu (as requested; the emulator encrypts nothing)"
    reason = sev_es_unavailable_reason()
    if requested == "sev-es":
        if reason is not None:
            raise VmmdError(f"platform sev-es is not available on this host: {reason} (see `vmctl host`)")
        return SevEsPlatform(), "platform sev-es (hardware SEV-ES)"
    if reason is None:
        return SevEsPlatform(), "platform sev-es (auto: this host has SEV-ES)"
    return SevEsEmuPlatform(), f"platform sev-es-emu (auto: no SEV-ES here: {reason}; the emulator encrypts nothing)"
