"""Untrusted bytes into the owner protocol's parsers and the firmware model: only the protocol's own errors come out.

A DH certificate, a session blob and a LAUNCH_SECRET packet reach vmmd from outside (the guest owner, through
the host's files and the daemon); the secret table reaches the guest; the platform's certificate chain reaches the
guest owner from the host. Whatever their bytes, decoding answers
with CertError / OwnerError and the model with SevError (a firmware status), never another exception.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmd.memory import GuestMemory
from vmmd.sev import measure, owner, sevcert, vmsa
from vmmd.sev.launch import SevModel
from vmmd.sev.psp import SevError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_VALID_CERT = sevcert.generate()[0].encode()


def _mutated(base: bytes):
    """The valid bytes with a few positions overwritten, or anything at all."""
    edits = st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=8)
    return st.one_of(st.binary(max_size=len(base) + 8),
                     edits.map(lambda es: bytes(_apply(bytearray(base), es))))


def _apply(data: bytearray, edits) -> bytearray:
    for at, value in edits:
        data[at] = value
    return data


@SETTINGS
@given(_mutated(_VALID_CERT))
def test_certificate_decoding_only_raises_cert_error(raw: bytes) -> None:
    try:
        cert = sevcert.SevCert.decode(raw)
    except sevcert.CertError:
        return
    assert cert.encode() == raw or len(raw) == sevcert.CERT_SIZE


def _naples_full_chain() -> bytes:
    """virtee/sev's Naples platform certificates and the bundled Naples ASK/ARK, laid out as sevctl export --full."""
    from tests.interop.test_sev_chain import _chain_bytes
    from vmmd.sev import amdroots

    files, pair = _chain_bytes("naples"), amdroots.by_generation("naples")
    return b"".join(files[r] for r in ("PDH", "PEK", "OCA", "CEK")) + pair.ask.encode() + pair.ark.encode()


_FULL_CHAIN = _naples_full_chain()


@SETTINGS
@given(_mutated(_FULL_CHAIN), st.integers(0, len(_FULL_CHAIN)))
def test_chain_parsing_and_checking_only_raise_cert_error(raw: bytes, cut: int) -> None:
    """A host's chain file, altered or cut anywhere: parse() and the chain check answer with CertError, and a chain
    verifies only if every signed byte is the original's (what no signature covers, e.g. an empty slot, may differ)."""
    from vmmd.sev import sevchain

    original = {role: cert.body() for role, cert in sevchain.parse(_FULL_CHAIN, "chain").certs.items()}
    for data in (raw, raw[:cut]):
        try:
            found = sevchain.parse(data, "chain")
            verified = sevchain.verify_certificates(found)
        except sevcert.CertError:
            continue
        assert verified.generation == "Naples"
        assert {role: cert.body() for role, cert in found.certs.items()} == original


@SETTINGS
@given(st.binary(max_size=200))
def test_secret_table_parsing_only_raises_owner_error(raw: bytes) -> None:
    table = owner.SEV_SECRET_TABLE_GUID.bytes_le + raw
    try:
        entries = owner.parse_secret_table(table)
    except owner.OwnerError:
        return
    assert all(len(data) <= len(table) for _, data in entries)


@pytest.fixture(scope="module")
def measured_model():
    """A model launch stopped after LAUNCH_MEASURE, with a guest owner's session."""
    pdh, pdh_key = sevcert.generate()
    made = owner.make_session(pdh, 0x5)
    memory = GuestMemory.with_ram(2 << 20)
    model = SevModel(memory, pdh_key=pdh_key)
    model.init2(0, 0)
    model.launch_start(0x5, made.godh, made.session)
    model.launch_update_vmsa([bytes(vmsa.build_vmsa(vmsa.x86_reset_state(0x00A00F11, cs_base=0, rip=0x1000),
                                                    vmsa_features=0, init2=True))])
    model.launch_measure(measure.MEASURE_BLOB_SIZE)
    yield model, made, memory
    memory.close()


@SETTINGS
@given(header=st.binary(max_size=80), gpa=st.integers(-(1 << 20), 1 << 40), size=st.integers(0, 64))
def test_launch_secret_with_random_packets_answers_with_firmware_status(measured_model, header: bytes, gpa: int,
                                                                        size: int) -> None:
    model, _, memory = measured_model
    before = memory.read(0, 2 << 20)
    with pytest.raises(SevError):
        model.launch_secret(header, gpa, bytes(size))
    assert memory.read(0, 2 << 20) == before  # nothing was written


@SETTINGS
@given(cert=_mutated(_VALID_CERT), session=st.binary(max_size=140))
def test_launch_start_with_random_owner_inputs_answers_with_firmware_status(cert: bytes, session: bytes) -> None:
    pdh, pdh_key = sevcert.generate()
    memory = GuestMemory.with_ram(2 << 20)
    try:
        model = SevModel(memory, pdh_key=pdh_key, owns_memory=False)
        model.init2(0, 0)
        if not cert and not session:  # no guest owner: the firmware draws TEK and TIK itself
            model.launch_start(0x5, cert, session)
            return
        with pytest.raises(SevError):
            model.launch_start(0x5, cert, session)
    finally:
        memory.close()
