"""Guest definitions: TOML files -> a validated GuestDefinition (a MachineConfig plus the daemon's fields).

A definition lives in the definitions directory (default /etc/vmmd/vms/, one NAME.toml per guest) or is
sent ad hoc by `vmctl start -f FILE`. Every error names the file, the key and what is allowed. Schema
(docs/daemon.md has the annotated version):

    name = "demo"                 # optional, default: the file name without .toml
    firmware = "demo.bin"         # required; relative paths are relative to the TOML file
    memory = "64M"                # size with K/M/G suffix or bytes (default 64M)
    vcpus = 1                     # 1..MAX_VCPUS (254)
    platform = "auto"             # auto | plain | sev-es | sev-es-emu
    timeout = 30                  # seconds, optional
    guest_arg = 0                 # number handed to the guest in its boot-info page
    owner = "alice"               # user name or uid allowed to manage it besides root (default root)
    attest = false                # SEV platforms: stop after LAUNCH_MEASURE for the guest owner (vmctl resume)
    dh_cert = "vm_godh.b64"       # the guest owner's LAUNCH_START inputs (vmctl owner session), base64 files,
    session = "vm_session.b64"    #   relative to the TOML file; both or neither
    [policy]                      # SEV-ES guest policy (sev-es only)
    flags = ["NODBG"]             # NODBG NOKS ES NOSEND DOMAIN SEV (ES is always set)
    [console]
    ring = "64K"                  # console ring buffer kept by the daemon (4K..16M)
    log = true                    # also append console output to the per-guest log file
    [network]                     # what vmctl run --net offers (docs/networking.md)
    mode = "none"                 # none | tap
    bridge = "br0"                # with mode = "tap": enslave the tap to this bridge
    create_bridge = false         # create the bridge when it does not exist (removed with the guest)
    mac = "02:..."                # the guest's MAC (default: derived stably from the guest name)
    mtu = 1500                    # the tap's MTU
    ifname = "tap-web"            # the tap's name (default vmmd-NAME)
    host_ip = "10.0.2.2/24"       # the host side's address (on the tap, or on a bridge this guest creates)
    vnet_hdr = false              # open the tap with IFF_VNET_HDR
                                  # (the options of `vmctl run --net`, with "_" for "-")
    [[disk]]                      # a virtio-blk disk, repeatable (up to 4; docs/disks.md)
    path = "data.img"             # required: an existing raw image (relative to the TOML file); never created
    ro = false                    # read-only: opened O_RDONLY, writes answer VIRTIO_BLK_S_IOERR
    cache = "writeback"           # writeback | none (O_DIRECT)
    serial = "data0"              # what the guest reads with VIRTIO_BLK_T_GET_ID (up to 20 bytes)
                                  # (the options of `vmctl run --disk`, through the same parser)
"""

from __future__ import annotations

import pwd
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmmd.block.image import DiskSpec
from vmmd.errors import VmmdError
from vmmd.machine import layout as L
from vmmd.machine.config import MachineConfig, check_seconds, parse_size
from vmmd.machine.platform import PLATFORM_NAMES

from .protocol import NAME_RE

TOP_KEYS = ("name", "firmware", "kernel", "initrd", "append", "memory", "vcpus", "platform", "timeout", "guest_arg",
            "owner", "description",
            "policy", "console", "network", "disk", "attest", "dh_cert", "session")
POLICY_KEYS = ("flags", "api_major", "api_minor")
CONSOLE_KEYS = ("ring", "log")
NETWORK_MODES = ("none", "tap")
MIN_RING, MAX_RING, DEFAULT_RING = 4 << 10, 16 << 20, 64 << 10
MAX_DEFINITION_BYTES = 32 * 1024
RESERVED_NAME_RE = re.compile(r"run-[0-9]+")  # vmmd.cli.run.default_run_name()


class DefinitionError(VmmdError):
    """A guest definition that does not validate; the message names file, key and allowed values."""


@dataclass
class GuestDefinition:
    name: str
    source: str  # the TOML file (or "-f FILE" path of an ad-hoc guest)
    firmware: Path | None  # a firmware image, or None for a direct Linux boot (kernel)
    memory_bytes: int = 64 << 20
    cpus: int = 1
    platform: str = "auto"
    timeout: float | None = None
    guest_arg: int = 0
    owner: int = 0
    description: str = ""
    policy: int | None = None
    ring_bytes: int = DEFAULT_RING
    log_console: bool = True
    net: str | None = None
    disks: tuple = ()  # vmmd.block.image.DiskSpec each, paths absolute
    attest: bool = False  # wait for the guest owner after LAUNCH_MEASURE (vmmd/sev/attest.py)
    dh_cert: Path | None = None  # the guest owner's GODH certificate and session blob (base64 files)
    session: Path | None = None
    kernel: Path | None = None  # direct Linux boot (docs/linux-boot.md): kernel, initrd, command line
    initrd: Path | None = None
    append: str | None = None
    text: str = field(default="", repr=False)  # the TOML text, kept to persist ad-hoc guests

    def machine_config(self) -> MachineConfig:
        return MachineConfig(firmware=self.firmware, memory_bytes=self.memory_bytes, cpus=self.cpus,
                             platform=self.platform, timeout=self.timeout, guest_arg=self.guest_arg, name=self.name,
                             net=self.net, disks=self.disks, kernel=self.kernel, initrd=self.initrd,
                             append=self.append)

    @property
    def boot_files(self) -> list[tuple[str, Path]]:
        """(key, path) of the files the guest boots from, in the order vmmd hands them to its worker."""
        if self.kernel is not None:
            return [("kernel", self.kernel)] + ([("initrd", self.initrd)] if self.initrd is not None else [])
        return [("firmware", self.firmware)]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source,
                "firmware": str(self.firmware) if self.firmware is not None else None,
                "kernel": str(self.kernel) if self.kernel is not None else None,
                "initrd": str(self.initrd) if self.initrd is not None else None, "append": self.append,
                "memory_bytes": self.memory_bytes, "vcpus": self.cpus, "platform": self.platform,
                "timeout": self.timeout, "guest_arg": self.guest_arg, "owner": self.owner,
                "description": self.description, "policy": self.policy, "console_ring": self.ring_bytes,
                "console_log": self.log_console, "net": self.net, "attest": self.attest,
                "dh_cert": str(self.dh_cert) if self.dh_cert else None,
                "session": str(self.session) if self.session else None,
                "disks": [d.summary() for d in self.disks]}


def _fail(source: str, key: str, message: str) -> DefinitionError:
    return DefinitionError(f"{source}: key '{key}': {message}")


def _check_keys(source: str, table: dict, allowed: tuple[str, ...], prefix: str = "") -> None:
    for key in table:
        if key not in allowed:
            raise _fail(source, prefix + key, f"unknown key; allowed: {', '.join(prefix + k for k in allowed)}")


def _int(source: str, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, key, f"must be an integer {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise _fail(source, key, f"must be {lo}..{hi}, got {value}")
    return value


def _size(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _fail(source, key, f"must be a size such as \"64M\" or a number of bytes, got {value!r}")
    try:
        return parse_size(value)
    except VmmdError as err:
        raise _fail(source, key, str(err)) from None


def _owner(source: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise _fail(source, "owner", f"no such user {value!r}; use a user name or a numeric uid") from None
    return _int(source, "owner", value, 0, 2**32 - 2)


def _policy(source: str, value: Any) -> int:
    from vmmd.sev.launch import build_policy, check_policy

    if isinstance(value, int) and not isinstance(value, bool):
        policy = value
    elif isinstance(value, dict):
        _check_keys(source, value, POLICY_KEYS, "policy.")
        flags = value.get("flags", ["NODBG"])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise _fail(source, "policy.flags", "must be a list of flag names: NODBG NOKS ES NOSEND DOMAIN SEV")
        try:
            policy = build_policy(flags, _int(source, "policy.api_major", value.get("api_major", 0), 0, 255),
                                  _int(source, "policy.api_minor", value.get("api_minor", 0), 0, 255))
        except VmmdError as err:
            raise _fail(source, "policy.flags", str(err)) from None
    else:
        raise _fail(source, "policy", "must be a table ([policy] flags = [...]) or an integer policy word")
    try:
        check_policy(policy, None)
    except VmmdError as err:
        raise _fail(source, "policy", str(err)) from None
    return policy


def _network(source: str, network: Any) -> str | None:
    """The [network] table as the `--net` string it means: the same options (NET_OPTIONS), "_" for "-"."""
    from vmmd.net.attach import NET_OPTIONS, parse_net_spec

    if not isinstance(network, dict):
        raise _fail(source, "network", "must be a table: [network] mode = \"none\" | \"tap\"")
    keys = {option.replace("-", "_"): option for option in NET_OPTIONS}
    _check_keys(source, network, ("mode", "bridge", *keys), "network.")
    mode = network.get("mode", "none")
    if mode not in NETWORK_MODES:
        raise _fail(source, "network.mode", f"{mode!r} is not one of: {', '.join(NETWORK_MODES)}")
    bridge = network.get("bridge")
    if bridge is not None and (mode != "tap" or not isinstance(bridge, str) or not bridge):
        raise _fail(source, "network.bridge", "only with mode = \"tap\", as a bridge interface name")
    options = []
    for key, option in keys.items():
        if key not in network:
            continue
        value = network[key]
        if mode != "tap":
            raise _fail(source, f"network.{key}", "needs mode = \"tap\"")
        if NET_OPTIONS[option]:  # a value: a string, or a number for mtu
            if isinstance(value, bool) or not isinstance(value, str | int) or (isinstance(value, str) and
                                                                                 ("," in value or not value)):
                raise _fail(source, f"network.{key}", f"must be a value such as --net {option}=... takes, got "
                            f"{value!r}")
            options.append(f"{option}={value}")
        else:
            if not isinstance(value, bool):
                raise _fail(source, f"network.{key}", "must be true or false")
            if not value:
                continue
            options.append(option)
        try:  # each option checked on its own first, so the error names its key
            parse_net_spec(",".join(["tap" + (f":{bridge}" if bridge else ""), options[-1]]))
        except VmmdError as err:
            raise _fail(source, f"network.{key}", str(err)) from None
    if mode != "tap":
        return None
    net = ",".join(["tap" + (f":{bridge}" if bridge else ""), *options])
    try:
        parse_net_spec(net)
    except VmmdError as err:
        raise _fail(source, "network", str(err)) from None
    return net


def _disks(source: str, tables: Any, base_dir: Path | None) -> tuple:
    """The [[disk]] tables, through vmmd.block.image.disk_spec() (the validator `vmctl run --disk` uses)."""
    from vmmd.block.image import disk_spec

    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise _fail(source, "disk", "must be tables: [[disk]] path = \"IMAGE\", one per disk")
    specs = []
    for i, table in enumerate(tables):
        where = f"{source}: key 'disk[{i}]'"
        try:
            spec = disk_spec(table, where)
        except VmmdError as err:
            raise DefinitionError(str(err)) from None
        path = Path(spec.path)
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        specs.append(DiskSpec(str(path), spec.read_only, spec.cache, spec.serial))
    return tuple(specs)


def _owner_launch(source: str, data: dict, definition: GuestDefinition, base_dir: Path | None) -> None:
    """attest, dh_cert, session: an attested launch's keys (docs/daemon.md "Attested launch")."""
    attest = data.get("attest", False)
    if not isinstance(attest, bool):
        raise _fail(source, "attest", "must be true or false")
    definition.attest = attest
    for key in ("dh_cert", "session"):
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, str) or not value:
            raise _fail(source, key, f"must be a file path string (base64, as vmctl owner session writes it), got "
                        f"{value!r}")
        path = Path(value)
        setattr(definition, key, path if path.is_absolute() else (base_dir or Path.cwd()) / path)
    if (definition.dh_cert is None) != (definition.session is None):
        raise _fail(source, "dh_cert" if definition.dh_cert is None else "session",
                    "dh_cert and session go together: the guest owner's certificate and session blob")
    if (attest or definition.dh_cert) and definition.platform == "plain":
        raise _fail(source, "attest" if attest else "dh_cert", "needs an SEV platform (sev-es, sev-es-emu or auto); "
                    "platform plain has no launch to attest")


def parse_definition(text: str, source: str, default_name: str | None = None, default_owner: int = 0,
                     base_dir: Path | None = None) -> GuestDefinition:
    """Validate one TOML definition. `source` names it in errors; relative firmware paths resolve
    against `base_dir` (the TOML file's directory)."""
    if len(text.encode()) > MAX_DEFINITION_BYTES:
        raise DefinitionError(f"{source}: definition is larger than {MAX_DEFINITION_BYTES} bytes")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise DefinitionError(f"{source}: not valid TOML: {err}") from None
    _check_keys(source, data, TOP_KEYS)
    name = data.get("name", default_name)
    if name is None:
        raise _fail(source, "name", "missing (an ad-hoc definition must name its guest)")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _fail(source, "name", f"{name!r} is not valid: 1-63 of A-Z a-z 0-9 . _ - starting with a letter or digit")
    if RESERVED_NAME_RE.fullmatch(name):
        raise _fail(source, "name", f"{name!r} is reserved: run-NUMBER names the guests of `vmctl run` (their taps "
                    "would collide)")
    if ("firmware" in data) == ("kernel" in data):
        raise _fail(source, "firmware", "give either firmware (a firmware image) or kernel (a Linux kernel booted "
                    "directly, docs/linux-boot.md), not both" if "firmware" in data else
                    "missing: the path of a firmware image, or kernel = the path of a Linux kernel, is required")
    for key in ("initrd", "append"):
        if key in data and "kernel" not in data:
            raise _fail(source, key, "goes with kernel (a direct Linux boot)")
    paths = {}
    for key in ("firmware", "kernel", "initrd"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise _fail(source, key, f"must be a file path string, got {data[key]!r}")
            path = Path(data[key])
            paths[key] = path if path.is_absolute() else (base_dir or Path.cwd()) / path
    append = data.get("append")
    if append is not None and (not isinstance(append, str) or "\0" in append):
        raise _fail(source, "append", f"must be the kernel command line as a string, got {append!r}")
    platform = data.get("platform", "auto")
    if platform not in PLATFORM_NAMES:
        raise _fail(source, "platform", f"{platform!r} is not one of: {', '.join(PLATFORM_NAMES)}")
    try:
        timeout = check_seconds(data.get("timeout"), "the value")
    except VmmdError as err:
        raise _fail(source, "timeout", str(err)) from None
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(source, "description", "must be a string")
    definition = GuestDefinition(
        name=name, source=source, firmware=paths.get("firmware"), kernel=paths.get("kernel"),
        initrd=paths.get("initrd"), append=append,
        memory_bytes=_size(source, "memory", data.get("memory", "64M")),
        cpus=_int(source, "vcpus", data.get("vcpus", 1), 1, L.MAX_VCPUS),
        platform=platform, timeout=timeout,
        guest_arg=_int(source, "guest_arg", data.get("guest_arg", 0), 0, 2**64 - 1),
        owner=_owner(source, data["owner"]) if "owner" in data else default_owner,
        description=description, text=text)
    try:  # the rules `vmctl run` applies too (memory alignment and bounds, ...)
        definition.machine_config().validate()
    except VmmdError as err:
        raise DefinitionError(f"{source}: {err}") from None
    if "policy" in data:
        definition.policy = _policy(source, data["policy"])
    console = data.get("console", {})
    if not isinstance(console, dict):
        raise _fail(source, "console", "must be a table: [console] ring = \"64K\", log = true")
    _check_keys(source, console, CONSOLE_KEYS, "console.")
    if "ring" in console:
        definition.ring_bytes = _size(source, "console.ring", console["ring"])
        if not MIN_RING <= definition.ring_bytes <= MAX_RING:
            raise _fail(source, "console.ring", f"must be {MIN_RING >> 10}K..{MAX_RING >> 20}M")
    if "log" in console:
        if not isinstance(console["log"], bool):
            raise _fail(source, "console.log", "must be true or false")
        definition.log_console = console["log"]
    definition.net = _network(source, data.get("network", {}))
    definition.disks = _disks(source, data.get("disk", []), base_dir)
    _owner_launch(source, data, definition, base_dir)
    try:
        definition.machine_config().validate()
    except VmmdError as err:
        raise DefinitionError(f"{source}: {err}") from None
    return definition


def load_file(path: Path, default_owner: int = 0) -> GuestDefinition:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DefinitionError(f"{path}: cannot read: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DefinitionError(f"{path}: not UTF-8 text") from None
    return parse_definition(text, str(path), path.stem, default_owner, path.parent)


def load_directory(directory: Path) -> tuple[dict[str, GuestDefinition], list[str]]:
    """Every *.toml in `directory`: (definitions by name, one error message per file that failed)."""
    definitions: dict[str, GuestDefinition] = {}
    errors: list[str] = []
    if not directory.is_dir():
        return definitions, errors
    for path in sorted(directory.glob("*.toml")):
        try:
            definition = load_file(path)
        except DefinitionError as err:
            errors.append(str(err))
            continue
        if definition.name in definitions:
            errors.append(f"{path}: key 'name': {definition.name!r} is already defined by "
                          f"{definitions[definition.name].source}")
            continue
        definitions[definition.name] = definition
    return definitions, errors
