"""`vmctl owner`: the guest owner's side of an attested launch, usable on a machine without KVM.

    vmctl owner session --chain CHAIN --policy P --out DIR GODH cert, session blob, TEK, TIK (sevctl session's
                                                           files), once the PDH's chain verified up to AMD's root
    vmctl owner verify --measurement M --tik FILE ...      check LAUNCH_MEASURE against the expected digest
    vmctl owner secret --tek --tik --measurement --secret  a LAUNCH_SECRET header and payload (sevctl secret build)

The protocol is vmmd/sev/owner.py; file names and formats are sevctl's: `NAME_godh.b64` and
`NAME_session.b64` in base64 (what QEMU's sev-guest dh-cert-file= / session-file= read, and what
`vmctl run --dh-cert/--session` read), `NAME_tek.bin` and `NAME_tik.bin` raw 16 bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
import uuid
from pathlib import Path

import click

from vmmd.cli import fail as _fail
from vmmd.errors import ExitCode, VmmdError

# The GUID vmctl owner secret files a secret under when --guid is not given (random, vmmd's own). OVMF hands
# entries to whoever asks for their GUID; vmmd's secret-reading guest (firmware/secret.c) prints every entry.
VMMD_SECRET_GUID = uuid.UUID("4cfc9864-20a6-409f-b9a4-378dd6bb3567")
SIMULATED_NOTE = ("this measurement comes from vmmd's simulated PSP (platform sev-es-emu): it proves nothing about "
                  "the host")


def parse_policy(text: str) -> int:
    """A policy given as a number (0x5) or as flag names (NODBG,NOKS; ES is always added)."""
    from vmmd.sev.launch import build_policy

    text = str(text).strip()
    try:
        value = int(text, 0)
    except ValueError:
        return build_policy(part for part in text.replace("+", ",").split(",") if part.strip())
    if not 0 <= value <= 0xFFFF_FFFF:
        raise VmmdError(f"policy {text} does not fit 32 bits")
    return value


def read_file(path: Path, what: str, limit: int = 1 << 20) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise VmmdError(f"cannot read the {what} file {path}: {err.strerror}") from None
    if len(data) > limit:
        raise VmmdError(f"the {what} file {path} is larger than {limit} bytes")
    return data


def load_dh_cert(path: Path) -> bytes:
    from vmmd.sev.attest import check_dh_cert

    return check_dh_cert(read_file(path, "guest-owner DH certificate"), path)


def load_session(path: Path) -> bytes:
    from vmmd.sev.attest import check_session

    return check_session(read_file(path, "launch session"), path)


def _read_key(path: Path, what: str) -> bytes:
    """A TEK/TIK: 16 raw bytes (sevctl's .bin), 32 hex digits, or base64 (sevctl accepts base64 too)."""
    raw = read_file(path, what, 4096)
    if len(raw) == 16:
        return raw
    text = raw.strip()
    for decode in (lambda t: bytes.fromhex(t.decode("ascii")), lambda t: base64.b64decode(t, validate=True)):
        try:
            key = decode(text)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
        if len(key) == 16:
            return key
    raise VmmdError(f"the {what} file {path} must hold 16 raw bytes, 32 hex digits or base64 of 16 bytes")


def _read_pdh(path: Path):
    from vmmd.sev import sevcert

    data = read_file(path, "PDH certificate")
    if len(data) != sevcert.CERT_SIZE:  # sevctl export writes it raw; accept base64 too
        from vmmd.sev.attest import decode_base64_file

        data = decode_base64_file(data, path, "PDH certificate", sevcert.CERT_SIZE)
    try:
        cert = sevcert.SevCert.decode(data)
    except sevcert.CertError as err:
        raise VmmdError(f"{path} is not an SEV PDH certificate: {err}") from None
    if cert.name != "PDH":
        raise VmmdError(f"{path} is not a PDH certificate but a {cert.name} one")
    return cert


def read_measurement(text: str) -> tuple[bytes, dict]:
    """The LAUNCH_MEASURE blob from `vmctl measurement --json` output (a file or the JSON text), a raw 48-byte
    file, hex or base64 (QEMU's query-sev-launch-measure "data"); plus what the JSON said about the platform."""
    from vmmd.cli.measure import _decode_blob

    path = Path(text)
    data = text
    if path.is_file():
        raw = read_file(path, "measurement")
        if raw.lstrip().startswith(b"{"):
            data = raw.decode(errors="replace")
    if data.lstrip().startswith("{"):
        try:
            info = json.loads(data)
            blob = base64.b64decode(info["measurement"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise VmmdError(f"{text} is JSON but not `vmctl measurement --json` output (a base64 'measurement' "
                            "key)") from None
        if len(blob) != 48:
            raise VmmdError(f"the measurement in {text} is {len(blob)} bytes, not 48 (MEASURE ‖ MNONCE)")
        return blob, info
    return _decode_blob(text), {}


def _write_new(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create `path` with `data`; never replace a file that exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise VmmdError(f"{path} exists already: vmctl owner never replaces a file; choose another --out or "
                        "--name") from None
    except OSError as err:
        raise VmmdError(f"cannot create {path}: {err.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VmmdError(f"cannot create the output directory {out}: {err.strerror}") from None
    return out


@click.group("owner")
def owner_cmd() -> None:
    """The guest owner's side of an attested SEV-ES launch (needs no KVM): session, verify, secret."""


KDS_CEK_URL = "https://kdsintf.amd.com/cek/id/"  # + the chip id (sevctl src/main.rs chain(); AMD's KDS)
CHIP_ID_FILE = "chip_id.txt"
NO_CHAIN = ("vmctl owner session checks the PDH's certificate chain up to AMD's root key before wrapping the TEK/TIK "
            "to it, and was given no chain: pass --chain with the host's sev_chain.cert (vmctl host --export-pdh; "
            "sevctl export [--full]), or --no-verify-chain to make a session the host could read")


@owner_cmd.command("session")
@click.option("--pdh", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="the platform's PDH certificate (vmctl host --export-pdh: pdh.cert); not needed when a --chain "
                   "file holds it")
@click.option("--chain", "chains", type=click.Path(path_type=Path, dir_okay=False), multiple=True,
              help="the platform's certificates, checked up to AMD's root before the session is made: "
                   "sev_chain.cert (PDH, PEK, OCA, CEK: vmctl host --export-pdh, sevctl export), cert_chain.cert "
                   "(PEK, OCA, CEK) or a sevctl export --full file (+ ASK, ARK); may be given more than once")
@click.option("--pek", "peks", type=click.Path(path_type=Path, dir_okay=False), multiple=True,
              help="the older name of --chain, read the same way (a PEK alone is no longer enough: the whole chain "
                   "is checked)")
@click.option("--cek", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="the CEK certificate AMD's KDS signed for this chip (" + KDS_CEK_URL + "<chip id>), in place "
                   "of the chain's CEK: the firmware's own CEK is not signed by AMD")
@click.option("--ca", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="AMD's ask_ark_<generation>.cert (ASK, then ARK) to check against, instead of the roots bundled "
                   "with vmctl (Naples, Rome, Milan, Genoa, Turin); its ARK is then trusted: take it from AMD, "
                   "never from the host")
@click.option("--no-verify-chain", is_flag=True,
              help="make the session without checking the chain (a host that gave you its own PDH can then read "
                   "the TEK, TIK and the secret)")
@click.option("--policy", default="0x5", show_default=True, help="guest policy: a number or flags (NODBG,NOKS,...)")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="directory to write to")
@click.option("--name", default="vm", show_default=True, help="file name prefix, as sevctl session --name")
def session_cmd(pdh: Path | None, chains: tuple[Path, ...], peks: tuple[Path, ...], cek: Path | None,
                ca: Path | None, no_verify_chain: bool, policy: str, out: Path, name: str) -> None:
    """Make a launch session for the platform whose PDH is given, once its certificate chain verified up to AMD's
    root: NAME_godh.b64 and NAME_session.b64 for the host (vmctl run --dh-cert / --session), NAME_tek.bin and
    NAME_tik.bin to keep."""
    from vmmd.sev import owner

    try:
        value = parse_policy(policy)
        found, verified = _platform_certificates(pdh, chains + peks, cek, ca, no_verify_chain)
        pdh_cert = found.get("PDH")
        made = owner.make_session(pdh_cert, value)
        directory = _out_dir(out)
        files = {f"{name}_godh.b64": (base64.b64encode(made.godh), 0o644),
                 f"{name}_session.b64": (base64.b64encode(made.session), 0o644),
                 f"{name}_tek.bin": (made.tek, 0o600), f"{name}_tik.bin": (made.tik, 0o600)}
        for file in files:
            if (directory / file).exists():
                raise VmmdError(f"{directory / file} exists already: vmctl owner never replaces a file; choose "
                                "another --out or --name")
        for file, (data, mode) in files.items():
            _write_new(directory / file, data, mode)
    except (VmmdError, owner.OwnerError) as err:
        _fail(str(err))
        return
    if verified is None:
        click.echo("vmctl: warning: the PDH's certificate chain was not checked (--no-verify-chain): if the host gave "
                   "you a PDH of its own, it can unwrap the TEK and TIK, forge the launch measurement and read the "
                   "secret you inject", err=True)
    else:
        click.echo(f"certificate chain verified: PDH signed by PEK, PEK by OCA (self-signed) and CEK, CEK by ASK, ASK "
                   f"by ARK (self-signed): {verified.describe()}")
        if verified.ark.simulated:
            click.echo(f"vmctl: warning: the chain ends at vmmd's simulated root (--ca {ca}), which vmmd made on the "
                       "host: this session protects nothing against that host; use it only to test", err=True)
        elif not verified.anchor.bundled:
            click.echo(f"vmctl: warning: the ARK in {ca} is not one of AMD's roots bundled with vmctl: the chain is "
                       "only as trustworthy as that file (AMD publishes ask_ark_<generation>.cert; never take it from "
                       "the host)", err=True)
    click.echo(f"policy {value:#x}; session for the PDH key {pdh_cert.describe()}; wrote " +
               ", ".join(str(directory / f) for f in files))


def _platform_certificates(pdh: Path | None, chains: tuple[Path, ...], cek: Path | None, ca: Path | None,
                           no_verify: bool):
    """The certificates the owner was given, and their verified chain (None with --no-verify-chain)."""
    from vmmd.sev import amdcert, sevcert, sevchain

    found = sevchain.Certificates()
    try:
        if pdh is not None:
            found.add("PDH", _read_pdh(pdh), str(pdh))
        for path in chains:
            sevchain.parse(read_file(path, "certificate chain"), str(path), found)
        if cek is not None:
            one = sevchain.parse(read_file(cek, "CEK certificate"), str(cek))
            if list(one.certs) != ["CEK"]:
                raise VmmdError(f"{cek} is not one CEK certificate (it holds {', '.join(one.certs)})")
            found.add("CEK", one.certs["CEK"], str(cek), replace=True)
    except sevcert.CertError as err:
        raise VmmdError(str(err)) from None
    if found.get("PDH") is None:
        raise VmmdError("give the platform's PDH: --pdh pdh.cert, or a --chain file that holds it (sev_chain.cert)")
    if no_verify:
        return found, None
    if not chains and cek is None:
        raise VmmdError(NO_CHAIN)
    roots = None
    if ca is not None:
        try:
            roots = amdcert.split_ask_ark(read_file(ca, "ASK/ARK (ask_ark)"))
        except sevcert.CertError as err:
            raise VmmdError(f"{ca} is not an ask_ark file (ASK, then ARK, in AMD's certificate format): {err}") \
                from None
    try:
        return found, sevchain.verify_certificates(found, roots, f"the ARK in {ca}")
    except sevcert.CertError as err:
        hint = ""
        if isinstance(err, sevchain.UnsignedCek):
            hint = (f". A CEK as the firmware exports it is not signed by AMD: give the one AMD's KDS signed for this "
                    f"chip with --cek ({KDS_CEK_URL}<chip id>; vmctl host --export-pdh writes the id to "
                    f"{CHIP_ID_FILE}; sevctl export fetches it). For a generation vmctl does not bundle, or vmmd's "
                    "simulated PSP, give its ASK and ARK with --ca")
        raise VmmdError(f"the PDH's certificate chain does not verify: {err}{hint}; refusing to make a session for "
                        "this PDH") from None


def _seen_file(tik: Path) -> Path:
    return tik.with_name(tik.stem + ".mnonces")


@owner_cmd.command("verify")
@click.option("--measurement", "measurement", required=True,
              help="`vmctl measurement NAME --json` output (file or text), or the 48-byte blob: file, hex, base64")
@click.option("--tik", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--digest", help="the expected launch digest (hex or base64), e.g. from vmctl measure")
@click.option("--firmware", "plan_source", type=click.Path(path_type=Path, dir_okay=False),
              help="instead of --digest: predict it from this image (flat or OVMF) or guest definition (.toml), as "
                   "vmctl measure does")
@click.option("--memory", default="64M", show_default=True, help="with --firmware: guest RAM")
@click.option("--vcpus", type=int, default=1, show_default=True, help="with --firmware: vCPUs")
@click.option("--cpu-type", default=None, help="with --firmware, OVMF: the CPU model (as vmctl measure)")
@click.option("--init2/--legacy-init", default=True, show_default=True,
              help="with --firmware: the KVM init path the digest assumes (as vmctl measure)")
@click.option("--c-bit", type=click.IntRange(32, 63), default=51, show_default=True,
              help="with --firmware: the host's C-bit position (flat images' page tables carry it)")
@click.option("--policy", default="0x5", show_default=True, help="the policy the session was made for")
@click.option("--api-version", help="SEV firmware API MAJ.MIN (default: from the --json measurement)")
@click.option("--build", "build_id", type=click.IntRange(0, 255), help="firmware build (default: from the JSON)")
@click.option("--allow-replay", is_flag=True, help="do not refuse an MNONCE this TIK has seen before")
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(measurement: str, tik: Path, digest: str | None, plan_source: Path | None, memory: str, vcpus: int,
               cpu_type: str | None, init2: bool, c_bit: int, policy: str, api_version: str | None,
               build_id: int | None, allow_replay: bool, as_json: bool) -> None:
    """Check LAUNCH_MEASURE with the session's TIK: exit 0 on a match, 1 on a mismatch or a replayed nonce. Each
    MNONCE that verifies is recorded beside the TIK (NAME_tik.mnonces) and refused the next time."""
    from vmmd.cli.measure import _api_version
    from vmmd.sev.measure import verify

    try:
        blob, info = read_measurement(measurement)
        policy_value = parse_policy(policy)
        if api_version is not None:
            major, minor = _api_version(api_version)
        elif "api_major" in info:
            major, minor = int(info["api_major"]), int(info["api_minor"])
        else:
            raise VmmdError("give --api-version (or a `vmctl measurement --json` measurement, which carries it)")
        if build_id is None:
            if "build_id" not in info:
                raise VmmdError("give --build (or a `vmctl measurement --json` measurement, which carries it)")
            build_id = int(info["build_id"])
        if "policy" in info and int(info["policy"]) != policy_value:
            raise VmmdError(f"the host reports policy {int(info['policy']):#x} but the session was made for "
                            f"{policy_value:#x} (--policy): refused")
        expected_digest = _expected_digest(digest, plan_source, memory, vcpus, cpu_type, init2, c_bit, policy_value)
        result = verify(blob, _read_key(tik, "TIK"), digest=expected_digest, api_major=major, api_minor=minor,
                        build=build_id, policy=policy_value)
        replayed = False
        seen = _seen_file(tik)
        if result.match and not allow_replay:
            try:
                known = seen.read_text().split()
            except FileNotFoundError:
                known = []
            except OSError as err:
                raise VmmdError(f"cannot read {seen}: {err.strerror}") from None
            replayed = result.mnonce.hex() in known
            if not replayed:
                with open(seen, "a") as f:
                    f.write(result.mnonce.hex() + "\n")
    except VmmdError as err:
        _fail(str(err))
        return
    ok = result.match and not replayed
    simulated = bool(info.get("simulated"))
    if as_json:
        click.echo(json.dumps({"match": result.match, "replayed": replayed, "ok": ok, "simulated": simulated,
                               "mnonce": result.mnonce.hex(), "reported": result.reported.hex(),
                               "expected": result.expected.hex(), "digest": expected_digest.hex()}, sort_keys=True))
    elif replayed:
        click.echo(f"REFUSED: measurement nonce {result.mnonce.hex()} was seen before ({seen}): a replayed "
                   "measurement, not this launch's")
    elif ok:
        click.echo(f"match: {result.reported.hex()} (digest {expected_digest.hex()}, mnonce {result.mnonce.hex()})")
    else:
        click.echo("MISMATCH: the measurement does not match this TIK and digest (another session's TIK, another "
                   "image, or another policy/platform version)")
        click.echo(f"  reported: {result.reported.hex()}")
        click.echo(f"  expected: {result.expected.hex()} (digest {expected_digest.hex()})")
    if simulated and not as_json:
        click.echo(f"note: {SIMULATED_NOTE}")
    sys.exit(0 if ok else 1)


def _expected_digest(digest: str | None, plan_source: Path | None, memory: str, vcpus: int, cpu_type: str | None,
                     init2: bool, c_bit: int, policy: int) -> bytes:
    if (digest is None) == (plan_source is None):
        raise VmmdError("give the expected launch digest with --digest, or --firmware to predict it (one of them)")
    if digest is not None:
        text = digest.strip()
        for decode in (bytes.fromhex, lambda s: base64.b64decode(s, validate=True)):
            try:
                value = decode(text)
            except (ValueError, binascii.Error):
                continue
            if len(value) == 32:
                return value
        raise VmmdError("--digest must be 32 bytes in hex (64 digits) or base64")
    from vmmd.cli.measure import _plan  # the plan `vmctl measure` predicts: flat, OVMF or a definition
    from vmmd.sev.cpu_types import DEFAULT_CPU_TYPE
    from vmmd.sev.measure import launch_digest

    plan, _ = _plan(plan_source, vcpus, cpu_type or DEFAULT_CPU_TYPE, hex(policy), init2, "0", memory, c_bit)
    return launch_digest(plan)


@owner_cmd.command("secret")
@click.option("--tek", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--tik", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--measurement", required=True, help="the measurement you verified (as for owner verify)")
@click.option("--secret", "secret", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="the file holding the secret (a disk key, a passphrase)")
@click.option("--guid", default=str(VMMD_SECRET_GUID), show_default=True,
              help="the GUID the secret is filed under in the secret table (OVMF's layout)")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--name", default="vm", show_default=True, help="file name prefix")
def secret_cmd(tek: Path, tik: Path, measurement: str, secret: Path, guid: str, out: Path, name: str) -> None:
    """Build a LAUNCH_SECRET packet for the verified measurement: NAME_secret_header.bin (52 bytes) and
    NAME_secret_payload.bin (the secret table, AES-CTR encrypted with the TEK), as sevctl secret build."""
    from vmmd.sev import owner

    try:
        try:
            entry_guid = uuid.UUID(guid)
        except ValueError:
            raise VmmdError(f"--guid {guid!r} is not a GUID") from None
        blob, _ = read_measurement(measurement)
        measure, _ = owner.split_measurement(blob)
        data = read_file(secret, "secret", 16 * 1024)
        table = owner.build_secret_table([(entry_guid, data)])
        if len(table) > 4096:
            raise VmmdError(f"the secret table would be {len(table)} bytes; the secret area is one 4 KiB page")
        header, payload = owner.build_secret(_read_key(tek, "TEK"), _read_key(tik, "TIK"), measure, table)
        directory = _out_dir(out)
        paths = (directory / f"{name}_secret_header.bin", directory / f"{name}_secret_payload.bin")
        for path in paths:
            if path.exists():
                raise VmmdError(f"{path} exists already: vmctl owner never replaces a file")
        _write_new(paths[0], header)
        _write_new(paths[1], payload)
    except (VmmdError, owner.OwnerError) as err:
        _fail(str(err))
        return
    click.echo(f"wrote {paths[0]} ({len(header)} bytes) and {paths[1]} ({len(payload)} bytes); inject with: vmctl "
               f"inject-secret NAME --header {paths[0]} --secret {paths[1]}")


def apply_launch_options(platform, policy: str | None, dh_cert: str | None, session: str | None,
                         attest: bool) -> None:
    """`vmctl run --policy/--dh-cert/--session/--attest` into the platform's launch inputs."""
    if attest:
        raise VmmdError("--attest waits for the guest owner, which needs the daemon to answer vmctl measurement / "
                        "inject-secret / resume: put attest = true in a guest definition and use vmctl start")
    if policy is None and dh_cert is None and session is None:
        return
    inputs = getattr(platform, "inputs", None)
    if inputs is None or not hasattr(inputs, "dh_cert"):
        raise VmmdError(f"--policy, --dh-cert and --session set the SEV launch; platform {platform.name} has none "
                        "(use -p sev-es or -p sev-es-emu)")
    if (dh_cert is None) != (session is None):
        raise VmmdError("--dh-cert and --session go together: the guest owner's certificate and session blob")
    if policy is not None:
        from vmmd.sev.launch import check_policy

        inputs.policy = parse_policy(policy)
        check_policy(inputs.policy, None)
    if dh_cert is not None:
        inputs.dh_cert, inputs.session = load_dh_cert(Path(dh_cert)), load_session(Path(session))


def export_pdh(directory: Path) -> list[str]:
    """`vmctl host --export-pdh DIR`: the platform's certificates for a guest owner (sevctl export's role).

    With SEV hardware: SEV_PDH_CERT_EXPORT, written as pdh.cert, cert_chain.cert (PEK ‖ OCA ‖ CEK, as the
    firmware returns it) and sev_chain.cert (PDH first: sevctl export's layout), and the chip id (SEV_GET_ID2,
    hex as sevctl show identifier prints it) for fetching the CEK AMD signed. Without: the simulated PSP's
    (vmmd/sev/simpsp.py) same three files and its simulated ASK and ARK, ask_ark_simulated.cert."""
    from vmmd.platforms import sev_es_unavailable_reason

    reason = sev_es_unavailable_reason()
    if reason is None:
        from vmmd.sev.psp import Psp, SevError

        with Psp() as psp:
            pdh, chain = psp.pdh_cert_export()
            try:
                chip_id = psp.get_id2().hex().upper()
            except SevError as err:
                chip_id, id_note = None, f"no chip id ({err}): without it the CEK AMD signed cannot be fetched"
        # and sevctl export's file: PDH ‖ PEK ‖ OCA ‖ CEK (virtee/sev certs/sev/sev/chain.rs Chain encoding)
        files = {"pdh.cert": pdh, "cert_chain.cert": chain, "sev_chain.cert": pdh + chain}
        if chip_id is not None:
            files[CHIP_ID_FILE] = (chip_id + "\n").encode()
            id_note = (f"the CEK in cert_chain.cert is the firmware's own, which AMD did not sign: the owner takes the "
                       f"signed one from {KDS_CEK_URL}{chip_id} (this chip's id, also in {CHIP_ID_FILE}) and gives it "
                       "to vmctl owner session --cek")
        notes = ["from this host's SEV firmware (SEV_PDH_CERT_EXPORT)", id_note]
    else:
        from vmmd.sev import simpsp

        sim = simpsp.load().chain()
        files = {"pdh.cert": sim.pdh, "cert_chain.cert": sim.cert_chain, "sev_chain.cert": sim.pdh + sim.cert_chain,
                 simpsp.ASK_ARK_FILE: sim.ask_ark}
        notes = [f"no SEV-ES here ({reason}): this is the {simpsp.NOTE}",
                 f"{simpsp.ASK_ARK_FILE} holds vmmd's simulated ASK and ARK, not AMD's: vmctl owner session trusts "
                 "that root only when given it with --ca"]
    target = _out_dir(directory)
    for name in files:
        if (target / name).exists():
            raise VmmdError(f"{target / name} exists already: vmctl never replaces a file; choose another directory")
    for name, data in files.items():
        _write_new(target / name, data)
    return [f"wrote {', '.join(str(target / n) for n in files)}", *notes]


__all__ = ["owner_cmd", "parse_policy", "load_dh_cert", "load_session", "ExitCode"]
