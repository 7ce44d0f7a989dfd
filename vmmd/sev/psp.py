"""/dev/sev: one thin function per SEV platform command, and the SevError every SEV command raises.

Mirrors the shape of OpenBSD usr.sbin/vmd/psp.c (one small function per firmware command) over
the Linux ccp driver's ioctl (drivers/crypto/ccp/sev-dev.c sev_ioctl(), include/uapi/linux/psp-sev.h
SEV_ISSUE_CMD). Each command either returns its decoded output or raises `SevError` carrying the
command name, the errno and the firmware status (SEV_RET_*).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
from dataclasses import dataclass
from typing import Self

from vmmd.errors import VmmdError
from vmmd.sev import uapi

SEV_DEVICE = "/dev/sev"

LOAD_HINT = ("load the drivers with SEV-ES enabled: `modprobe ccp` and `modprobe kvm_amd sev=1 sev_es=1` "
             "(and enable SME/SEV and the SEV-ES ASID range in the firmware setup)")


class SevError(VmmdError):
    """A SEV command failed: names the command, the errno and the firmware status code."""

    def __init__(self, command: str, errno: int, fw_error: int | None, hint: str = "") -> None:
        self.command = command
        self.errno = errno
        self.fw_error = fw_error or None  # 0 (SEV_RET_SUCCESS) beside an errno: the firmware said nothing
        err_name = errno_mod.errorcode.get(errno, str(errno)) if errno else "no errno"
        text = f"{command} failed: {err_name}"
        if errno:
            text += f" ({os.strerror(errno)})"
        if fw_error:
            text += (f"; firmware status {uapi.sev_ret_name(fw_error)} ({fw_error:#x}): "
                     f"{uapi.sev_ret_meaning(fw_error)}")
        else:
            text += "; no firmware status"
        if hint:
            text += f"; {hint}"
        super().__init__(text)

    @property
    def fw_error_name(self) -> str | None:
        return uapi.sev_ret_name(self.fw_error) if self.fw_error else None


@dataclass(frozen=True)
class PlatformStatus:
    """SEV_PLATFORM_STATUS (struct sev_user_data_status)."""

    api_major: int
    api_minor: int
    build: int
    state: int
    flags: int
    guest_count: int

    @property
    def es_supported(self) -> bool:
        return bool(self.flags & uapi.SEV_STATUS_FLAGS_CONFIG_ES)

    @property
    def externally_owned(self) -> bool:
        return bool(self.flags & uapi.SEV_STATUS_FLAGS_OWNER)

    @property
    def state_name(self) -> str:
        try:
            return uapi.SevPlatformState(self.state).name
        except ValueError:
            return f"unknown({self.state})"

    def as_dict(self) -> dict:
        return {"api_major": self.api_major, "api_minor": self.api_minor, "build": self.build,
                "api_version": f"{self.api_major}.{self.api_minor}", "state": self.state_name,
                "flags": self.flags, "es_supported": self.es_supported, "externally_owned": self.externally_owned,
                "guest_count": self.guest_count}


def open_sev_fd(path: str = SEV_DEVICE) -> int:
    """Open /dev/sev read-write (PDH_CERT_EXPORT and the KVM launch commands need a writable fd)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VmmdError(f"{path} does not exist: the ccp driver is not loaded or found no SEV firmware; "
                        f"{LOAD_HINT}") from None
    except PermissionError:
        raise VmmdError(f"{path} is not accessible read-write by this user: run as root or grant access "
                        f"(e.g. a udev rule giving group kvm mode 0660 on {path})") from None


class Psp:
    """An open /dev/sev. Use as a context manager or call close()."""

    def __init__(self, path: str = SEV_DEVICE) -> None:
        self.path = path
        self.fd = open_sev_fd(path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def issue(self, cmd: int, data: ctypes.Structure | None) -> None:
        """SEV_ISSUE_CMD: raise SevError(command, errno, fw_error) on failure."""
        req = uapi.sev_issue_cmd(cmd=cmd, data=ctypes.addressof(data) if data is not None else 0, error=0)
        try:
            fcntl.ioctl(self.fd, uapi.SEV_ISSUE_CMD, req)
        except OSError as err:
            raise SevError(uapi.SEV_PLATFORM_COMMAND_NAMES.get(cmd, f"SEV command {cmd}"), err.errno or 0,
                           req.error) from None

    # --- one function per command -------------------------------------------------------
    def platform_status(self) -> PlatformStatus:
        data = uapi.sev_user_data_status()
        self.issue(uapi.SEV_PLATFORM_STATUS, data)
        return PlatformStatus(data.api_major, data.api_minor, data.build, data.state, data.flags, data.guest_count)

    def pdh_cert_export(self) -> tuple[bytes, bytes]:
        """(PDH certificate, platform certificate chain). First call with zero lengths asks for the sizes."""
        query = uapi.sev_user_data_pdh_cert_export()
        try:
            self.issue(uapi.SEV_PDH_CERT_EXPORT, query)
        except SevError as err:
            if err.fw_error != uapi.SEV_RET_INVALID_LEN or not (query.pdh_cert_len and query.cert_chain_len):
                raise
        pdh = ctypes.create_string_buffer(query.pdh_cert_len)
        chain = ctypes.create_string_buffer(query.cert_chain_len)
        data = uapi.sev_user_data_pdh_cert_export(
            pdh_cert_address=ctypes.addressof(pdh), pdh_cert_len=query.pdh_cert_len,
            cert_chain_address=ctypes.addressof(chain), cert_chain_len=query.cert_chain_len)
        self.issue(uapi.SEV_PDH_CERT_EXPORT, data)
        return pdh.raw[:data.pdh_cert_len], chain.raw[:data.cert_chain_len]

    def get_id2(self) -> bytes:
        """The chip's unique ID (used to fetch its VCEK/CEK certificate). Same size-query pattern."""
        query = uapi.sev_user_data_get_id2()
        try:
            self.issue(uapi.SEV_GET_ID2, query)
        except SevError as err:
            if err.fw_error != uapi.SEV_RET_INVALID_LEN or not query.length:
                raise
        if not query.length:
            raise SevError("SEV_GET_ID2", errno_mod.EINVAL, None, "the firmware reported an empty chip id")
        buf = ctypes.create_string_buffer(query.length)
        data = uapi.sev_user_data_get_id2(address=ctypes.addressof(buf), length=query.length)
        self.issue(uapi.SEV_GET_ID2, data)
        return buf.raw[:data.length]
