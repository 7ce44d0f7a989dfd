"""AMD certificates (ARK, ASK): the RSA format AMD's root and signing keys use in the SEV / SEV-ES chain.

Layout: SEV API (AMD pub. 55766) appendix "AMD Certificates" (table "AMD certificate format"), as virtee/sev
mirrors it in src/certs/sev/ca/cert/v1.rs (Preamble, Data, Body, Contents) and AMD's sev-tool in
src/amdcert.h (amd_cert). Every field is little-endian, the big numbers included:

    0x00  u32  version (1)
    0x04  16   KEY_ID          the key's id
    0x14  16   CERTIFYING_ID   the KEY_ID of the key that signed this certificate (the ARK's own for the ARK)
    0x24  u32  key usage (ARK 0x0000, ASK 0x0013)
    0x28  16   reserved
    0x38  u32  PUBEXP_SIZE, bits
    0x3C  u32  MODULUS_SIZE, bits (2048: Naples; 4096: Rome and later)
    0x40  pubexp (PUBEXP_SIZE/8 bytes), modulus (MODULUS_SIZE/8), signature (MODULUS_SIZE/8)

virtee/sev accepts only PUBEXP_SIZE == MODULUS_SIZE in {2048, 4096} (Preamble::size()); so does this module.
The signature covers bytes 0 .. end of the modulus (virtee's Encoder<Body>). It is RSASSA-PSS with the hash
the key size implies (2048: SHA-256, 4096: SHA-384; virtee `impl From<Size> for MessageDigest`, sev-tool
amd_cert_export_pub_key), MGF1 over the same hash and a salt as long as the digest (virtee crypto.rs
PublicKey::verify, RsaPssSaltlen::DIGEST_LENGTH), stored least significant byte first (virtee's TryFrom
<Certificate> for Signature reverses it). Only the ARK signs AMD certificates (virtee marks their signature
usage ARK), its KEY_ID in the CERTIFYING_ID field; the ASK signs the CEK, an SEV certificate (sevcert.py).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import uuid

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vmmd.sev.sevcert import CertError

HEADER_SIZE = 0x40
_HEADER = struct.Struct("<I16s16sI16sII")
assert _HEADER.size == HEADER_SIZE
KEY_BITS = (2048, 4096)
# vmmd's simulated PSP (simpsp.py) names its own root and signing key with these KEY_ID prefixes, so that
# every description of them says they are not AMD's
SIMULATED_ID_PREFIX = b"vmmd-sim-"

# The Naples ARK AMD publishes lacks its signature (https://github.com/AMDESE/AMDSEV/issues/17): the file ends
# after the modulus. virtee/sev's decoder (ca/cert/v1.rs, NAPLES_ARK) then takes the signature AMD supplied
# separately, for that one preamble only; this module does the same with the complete Naples ARK bundled in
# amdroots.py.
NAPLES_ARK_ID = bytes.fromhex("1bb987c359494606b174945601c9ea5b")


def hash_for_bits(bits: int) -> hashes.HashAlgorithm:
    """The hash an AMD RSA key's signatures use: SHA-256 for RSA-2048 (Naples), SHA-384 for RSA-4096 (virtee
    `impl From<Size> for MessageDigest`)."""
    return hashes.SHA256() if bits == 2048 else hashes.SHA384()


class Usage(enum.IntEnum):
    """Key usage of an AMD certificate (SEV API, table "Key Usage")."""

    ARK = 0x0000
    ASK = 0x0013


def key_id_text(key_id: bytes) -> str:
    """A KEY_ID as people compare it: AMD's are UUIDs (sevctl and sev-tool print the 16 bytes in order)."""
    if key_id.startswith(SIMULATED_ID_PREFIX):  # "vmmd-sim-ark" + 4 bytes of the key's hash
        return key_id[:12].decode("ascii", "replace") + "-" + key_id[12:].hex()
    return str(uuid.UUID(bytes=key_id))


@dataclasses.dataclass(frozen=True)
class AmdCert:
    """An ARK or ASK certificate. Numbers are Python ints; `encode()` lays them out little-endian."""

    key_id: bytes
    certifying_id: bytes
    usage: int
    modulus_bits: int
    pubexp: int
    modulus: int
    signature: int
    pubexp_bits: int | None = None  # None: the same as modulus_bits
    reserved: bytes = bytes(16)
    version: int = 1

    @property
    def size(self) -> int:
        """Bytes of each big number (pubexp, modulus, signature)."""
        return self.modulus_bits // 8

    @property
    def hash(self) -> hashes.HashAlgorithm:
        return hash_for_bits(self.modulus_bits)

    @property
    def simulated(self) -> bool:
        return self.key_id.startswith(SIMULATED_ID_PREFIX)

    def body(self) -> bytes:
        """What the signature covers: the fixed fields, the public exponent and the modulus."""
        pubexp_bits = self.pubexp_bits if self.pubexp_bits is not None else self.modulus_bits
        header = _HEADER.pack(self.version, self.key_id, self.certifying_id, self.usage, self.reserved,
                              pubexp_bits, self.modulus_bits)
        return header + self.pubexp.to_bytes(pubexp_bits // 8, "little") + self.modulus.to_bytes(self.size, "little")

    def encode(self) -> bytes:
        return self.body() + self.signature.to_bytes(self.size, "little")

    @classmethod
    def decode_from(cls, data: bytes, offset: int = 0) -> tuple[AmdCert, int]:
        """The certificate at `offset` and the offset after it (AMD's files concatenate ASK and ARK)."""
        if len(data) - offset < HEADER_SIZE:
            raise CertError(f"an AMD certificate has a {HEADER_SIZE}-byte header; {len(data) - offset} bytes left")
        version, key_id, certifying_id, usage, reserved, pubexp_bits, modulus_bits = _HEADER.unpack_from(data, offset)
        if version != 1:
            raise CertError(f"AMD certificate version {version}, only version 1 exists")
        if usage not in (Usage.ARK, Usage.ASK):
            raise CertError(f"AMD certificate key usage {usage:#x} is neither ARK (0x0) nor ASK (0x13)")
        if pubexp_bits != modulus_bits or modulus_bits not in KEY_BITS:
            raise CertError(f"AMD certificate key sizes {pubexp_bits}/{modulus_bits} bits: AMD's keys are RSA-2048 "
                            "or RSA-4096 with the exponent field as wide as the modulus")
        size = modulus_bits // 8
        start = offset + HEADER_SIZE
        end = start + 3 * size
        signature_raw = data[start + 2 * size:end]
        if len(data) < end:
            if len(data) == start + 2 * size and usage == Usage.ARK and key_id == NAPLES_ARK_ID \
                    and certifying_id == NAPLES_ARK_ID and modulus_bits == 2048:
                from vmmd.sev.amdroots import naples_ark_signature  # AMDESE/AMDSEV#17, as virtee/sev

                signature_raw = naples_ark_signature()
                end = len(data)
            else:
                raise CertError(f"the AMD certificate is {3 * size + HEADER_SIZE} bytes for RSA-{modulus_bits}; "
                                f"only {len(data) - offset} are there")
        cert = cls(key_id, certifying_id, usage, modulus_bits,
                   int.from_bytes(data[start:start + size], "little"),
                   int.from_bytes(data[start + size:start + 2 * size], "little"),
                   int.from_bytes(signature_raw, "little"),
                   None, reserved, version)
        cert.public_key()
        return cert, end

    @classmethod
    def decode(cls, raw: bytes) -> AmdCert:
        cert, end = cls.decode_from(raw)
        if end != len(raw):
            raise CertError(f"{len(raw) - end} bytes follow the {Usage(cert.usage).name} certificate")
        return cert

    def public_key(self) -> rsa.RSAPublicKey:
        if self.modulus.bit_length() != self.modulus_bits or self.pubexp < 3 or self.pubexp % 2 == 0:
            raise CertError(f"the {self.name} certificate's RSA key is malformed (modulus of "
                            f"{self.modulus.bit_length()} bits in a {self.modulus_bits}-bit field, exponent "
                            f"{self.pubexp})")
        try:
            return rsa.RSAPublicNumbers(self.pubexp, self.modulus).public_key()
        except ValueError as err:
            raise CertError(f"the {self.name} certificate's RSA key is not usable: {err}") from None

    @property
    def name(self) -> str:
        return Usage(self.usage).name if self.usage in Usage._value2member_map_ else f"usage {self.usage:#x}"

    def same_key(self, other: AmdCert) -> bool:
        """The same key, id and usage: what makes an ARK the trust anchor it claims to be (the signature aside)."""
        return self.body() == other.body()

    def describe(self) -> str:
        """As sevctl verify prints a key (virtee crypto.rs Display: R<bits> R<hash bits>), with its KEY_ID."""
        text = f"{self.name} R{self.modulus_bits} R{self.hash.digest_size * 8} key id {key_id_text(self.key_id)}"
        return text + (" (vmmd's simulated key, not AMD's)" if self.simulated else "")


def _pss(hash_algorithm: hashes.HashAlgorithm) -> padding.PSS:
    # virtee/sev crypto.rs PublicKey::verify: PKCS1_PSS, salt length = digest length (MGF1 over the same hash,
    # OpenSSL's default for PSS)
    return padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size)


def rsa_pss_verify(signer: AmdCert, signature: int, message: bytes) -> bool:
    """Whether `signature` (the integer the little-endian field holds) is `signer`'s RSA-PSS signature over
    `message`, with the hash of the signer's key size."""
    if signature >= signer.modulus:  # virtee: OpenSSL refuses a signature not below the modulus
        return False
    try:
        signer.public_key().verify(signature.to_bytes(signer.size, "big"), message, _pss(signer.hash), signer.hash)
        return True
    except InvalidSignature:
        return False


def rsa_pss_sign(private: rsa.RSAPrivateKey, message: bytes) -> int:
    """The integer to store (little-endian) as an RSA-PSS signature by `private` (vmmd's simulated keys)."""
    hash_algorithm = hash_for_bits(private.key_size)
    return int.from_bytes(private.sign(message, _pss(hash_algorithm), hash_algorithm), "big")


def verify_signed_by(cert: AmdCert, signer: AmdCert) -> None:
    """Raise CertError unless `signer` (an ARK) signed `cert` (itself, or an ASK), as virtee/sev's
    `(&ca::Certificate, &ca::Certificate).verify()` checks: the signature's usage (always ARK) is the signer's,
    CERTIFYING_ID is the signer's KEY_ID, both keys imply the same hash, and the RSA-PSS signature verifies."""
    what = f"the {cert.describe()} certificate"
    if signer.usage != Usage.ARK:
        raise CertError(f"{what} can only be signed by an ARK, not by the {signer.describe()}")
    if cert.certifying_id != signer.key_id:
        raise CertError(f"{what} names {key_id_text(cert.certifying_id)} as its signer, not the {signer.describe()}")
    if cert.modulus_bits != signer.modulus_bits:
        raise CertError(f"{what} is RSA-{cert.modulus_bits}, signed with another hash than the {signer.describe()} "
                        "uses")
    if not rsa_pss_verify(signer, cert.signature, cert.body()):
        raise CertError(f"{what} carries no valid RSA-PSS signature by the {signer.describe()}")


def make(private: rsa.RSAPrivateKey, usage: Usage, key_id: bytes, signer: rsa.RSAPrivateKey | None = None,
         signer_id: bytes | None = None) -> AmdCert:
    """A certificate for `private`'s public key, signed by `signer` (itself when None): vmmd's simulated ARK/ASK."""
    numbers = private.public_key().public_numbers()
    cert = AmdCert(key_id, signer_id if signer is not None else key_id, int(usage), private.key_size, numbers.e,
                   numbers.n, 0)
    return dataclasses.replace(cert, signature=rsa_pss_sign(signer or private, cert.body()))


def split_ask_ark(data: bytes) -> tuple[AmdCert, AmdCert]:
    """AMD's ask_ark_<generation>.cert (sevctl verify --ca; virtee/sev ca/chain.rs Chain): ASK, then ARK."""
    ask, end = AmdCert.decode_from(data)
    if ask.usage != Usage.ASK:
        raise CertError(f"the first certificate is the {ask.name}, not the ASK (an ask_ark file holds ASK, then ARK)")
    ark, end = AmdCert.decode_from(data, end)
    if ark.usage != Usage.ARK:
        raise CertError(f"the second certificate is the {ark.name}, not the ARK")
    if end != len(data):
        raise CertError(f"{len(data) - end} bytes follow the ARK")
    return ask, ark
