"""The simulated PSP's platform identity on hosts without SEV (sev-es-emu): a PDH key that outlives one launch.

A real platform keeps its PDH until PDH_GEN; a guest owner fetches its certificate once (sevctl export,
`vmctl host --export-pdh`) and makes sessions for it. vmmd's firmware model (launch.py SevModel) needs the
same persistence, so its P-384 PDH key and the simulated PEK that signs the PDH certificate live in a
directory: `$VMMD_SIM_PSP_DIR`, else /var/lib/vmmd/simulated-psp for root and
`$XDG_STATE_HOME/vmmd/simulated-psp` (~/.local/state/...) for others. Keys are PEM files, mode 0600,
created once (atomically: a concurrent first use keeps one key). None of it is AMD's: a measurement
or secret exchange with this key proves nothing about a host, and every output that uses it says so.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vmmd.errors import VmmdError
from vmmd.sev import sevcert

ENV_DIR = "VMMD_SIM_PSP_DIR"
NOTE = ("simulated PSP (sev-es-emu): its PDH key was made by vmmd on this host, not by AMD firmware; a measurement "
        "or secret exchanged with it proves nothing about the host")


def default_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    if os.geteuid() == 0:
        return Path("/var/lib/vmmd/simulated-psp")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vmmd" / "simulated-psp"


@dataclasses.dataclass(frozen=True)
class SimulatedPsp:
    directory: Path
    pdh_key: ec.EllipticCurvePrivateKey
    pek_key: ec.EllipticCurvePrivateKey

    def pek_cert(self) -> bytes:
        pek = sevcert.cert_from_key(self.pek_key.public_key(), sevcert.Usage.PEK, sevcert.Algo.ECDSA_SHA256)
        return sevcert.sign(pek, self.pek_key, sevcert.Usage.PEK).encode()  # self-signed: there is no OCA/CEK

    def pdh_cert(self) -> bytes:
        """The PDH certificate as SEV_PDH_CERT_EXPORT gives it: ECDH P-384, signed by the PEK."""
        pdh = sevcert.cert_from_key(self.pdh_key.public_key(), sevcert.Usage.PDH, sevcert.Algo.ECDH_SHA256)
        return sevcert.sign(pdh, self.pek_key, sevcert.Usage.PEK).encode()


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise VmmdError(f"cannot read the simulated PSP key {path}: {getattr(err, 'strerror', None) or err}; remove "
                        f"it to make a new one (sessions made for the old PDH then no longer unwrap)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise VmmdError(f"the simulated PSP key {path} is not a P-384 key")
    return key


def _create_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process made first
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def load(directory: Path | None = None, create: bool = True) -> SimulatedPsp:
    """The simulated platform's keys, made on first use when `create`."""
    directory = Path(directory) if directory is not None else default_dir()
    keys = {}
    for name in ("pdh", "pek"):
        path = directory / f"{name}.key"
        if not path.exists():
            if not create:
                raise VmmdError(f"the simulated PSP has no keys yet in {directory}")
            try:
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                _create_key(path)
            except OSError as err:
                raise VmmdError(f"cannot create the simulated PSP key in {directory}: {err.strerror}; set "
                                f"{ENV_DIR} to a directory you may write") from None
        keys[name] = _load_key(path)
    return SimulatedPsp(directory, keys["pdh"], keys["pek"])
