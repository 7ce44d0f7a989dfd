"""SEV certificates (the 0x824-byte PDH / PEK / OCA / CEK / GODH format), encoded and decoded.

Layout: SEV API (AMD pub. 55766) appendix "Certificates", as virtee/sev mirrors it in
src/certs/sev/sev/cert/v1/{mod,body/mod,body/key/mod,body/key/ecc/mod,sig/mod,sig/ecdsa}.rs. Every
field is little-endian, big numbers included (x, y, r, s are stored least significant byte first in
72-byte fields; P-384 uses the first 48):

    0x000  u32  version (1)
    0x004  u8   API major      0x005 u8 API minor      0x006 u16 reserved
    0x008  u32  key usage (PDH 0x1003, PEK 0x1002, OCA 0x1001, CEK 0x1004)
    0x00C  u32  key algorithm (ECDSA_SHA256 2, ECDH_SHA256 3, ... SHA384 variants 0x1xx)
    0x010  key, a 0x404-byte union: ECC = u32 curve (P-256 1, P-384 2), x[72], y[72], zeros
    0x414  signature 1 (0x208 bytes): u32 usage, u32 algorithm, r[72], s[72], zeros to 512
    0x61C  signature 2, the same (an empty slot has usage 0x1000, algorithm 0)

An RSA signature (the ASK's over a CEK, RSA_SHA256 / RSA_SHA384) fills the slot's 512-byte union with one
little-endian number (virtee sig/rsa.rs). The body a signature covers is bytes 0x000..0x414 as they are in
the certificate (virtee/sev Encoder<Body> saves the body struct itself, padding included), so a decoded
certificate keeps its bytes. Only ECC keys are built here; the RSA keys of AMD's ARK/ASK have their own format
(amdcert.py), and a PDH, PEK, OCA or CEK is always ECC.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

CERT_SIZE = 0x824
BODY_SIZE = 0x414
_KEY_UNION_SIZE = 0x404  # max(ECC 4+72+72, RSA 4+512+512)
_SIG_SIZE = 0x208  # usage + algorithm + 512-byte union
_NUM_SIZE = 72  # each big-number field
_EMPTY_SIG_USAGE = 0x1000  # virtee/sev Usage::INV


class Usage(enum.IntEnum):
    """Key usage (SEV API, table "Key Usage")."""

    ARK = 0x0000
    ASK = 0x0013
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004
    INV = 0x1000


class Algo(enum.IntEnum):
    """Key / signature algorithm (SEV API, table "Algorithms")."""

    NONE = 0x0000
    RSA_SHA256 = 0x0001
    ECDSA_SHA256 = 0x0002
    ECDH_SHA256 = 0x0003
    RSA_SHA384 = 0x0101
    ECDSA_SHA384 = 0x0102
    ECDH_SHA384 = 0x0103


class Curve(enum.IntEnum):
    P256 = 1
    P384 = 2


_CURVES = {Curve.P256: (ec.SECP256R1, 32), Curve.P384: (ec.SECP384R1, 48)}
_ECC_ALGOS = (Algo.ECDSA_SHA256, Algo.ECDH_SHA256, Algo.ECDSA_SHA384, Algo.ECDH_SHA384)
RSA_ALGOS = (Algo.RSA_SHA256, Algo.RSA_SHA384)
_RSA_SIG_SIZE = 512  # virtee sig/rsa.rs Signature([u8; 512])


class CertError(ValueError):
    """A certificate that does not have the SEV format, or a signature that does not verify."""


def _le(value: int, size: int = _NUM_SIZE) -> bytes:
    return value.to_bytes(size, "little")


@dataclasses.dataclass(frozen=True)
class Signature:
    """One signature slot: ECDSA (r, s) or, for RSA algorithms, the one number `rsa` (r = s = 0)."""

    usage: int
    algo: int
    r: int
    s: int
    rsa: int = 0

    @property
    def empty(self) -> bool:
        # virtee/sev sig/mod.rs is_empty(): a known usage with an RSA or ECDSA algorithm is a signature
        return self.usage not in (Usage.OCA, Usage.CEK, Usage.PEK, Usage.PDH, Usage.ARK, Usage.ASK) or \
            self.algo not in (Algo.RSA_SHA256, Algo.RSA_SHA384, Algo.ECDSA_SHA256, Algo.ECDSA_SHA384)

    def encode(self) -> bytes:
        if self.algo in RSA_ALGOS:
            return struct.pack("<II", self.usage, self.algo) + _le(self.rsa, _RSA_SIG_SIZE)
        raw = struct.pack("<II", self.usage, self.algo) + _le(self.r) + _le(self.s)
        return raw.ljust(_SIG_SIZE, b"\0")


EMPTY_SIGNATURE = Signature(_EMPTY_SIG_USAGE, Algo.NONE, 0, 0)


@dataclasses.dataclass(frozen=True)
class SevCert:
    """An SEV certificate with an ECC public key."""

    usage: int
    algo: int
    curve: int
    x: int
    y: int
    api_major: int = 0
    api_minor: int = 0
    sigs: tuple[Signature, Signature] = (EMPTY_SIGNATURE, EMPTY_SIGNATURE)
    # the body as decoded (what its signatures cover); None for a certificate built here
    signed_body: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

    def body(self) -> bytes:
        if self.signed_body is not None:
            return self.signed_body
        key = struct.pack("<I", self.curve) + _le(self.x) + _le(self.y)
        raw = struct.pack("<IBBHII", 1, self.api_major, self.api_minor, 0, self.usage, self.algo)
        return raw + key.ljust(_KEY_UNION_SIZE, b"\0")

    def encode(self) -> bytes:
        return self.body() + self.sigs[0].encode() + self.sigs[1].encode()

    @classmethod
    def decode(cls, raw: bytes) -> SevCert:
        """Parse and check the fields a PDH / GODH needs: version 1, an ECC algorithm, a known curve, a point on it."""
        if len(raw) != CERT_SIZE:
            raise CertError(f"an SEV certificate is {CERT_SIZE:#x} ({CERT_SIZE}) bytes, got {len(raw)}")
        version, major, minor, _, usage, algo = struct.unpack_from("<IBBHII", raw, 0)
        if version != 1:
            raise CertError(f"SEV certificate version {version}, only version 1 exists")
        if algo not in _ECC_ALGOS:
            raise CertError(f"SEV certificate algorithm {algo:#x} is not an ECC one (ECDSA/ECDH SHA256/SHA384)")
        (curve,) = struct.unpack_from("<I", raw, 0x10)
        if curve not in _CURVES:
            raise CertError(f"SEV certificate curve {curve} is neither P-256 (1) nor P-384 (2)")
        x = int.from_bytes(raw[0x14:0x14 + _NUM_SIZE], "little")
        y = int.from_bytes(raw[0x14 + _NUM_SIZE:0x14 + 2 * _NUM_SIZE], "little")
        sigs = []
        for offset in (BODY_SIZE, BODY_SIZE + _SIG_SIZE):
            s_usage, s_algo = struct.unpack_from("<II", raw, offset)
            if s_algo in RSA_ALGOS:
                sigs.append(Signature(s_usage, s_algo, 0, 0,
                                      int.from_bytes(raw[offset + 8:offset + 8 + _RSA_SIG_SIZE], "little")))
                continue
            r = int.from_bytes(raw[offset + 8:offset + 8 + _NUM_SIZE], "little")
            s = int.from_bytes(raw[offset + 8 + _NUM_SIZE:offset + 8 + 2 * _NUM_SIZE], "little")
            sigs.append(Signature(s_usage, s_algo, r, s))
        cert = cls(usage, algo, curve, x, y, major, minor, (sigs[0], sigs[1]), bytes(raw[:BODY_SIZE]))
        cert.public_key()  # the point must be on the curve
        return cert

    def public_key(self) -> ec.EllipticCurvePublicKey:
        curve_cls, _ = _CURVES[Curve(self.curve)]
        try:
            return ec.EllipticCurvePublicNumbers(self.x, self.y, curve_cls()).public_key()
        except ValueError:
            raise CertError("the certificate's public key is not a point on its curve") from None

    @property
    def name(self) -> str:
        return Usage(self.usage).name if self.usage in Usage._value2member_map_ else f"usage {self.usage:#x}"

    def describe(self) -> str:
        algo = Algo(self.algo).name if self.algo in Algo._value2member_map_ else f"{self.algo:#x}"
        return f"{self.name} {algo} {Curve(self.curve).name}"

    def fingerprint(self) -> str:
        """As `sevctl verify` prints it (virtee/sev sev/cert/mod.rs Display, crypto.rs PublicKey Display):
        usage, EP<curve bits> and E<hash bits> for a signing key or D<hash bits> for a PDH, then the hash of the
        body in the key algorithm's hash."""
        bits = 384 if self.curve == Curve.P384 else 256
        kind = "D" if self.usage == Usage.PDH else "E"
        return f"{self.name} EP{bits} {kind}{_hash_for(self.algo).digest_size * 8} " + \
            hashlib.new(_hash_for(self.algo).name, self.body()).hexdigest()


def cert_from_key(key: ec.EllipticCurvePublicKey, usage: Usage, algo: Algo, api_major: int = 0,
                  api_minor: int = 0) -> SevCert:
    curve = Curve.P384 if isinstance(key.curve, ec.SECP384R1) else Curve.P256
    numbers = key.public_numbers()
    return SevCert(int(usage), int(algo), int(curve), numbers.x, numbers.y, api_major, api_minor)


def generate(usage: Usage = Usage.PDH) -> tuple[SevCert, ec.EllipticCurvePrivateKey]:
    """A fresh P-384 key and its unsigned certificate, as virtee/sev Certificate::generate(): API version
    0.0, algorithm ECDH_SHA256 for a PDH and ECDSA_SHA256 for a signing key."""
    private = ec.generate_private_key(ec.SECP384R1())
    algo = Algo.ECDH_SHA256 if usage == Usage.PDH else Algo.ECDSA_SHA256
    return cert_from_key(private.public_key(), usage, algo), private


def _hash_for(algo: int) -> hashes.HashAlgorithm:
    return hashes.SHA384() if algo & 0x100 else hashes.SHA256()


def sign(cert: SevCert, signer: ec.EllipticCurvePrivateKey, signer_usage: Usage,
         algo: Algo = Algo.ECDSA_SHA256) -> SevCert:
    """The certificate with its first empty signature slot filled (virtee/sev cert/v1/mod.rs Signer)."""
    der = signer.sign(cert.body(), ec.ECDSA(_hash_for(algo)))
    r, s = decode_dss_signature(der)
    sig = Signature(int(signer_usage), int(algo), r, s)
    if cert.sigs[0].empty:
        return dataclasses.replace(cert, sigs=(sig, cert.sigs[1]))
    if cert.sigs[1].empty:
        return dataclasses.replace(cert, sigs=(cert.sigs[0], sig))
    raise CertError("both signature slots are in use")


def verify_signed_by(cert: SevCert, signer: SevCert) -> None:
    """Raise CertError unless one of `cert`'s signatures is `signer`'s, as virtee/sev crypto.rs PublicKey::verify
    checks a slot: the slot's usage is the signer's, an ECDSA algorithm whose hash is the signer's key algorithm's,
    and the ECDSA signature verifies over the body."""
    key = signer.public_key()
    for sig in cert.sigs:
        if sig.empty or sig.usage != signer.usage or sig.algo not in (Algo.ECDSA_SHA256, Algo.ECDSA_SHA384):
            continue
        if _hash_for(sig.algo).name != _hash_for(signer.algo).name:
            continue
        try:
            key.verify(encode_dss_signature(sig.r, sig.s), cert.body(), ec.ECDSA(_hash_for(sig.algo)))
            return
        except InvalidSignature:
            continue
    raise CertError(f"the {cert.describe()} certificate carries no valid signature by the {signer.describe()} key")
