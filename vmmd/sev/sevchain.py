"""The SEV / SEV-ES certificate chain from a platform's PDH up to AMD's root key, checked before trusting the PDH.

A guest owner wraps its TEK/TIK to the PDH key; a host that handed over a PDH of its own would unwrap them,
so the PDH must be shown to come from a genuine AMD platform (SEV API, AMD pub. 55766, "Platform
Certificates" / "Certificate Chain"):

    ARK  (AMD root, self-signed, RSA: amdcert.py) must be a trust anchor the owner holds
     ⬑ ASK  (AMD SEV signing key of the generation, RSA)
        ⬑ CEK  (chip endorsement key, ECDSA; AMD's KDS serves the ASK-signed certificate for a chip's ID)
     OCA (owner CA, self-signed, ECDSA)      ⬑ PEK  signed by the OCA and by the CEK
                                                ⬑ PDH  signed by the PEK

`verify_chain()` checks every link in the order virtee/sev does (src/certs/sev/chain.rs: ca::Chain first, ARK
self-signed then ARK→ASK, then ASK→CEK; sev/chain.rs: OCA self-signed, OCA→PEK, CEK→PEK, PEK→PDH), after
checking that the ARK is one of the trust anchors given. `parse()` reads what hosts hand out:
SEV_PDH_CERT_EXPORT's cert_chain (PEK ‖ OCA ‖ CEK), sevctl export (PDH ‖ PEK ‖ OCA ‖ CEK: virtee sev/chain.rs
Chain), `sevctl export --full` (then ASK ‖ ARK: virtee chain.rs Chain), and AMD's ask_ark_<gen>.cert.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Sequence

from vmmd.sev import amdcert, amdroots, sevcert
from vmmd.sev.amdcert import AmdCert
from vmmd.sev.sevcert import CertError, SevCert

_SEV_USAGES = (sevcert.Usage.OCA, sevcert.Usage.PEK, sevcert.Usage.PDH, sevcert.Usage.CEK)


class UnsignedCek(CertError):
    """The CEK carries no signature by any ASK at hand: typically the firmware's own CEK (SEV_PDH_CERT_EXPORT),
    which AMD signs only in the copy its key distribution service (KDS) serves."""


@dataclasses.dataclass(frozen=True)
class TrustAnchor:
    """An ARK the owner trusts, and the name to show for it (a generation, or where it came from)."""

    name: str
    ark: AmdCert
    bundled: bool = False  # one of AMD's roots shipped with vmmd (amdroots.py)


@dataclasses.dataclass(frozen=True)
class Certificates:
    """What a set of files held, by role; a role given twice must be the same certificate both times."""

    certs: dict[str, SevCert | AmdCert] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def get(self, role: str):
        return self.certs.get(role)

    def add(self, role: str, cert: SevCert | AmdCert, source: str, replace: bool = False) -> None:
        if role in self.certs and self.certs[role].encode() != cert.encode() and not replace:
            raise CertError(f"{source} and {self.sources[role]} hold two different {role} certificates")
        self.certs[role], self.sources[role] = cert, source


def _looks_like_sev_cert(data: bytes, offset: int) -> bool:
    if len(data) - offset < sevcert.CERT_SIZE:
        return False
    version, _, _, _, usage = struct.unpack_from("<IBBHI", data, offset)
    return version == 1 and usage in _SEV_USAGES


def parse(data: bytes, source: str, into: Certificates | None = None) -> Certificates:
    """Every certificate in `data` (SEV ones of 0x824 bytes, AMD ones of 0x340 or 0x640, concatenated in any of
    the layouts above), added to `into` by role."""
    found = into if into is not None else Certificates()
    offset = 0
    if not data:
        raise CertError(f"{source} is empty")
    while offset < len(data):
        if _looks_like_sev_cert(data, offset):
            try:
                cert: SevCert | AmdCert = SevCert.decode(data[offset:offset + sevcert.CERT_SIZE])
            except CertError as err:
                raise CertError(f"the certificate at byte {offset} of {source}: {err}") from None
            offset += sevcert.CERT_SIZE
        else:
            try:
                cert, offset = AmdCert.decode_from(data, offset)
            except CertError as err:
                raise CertError(f"byte {offset} of {source} starts neither an SEV certificate (PDH, PEK, OCA, CEK; "
                                f"{sevcert.CERT_SIZE} bytes) nor an AMD one (ASK, ARK): {err}") from None
        found.add(cert.name, cert, source)
    return found


def verify_cek_signed_by_ask(cek: SevCert, ask: AmdCert) -> None:
    """One of the CEK's slots is the ASK's RSA-PSS signature over its body, as virtee/sev's `(&ca::Certificate,
    &sev::Certificate).verify()` checks (sev/cert/mod.rs): slot usage ASK, an RSA algorithm whose hash is the one
    the ASK's key size implies (2048: SHA-256, 4096: SHA-384), salt = digest length."""
    want = sevcert.Algo.RSA_SHA256 if ask.modulus_bits == 2048 else sevcert.Algo.RSA_SHA384
    for sig in cek.sigs:
        if sig.usage == amdcert.Usage.ASK and sig.algo == want and amdcert.rsa_pss_verify(ask, sig.rsa, cek.body()):
            return
    raise UnsignedCek(f"the CEK carries no valid signature by the {ask.describe()}")


@dataclasses.dataclass(frozen=True)
class VerifiedChain:
    anchor: TrustAnchor
    pdh: SevCert
    pek: SevCert
    oca: SevCert
    cek: SevCert
    ask: AmdCert
    ark: AmdCert

    @property
    def generation(self) -> str:
        return self.anchor.name

    def describe(self) -> str:
        origin = "AMD root bundled with vmmd" if self.anchor.bundled else "root you supplied"
        return f"{self.generation} (ARK key id {amdcert.key_id_text(self.ark.key_id)}, {origin})"

    def tree(self) -> list[str]:
        """The links checked, laid out as `sevctl verify` prints them (• self-signed, ⬑ signs)."""
        return [self.pdh.fingerprint(), f" ⬑ {self.pek.fingerprint()}", f"   •⬑ {self.oca.fingerprint()}",
                f"    ⬑ {self.cek.fingerprint()}", f"       ⬑ {self.ask.describe()}",
                f"         •⬑ {self.ark.describe()}"]


def _role(cert: SevCert | AmdCert | None, role: str) -> None:
    if cert is None:
        raise CertError(f"the {role} certificate is missing")
    if cert.name != role:
        raise CertError(f"the certificate given as the {role} is a {cert.name} certificate (key usage "
                        f"{cert.usage:#x})")


def _link(what: str, check, *args) -> None:
    try:
        check(*args)
    except CertError as err:
        raise type(err)(f"{what}: {err}") from None


def verify_chain(pdh: SevCert, pek: SevCert, oca: SevCert, cek: SevCert, ask: AmdCert, ark: AmdCert,
                 anchors: Iterable[TrustAnchor]) -> VerifiedChain:
    """Check every link from the PDH up to an ARK among `anchors`; raise CertError naming the link that fails."""
    for cert, role in ((pdh, "PDH"), (pek, "PEK"), (oca, "OCA"), (cek, "CEK"), (ask, "ASK"), (ark, "ARK")):
        _role(cert, role)
    anchors = tuple(anchors)
    anchor = next((a for a in anchors if a.ark.same_key(ark)), None)
    if anchor is None:
        known = ", ".join(a.name for a in anchors) or "none"
        raise CertError(f"the ARK ({ark.describe()}) is not one of the trusted AMD roots ({known})")
    _link("the ARK is not self-signed", amdcert.verify_signed_by, ark, ark)
    _link("the ASK is not signed by the ARK", amdcert.verify_signed_by, ask, ark)
    _link("the CEK is not signed by the ASK", verify_cek_signed_by_ask, cek, ask)
    _link("the OCA is not self-signed", sevcert.verify_signed_by, oca, oca)
    _link("the PEK is not signed by the OCA", sevcert.verify_signed_by, pek, oca)
    _link("the PEK is not signed by the CEK", sevcert.verify_signed_by, pek, cek)
    _link("the PDH is not signed by the PEK", sevcert.verify_signed_by, pdh, pek)
    return VerifiedChain(anchor, pdh, pek, oca, cek, ask, ark)


def bundled_anchors() -> tuple[TrustAnchor, ...]:
    return tuple(TrustAnchor(pair.generation, pair.ark, bundled=True) for pair in amdroots.roots())


def anchor_for(ark: AmdCert, name: str) -> TrustAnchor:
    """A trust anchor for an ARK the owner supplied: named after the bundled generation it is, if it is one."""
    for anchor in bundled_anchors():
        if anchor.ark.same_key(ark):
            return anchor
    return TrustAnchor("vmmd's simulated root" if ark.simulated else name, ark)


def bundled_roots_for(cek: SevCert) -> amdroots.Roots:
    """The bundled generation whose ASK signed this CEK (virtee/sev lib.rs `Generation::try_from(&sev::Chain)`)."""
    for pair in amdroots.roots():
        try:
            verify_cek_signed_by_ask(cek, pair.ask)
            return pair
        except CertError:
            continue
    raise UnsignedCek(f"the CEK is not signed by the ASK of any AMD generation bundled with vmmd "
                      f"({', '.join(amdroots.generations())})")


def verify_certificates(found: Certificates, ca: Sequence[AmdCert] | None = None,
                        ca_name: str = "the ARK you supplied") -> VerifiedChain:
    """The whole check for what an owner was given: the SEV part from `found`; ASK and ARK from `ca` (ASK, ARK:
    the owner's explicit choice, so its ARK becomes a trust anchor), else from `found` (a sevctl export --full
    file: its ARK must be a bundled root), else the bundled generation whose ASK signed the CEK."""
    missing = [role for role in ("PDH", "PEK", "OCA", "CEK") if found.get(role) is None]
    if missing:
        raise CertError(f"the chain lacks the {', '.join(missing)} certificate{'s' if len(missing) > 1 else ''}")
    anchors = list(bundled_anchors())
    if ca is not None:
        ask, ark = ca
        anchors.append(anchor_for(ark, ca_name))
    elif found.get("ASK") is not None or found.get("ARK") is not None:
        ask, ark = found.get("ASK"), found.get("ARK")
    else:
        pair = bundled_roots_for(found.get("CEK"))
        ask, ark = pair.ask, pair.ark
    return verify_chain(found.get("PDH"), found.get("PEK"), found.get("OCA"), found.get("CEK"), ask, ark, anchors)
