"""The SEV guest owner's protocol: key exchange and session blob, measurement check, LAUNCH_SECRET packets.

Pure code (no KVM, no /dev/sev): what a guest owner runs on a machine of their own, and what the
firmware model (vmmd/sev/launch.py SevModel) runs on the platform's side of the same exchange.
It follows the SEV API (AMD pub. 55766: "Key Agreement", LAUNCH_START, LAUNCH_MEASURE,
LAUNCH_SECRET) byte for byte as virtee/sev implements it (src/session/mod.rs, src/session/key.rs,
src/launch/sev.rs) and virtee/sevctl uses it (src/session.rs, src/secret.rs, src/measurement.rs);
tests/interop/test_sevctl_vectors.py checks their published vectors.

Key exchange (LAUNCH_START):
    Z      = ECDH(owner's private key, platform PDH)  the shared x coordinate, big-endian, 48 bytes
    master = KDF(Z, label "sev-master-secret", context NONCE, 128 bits)
    KEK    = KDF(master, "sev-kek", no context, 128 bits);  KIK = KDF(master, "sev-kik", ...)
    WRAP_TK    = AES-128-CTR(KEK, IV = WRAP_IV) of TEK ‖ TIK
    WRAP_MAC   = HMAC-SHA256(KIK, WRAP_TK)
    POLICY_MAC = HMAC-SHA256(TIK, POLICY as u32 LE)
    session blob = NONCE[16] ‖ WRAP_TK[32] ‖ WRAP_IV[16] ‖ WRAP_MAC[32] ‖ POLICY_MAC[32]   (128 bytes)
KDF is NIST SP 800-108 section 5.1 (counter mode) with HMAC-SHA256: block i = HMAC(key, i (u32 LE) ‖
label ‖ 0x00 ‖ context ‖ L in bits (u32 LE)), as key.rs derive() writes it.

LAUNCH_SECRET packet header (52 bytes): FLAGS u32 LE ‖ IV[16] ‖ MAC[32], with
    payload = AES-128-CTR(TEK, IV) of the secret
    MAC     = HMAC-SHA256(TIK, 0x01 ‖ FLAGS ‖ IV ‖ GUEST_LENGTH u32 ‖ TRANS_LENGTH u32 ‖ payload ‖ MEASURE)
where MEASURE is the 32-byte value LAUNCH_MEASURE reported (sevctl secret.rs, "SEV API section 6.6").
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct
import uuid

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vmmd.sev import sevcert
from vmmd.sev.measure import DIGEST_SIZE, MNONCE_SIZE

KEY_SIZE = 16  # TEK, TIK, KEK, KIK: 128 bits
NONCE_SIZE = 16
IV_SIZE = 16
MAC_SIZE = 32
SESSION_SIZE = NONCE_SIZE + 2 * KEY_SIZE + IV_SIZE + MAC_SIZE + MAC_SIZE  # 128: virtee/sev launch::sev::Session
SECRET_HEADER_SIZE = 4 + IV_SIZE + MAC_SIZE  # 52: virtee/sev launch::sev::Header
SECRET_MAC_CONTEXT = 0x01  # the byte that opens the LAUNCH_SECRET MAC input
SECRET_FLAG_COMPRESSED = 0x1  # HeaderFlags::COMPRESSED: the firmware decompresses the payload
SECRET_FLAGS_KNOWN = SECRET_FLAG_COMPRESSED

# OVMF's SEV secret area: a GUID table (edk2 OvmfPkg/AmdSev/SecretPei; sevctl secret.rs build_secrets_table()):
# table GUID ‖ u32 total length ‖ entries, each entry GUID ‖ u32 length (GUID + length + data) ‖ data; the whole
# table zero-padded to a multiple of 16 bytes. GUIDs are stored in their little-endian (EFI_GUID) byte order.
SEV_SECRET_TABLE_GUID = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")


class OwnerError(ValueError):
    """Input the protocol refuses (a wrong size, a bad certificate, a MAC that does not match)."""


class MacMismatch(OwnerError):
    """A MAC over owner data did not verify: the data was tampered with, or the key is the wrong one."""


# --- primitives over `cryptography` ------------------------------------------------------------
def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(bytes(key), bytes(data), hashlib.sha256).digest()


def aes128_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128 in counter mode (the 16-byte IV is the initial counter block, as OpenSSL's aes-128-ctr)."""
    if len(key) != KEY_SIZE or len(iv) != IV_SIZE:
        raise OwnerError(f"AES-128-CTR needs a {KEY_SIZE}-byte key and a {IV_SIZE}-byte IV")
    ctx = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(iv))).encryptor()
    return ctx.update(bytes(data)) + ctx.finalize()


def kdf(key: bytes, size: int, context: bytes, label: str) -> bytes:
    """NIST SP 800-108 5.1 KDF in counter mode, HMAC-SHA256 PRF (virtee/sev session/key.rs derive())."""
    out = b""
    blocks = -(-size // 32)
    for i in range(1, blocks + 1):
        out += hmac_sha256(key, struct.pack("<I", i) + label.encode() + b"\0" + bytes(context)
                           + struct.pack("<I", size * 8))
    return out[:size]


def shared_secret(private: ec.EllipticCurvePrivateKey, peer: sevcert.SevCert) -> bytes:
    """Z: ECDH over the peer certificate's public key (the x coordinate, big-endian, as OpenSSL derives it)."""
    key = peer.public_key()
    if type(key.curve) is not type(private.curve):
        raise OwnerError(f"the {peer.describe()} key is on another curve than ours ({private.curve.name})")
    return private.exchange(ec.ECDH(), key)


def session_keys(z: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """(KEK, KIK) from the shared secret and the session nonce."""
    master = kdf(z, KEY_SIZE, nonce, "sev-master-secret")
    return kdf(master, KEY_SIZE, b"", "sev-kek"), kdf(master, KEY_SIZE, b"", "sev-kik")


# --- the session blob ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SessionBlob:
    """LAUNCH_START's session buffer (virtee/sev launch::sev::Session, repr(C), 128 bytes)."""

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    def encode(self) -> bytes:
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac

    @classmethod
    def decode(cls, raw: bytes) -> SessionBlob:
        if len(raw) != SESSION_SIZE:
            raise OwnerError(f"a LAUNCH_START session blob is {SESSION_SIZE} bytes, got {len(raw)}")
        raw = bytes(raw)
        return cls(raw[0:16], raw[16:48], raw[48:64], raw[64:96], raw[96:128])


def policy_bytes(policy: int) -> bytes:
    """GCTX.POLICY as POLICY_MAC and the measurement cover it: the u32, little-endian. (virtee/sev builds its
    Policy from a u32 with Version::from(u16), which keeps only nibbles of the API-version bytes [31:16]; for a
    policy that sets them, sevctl session's POLICY_MAC would not match the firmware's. With [31:16] zero, as in
    every published vector, both agree.)"""
    if not 0 <= policy <= 0xFFFF_FFFF:
        raise OwnerError(f"policy {policy:#x} is not a u32")
    return struct.pack("<I", policy)


def wrap_session(z: bytes, nonce: bytes, iv: bytes, tek: bytes, tik: bytes, policy: int) -> SessionBlob:
    """The session blob for shared secret Z (virtee/sev Session::session())."""
    if len(nonce) != NONCE_SIZE or len(tek) != KEY_SIZE or len(tik) != KEY_SIZE:
        raise OwnerError(f"nonce, TEK and TIK are {KEY_SIZE} bytes each")
    kek, kik = session_keys(z, nonce)
    wrap = aes128_ctr(kek, iv, bytes(tek) + bytes(tik))
    return SessionBlob(bytes(nonce), wrap, bytes(iv), hmac_sha256(kik, wrap), hmac_sha256(tik, policy_bytes(policy)))


class PolicyMismatch(MacMismatch):
    """POLICY_MAC does not cover the policy LAUNCH_START was given."""


def unwrap_session(z: bytes, blob: SessionBlob, policy: int) -> tuple[bytes, bytes]:
    """The platform's side: (TEK, TIK) after checking WRAP_MAC with KIK and POLICY_MAC with TIK."""
    kek, kik = session_keys(z, blob.nonce)
    if not hmac.compare_digest(hmac_sha256(kik, blob.wrap_tk), blob.wrap_mac):
        raise MacMismatch("WRAP_MAC does not match the wrapped keys: the session blob was not made for this "
                          "platform's PDH with this guest-owner certificate, or it was altered")
    keys = aes128_ctr(kek, blob.wrap_iv, blob.wrap_tk)
    tek, tik = keys[:KEY_SIZE], keys[KEY_SIZE:]
    if not hmac.compare_digest(hmac_sha256(tik, policy_bytes(policy)), blob.policy_mac):
        raise PolicyMismatch(f"POLICY_MAC does not cover policy {policy:#x}: the guest owner made the session for "
                             "another policy")
    return tek, tik


@dataclasses.dataclass(frozen=True)
class OwnerSession:
    """What `vmctl owner session` makes: the GODH certificate and session blob for the host, TEK/TIK to keep."""

    godh: bytes  # the owner's certificate (0x824 bytes), given to LAUNCH_START as the DH cert
    session: bytes  # the 128-byte session blob
    tek: bytes
    tik: bytes
    policy: int


def make_session(pdh: sevcert.SevCert, policy: int, *, tek: bytes | None = None, tik: bytes | None = None,
                 nonce: bytes | None = None, iv: bytes | None = None,
                 private: ec.EllipticCurvePrivateKey | None = None) -> OwnerSession:
    """A fresh launch session for the platform whose PDH is `pdh` (virtee/sev Session::start_pdh()): a new
    P-384 key pair for the owner (its certificate is the GODH), random TEK, TIK, nonce and IV."""
    if pdh.usage != sevcert.Usage.PDH:
        raise OwnerError(f"the certificate is a {pdh.describe()}, not a PDH")
    if pdh.curve != sevcert.Curve.P384:
        raise OwnerError(f"the PDH key is on {sevcert.Curve(pdh.curve).name}; the SEV key exchange uses P-384")
    if private is None:
        godh, private = sevcert.generate(sevcert.Usage.PDH)
    else:
        godh = sevcert.cert_from_key(private.public_key(), sevcert.Usage.PDH, sevcert.Algo.ECDH_SHA256)
    tek = tek if tek is not None else os.urandom(KEY_SIZE)
    tik = tik if tik is not None else os.urandom(KEY_SIZE)
    blob = wrap_session(shared_secret(private, pdh), nonce if nonce is not None else os.urandom(NONCE_SIZE),
                        iv if iv is not None else os.urandom(IV_SIZE), tek, tik, policy)
    return OwnerSession(godh=godh.encode(), session=blob.encode(), tek=bytes(tek), tik=bytes(tik), policy=policy)


# --- LAUNCH_SECRET -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SecretHeader:
    """LAUNCH_SECRET's packet header (virtee/sev launch::sev::Header; sevctl "Table 55")."""

    flags: int
    iv: bytes
    mac: bytes

    def encode(self) -> bytes:
        return struct.pack("<I", self.flags) + self.iv + self.mac

    @classmethod
    def decode(cls, raw: bytes) -> SecretHeader:
        if len(raw) != SECRET_HEADER_SIZE:
            raise OwnerError(f"a LAUNCH_SECRET packet header is {SECRET_HEADER_SIZE} bytes, got {len(raw)}")
        raw = bytes(raw)
        return cls(struct.unpack_from("<I", raw)[0], raw[4:20], raw[20:52])


def secret_mac(tik: bytes, flags: int, iv: bytes, guest_len: int, trans: bytes, measure: bytes) -> bytes:
    if len(measure) != DIGEST_SIZE:
        raise OwnerError(f"the LAUNCH_MEASURE value is {DIGEST_SIZE} bytes, got {len(measure)}")
    return hmac_sha256(tik, bytes((SECRET_MAC_CONTEXT,)) + struct.pack("<I", flags) + bytes(iv)
                       + struct.pack("<II", guest_len, len(trans)) + bytes(trans) + bytes(measure))


def build_secret(tek: bytes, tik: bytes, measure: bytes, secret: bytes, *, iv: bytes | None = None,
                 flags: int = 0) -> tuple[bytes, bytes]:
    """(packet header, transport-encrypted payload) for LAUNCH_SECRET, bound to the reported MEASURE."""
    if not secret:
        raise OwnerError("the secret is empty")
    iv = iv if iv is not None else os.urandom(IV_SIZE)
    payload = aes128_ctr(tek, iv, secret)
    header = SecretHeader(flags, bytes(iv), secret_mac(tik, flags, iv, len(secret), payload, measure))
    return header.encode(), payload


def open_secret(tek: bytes, tik: bytes, measure: bytes, header: bytes, trans: bytes, guest_len: int) -> bytes:
    """The platform's side: check the packet MAC with TIK and decrypt with TEK; raise MacMismatch on a bad MAC."""
    hdr = SecretHeader.decode(header)
    expected = secret_mac(tik, hdr.flags, hdr.iv, guest_len, trans, measure)
    if not hmac.compare_digest(expected, hdr.mac):
        raise MacMismatch("the LAUNCH_SECRET packet MAC does not verify: the header or payload was altered, or it "
                          "was made with another TIK or for another measurement")
    return aes128_ctr(tek, hdr.iv, trans)


def secret_table_entry(guid: uuid.UUID, data: bytes) -> bytes:
    """One GUID-table entry: GUID (EFI byte order) ‖ u32 length of the whole entry ‖ data."""
    return guid.bytes_le + struct.pack("<I", 16 + 4 + len(data)) + bytes(data)


def build_secret_table(secrets: list[tuple[uuid.UUID, bytes]]) -> bytes:
    """OVMF's SEV secret table holding `secrets` (sevctl secret.rs build_secrets_table()), padded to 16 bytes."""
    table = secret_table_entry(SEV_SECRET_TABLE_GUID, b"".join(secret_table_entry(g, d) for g, d in secrets))
    return table + bytes(-len(table) % 16)


def parse_secret_table(raw: bytes) -> list[tuple[uuid.UUID, bytes]]:
    """The entries of an OVMF SEV secret table; OwnerError when `raw` does not start with one."""
    if len(raw) < 20 or uuid.UUID(bytes_le=bytes(raw[:16])) != SEV_SECRET_TABLE_GUID:
        raise OwnerError("no SEV secret table (GUID 1e74f542-71dd-4d66-963e-ef4287ff173b) at the start")
    (total,) = struct.unpack_from("<I", raw, 16)
    if not 20 <= total <= len(raw):
        raise OwnerError(f"the SEV secret table claims {total} bytes but holds {len(raw)}")
    entries, offset = [], 20
    while offset < total:
        if offset + 20 > total:
            raise OwnerError(f"a truncated secret table entry at offset {offset}")
        guid = uuid.UUID(bytes_le=bytes(raw[offset:offset + 16]))
        (length,) = struct.unpack_from("<I", raw, offset + 16)
        if length < 20 or offset + length > total:
            raise OwnerError(f"secret table entry at offset {offset} has a bad length {length}")
        entries.append((guid, bytes(raw[offset + 20:offset + length])))
        offset += length
    return entries


# --- measurement -------------------------------------------------------------------------------
def split_measurement(blob: bytes) -> tuple[bytes, bytes]:
    """(MEASURE, MNONCE) of a 48-byte LAUNCH_MEASURE blob."""
    if len(blob) != DIGEST_SIZE + MNONCE_SIZE:
        raise OwnerError(f"a LAUNCH_MEASURE blob is {DIGEST_SIZE + MNONCE_SIZE} bytes (MEASURE ‖ MNONCE), "
                         f"got {len(blob)}")
    return bytes(blob[:DIGEST_SIZE]), bytes(blob[DIGEST_SIZE:])
