"""The simulated PSP's platform identity on hosts without SEV (sev-es-emu): a PDH key that outlives one launch.

A real platform keeps its PDH until PDH_GEN; a guest owner fetches its certificate once (sevctl export,
`vmctl host --export-pdh`) and makes sessions for it. vmmd's firmware model (launch.py SevModel) needs the
same persistence, so its keys live in a directory: `$VMMD_SIM_PSP_DIR`, else /var/lib/vmmd/simulated-psp for
root and `$XDG_STATE_HOME/vmmd/simulated-psp` (~/.local/state/...) for others. Keys are PEM files, mode
0600, created once (atomically: a concurrent first use keeps one key).

The simulated platform has the whole SEV chain a real one has (SEV API 55766, "Certificate Chain";
sevchain.py): P-384 PDH, PEK, OCA and CEK keys (pdh.key, pek.key, oca.key, cek.key) and a simulated AMD root
and signing key, RSA-4096 in AMD's certificate format (ark.key, ask.key; amdcert.py), whose key ids start
with "vmmd-sim-". The PDH is signed by the PEK, the PEK by the OCA and the CEK, the OCA by itself, the CEK
by the simulated ASK, the ASK by the simulated ARK, the ARK by itself. None of it is AMD's: vmctl owner
never trusts that root unless told to (`--ca ask_ark_simulated.cert`), a measurement or secret exchange
with these keys proves nothing about a host, and every output that uses them says so.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vmmd.errors import VmmdError
from vmmd.sev import amdcert, sevcert

ENV_DIR = "VMMD_SIM_PSP_DIR"
NOTE = ("simulated PSP (sev-es-emu): its PDH key was made by vmmd on this host, not by AMD firmware; a measurement "
        "or secret exchanged with it proves nothing about the host")
ASK_ARK_FILE = "ask_ark_simulated.cert"  # named as AMD names its ask_ark_<generation>.cert
_RSA_KEYS = ("ask", "ark")
RSA_BITS = 4096  # as Rome and later: SHA-384 signatures


def default_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    if os.geteuid() == 0:
        return Path("/var/lib/vmmd/simulated-psp")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vmmd" / "simulated-psp"


def _sim_id(label: bytes, key: rsa.RSAPrivateKey) -> bytes:
    """A simulated key's KEY_ID: "vmmd-sim-ark"/"vmmd-sim-ask" and 4 bytes of the modulus' hash (16 bytes)."""
    modulus = key.public_key().public_numbers().n.to_bytes(RSA_BITS // 8, "little")
    return amdcert.SIMULATED_ID_PREFIX + label + hashlib.sha256(modulus).digest()[:4]


def _ecc_cert(key: ec.EllipticCurvePrivateKey, usage: sevcert.Usage) -> sevcert.SevCert:
    algo = sevcert.Algo.ECDH_SHA256 if usage == sevcert.Usage.PDH else sevcert.Algo.ECDSA_SHA256
    return sevcert.cert_from_key(key.public_key(), usage, algo)


@dataclasses.dataclass(frozen=True)
class SimulatedChain:
    """The simulated platform's certificates, encoded: what `vmctl host --export-pdh` writes on sev-es-emu."""

    pdh: bytes
    pek: bytes
    oca: bytes
    cek: bytes
    ask: bytes
    ark: bytes

    @property
    def cert_chain(self) -> bytes:
        """PEK ‖ OCA ‖ CEK, SEV_PDH_CERT_EXPORT's cert_chain layout."""
        return self.pek + self.oca + self.cek

    @property
    def ask_ark(self) -> bytes:
        return self.ask + self.ark


@dataclasses.dataclass(frozen=True)
class SimulatedPsp:
    directory: Path
    pdh_key: ec.EllipticCurvePrivateKey
    pek_key: ec.EllipticCurvePrivateKey
    create: bool = True

    @functools.cached_property
    def _chain_keys(self) -> dict:
        """The OCA, CEK, ASK and ARK keys, loaded (made on first use) only when a certificate needs them: a launch
        needs just the PDH key."""
        return {name: _key(self.directory, name, self.create) for name in ("oca", "cek", "ask", "ark")}

    def pek_cert(self) -> bytes:
        """The PEK certificate signed by the OCA (first slot) and the CEK (second), as real PEKs are."""
        keys = self._chain_keys
        pek = sevcert.sign(_ecc_cert(self.pek_key, sevcert.Usage.PEK), keys["oca"], sevcert.Usage.OCA)
        return sevcert.sign(pek, keys["cek"], sevcert.Usage.CEK).encode()

    def pdh_cert(self) -> bytes:
        """The PDH certificate as SEV_PDH_CERT_EXPORT gives it: ECDH P-384, signed by the PEK."""
        pdh = _ecc_cert(self.pdh_key, sevcert.Usage.PDH)
        return sevcert.sign(pdh, self.pek_key, sevcert.Usage.PEK).encode()

    def ask_ark(self) -> tuple[amdcert.AmdCert, amdcert.AmdCert]:
        keys = self._chain_keys
        ark_id = _sim_id(b"ark", keys["ark"])
        ark = amdcert.make(keys["ark"], amdcert.Usage.ARK, ark_id)
        ask = amdcert.make(keys["ask"], amdcert.Usage.ASK, _sim_id(b"ask", keys["ask"]), keys["ark"], ark_id)
        return ask, ark

    def chain(self) -> SimulatedChain:
        keys = self._chain_keys
        oca = sevcert.sign(_ecc_cert(keys["oca"], sevcert.Usage.OCA), keys["oca"], sevcert.Usage.OCA)
        cek = _ecc_cert(keys["cek"], sevcert.Usage.CEK)
        ask, ark = self.ask_ark()
        # the ASK's RSA-PSS signature over the CEK body (what AMD's KDS adds to a real CEK), in the first slot
        signature = sevcert.Signature(amdcert.Usage.ASK, sevcert.Algo.RSA_SHA384, 0, 0,
                                      amdcert.rsa_pss_sign(keys["ask"], cek.body()))
        cek = dataclasses.replace(cek, sigs=(signature, cek.sigs[1]))
        return SimulatedChain(self.pdh_cert(), self.pek_cert(), oca.encode(), cek.encode(), ask.encode(), ark.encode())


def _key(directory: Path, name: str, create: bool):
    path = directory / f"{name}.key"
    if not path.exists():
        if not create:
            raise VmmdError(f"the simulated PSP has no {name} key yet in {directory}")
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            _create_key(path, name)
        except OSError as err:
            raise VmmdError(f"cannot create the simulated PSP key in {directory}: {err.strerror}; set "
                            f"{ENV_DIR} to a directory you may write") from None
    return _load_key(path, name)


def _load_key(path: Path, name: str):
    try:
        # vmmd wrote these keys itself (mode 0600): OpenSSL's RSA consistency check, ~0.3 s per 4096-bit key, is
        # skipped, as cryptography's load_pem_private_key allows for trusted keys
        key = serialization.load_pem_private_key(path.read_bytes(), password=None,
                                                 unsafe_skip_rsa_key_validation=name in _RSA_KEYS)
    except (OSError, ValueError) as err:
        raise VmmdError(f"cannot read the simulated PSP key {path}: {getattr(err, 'strerror', None) or err}; remove "
                        f"it to make a new one (sessions made for the old PDH then no longer unwrap)") from None
    if name in _RSA_KEYS:
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != RSA_BITS:
            raise VmmdError(f"the simulated PSP key {path} is not an RSA-{RSA_BITS} key")
    elif not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise VmmdError(f"the simulated PSP key {path} is not a P-384 key")
    return key


def _create_key(path: Path, name: str) -> None:
    key = rsa.generate_private_key(65537, RSA_BITS) if name in _RSA_KEYS else ec.generate_private_key(ec.SECP384R1())
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
    """The simulated platform's PDH and PEK keys (the rest when a certificate needs them), made on first use when
    `create`."""
    directory = Path(directory) if directory is not None else default_dir()
    return SimulatedPsp(directory, _key(directory, "pdh", create), _key(directory, "pek", create), create)
